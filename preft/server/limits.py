"""Per-request limits of ``preft serve``, each with its flag (``docs/server.md``: Limits and errors).

Plain data and argparse only: ``preft --help`` builds these flags without importing the server stack.
``preft.server.guard`` enforces them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


@dataclass
class ServerLimits:
    """Per-request limits of ``preft serve``; each field is a flag (``--max-n`` for ``max_n``)."""

    max_request_body_bytes: int = 4 << 20
    max_n: int = 16
    max_prompts_per_request: int = 64
    max_choices_per_request: int = 64
    max_stop_sequences: int = 16
    max_stop_length: int = 256

    HELP = {
        "max_request_body_bytes": "largest request body in bytes; a larger one is refused with 413 before it is parsed",
        "max_n": "largest 'n' (and 'best_of') of a request",
        "max_prompts_per_request": "most prompts in one /v1/completions request",
        "max_choices_per_request": "most choices (prompts x n) in one request; with the context this bounds a request's tokens",
        "max_stop_sequences": "most 'stop' strings, and most 'stop_token_ids', in one request",
        "max_stop_length": "longest 'stop' string, in characters",
    }

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("request limits (docs/server.md: Limits and errors)")
        for f in fields(cls):
            group.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default, metavar="N", help=cls.HELP[f.name])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerLimits:
        limits = cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})
        for f in fields(cls):
            if getattr(limits, f.name) < 1:
                raise ValueError(f"--{f.name.replace('_', '-')} must be >= 1, got {getattr(limits, f.name)}")
        return limits

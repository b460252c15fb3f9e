"""OpenAI strictness: request options preft does not implement are a 400 that names them, never ignored.

- OpenAI-defined fields that preft does not implement (``NOT_SUPPORTED``): a 400 naming the field
  unless the value is one that asks for nothing (``None``, ``store=false``, ``modalities=["text"]``);
- OpenAI-defined fields that only matter to OpenAI's platform (``NO_EFFECT``): accepted;
- any other unknown field: accepted and logged once per name, as vLLM does;
- ``stream_options`` without ``stream`` and ``top_logprobs`` without ``logprobs``: 400, as OpenAI answers.

``docs/compatibility.md`` lists every option with its status; a test checks it against these sets,
the request models and the CLI parsers, so the table cannot drift.
"""

from __future__ import annotations

import logging
from typing import Any

from preft.server.protocol import APIError

logger = logging.getLogger("preft.server")

# OpenAI request field -> the values that ask for nothing (accepted); any other value is a 400.
NOT_SUPPORTED: dict[str, tuple] = {
    "audio": (None,),
    "function_call": (None,),  # deprecated by OpenAI; use tools / tool_choice
    "functions": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "moderation": (None,),
    "store": (None, False),
}
# OpenAI request fields about OpenAI's platform (billing, retention, routing): accepted, no effect on the output.
NO_EFFECT = frozenset(
    {"metadata", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options"}
)

# Unknown field names already logged: a process-wide set so a busy server logs each name once (as vLLM).
_logged_unknown: set[str] = set()


def check_request(body: Any) -> None:
    """400 for an OpenAI option preft does not implement or an inconsistent pair; log unknown fields once."""
    for name, value in (body.model_extra or {}).items():
        if name in NOT_SUPPORTED:
            if value not in NOT_SUPPORTED[name]:
                raise APIError(400, f"'{name}' is not supported by preft; leave it out", param=name)
        elif name not in NO_EFFECT and name not in _logged_unknown:
            _logged_unknown.add(name)
            logger.warning("ignoring unknown request field %r (logged once per field name)", name)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if getattr(body, "top_logprobs", None) is not None and getattr(body, "logprobs", None) is not True:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")

"""Structured outputs: a grammar per request (xgrammar), a matcher per sequence, one token bitmask per step.

A request's ``SamplingParams.structured`` names its grammar, one of:

- ``{"json": schema}``: JSON valid against a JSON schema (``schema`` ``None``: any JSON object, as
  OpenAI's ``json_object``);
- ``{"regex": pattern}``, ``{"choice": [str, ...]}``, ``{"grammar": ebnf}`` (GBNF / xgrammar EBNF).

Grammars are compiled once per distinct spec and cached, by the server on a worker thread or else
when the request is added, never per step. Each sampled step fills an int32 bitmask ``[B, ceil(V / 32)]`` in xgrammar's
layout (bit ``j`` of word ``w`` set: token ``32 * w + j`` allowed) in one batched C++ call, rows of
unconstrained sequences all ones; the sampler applies it vectorised. A sequence's matcher accepts each
token it samples; a matcher that has terminated (grammar complete, stop token accepted) ends the
request with finish ``"stop"``.

xgrammar is imported lazily: the engine runs without it until a request asks for structured output.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from preft.errors import PreftError

if TYPE_CHECKING:
    from preft.engine.sequence import Sequence

logger = logging.getLogger(__name__)
KINDS = ("json", "regex", "choice", "grammar")
XGRAMMAR_INSTALL = "structured outputs need xgrammar: pip install 'preft[server]' (or pip install xgrammar)"


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise PreftError(XGRAMMAR_INSTALL) from None
    return xgrammar


def check_spec(spec: dict, param: str = "structured") -> None:
    """Raise a ``PreftError`` naming ``param`` unless ``spec`` is one well-formed grammar (see module doc).

    Tokenizer-independent: the grammar is parsed (a bad JSON schema or regex fails here) but not compiled.
    """
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise PreftError(f"{param}: a structured-output spec is one of {{{', '.join(repr(k) for k in KINDS)}}}: value, got {spec!r}")
    kind, value = next(iter(spec.items()))
    if kind == "json" and value is not None and not isinstance(value, dict):
        raise PreftError(f"{param}: the JSON schema must be an object, got {type(value).__name__}")
    if kind in ("regex", "grammar") and (not isinstance(value, str) or not value):
        raise PreftError(f"{param}: the {kind} must be a non-empty string")
    if kind == "choice" and (not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value)):
        raise PreftError(f"{param}: the choices must be a non-empty list of non-empty strings")
    try:
        _grammar(_xgrammar(), spec)
    except PreftError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError / ValueError with the parser's message
        message = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip().splitlines()[-1])  # drop xgrammar's "[time] file.cc:line: "
        raise PreftError(f"{param}: invalid {kind}: {message}") from None


def _grammar(xgr, spec: dict):
    kind, value = next(iter(spec.items()))
    if kind == "json":
        # No free whitespace: a small model given a choice may emit newlines forever inside an object.
        if value is None:  # any JSON object (OpenAI's json_object), compact
            return xgr.Grammar.from_json_schema({"type": "object"}, any_whitespace=False, strict_mode=False)
        return xgr.Grammar.from_json_schema(value, any_whitespace=False)
    if kind == "regex":
        return xgr.Grammar.from_regex(value)
    if kind == "choice":
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
    return xgr.Grammar.from_ebnf(value)


class GuidedDecoding:
    """Compiles grammars for one tokenizer and fills each step's token bitmask (see module doc)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width; may exceed the tokenizer's vocabulary
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler = None
        self._batch = None
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def compile(self, spec: dict):
        """The compiled grammar of ``spec``: compiled on first use, then cached. Thread-safe, so a server
        compiles on a worker thread and the engine thread's ``add_request`` finds it ready."""
        key = json.dumps(spec, sort_keys=True)
        with self._lock:
            if key not in self._cache:
                xgr = _xgrammar()
                if self._compiler is None:  # the tokenizer's vocabulary, read once (~0.6 s for 49k tokens)
                    info = xgr.TokenizerInfo.from_huggingface(
                        self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                    )
                    self._compiler = xgr.GrammarCompiler(info, max_threads=1)
                    self._batch = xgr.BatchGrammarMatcher(max_threads=1)
                check_spec(spec)
                self._cache[key] = self._compiler.compile_grammar(_grammar(xgr, spec))
            return self._cache[key]

    def matcher(self, spec: dict):
        """A fresh matcher for one sequence (see ``compile``)."""
        return _xgrammar().GrammarMatcher(self.compile(spec))

    def bitmask(self, seqs: list[Sequence]) -> Tensor | None:
        """int32 ``[len(seqs), ceil(V / 32)]`` of allowed next tokens, or None when no sequence is constrained."""
        rows = [i for i, seq in enumerate(seqs) if seq.guide is not None]
        if not rows:
            return None
        xgr = _xgrammar()
        mask = xgr.allocate_token_bitmask(len(seqs), self.vocab_size)  # all ones: unconstrained rows allow every token
        self._batch.batch_fill_next_token_bitmask([seqs[i].guide for i in rows], mask, indices=rows)
        return mask

    @staticmethod
    def accept(seq: Sequence, token_id: int) -> bool:
        """Advance ``seq``'s matcher by its sampled token; True when the grammar has terminated (the request ends)."""
        if not seq.guide.accept_token(token_id):  # cannot happen under the bitmask; end the request rather than the engine
            logger.error("request %r: token %d violates its structured-output grammar; ending it", seq.request_id, token_id)
            return True
        return seq.guide.is_terminated()


def apply_token_bitmask(logits: Tensor, token_bitmask: Tensor) -> Tensor:
    """``logits [B, V]`` with every token whose bit is clear in ``token_bitmask [B, ceil(V / 32)]`` set to -inf."""
    vocab = logits.shape[-1]
    bits = torch.arange(32, device=logits.device, dtype=torch.int32)
    words = token_bitmask.to(logits.device)
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab]
    return logits.masked_fill(~allowed, float("-inf"))

"""Text from the engine's token-id deltas: incremental detokenisation and stop strings, off the engine thread.

The engine emits token ids only (``CompletionDelta``); whoever shows text owns a ``Detokenizer`` per
completion: ``LLM.generate`` on its own thread, the server in each request's asyncio task. So the
engine thread never decodes.

Where stop strings are matched: here, because it needs text. When a stop string appears, the
detokenizer records which token completed it (``num_tokens``); the caller then ends that sequence in
the engine (``LLMEngine.stop_sequence``, or an abort through the server's engine loop). Offline this
happens before the next step, so no token is wasted; in the server the engine may have sampled a
token or two more by the time the command runs: those are dropped here, never shown and never
counted in ``usage``. Text that could still grow into a stop string is held back
(``visible_text``), so a stream never shows text that is cut later.
"""

from __future__ import annotations


class Detokenizer:
    """The text of one completion, fed token by token; the text grows by whole characters only."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.token_ids: list[int] = []  # the completion's tokens, up to and including the one that completed a stop string
        self.text = ""  # decoded so far (a stop string and anything after it excluded)
        self.prefix_offset = self.read_offset = 0  # decoding window over ``token_ids``
        self.stopped = False  # a stop string was found; later tokens are ignored

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def add(self, token_ids: list[int], finished: bool = False) -> bool:
        """Append new tokens (``finished``: the last ones of the completion, so flush any partial character).
        Returns True if a stop string was found now; tokens after the one that completed it are dropped."""
        if self.stopped:
            return False
        for token in token_ids:
            searched = len(self.text)
            self.token_ids.append(token)
            self._decode(flush=False)
            if self.stop and self._cut_stop(searched):
                return True
        return self.flush() if finished else False

    def flush(self) -> bool:
        """Show a character the last tokens left incomplete (as decoding all tokens would: U+FFFD); True on a stop string."""
        searched = len(self.text)
        self._decode(flush=True)
        return bool(self.stop) and not self.stopped and self._cut_stop(searched)

    def _decode(self, flush: bool) -> None:
        """Extend ``text`` by the newest tokens' text, decoding only a short window (not the whole output).

        Bytes of a character that is not complete yet (the window decodes to a trailing U+FFFD) wait for
        the next token unless ``flush``; so the text only ever grows by whole characters and, at the end,
        equals decoding all tokens. No space clean-up: it would depend on where the window starts.
        """
        tokens, decode = self.token_ids, self.tokenizer.decode
        prefix = decode(tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        window = decode(tokens[self.prefix_offset :], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if len(window) > len(prefix) and (flush or not window.endswith("\ufffd")):
            self.text += window[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(tokens)

    def _cut_stop(self, searched: int) -> bool:
        start = max(0, searched - max(map(len, self.stop)) + 1)
        cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut < 0:
            return False
        self.text, self.stopped = self.text[:cut], True
        return True

    def visible_text(self, finished: bool) -> str:
        """What may be shown now: all of it once finished, else without an end that may become a stop string."""
        if finished or self.stopped:
            return self.text
        keep = held_back(self.text, self.stop)
        return self.text[: len(self.text) - keep] if keep else self.text


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop string (not shown yet)."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best

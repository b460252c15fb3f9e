"""The text path of a stream, token by token, with SmolLM2's real byte-level BPE tokenizer and no model.

Engine side: ``LLMEngine._append`` (detokenise, stop strings) and ``_request_output`` (hold back a
possible stop string); server side: ``Choices.new_text`` (what one SSE chunk carries). Together they
must stream whole characters only, never an empty chunk, never a stop string, and chunks that add
up to the non-streamed text: nothing held back is lost or sent twice.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from preft.engine import SamplingParams
from preft.engine.llm_engine import LLMEngine
from preft.engine.sequence import Sequence, SequenceStatus
from preft.server.app import Choices
from preft.server.engine_loop import _snapshot

pytestmark = pytest.mark.real_model

TEXT = "naïve café 日本語 😀👍🏽 ¿qué?  two  spaces\n"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


class _Scheduler:
    def finish(self, seq: Sequence, reason: str) -> None:
        if not seq.is_finished:
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason


def stream_tokens(tokenizer, ids: list[int], params: SamplingParams) -> tuple[list[dict], str, str, int]:
    """Play ``ids`` as the sampled tokens of one request; the SSE chunk fields, final text, finish reason, tokens used."""
    engine = LLMEngine.__new__(LLMEngine)  # only the per-token text path; no model behind it
    engine.tokenizer, engine.eos_token_ids, engine.max_model_len = tokenizer, {tokenizer.eos_token_id}, 10_000
    engine.scheduler, engine.generation_tokens = _Scheduler(), 0
    seq = Sequence("r", [1], params)
    engine.requests = {"r": [seq]}
    choices, chunks = Choices(["r"], 1), []
    for token in ids:
        engine._append(seq, token)
        update = _snapshot(engine._request_output("r"))
        new = choices.new_text(0, update.outputs[0])
        if new is not None:
            text, tokens, _, offset = new
            chunks.append({"text": text, "token_ids": list(tokens), "offset": offset, "finish_reason": update.outputs[0].finish_reason})
        if seq.is_finished:
            break
    return chunks, seq.text, seq.finish_reason, len(seq.completion_token_ids)


def check_chunks(chunks: list[dict], final: str, stops: list[str]) -> None:
    assert "".join(c["text"] for c in chunks) == final
    assert [c["finish_reason"] for c in chunks if c["finish_reason"]] == [chunks[-1]["finish_reason"]]
    for c in chunks[:-1]:
        assert c["text"] and "\ufffd" not in c["text"], chunks  # nothing sent while a character is incomplete
    sent = ""
    for c in chunks:
        assert c["offset"] == len(sent)
        sent += c["text"]
        assert not any(stop in sent for stop in stops), f"{sent!r} shows a stop string"


def test_stream_without_stops_sends_whole_characters_and_the_exact_text(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    chunks, final, reason, used = stream_tokens(tokenizer, ids, SamplingParams(max_tokens=len(ids)))
    assert final == TEXT and reason == "length" and used == len(ids)
    check_chunks(chunks, TEXT, [])
    assert sum((c["token_ids"] for c in chunks), []) == ids  # tokens of a waiting character ride with its text
    assert len(chunks) < len(ids)


def test_eos_finishes_with_one_empty_final_chunk(tokenizer):
    ids = [*tokenizer.encode("Paris 😀", add_special_tokens=False), tokenizer.eos_token_id, 42]
    chunks, final, reason, used = stream_tokens(tokenizer, ids, SamplingParams(max_tokens=50))
    assert (final, reason, used) == ("Paris 😀", "stop", len(ids) - 1)
    check_chunks(chunks, final, [])
    assert chunks[-1]["text"] == "" and chunks[-1]["token_ids"] == [tokenizer.eos_token_id]


@pytest.mark.parametrize(
    "stops",
    [
        ["日本語"],  # a stop made of characters split over several tokens
        ["😀👍"],
        ["two  spaces"],
        ["spaces", "qué"],  # the earliest match wins
        ["é"],
        ["café 日本X", "two  spacesX", "👍🏽 ¿X"],  # long partial matches, held back, then released
    ],
)
def test_stop_strings_cut_the_text_and_held_back_text_is_neither_lost_nor_repeated(tokenizer, stops):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    chunks, final, reason, used = stream_tokens(tokenizer, ids, SamplingParams(max_tokens=len(ids), stop=stops))
    cut = min((TEXT.find(s) for s in stops if s in TEXT), default=-1)
    expected = TEXT if cut < 0 else TEXT[:cut]
    assert final == expected and reason == ("stop" if cut >= 0 else "length")
    check_chunks(chunks, expected, stops)
    if cut >= 0:  # generation ends with the token that completes the stop string
        before, upto = tokenizer.decode(ids[: used - 1]), tokenizer.decode(ids[:used])
        assert not any(s in before for s in stops) and any(s in upto for s in stops)

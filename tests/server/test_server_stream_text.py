"""The text path of a stream, token by token, with SmolLM2's real byte-level BPE tokenizer and no model.

The engine emits token-id deltas (``CompletionDelta``; EOS and max_tokens end them there); the
server's ``Choices`` detokenises them off the engine thread, matches stop strings (asking the
engine to stop the sequence) and decides what one SSE chunk carries (``new_text``). Together they
must stream whole characters only, never an empty chunk, never a stop string, and chunks that add
up to the non-streamed text: nothing held back is lost or sent twice.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from preft.engine import SamplingParams
from preft.engine.sequence import CompletionDelta, RequestOutput
from preft.server.app import Choices

pytestmark = pytest.mark.real_model

TEXT = "naïve café 日本語 😀👍🏽 ¿qué?  two  spaces\n"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def engine_deltas(tokenizer, ids: list[int], params: SamplingParams):
    """What the engine emits for one request sampling ``ids``: one delta per token; EOS or max_tokens end it."""
    for n, token in enumerate(ids, start=1):
        reason = "stop" if token == tokenizer.eos_token_id else "length" if n >= params.max_tokens else None
        yield RequestOutput("r", [1], [CompletionDelta(0, [token], reason, n)], reason is not None)
        if reason is not None:
            return


def stream_tokens(tokenizer, ids: list[int], params: SamplingParams) -> tuple[list[dict], str, str, int]:
    """Play ``ids`` as the sampled tokens of one request; the SSE chunk fields, final text, finish reason, tokens billed."""
    stopped = []
    choices, chunks = Choices(["r"], 1, tokenizer, params.stop, lambda rid, index: stopped.append((rid, index))), []
    for update in engine_deltas(tokenizer, ids, params):
        for index in choices.apply(update):
            new = choices.new_text(index)
            if new is not None:
                text, tokens, _, offset = new
                reason = choices.state[index].finish_reason
                chunks.append({"text": text, "token_ids": list(tokens), "offset": offset, "finish_reason": reason})
        if choices.finished():
            break
    choice = choices.state[0]
    assert stopped == ([("r", 0)] if choice.detok.stopped else [])  # a stop string found here ends the engine's sequence
    assert choices.usage()["completion_tokens"] == choice.detok.num_tokens
    return chunks, choice.text, choice.finish_reason, choice.detok.num_tokens


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


def test_tokens_the_engine_sampled_after_a_stop_string_are_neither_shown_nor_billed(tokenizer):
    # the engine thread may run a step or two before the stop command reaches it: one delta then holds them all
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    stopped = []
    choices = Choices(["r"], 1, tokenizer, ["日本語"], lambda rid, index: stopped.append(index))
    choices.apply(RequestOutput("r", [1], [CompletionDelta(0, ids, None, len(ids))], False))
    text, tokens, _, _ = choices.new_text(0)
    used = next(n for n in range(1, len(ids) + 1) if "日本語" in tokenizer.decode(ids[:n]))
    assert text == TEXT[: TEXT.find("日本語")] and list(tokens) == ids[:used] and stopped == [0]
    assert choices.finished() and choices.unfinished() == [] and choices.usage()["completion_tokens"] == used
    choices.apply(RequestOutput("r", [1], [CompletionDelta(0, [42], "abort", len(ids) + 1)], True))  # the engine's late end
    assert choices.new_text(0) is None and choices.state[0].finish_reason == "stop"

"""Incremental detokenisation with a real byte-level BPE tokenizer (SmolLM2's), one token at a time.

Byte-level BPE splits a multi-byte character (accents, CJK, emoji) over several tokens, and one
token may carry a space plus the first bytes of an emoji. The text must grow by whole characters
only and, at the end, equal decoding every token at once.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from preft.engine.detokenizer import Detokenizer, held_back

pytestmark = pytest.mark.real_model

MIXED = "naïve café 日本語 😀👍🏽 ¿qué?  two  spaces\n"
TEXTS = [
    MIXED,
    "  leading spaces, tabs\t\tand\n\nblank lines  ",
    "👨‍👩‍👧‍👦 family, 🇫🇷 flag, ½ – “quotes” … ✓",
    "中文文本，한국어 텍스트、ひらがな。Ελληνικά русский",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def feed(tokenizer, ids: list[int], flush_last: bool = True) -> tuple[Detokenizer, list[str]]:
    """Detokenise ``ids`` one at a time, as the engine's deltas arrive; the text after each token."""
    seq = Detokenizer(tokenizer)
    texts = []
    for i, token in enumerate(ids):
        seq.add([token], finished=flush_last and i == len(ids) - 1)
        texts.append(seq.text)
    return seq, texts


@pytest.mark.parametrize("text", TEXTS, ids=["mixed", "spaces", "emoji-sequences", "scripts"])
def test_token_by_token_text_grows_by_whole_characters_and_rebuilds_the_string_exactly(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    seq, texts = feed(tokenizer, ids)
    assert seq.text == text
    for i, shown in enumerate(texts):
        assert text.startswith(shown), f"after token {i}: {shown!r} is not a prefix of the text"
        assert "\ufffd" not in shown
        whole = tokenizer.decode(ids[: i + 1])
        if not whole.endswith("\ufffd"):  # the tokens so far end on a character boundary: nothing waits
            assert shown == whole, f"after token {i}: {shown!r} lags behind {whole!r}"


def test_the_mixed_string_really_splits_characters_across_tokens(tokenizer):
    # the property above only means something if some tokens are pieces of a character
    ids = tokenizer.encode(MIXED, add_special_tokens=False)
    pieces = [t for t in ids if "\ufffd" in tokenizer.decode([t])]
    assert len(pieces) >= 10
    _, texts = feed(tokenizer, ids)
    deltas = [b[len(a) :] for a, b in zip(["", *texts], texts)]
    assert "".join(deltas) == MIXED
    assert {"本", "語", " 😀", "👍", "🏽"} <= set(deltas)  # each shown once all its pieces came
    assert deltas.count("") >= len(pieces) // 2  # ... and nothing was shown while they were coming


def test_flush_shows_a_character_cut_by_the_end_as_decoding_all_tokens_does(tokenizer):
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)
    cut = ids[:-1]  # the emoji's last byte never comes
    seq, texts = feed(tokenizer, cut, flush_last=False)
    assert seq.text == "ok"  # the space travels in the same token as the emoji's first bytes
    seq.flush()
    assert seq.text == tokenizer.decode(cut) == "ok \ufffd"
    seq.flush()  # nothing new: a second flush adds nothing
    assert seq.text == "ok \ufffd"


def test_eos_and_other_special_tokens_add_no_text(tokenizer):
    ids = tokenizer.encode("Paris.", add_special_tokens=False)
    assert tokenizer.eos_token_id == 2
    seq, texts = feed(tokenizer, [*ids, tokenizer.convert_tokens_to_ids("<|im_start|>"), 2])
    assert texts[-2:] == ["Paris.", "Paris."] and seq.text == "Paris."


def test_held_back_keeps_every_possible_start_of_a_stop_string_with_multibyte_characters():
    assert held_back("café 日本", ["日本語"]) == 2
    assert held_back("café 日", ["日本語", "é 日x"]) == 3
    assert held_back("😀👍", ["👍🏽!"]) == 1
    assert held_back("two ", ["  two", " two"]) == 1
    assert held_back("done", ["日本語"]) == 0

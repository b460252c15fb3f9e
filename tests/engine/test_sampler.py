"""Sampling: seeded reproducibility (and equality with the reference generator), stops, n > 1, logprobs."""

from __future__ import annotations

import math
import re

import pytest

from preft.engine import SamplingParams
from preft.engine.detokenizer import Detokenizer, held_back
from preft.errors import PreftError
from preft.hf import generate

PROMPT = [40, 41, 42, 43, 44, 45]


def completion(llm, params, prompt=PROMPT, adapter=None):
    return llm.generate([prompt], params, adapter=adapter, use_tqdm=False)[0].outputs[0]


@pytest.mark.parametrize("knobs", [dict(temperature=1.0), dict(temperature=0.7, top_k=20), dict(temperature=1.3, top_p=0.8)])
def test_seeded_sampling_equals_reference_and_ignores_batch_company(family_pair, knobs):
    llm, ref = family_pair("llama")
    params = SamplingParams(max_tokens=12, seed=123, ignore_eos=True, **knobs)
    alone = completion(llm, params).token_ids
    expected = generate(ref, [PROMPT], None, max_new_tokens=12, seed=123, **knobs).token_ids[0]
    assert alone == expected
    crowd = llm.generate([[7, 8, 9], PROMPT, [5] * 9], [SamplingParams(max_tokens=5, temperature=1.0), params, params], use_tqdm=False)
    assert crowd[1].outputs[0].token_ids == alone
    other_seed = completion(llm, SamplingParams(max_tokens=12, seed=124, ignore_eos=True, **knobs)).token_ids
    assert other_seed != alone
    assert llm.engine.stats()["kv_blocks_used"] == 0


def test_n_samples_are_the_seeded_samples_of_seed_plus_index(family_pair):
    llm, _ = family_pair("qwen2")
    out = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=1.0, seed=7, n=3, ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert c.token_ids == completion(llm, SamplingParams(max_tokens=6, temperature=1.0, seed=7 + c.index, ignore_eos=True)).token_ids
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_string_cuts_text_exactly(family_pair):
    llm, _ = family_pair("llama")
    sampled = dict(temperature=1.0, seed=1, ignore_eos=True)
    full = completion(llm, SamplingParams(max_tokens=24, **sampled), prompt=[55, 56, 57])
    match = re.search(r"[ -~]{2}", full.text[2:])
    assert match, f"no printable pair in {full.text!r}"
    stop = match.group(0)
    cut = completion(llm, SamplingParams(max_tokens=24, stop=[stop, "never-there"], **sampled), prompt=[55, 56, 57])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)


def test_streamed_text_never_shows_a_partial_stop_string():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["world"]) == 0
    assert held_back("abcab", ["abx", "bcabz"]) == 4
    assert held_back("", ["x"]) == 0


def test_stop_token_ids_eos_and_ignore_eos(family_pair, monkeypatch):
    llm, _ = family_pair("mistral")
    full = completion(llm, SamplingParams(max_tokens=10, ignore_eos=True))
    assert full.finish_reason == "length" and len(full.token_ids) == 10
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    by_id = completion(llm, SamplingParams(max_tokens=10, stop_token_ids=[stop_id]))
    assert by_id.finish_reason == "stop" and by_id.token_ids == full.token_ids[: first + 1]
    monkeypatch.setattr(llm.engine, "eos_token_ids", {stop_id})
    by_eos = completion(llm, SamplingParams(max_tokens=10))
    assert by_eos.finish_reason == "stop" and by_eos.token_ids == full.token_ids[: first + 1]
    assert completion(llm, SamplingParams(max_tokens=10, ignore_eos=True)).token_ids == full.token_ids


def test_logprobs_hold_the_top_k_and_the_sampled_token(family_pair):
    llm, _ = family_pair("qwen3")
    out = completion(llm, SamplingParams(max_tokens=5, temperature=1.0, seed=3, logprobs=2, ignore_eos=True))
    assert len(out.logprobs) == 5
    for token, step in zip(out.token_ids, out.logprobs):
        assert token in step and 2 <= len(step) <= 3
        assert all(v <= 0 for v in step.values())
    full = completion(llm, SamplingParams(max_tokens=1, logprobs=261))
    assert math.isclose(sum(math.exp(v) for v in full.logprobs[0].values()), 1.0, rel_tol=1e-4)
    assert completion(llm, SamplingParams(max_tokens=2)).logprobs is None


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(n=0), dict(stop=[""])])
def test_bad_sampling_params_are_refused(bad):
    with pytest.raises(PreftError):
        SamplingParams(**bad)


def test_request_errors_name_the_problem(family_pair):
    llm, _ = family_pair("llama")
    with pytest.raises(PreftError, match="max_model_len"):
        llm.generate([[5] * (llm.max_model_len + 1)], use_tqdm=False)
    with pytest.raises(PreftError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(PreftError, match="outside the vocabulary"):
        llm.generate([[5, 9999]], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_abort_frees_blocks_and_slot(family_pair):
    llm, _ = family_pair("llama")
    engine = llm.engine
    engine.add_request("x", PROMPT * 3, SamplingParams(max_tokens=50, ignore_eos=True), "lora-all-r4")
    engine.step()
    assert engine.stats()["kv_blocks_used"] > 0 and engine.stats()["adapter_slots_used"] == 1
    final = engine.abort_request("x")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert engine.abort_request("x") is None
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["adapter_slots_used"] == 0
    assert not engine.has_unfinished_requests()


def test_incremental_text_equals_decoding_all_tokens(family_pair):
    llm, _ = family_pair("llama")
    for seed in range(3):
        out = completion(llm, SamplingParams(max_tokens=30, temperature=1.0, seed=seed, ignore_eos=True))
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    text = "héllo wörld ✓ done"
    ids = llm.tokenizer.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    seq = Detokenizer(llm.tokenizer)
    for i, token in enumerate(ids):
        seq.add([token], finished=i == len(ids) - 1)
        assert text.startswith(seq.text)  # never a broken character on the way
    assert seq.text == text

"""The vectorised sampler: batch-invariant seeded draws, the sampled distribution (chi-square), filters, the
structured-output bitmask, logit_bias, min_tokens, penalties, logprobs; and the engine and generation_config around it."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from preft.engine import SamplingParams
from preft.engine.sampler import Sampler, SamplingError, apply_penalties, generation_defaults
from preft.engine.sequence import Sequence
from preft.errors import PreftError
from preft.hf import generate
from preft.hf.generate import draw, filter_logits, sample_next, seeded_uniforms

PROMPT = [40, 41, 42, 43, 44, 45]


def completion(llm, params, prompt=PROMPT):
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]


@pytest.mark.parametrize("knobs", [dict(temperature=0.9, min_p=0.1), dict(temperature=1.1, top_k=30, top_p=0.9, min_p=0.02)])
def test_engine_seeded_sampling_with_min_p_equals_the_reference_generator(family_pair, knobs):
    llm, ref = family_pair("llama")
    got = completion(llm, SamplingParams(max_tokens=12, seed=5, ignore_eos=True, **knobs)).token_ids
    assert got == generate(ref, [PROMPT], None, max_new_tokens=12, seed=5, **knobs).token_ids[0]


# ---- the vectorised sampler on its own: logits in, tokens out (no model) ----------------------------------------

VOCAB = 70  # more than two bitmask words


def make_seqs(specs: list[dict], prompt=(1, 2, 3)) -> list[Sequence]:
    """One Sequence per spec: ``SamplingParams`` fields plus ``seed``, ``output`` (tokens generated so far), ``stop_ids``."""
    seqs = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        seed, output, stop_ids = spec.pop("seed", 1000 + i), spec.pop("output", []), spec.pop("stop_ids", ())
        seq = Sequence(f"r{i}", list(prompt), SamplingParams(max_tokens=64, **spec), seed=seed)
        seq.token_ids += output
        seq.min_tokens_stop_ids = tuple(stop_ids)
        seqs.append(seq)
    return seqs


def random_logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


MIXED = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.8, top_k=5),
    dict(temperature=1.2, top_p=0.7),
    dict(temperature=1.0, min_p=0.1, repetition_penalty=1.3),
    dict(temperature=0.9, presence_penalty=0.5, frequency_penalty=0.3, output=[4, 4, 9]),
    dict(temperature=1.0, logit_bias={7: 2.0}, min_tokens=3, stop_ids=[0, 1], output=[5]),
]


def test_a_seeded_row_samples_the_same_token_alone_in_any_batch_company_and_order():
    logits = random_logits(len(MIXED))
    sampler = Sampler()
    for step in range(20):  # different steps draw different numbers; every step must agree
        specs = [dict(spec, output=spec.get("output", []) + [11] * step) for spec in MIXED]
        together = sampler(logits, make_seqs(specs))
        alone = [sampler(logits[i : i + 1], [make_seqs(specs)[i]])[0] for i in range(len(specs))]
        order = torch.randperm(len(specs), generator=torch.Generator().manual_seed(step)).tolist()
        shuffled = sampler(logits[order], [make_seqs(specs)[i] for i in order])
        assert together == alone
        assert shuffled == [together[i] for i in order]


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# 99.9% quantiles of the chi-square distribution (scipy.stats.chi2.ppf(0.999, df)): a correct sampler fails 1 in 1000 seeds
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


@pytest.mark.parametrize(
    "knobs",
    [dict(temperature=0.7), dict(temperature=1.3, top_k=5), dict(temperature=1.0, top_p=0.8), dict(temperature=1.0, min_p=0.05)],
    ids=["temperature", "top_k", "top_p", "min_p"],
)
def test_empirical_distribution_matches_the_filtered_softmax(knobs):
    """20,000 draws of one row (seed 0, steps 0..19,999): chi-square against softmax(logits / T) renormalised
    over the tokens the filter keeps, below the 99.9% quantile; tokens it drops are never drawn."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]])
    probs = torch.softmax(logits[0] / knobs["temperature"], -1).double()
    order = probs.argsort(descending=True)
    if "top_k" in knobs:
        keep = torch.zeros(8, dtype=torch.bool)
        keep[order[: knobs["top_k"]]] = True
    elif "top_p" in knobs:
        before = probs[order].cumsum(0) - probs[order]
        keep = torch.zeros(8, dtype=torch.bool)
        keep[order[before <= knobs["top_p"]]] = True
    elif "min_p" in knobs:
        keep = probs >= knobs["min_p"] * probs.max()
    else:
        keep = torch.ones(8, dtype=torch.bool)
    assert 1 < int(keep.sum()) < 8 or len(knobs) == 1  # a filter does drop something
    expected = torch.where(keep, probs, 0) / probs[keep].sum()
    n = 20_000
    draws = sample_next(logits.expand(n, -1), seed=[0] * n, step=list(range(n)), **knobs)
    counts = torch.bincount(draws, minlength=8).double()
    assert counts[~keep].sum() == 0
    df = int(keep.sum()) - 1
    assert chi_square(counts, expected) < CHI2_999[df], (counts, expected * n)


def test_filters_never_sample_an_excluded_token():
    logits = random_logits(200, seed=3, vocab=50)
    knobs = dict(temperature=1.5, top_k=[1 + i % 7 for i in range(200)], top_p=[0.3 + 0.005 * i for i in range(200)], min_p=0.02)
    for step in range(10):
        draws = sample_next(logits, seed=list(range(200)), step=step, **knobs)
        for row, token in enumerate(draws.tolist()):
            probs = torch.softmax(logits[row] / 1.5, -1)
            rank = int((probs > probs[token]).sum())  # how many tokens are more likely
            more_likely_mass = float(probs[probs > probs[token]].sum())
            assert rank < knobs["top_k"][row]
            assert more_likely_mass <= knobs["top_p"][row] + 1e-6
            assert probs[token] >= 0.02 * probs.max() - 1e-7


def test_greedy_rows_take_the_argmax_and_an_all_greedy_batch_is_one_argmax(monkeypatch):
    logits = random_logits(len(MIXED), seed=5)
    mixed = Sampler()(logits, make_seqs(MIXED))
    assert mixed[0] == int(logits[0].argmax())
    monkeypatch.setattr(importlib.import_module("preft.hf.generate"), "draw", lambda *a: pytest.fail("an all-greedy batch must not draw"))
    assert Sampler()(logits, make_seqs([dict(temperature=0.0)] * len(MIXED))) == logits.argmax(-1).tolist()


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, V]`` -> int32 ``[B, ceil(V / 32)]`` in xgrammar's layout (bit j of word w: token 32 w + j)."""
    rows, vocab = allowed.shape
    padded = torch.zeros(rows, -(-vocab // 32) * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.long()
    words = (padded.view(rows, -1, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_token_bitmask_allows_only_its_tokens_and_all_ones_is_unconstrained():
    specs = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=1.0, logit_bias={3: 100.0}), dict(temperature=1.0)]
    logits = random_logits(len(specs), seed=9)
    allowed = torch.zeros(len(specs), VOCAB, dtype=torch.bool)
    allowed[0, [31, 40]] = True  # bit 31 is the int32 sign bit
    allowed[1, [5, 33, 64, 69]] = True
    allowed[2, [8, 9]] = True  # a +100 bias on a forbidden token does not bring it back
    allowed[3] = True
    mask = pack_bitmask(allowed)
    mask[3] = -1  # what xgrammar fills for an unconstrained row: every bit set, padding bits too
    assert mask[0, 0] < 0
    free = Sampler()(logits, make_seqs(specs))
    for step in range(30):
        seqs = make_seqs([dict(s, output=[12] * step) for s in specs])
        got = Sampler()(logits, seqs, mask)
        assert all(allowed[row, token] for row, token in enumerate(got)), got
        if step == 0:
            assert got[3] == free[3]  # all ones: as if there were no mask
    assert Sampler()(logits[:1], make_seqs(specs[:1]), mask[:1]) == [31 if logits[0, 31] > logits[0, 40] else 40]


def test_logit_bias_forces_and_bans_tokens():
    logits = random_logits(2, seed=11)
    top = int(logits[1].argmax())
    got = Sampler()(logits, make_seqs([dict(temperature=1.0, logit_bias={17: 100.0}), dict(temperature=0.0, logit_bias={top: -100.0})]))
    assert got[0] == 17 and got[1] != top and got[1] == int(logits[1].topk(2).indices[1])


def test_min_tokens_masks_eos_and_stop_ids_until_enough_tokens():
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 2], logits[0, 6], logits[0, 30] = 10.0, 9.0, 1.0  # 2 = EOS, 6 = a stop id: the likeliest tokens
    spec = dict(temperature=0.0, min_tokens=3, stop_ids=[2, 6])
    assert [Sampler()(logits, make_seqs([dict(spec, output=[30] * k)]))[0] for k in range(5)] == [30, 30, 30, 2, 2]


def reference_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """vLLM's penalties, one row and one token at a time."""
    out = logits.clone()
    for row, seq in enumerate(seqs):
        p = seq.params
        output = seq.completion_token_ids
        for token in range(logits.shape[1]):
            value = float(out[row, token])
            if token in seq.token_ids and p.repetition_penalty != 1.0:
                value = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
            value -= p.frequency_penalty * output.count(token) + p.presence_penalty * (token in output)
            out[row, token] = value
    return out


def test_penalties_equal_a_per_token_reference():
    specs = [
        dict(repetition_penalty=1.5, output=[4, 4, 60]),
        dict(presence_penalty=1.0, frequency_penalty=-0.5, output=[1, 7, 7, 7]),
        dict(repetition_penalty=0.7, presence_penalty=-2.0, frequency_penalty=2.0, output=[3, 8]),
        dict(),
    ]
    logits, seqs = random_logits(len(specs), seed=13), make_seqs(specs, prompt=(1, 2, 3, 50))
    torch.testing.assert_close(apply_penalties(logits, seqs), reference_penalties(logits, seqs), rtol=1e-6, atol=1e-6)


def test_logprobs_are_the_models_own_for_the_rows_that_ask():
    specs = [
        dict(temperature=1.0, logprobs=3, repetition_penalty=2.0, output=[5]),
        dict(temperature=0.0),
        dict(temperature=0.5, logprobs=0),
    ]
    logits, seqs = random_logits(len(specs), seed=17), make_seqs(specs)
    for seq in seqs:
        seq.logprobs = [] if seq.params.logprobs is not None else None
    got = Sampler()(logits, seqs)
    expected = torch.log_softmax(logits, -1)
    first, last = seqs[0].logprobs[0], seqs[2].logprobs[0]
    assert set(first) == set(expected[0].topk(3).indices.tolist()) | {got[0]}
    assert all(math.isclose(v, float(expected[0, t]), abs_tol=1e-5) for t, v in first.items())
    assert last == pytest.approx({got[2]: float(expected[2, got[2]])}, abs=1e-5)
    assert seqs[1].logprobs is None


def test_a_temperature_too_small_for_float32_fails_with_a_clear_error():
    with pytest.raises(SamplingError, match="no token could be sampled"):
        Sampler()(random_logits(2), make_seqs([dict(temperature=1.0), dict(temperature=1e-40)]))


def test_seeded_uniforms_are_uniform_and_differ_by_seed_and_step():
    u = seeded_uniforms([7] * 50_000, list(range(50_000)))
    assert u.dtype == torch.float64 and 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u.float(), bins=8, min=0, max=1).double()
    assert chi_square(counts, torch.full((8,), 1 / 8, dtype=torch.float64)) < CHI2_999[7]
    assert seeded_uniforms([1, 2, 2**64 + 1, -1], [0, 0, 0, 0]).unique().numel() == 3  # seeds are taken mod 2**64
    assert torch.equal(seeded_uniforms([5, 6], [3, 4]), torch.cat([seeded_uniforms([5], [3]), seeded_uniforms([6], [4])]))


@pytest.mark.parametrize(
    "bad",
    [
        dict(min_p=1.5),
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-3),
        dict(repetition_penalty=0),
        dict(logit_bias={5: 101}),
        dict(logit_bias={"x": 1}),
        dict(min_tokens=20, max_tokens=10),
        dict(min_tokens=-1),
    ],
)
def test_bad_new_sampling_params_are_refused_with_the_field_named(bad):
    field = next(iter(bad))
    with pytest.raises(PreftError, match=field):
        SamplingParams(**bad)


def test_engine_applies_min_tokens_logit_bias_and_checks_bias_ids(family_pair):
    llm, _ = family_pair("llama")
    first = completion(llm, SamplingParams(max_tokens=8)).token_ids
    eos = llm.engine.eos_token_ids
    forced = completion(llm, SamplingParams(max_tokens=8, logit_bias={first[0]: -100, next(iter(eos)): 100}, min_tokens=3))
    assert len(forced.token_ids) == 4 and forced.token_ids[-1] in eos and forced.finish_reason == "stop"
    assert next(iter(eos)) not in forced.token_ids[:3] and forced.token_ids[0] != first[0]
    with pytest.raises(PreftError, match="logit_bias token ids"):
        completion(llm, SamplingParams(logit_bias={llm.engine.config.vocab_size: 1.0}))
    assert not llm.engine.has_unfinished_requests()


def test_generation_config_defaults_auto_vllm_and_a_folder(tmp_path):
    model, other = tmp_path / "model", tmp_path / "other"
    model.mkdir(), other.mkdir()
    (model / "generation_config.json").write_text('{"temperature": 0.6, "top_p": 0.9, "top_k": 20, "eos_token_id": 2, "do_sample": true}')
    (other / "generation_config.json").write_text('{"repetition_penalty": 1.1, "min_p": 0.05, "top_k": -1, "temperature": null}')
    assert generation_defaults("auto", model) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert generation_defaults("vllm", model) == {}
    assert generation_defaults(str(other), model) == {"repetition_penalty": 1.1, "min_p": 0.05, "top_k": 0}
    assert generation_defaults("auto", tmp_path) == {}
    with pytest.raises(PreftError, match="no generation_config.json"):
        generation_defaults(str(tmp_path), model)


def test_draw_is_a_monotone_inverse_cdf_that_never_returns_a_zero_probability_token():
    vocab = 777  # not a multiple of the 256-token blocks
    probs = torch.rand(1, vocab, generator=torch.Generator().manual_seed(21))
    probs[0, torch.randperm(vocab, generator=torch.Generator().manual_seed(22))[:500]] = 0
    probs[0, :256] = 0  # a whole empty block first
    uniforms = torch.cat([torch.linspace(0, 1, 4001, dtype=torch.float64)[:-1], torch.tensor([1 - 2.0**-53])])
    ids = draw(probs.expand(len(uniforms), -1), uniforms)
    assert bool((probs[0, ids] > 0).all())
    assert bool((ids[1:] >= ids[:-1]).all())  # inverse CDF: a larger number never picks an earlier token
    assert ids[0] == int((probs[0] > 0).nonzero()[0]) and ids[-1] == int((probs[0] > 0).nonzero()[-1])
    mass = torch.bincount(ids, minlength=vocab).double() / len(uniforms)
    assert float((mass - probs[0] / probs.sum()).abs().max()) < 2 / len(uniforms)
    assert draw(torch.tensor([[0.0, 0.0], [float("nan"), 1.0]]), torch.tensor([0.5, 0.5], dtype=torch.float64)).tolist() == [-1, -1]


def sorted_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """The plain definition: sort the whole vocabulary, mask past the k-th, keep the prefix whose mass reaches top_p."""
    values, order = logits.sort(-1, descending=True)
    kth = values.gather(-1, torch.tensor([k if k > 0 else logits.shape[-1] for k in top_k])[:, None] - 1)
    values = values.masked_fill(values < kth, float("-inf"))
    probs = values.softmax(-1)
    drop = probs.cumsum(-1) - probs > torch.tensor(top_p)[:, None]
    return logits.scatter(-1, order, values.masked_fill(drop, float("-inf")))


@pytest.mark.parametrize("spread", [8.0, 0.1], ids=["peaked: the head holds the kept set", "flat: full sort"])
def test_top_p_on_the_cpu_head_equals_sorting_the_whole_vocabulary(spread):
    rows, vocab = 6, 5000
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(23)) * spread
    top_k, top_p = [0, 5, 0, 40, 0, 1000], [0.9, 0.5, 0.99, 0.8, 0.3, 0.95]
    got = filter_logits(logits, top_k=top_k, top_p=top_p)
    expected = sorted_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(got.isinf(), expected.isinf())
    torch.testing.assert_close(got[~got.isinf()], expected[~expected.isinf()])
    assert 0 < int((~got.isinf()).sum(-1).min()) and int((~got.isinf()).sum(-1).max()) < vocab


@pytest.mark.parametrize("with_logprobs", [False, True])
def test_one_step_copies_to_the_host_once(monkeypatch, with_logprobs):
    """Sampled ids (and logprobs) come back in one ``tolist``; no ``item``/``bool``/``int``/``float`` syncs per row."""
    specs = [dict(spec, logprobs=2 if with_logprobs else None) for spec in MIXED if "top_p" not in spec]  # CPU top-p may check its head
    logits, seqs = random_logits(len(specs), seed=29), make_seqs(specs)
    for seq in seqs:
        seq.logprobs = [] if with_logprobs else None
    copies = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _name=name, _original=original: copies.append(_name) or _original(self, *a)
        )
    Sampler()(logits, seqs)
    monkeypatch.undo()
    assert copies == ["tolist"]


def test_unseeded_requests_get_random_seeds_that_torch_manual_seed_fixes(family_pair):
    llm, _ = family_pair("llama")
    params = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(completion(llm, params).token_ids)
    assert runs[0] == runs[1] != runs[2]


@pytest.mark.parametrize("with_logprobs", [False, True])
def test_non_finite_rows_raise_naming_only_their_sequences_and_huge_finite_rows_do_not(with_logprobs):
    from preft.engine.sampler import NonFiniteLogitsError

    specs = [dict(temperature=t, logprobs=1 if with_logprobs else None) for t in (0.0, 1.0, 0.0, 0.7)]
    logits, seqs = random_logits(len(specs), seed=31), make_seqs(specs)
    logits[1, 5], logits[3, 9] = float("nan"), float("-inf")
    logits[2] = 3e38  # every logit finite, but the row's sum overflows to inf: not a fault
    with pytest.raises(NonFiniteLogitsError) as failed:
        Sampler()(logits, seqs)
    assert [s.request_id for s in failed.value.seqs] == ["r1", "r3"]
    assert all(not s.logprobs for s in seqs)  # nothing recorded for a step that failed
    assert Sampler()(logits[[0, 2]], [seqs[0], seqs[2]])[0] == int(logits[0].argmax())


def test_exact_flags_need_no_logits_and_pending_tokens_count_for_the_draw():
    from preft.engine.sampler import NonFiniteLogitsError, check_finite

    seqs = make_seqs([dict(), dict(), dict()])
    check_finite([1.0, 1.0, 1.0], None, seqs)  # nothing flagged: nothing to look at
    with pytest.raises(NonFiniteLogitsError, match=r"\['r1'\]"):
        check_finite([1.0, 0.0, 1.0], None, seqs)  # CUDA's exact flags: no logits kept to re-check
    # A token still on its way (asynchronous scheduling) counts: the draw is the one of the next position.
    logits = torch.zeros(8, 64)  # uniform: each draw is its own number's token
    specs = [dict(temperature=1.0, seed=s) for s in range(8)]
    pending = make_seqs(specs)
    for seq in pending:
        seq.num_pending = 1
    known = make_seqs([dict(spec, output=[7]) for spec in specs])
    drawn = Sampler()(logits, pending)
    assert drawn == Sampler()(logits, known)
    assert drawn != Sampler()(logits, make_seqs(specs)), "the draws of positions 0 and 1 must differ, or this proves nothing"

"""Statistics of the benchmark: percentiles, popularity, arrivals, lengths, and the roofline byte count."""

from __future__ import annotations

import math
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from preft.bench.shapes import NAMED_SHAPES
from preft.bench.stats import choose_adapters, parse_lengths, percentile, poisson_arrivals, sample_lengths, summarize, zipf_weights
from preft.bench.throughput import add_ratios, decode_bytes_model, flatness


def test_percentile_interpolates_linearly_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="percentile"):
        percentile(values, 101)


def test_summarize_scales_and_handles_empty() -> None:
    assert summarize([0.001, 0.003], 1e3) == pytest.approx({"p50": 2.0, "p99": 2.98, "mean": 2.0})
    assert summarize([]) == {"p50": None, "p99": None, "mean": None}


def test_zipf_weights_follow_the_power_law() -> None:
    w = zipf_weights(64, s=1.2)
    assert sum(w) == pytest.approx(1.0)
    assert w[0] / w[1] == pytest.approx(2**1.2)
    assert all(a > b for a, b in zip(w, w[1:]))


def test_zipf_choice_frequencies_match_weights() -> None:
    picks = choose_adapters(20000, 8, "zipf", random.Random(0), zipf_s=1.0)
    counts = Counter(picks)
    for i, w in enumerate(zipf_weights(8)):
        assert counts[i] / 20000 == pytest.approx(w, abs=0.015)


def test_uniform_popularity_uses_every_adapter_evenly() -> None:
    picks = choose_adapters(1024, 512, "uniform", random.Random(0))
    assert Counter(picks) == {i: 2 for i in range(512)}
    with pytest.raises(ValueError, match="popularity"):
        choose_adapters(4, 2, "pareto", random.Random(0))


def test_poisson_arrivals_have_the_requested_rate_and_offline_is_time_zero() -> None:
    times = poisson_arrivals(20000, 50.0, random.Random(0))
    assert all(b > a for a, b in zip(times, times[1:]))
    assert len(times) / times[-1] == pytest.approx(50.0, rel=0.05)
    assert poisson_arrivals(3, math.inf, random.Random(0)) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(3, 0.0, random.Random(0))


def test_length_specs_fixed_and_uniform_ranges() -> None:
    assert parse_lengths("128") == (128, 128)
    assert parse_lengths("64-256") == (64, 256)
    lengths = sample_lengths("3-5", 500, random.Random(0))
    assert set(lengths) == {3, 4, 5}
    for bad in ("0", "9-3", "abc"):
        with pytest.raises(ValueError, match="length"):
            parse_lengths(bad)


@pytest.mark.parametrize(("shape", "params"), [("llama-3.1-8b", 8.030e9 - 0.525e9), ("qwen2.5-0.5b", 0.494e9)])
def test_decode_bytes_count_the_published_parameter_counts(shape: str, params: float) -> None:
    """A decode step reads every weight but the (untied) input embedding: Llama 3.1 8B 8.03B - 0.53B embedding; Qwen2.5-0.5B tied."""
    weights, kv_per_token = decode_bytes_model(SimpleNamespace(**NAMED_SHAPES[shape]), dtype_bytes=2)
    assert weights / 2 == pytest.approx(params, rel=0.01)
    config = NAMED_SHAPES[shape]
    assert (
        kv_per_token
        == 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * (config["hidden_size"] // config["num_attention_heads"]) * 2
    )


def _row(mode: str, n: int, tput: float, step_ms: float) -> dict:
    return {"mode": mode, "num_adapters": n, "output_tok_s": tput, "decode_step_ms": {"p50": step_ms}}


def test_ratios_are_taken_at_the_same_adapter_count() -> None:
    runs = [_row("base", 1, 100.0, 1.0), _row("lora", 1, 50.0, 2.0), _row("lora-p", 1, 95.0, 1.0), _row("lora-p", 8, 90.0, 1.0)]
    add_ratios(runs)
    assert runs[2]["ratio_to_base"] == pytest.approx(0.95) and runs[2]["ratio_to_lora"] == pytest.approx(1.9)
    assert runs[3]["ratio_to_base"] is None  # no base run at 8 adapters: no ratio, never a cross-point one


def test_flatness_flags_a_decode_step_that_grows_with_adapters() -> None:
    runs = [_row("lora-p", 1, 0, 1.00), _row("lora-p", 512, 0, 1.04), _row("lora", 1, 0, 1.0), _row("lora", 512, 0, 1.5)]
    flat = flatness(runs)
    assert flat["lora-p"]["flat_within_5pct"] is True
    assert flat["lora"]["flat_within_5pct"] is False
    assert flat["lora"]["max_relative_deviation"] == pytest.approx(0.5)


def test_flatness_uses_the_quietest_repeat_of_each_point() -> None:
    runs = [_row("lora-p", 1, 0, 1.0), _row("lora-p", 512, 0, 1.6)]
    runs[1]["repeats_decode_step_ms_p50"] = [1.6, 1.02, 1.3]  # one repeat ran on a quiet machine
    flat = flatness(runs)["lora-p"]
    assert flat["decode_step_ms_p50"] == {"1": 1.0, "512": 1.02}
    assert flat["flat_within_5pct"] is True


def test_flatness_relative_to_base_cancels_load_that_slows_every_mode() -> None:
    # The machine got 2x slower at 512 adapters: base shows it too, so lora-p is flat relative to base.
    runs = [_row("base", 1, 0, 1.0), _row("base", 512, 0, 2.0), _row("lora-p", 1, 0, 1.0), _row("lora-p", 512, 0, 2.02)]
    flat = flatness(runs)["lora-p"]
    assert flat["flat_within_5pct"] is False
    assert flat["flat_within_5pct_vs_base"] is True
    assert flat["decode_step_vs_base"] == pytest.approx({"1": 1.0, "512": 1.01})


def test_cli_flags_map_onto_the_bench_config() -> None:
    import argparse

    from preft.bench.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = "--model tiny --modes base,lora-p --num-adapters 1,8 --rank 32 --target-modules all-linear --popularity zipf --zipf-s 1.1"
    argv += " --prompt-len 8-16 --output-len 64 --num-requests 10 --request-rate 2.5 --dtype float32 --device cpu --max-num-seqs 4"
    argv += " --max-num-batched-tokens 512 --max-adapter-slots 3 --no-prefix-caching --no-cuda-graphs --warmup-requests 0 --repeats 3 --seed 7 --cpu-threads 2"
    cfg = config_from_args(parser.parse_args(argv.split()))
    assert (cfg.modes, cfg.num_adapters, cfg.rank, cfg.target_modules) == (["base", "lora-p"], [1, 8], 32, "all-linear")
    assert (cfg.popularity, cfg.zipf_s, cfg.prompt_len, cfg.output_len, cfg.num_requests) == ("zipf", 1.1, "8-16", "64", 10)
    assert (cfg.request_rate, cfg.dtype, cfg.device, cfg.max_num_seqs, cfg.max_num_batched_tokens) == (2.5, "float32", "cpu", 4, 512)
    assert (cfg.adapter_slots, cfg.enable_prefix_caching, cfg.use_cuda_graphs, cfg.warmup_requests, cfg.repeats, cfg.seed) == (
        3,
        False,
        False,
        0,
        3,
        7,
    )
    with pytest.raises(ValueError, match="unknown mode"):
        config_from_args(parser.parse_args(["--modes", "base,qlora"]))


@pytest.mark.parametrize("shape", ["qwen2.5-0.5b", "llama-3.1-8b"])
def test_named_shapes_are_supported_configs_of_the_published_size(shape: str) -> None:
    from preft.adapters import check_family, linear_shapes
    from preft.bench.shapes import shape_config

    config = shape_config(shape)
    assert check_family(config) in ("qwen2", "llama")
    assert linear_shapes(config)["k_proj"][1] == config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    assert config.vocab_size > 260, "prompts use byte ids 5..260, which must be valid tokens"


def test_resolve_model_names_the_choices_for_an_unknown_model(tmp_path) -> None:
    from preft.bench.shapes import resolve_model

    with pytest.raises(ValueError, match="llama-3.1-8b"):
        resolve_model("gpt-17", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))

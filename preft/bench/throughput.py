"""The throughput benchmark: one workload through base, multi-LoRA and PreFT modes, in one process.

Modes (DESIGN §5):

- ``base``: no adapter (the ceiling);
- ``lora``: LoRA with policy ``all`` (the multi-LoRA baseline);
- ``lora-p``, ``direft-p``, ``loreft-p``: prefill-only adapters (PreFT).

Every mode gets the same requests (prompts, fixed output lengths with ``ignore_eos``, adapter of
each request, arrival times), so a ratio between modes is taken within one run. Adapters are
random, non-trivial ``Adapter`` objects built in memory and registered with ``LLM.add_adapter``.
The engine is driven step by step through ``LLMEngine`` so that TTFT, TPOT and the duration of
each decode-only step (a step that prefilled no prompt token) can be measured.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from preft.adapters import LoraConfig, ReftConfig
from preft.bench.stats import choose_adapters, percentile, poisson_arrivals, sample_lengths, summarize

MODES = ("base", "lora", "lora-p", "direft-p", "loreft-p")
FIRST_BYTE_TOKEN, LAST_BYTE_TOKEN = 5, 260  # byte ids of preft's byte-level tokenizer: valid in every vocabulary
FLAT_TOLERANCE = 0.05


@dataclass
class BenchConfig:
    """The workload and engine knobs (the ``preft bench`` flags)."""

    model: str = "tiny"
    modes: list[str] = field(default_factory=lambda: list(MODES))
    num_adapters: list[int] = field(default_factory=lambda: [1, 8, 64, 512])
    rank: int = 16
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    popularity: str = "uniform"
    zipf_s: float = 1.0
    prompt_len: str = "128"
    output_len: str = "256"
    num_requests: int = 1024
    request_rate: float = math.inf
    dtype: str = "auto"
    device: str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    max_adapter_slots: int | None = None  # None: min(max_num_seqs, largest --num-adapters): no mode waits for a slot
    kv_cache_memory_bytes: int | str | None = None  # None: the engine's default pool
    enable_prefix_caching: bool = True
    use_cuda_graphs: bool = True
    warmup_requests: int = 8
    cpu_threads: int = 1  # torch intra-op threads on CPU: tiny matmuls gain nothing from more, and a shared CPU adds noise
    repeats: int = 1  # each (mode, adapters) point is run this often, modes interleaved; the fastest repeat is reported
    seed: int = 0
    engine_options: dict = field(default_factory=dict)  # further EngineConfig fields (block_size, num_kv_blocks, ...), as given

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
        if not self.num_adapters or min(self.num_adapters) < 1:
            raise ValueError(f"--num-adapters must be positive integers, got {self.num_adapters}")

    @property
    def adapter_slots(self) -> int:
        return self.max_adapter_slots or min(self.max_num_seqs, max(self.num_adapters))


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    output_len: int
    adapter_index: int
    arrival: float  # seconds after the start of the run


def make_workload(cfg: BenchConfig, num_adapters: int, num_requests: int | None = None, seed_offset: int = 0) -> list[Request]:
    """The requests of one sweep point; the same for every mode (seeded by ``cfg.seed`` and ``num_adapters``)."""
    n = num_requests or cfg.num_requests
    rng = random.Random(cfg.seed * 1_000_003 + num_adapters + seed_offset)
    prompt_lens = sample_lengths(cfg.prompt_len, n, rng)
    output_lens = sample_lengths(cfg.output_len, n, rng)
    adapters = choose_adapters(n, num_adapters, cfg.popularity, rng, cfg.zipf_s)
    arrivals = poisson_arrivals(n, cfg.request_rate, rng)
    return [
        Request(f"r{seed_offset}-{i}", [rng.randint(FIRST_BYTE_TOKEN, LAST_BYTE_TOKEN) for _ in range(p)], o, a, t)
        for i, (p, o, a, t) in enumerate(zip(prompt_lens, output_lens, adapters, arrivals))
    ]


def adapter_config(mode: str, rank: int, target_modules: list[str] | str) -> LoraConfig | ReftConfig | None:
    """The adapter config of a mode (``None`` for base)."""
    if mode == "base":
        return None
    if mode in ("lora", "lora-p"):
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target_modules, policy="all" if mode == "lora" else "prefill")
    return ReftConfig(kind=mode.removesuffix("-p"), r=rank, policy="prefill")


def adapter_seed(cfg: BenchConfig, kind: str, index: int) -> int:
    """Seed of adapter ``index`` of a kind: lora and lora-p (and the PEFT peer) share weights, differing only by policy."""
    return cfg.seed * 100_003 + index + 500_000 * ("lora", "loreft", "direft").index(kind)


class AdapterRegistry:
    """Registers the random adapters of each mode with the engine, once, as the sweep grows."""

    def __init__(self, llm: Any, model_config: Any, cfg: BenchConfig):
        self.llm, self.model_config, self.cfg = llm, model_config, cfg
        self.count: dict[str, int] = {}

    def names(self, mode: str, n: int) -> list[str | None]:
        if mode == "base":
            return [None] * n
        from preft.tiny import random_adapter

        config = adapter_config(mode, self.cfg.rank, self.cfg.target_modules)
        have = self.count.get(mode, 0)
        for i in tqdm(range(have, n), desc=f"register {mode} adapters", unit="adapter", disable=n - have < 16, leave=False):
            self.llm.add_adapter(f"{mode}-{i}", random_adapter(self.model_config, config, seed=adapter_seed(self.cfg, config.kind, i)))
        self.count[mode] = max(have, n)
        return [f"{mode}-{i}" for i in range(n)]


@dataclass
class RunTimings:
    """What one mode's run measured (seconds, monotonic clock)."""

    elapsed: float
    prompt_tokens: int
    output_tokens: int
    ttft: list[float]
    tpot: list[float]
    decode_step_times: list[float]
    decode_batch_sizes: list[int]
    decode_context_tokens: list[int]  # KV tokens read by each decode step (sum of sequence lengths)
    engine_stats: dict


def run_requests(engine: Any, requests: list[Request], adapter_names: list[str | None], desc: str = "run") -> RunTimings:
    """Drive ``engine`` (an ``LLMEngine``) through ``requests``; arrivals follow ``request.arrival``."""
    from preft.engine import SamplingParams

    pending = deque(sorted(requests, key=lambda r: r.arrival))
    by_id = {r.request_id: r for r in requests}
    first_token: dict[str, float] = {}
    finished: dict[str, float] = {}
    produced: dict[str, int] = {}
    decode_times, decode_batch, decode_ctx = [], [], []
    start = time.perf_counter()
    prompt_tokens_before = engine.stats()["prompt_tokens"]
    with tqdm(total=len(requests), desc=desc, unit="req", leave=False) as bar:
        while pending or engine.has_unfinished_requests():
            now = time.perf_counter() - start
            while pending and pending[0].arrival <= now:
                r = pending.popleft()
                params = SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
                engine.add_request(r.request_id, r.prompt, params, adapter=adapter_names[r.adapter_index])
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, pending[0].arrival - (time.perf_counter() - start)))  # idle until the next arrival
                continue
            prefilled_before = engine.stats()["prompt_tokens"]
            t0 = time.perf_counter()
            outputs = engine.step()
            t1 = time.perf_counter()
            if engine.stats()["prompt_tokens"] == prefilled_before and outputs:
                decode_times.append(t1 - t0)
                decode_batch.append(len(outputs))
                decode_ctx.append(sum(len(o.prompt_token_ids) + o.outputs[0].num_tokens for o in outputs))
            for out in outputs:
                rid = out.request_id
                produced[rid] = out.outputs[0].num_tokens
                if rid not in first_token and produced[rid] > 0:
                    first_token[rid] = t1 - start
                if out.finished:
                    finished[rid] = t1 - start
                    bar.update(1)
    elapsed = time.perf_counter() - start
    ttft = [first_token[rid] - by_id[rid].arrival for rid in first_token]
    tpot = [(finished[rid] - first_token[rid]) / (produced[rid] - 1) for rid in finished if produced.get(rid, 0) > 1]
    stats = engine.stats()
    return RunTimings(
        elapsed=elapsed,
        prompt_tokens=stats["prompt_tokens"] - prompt_tokens_before,
        output_tokens=sum(produced.values()),
        ttft=ttft,
        tpot=tpot,
        decode_step_times=decode_times,
        decode_batch_sizes=decode_batch,
        decode_context_tokens=decode_ctx,
        engine_stats=stats,
    )


# ---- roofline ------------------------------------------------------------------------------------


def measure_bandwidth(device: torch.device, nbytes: int | None = None, iters: int = 10) -> tuple[float, str]:
    """Memory bandwidth in bytes/s from a large device copy (read + write), and how much to trust it."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize(device)
        seconds = begin.elapsed_time(end) / 1e3
        note = f"measured: {iters} copies of {nbytes / 2**30:.1f} GiB on {torch.cuda.get_device_name(device)}"
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        seconds = time.perf_counter() - t0
        note = "CPU memcpy bandwidth: indicative only (the CPU decode step is bound by Python and kernel overheads, not DRAM)"
    return 2 * nbytes * iters / seconds, note


def decode_bytes_model(model_config: Any, dtype_bytes: int) -> tuple[int, int]:
    """``(weight bytes read per decode step, KV bytes read per context token)`` of a Llama-family model.

    A decode step reads every decoder weight and the LM head once; the input embedding only as a
    gather (ignored unless tied to the LM head, which is counted once either way).
    """
    get = lambda k, d=None: getattr(model_config, k, d)  # noqa: E731
    h, inter, layers, vocab = get("hidden_size"), get("intermediate_size"), get("num_hidden_layers"), get("vocab_size")
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
    if get("model_type") == "qwen2":
        per_layer += q + 2 * kv  # q/k/v biases
    if get("model_type") == "qwen3":
        per_layer += 2 * head_dim  # q/k norms
    weights = layers * per_layer + h + vocab * h
    return weights * dtype_bytes, 2 * layers * kv * dtype_bytes


def roofline(timings: RunTimings, weight_bytes: int, kv_bytes_per_token: int, bandwidth: float) -> dict:
    """Each decode step's physical floor (bytes read / bandwidth) against its measured time."""
    if not timings.decode_step_times:
        return {"floor_ms_p50": None, "measured_ms_p50": None, "fraction_of_floor": None}
    floors = [(weight_bytes + kv_bytes_per_token * ctx) / bandwidth for ctx in timings.decode_context_tokens]
    return {
        "bytes_per_step_p50": weight_bytes + kv_bytes_per_token * percentile(timings.decode_context_tokens, 50),
        "floor_ms_p50": percentile(floors, 50) * 1e3,
        "measured_ms_p50": percentile(timings.decode_step_times, 50) * 1e3,
        # floor / measured over all decode steps: 1.0 means the step runs at the memory-bandwidth floor.
        "fraction_of_floor": sum(floors) / sum(timings.decode_step_times),
    }


# ---- the sweep -----------------------------------------------------------------------------------


def summarize_run(mode: str, num_adapters: int, t: RunTimings, roof: dict) -> dict:
    return {
        "mode": mode,
        "num_adapters": num_adapters,
        "num_requests": len(t.ttft),
        "prompt_tokens": t.prompt_tokens,
        "output_tokens": t.output_tokens,
        "elapsed_s": t.elapsed,
        "output_tok_s": t.output_tokens / t.elapsed,
        "total_tok_s": (t.prompt_tokens + t.output_tokens) / t.elapsed,
        "ttft_ms": summarize(t.ttft, 1e3),
        "tpot_ms": summarize(t.tpot, 1e3),
        "decode_step_ms": summarize(t.decode_step_times, 1e3),
        "decode_steps": len(t.decode_step_times),
        "decode_batch_p50": percentile(t.decode_batch_sizes, 50),
        "roofline": roof,
        "engine_stats": t.engine_stats,
    }


def add_ratios(runs: list[dict]) -> None:
    """``ratio_to_base`` / ``ratio_to_lora``: output tok/s over that of base / multi-LoRA at the same adapter count."""
    by_point = {(r["mode"], r["num_adapters"]): r for r in runs}
    for r in runs:
        for ref in ("base", "lora"):
            other = by_point.get((ref, r["num_adapters"]))
            r[f"ratio_to_{ref}"] = r["output_tok_s"] / other["output_tok_s"] if other else None


def _quietest_decode_step(run: dict) -> float | None:
    """The smallest median decode step over repeats: the repeat least disturbed by other load."""
    repeats = [ms for ms in run.get("repeats_decode_step_ms_p50", []) if ms]
    return min(repeats) if repeats else run["decode_step_ms"]["p50"]


def flatness(runs: list[dict], tolerance: float = FLAT_TOLERANCE) -> dict:
    """Per mode: the median decode step (quietest repeat) across adapter counts, relative to the fewest adapters.

    ``*_vs_base`` divides each point by the base model's decode step at the same adapter count
    first: base does no adapter work, so this cancels machine load that drifts between points.
    """
    result = {}
    base = {r["num_adapters"]: _quietest_decode_step(r) for r in runs if r["mode"] == "base"}
    for mode in dict.fromkeys(r["mode"] for r in runs):
        points = sorted((r["num_adapters"], _quietest_decode_step(r)) for r in runs if r["mode"] == mode and r["decode_step_ms"]["p50"])
        if len(points) < 2:
            continue
        deviation = max(abs(ms / points[0][1] - 1) for _, ms in points)
        result[mode] = {
            "decode_step_ms_p50": {str(n): ms for n, ms in points},
            "max_relative_deviation": deviation,
            f"flat_within_{round(tolerance * 100)}pct": deviation <= tolerance,
        }
        if mode != "base" and all(base.get(n) for n, _ in points):
            vs_base = [(n, ms / base[n]) for n, ms in points]
            deviation = max(abs(x / vs_base[0][1] - 1) for _, x in vs_base)
            result[mode]["decode_step_vs_base"] = {str(n): x for n, x in vs_base}
            result[mode]["max_relative_deviation_vs_base"] = deviation
            result[mode][f"flat_within_{round(tolerance * 100)}pct_vs_base"] = deviation <= tolerance
    return result


def run_sweep(cfg: BenchConfig, llm: Any, model_config: Any, dtype_bytes: int, device: torch.device) -> dict:
    """Every mode at every adapter count on ``llm``; returns the JSON-ready results.

    Repeats are the outer loop and adapter counts and modes are interleaved inside it, so that a
    drift in machine load hits every point alike; each point reports its fastest repeat.
    """
    engine = llm.engine
    registry = AdapterRegistry(llm, model_config, cfg)
    bandwidth, bandwidth_note = measure_bandwidth(device)
    weight_bytes, kv_per_token = decode_bytes_model(model_config, dtype_bytes)
    if cfg.warmup_requests:
        run_requests(engine, make_workload(cfg, 1, cfg.warmup_requests, seed_offset=1), [None], desc="warmup")
    names = {mode: registry.names(mode, max(cfg.num_adapters)) for mode in cfg.modes}
    workloads = {n: make_workload(cfg, n) for n in cfg.num_adapters}
    best: dict[tuple[str, int], dict] = {}
    points = [(repeat, n, mode) for repeat in range(cfg.repeats) for n in cfg.num_adapters for mode in cfg.modes]
    for repeat, n, mode in tqdm(points, desc="benchmark points", unit="run"):
        if repeat == 0 and cfg.warmup_requests:  # this mode's code paths and first adapters, outside the timed run
            warm = make_workload(cfg, n, min(cfg.warmup_requests, n), seed_offset=2)
            for i, r in enumerate(warm):
                r.request_id, r.output_len = f"warmup-{mode}-{n}-{i}", min(r.output_len, 4)
            run_requests(engine, warm, names[mode], desc=f"warmup {mode}")
        for i, r in enumerate(workloads[n]):
            r.request_id = f"{mode}-{n}-{repeat}-{i}"
        timings = run_requests(engine, workloads[n], names[mode], desc=f"{mode} x{n} ({repeat + 1}/{cfg.repeats})")
        row = summarize_run(mode, n, timings, roofline(timings, weight_bytes, kv_per_token, bandwidth))
        previous = best.get((mode, n))
        for key, value in (("repeats_output_tok_s", row["output_tok_s"]), ("repeats_decode_step_ms_p50", row["decode_step_ms"]["p50"])):
            row[key] = [*(previous[key] if previous else []), value]
        if previous is None or row["output_tok_s"] > previous["output_tok_s"]:
            best[(mode, n)] = row
        else:
            previous["repeats_output_tok_s"], previous["repeats_decode_step_ms_p50"] = (
                row["repeats_output_tok_s"],
                row["repeats_decode_step_ms_p50"],
            )
    runs = [best[(mode, n)] for n in cfg.num_adapters for mode in cfg.modes]
    add_ratios(runs)
    return {
        "config": {k: (v if not isinstance(v, float) or math.isfinite(v) else "inf") for k, v in asdict(cfg).items()},
        "roofline_model": {
            "weight_bytes_per_step": weight_bytes,
            "kv_bytes_per_token": kv_per_token,
            "bandwidth_GBps": bandwidth / 1e9,
            "bandwidth_note": bandwidth_note,
        },
        "runs": runs,
        "peer": [],
        "flatness": flatness(runs),
    }

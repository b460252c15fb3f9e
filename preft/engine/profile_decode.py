"""Decode step time of the engine: base vs ``all`` LoRA vs ``prefill`` LoRA / DiReFT, for N adapters.

A decode-heavy run: ``--batch`` requests (request i uses adapter ``i % N``) are prefilled in one
engine per mode, then ``--steps`` decode steps of the whole batch are timed, the modes' steps
interleaved so that machine noise hits every mode alike. Ratios within one run are what count;
on CPU the absolute numbers only describe this machine.

    python -m preft.engine.profile_decode [--model DIR] [--adapters 1 8 64 256] [--batch 256] [--plot out.png]

``--roofline`` adds where the base decode step stands against the memory roofline: a decode step must
read every weight once and each sequence's KV, so ``bytes / step time`` is the bandwidth it achieves,
compared with the device's peak (``--peak-gbps``, known for H100/H200/A100).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from tqdm.auto import tqdm

from preft.adapters import LoraConfig, ReftConfig
from preft.engine import LLM, SamplingParams
from preft.tiny import build_tiny_checkpoint, random_adapter

MODES = {
    "base": None,
    "lora-all": lambda r: LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", policy="all"),
    "lora-prefill": lambda r: LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", policy="prefill"),
    "direft-prefill": lambda r: ReftConfig(kind="direft", r=r, policy="prefill"),
}


PEAK_GBPS = {"h200": 4800.0, "h100 nvl": 3900.0, "h100 pcie": 2000.0, "h100": 3350.0, "a100-sxm4-80gb": 2039.0, "a100": 1555.0}


def peak_bandwidth_gbps(device: torch.device) -> float | None:
    """The device's peak memory bandwidth in GB/s, from its name (None when unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((gbps for key, gbps in PEAK_GBPS.items() if key in name), None)


def decode_roofline(engine, step_ms: float, batch: int, context: int, peak_gbps: float | None) -> dict:
    """Bytes a base decode step must move (every weight once, each sequence's KV) and the bandwidth that implies."""
    from preft.engine.model_runner import kv_block_bytes

    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    kv_bytes = batch * context * kv_block_bytes(engine.config, 1, engine.dtype)
    achieved = (weight_bytes + kv_bytes) / (step_ms / 1e3) / 1e9
    return {
        "step_ms": step_ms,
        "batch": batch,
        "context_tokens": context,
        "weight_bytes": weight_bytes,
        "kv_bytes": kv_bytes,
        "achieved_gbps": achieved,
        "peak_gbps": peak_gbps,
        "fraction_of_peak": achieved / peak_gbps if peak_gbps else None,
        "tflops": 2 * sum(p.numel() for p in engine.model.parameters()) * batch / (step_ms / 1e3) / 1e12,
    }


DTYPE = "float32"  # --dtype


def prefilled_engine(
    model_dir: str, mode: str, num_adapters: int, batch: int, max_tokens: int, rank: int, prompt_len: int, device: str | None
):
    """An engine with ``batch`` requests (request i uses adapter ``i % num_adapters``) past their prefill."""
    llm = LLM(
        model_dir,
        dtype=DTYPE,
        device=device,
        max_adapter_slots=min(num_adapters, batch),
        max_num_seqs=batch,
        max_num_batched_tokens=max(2048, batch * prompt_len),
    )
    engine = llm.engine
    names: list[str | None] = [None] * batch
    if MODES[mode] is not None:
        for a in range(num_adapters):
            engine.add_adapter(f"a{a}", random_adapter(engine.config, MODES[mode](rank), seed=a))
        names = [f"a{i % num_adapters}" for i in range(batch)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i, name in enumerate(names):
        engine.add_request(str(i), [(7 * i + j) % 250 + 5 for j in range(prompt_len)], params, name)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    return engine


def decode_step_ms(
    model_dir: str, num_adapters: int, batch: int, steps: int, rank: int, prompt_len: int, device: str | None
) -> dict[str, float]:
    """Median decode step time (ms) per mode; the modes' steps are interleaved so machine noise hits all alike."""
    engines = {mode: prefilled_engine(model_dir, mode, num_adapters, batch, steps + 2, rank, prompt_len, device) for mode in MODES}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(steps):
        for mode, engine in engines.items():
            sync()
            start = time.perf_counter()
            engine.step()
            sync()
            times[mode].append((time.perf_counter() - start) * 1e3)
    for engine in engines.values():
        assert len(engine.scheduler.running) == batch and all(len(s.completion_token_ids) == steps + 1 for s in engine.scheduler.running)
        for request_id in [s.request_id for s in engine.scheduler.running]:
            engine.abort_request(request_id)
    return {mode: statistics.median(t) for mode, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: a tiny random llama built on the spot)")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--batch", type=int, default=256, help="running requests per decode step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--plot", default=None, help="write a PNG of step time vs number of adapters")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps timings stable on a shared machine)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--roofline", action="store_true", help="also time the base decode step alone against the memory roofline")
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth, GB/s (default: known GPUs by name)")
    parser.add_argument("--json", default=None, help="write the step times (and the roofline) as JSON")
    args = parser.parse_args(argv)
    global DTYPE
    DTYPE = args.dtype
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(build_tiny_checkpoint(tmp, "llama"))
        decode_step_ms(model_dir, 2, 4, 3, args.rank, args.prompt_len, args.device)  # warm-up, untimed
        results: dict[str, dict[int, float]] = {mode: {} for mode in MODES}
        for n in tqdm(args.adapters, desc="profile decode"):
            for mode, ms in decode_step_ms(model_dir, n, args.batch, args.steps, args.rank, args.prompt_len, args.device).items():
                results[mode][n] = ms
        roofline = None
        if args.roofline:
            engine = prefilled_engine(model_dir, "base", 1, args.batch, args.steps + 2, args.rank, args.prompt_len, args.device)
            sync = torch.cuda.synchronize if engine.device.type == "cuda" else lambda: None
            times = []
            for _ in range(args.steps):
                sync()
                start = time.perf_counter()
                engine.step()
                sync()
                times.append((time.perf_counter() - start) * 1e3)
            peak = args.peak_gbps or peak_bandwidth_gbps(engine.device)
            roofline = decode_roofline(engine, statistics.median(times), args.batch, args.prompt_len + args.steps // 2, peak)
            for request_id in [s.request_id for s in engine.scheduler.running]:
                engine.abort_request(request_id)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"\ndecode step time (ms, median of {args.steps}), {device}, batch {args.batch}, rank {args.rank}, prompt {args.prompt_len} tokens"
    )
    print("| adapters | " + " | ".join(MODES) + " | lora-all / lora-prefill |")
    print("|---" * (len(MODES) + 2) + "|")
    for n in args.adapters:
        row = [f"{results[mode][n]:.1f}" for mode in MODES]
        print(f"| {n} | " + " | ".join(row) + f" | {results['lora-all'][n] / results['lora-prefill'][n]:.2f}x |")
    if roofline is not None:
        peak = (
            f"{roofline['peak_gbps']:.0f} GB/s peak, {roofline['fraction_of_peak']:.0%} of it" if roofline["peak_gbps"] else "peak unknown"
        )
        print(
            f"base decode step {roofline['step_ms']:.2f} ms: {(roofline['weight_bytes'] + roofline['kv_bytes']) / 1e9:.3f} GB moved "
            f"(weights {roofline['weight_bytes'] / 1e9:.3f}, KV {roofline['kv_bytes'] / 1e9:.3f}) -> {roofline['achieved_gbps']:.0f} GB/s "
            f"({peak}); {roofline['tflops']:.2f} TFLOP/s"
        )
    if args.json:
        record = {"device": device, "batch": args.batch, "dtype": args.dtype, "step_ms": results, "roofline": roofline}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"results written to {args.json}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in MODES:
            ax.plot(args.adapters, [results[mode][n] for n in args.adapters], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("adapters in the batch")
        ax.set_ylabel("decode step time (ms)")
        ax.set_title(f"decode step, batch {args.batch} ({'cuda' if torch.cuda.is_available() else 'cpu'})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()

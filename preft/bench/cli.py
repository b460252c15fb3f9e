"""``preft bench``: base vs multi-LoRA vs PreFT throughput, side by side in one run.

Example (a CI-sized CPU run)::

    preft bench --model tiny --num-adapters 1,8 --num-requests 16 --prompt-len 16 --output-len 16
"""

from __future__ import annotations

import argparse
import math

import torch

from preft.bench.throughput import MODES, BenchConfig
from preft.engine.config import EngineConfig, add_engine_arguments


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8,64,512, got {text!r}") from None


def _modules(text: str) -> list[str] | str:
    return "all-linear" if text == "all-linear" else [m for m in text.split(",") if m]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    parser.add_argument(
        "--model",
        default=d.model,
        help="checkpoint directory or named shape with random weights (tiny, qwen2.5-0.5b, llama-3.1-8b); comma-separated: run each",
    )
    parser.add_argument("--modes", default=",".join(d.modes), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--num-adapters", type=_int_list, default=d.num_adapters, help="sweep of adapter counts (default 1,8,64,512)")
    parser.add_argument("--rank", type=int, default=d.rank, help="rank of every adapter (LoRA and ReFT)")
    parser.add_argument("--target-modules", type=_modules, default=d.target_modules, help="LoRA modules, comma-separated, or all-linear")
    parser.add_argument("--popularity", choices=["uniform", "zipf"], default=d.popularity, help="how requests pick adapters")
    parser.add_argument("--zipf-s", type=float, default=d.zipf_s, help="Zipf exponent for --popularity zipf")
    parser.add_argument("--prompt-len", default=d.prompt_len, help="prompt tokens: N or LOW-HIGH (uniform)")
    parser.add_argument("--output-len", default=d.output_len, help="output tokens (fixed, ignore_eos): N or LOW-HIGH (uniform)")
    parser.add_argument("--num-requests", type=int, default=d.num_requests)
    parser.add_argument(
        "--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default inf: offline, all at once)"
    )
    # The engine's own flags (EngineConfig); here --max-adapter-slots defaults to min(max-num-seqs, most adapters),
    # --max-cpu-adapters to max(64, 4 x most adapters) and --max-model-len to the longest prompt + output.
    add_engine_arguments(
        parser,
        exclude={"seed"},  # --seed below seeds the workload and the adapters' weights
        defaults=dict(dtype=d.dtype, max_num_seqs=d.max_num_seqs, max_num_batched_tokens=d.max_num_batched_tokens, max_adapter_slots=None,
                      max_cpu_adapters=None, max_lora_rank=None),
    )  # fmt: skip
    parser.add_argument("--warmup-requests", type=int, default=d.warmup_requests)
    parser.add_argument("--cpu-threads", type=int, default=d.cpu_threads, help="torch threads when --device cpu (0: leave torch's default)")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="runs per point, modes interleaved; the fastest is reported")
    parser.add_argument(
        "--peer", choices=["auto", "on", "off"], default="auto", help="transformers+PEFT peer (auto: on CUDA when peft is installed)"
    )
    parser.add_argument("--peer-max-adapters", type=int, default=64, help="run the peer only at adapter counts up to this")
    parser.add_argument("--peer-requests", type=int, default=None, help="requests per peer point (default 2 x max-num-seqs)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--cache-dir", default=None, help="where named shapes are built (default ~/.cache/preft/bench-models)")
    parser.add_argument("--output-dir", default=None, help="default benchmarks/results/<device>-<date>/")
    from preft.bench import host_overhead

    sub = parser.add_subparsers(dest="bench_command", metavar="{host-overhead}", help="other benchmarks (default: the throughput sweep)")
    host_overhead.add_arguments(
        sub.add_parser("host-overhead", help=host_overhead.__doc__.splitlines()[0], description=host_overhead.__doc__)
    )


ENGINE_ONLY_OPTIONS = (
    "max_cpu_adapters", "num_kv_blocks", "gpu_memory_utilization", "block_size", "max_model_len", "tensor_parallel_size",
    "async_scheduling", "max_lora_rank",
)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        model=args.model,
        modes=[m for m in args.modes.split(",") if m],
        num_adapters=args.num_adapters,
        rank=args.rank,
        target_modules=args.target_modules,
        popularity=args.popularity,
        zipf_s=args.zipf_s,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        num_requests=args.num_requests,
        request_rate=args.request_rate,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_adapter_slots=args.max_adapter_slots,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        enable_prefix_caching=args.enable_prefix_caching,
        use_cuda_graphs=args.use_cuda_graphs,
        engine_options={k: getattr(args, k) for k in ENGINE_ONLY_OPTIONS if getattr(args, k) is not None},
        warmup_requests=args.warmup_requests,
        repeats=args.repeats,
        cpu_threads=args.cpu_threads,
        seed=args.seed,
    )


def run_benchmark(
    cfg: BenchConfig,
    peer: str = "auto",
    cache_dir: str | None = None,
    output_dir: str | None = None,
    peer_max_adapters: int = 64,
    peer_requests: int | None = None,
) -> tuple[dict, str]:
    """Build the model, run the sweep (then the peer), write JSON + PNG; returns the results and the printed table."""
    threads = torch.get_num_threads()
    try:
        return _run_benchmark(cfg, peer, cache_dir, output_dir, peer_max_adapters, peer_requests)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(cfg, peer, cache_dir, output_dir, peer_max_adapters, peer_requests) -> tuple[dict, str]:
    import gc

    from transformers import AutoConfig

    from preft.bench.peer import make_peft_peer, peft_available
    from preft.bench.report import environment, format_table, results_paths, write_results
    from preft.bench.shapes import resolve_model
    from preft.bench.stats import parse_lengths
    from preft.bench.throughput import make_workload, run_sweep
    from preft.engine import LLM

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    build_dtype = torch.float32 if cfg.dtype == "float32" or device.type == "cpu" else getattr(torch, cfg.dtype, torch.bfloat16)
    model_dir = resolve_model(cfg.model, cache_dir, build_dtype)
    model_config = AutoConfig.from_pretrained(model_dir)
    max_len = parse_lengths(cfg.prompt_len)[1] + parse_lengths(cfg.output_len)[1] + 1
    engine_config = EngineConfig(
        model=str(model_dir),
        dtype=cfg.dtype,
        device=str(device),
        max_adapter_slots=cfg.adapter_slots,
        max_cpu_adapters=max(64, 4 * max(cfg.num_adapters)),
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=max(cfg.max_num_batched_tokens, max_len),
        enable_prefix_caching=cfg.enable_prefix_caching,
        max_model_len=max_len,
        use_cuda_graphs=cfg.use_cuda_graphs,
        kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
        max_lora_rank=cfg.rank,  # what the benchmark's adapters use: the KV profile reserves exactly that
    ).replace(**cfg.engine_options)
    llm = LLM(engine_config)
    cfg.engine_options["async_scheduling"] = llm.engine.async_scheduling  # as resolved (default: on for CUDA): in the JSON
    dtype = getattr(llm.engine, "dtype", build_dtype)
    results = run_sweep(cfg, llm, model_config, torch.finfo(dtype).bits // 8, device)
    if peer == "on" or (peer == "auto" and device.type == "cuda" and peft_available()):
        llm.engine.close()  # tensor-parallel workers (if any) stop
        del llm  # the peer loads its own copy of the model: give the engine's weights and KV cache back first
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        peer_fn = make_peft_peer(model_dir, cfg, model_config, dtype, device)
        lora = {r["num_adapters"]: r["output_tok_s"] for r in results["runs"] if r["mode"] == "lora"}
        for n in [n for n in cfg.num_adapters if n <= peer_max_adapters]:
            row = peer_fn(n, make_workload(cfg, n)[: peer_requests or 2 * cfg.max_num_seqs])
            row["ratio_to_lora"] = row["output_tok_s"] / lora[n] if n in lora else None
            results["peer"].append(row)
    results["environment"] = {**environment(device), "model_dir": str(model_dir), "dtype": str(dtype).removeprefix("torch.")}
    json_path, png_path = results_paths(output_dir, cfg.model, device)
    results["files"] = {"json": str(json_path), "png": str(png_path)}
    table = format_table(results)
    write_results(
        results, json_path, png_path, f"{cfg.model} on {results['environment']['device_name']} ({results['environment']['dtype']})"
    )
    return results, table


def run(args: argparse.Namespace) -> int:
    if getattr(args, "bench_command", None) == "host-overhead":
        from preft.bench import host_overhead

        return host_overhead.run(args)
    for model in args.model.split(","):  # several models: one after the other, one JSON + PNG each
        cfg = config_from_args(args)
        cfg.model = model
        results, table = run_benchmark(
            cfg,
            peer=args.peer,
            cache_dir=args.cache_dir,
            output_dir=args.output_dir,
            peer_max_adapters=args.peer_max_adapters,
            peer_requests=args.peer_requests,
        )
        print(f"== {model}\n{table}")
        print(f"wrote {results['files']['json']} and {results['files']['png']}")
    return 0

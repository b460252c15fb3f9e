"""``preft bench host-overhead``: the engine's own work per step, with the model forward stubbed out.

Everything real runs (scheduler, block manager, adapter manager, ``ModelRunner.prepare``, the sampler,
the output path and the engine thread's hand-off to the server) except the model: its forward returns
nothing and its logits are fixed, over a 1,024-token vocabulary. What is timed is therefore what the
host adds to every device step; on a GPU it is pure overhead unless it overlaps the device's work.

Shapes: decode steps of 1, 64 and 256 sequences (half of them with prefill-policy adapters, one in
eight with an ``all``-policy one, the rest base) and a mixed step of 255 decodes plus one 512-token
prefill chunk. The breakdown comes from timers wrapped around the engine's own functions
(``Scheduler.schedule``, ``ModelRunner.prepare``, ``model_runner.adapter_slots`` (inside ``prepare``: the
per-token adapter slots), ``ModelRunner.launch`` and ``.collect``): ``sample`` is the rest of those after the
forward (logits rows, the sampler with its finiteness check), ``outputs`` the rest of the step
(post-processing, stop checks, building the deltas, the hand-off to the server).

With ``--device-ms D`` it also measures what asynchronous scheduling buys: the stub's steps then take D ms
on a simulated device (a step starts when it is launched and the device is free; ``collect`` waits until it
has finished), and a decode batch runs with synchronous and with asynchronous scheduling. Synchronous
steps take about host + D ms, asynchronous ones about max(host, D): the table gives both and the share of
time the device is busy. The simulated device waits with ``time.sleep``, so this is an estimate of the
overlap, not a GPU measurement.

The machine this runs on is often shared, so a shape can run ``repeats`` times (a fresh engine each)
and the report gives, besides the median and p90 of the wall time per step, its p10 and minimum (the
least disturbed steps) and the median thread CPU time (what the step costs while it holds a core).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from preft.bench.report import environment

VOCAB = 1024
MAX_ROWS = 1024  # logits rows the stub can return (one per sampling sequence)
STAGES = ("schedule", "prepare", "adapters", "sample", "outputs")
TARGET_MS = {"decode": 2.0, "mixed": 3.0}  # issue 12: batch-256 decode and mixed step, on the 2-core CPU
DEFAULT_OUTPUT_DIR = Path("benchmarks") / "results" / "cpu-2026-12-02"


@dataclass
class HostOverheadConfig:
    batches: list[int] = field(default_factory=lambda: [1, 64, 256])
    mixed_decodes: int = 255
    mixed_prefill: int = 512
    prompt_len: int = 16
    steps: int = 50  # timed steps per shape and repeat
    warmup: int = 5
    repeats: int = 1  # fresh engines per shape, their steps pooled (on a shared machine: --repeats 3)
    device: str = "cpu"
    seed: int = 0
    device_ms: float = 0.0  # > 0: also measure sync vs asynchronous scheduling against a simulated device of this step time
    overlap_batch: int = 256


class StubModel(torch.nn.Module):
    """Stands in for ``CausalLM``: no forward work, fixed logits (argmax a printable byte token)."""

    def __init__(self, config, device: torch.device):
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(VOCAB, generator=gen)
        logits[70] = logits.max() + 1.0  # greedy: always token 70, a letter of the byte-level tokenizer
        self.fixed = logits.to(device).repeat(MAX_ROWS, 1)  # contiguous rows, as a real LM head returns them
        self.anchor = torch.nn.Parameter(torch.zeros(1, device=device), requires_grad=False)  # so next(parameters()) works

    def forward(self, input_ids, *args, **kwargs):
        return torch.zeros(input_ids.shape[0], 1, device=self.fixed.device)

    def logits(self, hidden):
        return self.fixed[: hidden.shape[0]]


class StageTimers:
    """Wall time spent inside wrapped callables, per stage, for the current step."""

    def __init__(self):
        self.current: dict[str, float] = defaultdict(float)
        self.wrapped: list[tuple[object, str, object]] = []

    def wrap(self, owner, attribute: str, stage: str) -> None:
        if not hasattr(owner, attribute):  # a renamed stage reads as 0, the rest of the breakdown still holds
            return
        inner = getattr(owner, attribute)
        timers = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                timers.current[stage] += time.perf_counter() - start

        setattr(owner, attribute, timed)
        self.wrapped.append((owner, attribute, inner))

    def restore(self) -> None:
        """Unwrap everything (module functions stay wrapped otherwise, and a second engine would time them twice)."""
        for owner, attribute, inner in reversed(self.wrapped):
            setattr(owner, attribute, inner)
        self.wrapped.clear()

    def take(self) -> dict[str, float]:
        out, self.current = dict(self.current), defaultdict(float)
        return out


def _build_engine(cfg: HostOverheadConfig, workdir: Path, max_seqs: int, max_tokens_per_step: int):
    from preft.engine.llm_engine import LLMEngine
    from preft.tiny import build_tiny_checkpoint

    model_dir = workdir / "tiny"
    if not (model_dir / "config.json").exists():
        build_tiny_checkpoint(model_dir, "llama", max_position_embeddings=4096)
    engine = LLMEngine(
        model_dir,
        dtype="float32",
        device=cfg.device,
        max_adapter_slots=16,
        max_cpu_adapters=64,
        num_kv_blocks=(max_seqs + 4) * (4096 // 16),
        block_size=16,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=max_tokens_per_step,
        enable_prefix_caching=True,
        max_model_len=4096,
        use_cuda_graphs=False,
    )
    _add_adapters(engine)
    engine.runner.model = StubModel(engine.config, engine.runner.device)
    return engine


PREFILL_ADAPTERS = [f"lora-p-{i}" for i in range(4)] + [f"direft-p-{i}" for i in range(4)]
ALL_ADAPTERS = ["lora-all-0", "lora-all-1"]


def _add_adapters(engine) -> None:
    from preft.adapters import LoraConfig, ReftConfig
    from preft.tiny import random_adapter

    for i, name in enumerate(PREFILL_ADAPTERS + ALL_ADAPTERS):
        if name.startswith("direft"):
            config = ReftConfig(kind="direft", r=8, policy="prefill")
        else:
            policy = "all" if "all" in name else "prefill"
            config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], policy=policy)
        engine.add_adapter(name, random_adapter(engine.config, config, seed=i))


def _adapter_for(i: int) -> str | None:
    """Half the requests use a prefill-policy adapter, one in eight an ``all`` one, the rest none."""
    if i % 2 == 0:
        return PREFILL_ADAPTERS[(i // 2) % len(PREFILL_ADAPTERS)]
    if i % 8 == 1:
        return ALL_ADAPTERS[(i // 8) % len(ALL_ADAPTERS)]
    return None


def _engine_thread_copy():
    """What the server's engine thread does to each output before handing it to the event loop: nothing since
    issue 12 (deltas are handed over as they are); before, ``engine_loop._snapshot`` copied every cumulative output."""
    try:
        from preft.server import engine_loop
    except ImportError:  # no server extras installed: there is no engine thread to measure
        return None
    return getattr(engine_loop, "_snapshot", None)


_HANDOFF = None


def _handoff(outputs) -> None:
    if _HANDOFF is not None:
        for out in outputs:
            _HANDOFF(out)


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


@dataclass
class Steps:
    """Timed steps of one shape: wall time, thread CPU time and the stage timers of each step."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    repeat_medians_ms: list[float] = field(default_factory=list)

    def extend(self, other: Steps) -> None:
        self.wall += other.wall
        self.cpu += other.cpu
        self.stages += other.stages
        self.repeat_medians_ms.append(round(statistics.median(other.wall) * 1e3, 4))


def _summarise(step: str, batch: int, steps: Steps) -> dict:
    ms = sorted(t * 1e3 for t in steps.wall)
    # adapters run inside prepare; sample: the rest of ModelRunner.launch and .collect after the (stubbed) forward: logits rows,
    # the sampler; outputs: the rest of the step after the runner: post-processing, stop checks, the deltas, the hand-off.
    per_step = []
    for t, s in zip(steps.wall, steps.stages):
        run, prepare, adapters = s.get("launch", 0.0) + s.get("collect", 0.0), s.get("prepare", 0.0), s.get("adapters", 0.0)
        sample = max(0.0, run - prepare - s.get("forward", 0.0))
        outputs = max(0.0, t - s.get("schedule", 0.0) - run)
        per_step.append({"schedule": s.get("schedule", 0.0), "prepare": max(0.0, prepare - adapters), "adapters": adapters,
                         "sample": sample, "outputs": outputs})  # fmt: skip
    breakdown = {stage: statistics.median(p[stage] * 1e3 for p in per_step) for stage in STAGES}
    return {
        "step": step,
        "batch": batch,
        "host_ms_median": statistics.median(ms),
        "host_ms_p90": _percentile(ms, 0.9),
        "host_ms_p10": _percentile(ms, 0.1),
        "host_ms_min": ms[0],  # on a shared machine the least disturbed step: closest to the engine's own cost
        "cpu_ms_median": statistics.median(steps.cpu) * 1e3,  # thread CPU time: not counting time descheduled
        "repeat_medians_ms": steps.repeat_medians_ms,
        "breakdown_ms": {k: round(v, 4) for k, v in breakdown.items()},
        "steps": len(ms),
    }


def _timed_steps(engine, timers: StageTimers, n: int) -> Steps:
    steps = Steps()
    for _ in range(n):
        start, start_cpu = time.perf_counter(), time.thread_time()
        outputs = engine.step()
        _handoff(outputs)
        steps.cpu.append(time.thread_time() - start_cpu)
        steps.wall.append(time.perf_counter() - start)
        steps.stages.append(timers.take())
    return steps


def _instrument(engine) -> StageTimers:
    from preft.engine import model_runner

    timers = StageTimers()
    timers.wrap(engine.scheduler, "schedule", "schedule")
    timers.wrap(engine.runner, "prepare", "prepare")
    timers.wrap(model_runner, "adapter_slots", "adapters")  # called inside prepare (StepBuffers.fill)
    timers.wrap(engine.runner, "launch", "launch")
    timers.wrap(engine.runner, "collect", "collect")
    timers.wrap(engine.runner.model, "forward", "forward")
    return timers


def _start_decoding(engine, count: int, cfg: HostOverheadConfig, max_tokens: int, gen: torch.Generator, first_id: int = 0) -> None:
    from preft.engine.sampler import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i in range(count):
        prompt = torch.randint(5, 261, (cfg.prompt_len,), generator=gen).tolist()
        engine.add_request(f"r{first_id + i}", prompt, params, _adapter_for(i))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()


def measure_decode(cfg: HostOverheadConfig, batch: int, workdir: Path) -> Steps:
    engine = _build_engine(cfg, workdir, max_seqs=batch, max_tokens_per_step=max(2048, batch * cfg.prompt_len))
    gen = torch.Generator().manual_seed(cfg.seed)
    _start_decoding(engine, batch, cfg, cfg.warmup + cfg.steps + 8, gen)
    timers = _instrument(engine)
    try:
        _timed_steps(engine, timers, cfg.warmup)
        steps = _timed_steps(engine, timers, cfg.steps)
    finally:
        timers.restore()
    assert len(engine.scheduler.running) == batch, f"decode batch shrank to {len(engine.scheduler.running)}"
    return steps


def measure_mixed(cfg: HostOverheadConfig, workdir: Path) -> Steps:
    from preft.engine.sampler import SamplingParams

    decodes, chunk = cfg.mixed_decodes, cfg.mixed_prefill
    engine = _build_engine(cfg, workdir, max_seqs=decodes + 1, max_tokens_per_step=decodes + chunk)
    gen = torch.Generator().manual_seed(cfg.seed)
    _start_decoding(engine, decodes, cfg, 4 * (cfg.warmup + cfg.steps) + 8, gen)
    timers = _instrument(engine)
    # One long prompt at a time, prefilled in chunks of `chunk` tokens beside the decodes; random tokens, so no cache hits.
    chunks_per_prompt = 4
    steps, done, index = Steps(), 0, 0
    try:
        while done < cfg.warmup + cfg.steps:
            prompt = torch.randint(5, 261, (chunk * chunks_per_prompt,), generator=gen).tolist()
            engine.add_request(f"long{index}", prompt, SamplingParams(max_tokens=1, ignore_eos=True), _adapter_for(index))
            index += 1
            for _ in range(chunks_per_prompt):
                one = _timed_steps(engine, timers, 1)
                if done >= cfg.warmup:
                    steps.wall += one.wall
                    steps.cpu += one.cpu
                    steps.stages += one.stages
                done += 1
            while any(s.request_id.startswith("long") for s in engine.scheduler.running):
                engine.step()  # the step that samples the long request's token is not a mixed step of this shape
                timers.take()
    finally:
        timers.restore()
    return steps


class SimulatedDevice:
    """A device that runs each launched step for ``ms`` milliseconds, one after another: ``launch`` returns at
    once (as a CUDA launch does) and ``collect`` waits until the step has finished on this device's clock."""

    def __init__(self, runner, ms: float):
        self.seconds, self.busy_until = ms / 1e3, 0.0
        launch, collect = runner.launch, runner.collect

        def simulated_launch(batch):
            handle = launch(batch)
            self.busy_until = max(time.perf_counter(), self.busy_until) + self.seconds
            return handle, self.busy_until

        def simulated_collect(launched):
            handle, done = launched
            wait = done - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            return collect(handle)

        runner.launch, runner.collect = simulated_launch, simulated_collect


def measure_overlap(cfg: HostOverheadConfig, workdir: Path) -> dict:
    """Wall time per decode step of ``cfg.overlap_batch`` sequences on a ``cfg.device_ms`` simulated device, with
    synchronous and with asynchronous scheduling (one engine each, the same requests)."""
    batch, out = cfg.overlap_batch, {"step": "decode", "batch": cfg.overlap_batch, "device_ms": cfg.device_ms}
    for mode in ("sync", "async"):
        walls = []
        for _ in range(cfg.repeats):
            engine = _build_engine(cfg, workdir, max_seqs=batch, max_tokens_per_step=max(2048, batch * cfg.prompt_len))
            _start_decoding(engine, batch, cfg, cfg.warmup + cfg.steps + 8, torch.Generator().manual_seed(cfg.seed))
            engine.async_scheduling = mode == "async"
            SimulatedDevice(engine.runner, cfg.device_ms)
            for _ in range(cfg.warmup):
                engine.step()
            for _ in range(cfg.steps):
                start = time.perf_counter()
                _handoff(engine.step())
                walls.append(time.perf_counter() - start)
            assert len(engine.scheduler.running) == batch, f"decode batch shrank to {len(engine.scheduler.running)}"
        ms = statistics.median(walls) * 1e3
        out[f"{mode}_step_ms"] = ms
        out[f"{mode}_device_busy"] = min(1.0, cfg.device_ms / ms)
    out["speedup"] = out["sync_step_ms"] / out["async_step_ms"]
    return out


def run_host_overhead(cfg: HostOverheadConfig) -> dict:
    """Every shape of the module doc; returns ``{"results": [...], "environment": ...}``."""
    from tqdm.auto import tqdm

    global _HANDOFF
    _HANDOFF = _engine_thread_copy()  # resolved (imported) before anything is timed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host work is single-threaded Python; extra threads only add noise on a shared machine
    try:
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            shapes = [("decode", b) for b in cfg.batches] + ([("mixed", cfg.mixed_decodes + 1)] if cfg.mixed_decodes >= 0 else [])
            for step, batch in tqdm(shapes, desc="host overhead", unit="shape"):
                steps = Steps()
                for _ in range(cfg.repeats):
                    steps.extend(measure_decode(cfg, batch, Path(tmp)) if step == "decode" else measure_mixed(cfg, Path(tmp)))
                results.append(_summarise(step, batch, steps))
            overlap = [measure_overlap(cfg, Path(tmp))] if cfg.device_ms > 0 else []
    finally:
        torch.set_num_threads(threads)
    report = {"results": results, "environment": environment(torch.device(cfg.device)), "vocab": VOCAB, "config": cfg.__dict__}
    if overlap:
        report["overlap"] = overlap
    return report


def _ms(row: dict, key: str, width: int = 7) -> str:
    return f"{row[key]:{width}.3f}" if key in row else f"{'-':>{width}}"


def format_table(report: dict) -> str:
    head = f"{'step':>6} {'batch':>5} {'median ms':>9} {'p90 ms':>7} {'p10 ms':>7} {'min ms':>7} {'cpu ms':>7}  "
    lines = [head + " ".join(f"{s:>8}" for s in STAGES)]
    for r in report["results"]:
        stages = " ".join(f"{r['breakdown_ms'][s]:8.3f}" for s in STAGES)
        lows = f"{_ms(r, 'host_ms_p10')} {_ms(r, 'host_ms_min')} {_ms(r, 'cpu_ms_median')}"
        lines.append(f"{r['step']:>6} {r['batch']:>5} {r['host_ms_median']:9.3f} {r['host_ms_p90']:7.3f} {lows}  {stages}")
    baseline = report.get("baseline")
    if baseline:
        lines.append(f"before (commit {baseline['commit']}, {baseline['note']}):")
        now = {(r["step"], r["batch"]): r for r in report["results"]}
        for r in baseline["results"]:
            after = now.get((r["step"], r["batch"]))
            ratio = f"  -> {after['host_ms_median']:.3f} ms now ({r['host_ms_median'] / after['host_ms_median']:.2f}x)" if after else ""
            lows = f"{_ms(r, 'host_ms_p10')} {_ms(r, 'host_ms_min')} {_ms(r, 'cpu_ms_median')}"
            lines.append(f"{r['step']:>6} {r['batch']:>5} {r['host_ms_median']:9.3f} {r['host_ms_p90']:7.3f} {lows}{ratio}")
    for r in report.get("overlap", []):
        lines.append(
            f"simulated device, {r['device_ms']:g} ms per step, decode {r['batch']}: synchronous {r['sync_step_ms']:.3f} ms per step "
            f"(device busy {r['sync_device_busy']:.0%}), asynchronous {r['async_step_ms']:.3f} ms ({r['async_device_busy']:.0%}): "
            f"{r['speedup']:.2f}x"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Stacked bars: the host time of each shape by stage (and the baseline's total, when recorded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [f"{r['step']} {r['batch']}" for r in rows]
    overlap = report.get("overlap", [])
    fig, axes = plt.subplots(1, 2 if overlap else 1, figsize=(11 if overlap else 7, 4), squeeze=False)
    ax = axes[0, 0]
    for r in overlap:  # right panel: step time with a simulated device, both scheduling modes
        right = axes[0, 1]
        right.bar(["synchronous", "asynchronous"], [r["sync_step_ms"], r["async_step_ms"]], color=["tab:gray", "tab:green"])
        right.axhline(r["device_ms"], color="red", linestyle="--", label=f"device step ({r['device_ms']:g} ms)")
        right.set_ylabel("ms per step (median)")
        right.set_title(f"decode {r['batch']}, simulated device: {r['speedup']:.2f}x")
        right.legend(fontsize=8)
    bottom = [0.0] * len(rows)
    for stage in STAGES:
        values = [r["breakdown_ms"][stage] for r in rows]
        ax.bar(labels, values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    baseline = {(r["step"], r["batch"]): r["host_ms_median"] for r in (report.get("baseline") or {}).get("results", [])}
    if baseline:
        ax.scatter(labels, [baseline.get((r["step"], r["batch"])) for r in rows], color="black", marker="_", s=400, label="before")
    targets = [TARGET_MS[r["step"]] if r["batch"] >= 256 else None for r in rows]  # issue 12's targets are for batch 256
    if any(t is not None for t in targets):
        ax.scatter(labels, targets, color="red", marker="_", s=400, label="target")
    ax.set_ylabel("host ms per step (median)")
    ax.set_title(f"engine host overhead, stub forward ({report['environment']['device_name']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = HostOverheadConfig()
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_OUTPUT_DIR / "host_overhead.json", help="results file (.md and .png beside it)"
    )
    parser.add_argument("--batches", default=",".join(map(str, d.batches)), help="decode batch sizes, comma-separated")
    parser.add_argument("--mixed-decodes", type=int, default=d.mixed_decodes, help="decodes in the mixed step (-1: no mixed step)")
    parser.add_argument("--mixed-prefill", type=int, default=d.mixed_prefill, help="prefill chunk of the mixed step, tokens")
    parser.add_argument("--steps", type=int, default=d.steps, help="timed steps per shape and repeat")
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--repeats", type=int, default=d.repeats, help="fresh engines per shape (their steps are pooled)")
    parser.add_argument("--device", default=d.device, help="where the stub's tensors live (cpu: host work only)")
    parser.add_argument("--baseline", type=Path, default=None, help="a JSON from an earlier commit to show as 'before'")
    parser.add_argument(
        "--device-ms", type=float, default=d.device_ms,
        help="also time sync vs asynchronous scheduling on a simulated device taking this many ms per step (0: skip)",
    )  # fmt: skip
    parser.add_argument("--overlap-batch", type=int, default=d.overlap_batch, help="decode batch of the --device-ms measurement")


def run(args: argparse.Namespace) -> int:
    cfg = HostOverheadConfig(
        batches=[int(b) for b in args.batches.split(",") if b],
        mixed_decodes=args.mixed_decodes,
        mixed_prefill=args.mixed_prefill,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        device=args.device,
        device_ms=args.device_ms,
        overlap_batch=args.overlap_batch,
    )
    report = run_host_overhead(cfg)
    if args.baseline is not None:
        report["baseline"] = json.loads(args.baseline.read_text())
    report["targets_ms"] = TARGET_MS
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    table = format_table(report)
    args.json.with_suffix(".md").write_text(f"```\n{table}\n```\n")
    plot(report, args.json.with_suffix(".png"))
    print(table)
    print(f"wrote {args.json}, {args.json.with_suffix('.md')} and {args.json.with_suffix('.png')}")
    return 0

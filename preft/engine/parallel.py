"""Tensor parallelism (Megatron-style) over ``torch.distributed``: NCCL on CUDA, gloo on CPU.

One process per rank. The engine's process is rank 0: it schedules, computes its own shard and
samples. Ranks 1..N-1 are worker processes (``worker_main``) started and supervised here; each holds
its shard of the weights, of the KV cache (``kv_heads / N`` heads) and of the adapter slot stacks.

Sharding (``shard_model``): ``qkv_proj`` and ``gate_up_proj`` are column-parallel (each rank owns
``heads / N`` query heads, ``kv_heads / N`` KV heads and ``intermediate / N`` MLP columns), ``o_proj``
and ``down_proj`` row-parallel, each followed by one all-reduce (``preft.engine.model``). Embedding,
norms and the LM head are replicated; only rank 0 computes logits and samples, with the same
counter-based seeds as on one device.

Adapters (``shard_lora``): LoRA on a column-parallel module keeps ``A`` whole and takes this rank's
rows of ``B``; on a row-parallel module it takes this rank's columns of ``A`` and keeps ``B`` whole, so
``B (A_r x_r)`` is a partial sum added before the base layer's all-reduce: no collective per adapter.
ReFT edits the replicated residual stream with whole factors, identically on every rank.

Every step, rank 0 sends each worker (over a pipe) the step's packed int32 input buffer, the per-token
adapter slots and the slot changes since the last step (an adapter written into a slot: sent once,
sharded by the worker; a slot cleared; KV blocks zeroed). Disk reads, validation and the host cache
stay on rank 0. A worker that dies is a ``TensorParallelError`` on rank 0 at the next send or collective
(gloo sees the closed connection; NCCL and hung peers end at ``COLLECTIVE_TIMEOUT_S``); a worker whose
rank 0 died sees its pipe close and exits.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing.connection
import pickle
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from preft.engine.attention import AttentionMetadata
from preft.errors import PreftError

logger = logging.getLogger(__name__)

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output features split across ranks
ROW_PARALLEL = ("o_proj", "down_proj")  # input features split; outputs all-reduced
COLLECTIVE_TIMEOUT_S = 300  # a collective waiting longer than this ends the server (a peer hung or died)
START_TIMEOUT_S = 600  # workers load their shard within this


class TensorParallelError(PreftError):
    """A tensor-parallel rank exited, failed or stopped answering: the ranks are out of step and the engine cannot continue."""


def check_tensor_parallel(config: Any, size: int) -> None:
    """Raise ``PreftError`` unless ``size`` divides the model's attention heads, KV heads and MLP width (naming sizes that would)."""
    if size < 1:
        raise PreftError(f"tensor_parallel_size must be >= 1, got {size}")
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    inter = config.intermediate_size
    if heads % size or kv_heads % size or inter % size:
        fits = [n for n in range(1, heads + 1) if heads % n == 0 and kv_heads % n == 0 and inter % n == 0]
        raise PreftError(
            f"tensor_parallel_size {size} does not divide the model's {heads} attention heads, {kv_heads} KV heads and "
            f"intermediate size {inter}; sizes that would: {', '.join(map(str, fits))}"
        )


def shard_lora(module: str, a: torch.Tensor, b: torch.Tensor, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``(A [r, in], B [out, r])`` of a LoRA on ``module`` (see the module doc)."""
    if size == 1:
        return a, b
    if module in COLUMN_PARALLEL:
        return a, b.chunk(size, dim=0)[rank]
    return a.chunk(size, dim=1)[rank], b


def shard_shapes(shapes: dict[str, tuple[int, int]], size: int) -> dict[str, tuple[int, int]]:
    """``linear_shapes`` of one rank's shard: column-parallel outputs and row-parallel inputs divided by ``size``."""
    return {m: (i, o // size) if m in COLUMN_PARALLEL else (i // size, o) for m, (i, o) in shapes.items()}


def _keep(weight: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(weight.contiguous().clone(), requires_grad=False)  # owns its memory (not a view of the checkpoint)


def shard_model(model: nn.Module, rank: int, size: int, group: Any = None) -> nn.Module:
    """Keep this rank's shard of every attention and MLP block of a ``CausalLM`` (in place); see the module doc.
    ``group``: the process group the row-parallel outputs are all-reduced over (None: no reduction, for tests)."""
    check_tensor_parallel(model.config, size)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = attn.qkv_proj
        attn.qkv_proj.weight = _keep(torch.cat([w.chunk(size)[rank] for w in qkv.weight.split(attn.qkv_sizes)]))
        if qkv.bias is not None:
            qkv.bias = _keep(torch.cat([b.chunk(size)[rank] for b in qkv.bias.split(attn.qkv_sizes)]))
        attn.num_heads //= size
        attn.num_kv_heads //= size
        attn.qkv_sizes = [s // size for s in attn.qkv_sizes]
        gate_up = mlp.gate_up_proj
        gate_up.weight = _keep(torch.cat([w.chunk(size)[rank] for w in gate_up.weight.split(mlp.intermediate_size)]))
        if gate_up.bias is not None:
            gate_up.bias = _keep(torch.cat([b.chunk(size)[rank] for b in gate_up.bias.split(mlp.intermediate_size)]))
        mlp.intermediate_size //= size
        for row_parallel in (attn.o_proj, mlp.down_proj):
            row_parallel.weight = _keep(row_parallel.weight.chunk(size, dim=1)[rank])
            if row_parallel.bias is not None and rank != 0:
                row_parallel.bias = None  # added once: on rank 0, before the all-reduce
        attn.tp_group = mlp.tp_group = group
    model.tensor_parallel = (rank, size)
    return model


def load_sharded_model(model_dir: str, dtype: torch.dtype, device: torch.device, rank: int, size: int, group: Any) -> nn.Module:
    """Rank ``rank``'s shard of the checkpoint on ``device``: mapped on the host (no copy where the dtype matches the file),
    sharded, then moved."""
    from preft.engine.model import load_model

    if (Path(model_dir) / "random-weights").is_file():  # a benchmark shape too large for a checkpoint (preft.bench.shapes)
        return random_sharded_model(model_dir, dtype, device, rank, size, group)
    model = shard_model(load_model(model_dir, dtype, "cpu"), rank, size, group)
    return model.to(device)


def random_sharded_model(model_dir: str, dtype: torch.dtype, device: torch.device, rank: int, size: int, group: Any) -> nn.Module:
    """This rank's shard of ``model_dir``'s config with random weights drawn on ``device`` (norms 1, the rest normal, std 0.02):
    no host copy and no file of the whole model (throughput does not depend on weight values)."""
    from preft.engine.model import CausalLM, load_config

    with torch.device("meta"):
        model = CausalLM(load_config(model_dir))
    inv_freq = model.inv_freq  # computed on the CPU even here
    model = shard_model(model.to(dtype), rank, size, group).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(rank)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0.0, 0.02, generator=generator)
    model.inv_freq = inv_freq.to(device)
    return model.requires_grad_(False).eval()


@contextlib.contextmanager
def local_forward(model: nn.Module) -> Iterator[None]:
    """Run forwards on this rank alone (no all-reduce): memory profiling and kernel warm-up, whose values do not matter."""
    blocks = [m for m in model.modules() if getattr(m, "tp_group", None) is not None]
    groups = [m.tp_group for m in blocks]
    for m in blocks:
        m.tp_group = None
    try:
        yield
    finally:
        for m, group in zip(blocks, groups):
            m.tp_group = group


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def process_group(store: dist.Store, device: torch.device, rank: int, size: int) -> Any:
    """The ranks' own process group (NCCL on CUDA, gloo on CPU), not torch.distributed's default one: several
    engines (and a trainer's torchrun group) can live in one process."""
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, options)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def connect(port: int, device: torch.device, rank: int, size: int) -> Any:
    """A worker's process group: rank 0's store listens on loopback at ``port``."""
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timeout)
    return process_group(store, device, rank, size)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its shard (picklable: it crosses the process boundary)."""

    model_dir: str
    dtype: torch.dtype
    device: str
    size: int
    port: int
    num_threads: int


@dataclass(frozen=True)
class StepMessage:
    """One step for the workers: slot changes first, then the packed inputs (see ``StepBuffers.fill``)."""

    events: list
    packed: np.ndarray
    sizes: tuple[int, ...]
    width: int
    max_query_len: int
    max_context_len: int
    adapter_slots: tuple | None  # (lora_slot, lora_active, reft_slot, reft_active) on the host, or None: no adapted token


def unpack_step(message: StepMessage, device: torch.device, sliding_window: int | None):
    """``(input_ids, positions, attention metadata)`` of a step from its packed buffer (the layout of ``StepBuffers.fill``)."""
    offsets = np.concatenate([[0], np.cumsum(message.sizes)]).tolist()
    on_device = torch.from_numpy(message.packed).to(device)
    views = [on_device[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    host = [message.packed[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    num_seqs = message.sizes[4]
    meta = AttentionMetadata(
        slot_mapping=views[2],
        cu_query_lens=views[3],
        context_lens=views[4],
        block_tables=views[6].view(num_seqs, message.width),
        max_query_len=message.max_query_len,
        max_context_len=message.max_context_len,
        sliding_window=sliding_window,
        host=(host[3], host[4], host[6].reshape(num_seqs, message.width)),
    )
    return views[0], views[1], meta


class TensorParallel:
    """Rank 0's handle on the workers: start, send each step, detect a dead rank, stop."""

    def __init__(self, model_dir: str, dtype: torch.dtype, device: torch.device, size: int):
        self.size = size
        self.device = device
        # Port 0: the system picks a free one, so parallel test runs never collide.
        self.store = dist.TCPStore(
            "127.0.0.1", 0, size, is_master=True, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S), wait_for_workers=False
        )
        port = self.store.port
        threads = max(1, torch.get_num_threads() // size) if device.type == "cpu" else torch.get_num_threads()
        spec = WorkerSpec(str(model_dir), dtype, str(device), size, port, threads)
        context = mp.get_context("spawn")
        self.procs: list[mp.Process] = []
        self.conns: list[multiprocessing.connection.Connection] = []
        for rank in range(1, size):
            parent, child = context.Pipe()
            proc = context.Process(target=worker_main, args=(rank, spec, child), name=f"preft-tp-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _stop_workers, self.procs, self.conns)
        try:
            self.wait("started")  # a worker that fails to start is reported now, not at the group's timeout
            self.group = self._join(device, size)
        except BaseException:
            self.close()
            raise
        logger.info("tensor parallel: %d ranks (%s), workers %s", size, self.group.name(), [p.pid for p in self.procs])

    def dead_ranks(self) -> list[str]:
        return [f"rank {r} (pid {p.pid}, exit code {p.exitcode})" for r, p in enumerate(self.procs, 1) if not p.is_alive()]

    def _join(self, device: torch.device, size: int) -> Any:
        """Rank 0's process group. Joining blocks in C++ until every rank has joined, so it runs on a thread while
        this one watches the workers: a rank that dies before joining is reported at once, not at the group's timeout."""
        result: dict[str, Any] = {}

        def join() -> None:
            try:
                result["group"] = process_group(self.store, device, 0, size)
            except BaseException as e:  # noqa: BLE001  (re-raised below, on the caller's thread)
                result["error"] = e

        thread = threading.Thread(target=join, name="preft-tp-join", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.1)
            if thread.is_alive() and self.dead_ranks():
                raise self.died()
        if "error" in result:
            raise result["error"]
        return result["group"]

    def died(self, cause: BaseException | None = None) -> TensorParallelError:
        """The error that ends the engine; names the ranks that exited (waits a moment for their exit codes)."""
        for proc in self.procs:
            proc.join(timeout=1.0 if cause is not None else 0)
        dead = self.dead_ranks()
        if dead:
            return TensorParallelError(f"tensor-parallel worker died: {', '.join(dead)}; the engine stops (restart it)")
        return TensorParallelError(
            f"a tensor-parallel step failed ({type(cause).__name__}: {cause}); the ranks are out of step, the engine stops (restart it)"
        )

    def send(self, message: Any) -> None:
        """``message`` to every worker, pickled once with plain pickle: tensors travel by value (torch's multiprocessing
        pickler would move them, and the step buffer they may view, into shared memory)."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self.conns:
                conn.send_bytes(data)
        except (OSError, EOFError) as e:  # BrokenPipeError: the worker is gone
            raise self.died(e) from e

    def wait(self, expected: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """Each worker's reply ``expected``; a worker that exits first (or sends an error) raises."""
        for rank, conn in enumerate(self.conns, 1):
            ready = multiprocessing.connection.wait([conn, self.procs[rank - 1].sentinel], timeout=timeout_s)
            if conn not in ready:
                raise (
                    self.died()
                    if not self.procs[rank - 1].is_alive()
                    else TensorParallelError(f"rank {rank} did not answer in {timeout_s} s")
                )
            reply = conn.recv()
            if reply[0] != expected:
                raise TensorParallelError(f"tensor-parallel rank {rank} failed: {reply[1]}")

    def setup(self, **runner_options: Any) -> None:
        """Once the workers have loaded their shards, they build their KV cache shard and adapter slots (``ModelRunner``
        options, as rank 0 chose them)."""
        self.wait("ready")
        self.send(("setup", runner_options))
        self.wait("ready")

    def close(self) -> None:
        """Stop the workers (a clean stop, then terminate) and leave the process group; safe to call twice."""
        self._finalizer()
        self.group = None


def _stop_workers(procs: list, conns: list) -> None:
    for conn in conns:
        with contextlib.suppress(OSError, EOFError):
            conn.send(("stop",))
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
    for conn in conns:
        conn.close()


def worker_main(rank: int, spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
    """Rank ``rank`` (>= 1): load the shard, then run every step rank 0 sends until told to stop or rank 0 is gone."""
    from preft.engine.adapter_manager import AdapterManager
    from preft.engine.model import sliding_window
    from preft.engine.model_runner import ModelRunner

    torch.set_num_threads(spec.num_threads)
    device = rank_device(torch.device(spec.device), rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        conn.send(("started",))
        group = connect(spec.port, device, rank, spec.size)
        model = load_sharded_model(spec.model_dir, spec.dtype, device, rank, spec.size, group)
        conn.send(("ready",))
        command, *options = pickle.loads(conn.recv_bytes())
        if command == "stop":
            return
        options = options[0]
        adapters = AdapterManager(
            model.config, device, spec.dtype, options.pop("max_adapter_slots"), max_cpu_adapters=0, tensor_parallel=(rank, spec.size)
        )
        runner = ModelRunner(model, adapters, **options)
        window = sliding_window(model.config)
        conn.send(("ready",))
        while True:
            message = pickle.loads(conn.recv_bytes())
            if not isinstance(message, StepMessage):  # ("stop",)
                return
            with torch.inference_mode():
                for event in message.events:
                    apply_event(runner, event)
                input_ids, positions, meta = unpack_step(message, device, window)
                batch = None
                if message.adapter_slots is not None:
                    lora_slot, lora_active, reft_slot, reft_active = message.adapter_slots
                    to_device = lambda t: None if t is None else t.to(device)  # noqa: E731
                    batch = adapters.batch(to_device(lora_slot), lora_active, to_device(reft_slot), reft_active)
                model(input_ids, positions, runner.kv_cache, meta, batch)
    except EOFError:
        logger.warning("tensor-parallel rank %d: rank 0 is gone; exiting", rank)
    except Exception as e:
        logger.exception("tensor-parallel rank %d failed", rank)
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from e


def apply_event(runner: Any, event: tuple) -> None:
    """Mirror one of rank 0's state changes: ``("load", slot, adapter)``, ``("clear", slot)``, ``("zero_kv", blocks)``."""
    kind = event[0]
    if kind == "load":
        runner.adapters.write_slot(event[1], event[2])
    elif kind == "clear":
        runner.adapters.clear_stacks(event[1])
    elif kind == "zero_kv":
        runner.kv_cache[:, :, event[1]] = 0
    else:
        raise ValueError(f"unknown tensor-parallel event {kind!r}")

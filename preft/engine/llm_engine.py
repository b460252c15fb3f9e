"""The engine loop: requests in, one scheduled step at a time, token-id deltas out.

Single-threaded: a server drives ``add_request`` / ``step`` / ``abort_request`` from one thread.
Dataflow per step: scheduler -> model runner (model, then sampler) -> stop checks -> outputs.

Outputs are deltas (``CompletionDelta``: the step's new token ids and logprobs, the finish reason,
the count so far), never copies of the output so far. The engine does not detokenise: text and stop
strings belong to ``preft.engine.detokenizer``, run by ``LLM.generate`` and by the server off this
thread; a stop string found there ends its sequence through ``stop_sequence`` (or an abort).

Asynchronous scheduling (``async_scheduling``, on by default on CUDA): the engine schedules and launches
step t+1 while the device still runs step t, and only then waits for step t's sampled ids. A sequence
whose newest token is still on the device has it read there by step t+1 (``seq.num_pending``,
``StepBuffers.fill``); stop checks and outputs trail by one step, and a token computed past a stop is
dropped. Steps whose sequences need their tokens on the host first (structured outputs, penalties) are
collected before the next is scheduled. If a collected step failed, the step launched on top of it is
rolled back and the failed step's requests rerun alone, as in synchronous mode. benchmarks/README.md,
"Host overhead", has the measurements.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from preft.adapters import Adapter
from preft.engine.adapter_manager import AdapterInfo, AdapterManager, PreparedAdapter
from preft.engine.block_manager import BlockManager
from preft.engine.config import EngineConfig
from preft.engine.guided import GuidedDecoding
from preft.engine.memory import (
    PROFILE_ADAPTER_RANK,
    adapted_step,
    kernel_warm_up_ranks,
    kv_cache_bytes,
    profile_adapters,
    profile_cuda_memory,
)
from preft.engine.model import load_config, load_model
from preft.engine.model_runner import ModelRunner, NonFiniteLogitsError, ScheduledSeq, kv_block_bytes
from preft.engine.parallel import TensorParallel, TensorParallelError, check_tensor_parallel, load_sharded_model, local_forward
from preft.engine.sampler import SamplingParams, request_seed
from preft.engine.scheduler import Scheduler
from preft.engine.sequence import RUNNING, RequestOutput, Sequence
from preft.errors import PreftError
from preft.models import resolve_model

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Cap of the default CPU KV pool. The pool is lazily zeroed (pages become resident when first written)
# and low block ids are reused first, so resident memory follows the KV in use, not this cap.
CPU_KV_BUDGET_BYTES = 2 << 30
MEMORY_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_memory_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"3000000000"``, ``"1.5GiB"``, ``"512MiB"``, ``"4GB"`` or ``"2G"``
    (``Ki``/``Mi``/``Gi``/``Ti``: powers of 1024; ``K``/``M``/``G``/``T``: powers of 1000; a trailing ``B`` is optional)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?)?b?\s*", str(size).lower())
        if match is None:
            raise PreftError(f"memory size {size!r} is not a number of bytes like 3000000000, 512MiB, 1.5GiB or 4GB")
        value = int(float(match.group(1)) * MEMORY_UNITS[match.group(2) or ""])
    if value <= 0:
        raise PreftError(f"memory size must be positive, got {size!r}")
    return value


def resolve_dtype(dtype: str | torch.dtype, config, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32").replace("torch.", "")
        resolved = DTYPES.get(name, torch.float32)
        return torch.float32 if device.type == "cpu" and resolved == torch.float16 else resolved
    if dtype not in DTYPES:
        raise PreftError(f"dtype must be 'auto' or one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def eos_token_ids(model_dir: Path, config, tokenizer) -> set[int]:
    """EOS ids from the tokenizer, config.json and generation_config.json (any may list several)."""
    ids: set[int] = set()
    sources = [tokenizer.eos_token_id, getattr(config, "eos_token_id", None)]
    gen_config = model_dir / "generation_config.json"
    if gen_config.is_file():
        sources.append(json.loads(gen_config.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


class LLMEngine:
    def __init__(self, config: EngineConfig | str | os.PathLike = "default", **options: Any):
        """``LLMEngine(EngineConfig(...))``, or ``LLMEngine(model, **options)`` with ``EngineConfig``'s field names."""
        config = config.replace(**options) if isinstance(config, EngineConfig) else EngineConfig.from_kwargs(config, **options)
        self.engine_config = config
        model_dir, dtype, device = config.model, config.dtype, config.device
        max_model_len, block_size = config.max_model_len, config.block_size
        max_adapter_slots, max_cpu_adapters, num_kv_blocks = config.max_adapter_slots, config.max_cpu_adapters, config.num_kv_blocks
        gpu_memory_utilization, kv_cache_memory_bytes = config.gpu_memory_utilization, config.kv_cache_memory_bytes
        max_num_seqs, max_num_batched_tokens = config.max_num_seqs, config.max_num_batched_tokens
        enable_prefix_caching, use_cuda_graphs = config.enable_prefix_caching, config.use_cuda_graphs
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.model_dir = resolve_model(model_dir)  # a folder, a .gguf file (converted once) or "default"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config = load_config(self.model_dir)
        self.dtype = resolve_dtype(dtype, self.config, self.device)
        kv_budget = None if kv_cache_memory_bytes is None else parse_memory_size(kv_cache_memory_bytes)  # bad input fails before the load
        started = time.perf_counter()
        self.tensor_parallel_size = tp = config.tensor_parallel_size
        if config.async_scheduling and tp > 1:
            raise PreftError("async_scheduling needs tensor_parallel_size=1 (workers follow rank 0's steps with host inputs)")
        # overlap pays where the device runs ahead of the host: CUDA; on CPU the forward blocks the host anyway
        self.async_scheduling = config.async_scheduling if config.async_scheduling is not None else self.device.type == "cuda" and tp == 1
        self.parallel: TensorParallel | None = None
        if tp == 1:
            self.model = load_model(self.model_dir, self.dtype, self.device)
        else:  # this process is rank 0; the workers load their shards meanwhile
            check_tensor_parallel(self.config, tp)
            self.parallel = TensorParallel(self.model_dir, self.dtype, self.device, tp)
            try:
                self.model = load_sharded_model(self.model_dir, self.dtype, self.device, 0, tp, self.parallel.group)
            except BaseException:
                self.parallel.close()
                raise
        load_s = time.perf_counter() - started
        logger.info("loaded %s (%s, %s) in %.1f s", self.model_dir.name, str(self.dtype).removeprefix("torch."), self.device, load_s)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.eos_token_ids = eos_token_ids(self.model_dir, self.config, self.tokenizer)
        self.guided = GuidedDecoding(self.tokenizer, self.config.vocab_size, self.eos_token_ids)
        limit = getattr(self.config, "max_position_embeddings", None) or max_model_len or 4096
        if max_model_len is not None and max_model_len > limit:
            raise PreftError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {limit}")
        self.max_model_len = max_model_len or limit
        self.block_size = block_size
        if num_kv_blocks is None:
            with local_forward(self.model):  # the profiled step runs on rank 0 alone
                num_kv_blocks = self._default_num_blocks(
                    gpu_memory_utilization, max_num_seqs, kv_budget, max_num_batched_tokens, max_adapter_slots, config.max_lora_rank
                )
        self.adapters = AdapterManager(
            self.config, self.device, self.dtype, max_adapter_slots, max_cpu_adapters, parse_memory_size(config.max_cpu_adapter_bytes),
            tensor_parallel=(0, tp), max_rank=config.max_lora_rank,
        )  # fmt: skip
        self.block_manager = BlockManager(num_kv_blocks, block_size, enable_prefix_caching)
        self.runner = ModelRunner(
            self.model, self.adapters, num_kv_blocks, block_size, max_num_seqs, max_num_batched_tokens, self.max_model_len
        )
        self.runner.guided = self.guided
        if self.parallel is not None:  # workers build the same KV cache (their heads) and adapter slots, and follow rank 0's steps
            self.adapters.slot_events = []
            self.runner.parallel = self.parallel
            self.parallel.setup(
                num_blocks=num_kv_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens, max_model_len=self.max_model_len, max_adapter_slots=max_adapter_slots,
            )  # fmt: skip
        self.scheduler = Scheduler(self.block_manager, self.adapters, max_num_seqs, max_num_batched_tokens, self.max_model_len)
        # Graphs replay decode steps (adapter-free, and with `all`-policy adapters); prefill runs eagerly.
        started = time.perf_counter()
        self.use_cuda_graphs = use_cuda_graphs and tp == 1 and self.runner.capture_decode_graphs(max_num_seqs, self.max_model_len)
        self.requests: dict[str, list[Sequence]] = {}
        self.inflight: LaunchedStep | None = None  # asynchronous scheduling: the launched step not yet collected
        self.errors: dict[str, str] = {}  # request id -> why it failed in this step (see _run_isolated)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        if self.device.type == "cuda":  # nothing is compiled or captured lazily on CPU: no warm-up there
            self.warm_up()
            logger.info(
                "warm-up in %.1f s: CUDA graphs for decode %s, Triton kernels compiled (adapter ranks up to %d), one dummy "
                "request served; asynchronous scheduling %s",
                time.perf_counter() - started, "captured" if self.use_cuda_graphs else "off", config.max_lora_rank,
                "on" if self.async_scheduling else "off",
            )  # fmt: skip

    def _default_num_blocks(
        self,
        gpu_memory_utilization: float,
        max_num_seqs: int,
        kv_cache_memory_bytes: int | None,
        max_num_batched_tokens: int = 2048,
        max_adapter_slots: int = 8,
        max_lora_rank: int = PROFILE_ADAPTER_RANK,
    ) -> int:
        """KV blocks: ``kv_cache_memory_bytes`` worth when given; on CUDA what ``gpu_memory_utilization`` of the
        whole GPU leaves after the weights and a profiled worst-case step of ``max_num_batched_tokens`` tokens with
        ``max_adapter_slots`` adapter slots (vLLM's rule, ``preft.engine.memory``); on CPU room for ``max_num_seqs``
        sequences of ``max_model_len`` tokens, capped at ``CPU_KV_BUDGET_BYTES``."""
        per_block = kv_block_bytes(self.config, self.block_size, self.dtype) // self.tensor_parallel_size  # this rank's KV heads
        per_seq = -(-self.max_model_len // self.block_size)
        if kv_cache_memory_bytes is not None:
            budget = kv_cache_memory_bytes
            if budget // per_block < per_seq:
                raise PreftError(
                    f"kv_cache_memory_bytes={budget} holds {budget // per_block * self.block_size} tokens of KV "
                    f"({per_block // self.block_size} bytes per token for this model in {str(self.dtype).removeprefix('torch.')}), "
                    f"fewer than max_model_len={self.max_model_len}; raise it to at least {per_seq * per_block} or lower max_model_len"
                )
            return budget // per_block
        if self.device.type == "cuda":
            profile = profile_cuda_memory(
                self.model, max_num_batched_tokens, self.max_model_len, max_num_seqs, self.block_size, max_adapter_slots, max_lora_rank
            )
            blocks = kv_cache_bytes(profile, gpu_memory_utilization, min_bytes=per_block) // per_block
            logger.info(
                "KV cache: %d blocks (%d tokens, %.2f GiB); the weights and a profiled step of %d tokens peaked at %.2f GiB, "
                "%.2f GiB is used outside PyTorch, of %.2f GiB (gpu_memory_utilization=%s)",
                blocks, blocks * self.block_size, blocks * per_block / 2**30, profile.num_tokens, profile.peak_allocated / 2**30,
                profile.non_torch / 2**30, profile.total / 2**30, gpu_memory_utilization,
            )  # fmt: skip
            if blocks < per_seq:
                logger.warning(
                    "the KV cache holds %d tokens, fewer than max_model_len=%d: longer requests stop with finish_reason 'length'; "
                    "raise gpu_memory_utilization or lower max_model_len",
                    blocks * self.block_size, self.max_model_len,
                )  # fmt: skip
            return blocks
        blocks = max(1, min(max_num_seqs * per_seq, CPU_KV_BUDGET_BYTES // per_block))
        if blocks < per_seq:
            logger.warning(
                "the default CPU KV pool (%d MiB) holds %d tokens, fewer than max_model_len=%d: longer requests stop with "
                "finish_reason 'length'; set kv_cache_memory_bytes or lower max_model_len",
                CPU_KV_BUDGET_BYTES >> 20, blocks * self.block_size, self.max_model_len,
            )  # fmt: skip
        return blocks

    def warm_up(self) -> None:
        """Compile and capture before the first request (``__init__`` runs it on CUDA): the Triton adapter kernels
        for decode-sized (BGMV) and prefill-sized (SGMV) steps of a LoRA on every linear module and a DiReFT, at every
        rank tile up to ``max_lora_rank`` (``memory.kernel_warm_up_ranks``), then one dummy base-model request
        (prefill and decode steps) through the engine. Leaves no request, KV block in use, adapter or counter
        behind. CUDA graphs of `all`-policy adapter decode steps stay lazy: they depend on the adapters' stack
        layout (``preft.engine.cuda_graphs``)."""
        for rank in kernel_warm_up_ranks(self.engine_config.max_lora_rank):
            adapters = profile_adapters(self.model, self.adapters.num_slots, rank)
            with local_forward(self.model):  # compiles kernels on rank 0; the workers compile on their first steps
                for num_tokens in (1, 256):  # a decode-sized step (BGMV) and one above the kernels' BGMV_MAX_TOKENS (SGMV)
                    adapted_step(self.model, num_tokens, num_tokens, 1, self.block_size, adapters)
            del adapters
        request_id = "preft-warm-up"
        self.add_request(request_id, list(range(self.block_size + 1)), SamplingParams(max_tokens=3, ignore_eos=True))
        while self.has_unfinished_requests():
            self.step()
        self.requests.pop(request_id, None)
        self.prompt_tokens = self.generation_tokens = 0
        self.block_manager.hits = self.block_manager.queries = 0

    # ---- adapters ----------------------------------------------------------------------------

    def add_adapter(
        self,
        name: str,
        source: str | os.PathLike | Adapter | PreparedAdapter,
        policy: str | None = None,
        path: str | os.PathLike | None = None,
    ) -> AdapterInfo:
        """Register ``name``; ``path``: the folder an ``Adapter`` was read from (it may then leave host memory)."""
        return self.adapters.add(name, source, policy, path)

    def prepare_adapter(self, source: str | os.PathLike | Adapter, policy: str | None = None) -> PreparedAdapter:
        """Read and validate an adapter for ``add_adapter``; safe to call from any thread (it touches no engine state)."""
        return self.adapters.prepare(source, policy)

    def remove_adapter(self, name: str, wait: bool = False) -> None:
        """Unregister ``name``. In use: raise ``AdapterInUseError`` naming the requests, or with ``wait=True``
        refuse new requests for it and remove it when its last request finishes."""
        self.adapters.remove(name, wait)  # the lifecycle lives in the adapter manager

    def list_adapters(self) -> list[AdapterInfo]:
        return self.adapters.list()

    def adapter_users(self, name: str) -> list[str]:
        """Ids of the requests that use adapter ``name`` (empty once it is unused or removed)."""
        return sorted(self.adapters.users.get(name, ()))

    # ---- requests ----------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, adapter: str | None = None
    ) -> None:
        """Queue a request; bad input raises a ``PreftError`` naming the problem."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise PreftError(f"request id {request_id!r} is already in use")
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise PreftError("the prompt is empty: give at least one token")
        vocab = self.config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise PreftError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(token_ids) > self.max_model_len:
            raise PreftError(f"prompt has {len(token_ids)} tokens, more than max_model_len={self.max_model_len}")
        if -(-len(token_ids) // self.block_size) > self.block_manager.num_blocks:
            raise PreftError(
                f"prompt needs {-(-len(token_ids) // self.block_size)} KV blocks, the pool has {self.block_manager.num_blocks}"
            )
        ref = None if adapter is None else self.adapters.get(adapter).ref  # registered as a user once the request is accepted
        if adapter is not None and adapter in self.adapters.pending_removal:
            raise PreftError(f"adapter {adapter!r} is being removed; it takes no new requests")
        params.check_vocab(vocab)
        seed = request_seed(params.seed)  # unseeded: a random seed now; completion i samples with seed + i
        seqs = [Sequence(request_id, token_ids, params, ref, index, seed + index) for index in range(params.n)]
        if params.min_tokens:  # the sampler keeps these from being sampled until min_tokens tokens exist
            stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
            for seq in seqs:
                seq.min_tokens_stop_ids = tuple(sorted(stop_ids))
        if params.structured is not None:  # compiled here once per distinct grammar (cached), never per step
            for seq in seqs:
                seq.guide = self.guided.matcher(params.structured)
        self.requests[request_id] = seqs
        if adapter is not None:
            self.adapters.use(adapter, request_id)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its blocks and slot are freed at once. Returns its final output (finish_reason
        ``"abort"``), or None if the request is unknown or already finished."""
        if request_id not in self.requests:
            return None
        for seq in self.requests[request_id]:
            self.scheduler.finish(seq, "abort")
        out = self._request_output(request_id)
        self._forget_request(request_id)
        self.errors.pop(request_id, None)
        return out

    def stop_sequence(self, request_id: str, index: int = 0) -> None:
        """End completion ``index`` of a request with finish_reason ``"stop"`` (its detokenizer found a stop
        string); the request ends when its last completion does. Unknown or finished: nothing happens."""
        seqs = self.requests.get(request_id)
        if seqs is None or not 0 <= index < len(seqs):
            return
        self.scheduler.finish(seqs[index], "stop")
        if all(s.is_finished for s in seqs):
            self._forget_request(request_id)
            self.errors.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        # A step in flight holds only sequences the scheduler still has, unless all of them have ended (then its
        # tokens would be dropped anyway, and the next step collects it).
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one step; a delta for each request that produced tokens or finished in it.

        With asynchronous scheduling the step launches step t+1 before it waits for step t's sampled ids (step
        t+1 reads them on the device), then turns step t's ids into tokens and deltas: outputs trail launches by
        one step, and a sequence that stops in step t has computed one more token, which is dropped. A step
        whose sequences need their tokens on the host before the next one (structured outputs, penalties) is
        waited for first."""
        touched: dict[str, None] = {}
        prev, self.inflight = self.inflight, None
        if prev is not None and not prev.overlappable:
            self._complete(prev, touched)
            prev = None
        batch, out_of_room = self.scheduler.schedule()
        for seq in out_of_room:
            if seq.num_pending:
                continue  # its token in flight is still valid: it ends on the next schedule, once that token is in
            self.scheduler.finish(seq, "length")
            touched[seq.request_id] = None
        for seq, error in self.scheduler.take_failed():  # its adapter could not be put in a device slot
            touched[seq.request_id] = None
            self._fail_request(seq.request_id, error)
        if touched:  # sequences ended before running (no KV room, an adapter that failed): not in the step
            batch = [item for item in batch if not item.seq.is_finished]
        launched, launch_error = None, None
        if batch:
            try:
                launched = self._launch(batch)
            except TensorParallelError:  # no request is to blame: the engine cannot continue
                raise
            except Exception as e:
                launch_error = e
        if prev is not None and not self._complete(prev, touched, later=launched):
            launched = None  # rolled back: its sequences are scheduled again
        if launch_error is not None:  # (collecting ``prev`` may have ended or, on its rollback, preempted some of them)
            self._isolate([item for item in batch if item.seq.status is RUNNING], launch_error, touched)
        elif launched is not None:
            if launched.overlappable:
                self.inflight = launched
            else:
                self._complete(launched, touched)
        return self._outputs(touched)

    def _launch(self, batch: list[ScheduledSeq]) -> LaunchedStep:
        """Queue ``batch`` on the device; its sequences' sampled tokens become pending, its KV counts as computed."""
        handle = self.runner.launch(batch)
        sampled = [item.seq for item in batch if item.samples]
        for row, seq in enumerate(sampled):
            seq.num_pending += 1
            seq.pending_row = row
        self.scheduler.advance(batch)
        overlappable = self.async_scheduling and not any(_needs_host_tokens(seq) for seq in sampled)
        return LaunchedStep(batch, sampled, handle, overlappable)

    def _complete(self, step: LaunchedStep, touched: dict[str, None], later: LaunchedStep | None = None) -> bool:
        """Wait for ``step``'s sampled ids and append them (stop checks included). If the step failed, ``later``
        (launched on top of it) is rolled back and the step's requests rerun alone (``_isolate``). Returns whether
        ``later`` still stands."""
        try:
            ids = self.runner.collect(step.handle)
        except TensorParallelError:
            raise
        except Exception as e:
            for undone in (later, step) if later is not None else (step,):  # newest first: back to before ``step``
                self.scheduler.roll_back(undone.batch)  # (it may preempt a sequence whose adapter slot was taken meanwhile)
                for seq in undone.sampled:
                    seq.num_pending -= 1
            self._isolate([item for item in step.batch if item.seq.status is RUNNING], e, touched)
            return False
        for seq in step.sampled:
            seq.num_pending -= 1
        self.prompt_tokens += self.scheduler.complete(step.batch)
        for seq, token_id in zip(step.sampled, ids):
            if seq.is_finished:
                continue  # ended while the step ran (abort, stop string, a stop token in the step before): dropped
            self._append(seq, token_id)
            touched[seq.request_id] = None
        return True

    def _isolate(self, batch: list[ScheduledSeq], error: Exception, touched: dict[str, None]) -> None:
        """The step failed with ``error``: run each request's share alone (synchronously), so that only the requests
        that fail alone end (with finish_reason ``"error"``) and every other request gets exactly its tokens (DESIGN §6).

        A rerun recomputes the same KV positions (idempotent) and draws the same random numbers (they are a
        function of seed and position); logprobs are recorded only once a step's ids pass their checks."""
        by_request: dict[str, list[ScheduledSeq]] = {}
        for item in batch:
            by_request.setdefault(item.seq.request_id, []).append(item)
        if len(by_request) == 1:
            self._fail_request(batch[0].seq.request_id, _describe(error, batch[0].seq))
            return
        if by_request:
            logger.warning("a step of %d requests failed (%s); running each alone to isolate it", len(by_request), error)
        for request_id, items in by_request.items():
            try:
                ids = self.runner.run(items)
            except TensorParallelError:
                raise
            except Exception as e:
                self._fail_request(request_id, _describe(e, items[0].seq))
                continue
            self.scheduler.advance(items)
            self.prompt_tokens += self.scheduler.complete(items)
            for seq, token_id in zip([item.seq for item in items if item.samples], ids):
                self._append(seq, token_id)
                touched[request_id] = None

    def _outputs(self, touched: dict[str, None]) -> list[RequestOutput]:
        errors = self.errors
        touched.update(dict.fromkeys(errors))
        outputs = []
        for request_id in touched:
            seqs = self.requests.get(request_id)
            if seqs is None:
                continue
            out = self._request_output(request_id, seqs)
            if errors:
                out.error = errors.pop(request_id, None)
            if out.finished:
                self._forget_request(request_id)
            outputs.append(out)
        return outputs

    def _fail_request(self, request_id: str, error: str) -> None:
        """End every sequence of ``request_id`` with finish_reason ``"error"``; its output carries ``error``."""
        if request_id not in self.requests:
            return
        logger.warning("request %r failed: %s", request_id, error)
        for seq in self.requests[request_id]:
            private = self.block_manager.unpublish_private(seq)
            if private:  # its KV may be NaN: attention over the block's unused rows would poison the block's next owner
                self.runner.zero_kv_blocks(private)
            self.scheduler.finish(seq, "error")
        self.errors.setdefault(request_id, error)

    def _append(self, seq: Sequence, token_id: int) -> None:
        seq.append_token(token_id)
        self.generation_tokens += 1
        params = seq.params
        reason = None
        num_tokens = len(seq.token_ids)
        if (token_id in self.eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids:
            reason = "stop"
        elif num_tokens - seq.num_prompt_tokens >= params.max_tokens or num_tokens >= self.max_model_len:
            reason = "length"
        if seq.guide is not None and self.guided.accept(seq, token_id) and reason is None:
            reason = "stop"  # the grammar is complete
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _request_output(self, request_id: str, seqs: list[Sequence] | None = None) -> RequestOutput:
        seqs = seqs or self.requests[request_id]
        first = seqs[0]
        finished = first.is_finished if len(seqs) == 1 else all(s.is_finished for s in seqs)  # n == 1: the hot path
        deltas = [first.delta()] if len(seqs) == 1 else [s.delta() for s in seqs]
        return RequestOutput(request_id, first.prompt_token_ids, deltas, finished, self._metrics(seqs) if finished else {})

    @staticmethod
    def _metrics(seqs: list[Sequence]) -> dict:
        """A finished request's timings and cache use (built once, at the end)."""
        first = seqs[0]
        return {
            "arrival_time": first.arrival_time,
            "first_token_time": first.first_token_time,
            "finished_time": time.monotonic(),
            "num_cached_tokens": first.num_cached_tokens,
            "num_preemptions": sum(s.num_preemptions for s in seqs),
        }

    def _forget_request(self, request_id: str) -> None:
        """The request ended: drop it, and tell the adapter manager its adapter has one user less."""
        seqs = self.requests.pop(request_id)
        if seqs[0].adapter is not None:
            self.adapters.done(seqs[0].adapter.name, request_id)

    def close(self) -> None:
        """Stop the tensor-parallel workers (if any); the engine cannot step afterwards. Safe to call twice."""
        if self.parallel is not None:
            self.parallel.close()

    def stats(self) -> dict:
        return dict(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.block_manager.num_used_blocks,
            kv_blocks_total=self.block_manager.num_blocks,
            adapter_slots_used=self.adapters.slots_in_use,
            adapter_slots_total=self.adapters.num_slots,
            cpu_adapter_hits=self.adapters.cpu_hits,
            cpu_adapter_misses=self.adapters.cpu_misses,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hits=self.block_manager.hits,
            prefix_cache_queries=self.block_manager.queries,
        )


def _describe(error: Exception, seq: Sequence) -> str:
    """What the client of a failed request is told: the cause, in words (never a traceback or a host path)."""
    if isinstance(error, NonFiniteLogitsError):
        blame = f"; its adapter {seq.adapter.name!r} may be broken" if seq.adapter is not None else ""
        return f"the model produced non-finite logits (NaN or inf) for this request{blame}"
    if isinstance(error, PreftError):
        return str(error)
    return f"computing this request failed ({type(error).__name__})"


class LaunchedStep:
    """A step on the device whose sampled ids have not been collected (``LLMEngine._launch``)."""

    __slots__ = ("batch", "sampled", "handle", "overlappable")

    def __init__(self, batch: list[ScheduledSeq], sampled: list[Sequence], handle, overlappable: bool):
        self.batch, self.sampled, self.handle, self.overlappable = batch, sampled, handle, overlappable


def _needs_host_tokens(seq: Sequence) -> bool:
    """Whether ``seq``'s next step needs its newest token on the host: a grammar advances on it (structured
    outputs), penalties count it. Such a step is collected before the next one is scheduled."""
    p = seq.params
    return seq.guide is not None or p.repetition_penalty != 1.0 or bool(p.frequency_penalty) or bool(p.presence_penalty)

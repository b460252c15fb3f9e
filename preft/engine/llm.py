"""Offline generation in the vLLM manner: ``LLM(model_dir).generate(prompts, params, adapter=...)``."""

from __future__ import annotations

import itertools
import os

from tqdm.auto import tqdm

from preft.adapters import Adapter
from preft.engine.adapter_manager import AdapterInfo
from preft.engine.llm_engine import LLMEngine
from preft.engine.sampler import SamplingParams
from preft.engine.sequence import RequestOutput
from preft.errors import PreftError


class LLM:
    """A base model plus any number of registered adapters; each prompt may use a different one (or none)."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        dtype: str = "auto",
        device: str | None = None,
        max_adapter_slots: int = 8,
        max_cpu_adapters: int = 64,
        num_kv_blocks: int | None = None,
        gpu_memory_utilization: float = 0.9,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        max_model_len: int | None = None,
        use_cuda_graphs: bool = True,
        kv_cache_memory_bytes: int | str | None = None,
    ):
        self.engine = LLMEngine(
            model_dir,
            dtype=dtype,
            device=device,
            max_adapter_slots=max_adapter_slots,
            max_cpu_adapters=max_cpu_adapters,
            num_kv_blocks=num_kv_blocks,
            gpu_memory_utilization=gpu_memory_utilization,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            max_model_len=max_model_len,
            use_cuda_graphs=use_cuda_graphs,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
        )
        self.model_name = str(model_dir)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def add_adapter(self, name: str, path_or_adapter: str | os.PathLike | Adapter, policy: str | None = None) -> AdapterInfo:
        return self.engine.add_adapter(name, path_or_adapter, policy)

    def remove_adapter(self, name: str) -> None:
        self.engine.remove_adapter(name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.engine.list_adapters()

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        adapter: str | list[str | None] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * n
        adapters = adapter if isinstance(adapter, list) else [adapter] * n
        if len(params) != n or len(adapters) != n:
            raise PreftError(f"{n} prompts but {len(params)} sampling params and {len(adapters)} adapters; give one each or a single value")
        request_ids = []
        try:
            for prompt, p, a in zip(prompts, params, adapters):
                request_id = f"gen-{next(self._ids)}"
                self.engine.add_request(request_id, prompt, p, a)
                request_ids.append(request_id)
        except PreftError:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=n, desc="generate", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[r] for r in request_ids]

"""Offline generation in the vLLM manner: ``LLM(model_dir).generate(prompts, params, adapter=...)``."""

from __future__ import annotations

import itertools
import os
from typing import Any

from tqdm.auto import tqdm

from preft.adapters import Adapter
from preft.engine.adapter_manager import AdapterInfo
from preft.engine.config import EngineConfig
from preft.engine.detokenizer import Detokenizer
from preft.engine.llm_engine import LLMEngine
from preft.engine.sampler import SamplingParams
from preft.engine.sequence import CompletionOutput, RequestOutput
from preft.errors import PreftError


class LLM:
    """A base model plus any number of registered adapters; each prompt may use a different one (or none).

    ``LLM("default", dtype="float32", max_num_seqs=8)`` or ``LLM(EngineConfig(...))``: the options are
    ``EngineConfig``'s fields.
    """

    def __init__(self, model: str | os.PathLike | EngineConfig = "default", **options: Any):
        self.engine = LLMEngine(model, **options)
        self.model_name = str(self.engine.engine_config.model)
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
        finished_ids: set[str] = set()
        texts = {rid: [Detokenizer(self.tokenizer, p.stop) for _ in range(p.n)] for rid, p in zip(request_ids, params)}
        done: dict[str, list[CompletionOutput | None]] = {rid: [None] * p.n for rid, p in zip(request_ids, params)}
        last: dict[str, RequestOutput] = {}
        with tqdm(total=n, desc="generate", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    last[out.request_id] = out
                    for delta in out.outputs:
                        if done[out.request_id][delta.index] is not None:
                            continue
                        detok = texts[out.request_id][delta.index]
                        if detok.add(delta.new_token_ids, finished=delta.finish_reason is not None):
                            self.engine.stop_sequence(out.request_id, delta.index)  # before the next step: no token wasted
                            reason = "stop"
                        elif delta.finish_reason is not None:
                            reason = delta.finish_reason
                        else:
                            continue
                        logprobs = None if delta.logprobs is None else delta.logprobs[: detok.num_tokens]
                        done[out.request_id][delta.index] = CompletionOutput(delta.index, detok.token_ids, detok.text, reason, logprobs)
                    if all(c is not None for c in done[out.request_id]) and out.request_id not in finished_ids:
                        finished_ids.add(out.request_id)
                        bar.update(1)
        return [RequestOutput(rid, last[rid].prompt_token_ids, done[rid], True, last[rid].metrics, last[rid].error) for rid in request_ids]

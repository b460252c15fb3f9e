"""A stand-in for ``preft.engine.LLM`` that follows the engine API contract, with no model.

Each step emits one deterministic token per running request (a hash of prompt, adapter and
position), so server plumbing can be tested fast and exactly. The required tests use the real
engine; this one only checks the server's own bookkeeping (threads, queues, aborts, unloads).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from preft.adapters import Adapter, load_adapter
from preft.engine.adapter_manager import AdapterInfo, AdapterInUseError, PreparedAdapter
from preft.engine.sampler import SamplingParams
from preft.engine.sequence import CompletionDelta, RequestOutput
from preft.errors import PreftError


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    adapter: str | None
    tokens: list[int] = field(default_factory=list)


class FakeEngine:
    def __init__(self, tokenizer, model_config, max_model_len: int, max_tokens_per_step: int = 1):
        self.tokenizer, self.model_config, self.max_model_len = tokenizer, model_config, max_model_len
        self.requests: dict[str, _Request] = {}
        self.adapters: dict[str, AdapterInfo] = {}
        self.pending_removal: set[str] = set()
        self.gate = None  # a threading.Event: until it is set, step() makes no progress (tests hold requests in flight)

    def add_request(self, request_id, prompt, params, adapter=None):
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) >= self.max_model_len:
            raise PreftError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        if adapter is not None and adapter not in self.adapters:
            raise PreftError(f"unknown adapter {adapter!r}")
        self.requests[request_id] = _Request(ids, params, adapter)

    def step(self):
        if self.gate is not None and not self.gate.wait(timeout=0.002):
            return []  # held: the engine thread keeps serving commands between steps
        outputs = []
        for request_id, r in list(self.requests.items()):
            r.tokens.append(next_token(r.prompt, r.adapter, len(r.tokens)))
            done = len(r.tokens) >= r.params.max_tokens
            delta = CompletionDelta(0, r.tokens[-1:], "length" if done else None, len(r.tokens))
            outputs.append(RequestOutput(request_id, r.prompt, [delta], done))
            if done:
                del self.requests[request_id]
        self._prune()
        return outputs

    def stop_sequence(self, request_id, index=0):
        self.abort_request(request_id)

    def abort_request(self, request_id):
        self.requests.pop(request_id, None)
        self._prune()

    def has_unfinished_requests(self):
        return bool(self.requests)

    def stats(self):
        return dict(
            num_running=len(self.requests),
            num_waiting=0,
            kv_blocks_used=len(self.requests),
            kv_blocks_total=64,
            adapter_slots_used=0,
            adapter_slots_total=8,
        )

    def prepare_adapter(self, source, policy=None):
        return PreparedAdapter(load_adapter(source, policy, self.model_config), str(source), "")

    def add_adapter(self, name, source, policy=None, path=None):
        if isinstance(source, PreparedAdapter):
            adapter, path = source.adapter, source.path
        else:
            adapter = source.with_policy(policy) if isinstance(source, Adapter) else load_adapter(source, policy, self.model_config)
        self.adapters[name] = AdapterInfo(name, adapter.kind, adapter.policy, adapter.rank, str(path or source))
        return self.adapters[name]

    def adapter_users(self, name):
        return sorted(rid for rid, r in self.requests.items() if r.adapter == name)

    def remove_adapter(self, name, wait=False):
        """As the engine: in use, raise, or with ``wait`` drop it when its last request ends."""
        users = self.adapter_users(name)
        if users and not wait:
            raise AdapterInUseError(f"adapter {name!r} is used by {users}")
        self.pending_removal.add(name)
        self._prune()

    def _prune(self):
        for name in [n for n in self.pending_removal if not self.adapter_users(n)]:
            self.pending_removal.discard(name)
            del self.adapters[name]

    def list_adapters(self):
        return list(self.adapters.values())


def next_token(prompt: list[int], adapter: str | None, position: int) -> int:
    return 5 + zlib.crc32(f"{prompt}|{adapter}|{position}".encode()) % 256


class FakeLLM:
    def __init__(self, model_dir: str | Path, max_model_len: int = 256, **_):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model_name = Path(model_dir).name
        self.max_model_len = max_model_len
        self.engine = FakeEngine(self.tokenizer, AutoConfig.from_pretrained(model_dir), max_model_len)

    def add_adapter(self, name, path, policy=None):
        return self.engine.add_adapter(name, path, policy)

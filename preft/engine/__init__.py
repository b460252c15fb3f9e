"""The multi-adapter serving engine: paged KV cache, continuous batching, grouped low-rank prefill,
adapter-free decode for prefill-only adapters. Entry points: ``LLM`` (offline) and ``LLMEngine`` (step API)."""

from preft.engine.adapter_manager import AdapterInfo, AdapterInUseError, UnknownAdapterError
from preft.engine.config import EngineConfig
from preft.engine.llm import LLM
from preft.engine.llm_engine import LLMEngine
from preft.engine.sampler import SamplingParams
from preft.engine.sequence import CompletionDelta, CompletionOutput, RequestOutput

__all__ = [
    "LLM",
    "AdapterInfo",
    "AdapterInUseError",
    "CompletionDelta",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "UnknownAdapterError",
]

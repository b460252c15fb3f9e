"""Adapters injected into transformers models, driven by ``adapter_mask`` (training and the reference generator)."""

from preft.hf.generate import Generation, generate, sample_next
from preft.hf.model import BatchAdapters, PreftModel

__all__ = ["BatchAdapters", "Generation", "PreftModel", "generate", "sample_next"]

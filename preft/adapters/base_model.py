"""What preft needs to know of a base model: its family, its fingerprint, its linear shapes."""

from __future__ import annotations

from typing import Any

from preft.adapters.config import LINEAR_MODULES
from preft.errors import AdapterShapeError, BaseModelMismatchError, UnsupportedModelError

# model_type -> the decoder architecture preft implements for it (all Llama-shaped).
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
FINGERPRINT_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
MODULE_PARENT = {m: ("self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp") for m in LINEAR_MODULES}


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def check_family(config: Any) -> str:
    """Return the model_type, or raise ``UnsupportedModelError`` naming it."""
    model_type = _get(config, "model_type")
    if model_type not in SUPPORTED_FAMILIES:
        archs = _get(config, "architectures") or []
        raise UnsupportedModelError(
            f"model_type {model_type!r} (architectures {archs}) is not supported; preft supports {list(SUPPORTED_FAMILIES)}"
        )
    return model_type


def head_dim(config: Any) -> int:
    return _get(config, "head_dim") or _get(config, "hidden_size") // _get(config, "num_attention_heads")


def fingerprint(config: Any) -> dict:
    """The base-model facts an adapter records, to refuse loading into a different model."""
    fp = {k: _get(config, k) for k in FINGERPRINT_FIELDS}
    fp["num_key_value_heads"] = fp["num_key_value_heads"] or fp["num_attention_heads"]
    fp["head_dim"] = head_dim(config)
    return fp


def check_fingerprint(recorded: dict | None, config: Any, what: str = "adapter") -> None:
    """Raise ``BaseModelMismatchError`` listing every field where ``recorded`` differs from ``config``."""
    if not recorded:
        return
    actual = fingerprint(config)
    diffs = [
        f"{k}: adapter has {recorded[k]!r}, model has {actual[k]!r}"
        for k in FINGERPRINT_FIELDS
        if k in recorded and recorded[k] != actual[k]
    ]
    if diffs:
        raise BaseModelMismatchError(f"{what} was trained on a different base model ({'; '.join(diffs)})")


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``module name -> (in_features, out_features)`` for the linear modules of one decoder layer."""
    hidden, inter = _get(config, "hidden_size"), _get(config, "intermediate_size")
    heads = _get(config, "num_attention_heads")
    kv_heads = _get(config, "num_key_value_heads") or heads
    hd = head_dim(config)
    return {
        "q_proj": (hidden, heads * hd),
        "k_proj": (hidden, kv_heads * hd),
        "v_proj": (hidden, kv_heads * hd),
        "o_proj": (heads * hd, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def check_config_fits(config: Any, model_config: Any) -> None:
    """Raise ``AdapterShapeError`` if an adapter config's layers or rank do not fit the base model."""
    n_layers, hidden = _get(model_config, "num_hidden_layers"), _get(model_config, "hidden_size")
    outside = [layer for layer in config.layers or () if layer >= n_layers]
    if outside:
        raise AdapterShapeError(
            f"{config.kind} layers {outside} are out of range: the base model has {n_layers} layers (0..{n_layers - 1})"
        )
    if config.kind != "lora" and config.r > hidden:
        raise AdapterShapeError(f"{config.kind} rank r={config.r} exceeds the base model's hidden size {hidden}")

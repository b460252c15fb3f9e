"""``Adapter``: an adapter's config and weights, independent of any runtime.

Training (``preft.hf``) and serving (``preft.engine``) both consume this object. Tensor keys are
canonical and short; ``preft.adapters.io`` maps them to and from files (PEFT key names for LoRA).

- LoRA: ``layers.{i}.{module}.lora_A`` ``[r, in]`` and ``layers.{i}.{module}.lora_B`` ``[out, r]``.
- LoReFT: ``layers.{i}.rotate`` (R ``[r, d]``), ``layers.{i}.source.weight`` (W ``[r, d]``),
  ``layers.{i}.source.bias`` (b ``[r]``).
- DiReFT: ``layers.{i}.proj`` (W2 ``[r, d]``), ``layers.{i}.source.weight`` (W1), ``layers.{i}.source.bias``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from preft.adapters.base_model import _get, check_config_fits, check_fingerprint, linear_shapes
from preft.adapters.config import AdapterConfig, LoraConfig, ReftConfig, check_policy, parse_positions
from preft.adapters.maths import direft_factors, loreft_factors
from preft.errors import AdapterFormatError, AdapterShapeError, NonFiniteWeightsError, UnknownTargetModuleError

# Trained adapters hold weights of magnitude ~1 or below; one far above is corrupt or hostile and would
# overflow to inf mid-batch, so it is refused at load.
MAX_ABS_WEIGHT = 1e4
LORA_KEY = re.compile(r"^layers\.(\d+)\.(\w+)\.lora_([AB])$")
REFT_KEY = re.compile(r"^layers\.(\d+)\.(rotate|proj|source\.weight|source\.bias)$")


def lora_key(layer: int, module: str, which: str) -> str:
    return f"layers.{layer}.{module}.lora_{which}"


def reft_key(layer: int, name: str) -> str:
    return f"layers.{layer}.{name}"


@dataclass
class Adapter:
    """An adapter's config, weights and the fingerprint of the base model it was trained on."""

    config: AdapterConfig
    tensors: dict[str, Tensor]
    base_model: dict | None = None
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def policy(self) -> str:
        return self.config.policy

    @property
    def rank(self) -> int:
        return self.config.r

    def with_policy(self, policy: str | None) -> Adapter:
        """The same weights under another policy (``None`` keeps the current one)."""
        if policy is None or policy == self.policy:
            return self
        check_policy(policy)
        return replace(self, config=replace(self.config, policy=policy))

    def lora_weights(self) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
        """``(layer, module) -> (lora_A [r, in], lora_B [out, r])``; scaling is ``config.scaling``."""
        out: dict[tuple[int, str], dict[str, Tensor]] = {}
        for key, tensor in self.tensors.items():
            layer, module, which = LORA_KEY.match(key).groups()
            out.setdefault((int(layer), module), {})[which] = tensor
        return {k: (v["A"], v["B"]) for k, v in sorted(out.items())}

    def reft_factors(self) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
        """``layer -> (down [r, d], bias [r], up [d, r])`` of the residual-stream edit."""
        factors = {}
        for layer in self.layers():
            t = lambda name, layer=layer: self.tensors[reft_key(layer, name)]  # noqa: E731
            if self.kind == "loreft":
                factors[layer] = loreft_factors(t("rotate"), t("source.weight"), t("source.bias"))
            else:
                factors[layer] = direft_factors(t("proj"), t("source.weight"), t("source.bias"))
        return factors

    def layers(self) -> list[int]:
        return sorted({int(k.split(".")[1]) for k in self.tensors})

    def positions(self) -> tuple[int, int] | None:
        return parse_positions(self.config.positions) if isinstance(self.config, ReftConfig) else None

    def content_hash(self) -> str:
        """A hash of config and weights: two adapters with equal hashes compute the same thing."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for key in sorted(self.tensors):
            t = self.tensors[key].detach().to("cpu").contiguous()
            h.update(key.encode())
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()[:16]

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Adapter:
        return replace(self, tensors={k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()})

    def validate(self, model_config: Any | None = None) -> None:
        """Check keys, shapes and finiteness, and (given ``model_config``) that the base model matches.

        Raises a ``PreftError`` subclass naming the first problem found.
        """
        for key, tensor in self.tensors.items():
            if not torch.is_floating_point(tensor):
                raise AdapterFormatError(f"tensor {key!r} has dtype {tensor.dtype}, expected a floating type")
            if not torch.isfinite(tensor).all():
                raise NonFiniteWeightsError(f"tensor {key!r} holds NaN or inf values")
            if tensor.numel() and float(tensor.abs().max()) > MAX_ABS_WEIGHT:
                raise NonFiniteWeightsError(
                    f"tensor {key!r} holds values of magnitude {float(tensor.abs().max()):.3g} > {MAX_ABS_WEIGHT:g}: "
                    "not a trained adapter (it would overflow the forward pass)"
                )
        if not self.tensors:
            raise AdapterFormatError("adapter has no weights")
        if model_config is not None:
            check_fingerprint(self.base_model, model_config)
            check_config_fits(self.config, model_config)
        if isinstance(self.config, LoraConfig):
            self._validate_lora(model_config)
        else:
            self._validate_reft(model_config)

    def _validate_lora(self, model_config: Any | None) -> None:
        r, seen = self.config.r, {}
        allowed = set(self.config.modules())
        for key, tensor in self.tensors.items():
            match = LORA_KEY.match(key)
            if not match:
                raise AdapterFormatError(f"unexpected LoRA tensor {key!r}")
            layer, module, which = int(match.group(1)), match.group(2), match.group(3)
            if module not in allowed:
                raise UnknownTargetModuleError(f"tensor {key!r} targets {module!r}, not in target_modules {sorted(allowed)}")
            if tensor.dim() != 2 or (which == "A" and tensor.shape[0] != r) or (which == "B" and tensor.shape[1] != r):
                raise AdapterShapeError(f"tensor {key!r} has shape {tuple(tensor.shape)}, which does not fit rank r={r}")
            seen.setdefault((layer, module), set()).add(which)
        for (layer, module), which in seen.items():
            if which != {"A", "B"}:
                raise AdapterFormatError(f"layer {layer} module {module!r} has lora_{'A' if 'A' not in which else 'B'} missing")
        if model_config is None:
            return
        shapes = linear_shapes(model_config)
        n_layers = _get(model_config, "num_hidden_layers")
        for (layer, module), (a, b) in self.lora_weights().items():
            if layer >= n_layers:
                raise AdapterShapeError(f"LoRA weights for layer {layer}, but the base model has {n_layers} layers")
            fan_in, fan_out = shapes[module]
            if a.shape[1] != fan_in or b.shape[0] != fan_out:
                raise AdapterShapeError(
                    f"layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                    f"model's {module} ({fan_in} -> {fan_out}) at rank {r}"
                )

    def _validate_reft(self, model_config: Any | None) -> None:
        r = self.config.r
        names = {"rotate", "source.weight", "source.bias"} if self.kind == "loreft" else {"proj", "source.weight", "source.bias"}
        by_layer: dict[int, set[str]] = {}
        for key in self.tensors:
            match = REFT_KEY.match(key)
            if not match or match.group(2) not in names:
                raise AdapterFormatError(f"unexpected {self.kind} tensor {key!r}; expected layers.N.{{{', '.join(sorted(names))}}}")
            by_layer.setdefault(int(match.group(1)), set()).add(match.group(2))
        for layer, present in by_layer.items():
            if present != names:
                raise AdapterFormatError(f"{self.kind} layer {layer} is missing {sorted(names - present)}")
        if self.config.layers is not None and sorted(by_layer) != sorted(self.config.layers):
            raise AdapterFormatError(f"config layers {self.config.layers} but weights for layers {sorted(by_layer)}")
        hidden = None if model_config is None else _get(model_config, "hidden_size")
        n_layers = None if model_config is None else _get(model_config, "num_hidden_layers")
        for key, tensor in self.tensors.items():
            ok = (
                tensor.shape == (r,)
                if key.endswith("bias")
                else (tensor.dim() == 2 and tensor.shape[0] == r and (hidden is None or tensor.shape[1] == hidden))
            )
            if not ok:
                want = f"[{r}]" if key.endswith("bias") else f"[{r}, {hidden or 'hidden'}]"
                raise AdapterShapeError(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {want}")
        if n_layers is not None and max(by_layer) >= n_layers:
            raise AdapterShapeError(f"{self.kind} edits layer {max(by_layer)}, but the base model has {n_layers} layers")

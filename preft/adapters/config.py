"""Adapter configs: what an adapter is, independent of any model or runtime.

``LoraConfig`` reads like PEFT's; ``ReftConfig`` like pyreft's. Both carry a ``policy``:

- ``"prefill"`` (PreFT): the adapter acts on prompt tokens only; decode runs as the base model.
- ``"all"``: the adapter acts on every token (ordinary PEFT behaviour).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from preft.errors import AdapterFormatError

Policy = Literal["prefill", "all"]
POLICIES = ("prefill", "all")
REFT_KINDS = ("loreft", "direft")
# Linear modules of the supported (Llama-family) decoder layers, in PEFT's naming.
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_LORA_ALPHA = 1e6  # far above any trained adapter's; a larger one is a broken or hostile config


def check_int(what: str, value: object, minimum: int = 0) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``, else ``AdapterFormatError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AdapterFormatError(f"{what} must be an integer >= {minimum}, got {value!r:.80}")
    return value


def check_number(what: str, value: object, low: float, high: float, high_open: bool = False) -> float:
    """``value`` as a float if it is a real number in ``[low, high]`` (``[low, high)`` when ``high_open``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (low <= value < high if high_open else low <= value <= high):
        interval = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise AdapterFormatError(f"{what} must be a number in {interval}, got {value!r:.80}")
    return float(value)


def check_layers(what: str, layers: object) -> list[int] | None:
    """``None`` (every layer) or a non-empty list of distinct layer indices."""
    if layers is None:
        return None
    if not isinstance(layers, list) or not layers:
        raise AdapterFormatError(f"{what} must be null or a non-empty list of layer indices, got {layers!r:.80}")
    layers = [check_int(f"{what} entry", layer) for layer in layers]
    if len(set(layers)) != len(layers):
        raise AdapterFormatError(f"{what} lists a layer twice: {layers}")
    return layers


def check_policy(policy: str) -> str:
    if not isinstance(policy, str) or policy not in POLICIES:
        raise AdapterFormatError(f"policy must be one of {POLICIES}, got {policy!r:.80}")
    return policy


@dataclass
class LoraConfig:
    """LoRA on linear modules: ``y = W x + scaling * B A x`` (PEFT maths and key names).

    ``target_modules`` is a list of module names (``"q_proj"``...) or ``"all-linear"``.
    ``layers`` restricts LoRA to some decoder layers (``None``: all).
    """

    r: int = 8
    lora_alpha: float = 16.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_dropout: float = 0.0
    use_rslora: bool = False
    layers: list[int] | None = None
    policy: Policy = "prefill"

    kind = "lora"

    def __post_init__(self) -> None:
        check_int("LoRA rank r", self.r, 1)
        check_number("lora_alpha", self.lora_alpha, -MAX_LORA_ALPHA, MAX_LORA_ALPHA)
        check_policy(self.policy)
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                self.target_modules = [self.target_modules]
        if not isinstance(self.target_modules, str) and (
            not isinstance(self.target_modules, list) or not self.target_modules or not all(isinstance(m, str) for m in self.target_modules)
        ):
            raise AdapterFormatError(
                f"target_modules must be a module name, a list of them or 'all-linear', got {self.target_modules!r:.80}"
            )
        unknown = [m for m in self.modules() if m not in LINEAR_MODULES]
        if unknown:
            raise AdapterFormatError(f"unknown LoRA target module(s) {unknown}; choose from {list(LINEAR_MODULES)} or 'all-linear'")
        check_number("lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        if not isinstance(self.use_rslora, bool):
            raise AdapterFormatError(f"use_rslora must be true or false, got {self.use_rslora!r:.80}")
        self.layers = check_layers("LoRA layers (layers_to_transform)", self.layers)

    def modules(self) -> list[str]:
        """Target module names with ``all-linear`` expanded."""
        if self.target_modules == "all-linear":
            return list(LINEAR_MODULES)
        return list(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


_POSITIONS = re.compile(r"^(?:f(\d+))?\+?(?:l(\d+))?$")


def parse_positions(positions: str) -> tuple[int, int] | None:
    """``"all"`` -> None; pyreft-style ``"f3+l3"``, ``"f5"``, ``"l2"`` -> (first, last)."""
    if positions == "all":
        return None
    match = _POSITIONS.match(positions)
    if not positions or not match or (match.group(1) is None and match.group(2) is None):
        raise AdapterFormatError(f"ReFT positions must be 'all' or like 'f3+l3', 'f5', 'l2'; got {positions!r}")
    return int(match.group(1) or 0), int(match.group(2) or 0)


@dataclass
class ReftConfig:
    """A rank-r edit of the residual stream (the output of decoder layer l).

    - ``loreft``: ``h <- h + R^T (W h + b - R h)``, R with orthonormal rows.
    - ``direft``: ``h <- h + W2^T (W1 h + b)``.

    ``layers=None`` means every layer. ``positions`` is ``"all"`` (every token the policy
    adapts) or pyreft's ``"f{k}+l{k}"`` (first/last k prompt tokens; needs policy ``prefill``).
    """

    kind: Literal["loreft", "direft"] = "loreft"
    r: int = 4
    layers: list[int] | None = None
    positions: str = "all"
    dropout: float = 0.0
    policy: Policy = "prefill"

    def __post_init__(self) -> None:
        if self.kind not in REFT_KINDS:
            raise AdapterFormatError(f"ReFT kind must be one of {REFT_KINDS}, got {self.kind!r:.80}")
        check_int("ReFT rank r", self.r, 1)
        check_policy(self.policy)
        self.layers = check_layers("ReFT layers", self.layers)
        if not isinstance(self.positions, str):
            raise AdapterFormatError(f"ReFT positions must be a string like 'all' or 'f3+l3', got {self.positions!r:.80}")
        check_number("dropout", self.dropout, 0.0, 1.0, high_open=True)
        if parse_positions(self.positions) is not None and self.policy != "prefill":
            raise AdapterFormatError(f"ReFT positions {self.positions!r} select prompt tokens, so they need policy 'prefill'")

    def to_dict(self) -> dict:
        return asdict(self)


AdapterConfig = LoraConfig | ReftConfig


def config_from_dict(data: dict) -> AdapterConfig:
    """Inverse of ``to_dict``; unknown keys are an error (a typo must not pass silently)."""
    if not isinstance(data, dict):
        raise AdapterFormatError(f"an adapter config must be a JSON object, got {type(data).__name__}")
    data = dict(data)
    kind = data.pop("kind", None)
    cls = LoraConfig if kind == "lora" else ReftConfig if kind in REFT_KINDS else None
    if cls is None:
        raise AdapterFormatError(f"adapter kind must be 'lora', 'loreft' or 'direft', got {kind!r:.80}")
    if cls is ReftConfig:
        data["kind"] = kind
    allowed = set(cls.__dataclass_fields__)
    unknown = set(data) - allowed
    if unknown:
        raise AdapterFormatError(f"unknown {kind} config field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return cls(**data)

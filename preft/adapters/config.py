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


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise AdapterFormatError(f"policy must be one of {POLICIES}, got {policy!r}")
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
        if self.r < 1:
            raise AdapterFormatError(f"LoRA rank r must be >= 1, got {self.r}")
        check_policy(self.policy)
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                self.target_modules = [self.target_modules]
        unknown = [m for m in self.modules() if m not in LINEAR_MODULES]
        if unknown:
            raise AdapterFormatError(f"unknown LoRA target module(s) {unknown}; choose from {list(LINEAR_MODULES)} or 'all-linear'")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterFormatError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

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
            raise AdapterFormatError(f"ReFT kind must be one of {REFT_KINDS}, got {self.kind!r}")
        if self.r < 1:
            raise AdapterFormatError(f"ReFT rank r must be >= 1, got {self.r}")
        check_policy(self.policy)
        if parse_positions(self.positions) is not None and self.policy != "prefill":
            raise AdapterFormatError(f"ReFT positions {self.positions!r} select prompt tokens, so they need policy 'prefill'")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterFormatError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


AdapterConfig = LoraConfig | ReftConfig


def config_from_dict(data: dict) -> AdapterConfig:
    """Inverse of ``to_dict``; unknown keys are an error (a typo must not pass silently)."""
    data = dict(data)
    kind = data.pop("kind", None)
    cls = LoraConfig if kind == "lora" else ReftConfig if kind in REFT_KINDS else None
    if cls is None:
        raise AdapterFormatError(f"adapter kind must be 'lora', 'loreft' or 'direft', got {kind!r}")
    if cls is ReftConfig:
        data["kind"] = kind
    allowed = set(cls.__dataclass_fields__)
    unknown = set(data) - allowed
    if unknown:
        raise AdapterFormatError(f"unknown {kind} config field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return cls(**data)

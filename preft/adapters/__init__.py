"""Adapter configs, maths and formats, shared by training and serving."""

from preft.adapters.adapter import Adapter, lora_key, reft_key
from preft.adapters.base_model import SUPPORTED_FAMILIES, check_family, check_fingerprint, fingerprint, linear_shapes
from preft.adapters.config import LINEAR_MODULES, POLICIES, LoraConfig, ReftConfig, config_from_dict, parse_positions
from preft.adapters.io import import_pyreft, load_adapter, save_adapter
from preft.adapters.maths import (
    direft_factors,
    loreft_factors,
    low_rank_delta,
    positions_selected,
    reft_position_mask,
)

__all__ = [
    "Adapter",
    "LINEAR_MODULES",
    "POLICIES",
    "SUPPORTED_FAMILIES",
    "LoraConfig",
    "ReftConfig",
    "check_family",
    "check_fingerprint",
    "config_from_dict",
    "direft_factors",
    "fingerprint",
    "import_pyreft",
    "linear_shapes",
    "load_adapter",
    "lora_key",
    "loreft_factors",
    "low_rank_delta",
    "parse_positions",
    "positions_selected",
    "reft_key",
    "reft_position_mask",
    "save_adapter",
]

"""Adapter files: the PEFT layout for LoRA (loads in PEFT), the same layout for ReFT, pyreft import.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. The config has the
PEFT fields plus a ``preft`` section: ``{"kind", "policy", "base_model": fingerprint, ...}``.
A plain PEFT LoRA directory (no ``preft`` section) loads with policy ``all``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from preft import __version__
from preft.adapters.adapter import Adapter, lora_key, reft_key
from preft.adapters.base_model import MODULE_PARENT, fingerprint
from preft.adapters.config import LINEAR_MODULES, LoraConfig, ReftConfig, config_from_dict
from preft.errors import AdapterFormatError, UnknownTargetModuleError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model.model."
PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
# PEFT options whose maths preft does not implement: loading them would silently compute something else.
UNSUPPORTED_PEFT = {
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "modules_to_save": (None, []),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}, []),
    "use_qalora": (False, None),
}
# Target modules PEFT can adapt but preft cannot, by the last part of their name.
UNSUPPORTED_TARGETS = {"embed_tokens": "LoRA on the token embeddings", "lm_head": "LoRA on lm_head"}
# Tensor name markers of PEFT options preft does not implement (a config may omit the option itself).
UNSUPPORTED_TENSORS = {
    "lora_magnitude_vector": "DoRA (use_dora)",
    "lora_embedding_": "LoRA on the token embeddings",
    "lm_head": "LoRA on lm_head",
    "embed_tokens": "LoRA on the token embeddings",
    "modules_to_save": "modules_to_save",
    "trainable_tokens": "trainable_token_indices",
    ".bias": "lora_bias",
}


def save_adapter(adapter: Adapter, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter`` to directory ``path`` atomically (a failure leaves any old copy intact)."""
    path = Path(path)
    adapter.validate()
    preft_section = {"version": __version__, **adapter.config.to_dict(), "base_model": adapter.base_model}
    if isinstance(adapter.config, LoraConfig):
        cfg = adapter.config
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path or adapter.meta.get("base_model_name_or_path"),
            "r": cfg.r,
            "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout,
            "target_modules": sorted(cfg.modules()),
            "use_rslora": cfg.use_rslora,
            "layers_to_transform": cfg.layers,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "preft": preft_section,
        }
        tensors = {}
        for (layer, module), (a, b) in adapter.lora_weights().items():
            stem = f"{PEFT_PREFIX}layers.{layer}.{MODULE_PARENT[module]}.{module}"
            tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = a, b
    else:
        config = {"peft_type": "PREFT_REFT", "preft": preft_section}
        tensors = dict(adapter.tensors)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise AdapterFormatError(f"adapter path {str(path)!r} is not a directory")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterFormatError(f"{str(path)!r} has no {CONFIG_NAME}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{config_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{config_file} must hold a JSON object")
    return config


def _read_weights(path: Path, allow_bin: bool) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_NAME
    if weights.is_file():
        try:
            return load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFormatError(f"{weights} is not a readable safetensors file: {e}") from None
    if allow_bin and (path / PEFT_BIN_NAME).is_file():
        try:
            return torch.load(path / PEFT_BIN_NAME, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle; all mean the same here
            raise AdapterFormatError(f"{path / PEFT_BIN_NAME} could not be read with weights_only=True: {e}") from None
    raise AdapterFormatError(f"{str(path)!r} has no {WEIGHTS_NAME}")


def _target_modules(target: Any, layers: set[int]) -> set[str]:
    """The linear modules PEFT's ``target_modules`` selects (a list of names or name suffixes, a regex, or
    ``all-linear``) in ``layers``; a target that matches none of them is an error, as in PEFT."""
    if target == "all-linear":
        return set(LINEAR_MODULES)
    if isinstance(target, str):  # PEFT: a regex, full-matched against each module's path
        try:
            pattern = re.compile(target)
        except re.error as e:
            raise AdapterFormatError(f"target_modules regex is invalid: {e}") from None
        matched = {
            m
            for m in LINEAR_MODULES
            for i in layers
            if pattern.fullmatch(f"model.layers.{i}.{MODULE_PARENT[m]}.{m}") or pattern.fullmatch(m)
        }
        if not matched:
            raise AdapterFormatError(f"target_modules regex {target!r:.80} matches no linear module of the base model")
        return matched
    if not isinstance(target, list) or not target or not all(isinstance(t, str) for t in target):
        raise AdapterFormatError(f"target_modules must be a list of module names, a regex or 'all-linear', got {target!r:.80}")
    matched = set()
    for name in target:
        module = name.rsplit(".", 1)[-1]
        if module in UNSUPPORTED_TARGETS:
            raise AdapterFormatError(f"target_modules {name!r:.80}: {UNSUPPORTED_TARGETS[module]} is not supported by preft")
        if module not in LINEAR_MODULES:
            raise AdapterFormatError(
                f"target_modules {name!r:.80} matches no module of the base model (preft targets {list(LINEAR_MODULES)}); PEFT refuses it too"
            )
        matched.add(module)
    return matched


def _unsupported_tensor(key: str) -> str | None:
    """The PEFT option a tensor name belongs to, when preft does not support that option."""
    for marker, option in UNSUPPORTED_TENSORS.items():
        if marker in key:
            return option
    return None


def _lora_from_peft(config: dict, state: dict[str, torch.Tensor], policy: str) -> tuple[LoraConfig, dict]:
    if config.get("peft_type") != "LORA":
        raise AdapterFormatError(f"peft_type {config.get('peft_type')!r:.80} is not supported; preft loads LORA adapters")
    for key, allowed in UNSUPPORTED_PEFT.items():
        if key in config and config[key] not in allowed:
            raise AdapterFormatError(f"PEFT option {key}={config[key]!r:.80} is not supported by preft (supported: {allowed[0]!r})")
    if "r" not in config:
        raise AdapterFormatError("the adapter config has no LoRA rank 'r'")
    name_or_path = config.get("base_model_name_or_path")
    if name_or_path is not None and not isinstance(name_or_path, str):
        raise AdapterFormatError(f"base_model_name_or_path must be a string or null, got {type(name_or_path).__name__}")
    tensors = {}
    for key, tensor in state.items():
        option = _unsupported_tensor(key)
        if option is not None:
            raise AdapterFormatError(f"the adapter uses {option}, which preft does not support")
        match = PEFT_KEY.match(key)
        if not match:
            raise AdapterFormatError(f"unexpected tensor {key!r:.120} in PEFT adapter (expected ...layers.N.<module>.lora_A/B.weight)")
        layer, _, module, which = match.groups()
        tensors[lora_key(int(layer), module, which)] = tensor
    weight_modules = {k.split(".")[2] for k in tensors}
    targets = _target_modules(config.get("target_modules", "all-linear"), {int(k.split(".")[1]) for k in tensors})
    if not weight_modules <= targets:
        raise UnknownTargetModuleError(
            f"the weights target {sorted(weight_modules - targets)}, which target_modules {sorted(targets)} does not name"
        )
    layers = config.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    lora = LoraConfig(
        r=config["r"],
        lora_alpha=config.get("lora_alpha", config["r"]),
        target_modules="all-linear" if weight_modules >= set(LINEAR_MODULES) else sorted(weight_modules),
        lora_dropout=config.get("lora_dropout") or 0.0,
        use_rslora=config.get("use_rslora", False),
        layers=layers,
        policy=policy,
    )
    if lora.layers is not None:
        outside = sorted({int(k.split(".")[1]) for k in tensors} - set(lora.layers))
        if outside:
            raise AdapterFormatError(f"the weights edit layers {outside}, which layers_to_transform {lora.layers} does not name")
    return lora, tensors


def load_adapter(path: str | os.PathLike, policy: str | None = None, model_config: Any | None = None) -> Adapter:
    """Load a preft or plain PEFT adapter directory.

    ``policy`` overrides the recorded one (plain PEFT adapters default to ``all``). With
    ``model_config``, the adapter is checked against that base model. Raises ``PreftError``
    subclasses naming the problem.
    """
    path = Path(path)
    config = _read_config(path)
    section = config.get("preft")
    if section is not None and not isinstance(section, dict):
        raise AdapterFormatError(f"{path / CONFIG_NAME}: 'preft' must be an object")
    state = _read_weights(path, allow_bin=section is None)
    if section is None:
        adapter_config, tensors = _lora_from_peft(config, state, policy or "all")
        base = None
    else:
        section = dict(section)
        section.pop("version", None)
        base = section.pop("base_model", None)
        if policy is not None:
            section["policy"] = policy
        adapter_config = config_from_dict(section)
        if isinstance(adapter_config, LoraConfig):
            _, tensors = _lora_from_peft({**config, "r": adapter_config.r}, state, adapter_config.policy)
        else:
            tensors = dict(state)
    adapter = Adapter(
        adapter_config, tensors, base, meta={"path": str(path), "base_model_name_or_path": config.get("base_model_name_or_path")}
    )
    adapter.validate(model_config)
    return adapter


PYREFT_KEY = re.compile(r"layer[._](\d+)")


def import_pyreft(path: str | os.PathLike, model_config: Any, policy: str = "prefill", positions: str = "all") -> Adapter:
    """Read a pyreft-saved directory (``intkey_*.bin`` per layer) into a preft ReFT adapter.

    The files are read with ``torch.load(weights_only=True)``: nothing is unpickled beyond tensors.
    LoReFT files hold ``rotate_layer`` ``[d, r]`` plus ``weight``/``bias``; DiReFT files hold
    ``proj_layer.weight`` plus ``learned_source.weight``/``learned_source.bias``.
    """
    path = Path(path)
    files = sorted(path.glob("intkey_*.bin"))
    if not files:
        raise AdapterFormatError(f"{str(path)!r} holds no pyreft intervention files (intkey_*.bin)")
    tensors, kinds, ranks = {}, set(), set()
    for file in files:
        match = PYREFT_KEY.search(file.name)
        if not match:
            raise AdapterFormatError(f"cannot tell the layer of pyreft file {file.name!r} (expected 'layer_N' in its name)")
        layer = int(match.group(1))
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure of the restricted unpickler means a file we must refuse
            raise AdapterFormatError(f"{file} could not be read with weights_only=True: {e}") from None
        if "rotate_layer" in state:
            kinds.add("loreft")
            tensors[reft_key(layer, "rotate")] = state["rotate_layer"].t().contiguous()
            tensors[reft_key(layer, "source.weight")] = state["weight"]
            tensors[reft_key(layer, "source.bias")] = state["bias"]
        elif "proj_layer.weight" in state:
            kinds.add("direft")
            tensors[reft_key(layer, "proj")] = state["proj_layer.weight"]
            tensors[reft_key(layer, "source.weight")] = state["learned_source.weight"]
            tensors[reft_key(layer, "source.bias")] = state["learned_source.bias"]
        else:
            raise AdapterFormatError(f"{file.name}: keys {sorted(state)} are neither LoReFT nor DiReFT")
        ranks.add(tensors[reft_key(layer, "source.weight")].shape[0])
    if len(kinds) != 1 or len(ranks) != 1:
        raise AdapterFormatError(f"pyreft directory mixes intervention kinds {sorted(kinds)} or ranks {sorted(ranks)}")
    config = ReftConfig(
        kind=kinds.pop(), r=ranks.pop(), layers=sorted({int(k.split(".")[1]) for k in tensors}), positions=positions, policy=policy
    )
    adapter = Adapter(config, {k: v.float() for k, v in tensors.items()}, fingerprint(model_config), meta={"path": str(path)})
    adapter.validate(model_config)
    return adapter

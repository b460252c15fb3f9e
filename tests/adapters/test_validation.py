"""Adapter configs and weights are validated at load, against their weights and the base model:
a bad adapter is a ``PreftError`` naming the problem, never an error discovered mid-batch."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from preft.adapters import LoraConfig, ReftConfig, load_adapter, save_adapter
from preft.errors import AdapterShapeError, NonFiniteWeightsError, PreftError
from preft.hf import PreftModel
from preft.tiny import random_adapter


@pytest.fixture
def model_config(tiny_hf_model):
    return tiny_hf_model("llama").config


@pytest.fixture
def lora_dir(model_config, tmp_path):
    return save_adapter(random_adapter(model_config, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])), tmp_path / "lora")


@pytest.fixture
def peft_dir(lora_dir):
    """The same adapter as a plain PEFT directory (no ``preft`` section)."""
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    del config["preft"]
    (lora_dir / "adapter_config.json").write_text(json.dumps(config))
    return lora_dir


def edit_config(path, section: str | None, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    (config[section] if section else config).update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("section", "changes", "message"),
    [
        ("preft", {"lora_alpha": "x"}, "lora_alpha must be a number"),
        ("preft", {"r": "eight"}, "rank r must be an integer"),
        ("preft", {"target_modules": 5}, "target_modules must be"),
        ("preft", {"layers": "abc"}, "layers_to_transform"),
        ("preft", {"use_rslora": "yes"}, "use_rslora must be true or false"),
        ("preft", {"policy": ["all"]}, "policy must be one of"),
        (None, {"r": "eight"}, "rank r must be an integer"),
        (None, {"target_modules": ["no_such_proj"]}, "'no_such_proj' matches no module"),
        (None, {"target_modules": ["embed_tokens", "q_proj", "v_proj"]}, "LoRA on the token embeddings is not supported"),
        (None, {"target_modules": ["q_proj"]}, r"the weights target \['v_proj'\]"),
        (None, {"target_modules": ".*k_proj"}, r"the weights target \['q_proj', 'v_proj'\]"),
        (None, {"target_modules": ".*nothing"}, "matches no linear module"),
        (None, {"layers_to_transform": "abc"}, "layers_to_transform"),
        (None, {"layers_to_transform": [99]}, "the weights edit layers"),
        (None, {"base_model_name_or_path": [1]}, "base_model_name_or_path must be a string"),
        (None, {"lora_alpha": None}, "lora_alpha must be a number"),
    ],
)
def test_bad_config_fields_are_refused_naming_the_field(peft_dir, model_config, section, changes, message):
    if section == "preft":  # restore the preft section the fixture dropped
        config = json.loads((peft_dir / "adapter_config.json").read_text())
        config["preft"] = {"kind": "lora", "r": 4, "lora_alpha": 16.0, "target_modules": ["q_proj", "v_proj"], "policy": "prefill"}
        (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    edit_config(peft_dir, section, **changes)
    with pytest.raises(PreftError, match=message):
        load_adapter(peft_dir, model_config=model_config)


def test_peft_regex_and_suffix_targets_that_match_the_weights_load(peft_dir, model_config):
    edit_config(peft_dir, None, target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj")
    assert sorted(load_adapter(peft_dir, model_config=model_config).config.modules()) == ["q_proj", "v_proj"]
    edit_config(peft_dir, None, target_modules=["self_attn.q_proj", "v_proj"])
    assert sorted(load_adapter(peft_dir, model_config=model_config).config.modules()) == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("marker", "option"),
    [("lora_magnitude_vector", "DoRA"), ("lora_B.bias", "lora_bias"), ("lm_head.lora_A.weight", "LoRA on lm_head")],
)
def test_unsupported_peft_options_are_named_by_option_not_tensor(peft_dir, model_config, marker, option):
    weights = peft_dir / "adapter_model.safetensors"
    state = load_file(str(weights))
    state[f"base_model.model.model.layers.0.self_attn.q_proj.{marker}"] = next(iter(state.values())).clone()
    save_file(state, str(weights))
    with pytest.raises(PreftError, match=f"uses {option}") as info:
        load_adapter(peft_dir, model_config=model_config)
    assert "base_model.model" not in str(info.value)


def test_finite_but_huge_weights_are_refused_at_load(lora_dir, model_config):
    weights = lora_dir / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = next(iter(state))
    state[key][0, 0] = 3e37
    save_file(state, str(weights))
    with pytest.raises(NonFiniteWeightsError, match="magnitude 3e"):
        load_adapter(lora_dir, model_config=model_config)


def test_reft_rank_above_hidden_size_and_layers_outside_the_model_are_refused(model_config, tmp_path):
    hidden = model_config.hidden_size
    wide = random_adapter(model_config, ReftConfig(kind="direft", r=hidden + 1, layers=[0]))
    with pytest.raises(AdapterShapeError, match=f"exceeds the base model's hidden size {hidden}"):
        wide.validate(model_config)
    far = random_adapter(model_config, ReftConfig(kind="direft", r=2, layers=[0]))
    far.config.layers = [99]
    with pytest.raises(AdapterShapeError, match=r"layers \[99\] are out of range"):
        far.validate(model_config)


@pytest.mark.parametrize("config", [ReftConfig(kind="loreft", r=2, layers=[5]), LoraConfig(r=2, layers=[5])])
def test_python_api_add_adapter_checks_layers_against_the_model(tiny_hf_model, config):
    model = PreftModel(tiny_hf_model("llama"))
    with pytest.raises(AdapterShapeError, match=r"layers \[5\] are out of range: the base model has 2 layers"):
        model.add_adapter("far", config)
    assert "far" not in model.configs

"""Adapter files: round trips, PEFT interop both ways, pyreft import, and every bad input."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from preft.adapters import LoraConfig, ReftConfig, import_pyreft, load_adapter, save_adapter
from preft.errors import (
    AdapterFormatError,
    AdapterShapeError,
    BaseModelMismatchError,
    NonFiniteWeightsError,
    UnknownTargetModuleError,
    UnsupportedModelError,
)
from preft.hf import PreftModel
from preft.tiny import random_adapter

IDS = torch.tensor([[5, 17, 42, 99, 130, 7], [200, 31, 8, 9, 10, 11]])


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, target_modules="all-linear", use_rslora=True),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layers=[1], policy="all"),
        ReftConfig(kind="loreft", r=3, positions="f2+l2"),
        ReftConfig(kind="direft", r=2, layers=[0]),
    ],
)
def test_save_load_round_trip_is_exact(tiny_hf_model, tmp_path, config):
    model_config = tiny_hf_model("llama").config
    adapter = random_adapter(model_config, config, seed=7)
    save_adapter(adapter, tmp_path / "a")
    loaded = load_adapter(tmp_path / "a", model_config=model_config)
    assert loaded.config == adapter.config
    assert loaded.base_model == adapter.base_model
    assert loaded.tensors.keys() == adapter.tensors.keys()
    for key, tensor in adapter.tensors.items():
        assert torch.equal(loaded.tensors[key], tensor), key
    assert loaded.content_hash() == adapter.content_hash()


@pytest.mark.parametrize("kind", ["lora", "loreft", "direft"])
def test_model_save_load_round_trip_gives_same_logits(tiny_hf_model, tmp_path, kind):
    config = LoraConfig(r=4, target_modules="all-linear") if kind == "lora" else ReftConfig(kind=kind, r=4)
    first = PreftModel(tiny_hf_model("qwen2"))
    first.add_adapter("a", random_adapter(first.config, config, seed=1))
    first.save_adapter("a", str(tmp_path / "a"))
    second = PreftModel(tiny_hf_model("qwen2"))
    second.load_adapter(str(tmp_path / "a"), "a")
    with torch.no_grad():
        torch.testing.assert_close(first(IDS, adapter_names="a").logits, second(IDS, adapter_names="a").logits, atol=1e-6, rtol=0)
    for key, tensor in first.get_adapter("a").tensors.items():
        torch.testing.assert_close(second.get_adapter("a").tensors[key], tensor, atol=1e-6, rtol=0)


def _peft_model(hf_model, seed=0):
    peft_config = PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    model = get_peft_model(hf_model, peft_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_all_policy_lora_matches_peft_logits(tiny_hf_model, tmp_path, family):
    peft_model = _peft_model(tiny_hf_model(family))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = PreftModel(tiny_hf_model(family))
    adapter = ours.load_adapter(str(tmp_path / "peft"), "user")
    assert adapter.policy == "all"  # plain PEFT adapters are all-token
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits
        got = ours(IDS, adapter_names="user").logits
        base = ours(IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-2  # the comparison is not vacuous


def test_peft_adapter_policy_can_be_overridden(tiny_hf_model, tmp_path):
    _peft_model(tiny_hf_model("llama")).save_pretrained(tmp_path / "peft")
    assert load_adapter(tmp_path / "peft", policy="prefill").policy == "prefill"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_preft_lora_loads_in_peft_with_same_logits(tiny_hf_model, tmp_path, family):
    ours = PreftModel(tiny_hf_model(family))
    ours.add_adapter("a", random_adapter(ours.config, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", policy="all"), seed=2))
    ours.save_adapter("a", str(tmp_path / "a"))
    peft_model = PeftModel.from_pretrained(tiny_hf_model(family), str(tmp_path / "a")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits, ours(IDS, adapter_names="a").logits, atol=1e-5, rtol=0)
    recorded = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["preft"]
    assert recorded["policy"] == "all" and recorded["kind"] == "lora"
    assert recorded["base_model"]["model_type"] == family


def _pyreft_dir(tmp_path, adapter, kind):
    """Write ``adapter`` the way pyreft saves interventions (one torch file per layer)."""
    folder = tmp_path / "pyreft"
    folder.mkdir()
    for layer in adapter.layers():
        t = lambda n, layer=layer: adapter.tensors[f"layers.{layer}.{n}"]  # noqa: E731
        if kind == "loreft":
            state = {"weight": t("source.weight"), "bias": t("source.bias"), "rotate_layer": t("rotate").t().contiguous()}
        else:
            state = {"proj_layer.weight": t("proj"), "learned_source.weight": t("source.weight"), "learned_source.bias": t("source.bias")}
        torch.save(state, folder / f"intkey_layer_{layer}_comp_block_output_unit_pos_nunit_1#0.bin")
    return folder


@pytest.mark.parametrize("kind", ["loreft", "direft"])
def test_pyreft_import_reads_the_same_weights(tiny_hf_model, tmp_path, kind):
    model_config = tiny_hf_model("llama").config
    adapter = random_adapter(model_config, ReftConfig(kind=kind, r=3), seed=3)
    imported = import_pyreft(_pyreft_dir(tmp_path, adapter, kind), model_config, positions="f1+l1")
    assert imported.kind == kind and imported.rank == 3 and imported.config.positions == "f1+l1"
    for key, tensor in adapter.tensors.items():
        assert torch.equal(imported.tensors[key], tensor), key


def test_pyreft_import_refuses_pickled_objects(tiny_hf_model, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"rotate_layer": torch.zeros(64, 2), "payload": object.__new__(PreftModel)}, folder / "intkey_layer_0_x.bin")
    with pytest.raises(AdapterFormatError, match="weights_only=True"):
        import_pyreft(folder, tiny_hf_model("llama").config)


# ---- bad input: each raises the named error -----------------------------------------------


@pytest.fixture
def saved_lora(tiny_hf_model, tmp_path):
    model_config = tiny_hf_model("llama").config
    path = save_adapter(random_adapter(model_config, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])), tmp_path / "lora")
    return path, model_config


def test_mismatched_base_model_is_refused(saved_lora, tiny_hf_model):
    path, _ = saved_lora
    other = tiny_hf_model("qwen3").config  # different head_dim and model_type
    with pytest.raises(BaseModelMismatchError, match="model_type: adapter has 'llama', model has 'qwen3'"):
        load_adapter(path, model_config=other)
    with pytest.raises(BaseModelMismatchError):
        PreftModel(tiny_hf_model("qwen3")).load_adapter(str(path), "a")


def test_unknown_target_module_is_refused(saved_lora):
    path, model_config = saved_lora
    state = load_file(str(path / "adapter_model.safetensors"))
    key = next(k for k in state if "q_proj.lora_A" in k)
    state[key.replace("q_proj", "k_proj")] = state[key].clone()
    state[key.replace("q_proj", "k_proj").replace("lora_A", "lora_B")] = state[key.replace("lora_A", "lora_B")].clone()
    save_file(state, str(path / "adapter_model.safetensors"))
    with pytest.raises(UnknownTargetModuleError, match="k_proj"):
        load_adapter(path, model_config=model_config)
    with pytest.raises(Exception, match="unknown LoRA target module"):
        LoraConfig(target_modules=["qkv"])


def test_wrong_shapes_are_refused(saved_lora):
    path, model_config = saved_lora
    state = load_file(str(path / "adapter_model.safetensors"))
    key = next(k for k in state if "q_proj.lora_B" in k)
    state[key] = torch.zeros(state[key].shape[0] + 1, 4)
    save_file(state, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterShapeError, match="q_proj"):
        load_adapter(path, model_config=model_config)


def test_nan_weights_are_refused(saved_lora):
    path, model_config = saved_lora
    state = load_file(str(path / "adapter_model.safetensors"))
    key = next(iter(state))
    state[key][0, 0] = float("nan")
    save_file(state, str(path / "adapter_model.safetensors"))
    with pytest.raises(NonFiniteWeightsError, match="NaN or inf"):
        load_adapter(path, model_config=model_config)


@pytest.mark.parametrize("broken", ["no_weights", "no_config", "bad_json", "not_safetensors", "missing_B", "dora"])
def test_broken_directories_are_refused(saved_lora, broken):
    path, model_config = saved_lora
    config_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if broken == "no_weights":
        weights.unlink()
    elif broken == "no_config":
        config_file.unlink()
    elif broken == "bad_json":
        config_file.write_text("{not json")
    elif broken == "not_safetensors":
        weights.write_bytes(b"garbage")
    elif broken == "missing_B":
        state = load_file(str(weights))
        save_file({k: v for k, v in state.items() if "lora_B" not in k}, str(weights))
    elif broken == "dora":
        config = json.loads(config_file.read_text())
        del config["preft"]
        config["use_dora"] = True
        config_file.write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError):
        load_adapter(path, model_config=model_config)
    with pytest.raises(AdapterFormatError, match="not a directory"):
        load_adapter(path / "nowhere")


def test_failed_save_leaves_previous_copy_intact(saved_lora):
    path, model_config = saved_lora
    before = (path / "adapter_model.safetensors").read_bytes()
    bad = load_adapter(path)
    bad.tensors[next(iter(bad.tensors))] = torch.full((4, 64), float("inf"))
    with pytest.raises(NonFiniteWeightsError):
        save_adapter(bad, path)
    assert (path / "adapter_model.safetensors").read_bytes() == before
    load_adapter(path, model_config=model_config)


def test_unsupported_family_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        PreftModel(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))

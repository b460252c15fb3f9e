"""Training-side properties: only adapter parameters learn, LoReFT stays orthonormal, checkpointing and bf16 work."""

from __future__ import annotations

import pytest
import torch

from preft.adapters import LoraConfig, ReftConfig
from preft.errors import PreftError
from preft.hf import PreftModel

IDS = torch.tensor([[5, 17, 42, 99, 130, 7, 8, 9], [200, 31, 8, 9, 10, 11, 12, 13]])
MASK = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.float)


def loss_of(model, adapter="a"):
    logits = model(IDS, adapter_mask=MASK, adapter_names=adapter).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))


@pytest.mark.parametrize(
    "config", [LoraConfig(r=4, target_modules="all-linear"), ReftConfig(kind="loreft", r=4), ReftConfig(kind="direft", r=4)]
)
def test_gradients_reach_only_adapter_parameters(tiny_hf_model, config):
    model = PreftModel(tiny_hf_model("qwen2"))
    model.add_adapter("a", config)
    loss_of(model).backward()
    adapter_params = {id(p) for p in model.adapter_parameters("a")}
    for name, p in model.named_parameters():
        if id(p) in adapter_params:
            assert p.requires_grad, name
        else:
            assert not p.requires_grad and p.grad is None, name
    grads = [p.grad for p in model.adapter_parameters("a")]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_fresh_lora_is_the_identity_and_learns(tiny_hf_model):
    model = PreftModel(tiny_hf_model("llama"))
    with torch.no_grad():
        base = model(IDS).logits
    model.add_adapter("a", LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS, adapter_names="a").logits, base, atol=0, rtol=0)  # B = 0 at init
    opt = torch.optim.AdamW(model.adapter_parameters("a"), lr=1e-2)
    first = loss_of(model).item()
    for _ in range(10):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
    assert loss_of(model).item() < first


def test_loreft_rotation_stays_orthonormal_under_optimiser_steps(tiny_hf_model):
    model = PreftModel(tiny_hf_model("llama"))
    model.add_adapter("a", ReftConfig(kind="loreft", r=4))
    # AdamW's weight decay shrinks the raw parameter every step: R must stay orthonormal regardless.
    opt = torch.optim.AdamW(model.adapter_parameters("a"), lr=5e-2, weight_decay=0.1)
    first = loss_of(model).item()
    for _ in range(10):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
    for layer, edit in model.reft["a"].items():
        rotate = edit.rotate()
        torch.testing.assert_close(rotate @ rotate.t(), torch.eye(4), atol=1e-5, rtol=0, msg=f"layer {layer}")
    assert loss_of(model).item() < first  # and it trained
    saved = model.get_adapter("a")
    rotate = saved.tensors["layers.0.rotate"]
    torch.testing.assert_close(rotate @ rotate.t(), torch.eye(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["lora", "loreft"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_hf_model, kind):
    config = LoraConfig(r=4, target_modules="all-linear") if kind == "lora" else ReftConfig(kind="loreft", r=4)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = PreftModel(tiny_hf_model("llama"))
        model.add_adapter("a", config)
        with torch.no_grad():
            for p in model.adapter_parameters("a"):
                p.add_(0.05)  # make B non-zero so every parameter gets gradient
        if checkpointing:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        loss_of(model).backward()
        grads.append([p.grad.clone() for p in model.adapter_parameters("a")])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, atol=1e-6, rtol=1e-5)


def test_bf16_base_model_trains_with_float32_adapter(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    model = PreftModel(AutoModelForCausalLM.from_pretrained(tiny_checkpoint("qwen3"), dtype=torch.bfloat16))
    model.add_adapter("a", LoraConfig(r=4, target_modules="all-linear"))
    model.add_adapter("d", ReftConfig(kind="direft", r=4))
    for name in ("a", "d"):
        loss = loss_of(model, name)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert all(p.dtype == torch.float32 and p.grad is not None for p in model.adapter_parameters(name))


def test_bad_adapter_arguments_are_named(tiny_hf_model):
    model = PreftModel(tiny_hf_model("llama"))
    model.add_adapter("a", LoraConfig(r=2))
    with pytest.raises(PreftError, match="unknown adapter 'b'"):
        model(IDS, adapter_names="b")
    with pytest.raises(PreftError, match="2 rows"):
        model(IDS, adapter_names=["a"])
    with pytest.raises(PreftError, match="adapter_mask has shape"):
        model(IDS, adapter_mask=torch.ones(2, 3), adapter_names="a")
    with pytest.raises(PreftError, match="already exists"):
        model.add_adapter("a", LoraConfig(r=2))
    with pytest.raises(PreftError, match="letters, digits"):
        model.add_adapter("a.b", LoraConfig(r=2))
    with pytest.raises(PreftError, match="out of range"):
        model.add_adapter("far", LoraConfig(r=2, layers=[7]))
    with pytest.raises(PreftError, match="need policy 'prefill'"):
        ReftConfig(positions="f2+l2", policy="all")


@pytest.mark.parametrize("config", [LoraConfig(r=2, target_modules="all-linear"), ReftConfig(kind="direft", r=2)])
def test_remove_adapter_restores_the_base_model_and_frees_the_name(tiny_hf_model, config):
    from preft.tiny import random_adapter

    model = PreftModel(tiny_hf_model("llama"))
    with torch.no_grad():
        base = model(IDS).logits
        model.add_adapter("a", random_adapter(model.config, config, seed=1))
        assert (model(IDS, adapter_names="a").logits - base).abs().max() > 1e-3
        model.remove_adapter("a")
        assert model.adapter_names == [] and model.adapter_parameters() == []
        with pytest.raises(PreftError, match="unknown adapter 'a'"):
            model(IDS, adapter_names="a")
        torch.testing.assert_close(model(IDS).logits, base, atol=0, rtol=0)
    model.add_adapter("a", config)  # the name is free again

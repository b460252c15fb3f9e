"""Fused projections (one qkv_proj, one gate_up_proj per layer) compute what transformers and PEFT compute,
and the loader builds them straight in the target dtype, without copies where the file already has them."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from test_model import one_sequence_forward
from transformers import AutoModelForCausalLM

from preft.adapters import LoraConfig, save_adapter
from preft.engine import model as engine_model
from preft.engine.adapter_manager import AdapterManager
from preft.engine.model import load_model
from preft.tiny import build_tiny_checkpoint, random_adapter

ATOL = 1e-4  # float32 logits on CPU; measured ~2e-6 without and ~5e-6 with the LoRA
IDS = [5, 17, 42, 99, 130, 7, 64, 33, 21, 250, 3]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], policy="all")


def lora_batch(model, adapter, num_tokens: int):
    """An ``AdapterBatch`` applying ``adapter`` to every one of ``num_tokens`` tokens."""
    manager = AdapterManager(model.config, torch.device("cpu"), torch.float32, max_adapter_slots=2)
    manager.add("a", adapter)
    slot = manager.acquire("a")
    return manager.batch(torch.full((num_tokens,), slot), {slot}, None, set())


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # qwen3: q/k norms applied to views of the fused output
def test_fused_model_logits_equal_transformers(tiny_checkpoint, family):
    path = tiny_checkpoint(family)
    model = load_model(path, torch.float32, "cpu")
    layer = model.model.layers[0]
    assert hasattr(layer.self_attn, "qkv_proj") and not hasattr(layer.self_attn, "q_proj")
    assert hasattr(layer.mlp, "gate_up_proj") and not hasattr(layer.mlp, "up_proj")
    ours = one_sequence_forward(model, IDS)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(torch.tensor([IDS])).logits[0]
    assert (ours - theirs).abs().max().item() < ATOL


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fused_model_with_lora_equals_peft(tiny_checkpoint, tmp_path, family):
    """A LoRA on q_proj, v_proj, gate_proj and down_proj lands in the right columns of the fused outputs."""
    path = tiny_checkpoint(family)
    model = load_model(path, torch.float32, "cpu")
    adapter = random_adapter(model.config, LORA, seed=3, std=0.3)
    ours = one_sequence_forward(model, IDS, adapters=lora_batch(model, adapter, len(IDS)))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    base = hf(torch.tensor([IDS])).logits[0]
    peft_model = PeftModel.from_pretrained(hf, str(save_adapter(adapter, tmp_path / "lora"))).eval()
    with torch.inference_mode():
        theirs = peft_model(input_ids=torch.tensor([IDS])).logits[0]
    assert (theirs - base).abs().max().item() > 0.1  # the adapter matters
    assert (ours - theirs).abs().max().item() < ATOL


def test_k_and_up_lora_land_in_their_own_columns(tiny_checkpoint, tmp_path):
    """k_proj and up_proj (the middle and last slices) too: each delta only moves its module's columns."""
    path = tiny_checkpoint("llama")
    model = load_model(path, torch.float32, "cpu")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"], policy="all")
    adapter = random_adapter(model.config, config, seed=5, std=0.3)
    ours = one_sequence_forward(model, IDS, adapters=lora_batch(model, adapter, len(IDS)))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(hf, str(save_adapter(adapter, tmp_path / "lora"))).eval()
    with torch.inference_mode():
        theirs = peft_model(input_ids=torch.tensor([IDS])).logits[0]
    assert (ours - theirs).abs().max().item() < ATOL


def test_gate_up_is_a_view_of_the_file_when_stored_back_to_back(tiny_checkpoint):
    """On CPU in the file's dtype, gate_proj and up_proj (stored after down_proj, alphabetically) need no copy."""
    model = load_model(tiny_checkpoint("llama"), torch.float32, "cpu")
    mlp = model.model.layers[0].mlp
    down = mlp.down_proj.weight
    assert mlp.gate_up_proj.weight.data_ptr() == down.data_ptr() + down.numel() * down.element_size()  # the next bytes of the file


def test_bfloat16_load_casts_in_chunks_and_equals_casting_afterwards(tiny_checkpoint, monkeypatch):
    path = tiny_checkpoint("qwen3")
    monkeypatch.setattr(engine_model, "COPY_CHUNK_BYTES", 1000)  # many chunks per weight
    chunked = load_model(path, torch.bfloat16, "cpu")
    whole = load_model(path, torch.float32, "cpu")
    for (name, a), (_, b) in zip(chunked.named_parameters(), whole.named_parameters()):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a, b.to(torch.bfloat16)), name


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "bf16-file", "llama", dtype=torch.bfloat16)
    model = load_model(path, torch.float32, "cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert torch.equal(
        model.model.layers[1].mlp.gate_up_proj.weight[: hf.config.intermediate_size], hf.model.layers[1].mlp.gate_proj.weight
    )

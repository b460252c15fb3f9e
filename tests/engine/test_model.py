"""The engine's own Llama-family model loads Hugging Face checkpoints and matches transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from preft.engine import LLM, SamplingParams
from preft.engine.attention import build_metadata
from preft.engine.model import load_model
from preft.errors import PreftError, UnsupportedModelError
from preft.tiny import build_tiny_checkpoint

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ATOL = 1e-4  # float32 logits; measured ~2e-6


def one_sequence_forward(model, ids: list[int], window: int | None = None, adapters=None) -> torch.Tensor:
    """Logits of a single-sequence prefill through a fresh paged cache (block size 4)."""
    n, block_size = len(ids), 4
    blocks = -(-n // block_size)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = torch.zeros(2, cfg.num_hidden_layers, blocks, block_size, cfg.num_key_value_heads, head_dim)
    table = list(range(blocks))[::-1]  # non-contiguous block order
    slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)])
    meta = build_metadata(slots, [n], [n], [table], window)
    with torch.inference_mode():
        return model.logits(model(torch.tensor(ids), torch.arange(n), kv, meta, adapters))


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_equal_transformers(tiny_checkpoint, family):
    path = tiny_checkpoint(family)
    ids = [5, 17, 42, 99, 130, 7, 64, 33, 21, 250, 3]
    ours = one_sequence_forward(load_model(path, torch.float32, "cpu"), ids)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(torch.tensor([ids])).logits[0]
    assert (ours - theirs).abs().max().item() < ATOL


def test_sharded_checkpoint_loads_like_a_single_file(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen2")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((src / f).read_bytes())
    state = load_file(src / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / file)
        weight_map.update({k: file for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids = [5, 6, 7, 8, 9]
    single = one_sequence_forward(load_model(src, torch.float32, "cpu"), ids)
    sharded = one_sequence_forward(load_model(tmp_path, torch.float32, "cpu"), ids)
    assert torch.equal(single, sharded)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        LLM(tmp_path, device="cpu")


def test_missing_weights_are_named(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama")
    (tmp_path / "config.json").write_bytes((src / "config.json").read_bytes())
    state = load_file(src / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(PreftError, match="model.norm.weight"):
        load_model(tmp_path, torch.float32, "cpu")


def test_bfloat16_engine_runs_and_mostly_agrees_with_float32(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "bf16", "llama")
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    bf16 = LLM(path, dtype="bfloat16", device="cpu", num_kv_blocks=32).generate([[5, 6, 7, 8]], params, use_tqdm=False)[0]
    fp32 = LLM(path, dtype="float32", device="cpu", num_kv_blocks=32).generate([[5, 6, 7, 8]], params, use_tqdm=False)[0]
    assert bf16.outputs[0].token_ids[0] == fp32.outputs[0].token_ids[0]  # first token: robust to bf16 rounding here


def test_mistral_sliding_window_equals_transformers(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "swa", "mistral", sliding_window=4)
    ids = [5, 17, 42, 99, 130, 7, 64, 33, 21, 250, 3]
    ours = one_sequence_forward(load_model(path, torch.float32, "cpu"), ids, window=4)
    full = one_sequence_forward(load_model(path, torch.float32, "cpu"), ids)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(torch.tensor([ids])).logits[0]
    assert (ours - theirs).abs().max().item() < ATOL
    assert (full - theirs).abs().max().item() > 1e-3  # the window matters for this prompt
    out = LLM(path, device="cpu", num_kv_blocks=32, block_size=4).generate(
        [ids], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False
    )
    assert out[0].outputs[0].token_ids[0] == int(theirs[-1].argmax())

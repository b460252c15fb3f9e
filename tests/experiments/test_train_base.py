"""experiments/train_base.py at tiny size: it writes a servable Llama directory, its log and its loss plot."""

from __future__ import annotations

import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from experiments import train_base
from preft.hf import PreftModel, generate


def test_train_base_smoke_writes_a_loadable_chat_model(tmp_path):
    out, logs = tmp_path / "base", tmp_path / "logs"
    argv = ["--out", str(out), "--log-dir", str(logs), "--steps", "4", "--batch-size", "4", "--hidden", "32", "--intermediate", "64"]
    argv += ["--layers", "1", "--heads", "2", "--kv-heads", "1", "--warmup", "1", "--eval-every", "2", "--eval-per-skill", "1"]
    assert train_base.main(argv) == 0
    log = json.loads((logs / "train_log.json").read_text())
    assert log["steps_done"] == 4 and len(log["train_loss"]) == 4 and all(math.isfinite(v) for _, v in log["train_loss"])
    assert set(log["skill_accuracy"]) == set(train_base.synthetic.SKILLS)
    assert (logs / "loss.png").stat().st_size > 1000
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.model_type == "llama" and model.config.eos_token_id == tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(generate(PreftModel(model), [ids], max_new_tokens=3).token_ids[0]) >= 1


def test_collate_puts_the_loss_on_completion_tokens_only():
    ids, attn, labels = train_base.collate([([7, 8, 9], [10, 11]), ([7], [12])], pad_id=0, max_len=16)
    assert ids.tolist() == [[7, 8, 9, 10, 11], [7, 12, 0, 0, 0]]
    assert labels.tolist() == [[-100, -100, -100, 10, 11], [-100, 12, -100, -100, -100]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]

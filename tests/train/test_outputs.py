"""TRL's output layout: the final adapter in output_dir itself, every checkpoint-N/ loadable by PEFT as it is."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from preft.adapters import load_adapter
from preft.cli import main
from preft.hf import PreftModel

from .conftest import write_jsonl


def train(tmp_path, tiny_llama, toy_sft, *extra: str):
    out = tmp_path / "run"
    argv = ["train", "sft", "--model_name_or_path", str(tiny_llama), "--dataset", str(toy_sft), "--output_dir", str(out)]
    argv += [
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--learning_rate",
        "5e-2",
        "--per_device_train_batch_size",
        "2",
        "--disable_tqdm",
        *extra,
    ]
    assert main(argv) == 0
    return out


def test_peft_loads_the_final_adapter_from_output_dir_and_every_checkpoint(tmp_path, tiny_llama, toy_sft):
    out = train(tmp_path, tiny_llama, toy_sft, "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "down_proj")
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "checkpoint-2", "checkpoint-4"}
    ids = torch.tensor([[5, 17, 42, 9, 33]])
    logits = {}
    for where in (out, out / "checkpoint-2", out / "checkpoint-4"):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, str(where)).eval()
        with torch.no_grad():
            logits[where.name] = peft_model(ids).logits
        # PEFT applies the adapter to every token; preft's prefill policy applies it to every prompt token,
        # so on a prompt-only forward the two compute the same logits.
        preft_model = PreftModel(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)).eval()
        preft_model.load_adapter(str(where), "a")
        with torch.no_grad():
            want = preft_model(ids, adapter_mask=torch.ones(ids.shape), adapter_names="a").logits
        assert torch.allclose(logits[where.name], want, atol=1e-5), where
    assert torch.equal(logits["run"], logits["checkpoint-4"]) and not torch.allclose(logits["checkpoint-2"], logits["run"])
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()  # the model card says how to load it
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [r["step"] for r in state["log_history"]] == [1, 2]


def test_resume_reads_the_new_checkpoint_layout(tmp_path, tiny_llama, toy_sft):
    out = train(tmp_path, tiny_llama, toy_sft)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    argv = ["train", "sft", "--model", str(tiny_llama), "--dataset", str(toy_sft), "--output_dir", str(out), "--max_steps", "6"]
    argv += ["--save_steps", "2", "--learning_rate", "5e-2", "--per_device_train_batch_size", "2", "--disable_tqdm"]
    assert main([*argv, "--resume_from_checkpoint", str(out / "checkpoint-4")]) == 0
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6] and resumed[:4] == rows
    assert resumed[4]["num_tokens"] > rows[3]["num_tokens"]  # num_tokens is carried over from the checkpoint, not restarted


def test_reft_adapters_load_with_preft_not_peft(tmp_path, tiny_llama, toy_sft):
    out = train(tmp_path, tiny_llama, toy_sft, "--adapter", "direft", "--r", "2")
    for where in (out, out / "checkpoint-2"):
        assert load_adapter(where).kind == "direft"  # preft's loader reads the same layout
    with pytest.raises(Exception):  # noqa: B017  PEFT has no ReFT method: it refuses the folder (KeyError 'PREFT_REFT')
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(out))
    card = (out / "README.md").read_text()
    assert "load_adapter(OUTPUT_DIR)" in card and "PEFT has no ReFT method" in card


def test_dataset_name_folder_trains_on_its_train_split_and_evaluates_on_test(tmp_path, tiny_llama):
    folder = tmp_path / "data"
    folder.mkdir()
    chat = lambda q, a: {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}  # noqa: E731
    write_jsonl(folder / "train.jsonl", [chat("cat", "dog"), chat("sun", "moon")])
    write_jsonl(folder / "test.jsonl", [chat("red", "blue")])
    out = tmp_path / "run"
    argv = ["train", "sft", "--model_name_or_path", str(tiny_llama), "--dataset_name", str(folder), "--output_dir", str(out)]
    assert main([*argv, "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1", "--bf16", "false", "--disable_tqdm"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [("eval_loss" in r) for r in rows] == [True, True]
    assert main([*argv, "--max_steps", "1", "--eval_strategy", "no", "--disable_tqdm"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any("eval_loss" in r for r in rows)

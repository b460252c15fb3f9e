import json

from preft.adapters import load_adapter
from preft.cli import main

from .conftest import write_jsonl


def test_preft_train_sft_writes_a_servable_adapter_metrics_and_plot(tmp_path, tiny_llama, toy_sft):
    out = tmp_path / "run"
    argv = ["train", "sft", "--model", str(tiny_llama), "--dataset", str(toy_sft), "--output_dir", str(out)]
    argv += ["--adapter", "direft", "--r", "4", "--max_steps", "3", "--learning_rate", "1e-2", "--layers", "0", "--disable_tqdm"]
    assert main(argv) == 0
    adapter = load_adapter(out)
    assert adapter.kind == "direft" and adapter.policy == "prefill" and adapter.config.layers == [0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and (out / "loss.png").is_file()
    assert (out / "checkpoint-3" / "trainer_state.pt").is_file()


def test_preft_train_grpo_runs_with_a_builtin_reward(tmp_path, tiny_llama):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}])
    out = tmp_path / "rl"
    argv = [
        "train",
        "grpo",
        "--model",
        str(tiny_llama),
        "--dataset",
        str(prompts),
        "--output_dir",
        str(out),
        "--reward_funcs",
        "math",
        "exact",
    ]
    argv += [
        "--num_generations",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--max_completion_length",
        "3",
        "--max_steps",
        "2",
        "--disable_tqdm",
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "rewards/math/mean", "rewards/exact/mean", "sampling/sampling_logp_difference/max"} <= set(rows[-1])
    assert (out / "adapter_config.json").is_file() and (out / "curves.png").is_file()


def test_preft_train_reports_bad_data_with_file_and_line(tmp_path, tiny_llama, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "not json"])
    argv = ["train", "sft", "--model", str(tiny_llama), "--dataset", str(data), "--output_dir", str(tmp_path / "o"), "--max_steps", "1"]
    assert main(argv) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().out
    assert main([*argv, "--skip_bad_rows", "--disable_tqdm"]) == 0
    assert "skipped 1 bad rows" in capsys.readouterr().out


def test_preft_train_rejects_a_bad_flag_value_clearly(tmp_path, tiny_llama, toy_sft, capsys):
    argv = ["train", "grpo", "--model", str(tiny_llama), "--dataset", str(toy_sft), "--num_generations", "3"]
    assert main(argv) == 2
    assert "must be a multiple of --num_generations 3" in capsys.readouterr().out

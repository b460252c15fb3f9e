"""accelerate in the training loop: one process is unchanged; two CPU processes equal one with the doubled batch."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import preft.train.trainer as trainer_module
from preft.train import SFTConfig, SFTTrainer
from preft.train.trainer import SingleProcess, ordered_batches


def config(tmp_path, **kw) -> SFTConfig:
    base = dict(output_dir=str(tmp_path), r=8, learning_rate=1e-2, per_device_train_batch_size=2, max_steps=3, disable_tqdm=True)
    return SFTConfig(**{**base, **kw})


def test_rank_shards_of_a_doubled_batch_are_the_single_process_batch():
    for index in range(5):
        whole = ordered_batches(7, 4, seed=3, index=index)
        assert ordered_batches(7, 2, 3, index, rank=0, world_size=2) + ordered_batches(7, 2, 3, index, rank=1, world_size=2) == whole


def test_single_process_with_accelerate_equals_the_plain_loop(tmp_path, tiny_llama, toy_sft, monkeypatch):
    from accelerate import Accelerator

    kw = dict(lora_dropout=0.1, lr_scheduler_type="linear", gradient_accumulation_steps=2)
    with_acc = SFTTrainer(tiny_llama, config(tmp_path / "acc", **kw), toy_sft)
    assert isinstance(with_acc.accelerator, Accelerator) and with_acc.world_size == 1
    acc_rows = with_acc.train().metrics
    monkeypatch.setattr(trainer_module, "make_accelerator", lambda device: (SingleProcess(torch.device("cpu")), torch.device("cpu")))
    plain = SFTTrainer(tiny_llama, config(tmp_path / "plain", **kw), toy_sft)
    assert isinstance(plain.accelerator, SingleProcess)
    plain_rows = plain.train().metrics
    for a, b in zip(acc_rows, plain_rows):
        assert (a["loss"], a["grad_norm"], a["learning_rate"]) == (b["loss"], b["grad_norm"], b["learning_rate"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_two_cpu_processes_equal_one_process_with_the_doubled_batch(tmp_path, tiny_llama, toy_sft):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    args = ["-m", "preft.cli", "train", "sft", "--model", str(tiny_llama), "--dataset", str(toy_sft), "--max_steps", "3"]
    args += ["--learning_rate", "1e-2", "--disable_tqdm"]  # (no "--r": torchrun would take it for an abbreviation of its own flags)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    try:
        two = subprocess.run(
            [*cmd, "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("two CPU processes did not finish in 90 s on this machine")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    one = subprocess.run(
        [sys.executable, *args, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("one", "two")}
    assert [r["step"] for r in rows["two"]] == [1, 2, 3]  # written once (main process only), not once per rank
    # TRL's num_tokens (prompt + completion tokens so far) is all-reduced over the ranks: the same as one process's
    per_step = rows["one"][0]["num_tokens"]
    assert [r["num_tokens"] for r in rows["two"]] == [r["num_tokens"] for r in rows["one"]] == [per_step, 2 * per_step, 3 * per_step]
    for a, b in zip(rows["one"], rows["two"]):
        # steps 2-3 check the all-reduced gradients too (float rounding differs: padding and reduction order)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert (tmp_path / "two" / "adapter_model.safetensors").is_file()

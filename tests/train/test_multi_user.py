"""Many users' adapters in one SFT job: each user gets what training it alone gives, written as it finishes."""

import json
import os
import shutil
import socket
import subprocess

import pytest
import torch

from preft.adapters import LoraConfig, ReftConfig, load_adapter
from preft.cli import main
from preft.errors import PreftError
from preft.hf import PreftModel
from preft.tiny import build_tokenizer
from preft.train import MultiUserSFTTrainer, SFTConfig, SFTTrainer, sft
from preft.train.data import DataError, load_user_examples, user_column_of
from preft.train.multi_user import JOB_DIR, SUMMARY_NAME, assign_users

from .conftest import write_jsonl

# Users with 5, 7 and 2 rows: with 2 slots they enter and leave the joint batches at different steps.
USERS = {
    "alice": [("cat=", "dog"), ("sun=", "moon"), ("red=", "blue"), ("one=", "two"), ("up=", "down")],
    "bob": [("a=", "bbbbbb"), ("c=", "dd"), ("e=", "f"), ("x=", "yy"), ("k=", "lmnop"), ("q=", "r"), ("s=", "tu")],
    "carol": [("1=", "2"), ("3=", "four")],
}
# Training moves each adapter by 0.03-0.09 (largest element); joint vs alone differs by float rounding only, which
# Adam can amplify on a parameter whose gradient is near zero, by an amount that depends on the CPU's kernels
# (largest element: 3.7e-5 on one machine, 1.5e-4 on an AMD EPYC one, where the norm of the difference is 5e-5 of
# the norm of the training's motion). So the main check is that norm ratio; the elementwise bound is a guard.
WEIGHT_ATOL = 1e-3
WEIGHT_RTOL = 1e-3


def relative_diff(got, want, start):
    """||got - want|| / ||want - start|| over every tensor of the adapter: rounding noise against the training's own motion."""
    num = sum(float((got[k] - want[k]).pow(2).sum()) for k in want)
    den = sum(float((want[k] - start[k]).pow(2).sum()) for k in want)
    return (num / den) ** 0.5


def users_file(tmp_path, users=USERS, column="user"):
    """One JSONL file, users' rows interleaved (each user's rows keep their order)."""
    rows, longest = [], max(len(r) for r in users.values())
    for i in range(longest):
        rows += [{column: u, "prompt": r[i][0], "completion": r[i][1]} for u, r in users.items() if i < len(r)]
    return write_jsonl(tmp_path / "users.jsonl", rows)


def user_files(tmp_path, users=USERS):
    folder = tmp_path / "per-user"
    folder.mkdir(exist_ok=True)
    for user, rows in users.items():
        write_jsonl(folder / f"{user}.jsonl", [{"prompt": p, "completion": c} for p, c in rows])
    return folder


def config(tmp_path, name, **kw):
    base = dict(
        output_dir=str(tmp_path / name),
        r=4,
        learning_rate=2e-2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_train_epochs=3,
        weight_decay=0.1,
        lr_scheduler_type="cosine",
        warmup_ratio=0.2,
        users_per_step=2,
        disable_tqdm=True,
    )
    return SFTConfig(**{**base, **kw})


def weights(path):
    return load_adapter(path).tensors


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---- data ---------------------------------------------------------------------------------------


def test_users_come_from_a_column_or_a_folder_with_each_users_rows_in_file_order(tmp_path):
    tok = build_tokenizer()
    by_column, report = load_user_examples(users_file(tmp_path), tok, 64)
    by_folder, _ = load_user_examples(user_files(tmp_path), tok, 64)
    assert list(by_column) == list(USERS) and sorted(by_folder) == sorted(USERS) and report.rows == 14
    for user, rows in USERS.items():
        assert [tok.decode(e.prompt_ids) for e in by_column[user]] == [p for p, _ in rows]
        assert [e.completion_ids for e in by_column[user]] == [e.completion_ids for e in by_folder[user]]


def test_user_column_is_detected_and_none_means_one_adapter(tmp_path):
    assert user_column_of(users_file(tmp_path)) == "user"
    assert user_column_of(users_file(tmp_path / "..", column="adapter")) == "adapter"
    assert user_column_of(user_files(tmp_path)) == ""  # a folder: one file per user
    assert user_column_of(users_file(tmp_path), "none") is None
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "a", "completion": "b"}])
    assert user_column_of(plain) is None


def test_a_row_without_a_valid_user_is_a_bad_row_with_its_line(tmp_path):
    tok = build_tokenizer()
    rows = [
        {"user": "alice", "prompt": "a", "completion": "b"},
        {"prompt": "c", "completion": "d"},
        {"user": "../x", "prompt": "e", "completion": "f"},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing column 'user'"):
        load_user_examples(path, tok, 64)
    users, report = load_user_examples(path, tok, 64, skip_bad_rows=True)
    assert list(users) == ["alice"] and len(report.skipped) == 2 and "bad.jsonl:3" in report.skipped[1]


def test_users_are_spread_over_ranks_by_row_count_in_dataset_order():
    ranks = assign_users({"a": 10, "b": 1, "c": 6, "d": 5, "e": 1}, 2)
    assert ranks == [["a", "b", "e"], ["c", "d"]]  # 12 rows vs 11, largest users placed first
    assert assign_users({"a": 3}, 3) == [["a"], [], []]


# ---- the grouped forward ------------------------------------------------------------------------


def test_a_batch_mixing_adapters_gives_each_row_its_own_adapters_logits_and_gradients(tiny_hf_model):
    """The grouped low-rank product (mixed ranks, ReFT positions) equals running each adapter on its rows alone."""
    model = PreftModel(tiny_hf_model("llama"))
    configs = {
        "lora4": LoraConfig(r=4, target_modules="all-linear"),
        "lora8": LoraConfig(r=8, target_modules=["q_proj", "down_proj"], layers=[1]),
        "direft": ReftConfig(kind="direft", r=4, positions="f1+l1"),
        "loreft": ReftConfig(kind="loreft", r=2, layers=[0]),
    }
    for name, cfg in configs.items():
        model.add_adapter(name, cfg)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.normal_(0.0, 0.1)  # LoRA B starts at 0: make every adapter act
    ids = torch.randint(5, 200, (6, 7))
    mask = torch.tensor([[1.0] * 4 + [0.0] * 3] * 3 + [[1.0] * 7] * 3)  # prefill rows, then all-token rows
    names = ["lora4", "direft", None, "lora8", "loreft", "lora4"]
    mixed = model(ids, adapter_mask=mask, adapter_names=names).logits
    mixed.square().sum().backward()
    mixed_grads = {id(p): p.grad.clone() for p in model.adapter_parameters()}
    model.zero_grad(set_to_none=True)
    alone = torch.empty_like(mixed)
    for row, name in enumerate(names):
        alone[row] = model(ids[row : row + 1], adapter_mask=mask[row : row + 1], adapter_names=name).logits[0]
    alone.square().sum().backward()
    torch.testing.assert_close(mixed, alone, atol=2e-5, rtol=0)
    with torch.no_grad():
        base = model(ids).logits
    differs = (mixed.detach() - base).abs().amax(dim=(1, 2))
    assert float(differs[2]) == 0 and bool((differs[[0, 1, 3, 4, 5]] > 1e-3).all())  # every adapter acts; the base row is the base
    for p in model.adapter_parameters():
        torch.testing.assert_close(mixed_grads[id(p)], p.grad, atol=1e-4, rtol=1e-4)
    assert all(float(p.grad.abs().max()) > 0 for p in model.adapter_parameters() if p.dim() > 1)


# ---- joint == alone -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "policy"), [("lora", "prefill"), ("direft", "all"), ("loreft", "prefill")])
def test_training_users_jointly_gives_the_weights_of_training_each_alone(tmp_path, tiny_llama, kind, policy):
    joint = sft(tiny_llama, users_file(tmp_path), config(tmp_path, "joint", adapter=kind, policy=policy))
    folder = user_files(tmp_path)
    assert {u: s["steps"] for u, s in joint.summaries.items()} == {"alice": 5, "bob": 6, "carol": 2}
    for user in USERS:
        alone = sft(tiny_llama, folder / f"{user}.jsonl", config(tmp_path, f"alone-{user}", adapter=kind, policy=policy))
        got, want = weights(joint.adapters[user]), weights(alone.adapter_path)
        fresh = SFTTrainer(tiny_llama, config(tmp_path, "fresh", adapter=kind, policy=policy, max_steps=1), folder / f"{user}.jsonl")
        start = fresh.model.get_adapter(fresh.name).tensors
        assert relative_diff(got, want, start) <= WEIGHT_RTOL
        assert max_abs_diff(got, want) <= WEIGHT_ATOL
        assert max_abs_diff(got, start) > 10 * WEIGHT_ATOL  # training moved the weights far more than the tolerance
        # Its own step count and lr schedule, step by step.
        rows = joint.summaries[user]["log_history"]
        assert [r["learning_rate"] for r in rows] == pytest.approx([r["learning_rate"] for r in alone.metrics], rel=1e-12)
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in alone.metrics], abs=1e-5)
    assert max_abs_diff(weights(joint.adapters["alice"]), weights(joint.adapters["bob"])) > 1e-2


def test_a_step_changes_only_the_users_in_it(tmp_path, tiny_llama):
    """Weight decay and momentum would move an adapter stepped without rows: a user outside a step must not move."""
    trainer = MultiUserSFTTrainer(tiny_llama, config(tmp_path, "o", users_per_step=3), users_file(tmp_path))
    alice, bob = trainer.start_user("alice"), trainer.start_user("bob")
    trainer.training_step([alice, bob])  # bob now has AdamW moments and a weight-decay term
    bob_params = [p.detach().clone() for p in bob.params]
    bob_moments = [bob.optimizer.state[p]["exp_avg"].clone() for p in bob.params]
    alice_before = [p.detach().clone() for p in alice.params]
    for _ in range(2):
        trainer.training_step([alice])
    assert all(torch.equal(p, q) for p, q in zip(bob.params, bob_params))
    assert all(torch.equal(bob.optimizer.state[p]["exp_avg"], m) for p, m in zip(bob.params, bob_moments))
    assert (alice.step, bob.step) == (3, 1)
    assert max(float((p.detach() - q).abs().max()) for p, q in zip(alice.params, alice_before)) > 1e-3


# ---- early stopping ------------------------------------------------------------------------------


def test_early_stopping_stops_a_user_alone_and_saves_its_best_adapter(tmp_path, tiny_llama):
    users = {"good": USERS["alice"], "bad": USERS["bob"]}
    data = users_file(tmp_path, users)
    # good's eval rows are its training rows (eval loss falls); bad's ask for other answers (eval loss rises).
    evals = [{"user": "good", "prompt": p, "completion": c} for p, c in users["good"]]
    evals += [{"user": "bad", "prompt": p, "completion": "zzzzzz"} for p, _ in users["bad"]]
    eval_path = write_jsonl(tmp_path / "eval.jsonl", evals)
    cfg = config(
        tmp_path,
        "es",
        eval_dataset=str(eval_path),
        eval_steps=1,
        early_stopping_patience=2,
        lr_scheduler_type="constant",
        num_train_epochs=8,
    )
    result = sft(tiny_llama, data, cfg)
    good, bad = result.summaries["good"], result.summaries["bad"]
    assert not good["stopped_early"] and good["steps"] == good["total_steps"] == 12
    assert bad["stopped_early"] and bad["steps"] < bad["total_steps"]
    bad_evals = [r["eval_loss"] for r in bad["log_history"]]
    assert bad["steps"] == bad["best_step"] + 2 and bad["best_eval_loss"] == min(bad_evals) < bad_evals[-1]
    # The saved adapter is the best one: its eval loss is the best eval loss, not the last.
    trainer = MultiUserSFTTrainer(tiny_llama, config(tmp_path, "check", eval_dataset=str(eval_path)), data)
    run = trainer.start_user("bad")
    trainer.model.set_adapter_weights("bad", load_adapter(result.adapters["bad"]))
    assert trainer.evaluate([run])[0] == pytest.approx(bad["best_eval_loss"], abs=1e-5)


def test_early_stopping_needs_eval_rows_and_eval_steps(tmp_path, tiny_llama):
    with pytest.raises(PreftError, match="needs --eval_steps"):
        MultiUserSFTTrainer(tiny_llama, config(tmp_path, "o", early_stopping_patience=1, eval_split=0.5), users_file(tmp_path))
    with pytest.raises(PreftError, match="needs eval rows for every user"):
        MultiUserSFTTrainer(tiny_llama, config(tmp_path, "o", early_stopping_patience=1, eval_steps=1), users_file(tmp_path))


# ---- outputs and resuming ------------------------------------------------------------------------


def test_each_user_is_written_complete_as_it_finishes(tmp_path, tiny_llama):
    trainer = MultiUserSFTTrainer(tiny_llama, config(tmp_path, "out", users_per_step=1), users_file(tmp_path))
    seen = {}
    start = trainer.start_user

    def record(user):
        seen[user] = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir())
        return start(user)

    trainer.start_user = record
    result = trainer.train()
    # With one slot, users run one after another; each found its predecessors' folders, and nothing half-written.
    assert seen == {"alice": [JOB_DIR], "bob": [JOB_DIR, "alice"], "carol": [JOB_DIR, "alice", "bob"]}
    for user in USERS:
        adapter = load_adapter(result.adapters[user], model_config=trainer.model.config)  # what preft serve loads
        assert adapter.kind == "lora" and adapter.policy == "prefill"
        config_json = json.loads((result.adapters[user] / "adapter_config.json").read_text())
        assert config_json["peft_type"] == "LORA" and config_json["preft"]["policy"] == "prefill"
        summary = json.loads((result.adapters[user] / SUMMARY_NAME).read_text())
        assert summary["user"] == user and summary["steps"] == len(summary["log_history"])
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert {r["user"] for r in metrics} == set(USERS) and (tmp_path / "out" / "loss.png").is_file()


def test_a_killed_job_resumes_where_it_was_and_trains_no_user_twice(tmp_path, tiny_llama):
    data = users_file(tmp_path)
    whole = sft(tiny_llama, data, config(tmp_path, "whole", save_steps=1))

    class Killed(Exception):
        pass

    first = MultiUserSFTTrainer(tiny_llama, config(tmp_path, "job", save_steps=1), data)
    step, calls = first.training_step, []

    def die_at_step_5(runs):
        if len(calls) == 5:  # alice (5 steps) is finished, bob has done 5 of 6 steps (state saved), carol not started
            raise Killed
        calls.append([r.name for r in runs])
        return step(runs)

    first.training_step = die_at_step_5
    with pytest.raises(Killed):
        first.train()
    assert (tmp_path / "job" / "alice").is_dir() and not (tmp_path / "job" / "carol").exists()
    alice_file = tmp_path / "job" / "alice" / "adapter_model.safetensors"
    alice_stat = alice_file.stat()

    with pytest.raises(PreftError, match="pass --resume_from_checkpoint latest"):
        MultiUserSFTTrainer(tiny_llama, config(tmp_path, "job", save_steps=1), data).train()
    with pytest.raises(PreftError, match="learning_rate was 0.02, now 0.01"):
        MultiUserSFTTrainer(tiny_llama, config(tmp_path, "job", learning_rate=1e-2, resume_from_checkpoint="latest"), data).train()

    second = MultiUserSFTTrainer(tiny_llama, config(tmp_path, "job", save_steps=1, resume_from_checkpoint="latest"), data)
    started, start = {}, second.start_user

    def record(user):
        run = start(user)
        started[user] = run.step
        return run

    second.start_user = record
    resumed = second.train()
    assert started == {"bob": 5, "carol": 0}  # alice is not trained again; bob continues from its saved step
    assert alice_file.stat().st_mtime_ns == alice_stat.st_mtime_ns and alice_file.stat().st_ino == alice_stat.st_ino
    for user in USERS:
        assert max_abs_diff(weights(resumed.adapters[user]), weights(whole.adapters[user])) <= WEIGHT_ATOL
        assert [r["step"] for r in resumed.summaries[user]["log_history"]] == list(range(1, resumed.summaries[user]["steps"] + 1))
    assert not list((tmp_path / "job" / JOB_DIR / "inflight").glob("*.pt"))


def test_a_new_job_refuses_an_output_dir_with_a_users_folder(tmp_path, tiny_llama):
    (tmp_path / "out" / "bob").mkdir(parents=True)
    with pytest.raises(PreftError, match="bob' already exists"):
        MultiUserSFTTrainer(tiny_llama, config(tmp_path, "out"), users_file(tmp_path)).train()


# ---- command line ----------------------------------------------------------------------------------


def test_preft_train_sft_on_a_folder_writes_one_adapter_per_user(tmp_path, tiny_llama, capsys):
    out = tmp_path / "run"
    argv = ["train", "sft", "--model", str(tiny_llama), "--dataset", str(user_files(tmp_path)), "--output_dir", str(out)]
    argv += ["--adapter", "direft", "--r", "2", "--layers", "1", "--max_steps", "2", "--users_per_step", "2", "--disable_tqdm"]
    assert main(argv) == 0
    assert "3 adapters saved to" in capsys.readouterr().out
    for user in USERS:
        adapter = load_adapter(out / user)
        assert adapter.kind == "direft" and adapter.config.layers == [1]
    assert json.loads((out / "users.json").read_text())["carol"]["steps"] == 2


def test_user_column_none_trains_one_adapter_on_every_row(tmp_path, tiny_llama):
    data = users_file(tmp_path)
    with pytest.raises(PreftError, match="multi-user job"):
        SFTTrainer(tiny_llama, config(tmp_path, "one"), data)
    result = sft(tiny_llama, data, config(tmp_path, "one", user_column="none", max_steps=1))
    assert result.adapter_path.is_dir() and not (tmp_path / "one" / "alice").exists()


# ---- torchrun ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


JOB_FLAGS = dict(learning_rate=2e-2, num_train_epochs=2, weight_decay=0.1, users_per_step=2)


def torchrun_job(tmp_path, tiny_llama, data, name, *flags):
    """Two gloo ranks on CPU; returns each user's training summary."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    # (no "--r": torchrun would take it for an abbreviation of its own flags)
    args = ["-m", "preft.cli", "train", "sft", "--model", str(tiny_llama), "--dataset", str(data), "--output_dir", str(tmp_path / name)]
    args += [arg for key, value in JOB_FLAGS.items() for arg in (f"--{key}", str(value))] + ["--disable_tqdm", *flags]
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return {user: json.loads((tmp_path / name / user / SUMMARY_NAME).read_text()) for user in USERS}


def one_rank_job(tmp_path, tiny_llama, data, name, **kw):
    cfg = SFTConfig(output_dir=str(tmp_path / name), disable_tqdm=True, **JOB_FLAGS, **kw)
    return sft(tiny_llama, data, cfg).summaries


@pytest.mark.timeout(150)
def test_two_gloo_ranks_shard_users_and_give_the_adapters_of_one_rank(tmp_path, tiny_llama):
    data = users_file(tmp_path)
    two = torchrun_job(tmp_path, tiny_llama, data, "two", "--per_device_train_batch_size", "2")
    one = one_rank_job(tmp_path, tiny_llama, data, "one", per_device_train_batch_size=2)
    assert {u: s["rank"] for u, s in two.items()} == {"alice": 1, "bob": 0, "carol": 1}  # 7 rows vs 5 + 2: no user on two ranks
    for user in USERS:
        assert max_abs_diff(weights(tmp_path / "two" / user), weights(tmp_path / "one" / user)) <= WEIGHT_ATOL
        assert two[user]["steps"] == one[user]["steps"]


@pytest.mark.timeout(150)
def test_split_users_over_two_ranks_all_reduces_each_users_gradients(tmp_path, tiny_llama):
    """Every rank takes half of each user's micro-batch: equal to one rank with the doubled batch."""
    data = users_file(tmp_path)
    two = torchrun_job(tmp_path, tiny_llama, data, "two", "--per_device_train_batch_size", "2", "--split_users_over_ranks")
    one = one_rank_job(tmp_path, tiny_llama, data, "one", per_device_train_batch_size=4)
    for user in USERS:
        assert two[user]["steps"] == one[user]["steps"] and two[user]["rank"] == 0  # rank 0 writes every user
        two_rows, one_rows = two[user]["log_history"], one[user]["log_history"]
        assert [r["tokens"] for r in two_rows] == [r["tokens"] for r in one_rows]  # token counts all-reduced
        assert [r["loss"] for r in two_rows] == pytest.approx([r["loss"] for r in one_rows], abs=1e-5)
        assert [r["grad_norm"] for r in two_rows] == pytest.approx([r["grad_norm"] for r in one_rows], rel=1e-5)
        # Summing two ranks' gradients rounds differently, and AdamW's first update of LoRA A is ~lr * sign(grad):
        # elements whose gradient is within rounding of zero move differently (measured 1.6e-4 at lr 2e-2).
        assert max_abs_diff(weights(tmp_path / "two" / user), weights(tmp_path / "one" / user)) <= 1e-3


def test_users_load_from_every_format_and_source(tmp_path):
    from datasets import Dataset

    tok = build_tokenizer()
    chat = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    folder = tmp_path / "users"
    folder.mkdir()
    Dataset.from_list([{"prompt": "ab", "completion": "cd"}] * 2).to_parquet(str(folder / "alice.parquet"))
    write_jsonl(folder / "bob.jsonl", [chat])
    users, report = load_user_examples(folder, tok, 64)
    assert {u: len(e) for u, e in users.items()} == {"alice": 2, "bob": 1} and report.rows == 3
    rows = [{"user": "carol", "text": "hello"}, {"user": "dave", **chat}]
    for source in (rows, Dataset.from_list([{"user": "carol", "text": "hello"}, {"user": "dave", "text": "x"}])):
        assert user_column_of(source) == "user"
        assert list(load_user_examples(source, tok, 64)[0]) == ["carol", "dave"]
    # --user_column none: a folder is one dataset (one adapter), as --dataset_name reads it
    assert user_column_of(folder, "none") is None

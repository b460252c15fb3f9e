"""Many users' adapters in one SFT job: one frozen base model, batches that mix users' rows.

``preft train sft --dataset users.jsonl``, where every row names its user (a ``user`` or ``adapter``
column, or a folder of ``<user>.jsonl`` files), trains one adapter per user in one job:

- Up to ``--users_per_step`` users train at a time (their *slots*). Each step's batch holds one
  micro-batch of each; one forward applies every row's own adapter through the engine's grouped
  low-rank product (``preft.hf.model.grouped_delta``), and one backward of the sum of the users'
  mean losses gives each adapter exactly the gradient of its own loss.
- Each user gets what a separate ``preft train sft`` run on its rows would give (``SFTTrainer``):
  the same initialisation (``--seed``), the same data order (``ordered_batches`` over its rows),
  and its own AdamW, step count, lr schedule, gradient clipping, eval and early stopping. A user
  that is not in a step is not in memory at all, so its weights and AdamW moments cannot drift.
- When a user finishes, its adapter is written atomically to ``<output_dir>/<user>/`` (PEFT layout
  with the ``preft`` section, plus ``training_summary.json``), so ``preft serve --adapter-root
  <output_dir>`` can load it at once, and its slot goes to the next user.
- ``<output_dir>/.preft_job/`` holds the job (``job.json``) and, every ``--save_steps`` steps, the
  state of the users in flight. ``--resume_from_checkpoint latest`` continues a killed job:
  finished users are skipped, users in flight continue from their last saved state.
- Under ``torchrun`` (torch.distributed: gloo on CPU, NCCL on CUDA) users are sharded over ranks,
  balanced by row count, and the ranks do not communicate while training. With
  ``--split_users_over_ranks`` every rank trains every user on its share of each micro-batch and
  the users' gradients are all-reduced (data parallel per user).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from preft.adapters import Adapter, save_adapter
from preft.errors import PreftError
from preft.hf import PreftModel
from preft.models import resolve_model
from preft.train.config import SFTConfig
from preft.train.data import DataError, Example, collate, dataset_label, load_user_examples
from preft.train.trainer import enable_gradient_checkpointing, load_model, lr_lambda, ordered_batches, set_adapter_dropout, token_logprobs

JOB_DIR = ".preft_job"  # not a valid adapter name, so a server scanning the output folder never takes it for a user
SUMMARY_NAME = "training_summary.json"
# Flags that may change when a job is resumed: none of them changes what a user's adapter becomes
# (users_per_step only changes which users share a batch, i.e. float rounding).
RESUMABLE_FLAGS = {
    "output_dir",
    "resume_from_checkpoint",
    "disable_tqdm",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "users_per_step",
    "device",
    "per_device_eval_batch_size",
    "gradient_checkpointing",
    "report_to",
}


# ---- processes ---------------------------------------------------------------------------------


class Ranks:
    """This process's place in a ``torchrun`` job (torch.distributed: gloo on CPU, NCCL on CUDA), or a lone process."""

    def __init__(self, device: str | torch.device | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        wanted = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.world > 1 and wanted.type == "cuda":
            wanted = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(wanted)
        self.device = wanted
        if self.world > 1 and not torch.distributed.is_initialized():
            # Sharded ranks meet only at the start and the end: one may train its users for hours before the others arrive.
            torch.distributed.init_process_group("nccl" if wanted.type == "cuda" else "gloo", timeout=timedelta(hours=24))
        self.is_main = self.rank == 0

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier(**({"device_ids": [self.device.index]} if self.device.type == "cuda" else {}))

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]


def assign_users(rows: dict[str, int], world_size: int) -> list[list[str]]:
    """Users per rank, balanced by row count (largest first, to the least-loaded rank); each rank keeps the dataset order."""
    load, owner = [0] * world_size, {}
    order = {user: i for i, user in enumerate(rows)}
    for user in sorted(rows, key=lambda u: (-rows[u], order[u])):
        rank = min(range(world_size), key=lambda k: (load[k], k))
        owner[user] = rank
        load[rank] += rows[user]
    return [[u for u in rows if owner[u] == rank] for rank in range(world_size)]


# ---- one user's run ------------------------------------------------------------------------------


@dataclass
class UserRun:
    """A user in a slot: its rows, adapter parameters, optimizer, schedule and progress."""

    name: str
    examples: list[Example]
    eval_examples: list[Example]
    total_steps: int
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    train_tokens: int = 0  # prompt + completion tokens of the rows it trained on (throughput)
    best_eval_loss: float | None = None
    best_step: int | None = None
    best_params: list[Tensor] | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    log_history: list[dict] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.stopped_early or self.step >= self.total_steps

    def state_dict(self) -> dict:
        """Everything needed to continue this user exactly (tensors on CPU)."""
        cpu = lambda ts: None if ts is None else [t.detach().cpu().clone() for t in ts]  # noqa: E731
        keys = ("step", "train_tokens", "best_eval_loss", "best_step", "evals_without_improvement", "stopped_early", "log_history")
        return {
            **{k: getattr(self, k) for k in keys},
            "params": cpu(self.params),
            "best_params": cpu(self.best_params),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        shapes = [tuple(t.shape) for t in state["params"]]
        if shapes != [tuple(p.shape) for p in self.params]:
            raise PreftError(f"the saved state of user {self.name!r} does not fit this adapter config (parameter shapes differ)")
        with torch.no_grad():
            for p, value in zip(self.params, state["params"]):
                p.copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        device = self.params[0].device
        self.best_params = None if state["best_params"] is None else [t.to(device) for t in state["best_params"]]
        for key in ("step", "train_tokens", "best_eval_loss", "best_step", "evals_without_improvement", "stopped_early", "log_history"):
            setattr(self, key, state[key])


# ---- files ---------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomic(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename over ``path``: a reader sees the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from a server running as another user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class JobFiles:
    """``<output_dir>/<user>/`` (finished users) and ``<output_dir>/.preft_job/`` (the job, users in flight)."""

    def __init__(self, output_dir: str | Path):
        self.root = Path(output_dir)
        self.dir = self.root / JOB_DIR
        self.job_path = self.dir / "job.json"

    def read_job(self) -> dict | None:
        return json.loads(self.job_path.read_text()) if self.job_path.is_file() else None

    def write_job(self, job: dict) -> None:
        _write_atomic(self.job_path, lambda tmp: tmp.write_text(json.dumps(job, indent=2) + "\n"))

    def summary(self, user: str) -> dict | None:
        path = self.root / user / SUMMARY_NAME
        return json.loads(path.read_text()) if path.is_file() else None

    def done(self, user: str, job_id: str) -> bool:
        summary = self.summary(user)
        return summary is not None and summary.get("job_id") == job_id

    def write_user(self, user: str, adapter: Adapter, summary: dict) -> Path:
        """``<output_dir>/<user>/`` appears in one rename, complete: adapter files and ``training_summary.json``."""
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{user}.", dir=self.dir / "tmp"))  # same file system: the rename is atomic
        try:
            save_adapter(adapter, staging / user)
            (staging / user / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
            os.chmod(staging / user, 0o777 & ~_umask())  # mkdtemp's 0700, as for a folder made with mkdir
            for file in (staging / user).iterdir():
                os.chmod(file, 0o666 & ~_umask())
            target = self.root / user
            os.rename(staging / user, target)  # fails rather than merge into an existing folder
            return target
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def inflight_path(self, user: str) -> Path:
        return self.dir / "inflight" / f"{user}.pt"

    def save_inflight(self, user: str, state: dict) -> None:
        _write_atomic(self.inflight_path(user), lambda tmp: torch.save(state, tmp))

    def load_inflight(self, user: str) -> dict | None:
        path = self.inflight_path(user)
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None

    def drop_inflight(self, user: str) -> None:
        self.inflight_path(user).unlink(missing_ok=True)


# ---- the job -------------------------------------------------------------------------------------


@dataclass
class UsersResult:
    """What a finished multi-user job produced."""

    output_dir: Path
    adapters: dict[str, Path]  # user -> <output_dir>/<user>/, servable
    summaries: dict[str, dict]  # user -> its training_summary.json
    metrics: list[dict] = field(default_factory=list)  # the rows of metrics.jsonl ({"user", "step", "loss", ...})
    plot_path: Path | None = None
    is_main: bool = True  # False on the other ranks of a torchrun job (they write nothing at the end)


class MultiUserSFTTrainer:
    """``MultiUserSFTTrainer(model_dir, config, train_dataset=path).train()``: one adapter per user of the dataset."""

    def __init__(
        self,
        model_dir: str | Path,
        config: SFTConfig,
        train_dataset: Any,
        eval_dataset: Any = None,
        model: PreftModel | None = None,
        tokenizer: Any = None,
    ):
        """``train_dataset`` / ``eval_dataset``: a data file whose rows name their user, a folder of per-user files,
        a ``datasets.Dataset`` or a list of rows (``preft.train.data.load_user_examples``)."""
        self.config = cfg = config
        self.ranks = Ranks(cfg.device if model is None else next(model.parameters()).device)
        self.device = self.ranks.device
        self.model_dir = str(model_dir if model is not None else resolve_model(model_dir))
        if model is None:
            model, tokenizer = load_model(model_dir, cfg, self.device)
        self.model, self.tokenizer = model, tokenizer
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        load = dict(user_column=cfg.user_column, skip_bad_rows=cfg.skip_bad_rows, text_field=cfg.dataset_text_field)
        train, report = load_user_examples(train_dataset, tokenizer, cfg.max_length, **load)
        evals: dict[str, list[Example]] = {}
        eval_path = eval_dataset if eval_dataset is not None else cfg.eval_dataset
        if not cfg.evaluates:
            pass  # --eval_strategy no: no eval rows, none held out
        elif eval_path is not None:
            evals, _ = load_user_examples(eval_path, tokenizer, cfg.max_length, **load)
            unknown = sorted(set(evals) - set(train))
            if unknown:
                raise DataError(f"{eval_path}: users without training rows: {unknown[:5]}")
        elif cfg.eval_split > 0:
            for user, examples in train.items():  # the same held-out rows as SFTTrainer on this user's rows alone
                order = list(range(len(examples)))
                random.Random(cfg.seed).shuffle(order)
                held = set(order[: max(1, int(round(cfg.eval_split * len(examples))))])
                evals[user] = [e for i, e in enumerate(examples) if i in held]
                train[user] = [e for i, e in enumerate(examples) if i not in held]
                if not train[user]:
                    raise DataError(f"user {user!r}: no training rows left after holding out --eval_split {cfg.eval_split}")
        if cfg.early_stopping_patience > 0:
            if cfg.eval_interval(1) <= 0:
                raise PreftError(
                    "--early_stopping_patience needs --eval_steps > 0 or --eval_strategy steps|epoch (how often each user is evaluated)"
                )
            missing = [u for u in train if not evals.get(u)]
            if missing:
                raise PreftError(
                    f"--early_stopping_patience needs eval rows for every user (--eval_split or --eval_dataset); none for {missing[:5]}"
                )
        self.train_rows, self.eval_rows = train, {u: evals.get(u, []) for u in train}
        # On CPU (one thread) a 4-user batch cost 15% more CPU time per token than 1-user batches (docs/training.md).
        self.users_per_step = cfg.users_per_step or (8 if self.device.type == "cuda" else 1)
        self.split = cfg.split_users_over_ranks and self.ranks.world > 1
        ranks = self.ranks
        self.my_users = list(train) if self.split else assign_users({u: len(e) for u, e in train.items()}, ranks.world)[ranks.rank]
        self.writes = ranks.is_main or not self.split  # split mode: every rank holds the same weights, rank 0 writes them
        self.job = JobFiles(cfg.output_dir)
        if ranks.is_main:
            eval_total = sum(len(e) for e in self.eval_rows.values())
            print(
                f"preft train sft: {dataset_label(train_dataset)}: {len(train)} users, {report.summary()}; {eval_total} eval rows; {ranks.world} rank(s)"
            )

    # ---- schedule --------------------------------------------------------------------------------

    def user_total_steps(self, n_rows: int) -> int:
        """Optimizer steps of a user with ``n_rows`` training rows (``SFTTrainer.total_steps`` on its rows)."""
        cfg = self.config
        if cfg.max_steps > 0:
            return cfg.max_steps
        return max(1, math.ceil(cfg.num_train_epochs * self.user_steps_per_epoch(n_rows)))

    def user_steps_per_epoch(self, n_rows: int) -> float:
        cfg = self.config
        shards = self.ranks.world if self.split else 1
        return math.ceil(n_rows / (cfg.per_device_train_batch_size * shards)) / cfg.gradient_accumulation_steps

    def start_user(self, user: str) -> UserRun:
        """Put ``user`` in a slot: a fresh adapter initialised from ``--seed`` (as a separate run's), or its saved state."""
        cfg = self.config
        with torch.random.fork_rng(devices=[]):  # the init is a function of the seed alone, whoever else is training
            torch.manual_seed(cfg.seed)
            self.model.add_adapter(user, cfg.adapter_config())
        params = self.model.adapter_parameters(user)
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        total = self.user_total_steps(len(self.train_rows[user]))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, cfg.warmup_updates(total), cfg.lr_scheduler_type))
        run = UserRun(user, self.train_rows[user], self.eval_rows[user], total, params, optimizer, scheduler)
        state = self.job.load_inflight(user)
        if state is not None:
            run.load_state_dict(state)
        return run

    def finish_user(self, run: UserRun) -> None:
        """Write ``<output_dir>/<user>/`` (its best adapter under early stopping) and free its slot."""
        if run.best_params is not None:
            with torch.no_grad():
                for p, best in zip(run.params, run.best_params):
                    p.copy_(best)
        if self.writes:
            summary = {
                "user": run.name,
                "job_id": self.job_id,
                "rank": self.ranks.rank,
                "steps": run.step,
                "total_steps": run.total_steps,
                "stopped_early": run.stopped_early,
                "best_step": run.best_step,
                "best_eval_loss": run.best_eval_loss,
                "train_rows": len(run.examples),
                "eval_rows": len(run.eval_examples),
                "train_tokens": run.train_tokens,
                "log_history": run.log_history,
            }
            self.job.write_user(run.name, self.model.get_adapter(run.name), summary)
            self.job.drop_inflight(run.name)
        self.model.remove_adapter(run.name)

    # ---- one step --------------------------------------------------------------------------------

    def training_step(self, runs: list[UserRun]) -> list[dict]:
        """One optimizer step of every user in ``runs``: micro-batches mix their rows; returns each user's metrics."""
        cfg = self.config
        set_adapter_dropout(self.model, True)
        accum, size = cfg.gradient_accumulation_steps, cfg.per_device_train_batch_size
        rank, world = (self.ranks.rank, self.ranks.world) if self.split else (0, 1)
        micro_batches = []  # per micro-batch: (user index, example) per row, users in slot order
        # Per user: completion tokens of its step (the loss denominator) and all its real tokens (throughput).
        counts = torch.zeros(2, len(runs), dtype=torch.float64, device=self.device)
        for j in range(accum):
            rows = []
            for i, run in enumerate(runs):
                for r in ordered_batches(len(run.examples), size, cfg.seed, run.step * accum + j, rank, world):
                    example = run.examples[r]
                    rows.append((i, example))
                    counts[0, i] += len(example.completion_ids)
                    counts[1, i] += len(example.prompt_ids) + len(example.completion_ids)
            micro_batches.append(rows)
        if self.split:
            self.ranks.all_reduce(counts)
        counts, tokens = counts
        denominators = counts.float().clamp(min=1)
        nll_sums = torch.zeros(len(runs), dtype=torch.float64, device=self.device)
        for rows in micro_batches:
            if not rows:
                continue  # split mode: no rows of these users on this rank (it still joins the all-reduce)
            batch = collate([(e.prompt_ids, e.completion_ids) for _, e in rows], cfg.policy, self.pad_id).to(self.device)
            logp = token_logprobs(self.model, batch, [runs[i].name for i, _ in rows])
            row_user = torch.tensor([i for i, _ in rows], device=self.device)
            per_user = torch.zeros(len(runs), device=self.device).index_add(0, row_user, -(logp * batch.completion_mask).sum(-1))
            # Each user's mean over its own tokens: the sum's gradient w.r.t. user u's adapter is that of u's loss alone.
            (per_user / denominators).sum().backward()
            nll_sums += per_user.detach().double()
        if self.split:
            self.all_reduce_grads([p for run in runs for p in run.params])
            self.ranks.all_reduce(nll_sums)
        logs = []
        for i, run in enumerate(runs):
            grad_norm = float("nan")
            if cfg.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm))
            lr = run.scheduler.get_last_lr()[0]  # the rate this step's update uses
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            run.train_tokens += int(tokens[i])
            logs.append({"loss": float(nll_sums[i] / counts[i]), "grad_norm": grad_norm, "learning_rate": lr, "tokens": int(counts[i])})
        return logs

    def all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Sum the gradients over the ranks in one flat all-reduce (a rank without rows of a user adds zeros)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.ranks.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def eval_due(self, run: UserRun) -> bool:
        every = self.config.eval_interval(math.ceil(self.user_steps_per_epoch(len(run.examples))))
        return bool(run.eval_examples) and ((every > 0 and run.step % every == 0) or run.step >= run.total_steps)

    @torch.no_grad()
    def evaluate(self, runs: list[UserRun]) -> list[float]:
        """Each user's mean completion-token cross-entropy over its eval rows; batches mix users."""
        rank, world = (self.ranks.rank, self.ranks.world) if self.split else (0, 1)  # split mode: each rank scores a share
        rows = [(i, e) for i, run in enumerate(runs) for e in run.eval_examples[rank::world]]
        totals = torch.zeros(len(runs), 2, dtype=torch.float64, device=self.device)  # nll sum, token count
        size = self.config.per_device_eval_batch_size
        set_adapter_dropout(self.model, False)
        for k in range(0, len(rows), size):
            chunk = rows[k : k + size]
            batch = collate([(e.prompt_ids, e.completion_ids) for _, e in chunk], self.config.policy, self.pad_id).to(self.device)
            logp = token_logprobs(self.model, batch, [runs[i].name for i, _ in chunk])
            row_user = torch.tensor([i for i, _ in chunk], device=self.device)
            totals[:, 0].index_add_(0, row_user, -(logp * batch.completion_mask).sum(-1).double())
            totals[:, 1].index_add_(0, row_user, batch.completion_mask.sum(-1).double())
        if self.split:
            self.ranks.all_reduce(totals)
        return (totals[:, 0] / totals[:, 1]).tolist()

    def record_eval(self, run: UserRun, loss: float) -> None:
        """Early stopping (transformers' rule): keep the best weights; stop after ``patience`` evals without improvement."""
        cfg = self.config
        if cfg.early_stopping_patience <= 0:
            return
        if run.best_eval_loss is None or loss < run.best_eval_loss - cfg.early_stopping_threshold:
            run.best_eval_loss, run.best_step, run.evals_without_improvement = loss, run.step, 0
            run.best_params = [p.detach().clone() for p in run.params]
        else:
            run.evals_without_improvement += 1
            run.stopped_early = run.evals_without_improvement >= cfg.early_stopping_patience

    # ---- the loop --------------------------------------------------------------------------------

    def open_job(self) -> dict:
        """Start a job in ``output_dir`` or, with ``--resume_from_checkpoint latest``, continue the one there (rank 0 decides)."""
        cfg, job, error = self.config, None, None
        if self.ranks.is_main:
            data = hashlib.sha256()
            for user in self.train_rows:
                for e in self.train_rows[user] + [None] + self.eval_rows[user]:
                    data.update(json.dumps([user, e.prompt_ids, e.completion_ids] if e else user).encode())
            identity = {
                "model_dir": self.model_dir,
                "users": len(self.train_rows),
                "data_sha256": data.hexdigest(),
                "data_ranks": self.ranks.world if self.split else 1,  # split mode: the ranks share each micro-batch
                "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_FLAGS},
            }
            existing = self.job.read_job()
            if existing is None and cfg.resume_from_checkpoint:
                error = f"--resume_from_checkpoint: no multi-user job in {str(self.job.root)!r} (no {JOB_DIR}/job.json)"
            elif existing is None:
                clash = [u for u in self.train_rows if (self.job.root / u).exists()]
                if clash:
                    error = f"{str(self.job.root / clash[0])!r} already exists; a multi-user job writes <output_dir>/<user>/: choose a new --output_dir"
                else:
                    job = {"job_id": uuid.uuid4().hex, **identity}
                    self.job.write_job(job)
            elif not cfg.resume_from_checkpoint:
                finished = sum(self.job.done(u, existing["job_id"]) for u in self.train_rows)
                error = (
                    f"{str(self.job.root)!r} holds a multi-user job ({finished} of {existing['users']} users finished); "
                    "pass --resume_from_checkpoint latest to continue it, or choose a new --output_dir"
                )
            elif cfg.resume_from_checkpoint != "latest":
                error = f"multi-user jobs resume with --resume_from_checkpoint latest (their state is in {JOB_DIR}/), got {cfg.resume_from_checkpoint!r}"
            else:
                old = {k: existing.get(k) for k in identity}
                # A flag added after the job was written counts as its default (the job ran without it).
                defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
                old["config"] = {**{k: v for k, v in defaults.items() if k in identity["config"]}, **(old["config"] or {})}
                changed = _first_difference(old, identity)
                if changed:
                    error = f"cannot resume the job in {str(self.job.root)!r}: {changed}"
                else:
                    job = existing
                    shutil.rmtree(self.job.dir / "tmp", ignore_errors=True)  # folders of a write the kill interrupted
        job, error = self.ranks.broadcast((job, error))
        if error:
            raise PreftError(error)
        return job

    def train(self) -> UsersResult:
        """Train every user's adapter (this rank's share), writing each as it finishes; returns them all."""
        cfg = self.config
        self.job_id = self.open_job()["job_id"]
        pending = [u for u in self.my_users if not self.job.done(u, self.job_id)]
        self.ranks.barrier()  # every rank has read which users are finished before any rank finishes another
        total = sum(self.user_total_steps(len(self.train_rows[u])) for u in pending)
        desc = f"users {cfg.adapter}-{cfg.policy}"
        bar = tqdm(total=total, disable=cfg.disable_tqdm or not self.ranks.is_main, desc=desc, unit="user-step")
        self.model.eval()
        active: list[UserRun] = []
        steps = 0
        while pending or active:
            while pending and len(active) < self.users_per_step:
                active.append(self.start_user(pending.pop(0)))
                bar.update(active[-1].step)  # a resumed user's done steps
            logs = self.training_step(active)
            steps += 1
            due = [(run, logs[i]) for i, run in enumerate(active) if self.eval_due(run)]
            if due:
                for (run, log), loss in zip(due, self.evaluate([run for run, _ in due])):
                    log["eval_loss"] = loss
                    self.record_eval(run, loss)
            for run, log in zip(active, logs):
                if run.step % cfg.logging_steps == 0 or run.finished or "eval_loss" in log:
                    run.log_history.append({"step": run.step, **log})
            bar.update(len(active))
            for run in [r for r in active if r.finished]:
                bar.total -= run.total_steps - run.step  # early stop
                self.finish_user(run)
                active.remove(run)
                bar.set_postfix(user=run.name, loss=f"{run.log_history[-1]['loss']:.4g}" if run.log_history else "")
            if cfg.save_steps and steps % cfg.save_steps == 0 and self.writes:
                for run in active:
                    self.job.save_inflight(run.name, run.state_dict())
        bar.close()
        self.ranks.barrier()  # every user is written
        return self.collect()

    def collect(self) -> UsersResult:
        """Every user's summary; rank 0 writes ``metrics.jsonl``, ``users.json`` and ``loss.png``."""
        summaries = {u: self.job.summary(u) for u in self.train_rows}
        rows = [{"user": u, **row} for u, s in summaries.items() for row in s["log_history"]]
        plot = None
        if self.ranks.is_main:
            root = self.job.root
            shutil.rmtree(self.job.dir / "tmp", ignore_errors=True)
            (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            table = {u: {k: v for k, v in s.items() if k != "log_history"} for u, s in summaries.items()}
            (root / "users.json").write_text(json.dumps(table, indent=2) + "\n")
            plot = plot_users(
                rows,
                root / "loss.png",
                title=f"{len(summaries)} users, {self.config.adapter} r={self.config.r} policy={self.config.policy}",
            )
        return UsersResult(self.job.root, {u: self.job.root / u for u in summaries}, summaries, rows, plot, self.ranks.is_main)


def _first_difference(old: dict, new: dict, prefix: str = "") -> str | None:
    for key in new:
        if isinstance(new[key], dict) and isinstance(old.get(key), dict):
            found = _first_difference(old[key], new[key], f"{prefix}{key}.")
            if found:
                return found
        elif old.get(key) != new[key]:
            return f"{prefix}{key} was {old.get(key)!r}, now {new[key]!r}"
    return None


def plot_users(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Training loss of every user against its own step (thin lines), the mean over users, and eval loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    by_user: dict[str, list[dict]] = {}
    for row in rows:
        by_user.setdefault(row["user"], []).append(row)
    for ax, key in zip(axes, ("loss", "eval_loss")):
        steps: dict[int, list[float]] = {}
        for user_rows in by_user.values():
            points = [(r["step"], r[key]) for r in user_rows if key in r]
            if points:
                ax.plot(*zip(*points), color="tab:blue", alpha=max(0.05, 1 / len(by_user)), linewidth=0.8)
                for s, v in points:
                    steps.setdefault(s, []).append(v)
        if steps:
            xs = sorted(steps)
            ax.plot(xs, [sum(steps[s]) / len(steps[s]) for s in xs], color="black", linewidth=1.6, label="mean over users")
            ax.legend()
        ax.set_xlabel("the user's optimizer step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sft_users(model_dir: str | Path, dataset: str | Path, config: SFTConfig | None = None, **overrides: Any) -> UsersResult:
    """Train one adapter per user of ``dataset`` in one job; ``result.adapters[user]`` is ``<output_dir>/<user>/``.

    ``sft_users("default", "users.jsonl", SFTConfig(output_dir="runs/users", r=8, max_steps=20))``.
    """
    config = dataclasses.replace(config, **overrides) if config else SFTConfig(**overrides)
    return MultiUserSFTTrainer(model_dir, config, dataset).train()

"""What SFT and GRPO share: the model with one trainable adapter, the masked log-probs, the
optimiser and schedule, resumable checkpoints, metrics and the progress bar.

Why a small explicit loop rather than ``transformers.Trainer`` or TRL: the one thing that must be
right is the per-token ``adapter_mask`` (prompt adapted, completion not), and GRPO's rollouts must
come from the reference generator with the serving semantics. Both are a few lines here and
would be overrides of private hooks there. Data parallelism comes from ``accelerate``
(``accelerate launch -m preft.cli train sft ...``): the loop shards rows by rank, all-reduces the
completion-token counts the loss is normalised by, and saves on the main process only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from preft.errors import PreftError
from preft.hf import PreftModel
from preft.models import resolve_model
from preft.train.config import TrainConfig
from preft.train.data import Batch
from preft.train.metrics import MetricsLog

STATE_NAME = "trainer_state.pt"


@dataclass
class TrainResult:
    """What a finished run produced."""

    adapter_path: Path  # the final adapter (== output_dir, as TRL saves it), PEFT/preft layout, directly servable
    output_dir: Path
    steps: int
    metrics: list[dict] = field(default_factory=list)  # the rows of metrics.jsonl
    plot_path: Path | None = None

    def last(self, key: str) -> float | None:
        values = [r[key] for r in self.metrics if key in r]
        return values[-1] if values else None


def completion_logits(model: PreftModel, batch: Batch, adapter_name: str | list[str | None] | None) -> tuple[Tensor, int]:
    """Float logits ``[B, T - start, V]`` that predict tokens ``start .. T-1``, and ``start`` (the first completion column).

    One teacher-forced forward with ``batch.adapter_mask`` (the serving mask). Only the logits that
    predict completion tokens are materialised (``logits_to_keep``): a long prompt costs no
    ``[T, vocab]`` float tensor.
    """
    length = batch.input_ids.shape[1]
    has_completion = batch.completion_mask.any(dim=0)
    start = int(has_completion.float().argmax()) if bool(has_completion.any()) else length - 1
    start = max(start, 1)
    keep = length - start + 1  # logits at positions start-1 .. T-1
    out = model(
        batch.input_ids,
        attention_mask=batch.attention_mask,
        adapter_mask=batch.adapter_mask,
        adapter_names=adapter_name,
        logits_to_keep=keep,
    )
    return out.logits[:, :-1].float(), start  # positions start-1 .. T-2 predict tokens start .. T-1


def gather_logprobs(logits: Tensor, batch: Batch, start: int, temperature: float = 1.0) -> Tensor:
    """``[B, T]`` log-probs of ``batch``'s tokens under ``logits / temperature``; 0 before column ``start``."""
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch.input_ids[:, start:]
    picked = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.cat([picked.new_zeros(picked.shape[0], start), picked], dim=1)


def token_logprobs(model: PreftModel, batch: Batch, adapter_name: str | list[str | None] | None, temperature: float = 1.0) -> Tensor:
    """``[B, T]`` log-probability of each token given the tokens before it; 0 before the first completion token.

    The log-prob of completion token ``t`` is exactly what incremental generation computes for it
    (the serving ``adapter_mask``). ``adapter_name`` None runs the base model (the KL reference); a list
    names each row's adapter (a batch mixing users).
    """
    logits, start = completion_logits(model, batch, adapter_name)
    return gather_logprobs(logits, batch, start, temperature)


def load_model(model_dir: str | Path, config: TrainConfig, device: torch.device) -> tuple[PreftModel, Any]:
    """The base model (frozen) on ``device``, wrapped in a ``PreftModel``, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = config.bf16 if config.bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    model_dir = resolve_model(model_dir)  # a folder, a .gguf file (converted once) or "default"
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PreftModel(hf_model.to(device))
    model.eval()  # base dropout off; adapter dropout is switched on in train() below
    return model, tokenizer


def enable_gradient_checkpointing(model: PreftModel) -> None:
    """Recompute each decoder layer in the backward pass (``--gradient_checkpointing``).

    transformers checkpoints a layer only while that layer is in training mode; the frozen base stays in
    eval mode (no base dropout), so only the layers themselves are flagged as training. Non-reentrant
    checkpointing: the inputs of a frozen base need not require grad. The adapters read the batch's mask
    when the layer is recomputed, which is the one the forward set (each backward follows its forward).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model.model, "supports_gradient_checkpointing", False):
        raise PreftError(f"--gradient_checkpointing: {type(model.model).__name__} does not support gradient checkpointing")
    base = model.model
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.24 renamed it (the old name is deprecated)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True


def save_adapter_into(model: PreftModel, name: str, folder: Path) -> Path:
    """Write the adapter's files (``adapter_config.json``, ``adapter_model.safetensors``) into ``folder`` itself.

    ``folder`` may hold other files (metrics, checkpoints), so the adapter is written to a staging folder
    beside them and each file moved in with one rename: a reader never sees a half-written file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=folder))
    try:
        model.save_adapter(name, str(staging / "adapter"))
        for file in sorted((staging / "adapter").iterdir()):
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def model_card(config: TrainConfig, model_dir: str, trainer: str) -> str:
    """The ``README.md`` written beside the final adapter (as TRL/PEFT write one): what it is and how to load it."""
    load = (
        "from peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, OUTPUT_DIR)  # applies it to every token (policy all)\n"
        if config.adapter == "lora"
        else "# PEFT has no ReFT method: PeftModel.from_pretrained refuses this folder (KeyError: 'PREFT_REFT').\n"
    )
    return (
        f"---\nbase_model: {model_dir}\nlibrary_name: preft\ntags: [preft, {config.adapter}, {trainer}]\n---\n\n"
        f"# {config.adapter} adapter (r={config.r}, policy={config.policy}) trained by preft {trainer}\n\n"
        "`adapter_config.json` + `adapter_model.safetensors` (the PEFT layout; the `preft` section records the policy). "
        "Every `checkpoint-<step>/` holds the same two files.\n\n"
        "```python\nfrom preft.adapters import load_adapter\nadapter = load_adapter(OUTPUT_DIR)  # or: preft serve MODEL --adapter name=OUTPUT_DIR\n"
        f"{load}```\n"
    )


def set_adapter_dropout(model: PreftModel, training: bool) -> None:
    """Only the adapters' dropout follows train/eval; the frozen base stays in eval mode."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and (".adapters." in name or name.startswith("reft.")):
            module.train(training)


class SingleProcess:
    """The few ``accelerate.Accelerator`` members the loop uses, for one process without ``accelerate`` installed."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, device: torch.device):
        self.device = device

    def prepare(self, *objects: Any) -> Any:
        return objects[0] if len(objects) == 1 else objects

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def reduce(self, tensor: Tensor, reduction: str = "sum") -> Tensor:
        return tensor

    def gather(self, tensor: Tensor) -> Tensor:
        return tensor

    def no_sync(self, model: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def wait_for_everyone(self) -> None:
        pass


def make_accelerator(device: str | torch.device | None) -> tuple[Any, torch.device]:
    """An ``accelerate.Accelerator`` (data parallel under ``accelerate launch``; a plain process otherwise).

    The schedule steps once per optimizer step on every rank (``step_scheduler_with_optimizer=False``:
    accelerate would otherwise step it ``num_processes`` times). ``device`` (``--device``) overrides the
    placement of a single process; under ``accelerate launch`` each rank uses its own device.
    Returns the accelerator and this process's device.
    """
    wanted = torch.device(device) if device else None
    try:
        from accelerate import Accelerator
    except ImportError:
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise PreftError("multi-process training needs accelerate: pip install 'preft[train]'") from None
        single = SingleProcess(wanted or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return single, single.device
    cpu = wanted.type == "cpu" if wanted is not None else not torch.cuda.is_available()  # cpu=True: gloo across CPU processes
    accelerator = Accelerator(cpu=cpu, device_placement=wanted is None or cpu, step_scheduler_with_optimizer=False)
    if wanted is not None and accelerator.num_processes == 1:
        return accelerator, wanted
    return accelerator, accelerator.device


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str):
    def scale(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return scale


class AdapterTrainer:
    """Base trainer: subclasses define ``total_steps`` and ``training_step`` (one optimizer step)."""

    plot_panels: dict[str, list[str]] = {"loss": ["loss", "eval_loss"]}
    plot_name = "loss.png"
    updates_per_step = 1  # optimizer updates per training step (GRPO's num_iterations)

    def __init__(self, model_dir: str | Path, config: TrainConfig, model: PreftModel | None = None, tokenizer: Any = None):
        self.config = config
        self.model_dir = str(model_dir if model is not None else resolve_model(model_dir))
        self.accelerator, self.device = make_accelerator(config.device if model is None else next(model.parameters()).device)
        acc = self.accelerator
        if model is None:
            model, tokenizer = load_model(model_dir, config, self.device)
        self.model, self.tokenizer = model, tokenizer  # the plain PreftModel: generation, saving, reference forwards
        self.name = config.adapter_name
        torch.manual_seed(config.seed)  # the adapter's init is part of the seeded run (the same on every rank)
        model.add_adapter(self.name, config.adapter_config())
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.params = model.adapter_parameters(self.name)
        optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        if acc.num_processes > 1:
            # DDP over the adapter parameters only (the base is frozen); training forwards go through it.
            self.train_model, self.optimizer = acc.prepare(model, optimizer)
        else:
            self.train_model, self.optimizer = model, acc.prepare(optimizer)
        self.world_size, self.rank = acc.num_processes, acc.process_index
        self.is_main = acc.is_main_process
        self.output_dir = Path(config.output_dir)
        self.metrics = MetricsLog(self.output_dir, write=self.is_main)
        self.step = 0
        self.num_tokens = 0  # TRL's num_tokens: prompt + completion tokens trained on so far, every process
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    # ---- subclass interface ------------------------------------------------------------------

    def total_steps(self) -> int:
        raise NotImplementedError

    def steps_per_epoch(self) -> float:
        """Optimizer steps per pass over the training rows (for TRL's ``epoch`` metric)."""
        raise NotImplementedError

    def training_step(self) -> dict:
        """Run one optimizer step (all micro-batches) and return its metrics."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        return {}

    def eval_due(self) -> bool:
        return False

    # ---- shared loop ---------------------------------------------------------------------------

    def set_train(self, training: bool) -> None:
        set_adapter_dropout(self.model, training)

    def optimizer_step(self) -> float:
        grad_norm = float("nan")
        if self.config.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()  # once per update on every rank (see make_accelerator)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def train(self) -> TrainResult:
        """Run to ``total_steps``, resuming if asked; save checkpoints and the final adapter."""
        cfg = self.config
        total = self.total_steps()
        updates = total * self.updates_per_step
        warmup = cfg.warmup_updates(updates)
        schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(updates, warmup, cfg.lr_scheduler_type))
        self.scheduler = self.accelerator.prepare(schedule)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.resume_from_checkpoint:
            self.load_checkpoint(self.resolve_checkpoint(cfg.resume_from_checkpoint))
        self.metrics.resume(self.step)
        if self.is_main:
            config_json = json.dumps({"model_dir": self.model_dir, "num_processes": self.world_size, **asdict(cfg)}, indent=2)
            (self.output_dir / "train_config.json").write_text(config_json + "\n")
        desc = f"{type(self).__name__} {cfg.adapter}-{cfg.policy}"
        bar = tqdm(total=total, initial=self.step, disable=cfg.disable_tqdm or not self.is_main, desc=desc)
        while self.step < total:
            self.set_train(True)
            lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
            logs = self.training_step()
            self.step += 1
            logs["learning_rate"] = lr
            logs["epoch"] = self.step / self.steps_per_epoch()
            if self.eval_due() or self.step == total:
                self.set_train(False)
                logs.update(self.evaluate())
            if self.step % cfg.logging_steps == 0 or self.step == total or any(k.startswith("eval") for k in logs):
                self.metrics.log(self.step, logs)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "eval_loss", "reward")})
            if (cfg.save_steps and self.step % cfg.save_steps == 0) or self.step == total:
                self.save_checkpoint()
        bar.close()
        self.set_train(False)
        plot = None
        if self.is_main:  # the final adapter lives in output_dir itself, as TRL/PEFT users load it
            save_adapter_into(self.model, self.name, self.output_dir)
            self.write_trainer_state(self.output_dir)
            (self.output_dir / "README.md").write_text(model_card(cfg, self.model_dir, type(self).__name__))
            plot = self.metrics.plot(self.plot_panels, self.plot_name, title=f"{cfg.adapter} r={cfg.r} policy={cfg.policy}")
        self.accelerator.wait_for_everyone()
        return TrainResult(self.output_dir, self.output_dir, self.step, list(self.metrics.rows), plot)

    def write_trainer_state(self, folder: Path) -> None:
        """``trainer_state.json`` as transformers writes it (global_step, epoch, log_history, ...), for tools that read it."""
        state = {
            "global_step": self.step,
            "max_steps": self.total_steps(),
            "epoch": self.step / self.steps_per_epoch(),
            "num_train_epochs": self.config.num_train_epochs,
            "logging_steps": self.config.logging_steps,
            "save_steps": self.config.save_steps,
            "train_batch_size": self.config.per_device_train_batch_size,
            "num_input_tokens_seen": self.num_tokens,
            "log_history": list(self.metrics.rows),
        }
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")

    # ---- checkpoints ---------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> Path:
        """``checkpoint-<step>/``: the servable adapter's files (PEFT loads the folder as it is) plus everything
        needed to continue exactly (``trainer_state.pt``) and TRL's ``trainer_state.json``.

        Written by the main process (the adapter is identical on every rank); the others wait for it.
        """
        path = self.output_dir / f"checkpoint-{self.step}"
        if self.is_main:
            self._write_checkpoint(path)
        self.accelerator.wait_for_everyone()
        return path

    def _write_checkpoint(self, path: Path) -> None:
        self.model.save_adapter(self.name, str(path))  # a new folder holding the adapter files, in one rename
        self.write_trainer_state(path)
        state = {
            "step": self.step,
            "num_tokens": self.num_tokens,
            "params": self.trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
            },
        }
        torch.save(state, path / STATE_NAME)
        if self.config.save_total_limit:
            for old in sorted(self.checkpoints())[: -self.config.save_total_limit]:
                shutil.rmtree(old[1])

    def checkpoints(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.output_dir.glob("checkpoint-*"):
            if (p / STATE_NAME).is_file() and p.name.split("-")[-1].isdigit():
                found.append((int(p.name.split("-")[-1]), p))
        return sorted(found)

    def resolve_checkpoint(self, where: str) -> Path:
        if where == "latest":
            found = self.checkpoints()
            if not found:
                raise PreftError(f"--resume_from_checkpoint latest: no checkpoint-*/ with {STATE_NAME} in {str(self.output_dir)!r}")
            return found[-1][1]
        path = Path(where)
        if not (path / STATE_NAME).is_file():
            raise PreftError(f"--resume_from_checkpoint {where!r} has no {STATE_NAME} (expected a checkpoint-<step> directory or 'latest')")
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
        params = dict(self.model.named_parameters())
        missing = set(state["params"]) ^ {n for n, p in params.items() if p.requires_grad}
        if missing:
            raise PreftError(f"checkpoint {str(path)!r} does not fit this adapter config (parameters differ: {sorted(missing)[:4]})")
        with torch.no_grad():
            for name, value in state["params"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        random.setstate(state["rng"]["python"])
        self.step = int(state["step"])
        self.num_tokens = int(state.get("num_tokens", 0))  # 0 for checkpoints written before num_tokens was saved


def ordered_batches(n_rows: int, batch_size: int, seed: int, index: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Rows of micro-batch ``index`` in a seeded per-epoch shuffle: a pure function, so resume needs no data state.

    With ``world_size`` processes the global micro-batch has ``batch_size * world_size`` rows and
    ``rank`` takes its ``rank``-th contiguous share (possibly empty at the end of an epoch), so N
    processes see exactly the rows one process would see with an N times larger batch.
    """
    rows = _ordered_rows(n_rows, batch_size * world_size, seed, index)
    return rows[rank * batch_size : (rank + 1) * batch_size]


def _ordered_rows(n_rows: int, batch_size: int, seed: int, index: int) -> list[int]:
    per_epoch = math.ceil(n_rows / batch_size)
    epoch, k = divmod(index, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return order[k * batch_size : (k + 1) * batch_size]

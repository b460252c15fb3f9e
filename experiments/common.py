"""What the experiments share: loading the base model once, training an adapter on synthetic rows
with ``preft.train`` (the project's one SFT loop), greedy answers and per-position losses.

Run the experiments as modules from the repository root (``python -m experiments.quality sft``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from preft.hf import PreftModel, generate
from preft.train import SFTConfig, SFTTrainer, TrainResult
from preft.train.data import collate
from preft.train.trainer import token_logprobs

RESULTS = Path("experiments/results")
DEFAULT_BASE = "experiments/toy_base"  # the 1.7M toy of the first quality study; no longer served by default


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load_base(model_dir: str | Path) -> tuple[PreftModel, Any]:
    """The base model in float32 on CPU, wrapped for adapters, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PreftModel(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def train_adapter(
    model: PreftModel,
    tokenizer: Any,
    model_dir: str | Path,
    train_rows: list[dict],
    eval_rows: list[dict] | None,
    output_dir: Path,
    keep: bool = False,
    **fields: Any,
) -> TrainResult:
    """SFT one adapter on ``train_rows`` (chat rows) with ``preft.train``; removed from ``model`` afterwards unless ``keep``."""
    train_path = write_jsonl(train_rows, output_dir / "train.jsonl")
    eval_path = write_jsonl(eval_rows, output_dir / "eval.jsonl") if eval_rows else None
    config = SFTConfig(output_dir=str(output_dir), device="cpu", bf16=False, disable_tqdm=True, logging_steps=10, **fields)
    trainer = SFTTrainer(model_dir, config, train_path, eval_dataset=eval_path, model=model, tokenizer=tokenizer)
    result = trainer.train()
    if not keep:
        model.remove_adapter(config.adapter_name)
    return result


def chat_prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template with the assistant header (what a server sends)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy_answers(
    model: PreftModel, tokenizer: Any, prompts: list[list[dict]], adapter: str | None, max_new_tokens: int = 48
) -> list[str]:
    """Greedy answers (serving semantics of the adapter's policy) to chat prompts, special tokens stripped."""
    answers = []
    for i in range(0, len(prompts), 64):
        ids = [chat_prompt_ids(tokenizer, p) for p in prompts[i : i + 64]]
        out = generate(
            model, ids, adapter, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        answers += [tokenizer.decode(t, skip_special_tokens=True).strip() for t in out.token_ids]
    return answers


def split_rows(rows: list[dict]) -> tuple[list[list[dict]], list[str]]:
    """Chat rows -> (prompts without the final answer, the answers)."""
    return [r["messages"][:-1] for r in rows], [r["messages"][-1]["content"] for r in rows]


@torch.no_grad()
def completion_position_nll(
    model: PreftModel, tokenizer: Any, rows: list[dict], adapter: str | None, policy: str, max_positions: int
) -> tuple[list, list]:
    """Summed NLL and token count at each completion position ``0..max_positions-1``, under ``policy``'s serving mask.

    Teacher-forced with ``preft.train``'s own masked forward (equal to incremental generation, DESIGN §1).
    """
    nll_sum, count = [0.0] * max_positions, [0] * max_positions
    pad = tokenizer.pad_token_id
    for i in range(0, len(rows), 32):
        pairs = []
        for r in rows[i : i + 32]:
            prompt = chat_prompt_ids(tokenizer, r["messages"][:-1])
            full = tokenizer.apply_chat_template(r["messages"], tokenize=False)
            completion = tokenizer(full, add_special_tokens=False)["input_ids"][len(prompt) :]
            pairs.append((prompt, completion))
        batch = collate(pairs, policy, pad)
        logp = token_logprobs(model, batch, adapter)
        for b, (prompt, completion) in enumerate(pairs):
            for j in range(min(len(completion), max_positions)):
                nll_sum[j] -= float(logp[b, len(prompt) + j])
                count[j] += 1
    return nll_sum, count

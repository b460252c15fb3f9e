"""Train preft's own small base model (Llama architecture) on the synthetic instruction corpus.

    nice -n 10 python experiments/train_base.py --out experiments/toy_base

Plain PyTorch loop over a transformers ``LlamaForCausalLM``: data is generated on the fly from a
seed (``preft.synthetic``), the loss is on assistant tokens only, and the run writes the HF model
directory (config, safetensors, byte-level tokenizer with a ChatML template), ``train_log.json``
(loss curve + per-skill greedy accuracy) and ``loss.png``. One CPU thread by default: the
machine it was written on is shared.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from preft import synthetic
from preft.tiny import build_tokenizer

IGNORE = -100


def build_chat_tokenizer() -> PreTrainedTokenizerFast:
    """preft's byte-level tokenizer with ``<|im_end|>`` as EOS, so generation stops at the end of a turn."""
    tokenizer = build_tokenizer()
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def render_prompt(messages: list[dict[str, str]]) -> str:
    """ChatML text of ``messages`` followed by the assistant header (what the chat template renders)."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def encode_row(tokenizer: PreTrainedTokenizerFast, row: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a ``messages`` or ``prompt``/``completion`` row; the completion ends with EOS."""
    if "messages" in row:
        prompt, completion = row["messages"][:-1], row["messages"][-1]["content"]
    else:
        prompt, completion = row["prompt"], row["completion"]
    prompt_ids = tokenizer.encode(render_prompt(prompt), add_special_tokens=False)
    completion_ids = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (loss on completion tokens only)."""
    seqs = [(p + c)[:max_len] for p, c in pairs]
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, ((p, _), s) in enumerate(zip(pairs, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
    return ids, attn, labels


def model_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def skill_accuracy(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, per_skill: int, seed: int, max_new_tokens: int = 48
) -> dict:
    """Greedy exact-match accuracy per skill on held-out rows (a different seed from training)."""
    from preft.hf import PreftModel, generate

    wrapped = PreftModel(model).eval()
    result = {}
    for skill in synthetic.SKILLS:
        rows = synthetic.instruction_corpus(per_skill, seed=seed, skills=[skill])
        prompts = [encode_row(tokenizer, r)[0] for r in rows]
        out = generate(
            wrapped, prompts, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in out.token_ids]
        result[skill] = sum(t == r["messages"][-1]["content"] for t, r in zip(texts, rows)) / len(rows)
    return result


def plot_loss(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps, losses = zip(*log["train_loss"])
    ax.plot(steps, losses, label="train (completion tokens)", alpha=0.6)
    if log["eval_loss"]:
        ax.plot(*zip(*log["eval_loss"]), "o-", label="held-out")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"preft base model: {log['params'] / 1e6:.1f}M params, {log['tokens_seen'] / 1e6:.1f}M tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def eval_loss(model: LlamaForCausalLM, batches: list) -> float:
    model.eval()
    total, count = 0.0, 0
    for ids, attn, labels in batches:
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        target = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
        ).item()
        count += int((target != IGNORE).sum())
    model.train()
    return total / count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="experiments/toy_base", help="model directory to write")
    p.add_argument("--log-dir", default=None, help="where loss.png / train_log.json go (default: experiments/results/base)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-position-embeddings", type=int, default=1024)
    p.add_argument("--max-len", type=int, default=160, help="training sequences are cut to this many tokens")
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--eval-per-skill", type=int, default=25, help="held-out rows per skill for greedy accuracy at the end")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=None, help="stop early (and still save) after this much wall time")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = build_chat_tokenizer()
    config = model_config(args, tokenizer)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98)
    )
    pad = tokenizer.pad_token_id
    # Training rows come from seed `seed`, held-out rows from a disjoint seed stream.
    train_rows = synthetic.instruction_corpus(args.steps * args.batch_size, seed=args.seed)
    held_out = [encode_row(tokenizer, r) for r in synthetic.instruction_corpus(256, seed=args.seed + 10_000)]
    eval_batches = [collate(held_out[i : i + 64], pad, args.max_len) for i in range(0, len(held_out), 64)]

    log = {"args": vars(args), "params": params, "train_loss": [], "eval_loss": [], "tokens_seen": 0}
    log_dir = Path(args.log_dir or "experiments/results/base")
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    model.train()
    bar = tqdm(range(args.steps), desc=f"train base ({params / 1e6:.2f}M params)")
    for step in bar:
        rows = train_rows[step * args.batch_size : (step + 1) * args.batch_size]
        ids, attn, labels = collate([encode_row(tokenizer, r) for r in rows], pad, args.max_len)
        for group in optim.param_groups:
            group["lr"] = lr_at(step, args)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        log["tokens_seen"] += int(attn.sum())
        log["train_loss"].append((step, loss.item()))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        last = step == args.steps - 1 or (args.max_minutes and time.time() - start > 60 * args.max_minutes)
        if (step + 1) % args.eval_every == 0 or last:
            log["eval_loss"].append((step, eval_loss(model, eval_batches)))
            tqdm.write(f"step {step + 1}: held-out loss {log['eval_loss'][-1][1]:.4f}")
            plot_loss(log, log_dir / "loss.png")
        if last:
            break
    log["train_minutes"] = (time.time() - start) / 60
    log["steps_done"] = step + 1
    model.eval()
    log["skill_accuracy"] = skill_accuracy(model, tokenizer, args.eval_per_skill, seed=args.seed + 20_000)
    tqdm.write(json.dumps(log["skill_accuracy"], indent=1))

    out = Path(args.out)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eos|>")],
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (log_dir / "train_log.json").write_text(json.dumps(log, indent=1))
    plot_loss(log, log_dir / "loss.png")
    print(f"wrote {out} ({params / 1e6:.2f}M params) and {log_dir}/loss.png in {log['train_minutes']:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

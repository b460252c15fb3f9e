"""The peer a user would otherwise pick: transformers + PEFT mixed-adapter batch generation.

Static batches of ``max_num_seqs`` requests, each row with its own LoRA adapter
(``generate(..., adapter_names=[...])``), greedy, every row generating the batch's longest output
length (``min_new_tokens``); only each request's own output length counts as useful tokens.
Same adapters (same seeds) and requests as the ``lora`` mode. Run on GPU when ``peft`` is installed.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from preft.bench.throughput import BenchConfig, Request, adapter_config, adapter_seed


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def make_peft_peer(
    model_dir: Path, cfg: BenchConfig, model_config: Any, dtype: torch.dtype, device: torch.device
) -> Callable[[int, list[Request]], dict]:
    """``peer(num_adapters, workload) -> result row`` running the workload through transformers + PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from preft.adapters import save_adapter
    from preft.tiny import random_adapter

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    folder = Path(tempfile.mkdtemp(prefix="preft-peer-"))
    config = adapter_config("lora", cfg.rank, cfg.target_modules)
    state: dict[str, Any] = {"model": None, "loaded": 0}

    def ensure_adapters(n: int) -> Any:
        for i in tqdm(range(state["loaded"], n), desc="PEFT peer: load adapters", unit="adapter", leave=False):
            path = folder / f"a{i}"
            save_adapter(random_adapter(model_config, config, seed=adapter_seed(cfg, "lora", i)), path)
            if state["model"] is None:
                state["model"] = PeftModel.from_pretrained(base, path, adapter_name=f"a{i}").eval()
            else:
                state["model"].load_adapter(path, adapter_name=f"a{i}")
        state["loaded"] = max(state["loaded"], n)
        return state["model"]

    def run(n: int, workload: list[Request]) -> dict:
        model = ensure_adapters(n)
        batch_size = cfg.max_num_seqs
        useful = prompt_tokens = 0
        start = time.perf_counter()
        for i in tqdm(range(0, len(workload), batch_size), desc=f"PEFT peer x{n}", unit="batch", leave=False):
            batch = workload[i : i + batch_size]
            width = max(len(r.prompt) for r in batch)
            ids = torch.tensor([[0] * (width - len(r.prompt)) + r.prompt for r in batch], device=device)
            mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch], device=device)
            new = max(r.output_len for r in batch)
            with torch.no_grad():
                model.generate(
                    input_ids=ids, attention_mask=mask, adapter_names=[f"a{r.adapter_index}" for r in batch],
                    max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                )  # fmt: skip
            useful += sum(r.output_len for r in batch)
            prompt_tokens += sum(len(r.prompt) for r in batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        return {
            "mode": "peft-lora",
            "num_adapters": n,
            "batch_size": batch_size,
            "output_tokens": useful,
            "elapsed_s": elapsed,
            "output_tok_s": useful / elapsed,
            "total_tok_s": (useful + prompt_tokens) / elapsed,
        }

    return run

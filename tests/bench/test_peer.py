"""The transformers + PEFT peer: same requests, fixed output lengths, mixed adapters in one batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from preft.bench.throughput import BenchConfig, make_workload

pytest.importorskip("peft")


def test_peft_peer_generates_every_requested_token_with_mixed_adapters(tiny_checkpoint) -> None:
    from preft.bench.peer import make_peft_peer

    path = tiny_checkpoint("llama")
    cfg = BenchConfig(num_requests=6, prompt_len="3-6", output_len="2-4", rank=4, max_num_seqs=4)
    peer = make_peft_peer(path, cfg, AutoConfig.from_pretrained(path), torch.float32, torch.device("cpu"))
    workload = make_workload(cfg, 3)
    row = peer(3, workload)
    assert row["mode"] == "peft-lora" and row["num_adapters"] == 3 and row["batch_size"] == 4
    assert row["output_tokens"] == sum(r.output_len for r in workload), "only each request's own output length is useful work"
    assert row["output_tok_s"] > 0 and row["total_tok_s"] > row["output_tok_s"]

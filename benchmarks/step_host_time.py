"""Host time of one engine step's input preparation and of the PyTorch attention path, on CPU.

    OMP_NUM_THREADS=1 python benchmarks/step_host_time.py

- ``ModelRunner.prepare`` (step inputs into the persistent buffers; on CPU no copy follows) for a decode
  batch of 256 and a mixed step (255 decodes + one 512-token prefill chunk), block size 16, contexts
  100-1000, over 200 consecutive steps (each step appends a token, sometimes a block).
- ``paged_attention`` on SmolLM2-135M shapes (9 heads, 3 KV heads, head_dim 64; x30 layers), for
  decode, mixed and prefill steps; the first layer also builds the step's plan.
Medians of thread CPU time (robust on a shared machine).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time

import torch

from preft.engine import SamplingParams
from preft.engine.adapter_manager import AdapterManager
from preft.engine.attention import build_metadata, paged_attention
from preft.engine.model import load_model
from preft.engine.model_runner import ModelRunner, ScheduledSeq
from preft.engine.sequence import Sequence
from preft.tiny import build_tiny_checkpoint

BS = 16


def prepare_times(steps: int = 200) -> dict[str, float]:
    rng = random.Random(0)
    model = load_model(build_tiny_checkpoint(tempfile.mkdtemp() + "/m", "llama"), torch.float32, "cpu")
    num_blocks = 2 * 256 * 80 + 400
    runner = ModelRunner(model, AdapterManager.__new__(AdapterManager), num_blocks, BS, 256, 1024, 1280)
    free = list(range(num_blocks))
    rng.shuffle(free)

    def make(n: int) -> Sequence:
        seq = Sequence("r", [rng.randrange(5, 250) for _ in range(n)], SamplingParams(max_tokens=10000))
        seq.block_table = [free.pop() for _ in range(-(-n // BS))]
        return seq

    result = {}
    for name, mixed in (("decode 256", False), ("mixed 255 + 512-token chunk", True)):
        seqs = [make(rng.randint(100, 1000)) for _ in range(255 if mixed else 256)]
        chunk = make(1024) if mixed else None
        times = []
        for step in range(steps):
            for seq in seqs:
                seq.token_ids.append(7)
                if -(-seq.num_tokens // BS) > len(seq.block_table):
                    seq.block_table.append(free.pop())
            batch = [ScheduledSeq(seq, seq.num_tokens - 1, 1) for seq in seqs]
            if mixed:
                batch.insert(100, ScheduledSeq(chunk, 512 * (step % 2), 512))
            start = time.thread_time()
            runner.prepare(batch)
            times.append(time.thread_time() - start)
        result[name] = statistics.median(times[20:]) * 1e3
    return result


def attention_times(layers: int = 30) -> dict[str, tuple[float, float]]:
    heads, kv_heads, head_dim = 9, 3, 64
    rng = random.Random(1)
    cases = {
        "decode 16 (contexts 200-600)": ([1] * 16, [rng.randint(200, 600) for _ in range(16)]),
        "mixed: 15 decodes + 256-token chunk at 256": ([1] * 15 + [256], [rng.randint(200, 600) for _ in range(15)] + [512]),
        "prefill 512": ([512], [512]),
        "decode 64 (contexts 50-1000)": ([1] * 64, [rng.randint(50, 1000) for _ in range(64)]),
    }
    result = {}
    for name, (query_lens, context_lens) in cases.items():
        num_blocks = sum(-(-c // BS) for c in context_lens) + 8
        free = list(range(num_blocks))
        random.Random(0).shuffle(free)
        tables = [[free.pop() for _ in range(-(-c // BS))] for c in context_lens]
        k, v = torch.randn(2, num_blocks, BS, kv_heads, head_dim).unbind(0)
        q = torch.randn(sum(query_lens), heads, head_dim)
        slots = torch.zeros(sum(query_lens), dtype=torch.int32)
        plan_and_layer, all_layers = [], []
        for _ in range(5):
            meta = build_metadata(slots, query_lens, context_lens, tables)
            start = time.thread_time()
            paged_attention(q, k, v, meta, head_dim**-0.5)
            plan_and_layer.append(time.thread_time() - start)
            start = time.thread_time()
            for _ in range(layers):
                paged_attention(q, k, v, meta, head_dim**-0.5)
            all_layers.append(time.thread_time() - start)
        result[name] = (min(plan_and_layer) * 1e3, min(all_layers) * 1e3)
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name, ms in prepare_times().items():
        print(f"prepare, {name}: {ms:.3f} ms (median)")
    for name, (first, total) in attention_times().items():
        print(f"attention, {name}: first layer incl. plan {first:.2f} ms, 30 layers {total:.1f} ms (min of 5)")

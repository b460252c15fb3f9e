"""The Triton paged decode attention against the PyTorch paged attention.

On CPU the kernel runs under Triton's interpreter, which needs ``TRITON_INTERPRET=1`` before
Triton is imported: the check runs this file as a script in a subprocess. float32, max |error|
<= 1e-5; on a CUDA machine the same cases also run compiled, in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ATOL = 1e-5
# (batch, heads, kv_heads, head_dim, block_size, max_context, sliding_window)
CASES = [(5, 4, 2, 16, 4, 23, None), (3, 8, 1, 32, 16, 70, None), (4, 2, 2, 24, 8, 40, None), (6, 4, 2, 16, 4, 30, 5)]


def max_error(device: str) -> float:
    from preft.engine.attention import build_metadata, paged_attention
    from preft.engine.paged_decode_triton import paged_decode_attention

    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for batch, heads, kv_heads, head_dim, block_size, max_context, window in CASES:
        contexts = [int(c) for c in torch.randint(1, max_context + 1, (batch,), generator=gen)]
        contexts[0] = max_context
        num_blocks = sum(-(-c // block_size) for c in contexts) + 3
        order = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, non-contiguous blocks
        tables, used = [], 0
        for c in contexts:
            n = -(-c // block_size)
            tables.append(order[used : used + n])
            used += n
        k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(device)
        v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(device)
        q = torch.randn(batch, heads, head_dim, generator=gen).to(device)
        slots = torch.tensor(
            [tables[b][(c - 1) // block_size] * block_size + (c - 1) % block_size for b, c in enumerate(contexts)], device=device
        )
        meta = build_metadata(slots, list(range(batch)), [1] * batch, contexts, tables, block_size, window)
        expected = paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5)  # the PyTorch padded path
        width = max(len(t) for t in tables)
        padded_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
        got = paged_decode_attention(q, k_cache, v_cache, padded_tables, torch.tensor(contexts, device=device), head_dim**-0.5, window)
        worst = max(worst, (got - expected).abs().max().item())
    return worst


def test_triton_paged_decode_matches_pytorch_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) <= ATOL


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_paged_decode_matches_pytorch_compiled():
    assert max_error("cuda") <= ATOL


if __name__ == "__main__":
    import preft.engine.kernels  # noqa: F401  (patches Triton's interpreter for NumPy >= 2.4)

    print(max_error("cpu"))

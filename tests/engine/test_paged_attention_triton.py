"""The Triton varlen paged attention against the reference (``attention_reference``), every case of ``CASES``.

Mixed steps (decodes, prefill chunks, prefix-cache offsets, contexts on and around block edges),
GQA ratios 1, 3 and 7, float32 and bfloat16, sliding window, the decode-only grid, and the
flash-decoding split forced on (``num_splits``). On CPU the kernel runs under Triton's interpreter,
which needs ``TRITON_INTERPRET=1`` before Triton is imported: the cases run as this file's script in
one subprocess. Tolerances: ``TOLERANCE`` (float32 1e-5, bfloat16 2e-2). On a CUDA machine the same
cases also run compiled, in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attention_reference import CASES, TOLERANCE, Case, max_error

REPO = Path(__file__).resolve().parents[2]


def triton_attention(device: str):
    from preft.engine.kernels.paged_attention import paged_attention

    def run(q, k_cache, v_cache, case: Case, tables):
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
        cu = torch.tensor([0, *torch.tensor(case.query_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        ctx = torch.tensor(case.context_lens, dtype=torch.int32, device=device)
        return paged_attention(
            q.to(device), k_cache.to(device), v_cache.to(device), cu, ctx, padded,
            max(case.query_lens), max(case.context_lens), case.head_dim**-0.5, case.sliding_window, case.num_splits,
        )  # fmt: skip

    return run


def errors(device: str) -> dict[str, float]:
    return {case.name: max_error(case, triton_attention(device)) for case in CASES}


@pytest.fixture(scope="module")
def interpreted_errors() -> dict[str, float]:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_paged_attention_matches_reference_under_interpreter(interpreted_errors, case):
    assert interpreted_errors[case.name] <= TOLERANCE[case.dtype], f"{case.name}: max error {interpreted_errors[case.name]:.3g}"


def test_split_count_grows_for_few_tiles_and_long_contexts():
    pytest.importorskip("triton")
    from preft.engine.kernels.paged_attention import MAX_SPLITS, num_kv_splits

    cpu = torch.device("cpu")  # the interpreter's budget: 4 programs
    assert num_kv_splits(1, 1, 100, cpu) == 1  # short context: nothing to split
    assert num_kv_splits(1, 1, 1 << 16, cpu) == 4
    assert num_kv_splits(4, 2, 1 << 16, cpu) == 1  # enough programs already
    assert num_kv_splits(1, 1, 1 << 20, cpu) <= MAX_SPLITS


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_paged_attention_matches_reference_compiled(case):
    assert max_error(case, triton_attention("cuda")) <= TOLERANCE[case.dtype]


if __name__ == "__main__":
    import preft.engine.kernels  # noqa: F401  (patches Triton's interpreter for NumPy >= 2.4)

    print(json.dumps(errors("cpu")))

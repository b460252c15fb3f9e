"""Triton grouped low-rank kernels against the PyTorch reference (``grouped_low_rank_reference``).

On CPU the kernels run under Triton's interpreter: ``TRITON_INTERPRET=1`` must be set before
Triton is imported, so those checks run this file as a script in a subprocess (the rest of the
suite keeps a normal Triton). On a CUDA machine the same cases run compiled, in-process.

Tolerances: float32 kernels vs the float32 reference, max |error| <= 1e-5 x max |reference|;
bfloat16 / float16 kernels vs the float32 reference on the same rounded inputs, <= 2e-2 x max |reference|.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch

from preft.adapters import low_rank_delta
from preft.engine.lowrank import grouped_low_rank_reference

REPO = Path(__file__).resolve().parents[2]
FP32_RTOL = 1e-5
HALF_RTOL = 2e-2


@dataclass
class Case:
    """One kernel call: shapes, ranks per slot, which launch shape, and what ``out`` looks like."""

    name: str
    n: int
    k: int
    out_features: int
    ranks: list[int]
    r_max: int
    method: str = "auto"
    bias: bool = True
    no_adapter_fraction: float = 0.25  # share of tokens with slot -1
    out: str = "none"  # none | given (accumulate) | view (a strided column view) | x (in place into x, as ReFT does)
    dtype: str = "float32"
    use_plan: bool = False
    strided_slots: bool = False  # token_slot as a non-contiguous int32 view
    scaling: list[float] = field(default_factory=list)
    seed: int = 0


CASES = [
    Case("mixed_ranks_bgmv", n=37, k=48, out_features=40, ranks=[8, 32, 16, 1], r_max=32, method="bgmv"),
    Case("mixed_ranks_sgmv", n=37, k=48, out_features=40, ranks=[8, 32, 16, 1], r_max=32, method="sgmv"),
    Case("no_bias_bgmv", n=20, k=64, out_features=64, ranks=[4, 16], r_max=16, method="bgmv", bias=False),
    Case("no_bias_sgmv", n=20, k=64, out_features=64, ranks=[4, 16], r_max=16, method="sgmv", bias=False),
    Case("all_tokens_no_adapter", n=9, k=32, out_features=24, ranks=[8, 8], r_max=8, method="sgmv", no_adapter_fraction=1.0, out="given"),
    Case("single_token_single_slot", n=1, k=16, out_features=16, ranks=[16], r_max=16, no_adapter_fraction=0.0),
    Case("out_accumulate_bgmv", n=24, k=40, out_features=72, ranks=[3, 12, 7], r_max=12, method="bgmv", out="given"),
    Case("out_accumulate_sgmv", n=24, k=40, out_features=72, ranks=[3, 12, 7], r_max=12, method="sgmv", out="given"),
    Case("out_strided_view_sgmv", n=50, k=32, out_features=48, ranks=[2, 9], r_max=16, method="sgmv", out="view"),
    Case("out_strided_view_bgmv", n=10, k=32, out_features=48, ranks=[2, 9], r_max=16, method="bgmv", out="view"),
    Case("out_is_x_sgmv", n=30, k=64, out_features=64, ranks=[4, 8], r_max=8, method="sgmv", out="x"),
    Case("out_is_x_bgmv", n=30, k=64, out_features=64, ranks=[4, 8], r_max=8, method="bgmv", out="x"),
    Case("prefill_many_tokens_rank64", n=130, k=96, out_features=200, ranks=[64, 1, 33, 8, 16, 64, 5, 2], r_max=64, method="auto"),
    Case("decode_distinct_slots", n=8, k=64, out_features=128, ranks=[8] * 8, r_max=8, method="auto", no_adapter_fraction=0.0),
    Case("strided_int32_slots_bgmv", n=20, k=32, out_features=32, ranks=[4, 8], r_max=8, method="bgmv", strided_slots=True),
    Case("strided_int32_slots_sgmv", n=20, k=32, out_features=32, ranks=[4, 8], r_max=8, method="sgmv", strided_slots=True),
    Case("shared_plan_sgmv", n=70, k=32, out_features=32, ranks=[4, 8, 16], r_max=16, use_plan=True),
    Case("bf16_sgmv", n=40, k=64, out_features=48, ranks=[8, 16, 4], r_max=16, method="sgmv", dtype="bfloat16", out="given"),
    Case("bf16_bgmv", n=12, k=64, out_features=48, ranks=[8, 16, 4], r_max=16, method="bgmv", dtype="bfloat16"),
    Case("fp16_sgmv", n=40, k=64, out_features=48, ranks=[8, 16, 4], r_max=16, method="sgmv", dtype="float16"),
]


def make_inputs(case: Case, device: str) -> dict:
    """Random inputs for ``case``; padding columns of smaller ranks hold garbage that must be ignored."""
    g = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    s = len(case.ranks)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    x = rand(case.n, case.k)
    down = rand(s, case.r_max, case.k)
    up = rand(s, case.out_features, case.r_max)
    bias = rand(s, case.r_max) if case.bias else None
    slots = torch.randint(0, s, (case.n,), generator=g)
    if case.name.startswith("decode"):
        slots = torch.arange(case.n) % s
    none = torch.rand(case.n, generator=g) < case.no_adapter_fraction
    token_slot = torch.where(none, torch.full_like(slots, -1), slots)
    if case.strided_slots:
        token_slot = torch.stack([token_slot, token_slot], dim=1).to(torch.int32)[:, 1]
    scaling = case.scaling or [0.5 + i for i in range(s)]
    out = None
    if case.out == "given":
        out = rand(case.n, case.out_features)
    elif case.out == "view":
        out = rand(case.n, case.out_features + 24)[:, 8 : 8 + case.out_features]
    elif case.out == "x":
        out = x
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(x=to(x), token_slot=to(token_slot), down=to(down), up=to(up), bias=to(bias), ranks=case.ranks, scaling=scaling, out=to(out))


def run_case(case: Case, device: str) -> dict:
    """Kernel vs float32 reference on the same inputs: max abs error, reference scale, in-place check."""
    from preft.engine.kernels import segment_plan, triton_grouped_low_rank

    inputs = make_inputs(case, device)
    f32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}
    ref_out = None if f32["out"] is None else f32["out"].clone()
    if case.out == "x":  # the reference reads x before it writes: give it its own copy of x
        f32["x"] = f32["x"].clone()
    reference = grouped_low_rank_reference(
        f32["x"].cpu(), f32["token_slot"].cpu(), f32["down"].cpu(), f32["up"].cpu(), None if f32["bias"] is None else f32["bias"].cpu(),
        case.ranks, f32["scaling"], out=None if ref_out is None else ref_out.cpu(),
    )  # fmt: skip
    plan = segment_plan(inputs["token_slot"], len(case.ranks)) if case.use_plan else None
    out = inputs["out"]
    result = triton_grouped_low_rank(**inputs, method=case.method, plan=plan)
    return {
        "max_abs_err": (result.float().cpu() - reference).abs().max().item(),
        "ref_scale": max(reference.abs().max().item(), 1.0),
        "in_place": out is None or result.data_ptr() == out.data_ptr(),
        "dtype_kept": result.dtype == inputs["x"].dtype if out is None else result.dtype == out.dtype,
    }


def tolerance(case: Case) -> float:
    return FP32_RTOL if case.dtype == "float32" else HALF_RTOL


def check(case: Case, res: dict) -> None:
    assert res["in_place"], f"{case.name}: the result must be written into the given out"
    assert res["dtype_kept"], f"{case.name}: the result dtype changed"
    limit = tolerance(case) * res["ref_scale"]
    assert res["max_abs_err"] <= limit, f"{case.name}: max |kernel - reference| = {res['max_abs_err']:.3g} > {limit:.3g}"


@pytest.fixture(scope="module")
def interpreted_results() -> dict:
    """Every case run once through the Triton CPU interpreter, in one subprocess."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, __file__, "--interpreted"], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_interpreter_matches_reference(interpreted_results: dict, case: Case) -> None:
    check(case, interpreted_results[case.name])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_cuda_matches_reference(case: Case) -> None:
    check(case, run_case(case, "cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bgmv_is_cuda_graph_capturable_with_device_ranks() -> None:
    """Decode replays a CUDA graph: the BGMV path must not sync with the host."""
    from preft.engine.kernels import triton_grouped_low_rank

    case = CASES[0]
    inputs = make_inputs(case, "cuda")
    inputs["ranks"] = torch.tensor(case.ranks, device="cuda", dtype=torch.int32)
    inputs["scaling"] = torch.tensor(inputs["scaling"], device="cuda")
    inputs["out"] = torch.zeros(case.n, case.out_features, device="cuda")
    triton_grouped_low_rank(**inputs, method="bgmv")  # compile outside the capture
    inputs["out"].zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_grouped_low_rank(**inputs, method="bgmv")
    inputs["out"].zero_()
    graph.replay()
    expected = grouped_low_rank_reference(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items() if k != "out"})
    torch.testing.assert_close(inputs["out"].cpu(), expected, rtol=1e-4, atol=1e-4)


INT_POINTERS = {"token_slot_ptr", "ranks_ptr", "tile_segment_ptr", "tile_start_ptr", "token_start_ptr", "count_ptr", "sorted_rows_ptr"}
FP32_POINTERS = {"code_ptr", "scaling_ptr"}
LARGEST_TILES = {  # the biggest constexpr tiles triton_grouped_low_rank picks (rank 64)
    "_bgmv_shrink_kernel": {"HAS_BIAS": True, "BLOCK_R": 64, "BLOCK_K": 64},
    "_bgmv_expand_kernel": {"BLOCK_N": 64, "BLOCK_R": 64},
    "_sgmv_shrink_kernel": {"HAS_BIAS": True, "BLOCK_M": 16, "BLOCK_R": 64, "BLOCK_K": 64},
    "_sgmv_expand_kernel": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_R": 64},
}


@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_kernels_compile_to_cubin_without_register_spills(arch: int, dtype: str) -> None:
    """Ahead-of-time compilation for H100 / A100 (no GPU needed): catches what the interpreter does not check."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from preft.engine.kernels import grouped_low_rank as kernels

    for name, constexprs in LARGEST_TILES.items():
        fn = getattr(kernels, name)
        constexprs = {**constexprs, **({"PRECISION": "ieee" if dtype == "fp32" else "tf32"} if "PRECISION" in fn.arg_names else {})}
        signature = {
            arg: "constexpr" if arg in constexprs
            else "*i32" if arg in INT_POINTERS
            else "*fp32" if arg in FP32_POINTERS
            else f"*{dtype}" if arg.endswith("_ptr")
            else "i32"
            for arg in fn.arg_names
        }  # fmt: skip
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32))
        ptx = compiled.asm["ptx"]
        assert "cubin" in compiled.asm, f"{name} ({dtype}) did not assemble for sm_{arch}"
        assert "ld.local" not in ptx and "st.local" not in ptx, f"{name} ({dtype}) spills registers to local memory on sm_{arch}"


def test_reference_equals_per_token_low_rank_delta() -> None:
    """The reference (what the kernels are held to) is, token by token, ``low_rank_delta`` at the slot's rank."""
    case = CASES[0]
    inputs = make_inputs(case, "cpu")
    result = grouped_low_rank_reference(**inputs)
    for n in range(case.n):
        s = int(inputs["token_slot"][n])
        if s < 0:
            assert torch.equal(result[n], torch.zeros_like(result[n])), "a token with slot -1 must get no delta"
            continue
        r = case.ranks[s]
        bias = inputs["bias"][s, :r]
        expected = low_rank_delta(inputs["x"][n], inputs["down"][s, :r], inputs["up"][s, :, :r], bias, inputs["scaling"][s])
        torch.testing.assert_close(result[n], expected, rtol=FP32_RTOL, atol=FP32_RTOL * expected.abs().max().item())


def test_segment_plan_puts_each_adapted_token_in_exactly_one_tile_of_its_slot() -> None:
    pytest.importorskip("triton")
    from preft.engine.kernels import segment_plan

    token_slot = torch.tensor([2, -1, 0, 2, 2, 1, -1, 0] * 5)
    num_slots, block_m = 4, 4
    plan = segment_plan(token_slot, num_slots, block_m=block_m)
    assert plan.num_tiles == -(-token_slot.numel() // block_m) + num_slots
    seen = []
    for tile, segment in enumerate(plan.tile_segment.tolist()):
        if segment == 0 or segment > num_slots:
            continue
        local = (tile - int(plan.tile_start[segment])) * block_m + torch.arange(block_m)
        local = local[local < int(plan.count[segment])]
        rows = plan.sorted_rows[int(plan.token_start[segment]) + local]
        assert (token_slot[rows] == segment - 1).all(), f"tile {tile} holds tokens of another slot"
        seen += rows.tolist()
    assert sorted(seen) == (token_slot >= 0).nonzero().squeeze(-1).tolist()


def test_kernels_import_raises_import_error_without_triton_and_dispatch_falls_back() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "try:\n    import preft.engine.kernels\nexcept ImportError as e:\n    print('ImportError', 'triton' in str(e))\n"
        "from preft.engine.lowrank import _triton_available; print('available', _triton_available())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ImportError True" in proc.stdout and "available False" in proc.stdout, proc.stdout


if __name__ == "__main__" and "--interpreted" in sys.argv:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    print(json.dumps({case.name: {**run_case(case, "cpu"), "case": asdict(case)} for case in CASES}))

"""Triton kernels of the serving engine (CUDA fast path).

Importing this package raises ``ImportError`` when Triton is not installed; callers
(``preft.engine.lowrank``) then fall back to the PyTorch reference.
"""

try:
    import triton  # noqa: F401
except ImportError as e:  # a clean, catchable signal: no Triton, no fast path
    raise ImportError(f"preft.engine.kernels needs triton (pip install 'preft[triton]'): {e}") from e

from preft.engine.kernels.grouped_low_rank import BGMV_MAX_TOKENS, SegmentPlan, segment_plan, triton_grouped_low_rank
from preft.engine.kernels.interpreter_compat import patch_interpreter

patch_interpreter()  # no-op unless TRITON_INTERPRET=1 (CPU tests)

__all__ = ["BGMV_MAX_TOKENS", "SegmentPlan", "segment_plan", "triton_grouped_low_rank"]

"""Two fixes to Triton 3.6's CPU interpreter (``TRITON_INTERPRET=1``), used by the CPU tests.

1. The interpreter turns a scalar tensor into a Python int with ``int(array)`` on a 1-element
   1-D array, which NumPy >= 2.4 rejects: every ``range(0, <tensor>, step)`` loop fails.
2. ``tl.dot`` on bfloat16 operands multiplies their raw uint16 storage (garbage results);
   the operands are widened to float32 first, which is exact.

Only the interpreter is touched, only when ``TRITON_INTERPRET=1``; compiled GPU runs are unaffected.
"""

from __future__ import annotations

import os


def patch_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_preft_patched", False):
        return
    patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope) -> None:
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    create_dot = interpreter.InterpreterBuilder.create_dot

    def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter._patch_lang_tensor = _patch_lang_tensor
    interpreter.InterpreterBuilder.create_dot = _create_dot
    interpreter._preft_patched = True

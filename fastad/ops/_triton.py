"""Triton-language helpers shared by the kernel files (private; which implementation runs is decided
in :mod:`fastad.ops.dispatch`)."""
from __future__ import annotations

import torch

from .dispatch import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - triton is a Linux dependency of fastad
    triton = tl = None


def max_programs(t: torch.Tensor) -> int:
    """Grid size of the persistent (grid-stride) kernels: a few waves of the GPU's SMs."""
    if t.is_cuda:
        return 4 * torch.cuda.get_device_properties(t.device).multi_processor_count
    return 8  # interpreter: every program is a Python loop, keep few


if HAS_TRITON:

    @triton.jit
    def store_rounded(ptr, value, mask):
        """Stores float32 ``value`` in ``ptr``'s dtype, bfloat16 rounded to nearest even by hand (the
        interpreter truncates, compiled Triton rounds: this makes both give torch's ``.to(bfloat16)``)."""
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(ptr, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def dot(a, b, F32: tl.constexpr):
        """``tl.dot``, in exact float32 (no TF32) when F32."""
        if F32:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def load(ptr, mask, F32: tl.constexpr):
        """Masked load (0 outside), widened to float32 when F32."""
        x = tl.load(ptr, mask=mask, other=0.0)
        if F32:
            x = x.to(tl.float32)
        return x

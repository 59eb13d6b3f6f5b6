"""When fastad's Triton kernels run: on CUDA tensors, and on CPU tensors under Triton's interpreter.

``TRITON_INTERPRET=1`` must be in the environment before ``triton`` is first imported (the test suite's
conftest sets it) for the kernels to run on the CPU. Elsewhere the ops use their PyTorch path.
"""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux dependency of fastad
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
enabled = True  # tests switch it off to run the PyTorch path of the same op


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton kernels can run on ``t``: its device has them, and it is a 16- or 32-bit
    float (the kernels compute in float32; float64 keeps to the PyTorch path)."""
    if not (HAS_TRITON and enabled) or t.dtype == torch.float64:
        return False
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


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

"""Loads the compiled extension fastad._C; without it the ops run their PyTorch references."""
from __future__ import annotations

import warnings

import torch

try:
    from fastad import _C  # noqa: F401  (importing registers torch.ops.fastad.*)

    HAS_C = True
    CUDA_COMPILED = bool(_C.cuda_compiled)
    _REASON = ""
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    HAS_C = False
    CUDA_COMPILED = False
    _REASON = str(exc)

_warned: set[str] = set()


def use_kernel(device: torch.device) -> bool:
    """True when fastad._C has a kernel for ``device``; otherwise warn once per device type and return False."""
    if device.type == "cpu" and HAS_C:
        return True
    if device.type == "cuda" and CUDA_COMPILED:
        return True
    if device.type not in _warned:
        _warned.add(device.type)
        why = f"fastad._C could not be imported ({_REASON})" if not HAS_C else "fastad._C was built without CUDA"
        warnings.warn(
            f"{why}: fastad ops on {device.type} run their PyTorch reference implementations (slow). "
            "Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


if HAS_C:
    # Shape-only kernels so the ops trace under torch.compile / FakeTensor.
    @torch.library.register_fake("fastad::kcenter_greedy")
    def _kcenter_greedy_fake(features, starts, k):
        return features.new_empty((k,), dtype=torch.long)

    @torch.library.register_fake("fastad::nearest_reference")
    def _nearest_reference_fake(x, bank, metric, window):
        n = x.numel() // x.shape[-1]
        return x.new_empty((n,), dtype=torch.float64), x.new_empty((n,), dtype=torch.long)

"""The one rule that picks every op's implementation, and the switch that tests and users flip.

Each op has up to three implementations: a compiled kernel of the extension ``fastad._C`` (C++ on the
CPU, CUDA on the GPU: ``greedy_coreset``, ``nearest_reference``; ``knn_rescore`` CPU only), Triton
kernels (attention, quantile, hard-mining losses) and its pure-PyTorch reference.
:func:`implementation` chooses, in this order:

1. ``'extension'`` when the op has one, it is enabled and ``fastad._C`` was built for the tensor's device
   (otherwise one warning per device type, since the reference is much slower);
2. ``'triton'`` when the op has Triton kernels, they are enabled, and they can run on the tensor: a CUDA
   tensor, or a CPU tensor under Triton's interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is
   first imported), of a 16- or 32-bit float dtype (the kernels compute in float32, so float64 keeps to
   PyTorch);
3. ``'reference'`` otherwise (or the op's PyTorch fast path: SDPA, einsums, ``torch.quantile``).

``with fastad.ops.dispatch.kernels(triton=False):`` runs a block on the PyTorch paths (e.g. to
compare, or where the interpreter is too slow); :data:`settings` holds the current switches.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import torch

__all__ = ["CUDA_COMPILED", "HAS_EXTENSION", "HAS_TRITON", "TRITON_INTERPRET", "implementation", "kernels", "require_triton", "settings"]

try:
    from fastad import _C  # noqa: F401  (importing registers torch.ops.fastad.*)

    HAS_EXTENSION = True
    CUDA_COMPILED = bool(_C.cuda_compiled)
    _EXTENSION_ERROR = ""
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    HAS_EXTENSION = CUDA_COMPILED = False
    _EXTENSION_ERROR = str(exc)

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux dependency of fastad
    HAS_TRITON = False

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
settings = {"extension": True, "triton": True}
_warned: set[str] = set()


@contextmanager
def kernels(*, extension: bool | None = None, triton: bool | None = None):
    """Enable or disable the extension / Triton kernels inside a ``with`` block (None: unchanged)."""
    saved = dict(settings)
    if extension is not None:
        settings["extension"] = bool(extension)
    if triton is not None:
        settings["triton"] = bool(triton)
    try:
        yield settings
    finally:
        settings.update(saved)


def _extension_runs(device: torch.device) -> bool:
    if (device.type == "cpu" and HAS_EXTENSION) or (device.type == "cuda" and CUDA_COMPILED):
        return True
    if device.type not in _warned:
        _warned.add(device.type)
        why = f"fastad._C could not be imported ({_EXTENSION_ERROR})" if not HAS_EXTENSION else "fastad._C was built without CUDA"
        warnings.warn(f"{why}: fastad ops on {device.type} run their PyTorch reference implementations (slow). "
                      "Rebuild with `pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=4)
    return False


def implementation(t: torch.Tensor, *, extension: bool = False, triton: bool = False) -> str:
    """``'extension'``, ``'triton'`` or ``'reference'`` for an op with the named kernels, applied to ``t``
    (the rule in the module docstring)."""
    if extension and settings["extension"] and _extension_runs(t.device):
        return "extension"
    if triton and settings["triton"] and HAS_TRITON and t.dtype != torch.float64:
        if t.is_cuda or (TRITON_INTERPRET and t.device.type == "cpu"):
            return "triton"
    return "reference"


def require_triton(t: torch.Tensor) -> None:
    """Raise unless the Triton kernels can run on ``t`` (the custom ops' entry check)."""
    if implementation(t, triton=True) != "triton":
        raise RuntimeError("fastad's Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on the CPU) of a 16- or "
                           "32-bit float dtype, with Triton enabled; call the public op, which takes the PyTorch path otherwise")


if HAS_EXTENSION:
    # Shape-only kernels so the extension ops trace under torch.compile / FakeTensor.
    @torch.library.register_fake("fastad::kcenter_greedy")
    def _kcenter_greedy_fake(features, starts, k):
        return features.new_empty((k,), dtype=torch.long)

    @torch.library.register_fake("fastad::kcenter_greedy_stats")
    def _kcenter_greedy_stats_fake(features, starts, k):
        return features.new_empty((k,), dtype=torch.long), features.new_empty((k, 5), dtype=torch.long)

    @torch.library.register_fake("fastad::nearest_reference")
    def _nearest_reference_fake(x, bank, metric, window):
        n = x.numel() // x.shape[-1]
        return x.new_empty((n,), dtype=torch.float64), x.new_empty((n,), dtype=torch.long)

    @torch.library.register_fake("fastad::knn_rescore")
    def _knn_rescore_fake(score, slack, x, y, k):
        return x.new_empty((score.shape[0], k), dtype=torch.float64), x.new_empty((score.shape[0], k), dtype=torch.long)

    @torch.library.register_fake("fastad::kcenter_init")
    def _kcenter_init_fake(features, start_vectors):
        return features.new_empty((features.shape[0],), dtype=torch.float64)

    @torch.library.register_fake("fastad::kcenter_step")
    def _kcenter_step_fake(features, dist, assign, centers, t, owned, prune):
        return features.new_empty((3,), dtype=torch.float64)

"""Input validation shared by the ops: every message says what was wrong and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the ops compute in: float64 for float64 inputs, float32 for every other float."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_tensor(name: str, t, *, ndim: int | tuple[int, ...] | None = None, finite: bool = True) -> None:
    """Raise TypeError/ValueError unless ``t`` is a non-empty floating tensor of the given rank with finite values."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); expected at least one element")
    # min and max are NaN when any value is (aminmax propagates NaN) and +-inf when one is: one
    # vectorised pass, where isfinite(t).all() took ~14x longer on the CPU
    if finite and not all(bool(torch.isfinite(v)) for v in torch.aminmax(t)):
        raise ValueError(f"{name} contains NaN or inf values; expected finite values")


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless all tensors live on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on the same device, got {listing}")


NONFINITE = ("raise", "nan")


def check_nonfinite(nonfinite) -> None:
    """The ops' ``nonfinite=`` modes: 'raise' (a NaN/inf scan, one host read) or 'nan' (no scan)."""
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")


def check_qkv(q, k, v, nonfinite: str = "raise") -> None:
    """q, k, v: non-empty (batch, heads, N, head_dim) floats of one shape, dtype and device."""
    # the NaN/inf scan reads every input once and syncs: skipped for nonfinite='nan' (NaN/inf then
    # reach the output) and under torch.compile (it would break the graph)
    check_nonfinite(nonfinite)
    finite = nonfinite == "raise" and not torch.compiler.is_compiling()
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, finite=finite)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k and v must all be (batch, heads, N, head_dim) of one shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    check_same_device(q=q, k=k, v=v)


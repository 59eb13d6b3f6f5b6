"""BatchNorm statistics over the global batch of a data-parallel fit (SyncBatchNorm's semantics on
every device: torch's SyncBatchNorm runs on CUDA only, and the tests run gloo on the CPU)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ... import distributed

__all__ = ["global_batch_norm", "global_batch_norms"]


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is the all_reduce(SUM) of the gradients (every rank's loss
    depends on every rank's input through the global statistics)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = t.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, group) -> torch.Tensor:
    """``bn(x)`` in training mode with the mean and (biased) variance of the whole batch spread over
    ``group``: per-channel sums all-reduced with autograd (so the gradient flows through the global
    statistics, as SyncBatchNorm's), two passes (mean, then squared deviations) in x's dtype; the
    running statistics get the unbiased global variance. x: (B, C, ...) with B >= 1 on every rank."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = torch.tensor([float(x.numel() // x.shape[1])], dtype=torch.float64,
                         device=distributed.collective_device(group))
    torch.distributed.all_reduce(count, group=group)
    n = float(count)
    dev = distributed.collective_device(group)
    mean = _AllReduceSum.apply(x.sum(dims).to(dev), group).to(x.device) / n
    centred = x - mean.view(shape)
    var = _AllReduceSum.apply(centred.pow(2).sum(dims).to(dev), group).to(x.device) / n
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1, 1.0)), alpha=m)
    return y


@contextlib.contextmanager
def global_batch_norms(modules: Iterator[nn.Module], group) -> Iterator[None]:
    """Inside the block, the BatchNorm layers among ``modules`` that are in training mode normalise
    with :func:`global_batch_norm` over ``group`` (nothing changes without a process group)."""
    if not distributed.active(group):
        yield
        return
    bns = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    original = {m: m.forward for m in bns}

    def synced(m):
        return lambda x: global_batch_norm(m, x, group) if m.training else original[m](x)

    for m in bns:
        m.forward = synced(m)
    try:
        yield
    finally:
        for m in bns:
            del m.forward  # back to the class's forward

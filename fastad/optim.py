"""Optimisers and learning-rate schedules of the trained models.

- :class:`StableAdamW`: Dinomaly's optimiser (AdamW with update clipping, Wortsman et al. 2023), with
  the authors' order of operations: decoupled weight decay with the unclipped learning rate first,
  then an Adam(AMSGrad) step whose size is divided by max(1, RMS(g / denom) / clip_threshold).
- :func:`warm_cosine`: linear warm-up from 0 then cosine decay to a final value (Dinomaly's
  WarmCosineScheduler, as a LambdaLR factor).
"""
from __future__ import annotations

import math

import torch

__all__ = ["StableAdamW", "warm_cosine"]


class StableAdamW(torch.optim.Optimizer):
    """AdamW with per-tensor update clipping.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as AdamW (Dinomaly: 2e-3, (0.9, 0.999), 1e-10, 1e-4).
        amsgrad: normalise by the running maximum of the second moment (Dinomaly: True).
        clip_threshold: RMS of the normalised update above which the step shrinks (1.0).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, clip_threshold=1.0):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0 or not clip_threshold > 0:
            raise ValueError(f"invalid StableAdamW settings: lr={lr}, eps={eps}, weight_decay={weight_decay}, clip_threshold={clip_threshold}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, clip_threshold=clip_threshold)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")
                p.mul_(1 - group["lr"] * group["weight_decay"])
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = int(state["step"])
                exp_avg, second = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], second, out=state["max_exp_avg_sq"])
                    second = state["max_exp_avg_sq"]
                denom = (second.sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
                rms = float((grad / denom).norm(2)) / math.sqrt(grad.numel())
                step_size = group["lr"] / (1 - beta1**step) / max(1.0, rms / group["clip_threshold"])
                p.addcdiv_(exp_avg, denom, value=-step_size)
        return loss


def warm_cosine(base_lr: float, final_lr: float, total_iters: int, warmup_iters: int = 0):
    """LambdaLR factor (relative to ``base_lr``) of iteration ``it``: ``linspace(0, base, warmup)``
    during warm-up, then ``final + (base - final) (1 + cos(pi i / (total - warmup))) / 2``, then
    ``final_lr`` from ``total_iters`` on (Dinomaly: 2e-3 -> 2e-4, 10k iterations, 100 warm-up)."""
    if not 0 <= warmup_iters < total_iters:
        raise ValueError(f"need 0 <= warmup_iters < total_iters, got {warmup_iters} and {total_iters}")

    def factor(it: int) -> float:
        if it >= total_iters:
            lr = final_lr
        elif it < warmup_iters:
            lr = base_lr * it / (warmup_iters - 1) if warmup_iters > 1 else 0.0  # np.linspace(0, base, 1) = [0]
        else:
            i = it - warmup_iters
            lr = final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * i / (total_iters - warmup_iters)))
        return lr / base_lr

    return factor

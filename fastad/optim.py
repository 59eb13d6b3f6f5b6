"""Optimisers and learning-rate schedules of the trained models.

- :class:`StableAdamW`: Dinomaly's optimiser (AdamW with update clipping, Wortsman et al. 2023), with
  the authors' order of operations: decoupled weight decay with the unclipped learning rate first,
  then an Adam(AMSGrad) step whose size is divided by max(1, RMS(g / denom) / clip_threshold).
- :class:`LossScaler`: dynamic loss scaling for float16 training, decided on the device.
- :func:`warm_cosine`: linear warm-up from 0 then cosine decay to a final value (Dinomaly's
  WarmCosineScheduler, as a LambdaLR factor).
"""
from __future__ import annotations

import math

import torch

__all__ = ["LossScaler", "StableAdamW", "adam", "warm_cosine"]


class StableAdamW(torch.optim.Optimizer):
    """AdamW with per-tensor update clipping.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as AdamW (Dinomaly: 2e-3, (0.9, 0.999), 1e-10, 1e-4).
        amsgrad: normalise by the running maximum of the second moment (Dinomaly: True).
        clip_threshold: RMS of the normalised update above which the step shrinks (1.0).
        foreach: one multi-tensor update per group with the clipping factors kept as device tensors:
            no host read in :meth:`step` (default True). ``False``: the authors' per-parameter loop,
            which reads each RMS on the host (the reference the multi-tensor update is tested against).

    As torch's fused optimizers, :meth:`step` honours ``self.found_inf`` (a 0-d float tensor on the
    parameters' device, set by the caller, e.g. the training loop's NaN/inf guard): where it is 1 the
    step leaves the parameters, the moments and the step count exactly as they were, decided on the
    device. State per parameter: ``step`` (float64, 0-d), ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``.
    """

    _step_supports_amp_scaling = True  # reads found_inf itself

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, clip_threshold=1.0,
                 foreach: bool = True):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0 or not clip_threshold > 0:
            raise ValueError(f"invalid StableAdamW settings: lr={lr}, eps={eps}, weight_decay={weight_decay}, clip_threshold={clip_threshold}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        clip_threshold=clip_threshold, foreach=bool(foreach))
        super().__init__(params, defaults)

    def _state(self, p, group, device) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64, device=device)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p)
        elif state["step"].device != device:  # a checkpoint's step is loaded on the CPU
            state["step"] = state["step"].to(device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("StableAdamW does not support sparse gradients")
            if not params:
                continue
            if group["foreach"]:
                for chunk in _chunks(params):
                    self._multi_tensor(group, chunk, found_inf)
            elif found_inf is None or not bool(found_inf):  # the reference loop: a host read
                self._loop(group, params)
        return loss

    def _root_sizes(self, tensors, device) -> torch.Tensor:
        """sqrt(numel) of each tensor as a float64 device tensor, made once per list of sizes by fills
        on the device (a copy from pageable host memory would synchronise)."""
        key = (str(device), tuple(t.numel() for t in tensors))
        cache = self.__dict__.setdefault("_root_size_cache", {})
        if key not in cache:
            cache[key] = torch.stack([torch.full((), math.sqrt(n), dtype=torch.float64, device=device) for n in key[1]])
        return cache[key]

    def _loop(self, group, params) -> None:
        """The authors' per-parameter update."""
        beta1, beta2 = group["betas"]
        for p in params:
            p.mul_(1 - group["lr"] * group["weight_decay"])
            grad = p.grad
            state = self._state(p, group, torch.device("cpu"))
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

    def _multi_tensor(self, group, params, found_inf) -> None:
        """The loop's operations, in the same order, over all parameters at once; the scalars that
        depend on the step count or the RMS are float64 device tensors (no host read). With
        ``found_inf`` the gradients are replaced by zeros and every factor by the identity where it
        is set, so the update is an exact no-op there."""
        lr, wd, eps, clip = group["lr"], group["weight_decay"], group["eps"], group["clip_threshold"]
        beta1, beta2 = group["betas"]
        device = params[0].device
        states = [self._state(p, group, device) for p in params]
        grads = [p.grad for p in params]
        exp_avgs, seconds = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        if found_inf is None:
            keep, decay, b1, b2 = 1.0, 1 - lr * wd, beta1, beta2
        else:
            skip = found_inf.to(device=device, dtype=torch.float64).reshape(())
            keep = 1.0 - skip  # float64: the float32 factors below round as the loop's Python floats do
            grads = [torch.where(skip == 0, g, torch.zeros((), dtype=g.dtype, device=device)) for g in grads]
            decay = (1 - lr * wd * keep).float()
            b1, b2 = (beta1 + (1 - beta1) * skip).float(), (beta2 + (1 - beta2) * skip).float()
        torch._foreach_mul_(params, decay)
        torch._foreach_add_(steps, keep)
        torch._foreach_mul_(exp_avgs, b1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)  # zero gradients: exactly unchanged
        torch._foreach_mul_(seconds, b2)
        torch._foreach_addcmul_(seconds, grads, grads, value=1 - beta2)
        if group["amsgrad"]:
            maxima = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(maxima, seconds)
            seconds = maxima
        step = torch.stack(steps).clamp(min=1)  # (a step skipped before the first: 0, whose corrections would be 0/0)
        bias2 = torch.sqrt(1 - torch.pow(beta2, step)).float().unbind()
        denoms = torch._foreach_sqrt(seconds)
        torch._foreach_div_(denoms, bias2)
        torch._foreach_add_(denoms, eps)
        norms = torch.stack(torch._foreach_norm(torch._foreach_div(grads, denoms))).double()
        scale = torch.clamp(norms / self._root_sizes(grads, device) / clip, min=1.0)
        step_size = -(lr / (1 - torch.pow(beta1, step)) / scale * keep)  # 0 where skipped: p + 0 = p
        scaled = torch._foreach_mul(exp_avgs, step_size.float().unbind())
        torch._foreach_addcdiv_(params, scaled, denoms)


CPU_CHUNK = 1 << 20  # values per multi-tensor update on the CPU: its temporaries stay in the caches


def _chunks(params: list) -> list[list]:
    """``params`` in runs of at most :data:`CPU_CHUNK` values on the CPU (a larger tensor alone),
    where the multi-tensor ops are per-tensor loops and a pass over every parameter at once would
    stream each temporary through memory; one run on other devices (one launch per op)."""
    if params[0].device.type != "cpu":
        return [params]
    runs, run, size = [], [], 0
    for p in params:
        if run and size + p.numel() > CPU_CHUNK:
            runs.append(run)
            run, size = [], 0
        run.append(p)
        size += p.numel()
    return runs + [run]


def adam(params, *, decoupled: bool = False, **kwargs) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` (``AdamW`` with ``decoupled``), fused where every parameter is on CUDA:
    one kernel per step, and the training loop's NaN/inf skip decided on the device (``found_inf``),
    no host read. Elsewhere torch's default implementation (the CPU numbers are unchanged)."""
    params = list(params)
    fused = bool(params) and all(p.is_cuda for p in params)
    return (torch.optim.AdamW if decoupled else torch.optim.Adam)(params, fused=True if fused else None, **kwargs)


class LossScaler:
    """Dynamic loss scaling for float16 training (``precision='fp16'``), with ``torch.amp.GradScaler``'s
    rule and defaults, but every decision on the device (no host read per step).

    The loss is multiplied by ``scale`` before the backward pass, so that the float16 activation
    gradients of the autocast networks do not underflow; :meth:`unscale` divides the (float32)
    parameter gradients by it again and returns a 1-element float32 flag, 1 where any is NaN/inf (an
    overflow: the step must be skipped); :meth:`update` then halves the scale after an overflow and
    doubles it after ``growth_interval`` clean steps in a row. State: ``scale`` (float32) and
    ``growth`` (int32, clean steps since the last change), 1-element tensors on the gradients' device.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        if not init_scale > 0 or not growth_factor > 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError(f"invalid LossScaler settings: init_scale={init_scale}, growth_factor={growth_factor}, "
                             f"backoff_factor={backoff_factor}, growth_interval={growth_interval}")
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.scale = torch.full((1,), float(init_scale), dtype=torch.float32)
        self.growth = torch.zeros((1,), dtype=torch.int32)

    def _to(self, device) -> None:
        if self.scale.device != torch.device(device):
            self.scale, self.growth = self.scale.to(device), self.growth.to(device)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale`` (the scale moved to the loss's device once)."""
        self._to(loss.device)
        return loss * self.scale.reshape(())

    def unscale(self, params) -> torch.Tensor:
        """Divide the gradients of ``params`` (float32, one device) by the scale in place; returns the
        (1,) float32 overflow flag."""
        grads = [p.grad for p in params if p.grad is not None]
        device = grads[0].device if grads else self.scale.device
        self._to(device)
        found = torch.zeros((1,), dtype=torch.float32, device=device)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self.scale.reciprocal())
        return found

    def update(self, found_inf: torch.Tensor) -> None:
        """Back off after an overflow, grow after ``growth_interval`` clean steps (in place, on the device)."""
        torch._amp_update_scale_(self.scale, self.growth, found_inf.to(self.scale.device), self.growth_factor,
                                 self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale.detach().cpu().clone(), "growth": self.growth.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scale = state["scale"].to(torch.float32).reshape(1).clone()
        self.growth = state["growth"].to(torch.int32).reshape(1).clone()


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

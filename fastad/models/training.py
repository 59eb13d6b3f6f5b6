"""Gradient-trained models: the iteration loop, the training state in checkpoints, exact resume.

A subclass defines ``trainable_parameters()``, ``make_optimizer()`` (returns an optimizer and a
per-iteration LR scheduler) and ``training_loss(images, iteration)``, or overrides ``training_step``
when one loss and one backward pass do not describe its update (FOD's two phases, ADPretrain's
masks). ``fit`` then runs the remaining iterations. Given a Dataset, the batch order is a function of (seed, epoch), so a run
resumed from a checkpoint (which also holds the optimizer, the scheduler, the iteration, the loss
history and torch's RNG state, used by dropout) continues exactly as the uninterrupted one.

Data parallel (``fit(..., group=...)``, torch.distributed): every rank draws the same seeded
permutation and takes slice r of each global batch (the recipe's ``train_batch_size`` is the global
batch); the loss of a slice is scaled by its share of the batch, gradients are all-reduced (a sum
of the shares: the gradient of the global batch's mean loss), batch-wide statistics are global
(Dinomaly's hard-mining threshold by a distributed select), and rank 0 writes the checkpoints,
which hold every rank's RNG state: a resume with the same number of processes is exact, another
number is refused. Models whose recipe cannot be split this way set ``data_parallel`` to the reason.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import distributed
from ..faults import memory_stage
from .base import AnomalyModel
from .components.batch_norm import global_batch_norms


def _epoch_batches(data: Dataset, batch_size: int, seed: int, start: int, num_workers: int,
                   part: tuple[int, int] = (0, 1), device: torch.device | str = "cpu") -> Iterator:
    """Collated batches (dicts or tensors) from iteration ``start`` on: each epoch is a seeded permutation, last partial
    batch dropped (the authors' drop_last), or the whole set as one batch if it is smaller. ``part`` = (rank, world):
    that rank's contiguous slice of every batch. Cached data (:mod:`fastad.data.cache`) is gathered batch by batch
    on ``device`` (the same batches, no DataLoader, no workers)."""
    from ..data.cache import batch_source

    n = len(data)
    if n == 0:
        raise ValueError("fit() got an empty dataset")
    bs = min(batch_size, n)
    per_epoch = n // bs
    epoch, skip = divmod(start, per_epoch)
    lo, hi = distributed.shard_range(bs, *part)
    gather = batch_source(data, device)
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        order = order[: per_epoch * bs].view(per_epoch, bs)[skip:, lo:hi]
        if gather is not None:
            for rows in order.tolist():
                yield gather(rows)
            epoch, skip = epoch + 1, 0
            continue
        # its own generator: a loader would otherwise draw its worker seed from torch's global RNG,
        # which dropout uses too, at a point that differs between a resumed and a straight run
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        loader = DataLoader(data, batch_sampler=order.tolist(), num_workers=num_workers, generator=gen)
        yield from loader
        epoch, skip = epoch + 1, 0


def _cycle(data: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in [data] if isinstance(data, torch.Tensor) else data:
            empty = False
            yield batch
        if empty:
            raise ValueError("fit() got no training images")


class TrainedModel(AnomalyModel):
    """Base of the models fitted by gradient descent (Dinomaly, MiniMaxAD, RLR, FOD, ADPretrain).

    Subclasses set ``iterations``, ``train_batch_size``, ``seed`` and ``grad_clip`` (None: no clipping).
    ``data_parallel`` is True when ``training_loss`` is a mean over the batch's samples (or takes its
    batch-wide statistics over ``self.group``), else a string saying why the model cannot train
    data-parallel.
    """

    data_parallel: bool | str = True

    def __init__(self):
        super().__init__()
        self.iteration = 0
        self.loss_history: list[float] = []
        self.optimizer = self.scheduler = None
        self.epoch_length: int | None = None  # batches per epoch of the data first trained on
        self.skipped_iterations: list[int] = []  # updates skipped for a NaN/inf loss or gradient (on_nan='skip')
        self.group = None  # the torch.distributed group while a data-parallel fit runs
        self._share = 1.0  # this rank's fraction of the global batch
        self._checkpoint_world = 1  # processes that wrote the loaded checkpoint
        self._rank_rng: list[torch.Tensor] | None = None  # their RNG states
        self._grad_norm: torch.Tensor | float | None = None  # of the last update's gradient, before clipping
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (iteration, loss, record) not yet read
        self._halted: torch.Tensor | None = None  # on_nan='stop': set on the device at the first bad update
        self.check_every = 50  # iterations between host reads of the losses and the NaN/inf guard
        self._scaler = None  # precision='fp16': the LossScaler, made by the first fit
        self.overflow_iterations: list[int] = []  # fp16: updates skipped for a loss-scale overflow (the scale halved)

    @property
    def last_grad_norm(self) -> float | None:
        """Norm of the last update's gradient (of the global batch), before clipping (a host read)."""
        return None if self._grad_norm is None else float(self._grad_norm)

    def trainable_parameters(self):
        raise NotImplementedError

    def make_optimizer(self):
        raise NotImplementedError

    def training_loss(self, images: torch.Tensor, iteration: int) -> torch.Tensor:
        raise NotImplementedError

    def training_length(self, epoch_length: int | None) -> int:
        """Total iterations of the recipe: ``iterations`` (Dinomaly), or ``epochs`` x batches per
        epoch for the models that count epochs (set ``epochs`` and ``iterations_override``)."""
        if not hasattr(self, "epochs"):
            return self.iterations
        if self.iterations_override is not None:
            return self.iterations_override
        if epoch_length is None:
            raise ValueError(f"{type(self).__name__} trains for `epochs`; with data of unknown length pass iterations=N")
        return self.epochs * epoch_length

    def _note_epoch_length(self, data) -> None:
        """Fix the epoch length (batches per epoch) the first time the model sees data: a Dataset's
        whole batches, or the length of an iterable of batches (unknown: stays None)."""
        if self.epoch_length is None:
            if isinstance(data, Dataset):
                self.epoch_length = len(data) // max(1, min(self.train_batch_size, len(data)))
            elif hasattr(data, "__len__"):
                self.epoch_length = len(data)

    def recipe_length(self, data) -> int:
        """The total iterations ``fit(data)`` runs by default (:meth:`training_length` on ``data``)."""
        self._note_epoch_length(data)
        return self.training_length(self.epoch_length)

    def _ensure_optimizer(self) -> None:
        if self.optimizer is None:
            self.optimizer, self.scheduler = self.make_optimizer()
        if self.precision == "fp16" and self._scaler is None:  # float16 training: a loss scale
            from ..optim import LossScaler

            self._scaler = LossScaler()

    def fit(self, data, iterations: int | None = None, *, checkpoint: str | None = None, checkpoint_every: int = 0,
            num_workers: int = 0, progress: bool | None = None, on_nan: str = "stop", group=None,
            check_every: int | None = None) -> "TrainedModel":
        """Train until ``iterations`` (default: the recipe's length) have run in total (nothing for a
        model built with ``authors_checkpoint``: the authors' trained weights are used as they are).

        Args:
            data: a Dataset of dicts with 'image' (exact resume), or an iterable of (B, 3, H, W)
                batches / dicts (cycled in its own order).
            checkpoint, checkpoint_every: save to this file every N iterations and at the end
                (atomically: a run killed at any moment resumes from the last complete file).
            num_workers: DataLoader workers when ``data`` is a Dataset.
            progress: tqdm bar (None: only on a terminal).
            on_nan: on a NaN/inf loss or gradient, ``'stop'`` raises FloatingPointError naming the
                iteration (the checkpoint file keeps the last good state); ``'skip'`` drops that
                update (no optimizer step; the iteration counts and is listed in ``skipped_iterations``).
                Under ``precision='fp16'`` a loss-scale overflow is neither: its update is skipped, the
                scale halved, and the iteration listed in ``overflow_iterations``.
            group: torch.distributed process group for data-parallel training (module docstring);
                every rank calls ``fit`` with the same Dataset; the model must start equal on all
                ranks (the trainable parameters are broadcast from rank 0).
            check_every: with an optimizer that skips on the device (:meth:`update`), the losses and
                the NaN/inf guard are read on the host every this many iterations (default 50) and
                before every checkpoint; a stop is still reported at its exact iteration.
        """
        if on_nan not in ("stop", "skip"):
            raise ValueError(f"on_nan must be 'stop' or 'skip', got {on_nan!r}")
        if check_every is not None:
            if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
                raise ValueError(f"check_every must be a positive int, got {check_every!r}")
            self.check_every = check_every
        if self.config.get("authors_checkpoint") is not None:  # trained by the authors: used as it is
            self.eval()
            return self
        self.on_nan = on_nan
        part = self._join(group, data)
        try:
            return self._fit(data, iterations, checkpoint, checkpoint_every, num_workers, progress, part)
        finally:
            self.group, self._share = None, 1.0

    def _join(self, group, data) -> tuple[int, int]:
        """Checks and state of a data-parallel fit; returns (rank, world)."""
        world = distributed.world_size(group)
        if world == 1:
            return 0, 1
        name = type(self).__name__
        if self.data_parallel is not True:
            raise ValueError(f"{name} cannot train data-parallel: {self.data_parallel}; run one job per process instead "
                             "(fastad run --parallel jobs)")
        if not isinstance(data, Dataset):
            raise ValueError(f"a data-parallel fit needs a fastad Dataset (each rank takes its slice of every batch), "
                             f"got {type(data).__name__}")
        bs = min(self.train_batch_size, len(data))
        if bs < world:
            raise ValueError(f"{name}'s global batch of {bs} image(s) cannot be split between {world} processes; "
                             "use at most as many processes as images per batch")
        r = distributed.rank(group)
        self.group = group
        lo, hi = distributed.shard_range(bs, r, world)
        self._share = (hi - lo) / bs
        with torch.no_grad():  # every rank starts from rank 0's weights
            for p in self.trainable_parameters():
                t = p.data.to(distributed.collective_device(group))
                torch.distributed.broadcast(t, 0, group=group)
                p.data.copy_(t)
        if self.iteration and self._rank_rng is not None and len(self._rank_rng) == world:
            torch.set_rng_state(self._rank_rng[r])  # (another world size is refused once the length is known)
        return r, world

    def _fit(self, data, iterations, checkpoint, checkpoint_every, num_workers, progress, part) -> "TrainedModel":
        from tqdm.auto import tqdm

        self._note_epoch_length(data)
        total = self.training_length(self.epoch_length) if iterations is None else int(iterations)
        if total < 0:
            raise ValueError(f"iterations must be >= 0, got {total}")
        if 0 < self.iteration < total and part[1] != self._checkpoint_world:  # a finished model is used anywhere
            raise ValueError(f"this checkpoint was written by a run of {self._checkpoint_world} process(es); resume it "
                             f"with the same number (torchrun --nproc-per-node ...), not {part[1]}, or start anew")
        self._ensure_optimizer()
        for p, state in self.optimizer.state.items():  # the model may have moved since the state was made
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.dim() and v.device != p.device:
                    state[k] = v.to(p.device)
        if isinstance(data, Dataset):
            batches = _epoch_batches(data, self.train_batch_size, self.seed, self.iteration, num_workers, part, self.device)
        else:
            batches = _cycle(data)
        bar = tqdm(total=total, initial=min(self.iteration, total), desc="train", unit="it", leave=False,
                   disable=part[0] != 0 or (None if progress is None else not progress))
        saved = None  # the iteration of the last checkpoint this call wrote
        trainable = {id(p) for p in self.trainable_parameters()}
        with global_batch_norms((m for m in self.modules() if any(id(p) in trainable for p in m.parameters(False))),
                                self.group):
            self._loop(batches, total, bar, checkpoint, checkpoint_every, saved)
        bar.close()
        self.eval()
        return self

    def _loop(self, batches, total, bar, checkpoint, checkpoint_every, saved) -> None:
        self._pending, self._halted = [], None
        try:
            while self.iteration < total:
                self.train()
                with memory_stage("training", "lower the batch (--set train_batch_size=N) or image_size"):
                    loss = self.training_step(next(batches), self.iteration)
                with warnings.catch_warnings():  # a skipped first batch steps the schedule before the optimizer
                    warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"), UserWarning)
                    self.scheduler.step()
                record = self._pending.pop()[2] if self._pending and self._pending[-1][0] == self.iteration else None
                self.iteration += 1
                bar.update(1)
                if loss is not None:  # None: a batch the recipe skips (ADPretrain: no anomaly in it)
                    if distributed.active(self.group):  # the shares add up to the global batch's loss
                        loss = loss.detach().double().to(distributed.collective_device(self.group))
                        torch.distributed.all_reduce(loss, group=self.group)
                    self._pending.append((self.iteration - 1, loss.detach(), record))
                elif record is not None:
                    self._pending.append((self.iteration - 1, None, record))
                checkpoint_now = checkpoint and checkpoint_every and self.iteration % checkpoint_every == 0
                if checkpoint_now or self.iteration % self.check_every == 0 or self.iteration == total:
                    self._read_pending(bar)
                if checkpoint_now:
                    self.save(checkpoint)
                    saved = self.iteration
        except FloatingPointError as exc:
            bar.close()
            self._read_pending()  # the losses before the bad iteration (the host-checked path raised in the step)
            kept = (f"the last good checkpoint {checkpoint} (iteration {saved}) is kept" if saved is not None else
                    f"{checkpoint} was not rewritten" if checkpoint and os.path.exists(checkpoint) else "no checkpoint was written")
            raise FloatingPointError(f"{exc}; {kept}; on_nan='skip' (--on-nan skip) skips such updates") from None
        if checkpoint and saved != self.iteration:
            self.save(checkpoint)
        if checkpoint and distributed.active(self.group):
            torch.distributed.barrier(group=self.group)  # rank 0's file is complete when fit returns on any rank

    def _read_pending(self, bar=None) -> None:
        """One host read of the iterations run since the last: their losses into ``loss_history``,
        the updates the device guard skipped into ``skipped_iterations``, and under on_nan='stop'
        the first bad one raised (its update and every later one were not applied; ``iteration``
        goes back to it)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        device = self.device
        nan, good = torch.full((1,), math.nan, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
        values = torch.stack([torch.cat([(nan if l is None else l.double().reshape(1)).to(device),
                                         (good if r is None else r).to(device)]) for _, l, r in pending]).cpu()
        for (it, loss, _), (value, bad, bad_loss, norm, overflow) in zip(pending, values.tolist()):
            if bad and self.on_nan == "stop":
                self.iteration = it
                what = f"the loss became {bad_loss}" if not math.isfinite(bad_loss) else f"the gradient norm became {norm}"
                raise FloatingPointError(f"{type(self).__name__}: {what} at iteration {it}")
            if bad:
                self.skipped_iterations.append(it)
            elif overflow:
                self.overflow_iterations.append(it)
            if loss is not None:
                self.loss_history.append(value)
        if bar is not None and self.loss_history:
            bar.set_postfix(loss=f"{self.loss_history[-1]:.4f}", refresh=False)

    def batch_images(self, batch) -> torch.Tensor:
        """The (B, 3, H, W) float32 images of a batch (a tensor or a dict with 'image') on the model's device."""
        from ..data.cache import CachedBatch

        return self.check_images(batch["image"] if isinstance(batch, dict) else batch, finite=not isinstance(batch, CachedBatch))

    def _stop_or_skip(self, what: str) -> None:
        """A NaN/inf ``what`` at this iteration: raise (on_nan='stop') or drop the update and record it."""
        if getattr(self, "on_nan", "stop") == "stop":
            raise FloatingPointError(f"{type(self).__name__}: {what} at iteration {self.iteration}")
        self.skipped_iterations.append(self.iteration)
        self.optimizer.zero_grad(set_to_none=True)

    def _skips_on_device(self) -> bool:
        """Whether the optimizer takes the NaN/inf decision on the device (``found_inf``: StableAdamW's
        multi-tensor update, torch's fused Adam / AdamW), so :meth:`update` needs no host read."""
        from ..optim import StableAdamW

        opt = self.optimizer
        if distributed.active(self.group) or opt is None:
            return False
        if isinstance(opt, StableAdamW):
            return all(g["foreach"] for g in opt.param_groups)
        return bool(getattr(opt, "_step_supports_amp_scaling", False) and opt.defaults.get("fused"))

    def _gradient_norm(self) -> torch.Tensor:
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        if self.grad_clip is not None:  # clipping computes the norm (inf: not finite, nothing clipped yet)
            return nn.utils.clip_grad_norm_(params, self.grad_clip)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])) \
            if params else torch.zeros(())

    def _backward(self, losses, set_to_none: bool) -> None:
        """zero_grad, then the backward pass of each loss (their gradients accumulate; under fp16 of
        each loss times the loss scale)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for i, loss in enumerate(losses):
            (loss if self._scaler is None else self._scaler.scaled(loss)).backward(retain_graph=i < len(losses) - 1)

    def _unscale(self) -> torch.Tensor | None:
        """fp16: the gradients divided by the loss scale; returns the (1,) overflow flag (None otherwise)."""
        return None if self._scaler is None else self._scaler.unscale(self.trainable_parameters())

    def _guarded_update(self, losses, set_to_none: bool) -> bool:
        """:meth:`update` without a host read: the step is skipped on the device where a loss or the
        gradient norm is not finite (and, under on_nan='stop', at every later iteration, so the
        parameters stay those before the first bad update); :meth:`_read_pending` reports it."""
        self._backward(losses, set_to_none)
        overflow = self._unscale()
        norm = self._gradient_norm()
        self._grad_norm = norm.detach()
        first = losses[-1].detach().double().reshape(())  # the first non-finite loss, for the message
        for loss in reversed(losses[:-1]):
            loss = loss.detach().double().reshape(())
            first = torch.where(torch.isfinite(loss), first, loss)
        first = first.to(norm.device)
        bad_grad = ~torch.isfinite(norm)
        over = torch.zeros((), dtype=torch.bool, device=norm.device)
        if overflow is not None:  # a loss-scale overflow is skipped, and counts as bad only at a scale <= 1
            over = overflow.reshape(()).to(norm.device) > 0
            bad_grad = bad_grad & (~over | (self._scaler.scale.reshape(()).to(norm.device) <= 1))
        bad = ~torch.isfinite(first) | bad_grad
        if self.on_nan == "stop":
            self._halted = bad if self._halted is None else bad | self._halted
        skip = (bad if self.on_nan == "skip" else self._halted) | over
        self.optimizer.found_inf = skip.to(torch.float32)
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        if overflow is not None:
            self._scaler.update(overflow)
        record = torch.stack([bad.double(), first, norm.detach().double(), (over & ~bad).double()])
        if self._pending and self._pending[-1][0] == self.iteration:  # a second update in one iteration (FOD)
            prev = self._pending.pop()[2]
            merged = torch.where(prev[0] > 0, prev, record)
            record = torch.cat([merged[:3], torch.maximum(prev[3:], record[3:])])
        self._pending.append((self.iteration, None, record))
        return True

    def update(self, *losses: torch.Tensor, set_to_none: bool = True) -> bool:
        """One optimizer update from ``losses`` (their gradients accumulate, FOD's two phases):
        zero_grad (``set_to_none=False``: torch 1.x semantics, gradients zero-filled, so the optimizer
        also steps parameters these losses do not reach), backward of each, gradient clipping
        (``grad_clip``), step. A NaN/inf loss or gradient norm stops the run or skips the step
        (``fit``'s ``on_nan``). Returns whether the step was taken; with an optimizer that skips on
        the device (:meth:`_skips_on_device`) the decision stays there, True is returned, and the
        loop reads it every ``check_every`` iterations."""
        if self._skips_on_device():
            return self._guarded_update(losses, set_to_none)
        bad = [float(loss.detach()) for loss in losses if not torch.isfinite(loss)]
        if distributed.active(self.group):  # every rank takes the same decision
            flag = torch.tensor([float(len(bad))], device=distributed.collective_device(self.group))
            torch.distributed.all_reduce(flag, group=self.group)
            if flag.item() and not bad:
                bad = ["non-finite on another rank"]
        if bad:
            self._stop_or_skip(f"the loss became {bad[0]}")
            return False
        self._backward(losses, set_to_none)
        if distributed.active(self.group):
            self._all_reduce_gradients()
        overflow = self._unscale()  # (of the summed gradients: every rank decides alike)
        norm = self._gradient_norm()
        if overflow is not None:
            over, scale = bool(overflow), float(self._scaler.scale)
            self._scaler.update(overflow)
            if over and scale > 1:  # an overflow at a scale <= 1 is a non-finite gradient (below)
                self.overflow_iterations.append(self.iteration)
                self.optimizer.zero_grad(set_to_none=True)
                return False
        self._grad_norm = float(norm)  # of the global batch's gradient (for logging)
        if not torch.isfinite(norm):
            self._stop_or_skip(f"the gradient norm became {float(norm)}")
            return False
        self.optimizer.step()
        return True

    def _all_reduce_gradients(self) -> None:
        """Sum every trainable parameter's gradient over the ranks (one flat buffer; zeros where a
        rank has none), so that all ranks take the same step."""
        params = list(self.trainable_parameters())
        device = distributed.collective_device(self.group)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device) for p in params])
        torch.distributed.all_reduce(flat, group=self.group)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.device)
            offset += n

    def training_step(self, batch, iteration: int) -> torch.Tensor:
        """One update from one batch: ``training_loss``, then :meth:`update`. Returns the (detached)
        loss recorded in ``loss_history``, or None for a batch the recipe skips. Data parallel: the
        rank's loss scaled by its share of the global batch."""
        loss = self.training_loss(self.batch_images(batch), iteration) * self._share
        self.update(loss)
        return loss.detach()

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict, dict]:
        """The training state: iteration, epoch length, loss history, RNG, optimizer and scheduler."""
        tensors = {"loss_history": torch.tensor(self.loss_history, dtype=torch.float64), "rng.cpu": torch.get_rng_state()}
        meta = {"iteration": self.iteration, "epoch_length": self.epoch_length, "skipped_iterations": self.skipped_iterations}
        if self._scaler is not None:
            tensors.update({f"scaler.{k}": v for k, v in self._scaler.state_dict().items()})
            meta["overflow_iterations"] = self.overflow_iterations
        if distributed.active(self.group):  # every rank's RNG (dropout draws differ per rank)
            device = distributed.collective_device(self.group)
            states = distributed.gather_rows(torch.get_rng_state().unsqueeze(0).to(device), self.group).cpu()
            tensors.update({f"rng.cpu.{r}": s for r, s in enumerate(states)})
            meta["world_size"] = distributed.world_size(self.group)
        if torch.cuda.is_available() and self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        if self.optimizer is not None:
            opt = self.optimizer.state_dict()
            plain = {}
            for idx, state in opt["state"].items():
                for k, v in state.items():
                    if isinstance(v, torch.Tensor):
                        tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
                    else:
                        plain[f"{idx}.{k}"] = v
            meta["optimizer"] = {"param_groups": opt["param_groups"], "plain": plain}
            meta["scheduler"] = self.scheduler.state_dict()  # lr_lambdas: None for plain functions
        return tensors, meta

    def restore_checkpoint_state(self, tensors: dict, meta: dict, restore_rng: bool) -> None:
        self.iteration = int(meta.get("iteration", 0))
        self.epoch_length = meta.get("epoch_length")
        self.skipped_iterations = list(meta.get("skipped_iterations", []))
        self.overflow_iterations = list(meta.get("overflow_iterations", []))
        if "scaler.scale" in tensors:
            from ..optim import LossScaler

            self._scaler = LossScaler()
            self._scaler.load_state_dict({"scale": tensors["scaler.scale"], "growth": tensors["scaler.growth"]})
        self.loss_history = tensors["loss_history"].tolist() if "loss_history" in tensors else []
        self._checkpoint_world = int(meta.get("world_size", 1))
        self._rank_rng = [tensors[f"rng.cpu.{r}"] for r in range(self._checkpoint_world)] \
            if f"rng.cpu.{self._checkpoint_world - 1}" in tensors and self._checkpoint_world > 1 else None
        if "optimizer" in meta:
            self.optimizer = self.scheduler = None
            self._ensure_optimizer()
            groups = meta["optimizer"]["param_groups"]
            opt_state: dict = {}
            for key, v in tensors.items():
                if key.startswith("optim."):
                    _, idx, name = key.split(".", 2)
                    opt_state.setdefault(int(idx), {})[name] = v.to(self.device) if v.dim() else v
            for key, v in meta["optimizer"]["plain"].items():
                idx, name = key.split(".", 1)
                opt_state.setdefault(int(idx), {})[name] = v
            for g in groups:  # JSON turned tuples into lists
                if "betas" in g:
                    g["betas"] = tuple(g["betas"])
            self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
            self.scheduler.load_state_dict(meta["scheduler"])
        if restore_rng and "rng.cpu" in tensors:
            torch.set_rng_state(tensors["rng.cpu"])
            if "rng.cuda" in tensors and torch.cuda.is_available() and self.device.type == "cuda":
                torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)

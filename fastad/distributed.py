"""Many processes on torch.distributed (c10d): NCCL on CUDA, gloo on the CPU.

Launch with ``torchrun`` (one or several machines) or ``srun``; :func:`init` reads their environment.
Every distributed fastad function takes ``group=``: None (the default) means this process alone,
exactly as without torch.distributed, even inside someone else's process group (a Lightning/DDP user's
calls stay local); pass ``torch.distributed.group.WORLD`` (or :func:`world`) to work across processes.

Conventions shared by the distributed ops and models:
- data are split into contiguous shards without padding (:func:`shard_range`): rank r holds rows
  ``[n * r // W, n * (r + 1) // W)``, so the concatenation in rank order is the whole;
- :func:`gather_rows` concatenates variable-length shards in that (global) order;
- collectives time out after ``timeout`` (default 10 minutes, ``FASTAD_DIST_TIMEOUT`` seconds): a
  rank that died or raised ends the others with an error instead of a hang.
"""
from __future__ import annotations

import datetime
import os
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Context", "active", "all_max_index", "collective_device", "gather_rows", "init", "offset", "rank",
           "shard_range", "spawn", "store", "wait_all", "world", "world_size"]

_ENV = (("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),  # torchrun
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"))  # srun


@dataclass(frozen=True)
class Context:
    """Where this process stands: its global ``rank`` of ``world`` processes, ``local_rank`` on its
    machine and the ``device`` it computes on."""

    rank: int
    world: int
    local_rank: int
    device: torch.device


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("FASTAD_DIST_TIMEOUT", 600)))


def _launcher_env() -> tuple[int, int, int, int] | None:
    for names in _ENV:
        if all(n in os.environ for n in names[:2]):
            r, w = int(os.environ[names[0]]), int(os.environ[names[1]])
            local = int(os.environ.get(names[2], r))
            local_world = int(str(os.environ.get(names[3], w)).split("(")[0].split(",")[0])
            return r, w, local, local_world
    return None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``'auto'``: CUDA when torch sees a GPU, else the CPU; any other name as ``torch.device`` takes it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def init(device: str | torch.device = "cpu") -> Context:
    """Join the process group described by the launcher's environment (torchrun: RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT; Slurm: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID with MASTER_ADDR
    and MASTER_PORT exported), once; without a launcher a one-process context.

    Args:
        device: ``'cpu'`` (gloo), ``'cuda'`` (NCCL; each process takes ``cuda:LOCAL_RANK``) or
            ``'auto'`` (:func:`resolve_device`).
    Returns:
        the :class:`Context`. Torch's CPU threads are set to cores / processes per machine unless
        ``OMP_NUM_THREADS`` is set, so that processes on one machine do not oversubscribe it.
    """
    device = resolve_device(device)
    env = _launcher_env()
    if env is None and dist.is_available() and dist.is_initialized():  # a group made by the caller (tests)
        r, w = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return Context(r, w, r, device)
    if env is None or env[1] == 1:  # no launcher, or a one-task job (e.g. plain `fastad run` inside sbatch)
        return Context(0, 1, 0, device)
    r, w, local, local_world = env
    if device.type == "cuda":
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=r, world_size=w, timeout=_timeout(),
                                device_id=device if device.type == "cuda" else None)
    return Context(r, w, local, device)


def world():
    """The default process group when one is initialised (torchrun / :func:`init`), else None."""
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def active(group=None) -> bool:
    """True when ``group`` is a process group of more than one process (None: this process alone)."""
    return group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if active(group) else 0


def world_size(group=None) -> int:
    """Processes in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if active(group) else 1


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[begin, end)`` of ``n`` that rank ``rank`` of ``world`` holds: contiguous, no padding,
    sizes differing by at most one (a rank may hold none when n < world)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} must be in [0, {world})")
    return n * rank // world, n * (rank + 1) // world


def _sizes(n: int, group, device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size(group))]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=device), group=group)
    return [int(s) for s in sizes]


def gather_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``t`` (n_r, ...) along dim 0 in rank order (n_r may differ, 0 too);
    every rank gets the whole. Without a process group ``t`` itself."""
    if not active(group):
        return t
    sizes = _sizes(t.shape[0], group, t.device)
    most = max(sizes)
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def offset(n: int, group=None) -> tuple[int, int]:
    """(global index of this rank's first row, total rows) for shards of ``n`` rows per rank."""
    if not active(group):
        return 0, n
    sizes = _sizes(n, group, collective_device(group))
    r = rank(group)
    return sum(sizes[:r]), sum(sizes)


def collective_device(group=None) -> torch.device:
    """The device collectives of ``group`` take tensors on (CUDA for NCCL)."""
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_max_index(value: float, index: int, payload: torch.Tensor | None, group=None):
    """The (value, global index, payload) of the rank holding the largest ``value``, ties to the
    lowest ``index`` (ranks with ``index < 0`` hold nothing); one all_gather. ``payload`` is a 1-D
    float32 tensor of the same length on every rank (zeros where a rank has none)."""
    device = payload.device
    head = torch.tensor([value, float(index)], dtype=torch.float64, device=device)
    row = torch.cat([head, payload.double()])
    rows = [torch.empty_like(row) for _ in range(world_size(group))]
    dist.all_gather(rows, row, group=group)
    table = torch.stack(rows).cpu()
    best = None
    for r in range(table.shape[0]):
        v, i = float(table[r, 0]), int(table[r, 1])
        if i >= 0 and (best is None or v > best[0] or (v == best[0] and i < best[1])):
            best = (v, i, r)
    if best is None:
        raise ValueError("no rank holds a point")
    return best[0], best[1], rows[best[2]][2:].float()


def store():
    """The c10d key-value store of the default process group (torchrun's rendezvous store, or the
    file store of :func:`spawn`): shared counters and flags between the processes."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def wait_all(kv, key: str, rank: int, world: int, timeout_s: float = 7 * 24 * 3600) -> None:
    """Mark this rank done under ``key`` and wait until all ``world`` ranks are (no collective: ranks
    finish their jobs at different times, longer than a collective's timeout; a rank that dies ends
    the run through the launcher)."""
    kv.set(f"{key}/done/{rank}", "1")
    kv.wait([f"{key}/done/{r}" for r in range(world)], datetime.timedelta(seconds=timeout_s))


# ---------------------------------------------------------------------------------------------------
# test helper


def _spawned(rank: int, world: int, fn, args, store_path: str, result_dir: str, timeout_s: float) -> None:
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    torch.set_num_threads(1)
    try:
        out = fn(rank, world, *args)
        torch.save(out, os.path.join(result_dir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(result_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world: int, *args, timeout_s: float = 30.0) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh CPU processes joined in a gloo group through
    a file store (no port), and return their results in rank order. A rank that raises ends the
    run: the others stop at their next collective within ``timeout_s``, and a RuntimeError carries
    the first traceback. For tests and small scripts; real runs use torchrun or srun."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="fastad-spawn-") as tmp:
        store, results = os.path.join(tmp, "store"), os.path.join(tmp, "results")
        os.makedirs(results)
        try:
            mp.spawn(_spawned, args=(world, fn, args, store, results, timeout_s), nprocs=world, join=True)
        except Exception as exc:
            # the first rank to fail is the cause; the others fail after it (connection reset)
            errors = sorted((os.stat(os.path.join(results, f)).st_mtime_ns, f) for f in os.listdir(results)
                            if f.endswith(".err"))
            if not errors:
                raise RuntimeError(f"a rank failed: {exc}") from None
            first = errors[0][1]
            detail = open(os.path.join(results, first)).read()
            raise RuntimeError(f"rank {first.split('.')[0]} failed:\n{detail}") from None
        return [torch.load(os.path.join(results, f"{r}.pt"), weights_only=False) for r in range(world)]

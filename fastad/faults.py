"""Surviving faults: files written atomically, and out-of-memory errors that name the stage and the
knob to turn.

- :func:`atomic_write`: a file is written to a temporary name in its own folder, flushed to disk
  (fsync) and renamed over the target, so a reader (or a resumed run) sees the old file or the new
  one, never half of one; when the write fails (disk full, permission denied) the temporary file is
  removed, the previous file is untouched and the error names the file.
- :func:`memory_stage`: a context in which a device out-of-memory error is re-raised as
  :class:`torch.cuda.OutOfMemoryError` naming the stage (embedding, coreset, kNN, training, inference)
  and the setting that lowers its memory.
"""
from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator

import torch

__all__ = ["UsageError", "atomic_write", "check_writable", "exclusive_folder", "is_out_of_memory", "memory_stage"]


class UsageError(Exception):
    """A user error (bad arguments or data): the command line prints it as one line
    ``fastad: error: ...`` and exits with 2."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file beside it (same folder, so
    the rename cannot cross file systems), which is fsynced and renamed over ``path``.

    Raises:
        OSError (the same errno) naming ``path`` when the folder is missing or not writable or the
        disk is full; ``path`` then still holds its previous content and no temporary file is left.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError):
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            kept = "the previous file is unchanged" if os.path.exists(path) else "nothing was written"
            raise type(exc)(exc.errno, f"cannot write {path}: {reason}; {kept}") from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Create ``folder`` if needed and prove a file can be written there (a probe written through
    :func:`atomic_write`, then removed), before any long work whose results would go there.

    Raises:
        OSError naming ``folder`` and ``what`` (e.g. ``'--out'``) when it cannot be created or written.
    """
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".fastad-write-probe.{os.getpid()}")
        atomic_write(probe, lambda tmp: open(tmp, "wb").close())
        os.remove(probe)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise type(exc)(exc.errno or errno.EIO, f"{what} {folder} is not writable: {reason}") from None


@contextlib.contextmanager
def exclusive_folder(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``folder/.fastad.lock``, ``fcntl.flock``) for the block, so
    that two fastad processes never write one folder's files at once. The lock ends with the block or
    the process (a crashed run leaves no stale lock); the file names its holder.

    Raises:
        OSError (EBUSY) naming ``folder``, ``what`` (e.g. ``'--out'``) and the holder when another
        process holds it.
    """
    import fcntl
    import socket
    import time

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, ".fastad.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 300).decode(errors="replace").strip() or "another process"
            raise OSError(errno.EBUSY, f"{what} {folder} is being written by another fastad run ({holder}); wait for "
                          f"it to finish or pass another {what}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device (or host allocator) out-of-memory error."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


@contextlib.contextmanager
def memory_stage(stage: str, knob: str) -> Iterator[None]:
    """Re-raise an out-of-memory error inside the block as ``torch.cuda.OutOfMemoryError`` whose message
    names ``stage`` and ``knob`` (what to change), followed by the allocator's first line."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc) or str(exc).startswith("out of memory in "):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise torch.cuda.OutOfMemoryError(f"out of memory in {stage}: {knob} ({first})") from exc

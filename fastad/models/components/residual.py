"""ADPretrain's residual features and Feature Projectors (spec section 3), shared by the projector
pretraining model (``adpretrain``) and the few-shot FeatureNorm detector (``featurenorm``).

A residual feature is a backbone token minus its most cosine-similar token in a bank of few-shot
normal reference images of the same class (all tokens of K images, no positional constraint;
:func:`fastad.ops.nearest_reference` with ``metric='cosine'``). One Feature Projector per level maps
residuals to the pretrained representation: a learnable reference (2048 x C, randn) embedded by a
1x1 convolution and shared by the layers; each layer is a Learnable Key/Value attention (query =
tokens, key = value = reference, 16 heads), merged by **subtraction**, then ``x + MLP(x)`` with MLP =
Linear(C, 4C) -> SE gate (mean over tokens) -> GELU -> Linear(4C, C). No LayerNorm; one layer.

Backbones: DINOv2 (``backbone='vit_large_patch14_dinov2', weights=PATH``: blocks 6, 12, 18, 24, the
paper's) or, offline by default, the ImageNet EfficientNet-Lite0 at strides 4, 8, 16, 32 (its 24-
and 40-channel levels get 12 and 10 heads: the largest head count up to 16 that divides C).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import OFFLINE_DEFAULT, FeatureExtractor
from ...ops import nearest_reference
from .authors import load_authors_state, read_torch_state
from .maps import level_maps, score_and_map
from .vit_encoder import ViTMaps

__all__ = ["FeatureProjector", "ResidualFeatures", "feature_norm", "feature_norm_map", "heads_for"]

# DINOv2 (no registers) -> the 0-indexed blocks ADPretrain reads (1-indexed 3/6/9/12, 6/12/18/24)
VIT_LEVELS = {"vit_base_patch14_dinov2": (2, 5, 8, 11), "vit_large_patch14_dinov2": (5, 11, 17, 23)}
DEFAULT_LAYERS = {OFFLINE_DEFAULT: (1, 2, 3, 4)}


def feature_norm(features: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """ADPretrain's norm, ``sqrt(||x||_2 + 1) - 1`` along ``dim`` (the code's; the paper writes
    ``sqrt(||x||^2 + 1) - 1``)."""
    return torch.sqrt(features.norm(dim=dim) + 1) - 1


def feature_norm_map(feats: list[torch.Tensor], size: tuple[int, int], sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FeatureNorm's scoring: per level (B, C_l, h_l, w_l) features -> each token's :func:`feature_norm`,
    bilinear (align_corners=True) to ``size``, mean over levels, Gaussian ``sigma``; returns
    (max of the smoothed map (B,), smoothed map (B, H, W)), as the authors evaluate it."""
    maps = level_maps([feature_norm(f, dim=1).flatten(1) for f in feats], [f.shape[-2:] for f in feats], size)
    return score_and_map(maps, sigma, smoothed_map=True)


def heads_for(channels: int, heads: int) -> int:
    """The largest head count up to ``heads`` that divides ``channels``."""
    return max(h for h in range(1, heads + 1) if channels % h == 0)


class SEGate(nn.Module):
    """Squeeze-excitation over the token axis: (B, L, D) scaled per channel by
    ``sigmoid(fc2(relu(fc1(mean_L x))))``, fc1 D -> make_divisible(D / 16, 8)."""

    def __init__(self, channels: int):
        super().__init__()
        from timm.layers import make_divisible

        hidden = make_divisible(channels / 16, 8, round_limit=0.0)
        self.fc1, self.fc2 = nn.Linear(channels, hidden), nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(1, keepdim=True)))))


class LKVLayer(nn.Module):
    """Learnable Key/Value attention, subtraction merge, SE MLP:
    ``x1 = x - MHA(x, R, R)``, ``out = x1 + fc2(gelu(se(fc1(x1))))``.
    Forward: x (B, L, C), reference (B, N_r, C) -> (B, L, C)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.fc1, self.se, self.fc2 = nn.Linear(channels, 4 * channels), SEGate(4 * channels), nn.Linear(4 * channels, channels)

    def forward(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        x = x - self.attention(x, reference, reference, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.se(self.fc1(x))))


class FeatureProjector(nn.Module):
    """One level's Feature Projector. Forward: (B, C, h, w) residual features -> (B, C, h, w)."""

    def __init__(self, channels: int, heads: int = 16, references: int = 2048, depth: int = 1):
        super().__init__()
        self.reference = nn.Parameter(torch.randn(1, references, channels))
        self.embed_reference = nn.Conv1d(channels, channels, 1)
        nn.init.kaiming_normal_(self.embed_reference.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.layers = nn.ModuleList(LKVLayer(channels, heads_for(channels, heads)) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ref = self.embed_reference(self.reference.transpose(1, 2)).transpose(1, 2).expand(b, -1, -1)
        t = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            t = layer(t, ref)
        return t.transpose(1, 2).reshape(b, c, h, w)


class ResidualFeatures:
    """Mixin of the models built on residual features: a frozen ``backbone``, one ``projectors``
    entry per level, the level centres ``center_<l>`` (kept with the projectors: the angle loss's
    origin) and the reference tokens ``bank_<l>`` residuals are taken against (set by the model's
    ``fit``). :meth:`init_residual_features` builds them; the attribute names are the checkpoint keys
    that :meth:`load_projectors` reads."""

    autocast_modules = ("backbone", "projectors")

    def init_residual_features(self, backbone: str, layers, weights, heads: int, num_references: int, depth: int) -> list[int]:
        """Build backbone, projectors, centres and (empty) reference banks; returns the resolved layers."""
        vit = "dinov2" in backbone
        if layers is None and vit and backbone not in VIT_LEVELS:
            raise ValueError(f"no default blocks for {backbone}: pass layers=[...] (0-indexed blocks)")
        layers = list(layers) if layers is not None else list(VIT_LEVELS.get(backbone, DEFAULT_LAYERS.get(backbone, (1, 2, 3, 4))))
        self.backbone = ViTMaps(backbone, layers, weights) if vit else FeatureExtractor(backbone, layers, weights)
        if vit:  # images must tile into patches
            self.input_multiple = self.backbone.encoder.patch
        self.channels, self.reductions = list(self.backbone.channels), list(self.backbone.reductions)
        self.projectors = nn.ModuleList(FeatureProjector(c, heads, num_references, depth) for c in self.channels)
        for i, c in enumerate(self.channels):
            self.register_buffer(f"center_{i}", torch.zeros(c))
            self.register_buffer(f"bank_{i}", torch.empty(0, c))
        return layers

    def centers(self) -> list[torch.Tensor]:
        return [getattr(self, f"center_{i}") for i in range(len(self.channels))]

    def banks(self) -> list[torch.Tensor]:
        """Per level the (M_l, C_l) reference tokens; raises if the model is not fitted."""
        banks = [getattr(self, f"bank_{i}") for i in range(len(self.channels))]
        if banks[0].numel() == 0:
            raise RuntimeError(f"{type(self).__name__} is not fitted (no reference images): call fit() or load a checkpoint first")
        return banks

    @torch.no_grad()
    def set_reference_images(self, images: torch.Tensor) -> None:
        """Make every token of the (K, 3, H, W) ``images`` the reference banks."""
        for i, bank in enumerate(self.reference_banks(images)):
            setattr(self, f"bank_{i}", bank)

    @torch.no_grad()
    def residuals(self, images: torch.Tensor, banks: list[torch.Tensor]) -> list[torch.Tensor]:
        """(B, 3, H, W) and per level an (M_l, C_l) bank -> per level (B, C_l, h_l, w_l) residual
        features ``x - argmax_cos(bank)``."""
        out = []
        for f, bank in zip(self.backbone(images), banks):
            x = f.permute(0, 2, 3, 1).contiguous()
            out.append(nearest_reference(x, bank, metric="cosine")[2].permute(0, 3, 1, 2))
        return out

    @torch.no_grad()
    def reference_banks(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(K, 3, H, W) normal images -> per level the (K h_l w_l, C_l) bank of all their tokens."""
        return [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in self.backbone(images)]

    def project(self, residuals: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per level (B, C_l, h_l, w_l) residuals through the level's projector."""
        return [p(r) for p, r in zip(self.projectors, residuals)]

    def load_projectors(self, path) -> None:
        """Load the projectors and centres of an ``adpretrain`` checkpoint made with the same backbone
        and layers, or the projectors of a file the authors release (``.pth``/``.pt``:
        :meth:`load_authors_projectors`). Raises ValueError naming the mismatch."""
        from safetensors import safe_open

        from ..base import checkpoint_config

        if str(path).lower().endswith((".pth", ".pt")):
            return self.load_authors_projectors(path)

        name, config = checkpoint_config(path)
        mine = (self.config["backbone"], list(self.config["layers"] or []))
        if name not in ("adpretrain", "ADPretrain") or (config["backbone"], config["layers"]) != mine:
            raise ValueError(f"{path} holds a {name} checkpoint of backbone {config.get('backbone')} layers {config.get('layers')}, "
                             f"expected an adpretrain checkpoint of {mine[0]} layers {mine[1]}")
        with safe_open(str(path), framework="pt") as f:
            keep = [k for k in f.keys() if k.startswith(("model.projectors.", "model.center_"))]
            state = {k[len("model."):]: f.get_tensor(k) for k in keep}
        missing = [k for k in self.load_state_dict(state, strict=False).missing_keys if k.startswith("projectors.")]
        if missing:
            raise ValueError(f"{path} lacks projector weights {sorted(missing)[:3]}")

    def load_authors_projectors(self, path) -> None:
        """Load the Feature Projectors of the authors' released checkpoint (``torch.save({'projectors':
        MultiScaleAttentionProjector.state_dict(), ...})``, e.g. ``checkpoints_pro_norm.pth``): per
        level ``l<i+1>_proj.{x_ref, ref_proj.project, layers.<j>.cross_attn, layers.<j>.mlp.{fc1, fc2,
        se.fc1, se.fc2}}`` -> ``projectors.<i>.{reference, embed_reference, layers.<j>.{attention, fc1,
        fc2, se.fc1, se.fc2}}``. The centres are not in that file (FeatureNorm does not use them).
        The backbone must be the checkpoint's (DINOv2-L: 4 levels of 1024 channels)."""
        state = read_torch_state(path, "ADPretrain projector checkpoint", ("projectors",))
        mapping = []
        for i, p in enumerate(self.projectors):
            mapping += [(f"projectors.l{i + 1}_proj.x_ref", f"projectors.{i}.reference"),
                        (f"projectors.l{i + 1}_proj.ref_proj.project", f"projectors.{i}.embed_reference")]
            for j in range(len(p.layers)):
                theirs, ours = f"projectors.l{i + 1}_proj.layers.{j}", f"projectors.{i}.layers.{j}"
                mapping += [(f"{theirs}.cross_attn", f"{ours}.attention"), (f"{theirs}.mlp.se", f"{ours}.se"),
                            (f"{theirs}.mlp.fc1", f"{ours}.fc1"), (f"{theirs}.mlp.fc2", f"{ours}.fc2")]
        load_authors_state(nn.ModuleDict({"projectors": self.projectors}), state, mapping, path)

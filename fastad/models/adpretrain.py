"""ADPretrain (NeurIPS 2025; spec section 3), as the authors' code (MIT) runs it.

Pretrained anomaly representations on **residual features**: every backbone token minus its most
cosine-similar token in a bank of few-shot normal reference images of the same class (all tokens of
K images, no positional constraint; ``fastad.ops.nearest_reference(metric='cosine')``). One Feature
Projector per level maps residuals to the pretrained representation: a learnable reference
(2048 x C, randn) embedded by a 1x1 convolution and shared by the layers; each layer is a Learnable
Key/Value attention (query = tokens, key = value = reference, 16 heads), merged by **subtraction**,
then ``x + MLP(x)`` with MLP = Linear(C, 4C) -> SE gate (mean over tokens) -> GELU -> Linear(4C, C).
No LayerNorm; one layer.

Pretraining (:meth:`ADPretrain.pretrain`) needs labelled images with masks (the authors use
Real-IAD): two augmented views per image (colour jitter, greyscale, blur), references drawn per batch
(K from {1, 4, 8}), and per level

- the angle-oriented loss (tau 0.15) on the projected features minus the level centre (the mean raw
  residual of the normal images, 4-shot references), both views as anchors, negatives only of the
  other label, the positive not in the denominator; labels: a cell is abnormal when more than
  32/196 of its pixels are;
- the norm-oriented loss on each view with ``A = sqrt(||x||_2 + 1) - 1`` (the code's norm, not the
  paper's pseudo-Huber), radius ``min(0.9 min A_abnormal, 0.4)``, margin 0.75, detached exp weights;
  labels: nearest-neighbour downsampled mask.

Batches with no anomalous image are skipped. Adam lr 1e-4, weight decay 5e-4, 10 epochs of batch 32,
the LR divided by 10 after epochs 7 and 9.

Downstream (:meth:`ADPretrain.fit` on normal images of the target class picks the first ``shots``
= 8 as the reference bank): ``scorer='featurenorm'`` scores each token by ``sqrt(||f||_2 + 1) - 1``
of its projected residual, bilinear (align_corners=True) to the input, mean over levels, Gaussian
sigma = 4, image score = max (the map returned is the smoothed one, as the authors evaluate it);
``'patchcore'`` runs :class:`PatchCore` (10% coreset, k = 1) on the last three levels' projected
features; ``'padim'`` runs :class:`PaDiM` with one full-channel Gaussian per level.

The paper's backbones are DINOv2-B/L (``backbone='vit_large_patch14_dinov2', weights=PATH``: blocks
6, 12, 18, 24); offline the default is the ImageNet EfficientNet-Lite0 at strides 4, 8, 16, 32 (its
24- and 40-channel levels get 12 and 10 heads: the largest head count up to 16 that divides C).
"""
from __future__ import annotations

import itertools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import OFFLINE_DEFAULT, FeatureExtractor
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..ops import nearest_reference
from ._batches import image_batches
from ._tokens import level_maps, score_and_map
from ._training import TrainedModel
from .padim import PaDiM
from .patchcore import PatchCore
from .vit_encoder import ViTEncoder

SCORERS = ("featurenorm", "patchcore", "padim")
# DINOv2 (no registers) -> the 0-indexed blocks ADPretrain reads (1-indexed 3/6/9/12, 6/12/18/24)
VIT_LEVELS = {"vit_base_patch14_dinov2": (2, 5, 8, 11), "vit_large_patch14_dinov2": (5, 11, 17, 23)}
DEFAULT_LAYERS = {OFFLINE_DEFAULT: (1, 2, 3, 4)}
ABNORMAL_PATCH_FRACTION = 32 / 196  # the code's patchify_mask: > 32 abnormal pixels of a 14 x 14 patch


# -- losses -------------------------------------------------------------------------------------------
def feature_norm(features: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """ADPretrain's norm, ``sqrt(||x||_2 + 1) - 1`` along ``dim`` (the code's; the paper writes
    ``sqrt(||x||^2 + 1) - 1``)."""
    return torch.sqrt(features.norm(dim=dim) + 1) - 1


def angle_loss(view1: torch.Tensor, view2: torch.Tensor, abnormal: torch.Tensor, center: torch.Tensor | None = None,
               tau: float = 0.15) -> torch.Tensor:
    """Angle-oriented contrastive loss (the code's version of the paper's Eq. 2).

    Args:
        view1, view2: (N, C) features of the same N positions in two augmented views.
        abnormal: (N,) bool labels.
        center: (C,) subtracted before the cosine (None: the origin).
    Returns:
        scalar: mean over all 2N anchors of ``-log(exp(cos(x_i, x_i') / tau) / sum_{k: other label}
        exp(cos(x_i, x_k) / tau))``, negatives from both views; 0 when one label is absent.
    """
    if view1.shape != view2.shape or view1.dim() != 2 or abnormal.shape != view1.shape[:1]:
        raise ValueError(f"expected two (N, C) views and (N,) labels, got {tuple(view1.shape)}, {tuple(view2.shape)}, {tuple(abnormal.shape)}")
    abnormal = abnormal.bool()
    if abnormal.all() or not abnormal.any():
        return view1.sum() * 0  # no negatives: the authors' NaN/inf loss, replaced by 0
    if center is not None:
        view1, view2 = view1 - center, view2 - center
    a, b = F.normalize(view1, dim=-1), F.normalize(view2, dim=-1)
    feats, labels = torch.cat([a, b]), torch.cat([abnormal, abnormal])
    positive = (a * b).sum(-1).repeat(2) / tau
    normal, anomalous = feats[~labels], feats[labels]
    sim = normal @ anomalous.t() / tau  # (normal anchors, abnormal negatives); its transpose the reverse
    losses = torch.cat([torch.logsumexp(sim, 1) - positive[~labels], torch.logsumexp(sim.t(), 1) - positive[labels]])
    return losses.mean()


def norm_loss(features: torch.Tensor, abnormal: torch.Tensor, radius: float = 0.4, margin: float = 0.75) -> torch.Tensor:
    """Norm-oriented contrastive loss (the code's version of the paper's Eq. 3-6).

    Args:
        features: (N, C); abnormal: (N,) bool labels.
    Returns:
        scalar: with ``A = feature_norm(x)``, ``r = min(0.9 min A_abnormal, radius)`` (``radius``
        without anomalies) and ``r_min = 0.99 r``, the sum of the non-empty terms
        ``mean_{normal, A > r} f(A - r)``, ``mean_{normal, A < r_min} f(r_min - A)`` and
        ``mean_{abnormal, A < r + margin} f(r + margin - A)``, where ``f(d) = -logsigmoid(-d) *
        exp(d)`` with the exp weight detached.
    """
    if features.dim() != 2 or abnormal.shape != features.shape[:1]:
        raise ValueError(f"expected (N, C) features and (N,) labels, got {tuple(features.shape)} and {tuple(abnormal.shape)}")
    abnormal = abnormal.bool()
    a = feature_norm(features)
    an, aa = a[~abnormal], a[abnormal]
    r_max = min(0.9 * aa.min().item(), radius) if len(aa) else radius  # a number: no gradient through r
    r_min = 0.99 * r_max

    def barrier(d):
        return (-F.logsigmoid(-d) * torch.exp(d).detach()).mean()

    terms = [barrier(d) for d in (an[an > r_max] - r_max, r_min - an[an < r_min], r_max + margin - aa[aa < r_max + margin]) if len(d)]
    return sum(terms) if terms else features.sum() * 0


# -- labels and augmentation ---------------------------------------------------------------------------
def patch_labels(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) masks -> (B, h, w) bool: more than 32/196 of a cell's pixels abnormal (angle loss)."""
    return F.adaptive_avg_pool2d(masks.unsqueeze(1).double(), grid).squeeze(1) > ABNORMAL_PATCH_FRACTION  # exact at 32/196


def nearest_labels(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) masks -> (B, h, w) bool by nearest-neighbour downsampling (norm loss)."""
    return F.interpolate(masks.unsqueeze(1).float(), size=grid, mode="nearest").squeeze(1) > 0.5


def augment_view(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One MoCo-style view of ImageNet-normalised images (B, 3, H, W), every draw from ``generator``:
    ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 (the four in random order), RandomGrayscale p 0.2,
    GaussianBlur sigma in [0.1, 2] (kernel 2 ceil(3 sigma) + 1) with p 0.5."""
    import torchvision.transforms.v2.functional as TF

    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    out = []
    for img in (images * std + mean).clamp(0, 1):
        if u(0, 1) < 0.8:
            jitters = [(TF.adjust_brightness, u(0.6, 1.4)), (TF.adjust_contrast, u(0.6, 1.4)),
                       (TF.adjust_saturation, u(0.6, 1.4)), (TF.adjust_hue, u(-0.1, 0.1))]
            for i in torch.randperm(4, generator=generator).tolist():
                fn, factor = jitters[i]
                img = fn(img, factor)
        if u(0, 1) < 0.2:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if u(0, 1) < 0.5:
            sigma = u(0.1, 2.0)
            k = 2 * math.ceil(3 * sigma) + 1
            img = TF.gaussian_blur(img, [k, k], [sigma, sigma])
        out.append(img)
    return (torch.stack(out) - mean) / std


# -- the projector ------------------------------------------------------------------------------------------
def _heads(channels: int, heads: int) -> int:
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
        self.layers = nn.ModuleList(LKVLayer(channels, _heads(channels, heads)) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ref = self.embed_reference(self.reference.transpose(1, 2)).transpose(1, 2).expand(b, -1, -1)
        t = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            t = layer(t, ref)
        return t.transpose(1, 2).reshape(b, c, h, w)


class _ViTMaps(nn.Module):
    """A frozen DINOv2 as a list of (B, D, H/14, W/14) maps (prefix tokens dropped)."""

    def __init__(self, name: str, layers, weights):
        super().__init__()
        self.encoder = ViTEncoder(name, layers, weights)
        self.channels = [self.encoder.dim] * len(self.encoder.layers)
        self.reductions = [self.encoder.patch] * len(self.encoder.layers)

    def forward(self, images):
        h, w = (s // self.encoder.patch for s in images.shape[-2:])
        p = self.encoder.num_prefix
        return [t[:, p:].transpose(1, 2).reshape(t.shape[0], -1, h, w) for t in self.encoder(images)]


class ProjectedFeatures(nn.Module):
    """Some levels of an :class:`ADPretrain`'s projected residual features, as the ``backbone`` of
    PatchCore / PaDiM: images (B, 3, H, W) -> list of (B, C_l, h_l, w_l). It holds no weights: the
    ADPretrain model owns (saves, moves) them."""

    def __init__(self, owner: "ADPretrain", levels: list[int]):
        super().__init__()
        self.__dict__["owner"] = owner  # not a submodule: no cycle, no duplicate state
        self.levels = list(levels)
        self.channels = [owner.channels[i] for i in self.levels]
        self.reductions = [owner.reductions[i] for i in self.levels]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = self.owner.project(images)
        return [feats[i] for i in self.levels]


class ADPretrain(TrainedModel):
    """ADPretrain's pretrained residual representations and their downstream detectors.

    Args:
        backbone, layers, weights: frozen features: a timm CNN (:class:`fastad.backbones.FeatureExtractor`;
            default the offline EfficientNet-Lite0 at strides 4-32) or a timm DINOv2 (a name with
            'dinov2'; ``layers`` = 0-indexed blocks, default from ``VIT_LEVELS``).
        scorer: ``'featurenorm'``, ``'patchcore'`` or ``'padim'`` (module docstring).
        shots: normal reference images taken by :meth:`fit` (8).
        project: False scores the raw residual features (no projector; a baseline).
        pretrained: an ADPretrain checkpoint whose projectors and centres are loaded (same backbone).
        heads, num_references, depth: projector attention heads (16), learnable references (2048), layers (1).
        tau, radius, margin: angle temperature (0.15), norm radius bound (0.4), abnormal margin (0.75).
        shot_choices, center_shots: K drawn per pretraining batch ({1, 4, 8}); K for the centres (4).
        epochs, iterations, train_batch_size, lr, weight_decay, milestones: pretraining schedule.
        coreset_ratio: PatchCore's coreset (0.1).
        sigma: map smoothing (4).
        seed: references, augmentations, batch order (42).
    Forward:
        images (B, 3, H, W) -> (scores (B,), maps (B, H, W)) float32, after :meth:`fit`.
    """

    image_size = (224, 224)  # FeatureNorm's resize 224 / crop 224
    trains = False  # the engine's fit() gets normal images: references + scorer; pretraining is pretrain()

    def __init__(self, backbone: str = OFFLINE_DEFAULT, layers=None, weights: str | None = None, scorer: str = "featurenorm",
                 shots: int = 8, project: bool = True, pretrained: str | None = None, heads: int = 16,
                 num_references: int = 2048, depth: int = 1, tau: float = 0.15, radius: float = 0.4, margin: float = 0.75,
                 shot_choices=(1, 4, 8), center_shots: int = 4, epochs: int = 10, iterations: int | None = None,
                 train_batch_size: int = 32, lr: float = 1e-4, weight_decay: float = 5e-4, milestones=(7, 9),
                 coreset_ratio: float = 0.1, sigma: float = 4.0, seed: int = 42):
        super().__init__()
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        if shots < 1 or center_shots < 1 or not shot_choices or min(shot_choices) < 1:
            raise ValueError(f"shots, center_shots and shot_choices must be >= 1, got {shots}, {center_shots}, {list(shot_choices)}")
        vit = "dinov2" in backbone
        if layers is None and vit and backbone not in VIT_LEVELS:
            raise ValueError(f"no default blocks for {backbone}: pass layers=[...] (0-indexed blocks)")
        layers = tuple(layers) if layers is not None else VIT_LEVELS.get(backbone, DEFAULT_LAYERS.get(backbone, (1, 2, 3, 4)))
        self.config = dict(backbone=backbone, layers=list(layers), weights=weights, scorer=scorer, shots=shots, project=project,
                           pretrained=pretrained, heads=heads, num_references=num_references, depth=depth, tau=tau,
                           radius=radius, margin=margin, shot_choices=list(shot_choices), center_shots=center_shots,
                           epochs=epochs, iterations=iterations, train_batch_size=train_batch_size, lr=lr,
                           weight_decay=weight_decay, milestones=list(milestones), coreset_ratio=coreset_ratio,
                           sigma=sigma, seed=seed)
        self.backbone = _ViTMaps(backbone, layers, weights) if vit else FeatureExtractor(backbone, layers, weights)
        self.channels, self.reductions = list(self.backbone.channels), list(self.backbone.reductions)
        self.projectors = nn.ModuleList(FeatureProjector(c, heads, num_references, depth) for c in self.channels)
        for i, c in enumerate(self.channels):
            self.register_buffer(f"center_{i}", torch.zeros(c))
            self.register_buffer(f"bank_{i}", torch.empty(0, c))  # the few-shot reference tokens
        self.scorer, self.shots, self.project_features = scorer, shots, project
        self.tau, self.radius, self.margin = tau, radius, margin
        self.shot_choices, self.center_shots = tuple(shot_choices), center_shots
        self.epochs, self.iterations_override, self.train_batch_size = epochs, iterations, train_batch_size
        self.lr, self.weight_decay, self.milestones = lr, weight_decay, tuple(milestones)
        self.coreset_ratio, self.sigma, self.seed, self.grad_clip = coreset_ratio, sigma, seed, None
        self.__dict__["downstream"] = None  # PatchCore / PaDiM, rebuilt by fit(); not saved
        if pretrained is not None:
            self.load_projectors(pretrained)

    # -- features -----------------------------------------------------------------------------------------
    def banks(self) -> list[torch.Tensor]:
        return [getattr(self, f"bank_{i}") for i in range(len(self.channels))]

    def centers(self) -> list[torch.Tensor]:
        return [getattr(self, f"center_{i}") for i in range(len(self.channels))]

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

    def project(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> per level (B, C_l, h_l, w_l) projected residual features against the
        fitted reference bank (raw residuals with ``project=False``)."""
        banks = self.banks()
        if banks[0].numel() == 0:
            raise RuntimeError("ADPretrain has no reference images: call fit() on normal images of the class first")
        res = self.residuals(images.to(self.device, torch.float32), banks)
        return [p(r) for p, r in zip(self.projectors, res)] if self.project_features else res

    # -- downstream ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, data) -> "ADPretrain":
        """Take the first ``shots`` images of ``data`` (normal images of the target class: tensors
        (B, 3, H, W) or dicts with 'image') as the reference bank, then fit the scorer on all of them."""
        if self.project_features and self.iteration == 0 and self.config["pretrained"] is None:
            warnings.warn("ADPretrain's projectors are untrained: pretrain() them, pass pretrained=PATH or load a "
                          "checkpoint (project=False scores the raw residuals)", stacklevel=3)
        batches = iter(image_batches(data, self.device))
        taken, n = [], 0
        for images in batches:  # read only until `shots` images are seen; a scorer streams the rest
            taken.append(images)
            n += len(images)
            if n >= self.shots:
                break
        if not taken:
            raise ValueError("ADPretrain.fit() got no images")
        refs = torch.cat(taken)[: self.shots]
        if len(refs) < self.shots:
            warnings.warn(f"ADPretrain: only {len(refs)} reference images, expected shots={self.shots}", stacklevel=3)
        for i, bank in enumerate(self.reference_banks(refs)):
            setattr(self, f"bank_{i}", bank)
        self.eval()
        if self.scorer == "patchcore":
            scorer = PatchCore(backbone=ProjectedFeatures(self, range(len(self.channels))[-3:]), coreset_ratio=self.coreset_ratio, seed=self.seed)
        elif self.scorer == "padim":
            scorer = PaDiM(backbone=ProjectedFeatures(self, range(len(self.channels))), per_level=True, sigma=self.sigma)
        else:
            scorer = None
        self.__dict__["downstream"] = scorer.to(self.device).fit(itertools.chain(taken, batches)) if scorer else None
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scorer != "featurenorm":
            if self.downstream is None:
                raise RuntimeError(f"ADPretrain's {self.scorer} scorer is not fitted: call fit() on normal images first")
            return self.downstream(images)
        feats = self.project(images)
        scores = [feature_norm(f, dim=1).flatten(1) for f in feats]
        maps = level_maps(scores, [f.shape[-2:] for f in feats], tuple(images.shape[-2:]))
        return score_and_map(maps, self.sigma, smoothed_map=True)

    def _apply(self, fn, recurse=True):  # .to() / .cuda() also move the unregistered scorer
        super()._apply(fn, recurse)
        if self.downstream is not None:
            self.downstream._apply(fn, recurse)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for i in range(len(self.channels)):  # the bank size depends on the reference images
            key = f"{prefix}bank_{i}"
            if key in state_dict:
                setattr(self, f"bank_{i}", torch.empty_like(state_dict[key], device=getattr(self, f"bank_{i}").device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def load_projectors(self, path) -> "ADPretrain":
        """Load the projectors and centres of an ADPretrain checkpoint made with the same backbone."""
        from safetensors import safe_open

        from ._training import checkpoint_config

        name, config = checkpoint_config(path)
        if name != type(self).__name__ or (config["backbone"], config["layers"]) != (self.config["backbone"], self.config["layers"]):
            raise ValueError(f"{path} holds a {name} checkpoint of backbone {config.get('backbone')} layers {config.get('layers')}, "
                             f"expected ADPretrain of {self.config['backbone']} layers {self.config['layers']}")
        with safe_open(str(path), framework="pt") as f:
            keep = [k for k in f.keys() if k.startswith(("model.projectors.", "model.center_"))]
            state = {k[len("model."):]: f.get_tensor(k) for k in keep}
        missing = [k for k in self.load_state_dict(state, strict=False).missing_keys if k.startswith("projectors.")]
        if missing:
            raise ValueError(f"{path} lacks projector weights {sorted(missing)[:3]}")
        return self

    # -- pretraining ---------------------------------------------------------------------------------------
    def trainable_parameters(self):
        return self.projectors.parameters()

    def make_optimizer(self):
        opt = torch.optim.Adam(list(self.trainable_parameters()), lr=self.lr, weight_decay=self.weight_decay)

        def decay(it):  # MultiStepLR over epochs, stepped per iteration
            epoch = it // self.epoch_length if self.epoch_length else 0
            return 0.1 ** sum(epoch >= m for m in self.milestones)

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, decay)

    def pretrain(self, data, iterations: int | None = None, **kwargs) -> "ADPretrain":
        """Pretrain the projectors on labelled images (Real-IAD in the paper; any fastad dataset or
        concatenation of them whose items have 'image', 'mask', 'label', 'class_name', 'path').
        Computes the level centres first, then runs :meth:`TrainedModel.fit` (checkpoints, exact
        resume); ``kwargs`` go there."""
        self._data, self._pool = data, _normal_pool(data)
        if self.iteration == 0:
            self._fit_centers()
        return TrainedModel.fit(self, data, iterations, **kwargs)

    def _draw_banks(self, classes: list[str], exclude: set[str], k: int, gen: torch.Generator) -> dict[str, list[torch.Tensor]]:
        """Per class: k random normal images of that class (not in ``exclude``) -> their token banks."""
        banks = {}
        for c in sorted(set(classes)):
            pool = [i for i, p in self._pool.get(c, []) if p not in exclude] or [i for i, _ in self._pool.get(c, [])]
            if not pool:
                raise ValueError(f"ADPretrain pretraining needs normal images of class {c!r} as references, found none")
            pick = torch.randperm(len(pool), generator=gen)[:k].tolist()
            refs = torch.stack([self._data[pool[j]]["image"] for j in pick]).to(self.device, torch.float32)
            banks[c] = self.reference_banks(refs)
        return banks

    def _class_residuals(self, images, classes, banks) -> list[torch.Tensor]:
        out = None
        for c, bank in banks.items():
            idx = torch.tensor([i for i, x in enumerate(classes) if x == c], device=images.device)
            res = self.residuals(images[idx], bank)
            if out is None:
                out = [r.new_empty(len(images), *r.shape[1:]) for r in res]
            for o, r in zip(out, res):
                o[idx] = r
        return out

    @torch.no_grad()
    def _fit_centers(self) -> None:
        """Level centres: the mean raw residual of every normal image, ``center_shots`` references per class."""
        gen = torch.Generator().manual_seed(self.seed)
        sums, counts = [0.0] * len(self.channels), [0] * len(self.channels)
        for c, members in sorted(self._pool.items()):
            bank = self._draw_banks([c], set(), self.center_shots, gen)[c]
            for start in range(0, len(members), self.train_batch_size):
                images = torch.stack([self._data[i]["image"] for i, _ in members[start : start + self.train_batch_size]])
                for lvl, r in enumerate(self.residuals(images.to(self.device, torch.float32), bank)):
                    sums[lvl] = sums[lvl] + r.double().sum((0, 2, 3))
                    counts[lvl] += r.shape[0] * r.shape[2] * r.shape[3]
        for lvl, (s, n) in enumerate(zip(sums, counts)):
            setattr(self, f"center_{lvl}", (s / n).float())

    def training_step(self, batch, iteration: int):
        """One pretraining step (module docstring); None for a batch without anomalies (skipped)."""
        if not isinstance(batch, dict) or not {"mask", "label", "class_name", "path"} <= set(batch):
            raise ValueError("ADPretrain pretraining needs batches of dicts with 'image', 'mask', 'label', 'class_name' and 'path'")
        labels = torch.as_tensor(batch["label"])
        if not (labels > 0).any():
            return None
        images = self.batch_images(batch)
        masks = batch["mask"].to(self.device)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
        k = self.shot_choices[int(torch.randint(len(self.shot_choices), (), generator=gen))]
        banks = self._draw_banks(batch["class_name"], set(batch["path"]), k, gen)
        views = [[p(r) for p, r in zip(self.projectors, self._class_residuals(augment_view(images, gen), batch["class_name"], banks))]
                 for _ in range(2)]
        loss = 0
        for lvl, (f1, f2) in enumerate(zip(*views)):
            grid = tuple(f1.shape[-2:])
            t1, t2 = (f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in (f1, f2))
            near = nearest_labels(masks, grid).reshape(-1)
            loss = loss + angle_loss(t1, t2, patch_labels(masks, grid).reshape(-1), self.centers()[lvl], self.tau)
            loss = loss + norm_loss(t1, near, self.radius, self.margin) + norm_loss(t2, near, self.radius, self.margin)
        self.check_finite(loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def _sample_rows(data) -> list[tuple[int, str, str]]:
    """(label, class name, path) of every item of a fastad dataset, a ConcatDataset or Subset of them,
    read from their sample lists (no image is loaded); other datasets are read item by item."""
    from torch.utils.data import ConcatDataset, Subset

    if isinstance(data, ConcatDataset):
        return [row for d in data.datasets for row in _sample_rows(d)]
    if isinstance(data, Subset):
        rows = _sample_rows(data.dataset)
        return [rows[i] for i in data.indices]
    if hasattr(data, "samples"):
        return [(int(s.label), s.class_name, str(s.path)) for s in data.samples]
    return [(int(x["label"]), x["class_name"], str(x["path"])) for x in (data[i] for i in range(len(data)))]


def _normal_pool(data) -> dict[str, list[tuple[int, str]]]:
    """class name -> [(index, path)] of its normal items."""
    pool: dict[str, list[tuple[int, str]]] = {}
    for i, (label, c, path) in enumerate(_sample_rows(data)):
        if label == 0:
            pool.setdefault(c, []).append((i, path))
    if not pool:
        raise ValueError("ADPretrain pretraining needs normal images (references and centres), found none")
    return pool

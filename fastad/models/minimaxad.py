"""MiniMaxAD (spec section 5): reverse distillation with a frozen large-kernel encoder, a trainable
bottleneck (BN_layer) and a mirrored UniRepLKNet decoder with GRN.

Defaults are the -fr recipe of the authors' multi-class MVTec script: UniRepLKNet-N encoder
(stages 0-2, 256 px), ADCLoss (``fastad.ops.adc_loss``: p_hard 0.9999, p_lim 0.9995) on the sum of
the nearest-upsampled per-level ``1 - cos`` maps, AdamW (lr 5e-3, weight decay 1e-5 as in every
training script; the paper says 5e-5), ExponentialLR(0.995) per epoch, batch 16, 160 epochs.
``loss='fp'`` selects the global cosine loss of the feature-poor variant. Inference: per-level
``1 - cos``, bilinear (align_corners=True) to the input size, mean, 5x5 Gaussian sigma=4 with zero
padding, image score = mean of the top 1% pixels; the smoothed map is returned. Input: 256 x 256,
no crop; sides must be multiples of 32 (the bottleneck's total stride).

``encoder='efficientnet_lite0'`` swaps in the offline ImageNet EfficientNet-Lite0 (strides 4/8/16,
24/40/112 channels); the bottleneck and decoder follow the encoder's widths. It is not the paper's
model but runs without any downloaded file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import OFFLINE_DEFAULT, FeatureExtractor
from ..ops import adc_loss, gaussian_blur_small, hard_mining_cosine_loss
from ..optim import adam
from .base import AnomalyOutput, register
from .components.authors import load_authors_state, read_torch_state
from .components.maps import cosine_distance_map, top_ratio_mean
from .components.unireplknet import (LayerNorm2d, UniRepLKNetBlock, UniRepLKNetEncoder, kaiming_fan_out_init,
                                     trunc_normal_init)
from .training import TrainedModel

DECODER_DEPTHS = (2, 2, 8)  # finest -> coarsest, mirrored from the encoder
DECODER_KERNELS = (3, 13, 13)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Bottleneck(nn.Module):
    """MiniMaxAD's BN_layer: the two finer levels are strided down to the coarsest grid, the three
    are concatenated and fused by a stride-2 conv (3 d2 -> 2 d2) and two kernel-3 UniRepLKNet blocks.

    Forward: [(B, d0, 4h, 4w), (B, d1, 2h, 2w), (B, d2, h, w)] -> (B, 2 d2, h/2, w/2).
    """

    channels_last = True  # convolutional: NHWC inputs under bf16/fp16 autocast on CUDA (models.base)

    def __init__(self, dims):
        super().__init__()
        d0, d1, d2 = dims
        self.level0 = nn.Sequential(*_conv_bn_relu(d0, d1), *_conv_bn_relu(d1, d2))
        self.level1 = nn.Sequential(*_conv_bn_relu(d1, d2))
        self.fuse = nn.Conv2d(3 * d2, 2 * d2, 3, 2, 1, bias=False)
        self.blocks = nn.Sequential(UniRepLKNetBlock(2 * d2, 3), UniRepLKNetBlock(2 * d2, 3))
        trunc_normal_init(self.blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size == (3, 3):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([self.level0(feats[0]), self.level1(feats[1]), feats[2]], 1)
        return self.blocks(self.fuse(x))


class Decoder(nn.Module):
    """Three times: 2x2 stride-2 transposed conv + LayerNorm, then the mirrored stage
    (depths 8, 2, 2; kernels 13, 13, 3). Returns levels finest first, like the encoder.

    Forward: (B, 2 d2, h, w) -> [(B, d0, 8h, 8w), (B, d1, 4h, 4w), (B, d2, 2h, 2w)].
    """

    channels_last = True  # convolutional: NHWC inputs under bf16/fp16 autocast on CUDA (models.base)

    def __init__(self, dims):
        super().__init__()
        widths = [2 * dims[-1], *reversed(dims)]
        self.ups = nn.ModuleList(nn.Sequential(nn.ConvTranspose2d(widths[i], widths[i + 1], 2, 2, bias=False), LayerNorm2d(widths[i + 1]))
                                 for i in range(3))
        self.stages = nn.ModuleList(nn.Sequential(*(UniRepLKNetBlock(widths[i + 1], k) for _ in range(n)))
                                    for i, (n, k) in enumerate(zip(reversed(DECODER_DEPTHS), reversed(DECODER_KERNELS))))
        trunc_normal_init(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for up, stage in zip(self.ups, self.stages):
            x = stage(up(x))
            out.append(x)
        return out[::-1]


@register("minimaxad")
class MiniMaxAD(TrainedModel):
    """MiniMaxAD anomaly detector.

    Args:
        encoder: ``'unireplknet_n'`` (paper; needs ``weights=PATH`` or ``'random'``) or
            ``'efficientnet_lite0'`` (offline weights).
        weights: encoder weights (see above).
        image_size, crop_fraction: input (H, W), multiples of 32 (256), and centre-crop fraction (1: none).
        loss: ``'fr'`` (ADCLoss, default) or ``'fp'`` (global cosine loss).
        p_hard, p_lim: ADCLoss quantiles (0.9999, 0.9995).
        epochs: training length in epochs (160); ``iterations`` overrides it when given.
        train_batch_size, lr, weight_decay, gamma: AdamW and the per-epoch ExponentialLR (16, 5e-3, 1e-5, 0.995).
        sigma, smoothing_kernel, max_ratio: inference smoothing and image score (4, 5, 0.01).
        init: ``'official'`` (the authors' code: every Conv2d of the bottleneck and decoder Kaiming-normal
            fan-out, Linear and transposed conv at PyTorch defaults) or ``'trunc_normal'`` (UniRepLKNet's
            std 0.02, fastad's earlier default).
        authors_checkpoint: a ``.pth`` the authors' training scripts save (``{'bn': ..., 'decoder': ...}``):
            loaded by :meth:`load_authors_checkpoint`; ``fit`` then does not train.
        seed: batch order (111).
    Forward:
        images (B, 3, H, W) -> AnomalyOutput(scores (B,), maps (B, H, W)) float32.
    """

    input_multiple = 32
    autocast_modules = ("encoder", "bottleneck", "decoder")

    def __init__(self, encoder: str = "unireplknet_n", weights: str | None = None, image_size=256,
                 crop_fraction: float = 1.0, loss: str = "fr",
                 p_hard: float = 0.9999, p_lim: float = 0.9995, epochs: int = 160, iterations: int | None = None,
                 train_batch_size: int = 16, lr: float = 5e-3, weight_decay: float = 1e-5, gamma: float = 0.995,
                 sigma: float = 4.0, smoothing_kernel: int = 5, max_ratio: float = 0.01, init: str = "official",
                 authors_checkpoint: str | None = None, seed: int = 111):
        super().__init__()
        if loss not in ("fr", "fp"):
            raise ValueError(f"loss must be 'fr' (ADCLoss) or 'fp' (global cosine), got {loss!r}")
        if init not in ("official", "trunc_normal"):
            raise ValueError(f"init must be 'official' (Kaiming fan-out convs) or 'trunc_normal', got {init!r}")
        if encoder == "unireplknet_n":
            self.encoder = UniRepLKNetEncoder(weights)
        elif encoder == OFFLINE_DEFAULT:
            self.encoder = FeatureExtractor(OFFLINE_DEFAULT, (1, 2, 3), weights)
        else:
            raise ValueError(f"encoder must be 'unireplknet_n' or {OFFLINE_DEFAULT!r}, got {encoder!r}")
        dims = tuple(self.encoder.channels)
        self.bottleneck = Bottleneck(dims)
        self.decoder = Decoder(dims)
        if init == "official":
            kaiming_fan_out_init(self.bottleneck)
            kaiming_fan_out_init(self.decoder)
        if authors_checkpoint is not None:
            self.load_authors_checkpoint(authors_checkpoint)
        self.loss, self.p_hard, self.p_lim = loss, p_hard, p_lim
        self.epochs, self.iterations_override, self.train_batch_size = epochs, iterations, train_batch_size
        self.lr, self.weight_decay, self.gamma = lr, weight_decay, gamma
        self.sigma, self.smoothing_kernel, self.max_ratio, self.seed = sigma, smoothing_kernel, max_ratio, seed
        self.grad_clip = None

    def load_authors_checkpoint(self, path) -> "MiniMaxAD":
        """Load the trained bottleneck and decoder from the authors' ``torch.save({'bn': bn.state_dict(),
        'decoder': decoder.state_dict()})``: their ``BN_layer`` (conv1/bn1, conv2/bn2 -> the finest level's
        two conv-BN pairs, conv3/bn3, conv4 -> the fusing conv, stages.3 -> the two blocks) and decoder
        (upsample_layers -> ups, their stages 2, 1, 0 -> fastad's stages 0, 1, 2: fastad orders them in
        the order they run). Raises ValueError naming keys that do not fit."""
        state = read_torch_state(path, "MiniMaxAD checkpoint", ("bn", "decoder"))
        mapping = [("bn.conv1", "bottleneck.level0.0"), ("bn.bn1", "bottleneck.level0.1"),
                   ("bn.conv2", "bottleneck.level0.3"), ("bn.bn2", "bottleneck.level0.4"),
                   ("bn.conv3", "bottleneck.level1.0"), ("bn.bn3", "bottleneck.level1.1"),
                   ("bn.conv4", "bottleneck.fuse"), ("bn.stages.3", "bottleneck.blocks"),
                   ("decoder.upsample_layers", "decoder.ups"), ("decoder.stages.2", "decoder.stages.0"),
                   ("decoder.stages.1", "decoder.stages.1"), ("decoder.stages.0", "decoder.stages.2")]
        trained = nn.ModuleDict({"bottleneck": self.bottleneck, "decoder": self.decoder})
        load_authors_state(trained, state, mapping, path)
        return self

    def trainable_parameters(self):
        yield from self.bottleneck.parameters()
        yield from self.decoder.parameters()

    def make_optimizer(self):
        opt = adam(self.trainable_parameters(), decoupled=True, lr=self.lr, betas=(0.9, 0.999), weight_decay=self.weight_decay)
        per_epoch = max(1, self.epoch_length or 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: self.gamma ** (it // per_epoch))
        return opt, sched

    def features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(B, 3, H, W) -> (encoder levels, decoder levels), three (B, C_l, H/r_l, W/r_l) maps each."""
        enc = self.encoder(images)
        return enc, self.decoder(self.bottleneck(enc))

    def training_loss(self, images: torch.Tensor, iteration: int) -> torch.Tensor:
        enc, dec = self.features(images)
        if self.loss == "fp":  # sum over levels of the per-sample global cosine distance
            return len(enc) * hard_mining_cosine_loss(enc, dec, p=0.0, nonfinite="nan", group=self.group)
        size = images.shape[-2:]
        s = sum(F.interpolate((1 - F.cosine_similarity(a, b, dim=1)).unsqueeze(1), size=size, mode="nearest")
                for a, b in zip(enc, dec))
        return adc_loss(s.squeeze(1), self.p_hard, self.p_lim, nonfinite="nan", group=self.group)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        images = self.check_images(images)
        enc, dec = self.features(images)
        maps = cosine_distance_map(enc, dec, tuple(images.shape[-2:]))
        maps = gaussian_blur_small(maps, self.smoothing_kernel, self.sigma)
        return AnomalyOutput(top_ratio_mean(maps, self.max_ratio), maps)

"""UniRepLKNet blocks and the 3-stage UniRepLKNet-N encoder of MiniMaxAD (spec section 5.2).

Module and parameter names follow the official UniRepLKNet code (training-time structure, not the
re-parameterised deploy form), so its ImageNet checkpoint ``unireplknet_n_in1k_224_acc81.64.pth``
loads directly (stage 3, the final norm and the head in the file are ignored).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# kernel size of the parallel dilated depthwise branches, per large kernel: ((k, dilation), ...)
DILATED_BRANCHES = {13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)), 11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
                    9: ((5, 1), (5, 2), (3, 3), (3, 4)), 7: ((5, 1), (3, 2), (3, 3)), 5: ((3, 1), (3, 2))}
UNIREPLKNET_N = {"dims": (80, 160, 320), "depths": (2, 2, 8), "kernels": (3, 13, 13)}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W) (ConvNeXt's channels_first LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global response normalisation on (B, H, W, C) (ConvNeXt-V2): (gamma * N + 1) x + beta with
    N = ||x_c||_2 over (H, W) divided by its mean over channels; gamma = beta = 0 at init."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return (self.gamma * n + 1) * x + self.beta


class SEBlock(nn.Module):
    """Squeeze-and-excitation on (B, C, H, W): global mean -> 1x1 conv C -> C/4 -> ReLU -> 1x1 conv -> sigmoid."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.down = nn.Conv2d(dim, hidden, 1)
        self.up = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.up(F.relu(self.down(F.adaptive_avg_pool2d(x, 1)))))
        return x * s


class DilatedReparamBlock(nn.Module):
    """k x k depthwise conv + BN, plus parallel dilated depthwise convs + BN, summed."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        if kernel not in DILATED_BRANCHES:
            raise ValueError(f"no dilated branches defined for kernel {kernel}; choose one of {sorted(DILATED_BRANCHES)}")
        self.branches = DILATED_BRANCHES[kernel]
        self.lk_origin = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False)
        self.origin_bn = nn.BatchNorm2d(dim)
        for k, r in self.branches:
            setattr(self, f"dil_conv_k{k}_{r}", nn.Conv2d(dim, dim, k, padding=(r * (k - 1) + 1) // 2, dilation=r, groups=dim, bias=False))
            setattr(self, f"dil_bn_k{k}_{r}", nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.origin_bn(self.lk_origin(x))
        for k, r in self.branches:
            out = out + getattr(self, f"dil_bn_k{k}_{r}")(getattr(self, f"dil_conv_k{k}_{r}")(x))
        return out


class _ToNHWC(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class _ToNCHW(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


class UniRepLKNetBlock(nn.Module):
    """x + gamma * BN(Linear(GRN(GELU(Linear(SE(BN(DW(x)))))))) on (B, C, H, W); DW is a plain 3x3
    (or 5x5) depthwise conv, or a :class:`DilatedReparamBlock` for kernels >= 7."""

    def __init__(self, dim: int, kernel: int, layer_scale: float = 1e-6, ffn_factor: int = 4):
        super().__init__()
        if kernel >= 7:
            self.dwconv = DilatedReparamBlock(dim, kernel)
        elif kernel in (3, 5):
            self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False)
        else:
            raise ValueError(f"UniRepLKNet kernels are 3, 5 or >= 7, got {kernel}")
        self.norm = nn.BatchNorm2d(dim)
        self.se = SEBlock(dim, dim // 4)
        hidden = ffn_factor * dim
        self.pwconv1 = nn.Sequential(_ToNHWC(), nn.Linear(dim, hidden))
        self.act = nn.Sequential(nn.GELU(), GRN(hidden))
        self.pwconv2 = nn.Sequential(nn.Linear(hidden, dim, bias=False), _ToNCHW(), nn.BatchNorm2d(dim))
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        return x + self.gamma.view(1, -1, 1, 1) * y


def trunc_normal_init(module: nn.Module) -> None:
    """UniRepLKNet's init: conv and linear weights trunc_normal(std 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def kaiming_fan_out_init(module: nn.Module) -> None:
    """MiniMaxAD's init of its trainable bottleneck and decoder: PyTorch's default init of every
    layer (Linear, transposed conv, norms), then every ``nn.Conv2d`` weight (depthwise, SE and dilated
    branches included) Kaiming-normal with fan-out and the ReLU gain; BatchNorm weight 1, bias 0;
    layer scale and GRN parameters stay as built."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.LayerNorm, nn.BatchNorm2d)):
            m.reset_parameters()
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class UniRepLKNetEncoder(nn.Module):
    """Frozen stages 0..2 of UniRepLKNet-N, each output through its own LayerNorm (norm0..norm2).

    Args:
        weights: the official checkpoint file (``unireplknet_n_in1k_224_acc81.64.pth``) or
            ``'random'``. fastad never downloads it.
    Forward:
        images (B, 3, H, W) -> [(B, 80, H/4, W/4), (B, 160, H/8, W/8), (B, 320, H/16, W/16)] float32.
    """

    channels_last = True  # convolutional: NHWC inputs under bf16/fp16 autocast on CUDA (models.base)

    def __init__(self, weights: str | None = None, dims=UNIREPLKNET_N["dims"], depths=UNIREPLKNET_N["depths"],
                 kernels=UNIREPLKNET_N["kernels"]):
        super().__init__()
        if weights is None:
            raise FileNotFoundError("UniRepLKNet-N has no weights in any local cache: pass weights=PATH to the official "
                               "unireplknet_n_in1k_224_acc81.64.pth, or weights='random'")
        self.channels = list(dims)
        self.reductions = [4 * 2**i for i in range(len(dims))]
        stem = nn.Sequential(nn.Conv2d(3, dims[0] // 2, 3, 2, 1), LayerNorm2d(dims[0] // 2), nn.GELU(),
                             nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1), LayerNorm2d(dims[0]))
        downs = [nn.Sequential(nn.Conv2d(dims[i - 1], dims[i], 3, 2, 1), LayerNorm2d(dims[i])) for i in range(1, len(dims))]
        self.downsample_layers = nn.ModuleList([stem, *downs])
        self.stages = nn.ModuleList(nn.Sequential(*(UniRepLKNetBlock(d, k) for _ in range(n))) for d, n, k in zip(dims, depths, kernels))
        for i, d in enumerate(dims):
            self.add_module(f"norm{i}", LayerNorm2d(d))
        trunc_normal_init(self)
        if weights != "random":
            self._load(weights)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def _load(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"UniRepLKNet weights not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state))
        own = self.state_dict()
        used = {k: v for k, v in state.items() if k in own}
        missing = [k for k in own if k not in used and not k.startswith("norm")]
        if missing:
            raise ValueError(f"{path} is not a UniRepLKNet-N checkpoint: it lacks {missing[:5]}")
        # ImageNet checkpoints have no norm0..2 (only the classifier's final norm): those stay identity,
        # as in the MiniMaxAD code (strict=False)
        self.load_state_dict(used, strict=False)

    def train(self, mode: bool = True):  # frozen: BatchNorm statistics stay fixed
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x, out = images, []
        for i, (down, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            x = stage(down(x))
            out.append(getattr(self, f"norm{i}")(x).float())
        return out

"""TransBTS: a 3D CNN encoder, a transformer on its 8x-downsampled features, and a CNN decoder.

"TransBTS: Multimodal Brain Tumor Segmentation Using Transformer", Wang et al., MICCAI 2021
(arXiv 2103.04430), in the configuration the 3D UX-Net and Rep3D papers compare against: ROI 96,
8x downsampling (patch 8), embedding 512, 8 heads, 4 layers, MLP 4096, convolutional patch
representation, learned positional encoding.

* CNN encoder: Conv3d(3) -> Dropout3d, then pre-activation residual blocks (GroupNorm, ReLU; MONAI's
  ``ResBlock``) with stride-2 convolutions in between: 1, 2, 2 and 4 blocks at widths b, 2b, 4b, 8b.
* Patch representation: BatchNorm -> ReLU -> Conv3d(8b, embed, 3) on the 1/8 feature map, flattened
  to tokens, plus a learned positional embedding, dropout.
* Transformer: pre-norm MONAI ``TransformerBlock``s (no qkv bias).
* Decoder: the tokens reshaped back to a volume, Conv3d(embed, 8b) and a residual conv block, then three
  stages of (1x1 conv -> transposed conv x2 -> concat with the encoder skip -> 1x1 conv -> residual conv
  block), and a 1x1 head.

Differences from the authors' code, all deliberate: their unused parameters (a linear patch encoding
and a final LayerNorm that the decoder never reads) are not built, so every parameter trains; the
encoder's residual blocks are MONAI's (bias-free convolutions); the input-level dropout respects
``eval()``; ``in_channels``, the class count, the widths and the ROI are free.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import TransformerBlock
from monai.networks.blocks.segresnet_block import ResBlock
from monai.utils import ensure_tuple_rep

from ..blocks import check_fixed_size, check_positive_int

__all__ = ["TransBTS"]

DOWNSAMPLE = 8  # three stride-2 convolutions: the transformer's "patch size"
_GROUPS = 8  # GroupNorm groups of the CNN encoder


class ConvBNReLU2(nn.Module):
    """Conv3d(3) -> BN -> ReLU -> Conv3d(3) -> BN -> ReLU, plus the input when ``residual``."""

    def __init__(self, in_channels: int, out_channels: int, residual: bool) -> None:
        super().__init__()
        if residual and in_channels != out_channels:
            raise ValueError("a residual ConvBNReLU2 needs in_channels == out_channels.")
        self.residual = residual
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))
        return x + y if self.residual else y


class UpCat(nn.Module):
    """1x1 conv (in -> out) -> ConvTranspose3d(2, stride 2) -> concat with the skip (out channels) -> 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv3d(in_channels, out_channels, kernel_size=1)
        self.up = nn.ConvTranspose3d(out_channels, out_channels, kernel_size=2, stride=2)
        self.fuse = nn.Conv3d(2 * out_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat((skip, self.up(self.reduce(x))), dim=1))


class TransBTS(nn.Module):
    """TransBTS segmentation network.

    With the defaults: 31.509M parameters at 17 classes. The authors' build counts 31.577M: 0.067M of
    those are parameters their forward never uses (see the module docstring) and 1,440 are biases of
    the encoder's residual-block convolutions, which MONAI's ``ResBlock`` builds without.

    Args:
        in_channels: input channels. Defaults to 1.
        out_channels: output classes, background included. Defaults to 16.
        img_size: the ROI; the network only takes inputs of exactly this size (the positional
            embedding is learned per token), each a multiple of 8. Defaults to (96, 96, 96).
        embed_dim: transformer width. Defaults to 512.
        num_heads: attention heads. Defaults to 8.
        num_layers: transformer layers. Defaults to 4.
        mlp_dim: transformer MLP width. Defaults to 4096.
        base_channels: width b of the CNN encoder's first level (levels b, 2b, 4b, 8b; a multiple of 8
            for its GroupNorm). Defaults to 16.
        dropout_rate: transformer dropout (attention weights, outputs, MLP, positional embedding).
            Defaults to 0.1.
        input_dropout: Dropout3d rate after the first convolution. Defaults to 0.2.

    Example::

        net = TransBTS(in_channels=1, out_channels=17)
        logits = net(torch.randn(1, 1, 96, 96, 96))   # (1, 17, 96, 96, 96)
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 16,
        img_size: Sequence[int] | int = (96, 96, 96),
        embed_dim: int = 512,
        num_heads: int = 8,
        num_layers: int = 4,
        mlp_dim: int = 4096,
        base_channels: int = 16,
        dropout_rate: float = 0.1,
        input_dropout: float = 0.2,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("num_layers", num_layers),
            ("mlp_dim", mlp_dim),
            ("base_channels", base_channels),
        ):
            check_positive_int(name, value)
        size = ensure_tuple_rep(img_size, 3)
        if len(size) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise ValueError(f"img_size must be a positive int or three positive ints (the ROI), got {img_size!r}.")
        if any(s % DOWNSAMPLE for s in size):
            fix = " ".join(str(max(DOWNSAMPLE, round(s / DOWNSAMPLE) * DOWNSAMPLE)) for s in size)
            raise ValueError(f"TransBTS img_size {tuple(size)} must be a multiple of 8 on each axis; use e.g. --roi {fix}.")
        if embed_dim % num_heads:
            raise ValueError(f"TransBTS embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).")
        if base_channels % _GROUPS:
            raise ValueError(f"TransBTS base_channels must be a multiple of {_GROUPS} (GroupNorm groups), got {base_channels}.")
        for name, rate in (("dropout_rate", dropout_rate), ("input_dropout", input_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"TransBTS {name} must be in [0, 1), got {rate!r}.")
        self.img_size = tuple(size)
        self.grid = tuple(s // DOWNSAMPLE for s in size)
        self.embed_dim = embed_dim
        b = base_channels
        norm = ("GROUP", {"num_groups": _GROUPS})

        # CNN encoder
        self.init_conv = nn.Conv3d(in_channels, b, kernel_size=3, padding=1)
        self.init_drop = nn.Dropout3d(input_dropout)
        self.level1 = ResBlock(3, b, norm=norm)
        self.down1 = nn.Conv3d(b, 2 * b, kernel_size=3, stride=2, padding=1)
        self.level2 = nn.Sequential(*[ResBlock(3, 2 * b, norm=norm) for _ in range(2)])
        self.down2 = nn.Conv3d(2 * b, 4 * b, kernel_size=3, stride=2, padding=1)
        self.level3 = nn.Sequential(*[ResBlock(3, 4 * b, norm=norm) for _ in range(2)])
        self.down3 = nn.Conv3d(4 * b, 8 * b, kernel_size=3, stride=2, padding=1)
        self.level4 = nn.Sequential(*[ResBlock(3, 8 * b, norm=norm) for _ in range(4)])

        # convolutional patch representation + transformer
        self.patch_bn = nn.BatchNorm3d(8 * b)
        self.patch_act = nn.ReLU()
        self.patch_conv = nn.Conv3d(8 * b, embed_dim, kernel_size=3, padding=1)
        num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.pe_dropout = nn.Dropout(dropout_rate)
        self.transformer = nn.Sequential(
            *[TransformerBlock(embed_dim, mlp_dim, num_heads, dropout_rate=dropout_rate, qkv_bias=False) for _ in range(num_layers)]
        )
        for block in self.transformer:
            # MONAI builds this LayerNorm even without cross-attention, and never uses it then.
            block.norm_cross_attn = nn.Identity()

        # CNN decoder
        self.bottleneck1 = ConvBNReLU2(embed_dim, 8 * b, residual=False)
        self.bottleneck2 = ConvBNReLU2(8 * b, 8 * b, residual=True)
        self.up3 = UpCat(8 * b, 4 * b)
        self.dec3 = ConvBNReLU2(4 * b, 4 * b, residual=True)
        self.up2 = UpCat(4 * b, 2 * b)
        self.dec2 = ConvBNReLU2(2 * b, 2 * b, residual=True)
        self.up1 = UpCat(2 * b, b)
        self.dec1 = ConvBNReLU2(b, b, residual=True)
        self.head = nn.Conv3d(b, out_channels, kernel_size=1)

    def _check_input(self, x: torch.Tensor) -> None:
        check_fixed_size(x, self.img_size, "TransBTS", " (its positional embedding is learned per token)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x1 = self.level1(self.init_drop(self.init_conv(x)))
        x2 = self.level2(self.down1(x1))
        x3 = self.level3(self.down2(x2))
        x4 = self.level4(self.down3(x3))

        t = self.patch_conv(self.patch_act(self.patch_bn(x4)))
        t = t.flatten(2).transpose(1, 2)  # (B, tokens, embed), tokens in D, H, W order
        t = self.transformer(self.pe_dropout(t + self.position_embeddings))
        y = t.transpose(1, 2).reshape(x.shape[0], self.embed_dim, *self.grid)

        y = self.bottleneck2(self.bottleneck1(y))
        y = self.dec3(self.up3(y, x3))
        y = self.dec2(self.up2(y, x2))
        y = self.dec1(self.up1(y, x1))
        return self.head(y)

"""The 3D UX-Net encoder: ConvNeXt-style blocks with a large depthwise kernel in 4 stages.

"3D UX-Net: A Large Kernel Volumetric ConvNet Modernizing Hierarchical Transformer for Medical
Image Segmentation", Lee et al., ICLR 2023. Block: depthwise Conv3d(K, bias) -> LayerNorm ->
Conv3d(C, 4C, 1, groups=C) -> GELU -> Conv3d(4C, C, 1, groups=C) -> layer scale -> residual.
Stem, downsampling and per-stage output norms are laid out as in the Rep3D encoder, and the module
names follow the authors' release so that its checkpoints load unchanged. The depthwise kernel's
settings (size, optional LRBM mask, deploy flag, implementation) travel as one
:class:`~networks.Rep3D.lrbm.LRBMConfig` shared by all blocks.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from monai.networks.layers import DropPath

from ..blocks import HierarchicalEncoder, LayerNormChannelsFirst, check_positive_int
from ..Rep3D.lrbm import LRBMConfig, ModulatedDepthwiseConv3d, precomputed_masks

__all__ = ["UXNET_KERNEL", "UXNetBlock", "UXNetEncoder"]

#: The depthwise kernel of 3D UX-Net as published: K = 7, no mask.
UXNET_KERNEL = LRBMConfig(kernel_size=7, modulation="none")


# The two pointwise convolutions are grouped per channel (groups=C), so each is an element-wise
# multiply-add: computed as broadcasts, because cuDNN's grouped 1x1x1 kernels (above all their weight
# gradients) took ~98% of a 3D UX-Net training iteration on an H100. The Conv3d modules stay as the
# parameter holders, so checkpoints keep the release's layout.


def _expand_per_channel(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``conv(x)`` for ``Conv3d(C, r*C, 1, groups=C)``: output channel c*r + j is w[c*r + j] * x[c] + b."""
    n, c = x.shape[:2]
    r = conv.out_channels // c
    w = conv.weight.view(1, c, r, 1, 1, 1).to(x.dtype)
    b = conv.bias.view(1, c, r, 1, 1, 1).to(x.dtype)
    return torch.addcmul(b, x.unsqueeze(2), w).flatten(1, 2)


def _reduce_per_channel(h: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``conv(h)`` for ``Conv3d(r*C, C, 1, groups=C)``: output channel c is sum_j w[c, j] * h[c*r + j] + b[c]."""
    c = conv.out_channels
    r = conv.in_channels // c
    w = conv.weight.view(1, c, r, 1, 1, 1).to(h.dtype)
    return (h.unflatten(1, (c, r)) * w).sum(2) + conv.bias.view(1, c, 1, 1, 1).to(h.dtype)


class UXNetBlock(nn.Module):
    """One 3D UX-Net block (an inverted bottleneck whose pointwise convolutions are grouped per channel).

    Args:
        channels: number of channels C.
        config: the depthwise kernel's settings, kept as ``self.config``. Defaults to :data:`UXNET_KERNEL`
            (K = 7, no mask, the original block); ``modulation="lrbm"`` or ``"fixed"`` puts an LRBM mask on
            the kernel while training (the paper's ablation), folded by :func:`networks.reparameterize_model`.
        layer_scale_init_value: initial value of the per-channel output scale ``gamma``; 0 or less
            builds no scale. Defaults to 1e-6.
        drop_path: stochastic depth rate of the residual branch. Defaults to 0.
    """

    def __init__(
        self,
        channels: int,
        config: LRBMConfig | None = None,
        layer_scale_init_value: float = 1e-6,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path!r}; the paper uses 0.")
        self.config = UXNET_KERNEL if config is None else config
        self.dwconv = ModulatedDepthwiseConv3d(channels, self.config, bias=True)
        # Over channels, per voxel: the release's channels-last LayerNorm computes the same function.
        self.norm = LayerNormChannelsFirst(channels, eps=1e-6)
        # Grouped per channel (not full 1x1 convolutions): each channel gets its own 4-wide MLP.
        self.pwconv1 = nn.Conv3d(channels, 4 * channels, kernel_size=1, groups=channels)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv3d(4 * channels, channels, kernel_size=1, groups=channels)
        self.gamma = (
            nn.Parameter(torch.full((channels,), float(layer_scale_init_value)))
            if layer_scale_init_value > 0
            else None
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _expand_per_channel(self.norm(self.dwconv(x)), self.pwconv1)
        y = _reduce_per_channel(self.act(y), self.pwconv2)
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1, 1)
        return x + self.drop_path(y)


class UXNetEncoder(HierarchicalEncoder):
    """The 3D UX-Net hierarchical encoder; returns the four stage outputs (strides 2, 4, 8, 16).

    Args:
        in_channels: input channels. Defaults to 1.
        depths: blocks per stage. Defaults to (2, 2, 2, 2).
        feature_size: channels per stage. Defaults to (48, 96, 192, 384).
        config: passed, as this one object, to every :class:`UXNetBlock`; kept as ``self.config``.
            Defaults to :data:`UXNET_KERNEL`.
        layer_scale_init_value: passed to every block. Defaults to 1e-6.
        drop_path_rate: stochastic depth of the last block; rates rise linearly from 0. Defaults to 0.
    """

    def __init__(
        self,
        in_channels: int = 1,
        depths: Sequence[int] = (2, 2, 2, 2),
        feature_size: Sequence[int] = (48, 96, 192, 384),
        config: LRBMConfig | None = None,
        layer_scale_init_value: float = 1e-6,
        drop_path_rate: float = 0.0,
    ) -> None:
        config = UXNET_KERNEL if config is None else config
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}; the paper uses 0.")
        rates = torch.linspace(0, drop_path_rate, max(sum(depths), 1)).tolist()

        def make_block(channels: int, index: int) -> UXNetBlock:
            return UXNetBlock(channels, config, layer_scale_init_value=layer_scale_init_value, drop_path=rates[index])

        super().__init__(in_channels, depths, feature_size, make_block)
        self.config = config

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        with precomputed_masks(self):  # the LRBM ablation's masks in one batched pass
            return super().forward(x)

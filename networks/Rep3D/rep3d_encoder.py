"""The Rep3D encoder: a plain 4-stage hierarchy of single-branch large-kernel depthwise blocks.

Each block is DWConv(K, modulated by LRBM while training) -> BatchNorm3d -> GELU, with no residual and
no MLP. Stem: Conv3d(k=7, stride 2) + channels-first LayerNorm; downsampling before stages 2-4:
channels-first LayerNorm + Conv3d(k=2, stride 2); a channels-first LayerNorm after each stage.
The kernel and LRBM settings travel as one :class:`~networks.Rep3D.lrbm.LRBMConfig`, shared by all blocks.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..blocks import HierarchicalEncoder, check_positive_int
from .lrbm import MODULATIONS, LRBMConfig, ModulatedDepthwiseConv3d, compute_distance_prior, precomputed_masks

__all__ = ["MODULATIONS", "Rep3DBlock", "Rep3DEncoder", "compute_distance_prior"]


class Rep3DBlock(nn.Module):
    """One Rep3D block: depthwise Conv3d(K, no bias) with an LRBM-modulated kernel -> BatchNorm3d -> GELU.

    Args:
        channels: number of channels C.
        config: kernel size, modulation, LRBM settings, deploy flag and depthwise implementation; kept as
            ``self.config``. Defaults to ``LRBMConfig()`` (the paper's: K = 21, LRBM, beta 1, generator 7 x 2).

    Example::

        block = Rep3DBlock(48, LRBMConfig(kernel_size=21))
        ...  # train
        block.reparameterize()  # now DWConv -> BN -> GELU with W_eff stored as the weight
    """

    def __init__(self, channels: int, config: LRBMConfig | None = None) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        self.config = LRBMConfig() if config is None else config
        self.dwconv = ModulatedDepthwiseConv3d(channels, self.config, bias=False)
        self.norm = nn.BatchNorm3d(channels)
        self.act = nn.GELU()

    @property
    def deploy(self) -> bool:
        """Whether the block is in its folded (inference) form, built so or folded since."""
        return self.dwconv.is_folded

    def equivalent_kernel(self) -> torch.Tensor:
        """The kernel the convolution applies, W * M (pure: mutates nothing)."""
        return self.dwconv.equivalent_kernel()

    def reparameterize(self) -> None:
        """Fold the modulation into the depthwise weight in place (idempotent)."""
        self.dwconv.reparameterize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.dwconv(x)))


class Rep3DEncoder(HierarchicalEncoder):
    """The Rep3D hierarchical encoder; returns the four stage outputs (strides 2, 4, 8, 16).

    Args:
        in_channels: input channels. Defaults to 1.
        depths: blocks per stage. Defaults to (2, 2, 2, 2).
        feature_size: channels per stage. Defaults to (48, 96, 192, 384).
        config: passed, as this one object, to every :class:`Rep3DBlock`; kept as ``self.config``.
            Defaults to ``LRBMConfig()``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        depths: Sequence[int] = (2, 2, 2, 2),
        feature_size: Sequence[int] = (48, 96, 192, 384),
        config: LRBMConfig | None = None,
    ) -> None:
        config = LRBMConfig() if config is None else config
        super().__init__(in_channels, depths, feature_size, lambda channels, index: Rep3DBlock(channels, config))
        self.config = config

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # All LRBM masks of the encoder in one batched pass (a handful of launches instead of a
        # handful per block: the generator was 7% of an H200 training step computed block by block).
        with precomputed_masks(self):
            return super().forward(x)

"""The Rep3D encoder: a plain 4-stage hierarchy of single-branch large-kernel depthwise blocks.

Each block is DWConv(K, modulated by LRBM while training) -> BatchNorm3d -> GELU, with no residual and
no MLP. Stem: Conv3d(k=7, stride 2) + channels-first LayerNorm; downsampling before stages 2-4:
channels-first LayerNorm + Conv3d(k=2, stride 2); a channels-first LayerNorm after each stage.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..blocks import HierarchicalEncoder, check_kernel_size, check_positive_int
from .lrbm import MODULATIONS, ModulatedDepthwiseConv3d, check_modulation, compute_distance_prior

__all__ = ["MODULATIONS", "Rep3DBlock", "Rep3DEncoder", "compute_distance_prior"]


class Rep3DBlock(nn.Module):
    """One Rep3D block: depthwise Conv3d(K, no bias) with an LRBM-modulated kernel -> BatchNorm3d -> GELU.

    Args:
        channels: number of channels C.
        kernel_size: odd depthwise kernel size K. Defaults to 21.
        modulation: ``"lrbm"`` (M = P + f(P), default), ``"fixed"`` (M = P) or ``"none"`` (M = 1).
        deploy: build the inference form only (a plain depthwise conv, no generator, no prior).
            Load folded weights into it. Defaults to False.
        dwconv: depthwise convolution implementation (``"auto"``, ``"native"``, ``"fft"``).
        beta, generator_kernel_size, generator_depth: LRBM settings (1, 7, 2 in the paper).

    Example::

        block = Rep3DBlock(48, kernel_size=21)
        ...  # train
        block.reparameterize()  # now DWConv -> BN -> GELU with W_eff stored as the weight
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 21,
        modulation: str = "lrbm",
        deploy: bool = False,
        dwconv: str = "auto",
        beta: float = 1.0,
        generator_kernel_size: int = 7,
        generator_depth: int = 2,
    ) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        check_kernel_size(kernel_size)
        check_modulation(modulation)
        self.dwconv = ModulatedDepthwiseConv3d(
            channels,
            kernel_size,
            modulation="none" if deploy else modulation,
            bias=False,
            impl=dwconv,
            beta=beta,
            generator_kernel_size=generator_kernel_size,
            generator_depth=generator_depth,
        )
        self.norm = nn.BatchNorm3d(channels)
        self.act = nn.GELU()

    @property
    def deploy(self) -> bool:
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
        kernel_size, modulation, deploy, dwconv, beta, generator_kernel_size, generator_depth:
            passed to every :class:`Rep3DBlock`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        depths: Sequence[int] = (2, 2, 2, 2),
        feature_size: Sequence[int] = (48, 96, 192, 384),
        kernel_size: int = 21,
        modulation: str = "lrbm",
        deploy: bool = False,
        dwconv: str = "auto",
        beta: float = 1.0,
        generator_kernel_size: int = 7,
        generator_depth: int = 2,
    ) -> None:
        # Checked here so that a bad value fails once, before any block is built.
        check_kernel_size(kernel_size)
        check_modulation(modulation)

        def make_block(channels: int, index: int) -> Rep3DBlock:
            return Rep3DBlock(
                channels,
                kernel_size=kernel_size,
                modulation=modulation,
                deploy=deploy,
                dwconv=dwconv,
                beta=beta,
                generator_kernel_size=generator_kernel_size,
                generator_depth=generator_depth,
            )

        super().__init__(in_channels, depths, feature_size, make_block)

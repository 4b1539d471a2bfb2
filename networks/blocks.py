"""Pieces shared by the large-kernel networks (REP3D, 3D UX-Net): the channels-first LayerNorm, argument
and input-size checks, the 4-stage hierarchical encoder layout and the UNETR-style decoder that both
wire to it. Memory-layout (speed-only) helpers live in :mod:`networks.layout`."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock

from .layout import (
    decoder_uses_channels_last,
    memory_format_of,
    to_channels_last_3d,
    triton_kernels_for,
    use_channels_last_instance_norms,
    use_fused_block_tails,
)


class LayerNormChannelsFirst(nn.Module):
    """LayerNorm over the channel axis of an (N, C, D, H, W) tensor, with per-channel affine parameters.

    Args:
        channels: number of channels C.
        eps: added to the variance. Defaults to 1e-6 (the ConvNeXt / 3D UX-Net value).
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = triton_kernels_for(x) if x.is_contiguous() else None
        if kernels is not None:  # one Triton pass over the NCDHW tensor (networks/layout.py: instance_norm_impl)
            out_dtype = torch.float32 if torch.is_autocast_enabled("cuda") else x.dtype  # (autocast runs layer_norm in float32)
            return kernels.layer_norm_channels_first(x, self.weight, self.bias, self.eps, out_dtype)
        # Move channels last so that F.layer_norm (one fused kernel) normalises over them.
        y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps)
        # Back in the input's memory format: a stray channels-last view sends the next cuDNN convolutions
        # to slow kernels, and a channels-last input should stay channels-last.
        return y.movedim(-1, 1).contiguous(memory_format=memory_format_of(x))


def check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_kernel_size(kernel_size: int, name: str = "kernel_size") -> None:
    if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"{name} must be a positive odd integer (a 'same' depthwise kernel has a centre), got {kernel_size!r}; "
            "the paper uses 21 for REP3D and 7 for 3D UX-Net."
        )


def check_stages(depths: Sequence[int], feature_size: Sequence[int], num_stages: int = 4) -> None:
    depths, feature_size = list(depths), list(feature_size)
    if len(depths) != num_stages or len(feature_size) != num_stages:
        raise ValueError(
            f"depths and feature_size must each list {num_stages} stages (the decoder has {num_stages} skip levels), "
            f"got depths={depths} ({len(depths)}) and feature_size={feature_size} ({len(feature_size)}); "
            "e.g. depths=(2, 2, 2, 2), feature_size=(48, 96, 192, 384)."
        )
    for name, values in (("depths", depths), ("feature_size", feature_size)):
        for v in values:
            check_positive_int(f"every entry of {name}", v)


def check_spatial_size(x: torch.Tensor, divisor: int | Sequence[int], network: str) -> None:
    """Raise a ValueError naming a usable ROI if ``x``'s spatial size is not a multiple of ``divisor``
    (one int for every axis, or one per axis)."""
    if x.ndim != 5:
        raise ValueError(f"{network} expects a 5-D input (batch, channels, D, H, W), got shape {tuple(x.shape)}.")
    size = tuple(int(s) for s in x.shape[2:])
    divisors = tuple(divisor) if isinstance(divisor, Sequence) else (divisor,) * len(size)
    if any(s % d for s, d in zip(size, divisors)):
        fix = tuple(max(d, round(s / d) * d) for s, d in zip(size, divisors))
        need = divisors[0] if len(set(divisors)) == 1 else divisors
        raise ValueError(
            f"{network} needs every spatial size to be a multiple of {need}, got {size}; "
            f"use an ROI such as --roi {' '.join(map(str, fix))}."
        )


def check_bottleneck_size(x: torch.Tensor, divisor: int | Sequence[int], network: str) -> None:
    """Raise a ValueError naming a usable ROI if ``x`` would leave a single voxel at a bottleneck of stride
    ``divisor`` (per axis, or one int for all): the instance or per-channel group norm there cannot
    normalise one voxel (an error in training, a constant output otherwise)."""
    size = tuple(int(s) for s in x.shape[2:])
    divisors = tuple(divisor) if isinstance(divisor, Sequence) else (divisor,) * len(size)
    if all(s <= d for s, d in zip(size, divisors)):
        fix = " ".join(str(max(s, 2 * d)) for s, d in zip(size, divisors))
        stride = divisors[0] if len(set(divisors)) == 1 else divisors
        raise ValueError(
            f"{network} needs inputs with at least one side of twice its total stride ({stride}) or more "
            f"(its bottleneck would be a single voxel), got {size}; use e.g. --roi {fix}."
        )


def check_fixed_size(x: torch.Tensor, img_size: Sequence[int], network: str, why: str = "") -> None:
    """Raise a ValueError naming the ROI to use if ``x`` is not 5-D with spatial size ``img_size``
    (networks whose positional embeddings or windows fix the input size)."""
    if x.ndim != 5:
        raise ValueError(f"{network} expects a 5-D input (batch, channels, D, H, W), got shape {tuple(x.shape)}.")
    if tuple(x.shape[2:]) != tuple(img_size):
        roi = " ".join(map(str, img_size))
        raise ValueError(
            f"{network} was built for inputs of spatial size {tuple(img_size)}{why}, got {tuple(x.shape[2:])}; "
            f"use --roi {roi}, or build it with img_size set to your ROI."
        )


class HierarchicalEncoder(nn.Module):
    """The 4-stage layout shared by the 3D UX-Net and Rep3D encoders (and their checkpoint names).

    Stem: Conv3d(k=7, stride 2, pad 3) + channels-first LayerNorm; before stages 2-4: channels-first
    LayerNorm + Conv3d(k=2, stride 2); after each stage a channels-first LayerNorm (``norm0..3``).
    ``forward`` returns the four normalised stage outputs (strides 2, 4, 8, 16).

    Args:
        in_channels: input channels.
        depths: blocks per stage.
        feature_size: channels per stage.
        make_block: ``make_block(channels, index)`` builds one block; ``index`` counts blocks over all
            stages from 0 (for depth-dependent settings such as stochastic depth).
    """

    def __init__(
        self,
        in_channels: int,
        depths: Sequence[int],
        feature_size: Sequence[int],
        make_block: Callable[[int, int], nn.Module],
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_stages(depths, feature_size)
        dims = list(feature_size)
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv3d(in_channels, dims[0], kernel_size=7, stride=2, padding=3), LayerNormChannelsFirst(dims[0]))]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(LayerNormChannelsFirst(dims[i]), nn.Conv3d(dims[i], dims[i + 1], kernel_size=2, stride=2))
            )
        self.stages = nn.ModuleList()
        start = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[make_block(dims[i], start + j) for j in range(depths[i])]))
            start += depths[i]
        for i in range(4):
            self.add_module(f"norm{i}", LayerNormChannelsFirst(dims[i]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
            outs.append(getattr(self, f"norm{i}")(x))
        return outs


class UnetrDecoderNet(nn.Module):
    """A 4-stage hierarchical encoder wired to MONAI's UNETR blocks, as in 3D UX-Net and REP3D.

    Subclasses build the encoder and store it under the attribute named by ``encoder_attr`` (the
    reference releases' checkpoint prefix); the encoder returns four feature maps of strides 2, 4, 8, 16.
    The decoder: ``encoder1`` on the raw input, ``encoder2..5`` on the encoder outputs, ``decoder5..2``
    UnetrUpBlocks with skips, ``decoder1`` and a 1x1x1 ``out`` head.
    """

    encoder_attr = "encoder"
    network_name = "network"
    size_divisor = 16
    #: Run the decoder in ``channels_last_3d`` memory: ``"auto"`` (eager mode on CUDA, or on the CPU in bf16), True or False
    #: (see :func:`networks.layout.decoder_uses_channels_last`). Speed only: the result is the same either
    #: way and the logits come back contiguous (NCDHW).
    decoder_channels_last: bool | str = "auto"

    def _build_decoder(
        self,
        in_channels: int,
        out_channels: int,
        feature_size: Sequence[int],
        hidden_size: int,
        norm_name: str | tuple,
        res_block: bool,
        spatial_dims: int = 3,
    ) -> None:
        f = list(feature_size)
        common = dict(spatial_dims=spatial_dims, kernel_size=3, norm_name=norm_name, res_block=res_block)
        self.encoder1 = UnetrBasicBlock(in_channels=in_channels, out_channels=f[0], stride=1, **common)
        self.encoder2 = UnetrBasicBlock(in_channels=f[0], out_channels=f[1], stride=1, **common)
        self.encoder3 = UnetrBasicBlock(in_channels=f[1], out_channels=f[2], stride=1, **common)
        self.encoder4 = UnetrBasicBlock(in_channels=f[2], out_channels=f[3], stride=1, **common)
        self.encoder5 = UnetrBasicBlock(in_channels=f[3], out_channels=hidden_size, stride=1, **common)
        self.decoder5 = UnetrUpBlock(in_channels=hidden_size, out_channels=f[3], upsample_kernel_size=2, **common)
        self.decoder4 = UnetrUpBlock(in_channels=f[3], out_channels=f[2], upsample_kernel_size=2, **common)
        self.decoder3 = UnetrUpBlock(in_channels=f[2], out_channels=f[1], upsample_kernel_size=2, **common)
        self.decoder2 = UnetrUpBlock(in_channels=f[1], out_channels=f[0], upsample_kernel_size=2, **common)
        self.decoder1 = UnetrBasicBlock(in_channels=f[0], out_channels=f[0], stride=1, **common)
        self.out = UnetOutBlock(spatial_dims=spatial_dims, in_channels=f[0], out_channels=out_channels)
        # MONAI's instance norms copy channels-last tensors to NCDHW; these keep the decoder's layout
        # (same parameters and keys). The encoders have none: this swaps the decoder's.
        use_channels_last_instance_norms(self)
        # ... and their "norm (+ add) + LeakyReLU" tails run as fused Triton kernels where asked for (layout.py)
        use_fused_block_tails(self)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming a usable ROI if the network cannot take ``x`` (a meta tensor will do)."""
        check_spatial_size(x, self.size_divisor, self.network_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        outs = getattr(self, self.encoder_attr)(x)
        use_cl = decoder_uses_channels_last(self.decoder_channels_last, x)
        if use_cl:
            outs = [to_channels_last_3d(o) for o in outs]
            x = to_channels_last_3d(x)
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(outs[0])
        enc3 = self.encoder3(outs[1])
        enc4 = self.encoder4(outs[2])
        enc5 = self.encoder5(outs[3])
        dec4 = self.decoder5(enc5, enc4)
        dec3 = self.decoder4(dec4, enc3)
        dec2 = self.decoder3(dec3, enc2)
        dec1 = self.decoder2(dec2, enc1)
        logits = self.out(self.decoder1(dec1))
        return logits.contiguous() if use_cl else logits

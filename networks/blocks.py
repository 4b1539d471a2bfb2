"""Pieces shared by the large-kernel networks (REP3D, 3D UX-Net): norms, argument checks and the
UNETR-style decoder that both wire to a 4-stage hierarchical encoder."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock


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
        # Move channels last so that F.layer_norm (one fused kernel) normalises over them.
        y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps)
        # Back in the input's memory format: a stray channels-last view sends the next cuDNN convolutions
        # to slow kernels, and a channels-last input should stay channels-last.
        return y.movedim(-1, 1).contiguous(memory_format=memory_format_of(x))


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last_3d`` for a 5-D channels-last tensor (with more than one channel), else contiguous."""
    if x.ndim == 5 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def to_channels_last_3d(x: torch.Tensor) -> torch.Tensor:
    """``x`` with channels-last (NDHWC) strides, also for a single channel, where ``x.contiguous(memory_format=...)``
    keeps NCDHW strides and the convolutions that follow would choose NCDHW."""
    out = torch.empty_like(x, memory_format=torch.channels_last_3d)
    return out.copy_(x)


class _ChannelsLastInstanceNormCUDA(torch.autograd.Function):
    """Instance norm of a channels-last (NDHWC) CUDA tensor with PyTorch's channels-last batch-norm kernels
    (the SyncBatchNorm building blocks), one sample at a time, each sample seen as a 4-D (1, C, D*H, W)
    channels-last tensor. Output and input gradient are written into fresh NDHWC tensors: no slices or
    concatenations enter the autograd graph (those cost a full-size copy per sample in the backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n, c, d, h, w = x.shape
        x4 = x.view(n, c, d * h, w)
        out = torch.empty_like(x, memory_format=torch.channels_last_3d)
        out4 = out.view(n, c, d * h, w)
        means, invstds = [], []
        for i in range(n):
            mean, invstd = torch.batch_norm_stats(x4[i : i + 1], eps)
            torch.batch_norm_elemt(x4[i : i + 1], weight, bias, mean, invstd, eps, out=out4[i : i + 1])
            means.append(mean)
            invstds.append(invstd)
        ctx.save_for_backward(x, weight, torch.stack(means), torch.stack(invstds))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        n, c, d, h, w = x.shape
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x4 = x.view(n, c, d * h, w)
        g4 = grad_out.contiguous(memory_format=torch.channels_last_3d).view(n, c, d * h, w)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last_3d) if need_x else None
        grad_w = grad_b = None
        count = torch.full((1,), d * h * w, dtype=torch.int32, device=x.device)
        for i in range(n):
            sum_dy, sum_dy_xmu, gw, gb = torch.batch_norm_backward_reduce(
                g4[i : i + 1], x4[i : i + 1], mean[i], invstd[i], weight, need_x, need_w, need_b
            )
            if need_w:
                grad_w = gw if grad_w is None else grad_w + gw
            if need_b:
                grad_b = gb if grad_b is None else grad_b + gb
            if need_x:
                torch.ops.aten.batch_norm_backward_elemt.out(  # (torch.batch_norm_backward_elemt has no out=)
                    g4[i : i + 1], x4[i : i + 1], mean[i], invstd[i], weight, sum_dy, sum_dy_xmu, count,
                    out=grad_x.view(n, c, d * h, w)[i : i + 1],
                )
        return grad_x, grad_w, grad_b, None


class ChannelsLastInstanceNorm3d(nn.Module):
    """Instance normalisation that keeps a channels-last (NDHWC) input channels-last.

    Computes what ``nn.InstanceNorm3d`` (no running statistics) computes, with the same parameters and
    state-dict keys. ``F.instance_norm`` copies its input to NCDHW first; here each sample is normalised
    with batch-norm kernels in training form (statistics over that sample's voxels, per channel), which
    exist for channels-last tensors, so a decoder run in ``channels_last_3d`` needs no layout copies around
    its norms. Contiguous (NCDHW) inputs take ``F.instance_norm`` unchanged. (On the CPU the channels-last
    batch norm is less accurate in float32 when |mean| >> std, one reason the decoder uses this layout
    on CUDA only by default.)

    Args:
        num_features: channels C.
        eps: added to the variance. Defaults to 1e-5 (PyTorch's and MONAI's value).
        affine: learn a per-channel scale and shift. Defaults to False (MONAI's "instance" norm).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = False) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    @classmethod
    def from_instance_norm(cls, norm: nn.InstanceNorm3d) -> "ChannelsLastInstanceNorm3d":
        new = cls(norm.num_features, norm.eps, affine=False)
        if norm.affine:  # share the parameters themselves (same keys, same tensors)
            new.weight, new.bias = norm.weight, norm.bias
        return new

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if memory_format_of(x) != torch.channels_last_3d:
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        if x.is_cuda and not torch.compiler.is_compiling():
            return _ChannelsLastInstanceNormCUDA.apply(x, self.weight, self.bias, self.eps)
        # Elsewhere (CPU, or traced by torch.compile): the same with functional ops, which autograd and
        # inductor understand; the batch statistics of one sample are its instance statistics.
        n, c, d, h, w = x.shape
        if n == 1:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        # The 4-D view is taken of the whole batch, then sliced, so that every sample keeps its batch
        # stride (a size-1 view gets an arbitrary one, which the CPU batch-norm backward misreads).
        x4 = x.view(n, c, d * h, w)
        outs = [F.batch_norm(x4[i : i + 1], None, None, self.weight, self.bias, True, 0.0, self.eps) for i in range(n)]
        return torch.cat(outs).view(n, c, d, h, w)


def use_channels_last_instance_norms(module: nn.Module) -> int:
    """Replace every ``nn.InstanceNorm3d`` without running statistics inside ``module`` by a
    :class:`ChannelsLastInstanceNorm3d` (same result, same state dict); returns how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.InstanceNorm3d) and not child.track_running_stats:
            setattr(module, name, ChannelsLastInstanceNorm3d.from_instance_norm(child))
            count += 1
        else:
            count += use_channels_last_instance_norms(child)
    return count


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


def check_spatial_size(x: torch.Tensor, divisor: int, network: str) -> None:
    """Raise a ValueError naming a usable ROI if ``x``'s spatial size is not a multiple of ``divisor``."""
    if x.ndim != 5:
        raise ValueError(f"{network} expects a 5-D input (batch, channels, D, H, W), got shape {tuple(x.shape)}.")
    bad = [s for s in x.shape[2:] if s % divisor]
    if bad:
        fix = tuple(max(divisor, round(s / divisor) * divisor) for s in x.shape[2:])
        raise ValueError(
            f"{network} needs every spatial size to be a multiple of {divisor}, got {tuple(x.shape[2:])}; "
            f"use an ROI such as --roi {' '.join(map(str, fix))}."
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
    #: Run the decoder in ``channels_last_3d`` memory: ``"auto"`` (on CUDA, eager mode only), True or False.
    #: cuDNN's 3-D convolutions run natively in NDHWC; in NCDHW they transpose each input and output.
    #: Under torch.compile, inductor does better with NCDHW (benchmarks/RESULTS.md). The result is the
    #: same either way; the logits come back contiguous (NCDHW).
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
        # MONAI's instance norms copy channels-last tensors to NCDHW; these keep the decoder's layout.
        # (The encoders have none: this swaps the decoder's.)
        use_channels_last_instance_norms(self)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming a usable ROI if the network cannot take ``x`` (a meta tensor will do)."""
        check_spatial_size(x, self.size_divisor, self.network_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        outs = getattr(self, self.encoder_attr)(x)
        use_cl = self.decoder_channels_last
        if use_cl == "auto":
            use_cl = x.is_cuda and not torch.compiler.is_compiling()
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

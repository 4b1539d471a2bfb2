"""nnFormer: a volumetric transformer U-Net with local window attention and skip attention.

"nnFormer: Volumetric Medical Image Segmentation via a 3D Transformer", Zhou et al., IEEE TIP 2023
(arXiv 2109.03201). Layout, as in the configuration the 3D UX-Net and Rep3D papers compare against:

* embedding: two strided 3x3x3 convolution pairs (GELU and LayerNorm between them) down to
  ``img_size / patch_size`` tokens of width ``embed_dim``, then a LayerNorm;
* encoder: 4 stages of (shifted-)window self-attention blocks (widths E, 2E, 4E, 8E); between stages
  GELU -> LayerNorm -> Conv3d(3, stride 2) doubles the width; each stage output is layer-normed and
  kept as a skip;
* decoder: 3 stages; each upsamples with LayerNorm -> ConvTranspose3d(2, stride 2), adds the skip, and
  starts with a *skip attention* block (queries from the upsampled features, keys and values from
  the skip) followed by shifted-window self-attention blocks;
* head: ConvTranspose3d(E, classes, patch_size, stride=patch_size).

Windows larger than (or equal to) a stage's smallest side shrink to that side, without shifting, as in
the authors' code; the relative position tables (and so the parameter count) depend on ``img_size``.
The self-attention blocks and window helpers are MONAI's (``monai.networks.nets.swin_unetr``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from monai.networks.layers import DropPath
from monai.networks.nets.swin_unetr import (
    SwinTransformerBlock,
    WindowAttention,
    compute_mask,
    get_window_size,
    window_partition,
    window_reverse,
)
from monai.utils import ensure_tuple_rep

from ..blocks import LayerNormChannelsFirst, check_fixed_size, check_positive_int

__all__ = ["nnFormer"]

NUM_STAGES = 4


def _three_ints(value: Sequence[int] | int, name: str) -> tuple[int, int, int]:
    size = ensure_tuple_rep(value, 3)
    if len(size) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"{name} must be a positive int or three positive ints, got {value!r}.")
    return tuple(size)  # type: ignore[return-value]


def _stage_window(resolution: Sequence[int], window: int, shifted: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """nnFormer's rule: a window no smaller than the stage's smallest side becomes that side, unshifted."""
    if min(resolution) <= window:
        w = min(resolution)
        return (w, w, w), (0, 0, 0)
    s = window // 2 if shifted else 0
    return (window,) * 3, (s,) * 3


def _pad_to_windows(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Zero-pad a (B, D, H, W, C) tensor at the far end of each axis to a multiple of ``window``."""
    d, h, w = x.shape[1:4]
    pads = [(window[i] - s % window[i]) % window[i] for i, s in enumerate((d, h, w))]
    if any(pads):
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    return x


def _shift_mask(x: torch.Tensor, window: Sequence[int], shift: Sequence[int]) -> torch.Tensor | None:
    """Attention mask of the shifted windows for a (B, D, H, W, C) input (None when nothing shifts)."""
    window, shift = get_window_size(x.shape[1:4], window, shift)
    if not any(shift):
        return None
    dims = [int(np.ceil(s / w)) * w for s, w in zip(x.shape[1:4], window)]
    return compute_mask(dims, window, shift, x.device)


class _ConvPair(nn.Module):
    """Conv3d(3, stride) -> GELU -> LayerNorm -> Conv3d(3) [-> GELU -> LayerNorm unless last]."""

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int], last: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=tuple(stride), padding=1)
        self.norm1 = LayerNormChannelsFirst(out_channels, eps=1e-5)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = None if last else LayerNormChannelsFirst(out_channels, eps=1e-5)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.norm1(self.act(self.conv1(x))))
        if self.norm2 is not None:
            x = self.norm2(self.act(x))
        return x


class ConvEmbedding(nn.Module):
    """nnFormer's embedding layer: two convolution pairs of strides whose product is ``patch_size``.

    Returns channels-last tokens (B, D / p0, H / p1, W / p2, embed_dim).
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: Sequence[int]) -> None:
        super().__init__()
        first = tuple(min(p, 2) for p in patch_size)
        second = tuple(p // f for p, f in zip(patch_size, first))
        self.proj1 = _ConvPair(in_channels, embed_dim // 2, first, last=False)
        self.proj2 = _ConvPair(embed_dim // 2, embed_dim, second, last=True)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj2(self.proj1(x)).movedim(1, -1))


class Downsample(nn.Module):
    """GELU -> LayerNorm -> Conv3d(C, 2C, 3, stride 2) on channels-last tokens (nnFormer's merging)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reduction = nn.Conv3d(dim, 2 * dim, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(x)).movedim(-1, 1)
        return self.reduction(x).movedim(1, -1)


class Upsample(nn.Module):
    """LayerNorm -> ConvTranspose3d(2C, C, 2, stride 2) on channels-last tokens (nnFormer's expanding)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim)
        self.up = nn.ConvTranspose3d(2 * dim, dim, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.norm(x).movedim(-1, 1)).movedim(1, -1)


class WindowCrossAttention(WindowAttention):
    """Window attention whose queries are given (not projected) and whose keys and values come from a
    second input, with MONAI's relative position bias. nnFormer's skip attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int],
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim, num_heads, window_size, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        # The queries are the normalised decoder features themselves: only keys and values are projected.
        del self.qkv
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Attend from ``query`` to ``context``, both (windows, N, C)."""
        b, n, c = query.shape
        heads = self.num_heads
        k, v = self.kv(context).reshape(b, n, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        q = query.reshape(b, n, heads, c // heads).transpose(1, 2) * self.scale
        bias = self.relative_position_bias_table[self.relative_position_index[:n, :n].reshape(-1)]
        attn = q @ k.transpose(-2, -1) + bias.reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class SkipAttentionBlock(nn.Module):
    """First block of an nnFormer decoder stage (never shifted).

    ``x = up + skip``; ``x = x + WindowCrossAttention(LN(up), LN(skip))``; ``x = x + MLP(LN(x))``.
    One LayerNorm serves queries and keys/values, as in the authors' code.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.window_size = tuple(window_size)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowCrossAttention(dim, num_heads, window_size, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(hidden_size=dim, mlp_dim=int(dim * mlp_ratio), dropout_rate=drop, act="GELU", dropout_mode="swin")

    def forward(self, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``up`` and ``skip``: channels-last (B, D, H, W, C) tensors of equal shape."""
        b, d, h, w, c = up.shape
        window = get_window_size((d, h, w), self.window_size)
        q = _pad_to_windows(self.norm1(up), window)
        kv = _pad_to_windows(self.norm1(skip), window)
        dims = [b, *q.shape[1:4]]
        out = self.attn(window_partition(q, window), window_partition(kv, window))
        out = window_reverse(out.view(-1, *window, c), window, dims)[:, :d, :h, :w]
        x = up + skip + self.drop_path(out)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class nnFormer(nn.Module):
    """nnFormer segmentation network (no deep supervision).

    "nnFormer: Volumetric Medical Image Segmentation via a 3D Transformer", Zhou et al., 2021/2023.
    With the defaults (crop 96, embed 192, depths 2,2,2,2, heads 6,12,24,48, patch 2,4,4, window
    4,4,8,4): 149.333M parameters at 16 classes.

    Args:
        in_channels: input channels. Defaults to 1.
        out_channels: output classes, background included. Defaults to 16.
        img_size: the ROI (crop) the network is built for; it only takes inputs of exactly this size,
            a multiple of ``patch_size * 8`` on each axis. Defaults to (96, 96, 96).
        embed_dim: token width of the first stage (doubled at each stage; even). Defaults to 192.
        depths: blocks per stage; the decoder uses those of stages 3, 2, 1. Defaults to (2, 2, 2, 2).
        num_heads: attention heads per stage. Defaults to (6, 12, 24, 48).
        patch_size: embedding stride per axis, each 1, 2 or 4. Defaults to (2, 4, 4).
        window_size: attention window per stage (cubic). Defaults to (4, 4, 8, 4).
        mlp_ratio: MLP width over token width. Defaults to 4.
        qkv_bias: biases in the query/key/value projections. Defaults to True.
        drop_rate: dropout after attention and MLP. Defaults to 0.
        attn_drop_rate: attention-weight dropout. Defaults to 0.
        drop_path_rate: largest stochastic depth rate (rising linearly through the encoder, and again
            through the decoder). Defaults to 0.2 (the authors' value).

    Example::

        net = nnFormer(in_channels=1, out_channels=16)
        logits = net(torch.randn(1, 1, 96, 96, 96))   # (1, 16, 96, 96, 96)
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 16,
        img_size: Sequence[int] | int = (96, 96, 96),
        embed_dim: int = 192,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (6, 12, 24, 48),
        patch_size: Sequence[int] | int = (2, 4, 4),
        window_size: Sequence[int] = (4, 4, 8, 4),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("out_channels", out_channels)
        check_positive_int("embed_dim", embed_dim)
        self.img_size = _three_ints(img_size, "img_size")
        self.patch_size = _three_ints(patch_size, "patch_size")
        depths, num_heads, window_size = list(depths), list(num_heads), list(window_size)
        for name, values in (("depths", depths), ("num_heads", num_heads), ("window_size", window_size)):
            if len(values) != NUM_STAGES:
                raise ValueError(f"nnFormer {name} must list {NUM_STAGES} stages, got {values}; e.g. the defaults.")
            for v in values:
                check_positive_int(f"every entry of {name}", v)
        if embed_dim % 2:
            raise ValueError(f"nnFormer embed_dim must be even (the embedding's first half has embed_dim / 2), got {embed_dim}.")
        if any(p not in (1, 2, 4) for p in self.patch_size):
            raise ValueError(f"nnFormer patch_size entries must be 1, 2 or 4, got {self.patch_size}; the paper uses 2 4 4.")
        for i, heads in enumerate(num_heads):
            if (embed_dim * 2**i) % heads:
                raise ValueError(f"stage {i} width {embed_dim * 2**i} is not divisible by num_heads[{i}] = {heads}.")
        divisor = tuple(p * 2 ** (NUM_STAGES - 1) for p in self.patch_size)
        if any(s % q for s, q in zip(self.img_size, divisor)):
            fix = " ".join(str(max(q, round(s / q) * q)) for s, q in zip(self.img_size, divisor))
            raise ValueError(
                f"nnFormer img_size {self.img_size} must be a multiple of patch_size * 8 = {divisor} on each axis; "
                f"use e.g. --roi {fix}."
            )
        for name, rate in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate), ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"nnFormer {name} must be in [0, 1), got {rate!r}.")

        dims = [embed_dim * 2**i for i in range(NUM_STAGES)]
        res = [tuple(s // p // 2**i for s, p in zip(self.img_size, self.patch_size)) for i in range(NUM_STAGES)]
        common = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate)

        self.embed = ConvEmbedding(in_channels, embed_dim, self.patch_size)
        enc_rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.encoder_stages = nn.ModuleList()
        self.encoder_norms = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        self._enc_windows: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        for i in range(NUM_STAGES):
            plain, shifted = _stage_window(res[i], window_size[i], False), _stage_window(res[i], window_size[i], True)
            self._enc_windows.append(shifted)
            blocks = [
                SwinTransformerBlock(
                    dims[i],
                    num_heads[i],
                    window_size=(shifted if j % 2 else plain)[0],
                    shift_size=(shifted if j % 2 else plain)[1],
                    drop_path=enc_rates[sum(depths[:i]) + j],
                    **common,
                )
                for j in range(depths[i])
            ]
            self.encoder_stages.append(nn.ModuleList(blocks))
            self.encoder_norms.append(nn.LayerNorm(dims[i]))
            if i < NUM_STAGES - 1:
                self.downsamples.append(Downsample(dims[i]))

        # Decoder stages run from level 2 up to level 0, each with that level's width, heads, window, depth.
        levels = list(range(NUM_STAGES - 2, -1, -1))
        dec_rates = torch.linspace(0, drop_path_rate, sum(depths[lv] for lv in levels)).tolist()
        self.upsamples = nn.ModuleList()
        self.decoder_stages = nn.ModuleList()
        self._dec_windows: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        start = 0
        for lv in levels:
            plain, shifted = _stage_window(res[lv], window_size[lv], False), _stage_window(res[lv], window_size[lv], True)
            self._dec_windows.append(shifted)
            self.upsamples.append(Upsample(dims[lv]))
            blocks: list[nn.Module] = [
                SkipAttentionBlock(dims[lv], num_heads[lv], plain[0], drop_path=dec_rates[start], **common)
            ]
            blocks += [
                SwinTransformerBlock(
                    dims[lv], num_heads[lv], window_size=shifted[0], shift_size=shifted[1], drop_path=dec_rates[start + j], **common
                )
                for j in range(1, depths[lv])
            ]
            self.decoder_stages.append(nn.ModuleList(blocks))
            start += depths[lv]
        self.head = nn.ConvTranspose3d(embed_dim, out_channels, kernel_size=self.patch_size, stride=self.patch_size)

    def _check_input(self, x: torch.Tensor) -> None:
        check_fixed_size(x, self.img_size, "nnFormer", " (an ROI must be a multiple of patch_size * 8 per axis)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.embed(x)  # channels-last tokens from here on
        skips = []
        for i, blocks in enumerate(self.encoder_stages):
            mask = _shift_mask(x, *self._enc_windows[i])
            for blk in blocks:
                x = blk(x, mask)
            skips.append(self.encoder_norms[i](x))
            if i < NUM_STAGES - 1:
                x = self.downsamples[i](x)
        x = skips[-1]
        for j, blocks in enumerate(self.decoder_stages):
            skip = skips[NUM_STAGES - 2 - j]
            x = blocks[0](self.upsamples[j](x), skip)
            mask = _shift_mask(x, *self._dec_windows[j])
            for blk in blocks[1:]:
                x = blk(x, mask)
        return self.head(x.movedim(-1, 1))

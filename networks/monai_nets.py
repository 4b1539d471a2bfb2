"""MONAI's SwinUNETR and UNETR with the settings of the 3D UX-Net / Rep3D comparisons.

Both are MONAI's own classes (subclassed only to check the input size up front with a message that
names the ROI to use), so MONAI-trained checkpoints load unchanged.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from monai.networks.nets import SwinUNETR, UNETR
from monai.utils import ensure_tuple_rep

from .blocks import check_fixed_size, check_positive_int, check_spatial_size

__all__ = ["RoiCheckedSwinUNETR", "RoiCheckedUNETR", "build_swin_unetr", "build_unetr"]

# SwinUNETR: patch 2, then four 2x patch mergings: the bottleneck is at stride 2**5.
_SWIN_DIVISOR = 32
# UNETR: a ViT on 16^3 patches.
_UNETR_PATCH = 16


def _roi_tuple(img_size: Sequence[int] | int, name: str = "img_size") -> tuple[int, int, int]:
    size = ensure_tuple_rep(img_size, 3)
    if len(size) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"{name} must be a positive int or three positive ints (the ROI, e.g. 96 96 96), got {img_size!r}.")
    return tuple(size)  # type: ignore[return-value]


class RoiCheckedSwinUNETR(SwinUNETR):
    """MONAI's :class:`~monai.networks.nets.SwinUNETR` whose forward first checks that every spatial size
    is a multiple of 32, raising a ValueError that names a usable ``--roi``."""

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        self.check_input(x_in)
        return super().forward(x_in)

    def check_input(self, x_in: torch.Tensor) -> None:
        """Raise a ValueError naming a usable ROI if the network cannot take ``x_in`` (a meta tensor will do)."""
        divisor = int(self.patch_size) ** 5
        check_spatial_size(x_in, divisor, "SwinUNETR")
        if max(x_in.shape[2:]) < 2 * divisor:
            # The bottleneck would be a single voxel, which its instance norm cannot normalise.
            raise ValueError(
                f"SwinUNETR needs inputs with at least one side of {2 * divisor} voxels or more, got {tuple(x_in.shape[2:])}; "
                f"use e.g. --roi {' '.join(str(max(2 * divisor, s)) for s in x_in.shape[2:])}."
            )


class RoiCheckedUNETR(UNETR):
    """MONAI's :class:`~monai.networks.nets.UNETR` whose forward first checks that the input has exactly the
    spatial size the network was built for (its positional embedding is learned per patch position)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.img_size = tuple(self.feat_size[i] * self.patch_size[i] for i in range(len(self.feat_size)))
        # MONAI's TransformerBlock builds a cross-attention LayerNorm that UNETR never uses: freeze it so that
        # it does not pose as trainable. Its keys stay, so MONAI-trained checkpoints still load.
        for name, param in self.named_parameters():
            if ".norm_cross_attn." in name:
                param.requires_grad_(False)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        check_fixed_size(x_in, self.img_size, "UNETR", " (its positional embedding is fixed)")
        return super().forward(x_in)


def build_swin_unetr(
    in_channels: int,
    out_channels: int,
    feature_size: int = 48,
    img_size: Sequence[int] | int | None = None,
    **kwargs: Any,
) -> RoiCheckedSwinUNETR:
    """MONAI SwinUNETR as in the paper's comparison (feature size 48, depths 2,2,2,2, heads 3,6,12,24,
    window 7, no dropout): 62.187M parameters at 16 classes.

    Args:
        in_channels: input channels.
        out_channels: output classes, background included.
        feature_size: embedding width (a multiple of 12). Defaults to 48.
        img_size: optional ROI the network will be trained on; only checked (SwinUNETR takes any size
            that is a multiple of 32 and MONAI 1.6 no longer takes this argument).
        kwargs: any other keyword of MONAI's ``SwinUNETR`` (e.g. ``use_checkpoint``, ``depths``).
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("out_channels", out_channels)
    if img_size is not None:
        roi = _roi_tuple(img_size)
        if any(s % _SWIN_DIVISOR for s in roi):
            fix = " ".join(str(max(_SWIN_DIVISOR, round(s / _SWIN_DIVISOR) * _SWIN_DIVISOR)) for s in roi)
            raise ValueError(f"SwinUNETR needs an ROI whose sizes are multiples of 32, got {roi}; use e.g. --roi {fix}.")
    if not isinstance(feature_size, int) or feature_size < 12 or feature_size % 12:
        raise ValueError(f"SwinUNETR feature_size must be a positive multiple of 12, got {feature_size!r}; the paper uses 48.")
    return RoiCheckedSwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size, **kwargs)


def build_unetr(
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int] | int = (96, 96, 96),
    feature_size: int = 16,
    hidden_size: int = 768,
    mlp_dim: int = 3072,
    num_heads: int = 12,
    proj_type: str = "perceptron",
    norm_name: str | tuple = "instance",
    res_block: bool = True,
    dropout_rate: float = 0.0,
    **kwargs: Any,
) -> RoiCheckedUNETR:
    """MONAI UNETR as in the paper's comparison: 92.803M parameters at 16 classes and img_size 96.

    Args:
        in_channels: input channels.
        out_channels: output classes, background included.
        img_size: the ROI; UNETR only takes inputs of exactly this size, each a multiple of 16.
            Defaults to (96, 96, 96).
        feature_size: decoder width. Defaults to 16.
        hidden_size: ViT width. Defaults to 768.
        mlp_dim: ViT MLP width. Defaults to 3072.
        num_heads: ViT heads. Defaults to 12.
        proj_type: patch embedding, ``"perceptron"`` (default) or ``"conv"``.
        norm_name: decoder normalisation. Defaults to "instance".
        res_block: residual decoder blocks. Defaults to True.
        dropout_rate: ViT dropout. Defaults to 0.
        kwargs: any other keyword of MONAI's ``UNETR``.
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("out_channels", out_channels)
    roi = _roi_tuple(img_size)
    if any(s % _UNETR_PATCH for s in roi):
        fix = " ".join(str(max(_UNETR_PATCH, round(s / _UNETR_PATCH) * _UNETR_PATCH)) for s in roi)
        raise ValueError(f"UNETR needs an img_size (ROI) whose sizes are multiples of 16, got {roi}; use e.g. --roi {fix}.")
    if hidden_size % num_heads:
        raise ValueError(f"UNETR hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
    return RoiCheckedUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        img_size=roi,
        feature_size=feature_size,
        hidden_size=hidden_size,
        mlp_dim=mlp_dim,
        num_heads=num_heads,
        proj_type=proj_type,
        norm_name=norm_name,
        res_block=res_block,
        dropout_rate=dropout_rate,
        **kwargs,
    )

"""MONAI's networks with the settings of the paper's comparisons: SwinUNETR, UNETR, nnU-Net (DynUNet),
3D U-Net (UNet) and MedNeXt.

Each is MONAI's own class, subclassed only to check the input size up front with a message that names
the ROI to use (``check_input``, also used by :func:`networks.check_roi`), so MONAI-trained checkpoints
load unchanged. Every one returns plain logits in evaluation mode, and in training mode too except nnU-Net
built with ``deep_supervision=True``, whose training forward returns the list of its decoder outputs at their
own resolutions (full resolution first), as nnU-Net's network does; the trainer's loss then weighs them.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from monai.networks.nets import DynUNet, MedNeXt, SwinUNETR, UNet, UNETR
from monai.utils import ensure_tuple_rep

from .blocks import check_bottleneck_size, check_fixed_size, check_positive_int, check_spatial_size

__all__ = [
    "MEDNEXT_VARIANTS",
    "RoiCheckedDynUNet",
    "RoiCheckedMedNeXt",
    "RoiCheckedSwinUNETR",
    "RoiCheckedUNETR",
    "RoiCheckedUNet",
    "build_mednext",
    "build_nnunet",
    "build_swin_unetr",
    "build_unet3d",
    "build_unetr",
    "plan_nnunet_topology",
]

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


# --------------------------------------------------------------------------------------------------
# nnU-Net (3d_fullres topology on MONAI's DynUNet)


def _refuse_deep_supervision(kwargs: dict, network: str) -> None:
    if kwargs.get("deep_supervision"):
        raise ValueError(
            f"{network} is built without deep supervision: the training and inference code expect one logits "
            "tensor, not the stacked or tupled outputs of the supervision heads."
        )
    kwargs.pop("deep_supervision", None)


def plan_nnunet_topology(
    img_size: Sequence[int] | int,
    spacing: Sequence[float] | None = None,
    min_feature_map_size: int = 3,
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Kernel sizes and strides of a U-Net for patches of ``img_size``, by nnU-Net's planning rule.

    The rule of nnU-Net v2's ``get_pool_and_conv_props`` (3d_fullres): halve, together, every axis that
    is at least ``2 * min_feature_map_size`` long and whose current spacing is within a factor 2 of the
    finest (a lone axis only while it is at least ``3 * min_feature_map_size`` long); an axis gets
    3-wide kernels once its spacing is within a factor 2 of the finest (1 before); the bottleneck gets
    3-wide kernels. Stage 0 has stride 1.

    Args:
        img_size: the patch (ROI) in voxels, one int or one per axis.
        spacing: voxel spacing of the patch, one per axis. Defaults to isotropic.
        min_feature_map_size: shortest bottleneck edge nnU-Net pools down to. Defaults to 3, which plans
            the paper's 6-stage network (31.2M parameters) for its 96^3 ROI: 96 -> 3. nnU-Net's own
            default of 4 stops one pooling earlier at 96^3 (bottleneck 6^3, 5 stages, 16.5M), and plans
            the same 6 stages as 3 does for 128^3 or 160^3 patches.

    Returns:
        ``(kernel_sizes, strides)``: one tuple per stage each, for ``monai.networks.nets.DynUNet``.
    """
    size = [float(s) for s in _roi_tuple(img_size)]
    dims = len(size)
    current = [1.0] * dims if spacing is None else [float(s) for s in spacing]
    if len(current) != dims or not all(s > 0 for s in current):
        raise ValueError(f"spacing must be {dims} positive numbers, got {spacing!r}.")
    check_positive_int("min_feature_map_size", min_feature_map_size)
    kernel = [1] * dims
    kernels: list[tuple[int, ...]] = []
    strides: list[tuple[int, ...]] = [(1,) * dims]
    while True:
        axes = [i for i in range(dims) if size[i] >= 2 * min_feature_map_size]
        if not axes:
            break
        finest = min(current[i] for i in axes)
        axes = [i for i in axes if current[i] / finest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * min_feature_map_size:
            break
        for d in range(dims):
            if current[d] / min(current) < 2:
                kernel[d] = 3
        kernels.append(tuple(kernel))
        strides.append(tuple(2 if d in axes else 1 for d in range(dims)))
        for d in axes:
            size[d] = math.ceil(size[d] / 2)
            current[d] *= 2
    kernels.append((3,) * dims)
    return kernels, strides


def _total_strides(strides: Sequence[Sequence[int] | int], dims: int = 3) -> tuple[int, ...]:
    """Per-axis product of a network's stage strides (the divisor of its input sizes)."""
    total = [1] * dims
    for s in strides:
        for d, v in enumerate(ensure_tuple_rep(s, dims)):
            total[d] *= int(v)
    return tuple(total)


class _StrideChecked:
    """Mixin for MONAI encoder-decoders: forward first checks that every spatial size is a multiple of the
    network's total stride on that axis and leaves more than one bottleneck voxel (a ValueError names a
    usable ``--roi``). Subclasses give ``_input_divisors()`` and ``_label``."""

    _label = "network"

    def _input_divisors(self) -> Any:
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming a usable ROI if the network cannot take ``x`` (a meta tensor will do)."""
        divisors = self._input_divisors()
        check_spatial_size(x, divisors, self._label)
        check_bottleneck_size(x, divisors, self._label)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return super().forward(x)  # type: ignore[misc]


class RoiCheckedDynUNet(_StrideChecked, DynUNet):
    """MONAI's :class:`~monai.networks.nets.DynUNet` whose forward first checks that every spatial size is a
    multiple of the network's total stride on that axis and leaves more than one bottleneck voxel.

    ``img_size`` (the ROI its topology was planned for) is kept as an attribute for messages.
    """

    def __init__(self, *args: Any, img_size: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.img_size = None if img_size is None else tuple(img_size)

    _label = "nnUNet"

    def _input_divisors(self) -> Any:
        return _total_strides(self.strides, self.spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:  # type: ignore[override]
        """Logits (N, C, ...); in training mode with deep supervision, ``[full, 1/2, 1/4, ...]``: the main
        output and each supervision head at its own resolution. MONAI's DynUNet would interpolate the heads
        up to full size and stack them; nnU-Net instead downsamples the targets to each output, which is what
        the trainer's ``DeepSupervisionLoss`` does with a list."""
        self.check_input(x)
        if not (self.training and self.deep_supervision):
            return DynUNet.forward(self, x)
        out = self.output_block(self.skip_layers(x))
        return [out, *self.heads]  # heads[i]: the decoder output at stride 2**(i + 1)


def _planned_roi(roi: tuple[int, ...], spacing: Sequence[float] | None, min_feature_map_size: int) -> tuple[int, ...]:
    """The smallest ROI >= ``roi`` whose nnU-Net plan has 3 stages or more and divides it (what to suggest)."""
    cand = tuple(max(s, 4 * min_feature_map_size) for s in roi)
    for _ in range(16):
        _, strides = plan_nnunet_topology(cand, spacing, min_feature_map_size)
        div = _total_strides(strides, len(cand))
        new = tuple(math.ceil(s / d) * d for s, d in zip(cand, div))
        if new == cand and len(strides) >= 3:
            return cand
        cand = new
    return cand


def build_nnunet(
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int] | int = (96, 96, 96),
    spacing: Sequence[float] | None = None,
    base_filters: int = 32,
    max_filters: int = 320,
    min_feature_map_size: int = 3,
    res_block: bool = False,
    deep_supervision: bool = False,
    **kwargs: Any,
) -> RoiCheckedDynUNet:
    """nnU-Net's 3d_fullres U-Net for the ROI, on MONAI's DynUNet: 31.190M parameters at 16 classes and the
    paper's 96^3 ROI (the paper's table: 31.2M).

    "nnU-Net: a self-configuring method for deep learning-based biomedical image segmentation", Isensee et
    al., Nature Methods 2021. Topology from :func:`plan_nnunet_topology`: at 96^3, six stages of two 3^3
    convolutions (strides 1, 2, 2, 2, 2, 2), filters 32, 64, 128, 256, 320, 320, instance norm (affine),
    leaky ReLU 0.01, transposed-convolution upsampling. Without deep supervision by default (plain logits).

    Args:
        in_channels: input channels.
        out_channels: output classes, background included.
        img_size: the ROI the topology is planned for. Defaults to (96, 96, 96). The network then takes any
            input whose sizes are multiples of its total stride per axis (32 at 96^3); sliding-window
            inference uses the ROI anyway.
        spacing: voxel spacing of the ROI for the plan (anisotropic spacing pools the fine axes first).
            Defaults to isotropic.
        base_filters: filters of the first stage, doubled per stage. Defaults to 32 (nnU-Net's).
        max_filters: cap on the filters of a stage. Defaults to 320 (nnU-Net's for 3-D).
        min_feature_map_size: see :func:`plan_nnunet_topology`. Defaults to 3.
        res_block: residual convolution blocks (nnU-Net's ResEnc-like variant). Defaults to False.
        deep_supervision: add a 1x1x1 segmentation head to every lower decoder resolution, as nnU-Net does
            (at 96^3: outputs at strides 1, 2, 4, 8, 16; 12,352 more parameters at 16 classes). In
            training mode the forward then returns the list of outputs (see :meth:`RoiCheckedDynUNet.forward`);
            in evaluation mode only the full-resolution logits. Defaults to False.
        kwargs: any other keyword of MONAI's ``DynUNet`` (e.g. ``norm_name``, ``dropout``, ``deep_supr_num``).

    Example::

        net = build_nnunet(1, 16, img_size=96, deep_supervision=True)
        outputs = net.train()(torch.rand(1, 1, 96, 96, 96))    # 5 tensors: 96^3, 48^3, 24^3, 12^3, 6^3
        logits = net.eval()(torch.rand(1, 1, 96, 96, 96))      # one tensor, 96^3
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("out_channels", out_channels)
    check_positive_int("base_filters", base_filters)
    check_positive_int("max_filters", max_filters)
    roi = _roi_tuple(img_size)
    kernels, strides = plan_nnunet_topology(roi, spacing, min_feature_map_size)
    divisors = _total_strides(strides, len(roi))
    if len(strides) < 3 or any(s % d for s, d in zip(roi, divisors)):
        fix = " ".join(map(str, _planned_roi(roi, spacing, min_feature_map_size)))
        why = (
            "is too small for nnU-Net's plan (at least two poolings)"
            if len(strides) < 3
            else f"is not a multiple of its plan's total stride {divisors}"
        )
        raise ValueError(f"nnUNet: ROI {roi} {why}; use e.g. --roi {fix}.")
    filters = [min(base_filters * 2**i, max_filters) for i in range(len(strides))]
    return RoiCheckedDynUNet(
        spatial_dims=len(roi),
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=filters,
        res_block=res_block,
        deep_supervision=bool(deep_supervision),
        # every decoder resolution below the full one (MONAI's maximum): nnU-Net supervises them all
        deep_supr_num=kwargs.pop("deep_supr_num", len(strides) - 2),
        img_size=roi,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------
# 3D U-Net (MONAI UNet)


class RoiCheckedUNet(_StrideChecked, UNet):
    """MONAI's :class:`~monai.networks.nets.UNet` whose forward first checks that every spatial size is a
    multiple of its total stride and leaves more than one bottleneck voxel."""

    _label = "UNet3D"

    def _input_divisors(self) -> Any:
        return _total_strides(self.strides, self.dimensions)


def build_unet3d(
    in_channels: int,
    out_channels: int,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    num_res_units: int = 2,
    norm: str | tuple = "instance",
    **kwargs: Any,
) -> RoiCheckedUNet:
    """The 3D U-Net of the paper's table (4.81M parameters) as MONAI's residual ``UNet``.

    The configuration of MONAI's 3-D UNet tutorials: five levels of 16, 32, 64, 128, 256 channels,
    stride 2, two residual units per level, instance norm, PReLU: 4.810M parameters at 5 classes (the
    3D UX-Net paper's FLARE setting, where the 4.81M comes from), 4.825M at 16 classes. Inputs must be
    multiples of 16.

    "3D U-Net: Learning Dense Volumetric Segmentation from Sparse Annotation", Cicek et al., MICCAI 2016
    (the residual units follow Kerfoot et al., 2018, as MONAI's UNet does).

    Args:
        in_channels: input channels.
        out_channels: output classes, background included.
        channels: channels per level. Defaults to (16, 32, 64, 128, 256).
        strides: downsampling between levels (one fewer than ``channels``). Defaults to (2, 2, 2, 2).
        num_res_units: residual units per level. Defaults to 2.
        norm: normalisation. Defaults to "instance" (MONAI's).
        kwargs: any other keyword of MONAI's ``UNet`` (e.g. ``dropout``, ``act``).
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("out_channels", out_channels)
    if len(strides) != len(channels) - 1:
        raise ValueError(f"UNet3D needs one stride fewer than channels, got channels={tuple(channels)} and strides={tuple(strides)}.")
    return RoiCheckedUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        norm=norm,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------
# MedNeXt


#: MedNeXt variants (Roy et al., MICCAI 2023, Table 1; MONAI's MedNeXtS/B/M/L): expansion ratios per
#: encoder stage, per decoder stage and at the bottleneck, and blocks per encoder stage, at the
#: bottleneck and per decoder stage.
MEDNEXT_VARIANTS: dict[str, dict[str, Any]] = {
    "S": dict(encoder_expansion_ratio=2, decoder_expansion_ratio=2, bottleneck_expansion_ratio=2,
              blocks_down=(2, 2, 2, 2), blocks_bottleneck=2, blocks_up=(2, 2, 2, 2)),
    "B": dict(encoder_expansion_ratio=(2, 3, 4, 4), decoder_expansion_ratio=(4, 4, 3, 2), bottleneck_expansion_ratio=4,
              blocks_down=(2, 2, 2, 2), blocks_bottleneck=2, blocks_up=(2, 2, 2, 2)),
    "M": dict(encoder_expansion_ratio=(2, 3, 4, 4), decoder_expansion_ratio=(4, 4, 3, 2), bottleneck_expansion_ratio=4,
              blocks_down=(3, 4, 4, 4), blocks_bottleneck=4, blocks_up=(4, 4, 4, 3)),
    "L": dict(encoder_expansion_ratio=(3, 4, 8, 8), decoder_expansion_ratio=(8, 8, 4, 3), bottleneck_expansion_ratio=8,
              blocks_down=(3, 4, 8, 8), blocks_bottleneck=8, blocks_up=(8, 8, 4, 3)),
}


class RoiCheckedMedNeXt(_StrideChecked, MedNeXt):
    """MONAI's :class:`~monai.networks.nets.MedNeXt` whose forward first checks that every spatial size is a
    multiple of 16 (four 2x downsamplings) and leaves more than one bottleneck voxel."""

    _label = "MedNeXt"

    def _input_divisors(self) -> Any:
        return 2 ** len(self.down_blocks)


def build_mednext(
    in_channels: int,
    out_channels: int,
    variant: str = "B",
    kernel_size: int = 3,
    init_filters: int = 32,
    **kwargs: Any,
) -> RoiCheckedMedNeXt:
    """MedNeXt, MONAI's implementation: variant B with 3^3 kernels by default (10.51M parameters at 16 classes).

    "MedNeXt: Transformer-driven Scaling of ConvNets for Medical Image Segmentation", Roy et al., MICCAI
    2023. Residual up/down-sampling blocks, group norm, no GRN, no deep supervision (plain logits), as
    MONAI's ``MedNeXtS/B/M/L``. Inputs must be multiples of 16. At 16 classes: S 5.55M, B 10.51M,
    M 17.53M, L 61.73M with 3^3 kernels; L with 5^3 kernels (the paper's best) 62.94M.

    Args:
        in_channels: input channels.
        out_channels: output classes, background included.
        variant: ``"S"``, ``"B"`` (default), ``"M"`` or ``"L"`` (:data:`MEDNEXT_VARIANTS`).
        kernel_size: depthwise kernel size of every block (odd). Defaults to 3; the paper also trains 5.
        init_filters: channels of the first stage, doubled per stage. Defaults to 32 (the paper's).
        kwargs: any other keyword of MONAI's ``MedNeXt`` (overriding the variant's), except ``deep_supervision``.
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("out_channels", out_channels)
    check_positive_int("init_filters", init_filters)
    key = str(variant).upper()
    if key not in MEDNEXT_VARIANTS:
        raise ValueError(f"MedNeXt variant must be one of {', '.join(MEDNEXT_VARIANTS)}, got {variant!r}.")
    if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"MedNeXt kernel_size must be a positive odd integer, got {kernel_size!r}; the paper uses 3 or 5.")
    _refuse_deep_supervision(kwargs, "MedNeXt")
    settings = {**MEDNEXT_VARIANTS[key], "use_residual_connection": True, "norm_type": "group", "global_resp_norm": False}
    settings.update(kwargs)
    return RoiCheckedMedNeXt(
        spatial_dims=3,
        init_filters=init_filters,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        deep_supervision=False,
        **settings,
    )

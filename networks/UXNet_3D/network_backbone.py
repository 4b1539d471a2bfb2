"""3D UX-Net: the UX-Net encoder wired to MONAI's UNETR decoder blocks."""

from __future__ import annotations

from typing import Sequence

from ..blocks import UnetrDecoderNet, check_positive_int
from ..Rep3D.lrbm import LRBMConfig
from .uxnet_encoder import UXNetEncoder


class UXNET(UnetrDecoderNet):
    """3D UX-Net segmentation network.

    "3D UX-Net: A Large Kernel Volumetric ConvNet Modernizing Hierarchical Transformer for Medical
    Image Segmentation", Lee et al., ICLR 2023. The state dict has the keys of the authors' release
    (encoder under ``uxnet_3d``), so released checkpoints load with ``strict=True``.

    Args:
        in_channels: input channels. Defaults to 1.
        out_channels: output classes, background included. Defaults to 16 (AMOS-CT).
        depths: blocks per encoder stage. Defaults to (2, 2, 2, 2).
        feature_size: channels per encoder stage. Defaults to (48, 96, 192, 384).
        hidden_size: channels of the bottleneck block (encoder5). Defaults to 768.
        kernel_size: depthwise kernel size (odd). Defaults to 7; the paper's ablation uses 21.
        modulation: ``"none"`` (default, 3D UX-Net as published), ``"lrbm"`` or ``"fixed"`` (the LRBM
            mask on the depthwise kernels while training; fold with :func:`networks.reparameterize_model`).
        deploy: build without masks, to load folded weights. Defaults to False.
        dwconv: depthwise convolution implementation, ``"auto"``, ``"native"`` or ``"fft"``.
        norm_name: decoder normalisation. Defaults to "instance".
        res_block: residual decoder blocks. Defaults to True.
        layer_scale_init_value: initial layer scale of the encoder blocks (0 for none). Defaults to 1e-6.
        drop_path_rate: encoder stochastic depth (largest rate). Defaults to 0.
        beta, generator_kernel_size, generator_depth: LRBM settings (1, 7, 2), used when modulation is not "none".

    The kernel settings (``kernel_size``, ``modulation``, ``deploy``, ``dwconv`` and the three LRBM ones)
    become one frozen :class:`~networks.Rep3D.lrbm.LRBMConfig`, ``self.lrbm_config``, shared by every
    encoder block. Input spatial sizes must be multiples of 16.

    Example::

        net = UXNET(in_channels=1, out_channels=16)
        logits = net(torch.randn(1, 1, 96, 96, 96))   # (1, 16, 96, 96, 96)
    """

    encoder_attr = "uxnet_3d"
    network_name = "3DUXNET"

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 16,
        depths: Sequence[int] = (2, 2, 2, 2),
        feature_size: Sequence[int] = (48, 96, 192, 384),
        hidden_size: int = 768,
        kernel_size: int = 7,
        modulation: str = "none",
        deploy: bool = False,
        dwconv: str = "auto",
        norm_name: str | tuple = "instance",
        res_block: bool = True,
        layer_scale_init_value: float = 1e-6,
        drop_path_rate: float = 0.0,
        beta: float = 1.0,
        generator_kernel_size: int = 7,
        generator_depth: int = 2,
    ) -> None:
        super().__init__()
        check_positive_int("out_channels", out_channels)
        check_positive_int("hidden_size", hidden_size)
        self.lrbm_config = LRBMConfig(
            kernel_size=kernel_size,
            modulation=modulation,
            beta=beta,
            generator_kernel_size=generator_kernel_size,
            generator_depth=generator_depth,
            deploy=deploy,
            dwconv=dwconv,
        )
        self.uxnet_3d = UXNetEncoder(
            in_channels,
            depths,
            feature_size,
            self.lrbm_config,
            layer_scale_init_value=layer_scale_init_value,
            drop_path_rate=drop_path_rate,
        )
        self._build_decoder(in_channels, out_channels, feature_size, hidden_size, norm_name, res_block)

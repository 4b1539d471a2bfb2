"""REP3D: the Rep3D encoder wired to MONAI's UNETR decoder blocks (as in 3D UX-Net)."""

from __future__ import annotations

from typing import Sequence

from ..blocks import UnetrDecoderNet, check_positive_int
from .lrbm import LRBMConfig
from .rep3d_encoder import Rep3DEncoder


class REP3D(UnetrDecoderNet):
    """REP3D segmentation network.

    "Spatially-Adaptive Gradient Re-parameterization for 3D Large Kernel Optimization",
    Lee et al., ICML 2026.

    Args:
        in_channels: input channels. Defaults to 1.
        out_channels: output classes, background included. Defaults to 16 (AMOS-CT).
        depths: blocks per encoder stage. Defaults to (2, 2, 2, 2).
        feature_size: channels per encoder stage. Defaults to (48, 96, 192, 384).
        hidden_size: channels of the bottleneck block (encoder5). Defaults to 768.
        kernel_size: depthwise kernel size (odd). Defaults to 21.
        modulation: ``"lrbm"`` (default), ``"fixed"`` or ``"none"``.
        deploy: build the folded inference form (plain DWConv -> BN -> GELU blocks). Defaults to False.
        dwconv: depthwise convolution implementation, ``"auto"``, ``"native"`` or ``"fft"``.
        norm_name: decoder normalisation. Defaults to "instance".
        res_block: residual decoder blocks. Defaults to True.
        beta: decay scale of the distance prior. Defaults to 1.
        generator_kernel_size: kernel size of the LRBM generator's convolutions. Defaults to 7.
        generator_depth: number of generator convolutions. Defaults to 2.

    The seven kernel settings (``kernel_size`` to ``generator_depth``, without the decoder's) become one
    frozen :class:`~networks.Rep3D.lrbm.LRBMConfig`, ``self.lrbm_config``, shared by every encoder block.
    Input spatial sizes must be multiples of 16.

    Example::

        net = REP3D(in_channels=1, out_channels=16)            # train this
        deployed = networks.reparameterize_model(net.eval())  # then infer with this
    """

    encoder_attr = "rep3d"
    network_name = "REP3D"

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 16,
        depths: Sequence[int] = (2, 2, 2, 2),
        feature_size: Sequence[int] = (48, 96, 192, 384),
        hidden_size: int = 768,
        kernel_size: int = 21,
        modulation: str = "lrbm",
        deploy: bool = False,
        dwconv: str = "auto",
        norm_name: str | tuple = "instance",
        res_block: bool = True,
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
        self.rep3d = Rep3DEncoder(in_channels, depths, feature_size, self.lrbm_config)
        self._build_decoder(in_channels, out_channels, feature_size, hidden_size, norm_name, res_block)

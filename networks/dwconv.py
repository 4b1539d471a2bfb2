"""Depthwise 3-D convolution with a selectable implementation.

Large depthwise kernels (21^3) are where REP3D and the 3D UX-Net variants spend their time, so every
such convolution in this package goes through :class:`DepthwiseConv3d`, whose ``impl`` picks how the
convolution is computed:

* ``"native"``: ``torch.nn.functional.conv3d`` with ``groups=C``.
* ``"fft"``: an exact FFT convolution (see :func:`fft_depthwise_conv3d`).
* ``"auto"``: chosen per shape and device.

All implementations compute the same function: stride 1, zero 'same' padding of ``K // 2``, odd ``K``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DWCONV_IMPLS = ("auto", "native", "fft")


def check_impl(impl: str) -> str:
    if impl not in DWCONV_IMPLS:
        raise ValueError(f"dwconv implementation must be one of {DWCONV_IMPLS}, got {impl!r}.")
    return impl


def native_depthwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference depthwise convolution: ``F.conv3d`` with ``groups = channels`` and 'same' padding."""
    k = weight.shape[-3:]
    return F.conv3d(x, weight, bias, padding=(k[0] // 2, k[1] // 2, k[2] // 2), groups=x.shape[1])


def depthwise_conv3d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, impl: str = "auto"
) -> torch.Tensor:
    """Depthwise 'same' convolution of ``x`` (N, C, D, H, W) with ``weight`` (C, 1, K, K, K).

    Args:
        x: input volume batch.
        weight: one kernel per channel.
        bias: optional per-channel bias.
        impl: ``"native"``, ``"fft"`` or ``"auto"``.
    """
    check_impl(impl)
    if impl == "native":
        return native_depthwise_conv3d(x, weight, bias)
    from . import fftconv  # local import: the FFT path is optional for the native one

    if impl == "auto" and not fftconv.fft_is_faster(x, weight):
        return native_depthwise_conv3d(x, weight, bias)
    return fftconv.fft_depthwise_conv3d(x, weight, bias)


class DepthwiseConv3d(nn.Conv3d):
    """``nn.Conv3d(C, C, K, padding=K // 2, groups=C)`` whose forward goes through :func:`depthwise_conv3d`.

    It keeps ``nn.Conv3d``'s parameter names (``weight``, ``bias``) so that checkpoints of the reference
    releases load unchanged. ``forward(x, weight)`` convolves with a given kernel instead of
    ``self.weight``: that is how a modulated kernel ``W * M`` is applied without re-binding the parameter.

    Args:
        channels: number of input and output channels.
        kernel_size: odd kernel size K.
        bias: whether the convolution has a per-channel bias. Defaults to False.
        impl: ``"auto"`` (default), ``"native"`` or ``"fft"``.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = False, impl: str = "auto") -> None:
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for a 'same' depthwise convolution, got {kernel_size}.")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)
        self.impl = check_impl(impl)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        w = self.weight if weight is None else weight
        return depthwise_conv3d(x, w, self.bias, self.impl)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", impl={self.impl}"


def set_dwconv_impl(model: nn.Module, impl: str) -> nn.Module:
    """Set the implementation of every :class:`DepthwiseConv3d` in ``model`` (in place); returns ``model``."""
    check_impl(impl)
    for m in model.modules():
        if isinstance(m, DepthwiseConv3d):
            m.impl = impl
    return model

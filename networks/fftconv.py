"""Exact FFT depthwise 3-D convolution (placeholder: the FFT path lands with issue 7)."""

from __future__ import annotations

import torch


def fft_is_faster(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the FFT path should be taken for this shape and device under ``impl="auto"``."""
    return False


def fft_depthwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    raise NotImplementedError("the FFT depthwise convolution is not implemented yet; use dwconv='native'.")

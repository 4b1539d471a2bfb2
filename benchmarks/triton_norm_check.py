"""The Triton instance norm (networks/triton_norm.py) against float64 ``nn.InstanceNorm3d``, forward and
backward, at shapes that exercise its tiling and merging: on a GPU, or on the CPU in Triton's interpreter.

    python3 -m benchmarks.triton_norm_check                      # CUDA
    TRITON_INTERPRET=1 python3 -m benchmarks.triton_norm_check   # CPU (Triton 3.6's interpreter wants numpy < 2.3)

Prints each case's largest error relative to the reference's largest value (output, input gradient, and
weight / bias gradients when affine) and exits 1 if one is above the tolerance (1e-4 in float32, where |mean| / std up to 60 costs (x - mean) about
60 float32 ulps of the std; 1e-2 in bf16, the output's own rounding).
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from networks.triton_norm import TritonInstanceNorm

CASES = [
    ((1, 32, 61, 41, 31), False, torch.float32),  # several tiles a program, several merge chunks
    ((2, 768, 3, 3, 3), True, torch.float32),  # wide channels: one row a tile
    ((2, 5, 6, 7, 8), True, torch.float32),
    ((3, 48, 9, 10, 11), False, torch.float32),
    ((1, 20, 70, 8, 9), True, torch.bfloat16),
    ((2, 3, 5, 5, 5), True, torch.float32),
]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-2


def case_errors(shape, affine: bool, dtype: torch.dtype, device: str) -> list[float]:
    """Largest errors of the Triton norm against float64, relative to the reference's largest value:
    output, input gradient, and (affine) weight and bias gradients."""
    torch.manual_seed(0)
    mean = 30 * torch.rand(shape[1], device=device).view(1, -1, 1, 1, 1)  # |mean| / std up to 60
    x = (torch.randn(shape, device=device) * 0.5 + mean).to(dtype).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    g = torch.randn(shape, device=device).to(dtype)
    w = (torch.rand(shape[1], device=device) + 0.5).requires_grad_() if affine else None
    b = torch.randn(shape[1], device=device).requires_grad_() if affine else None
    y = TritonInstanceNorm.apply(x, w, b, 1e-5)
    y.backward(g)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and y.dtype == dtype
    ref = nn.InstanceNorm3d(shape[1], affine=affine).to(device).double()
    if affine:
        with torch.no_grad():
            ref.weight.copy_(w), ref.bias.copy_(b)
    x_ref = x.detach().double().requires_grad_()
    y_ref = ref(x_ref)
    y_ref.backward(g.double())
    pairs = [(y, y_ref), (x.grad, x_ref.grad)] + ([(w.grad, ref.weight.grad), (b.grad, ref.bias.grad)] if affine else [])
    return [float((a.detach().double() - r.detach()).abs().max() / r.detach().abs().max()) for a, r in pairs]


def main() -> int:
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    all_ok = True
    for shape, affine, dtype in CASES:
        errors = case_errors(shape, affine, dtype, device)
        ok = max(errors) <= tolerance(dtype)
        all_ok &= ok
        print(f"{shape} {str(dtype):14s} affine={affine!s:5s} errors {' '.join(f'{e:.1e}' for e in errors)} {'ok' if ok else 'TOO LARGE'}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

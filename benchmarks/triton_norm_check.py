"""The Triton instance norm (networks/triton_norm.py) against float64 ``nn.InstanceNorm3d``, forward and
backward, at shapes that exercise its tiling and merging: on a GPU, or on the CPU in Triton's interpreter.

    python3 -m benchmarks.triton_norm_check                      # CUDA
    TRITON_INTERPRET=1 python3 -m benchmarks.triton_norm_check   # CPU (Triton 3.6's interpreter wants numpy < 2.3)
    python3 -m benchmarks.triton_norm_check --tune               # CUDA: time the launch settings

Prints each case's largest error relative to the reference's largest value (output, input gradient, and
weight / bias gradients when affine) and exits 1 if one is above the tolerance (1e-4 in float32, where |mean| / std up to 60 costs (x - mean) about
60 float32 ulps of the std; 1e-2 in bf16, the output's own rounding).
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

import torch.nn.functional as F

from networks.triton_norm import TritonInstanceNorm, fused_norm, layer_norm_channels_first

CASES = [
    ((1, 32, 61, 41, 31), False, torch.float32),  # several tiles a program, several merge chunks
    ((2, 768, 3, 3, 3), True, torch.float32),  # wide channels: one row a tile
    ((2, 5, 6, 7, 8), True, torch.float32),
    ((3, 48, 9, 10, 11), False, torch.float32),
    ((1, 20, 70, 8, 9), True, torch.bfloat16),
    ((2, 3, 5, 5, 5), True, torch.float32),
]
#: the fused tails of MONAI's decoder blocks: (shape, affine, dtype, mode), mode "act" = norm + LeakyReLU,
#: "res" = norm + residual + LeakyReLU, "two" = norm(a) + norm(b) + LeakyReLU
FUSED_CASES = [
    ((2, 48, 9, 10, 11), False, torch.float32, "act"),
    ((1, 24, 33, 17, 20), False, torch.float32, "res"),
    ((2, 96, 6, 7, 5), False, torch.float32, "two"),
    ((2, 7, 5, 6, 7), True, torch.float32, "two"),
    ((1, 20, 30, 8, 9), True, torch.bfloat16, "res"),
    ((2, 16, 12, 12, 12), False, torch.bfloat16, "two"),
]
SLOPE = 0.01
#: the encoders' channels-first LayerNorm: (shape, input dtype, output dtype)
LN_CASES = [
    ((2, 48, 9, 10, 11), torch.float32, torch.float32),
    ((1, 384, 3, 3, 3), torch.bfloat16, torch.float32),  # wide channels, autocast's float32 output
    ((2, 5, 17, 6, 7), torch.float32, torch.float32),
]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-2


def _input(shape, dtype, device, offset):
    torch.manual_seed(offset)
    mean = 30 * torch.rand(shape[1], device=device).view(1, -1, 1, 1, 1)  # |mean| / std up to 60
    return (torch.randn(shape, device=device) * 0.5 + mean).to(dtype).contiguous(memory_format=torch.channels_last_3d).requires_grad_()


def _params(c, affine, device, seed):
    torch.manual_seed(seed)
    if not affine:
        return None, None
    return (torch.rand(c, device=device) + 0.5).requires_grad_(), torch.randn(c, device=device).requires_grad_()


def _errors(ours, refs) -> list[float]:
    return [float((a.detach().double() - r.detach()).abs().max() / r.detach().abs().max()) for a, r in zip(ours, refs)]


def fused_case_errors(shape, affine: bool, dtype: torch.dtype, mode: str, device: str) -> list[float]:
    """Largest errors of :func:`fused_norm` against float64 PyTorch ops (``F.instance_norm``, the add,
    the LeakyReLU), relative to the reference's largest value: output, then every input's gradient."""
    a, b = _input(shape, dtype, device, 0), _input(shape, dtype, device, 1)
    r = (torch.randn(shape, device=device) * 2).to(dtype).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    wa, ba = _params(shape[1], affine, device, 2)
    wb, bb = _params(shape[1], affine, device, 3)
    g = torch.randn(shape, device=device).to(dtype)
    kw = {"two": dict(b=b, weight_b=wb, bias_b=bb), "res": dict(residual=r), "act": {}}[mode]
    y = fused_norm(a, wa, ba, **kw, slope=SLOPE)
    y.backward(g)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and y.dtype == dtype
    leaves = [t for t in (a, wa, ba) if t is not None] + [t for t in kw.values() if t is not None]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    d = dict(zip(map(id, leaves), refs))
    dd = lambda t: None if t is None else d[id(t)]  # noqa: E731
    z = F.instance_norm(dd(a), weight=dd(wa), bias=dd(ba), eps=1e-5)
    if mode == "two":
        z = z + F.instance_norm(dd(b), weight=dd(wb), bias=dd(bb), eps=1e-5)
    if mode == "res":
        z = z + dd(r)
    # LeakyReLU with the mask of our output: where z is within rounding of 0, either side is right, and
    # one flipped element would read as an error of |g| (1 - slope)
    y_ref = torch.where((y.detach() > 0).contiguous(), z, z * SLOPE)  # (a channels-last mask: wrong CPU backward, torch 2.13)
    y_ref.backward(g.double())
    return _errors([y] + [t.grad for t in leaves], [y_ref] + [t.grad for t in refs])


def layer_norm_errors(shape, dtype: torch.dtype, out_dtype: torch.dtype, device: str) -> list[float]:
    """Largest errors of :func:`layer_norm_channels_first` against float64 ``F.layer_norm`` over the
    channels, relative to the reference's largest value: output, input, weight and bias gradients."""
    x = _input(shape, dtype, device, 0).detach().contiguous().requires_grad_()
    w, b = _params(shape[1], True, device, 2)
    torch.manual_seed(1)
    g = torch.randn(shape, device=device, dtype=out_dtype)
    y = layer_norm_channels_first(x, w, b, 1e-6, out_dtype)
    y.backward(g)
    assert y.dtype == out_dtype and y.is_contiguous()
    refs = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y_ref = F.layer_norm(refs[0].movedim(1, -1), (shape[1],), refs[1], refs[2], 1e-6).movedim(-1, 1)
    y_ref.backward(g.double())
    return _errors([y, x.grad, w.grad, b.grad], [y_ref] + [t.grad for t in refs])


def case_errors(shape, affine: bool, dtype: torch.dtype, device: str) -> list[float]:
    """Largest errors of the Triton norm against float64, relative to the reference's largest value:
    output, input gradient, and (affine) weight and bias gradients."""
    x = _input(shape, dtype, device, 0)
    torch.manual_seed(1)
    g = torch.randn(shape, device=device).to(dtype)
    w, b = _params(shape[1], affine, device, 2)
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
    return _errors(*zip(*pairs))


#: (shape, mode) the launch settings are timed on: the decoder's full-resolution tails in training (batch
#: 2) and in a deploy window batch (4), and a half-resolution one
TUNE_SHAPES = [((2, 48, 96, 96, 96), "two"), ((4, 48, 96, 96, 96), "act"), ((2, 96, 48, 48, 48), "two")]
#: each alternative changes one setting of networks.triton_norm.CONFIG
TUNE_CHOICES = {"reduce_tile": (512, 2048), "reduce_warps": (2, 8), "programs": (1024, 4096), "tile": (2048, 8192), "warps": (8,), "merge_rows": (64,)}


def tune(reps: int = 20) -> None:
    """Median forward and forward + backward times (CUDA events) of :func:`fused_norm` in bf16 with the
    default :data:`CONFIG` and with each alternative of :data:`TUNE_CHOICES`."""
    from benchmarks.step_profile import fwd_and_fwd_bwd
    from networks import triton_norm

    default = dict(triton_norm.CONFIG)
    configs = [("default", {})] + [(f"{k}={v}", {k: v}) for k, choices in TUNE_CHOICES.items() for v in choices]
    for shape, mode in TUNE_SHAPES:
        a, b = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d).requires_grad_() for _ in range(2))
        g = torch.randn_like(a)
        kw = {"b": b} if mode == "two" else {}
        gb = a.numel() * a.element_size() / 1e9
        for label, change in configs:
            triton_norm.CONFIG.update(default, **change)
            f, fb = fwd_and_fwd_bwd(lambda: fused_norm(a, **kw, slope=SLOPE), g, a.device, reps)
            print(f"tune {mode} {shape} {label:18s} forward {f['median_ms']:.3f} ms, forward + backward {fb['median_ms']:.3f} ms ({gb:.3f} GB a tensor)", flush=True)
    triton_norm.CONFIG.update(default)


def main() -> int:
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    if "--tune" in sys.argv[1:]:
        tune()
        return 0
    all_ok = True
    for shape, affine, dtype in CASES:
        errors = case_errors(shape, affine, dtype, device)
        ok = max(errors) <= tolerance(dtype)
        all_ok &= ok
        print(f"{shape} {str(dtype):14s} affine={affine!s:5s} errors {' '.join(f'{e:.1e}' for e in errors)} {'ok' if ok else 'TOO LARGE'}")
    for shape, affine, dtype, mode in FUSED_CASES:
        errors = fused_case_errors(shape, affine, dtype, mode, device)
        ok = max(errors) <= tolerance(dtype)
        all_ok &= ok
        print(f"fused {mode:4s} {shape} {str(dtype):14s} affine={affine!s:5s} errors {' '.join(f'{e:.1e}' for e in errors)} {'ok' if ok else 'TOO LARGE'}")
    for shape, dtype, out_dtype in LN_CASES:
        errors = layer_norm_errors(shape, dtype, out_dtype, device)
        ok = max(errors) <= tolerance(dtype)
        all_ok &= ok
        print(f"layer norm {shape} {str(dtype):14s} -> {str(out_dtype):14s} errors {' '.join(f'{e:.1e}' for e in errors)} {'ok' if ok else 'TOO LARGE'}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Exact depthwise 3-D 'same' convolution through the FFT.

A depthwise cross-correlation with an odd K^3 kernel and zero padding K // 2 is, on a zero-padded
grid of length L >= N + K // 2 per axis, exactly a circular convolution: no wrapped-around term can
reach an output voxel. So with ``h[j] = w[K // 2 - j]`` placed at index ``j mod L``,

    out = crop_N( irfftn( rfftn(x, L) * rfftn(h, L) ) )

and the two gradients are the adjoints, computed the same way:

    grad_x = crop_N( irfftn( rfftn(g, L) * conj(H) ) )          (a correlation with h)
    grad_h = irfftn( sum_batch conj(X) * rfftn(g, L) )          (gathered back to the K^3 taps)

Cost per axis is O(L log L) whatever K, against O(N K) for the direct convolution: a 21^3 kernel on
a 48^3 volume is ~60x cheaper. Where the kernel is wider than the volume can reach (K > 2N - 1,
e.g. 21^3 on the 6^3 last stage of a 96^3 crop), the unreachable taps multiply only padding zeros:
they are cropped first (their gradient is zero) and the FFT is sized for the reachable 2N - 1.

Precision: the transforms run in float32 (float64 for float64 inputs) with autocast disabled,
because cuFFT's half precision handles only power-of-two sizes and its fp16 overflows on volumes
of this size. The result is returned in the dtype that ``F.conv3d`` would give: the autocast dtype
when autocast is on for the input's device, else the input's dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "FFTPlan",
    "fft_depthwise_conv3d",
    "fft_is_faster",
    "fft_kernel_spectrum",
    "fft_plan",
    "next_fast_len",
]

# cuFFT and pocketfft (the CPU backend) both have fast radix kernels for these primes.
_FAST_PRIMES = (2, 3, 5, 7)


@functools.lru_cache(maxsize=None)
def next_fast_len(n: int, even: bool = False) -> int:
    """Smallest integer >= ``n`` whose prime factors are all in {2, 3, 5, 7} (even if ``even``).

    Args:
        n: minimum length (positive).
        even: also require an even length; used for the last (half-spectrum) axis of ``rfftn``,
            where odd lengths fall back to slower code paths.
    """
    if n < 1:
        raise ValueError(f"FFT length must be positive, got {n}.")
    m = n
    while True:
        if not (even and m % 2):
            r = m
            for p in _FAST_PRIMES:
                while r % p == 0:
                    r //= p
            if r == 1:
                return m
        m += 1


class FFTPlan(tuple):
    """(fft_shape, crop) for one input size and kernel size: see :func:`fft_plan`."""

    @property
    def fft_shape(self) -> tuple[int, int, int]:
        return self[0]

    @property
    def kernel_crop(self) -> tuple[int, int, int]:
        """Per-axis number of kernel taps cut off each side (unreachable from the volume)."""
        return self[1]


@functools.lru_cache(maxsize=1024)
def fft_plan(spatial_size: Sequence[int], kernel_size: Sequence[int]) -> FFTPlan:
    """FFT grid and kernel crop for an exact 'same' depthwise convolution.

    Args:
        spatial_size: (D, H, W) of the input volume.
        kernel_size: (Kd, Kh, Kw), each odd.

    Returns:
        An :class:`FFTPlan`: per axis L = next_fast_len(N + p) with p = min(K // 2, N - 1) the reachable
        half-width, and the crop (K // 2 - p) applied to each side of the kernel.
    """
    shape, crop = [], []
    for i, (n, k) in enumerate(zip(spatial_size, kernel_size)):
        half = k // 2
        reach = min(half, n - 1)  # offsets beyond n - 1 only ever meet the zero padding
        shape.append(next_fast_len(n + reach, even=(i == 2)))
        crop.append(half - reach)
    return FFTPlan((tuple(shape), tuple(crop)))


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


_TAPS: dict = {}


def _taps(k: Sequence[int], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Flat grid position of each kernel tap, (K0 * K1 * K2,) int64, cached per device.

    Tap k sits at (K // 2 - k) mod L on each axis: the kernel flipped and centred at index 0, which
    turns the cross-correlation into a circular convolution. One cached index makes placing the
    kernel (forward) and gathering its gradient (backward) one kernel launch each.
    """
    if torch.compiler.is_compiling():
        # Inside a torch.compile graph the index is a traced constant; storing it in a global cache
        # would be a side effect that the compiler refuses.
        return _tap_index(k, shape, device)
    key = (tuple(k), tuple(shape), device)
    idx = _TAPS.get(key)
    if idx is None:
        idx = _TAPS[key] = _tap_index(k, shape, device)
    return idx


def _tap_index(k: Sequence[int], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    i0, i1, i2 = ((kk // 2 - torch.arange(kk, dtype=torch.int64, device=device)) % ll for kk, ll in zip(k, shape))
    return ((i0[:, None, None] * shape[1] + i1[None, :, None]) * shape[2] + i2[None, None, :]).reshape(-1)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 5:
        raise ValueError(f"fft_depthwise_conv3d expects x of shape (N, C, D, H, W), got {tuple(x.shape)}.")
    c = x.shape[1]
    if weight.dim() != 5 or weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(
            f"fft_depthwise_conv3d expects a depthwise weight of shape ({c}, 1, K, K, K) for {c} channels, "
            f"got {tuple(weight.shape)}."
        )
    if any(k % 2 == 0 for k in weight.shape[2:]):
        raise ValueError(f"kernel sizes must be odd for a 'same' convolution, got {tuple(weight.shape[2:])}.")


def _crop_kernel(weight: torch.Tensor, crop: Sequence[int]) -> torch.Tensor:
    if not any(crop):
        return weight
    c0, c1, c2 = crop
    k0, k1, k2 = weight.shape[2:]
    return weight[:, :, c0 : k0 - c0, c1 : k1 - c1, c2 : k2 - c2]


def _spectrum(weight: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """rfftn of the flipped, centred kernel h on the FFT grid: (C, L0, L1, L2 // 2 + 1), complex."""
    c = weight.shape[0]
    h = weight.new_zeros((c, math.prod(shape)))
    h.index_copy_(1, _taps(weight.shape[2:], shape, weight.device), weight.reshape(c, -1))
    return torch.fft.rfftn(h.view(c, *shape), s=tuple(shape), dim=(-3, -2, -1))


def fft_kernel_spectrum(weight: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """The kernel spectrum that :func:`fft_depthwise_conv3d` would compute for this input size.

    Computed once and passed back as ``kernel_spectrum`` it saves one FFT of the kernel per call; this
    is what :class:`networks.dwconv.DepthwiseConv3d` caches in inference. Not differentiable.

    Args:
        weight: (C, 1, K, K, K) depthwise kernel.
        spatial_size: (D, H, W) of the inputs it will be applied to.
    """
    plan = fft_plan(tuple(int(s) for s in spatial_size), tuple(weight.shape[2:]))
    with torch.no_grad(), torch.autocast(device_type=weight.device.type, enabled=False):
        w = _crop_kernel(weight, plan.kernel_crop)
        return _spectrum(w.to(_compute_dtype(weight)), plan.fft_shape)


class _FFTDepthwiseConv3d(torch.autograd.Function):
    """x (B, C, N...) real and w (C, 1, K...) real (already cropped) of one float dtype, or w None and the
    kernel spectrum given; returns (B, C, N...) as a view of the L^3 result."""

    @staticmethod
    def forward(ctx, x, weight, shape, spectrum):  # type: ignore[override]
        n = x.shape[2:]
        dims = (-3, -2, -1)
        xf = torch.fft.rfftn(x, s=shape, dim=dims)
        wf = _spectrum(weight, shape) if spectrum is None else spectrum
        y = torch.fft.irfftn(xf * wf, s=shape, dim=dims)
        ctx.shape, ctx.n = shape, n
        ctx.k = None if weight is None else weight.shape[2:]
        # The two spectra are what backward needs; keeping them saves two FFTs there.
        ctx.save_for_backward(xf if ctx.needs_input_grad[1] else None, wf if ctx.needs_input_grad[0] else None)
        return y[..., : n[0], : n[1], : n[2]]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        xf, wf = ctx.saved_tensors
        shape, n, dims = ctx.shape, ctx.n, (-3, -2, -1)
        gf = torch.fft.rfftn(grad.to(xf.real.dtype if xf is not None else wf.real.dtype), s=shape, dim=dims)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.fft.irfftn(gf * wf.conj(), s=shape, dim=dims)[..., : n[0], : n[1], : n[2]]
        if ctx.needs_input_grad[1]:
            corr = torch.fft.irfftn((gf * xf.conj()).sum(0), s=shape, dim=dims)  # (C, L0, L1, L2)
            taps = _taps(ctx.k, shape, corr.device)
            grad_w = corr.reshape(corr.shape[0], -1).index_select(1, taps).view(corr.shape[0], 1, *ctx.k)
        return grad_x, grad_w, None, None


def fft_depthwise_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    kernel_spectrum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise 'same' cross-correlation (as ``F.conv3d(x, weight, bias, padding=K // 2, groups=C)``) via FFT.

    Exact up to float32 rounding (about 1e-6 relative), differentiable in ``x``, ``weight`` and ``bias``.

    Args:
        x: (B, C, D, H, W) input.
        weight: (C, 1, Kd, Kh, Kw) kernel, odd sizes; may be larger than the volume.
        bias: optional (C,) bias.
        kernel_spectrum: optional precomputed :func:`fft_kernel_spectrum` of ``weight`` for this input
            size (inference only: no gradient reaches ``weight`` through it).

    Returns:
        (B, C, D, H, W), in the autocast dtype when autocast is on for ``x``'s device, else ``x.dtype``.
    """
    _check(x, weight)
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    plan = fft_plan(tuple(x.shape[2:]), tuple(weight.shape[2:]))
    cdt = _compute_dtype(x, weight)
    with torch.autocast(device_type=dev, enabled=False):
        if kernel_spectrum is None:
            w = _crop_kernel(weight, plan.kernel_crop).to(cdt)
        else:
            w = None
            expected = (x.shape[1], *plan.fft_shape[:2], plan.fft_shape[2] // 2 + 1)
            if tuple(kernel_spectrum.shape) != expected:
                raise ValueError(
                    f"kernel_spectrum has shape {tuple(kernel_spectrum.shape)} but this input needs {expected}; "
                    "compute it with fft_kernel_spectrum(weight, x.shape[2:])."
                )
            cdt = kernel_spectrum.real.dtype
        y = _FFTDepthwiseConv3d.apply(x.to(cdt), w, plan.fft_shape, kernel_spectrum)
        # One pass makes the cropped view contiguous, adds the bias and casts.
        if bias is not None:
            y = torch.add(y, bias.to(cdt).view(1, -1, 1, 1, 1))
        return y.to(out_dtype).contiguous()


# --------------------------------------------------------------------------------------------------
# choosing the implementation


def _native_cost(b: int, c: int, n: Sequence[int], k: Sequence[int]) -> float:
    return b * c * math.prod(n) * math.prod(k)


def _fft_cost(b: int, c: int, shape: Sequence[int]) -> float:
    pts = math.prod(shape)
    return b * c * pts * math.log2(pts)


# Ratio of the direct convolution's multiply-adds to the FFT path's "points x log2(points)" above
# which the FFT is taken, per device type (benchmarks/RESULTS.md, sweep section):
# * cuda (H100, torch 2.11, AMP bf16, fwd+bwd GPU kernel time): K=3 has ratio ~1.5 and native wins
#   at every REP3D stage shape; K>=5 has ratio >= 5.9 and the FFT wins at every stage shape (e.g.
#   0.36 vs 1.55 ms at 96@24^3, K=5). The FFT costs ~1.2 ms of CPU launch time per call fwd+bwd,
#   hidden inside a GPU-bound training step but not when timed alone.
# * cpu (2 shared cores, fp32, noisy): the FFT wins from ratio ~2 (K>=5 at 8^3-32^3; K=3 mixed).
_FFT_THRESHOLD = {"cuda": 3.0, "cpu": 2.0}


def fft_is_faster(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``impl="auto"`` should take the FFT path for this input, kernel and device.

    A cost model: direct convolution B*C*N^3*K^3 multiply-adds (with K cropped to the reachable
    2N - 1) against B*C*L^3*log2(L^3) for the transforms, compared with a per-device threshold
    measured on the benchmark shapes.
    """
    if x.dim() != 5 or weight.dim() != 5:
        return False
    n, k = tuple(x.shape[2:]), tuple(weight.shape[2:])
    if any(kk % 2 == 0 for kk in k) or math.prod(k) == 1:
        return False
    plan = fft_plan(n, k)
    k_eff = tuple(kk - 2 * cc for kk, cc in zip(k, plan.kernel_crop))
    b, c = x.shape[0], x.shape[1]
    ratio = _native_cost(b, c, n, k_eff) / _fft_cost(b, c, plan.fft_shape)
    return ratio >= _FFT_THRESHOLD.get(x.device.type, _FFT_THRESHOLD["cuda"])

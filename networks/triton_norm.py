"""Instance norm of channels-last (NDHWC) CUDA tensors as Triton kernels: speed only, opt-in.

What :class:`networks.layout.ChannelsLastInstanceNorm3d` computes (``nn.InstanceNorm3d`` without running
statistics), forward and backward, reading each sample as the contiguous (voxels, C) matrix that NDHWC
memory is. Used when ``networks.layout.instance_norm_impl = "triton"``.

* statistics: each program walks a run of voxels in tiles; a tile's mean and sum of squared deviations are
  computed from the tile itself (two passes in registers) and merged into the program's running ones
  (Chan et al.'s pairwise update), so there is no ``E[x^2] - mean^2`` cancellation; a small kernel merges
  the programs' partial results the same way (three launches a norm forward, three backward);
* normalisation: ``(x - mean) * invstd * weight + bias``, one read and one write;
* backward: the per-(sample, channel) sums of ``dy`` and ``dy * xhat``, then
  ``dx = invstd * weight * (dy - mean(dy) - xhat * mean(dy * xhat))``.

Statistics and arithmetic are float32 whatever the activations' dtype; outputs have the input's dtype.
Measured on an H200 (benchmarks/RESULTS.md, issue 25): the GPU's kernel time of a REP3D training step fell
from about 57 to 53 ms and of a deploy window batch from about 43 to 36 ms, but the step and the inference
came out slower: the GPU waited on the Python side's launches, the partial results being merged then by a
dozen small PyTorch ops per norm. They are merged in a kernel now (unmeasured on a GPU so far), so it is
not the default until it is measured again.

This module imports Triton at the top: :mod:`networks.layout` loads it by name (``importlib``) only when
asked for, so that a network's sources stay free of it (a MONAI bundle, for one, runs PyTorch's kernels).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

__all__ = ["TritonInstanceNorm"]


@triton.jit
def _reduction_program(S, C, rows_per_prog, BLOCK_C: tl.constexpr):
    """A reduction program's sample n, its index p among the sample's programs, the channel lanes, and its
    run of voxels [start, stop)."""
    n = tl.program_id(0)
    p = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    start = p * rows_per_prog
    return n, p, cols, cols < C, start, tl.minimum(start + rows_per_prog, S)


@triton.jit
def _stats_kernel(x_ptr, mean_ptr, m2_ptr, S, C, rows_per_prog, P, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n, p, cols, col_ok, start, stop = _reduction_program(S, C, rows_per_prog, BLOCK_C)
    base = x_ptr + n.to(tl.int64) * S * C
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, rows_per_prog, BLOCK_S):  # the last program's last tiles may be empty (k = 0: no change)
        rows = start + r0 + tl.arange(0, BLOCK_S)
        row_ok = rows < stop
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        v = tl.load(base + offs, mask=ok, other=0.0).to(tl.float32)
        k = tl.sum(row_ok.to(tl.float32), axis=0)
        t_mean = tl.sum(v, axis=0) / tl.maximum(k, 1.0)
        dev = tl.where(ok, v - t_mean[None, :], 0.0)
        t_m2 = tl.sum(dev * dev, axis=0)
        total = count + k
        delta = t_mean - mean
        mean = mean + delta * (k / total)
        m2 = m2 + t_m2 + delta * delta * (count * k / total)
        count = total
    out = (n * P + p) * C + cols
    tl.store(mean_ptr + out, mean, mask=col_ok)
    tl.store(m2_ptr + out, m2, mask=col_ok)


@triton.jit
def _merge_stats_kernel(part_mean_ptr, part_m2_ptr, mean_ptr, invstd_ptr, S, C, rows_per_prog, P, eps, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """A sample's statistics from its programs' (count, mean, M2): the mean first, then
    M2 = sum(M2_p) + sum(count_p (mean_p - mean)^2); every program but the last saw rows_per_prog voxels."""
    n = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        ok = (ps < P)[:, None] & col_ok[None, :]
        count = tl.where(ps < P, tl.minimum(rows_per_prog, S - ps * rows_per_prog), 0).to(tl.float32)
        m = tl.load(part_mean_ptr + (n * P + ps)[:, None] * C + cols[None, :], mask=ok, other=0.0)
        total += tl.sum(m * count[:, None], axis=0)
    mean = total / S
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        ok = (ps < P)[:, None] & col_ok[None, :]
        count = tl.where(ps < P, tl.minimum(rows_per_prog, S - ps * rows_per_prog), 0).to(tl.float32)
        at = (n * P + ps)[:, None] * C + cols[None, :]
        d = tl.load(part_mean_ptr + at, mask=ok, other=0.0) - mean[None, :]
        m2 += tl.sum(tl.where(ok, tl.load(part_m2_ptr + at, mask=ok, other=0.0) + d * d * count[:, None], 0.0), axis=0)
    tl.store(mean_ptr + n * C + cols, mean, mask=col_ok)
    tl.store(invstd_ptr + n * C + cols, 1.0 / tl.sqrt(m2 / S + eps), mask=col_ok)


@triton.jit
def _tile_program(S, C, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """An elementwise program's sample n, the channel lanes, and its tile's mask and element offsets."""
    n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows < S)[:, None] & col_ok[None, :]
    return n, cols, col_ok, ok, n.to(tl.int64) * S * C + rows.to(tl.int64)[:, None] * C + cols[None, :]


@triton.jit
def _normalise_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, S, C, HAS_AFFINE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n, cols, col_ok, ok, offs = _tile_program(S, C, BLOCK_S, BLOCK_C)
    mean = tl.load(mean_ptr + n * C + cols, mask=col_ok, other=0.0)
    scale = tl.load(invstd_ptr + n * C + cols, mask=col_ok, other=0.0)
    if HAS_AFFINE:
        scale = scale * tl.load(w_ptr + cols, mask=col_ok, other=0.0)
    v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = (v - mean[None, :]) * scale[None, :]
    if HAS_AFFINE:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_sums_kernel(g_ptr, x_ptr, mean_ptr, invstd_ptr, sg_ptr, sgx_ptr, S, C, rows_per_prog, P, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n, p, cols, col_ok, start, stop = _reduction_program(S, C, rows_per_prog, BLOCK_C)
    base = n.to(tl.int64) * S * C
    mean = tl.load(mean_ptr + n * C + cols, mask=col_ok, other=0.0)
    invstd = tl.load(invstd_ptr + n * C + cols, mask=col_ok, other=0.0)
    sg = tl.zeros([BLOCK_C], dtype=tl.float32)
    sgx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, rows_per_prog, BLOCK_S):
        rows = start + r0 + tl.arange(0, BLOCK_S)
        ok = (rows < stop)[:, None] & col_ok[None, :]
        offs = base + rows.to(tl.int64)[:, None] * C + cols[None, :]
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        xhat = (tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - mean[None, :]) * invstd[None, :]
        sg += tl.sum(g, axis=0)
        sgx += tl.sum(tl.where(ok, g * xhat, 0.0), axis=0)
    out = (n * P + p) * C + cols
    tl.store(sg_ptr + out, sg, mask=col_ok)
    tl.store(sgx_ptr + out, sgx, mask=col_ok)


@triton.jit
def _merge_grad_kernel(
    part_g_ptr, part_gx_ptr, invstd_ptr, w_ptr, sg_ptr, sgx_ptr, k_ptr, S, C, P,
    HAS_AFFINE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """A sample's sums of dy and dy * xhat over its programs, and k = invstd * weight."""
    n = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    sg = tl.zeros([BLOCK_C], dtype=tl.float32)
    sgx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        ok = (ps < P)[:, None] & col_ok[None, :]
        at = (n * P + ps)[:, None] * C + cols[None, :]
        sg += tl.sum(tl.load(part_g_ptr + at, mask=ok, other=0.0), axis=0)
        sgx += tl.sum(tl.load(part_gx_ptr + at, mask=ok, other=0.0), axis=0)
    k = tl.load(invstd_ptr + n * C + cols, mask=col_ok, other=0.0)
    if HAS_AFFINE:
        k = k * tl.load(w_ptr + cols, mask=col_ok, other=0.0)
    tl.store(sg_ptr + n * C + cols, sg, mask=col_ok)
    tl.store(sgx_ptr + n * C + cols, sgx, mask=col_ok)
    tl.store(k_ptr + n * C + cols, k, mask=col_ok)


@triton.jit
def _grad_input_kernel(g_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, k_ptr, sg_ptr, sgx_ptr, S, C, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n, cols, col_ok, ok, offs = _tile_program(S, C, BLOCK_S, BLOCK_C)
    at = n * C + cols
    mean = tl.load(mean_ptr + at, mask=col_ok, other=0.0)
    invstd = tl.load(invstd_ptr + at, mask=col_ok, other=0.0)
    k = tl.load(k_ptr + at, mask=col_ok, other=0.0)  # invstd * weight
    mg = tl.load(sg_ptr + at, mask=col_ok, other=0.0) / S  # mean of dy
    mgx = tl.load(sgx_ptr + at, mask=col_ok, other=0.0) / S  # mean of dy * xhat
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    xhat = (tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - mean[None, :]) * invstd[None, :]
    dx = k[None, :] * (g - mg[None, :] - xhat * mgx[None, :])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


#: elements of one tile (BLOCK_S x BLOCK_C), and the programs per sample a reduction aims at (times
#: the batch: a few per streaming multiprocessor)
_TILE = 4096
_REDUCE_PROGRAMS = 512


def _blocks(c: int) -> tuple[int, int]:
    """(rows, channel lanes) of a tile: also the partial results a merge program reads at a time."""
    block_c = triton.next_power_of_2(c)
    return max(1, _TILE // block_c), block_c


def _split(n: int, s: int, block_s: int) -> tuple[int, int]:
    """(programs per sample, voxels per program) of a reduction over ``s`` voxels."""
    tiles = triton.cdiv(s, block_s)
    programs = max(1, min(tiles, triton.cdiv(_REDUCE_PROGRAMS, n)))
    rows = triton.cdiv(tiles, programs) * block_s
    return triton.cdiv(s, rows), rows


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (CPU tensors: Triton's interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class TritonInstanceNorm(torch.autograd.Function):
    """``TritonInstanceNorm.apply(x, weight, bias, eps)``: instance norm of a channels-last_3d CUDA tensor
    ``x`` (N, C, D, H, W); ``weight`` and ``bias`` of shape (C,) or both None. Output channels-last_3d."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        with _on(x.device):
            return TritonInstanceNorm._forward(ctx, x, weight, bias, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        with _on(grad_out.device):
            return TritonInstanceNorm._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, x, weight, bias, eps):
        n, c = x.shape[:2]
        s = x[0, 0].numel()
        block_s, block_c = _blocks(c)
        programs, rows = _split(n, s, block_s)
        part_mean = torch.empty(n, programs, c, device=x.device, dtype=torch.float32)
        part_m2 = torch.empty_like(part_mean)
        _stats_kernel[(n, programs)](x, part_mean, part_m2, s, c, rows, programs, BLOCK_S=block_s, BLOCK_C=block_c)
        mean = torch.empty(n, c, device=x.device, dtype=torch.float32)
        invstd = torch.empty_like(mean)
        _merge_stats_kernel[(n,)](part_mean, part_m2, mean, invstd, s, c, rows, programs, eps, BLOCK_P=block_s, BLOCK_C=block_c)
        y = torch.empty_like(x, memory_format=torch.channels_last_3d)
        affine = weight is not None
        w = weight.float().contiguous() if affine else mean
        b = bias.float().contiguous() if affine else mean
        _normalise_kernel[(n, triton.cdiv(s, block_s))](x, y, mean, invstd, w, b, s, c, HAS_AFFINE=affine, BLOCK_S=block_s, BLOCK_C=block_c)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.affine = affine
        return y

    @staticmethod
    def _backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        n, c = x.shape[:2]
        s = x[0, 0].numel()
        g = grad_out.contiguous(memory_format=torch.channels_last_3d)
        block_s, block_c = _blocks(c)
        programs, rows = _split(n, s, block_s)
        part_g = torch.empty(n, programs, c, device=x.device, dtype=torch.float32)
        part_gx = torch.empty_like(part_g)
        _grad_sums_kernel[(n, programs)](g, x, mean, invstd, part_g, part_gx, s, c, rows, programs, BLOCK_S=block_s, BLOCK_C=block_c)
        sum_g, sum_gx, k = (torch.empty_like(mean) for _ in range(3))  # (N, C); k = invstd * weight
        w = weight.float().contiguous() if ctx.affine else mean
        _merge_grad_kernel[(n,)](part_g, part_gx, invstd, w, sum_g, sum_gx, k, s, c, programs, HAS_AFFINE=ctx.affine, BLOCK_P=block_s, BLOCK_C=block_c)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x, memory_format=torch.channels_last_3d)
            _grad_input_kernel[(n, triton.cdiv(s, block_s))](g, x, grad_x, mean, invstd, k, sum_g, sum_gx, s, c, BLOCK_S=block_s, BLOCK_C=block_c)
        if ctx.affine:
            grad_w = sum_gx.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_b = sum_g.sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None

"""Instance norms of channels-last (NDHWC) CUDA tensors as Triton kernels, with the tails of MONAI's decoder
blocks fused into them, and the encoders' channels-first LayerNorm (:func:`layer_norm_channels_first`):
speed only, loaded by :mod:`networks.layout` when asked for.

One autograd function, :func:`fused_norm`, computes

    y = act(norm(a) [+ norm(b)] [+ r])

where ``norm`` is ``nn.InstanceNorm3d`` without running statistics (per sample and channel over D, H, W,
optionally affine), ``act`` an optional LeakyReLU, ``b`` a second normalised input (the residual branch of
``UnetResBlock`` when the width changes: ``norm3(conv3(x))``) and ``r`` a residual added as it is. So that
``conv -> norm -> LeakyReLU`` and ``conv -> norm -> + residual -> LeakyReLU`` each read and write their
activations a minimal number of times: forward, a statistics pass over the normalised inputs and one pass
that writes ``y``; backward, a pass of gradient sums and one that writes the input gradients (the
activation's mask recomputed, or read from ``y``). Each way that is three launches (statistics or sums, a
merge of the programs' partial results, the elementwise pass), whatever the inputs.

* Statistics: every lane of a program's (rows x channels) tile keeps its own Welford mean and M2 over the
  voxels it visits (no reduction across threads inside the loop); the lanes, then the programs, are merged
  with Chan et al.'s pairwise formula. No ``E[x^2] - mean^2`` cancellation: as exact as PyTorch's kernel.
* Arithmetic in float32 whatever the activations' dtype; outputs and gradients in their inputs' dtypes.

Each sample of an NDHWC tensor is a contiguous (voxels, C) matrix: programs tile it as (rows, channels).
The launch settings are :data:`CONFIG` (``benchmarks/triton_norm_check.py --tune`` times alternatives).

This module imports Triton at the top: :mod:`networks.layout` loads it by name (``importlib``) only when
asked for, so that a network's sources stay free of it (a MONAI bundle, for one, runs PyTorch's kernels).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

__all__ = ["CONFIG", "TritonInstanceNorm", "fused_norm", "layer_norm_channels_first"]

#: Launch settings. ``reduce_tile`` / ``tile``: elements of a (rows x channel lanes) tile of the reduction
#: and of the elementwise kernels; ``programs``: reduction programs over the whole batch (a few per
#: streaming multiprocessor, so that enough loads are in flight); ``*_warps``: warps per program.
CONFIG = {"reduce_tile": 1024, "reduce_warps": 4, "programs": 2048, "tile": 4096, "warps": 4, "merge_rows": 256}


@triton.jit
def _lane_welford(x_ptr, base, start, stop, rows_per_prog, C, cols, col_ok, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Mean and M2 per channel of the rows [start, stop) of a (rows, C) matrix at ``x_ptr + base``: per
    lane Welford over the tiles, then the lanes merged (Chan et al.)."""
    cnt = tl.zeros([BLOCK_S], dtype=tl.float32)
    mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, rows_per_prog, BLOCK_S):
        rows = start + r0 + tl.arange(0, BLOCK_S)
        row_ok = rows < stop
        ok = row_ok[:, None] & col_ok[None, :]
        v = tl.load(x_ptr + base + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        cnt += row_ok.to(tl.float32)
        inv = 1.0 / tl.maximum(cnt, 1.0)
        d = v - mean
        mean += tl.where(ok, d * inv[:, None], 0.0)
        m2 += tl.where(ok, d * (v - mean), 0.0)
    total = tl.maximum(tl.sum(cnt, axis=0), 1.0)
    p_mean = tl.sum(mean * cnt[:, None], axis=0) / total
    dev = mean - p_mean[None, :]
    p_m2 = tl.sum(m2 + dev * dev * cnt[:, None], axis=0)
    return p_mean, p_m2


@triton.jit
def _reduction_program(S, C, rows_per_prog, BLOCK_C: tl.constexpr):
    """A reduction program's sample n (program axis 0), its index p among the sample's programs (axis 1),
    the channel lanes, its run of voxels [start, stop) and the sample's element offset."""
    n = tl.program_id(0)
    p = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    start = p * rows_per_prog
    return n, p, cols, cols < C, start, tl.minimum(start + rows_per_prog, S), n.to(tl.int64) * S * C


@triton.jit
def _stats_kernel(a_ptr, b_ptr, part_ptr, S, C, N, rows_per_prog, P, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (N, P, K): program p of sample n of normalised input k (a, then b) writes its voxels' mean and
    M2 into part[0 / 1, k, n, p, :]."""
    n, p, cols, col_ok, start, stop, base = _reduction_program(S, C, rows_per_prog, BLOCK_C)
    k = tl.program_id(2)
    if k == 0:
        p_mean, p_m2 = _lane_welford(a_ptr, base, start, stop, rows_per_prog, C, cols, col_ok, BLOCK_S, BLOCK_C)
    else:
        p_mean, p_m2 = _lane_welford(b_ptr, base, start, stop, rows_per_prog, C, cols, col_ok, BLOCK_S, BLOCK_C)
    K = tl.num_programs(2)
    out = ((k * N + n) * P + p).to(tl.int64) * C + cols
    tl.store(part_ptr + out, p_mean, mask=col_ok)
    tl.store(part_ptr + K * N * P * C + out, p_m2, mask=col_ok)


@triton.jit
def _merge_stats_kernel(
    part_ptr, w_ptr, b_ptr, stat_ptr, S, C, N, rows_per_prog, P, eps,
    HAS_AFFINE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (K * N, channel chunks): a sample's statistics from its programs' (count, mean, M2): the mean
    first, then M2 = sum(M2_p) + sum(count_p (mean_p - mean)^2). Writes stat[j, k, n, c] for j = mean,
    1 / std, scale (= weight / std) and shift (= bias)."""
    kn = tl.program_id(0)
    KN = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    row0 = kn.to(tl.int64) * P
    m2_off = KN.to(tl.int64) * P * C
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        ok = (ps < P)[:, None] & col_ok[None, :]
        count = tl.where(ps < P, tl.minimum(rows_per_prog, S - ps * rows_per_prog), 0).to(tl.float32)
        acc += tl.load(part_ptr + (row0 + ps)[:, None] * C + cols[None, :], mask=ok, other=0.0) * count[:, None]
    mean = tl.sum(acc, axis=0) / S
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        ok = (ps < P)[:, None] & col_ok[None, :]
        count = tl.where(ps < P, tl.minimum(rows_per_prog, S - ps * rows_per_prog), 0).to(tl.float32)
        at = (row0 + ps)[:, None] * C + cols[None, :]
        d = tl.load(part_ptr + at, mask=ok, other=0.0) - mean[None, :]
        acc += tl.where(ok, tl.load(part_ptr + m2_off + at, mask=ok, other=0.0) + d * d * count[:, None], 0.0)
    invstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / S + eps)
    scale = invstd
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_AFFINE:
        k = kn // N
        scale = invstd * tl.load(w_ptr + k * C + cols, mask=col_ok, other=0.0)
        shift = tl.load(b_ptr + k * C + cols, mask=col_ok, other=0.0)
    at = kn * C + cols
    tl.store(stat_ptr + at, mean, mask=col_ok)
    tl.store(stat_ptr + KN * C + at, invstd, mask=col_ok)
    tl.store(stat_ptr + 2 * KN * C + at, scale, mask=col_ok)
    tl.store(stat_ptr + 3 * KN * C + at, shift, mask=col_ok)


@triton.jit
def _tile(S, C, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """An elementwise program's sample n, channel lanes, mask and element offsets (grid (N, row tiles))."""
    n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows < S)[:, None] & col_ok[None, :]
    return n, cols, col_ok, ok, n.to(tl.int64) * S * C + rows.to(tl.int64)[:, None] * C + cols[None, :]


@triton.jit
def _affine(x_ptr, offs, ok, stat_ptr, at, KNC, col_ok):
    """The normalised input (x - mean) / std (float32) and its affine image (x - mean) / std * w + b."""
    mean = tl.load(stat_ptr + at, mask=col_ok, other=0.0)
    invstd = tl.load(stat_ptr + KNC + at, mask=col_ok, other=0.0)
    scale = tl.load(stat_ptr + 2 * KNC + at, mask=col_ok, other=0.0)
    shift = tl.load(stat_ptr + 3 * KNC + at, mask=col_ok, other=0.0)
    v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - mean[None, :]
    return v * invstd[None, :], v * scale[None, :] + shift[None, :]


@triton.jit
def _forward_kernel(
    a_ptr, b_ptr, r_ptr, y_ptr, stat_ptr, S, C, N, slope,
    TWO: tl.constexpr, HAS_RES: tl.constexpr, HAS_ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, cols, col_ok, ok, offs = _tile(S, C, BLOCK_S, BLOCK_C)
    KNC = (2 if TWO else 1) * N * C
    _, y = _affine(a_ptr, offs, ok, stat_ptr, n * C + cols, KNC, col_ok)
    if TWO:
        _, yb = _affine(b_ptr, offs, ok, stat_ptr, (N + n) * C + cols, KNC, col_ok)
        y += yb
    if HAS_RES:
        y += tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_ACT:
        y = tl.where(y > 0, y, y * slope)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _masked_grad(g_ptr, y_ptr, offs, ok, z, slope, HAS_ACT: tl.constexpr, MASK_FROM_Y: tl.constexpr):
    """dL/d(pre-activation): the output gradient through the LeakyReLU, whose sign is read from the saved
    output y, or taken from ``z``, the pre-activation recomputed (a single normalised input)."""
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_ACT:
        if MASK_FROM_Y:
            z = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.where(z > 0, g, g * slope)
    return g


@triton.jit
def _grad_sums_kernel(
    g_ptr, y_ptr, a_ptr, b_ptr, stat_ptr, part_ptr, S, C, N, rows_per_prog, P, slope,
    TWO: tl.constexpr, HAS_ACT: tl.constexpr, MASK_FROM_Y: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (N, P): program p of sample n writes its voxels' sums of g, g * ahat (and g * bhat), g the
    gradient of the pre-activation, into part[j, n, p, :]."""
    n, p, cols, col_ok, start, stop, base = _reduction_program(S, C, rows_per_prog, BLOCK_C)
    KNC = (2 if TWO else 1) * N * C
    sg = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    sga = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    sgb = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, rows_per_prog, BLOCK_S):
        rows = start + r0 + tl.arange(0, BLOCK_S)
        ok = (rows < stop)[:, None] & col_ok[None, :]
        offs = base + rows.to(tl.int64)[:, None] * C + cols[None, :]
        ahat, za = _affine(a_ptr, offs, ok, stat_ptr, n * C + cols, KNC, col_ok)
        g = tl.where(ok, _masked_grad(g_ptr, y_ptr, offs, ok, za, slope, HAS_ACT, MASK_FROM_Y), 0.0)
        sg += g
        sga += g * ahat
        if TWO:
            bhat, _ = _affine(b_ptr, offs, ok, stat_ptr, (N + n) * C + cols, KNC, col_ok)
            sgb += g * bhat
    out = (n * P + p).to(tl.int64) * C + cols
    NPC = N * P * C
    tl.store(part_ptr + out, tl.sum(sg, axis=0), mask=col_ok)
    tl.store(part_ptr + NPC + out, tl.sum(sga, axis=0), mask=col_ok)
    if TWO:
        tl.store(part_ptr + 2 * NPC + out, tl.sum(sgb, axis=0), mask=col_ok)


@triton.jit
def _merge_sums_kernel(part_ptr, sums_ptr, N, C, P, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (J * N, channel chunks): sums[j, n, c] = sum over the programs p of part[j, n, p, c]."""
    jn = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    row0 = jn.to(tl.int64) * P
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        ok = (ps < P)[:, None] & col_ok[None, :]
        acc += tl.load(part_ptr + (row0 + ps)[:, None] * C + cols[None, :], mask=ok, other=0.0)
    tl.store(sums_ptr + jn * C + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _input_grad(x_ptr, dx_ptr, offs, ok, g, stat_ptr, stat_at, KNC, sum_g, sum_gx, col_ok, S):
    """dx = scale * (g - mean(g) - xhat * mean(g * xhat)), scale = weight / std (per channel)."""
    xhat, _ = _affine(x_ptr, offs, ok, stat_ptr, stat_at, KNC, col_ok)
    scale = tl.load(stat_ptr + 2 * KNC + stat_at, mask=col_ok, other=0.0)
    dx = scale[None, :] * (g - (sum_g / S)[None, :] - xhat * (sum_gx / S)[None, :])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_kernel(
    g_ptr, y_ptr, a_ptr, b_ptr, da_ptr, db_ptr, dr_ptr, stat_ptr, sums_ptr, S, C, N, slope,
    TWO: tl.constexpr, HAS_RES: tl.constexpr, HAS_ACT: tl.constexpr, MASK_FROM_Y: tl.constexpr,
    NEED_A: tl.constexpr, NEED_B: tl.constexpr, NEED_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, cols, col_ok, ok, offs = _tile(S, C, BLOCK_S, BLOCK_C)
    NC = N * C
    KNC = (2 if TWO else 1) * NC
    at = n * C + cols
    za = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    if HAS_ACT and not MASK_FROM_Y:
        _, za = _affine(a_ptr, offs, ok, stat_ptr, at, KNC, col_ok)
    g = _masked_grad(g_ptr, y_ptr, offs, ok, za, slope, HAS_ACT, MASK_FROM_Y)
    if HAS_RES and NEED_R:
        tl.store(dr_ptr + offs, g.to(dr_ptr.dtype.element_ty), mask=ok)
    # sums[0] = sum of g, sums[1] = sum of g * ahat, sums[2] = sum of g * bhat, each (N, C)
    sum_g = tl.load(sums_ptr + at, mask=col_ok, other=0.0)
    if NEED_A:
        sum_ga = tl.load(sums_ptr + NC + at, mask=col_ok, other=0.0)
        _input_grad(a_ptr, da_ptr, offs, ok, g, stat_ptr, at, KNC, sum_g, sum_ga, col_ok, S)
    if TWO and NEED_B:
        sum_gb = tl.load(sums_ptr + 2 * NC + at, mask=col_ok, other=0.0)
        _input_grad(b_ptr, db_ptr, offs, ok, g, stat_ptr, NC + at, KNC, sum_g, sum_gb, col_ok, S)


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' where it is not (CPU tensors:
    Triton's interpreter). (Checked first: entering a device context at every launch costs host time.)"""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


class _Launch:
    """Block shapes and grids for (N, C, voxels S) per :data:`CONFIG` (:func:`_launch` keeps them)."""

    def __init__(self, n: int, c: int, s: int, config: tuple) -> None:
        cfg = dict(config)
        self.block_c = triton.next_power_of_2(c)
        self.reduce_s = max(1, cfg["reduce_tile"] // self.block_c)
        self.tile_s = max(1, cfg["tile"] // self.block_c)
        tiles = triton.cdiv(s, self.reduce_s)
        programs = max(1, min(tiles, triton.cdiv(cfg["programs"], n)))
        self.rows = triton.cdiv(tiles, programs) * self.reduce_s  # voxels per reduction program
        self.P = triton.cdiv(s, self.rows)
        self.merge_c = min(self.block_c, 16)
        self.merge_p = max(1, cfg["merge_rows"] * 16 // self.merge_c)
        self.grid_reduce = (n, self.P)
        self.grid_tiles = (n, triton.cdiv(s, self.tile_s))
        self.grid_merge = triton.cdiv(c, self.merge_c)


@functools.lru_cache(maxsize=256)
def _cached_launch(n: int, c: int, s: int, config: tuple) -> _Launch:
    return _Launch(n, c, s, config)


def _launch(n: int, c: int, s: int) -> _Launch:
    return _cached_launch(n, c, s, tuple(sorted(CONFIG.items())))


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last_3d)


class _FusedNorm(torch.autograd.Function):
    """See :func:`fused_norm`."""

    @staticmethod
    def forward(ctx, a, wa, ba, b, wb, bb, r, eps, slope):
        with _on(a.device):
            n, c = a.shape[:2]
            s = a[0, 0].numel()
            two, affine = b is not None, wa is not None
            L = _launch(n, c, s)
            k = 2 if two else 1
            part = torch.empty(2, k, n, L.P, c, device=a.device, dtype=torch.float32)
            _stats_kernel[(n, L.P, k)](
                a, b if two else a, part, s, c, n, L.rows, L.P,
                BLOCK_S=L.reduce_s, BLOCK_C=L.block_c, num_warps=CONFIG["reduce_warps"],
            )
            stat = torch.empty(4, k, n, c, device=a.device, dtype=torch.float32)  # mean, 1/std, scale, shift
            w = torch.stack([wa, wb]).float() if two and affine else (wa.float().contiguous() if affine else stat)
            bias = torch.stack([ba, bb]).float() if two and affine else (ba.float().contiguous() if affine else stat)
            _merge_stats_kernel[(k * n, L.grid_merge)](
                part, w, bias, stat, s, c, n, L.rows, L.P, eps, HAS_AFFINE=affine, BLOCK_P=L.merge_p, BLOCK_C=L.merge_c,
            )
            y = torch.empty_like(a, memory_format=torch.channels_last_3d)
            act = slope is not None
            _forward_kernel[L.grid_tiles](
                a, b if two else a, r if r is not None else a, y, stat, s, c, n, float(slope or 0.0),
                TWO=two, HAS_RES=r is not None, HAS_ACT=act, BLOCK_S=L.tile_s, BLOCK_C=L.block_c, num_warps=CONFIG["warps"],
            )
        # The activation's mask: recomputed from a alone, else read from y (a saved output costs no memory).
        ctx.mask_from_y = act and (two or r is not None)
        ctx.save_for_backward(a, b, stat, y if ctx.mask_from_y else None)
        ctx.eps, ctx.slope, ctx.two, ctx.affine, ctx.has_res = eps, slope, two, affine, r is not None
        ctx.dtypes = (wa.dtype if affine else None, r.dtype if r is not None else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        a, b, stat, y = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with _on(a.device):
            n, c = a.shape[:2]
            s = a[0, 0].numel()
            two, act = ctx.two, ctx.slope is not None
            L = _launch(n, c, s)
            g = _cl(grad_out)
            j = 3 if two else 2
            part = torch.empty(j, n, L.P, c, device=a.device, dtype=torch.float32)
            flags = dict(TWO=two, HAS_ACT=act, MASK_FROM_Y=ctx.mask_from_y)
            _grad_sums_kernel[L.grid_reduce](
                g, y if y is not None else g, a, b if two else a, stat, part, s, c, n, L.rows, L.P, float(ctx.slope or 0.0),
                **flags, BLOCK_S=L.reduce_s, BLOCK_C=L.block_c, num_warps=CONFIG["reduce_warps"],
            )
            sums = torch.empty(j, n, c, device=a.device, dtype=torch.float32)
            _merge_sums_kernel[(j * n, L.grid_merge)](part, sums, n, c, L.P, BLOCK_P=L.merge_p, BLOCK_C=L.merge_c)
            need_a, need_b, need_r = needs[0], two and needs[3], ctx.has_res and needs[6]
            da = torch.empty_like(a, memory_format=torch.channels_last_3d) if need_a else None
            db = torch.empty_like(b, memory_format=torch.channels_last_3d) if need_b else None
            dr = torch.empty_like(a, dtype=ctx.dtypes[1], memory_format=torch.channels_last_3d) if need_r else None
            if need_a or need_b or need_r:
                _backward_kernel[L.grid_tiles](
                    g, y if y is not None else g, a, b if two else a, da if need_a else g, db if need_b else g, dr if need_r else g,
                    stat, sums, s, c, n, float(ctx.slope or 0.0), **flags, HAS_RES=ctx.has_res,
                    NEED_A=need_a, NEED_B=need_b, NEED_R=need_r, BLOCK_S=L.tile_s, BLOCK_C=L.block_c, num_warps=CONFIG["warps"],
                )
        grads = [da, None, None, db, None, None, dr]
        if ctx.affine:  # d/dweight = sum over samples of sum(g * xhat); d/dbias = sum of sum(g)
            wdt = ctx.dtypes[0]
            grads[1] = sums[1].sum(0).to(wdt) if needs[1] else None
            grads[2] = sums[0].sum(0).to(wdt) if needs[2] else None
            if two:
                grads[4] = sums[2].sum(0).to(wdt) if needs[4] else None
                grads[5] = sums[0].sum(0).to(wdt) if needs[5] else None
        return (*grads, None, None)


def fused_norm(a, weight_a=None, bias_a=None, b=None, weight_b=None, bias_b=None, residual=None, eps=1e-5, slope=None):
    """``leaky_relu(norm(a) [+ norm(b)] [+ residual], slope)`` of channels-last_3d CUDA tensors (N, C, D, H, W).

    Args:
        a: the normalised input.
        weight_a, bias_a: its affine parameters, shape (C,), or both None.
        b, weight_b, bias_b: a second normalised input of ``a``'s shape and dtype, and its parameters
            (affine exactly when ``a``'s are), or None.
        residual: added after the norms, as it is (not together with ``b``), or None.
        eps: added to the variance.
        slope: the LeakyReLU's negative slope; None: no activation.

    Returns:
        A channels-last_3d tensor of ``a``'s dtype.
    """
    if b is not None and residual is not None:
        raise ValueError("fused_norm takes a second normalised input or a residual, not both")
    return _FusedNorm.apply(_cl(a), weight_a, bias_a, None if b is None else _cl(b), weight_b, bias_b,
                            None if residual is None else _cl(residual), eps, slope)  # fmt: skip


class TritonInstanceNorm:
    """``TritonInstanceNorm.apply(x, weight, bias, eps)``: the plain instance norm of a channels-last_3d
    CUDA tensor ``x`` (N, C, D, H, W); ``weight`` and ``bias`` of shape (C,) or both None."""

    @staticmethod
    def apply(x, weight, bias, eps):
        return fused_norm(x, weight, bias, eps=eps)


# ----------------------------------------------------------------------------------------------------
# LayerNorm over the channels of an NCDHW tensor (the encoders' "channels-first" LayerNorm): each voxel's C
# values lie S apart, so a program reads a (channels x voxels) tile, coalesced along the voxels, and
# normalises its columns. PyTorch's route (movedim, a copy to make the rows contiguous, layer_norm, a copy
# back to NCDHW, and autocast's casts) reads and writes the activation four to six times.


@triton.jit
def _ln_tile(S, C, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (N, voxel tiles): sample n, the channel lanes, the voxels, the mask and element offsets."""
    n = tl.program_id(0)
    chans = tl.arange(0, BLOCK_C)
    vox = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = (chans < C)[:, None] & (vox < S)[None, :]
    return n, chans, vox, ok, n.to(tl.int64) * C * S + chans.to(tl.int64)[:, None] * S + vox[None, :]


@triton.jit
def _ln_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, S, C, eps, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n, chans, vox, ok, offs = _ln_tile(S, C, BLOCK_C, BLOCK_S)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    d = tl.where(ok, x - mean[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
    w = tl.load(w_ptr + chans, mask=chans < C, other=0.0)
    b = tl.load(b_ptr + chans, mask=chans < C, other=0.0)
    y = d * rstd[None, :] * w[:, None] + b[:, None]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
    vox_ok = vox < S
    tl.store(mean_ptr + n * S + vox, mean, mask=vox_ok)
    tl.store(rstd_ptr + n * S + vox, rstd, mask=vox_ok)


@triton.jit
def _ln_backward_kernel(
    g_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr, S, C, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dx = rstd (g w - mean_c(g w) - xhat mean_c(g w xhat)); and the program's sums over its voxels of
    g * xhat and g (the weight and bias gradients) into part[0 / 1, program, :]."""
    n, chans, vox, ok, offs = _ln_tile(S, C, BLOCK_C, BLOCK_S)
    vox_ok = vox < S
    mean = tl.load(mean_ptr + n * S + vox, mask=vox_ok, other=0.0)
    rstd = tl.load(rstd_ptr + n * S + vox, mask=vox_ok, other=0.0)
    w = tl.load(w_ptr + chans, mask=chans < C, other=0.0)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    xhat = tl.where(ok, (tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :], 0.0)
    gw = g * w[:, None]
    m1 = tl.sum(gw, axis=0) / C
    m2 = tl.sum(gw * xhat, axis=0) / C
    dx = rstd[None, :] * (gw - m1[None, :] - xhat * m2[None, :])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    prog = n * tl.num_programs(1) + tl.program_id(1)
    P = tl.num_programs(0) * tl.num_programs(1)
    tl.store(part_ptr + prog.to(tl.int64) * C + chans, tl.sum(g * xhat, axis=1), mask=chans < C)
    tl.store(part_ptr + (P + prog).to(tl.int64) * C + chans, tl.sum(g, axis=1), mask=chans < C)


def _ln_blocks(c: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(c)
    return block_c, max(1, CONFIG["tile"] // block_c)


class _ChannelsFirstLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        with _on(x.device):
            n, c = x.shape[:2]
            s = x[0, 0].numel()
            block_c, block_s = _ln_blocks(c)
            y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
            mean = torch.empty(n, s, device=x.device, dtype=torch.float32)
            rstd = torch.empty_like(mean)
            grid = (n, triton.cdiv(s, block_s))
            _ln_forward_kernel[grid](x, weight.float(), bias.float(), y, mean, rstd, s, c, eps, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=CONFIG["warps"])
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, mean, rstd = ctx.saved_tensors
        with _on(x.device):
            n, c = x.shape[:2]
            s = x[0, 0].numel()
            block_c, block_s = _ln_blocks(c)
            grid = (n, triton.cdiv(s, block_s))
            dx = torch.empty_like(x, memory_format=torch.contiguous_format)
            part = torch.empty(2, grid[0] * grid[1], c, device=x.device, dtype=torch.float32)
            _ln_backward_kernel[grid](grad_out.contiguous(), x, weight.float(), mean, rstd, dx, part, s, c, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=CONFIG["warps"])
            sums = part.sum(1)
        needs = ctx.needs_input_grad
        return (dx if needs[0] else None, sums[0].to(weight.dtype) if needs[1] else None, sums[1].to(weight.dtype) if needs[2] else None, None, None)


def layer_norm_channels_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm over the channel axis of a contiguous (NCDHW) CUDA tensor (N, C, D, H, W), with per-channel
    ``weight`` and ``bias``; the result (NCDHW) in ``out_dtype`` (float32 under autocast, as
    ``F.layer_norm`` gives)."""
    return _ChannelsFirstLayerNorm.apply(x.contiguous(), weight, bias, eps, out_dtype)

"""GPU benchmark of the depthwise 21^3 convolution (native vs FFT) and of whole networks (issue 7).

One run prints, each timed as the median of several repetitions after warm-up (CUDA events):

* check:   FFT vs float64 native convolution on the GPU (relative errors, output and gradients);
* stages:  native vs fft at the four REP3D stage shapes (batch 2, K=21), forward and forward+backward,
           fp32 and AMP (bf16 autocast), plus the plain-autograd FFT for comparison;
* sweep:   native vs fft forward+backward for smaller kernels (calibrates ``impl="auto"``);
* train:   one training iteration (2 x 1 x 96^3, 16 classes, AMP bf16, AdamW, MONAI DiceCE) of REP3D
           with dwconv native and fft, 3DUXNET and SwinUNETR;
* infer:   sliding-window inference (roi 96, sw_batch_size 4, overlap 0.5, AMP) of a 1x1x256x256x160
           volume, REP3D deploy native / fft and 3DUXNET;
* profile: torch.profiler of the REP3D fft iteration: top kernels and time per category;
* layout:  the decoder in NCDHW vs channels_last_3d (train and inference), SwinUNETR in the same run;
* final:   the training iteration with main_train's defaults, eager and compiled, SwinUNETR alongside;
* cuts:    the REP3D fft iteration with fused AdamW, cudnn.benchmark, channels_last_3d, a CUDA graph of
           the whole step, torch.compile; and SwinUNETR / 3DUXNET with the settings that paid.

Usage (on the GPU machine, from the repository root; ``python3 benchmarks/bench_gpu.py`` works the same
once the package is installed, ``pip install -e .``)::

    PYTHONUNBUFFERED=1 python3 -m benchmarks.bench_gpu --json $OUT/bench.json 2>&1 | tee $OUT/bench.log

``--quick`` runs tiny shapes on any device (a smoke test of the script, numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from networks import build_network
from networks.dwconv import native_depthwise_conv3d
from networks.fftconv import (
    _fft_cost,
    _native_cost,
    fft_depthwise_conv3d,
    fft_is_faster,
    fft_plan,
)
from rep3d.inference.sliding_window import compile_for_windows

RESULTS: dict[str, Any] = {}
JSON_PATH: Path | None = None
DEADLINE = float("inf")  # time.monotonic() after which optional slow variants (compiles) are skipped


def log(msg: str = "") -> None:
    print(msg, flush=True)
    if JSON_PATH is not None:  # after every line, so that a run cut off by a time limit keeps its numbers
        JSON_PATH.write_text(json.dumps(RESULTS, indent=1, default=str))


def time_left() -> float:
    return DEADLINE - time.monotonic()


# --------------------------------------------------------------------------------------------------
# timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], Any], device: torch.device, warmup: int = 2, reps: int = 10, budget_s: float = 3.0) -> dict:
    """Median (and min/max) milliseconds of ``fn`` after ``warmup`` calls; fewer reps if one is slow."""
    for _ in range(warmup):
        fn()
    sync(device)
    # A first timed call sizes the repetitions so that slow native convolutions stay within budget.
    times = [_time_once(fn, device)]
    n = max(1 if times[0] > budget_s * 1e3 else 2, min(reps, int(budget_s * 1e3 / max(times[0], 1e-3))))
    times += [_time_once(fn, device) for _ in range(n - 1)]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": len(times)}


def _time_once(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def gpu_kernel_ms(fn: Callable[[], Any], device: torch.device, calls: int = 3) -> float:
    """GPU kernel time of one call of ``fn`` (sum of kernel durations from torch.profiler), i.e. what
    it costs inside a GPU-bound network where its launch overhead hides behind other work."""
    if device.type != "cuda":
        return float("nan")
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    return sum(e.time_range.elapsed_us() for e in prof.events() if str(e.device_type).endswith("CUDA")) / 1e3 / calls


def fmt(r: dict | None) -> str:
    return "     n/a" if r is None else f"{r['median_ms']:8.2f}"


NET_AMP = True  # AMP for the network sections (off only for a CPU smoke test: CPU bf16 is very slow)


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)


# --------------------------------------------------------------------------------------------------
# the convolution alone


def autograd_fft_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The FFT convolution differentiated by autograd through torch.fft (no custom backward), to
    compare with the custom autograd.Function of networks.fftconv."""
    n = x.shape[2:]
    (shape, crop) = fft_plan(tuple(n), tuple(w.shape[2:]))
    with torch.autocast(device_type=x.device.type, enabled=False):
        c = crop[0]
        w = w[:, :, c : w.shape[2] - c, c : w.shape[3] - c, c : w.shape[4] - c].float()
        k = w.shape[2]
        h = F.pad(w.flip(2, 3, 4)[:, 0], (0, shape[2] - k, 0, shape[1] - k, 0, shape[0] - k))
        h = torch.roll(h, shifts=(-(k // 2),) * 3, dims=(1, 2, 3))
        y = torch.fft.irfftn(torch.fft.rfftn(x.float(), s=shape) * torch.fft.rfftn(h, s=shape), s=shape)
        return y[..., : n[0], : n[1], : n[2]].contiguous()


IMPLS = {"native": native_depthwise_conv3d, "fft": fft_depthwise_conv3d, "fft_autograd": autograd_fft_conv}


def conv_case(fn, b, c, n, k, device, amp, backward, bias=False):
    x = torch.randn(b, c, n, n, n, device=device, requires_grad=backward)
    w = (torch.randn(c, 1, k, k, k, device=device) / k**1.5).requires_grad_(backward)
    bb = torch.randn(c, device=device, requires_grad=backward) if bias else None
    gy = None

    def run():
        nonlocal gy
        with torch.set_grad_enabled(backward), autocast(device, amp):
            y = fn(x, w, bb) if bias else fn(x, w)
        if backward:
            if gy is None or gy.dtype != y.dtype:
                gy = torch.randn_like(y)
            y.backward(gy)
            x.grad = w.grad = None

    return run


def section_check(device, stages, k):
    log("\n== check: FFT vs float64 native convolution on this device (relative L2 errors) ==")
    rows = []
    for _, n in stages:
        x = torch.randn(2, 2, n, n, n, device=device, requires_grad=True)
        w = torch.randn(2, 1, k, k, k, device=device, requires_grad=True)
        y = fft_depthwise_conv3d(x, w)
        g = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, w), g)
        xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        yd = F.conv3d(xd, wd, padding=k // 2, groups=2)
        rx, rw = torch.autograd.grad(yd, (xd, wd), g.double())
        errs = [((a.double() - r).norm() / r.norm()).item() for a, r in ((y, yd), (gx, rx), (gw, rw))]
        rows.append({"n": n, "k": k, "out": errs[0], "grad_x": errs[1], "grad_w": errs[2]})
        log(f"  N={n:3d} K={k}: out {errs[0]:.1e}  grad_x {errs[1]:.1e}  grad_w {errs[2]:.1e}")
    RESULTS["check"] = rows


def section_stages(device, stages, k, batch):
    log(f"\n== stages: depthwise {k}^3, batch {batch}: median ms (native / fft / fft via autograd) ==")
    log(f"  {'stage':>12} {'mode':>10} {'native':>8} {'fft':>8} {'fft_ag':>8} {'speedup':>8}")
    rows = []
    totals = {}
    for c, n in stages:
        for amp in (False, True):
            for backward in (False, True):
                mode = ("fwd+bwd" if backward else "fwd") + ("/amp" if amp else "/fp32")
                r = {}
                for name, fn in IMPLS.items():
                    if name == "fft_autograd" and amp:
                        r[name] = None
                        continue
                    run = conv_case(fn, batch, c, n, k, device, amp, backward)
                    r[name] = bench(run, device, warmup=1 if name == "native" else 3, reps=20)
                    del run
                speed = r["native"]["median_ms"] / r["fft"]["median_ms"]
                log(f"  {f'{c}@{n}^3':>12} {mode:>10} {fmt(r['native'])} {fmt(r['fft'])} {fmt(r['fft_autograd'])} {speed:8.1f}x")
                rows.append({"channels": c, "n": n, "mode": mode, **{k_: v for k_, v in r.items()}})
                for name in ("native", "fft"):
                    totals.setdefault((mode, name), 0.0)
                    totals[(mode, name)] += 2 * r[name]["median_ms"]  # two blocks per stage
    log("  the 8 depthwise convs of an iteration (2 per stage):")
    for mode in ("fwd+bwd/fp32", "fwd+bwd/amp", "fwd/fp32", "fwd/amp"):
        nat, fft = totals[(mode, "native")], totals[(mode, "fft")]
        log(f"    {mode:>12}: native {nat:8.1f} ms   fft {fft:6.2f} ms   ({nat / fft:.0f}x)")
    RESULTS["stages"] = rows
    RESULTS["stages_8conv_total_ms"] = {f"{m}/{i}": v for (m, i), v in totals.items()}


def section_chain(device, stages, k, batch):
    log(f"\n== chain: the 8 depthwise {k}^3 convs of an iteration (2 per stage, chained), fwd+bwd, AMP bf16, batch {batch} ==")
    rows = {}
    for name in ("native", "fft"):
        fn = IMPLS[name]
        xs = [torch.randn(batch, c, n, n, n, device=device, requires_grad=True) for c, n in stages]
        ws = [[(torch.randn(c, 1, k, k, k, device=device) / k**1.5).requires_grad_() for _ in range(2)] for c, _ in stages]
        grads = [None] * len(stages)

        def run():
            for i, (x, (w1, w2)) in enumerate(zip(xs, ws)):
                with autocast(device, True):
                    y = fn(fn(x, w1), w2)
                if grads[i] is None:
                    grads[i] = torch.randn_like(y)
                y.backward(grads[i])
            for t in xs + [w for pair in ws for w in pair]:
                t.grad = None

        r = bench(run, device, warmup=1, reps=20, budget_s=4.0)
        r["gpu_kernel_ms"] = gpu_kernel_ms(run, device, calls=1 if name == "native" else 5)
        rows[name] = r
        log(f"  {name:7s}: {r['median_ms']:8.2f} ms per iteration's 8 convs (events, median of {r['reps']}); "
            f"GPU kernel time {r['gpu_kernel_ms']:.2f} ms")
    RESULTS["chain"] = rows


def section_sweep(device, stages, kernels, batch):
    log(f"\n== sweep: fwd+bwd AMP bf16, batch {batch}: ms per call, events (GPU kernel time) "
        "(calibrates impl='auto'; cost ratio = native MACs / FFT n log n) ==")
    rows = []
    for c, n in stages:
        for k in kernels:
            r = {}
            for name in ("native", "fft"):
                run = conv_case(IMPLS[name], batch, c, n, k, device, True, True)
                r[name] = bench(run, device, warmup=1, reps=10, budget_s=1.5)
                r[name]["gpu_kernel_ms"] = gpu_kernel_ms(run, device)
            plan = fft_plan((n,) * 3, (k,) * 3)
            k_eff = [k - 2 * cc for cc in plan.kernel_crop]
            ratio = _native_cost(batch, c, (n,) * 3, k_eff) / _fft_cost(batch, c, plan.fft_shape)
            x_meta = torch.empty(batch, c, n, n, n, device=device)
            auto = "fft" if fft_is_faster(x_meta, torch.empty(c, 1, k, k, k, device=device)) else "native"
            best = "fft" if r["fft"]["gpu_kernel_ms"] < r["native"]["gpu_kernel_ms"] else "native"
            log(f"  {c:4d}@{n:2d}^3 K={k:2d}: native {fmt(r['native'])} ({r['native']['gpu_kernel_ms']:6.2f})  "
                f"fft {fmt(r['fft'])} ({r['fft']['gpu_kernel_ms']:5.2f})  cost ratio {ratio:7.2f}  "
                f"less GPU time: {best:6s} auto: {auto}{'' if auto == best else '  <-- differs'}")
            rows.append({"channels": c, "n": n, "k": k, "cost_ratio": ratio, "auto": auto, "best": best, **r})
    RESULTS["sweep"] = rows


# --------------------------------------------------------------------------------------------------
# whole networks


def make_train_step(model, device, roi, batch, classes, fused=False, channels_last=False, lr=1e-4):
    from monai.losses import DiceCELoss

    kwargs = {"fused": True} if fused else {}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.08, **kwargs)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.randn(batch, 1, *roi, device=device)
    y = torch.randint(0, classes, (batch, 1, *roi), device=device).float()
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, NET_AMP):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step, (model, opt, loss_fn, x, y)


def graph_train_step(model, device, roi, batch, classes):
    """The whole step (forward, backward, fused AdamW) captured once in a CUDA graph and replayed."""
    from monai.losses import DiceCELoss

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.08, fused=True, capturable=True)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.randn(batch, 1, *roi, device=device)
    y = torch.randint(0, classes, (batch, 1, *roi), device=device).float()

    def body():
        with autocast(device, True):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    # Gradients set to None before capture: the captured backward then writes (not accumulates) them
    # into the graph's own buffers, so replays need no zero_grad.
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        body()

    def step():
        graph.replay()

    return step


def peak_mem(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_mem(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_train(label, name, overrides, device, roi, batch, classes, reps, **kw):
    reset_mem(device)
    try:
        model = build_network(name, 1, classes, **overrides).to(device).train()
        for attr, value in kw.pop("attrs", {}).items():
            setattr(model, attr, value)
    except Exception as err:  # noqa: BLE001 - a network another helper has not finished yet
        log(f"  {label:34s} skipped: cannot build {name}: {type(err).__name__}: {err}")
        return None
    try:
        if kw.pop("graph", False):
            step = graph_train_step(model, device, roi, batch, classes)
        else:
            compile_mode = kw.pop("compile", None)
            if compile_mode:
                model = torch.compile(model, mode=None if compile_mode is True else compile_mode)
            step, _ = make_train_step(model, device, roi, batch, classes, **kw)
            if compile_mode == "reduce-overhead":
                inner_step = step

                def step():
                    torch.compiler.cudagraph_mark_step_begin()
                    return inner_step()

        t0 = time.perf_counter()
        step()
        sync(device)
        first = time.perf_counter() - t0
        r = bench(step, device, warmup=2, reps=reps, budget_s=8.0)
    except Exception as err:  # noqa: BLE001 - report and carry on with the other rows
        log(f"  {label:34s} FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        traceback.print_exc(limit=3)
        return None
    r["peak_gib"] = peak_mem(device)
    r["first_step_s"] = first
    log(f"  {label:34s} {fmt(r)} ms  (min {r['min_ms']:.1f}, max {r['max_ms']:.1f}, n={r['reps']}, "
        f"peak {r['peak_gib']:.1f} GiB, first step {first:.1f} s)")
    del model, step
    return r


def section_train(device, roi, batch, classes, reps, tiny):
    log(f"\n== train: one iteration, {batch} x 1 x {'x'.join(map(str, roi))}, {classes} classes, AMP bf16, AdamW, DiceCE ==")
    nets = [
        ("REP3D (lrbm) dwconv=native", "REP3D", {"dwconv": "native"}),
        ("REP3D (lrbm) dwconv=fft", "REP3D", {"dwconv": "fft"}),
        ("3DUXNET dwconv=native", "3DUXNET", {"dwconv": "native"}),
        ("3DUXNET dwconv=fft", "3DUXNET", {"dwconv": "fft"}),
        ("3DUXNET dwconv=auto", "3DUXNET", {"dwconv": "auto"}),
        ("SwinUNETR", "SwinUNETR", {}),
    ]
    rows = {}
    RESULTS["train"] = rows
    for label, name, ov in nets:
        rows[label] = run_train(label, name, {**ov, **tiny.get(name, {})}, device, roi, batch, classes, reps)


def time_inference(run, device, label, width, warmup, budget_s, reps=5):
    """Time one sliding-window inference call (first call apart, then the median); None if it fails."""
    try:
        t0 = time.perf_counter()
        run()
        sync(device)
        first = time.perf_counter() - t0
        r = bench(run, device, warmup=warmup, reps=reps, budget_s=budget_s)
    except Exception as err:  # noqa: BLE001 - report and carry on with the other rows
        log(f"  {label:{width}s} FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        return None
    r["peak_gib"] = peak_mem(device)
    r["first_call_s"] = first
    log(f"  {label:{width}s} {r['median_ms'] / 1e3:7.3f} s  (min {r['min_ms'] / 1e3:.3f}, n={r['reps']}, "
        f"peak {r['peak_gib']:.1f} GiB, first call {first:.1f} s)")
    return r


def time_sliding_window(label, predictor, vol, roi, sw_batch, overlap, device, width=52, warmup=1, budget_s=10.0,
                        grad_mode=torch.inference_mode):
    """:func:`time_inference` of MONAI's sliding-window inference of ``vol`` with ``predictor`` under AMP."""
    from monai.inferers import sliding_window_inference

    def run():
        with grad_mode(), autocast(device, NET_AMP):
            return sliding_window_inference(vol, roi, sw_batch, predictor, overlap=overlap)

    return time_inference(run, device, label, width, warmup=warmup, budget_s=budget_s)


def section_infer(device, roi, volume, classes, tiny, sw_batch=4, overlap=0.5, compiled=False):
    log(f"\n== infer{' (torch.compile)' if compiled else ''}: sliding window, volume 1x1x{'x'.join(map(str, volume))}, "
        f"roi {roi[0]}, sw_batch_size {sw_batch}, overlap {overlap}, AMP bf16 ==")
    vol = torch.randn(1, 1, *volume, device=device)
    if compiled:
        nets = [("REP3D deploy fft, compiled", "REP3D", {"deploy": True, "dwconv": "fft"})]
    else:
        nets = [
            ("REP3D deploy dwconv=native", "REP3D", {"deploy": True, "dwconv": "native"}),
            ("REP3D deploy dwconv=fft", "REP3D", {"deploy": True, "dwconv": "fft"}),
            ("3DUXNET dwconv=native", "3DUXNET", {"dwconv": "native"}),
            ("3DUXNET dwconv=fft", "3DUXNET", {"dwconv": "fft"}),
            ("3DUXNET dwconv=auto", "3DUXNET", {"dwconv": "auto"}),
            ("SwinUNETR", "SwinUNETR", {}),
        ]
    rows = RESULTS.setdefault("infer_compiled" if compiled else "infer", {})
    for label, name, ov in nets:
        reset_mem(device)
        try:
            model = build_network(name, 1, classes, **ov, **tiny.get(name, {})).to(device).eval()
        except Exception as err:  # noqa: BLE001 - a network another helper has not finished yet
            log(f"  {label:30s} skipped: {type(err).__name__}: {err}")
            rows[label] = None
            continue
        predictor = compile_for_windows(model, sw_batch) if compiled else model
        rows[label] = time_sliding_window(label, predictor, vol, roi, sw_batch, overlap, device, width=30, warmup=0,
                                          budget_s=15.0, grad_mode=torch.no_grad)
        del model, predictor


def _kernel_category(name: str) -> str:
    n = name.lower()
    rules = [
        ("fft", ("fft", "vector_fft", "regular_fft", "cufft", "r2c", "c2r", "c2c")),
        ("adamw", ("adam", "multi_tensor")),
        ("conv (cuDNN)", ("cudnn", "conv", "sm90_xmma", "sm80_xmma", "implicit_gemm", "dgrad", "wgrad", "fprop",
                          "winograd", "cutlass", "gemm")),
        ("norm", ("norm", "welford", "batch_norm", "layer_norm", "instance")),
        ("softmax/loss", ("softmax", "nll", "cross_entropy", "log_softmax")),
        ("reduce", ("reduce",)),
        ("copy/cast/pad", ("copy", "cast", "cat", "pad", "index", "scatter", "gather", "fill", "memset", "memcpy")),
        ("triton (fused)", ("triton",)),
        ("elementwise", ("elementwise", "vectorized", "unrolled", "gelu", "mul", "add", "sigmoid")),
    ]
    for cat, keys in rules:
        if any(k in n for k in keys):
            return cat
    return "other"


def copy_sources(prof, steps, top=12) -> list:
    """GPU time of copy/cat operators per calling chain (the operator's CPU parents), largest first."""
    agg: dict[str, list] = {}
    for e in prof.events():
        if e.name not in ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous"):
            continue
        if e.cpu_parent is not None and e.cpu_parent.name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"):
            continue  # counted at the outer operator
        chain, p = [], e.cpu_parent
        while p is not None and len(chain) < 4:
            chain.append(p.name)
            p = p.cpu_parent
        shape = e.input_shapes[0] if e.input_shapes else ""
        key = f"{e.name} {shape} < {' < '.join(chain) or '(top level / autograd engine)'}"
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = e.cuda_time_total
        agg.setdefault(key, [0.0, 0])
        agg[key][0] += t / 1e3 / steps
        agg[key][1] += 1
    rows = sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]
    log("  copies by source (GPU ms per step, calls per step):")
    for key, (t, cnt) in rows:
        log(f"    {t:7.2f} ms {cnt // steps:4d}x  {key[:180]}")
    return [(k, t) for k, (t, _) in rows]


def profile_step(label, step, device, steps=3, top=25, table=True, sources=False):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts, record_shapes=sources) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall = (time.perf_counter() - t0) * 1e3 / steps
    kernels = [e for e in prof.events() if str(e.device_type).endswith("CUDA")] if device.type == "cuda" else []
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / steps if kernels else float("nan")
    by_name: dict[str, list] = {}
    for e in kernels:
        by_name.setdefault(e.name, [0.0, 0])
        by_name[e.name][0] += e.time_range.elapsed_us() / 1e3 / steps
        by_name[e.name][1] += 1
    cats: dict[str, float] = {}
    for name, (t, _) in by_name.items():
        cats[_kernel_category(name)] = cats.get(_kernel_category(name), 0.0) + t
    log(f"\n-- profile: {label}, {steps} steps --")
    log(f"  wall per step (profiled) {wall:.1f} ms; GPU kernels busy {busy:.1f} ms/step "
        f"({busy / wall * 100:.0f}%: the rest is launch gaps / CPU / sync); kernels per step {len(kernels) // steps}")
    log("  GPU time per step by category:")
    for cat, t in sorted(cats.items(), key=lambda kv: -kv[1]):
        log(f"    {cat:16s} {t:7.2f} ms  {t / busy * 100:5.1f}%")
    log(f"  top {top} kernels (ms per step, launches per step):")
    for name, (t, cnt) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        log(f"    {t:7.2f} ms {cnt // steps:5d}x  {name[:110]}")
    if sources:
        try:
            copy_sources(prof, steps)
        except Exception as err:  # noqa: BLE001 - profiler event fields differ between versions
            log(f"  (copy sources unavailable: {type(err).__name__}: {err})")
    if table:
        log("  top 15 operators by device time (torch.profiler table):")
        sort_key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
        try:
            log(prof.key_averages().table(sort_by=sort_key, row_limit=15, max_name_column_width=60))
        except Exception as err:  # noqa: BLE001 - table column names differ between versions
            log(f"  (table unavailable: {err})")
    RESULTS.setdefault("profile", {})[label] = {
        "wall_ms": wall,
        "busy_ms": busy,
        "categories_ms": cats,
        "top_kernels": sorted(((n, t) for n, (t, _) in by_name.items()), key=lambda kv: -kv[1])[:40],
    }


def section_profile(device, roi, batch, classes, tiny, steps=3):
    log("\n== profile ==")
    model = build_network("REP3D", 1, classes, dwconv="fft", **tiny.get("REP3D", {})).to(device).train()
    step, _ = make_train_step(model, device, roi, batch, classes)
    profile_step("REP3D (lrbm) fft training iteration", step, device, steps)
    del model, step
    model = build_network("REP3D", 1, classes, dwconv="fft", deploy=True, **tiny.get("REP3D", {})).to(device).eval()
    x = torch.randn(4, 1, *roi, device=device)

    def infer(model=model):  # bound now: the name is deleted and rebound below
        with torch.no_grad(), autocast(device, NET_AMP):
            return model(x)

    profile_step("REP3D deploy fft forward, one sliding-window batch (4 x roi)", infer, device, steps, top=15, table=False)
    del model
    model = build_network("3DUXNET", 1, classes, dwconv="auto", **tiny.get("3DUXNET", {})).to(device).train()
    step, _ = make_train_step(model, device, roi, batch, classes)
    profile_step("3DUXNET (auto) training iteration", step, device, 2, top=12, table=False)
    del model, step


def section_tuned(device, roi, volume, batch, classes, reps, tiny):
    """Follow-up: inference and training with compile modes, each with its eager baseline in this run."""
    tuned_infer(device, roi, volume, classes, tiny, part=0)
    tuned_train(device, roi, batch, classes, reps, tiny)
    tuned_infer(device, roi, volume, classes, tiny, part=1)


def tuned_infer(device, roi, volume, classes, tiny, part, sw_batch=4, overlap=0.5):
    log(f"\n== tuned inference (part {part + 1}/2): volume 1x1x{'x'.join(map(str, volume))}, roi {roi[0]}, "
        f"sw_batch_size {sw_batch}, overlap {overlap}, AMP bf16 ==")
    vol = torch.randn(1, 1, *volume, device=device)
    rows = RESULTS.setdefault("tuned_infer", {})
    variants = [
        [
            ("REP3D deploy fft, eager", "REP3D", {"deploy": True, "dwconv": "fft"}, None, False),
            ("REP3D deploy fft, eager + cudnn.benchmark", "REP3D", {"deploy": True, "dwconv": "fft"}, None, True),
            ("REP3D deploy fft, compile + cudnn.bm", "REP3D", {"deploy": True, "dwconv": "fft"}, "default", True),
            ("REP3D deploy fft, compile(reduce-overhead) + cudnn.bm", "REP3D", {"deploy": True, "dwconv": "fft"},
             "reduce-overhead", True),
        ],
        [
            ("3DUXNET auto, eager", "3DUXNET", {"dwconv": "auto"}, None, False),
            ("SwinUNETR, eager", "SwinUNETR", {}, None, False),
            ("SwinUNETR, compile(reduce-overhead) + cudnn.bm", "SwinUNETR", {}, "reduce-overhead", True),
            ("3DUXNET auto, compile(reduce-overhead) + cudnn.bm", "3DUXNET", {"dwconv": "auto"}, "reduce-overhead", True),
        ],
    ][part]
    for label, name, ov, mode, bm in variants:
        if mode is not None and time_left() < 120:
            log(f"  (skipped {label}: {time_left():.0f} s left of --time_budget)")
            continue
        torch.backends.cudnn.benchmark = bm
        reset_mem(device)
        model = build_network(name, 1, classes, **ov, **tiny.get(name, {})).to(device).eval()
        if mode is None:
            predictor = model
        else:
            inner = compile_for_windows(model, sw_batch, mode=None if mode == "default" else mode)

            def predictor(x, inner=inner):
                torch.compiler.cudagraph_mark_step_begin()
                return inner(x)

        rows[label] = time_sliding_window(label, predictor, vol, roi, sw_batch, overlap, device)
        del model, predictor
    torch.backends.cudnn.benchmark = False


def tuned_train(device, roi, batch, classes, reps, tiny):
    log(f"\n== tuned training: {batch} x 1 x {'x'.join(map(str, roi))}, fused AdamW, cudnn.benchmark, AMP bf16 ==")
    rows = RESULTS.setdefault("tuned_train", {})
    torch.backends.cudnn.benchmark = True
    ov = {"dwconv": "fft", **tiny.get("REP3D", {})}
    sw = tiny.get("SwinUNETR", {})
    for label, name, o, mode in [
        ("REP3D fft eager", "REP3D", ov, None),
        ("SwinUNETR eager", "SwinUNETR", sw, None),
        ("REP3D fft compile(reduce-overhead)", "REP3D", ov, "reduce-overhead"),
        ("REP3D fft compile", "REP3D", ov, True),
        ("SwinUNETR compile(reduce-overhead)", "SwinUNETR", sw, "reduce-overhead"),
    ]:
        if mode is not None and time_left() < (200 if name == "SwinUNETR" else 100):
            log(f"  (skipped {label}: {time_left():.0f} s left of --time_budget)")
            continue
        rows[label] = run_train(label, name, o, device, roi, batch, classes, reps, fused=True, compile=mode)
    torch.backends.cudnn.benchmark = False


def section_cuts(device, roi, batch, classes, reps, tiny, volume, do_compile=True):
    log("\n== cuts: the REP3D (lrbm) fft iteration with cheap speed-ups, SwinUNETR with the same ==")
    ov = {"dwconv": "fft", **tiny.get("REP3D", {})}
    sw = tiny.get("SwinUNETR", {})
    rows = {}
    RESULTS["cuts"] = rows

    def row(label, name, o, **kw):
        rows[label] = run_train(label, name, o, device, roi, batch, classes, reps, **kw)

    row("REP3D base (foreach AdamW)", "REP3D", ov)
    row("REP3D fused AdamW", "REP3D", ov, fused=True)
    torch.backends.cudnn.benchmark = True
    row("REP3D fused + cudnn.benchmark", "REP3D", ov, fused=True)
    row("SwinUNETR fused + cudnn.benchmark", "SwinUNETR", sw, fused=True)
    torch.backends.cudnn.benchmark = False
    row("REP3D channels_last_3d", "REP3D", ov, channels_last=True)
    if device.type == "cuda":
        row("REP3D CUDA graph (fused, capturable)", "REP3D", ov, graph=True)
        row("SwinUNETR CUDA graph (fused, capturable)", "SwinUNETR", sw, graph=True)
    if not do_compile:
        return
    torch.backends.cudnn.benchmark = True
    row("REP3D torch.compile + fused + cudnn.bm", "REP3D", ov, fused=True, compile=True)
    for label, fn, need in [
        ("compiled inference", lambda: section_infer(device, roi, volume, classes, tiny, compiled=True), 200),
        ("SwinUNETR torch.compile", lambda: row("SwinUNETR torch.compile + fused + cudnn.bm", "SwinUNETR", sw, fused=True,
                                                compile=True), 150),
        ("REP3D reduce-overhead", lambda: row("REP3D torch.compile(reduce-overhead) + fused", "REP3D", ov, fused=True,
                                              compile="reduce-overhead"), 150),
    ]:
        if time_left() > need:
            fn()
        else:
            log(f"  (skipped {label}: {time_left():.0f} s left of --time_budget)")
    torch.backends.cudnn.benchmark = False


# --------------------------------------------------------------------------------------------------


def environment(device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "device": str(device), "python": sys.version.split()[0]}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    try:
        import monai

        env["monai"] = monai.__version__
    except ImportError:
        env["monai"] = None
    return env


def layout_check(device, classes, tiny) -> None:
    """The channels-last and NCDHW decoders in float32 against the NCDHW one in float64 on this device:
    logits of the inference path, and the input and parameter gradients of a training-mode forward
    (relative max errors; float32 itself is the floor: the two layouts should err alike)."""
    import copy

    from networks.layout import ChannelsLastInstanceNorm3d

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # float32 means float32 here
    torch.manual_seed(0)
    # The norm alone against F.instance_norm in float64: batch sizes 1 and 3, an offset mean (|mean| >> std
    # is where a careless variance loses digits), affine parameters, float32 and bfloat16 inputs.
    for n in (1, 3):
        x64 = (torch.randn(n, 24, 20, 18, 22, device=device, dtype=torch.float64) * 0.05 + 2.0)
        wb = (torch.rand(24, device=device, dtype=torch.float64) + 0.5, torch.randn(24, device=device, dtype=torch.float64))
        g64 = torch.randn_like(x64)
        for dtype in (torch.float32, torch.bfloat16):
            # The reference sees the same rounded input (bfloat16 rounding alone moves a value of 2 by 0.008).
            ref_x = x64.to(dtype).double().requires_grad_()
            ref_p = [t.clone().requires_grad_() for t in wb]
            ref = F.instance_norm(ref_x, weight=ref_p[0], bias=ref_p[1], eps=1e-5)
            (ref * g64.to(dtype).double()).sum().backward()
            norm = ChannelsLastInstanceNorm3d(24, affine=True).to(device)
            with torch.no_grad():
                norm.weight.copy_(wb[0]); norm.bias.copy_(wb[1])
            xi = x64.to(dtype).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
            y = norm(xi)
            (y * g64.to(dtype)).sum().backward()
            errs = {k: ((a.double() - b).abs().max() / b.abs().max()).item() for k, a, b in
                    [("out", y, ref), ("grad_x", xi.grad, ref_x.grad), ("grad_w", norm.weight.grad, ref_p[0].grad),
                     ("grad_b", norm.bias.grad, ref_p[1].grad)]}
            log(f"  ChannelsLastInstanceNorm3d n={n} {str(dtype)[6:]}: channels_last out "
                f"{memory_format_of_name(y)}; rel max error vs float64 " + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()))
            RESULTS.setdefault("layout_norm_check", {})[f"n={n} {dtype}"] = errs
    small = {"feature_size": (16, 32, 64, 128), "hidden_size": 256, "kernel_size": 7, "dwconv": "fft"}
    ref_model = build_network("REP3D", 1, classes, **{**small, **tiny.get("REP3D", {})}).to(device).double()
    x = torch.randn(3, 1, 48, 48, 48, device=device, dtype=torch.float64)
    weights = torch.linspace(-1, 1, 3 * classes * 48**3, device=device, dtype=torch.float64)

    def run(model, dtype, cl, train):
        model.train(train)
        model.decoder_channels_last = cl
        model.zero_grad(set_to_none=True)
        xi = x.to(dtype).clone().requires_grad_(train)
        with torch.set_grad_enabled(train):
            y = model(xi)
            if not train:
                return y.double(), None, None
            (y * weights.to(dtype).view_as(y)).sum().backward()
        return y.double(), xi.grad.double(), [p.grad.double() for p in model.parameters() if p.grad is not None]

    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()  # noqa: E731
    model32 = copy.deepcopy(ref_model).float()
    res = {}
    for train in (True, False):
        y0, g0, p0 = run(ref_model, torch.float64, False, train)
        for cl in (False, True):
            y, g, p = run(model32, torch.float32, cl, train)
            key = f"{'train' if train else 'eval'} float32 {'channels_last' if cl else 'NCDHW'}"
            res[key] = {"logits": rel(y, y0)}
            if train:
                res[key]["grad_input"] = rel(g, g0)
                res[key]["grad_params_max"] = max(rel(a, b) for a, b in zip(p, p0))
    for key, v in res.items():
        log(f"  vs float64 NCDHW, relative max error, {key}: " + ", ".join(f"{k} {e:.1e}" for k, e in v.items()))
    RESULTS["layout_check"] = res
    torch.backends.cudnn.allow_tf32 = tf32


def memory_format_of_name(x: torch.Tensor) -> str:
    return "yes" if x.is_contiguous(memory_format=torch.channels_last_3d) else "NO"


def section_layout(device, roi, volume, batch, classes, reps, tiny, do_compile=True, sw_batch=4, overlap=0.5):
    """The decoder in NCDHW vs channels_last_3d (``decoder_channels_last``), everything else as main_train /
    test_seg run it (fused AdamW, cudnn.benchmark), with SwinUNETR measured in the same run."""
    torch.backends.cudnn.benchmark = True
    log("\n== layout: decoder NCDHW vs channels_last_3d ==")
    layout_check(device, classes, tiny)
    log(f"  train {batch} x 1 x {'x'.join(map(str, roi))}, fused AdamW, cudnn.benchmark, AMP bf16:")
    rows = RESULTS.setdefault("layout_train", {})
    ov = {"dwconv": "fft", **tiny.get("REP3D", {})}
    ux = {"dwconv": "auto", **tiny.get("3DUXNET", {})}
    for label, name, o, cl in [
        ("REP3D fft, decoder NCDHW", "REP3D", ov, False),
        ("REP3D fft, decoder channels_last", "REP3D", ov, True),
        ("SwinUNETR", "SwinUNETR", tiny.get("SwinUNETR", {}), None),
        ("3DUXNET auto, decoder NCDHW", "3DUXNET", ux, False),
        ("3DUXNET auto, decoder channels_last", "3DUXNET", ux, True),
        ("REP3D fft, decoder NCDHW (again)", "REP3D", ov, False),
        ("REP3D fft, decoder channels_last (again)", "REP3D", ov, True),
    ]:
        attrs = {} if cl is None else {"decoder_channels_last": cl}
        rows[label] = run_train(label, name, o, device, roi, batch, classes, reps, fused=True, attrs=attrs)

    for cl in (False, True):
        model = build_network("REP3D", 1, classes, **ov).to(device).train()
        model.decoder_channels_last = cl
        step, _ = make_train_step(model, device, roi, batch, classes, fused=True)
        profile_step(f"REP3D fft training iteration, decoder {'channels_last' if cl else 'NCDHW'}", step, device, 3,
                     top=10, table=False, sources=True)
        del model, step

    log(f"\n  sliding-window inference, volume 1x1x{'x'.join(map(str, volume))}, roi {roi[0]}, "
        f"sw_batch_size {sw_batch}, overlap {overlap}, AMP bf16, cudnn.benchmark:")
    vol = torch.randn(1, 1, *volume, device=device)
    rows = RESULTS.setdefault("layout_infer", {})
    dep = {"deploy": True, "dwconv": "fft", **tiny.get("REP3D", {})}
    variants = [
        ("REP3D deploy fft, decoder NCDHW", "REP3D", dep, False, False),
        ("REP3D deploy fft, decoder channels_last", "REP3D", dep, True, False),
        ("3DUXNET auto, decoder NCDHW", "3DUXNET", ux, False, False),
        ("3DUXNET auto, decoder channels_last", "3DUXNET", ux, True, False),
        ("SwinUNETR", "SwinUNETR", tiny.get("SwinUNETR", {}), None, False),
        ("REP3D deploy fft, decoder NCDHW, compiled", "REP3D", dep, False, True),
        ("REP3D deploy fft, decoder channels_last, compiled", "REP3D", dep, True, True),
    ]
    for label, name, o, cl, comp in variants:
        if comp and (not do_compile or time_left() < 100):
            log(f"  (skipped {label})")
            continue
        reset_mem(device)
        model = build_network(name, 1, classes, **o).to(device).eval()
        if cl is not None:
            model.decoder_channels_last = cl
        predictor = compile_for_windows(model, sw_batch) if comp else model
        rows[label] = time_sliding_window(label, predictor, vol, roi, sw_batch, overlap, device)
        del model, predictor
    for cl in (False, True):
        model = build_network("REP3D", 1, classes, **dep).to(device).eval()
        model.decoder_channels_last = cl
        x = torch.randn(sw_batch, 1, *roi, device=device)

        def infer(model=model, x=x):  # this iteration's model and input, bound now
            with torch.inference_mode(), autocast(device, NET_AMP):
                return model(x)

        profile_step(f"REP3D deploy fft forward, decoder {'channels_last' if cl else 'NCDHW'}, one window batch", infer,
                     device, 3, top=8, table=False, sources=True)
        del model
    if do_compile:
        for label, name, o, cl in [("REP3D fft, decoder NCDHW, compiled", "REP3D", ov, False),
                                   ("REP3D fft, decoder channels_last, compiled", "REP3D", ov, True),
                                   ("SwinUNETR, compiled", "SwinUNETR", tiny.get("SwinUNETR", {}), None)]:
            if time_left() < (120 if name == "REP3D" else 220):
                log(f"  (skipped {label}: {time_left():.0f} s left of --time_budget)")
                continue
            attrs = {} if cl is None else {"decoder_channels_last": cl}
            RESULTS["layout_train"][label] = run_train(label, name, o, device, roi, batch, classes, reps, fused=True,
                                                       compile=True, attrs=attrs)
    torch.backends.cudnn.benchmark = False


def section_final(device, roi, batch, classes, reps, tiny, do_compile=True):
    """The training iteration as main_train.py runs it now (decoder layout "auto", fused AdamW,
    cudnn.benchmark), eager and with --compile, next to SwinUNETR's in the same run."""
    log(f"\n== final: train {batch} x 1 x {'x'.join(map(str, roi))}, defaults of main_train (fused AdamW, "
        "cudnn.benchmark, AMP bf16) ==")
    torch.backends.cudnn.benchmark = True
    rows = RESULTS.setdefault("final_train", {})
    sw = tiny.get("SwinUNETR", {})
    plan = [("REP3D fft, eager", "REP3D", {"dwconv": "fft", **tiny.get("REP3D", {})}, None),
            ("3DUXNET auto, eager", "3DUXNET", {"dwconv": "auto", **tiny.get("3DUXNET", {})}, None),
            ("SwinUNETR, eager", "SwinUNETR", sw, None)]
    if do_compile:
        plan += [("REP3D fft, --compile", "REP3D", {"dwconv": "fft", **tiny.get("REP3D", {})}, True),
                 ("SwinUNETR, --compile", "SwinUNETR", sw, True)]
    for label, name, o, comp in plan:
        if comp and time_left() < (130 if name == "REP3D" else 230):
            log(f"  (skipped {label}: {time_left():.0f} s left of --time_budget)")
            continue
        rows[label] = run_train(label, name, o, device, roi, batch, classes, reps, fused=True, compile=comp)
    torch.backends.cudnn.benchmark = False


SECTIONS = ("check", "stages", "chain", "sweep", "train", "infer", "profile", "cuts", "tuned", "layout", "final")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda); not for picking a GPU: use CUDA_VISIBLE_DEVICES")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per training measurement (fewer if slow)")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile variant (slow to compile)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of this script on any device")
    parser.add_argument("--json", default=None, help="write all numbers to this JSON file")
    parser.add_argument("--time_budget", type=float, default=float("inf"),
                        help="seconds; optional slow variants (extra torch.compile runs) are skipped when less is left")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        parser.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible; pass --device cpu --quick for a smoke test")

    global NET_AMP, JSON_PATH, DEADLINE
    JSON_PATH = Path(args.json) if args.json else None
    DEADLINE = time.monotonic() + args.time_budget
    k, batch, classes = 21, 2, 16
    if args.quick:
        NET_AMP = device.type == "cuda"
        stages, kernels, roi, volume = [(4, 12), (8, 6)], [3, 7], (64, 64, 64), (80, 64, 64)
        tiny = {"REP3D": {"depths": (1, 1, 1, 1), "feature_size": (8, 16, 16, 32), "hidden_size": 32, "kernel_size": 7},
                "3DUXNET": {"depths": (1, 1, 1, 1), "feature_size": (8, 16, 16, 32), "hidden_size": 32},
                "SwinUNETR": {"feature_size": 12}}
        k = 7
    else:
        stages, kernels, roi, volume = [(48, 48), (96, 24), (192, 12), (384, 6)], [3, 5, 7, 9, 13], (96, 96, 96), (256, 256, 160)
        tiny = {}

    RESULTS["env"] = environment(device)
    RESULTS["argv"] = sys.argv
    log(f"environment: {json.dumps(RESULTS['env'])}")
    log(f"date: {time.strftime('%Y-%m-%d %H:%M:%S')}")
    torch.backends.cudnn.benchmark = False  # the default; the cuts section measures it on
    torch.manual_seed(0)
    runners = {
        "check": lambda: section_check(device, stages, k),
        "stages": lambda: section_stages(device, stages, k, batch),
        "chain": lambda: section_chain(device, stages, k, batch),
        "sweep": lambda: section_sweep(device, stages, kernels, batch),
        "train": lambda: section_train(device, roi, batch, classes, args.reps, tiny),
        "infer": lambda: section_infer(device, roi, volume, classes, tiny),
        "profile": lambda: section_profile(device, roi, batch, classes, tiny),
        "layout": lambda: section_layout(device, roi, volume, batch, classes, args.reps, tiny,
                                         do_compile=not args.no_compile),
        "final": lambda: section_final(device, roi, batch, classes, args.reps, tiny, do_compile=not args.no_compile),
        "tuned": lambda: section_tuned(device, roi, volume, batch, classes, args.reps, tiny),
        "cuts": lambda: section_cuts(device, roi, batch, classes, args.reps, tiny, volume, do_compile=not args.no_compile),
    }
    for s in sections:
        t0 = time.perf_counter()
        try:
            runners[s]()
        except Exception:  # noqa: BLE001 - one broken section must not lose the others' numbers
            log(f"section {s} FAILED:")
            traceback.print_exc()
        log(f"[section {s}: {time.perf_counter() - t0:.0f} s]")


if __name__ == "__main__":
    main()

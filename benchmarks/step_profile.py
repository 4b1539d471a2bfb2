"""Issue 25: the training step and deploy inference of REP3D against the nnU-Net topology, with a
torch.profiler breakdown (GPU kernel time by op, the gaps between kernels, launches per step).

One run, one process, medians after warm-up (CUDA events). A variant is ``NETWORK[@STATS][+compile]``:
``@STATS`` picks how the decoder's channels-last instance norms compute their statistics
(`networks.layout.instance_norm_impl`: ``auto`` (the default), ``triton``, ``batch_norm``, ``sums``), ``+compile`` runs the
network through ``torch.compile`` (its first step / call, timed apart, includes the compilation).

* check: REP3D's logits and gradients with each way of the statistics against ``batch_norm``;
* norms: the statistics alone on the decoder's activations (time, accuracy against float64), and the
  whole norm forward + backward, against ``F.instance_norm`` on NCDHW;
* step: 2 x 1 x 96^3 crops, 16 classes, MONAI DiceCE, fused AdamW (lr 1e-4, the same fixed recipe for
  every network, so that the ratio stays comparable across runs), bf16 autocast, cudnn.benchmark;
  REP3D (LRBM), REP3D Fixed Prior, the nnU-Net 3d_fullres topology for a 96^3 patch (MONAI DynUNet);
* infer: deploy-mode sliding window over 1 x 1 x 256 x 256 x 160 (roi 96, 4 windows a pass, overlap 0.5,
  gaussian), REP3D against the nnU-Net topology; ``+compile`` through
  :func:`rep3d.inference.sliding_window.compile_for_windows`;
* profile: torch.profiler of one REP3D (LRBM) training step and of one deploy window batch
  (``--profile_stats``), and of one nnU-Net topology step.

Usage, on the GPU machine from the repository root::

    python3 -m benchmarks.step_profile --json $OUT/step_profile.json

``--quick`` runs tiny shapes on any device (a smoke test; numbers meaningless).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections import defaultdict

import torch
from monai.losses import DiceCELoss

import networks
from networks import layout
from networks.layout import ChannelsLastInstanceNorm3d
from rep3d.inference.sliding_window import compile_for_windows, sliding_window_predict
from rep3d.training.graphs import StepGraph

RESULTS: dict = {}
JSON_PATH: list[str] = []  # where main() writes RESULTS: after every section and every timed variant


def _save() -> None:
    for path in JSON_PATH:
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, warmup: int, reps: int) -> dict:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def fwd_and_fwd_bwd(fn, grad, device: torch.device, reps: int, amp: bool = False) -> tuple[dict, dict]:
    """:func:`median_ms` of ``fn()`` under ``torch.no_grad()``, and of ``fn()`` with its backward (of
    ``grad``, or of the output's sum when None); ``amp``: inside bf16 autocast."""

    def amp_ctx():
        return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def fwd():
        with torch.no_grad(), amp_ctx():
            fn()

    def fwd_bwd():
        with amp_ctx():
            y = fn()
        y.backward(grad) if grad is not None else y.float().sum().backward()

    return median_ms(fwd, device, 3, reps), median_ms(fwd_bwd, device, 3, reps)


def variant(key: str) -> tuple[str, str, str]:
    """``"REP3D@sums+compile"`` -> (network ``REP3D``, kernels ``sums``, ``"compile"``): ``@`` picks
    `networks.layout.instance_norm_impl` for the run, ``+compile`` runs it through ``torch.compile``,
    ``+graph`` (training step only) replays its forward and backward as CUDA graphs
    (``main_train.py --cuda_graph on``: rep3d.training.graphs)."""
    key, _, mode = key.partition("+")
    name, _, stats = key.partition("@")
    return name, stats or "auto", mode


def build(name: str, classes: int, roi, tiny: bool, deploy: bool = False) -> torch.nn.Module:
    kw: dict = {}
    if name.startswith("REP3D"):
        kw = {"dwconv": "auto"}
        if tiny:
            kw.update(kernel_size=5, depths=(1, 1, 1, 1), feature_size=(8, 16, 16, 32), hidden_size=32)
    if name == "nnUNet":
        kw = {"img_size": tuple(roi)}
    if deploy:
        return networks.build_deploy_network(name, 1, classes, **kw)
    return networks.build_network(name, 1, classes, **kw)


def train_step(model, device, roi, batch, classes, graph: bool = False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.08, **({"fused": True} if device.type == "cuda" else {}))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.randn(batch, 1, *roi, device=device)
    y = torch.randint(0, classes, (batch, 1, *roi), device=device)
    dtype = torch.bfloat16
    # +graph: main_train.py --cuda_graph on (forward and backward recorded at the first step, then replayed)
    step_graph = StepGraph("on" if graph else "off", [])

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = step_graph.model(model, x, dtype)(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            loss = loss_fn(out.float(), y)
        loss.backward()
        opt.step()

    return step


STEP_VARIANTS = "REP3D,REP3D@pytorch,REP3D_FixedPrior,REP3D_FixedPrior@pytorch,nnUNet,REP3D+compile,nnUNet+compile"
INFER_VARIANTS = "REP3D,REP3D@pytorch,nnUNet,REP3D+compile,nnUNet+compile"


@contextlib.contextmanager
def norm_impl(impl: str):
    """``networks.layout.instance_norm_impl = impl`` inside, its default ``"auto"`` again after."""
    layout.instance_norm_impl = impl
    try:
        yield
    finally:
        layout.instance_norm_impl = "auto"


def _failed(rows: dict, key: str, label: str, err: Exception) -> None:
    """Record a variant that failed (e.g. to compile), so that the others still run."""
    rows[key] = {"error": f"{type(err).__name__}: {err}"[:2000]}
    print(f"{label}: FAILED {rows[key]['error'][:300]}", flush=True)


def _ratios(rows: dict, pairs) -> None:
    for a, b in pairs:
        if "median_ms" in rows.get(a, {}) and "median_ms" in rows.get(b, {}):
            rows[f"ratio {a} / {b}"] = rows[a]["median_ms"] / rows[b]["median_ms"]
            print(f"  ratio {a} / {b}: {rows[f'ratio {a} / {b}']:.3f}", flush=True)


def section_step(device, roi, batch, classes, reps, tiny, keys) -> None:
    rows = {}
    for key in keys:
        name, stats, mode = variant(key)
        torch.manual_seed(0)
        model = build(name, classes, roi, tiny).to(device).train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            with norm_impl(stats):
                step = train_step(torch.compile(model) if mode == "compile" else model, device, roi, batch, classes, graph=mode == "graph")
                step()  # the first step: cuDNN autotuning, torch.compile's compilation (graphs: captured above)
                _sync(device)
                first_s = time.perf_counter() - t0
                r = median_ms(step, device, warmup=3, reps=reps)
                host = []
                for _ in range(7):  # host time to issue a step (no synchronisation inside): ~ the step when host-bound
                    _sync(device)
                    t = time.perf_counter()
                    step()
                    host.append(1e3 * (time.perf_counter() - t))
                _sync(device)
        except Exception as e:
            _failed(rows, key, f"step {key}", e)
            continue
        r["host_ms"] = statistics.median(host)
        r["first_step_s"] = first_s
        r["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        r["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        rows[key] = r
        print(f"step {key}: {r['median_ms']:.1f} ms (min {r['min_ms']:.1f}; host {r['host_ms']:.1f}), first step {first_s:.1f} s, peak {r['peak_gib'] or 0:.2f} GiB, {r['params_m']:.1f}M params", flush=True)
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        RESULTS["step"] = rows
        _save()
    _ratios(rows, [(k, "nnUNet") for k in keys if k.startswith("REP3D")] + [("REP3D", "REP3D_FixedPrior"), ("REP3D+graph", "REP3D_FixedPrior+graph"), ("nnUNet+compile", "nnUNet"), ("REP3D+compile", "nnUNet+compile"), ("REP3D+graph", "nnUNet+graph")])


def section_infer(device, roi, volume, classes, tiny, reps, keys) -> None:
    rows = {}
    vol = torch.randn(1, 1, *volume, device=device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    sw = 4
    for key in keys:
        name, stats, mode = variant(key)
        torch.manual_seed(0)
        model = build(name, classes, roi, tiny, deploy=True).to(device).eval()
        windows = compile_for_windows(model, sw) if mode == "compile" else model

        def run(windows=windows):
            with torch.no_grad():
                return sliding_window_predict(windows, vol, roi, sw_batch_size=sw, overlap=0.5, mode="gaussian", amp_dtype=amp)

        t0 = time.perf_counter()
        try:
            with norm_impl(stats):
                run()
                _sync(device)
                first_s = time.perf_counter() - t0
                r = median_ms(run, device, warmup=2, reps=reps)
        except Exception as e:
            _failed(rows, key, f"infer {key}", e)
            continue
        r["first_call_s"] = first_s
        rows[key] = r
        print(f"infer {key}: {r['median_ms'] / 1e3:.3f} s per volume (first call {first_s:.1f} s)", flush=True)
        del model, windows
        RESULTS["infer"] = rows
        _save()
    _ratios(rows, [(k, "nnUNet") for k in keys if k.startswith("REP3D")] + [("nnUNet+compile", "nnUNet"), ("REP3D+compile", "nnUNet+compile")])


NORM_IMPLS = ("triton", "batch_norm", "sums")


def section_norms(device, reps) -> None:
    """The decoder's instance norm alone, each way (`networks.layout.instance_norm_impl`), on bf16
    channels-last activations: forward, and forward + backward, against ``F.instance_norm`` on NCDHW (what
    DynUNet runs); then each way's float32 output against float64 for |mean| / std of 0, 3 and 30."""
    rows: dict = {}
    cl = torch.channels_last_3d
    for shape in [(2, 48, 96, 96, 96), (4, 48, 96, 96, 96), (2, 96, 48, 48, 48), (4, 192, 24, 24, 24)]:
        gib = torch.Size(shape).numel() * 2 / 2**30
        for impl in NORM_IMPLS + ("F.instance_norm NCDHW",):
            if device.type != "cuda" and impl in ("triton", "batch_norm"):
                continue
            ncdhw = impl.startswith("F.")
            x = torch.randn(shape, device=device, dtype=torch.bfloat16)
            x = (x.contiguous() if ncdhw else x.contiguous(memory_format=cl)).requires_grad_()
            g = torch.randn_like(x)
            norm = (torch.nn.InstanceNorm3d(shape[1]) if ncdhw else ChannelsLastInstanceNorm3d(shape[1])).to(device)
            try:
                with norm_impl("auto" if ncdhw else impl):
                    f, fb = fwd_and_fwd_bwd(lambda norm=norm, x=x: norm(x), g, device, reps)
            except Exception as e:
                _failed(rows, f"norm {impl} {shape}", f"norm {impl} {shape}", e)
                continue
            rows[f"norm fwd {impl} {shape}"], rows[f"norm fwd+bwd {impl} {shape}"] = f, fb
            print(f"norm {impl:22s} {shape}: forward {f['median_ms']:.3f} ms ({gib / f['median_ms'] * 1e3:.0f} GiB/s of input), forward + backward {fb['median_ms']:.3f} ms", flush=True)
    # A residual block's last tail, LeakyReLU(norm2(a) + norm3(b)): PyTorch's kernels (the default
    # statistics) against the fused Triton kernels of networks/triton_norm.py
    for shape in [(2, 48, 96, 96, 96), (4, 48, 96, 96, 96)]:
        if device.type != "cuda":
            break
        a, b = (torch.randn(shape, device=device, dtype=torch.bfloat16).contiguous(memory_format=cl).requires_grad_() for _ in range(2))
        g = torch.randn_like(a)
        n2, n3, act = ChannelsLastInstanceNorm3d(shape[1]), ChannelsLastInstanceNorm3d(shape[1]), torch.nn.LeakyReLU(0.01, inplace=True)
        try:
            with norm_impl("triton"):
                kernels = layout.triton_kernels(a)
        except Exception as e:
            _failed(rows, f"tail triton {shape}", f"tail triton {shape}", e)
            kernels = None
        ways = {"pytorch": lambda: act(n2(a).add_(n3(b)))}
        if kernels is not None:
            ways["triton fused"] = lambda: kernels.fused_norm(a, b=b, slope=0.01)
        for label, fn in ways.items():
            f, fb = fwd_and_fwd_bwd(fn, g, device, reps)
            rows[f"tail fwd {label} {shape}"], rows[f"tail fwd+bwd {label} {shape}"] = f, fb
            print(f"tail LeakyReLU(norm(a) + norm(b)) {label:13s} {shape}: forward {f['median_ms']:.3f} ms, forward + backward {fb['median_ms']:.3f} ms", flush=True)
    if device.type == "cuda":
        _encoder_pieces(device, reps, rows)
    for ratio in (0.0, 3.0, 30.0):
        x = (torch.randn(2, 48, 48, 48, 48, device=device) + ratio).contiguous(memory_format=cl)
        ref = torch.nn.functional.instance_norm(x.double(), eps=1e-5)
        for impl in NORM_IMPLS:
            if device.type != "cuda" and impl in ("triton", "batch_norm"):
                continue
            with norm_impl(impl), torch.no_grad():
                y = ChannelsLastInstanceNorm3d(48).to(device)(x)
            rows[f"float32 output max abs error {impl} mean/std {ratio}"] = err = float((y.double() - ref).abs().max())
            print(f"norm {impl:10s} float32, |mean|/std {ratio:4.0f}: max abs error of the normalised output {err:.1e}", flush=True)
    RESULTS["norms"] = rows


def _encoder_pieces(device, reps, rows) -> None:
    """The single-channel 3^3 convolution into ``encoder1`` (cuDNN, and the gather + matrix product of
    networks.layout._single_channel_conv) and the encoders' channels-first LayerNorm (PyTorch's route and
    the Triton kernel), bf16 autocast, forward and forward + backward."""
    from monai.networks.blocks.dynunet_block import get_conv_layer

    from networks.blocks import LayerNormChannelsFirst

    for n in (2, 4):
        conv = get_conv_layer(3, 1, 48, kernel_size=3, stride=1, conv_only=False, act=None, norm=None).to(device).to(memory_format=torch.channels_last_3d)
        x = layout.to_channels_last_3d(torch.randn(n, 1, 96, 96, 96, device=device))
        for label, fn in (("cuDNN", lambda: conv(x)), ("gather", lambda: layout._single_channel_conv(conv, x))):
            f, fb = fwd_and_fwd_bwd(fn, None, device, reps, amp=True)
            rows[f"conv 1->48 fwd {label} n={n}"], rows[f"conv 1->48 fwd+bwd {label} n={n}"] = f, fb
            print(f"conv 1 -> 48 channels, 3^3, {n} x 96^3, {label:6s}: forward {f['median_ms']:.3f} ms, forward + backward {fb['median_ms']:.3f} ms", flush=True)

    for shape in [(2, 48, 48, 48, 48), (4, 96, 24, 24, 24)]:
        ln = LayerNormChannelsFirst(shape[1]).to(device)
        x = torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True)
        for impl in ("pytorch", "triton"):
            try:
                with norm_impl(impl):
                    f, fb = fwd_and_fwd_bwd(lambda: ln(x), None, device, reps, amp=True)
            except Exception as e:
                _failed(rows, f"layer norm {impl} {shape}", f"layer norm {impl} {shape}", e)
                continue
            rows[f"layer norm fwd {impl} {shape}"], rows[f"layer norm fwd+bwd {impl} {shape}"] = f, fb
            print(f"channels-first LayerNorm {impl:7s} {shape}: forward {f['median_ms']:.3f} ms, forward + backward {fb['median_ms']:.3f} ms", flush=True)


def section_check(device, roi, batch, classes, tiny) -> None:
    """Each way of the instance statistics against ``batch_norm``, same weights and input: relative L2
    difference of REP3D's logits and parameter gradients, float32 and bf16 autocast."""
    rows = {}
    torch.manual_seed(0)
    model = build("REP3D", classes, roi, tiny).to(device).train()
    x = torch.randn(batch, 1, *roi, device=device)
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    for label, dtype in (("float32", None), ("bf16", torch.bfloat16)):
        outs = {}
        for stats in ("batch_norm",) + tuple(i for i in NORM_IMPLS if i != "batch_norm" and (device.type == "cuda" or i == "sums")):
            model.zero_grad(set_to_none=True)
            with norm_impl(stats):
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    y = model(x)
                (y.float() ** 2).mean().backward()
            outs[stats] = (y.detach().float(), torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None]))
        for stats in [k for k in outs if k != "batch_norm"]:
            rows[f"{stats} {label}"] = {"logits_rel_l2": rel(outs[stats][0], outs["batch_norm"][0]), "grads_rel_l2": rel(outs[stats][1], outs["batch_norm"][1])}
            print(f"{stats} vs batch_norm statistics, {label}: logits rel L2 {rows[f'{stats} {label}']['logits_rel_l2']:.2e}, gradients {rows[f'{stats} {label}']['grads_rel_l2']:.2e}", flush=True)
    RESULTS["check_stats"] = rows


def _category(name: str) -> str:
    n = name.lower()
    for key, cat in (
        ("fft", "fft"), ("conv", "convolution"), ("gemm", "matmul"), ("sm90", "matmul"), ("norm", "norm"),
        ("softmax", "softmax/loss"), ("nll", "softmax/loss"), ("reduce", "reduction"), ("adam", "optimizer"),
        ("elementwise", "elementwise"), ("vectorized", "elementwise"), ("copy", "copy/layout"), ("transpose", "copy/layout"),
        ("cat", "copy/layout"), ("pad", "copy/layout"), ("index", "index/gather"), ("scatter", "index/gather"),
    ):  # fmt: skip
        if key in n:
            return cat
    return "other"


def profile(label: str, fn, device, steps: int = 3, top: int = 25) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        fn()
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with torch_profile(activities=acts, record_shapes=False) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    ops = sorted(
        ({"op": e.key, "ms": getattr(e, attr, 0.0) / 1e3 / steps, "calls": e.count / steps} for e in events),
        key=lambda r: -r["ms"],
    )
    # GPU kernels only (not the CPU-side ops that contain them): device type CUDA events.
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA")]
    by_cat: dict = defaultdict(float)
    by_name: dict = defaultdict(lambda: [0.0, 0])
    kernel_ms = 0.0
    spans = []
    for e in kernels:
        ms = e.time_range.elapsed_us() / 1e3 / steps
        kernel_ms += ms
        by_cat[_category(e.name)] += ms
        by_name[e.name][0] += ms
        by_name[e.name][1] += 1
        spans.append((e.time_range.start, e.time_range.end))
    busy = 0.0
    last_end = None
    for s, e in sorted(spans):  # union of kernel intervals: the GPU's busy time
        if last_end is None or s > last_end:
            busy += e - s
            last_end = e
        elif e > last_end:
            busy += e - last_end
            last_end = e
    busy_ms = busy / 1e3 / steps
    out = {
        "wall_ms": wall_ms,
        "kernel_ms": kernel_ms,
        "gpu_busy_ms": busy_ms,
        "gpu_idle_fraction": 1 - busy_ms / wall_ms if wall_ms else None,
        "kernels_per_step": len(kernels) / steps,
        "by_category_ms": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
        "top_ops": [r for r in ops if not r["op"].startswith("ProfilerStep")][:top],
        "top_kernels": [{"kernel": k[:200], "ms": v[0], "calls": v[1] / steps} for k, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:40]],
    }
    print(f"\n== profile: {label} ==\nwall {wall_ms:.1f} ms/step, GPU busy {busy_ms:.1f} ms ({100 * (1 - (out['gpu_idle_fraction'] or 0)):.0f}%), "
          f"kernel time {kernel_ms:.1f} ms, {out['kernels_per_step']:.0f} kernels/step", flush=True)
    for cat, ms in out["by_category_ms"].items():
        print(f"  {cat:14s} {ms:8.2f} ms", flush=True)
    for r in out["top_ops"][:top]:
        print(f"  {r['ms']:8.2f} ms  {r['calls']:6.0f}x  {r['op'][:90]}", flush=True)
    print("  -- kernels by name --", flush=True)
    for r in out["top_kernels"][:top]:
        print(f"  {r['ms']:8.2f} ms  {r['calls']:6.0f}x  {r['kernel'][:110]}", flush=True)
    return out


def section_profile(device, roi, batch, classes, tiny) -> None:
    torch.manual_seed(0)
    model = build("REP3D", classes, roi, tiny).to(device).train()
    RESULTS["profile_step_rep3d"] = profile("REP3D (LRBM) training step", train_step(model, device, roi, batch, classes), device)
    # The LRBM masks alone (what the generator costs per step, forward + backward)
    mods = [m for m in model.modules() if type(m).__name__ == "KernelModulation" and m.generator is not None]

    def masks():
        total = sum((m() * 1.0).sum() for m in mods)
        total.backward()

    RESULTS["lrbm_masks_fwd_bwd"] = median_ms(masks, device, warmup=3, reps=20)
    RESULTS["lrbm_masks_fwd_bwd"]["blocks"] = len(mods)
    print(f"LRBM masks of {len(mods)} blocks, fwd+bwd: {RESULTS['lrbm_masks_fwd_bwd']['median_ms']:.2f} ms", flush=True)
    del model
    deploy = build("REP3D", classes, roi, tiny, deploy=True).to(device).eval()
    x = torch.randn(4, 1, *roi, device=device)

    def window():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            deploy(x)

    RESULTS["profile_infer_rep3d"] = profile("REP3D deploy, one batch of 4 windows", window, device)
    torch.manual_seed(0)
    nn_model = build("nnUNet", classes, roi, tiny).to(device).train()
    RESULTS["profile_step_nnunet"] = profile("nnU-Net topology training step", train_step(nn_model, device, roi, batch, classes), device, top=12)


def _profiled(impl: str, *args) -> None:
    with norm_impl(impl):
        section_profile(*args)


def environment(device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    try:
        import monai

        env["monai"] = monai.__version__
    except ImportError:
        pass
    return env


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="check,norms,step,infer,profile")
    p.add_argument("--step", default=STEP_VARIANTS, help="training-step variants: NETWORK[@STATS][+compile], comma-separated")
    p.add_argument("--infer", default=INFER_VARIANTS, help="deploy-inference variants, as --step")
    p.add_argument("--profile_stats", default="auto", help="instance statistics of the profiled REP3D runs")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="tiny shapes on any device: a smoke test")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    roi, volume, batch, classes = ((32, 32, 32), (48, 48, 40), 2, 3) if a.quick else ((96, 96, 96), (256, 256, 160), 2, 16)
    JSON_PATH[:] = [a.json] if a.json else []
    RESULTS["environment"] = environment(device)
    RESULTS["setup"] = {"roi": roi, "volume": volume, "batch": batch, "classes": classes}
    print(json.dumps(RESULTS["environment"]), flush=True)
    sections = a.sections.split(",")
    for name, fn in (
        ("check", lambda: section_check(device, roi, batch, classes, a.quick)),
        ("norms", lambda: section_norms(device, a.reps)),
        ("step", lambda: section_step(device, roi, batch, classes, a.reps, a.quick, a.step.split(","))),
        ("infer", lambda: section_infer(device, roi, volume, classes, a.quick, max(3, a.reps // 3), a.infer.split(","))),
        ("profile", lambda: _profiled(a.profile_stats, device, roi, batch, classes, a.quick)),
    ):
        if name in sections:
            fn()
            _save()
    return RESULTS


if __name__ == "__main__":
    main()

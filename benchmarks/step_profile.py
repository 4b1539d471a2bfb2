"""Issue 25: the training step and deploy inference of REP3D against the nnU-Net topology, with a
torch.profiler breakdown (GPU kernel time by op, the gaps between kernels, launches per step).

One run, one process, medians after warm-up (CUDA events):

* check: REP3D with the decoder's fused norms (networks/fused_norms.py) against the stock blocks, same
  weights and input: relative L2 difference of logits and gradients, float32 and bf16;
* step: 2 x 1 x 96^3 crops, 16 classes, MONAI DiceCE, fused AdamW (lr 1e-4, the same fixed recipe for
  every network, so that the ratio stays comparable across runs), bf16 autocast, cudnn.benchmark;
  REP3D (LRBM) with stock and with fused decoder norms (first step timed apart: it compiles), REP3D Fixed
  Prior, the nnU-Net 3d_fullres topology for a 96^3 patch (MONAI DynUNet);
* infer: deploy-mode sliding window over 1 x 1 x 256 x 256 x 160 (roi 96, overlap 0.5, gaussian), REP3D
  (stock, fused norms) against the nnU-Net topology at 4 and 8 windows per pass, and on CUDA each also
  replayed as a CUDA graph per window batch (:func:`rep3d.inference.sliding_window.graph_for_windows`);
* profile: torch.profiler of one REP3D (LRBM, fused norms) step and of one deploy window batch.

Usage, on the GPU machine from the repository root::

    python3 -m benchmarks.step_profile --json $OUT/step_profile.json

``--quick`` runs tiny shapes on any device (a smoke test; numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch
from monai.losses import DiceCELoss

import networks
from networks.fused_norms import use_fused_norms
from rep3d.inference.sliding_window import graph_for_windows, sliding_window_predict

RESULTS: dict = {}


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


def build(name: str, classes: int, roi, tiny: bool, deploy: bool = False) -> torch.nn.Module:
    """``REP3D_fused``: REP3D with the decoder's norms fused (networks/fused_norms.py, ``"auto"``)."""
    if name == "REP3D_fused":
        model = build("REP3D", classes, roi, tiny, deploy)
        use_fused_norms(model, "auto")
        return model
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


def train_step(model, device, roi, batch, classes):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.08, **({"fused": True} if device.type == "cuda" else {}))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.randn(batch, 1, *roi, device=device)
    y = torch.randint(0, classes, (batch, 1, *roi), device=device)
    dtype = torch.bfloat16

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = model(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            loss = loss_fn(out.float(), y)
        loss.backward()
        opt.step()

    return step


def section_step(device, roi, batch, classes, reps, tiny) -> None:
    rows = {}
    for name in ("REP3D", "REP3D_fused", "REP3D_FixedPrior", "nnUNet"):
        torch.manual_seed(0)
        model = build(name, classes, roi, tiny).to(device).train()
        step = train_step(model, device, roi, batch, classes)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step()  # the first step: cuDNN autotuning, and the fused norms' compilation
        _sync(device)
        first_s = time.perf_counter() - t0
        r = median_ms(step, device, warmup=3, reps=reps)
        r["first_step_s"] = first_s
        r["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        r["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        rows[name] = r
        print(f"step {name}: {r['median_ms']:.1f} ms (min {r['min_ms']:.1f}), peak {r['peak_gib'] or 0:.2f} GiB, {r['params_m']:.1f}M params", flush=True)
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows["ratio_rep3d_to_nnunet"] = rows["REP3D"]["median_ms"] / rows["nnUNet"]["median_ms"]
    rows["ratio_lrbm_to_fixed"] = rows["REP3D"]["median_ms"] / rows["REP3D_FixedPrior"]["median_ms"]
    rows["ratio_fused_rep3d_to_nnunet"] = rows["REP3D_fused"]["median_ms"] / rows["nnUNet"]["median_ms"]
    print(f"step ratios: REP3D / nnUNet {rows['ratio_rep3d_to_nnunet']:.2f} (fused norms {rows['ratio_fused_rep3d_to_nnunet']:.2f}), LRBM / Fixed {rows['ratio_lrbm_to_fixed']:.3f}", flush=True)
    RESULTS["step"] = rows


def section_infer(device, roi, volume, classes, tiny, reps) -> None:
    rows = {}
    vol = torch.randn(1, 1, *volume, device=device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    variants = [("REP3D", 4, False), ("REP3D_fused", 4, False), ("nnUNet", 4, False), ("REP3D_fused", 8, False), ("nnUNet", 8, False)]
    if device.type == "cuda":  # the same eager kernels replayed as one CUDA graph per window batch
        variants += [("REP3D", 4, True), ("REP3D_fused", 4, True), ("nnUNet", 4, True)]
    for name, sw, graphed in variants:
        torch.manual_seed(0)
        model = build(name, classes, roi, tiny, deploy=True).to(device).eval()
        if graphed:
            model = graph_for_windows(model, sw, amp)

        def run(model=model, sw=sw):
            with torch.no_grad():
                return sliding_window_predict(model, vol, roi, sw_batch_size=sw, overlap=0.5, mode="gaussian", amp_dtype=amp)

        t0 = time.perf_counter()
        run()
        _sync(device)
        first_s = time.perf_counter() - t0
        r = median_ms(run, device, warmup=2, reps=reps)
        r["first_call_s"] = first_s
        key = (name if sw == 4 else f"{name}_sw{sw}") + ("_graph" if graphed else "")
        rows[key] = r
        print(f"infer {key}: {r['median_ms'] / 1e3:.3f} s per volume (first call {first_s:.1f} s)", flush=True)
        del model
    rows["ratio_rep3d_to_nnunet"] = rows["REP3D"]["median_ms"] / rows["nnUNet"]["median_ms"]
    rows["ratio_fused_rep3d_to_nnunet"] = rows["REP3D_fused"]["median_ms"] / rows["nnUNet"]["median_ms"]
    rows["ratio_fused_rep3d_to_nnunet_sw8"] = rows["REP3D_fused_sw8"]["median_ms"] / rows["nnUNet_sw8"]["median_ms"]
    if "REP3D_fused_graph" in rows:
        rows["ratio_fused_graph_rep3d_to_nnunet"] = rows["REP3D_fused_graph"]["median_ms"] / rows["nnUNet"]["median_ms"]
        rows["ratio_fused_graph_rep3d_to_nnunet_graph"] = rows["REP3D_fused_graph"]["median_ms"] / rows["nnUNet_graph"]["median_ms"]
        print(f"infer ratio, REP3D fused + CUDA graph / nnUNet eager {rows['ratio_fused_graph_rep3d_to_nnunet']:.2f}, / nnUNet graphed {rows['ratio_fused_graph_rep3d_to_nnunet_graph']:.2f}", flush=True)
    print(f"infer ratio REP3D / nnUNet {rows['ratio_rep3d_to_nnunet']:.2f} (fused norms {rows['ratio_fused_rep3d_to_nnunet']:.2f}; fused, 8 windows a pass {rows['ratio_fused_rep3d_to_nnunet_sw8']:.2f})", flush=True)
    RESULTS["infer"] = rows


def section_check(device, roi, batch, classes, tiny) -> None:
    """Fused against stock decoder norms, same weights and input: relative L2 difference of the logits
    and of the parameter gradients, in float32 and under bf16 autocast."""
    rows = {}
    torch.manual_seed(0)
    fused = build("REP3D_fused", classes, roi, tiny).to(device).train()
    stock = build("REP3D", classes, roi, tiny).to(device).train()
    stock.load_state_dict(fused.state_dict())
    x = torch.randn(batch, 1, *roi, device=device)
    for label, dtype in (("float32", None), ("bf16", torch.bfloat16)):
        outs = []
        for model in (fused, stock):
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                y = model(x)
            (y.float() ** 2).mean().backward()
            grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
            outs.append((y.detach().float(), grads))
        rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
        rows[label] = {"logits_rel_l2": rel(outs[0][0], outs[1][0]), "grads_rel_l2": rel(outs[0][1], outs[1][1])}
        print(f"fused vs stock norms, {label}: logits rel L2 {rows[label]['logits_rel_l2']:.2e}, gradients {rows[label]['grads_rel_l2']:.2e}", flush=True)
    RESULTS["check_fused"] = rows


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
    kernel_ms = 0.0
    spans = []
    for e in kernels:
        ms = e.time_range.elapsed_us() / 1e3 / steps
        kernel_ms += ms
        by_cat[_category(e.name)] += ms
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
    }
    print(f"\n== profile: {label} ==\nwall {wall_ms:.1f} ms/step, GPU busy {busy_ms:.1f} ms ({100 * (1 - (out['gpu_idle_fraction'] or 0)):.0f}%), "
          f"kernel time {kernel_ms:.1f} ms, {out['kernels_per_step']:.0f} kernels/step", flush=True)
    for cat, ms in out["by_category_ms"].items():
        print(f"  {cat:14s} {ms:8.2f} ms", flush=True)
    for r in out["top_ops"][:top]:
        print(f"  {r['ms']:8.2f} ms  {r['calls']:6.0f}x  {r['op'][:90]}", flush=True)
    return out


def section_profile(device, roi, batch, classes, tiny) -> None:
    torch.manual_seed(0)
    model = build("REP3D_fused", classes, roi, tiny).to(device).train()
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
    deploy = build("REP3D_fused", classes, roi, tiny, deploy=True).to(device).eval()
    x = torch.randn(4, 1, *roi, device=device)

    def window():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            deploy(x)

    RESULTS["profile_infer_rep3d"] = profile("REP3D deploy, one batch of 4 windows", window, device)
    torch.manual_seed(0)
    nn_model = build("nnUNet", classes, roi, tiny).to(device).train()
    RESULTS["profile_step_nnunet"] = profile("nnU-Net topology training step", train_step(nn_model, device, roi, batch, classes), device, top=12)


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
    p.add_argument("--sections", default="check,step,infer,profile")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="tiny shapes on any device: a smoke test")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    roi, volume, batch, classes = ((32, 32, 32), (48, 48, 40), 2, 3) if a.quick else ((96, 96, 96), (256, 256, 160), 2, 16)
    RESULTS["environment"] = environment(device)
    RESULTS["setup"] = {"roi": roi, "volume": volume, "batch": batch, "classes": classes}
    print(json.dumps(RESULTS["environment"]), flush=True)
    sections = a.sections.split(",")
    for name, fn in (
        ("check", lambda: section_check(device, roi, batch, classes, a.quick)),
        ("step", lambda: section_step(device, roi, batch, classes, a.reps, a.quick)),
        ("infer", lambda: section_infer(device, roi, volume, classes, a.quick, max(3, a.reps // 3))),
        ("profile", lambda: section_profile(device, roi, batch, classes, a.quick)),
    ):
        if name in sections:
            fn()
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(RESULTS, f, indent=1, default=str)
    return RESULTS


if __name__ == "__main__":
    main()

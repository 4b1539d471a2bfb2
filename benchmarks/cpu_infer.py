"""CPU inference timing: REP3D against SwinUNETR and 3D UX-Net, PyTorch (native or FFT depthwise) against
ONNX Runtime, per 96^3 window and for one 256 x 256 x 160 volume.

    python3 -m benchmarks.cpu_infer --threads 2 --output benchmarks/cpu_infer.json

(from the repository root; ``python3 benchmarks/cpu_infer.py`` works the same once the package is installed,
``pip install -e .``).

Every network is built at the paper's size (16 classes, random weights: speed does not depend on them)
and folded (deploy form). Paths:

* ``torch-native`` / ``torch-fft``: PyTorch eager, float32, ``torch.no_grad``, depthwise
  convolutions native (``F.conv3d``) or FFT (``networks.fftconv``, kernel spectra cached);
* ``torch-native-bf16`` / ``torch-fft-bf16`` (``torch-bf16`` for networks without the choice): the
  same under bf16 autocast, which is what ``test_seg.py --amp auto`` runs on a CPU with native bf16
  (the decoders of REP3D and 3D UX-Net then run channels-last); the FFT itself stays float32;
* ``onnx-native``: the ``rep3d.export.exporter.export_onnx`` export with dynamic axes, in ONNX Runtime;
* ``onnx-fft``: the FFT path exported for the 96^3 window (ONNX ``DFT``), in ONNX Runtime.

Per window: every path is built (and exported) and warmed up first, then timed round-robin, one window
(batch 1) per path per round, ``--repeats`` rounds: on a shared machine the load changes within minutes,
and interleaving lets every path see the same load. The median over rounds is reported.
Per volume: ``--volume`` voxels (already at the target spacing) by MONAI's sliding window (overlap 0.5,
Gaussian blending, one window per pass): measured end to end for the paths given to
``--full_volume`` (default: the fastest path of each network), else estimated as
windows x per-window time + the stitching overhead (measured with a 1x1x1 convolution in place of the
network), and marked as estimated.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn

import networks
from rep3d.cli import network_overrides
from rep3d.commands.predict import parse_args as predict_args
from rep3d.config import (
    DataConfig,
    NetworkConfig,
    RunConfig,
    SlidingWindowConfig,
    TrainConfig,
)
from rep3d.data.dataset_config import get_dataset_config
from rep3d.export.exporter import export_checkpoint, export_onnx
from rep3d.inference.exported import export_runner
from rep3d.inference.run import run_inference
from rep3d.inference.sliding_window import sliding_window_predict
from rep3d.runtime import autocast, cpu_has_native_bf16


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> tuple[float, float, float]:
    return os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3


def n_windows(volume, roi, overlap: float) -> int:
    """Windows MONAI's sliding_window_inference runs over ``volume``."""
    n = 1
    for v, r in zip(volume, roi):
        step = max(int(r * (1 - overlap)), 1)
        n *= 1 if v <= r else math.ceil((v - r) / step) + 1
    return n


def build(name: str, impl: str | None) -> nn.Module:
    kwargs = {"dwconv": impl} if impl else {}
    model = networks.build_deploy_network(name, 1, 16, **kwargs) if networks.is_deployable(name) else networks.build_network(name, 1, 16, **kwargs).eval()
    if impl:
        networks.set_dwconv_impl(model, impl)
    return model.eval()


def parse_path(path: str) -> tuple[str, str | None, bool]:
    """``"torch-fft-bf16"`` -> ``("torch", "fft", True)``; ValueError for a name that is not a path."""
    backend, *rest = path.split("-")
    bf16 = rest[-1:] == ["bf16"]
    impl = rest[:-1] if bf16 else rest
    if backend not in ("torch", "onnx") or len(impl) != 1 or impl[0] not in ("native", "fft") or (bf16 and backend != "torch"):
        raise ValueError(path)
    return backend, impl[0], bf16


def torch_runner(model: nn.Module, amp_dtype: torch.dtype | None = None):
    def run(x):
        with torch.no_grad(), autocast(torch.device("cpu"), amp_dtype):
            return model(x).float()

    return run


def onnx_runner(model: nn.Module, roi, impl: str | None, threads: int, folder: str, name: str):
    path = os.path.join(folder, f"{name}_{impl or 'plain'}.onnx")
    t = time.perf_counter()
    info = export_onnx(model, path, torch.randn(1, 1, *roi), dynamic=True, dynamic_spatial=impl != "fft")
    export_s = time.perf_counter() - t
    run = export_runner("onnx", path, threads=threads)
    return run, {"export_s": export_s, "dynamic_axes": info["dynamic_axes"], "mb": os.path.getsize(path) / 2**20}


def write_checkpoint(name: str, folder: str, roi, spacing=(1.5, 1.5, 1.5), num_classes: int = 16) -> str:
    """A format-2 checkpoint (as main_train.py writes) of ``name`` at the paper's size with random weights."""
    torch.manual_seed(0)
    model = networks.build_network(name, 1, num_classes, **network_overrides(name, {}, roi))
    ds = get_dataset_config("custom", spacing=tuple(spacing), intensity="window", a_min=-175.0, a_max=250.0, num_classes=num_classes,
                            class_names=[f"c{i}" for i in range(num_classes)], roi=tuple(roi), cache_rate=0.0)  # fmt: skip
    run = RunConfig(NetworkConfig(name, 1, num_classes, {}), DataConfig(dataset=ds), TrainConfig(), SlidingWindowConfig())
    path = os.path.join(folder, f"{name}.pth")
    torch.save(run.checkpoint(model.state_dict(), step=1), path)
    return path


def time_test_seg(name: str, use_export: bool, folder: str, roi, volume, threads: int) -> dict:
    """``test_seg.py`` end to end with its defaults (``--amp auto``, ``--dwconv auto``, one window per pass on the CPU)
    on one synthetic CT volume of ``volume`` voxels already at the target spacing: the checkpoint, or its
    ONNX export (``model.json``, ONNX Runtime) when ``use_export``."""
    import nibabel as nib
    import numpy as np

    ckpt = write_checkpoint(name, folder, roi)
    weights = ckpt
    if use_export:
        export_checkpoint(ckpt, os.path.join(folder, f"{name}_export"), formats=["onnx"])
        weights = os.path.join(folder, f"{name}_export", "model.json")
    image = os.path.join(folder, "volume", "ct_0000.nii.gz")
    if not os.path.exists(image):
        os.makedirs(os.path.dirname(image), exist_ok=True)
        rng = np.random.default_rng(0)
        nib.save(nib.Nifti1Image(rng.normal(0, 300, volume).astype(np.float32), np.diag([1.5, 1.5, 1.5, 1.0])), image)
    args = predict_args(["--trained_weights", weights, "--input", image, "--output", os.path.join(folder, f"pred_{name}"), "--threads", str(threads), "--num_workers", "0"])
    t = time.perf_counter()
    res = run_inference(args)
    total = time.perf_counter() - t
    return {"network": name, "weights": "ONNX export (model.json)" if use_export else "checkpoint", "test_seg_s": total,
            "predict_s": res["timings"][0]["predict"], "load": load_average()[0]}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", default=["REP3D", "SwinUNETR", "3DUXNET"])
    p.add_argument("--paths", nargs="+", default=["torch-native", "torch-fft", "torch-native-bf16", "torch-fft-bf16", "onnx-native", "onnx-fft"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--roi", type=int, nargs=3, default=[96, 96, 96])
    p.add_argument("--volume", type=int, nargs=3, default=[256, 256, 160])
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--full_volume", nargs="*", default=None, metavar="NETWORK:PATH", help="paths timed end to end on the volume (default: each network's fastest; pass none to estimate all)")
    p.add_argument("--test_seg", action="store_true", help="also time test_seg.py end to end on the volume for each network's fastest path (its checkpoint for a torch path, its ONNX export for an onnx one)")
    p.add_argument("--output", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    bad = []
    for path in args.paths:
        try:
            parse_path(path)
        except ValueError:
            bad.append(path)
    if bad:
        p.error(f"--paths {' '.join(bad)}: each path is torch-native, torch-fft, onnx-native or onnx-fft, with -bf16 for torch only")
    torch.set_num_threads(args.threads)
    roi, volume = tuple(args.roi), tuple(args.volume)
    windows = n_windows(volume, roi, args.overlap)
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_name(), "cores_visible": os.cpu_count(), "threads": args.threads,
        "torch": torch.__version__, "python": platform.python_version(), "load_average_start": load_average(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
    }  # fmt: skip
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        env["onnxruntime"] = None
    print(json.dumps(env), flush=True)
    results = []
    runners = {}
    x = torch.randn(1, 1, *roi)
    with tempfile.TemporaryDirectory() as folder:
        # Build (and export) every path first, then time them round-robin: on a shared machine the load
        # changes within minutes, and interleaving makes every path see the same load.
        for name in args.networks:
            has_dw = networks.network_accepts(name, "dwconv")
            for path in args.paths:
                backend, impl, bf16 = parse_path(path)
                label = path if has_dw else backend + ("-bf16" if bf16 else "")
                if (not has_dw and impl == "fft") or any(r["network"] == name and r["path"] == label for r in results):
                    continue
                row = {"network": name, "path": label, "window_all_s": [], "load_per_round": []}
                try:
                    model = build(name, impl if has_dw else None)
                    if backend == "torch":
                        run = torch_runner(model, torch.bfloat16 if bf16 else None)
                    else:
                        run, info = onnx_runner(model, roi, impl if has_dw else None, args.threads, folder, name)
                        row.update(info)
                    run(x)  # warm-up: allocations, FFT plans and spectra, ONNX Runtime's first run
                    runners[(name, label)] = run
                except Exception as err:  # noqa: BLE001 - record and go on (e.g. an export that fails)
                    row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
                results.append(row)
        for _ in range(args.repeats):
            for row in results:
                run = runners.get((row["network"], row["path"]))
                if run is None:
                    continue
                row["load_per_round"].append(load_average()[0])
                t = time.perf_counter()
                run(x)
                row["window_all_s"].append(time.perf_counter() - t)
        for row in results:
            if row["window_all_s"]:
                row["window_s"] = statistics.median(row["window_all_s"])
            print(json.dumps(row), flush=True)

        # stitching overhead: the sliding window with a trivial network
        trivial = nn.Conv3d(1, 16, 1).eval()
        vol = torch.randn(1, 1, *volume)
        t = time.perf_counter()
        sliding_window_predict(torch_runner(trivial), vol, roi, 1, args.overlap, "gaussian")
        overhead = time.perf_counter() - t
        print(json.dumps({"windows": windows, "stitch_overhead_s": overhead}), flush=True)

        full = args.full_volume
        if full is None:
            full = []
            for name in args.networks:
                ok = [r for r in results if r["network"] == name and "window_s" in r]
                if ok:
                    best = min(ok, key=lambda r: r["window_s"])
                    full.append(f"{name}:{best['path']}")
        for r in results:
            if "window_s" in r:
                r["volume_estimated_s"] = windows * r["window_s"] + overhead
        for spec in full:
            name, path = spec.split(":")
            run = runners.get((name, path))
            if run is None:
                continue
            t = time.perf_counter()
            sliding_window_predict(run, vol, roi, 1, args.overlap, "gaussian")
            measured = time.perf_counter() - t
            for r in results:
                if r["network"] == name and r["path"] == path:
                    r["volume_measured_s"] = measured
            print(json.dumps({"network": name, "path": path, "volume_measured_s": measured, "load": load_average()[0]}), flush=True)
        end_to_end = []
        # ONNX Runtime's sessions keep their memory arenas: free every path before test_seg.py's own
        # models are loaded (with all of them held, the 24 GiB machine ran out of memory).
        runners.clear()
        gc.collect()
        if args.test_seg:
            for name in args.networks:
                ok = [r for r in results if r["network"] == name and "window_s" in r]
                if ok:
                    best = min(ok, key=lambda r: r["window_s"])
                    end_to_end.append(time_test_seg(name, best["path"].startswith("onnx"), folder, roi, volume, args.threads))
                    print(json.dumps(end_to_end[-1]), flush=True)
    env["load_average_end"] = load_average()
    out = {"env": env, "windows": windows, "stitch_overhead_s": overhead, "results": results, "test_seg": end_to_end}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)
    print("\n| network | path | per window (s) | volume (s) |\n| --- | --- | --- | --- |")
    for r in results:
        if "window_s" not in r:
            print(f"| {r['network']} | {r['path']} | failed: {r['error']} | |")
            continue
        vol_s = f"{r['volume_measured_s']:.0f} (measured)" if "volume_measured_s" in r else f"{r['volume_estimated_s']:.0f} (estimated)"
        print(f"| {r['network']} | {r['path']} | {r['window_s']:.2f} | {vol_s} |")
    for r in end_to_end:
        print(f"test_seg.py, {r['network']} ({r['weights']}): {r['test_seg_s']:.0f} s in all, {r['predict_s']:.0f} s predicting")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end inference timing through test_seg.py itself (issue 7: 256 x 256 x 160 in <= 0.8 s).

Writes a few synthetic 256 x 256 x 160 CT volumes at the AMOS spacing (so that resampling keeps their
size and the windows cover exactly that grid) and a full-size REP3D with random weights, then runs
``test_seg.py`` on them in eager mode and with ``--compile`` (AMP, gaussian blending, sw_batch_size 4,
overlap 0.5: the defaults). Prints test_seg's own per-case ``predict`` time (sliding window + softmax
on the GPU) and its median over the cases after the first (the first includes warm-up / compilation).

Usage (on a GPU machine, from the repository root; ``python3 benchmarks/infer_check.py`` works the same once
the package is installed, ``pip install -e .``)::

    python3 -m benchmarks.infer_check --out /tmp/infer_check --cases 5
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from networks import build_network
from rep3d.commands.predict import parse_args as predict_args
from rep3d.inference.run import run_inference


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/infer_check", help="working folder (volumes, checkpoint, predictions)")
    parser.add_argument("--cases", type=int, default=5, help="volumes to predict per setting (the first is warm-up)")
    parser.add_argument("--size", type=int, nargs=3, default=(256, 256, 160), help="volume size in voxels")
    parser.add_argument("--settings", default="eager,compile", help="comma-separated: eager, compile")
    args = parser.parse_args(argv)
    out = Path(args.out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ckpt = out / "rep3d_random.pth"
    torch.save(build_network("REP3D", 1, 16).state_dict(), ckpt)
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])  # the amos preset's spacing: no resampling change of size
    for i in range(args.cases):
        vol = rng.uniform(-100.0, 250.0, size=tuple(args.size)).astype(np.float32)  # inside the CT window: no crop
        nib.save(nib.Nifti1Image(vol, affine), str(images / f"case{i:02d}.nii.gz"))

    results = {}
    for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
        argv_seg = ["--input", str(images), "--dataset", "amos", "--network", "REP3D", "--trained_weights", str(ckpt),
                    "--output", str(out / f"pred_{setting}"), "--num_workers", "2", "--no_hd95"]
        if setting == "compile":
            argv_seg.append("--compile")
        res = run_inference(predict_args(argv_seg))
        times = [t["predict"] for t in res["timings"]]
        warm = times[1:] or times
        results[setting] = {"predict_s": times, "median_after_first_s": statistics.median(warm)}
        print(f"{setting:8s} predict per case (s): {', '.join(f'{t:.3f}' for t in times)}; "
              f"median after the first: {statistics.median(warm):.3f} s", flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      "torch": torch.__version__, "size": list(args.size), **results}))
    return results


if __name__ == "__main__":
    main()

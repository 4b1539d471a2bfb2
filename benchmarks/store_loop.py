"""The real training loop on the pre-processed store (issue 22): one command.

1. Writes a CT-like dataset of realistic size unless it is there already: ``--cases`` volumes
   (default 60) of ``--size`` voxels (default 512 x 512 x 120) at ``--spacing`` mm (default
   0.78 x 0.78 x 2.5), int16 HU (air, a body with a fat rim, a spine, 15 labelled organs with noise),
   as gzipped NIfTI in the folder layout (one in ten cases, at least one, in imagesVal/labelsVal).
2. Runs the real ``main_train.py`` (a subprocess, ``--dataset amos``) with the paper's command
   (``--cache_rate 0.1 --num_workers 2``) and with the default flags, each twice on the store: the
   store is removed before the first run (which builds it) and reused by the second. With ``--off``
   (the default) each command also runs once with ``--preprocessed off`` (the cases pre-processed in
   memory at start, as before the store), for comparison.
3. Per run: ``loop_ms_per_iter`` and ``step_ms_per_iter`` from the run's ``summary.json``; start-up
   (launch to the start line, i.e. to the first iteration: imports, checks, store build / reuse,
   caching); the store's action and time as the start line says them; peak RSS, PSS and USS (private)
   memory of the run's process tree, summed over the training process and its loader workers and
   sampled from ``/proc/<pid>/smaps_rollup`` every 0.2 s (USS counts the store's file pages that only
   one process maps as Private_Clean: reclaimable page cache, not allocated memory; ``uss_dirty``
   is the private dirty part); the store's size on disk.

Prints the results as JSON and as a markdown table, and writes both to ``--out``.

Usage, GPU machine, repository root (``REP3D_PREPROCESSED`` is set to ``<out>/preprocessed`` for the runs)::

    PYTHONUNBUFFERED=1 python3 -m benchmarks.store_loop --out $OUT/store_loop

CPU smoke run at a tiny size, a small network::

    python3 -m benchmarks.store_loop --out /tmp/store_loop --cases 4 --size 96 96 40 --max_iter 6 \\
        --train_args "--gpu -1 --roi 32 32 32 --feature_size 8 16 16 32 --depths 1 1 1 1 --kernel_size 5 --hidden_size 32 --sw_batch_size 2"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from rep3d.fileio import atomic_path, write_json, write_text_atomic

REPO = Path(__file__).resolve().parents[1]

# Labelled organs: (label, HU, semi-axes in mm (x, y, z), centre as a fraction of the body's half-axes).
_ORGANS = [
    (1, 50, (45, 35, 50), (-0.45, -0.25, 0.1)), (2, 35, (30, 25, 45), (-0.45, 0.35, -0.1)), (3, 35, (30, 25, 45), (0.45, 0.35, -0.1)),
    (4, 20, (18, 15, 25), (-0.2, -0.15, 0.0)), (5, 45, (8, 8, 60), (0.05, 0.45, 0.3)), (6, 60, (80, 60, 70), (-0.35, -0.1, 0.3)),
    (7, 30, (45, 35, 40), (0.35, -0.25, 0.3)), (8, 150, (11, 11, 110), (0.1, 0.4, 0.0)), (9, 140, (12, 12, 100), (-0.12, 0.4, 0.0)),
    (10, 45, (40, 12, 15), (0.1, 0.05, 0.0)), (11, 30, (8, 6, 15), (-0.25, 0.2, 0.35)), (12, 30, (8, 6, 15), (0.25, 0.2, 0.35)),
    (13, 35, (25, 20, 35), (0.05, -0.2, -0.1)), (14, 10, (30, 30, 30), (0.0, -0.3, -0.7)), (15, 40, (20, 18, 20), (0.0, 0.0, -0.75)),
]  # fmt: skip


def make_case(index: int, size: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like volume (int16 HU) and its label (uint8, 16 classes)."""
    rng = np.random.default_rng(seed * 10007 + index)
    nx, ny, nz = size
    x = (np.arange(nx) - nx / 2 + 0.5) * spacing[0]
    y = (np.arange(ny) - ny / 2 + 0.5) * spacing[1]
    z = (np.arange(nz) - nz / 2 + 0.5) * spacing[2]
    ax, ay = 0.42 * nx * spacing[0] * rng.uniform(0.85, 1.0), 0.33 * ny * spacing[1] * rng.uniform(0.85, 1.0)
    r2 = (x[:, None] / ax) ** 2 + (y[None, :] / ay) ** 2
    body2d = np.where(r2 <= 1.0, np.where(r2 > 0.8, -100, 40), -1000).astype(np.int16)
    spine = ((x[:, None] / 18.0) ** 2 + ((y[None, :] - 0.7 * ay) / 16.0) ** 2) <= 1.0
    body2d[spine] = 600
    image = np.broadcast_to(body2d[:, :, None], size).copy()
    label = np.zeros(size, dtype=np.uint8)
    half_z = nz * spacing[2] / 2
    # organ sizes are for a 168 x 132 mm body half-axes (512^2 at 0.78 mm): scaled with smaller fields of view
    scale = np.array([ax / 168.0, ay / 132.0, min(1.0, half_z / 150.0)])
    for lab, hu, axes, centre in _ORGANS:
        c = np.array([centre[0] * ax, centre[1] * ay, centre[2] * half_z]) + rng.normal(0, 5, 3) * scale
        a = np.array(axes, dtype=float) * scale * rng.uniform(0.85, 1.15, 3)
        idx = [np.flatnonzero(np.abs(g - cc) <= aa) for g, cc, aa in zip((x, y, z), c, a)]
        if any(i.size == 0 for i in idx):
            continue  # outside this scan's field of view
        sl = tuple(slice(i[0], i[-1] + 1) for i in idx)
        inside = ((x[sl[0], None, None] - c[0]) / a[0]) ** 2 + ((y[None, sl[1], None] - c[1]) / a[1]) ** 2 + ((z[None, None, sl[2]] - c[2]) / a[2]) ** 2 <= 1.0
        inside &= image[sl] > -500
        image[sl][inside] = hu
        label[sl][inside] = lab
    image += rng.integers(-15, 16, size=size, dtype=np.int16)
    return image, label


def _save(array: np.ndarray, spacing: tuple[float, float, float], path: str) -> None:
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-stored, as DICOM-derived CT often is
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


def make_dataset(root: Path, cases: int, size: tuple[int, int, int], spacing: tuple[float, float, float], workers: int) -> dict:
    """Write the dataset (folder layout) unless ``root`` holds this one already; returns its parameters."""
    params = {"generator": "store_loop", "version": 1, "cases": cases, "size": list(size), "spacing": list(spacing)}
    manifest = root / "store_loop_manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == params:
        return params
    if root.exists():
        shutil.rmtree(root)
    n_val = max(1, cases // 10)

    def one(i: int) -> None:
        image, label = make_case(i, size, spacing)
        split = ("imagesVal", "labelsVal") if i >= cases - n_val else ("imagesTr", "labelsTr")
        _save(image, spacing, str(root / split[0] / f"ct_{i:03d}.nii.gz"))
        _save(label, spacing, str(root / split[1] / f"ct_{i:03d}.nii.gz"))

    t0 = time.time()
    with ThreadPoolExecutor(max(1, workers)) as ex:
        list(ex.map(one, range(cases)))
    write_json(params, manifest)
    print(f"wrote {cases} cases of {size} at {spacing} mm in {time.time() - t0:.0f} s to {root}", flush=True)
    return params


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[-1] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        pass
    return out


class MemorySampler(threading.Thread):
    """Peak RSS / PSS / USS of a process tree, summed over its processes, every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = {"rss": 0, "pss": 0, "uss": 0, "uss_dirty": 0, "pss_anon": 0, "main_uss": 0, "processes": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            tot = dict.fromkeys(self.peak, 0)
            pids = _tree(self.pid)
            for p in pids:
                r = _rollup(p)
                tot["rss"] += r.get("Rss", 0)
                tot["pss"] += r.get("Pss", 0)
                tot["uss"] += r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)
                tot["uss_dirty"] += r.get("Private_Dirty", 0)
                tot["pss_anon"] += r.get("Pss_Anon", 0)
                if p == self.pid:
                    tot["main_uss"] = r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)
            tot["processes"] = len(pids)
            for k, v in tot.items():
                self.peak[k] = max(self.peak[k], v)
            self.stop.wait(self.interval)


def _disk_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of the files, bytes allocated on disk) under ``folder``."""
    size = used = 0
    for d, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(d, f))
            size += st.st_size
            used += st.st_blocks * 512
    return size, used


def _store_size(store_base: Path) -> dict:
    size_b, used_b = _disk_bytes(store_base) if store_base.exists() else (0, 0)
    n_cases = len(list(store_base.glob("*/*/cases/*.json")))
    return {"path": str(store_base), "mib": round(size_b / 1024**2, 1), "allocated_mib": round(used_b / 1024**2, 1), "cases": n_cases}


_START = re.compile(r"M parameters\) on ")
_CHECK = re.compile(r"data check: \d+ cases in ([0-9.]+) s")
_STORE = re.compile(r"store (\S+): (built|updated|reused|built by another process)\b.*?([0-9.]+) s")


def run_main_train(name: str, argv: list[str], out: Path, env: dict) -> dict:
    """One main_train.py run: its summary's timing, start-up time, peak memory, what the store did."""
    run_dir = out / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, str(REPO / "main_train.py"), *argv, "--output", str(run_dir)]
    print(f"\n== {name}: {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    startup, lines = None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if startup is None and _START.search(line):
            startup = time.time() - t0
        if "it/s]" not in line and "s/it]" not in line:
            print("   " + line.rstrip()[:400], flush=True)
    rc = proc.wait()
    sampler.stop.set()
    sampler.join()
    wall = time.time() - t0
    result: dict[str, Any] = {"command": shlex.join(cmd), "rc": rc, "wall_s": round(wall, 1), "startup_s": round(startup, 1) if startup else None}
    result.update({f"peak_{k}_mib" if k != "processes" else "processes": (round(v / 1024**2, 1) if k != "processes" else v) for k, v in sampler.peak.items()})
    summary_path = run_dir / "summary.json"
    if rc != 0 or not summary_path.is_file():
        result["error"] = "".join(lines[-30:])
        return result
    s = json.loads(summary_path.read_text())
    timing = s.get("timing") or {}
    result.update({k: timing.get(k) for k in ("loop_ms_per_iter", "step_ms_per_iter", "loop_ms_median", "step_ms_median", "outside_step_fraction", "timed_iterations")})
    result["data_wait_s"] = s.get("data_wait_s")
    result["loader"] = s.get("loader")
    m = _STORE.search(s.get("loader") or "")
    result["store_action"], result["store_s"] = (m.group(2), float(m.group(3))) if m else ("off", None)
    c = _CHECK.search(s.get("loader") or "")
    result["check_s"] = float(c.group(1)) if c else None
    result["best_metric"] = s.get("best_metric")
    return result


def markdown(results: dict) -> str:
    rows = [
        "| run | store | start-up s | data check s | store s | loop ms/it | step ms/it | outside step | peak RSS MiB | peak PSS MiB | peak USS MiB (dirty) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results["runs"].items():
        if r.get("error"):
            rows.append(f"| {name} | failed (rc {r['rc']}) | | | | | | | | | |")
            continue
        frac = r.get("outside_step_fraction")
        rows.append(
            f"| {name} | {r['store_action']} | {r['startup_s']} | {r.get('check_s') if r.get('check_s') is not None else '-'} | {r['store_s'] if r['store_s'] is not None else '-'} | {r['loop_ms_per_iter']} | "
            f"{r['step_ms_per_iter']} | {'' if frac is None else f'{100 * frac:.0f}%'} | {r['peak_rss_mib']} | {r['peak_pss_mib']} | "
            f"{r['peak_uss_mib']} ({r['peak_uss_dirty_mib']}) |"
        )
    st = results.get("store") or {}
    rows.append("")
    rows.append(f"dataset: {results['dataset']['cases']} cases of {results['dataset']['size']} at {results['dataset']['spacing']} mm, "
                f"{results['dataset']['gz_mib']} MiB of .nii.gz; store on disk: {st.get('mib')} MiB ({st.get('allocated_mib')} MiB allocated), {st.get('cases')} cases")  # fmt: skip
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, required=True, help="output folder (dataset, store, runs, results)")
    p.add_argument("--cases", type=int, default=60, help="volumes in the dataset (one in ten validates)")
    p.add_argument("--size", type=int, nargs=3, default=[512, 512, 120], metavar=("X", "Y", "Z"), help="voxels per volume")
    p.add_argument("--spacing", type=float, nargs=3, default=[0.78, 0.78, 2.5], metavar=("X", "Y", "Z"), help="voxel size in mm")
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default: <out>/data); kept between invocations")
    p.add_argument("--max_iter", type=int, default=200, help="iterations per run (validation once, at the end)")
    p.add_argument("--network", default="REP3D", help="--network of the runs")
    p.add_argument("--train_args", default="", help="more main_train.py flags for every run, one string (e.g. the CPU smoke run's small network)")
    p.add_argument("--off", action=argparse.BooleanOptionalAction, default=True, help="also run each command once with --preprocessed off")
    p.add_argument("--commands", nargs="+", choices=("paper", "default"), default=["paper", "default"], help="which commands to run: paper (--cache_rate 0.1 --num_workers 2), default (no loader flag)")
    p.add_argument("--gen_workers", type=int, default=8, help="threads writing the dataset")
    args = p.parse_args(argv)

    out = args.out.resolve()
    data = (args.data or out / "data").resolve()
    store_base = out / "preprocessed"
    size, spacing = tuple(args.size), tuple(args.spacing)
    params = make_dataset(data, args.cases, size, spacing, args.gen_workers)
    gz = sum(f.stat().st_size for f in data.rglob("*.nii.gz"))
    env = dict(os.environ, REP3D_PREPROCESSED=str(store_base), PYTHONUNBUFFERED="1")
    base = ["--root", str(data), "--dataset", "amos", "--network", args.network, "--max_iter", str(args.max_iter),
            "--eval_step", str(10 * args.max_iter), *shlex.split(args.train_args)]  # fmt: skip
    commands = {"paper": ["--cache_rate", "0.1", "--num_workers", "2"], "default": []}
    results: dict[str, Any] = {"dataset": {**params, "gz_mib": round(gz / 1024**2, 1)}, "runs": {}}
    for name, flags in ((n, commands[n]) for n in args.commands):
        if store_base.exists():
            shutil.rmtree(store_base)  # the first run builds the store, the second reuses it
        for i in (1, 2):
            results["runs"][f"{name}_store_run{i}"] = run_main_train(f"{name}_store_run{i}", base + flags, out, env)
            results["store"] = _store_size(store_base)
            write_json(results, out / "store_loop.json")  # partial results survive a time limit
        if args.off:
            results["runs"][f"{name}_off"] = run_main_train(f"{name}_off", base + flags + ["--preprocessed", "off"], out, env)
            write_json(results, out / "store_loop.json")
    table = markdown(results)
    write_json(results, out / "store_loop.json")
    write_text_atomic(table, out / "store_loop.md")
    print("\n" + json.dumps(results, indent=1))
    print("\n" + table)
    return 0 if all(not r.get("error") for r in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

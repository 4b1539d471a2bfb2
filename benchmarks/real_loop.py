"""The real training loop against the training step, on large volumes (issue 12): one command.

1. Writes the synthetic brain MRI set of :mod:`brain_data` (8 training + 2 validation volumes of
   197 x 233 x 189 voxels at 1 mm, 5 classes) unless it is there already.
2. Runs the real ``main_train.py`` as a subprocess for each network and loader path::

       python3 main_train.py --root DATA --dataset custom --spacing 1 1 1 --intensity zscore --num_classes 5
           --roi 96 96 96 --network NET --max_iter 400 --eval_step 100000 --amp bf16 --cache_rate 1.0 --loader PATH

   and reads its ``summary.json``: ``loop_ms_per_iter`` (mean wall time per iteration after the
   warm-up, validation excluded), ``step_ms_per_iter`` (CUDA events around forward + backward +
   optimizer, in the same run), ``outside_step_fraction`` and ``loader`` (the path and why).
3. In this process, with the GPU to itself afterwards: each path's training loader alone (ms per
   batch of 2 x 96^3 crops, on the GPU and augmented, mean over ``--batches``), the pure step of
   each network on one fixed batch (no loader running), and what ``choose_loader`` picks for this
   data when the user passes no loader flag.

``--old_tree DIR`` runs the ``main_train.py`` of another checkout instead (``git worktree add DIR COMMIT``,
e.g. the tree before a change), for a before/after table on the same machine; parts 1 and 3 use this tree.
(``--old_module DIR`` is the same flag: it used to put one older ``load_datasets_transforms.py`` first on
the path, which main_train no longer imports.)

Usage (GPU machine, repository root; ``python3 benchmarks/real_loop.py`` works the same once the package
is installed, ``pip install -e .``)::

    PYTHONUNBUFFERED=1 python3 -m benchmarks.real_loop --out $OUT/real_loop
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rep3d.data.loader_choice import choose_loader
from rep3d.data.loaders import get_loaders
from rep3d.runtime import default_num_workers

if __package__:  # python3 -m benchmarks.real_loop
    from .brain_data import BRAIN_FLAGS, make_brain_dataset
    from .profile_loader import Step, brain_config, fixed_batch_step
else:  # python3 benchmarks/real_loop.py: this folder is sys.path[0]
    from brain_data import BRAIN_FLAGS, make_brain_dataset
    from profile_loader import Step, brain_config, fixed_batch_step

# main_train.py runs from here (its working directory), or from --old_tree.
REPO = Path(__file__).resolve().parents[1]

RESULTS: dict[str, Any] = {"runs": {}, "loader_alone": {}, "fixed_step": {}}


def save(path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(RESULTS, indent=1, default=str))


def run_main_train(data: str, out: Path, network: str, path: str, max_iter: int, old_tree: str | None, log_dir: Path, roi: list[int], extra: list[str]) -> dict:
    """One main_train.py run (this tree's, or ``old_tree``'s); its summary's timing fields, the start line's
    loader reason, wall time. ``data`` and ``out`` must be absolute: the run's working directory is a tree."""
    run_dir = out / (f"run_{network}_{path}" + ("_before" if old_tree else ""))
    argv = ["--root", data, *BRAIN_FLAGS, "--roi", *map(str, roi), "--network", network, "--max_iter", str(max_iter),
            "--eval_step", "100000", "--amp", "bf16", "--output", str(run_dir), *extra]  # fmt: skip
    # "default": no loader flag and no --cache_rate, what a user who passes none gets.
    argv += ["--loader", path, "--cache_rate", "1.0"] if path != "default" else []
    cmd = [sys.executable, "main_train.py", *argv]
    t0 = time.perf_counter()
    log = log_dir / f"main_train_{network}_{path}{'_before' if old_tree else ''}.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=old_tree or REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    text = log.read_text()
    res: dict = {"rc": proc.returncode, "wall_s": round(wall, 1), "command": "python3 main_train.py " + " ".join(argv)}
    summary = run_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        timing = s.get("timing", {})
        res.update({k: timing.get(k, s.get(k)) for k in ("loop_ms_per_iter", "step_ms_per_iter", "loop_ms_median", "step_ms_median", "outside_step_fraction", "timed_iterations")})
        res["loader"] = s.get("loader")
        res["data_wait_fraction"] = s.get("data_wait_fraction")
        if res.get("loop_ms_per_iter") and res.get("step_ms_per_iter"):
            res["loop_over_step"] = round(res["loop_ms_per_iter"] / res["step_ms_per_iter"], 3)
    else:
        res["tail"] = text[-2000:]
    return res


def loader_alone(cfg, data: str, path: str, batches: int, warmup: int, device: torch.device) -> dict:
    """ms per training batch of the loader alone (mean over ``batches`` after ``warmup``), synchronised."""
    kw: dict = {"device": str(device)} if path == "gpu" else {}
    train, _ = get_loaders(cfg, data, cfg.roi, 2, 1, 1.0, default_num_workers(), check=False, **kw)

    def forever():
        while True:
            yield from train

    it = forever()
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    t_all = time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        b = next(it)
        b["image"].sum().item()  # the batch is ready (on the GPU: its work is done)
        times.append(1e3 * (time.perf_counter() - t))
    total = 1e3 * (time.perf_counter() - t_all) / batches
    assert tuple(b["image"].shape) == (2, 1, *cfg.roi) and b["image"].device.type == device.type, (b["image"].shape, b["image"].device)
    if hasattr(train, "close"):
        train.close()
    return {"mean_ms": round(total, 2), "median_ms": round(statistics.median(times), 2), "n": batches, "path": getattr(train, "path", path)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/real_loop", help="working folder (data, runs, logs, results.json)")
    p.add_argument("--data", default=None, help="dataset folder (default OUT/brain; generated when missing)")
    p.add_argument("--networks", default="REP3D,SwinUNETR")
    p.add_argument("--paths", default="gpu,workers", help="loader paths to run main_train with: gpu, workers (both with --cache_rate 1.0), default (no loader flags)")
    p.add_argument("--max_iter", type=int, default=400)
    p.add_argument("--old_tree", "--old_module", dest="old_tree", default=None, metavar="DIR",
                   help="another checkout of the repository (git worktree add DIR COMMIT) whose main_train.py runs instead, for a before/after table")  # fmt: skip
    p.add_argument("--batches", type=int, default=100, help="batches timed for the loader alone")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: train, loader, step")
    p.add_argument("--log_dir", default=None, help="where main_train's logs go (default OUT)")
    p.add_argument("--json", default=None, help="results file (default OUT/results.json)")
    p.add_argument("--shape", type=int, nargs=3, default=None, help="volume size (default 197 233 189; smaller for a smoke test)")
    p.add_argument("--roi", type=int, nargs=3, default=(96, 96, 96))
    p.add_argument("--extra", default="", help="extra main_train flags, e.g. '--gpu -1 --depths 1 1 1 1' for a CPU smoke test")
    a = p.parse_args(argv)
    if a.old_tree and not (Path(a.old_tree) / "main_train.py").is_file():
        p.error(f"--old_tree {a.old_tree}: no main_train.py there; give a checkout of the repository (git worktree add DIR COMMIT), "
                "not a folder holding one module")  # fmt: skip
    old_tree = str(Path(a.old_tree).resolve()) if a.old_tree else None
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(a.log_dir) if a.log_dir else out
    log_dir.mkdir(parents=True, exist_ok=True)
    json_path = Path(a.json) if a.json else out / "results.json"
    skip = set(a.skip.split(","))
    data = str(Path(a.data).resolve()) if a.data else str(out / "brain")
    t0 = time.perf_counter()
    make_brain_dataset(data, 8, 2, **({"shape": tuple(a.shape)} if a.shape else {}))
    import monai

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    RESULTS["env"] = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "monai": monai.__version__, "python": sys.version.split()[0],
        "cpus": len(os.sched_getaffinity(0)), "data_s": round(time.perf_counter() - t0, 1), "old_tree": old_tree,
    }  # fmt: skip
    print(f"env: {RESULTS['env']}", flush=True)
    networks = [n for n in a.networks.split(",") if n]
    paths = [q for q in a.paths.split(",") if q]
    if "train" not in skip:
        for net in networks:
            for path in paths:
                r = run_main_train(data, out, net, path, a.max_iter, old_tree, log_dir, list(a.roi), a.extra.split())
                RESULTS["runs"][f"{net}/{path}" + ("/before" if old_tree else "")] = r
                save(json_path)
                print(f"main_train {net} {path}: {json.dumps({k: v for k, v in r.items() if k != 'command'})}", flush=True)

    cfg = brain_config(tuple(a.roi))
    c = choose_loader(cfg, root=data, device=device)
    RESULTS["choose_loader"] = {"path": c.path, "cache_rate": c.cache_rate, "reason": c.reason}
    print(f"choose_loader with no loader flags: {c.path}: {c.reason}", flush=True)
    if "loader" not in skip:
        for path in ("gpu", "workers") if device.type == "cuda" else ("workers",):
            RESULTS["loader_alone"][path] = r = loader_alone(cfg, data, path, a.batches, 10, device)
            save(json_path)
            print(f"loader alone, {path} path: {r}", flush=True)
            torch.cuda.empty_cache()
    if "step" not in skip:
        for net in networks:
            step = Step(net, cfg.num_classes, device)
            g = torch.Generator().manual_seed(0)
            batch = {"image": torch.randn(2, 1, *cfg.roi, generator=g), "label": torch.randint(0, cfg.num_classes, (2, 1, *cfg.roi), generator=g).float()}
            RESULTS["fixed_step"][net] = r = fixed_batch_step(step, batch, reps=30)
            save(json_path)
            print(f"fixed-batch step {net}: {r}", flush=True)
            del step
            torch.cuda.empty_cache()
    RESULTS["elapsed_s"] = round(time.perf_counter() - t0, 1)
    save(json_path)

    print("\nnetwork | path | loop ms/it | step ms/it (same run) | loop/step | fixed-batch step | loop/fixed | outside step | loader")
    for key, r in RESULTS["runs"].items():
        net = key.split("/")[0]
        fixed = RESULTS["fixed_step"].get(net, {}).get("step_ms")
        ratio = round(r["loop_ms_per_iter"] / fixed, 3) if fixed and r.get("loop_ms_per_iter") else None
        print(f"{key} | {r.get('loop_ms_per_iter')} | {r.get('step_ms_per_iter')} | {r.get('loop_over_step')} | {fixed} | {ratio} | {r.get('outside_step_fraction')} | {r.get('loader')}")
    for path, r in RESULTS["loader_alone"].items():
        print(f"loader alone {path}: {r['mean_ms']} ms per batch (mean), {r['median_ms']} median")
    print(f"done in {RESULTS['elapsed_s']} s", flush=True)
    return RESULTS


if __name__ == "__main__":
    main()

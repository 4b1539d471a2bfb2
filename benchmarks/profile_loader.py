"""Where does the training data path spend its time? (issue 12, item 1)

On the synthetic brain MRI set of :mod:`brain_data` (8 + 2 cases of 197 x 233 x 189 voxels at 1 mm,
z-scored), with the training chain of ``rep3d.data.transforms.get_train_transforms`` as it stands:

* ``transforms``: each step of the random part timed alone, per batch of ``crop_sample`` crops, in one
  thread (as a DataLoader worker runs it): the cache copy that ``CacheDataset`` makes of a cached case,
  every random transform (``RandCropByPosNegLabeld``, ``RandShiftIntensityd``, ``RandAffined``, ...),
  the collation, pinning and the host-to-device copy. With ``--device cuda`` the same again with the
  cache on the GPU (the ``--cache_on_gpu`` chain), synchronising after each step.
* ``workers``: the CPU path's loader alone (``rep3d.data.loaders.get_loaders``, ``cache_rate=1``, pinned
  memory), ms per batch for several ``num_workers``.
* ``gpu``: the GPU path's loader alone (``get_loaders(device="cuda")``), ms per batch.
* ``loop`` (CUDA only): a training loop like main_train's (REP3D, AMP bf16, fused AdamW, DiceCE, the
  loss read back every step) fed by each path: wall ms per iteration and CUDA-event ms of the step,
  next to the same step repeated on one fixed batch.

Usage (GPU machine, repository root; ``python3 benchmarks/profile_loader.py`` works the same once the
package is installed, ``pip install -e .``)::

    PYTHONUNBUFFERED=1 python3 -m benchmarks.profile_loader --data /tmp/brain --device cuda --json $OUT/profile.json

On a CPU machine ``--device cpu --sections transforms,workers`` gives the CPU-side numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

import networks
from rep3d.data.cases import list_cases
from rep3d.data.dataset_config import DatasetConfig, get_dataset_config
from rep3d.data.loaders import get_loaders
from rep3d.data.transforms import get_train_transforms

if __package__:  # python3 -m benchmarks.profile_loader
    from .brain_data import BRAIN_CLASSES, make_brain_dataset
else:  # python3 benchmarks/profile_loader.py: this folder is sys.path[0]
    from brain_data import BRAIN_CLASSES, make_brain_dataset

RESULTS: dict[str, Any] = {}
JSON_PATH: Path | None = None


def log(msg: str = "") -> None:
    print(msg, flush=True)
    if JSON_PATH is not None:
        JSON_PATH.write_text(json.dumps(RESULTS, indent=1, default=str))


def brain_config(roi: tuple[int, int, int]) -> DatasetConfig:
    """The dataset config of the brain set (``brain_data.BRAIN_FLAGS`` as a config)."""
    return get_dataset_config("custom", spacing=(1, 1, 1), intensity="zscore", num_classes=len(BRAIN_CLASSES), class_names=list(BRAIN_CLASSES), roi=roi)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 2) if xs else float("nan")


# --------------------------------------------------------------------------------------------------
# per-transform profile


def _apply(t: Callable, data: Any) -> Any:
    # Compose maps a transform over the list of crops that a multi-sample crop returns.
    if isinstance(data, list):
        out = []
        for d in data:
            r = t(d)
            out.extend(r if isinstance(r, list) else [r])
        return out
    return t(data)


def profile_transforms(cfg, cases: list[dict], roi, crop_sample: int, device: torch.device | None, reps: int, h2d: torch.device | None) -> dict:
    """Milliseconds per batch of each step of the random part (median over ``reps`` batches)."""
    from monai.data import list_data_collate
    from monai.transforms import Randomizable

    tf = get_train_transforms(cfg, roi, crop_sample, device=str(device) if device is not None else None)
    ts = list(tf.transforms)
    k = next(i for i, t in enumerate(ts) if isinstance(t, Randomizable))
    det, rand = ts[:k], ts[k:]
    for i, t in enumerate(rand):
        if isinstance(t, Randomizable):
            t.set_random_state(seed=i)
    dev = device or torch.device("cpu")
    t0 = time.perf_counter()
    cache = []
    for c in cases:
        d = c
        for t in det:
            d = t(d)
        cache.append(d)
    sync(dev)
    pre_s = (time.perf_counter() - t0) / len(cases)
    names = ["cache copy (deepcopy)"] + [type(t).__name__ for t in rand] + ["collate"]
    pin = device is None and torch.cuda.is_available()
    if pin:
        names += ["pin_memory"]
    if h2d is not None:
        names += ["H2D copy" + (" (pinned)" if device is None else "")]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps + 2):
        item = cache[r % len(cache)]
        stamps = []

        def tick():
            sync(dev)
            stamps.append(time.perf_counter())

        tick()
        data = copy.deepcopy(item)
        tick()
        for t in rand:
            data = _apply(t, data)
            tick()
        batch = list_data_collate(data if isinstance(data, list) else [data])
        tick()
        img, lab = batch["image"], batch["label"]
        if pin:
            img, lab = img.pin_memory(), lab.pin_memory()
            tick()
        if h2d is not None:
            img.to(h2d, non_blocking=True), lab.to(h2d, non_blocking=True)
            sync(h2d)
            tick()
        if r >= 2:
            for n, a, b in zip(names, stamps[:-1], stamps[1:]):
                times[n].append(1e3 * (b - a))
    shape = tuple(batch["image"].shape)
    vox = [tuple(c["image"].shape[1:]) for c in cache]
    out = {n: med(v) for n, v in times.items()}
    out["total"] = round(sum(out.values()), 2)
    return {"ms_per_batch": out, "batch_shape": shape, "cached_shapes": vox, "preprocess_s_per_case": round(pre_s, 2)}


# --------------------------------------------------------------------------------------------------
# loaders alone


def forever(loader):
    """Batches over epoch after epoch, as main_train draws them."""
    while True:
        yield from loader


def time_loader(loader, n: int, warmup: int, device: torch.device | None, budget_s: float = 20.0) -> dict:
    """ms per batch of iterating ``loader`` (moving each batch to ``device``), median and mean."""
    it = forever(loader)
    for _ in range(warmup):
        next(it)
    times = []
    t_start = time.perf_counter()
    t = t_start
    for _ in range(n):
        b = next(it)
        if device is not None and device.type == "cuda":
            b["image"].to(device, non_blocking=True), b["label"].to(device, non_blocking=True)
            sync(device)
        now = time.perf_counter()
        times.append(1e3 * (now - t))
        t = now
        if now - t_start > budget_s:
            break
    return {"median_ms": med(times), "mean_ms": round(statistics.fmean(times), 2), "n": len(times)}


def _loader_like(ds, num_workers: int, pin: bool, seed: int):
    # The CPU path of get_loaders (the code profiled here), over an already cached dataset.
    from monai.data import DataLoader

    return DataLoader(ds, batch_size=1, shuffle=True, num_workers=num_workers, pin_memory=pin,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=num_workers > 0)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# training loop fed by a loader


class Step:
    """main_train's training step: AMP bf16 forward, float32 DiceCE, backward, fused AdamW, loss read back."""

    def __init__(self, network: str, num_classes: int, device: torch.device) -> None:
        from monai.losses import DiceCELoss

        torch.backends.cudnn.benchmark = True
        torch.manual_seed(0)
        self.device = device
        self.model = networks.build_network(network, 1, num_classes).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.08, fused=device.type == "cuda")
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[float, float]:
        """(loss, ms of forward + backward + optimizer: CUDA events on a GPU, wall on the CPU)."""
        cuda = self.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            logits = self.model(image)
        loss = self.loss_fn(logits.float(), label)
        loss.backward()
        self.opt.step()
        if cuda:
            end.record()
        value = loss.item()
        return value, start.elapsed_time(end) if cuda else 1e3 * (time.perf_counter() - t)


def _as_plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def loop(step: Step, loader, iters: int, warmup: int) -> dict:
    """Iterate like main_train: next batch, to the device, step, read the loss; per-iteration timings."""
    dev = step.device
    it = forever(loader)
    walls, steps, waits = [], [], []
    t_prev = time.perf_counter()
    for i in range(iters):
        t0 = time.perf_counter()
        b = next(it)
        image = _as_plain(b["image"]).to(dev, non_blocking=True)
        label = _as_plain(b["label"]).to(dev, non_blocking=True)
        t1 = time.perf_counter()
        _, ms = step(image, label)
        now = time.perf_counter()
        if i >= warmup:
            walls.append(1e3 * (now - t_prev))
            steps.append(ms)
            waits.append(1e3 * (t1 - t0))
        t_prev = now
    # The mean is the throughput: stalls every few iterations (an epoch restart) vanish from a median.
    loop_ms, step_ms = round(statistics.fmean(walls), 2), med(steps)
    return {"loop_ms_mean": loop_ms, "loop_ms_median": med(walls), "step_ms": step_ms, "wait_ms_mean": round(statistics.fmean(waits), 2),
            "loop_over_step": round(loop_ms / step_ms, 3), "n": len(walls)}  # fmt: skip


def fixed_batch_step(step: Step, batch: dict, reps: int = 30) -> dict:
    image = _as_plain(batch["image"]).to(step.device)
    label = _as_plain(batch["label"]).to(step.device)
    for _ in range(5):
        step(image, label)
    walls, steps = [], []
    for _ in range(reps):
        t = time.perf_counter()
        _, ms = step(image, label)
        walls.append(1e3 * (time.perf_counter() - t))
        steps.append(ms)
    return {"wall_ms": med(walls), "step_ms": med(steps)}


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    global JSON_PATH
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/brain", help="dataset folder (generated there when missing)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", default="transforms,workers,gpu,loop")
    p.add_argument("--roi", type=int, nargs=3, default=(96, 96, 96))
    p.add_argument("--crop_sample", type=int, default=2)
    p.add_argument("--reps", type=int, default=12, help="batches per transform profile")
    p.add_argument("--workers", default="1,2,4,8,15", help="num_workers values of the worker scaling")
    p.add_argument("--batches", type=int, default=40, help="batches timed per loader setting")
    p.add_argument("--iters", type=int, default=120, help="loop iterations per path (the first 20 are warm-up)")
    p.add_argument("--network", default="REP3D")
    p.add_argument("--shape", type=int, nargs=3, default=None, help="volume size (default 197 233 189)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    JSON_PATH = Path(a.json) if a.json else None
    sections = set(a.sections.split(","))
    device = torch.device(a.device)
    roi = tuple(a.roi)
    t0 = time.perf_counter()
    kw = {"shape": tuple(a.shape)} if a.shape else {}
    make_brain_dataset(a.data, 8, 2, **kw)
    RESULTS["env"] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpus": len(os.sched_getaffinity(0)), "data_s": round(time.perf_counter() - t0, 1), "roi": roi, "crop_sample": a.crop_sample,
    }  # fmt: skip
    import monai

    RESULTS["env"]["monai"] = monai.__version__
    log(f"env: {RESULTS['env']}")
    cfg = brain_config(roi)
    cases = list_cases(a.data, "train")
    cuda = device if device.type == "cuda" else None

    if "transforms" in sections:
        torch.set_num_threads(1)  # as in a DataLoader worker
        r = profile_transforms(cfg, cases, roi, a.crop_sample, None, a.reps, cuda)
        RESULTS["transforms_cpu"] = r
        log(f"CPU chain (1 thread), ms per batch of {a.crop_sample} crops: {r['ms_per_batch']}  cached shapes {r['cached_shapes'][:3]}... preprocess {r['preprocess_s_per_case']} s/case")
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        if cuda is not None:
            r = profile_transforms(cfg, cases, roi, a.crop_sample, cuda, a.reps, None)
            RESULTS["transforms_gpu"] = r
            log(f"GPU chain (cache on the GPU), ms per batch: {r['ms_per_batch']}")

    if "workers" in sections:
        train_loader, _ = get_loaders(cfg, a.data, roi, a.crop_sample, 1, 1.0, 8, check=False)
        ds = train_loader.dataset
        RESULTS["workers"] = {}
        for n in [int(w) for w in a.workers.split(",") if w]:
            loader = _loader_like(ds, n, cuda is not None, seed=n)
            r = time_loader(loader, a.batches, warmup=max(2, n), device=cuda)
            RESULTS["workers"][n] = r
            log(f"CPU workers {n:2d}: {r['median_ms']} ms/batch median, {r['mean_ms']} mean (n={r['n']})")
            del loader

    if "gpu" in sections and cuda is not None:
        train_loader, _ = get_loaders(cfg, a.data, roi, a.crop_sample, 1, 1.0, 8, device=str(cuda), check=False)
        r = time_loader(train_loader, a.batches, warmup=3, device=cuda)
        RESULTS["gpu_loader"] = r
        log(f"GPU path loader alone: {r['median_ms']} ms/batch median, {r['mean_ms']} mean")
        del train_loader

    if "loop" in sections:
        step = Step(a.network, cfg.num_classes, device)
        RESULTS["loop"] = {}
        warm = min(20, a.iters // 4)
        for path in ("gpu", "workers"):
            dev = str(device) if path == "gpu" else None
            train_loader, _ = get_loaders(cfg, a.data, roi, a.crop_sample, 1, 1.0, 8, device=dev, check=False)
            if path == "gpu":
                fixed = next(iter(train_loader))
                RESULTS["loop"]["fixed_batch"] = fixed_batch_step(step, fixed)
                log(f"{a.network} step on one fixed batch: {RESULTS['loop']['fixed_batch']}")
            r = loop(step, train_loader, a.iters, warm)
            RESULTS["loop"][path] = r
            log(f"{a.network} loop, {path} path (8 workers for the CPU path): {r}")
            del train_loader
    RESULTS["elapsed_s"] = round(time.perf_counter() - t0, 1)
    log(f"done in {RESULTS['elapsed_s']} s")
    return RESULTS


if __name__ == "__main__":
    main()

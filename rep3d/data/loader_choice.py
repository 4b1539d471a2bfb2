"""Where training batches are made: the GPU cache when the cached volumes fit, else CPU workers, from
an estimate of the cache's size."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rep3d.data.cases import list_cases
from rep3d.data.dataset_config import DataError, DatasetConfig
from rep3d.data.image_io import read_header
from rep3d.runtime import default_num_workers

# choose_loader: the GPU cache may take this share of the GPU memory free when the choice is made;
# the rest is left to the network (REP3D training 2 x 96^3 peaks at 5.4 GiB, SwinUNETR at 9.1 GiB),
# sliding-window validation of whole volumes and the allocator's slack.
GPU_CACHE_SHARE = 0.4


# ... and the CPU workers' cache this share of the available RAM (the workers share it, forked).
RAM_CACHE_SHARE = 0.5


_GIB = 1024**3


def _gib(nbytes: float) -> str:
    return f"{nbytes / _GIB:.1f} GiB" if nbytes >= 0.1 * _GIB else f"{nbytes / 1024**2:.0f} MiB"


@dataclass(frozen=True)
class LoaderChoice:
    """The loader path :func:`choose_loader` picked, with what :func:`get_loaders` needs for it.

    Attributes:
        path: ``"gpu"`` (cache and crops on the GPU) or ``"workers"`` (CPU worker processes).
        device: ``get_loaders(device=...)``: the GPU holding the cache, ``None`` for workers.
        cache_rate: ``get_loaders(cache_rate=...)``.
        num_workers: ``get_loaders(num_workers=...)`` (the GPU path starts no workers).
        reason: one line for the start of the run, e.g. ``"GPU cache: 10 cases ~1.5 GiB fit in 40%
            of the 78.6 GiB free on cuda:0"``.
        cache_bytes: estimated bytes of the cached volumes (``None`` when not estimated).
    """

    path: str
    device: str | None
    cache_rate: float
    num_workers: int
    reason: str
    cache_bytes: int | None = None


def estimate_cache_bytes(cfg: DatasetConfig, cases: Sequence[dict], roi: Sequence[int] | None = None) -> int:
    """Bytes the cached training / validation volumes take: float32 image channels + float32 label
    per voxel of the volume resampled to ``cfg.spacing`` and padded to ``roi``.

    Read from the headers alone (shape, voxel size and channels, through
    :func:`image_io.read_header`: NIfTI, NRRD, MetaImage; a DICOM series is loaded to know them),
    so it is an upper bound: the crop to the foreground, done on the voxels, makes the real cache
    smaller (on the brain set of benchmarks/RESULTS.md the cropped training volumes hold 56% of the
    voxels counted). Cases whose header cannot be read count as the largest of the others. The
    crop-centre indices stay on the CPU and are not counted.
    """
    roi = tuple(int(r) for r in (roi or cfg.roi))
    sizes, unread = [], 0
    for case in cases:
        try:
            images = case["image"] if isinstance(case["image"], (list, tuple)) else [case["image"]]
            channels, shape, zooms = 0, None, None
            for p in images:
                h = read_header(str(p))
                shape, zooms = h.shape, h.spacing
                channels += h.channels
            resampled = [max(int(math.ceil(n * z / t)), r) for n, z, t, r in zip(shape, zooms, cfg.spacing, roi)]
            sizes.append(int(np.prod(resampled)) * 4 * (channels + (1 if "label" in case else 0)))
        except Exception:  # noqa: BLE001 - unreadable files are check_dataset's to report
            unread += 1
    return int(sum(sizes) + unread * (max(sizes) if sizes else 0))


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def choose_loader(
    cfg: DatasetConfig,
    root: str | None = None,
    datalist: str | None = None,
    fold: int = 0,
    device: str | torch.device | None = None,
    cache_rate: float | None = None,
    requested: str = "auto",
    num_workers: int | None = None,
    cases: Sequence[dict] | None = None,
    gpu_share: float = GPU_CACHE_SHARE,
    store: bool = False,
) -> LoaderChoice:
    """Pick the loader path for a run whose user passed no loader flag (or passed ``requested``).

    ``"auto"``: the GPU cache when training runs on CUDA, every case is to be cached, and the
    estimated cached dataset (:func:`estimate_cache_bytes`: the training and validation volumes
    after resampling, float32 image + label, from the image headers only) fits in ``gpu_share``
    (default 40%, :data:`GPU_CACHE_SHARE`) of the GPU memory free now; else CPU workers, caching
    every case when the estimate fits in half the available RAM (:data:`RAM_CACHE_SHARE`).
    ``"gpu"`` / ``"workers"`` take that path (the reason says it was asked for).

    With a pre-processed store (``store``), the CPU workers read every crop through the store's memory
    maps unless ``cache_rate`` holds some cases in RAM: without ``--cache_rate`` none is (0): the page
    cache keeps the store's pages that RAM allows, shared by every process and the next run, and a
    worker's private memory does not grow with the dataset.

    Args:
        cfg: dataset config (spacing, ROI).
        root, datalist, fold: where the cases are (see :func:`list_cases`); ignored with ``cases``.
        device: the training device (``None``: CUDA if available).
        cache_rate: the user's ``--cache_rate``, or ``None`` when not given (then the chosen path
            caches all it can: 1.0 on the GPU; on the CPU 1.0 if it fits in RAM, else ``cfg.cache_rate``).
            Below 1 the GPU path is not chosen: it would load the uncached cases in the training process.
        requested: ``"auto"``, ``"gpu"`` or ``"workers"``.
        num_workers: worker processes for the CPU path (``None``: :func:`default_num_workers`).
        cases: the training + validation cases, when the caller has listed them already.
        gpu_share: share of the free GPU memory the cache may take.
        store: the cases come from the pre-processed store (see above).

    Returns:
        A :class:`LoaderChoice`; its ``reason`` is one line for the run's start.

    Raises:
        ValueError: ``requested`` unknown, or ``"gpu"`` without CUDA.
    """
    if requested not in ("auto", "gpu", "workers"):
        raise ValueError(f"requested must be 'auto', 'gpu' or 'workers', got {requested!r}")
    if cache_rate is not None and not 0.0 <= float(cache_rate) <= 1.0:
        raise ValueError(f"cache_rate must be in [0, 1], got {cache_rate}")
    workers = default_num_workers() if num_workers is None else int(num_workers)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda" and torch.cuda.is_available()
    if requested == "gpu" and not cuda:
        raise ValueError("--loader gpu caches the data on a CUDA GPU, and this run has none: drop it (CPU workers), or run on a GPU")
    listing_error = None
    if cases is None:
        try:
            cases = list_cases(root, "train", datalist, fold) + list_cases(root, "val", datalist, fold)
        except DataError as err:
            listing_error = err.problems[0] if err.problems else str(err)
    nbytes = estimate_cache_bytes(cfg, cases) if cases is not None else None
    size = f"{len(cases)} cases ~{_gib(nbytes)}" if cases is not None and nbytes is not None else "size unknown"

    def on_workers(why: str) -> LoaderChoice:
        rate = cache_rate
        if store:
            rate = 0.0 if rate is None else rate
            held = "no case held in RAM" if rate <= 0 else f"{100 * rate:.0f}% of the cases held in RAM"
            return LoaderChoice("workers", None, float(rate), workers, f"CPU workers ({workers}) read the crops from the store's memory maps, {held}: {why}", nbytes)
        if rate is None:
            ram = _available_ram()
            rate = 1.0 if nbytes is not None and ram is not None and nbytes <= RAM_CACHE_SHARE * ram else cfg.cache_rate
        cached = f" ({size} in RAM)" if rate >= 1.0 and nbytes is not None else ""
        return LoaderChoice("workers", None, float(rate), workers, f"CPU workers ({workers}), cache_rate {rate:g}{cached}: {why}", nbytes)

    if not cuda:
        return on_workers("no CUDA device" if not torch.cuda.is_available() else f"the run is on {dev}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if requested == "workers":
        return on_workers("asked for (--loader workers)")
    free = int(torch.cuda.mem_get_info(dev)[0])
    if requested == "gpu":
        rate = 1.0 if cache_rate is None else float(cache_rate)
        return LoaderChoice("gpu", str(dev), rate, 0, f"GPU cache, cache_rate {rate:g}: asked for (--loader gpu); {size}, {_gib(free)} free on {dev}", nbytes)
    if nbytes is None:
        return on_workers(f"the cases could not be listed to size the cache ({listing_error})")
    if cache_rate is not None and float(cache_rate) < 1.0:
        return on_workers(f"--cache_rate {cache_rate:g} leaves cases uncached, and the GPU path needs them all cached")
    if nbytes <= gpu_share * free:
        source = ", loaded from the store" if store else ""
        return LoaderChoice("gpu", str(dev), 1.0, 0, f"GPU cache{source}: {size} fit in {100 * gpu_share:.0f}% of the {_gib(free)} free on {dev}", nbytes)
    return on_workers(f"{size} exceed {100 * gpu_share:.0f}% of the {_gib(free)} free on {dev}")

"""Loader mechanics: cached datasets or the pre-processed store, the endless training stream, the
prefetch thread that augments ahead of the step, and the test loader."""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from monai.data import (
    CacheDataset,
    DataLoader,
    Dataset,
    ThreadDataLoader,
    partition_dataset,
)
from monai.data.utils import worker_init_fn as monai_worker_init_fn
from monai.transforms import (
    Compose,
)

from rep3d.data.augment import BatchAugment
from rep3d.data.cases import list_cases
from rep3d.data.checks import CheckRecord, check_cases, check_dataset
from rep3d.data.dataset_config import DataError, DatasetConfig
from rep3d.data.store import OFF, Store, prepare_store
from rep3d.data.store_dataset import StoreTrainDataset, StoreValDataset
from rep3d.data.store_layout import check_record_path
from rep3d.data.transforms import (
    get_test_transforms,
    get_train_transforms,
    get_val_transforms,
)
from rep3d.runtime import default_num_workers


def _rank_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _dataset(cases: list[dict], transform: Compose, cache_rate: float, num_workers: int, copy_cache: bool = True):
    # copy_cache=False: the random part only reads the cached case (the crops are sliced views,
    # then stacked into a new batch), so the deep copy of a whole volume per draw is not needed.
    if cache_rate > 0:
        return CacheDataset(cases, transform=transform, cache_rate=cache_rate, num_workers=max(1, num_workers), progress=False, copy_cache=copy_cache)
    return Dataset(cases, transform=transform)


class _Endless(torch.utils.data.Sampler):
    """Shuffled epoch after shuffled epoch, without end: the DataLoader never restarts, so its
    workers keep preparing batches across epoch boundaries. (With 8 cases an epoch is 8 batches,
    and a restart cost one whole batch latency every 8 iterations: benchmarks/RESULTS.md, run 10.)"""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator

    def __iter__(self) -> Iterator[int]:
        while True:
            yield from torch.randperm(self.n, generator=self.generator).tolist()


def _collate_crops(items: list) -> dict:
    """Stack the crops of the cases of a batch (each case gives a list of crop dicts) into one batch."""
    crops = [c for item in items for c in (item if isinstance(item, list) else [item])]
    return {key: torch.stack([torch.as_tensor(c[key]) for c in crops]) for key in ("image", "label")}


class _AugmentingCollate:
    """Collation plus :class:`BatchAugment` on the CPU, in the worker (when no GPU augments)."""

    def __init__(self, augment: BatchAugment) -> None:
        self.augment = augment
        self._seed: int | None = None

    def __call__(self, items: list) -> dict:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._seed != info.seed:
            # Each worker draws its own parameters (the copies made at fork would repeat them).
            self._seed = info.seed
            self.augment.set_random_state(seed=info.seed % (2**32))
        batch = _collate_crops(items)
        batch["image"], batch["label"] = self.augment(batch["image"], batch["label"])
        return batch


def _worker_init(worker_id: int) -> None:
    """DataLoader worker start: MONAI's per-worker seeding of the random crops, one compute thread
    (workers run side by side; intra-op threads would only compete for the same cores)."""
    monai_worker_init_fn(worker_id)
    torch.set_num_threads(1)


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _shutdown(batches: Iterator | None) -> None:
    """Stop a DataLoader iterator's worker processes and pin-memory thread now (idempotent).

    Left to garbage collection at exit, the endless stream keeps the pin-memory thread pinning while
    the interpreter shuts down, and a daemon thread caught inside PyTorch's C++ then aborts the
    process ("terminate called without an active exception", seen on an H100 machine)."""
    stop_workers = getattr(batches, "_shutdown_workers", None)
    if stop_workers is not None:
        stop_workers()


def _produce(batches: Iterator[dict], augment: BatchAugment | None, device: torch.device, q: queue.Queue, stop: threading.Event) -> None:
    """Prefetch thread: next crop batch, to ``device``, augmented; on CUDA all on a side stream."""
    try:
        cuda = device.type == "cuda"
        stream = None
        if cuda:
            torch.cuda.set_device(device)
            stream = torch.cuda.Stream(device)
            # The cache was written on the default stream: order this stream after it once.
            stream.wait_stream(torch.cuda.default_stream(device))
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            for batch in batches:
                if stop.is_set():
                    return
                image = batch["image"].to(device, non_blocking=True)
                label = batch["label"].to(device, non_blocking=True)
                if augment is not None:
                    image, label = augment(image, label)
                done = None
                if cuda:
                    done = torch.cuda.Event()
                    done.record(stream)
                if not _put(q, (image, label, done), stop):
                    return
    except BaseException as err:  # noqa: BLE001 - handed to the training loop, which raises it
        _put(q, _Failure(err), stop)
    finally:
        if stop.is_set():
            _shutdown(batches)


_LIVE_LOADERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for loader in list(_LIVE_LOADERS):
        loader.close()


class TrainLoader:
    """The training loader: epochs of ``len(self)`` batches cut from one endless stream of crops.

    ``inner`` is a DataLoader over an endless sampler (it is never restarted). Without ``device``,
    its batches are yielded as they come (augmented already, or by the caller). With ``device``, a
    thread takes each batch, copies it there (from pinned memory) and augments it with ``augment``,
    ``prefetch`` batches ahead of the training step; on a CUDA device on its own stream, and the batch
    handed out is ordered after that work on the current stream.

    Attributes:
        dataset: the training dataset (``len(loader.dataset)`` cases).
        path: ``"gpu"`` (cache and crops on the GPU), ``"workers"`` (CPU workers cut the crops).
        augment_device: where :class:`BatchAugment` runs.
    """

    def __init__(self, inner, n_batches: int, path: str, augment: BatchAugment | None = None, device: torch.device | None = None, prefetch: int = 2) -> None:
        #: The pre-processed store the crops are read from (:class:`rep3d.data.store.Store`), or None.
        self.store: Store | None = None
        #: What the data check did, for the start line (None when it was skipped).
        self.check_note: str | None = None
        self.inner = inner
        self.dataset = inner.dataset
        self.batch_size = inner.batch_size
        self.path = path
        self.n_batches = n_batches
        self.augment = augment
        self.device = device
        self.augment_device = str(device) if device is not None else "cpu (in the loader)"
        self.prefetch = max(1, int(prefetch))
        self._it: Iterator | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        _LIVE_LOADERS.add(self)

    def __len__(self) -> int:
        return self.n_batches

    def _start(self) -> None:
        if self.device is None:
            if self._it is None:
                self._it = iter(self.inner)
            return
        if self._thread is not None:
            return
        self._queue = queue.Queue(maxsize=self.prefetch)
        # Worker processes are forked here, from the calling thread, not from the prefetch thread.
        self._it = iter(self.inner)
        # The thread holds what it needs, not the loader, so that a dropped loader stops it.
        self._thread = threading.Thread(
            target=_produce, args=(self._it, self.augment, self.device, self._queue, self._stop), daemon=True, name="rep3d-train-prefetch"
        )  # fmt: skip
        self._thread.start()

    def _next_prefetched(self) -> dict:
        assert self._queue is not None and self._thread is not None
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the training data thread stopped without an error; this is a bug") from None
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        image, label, done = item
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            # Allocated on the side stream, used on this one: keep the memory until this stream is done.
            image.record_stream(current)
            label.record_stream(current)
        return {"image": image, "label": label}

    def __iter__(self) -> Iterator[dict]:
        self._start()
        for _ in range(self.n_batches):
            if self.device is None:
                assert self._it is not None
                yield next(self._it)
            else:
                yield self._next_prefetched()

    def close(self) -> None:
        """Stop the prefetch thread, the worker processes and the pin-memory thread; the loader
        cannot be used after. Called at exit for every loader still open."""
        self._stop.set()
        if self._queue is not None:
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if self._thread is None or not self._thread.is_alive():
            _shutdown(self._it)
        self._it = None

    def __del__(self) -> None:
        self._stop.set()


def _resolve_augment_device(augment_device: str | torch.device | None, cache_device: str | torch.device | None) -> torch.device:
    if isinstance(augment_device, str) and augment_device == "auto":
        if cache_device is not None:
            augment_device = cache_device
        elif torch.cuda.is_available():
            augment_device = "cuda"
        else:
            augment_device = "cpu"
    dev = torch.device(augment_device if augment_device is not None else "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("augment_device is a CUDA device but none is visible; pass augment_device='cpu'")
        if dev.index is None:
            # Threads start on device 0: name the caller's current device (its DDP rank's GPU).
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def get_loaders(
    cfg: DatasetConfig,
    root: str | None,
    roi: Sequence[int] | None = None,
    crop_sample: int = 2,
    batch_size: int = 1,
    cache_rate: float = 0.1,
    num_workers: int = 2,
    datalist: str | None = None,
    fold: int = 0,
    device: str | torch.device | None = None,
    distributed: bool = False,
    seed: int = 0,
    check: bool = True,
    *,
    crop_ratios: Sequence[float] | None = None,
    augment_device: str | torch.device | None = "auto",
    prefetch: int = 2,
    preprocessed: str | None = OFF,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[TrainLoader, torch.utils.data.DataLoader]:
    """Training and validation loaders, after checking every case (one DataError for all problems).

    Training batches hold ``batch_size * crop_sample`` crops of ``roi`` (``{"image", "label"}``, float32,
    shape ``(batch_size * crop_sample, C, *roi)``); validation batches one whole pre-processed volume.
    Crop centres come from indices computed once per case in the cached part; whole batches are
    augmented at once (:class:`BatchAugment`); the training stream never restarts between epochs.

    Two paths (:func:`choose_loader` picks one when the user does not):

    * GPU (``device`` set, e.g. ``"cuda"``): cached volumes live on that GPU. A thread of this process
      cuts the crops there, stacks and augments them on a side CUDA stream, ``prefetch`` batches ahead.
      Use ``cache_rate=1.0``: an uncached case would be loaded and resampled in that thread.
    * CPU workers (``device=None``): ``num_workers`` processes (one thread each) cut the crops from the
      cache in RAM and stack them into pinned memory; a thread copies each batch to the GPU and
      augments it there (``augment_device``), or, without CUDA, the workers augment on the CPU.

    With a pre-processed store (``preprocessed`` not ``"off"``, :mod:`rep3d.data.store`), the cases are
    pre-processed once into memory-mappable arrays (built or updated first, by rank 0 under DDP) and no
    case is pre-processed again: ``cache_rate`` is then the share of cases held in memory (RAM, or the
    GPU of the GPU path), the others are memory-mapped at each draw and only their crops are read.
    The crops equal the in-memory path's for a seed; validation reads the same volumes from the store.

    Args:
        cfg: dataset config.
        root: dataset folder (see :func:`list_cases`).
        roi: crop size; defaults to ``cfg.roi``.
        crop_sample: crops per case per iteration.
        batch_size: cases per training batch.
        cache_rate: fraction of each split cached after the deterministic transforms.
        num_workers: loader worker processes, also the threads / processes that check the cases, build
            the store and fill the cache (0: no loader workers, and one per core but one for those); the GPU path
            uses none.
        datalist: optional MONAI datalist JSON.
        fold: validation fold (see :func:`list_cases`).
        device: the GPU that holds the cache (GPU path), or None (CPU workers).
        distributed: give each rank its own shard of both splits (``partition_dataset``: training
            shards even, validation shards disjoint, so each case is scored once; the metric
            reduction across ranks is the caller's).
        seed: seed of the shuffling and of the random transforms.
        check: run :func:`check_dataset` first (leave True; tests may skip it).
        crop_ratios: class-balanced crop centres, one share per class (background first); ``None``:
            the paper's 1:1 foreground/background crops.
        augment_device: where the batch augmentation runs: ``"auto"`` (the cache's GPU, else the
            current CUDA device, else the CPU workers), a device, or ``"cpu"`` (in the workers; the
            batches then stay on the CPU, pinned when CUDA is available). Training batches come out on
            this device.
        prefetch: batches the GPU thread prepares ahead of the step.
        preprocessed: the store's base folder, ``"auto"`` / ``None`` (``$REP3D_PREPROCESSED``, else the user's
            cache folder: :func:`rep3d.data.store.default_base`) or ``"off"`` (the in-memory cache; the default here).
        progress: a progress bar while the store is built.
        log: where the store's building / waiting messages go.

    Raises:
        DataError: listing every problem in the data.
        StoreError: the store cannot be written (the message names ``--preprocessed``).
    """
    roi = tuple(int(r) for r in (roi or cfg.roi))
    # Checking, building the store and filling the cache are one-off and parallel: the GPU path, which
    # starts no loader workers, still uses the cores for them.
    io_workers = num_workers if num_workers > 0 else default_num_workers()
    if check:
        record = CheckRecord(check_record_path(preprocessed, root, datalist))  # remembers nothing with --preprocessed off
        t_check = time.perf_counter()
        splits = check_dataset(cfg, root, ("train", "val"), datalist=datalist, fold=fold, roi=roi, num_workers=io_workers, record=record)
        train_cases, val_cases = splits["train"], splits["val"]
        n = len(train_cases) + len(val_cases)
        unchanged = f", {record.reused} unchanged since their last check (headers read)" if record.reused else ""
        check_note = f"data check: {n} cases in {time.perf_counter() - t_check:.1f} s{unchanged}"
    else:
        train_cases, val_cases = list_cases(root, "train", datalist, fold), list_cases(root, "val", datalist, fold)
        check_note = None
    rank, world = _rank_world(distributed)
    store = prepare_store(  # None with --preprocessed off
        cfg, train_cases + val_cases, preprocessed, root=root, datalist=datalist, roi=roi, crop_ratios=crop_ratios,
        num_workers=io_workers, rank=rank, progress=progress and rank == 0, log=log,
    )  # fmt: skip
    if world > 1:
        if len(train_cases) < world:
            raise DataError([f"{len(train_cases)} training cases for {world} processes. Fix: use at most {len(train_cases)} processes"])
        train_cases = partition_dataset(train_cases, num_partitions=world, shuffle=True, seed=seed, even_divisible=True)[rank]
        # Strided shards: disjoint, and a rank may get none when there are fewer cases than ranks
        # (validation reduces per-class sums and counts across ranks, so an empty shard is fine).
        val_cases = val_cases[rank::world]
    aug_dev = _resolve_augment_device(augment_device, device)
    if device is not None and aug_dev.type != "cuda":
        raise ValueError(f"the GPU cache (device={device}) augments on its GPU; augment_device={augment_device!r} does not fit it")
    train_tf = get_train_transforms(cfg, roi, crop_sample, device=device, crop_ratios=crop_ratios, augment=False)
    train_tf.set_random_state(seed=seed + rank)
    val_tf = get_val_transforms(cfg, device=device)
    if store is not None:
        train_ds = StoreTrainDataset(store.records(train_cases), train_tf, cache_rate, device=device, num_workers=io_workers)
        val_ds = StoreValDataset(store.records(val_cases), cache_rate, device=device, num_workers=io_workers)
    else:
        train_ds = _dataset(train_cases, train_tf, cache_rate, io_workers, copy_cache=False)
        val_ds = _dataset(val_cases, val_tf, cache_rate, io_workers)
    generator = torch.Generator().manual_seed(seed + rank)
    augment = BatchAugment().set_random_state(seed=seed + rank + 1)
    sampler = _Endless(len(train_ds), generator)
    n_batches = max(1, math.ceil(len(train_ds) / batch_size)) if len(train_ds) else 0
    if device is not None:
        # CUDA tensors cannot cross process boundaries: the crops are cut in the prefetch thread.
        inner = DataLoader(train_ds, batch_size=batch_size, sampler=sampler, num_workers=0, collate_fn=_collate_crops, generator=generator)
        train_loader = TrainLoader(inner, n_batches, "gpu", augment, aug_dev, prefetch)
        train_loader.store, train_loader.check_note = store, check_note
        val_loader = ThreadDataLoader(val_ds, batch_size=1, num_workers=0)
        return train_loader, val_loader
    on_gpu = aug_dev.type == "cuda"
    pin = torch.cuda.is_available()
    workers = dict(num_workers=num_workers, worker_init_fn=_worker_init, prefetch_factor=4) if num_workers > 0 else {}
    inner = DataLoader(
        train_ds, batch_size=batch_size, sampler=sampler, pin_memory=pin, generator=generator,
        collate_fn=_collate_crops if on_gpu else _AugmentingCollate(augment), **workers,
    )  # fmt: skip
    train_loader = TrainLoader(inner, n_batches, "workers", augment if on_gpu else None, aug_dev if on_gpu else None, prefetch)
    train_loader.store, train_loader.check_note = store, check_note
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=num_workers, pin_memory=pin)
    return train_loader, val_loader


def get_test_loader(cfg: DatasetConfig, inputs: list[dict] | list[str], num_workers: int = 2, keep_label: bool = False, check: bool = True) -> tuple[torch.utils.data.DataLoader, Compose]:
    """Loader over images to predict, and the chain to give :func:`get_post_transforms`.

    Args:
        cfg: dataset config.
        inputs: ``[{"image": path, "label": optional path}]`` (e.g. from ``list_cases(root, "test")``
            or :func:`list_images`), or plain image paths.
        num_workers: loader workers.
        keep_label: also load each case's label in native space (see :func:`get_test_transforms`).
        check: verify the files first (headers; label values when labels are given).

    Raises:
        DataError: listing every unreadable or malformed input.
    """
    cases = [{"image": c} if isinstance(c, str) else dict(c) for c in inputs]
    if not keep_label:
        cases = [{"image": c["image"]} for c in cases]
    if check:
        check_cases(cases, cfg, num_workers=num_workers)
    test_tf = get_test_transforms(cfg, keep_label=keep_label)
    loader = DataLoader(Dataset(cases, transform=test_tf), batch_size=1, num_workers=num_workers)
    return loader, test_tf

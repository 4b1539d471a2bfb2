"""The pre-processed store: every case after the deterministic part of the pipeline, written once as
uncompressed ``.npy`` arrays that training memory-maps, and kept while its sources and settings hold.

A store is one folder per dataset and pre-processing settings::

    <base>/<dataset key>/<settings hash>/
        store.json                 settings, dataset, every case's source identity: the complete marker
        .rep3d.lock                held (fcntl) by the one process building or updating the store
        cases/<case id>.json       per case: source files (path, size, mtime_ns), shapes, padding,
                                   geometry (affines, original shape, the transform trace), index layout
        cases/<case id>.image.npy  float32 (C, X, Y, Z): resampled, RAS, normalised, cropped to the
                                   foreground, zero-padded to the ROI where smaller: the training cache
        cases/<case id>.label.npy  uint8 (1, X, Y, Z) (int16 above 256 classes)
        cases/<case id>.fg.npy     crop-centre indices as the transforms compute them (int32, or int64
        cases/<case id>.bg.npy     above 2**31 voxels): foreground / background, or with class-balanced
                                   crops one ``classes.npy`` (every class's, concatenated; offsets in the JSON)

``<base>`` is ``--preprocessed DIR``, else ``$REP3D_PREPROCESSED``, else ``$XDG_CACHE_HOME/rep3d/preprocessed``
(``~/.cache/rep3d/preprocessed``): outside the dataset, so a read-only dataset folder works. The
dataset key is the dataset folder's name and a hash of its real path (and of the datalist's); the
settings hash covers everything that changes a stored byte (:func:`store_settings`: spacing, channels,
intensity scheme and parameters, foreground-crop rule, ROI padding, crop-centre rule, format version,
a digest of the pre-processing code, MONAI's and torch's versions), so a changed setting builds a new
store beside the old one. Locations and identities are :mod:`rep3d.data.store_layout`.

Updating is per case: a case whose source files (path, size, mtime_ns) changed is rebuilt, a new case
is built, a case no longer listed is dropped, the others are reused untouched. Each array and then the
case's JSON is written under a temporary name and renamed (:func:`rep3d.fileio.atomic_path`); the JSON
comes last, so a case is complete exactly when its JSON is there, and an interrupted build resumes
where it stopped. One process builds at a time (:class:`rep3d.fileio.FolderLock` on the store folder);
others wait for it, and DDP ranks other than 0 wait for rank 0's ``store.json``
(:func:`prepare_store`). Reading is :mod:`rep3d.data.store_dataset`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import multiprocessing
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import monai
import numpy as np
import torch
from monai.transforms import Compose, Randomizable, SpatialPadd
from tqdm import tqdm

from rep3d.data import image_io, intensity, transforms
from rep3d.data.cases import image_paths
from rep3d.data.dataset_config import DataError, DatasetConfig
from rep3d.data.intensity import get_scheme
from rep3d.data.store_layout import (  # the layout's public names are this module's too
    AUTO,
    CASES,
    ENV_VAR,
    FAILED_FILE,
    INDEX_FILE,
    OFF,
    STORE_FORMAT_VERSION,
    Store,
    StoreError,
    StoreReport,
    _complete,
    _fresh_from_index,
    _read_cases,
    _remove_case_files,
    _store_write_error,
    case_id,
    case_identity,
    dataset_key,
    default_base,
    file_identity,
    label_dtype,
    resolve_base,
    settings_hash,
    source_digest,
)
from rep3d.data.transforms import get_train_transforms, get_val_transforms
from rep3d.fileio import (
    FolderLock,
    FolderLockedError,
    WriteError,
    atomic_path,
    read_json,
    remove_stale_temporaries,
    write_json,
)

__all__ = [
    "AUTO", "ENV_VAR", "OFF", "STORE_FORMAT_VERSION", "Store", "StoreError", "StoreReport", "build_store", "case_id",
    "case_identity", "dataset_key", "default_base", "file_identity", "pipeline_digest", "prepare_store", "preprocess_case",
    "resolve_base", "store_path", "store_settings", "wait_for_store", "write_case",
]  # fmt: skip


def store_settings(cfg: DatasetConfig, roi: Sequence[int] | None = None, crop_ratios: Sequence[float] | None = None) -> dict:
    """Everything that changes a stored byte; its hash names the store's folder.

    Spacing, channel count, each channel's intensity scheme and parameters (and whether one uniform
    transform or the per-channel one applies them), the foreground-crop rule (its order and the
    thresholds), the ROI (volumes smaller than it are padded in the store), the crop-centre rule
    (foreground / background indices, with background inside the body for windowed CT; or one index
    list per class), the store format, a digest of the pre-processing code (:func:`pipeline_digest`)
    and the MONAI and torch versions (their resampling makes the voxels). Class names, the crop
    ratios' values, cache rate and the like change nothing stored and are left out.
    """
    roi = [int(r) for r in (roi or cfg.roi)]
    norms = cfg.channel_norms()
    if cfg.normalization is not None:
        crop = {"order": "crop_then_normalise", "thresholds": [get_scheme(n["scheme"]).foreground_threshold(n) for n in norms]}
    elif get_scheme(cfg.intensity).normalise_then_crop:
        crop = {"order": "normalise_then_crop", "thresholds": [0.0]}
    else:
        crop = {"order": "crop_then_normalise", "thresholds": [0.0]}
    body = bool(cfg.scheme is not None and cfg.scheme.positive_body)
    centres = {"rule": "fg_bg", "background_inside_body": body} if crop_ratios is None else {"rule": "classes", "num_classes": int(cfg.num_classes), "background_inside_body": body}
    return {
        "format": STORE_FORMAT_VERSION,
        "code": pipeline_digest(),
        "monai": monai.__version__,
        "torch": ".".join(torch.__version__.split(".")[:2]),
        "spacing": [float(s) for s in cfg.spacing],
        "orientation": "RAS",
        "interpolation": ["bilinear", "nearest"],
        "channels": cfg.in_channels,
        "normalization": norms,
        "normalization_transform": "per_channel" if cfg.normalization is not None else "uniform",
        "foreground_crop": crop,
        "pad_to_roi": roi,
        "crop_centres": centres,
        "image_dtype": "float32",
        "label_dtype": label_dtype(cfg.num_classes).name,
    }


@functools.lru_cache(maxsize=1)
def pipeline_digest() -> str:
    """A digest of the code that makes the stored bytes: the transform chains, the intensity schemes,
    the image readers and this module's pre-processing of a case. A change of that code (not of its
    comments or docstrings) builds new stores, so that training never reads arrays an older pipeline made."""
    return source_digest(*_PIPELINE_SOURCES)


def _locate(base: str, cfg: DatasetConfig, root: str | None, datalist: str | None, roi: Sequence[int] | None, crop_ratios: Sequence[float] | None) -> tuple[tuple[int, ...], dict, str]:
    """``(roi, settings, folder)`` of this dataset's store for these settings."""
    roi = tuple(int(r) for r in (roi or cfg.roi))
    settings = store_settings(cfg, roi, crop_ratios)
    return roi, settings, os.path.join(base, dataset_key(root, datalist), settings_hash(settings))


def store_path(base: str, cfg: DatasetConfig, root: str | None, datalist: str | None, roi: Sequence[int] | None = None, crop_ratios: Sequence[float] | None = None) -> str:
    """``<base>/<dataset key>/<settings hash>``: the folder of this dataset's store for these settings."""
    return _locate(base, cfg, root, datalist, roi, crop_ratios)[2]


# ------------------------------------------------------------------------------------------ building


class _Chains:
    """The deterministic chain of the training cache, cut in two: pre-processing (MetaTensors, whose
    metadata the store keeps) and the rest (padding, plain tensors, crop-centre indices)."""

    def __init__(self, cfg: DatasetConfig, roi: Sequence[int], crop_ratios: Sequence[float] | None) -> None:
        self.pre = get_val_transforms(cfg)
        train = get_train_transforms(cfg, roi, 1, crop_ratios=crop_ratios, augment=False)
        first = train.get_index_of_first(lambda t: isinstance(t, Randomizable))
        n = len(self.pre.transforms)
        if first is None or [type(t) for t in train.transforms[:n]] != [type(t) for t in self.pre.transforms]:
            raise RuntimeError("the training chain no longer starts with the validation chain's pre-processing; rep3d.data.store needs updating")
        self.rest = Compose(list(train.transforms[n:first]))
        self.padder = next(t for t in self.rest.transforms if isinstance(t, SpatialPadd)).padder


def _plain(value):
    """JSON-ready copy of MONAI metadata (tensors and arrays as lists, enum keys as strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value).tolist()
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def preprocess_case(case: dict, chains: _Chains, dtype: np.dtype) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and the metadata of one case, exactly as the training cache holds them."""
    d = chains.pre({k: case[k] for k in ("image", "label") if k in case})
    img = d["image"]
    unpadded = [int(s) for s in img.shape[1:]]
    geometry = {
        "affine": _plain(img.affine),  # voxel -> world (RAS mm) of the unpadded volume
        "original_affine": _plain(img.meta.get("original_affine")),
        "original_shape": _plain(img.meta.get("spatial_shape")),
        "transforms": _plain(img.applied_operations),  # what Invertd replays to go back to native space
    }
    out = chains.rest(d)
    label = out["label"]
    lab = np.asarray(label.cpu().numpy())
    stored = lab.astype(dtype)
    if not np.array_equal(stored, lab):
        raise ValueError(f"label values do not fit {dtype.name} (non-integer or out of range after resampling)")
    arrays = {"image": np.ascontiguousarray(out["image"].cpu().numpy(), dtype=np.float32), "label": stored}
    if "label_cls_indices" in out:
        parts = [np.asarray(torch.as_tensor(x).cpu().numpy()) for x in out["label_cls_indices"]]
        offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()
        arrays["classes"] = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        indices = {"rule": "classes", "offsets": [int(o) for o in offsets]}
    else:
        arrays["fg"] = np.asarray(out["label_fg_indices"].cpu().numpy())
        arrays["bg"] = np.asarray(out["label_bg_indices"].cpu().numpy())
        indices = {"rule": "fg_bg", "fg": int(arrays["fg"].size), "bg": int(arrays["bg"].size)}
    pad = [[int(a), int(b)] for a, b in chains.padder.compute_pad_width(unpadded)[1:]]
    meta = {
        "shape": [int(s) for s in arrays["image"].shape[1:]],
        "unpadded_shape": unpadded,
        "pad": pad,
        "channels": int(arrays["image"].shape[0]),
        "indices": indices,
        "label_dtype_in_memory": str(label.dtype).replace("torch.", ""),
        "label_values": [int(v) for v in np.flatnonzero(np.bincount(stored.ravel().astype(np.int64)))] if stored.size else [],
        **geometry,
    }
    return arrays, meta


def write_case(folder: str, cid: str, arrays: dict[str, np.ndarray], meta: dict) -> dict:
    """Write one case: each array atomically, then its JSON (last: the case is complete once it is
    there). Returns the JSON written."""
    files, nbytes = {}, 0
    for key, arr in arrays.items():
        name = f"{cid}.{key}.npy"
        with atomic_path(os.path.join(folder, name), suffix=".npy") as tmp:
            np.save(tmp, arr, allow_pickle=False)
        files[key] = name
        nbytes += os.path.getsize(os.path.join(folder, name))
    meta = {**meta, "files": files, "bytes": nbytes}
    write_json(meta, os.path.join(folder, f"{cid}.json"))
    return meta


def _write_failed(err: BaseException) -> bool:
    return isinstance(err, (WriteError, OSError)) and not isinstance(err, StoreError)


# Per worker process (or the building process): the chains of the build it works for.
_CHAINS: dict[tuple, _Chains] = {}


def _build_one(item: tuple[str, dict], folder: str, cfg: DatasetConfig, roi: tuple, crop_ratios, settings_id: str) -> tuple[str, dict | None, str | None, tuple | None]:
    """Pre-process and write one case: ``(id, its JSON or None, a problem line or None, a write failure
    (path, errno, message) or None)``; failures come back as values, so that they cross process boundaries."""
    cid, case = item
    key = (settings_id, tuple(roi), None if crop_ratios is None else tuple(crop_ratios))
    if key not in _CHAINS:
        _CHAINS[key] = _Chains(cfg, roi, crop_ratios)
    try:
        arrays, meta = preprocess_case(case, _CHAINS[key], label_dtype(cfg.num_classes))
    except Exception as err:  # noqa: BLE001 - one line per broken case, the others go on
        where = ", ".join(image_paths(case["image"]) + ([case["label"]] if case.get("label") else []))
        return cid, None, f"{where}: could not be pre-processed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Fix: re-export the file, or move the case out", None
    meta.update(id=cid, settings=settings_id, format=STORE_FORMAT_VERSION, source=case_identity(case),
                image_files=image_paths(case["image"]), label_file=case.get("label"))  # fmt: skip
    try:
        return cid, write_case(folder, cid, arrays, meta), None, None
    except WriteError as err:
        return cid, None, None, (err.path, err.errno, str(err))


def _worker_start(torch_threads: int) -> None:
    torch.set_num_threads(torch_threads)


def _process_context():
    """Fork (nothing imported again) unless this process has CUDA up (a training run on a GPU, where a
    forked child must not touch CUDA and may inherit held locks): then a fork server, started clean,
    that imports this module once and forks the workers from there."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and not torch.cuda.is_initialized():
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _build_cases(todo: list[tuple[str, dict]], path: str, cfg: DatasetConfig, roi, crop_ratios, settings_id: str, num_workers: int, progress: bool) -> tuple[dict[str, dict], list[str]]:
    """Pre-process and write ``todo`` (``[(id, case)]``); returns the JSONs written and a problem line
    per case that could not be pre-processed.

    One worker: in this process. More: that many worker processes (forked, so nothing is imported
    again, or from a fork server when CUDA is up), each with its share of the cores as torch threads.
    Threads scaled badly: on a 16-core H200 host, 60 CT cases took 116 s on 8 threads and 66 s on 2
    (GIL and thread-pool contention). A write failure stops the build; the cases written until then
    are kept."""
    folder = os.path.join(path, CASES)
    written, problems = {}, []
    if not todo:
        return written, problems
    workers = max(1, min(int(num_workers or 1), len(todo)))
    args = (folder, cfg, tuple(roi), crop_ratios, settings_id)
    bar = tqdm(total=len(todo), desc="pre-processing", unit="case", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def take(result: tuple) -> None:
        cid, meta, problem, failed = result
        if failed is not None:
            raise WriteError(failed[0], OSError(failed[1] or 0, failed[2]))
        if meta is not None:
            written[cid] = meta
        if problem:
            problems.append(problem)
        bar.update(1)

    try:
        if workers == 1:
            for item in todo:
                take(_build_one(item, *args))
            return written, problems
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        context = _process_context()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks", category=DeprecationWarning)
            pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start, initargs=(max(1, cores // workers),))
            try:
                pending = {pool.submit(_build_one, item, *args) for item in todo}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        take(fut.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # cases being written finish (each is atomic)
                raise
            pool.shutdown(wait=True)
        return written, problems
    finally:
        bar.close()


def _index(path: str, settings: dict, cfg: DatasetConfig, root, datalist, cases: dict[str, dict]) -> dict:
    return {
        "format": STORE_FORMAT_VERSION,
        "settings_hash": os.path.basename(path),
        "settings": settings,
        "dataset": {"name": cfg.name, "root": os.path.abspath(root) if root else None, "datalist": os.path.abspath(datalist) if datalist else None},
        "cases": {cid: {"source": m["source"], "bytes": m["bytes"]} for cid, m in sorted(cases.items())},
        "bytes": sum(int(m["bytes"]) for m in cases.values()),
        "written_by": f"pid {os.getpid()} on {socket.gethostname()}",
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _acquire(path: str, log: Callable[[str], None]) -> FolderLock | None:
    """The store's lock, waiting while another process holds it; ``None`` when the folder cannot be
    written (a read-only store: usable only when already complete)."""
    lock = FolderLock(path, "rep3d store build")
    said = 0.0
    while True:
        try:
            return lock.acquire()
        except FolderLockedError:
            if time.time() - said > 60:
                holder = ""
                with contextlib.suppress(OSError), open(lock.path) as f:
                    holder = f.read().strip()
                log(f"waiting for {holder or 'another process'} to finish building the store {path}")
                said = time.time()
            time.sleep(0.5)
        except WriteError as err:
            if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return None
            raise _store_write_error(path, err) from None


def build_store(
    cfg: DatasetConfig,
    cases: Sequence[dict],
    base: str,
    *,
    root: str | None = None,
    datalist: str | None = None,
    roi: Sequence[int] | None = None,
    crop_ratios: Sequence[float] | None = None,
    num_workers: int = 2,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Store:
    """Build or update the store of ``cases`` under ``base`` and return it (the caller checked the data).

    Under the store's lock: temporaries of killed writes are removed; each listed case whose JSON
    records the same source identity and settings, with its arrays all there, is reused; the others
    are pre-processed and written by ``num_workers`` processes (a tqdm bar with ``progress``); cases no
    longer listed are dropped; ``store.json`` is rewritten last.

    Raises:
        DataError: cases that could not be pre-processed (every one listed; the others are kept).
        StoreError: the store folder cannot be written (the message names ``--preprocessed``), or a
            read-only store that is not up to date.
    """
    say = log or (lambda m: None)
    t0 = time.time()
    roi, settings, path = _locate(base, cfg, root, datalist, roi, crop_ratios)
    wanted = {case_id(c): c for c in cases}
    try:
        os.makedirs(os.path.join(path, CASES), exist_ok=True)
    except OSError as err:
        if not os.path.isdir(os.path.join(path, CASES)):
            raise _store_write_error(path, err) from None
    lock = _acquire(path, say)
    try:
        if lock is not None:
            remove_stale_temporaries(path)
            with contextlib.suppress(OSError):
                os.remove(os.path.join(path, FAILED_FILE))
        sid = os.path.basename(path)
        existing = _read_cases(path)
        fresh = {cid: m for cid, m in existing.items() if cid in wanted and m["source"] == case_identity(wanted[cid]) and _complete(path, m, sid)}
        todo = [(cid, c) for cid, c in wanted.items() if cid not in fresh]
        dropped = [cid for cid in existing if cid not in wanted]
        if lock is None:
            if todo or dropped:
                raise StoreError(path, f"the pre-processed store {path} is read-only and not up to date ({len(todo)} case(s) to build, {len(dropped)} to drop). "
                                       "Fix: run preprocess.py where it can be written, or pass --preprocessed DIR (a writable folder), or --preprocessed off")  # fmt: skip
            return Store(path, settings, fresh, StoreReport(path, "reused", len(fresh), seconds=time.time() - t0, nbytes=sum(int(m["bytes"]) for m in fresh.values())))
        n_removed = _remove_case_files(path, set(wanted))
        if todo:
            say(f"pre-processing {len(todo)} of {len(wanted)} case(s) into the store {path} ({max(1, min(num_workers or 1, len(todo)))} process(es))")
        try:
            written, problems = _build_cases(todo, path, cfg, roi, crop_ratios, sid, num_workers, progress)
        except BaseException as err:
            _note_failure(path, err)
            if _write_failed(err):
                raise _store_write_error(path, err) from None
            raise
        current = {**fresh, **written}
        try:
            write_json(_index(path, settings, cfg, root, datalist, current), os.path.join(path, INDEX_FILE))
        except WriteError as err:
            raise _store_write_error(path, err) from None
        if problems:
            err = DataError(problems, header=f"{len(problems)} case(s) could not be pre-processed into {path} (the others are stored):")
            _note_failure(path, err)
            raise err
        added = sum(1 for cid, _ in todo if cid not in existing)
        rebuilt = len(todo) - added
        action = "reused" if not todo and not n_removed and not dropped else ("built" if not existing else "updated")
        report = StoreReport(path, action, len(current), added, rebuilt, max(len(dropped), n_removed), time.time() - t0, sum(int(m["bytes"]) for m in current.values()))
        return Store(path, settings, current, report)
    finally:
        if lock is not None:
            lock.release()


# The sources of the pipeline, read at import, with the code just compiled: a file edited afterwards (a
# developer's tree) must neither mix into the digest nor make it differ from the code that runs.
_PIPELINE_SOURCES = tuple(inspect.getsource(obj) for obj in (transforms, intensity, image_io, preprocess_case, _Chains))


def _note_failure(path: str, err: BaseException) -> None:
    """Tell waiting ranks that this build failed (they raise the same message instead of waiting)."""
    with contextlib.suppress(Exception):
        write_json({"message": str(err), "type": type(err).__name__, "pid": os.getpid(), "time": time.time()}, os.path.join(path, FAILED_FILE))


def wait_for_store(
    cfg: DatasetConfig,
    cases: Sequence[dict],
    base: str,
    *,
    root: str | None = None,
    datalist: str | None = None,
    roi: Sequence[int] | None = None,
    crop_ratios: Sequence[float] | None = None,
    poll_s: float = 0.5,
    log: Callable[[str], None] | None = None,
) -> Store:
    """Wait until another process (DDP rank 0) has made the store of ``cases`` complete, then open it.

    Polls ``store.json`` rather than waiting at a ``torch.distributed`` barrier: building a large
    dataset can outlast a collective's timeout (NCCL's is 10 minutes), and this also works before any
    process group exists. A build that failed (``build_failed.json`` written after this wait began)
    raises its message here too.
    """
    say = log or (lambda m: None)
    t0 = time.time()
    _, settings, path = _locate(base, cfg, root, datalist, roi, crop_ratios)
    said = 0.0
    while True:
        metas = _fresh_from_index(path, cases)
        if metas is not None:
            report = StoreReport(path, "waited", len(metas), seconds=time.time() - t0, nbytes=sum(int(m["bytes"]) for m in metas.values()))
            return Store(path, settings, metas, report)
        failed = read_json(os.path.join(path, FAILED_FILE))
        if failed is not None and float(failed.get("time", 0)) >= t0 - 1.0:
            if failed.get("type") == "DataError":
                raise DataError([failed.get("message", "")], header="the store build of rank 0 failed:")
            raise StoreError(path, f"the store build of another process failed: {failed.get('message')}")
        if time.time() - said > 60:
            say(f"waiting for rank 0 to build the pre-processed store {path}")
            said = time.time()
        time.sleep(poll_s)


def prepare_store(
    cfg: DatasetConfig,
    cases: Sequence[dict],
    preprocessed: str | None,
    *,
    root: str | None = None,
    datalist: str | None = None,
    roi: Sequence[int] | None = None,
    crop_ratios: Sequence[float] | None = None,
    num_workers: int = 2,
    rank: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Store | None:
    """The store training reads, up to date for ``cases``: built or updated by rank 0 (or a single
    process) under the store's lock, waited for by the other ranks; ``None`` for ``--preprocessed off``.

    Args:
        cfg: dataset config.
        cases: every training and validation case (all ranks', not a shard).
        preprocessed: ``--preprocessed``: a base folder, ``None`` / ``"auto"`` (:func:`default_base`) or ``"off"``.
        root, datalist: where the cases come from (they name the dataset's sub-folder).
        roi: the training crop (smaller volumes are padded to it in the store).
        crop_ratios: class-balanced crops (per-class indices) instead of foreground / background.
        num_workers: processes pre-processing cases (1: this one).
        rank: this process's DDP rank; ranks other than 0 wait for rank 0.
        progress: show a progress bar while building.
        log: where the waiting and building messages go.
    """
    base = resolve_base(preprocessed)
    if base is None:
        return None
    kw = {"root": root, "datalist": datalist, "roi": roi, "crop_ratios": crop_ratios, "log": log}
    if rank != 0:
        return wait_for_store(cfg, cases, base, **kw)
    return build_store(cfg, cases, base, num_workers=num_workers, progress=progress, **kw)

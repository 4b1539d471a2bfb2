"""Checks of a dataset on disk before anything trains or predicts: every problem (unreadable files,
mismatched grids, bad label values, missing channels) reported at once in one :class:`DataError`."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence

import numpy as np

from rep3d.data.cases import (
    AFFINE_ATOL_MM,
    CHANNEL_RE,
    NIFTI_EXTENSIONS,
    case_name,
    collect_cases,
    dataset_json_channels,
    dataset_json_classes,
    image_ending,
    image_paths,
    read_dataset_json,
)
from rep3d.data.dataset_config import DataError, DatasetConfig
from rep3d.data.image_io import (
    Header,
    image_ext,
    missing_library,
    read_array,
    read_header,
    strip_ext,
)
from rep3d.data.store_layout import case_identity
from rep3d.fileio import WriteError, read_json, write_json
from rep3d.runtime import thread_map

logger = logging.getLogger(__name__)

#: Bumped when what :class:`CheckRecord` remembers (or what the checks verify) changes.
CHECK_RECORD_VERSION = 1


def _gzip_isize_ok(path: str, expected: int) -> bool:
    """Cheap truncation test: gzip stores the uncompressed size mod 2**32 in its last 4 bytes."""
    try:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", f.read(4))
    except OSError:
        return False
    return isize == expected % (1 << 32)


def _load_header(path: str, role: str, problems: list[str]) -> Header | None:
    """The :class:`~rep3d.data.image_io.Header` of an image or label file (any format), or None
    with the problem recorded.

    Its ``array_shape`` has a trailing channel axis for 4-D files (NIfTI as stored; other formats
    as their channel count); its ``affine`` is RAS+ mm in every format. Where the reader gives the
    data's offset (NIfTI), a cheap truncation test runs too.
    """
    exists = os.path.isfile(path) if image_ext(path) in NIFTI_EXTENSIONS else os.path.exists(path)
    if not exists:
        problems.append(f"{path}: {role} file not found. Fix: check the path (or the datalist entry)")
        return None
    need = missing_library(path)
    if need:
        problems.append(f"{path}: {need}")
        return None
    try:
        h = read_header(path)
    except Exception as e:  # each library raises its own types for broken files
        problems.append(f"{path}: unreadable or corrupt {role} ({type(e).__name__}: {e}). Fix: re-export or re-download the file")
        return None
    if _truncated(path, h):
        # The size test can misjudge multi-member gzip files; reading the data decides.
        try:
            read_array(path)
        except Exception as e:
            problems.append(f"{path}: corrupt {role}: the voxel data cannot be read ({type(e).__name__}: {e}). Fix: re-export or re-download the file")
            return None
    return h


def _truncated(path: str, h: Header) -> bool:
    """Whether the file looks shorter than its header says (a short gzip stream or a short file);
    only tested where the header gives the data's offset (NIfTI)."""
    nbytes = h.data_bytes
    if not nbytes or h.data_offset is None:
        return False
    if path.lower().endswith(".gz"):
        return not _gzip_isize_ok(path, h.data_offset + nbytes)
    return os.path.getsize(path) < h.data_offset + nbytes


def _spatial_shape(shape: tuple[int, ...], path: str, role: str, problems: list[str], channels_ok: bool = False) -> tuple[int, int, int] | None:
    """The 3-D spatial shape; a 4-D shape's last axis is channels (accepted with ``channels_ok``)."""
    if len(shape) == 3 or (len(shape) == 4 and (shape[3] == 1 or channels_ok)):
        if min(shape) < 1:
            problems.append(f"{path}: {role} has an empty dimension {shape}. Fix: re-export the volume")
            return None
        return shape[:3]
    if len(shape) == 4:
        problems.append(f"{path}: {role} is 4-D with {shape[3]} channels/time points {shape}; a {role} must be one 3-D volume. Fix: save one channel as a 3-D volume")
    else:
        problems.append(f"{path}: {role} is {len(shape)}-D {shape}; expected a 3-D volume (or 4-D with channels last). Fix: save it as a 3-D volume")
    return None


def _label_values(data: np.ndarray) -> np.ndarray:
    """Distinct values of an integer-valued label array (bincount: much faster than np.unique)."""
    flat = np.asarray(data).ravel()
    if flat.size and flat.dtype.kind in "uib" and flat.min() >= 0 and flat.max() < 65536:
        return np.flatnonzero(np.bincount(flat.astype(np.int64, copy=False)))
    return np.unique(flat)


def _voxels(path: str) -> np.ndarray:
    data = read_array(path)
    return data[..., 0] if data.ndim == 4 and data.shape[3] == 1 else data


def _nonfinite_images(files: Sequence[str], heads: Sequence[Header | None]) -> list[str]:
    """NaN / Inf voxels of the image files stored as floats (or of unknown type): each is read whole.
    Integer-stored images (most CT) cannot hold them and are not read; that keeps the check cheap."""
    problems = []
    for f, h in zip(files, heads):
        if h is None or (h.dtype is not None and h.dtype.kind not in "fc"):
            continue
        try:
            data = np.asarray(read_array(f))
        except Exception:  # noqa: BLE001 - unreadable voxels are reported by the other checks
            continue
        if data.dtype.kind not in "fc":
            continue
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        if n_nan or n_inf:
            what = ", ".join(x for x in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if x)
            problems.append(f"{f}: image has {what} voxel(s) of {data.size}: training would see a NaN loss. Fix: replace them (e.g. numpy.nan_to_num with the background intensity) and re-save, or leave the case out")
    return problems


def _channel_count(h: Header) -> int:
    """Channels of a file: the last axis of a 4-D array, else 1."""
    return h.array_shape[3] if len(h.array_shape) == 4 else 1


def _same_grid(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a[:3], b[:3], rtol=1e-5, atol=AFFINE_ATOL_MM))


def _channels_text(names: Sequence[str] | None, n: int) -> str:
    return f"{n} channel{'s' if n != 1 else ''}" + (f" ({', '.join(names)})" if names else "")


def _check_case(
    case: dict, num_classes: int | None, check_labels: bool, in_channels: int | None = None, channel_names: Sequence[str] | None = None, known: dict | None = None
) -> tuple[list[str], dict | None]:
    """Problems of one case and, when its image is usable, ``{"shape", "spacing", "channels",
    "label_values"}`` (label values None when not read). ``num_classes`` None: values not checked.
    ``known``: the :class:`CheckRecord` entry of this unchanged case: its voxels are not read again
    (no NaN/Inf, its label values recorded); the headers are."""
    problems: list[str] = []
    info = None
    files = image_paths(case["image"])
    heads = [_load_header(f, "image", problems) for f in files]
    spatial = [_spatial_shape(h.array_shape, f, "image", problems, channels_ok=True) if h else None for f, h in zip(files, heads)]
    ishape = spatial[0]
    affine = heads[0].affine if heads[0] is not None else None
    total = sum(_channel_count(h) for h in heads if h is not None)
    for i, (f, h, shp) in enumerate(zip(files[1:], heads[1:], spatial[1:]), start=1):
        if h is None or shp is None or ishape is None:
            continue
        name = f" ({channel_names[i]})" if channel_names and i < len(channel_names) else ""
        if shp != ishape:
            problems.append(f"{f}: channel {i}{name} has shape {shp}, channel 0 ({files[0]}) {ishape}. Fix: every channel of a case must be on the same voxel grid; resample it to channel 0")
        elif not _same_grid(affine, h.affine):
            diff = float(np.abs(affine[:3] - h.affine[:3]).max())
            problems.append(f"{f}: channel {i}{name} geometry (affine) differs from channel 0's ({files[0]}) by up to {diff:.4g} mm. Fix: resample it onto channel 0 (or re-save it with channel 0's header if the voxels do correspond)")
    complete = all(h is not None for h in heads)
    if complete and in_channels is not None and total != in_channels and all(s is not None for s in spatial):
        want = _channels_text(channel_names, in_channels)
        if len(files) == 1 and len(heads[0].array_shape) == 4:
            problems.append(f"{files[0]}: image is 4-D with {total} channels {heads[0].array_shape} but the dataset takes {want}. Fix: pass images with those channels, or a --dataset / plan with {total}")
        else:
            lacking = f"; missing: {', '.join(channel_names[total:])}" if channel_names and total < len(channel_names) else ""
            problems.append(f"{files[0]}: case {case_name(files, 'image')!r} has {total} channel{'s' if total != 1 else ''} ({len(files)} file{'s' if len(files) != 1 else ''}) but the dataset takes {want}{lacking}. Fix: give every case the same channels (nnU-Net naming case_0000, case_0001, ...)")
    if affine is not None:
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        if not np.all(np.isfinite(affine)) or np.any(zooms <= 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            problems.append(f"{files[0]}: degenerate affine (voxel sizes {zooms.round(4).tolist()}). Fix: repair the header's qform/sform")
        elif ishape is not None:
            info = {"shape": tuple(ishape), "spacing": tuple(float(z) for z in zooms), "channels": total, "label_values": None}
    if check_labels and known is None:
        problems += _nonfinite_images(files, heads)
    if "label" not in case:
        return problems, info
    label = _load_header(case["label"], "label", problems)
    lshape = _spatial_shape(label.array_shape, case["label"], "label", problems) if label else None
    if heads[0] is not None and label is not None and ishape is not None and lshape is not None:
        if ishape != lshape:
            problems.append(f"{case['label']}: label shape {lshape} differs from image shape {ishape} ({files[0]}). Fix: the label must be drawn on the image's voxel grid; resample it to the image")
        elif not _same_grid(affine, label.affine):
            diff = float(np.abs(affine[:3] - label.affine[:3]).max())
            problems.append(
                f"{case['label']}: label affine differs from the image's ({files[0]}) by up to {diff:.4g} mm. "
                "Fix: if the voxels do correspond, re-save the label with the image's header (nibabel.Nifti1Image(label_data, image.affine)); otherwise resample the label onto the image"
            )
    if check_labels and label is not None and lshape is not None:
        if known is not None:  # unchanged since it passed: its recorded values, no voxel read
            values = np.asarray(known["label_values"], dtype=np.int64)
        else:
            top = f"0..{num_classes - 1}" if num_classes else "0, 1, 2, ..."
            try:
                data = _voxels(case["label"])
            except Exception as e:
                problems.append(f"{case['label']}: corrupt label: the voxel data cannot be read ({type(e).__name__}: {e}). Fix: re-export the file")
                return problems, info
            if data.dtype.kind == "f":
                finite = np.isfinite(data)
                if not finite.all():
                    problems.append(f"{case['label']}: label has NaN/inf values. Fix: store integer class values {top}")
                    return problems, info
                if not np.array_equal(data, np.round(data)):
                    problems.append(f"{case['label']}: label has non-integer values (an interpolated label?). Fix: store integer class values {top}, resampling labels with nearest neighbour")
                    return problems, info
            values = _label_values(data)
        if info is not None:
            info["label_values"] = [int(v) for v in values]
        problems += _label_value_problems(case["label"], values, num_classes)
    return problems, info


def _label_value_problems(path: str, values: np.ndarray, num_classes: int | None) -> list[str]:
    bad = values[(values < 0) | (values > num_classes - 1)] if num_classes else values[values < 0]
    if not bad.size:
        return []
    shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
    if num_classes:
        return [f"{path}: label values {shown} are outside 0..{num_classes - 1} (num_classes={num_classes}). Fix: pass the right --dataset / --num_classes, or remap the label values"]
    return [f"{path}: negative label values {shown}. Fix: store class values 0, 1, 2, ... (0 background)"]


class CheckRecord:
    """What the voxel checks found in cases that passed them, kept beside the pre-processed stores
    (``<store base>/<dataset key>/checks.json``) and keyed by each file's identity (path, size,
    mtime_ns): a later start reads only the headers of an unchanged case, not its volumes. A changed,
    added or renamed file is read whole again. Losing or failing to write the record costs time only.

    Args:
        path: the record's JSON file; None: nothing is remembered (every check reads the voxels).
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.entries: dict[str, dict] = {}
        self.reused = 0
        loaded = read_json(path) if path else None
        if loaded is not None and loaded.get("format") == CHECK_RECORD_VERSION:
            self.entries = dict(loaded.get("cases", {}))
        self._changed = False

    @staticmethod
    def _key(case: dict) -> str:
        return "\n".join(os.path.abspath(p) for p in [*image_paths(case["image"]), *([case["label"]] if case.get("label") else [])])

    def known(self, case: dict) -> dict | None:
        """The entry of ``case`` when none of its files changed since it passed, else None."""
        entry = self.entries.get(self._key(case))
        if entry is None or entry.get("source") != case_identity(case):
            return None
        self.reused += 1
        return entry

    def passed(self, case: dict, info: dict | None) -> None:
        """Remember a case that passed with its voxels read (label values known)."""
        if self.path and info is not None and (info.get("label_values") is not None or not case.get("label")):
            self.entries[self._key(case)] = {"source": case_identity(case), "label_values": info.get("label_values")}
            self._changed = True

    def save(self) -> None:
        if not (self.path and self._changed):
            return
        # Entries of cases whose files are gone (renamed, deleted) are dropped.
        self.entries = {k: v for k, v in self.entries.items() if all(os.path.exists(p) for p in k.split("\n"))}
        try:
            write_json({"format": CHECK_RECORD_VERSION, "cases": self.entries}, self.path)
        except (WriteError, OSError) as e:
            logger.info("data check record not saved (%s): the next start reads the volumes again", e)
        self._changed = False


def inspect_cases(
    cases: list[dict],
    num_classes: int | None = None,
    in_channels: int | None = None,
    channel_names: Sequence[str] | None = None,
    check_labels: bool = True,
    num_workers: int = 2,
    record: CheckRecord | None = None,
) -> tuple[list[str], list[dict | None]]:
    """Read every case's headers (and label voxels): the problems, and per case its geometry.

    Args:
        cases: ``[{"image": path or [paths], "label": path (optional)}, ...]``.
        num_classes: label values must lie in ``0..num_classes - 1``; None: only collected.
        in_channels: channels each case must have (files x channels per file); None: any.
        channel_names: names of the channels, for the messages.
        check_labels: read label voxels (values; the slow part on large data).
        num_workers: threads reading files in parallel.
        record: what earlier checks found in unchanged cases (their voxels are not read again); the
            cases that pass are added to it and it is saved.

    Returns:
        ``(problems, infos)``: one line per problem; per case ``{"shape", "spacing", "channels",
        "label_values"}`` or None when its image is unusable.
    """
    known = [record.known(c) if record is not None and check_labels else None for c in cases]
    results = thread_map(lambda ck: _check_case(ck[0], num_classes, check_labels, in_channels, channel_names, ck[1]), list(zip(cases, known)), num_workers)
    if record is not None and check_labels:
        for case, seen, (probs, info) in zip(cases, known, results):
            if seen is None and not probs:
                record.passed(case, info)
        record.save()
    return [p for probs, _ in results for p in probs], [info for _, info in results]


def _note_small_volumes(cases: list[dict], infos: list[dict | None], cfg: DatasetConfig, roi: Sequence[int]) -> None:
    small = 0
    for case, info in zip(cases, infos):
        if info is not None:
            resampled = [s * z / t for s, z, t in zip(info["shape"], info["spacing"], cfg.spacing)]
            if any(r < c for r, c in zip(resampled, roi)):
                small += 1
                logger.info("%s: about %s voxels after resampling, smaller than the crop %s: it will be zero-padded", image_paths(case["image"])[0], [round(r) for r in resampled], roi)
    if small:
        logger.warning("%d case(s) are smaller than the crop %s after resampling and will be padded", small, roi)


def check_cases(cases: list[dict], cfg: DatasetConfig, roi: Sequence[int] | None = None, check_labels: bool = True, num_workers: int = 2) -> None:
    """Verify cases from their headers (and label voxels) before anything is built.

    Checks: files exist and are readable (headers, plus a cheap truncation test of NIfTI data);
    each case has ``cfg.in_channels`` channels (files x channels of 4-D files), all on one voxel
    grid; labels are 3-D with the image's shape and affine; label values are integers in
    ``0..cfg.num_classes - 1`` (label voxels are read for this). Volumes smaller than ``roi``
    after resampling are only logged: the training chain pads them.

    Args:
        cases: ``[{"image": path or [path per channel], "label": path (optional)}, ...]``.
        cfg: dataset config (class count, channels, spacing).
        roi: training crop, for the "will be padded" note; defaults to ``cfg.roi``.
        check_labels: read label voxels to check their values (the slow part on large data).
        num_workers: threads reading files in parallel.

    Raises:
        DataError: listing every problem, one line per file, each with its fix.
    """
    roi = tuple(roi or cfg.roi)
    if not cases:
        raise DataError(["no cases to check. Fix: point --root / --datalist at a dataset with images"])
    problems, infos = inspect_cases(cases, cfg.num_classes, cfg.in_channels, cfg.channel_names, check_labels, num_workers)
    _note_small_volumes(cases, infos, cfg, roi)
    if problems:
        raise DataError(problems)


def check_input_channels(cases: list[dict] | list[str], cfg: DatasetConfig) -> list[str]:
    """Problems of inference inputs whose channels are not those the model was trained with.

    Each problem names the case's file and which channel (by name, and the file expected under
    nnU-Net naming) is missing or extra. Headers only; no voxel is read.

    Args:
        cases: ``[{"image": path or [path per channel]}]`` (e.g. from :func:`list_images`) or paths.
        cfg: the model's dataset config (``channel_names``).

    Returns:
        One line per problem; empty when every input fits.
    """
    problems: list[str] = []
    names = list(cfg.channel_names)
    for c in cases:
        files = image_paths(c["image"] if isinstance(c, dict) else c)
        counts = []
        for f in files:
            h = _load_header(f, "image", problems)
            counts.append(None if h is None else _channel_count(h))
        if None in counts:
            continue
        total = sum(counts)
        if total == len(names):
            continue
        if total < len(names):
            first = files[0]
            stem = strip_ext(os.path.basename(first)) or os.path.basename(first)
            m = CHANNEL_RE.match(stem)
            lacking = []
            for i in range(total, len(names)):
                where = f" (expected {os.path.join(os.path.dirname(first), f'{m.group(1)}_{i:04d}{image_ending(first)}')})" if m else ""
                lacking.append(f"channel {i} '{names[i]}'{where}")
            problems.append(f"{first}: has {_channels_text(None, total)} but the model was trained with {_channels_text(names, len(names))}; missing {', '.join(lacking)}. Fix: give every channel (nnU-Net naming: case_0000, case_0001, ...; or one 4-D file)")
        else:
            problems.append(f"{files[0]}: has {_channels_text(None, total)} ({len(files)} file(s)) but the model was trained with {_channels_text(names, len(names))}. Fix: pass only those channels, in that order")
    return problems


def dataset_json_problems(root: str | None, cfg: DatasetConfig | None, infos: list[dict | None], n_train: int | None) -> list[str]:
    """What a root's dataset.json says that the config or the files contradict: class count,
    label values found in the label files but not declared, channel count, numTraining."""
    if not root:
        return []
    path = os.path.join(root, "dataset.json")
    data = read_dataset_json(path)
    if data is None:
        return []
    problems = []
    pairs, problem = dataset_json_classes(path)
    if problem:
        problems.append(problem)
    if pairs is not None:
        labels = [pairs[i] for i in range(len(pairs))]
        if cfg is not None and len(labels) != cfg.num_classes:
            problems.append(
                f"{path}: lists {len(labels)} labels {labels} but --dataset {cfg.name} has {cfg.num_classes} classes. "
                "Fix: pass the matching --dataset, or --num_classes / --class_names"
            )
        found: dict[int, int] = {}
        for info in infos:
            for v in (info or {}).get("label_values") or []:
                found[v] = found.get(v, 0) + 1
        extra = sorted(v for v in found if v not in pairs)
        if extra:
            declared = ", ".join(f"{v} {n}" for v, n in sorted(pairs.items()))
            problems.append(
                f"{path}: its labels ({declared}) disagree with the label files, which also hold "
                + ", ".join(f"{v} (in {found[v]} file{'s' if found[v] != 1 else ''})" for v in extra)
                + ". Fix: add those classes to dataset.json's 'labels', or correct the label files"
            )
        absent = [f"{v} {pairs[v]}" for v in sorted(pairs) if v and found and v not in found and all(i is not None for i in infos)]
        if absent:
            logger.warning("%s: labels %s appear in no label file", path, absent)
    channels = dataset_json_channels(path)
    if channels and cfg is not None and len(channels) != cfg.in_channels:
        problems.append(f"{path}: names {_channels_text(channels, len(channels))} but --dataset {cfg.name} takes {_channels_text(cfg.channel_names, cfg.in_channels)}. Fix: plan from the data (no --dataset) or pass matching data")
    num = data.get("numTraining")
    if isinstance(num, int) and n_train is not None and "training" not in data and num != n_train:
        problems.append(f"{path}: numTraining is {num} but {os.path.join(root, 'imagesTr')} holds {n_train} labelled cases. Fix: correct numTraining, or add the missing cases")
    return problems


def check_dataset(
    cfg: DatasetConfig,
    root: str | None,
    splits: Sequence[str] = ("train", "val"),
    datalist: str | None = None,
    fold: int = 0,
    roi: Sequence[int] | None = None,
    check_labels: bool = True,
    num_workers: int = 2,
    record: CheckRecord | None = None,
) -> dict[str, list[dict]]:
    """List and verify several splits, reporting every problem of all of them in one DataError.
    ``record``: see :func:`inspect_cases` (training passes the one beside its pre-processed store).

    Also checks the root's ``dataset.json`` against the config and the files: its class count,
    label values found in the label files that it does not declare, its channel count and
    ``numTraining``.

    Returns:
        ``{split: cases}`` for each requested split.
    """
    problems: list[str] = []
    out: dict[str, list[dict]] = {}
    pooled: dict = {}
    for split in splits:
        info: dict = {}
        cases, probs, source = collect_cases(root, split, datalist, fold, info)
        pooled[split] = info.get("pooled")
        problems.extend(p for p in probs if p not in problems)
        if not cases and not probs:
            hint = "imagesVal/labelsVal" if split == "val" else ("imagesTs" if split == "test" else "imagesTr/labelsTr")
            problems.append(f"{source}: no {split} cases found. Fix: add cases ({hint}) or check --datalist / --fold")
        out[split] = cases
    all_cases = [c for split in splits for c in out[split]]
    infos: list[dict | None] = []
    if all_cases:
        probs, infos = inspect_cases(all_cases, cfg.num_classes, cfg.in_channels, cfg.channel_names, check_labels, num_workers, record)
        problems.extend(probs)
        _note_small_volumes(all_cases, infos, cfg, tuple(roi or cfg.roi))
    if root and datalist is None:
        n_train = len(out["train"]) + len(out["val"]) if "train" in out and "val" in out and pooled.get("train") else None
        start, labelled_infos = 0, []
        for split in splits:
            n = len(out[split])
            if split != "test":
                labelled_infos += infos[start : start + n] if infos else []
            start += n
        problems.extend(p for p in dataset_json_problems(root, cfg, labelled_infos, n_train) if p not in problems)
    if problems:
        raise DataError(problems)
    return out

"""Planning from the data (fingerprint -> plan) and the choice between a preset and a plan."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from rep3d.data.cases import (
    dataset_json_channels,
    dataset_json_classes,
    dataset_json_labels,
    image_paths,
    read_dataset_json,
    training_pool,
)
from rep3d.data.checks import CheckRecord, dataset_json_problems, inspect_cases
from rep3d.data.dataset_config import DataError, DatasetConfig, get_dataset_config
from rep3d.data.image_io import read_array
from rep3d.data.intensity import CT, CT_PERCENTILES, ZSCORE, get_scheme
from rep3d.data.store_layout import (
    CHECK_RECORD_FILE,
    case_identity,
    file_identity,
    settings_hash,
    source_digest,
)
from rep3d.fileio import WriteError, write_json
from rep3d.runtime import thread_map

logger = logging.getLogger(__name__)
#: A digest of this module's code: a plan kept by :func:`plan_dataset` is reused only by the same code.
_MODULE_DIGEST = source_digest(inspect.getsource(sys.modules[__name__]))


def resolve_dataset(
    name: str | None,
    root: str | None = None,
    datalist: str | None = None,
    config_file: str | None = None,
    *,
    fold: int = 0,
    num_workers: int = 2,
    roi_multiple: int = 16,
    cache_dir: str | None = None,
    **overrides,
):
    """The :class:`DatasetConfig` selected by the data flags, and the plan it came from (or None).

    * no ``name``, no ``root``, no ``datalist``: the ``demo`` preset;
    * no ``name`` but ``root`` or ``datalist``: planned from the training cases
      (:func:`planning.plan_dataset`; nnU-Net v2, MSD, folder layout or datalist), then
      ``config_file`` and ``overrides`` applied on top (a window given with ``a_min``/``a_max``
      replaces the planned normalisation of the CT channels, see :func:`get_dataset_config`);
    * ``name``: the preset (or ``custom``) with ``config_file`` and ``overrides``; for ``custom``
      without ``num_classes`` the classes of ``<root>/dataset.json`` and its channel names are used.

    A ``root`` or ``datalist`` that does not exist is reported as such, together with anything
    else wrong with the flags, in one :class:`DataError`.

    Args:
        name: ``--dataset``.
        root: ``--root``.
        datalist: ``--datalist``.
        config_file: ``--dataset_config``.
        fold: ``--fold`` (which cases are listed as validation; the plan uses them all).
        num_workers: threads reading files while planning.
        roi_multiple: every planned ROI side is a multiple of this (the network's factor).
        cache_dir: where a plan is kept for the next start (see :func:`plan_dataset`); None: none kept.
        **overrides: ``spacing, intensity, a_min, a_max, num_classes, class_names, roi`` (None = not given).

    Returns:
        ``(config, plan)``; ``plan`` is a :class:`planning.Plan` when planned, else None.

    Raises:
        DataError: a missing folder / file (with every other flag problem), or problems in the data
            found while planning (every one listed).
        ValueError: inconsistent flags, with a message naming the flag to fix.
    """
    missing = []
    if root is not None and not os.path.isdir(root):
        missing.append(f"{root}: dataset folder not found. Fix: pass an existing folder to --root")
    if datalist is not None and not os.path.isfile(datalist):
        missing.append(f"{datalist}: datalist file not found. Fix: pass the path of a MONAI datalist JSON to --datalist")
    overrides = dict(overrides)
    if name is None and root is None and datalist is None:
        name = "demo"
    if missing and name is None:
        raise DataError(missing)
    if missing:
        # A named config does not need the data to be built (the listing reports a missing
        # folder later); when it cannot be built, the missing folder is the first thing to fix.
        try:
            return get_dataset_config(name, config_file, **overrides), None
        except ValueError as e:
            raise DataError(missing + [str(e)]) from None
    if name is None:

        roi = overrides.get("roi")
        plan = plan_dataset(
            root, datalist=datalist, fold=fold, roi=tuple(roi) if roi is not None else (96, 96, 96),
            roi_multiple=roi_multiple, num_workers=num_workers, cache_dir=cache_dir,
        )
        return get_dataset_config("planned", config_file, base=plan.dataset_config(), **overrides), plan
    if name == "custom" and root and config_file is None:
        if overrides.get("num_classes") is None and overrides.get("class_names") is None:
            labels = dataset_json_labels(os.path.join(root, "dataset.json"))
            if labels:
                overrides["num_classes"] = len(labels)
                overrides["class_names"] = labels
        channels = dataset_json_channels(os.path.join(root, "dataset.json"))
        if channels and overrides.get("channel_names") is None:
            overrides["channel_names"] = channels
    return get_dataset_config(name, config_file, **overrides), None


def resolve_dataset_config(
    name: str | None,
    root: str | None = None,
    datalist: str | None = None,
    config_file: str | None = None,
    **overrides,
) -> DatasetConfig:
    """The :class:`DatasetConfig` of :func:`resolve_dataset` (without the plan).

    ``name`` defaults to ``"demo"`` when neither ``root`` nor ``datalist`` is given, and to a
    plan made from the data when one of them is.

    Raises:
        DataError / ValueError: as :func:`resolve_dataset`.
    """
    return resolve_dataset(name, root, datalist, config_file, **overrides)[0]


PLAN_VERSION = 1


#: Coarse-axis spacing over the next coarsest above which the data count as anisotropic.
ANISOTROPY_RATIO = 3.0


# A channel whose 0.5th percentile is at or below this looks like CT (air is about -1000 HU);
# MRI, PET and most other intensities are non-negative.
_AIR_HU = -500.0


@dataclass
class Plan:
    """A dataset's plan: what training and inference do with its images, and why.

    Attributes:
        source: the dataset folder (or datalist) it was planned from.
        layout: ``"nnunet_v2"``, ``"msd"`` (dataset.json with a training list), ``"folder"`` or ``"datalist"``.
        n_cases: labelled cases the fingerprint was read from.
        channel_names: one name per input channel.
        modalities: per channel, ``"CT"`` or the name dataset.json gives (``"MRI"`` when guessed non-CT).
        modality_source: ``"dataset.json"``, ``"guessed from intensities"`` or ``"given"``.
        normalization: per channel, as ``DatasetConfig.normalization``.
        intensity_stats: per channel, the foreground statistics (CT channels) or None.
        spacing: target spacing (mm), per voxel axis.
        spacing_rule: how it was chosen, in words.
        median_spacing: median spacing of the cases.
        median_shape: median shape in voxels of the cases.
        median_resampled_shape: median shape after resampling to ``spacing``.
        roi: training crop / sliding window.
        roi_multiple: what every ROI side is a multiple of.
        num_classes: classes including background.
        class_names: one name per class.
        label_values: values found in the label files.
        notes: anything worth a look (classes absent from the labels, ...).
    """

    source: str
    layout: str
    n_cases: int
    channel_names: list[str]
    modalities: list[str]
    modality_source: str
    normalization: list[dict]
    intensity_stats: list[dict | None]
    spacing: list[float]
    spacing_rule: str
    median_spacing: list[float]
    median_shape: list[float]
    median_resampled_shape: list[float]
    roi: list[int]
    roi_multiple: int
    num_classes: int
    class_names: list[str]
    label_values: list[int]
    notes: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION

    def to_dict(self) -> dict:
        """JSON-ready dict (the content of ``plan.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str) -> str:
        """Write the plan as JSON (``plan.json`` in a run's output folder); returns ``path``."""
        write_json(self.to_dict(), path)
        return path

    def dataset_config(self, name: str = "planned", cache_rate: float = 0.1) -> DatasetConfig:
        """The :class:`~load_datasets_transforms.DatasetConfig` this plan describes."""
        return DatasetConfig(
            name=name,
            spacing=tuple(self.spacing),
            intensity=ZSCORE.name,  # derived from normalization by DatasetConfig
            a_min=None,
            a_max=None,
            num_classes=self.num_classes,
            class_names=list(self.class_names),
            roi=tuple(self.roi),
            cache_rate=cache_rate,
            channel_names=list(self.channel_names),
            normalization=[dict(n) for n in self.normalization],
        )

    def describe(self) -> str:
        """The plan in a few lines, for the start of a run."""
        lines = [f"plan of {self.source} ({self.layout}, {self.n_cases} labelled cases):"]
        for name, mod, norm in zip(self.channel_names, self.modalities, self.normalization):
            how = get_scheme(norm["scheme"]).describe(norm)
            lines.append(f"  channel {name!r} ({mod}, {self.modality_source}): {how}")
        lines.append(f"  spacing {_fmt(self.spacing)} mm ({self.spacing_rule}); median shape {_fmt(self.median_shape, 0)} -> {_fmt(self.median_resampled_shape, 0)} resampled")
        lines.append(f"  roi {'x'.join(str(r) for r in self.roi)} (multiples of {self.roi_multiple})")
        lines.append(f"  {self.num_classes} classes: {', '.join(f'{i} {n}' for i, n in enumerate(self.class_names))}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    return "x".join(f"{v:.{digits}f}".rstrip("0").rstrip(".") if digits else str(int(round(v))) for v in values)


def load_plan(path: str) -> Plan:
    """Read a ``plan.json`` written by :meth:`Plan.save`.

    Raises:
        ValueError: when the file is missing or not a plan.
    """
    try:
        with open(path) as f:
            d = json.load(f)
        return Plan.from_dict(d)
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: not a readable plan.json ({type(e).__name__}: {e}). Fix: pass the plan.json of a training run, or plan again") from None


def target_spacing(spacings: np.ndarray, shapes: np.ndarray, ratio: float = ANISOTROPY_RATIO) -> tuple[list[float], str]:
    """Median spacing, with the low-resolution axis at the 10th percentile of its spacings when
    the data are anisotropic in both spacing and voxel count (see the module docstring).

    Args:
        spacings: ``(n_cases, 3)`` spacings in mm.
        shapes: ``(n_cases, 3)`` shapes in voxels.
        ratio: anisotropy threshold.

    Returns:
        The spacing and the rule that gave it, in words.
    """
    target = np.percentile(spacings, 50, axis=0)
    size = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    coarse_spacing = target[worst] > ratio * max(target[i] for i in others)
    few_voxels = size[worst] * ratio < min(size[i] for i in others)
    if not (coarse_spacing and few_voxels):
        return [float(t) for t in target], "median spacing"
    low = float(np.percentile(spacings[:, worst], 10))
    finest_other = float(max(target[i] for i in others))
    if low < finest_other:  # never finer than the other axes: the coarse axis stays the coarse one
        low = finest_other + 1e-5
    target[worst] = low
    return [float(t) for t in target], f"median spacing, axis {worst} anisotropic (> {ratio:g}x): its 10th percentile {low:.4g} mm"


def plan_roi(median_resampled_shape: Sequence[float], roi: Sequence[int] = (96, 96, 96), roi_multiple: int = 16) -> list[int]:
    """``roi``, reduced on an axis where the median resampled shape is smaller, to that shape
    rounded up to a multiple of ``roi_multiple`` (one window then covers the volume)."""
    if roi_multiple < 1:
        raise ValueError(f"roi_multiple must be a positive integer, got {roi_multiple}")
    out = []
    for m, r in zip(median_resampled_shape, roi):
        fit = max(roi_multiple, int(math.ceil(float(m) / roi_multiple)) * roi_multiple)
        out.append(int(min(int(r), fit)))
    return out


def _case_samples(case: dict, n_channels: int, samples_per_case: int, seed: int, whole_image: bool) -> tuple[list[np.ndarray], list[np.ndarray], str | None]:
    """Per channel: foreground voxels (label > 0) and, with ``whole_image``, voxels anywhere
    (random subsets of at most ``samples_per_case``); or a problem."""
    try:
        arrays = []
        for f in image_paths(case["image"]):
            a = np.asarray(read_array(f), dtype=np.float32)
            arrays += [a[..., c] for c in range(a.shape[3])] if a.ndim == 4 else [a]
        label = np.asarray(read_array(case["label"]))
        if label.ndim == 4:
            label = label[..., 0]
    except Exception as e:  # the checks name broken files; planning only skips them
        return [], [], f"{case['label']}: could not be read for planning ({type(e).__name__}: {e})"
    rng = np.random.default_rng(seed)
    fg_idx = np.flatnonzero(label.ravel() > 0)
    if fg_idx.size > samples_per_case:
        fg_idx = rng.choice(fg_idx, samples_per_case, replace=False)
    all_idx = rng.integers(0, label.size, size=min(samples_per_case, label.size)) if whole_image else None
    fg, anywhere = [], []
    for a in arrays[:n_channels]:
        flat = a.ravel()
        fg.append(flat[fg_idx] if flat.size == label.size else np.empty(0, np.float32))
        anywhere.append(flat[all_idx] if all_idx is not None and flat.size == label.size else np.empty(0, np.float32))
    return fg, anywhere, None


def _layout(root: str | None, datalist: str | None) -> str:
    if datalist is not None:
        return "datalist"
    data = read_dataset_json(os.path.join(root, "dataset.json")) if root else None
    if data is None:
        return "folder"
    return "msd" if "training" in data else ("nnunet_v2" if "channel_names" in data or "file_ending" in data else "folder")


def plan_dataset(
    root: str | None,
    cases: list[dict] | None = None,
    *,
    datalist: str | None = None,
    fold: int = 0,
    roi: Sequence[int] = (96, 96, 96),
    roi_multiple: int = 16,
    modalities: Sequence[str] | None = None,
    max_intensity_cases: int = 50,
    samples_per_case: int = 10000,
    num_workers: int = 2,
    seed: int = 0,
    cache_dir: str | None = None,
) -> Plan:
    """Fingerprint a dataset's labelled training cases and plan its pre-processing.

    Every problem found on the way (listing, unreadable files, channels missing or on another
    grid, label files that disagree with dataset.json) is reported in one DataError.

    Args:
        root: dataset folder (nnU-Net v2 raw dataset, MSD task folder or MONAI folder layout);
            may be None with ``datalist``.
        cases: the cases to plan from; default: every labelled training case (the validation
            fold included when validation is a fold of the training list, so the plan does
            not depend on ``fold``).
        datalist: MONAI datalist JSON, as for :func:`load_datasets_transforms.list_cases`.
        fold: passed to the listing (only which cases are listed as train/val).
        roi: the largest ROI (the paper's 96^3).
        roi_multiple: every ROI side is a multiple of this (16 for REP3D and 3D UX-Net).
        modalities: per channel, ``"CT"`` or anything else (z-score); overrides dataset.json and the guess.
        max_intensity_cases: at most this many cases (evenly spread) are read for intensities.
        samples_per_case: foreground voxels sampled per case and channel.
        num_workers: threads reading files.
        seed: seed of the voxel sampling (the plan is deterministic for a given seed).
        cache_dir: the dataset's folder beside its pre-processed stores: a plan made there from the
            same files (path, size, mtime of every case and of dataset.json / the datalist), the same
            arguments and this module's code is reused without reading the volumes again, and the
            data check's :class:`CheckRecord` is kept there. None: plan from the files every time.

    Returns:
        The :class:`Plan`.

    Raises:
        DataError: listing every problem found.
    """
    for path, what in ((root, "dataset folder"), (datalist, "datalist file")):
        if path is not None and not os.path.exists(path):
            flag = "--root" if what.startswith("dataset") else "--datalist"
            raise DataError([f"{path}: {what} not found. Fix: pass an existing {'folder' if flag == '--root' else 'file'} to {flag}"])
    problems: list[str] = []
    if cases is None:
        cases, listing = training_pool(root, datalist, fold)
        problems += listing
    json_path = os.path.join(root, "dataset.json") if root else None
    declared_channels = dataset_json_channels(json_path) if json_path else None
    pairs, class_problem = dataset_json_classes(json_path) if json_path else (None, None)
    if class_problem:
        problems.append(class_problem)
    cached = None
    if cache_dir and cases and not problems:
        key = {"code": _MODULE_DIGEST, "cases": [case_identity(c) for c in cases], "dataset_json": file_identity(json_path) if json_path else None,
               "datalist": file_identity(datalist) if datalist else None, "roi": [int(r) for r in roi], "roi_multiple": int(roi_multiple),
               "modalities": list(modalities) if modalities else None, "intensity_cases": max_intensity_cases, "samples": samples_per_case, "seed": seed}  # fmt: skip
        cached = os.path.join(cache_dir, f"plan-{settings_hash(key)}.json")
        if os.path.isfile(cached):
            try:
                plan = load_plan(cached)
                logger.info("plan reused from %s (no case changed since it was made)", cached)
                return plan
            except ValueError:
                pass
    if not cases:
        if not problems:
            problems.append(f"{root or datalist}: no labelled training cases found. Fix: put images in imagesTr and labels in labelsTr (or list them in dataset.json / --datalist)")
        raise DataError(problems)
    n_declared = len(declared_channels) if declared_channels else None
    record = CheckRecord(os.path.join(cache_dir, CHECK_RECORD_FILE)) if cache_dir else None
    case_problems, infos = inspect_cases(cases, None, n_declared, declared_channels, True, num_workers, record)
    problems += case_problems
    counts = Counter(i["channels"] for i in infos if i is not None)
    n_channels = n_declared or (counts.most_common(1)[0][0] if counts else 1)
    if n_declared is None:
        for case, info in zip(cases, infos):
            if info is not None and info["channels"] != n_channels:
                problems.append(f"{image_paths(case['image'])[0]}: {info['channels']} channel(s) while most cases have {n_channels}. Fix: give every case the same channels")
    good = [(c, i) for c, i in zip(cases, infos) if i is not None and i["channels"] == n_channels]
    # numTraining is compared only when nothing else is wrong: a case left out for a missing
    # channel would be counted twice.
    n_train = len(cases) if _layout(root, datalist) == "nnunet_v2" and not problems else None
    problems += [p for p in dataset_json_problems(root, None, infos, n_train) if p not in problems]
    if problems or not good:
        raise DataError(problems or [f"{root or datalist}: no usable case to plan from"])

    spacings = np.array([i["spacing"] for _, i in good], dtype=np.float64)
    shapes = np.array([i["shape"] for _, i in good], dtype=np.float64)
    spacing, rule = target_spacing(spacings, shapes)
    resampled = np.median(shapes * spacings / np.asarray(spacing), axis=0)
    roi_planned = plan_roi(resampled, roi, roi_multiple)

    notes: list[str] = []
    found = sorted({v for _, i in good for v in (i["label_values"] or [])})
    if pairs is not None:
        num_classes, class_names = len(pairs), [pairs[k] for k in range(len(pairs))]
        absent = [f"{k} {pairs[k]}" for k in range(1, num_classes) if k not in found]
        if absent:
            notes.append(f"classes {', '.join(absent)} of dataset.json appear in no label file")
    else:
        num_classes = max(2, (max(found) + 1) if found else 2)
        class_names = ["background"] + [f"class_{k}" for k in range(1, num_classes)]
        gaps = [k for k in range(1, num_classes) if k not in found]
        if gaps:
            notes.append(f"label values {gaps} appear in no label file; they still get a network output each")

    # Intensities: every CT channel needs foreground samples; without declared modalities every
    # channel needs whole-image samples too, for the guess.
    names = declared_channels or (["image"] if n_channels == 1 else [f"channel_{k}" for k in range(n_channels)])
    if modalities is not None:
        if len(modalities) != n_channels:
            raise DataError([f"modalities {list(modalities)} name {len(modalities)} channels but the cases have {n_channels}"])
        mods, mod_source = [str(m) for m in modalities], "given"
    elif declared_channels:
        mods, mod_source = list(declared_channels), "dataset.json"
    else:
        mods, mod_source = [None] * n_channels, "guessed from intensities"
    need_samples = mod_source == "guessed from intensities" or any(str(m).strip().upper() == "CT" for m in mods)
    fg_pool: list[list[np.ndarray]] = [[] for _ in range(n_channels)]
    any_pool: list[list[np.ndarray]] = [[] for _ in range(n_channels)]
    n_read = 0
    if need_samples:
        pick = np.unique(np.linspace(0, len(good) - 1, num=min(len(good), max_intensity_cases)).round().astype(int))
        whole = mod_source == "guessed from intensities"

        results = thread_map(lambda k: _case_samples(good[k][0], n_channels, samples_per_case, seed + int(k), whole), list(pick), num_workers)
        for fg, anywhere, problem in results:
            if problem:
                notes.append(problem)
                continue
            n_read += 1
            for c in range(min(n_channels, len(fg))):
                fg_pool[c].append(fg[c])
                any_pool[c].append(anywhere[c])
    if mod_source == "guessed from intensities":
        for c in range(n_channels):
            sample = np.concatenate(any_pool[c]) if any_pool[c] else np.empty(0)
            mods[c] = "CT" if sample.size and float(np.percentile(sample, 0.5)) <= _AIR_HU else "MRI"
    norms: list[dict] = []
    stats: list[dict | None] = []
    for c in range(n_channels):
        if str(mods[c]).strip().upper() != "CT":
            norms.append(ZSCORE.params())
            stats.append(None)
            continue
        fg = np.concatenate(fg_pool[c]) if fg_pool[c] else np.empty(0)
        if fg.size < 2:
            fg = np.concatenate(any_pool[c]) if any_pool[c] and sum(a.size for a in any_pool[c]) > 1 else fg
            notes.append(f"channel {names[c]!r}: no foreground voxels to sample; CT statistics from the whole image")
        if fg.size < 2:
            norms.append(ZSCORE.params())
            stats.append(None)
            notes.append(f"channel {names[c]!r}: no voxels sampled; z-scored per volume instead")
            continue
        lo, hi = (float(v) for v in np.percentile(fg, CT_PERCENTILES))
        mean, std = float(fg.mean()), float(fg.std())
        if not hi > lo:
            hi = lo + 1.0
        norms.append(CT.params(lower=lo, upper=hi, mean=mean, std=std if std > 0 else 1.0))
        stats.append({"percentile_00_5": lo, "percentile_99_5": hi, "mean": mean, "std": std, "median": float(np.median(fg)),
                      "min": float(fg.min()), "max": float(fg.max()), "n_samples": int(fg.size), "n_cases": n_read})
    plan = Plan(
        source=str(root or datalist),
        layout=_layout(root, datalist),
        n_cases=len(good),
        channel_names=list(names),
        modalities=[str(m) for m in mods],
        modality_source=mod_source,
        normalization=norms,
        intensity_stats=stats,
        spacing=[round(float(s), 6) for s in spacing],
        spacing_rule=rule,
        median_spacing=[float(s) for s in np.median(spacings, axis=0)],
        median_shape=[float(s) for s in np.median(shapes, axis=0)],
        median_resampled_shape=[float(s) for s in resampled],
        roi=roi_planned,
        roi_multiple=int(roi_multiple),
        num_classes=int(num_classes),
        class_names=class_names,
        label_values=[int(v) for v in found],
        notes=notes,
    )
    if cached:
        try:
            plan.save(cached)
        except (WriteError, OSError) as e:
            logger.info("plan not kept for the next start (%s)", e)
    return plan

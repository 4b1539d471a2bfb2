"""Data pipeline for Rep3D: dataset presets, case listing, integrity checks, MONAI transforms, loaders.

The five presets of the paper (``amos``, ``amos_mri``, ``kits``, ``pancreas``, ``hepatic``) and a
``demo`` preset for the synthetic dataset of :mod:`demo_data` are in :data:`PRESETS`. A user's own
dataset is described without editing code, either by flags (``--dataset custom --spacing 1 1 1
--intensity zscore --num_classes 3 --class_names background,liver,tumour``) or by a small JSON file
passed with ``--dataset_config``::

    {"spacing": [1.5, 1.5, 2.0], "intensity": "window", "a_min": -125, "a_max": 275,
     "num_classes": 3, "class_names": ["background", "liver", "tumour"], "roi": [96, 96, 96]}

Flags override the JSON file, which overrides the preset named by ``--dataset``.

Where the cases are listed (first match wins):

1. ``--datalist file.json``: a MONAI datalist (``training`` with optional ``fold`` keys,
   ``validation``, ``testing``); relative paths are taken from ``--root`` (else the JSON's folder).
2. ``<root>/dataset.json`` with a ``training`` list (Medical Segmentation Decathlon / nnU-Net v1).
3. The folder layout ``<root>/{imagesTr,labelsTr,imagesVal,labelsVal,imagesTs}``.

Images and labels are paired by case name, not by sorted position: ``case.nii.gz`` pairs with
``case.nii.gz``; the nnU-Net channel suffix ``_0000`` of an image and the label suffixes
``_seg``, ``_label``, ``_labels``, ``_gt``, ``_mask`` are ignored when pairing. When a list has
no validation cases (no ``imagesVal``, no ``validation`` list, no ``fold`` keys), cases are split
into 5 folds by sorted name and fold ``--fold`` validates.

Every problem found on disk is reported at once in one :class:`DataError` before anything trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, ThreadDataLoader, partition_dataset
from monai.transforms import (
    AsDiscreted,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandShiftIntensityd,
    SaveImaged,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    ToDeviced,
)

import demo_data

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetConfig",
    "PRESETS",
    "DataError",
    "get_dataset_config",
    "add_dataset_args",
    "resolve_dataset_config",
    "default_num_workers",
    "list_cases",
    "list_images",
    "nifti_files",
    "check_cases",
    "check_dataset",
    "get_train_transforms",
    "get_val_transforms",
    "get_test_transforms",
    "get_post_transforms",
    "get_loaders",
    "get_test_loader",
    "case_name",
]

SPLITS = ("train", "val", "test")
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
IMAGE_CHANNEL_SUFFIX = "_0000"
LABEL_SUFFIXES = ("_seg", "_labels", "_label", "_gt", "_mask")
N_AUTO_FOLDS = 5
# Tolerance on the 3 x 4 voxel-to-world matrix when comparing an image with its label: NIfTI
# stores it in float32, so identical geometry written by two tools can differ in the last digits.
AFFINE_ATOL_MM = 1e-3


# --------------------------------------------------------------------------------------------
# Dataset configuration
# --------------------------------------------------------------------------------------------


@dataclass
class DatasetConfig:
    """How one dataset is pre-processed and what its labels mean.

    Args:
        name: preset name (or ``"custom"``), used in logs and run summaries.
        spacing: target voxel spacing in mm (x, y, z) after resampling, in RAS order.
        intensity: ``"window"`` (clip ``[a_min, a_max]`` and map it to [0, 1], for CT) or
            ``"zscore"`` (per-volume, per-channel mean/std over non-zero voxels, for MRI).
        a_min: lower window bound (HU for CT); required for ``"window"``, ignored for ``"zscore"``.
        a_max: upper window bound; must be greater than ``a_min``.
        num_classes: number of label classes including background (label values 0..num_classes-1).
        class_names: one name per class, ``class_names[0] == "background"``.
        roi: training crop and sliding-window ROI in voxels (default 96^3, the paper's).
        cache_rate: default fraction of cases cached in memory when ``--cache_rate`` is not given.
    """

    name: str
    spacing: tuple[float, float, float]
    intensity: str
    a_min: float | None
    a_max: float | None
    num_classes: int
    class_names: list[str]
    roi: tuple[int, int, int] = (96, 96, 96)
    cache_rate: float = 0.1

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.roi = tuple(int(r) for r in self.roi)  # type: ignore[assignment]
        self.class_names = [str(c) for c in self.class_names]
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` saying what to pass when a field is inconsistent."""
        errors = []
        if len(self.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing):
            errors.append(f"spacing must be 3 positive numbers in mm (e.g. --spacing 1.5 1.5 2.0), got {self.spacing}")
        if self.intensity not in ("window", "zscore"):
            errors.append(f"intensity must be 'window' (CT) or 'zscore' (MRI), got {self.intensity!r}")
        if self.intensity == "window":
            if self.a_min is None or self.a_max is None:
                errors.append("intensity 'window' needs both bounds: pass --a_min and --a_max (e.g. -125 275 for abdominal CT)")
            elif not self.a_min < self.a_max:
                errors.append(f"a_min ({self.a_min}) must be below a_max ({self.a_max})")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            errors.append(f"num_classes counts background too and must be >= 2, got {self.num_classes}")
        elif len(self.class_names) != self.num_classes:
            errors.append(
                f"class_names has {len(self.class_names)} names but num_classes is {self.num_classes}: "
                "give one name per class, background first"
            )
        if len(self.roi) != 3 or not all(r > 0 for r in self.roi):
            errors.append(f"roi must be 3 positive integers (e.g. --roi 96 96 96), got {self.roi}")
        if not 0.0 <= self.cache_rate <= 1.0:
            errors.append(f"cache_rate must be in [0, 1], got {self.cache_rate}")
        if errors:
            raise ValueError(f"dataset config {self.name!r}: " + "; ".join(errors))

    def to_dict(self) -> dict:
        """JSON-ready dict (the format ``--dataset_config`` reads), for run summaries."""
        d = dataclasses.asdict(self)
        d["spacing"] = list(self.spacing)
        d["roi"] = list(self.roi)
        return d


_CT_WINDOW = (-125.0, 275.0)
_AMOS_CT_CLASSES = [
    "background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver",
    "stomach", "aorta", "inferior vena cava", "pancreas", "right adrenal gland",
    "left adrenal gland", "duodenum", "bladder", "prostate/uterus",
]  # fmt: skip

PRESETS: dict[str, DatasetConfig] = {
    "amos": DatasetConfig("amos", (1.5, 1.5, 2.0), "window", *_CT_WINDOW, 16, _AMOS_CT_CLASSES),
    # AMOS-MRI annotates the 13 abdominal organs without bladder and prostate/uterus.
    "amos_mri": DatasetConfig("amos_mri", (1.0, 1.0, 1.0), "window", 0.0, 1000.0, 14, _AMOS_CT_CLASSES[:14]),
    # KiTS21/23 labels: 1 kidney, 2 tumour, 3 cyst.
    "kits": DatasetConfig("kits", (1.5, 1.5, 2.0), "window", *_CT_WINDOW, 4, ["background", "kidney", "tumor", "cyst"]),
    "pancreas": DatasetConfig("pancreas", (1.5, 1.5, 2.0), "window", *_CT_WINDOW, 3, ["background", "pancreas", "tumor"]),
    "hepatic": DatasetConfig("hepatic", (1.5, 1.5, 2.0), "window", 0.0, 230.0, 3, ["background", "vessel", "tumor"]),
    # Small crops and full caching so that the synthetic demo trains in minutes on a CPU.
    "demo": DatasetConfig(
        "demo",
        demo_data.DEMO_SPACING,
        "window",
        *demo_data.DEMO_WINDOW,
        len(demo_data.DEMO_CLASS_NAMES),
        list(demo_data.DEMO_CLASS_NAMES),
        roi=demo_data.DEMO_ROI,
        cache_rate=1.0,
    ),
}

_CONFIG_KEYS = ("spacing", "intensity", "a_min", "a_max", "num_classes", "class_names", "roi", "cache_rate")


class DataError(ValueError):
    """Problems found in a dataset; the message lists every one, one per line, with the fix.

    Attributes:
        problems: one line per problem, each naming the file (or flag) and what to do.
    """

    def __init__(self, problems: Sequence[str], header: str | None = None) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = header or f"{n} problem{'s' if n != 1 else ''} found in the dataset; nothing was trained or predicted:"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in self.problems))


def _generic_class_names(n: int) -> list[str]:
    return ["background"] + [f"class_{i}" for i in range(1, n)]


def get_dataset_config(name: str, config_file: str | None = None, **overrides) -> DatasetConfig:
    """Build the :class:`DatasetConfig` for a preset or a user's own dataset.

    Args:
        name: a key of :data:`PRESETS` or ``"custom"`` (which needs spacing, num_classes and, for
            ``intensity="window"``, a_min / a_max from ``config_file`` or ``overrides``).
        config_file: optional JSON file with any of the keys ``spacing, intensity, a_min, a_max,
            num_classes, class_names, roi, cache_rate``; it overrides the preset.
        **overrides: the same keys (e.g. from CLI flags); ``None`` values are ignored. They win
            over the JSON file. ``class_names`` may be a list or a comma-separated string.

    Returns:
        The validated config. When ``num_classes`` is changed and no names are given, the names
        become ``background, class_1, ...``.

    Raises:
        ValueError: unknown preset, unreadable JSON, unknown keys or inconsistent values.
    """
    if name != "custom" and name not in PRESETS:
        raise ValueError(f"unknown --dataset {name!r}: pass one of {sorted(PRESETS)} or 'custom' (with --dataset_config or flags)")
    values: dict = {}
    if name in PRESETS:
        values = PRESETS[name].to_dict()
    else:
        values = {"name": "custom", "intensity": "window", "a_min": None, "a_max": None, "roi": [96, 96, 96], "cache_rate": 0.1}
    given: dict = {}
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise ValueError(f"--dataset_config {config_file}: file not found; pass the path of a JSON file with keys {list(_CONFIG_KEYS)}")
        try:
            with open(config_file) as f:
                loaded = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--dataset_config {config_file}: not valid JSON ({e}); expected an object with keys {list(_CONFIG_KEYS)}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--dataset_config {config_file}: expected a JSON object with keys {list(_CONFIG_KEYS)}")
        unknown = sorted(set(loaded) - set(_CONFIG_KEYS) - {"name"})
        if unknown:
            raise ValueError(f"--dataset_config {config_file}: unknown keys {unknown}; allowed keys are {list(_CONFIG_KEYS)}")
        given.update({k: v for k, v in loaded.items() if k != "name"})
    unknown = sorted(set(overrides) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"get_dataset_config: unknown overrides {unknown}; allowed are {list(_CONFIG_KEYS)}")
    given.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(given.get("class_names"), str):
        given["class_names"] = [c.strip() for c in given["class_names"].split(",") if c.strip()]
    elif isinstance(given.get("class_names"), (list, tuple)) and len(given["class_names"]) == 1 and "," in str(given["class_names"][0]):
        given["class_names"] = [c.strip() for c in str(given["class_names"][0]).split(",") if c.strip()]
    values.update(given)
    if name == "custom":
        missing = [k for k in ("spacing", "num_classes") if values.get(k) is None]
        if missing:
            raise ValueError(
                f"--dataset custom needs {missing}: pass --spacing X Y Z and --num_classes N "
                "(or put them in a JSON file given with --dataset_config)"
            )
    if "class_names" not in given and len(values.get("class_names") or []) != values["num_classes"]:
        values["class_names"] = _generic_class_names(int(values["num_classes"]))
    if isinstance(values.get("num_classes"), float) and float(values["num_classes"]).is_integer():
        values["num_classes"] = int(values["num_classes"])
    for key in ("spacing", "roi"):
        v = values[key]
        if isinstance(v, (int, float)):
            values[key] = [v] * 3
    if values.get("intensity") == "zscore":
        values["a_min"] = values["a_min"] if "a_min" in given else None
        values["a_max"] = values["a_max"] if "a_max" in given else None
    try:
        return DatasetConfig(**values)
    except TypeError as e:
        raise ValueError(f"dataset config: {e}") from None


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    # Both scripts call add_dataset_args; a flag a script already defines itself is kept as is.
    if flag not in parser._option_string_actions:
        parser.add_argument(flag, **kwargs)


def add_dataset_args(parser: argparse.ArgumentParser, training: bool = True) -> None:
    """Add the data flags shared by ``main_train.py`` and ``test_seg.py``, as a "data" group.

    Flags: ``--root --dataset --dataset_config --spacing --intensity --a_min --a_max
    --num_classes --class_names --roi --datalist --fold --num_workers``; with ``training`` also
    ``--cache_rate --loader --cache_on_gpu --crop_ratios``. Preset-dependent flags default to ``None``
    (= take the preset's value). A flag the script already defined is left alone.

    Args:
        parser: the script's parser.
        training: add the flags that only training uses.
    """
    parser = parser.add_argument_group("data")  # type: ignore[assignment]  # shares the parser's option table
    _add(parser, "--root", type=str, default=None, help="dataset folder (imagesTr/labelsTr/imagesVal/labelsVal[/imagesTs], or with an MSD dataset.json). Without it the synthetic demo dataset is generated and used.")
    _add(parser, "--dataset", type=str, default=None, help=f"preset: {', '.join(PRESETS)}, or 'custom' (give --spacing/--num_classes/... or --dataset_config). Default: 'demo' without --root.")
    _add(parser, "--dataset_config", type=str, default=None, help="JSON file with spacing, intensity, a_min, a_max, num_classes, class_names, roi; overrides the preset")
    _add(parser, "--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"), help="target voxel spacing in mm (overrides the preset)")
    _add(parser, "--intensity", type=str, choices=("window", "zscore"), default=None, help="'window' (CT: clip [a_min, a_max] -> [0, 1]) or 'zscore' (MRI: per-volume normalisation)")
    _add(parser, "--a_min", type=float, default=None, help="lower intensity window bound (HU for CT)")
    _add(parser, "--a_max", type=float, default=None, help="upper intensity window bound")
    _add(parser, "--num_classes", type=int, default=None, help="number of classes including background; not for picking network outputs of a preset (it sets them)")
    _add(parser, "--class_names", type=str, default=None, help="comma-separated class names, background first, e.g. 'background,liver,tumour'")
    _add(parser, "--roi", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), help="training crop / sliding-window ROI in voxels (default: the preset's, 96 96 96 for the paper's datasets)")
    _add(parser, "--datalist", type=str, default=None, help="MONAI datalist JSON ('training' with optional 'fold' keys, 'validation', 'testing'); relative paths are taken from --root")
    _add(parser, "--fold", type=int, default=0, help="validation fold when the datalist has 'fold' keys or no validation set is given (5 folds by name)")
    _add(parser, "--num_workers", type=int, default=None, help="data-loading worker processes (0 loads in the main process; default: one per CPU core but one, at most 8)")
    if not training:
        return
    _add(parser, "--cache_rate", type=float, default=None, help="fraction of cases kept pre-processed in memory (default: the preset's, 0.1; demo 1.0); lower it if RAM runs out")
    _add(parser, "--loader", choices=("auto", "gpu", "workers"), default="auto", help="how training batches are made: gpu (cached volumes on the GPU, random transforms there), workers (CPU worker processes), auto (the GPU cache when CUDA is used and the cached volumes fit, else workers; the start line says which and why)")
    _add(parser, "--cache_on_gpu", action="store_true", help="the same as --loader gpu")
    _add(parser, "--crop_ratios", type=float, nargs="+", default=None, metavar="R", help="class-balanced crops for small structures: one ratio per class, background first (e.g. 1 1 4 for a rare class 2); default: the paper's 1:1 foreground/background crops")


def resolve_dataset_config(
    name: str | None,
    root: str | None = None,
    datalist: str | None = None,
    config_file: str | None = None,
    **overrides,
) -> DatasetConfig:
    """The :class:`DatasetConfig` selected by the data flags (plain values, as :func:`add_dataset_args` defines them).

    ``name`` defaults to ``"demo"`` when neither ``root`` nor ``datalist`` is given. For ``custom``
    without ``num_classes``, the ``labels`` of ``<root>/dataset.json`` (MSD) are used if present.

    Args:
        name: ``--dataset``.
        root: ``--root``.
        datalist: ``--datalist``.
        config_file: ``--dataset_config``.
        **overrides: ``spacing, intensity, a_min, a_max, num_classes, class_names, roi`` (None = not given).

    Raises:
        ValueError: with a message naming the flag to fix.
    """
    if name is None:
        if root is None and datalist is None:
            name = "demo"
        else:
            raise ValueError(f"--dataset is required with --root: pass one of {sorted(PRESETS)} or 'custom'")
    overrides = dict(overrides)
    if name == "custom" and overrides.get("num_classes") is None and overrides.get("class_names") is None and root and config_file is None:
        labels = _dataset_json_labels(os.path.join(root, "dataset.json"))
        if labels:
            overrides["num_classes"] = len(labels)
            overrides["class_names"] = labels
    return get_dataset_config(name, config_file, **overrides)


def config_from_args(args) -> DatasetConfig:  # TEMPORARY shim while test_seg.py moves to resolve_dataset_config
    keys = ("spacing", "intensity", "a_min", "a_max", "num_classes", "class_names", "roi")
    return resolve_dataset_config(
        getattr(args, "dataset", None), getattr(args, "root", None), getattr(args, "datalist", None),
        getattr(args, "dataset_config", None), **{k: getattr(args, k, None) for k in keys},
    )


def default_num_workers() -> int:
    """Loader workers when --num_workers is not given: one per CPU core but one (for the training loop), 1 to 8.

    Two workers (the seed's value) left an H100 waiting for data half of the time with 96^3 crops
    (benchmarks/RESULTS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, cores - 1))


# --------------------------------------------------------------------------------------------
# Listing cases
# --------------------------------------------------------------------------------------------


def _strip_ext(filename: str) -> str | None:
    for ext in NIFTI_EXTENSIONS:
        if filename.lower().endswith(ext):
            return filename[: -len(ext)]
    return None


def case_name(path: str, role: str = "image") -> str:
    """Case name of an image or label file: the file name without extension and without the
    nnU-Net channel suffix ``_0000`` (images) or a ``_seg``/``_label``/... suffix (labels).

    Args:
        path: file path.
        role: ``"image"`` or ``"label"``.
    """
    base = os.path.basename(path)
    stem = _strip_ext(base) or base
    suffixes = (IMAGE_CHANNEL_SUFFIX,) if role == "image" else LABEL_SUFFIXES
    for s in suffixes:
        if stem.endswith(s) and len(stem) > len(s):
            return stem[: -len(s)]
    return stem


def nifti_files(folder: str) -> list[str]:
    """Sorted NIfTI files (.nii, .nii.gz) of a folder, the rule every listing here uses.

    Hidden files are skipped: MSD archives ship macOS "._case.nii.gz" resource forks.
    """
    return sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if not f.startswith(".") and _strip_ext(f) is not None and os.path.isfile(os.path.join(folder, f))
    )


_nifti_files = nifti_files  # older name, used by test_seg.py


def _pair_folder(image_dir: str, label_dir: str | None, problems: list[str], labels_required: bool) -> list[dict]:
    """Pair the NIfTI files of two folders by case name; collect unpaired files in ``problems``."""
    images = _nifti_files(image_dir)
    if not images:
        problems.append(f"{image_dir}: no .nii.gz / .nii files found. Fix: put the images there (hidden files are ignored)")
        return []
    # nnU-Net multi-channel cases (_0001, _0002, ...) are not supported: Rep3D takes one channel.
    stems = {_strip_ext(os.path.basename(p)) for p in images}
    multi = sorted(p for p in images if re.search(r"_000[1-9]$", _strip_ext(os.path.basename(p)) or "")
                   and re.sub(r"_000[1-9]$", IMAGE_CHANNEL_SUFFIX, _strip_ext(os.path.basename(p)) or "") in stems)
    for p in multi:
        problems.append(f"{p}: an extra input channel (nnU-Net '_000N' naming); only single-channel images are supported. Fix: remove the extra channels or merge them into one image")
    images = [p for p in images if p not in set(multi)]
    by_label: dict[str, str] = {}
    label_paths: list[str] = []
    if label_dir is not None and os.path.isdir(label_dir):
        label_paths = _nifti_files(label_dir)
        # Exact stems first so that a case literally named "x_seg" still pairs with "x_seg".
        for p in label_paths:
            by_label.setdefault(case_name(p, "label"), p)
        for p in label_paths:
            by_label[_strip_ext(os.path.basename(p)) or p] = p
    cases, used, seen = [], set(), {}
    for img in images:
        stem = _strip_ext(os.path.basename(img)) or img
        name = case_name(img, "image")
        if name in seen:
            problems.append(f"{img}: same case name {name!r} as {seen[name]}. Fix: keep one file per case (e.g. not both .nii and .nii.gz)")
            continue
        seen[name] = img
        lab = by_label.get(stem) or by_label.get(name)
        case = {"image": img}
        if lab is not None:
            case["label"] = lab
            used.add(lab)
        elif labels_required:
            problems.append(f"{img}: image without a label (expected {os.path.join(label_dir or '?', name + '.nii.gz')}). Fix: add the label file with the same case name, or move the image out")
        cases.append(case)
    if labels_required:
        for lab in label_paths:
            if lab not in used:
                problems.append(f"{lab}: label without an image (expected {os.path.join(image_dir, case_name(lab, 'label') + '.nii.gz')}). Fix: add the image with the same case name, or move the label out")
    return cases


def _fold_of(index: int, item: dict) -> int:
    f = item.get("fold")
    return int(f) if f is not None else index % N_AUTO_FOLDS


def _split_folds(items: list[dict], fold: int, source: str, problems: list[str]) -> tuple[list[dict], list[dict]]:
    """Train / validation split: by the items' ``fold`` keys, else 5 folds by sorted case name."""
    if not items:
        return [], []
    has_folds = any("fold" in it for it in items)
    ordered = items if has_folds else sorted(items, key=lambda c: case_name(c["image"]))
    folds = {_fold_of(i, it) for i, it in enumerate(ordered)}
    if fold not in folds:
        problems.append(f"{source}: no case in fold {fold} (folds present: {sorted(folds)}). Fix: pass --fold with one of those")
        return ordered, []
    train = [{k: v for k, v in it.items() if k != "fold"} for i, it in enumerate(ordered) if _fold_of(i, it) != fold]
    val = [{k: v for k, v in it.items() if k != "fold"} for i, it in enumerate(ordered) if _fold_of(i, it) == fold]
    if not has_folds:
        logger.info("%s has no validation list: fold %d of %d folds by case name validates (%d cases)", source, fold, N_AUTO_FOLDS, len(val))
    return train, val


def _resolve(path: str, base: str) -> str:
    p = path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))
    if not os.path.exists(p):
        # nnU-Net v1 lists "imagesTr/case.nii.gz" while the file on disk is "case_0000.nii.gz".
        stem = _strip_ext(p)
        if stem is not None:
            ext = p[len(stem):]
            alt = stem + IMAGE_CHANNEL_SUFFIX + ext
            if os.path.exists(alt):
                return alt
    return p


def _json_items(entries, base: str, source: str, key: str, problems: list[str], labels_required: bool) -> list[dict]:
    items = []
    if not isinstance(entries, list):
        problems.append(f"{source}: '{key}' must be a list of {{'image': ..., 'label': ...}} entries")
        return items
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"image": e}
        if not isinstance(e, dict) or "image" not in e:
            problems.append(f"{source}: entry {i} of '{key}' has no 'image'. Fix: give each entry an 'image' path")
            continue
        if isinstance(e["image"], list):
            if len(e["image"]) != 1:
                problems.append(f"{source}: entry {i} of '{key}' lists {len(e['image'])} image channels; only single-channel images are supported")
                continue
            e = {**e, "image": e["image"][0]}
        item = {"image": _resolve(str(e["image"]), base)}
        if e.get("label") is not None:
            item["label"] = _resolve(str(e["label"]), base)
        elif labels_required:
            problems.append(f"{item['image']}: entry {i} of '{key}' in {source} has no 'label'. Fix: add the label path")
            continue
        if "fold" in e:
            item["fold"] = e["fold"]
        items.append(item)
    return items


def _dataset_json_labels(path: str) -> list[str] | None:
    """Class names from an MSD ``dataset.json`` ``labels`` map ({"0": "background", ...}), or None."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            labels = json.load(f).get("labels")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(labels, dict) or not labels:
        return None
    try:
        # MSD maps value -> name; nnU-Net v2 maps name -> value.
        pairs = {int(k): str(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        try:
            pairs = {int(v): str(k) for k, v in labels.items()}
        except (TypeError, ValueError):
            return None
    if sorted(pairs) != list(range(len(pairs))):
        return None
    return [pairs[i] for i in range(len(pairs))]


def _list_cases(root: str | None, split: str, datalist: str | None, fold: int) -> tuple[list[dict], list[str], str]:
    """Cases of one split, the problems found on the way and a description of the source."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    problems: list[str] = []
    labels_required = split != "test"
    if datalist is not None:
        source = datalist
        if not os.path.isfile(datalist):
            return [], [f"{datalist}: datalist file not found. Fix: pass the path of a MONAI datalist JSON to --datalist"], source
        base = root if root else os.path.dirname(os.path.abspath(datalist))
    else:
        if root is None:
            raise ValueError("list_cases: pass root (the dataset folder) or datalist")
        if not os.path.isdir(root):
            return [], [f"{root}: dataset folder not found. Fix: pass an existing folder to --root"], root
        source = os.path.join(root, "dataset.json")
        base = root
    data = None
    if os.path.isfile(source):
        try:
            with open(source) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            if datalist is not None:
                return [], [f"{source}: not valid JSON ({e}). Fix: repair the file"], source
            data = None
        if datalist is None and not (isinstance(data, dict) and "training" in data):
            data = None  # an nnU-Net v2 dataset.json lists no files: use the folders
    if isinstance(data, dict):
        if "training" not in data and split != "test":
            return [], [f"{source}: no 'training' list. Fix: list the cases under 'training' (each {{'image', 'label'}})"], source
        if split == "test":
            key = next((k for k in ("testing", "test") if k in data), None)
            if key is None:
                if "validation" in data:
                    key = "validation"
                else:
                    tr = _json_items(data.get("training", []), base, source, "training", problems, True)
                    _, val = _split_folds(tr, fold, source, problems)
                    return val, problems, source
            return _json_items(data[key], base, source, key, problems, False), problems, source
        training = _json_items(data["training"], base, source, "training", problems, True)
        if "validation" in data and not any("fold" in it for it in training):
            val = _json_items(data["validation"], base, source, "validation", problems, True)
            train = [{k: v for k, v in it.items() if k != "fold"} for it in training]
        else:
            train, val = _split_folds(training, fold, source, problems)
        return (train if split == "train" else val), problems, source
    # Folder layout.
    source = root
    dirs = {d: os.path.join(root, d) for d in ("imagesTr", "labelsTr", "imagesVal", "labelsVal", "imagesTs", "labelsTs")}
    have = {d: os.path.isdir(p) for d, p in dirs.items()}
    if split == "test":
        for img_d, lab_d in (("imagesTs", "labelsTs"), ("imagesVal", "labelsVal")):
            if have[img_d]:
                return _pair_folder(dirs[img_d], dirs[lab_d] if have[lab_d] else None, problems, False), problems, dirs[img_d]
        problems.append(f"{root}: no imagesTs or imagesVal folder, nor a dataset.json. Fix: put the images to predict in {dirs['imagesTs']}")
        return [], problems, source
    for d in ("imagesTr", "labelsTr"):
        if not have[d]:
            problems.append(f"{dirs[d]}: folder missing. Fix: create it with the training {'images' if d.startswith('images') else 'labels'} (.nii.gz), or give --datalist / a dataset.json")
    if have["imagesVal"] != have["labelsVal"]:
        missing = "labelsVal" if have["imagesVal"] else "imagesVal"
        problems.append(f"{dirs[missing]}: folder missing while {'imagesVal' if missing == 'labelsVal' else 'labelsVal'} exists. Fix: create it, or remove both to validate on a fold of imagesTr")
    if split == "val" and have["imagesVal"] and have["labelsVal"]:
        return _pair_folder(dirs["imagesVal"], dirs["labelsVal"], problems, True), problems, dirs["imagesVal"]
    if not (have["imagesTr"] and have["labelsTr"]):
        return [], problems, source
    train = _pair_folder(dirs["imagesTr"], dirs["labelsTr"], problems, True)
    if have["imagesVal"] or have["labelsVal"]:
        return (train if split == "train" else []), problems, dirs["imagesTr"]
    tr, val = _split_folds(train, fold, dirs["imagesTr"], problems)
    return (tr if split == "train" else val), problems, dirs["imagesTr"]


def list_cases(root: str | None, split: str, datalist: str | None = None, fold: int = 0) -> list[dict]:
    """List the cases of one split, images paired with labels by case name.

    Args:
        root: dataset folder (folder layout or MSD ``dataset.json``); base of relative paths in
            ``datalist``. May be ``None`` when ``datalist`` is given.
        split: ``"train"``, ``"val"`` or ``"test"`` (test: ``imagesTs``, else ``imagesVal``;
            a label is included when one with the same case name exists).
        datalist: optional MONAI datalist JSON, which takes precedence over ``root``'s layout.
        fold: validation fold for datalists with ``fold`` keys, or for the automatic 5-fold
            split used when no validation cases are listed.

    Returns:
        ``[{"image": path, "label": path}, ...]`` (no ``"label"`` for unlabeled test images).

    Raises:
        DataError: listing every missing folder or file and every unpaired image or label.
    """
    cases, problems, _ = _list_cases(root, split, datalist, fold)
    if problems:
        raise DataError(problems)
    return cases


def list_images(path: str) -> list[dict]:
    """Inputs for inference from a single NIfTI file or a folder of them: ``[{"image": path}]``.

    Raises:
        DataError: when the path does not exist or holds no NIfTI file.
    """
    if os.path.isfile(path):
        if _strip_ext(os.path.basename(path)) is None:
            raise DataError([f"{path}: not a NIfTI file (.nii or .nii.gz). Fix: convert it to NIfTI"])
        return [{"image": path}]
    if os.path.isdir(path):
        files = _nifti_files(path)
        if files:
            return [{"image": p} for p in files]
        raise DataError([f"{path}: no .nii.gz / .nii files found. Fix: pass a folder of NIfTI images"])
    raise DataError([f"{path}: not found. Fix: pass an existing NIfTI file or folder"])


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def _gzip_isize_ok(path: str, expected: int) -> bool:
    """Cheap truncation test: gzip stores the uncompressed size mod 2**32 in its last 4 bytes."""
    try:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", f.read(4))
    except OSError:
        return False
    return isize == expected % (1 << 32)


def _load_header(path: str, role: str, problems: list[str]):
    import nibabel as nib

    if not os.path.isfile(path):
        problems.append(f"{path}: {role} file not found. Fix: check the path (or the datalist entry)")
        return None
    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel raises several types for broken headers
        problems.append(f"{path}: unreadable or corrupt {role} ({type(e).__name__}: {e}). Fix: re-export or re-download the file")
        return None
    # Data are read lazily; a truncated file shows up as a short gzip stream or a short file.
    hdr = img.header
    try:
        nbytes = int(np.prod(shape)) * np.dtype(hdr.get_data_dtype()).itemsize
        offset = int(getattr(img.dataobj, "offset", 0) or hdr.get_data_offset())
    except Exception:
        nbytes, offset = 0, 0
    suspect = False
    if nbytes:
        if path.lower().endswith(".gz"):
            suspect = not _gzip_isize_ok(path, offset + nbytes)
        else:
            suspect = os.path.getsize(path) < offset + nbytes
    if suspect:
        # The size test can misjudge multi-member gzip files; reading the data decides.
        try:
            np.asanyarray(img.dataobj)
        except Exception as e:
            problems.append(f"{path}: corrupt {role}: the voxel data cannot be read ({type(e).__name__}: {e}). Fix: re-export or re-download the file")
            return None
    return img, shape, affine


def _spatial_shape(shape: tuple[int, ...], path: str, role: str, problems: list[str]) -> tuple[int, int, int] | None:
    if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
        if min(shape[:3]) < 1:
            problems.append(f"{path}: {role} has an empty dimension {shape}. Fix: re-export the volume")
            return None
        return shape[:3]
    if len(shape) == 4:
        problems.append(f"{path}: {role} is 4-D with {shape[3]} channels/time points {shape}; only single-channel 3-D volumes are supported. Fix: save one channel as a 3-D volume")
    else:
        problems.append(f"{path}: {role} is {len(shape)}-D {shape}; expected a 3-D volume (or 4-D with one channel). Fix: save it as a 3-D NIfTI volume")
    return None


def _check_case(case: dict, num_classes: int, check_labels: bool) -> tuple[list[str], tuple | None]:
    problems: list[str] = []
    info = None
    image = _load_header(case["image"], "image", problems)
    ishape = _spatial_shape(image[1], case["image"], "image", problems) if image else None
    if image is not None:
        zooms = np.sqrt((image[2][:3, :3] ** 2).sum(axis=0))
        if not np.all(np.isfinite(image[2])) or np.any(zooms <= 0) or abs(np.linalg.det(image[2][:3, :3])) < 1e-12:
            problems.append(f"{case['image']}: degenerate affine (voxel sizes {zooms.round(4).tolist()}). Fix: repair the header's qform/sform")
        elif ishape is not None:
            info = (ishape, zooms)
    if "label" not in case:
        return problems, info
    label = _load_header(case["label"], "label", problems)
    lshape = _spatial_shape(label[1], case["label"], "label", problems) if label else None
    if image is not None and label is not None and ishape is not None and lshape is not None:
        if ishape != lshape:
            problems.append(f"{case['label']}: label shape {lshape} differs from image shape {ishape} ({case['image']}). Fix: the label must be drawn on the image's voxel grid; resample it to the image")
        elif not np.allclose(image[2][:3], label[2][:3], rtol=1e-5, atol=AFFINE_ATOL_MM):
            diff = float(np.abs(image[2][:3] - label[2][:3]).max())
            problems.append(
                f"{case['label']}: label affine differs from the image's ({case['image']}) by up to {diff:.4g} mm. "
                "Fix: if the voxels do correspond, re-save the label with the image's header (nibabel.Nifti1Image(label_data, image.affine)); otherwise resample the label onto the image"
            )
    if check_labels and label is not None and lshape is not None:
        try:
            data = np.asanyarray(label[0].dataobj)
        except Exception as e:
            problems.append(f"{case['label']}: corrupt label: the voxel data cannot be read ({type(e).__name__}: {e}). Fix: re-export the file")
            return problems, info
        if data.dtype.kind == "f":
            finite = np.isfinite(data)
            if not finite.all():
                problems.append(f"{case['label']}: label has NaN/inf values. Fix: store integer class values 0..{num_classes - 1}")
                return problems, info
            if not np.array_equal(data, np.round(data)):
                problems.append(f"{case['label']}: label has non-integer values (an interpolated label?). Fix: store integer class values 0..{num_classes - 1}, resampling labels with nearest neighbour")
                return problems, info
        lo, hi = data.min(), data.max()
        if lo < 0 or hi > num_classes - 1:
            bad = np.unique(data[(data < 0) | (data > num_classes - 1)])
            shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
            problems.append(
                f"{case['label']}: label values {shown} are outside 0..{num_classes - 1} (num_classes={num_classes}). "
                "Fix: pass the right --dataset / --num_classes, or remap the label values"
            )
    return problems, info


def check_cases(cases: list[dict], cfg: DatasetConfig, roi: Sequence[int] | None = None, check_labels: bool = True, num_workers: int = 2) -> None:
    """Verify cases from their NIfTI headers (and label voxels) before anything is built.

    Checks: files exist and are readable (headers, plus a cheap truncation test of the data);
    images are 3-D or 4-D with one channel; image and label have the same shape and affine;
    label values are integers in ``0..cfg.num_classes - 1`` (label voxels are read for this).
    Volumes smaller than ``roi`` after resampling are only logged: the training chain pads them.

    Args:
        cases: ``[{"image": path, "label": path (optional)}, ...]``.
        cfg: dataset config (class count, spacing).
        roi: training crop, for the "will be padded" note; defaults to ``cfg.roi``.
        check_labels: read label voxels to check their values (the slow part on large data).
        num_workers: threads reading files in parallel.

    Raises:
        DataError: listing every problem, one line per file, each with its fix.
    """
    roi = tuple(roi or cfg.roi)
    if not cases:
        raise DataError(["no cases to check. Fix: point --root / --datalist at a dataset with images"])
    workers = max(1, min(int(num_workers or 1), len(cases), 8))
    if workers > 1:
        with ThreadPoolExecutor(workers) as ex:
            results = list(ex.map(lambda c: _check_case(c, cfg.num_classes, check_labels), cases))
    else:
        results = [_check_case(c, cfg.num_classes, check_labels) for c in cases]
    problems = [p for probs, _ in results for p in probs]
    small = 0
    for case, (_, info) in zip(cases, results):
        if info is not None:
            shape, zooms = info
            resampled = [s * z / t for s, z, t in zip(shape, zooms, cfg.spacing)]
            if any(r < c for r, c in zip(resampled, roi)):
                small += 1
                logger.info("%s: about %s voxels after resampling, smaller than the crop %s: it will be zero-padded", case["image"], [round(r) for r in resampled], roi)
    if small:
        logger.warning("%d case(s) are smaller than the crop %s after resampling and will be padded", small, roi)
    if problems:
        raise DataError(problems)


def check_dataset(
    cfg: DatasetConfig,
    root: str | None,
    splits: Sequence[str] = ("train", "val"),
    datalist: str | None = None,
    fold: int = 0,
    roi: Sequence[int] | None = None,
    check_labels: bool = True,
    num_workers: int = 2,
) -> dict[str, list[dict]]:
    """List and verify several splits, reporting every problem of all of them in one DataError.

    Also checks that an MSD ``dataset.json``'s ``labels`` count matches ``cfg.num_classes``.

    Returns:
        ``{split: cases}`` for each requested split.
    """
    problems: list[str] = []
    out: dict[str, list[dict]] = {}
    for split in splits:
        cases, probs, source = _list_cases(root, split, datalist, fold)
        problems.extend(p for p in probs if p not in problems)
        if not cases and not probs:
            hint = "imagesVal/labelsVal" if split == "val" else ("imagesTs" if split == "test" else "imagesTr/labelsTr")
            problems.append(f"{source}: no {split} cases found. Fix: add cases ({hint}) or check --datalist / --fold")
        out[split] = cases
    if root and datalist is None:
        labels = _dataset_json_labels(os.path.join(root, "dataset.json"))
        if labels is not None and len(labels) != cfg.num_classes:
            problems.append(
                f"{os.path.join(root, 'dataset.json')}: lists {len(labels)} labels {labels} but --dataset {cfg.name} has {cfg.num_classes} classes. "
                "Fix: pass the matching --dataset, or --num_classes / --class_names"
            )
    all_cases = [c for split in splits for c in out[split]]
    if all_cases:
        try:
            check_cases(all_cases, cfg, roi=roi, check_labels=check_labels, num_workers=num_workers)
        except DataError as e:
            problems.extend(e.problems)
    if problems:
        raise DataError(problems)
    return out


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def _intensity(cfg: DatasetConfig) -> list:
    if cfg.intensity == "window":
        return [ScaleIntensityRanged(keys="image", a_min=cfg.a_min, a_max=cfg.a_max, b_min=0.0, b_max=1.0, clip=True)]
    return [NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)]


def _preprocess(cfg: DatasetConfig, keys: list[str], modes: list[str]) -> list:
    """Load, channel first, resample, orient RAS, intensity, crop to the foreground."""
    chain = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Spacingd(keys=keys, pixdim=cfg.spacing, mode=modes),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    crop = CropForegroundd(keys=keys, source_key="image", allow_smaller=True)
    if cfg.intensity == "window":
        # After windowing, air is exactly 0, so "> 0" is the body.
        return chain + _intensity(cfg) + [crop]
    # z-scored volumes are negative inside the body; crop on the raw (non-negative) MRI first.
    return chain + [crop] + _intensity(cfg)


def get_train_transforms(cfg: DatasetConfig, roi: Sequence[int] | None = None, crop_sample: int = 2, device: str | torch.device | None = None) -> Compose:
    """Training chain: pre-processing, pad to ``roi``, random pos/neg crops and augmentations.

    Pre-processing as :func:`get_val_transforms`, then ``SpatialPadd`` to ``roi`` (volumes
    smaller than the crop are zero-padded), ``RandCropByPosNegLabeld(roi, pos=1, neg=1,
    num_samples=crop_sample)``, ``RandShiftIntensityd(0.10, p=0.5)`` and ``RandAffined``
    (rotation up to pi/30 about the third axis and scaling 0.1, p=1.0, as in the 3D UX-Net /
    Rep3D release). The chain yields a list of ``crop_sample`` dicts per case; MONAI's
    ``list_data_collate`` (the DataLoader default) stacks them into the batch.

    Args:
        cfg: dataset config.
        roi: crop size in voxels; defaults to ``cfg.roi``.
        crop_sample: crops per case.
        device: when given (e.g. ``"cuda"``), the deterministic part (cached by CacheDataset) ends
            with ``ToDeviced`` so the cache lives on that device and the random transforms run there.
    """
    roi = tuple(int(r) for r in (roi or cfg.roi))
    if crop_sample < 1:
        raise ValueError(f"crop_sample must be >= 1 (crops per case), got {crop_sample}")
    keys = ["image", "label"]
    chain = _preprocess(cfg, keys, ["bilinear", "nearest"])
    chain.append(SpatialPadd(keys=keys, spatial_size=roi, mode="constant"))
    if device is not None:
        chain += [EnsureTyped(keys=keys, track_meta=False), ToDeviced(keys=keys, device=device)]
    chain += [
        RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=roi,
            pos=1,
            neg=1,
            num_samples=crop_sample,
            # Windowed CT: background crops are centred inside the body (> a_min), not in air.
            # z-scored MRI is negative in half the body, so there any background voxel may serve.
            image_key="image" if cfg.intensity == "window" else None,
            image_threshold=0,
        ),
        RandShiftIntensityd(keys="image", offsets=0.10, prob=0.5),
        RandAffined(
            keys=keys,
            mode=("bilinear", "nearest"),
            prob=1.0,
            spatial_size=roi,
            rotate_range=(0.0, 0.0, np.pi / 30),
            scale_range=(0.1, 0.1, 0.1),
            cache_grid=True,
            device=torch.device(device) if device is not None else None,
        ),
    ]
    if device is None:
        chain.append(EnsureTyped(keys=keys, track_meta=False))
    return Compose(chain)


def get_val_transforms(cfg: DatasetConfig, device: str | torch.device | None = None) -> Compose:
    """Validation chain: load, channel first, resample (bilinear image / nearest label), RAS,
    intensity, crop foreground. Whole volumes; sliding-window inference pads small ones.

    Args:
        cfg: dataset config.
        device: optional device the cached volumes are moved to (``ToDeviced``).
    """
    keys = ["image", "label"]
    chain = _preprocess(cfg, keys, ["bilinear", "nearest"])
    if device is not None:
        chain += [EnsureTyped(keys=keys, track_meta=False), ToDeviced(keys=keys, device=device)]
    return Compose(chain)


def get_test_transforms(cfg: DatasetConfig, keep_label: bool = False) -> Compose:
    """Inference chain for images alone, invertible with ``monai.transforms.Invertd``.

    Args:
        cfg: dataset config.
        keep_label: also load ``"label"`` when a case has one, left in its native space
            (channel first) so a prediction inverted to native space can be scored against it.
    """
    chain = _preprocess(cfg, ["image"], ["bilinear"])
    if keep_label:
        chain = [
            LoadImaged(keys="label", image_only=True, allow_missing_keys=True),
            EnsureChannelFirstd(keys="label", allow_missing_keys=True),
        ] + chain
    return Compose(chain)


def _output_name(metadict: dict, saver) -> dict:
    # "<case>_seg.nii.gz", also for nnU-Net style "<case>_0000.nii.gz" inputs.
    src = str(metadict.get("filename_or_obj", getattr(saver, "_data_index", 0))) if metadict else str(getattr(saver, "_data_index", 0))
    folder, base = os.path.split(src)
    stem = _strip_ext(base)
    if stem is not None:
        base = case_name(base, "image") + base[len(stem):]
    return {"subject": os.path.join(folder, base), "idx": metadict.get("patch_index") if metadict else None}


def get_post_transforms(test_transforms: Compose, cfg: DatasetConfig, output_dir: str | None = None, argmax: bool = True) -> Compose:
    """Post-processing of one decollated inference result ``{"image", "pred"}``.

    ``pred`` (C logits, or one channel of class indices when ``argmax=False``) is reduced to a class
    map by argmax, inverted to the input's native grid with nearest-neighbour interpolation
    (``Invertd`` replays ``test_transforms`` backwards: uncrop, re-orient, resample) and, when
    ``output_dir`` is given, written as ``<output_dir>/<case>_seg.nii.gz`` (uint8, the input's affine).

    Args:
        test_transforms: the chain returned by :func:`get_test_transforms` that produced ``image``.
        cfg: dataset config (class count must fit in uint8).
        output_dir: folder for the NIfTI predictions; ``None`` writes nothing.
        argmax: apply argmax over channels first (pass False if ``pred`` is already a class map).
    """
    if cfg.num_classes > 256:
        raise ValueError(f"{cfg.num_classes} classes do not fit the uint8 prediction files; use at most 256")
    chain = []
    if argmax:
        chain.append(AsDiscreted(keys="pred", argmax=True))
    chain.append(Invertd(keys="pred", transform=test_transforms, orig_keys="image", nearest_interp=True, to_tensor=True))
    if output_dir is not None:
        chain.append(
            SaveImaged(
                keys="pred",
                output_dir=output_dir,
                output_postfix="seg",
                output_ext=".nii.gz",
                separate_folder=False,
                resample=False,
                output_dtype=np.uint8,
                print_log=False,
                output_name_formatter=_output_name,
            )
        )
    return Compose(chain)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def _rank_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _dataset(cases: list[dict], transform: Compose, cache_rate: float, num_workers: int):
    if cache_rate > 0:
        return CacheDataset(cases, transform=transform, cache_rate=cache_rate, num_workers=max(1, num_workers), progress=False)
    return Dataset(cases, transform=transform)


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
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Training and validation loaders, after checking every case (one DataError for all problems).

    Training batches hold ``batch_size * crop_sample`` crops of ``roi``; validation batches one
    whole pre-processed volume (batch size 1). With ``device`` set (e.g. ``"cuda"``), cached volumes
    are kept on that device, the random transforms run there and ``ThreadDataLoader`` (no worker
    processes) feeds the model: MONAI's fast-training recipe (use ``cache_rate=1.0`` if memory allows).

    Args:
        cfg: dataset config.
        root: dataset folder (see :func:`list_cases`).
        roi: crop size; defaults to ``cfg.roi``.
        crop_sample: crops per case per iteration.
        batch_size: cases per training batch.
        cache_rate: fraction of each split cached after the deterministic transforms.
        num_workers: loader worker processes (also threads for caching and checking).
        datalist: optional MONAI datalist JSON.
        fold: validation fold (see :func:`list_cases`).
        device: device for the cache and random transforms, or None (CPU workers).
        distributed: give each rank its own shard of both splits (``partition_dataset``: training
            shards even, validation shards disjoint, so each case is scored once; the metric
            reduction across ranks is the caller's).
        seed: seed of the shuffling and of the random transforms.
        check: run :func:`check_dataset` first (leave True; tests may skip it).

    Raises:
        DataError: listing every problem in the data.
    """
    roi = tuple(int(r) for r in (roi or cfg.roi))
    if check:
        splits = check_dataset(cfg, root, ("train", "val"), datalist=datalist, fold=fold, roi=roi, num_workers=num_workers)
        train_cases, val_cases = splits["train"], splits["val"]
    else:
        train_cases, val_cases = list_cases(root, "train", datalist, fold), list_cases(root, "val", datalist, fold)
    rank, world = _rank_world(distributed)
    if world > 1:
        if len(train_cases) < world:
            raise DataError([f"{len(train_cases)} training cases for {world} processes. Fix: use at most {len(train_cases)} processes"])
        train_cases = partition_dataset(train_cases, num_partitions=world, shuffle=True, seed=seed, even_divisible=True)[rank]
        # Strided shards: disjoint, and a rank may get none when there are fewer cases than ranks
        # (validation reduces per-class sums and counts across ranks, so an empty shard is fine).
        val_cases = val_cases[rank::world]
    train_tf = get_train_transforms(cfg, roi, crop_sample, device=device)
    train_tf.set_random_state(seed=seed + rank)
    val_tf = get_val_transforms(cfg, device=device)
    train_ds = _dataset(train_cases, train_tf, cache_rate, num_workers)
    val_ds = _dataset(val_cases, val_tf, cache_rate, num_workers)
    generator = torch.Generator().manual_seed(seed + rank)
    if device is not None:
        # CUDA tensors cannot cross process boundaries: threads only.
        train_loader = ThreadDataLoader(train_ds, batch_size=batch_size, shuffle=True, num_workers=0, generator=generator)
        val_loader = ThreadDataLoader(val_ds, batch_size=1, num_workers=0)
    else:
        pin = torch.cuda.is_available()
        train_loader = DataLoader(
            train_ds, batch_size=batch_size, shuffle=True, num_workers=num_workers, pin_memory=pin,
            generator=generator, persistent_workers=num_workers > 0,
        )
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

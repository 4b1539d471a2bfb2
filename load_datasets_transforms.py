"""Data pipeline for Rep3D: dataset presets, case listing, integrity checks, MONAI transforms, loaders.

The five presets of the paper (``amos``, ``amos_mri``, ``kits``, ``pancreas``, ``hepatic``) and a
``demo`` preset for the synthetic dataset of :mod:`demo_data` are in :data:`PRESETS`. A user's own
dataset is described without editing code, either by flags (``--dataset custom --spacing 1 1 1
--intensity zscore --num_classes 3 --class_names background,liver,tumour``) or by a small JSON file
passed with ``--dataset_config``::

    {"spacing": [1.5, 1.5, 2.0], "intensity": "window", "a_min": -125, "a_max": 275,
     "num_classes": 3, "class_names": ["background", "liver", "tumour"], "roi": [96, 96, 96]}

Flags override the JSON file, which overrides the preset named by ``--dataset``. With ``--root``
(or ``--datalist``) and no ``--dataset``, the settings are planned from the data instead
(:mod:`planning`: target spacing, per-channel normalisation, classes, ROI), and flags override
what is planned.

Layouts read: nnU-Net v2 raw datasets (``dataset.json`` with ``channel_names``; images
``case_0000<ending>``, ``case_0001<ending>``, ...), MSD task folders (4-D multi-channel images),
the folder layout below, datalists. Formats: NIfTI, NRRD, MetaImage and DICOM series folders
(:mod:`image_io`). A case of several channel files has ``"image": [path per channel]``.

Where the cases are listed (first match wins):

1. ``--datalist file.json``: a MONAI datalist (``training`` with optional ``fold`` keys,
   ``validation``, ``testing``); relative paths are taken from ``--root`` (else the JSON's folder).
2. ``<root>/dataset.json`` with a ``training`` list (Medical Segmentation Decathlon / nnU-Net v1).
3. The folder layout ``<root>/{imagesTr,labelsTr,imagesVal,labelsVal,imagesTs}``.

Images and labels are paired by case name, not by sorted position: ``case.nii.gz`` pairs with
``case.nii.gz``; the nnU-Net channel suffixes ``_0000``, ``_0001``, ... of images and the label suffixes
``_seg``, ``_label``, ``_labels``, ``_gt``, ``_mask`` are ignored when pairing. When a list has
no validation cases (no ``imagesVal``, no ``validation`` list, no ``fold`` keys), cases are split
into 5 folds by sorted name and fold ``--fold`` validates.

Every problem found on disk is reported at once in one :class:`DataError` before anything trains.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import json
import logging
import math
import os
import queue
import re
import struct
import threading
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import CacheDataset, DataLoader, Dataset, ThreadDataLoader, partition_dataset
from monai.data.utils import worker_init_fn as monai_worker_init_fn
from monai.transforms import (
    AsDiscreted,
    ClassesToIndicesd,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    FgBgToIndicesd,
    Invertd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    Randomizable,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    ToDeviced,
)

import demo_data
import image_io

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
    "inspect_cases",
    "check_input_channels",
    "resolve_dataset",
    "describe_validation",
    "image_files",
    "dataset_json_channels",
    "NormalizeChannelsd",
    "get_train_transforms",
    "get_val_transforms",
    "get_test_transforms",
    "get_post_transforms",
    "get_loaders",
    "get_test_loader",
    "case_name",
    "BatchAugment",
    "TrainLoader",
    "LoaderChoice",
    "choose_loader",
    "estimate_cache_bytes",
    "GPU_CACHE_SHARE",
]

SPLITS = ("train", "val", "test")
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
IMAGE_CHANNEL_SUFFIX = "_0000"
# nnU-Net channel files: "<case>_0000", "<case>_0001", ... (four digits).
_CHANNEL_RE = re.compile(r"^(.+)_(\d{4})$")
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
        name: preset name (or ``"custom"``, or ``"planned"`` for a plan made from the data), used
            in logs and run summaries.
        spacing: target voxel spacing in mm (x, y, z) after resampling, in RAS order.
        intensity: ``"window"`` (clip ``[a_min, a_max]`` and map it to [0, 1], for CT) or
            ``"zscore"`` (per-volume, per-channel mean/std over non-zero voxels, for MRI), applied
            to every channel. With ``normalization`` given it is derived from it: the scheme all
            channels share (``"window"``, ``"zscore"``, ``"ct"``) or ``"mixed"``.
        a_min: lower window bound (HU for CT); required for ``"window"``, ignored for ``"zscore"``.
        a_max: upper window bound; must be greater than ``a_min``.
        num_classes: number of label classes including background (label values 0..num_classes-1).
        class_names: one name per class, ``class_names[0] == "background"``.
        roi: training crop and sliding-window ROI in voxels (default 96^3, the paper's).
        cache_rate: default fraction of cases cached in memory when ``--cache_rate`` is not given.
        channel_names: one name per input channel, in file order (nnU-Net ``_0000``, ``_0001``,
            ...; the channels of a 4-D file); default one channel, ``["image"]``.
        normalization: ``None`` (every channel as ``intensity`` says) or one dict per channel:
            ``{"scheme": "ct", "lower": l, "upper": u, "mean": m, "std": s}`` (clip to the
            dataset's foreground percentiles, then ``(x - m) / s``, as nnU-Net normalises CT),
            ``{"scheme": "zscore"}`` (per volume, non-zero voxels) or
            ``{"scheme": "window", "a_min": a, "a_max": b}`` (clip and map to [0, 1]).

    The number of input channels is :attr:`in_channels`.
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
    channel_names: list[str] = field(default_factory=lambda: ["image"])
    normalization: list[dict] | None = None

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.roi = tuple(int(r) for r in self.roi)  # type: ignore[assignment]
        self.class_names = [str(c) for c in self.class_names]
        if isinstance(self.channel_names, str):
            self.channel_names = [c.strip() for c in self.channel_names.split(",") if c.strip()]
        self.channel_names = [str(c) for c in self.channel_names]
        if self.normalization is not None:
            self.normalization = [dict(n) if isinstance(n, dict) else n for n in self.normalization]
            schemes = {n.get("scheme") for n in self.normalization if isinstance(n, dict)}
            self.intensity = schemes.pop() if len(schemes) == 1 else "mixed"
            if self.intensity != "window":
                self.a_min = self.a_max = None
            elif self.normalization and isinstance(self.normalization[0], dict):
                self.a_min, self.a_max = self.normalization[0].get("a_min"), self.normalization[0].get("a_max")
        self.validate()

    @property
    def in_channels(self) -> int:
        """Number of input channels (network input channels)."""
        return len(self.channel_names)

    def channel_norms(self) -> list[dict]:
        """The normalisation of each channel, one dict per channel (see ``normalization``)."""
        if self.normalization is not None:
            return [dict(n) for n in self.normalization]
        if self.intensity == "window":
            return [{"scheme": "window", "a_min": self.a_min, "a_max": self.a_max} for _ in self.channel_names]
        return [{"scheme": "zscore"} for _ in self.channel_names]

    def validate(self) -> None:
        """Raise ``ValueError`` saying what to pass when a field is inconsistent."""
        errors = []
        if len(self.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing):
            errors.append(f"spacing must be 3 positive numbers in mm (e.g. --spacing 1.5 1.5 2.0), got {self.spacing}")
        if self.normalization is None and self.intensity not in ("window", "zscore"):
            errors.append(f"intensity must be 'window' (CT) or 'zscore' (MRI), got {self.intensity!r}")
        if not self.channel_names or len(set(self.channel_names)) != len(self.channel_names):
            errors.append(f"channel_names must be distinct names, one per input channel, got {self.channel_names}")
        if self.normalization is not None:
            errors += _normalization_errors(self.normalization, self.channel_names)
        elif self.intensity == "window":
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
        d["channel_names"] = list(self.channel_names)
        return d


_SCHEME_KEYS = {"window": ("a_min", "a_max"), "ct": ("lower", "upper", "mean", "std"), "zscore": ()}


def _normalization_errors(norms, channel_names: list[str]) -> list[str]:
    """What is wrong with a per-channel ``normalization`` list (empty when nothing is)."""
    if not isinstance(norms, (list, tuple)):
        return [f"normalization must be a list with one dict per channel, got {type(norms).__name__}"]
    errors = []
    if len(norms) != len(channel_names):
        errors.append(f"normalization has {len(norms)} entries but there are {len(channel_names)} channels {channel_names}: give one per channel")
    for i, n in enumerate(norms):
        where = f"normalization of channel {i} ({channel_names[i] if i < len(channel_names) else '?'})"
        if not isinstance(n, dict) or n.get("scheme") not in _SCHEME_KEYS:
            errors.append(f"{where}: expected {{'scheme': 'ct' | 'zscore' | 'window', ...}}, got {n!r}")
            continue
        missing = [k for k in _SCHEME_KEYS[n["scheme"]] if not isinstance(n.get(k), (int, float)) or not math.isfinite(n[k])]
        if missing:
            errors.append(f"{where}: scheme {n['scheme']!r} needs numbers for {missing}")
            continue
        if n["scheme"] == "window" and not n["a_min"] < n["a_max"]:
            errors.append(f"{where}: a_min ({n['a_min']}) must be below a_max ({n['a_max']})")
        if n["scheme"] == "ct" and not (n["lower"] < n["upper"] and n["std"] > 0):
            errors.append(f"{where}: needs lower < upper and std > 0, got {n}")
    return errors


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

_CONFIG_KEYS = ("spacing", "intensity", "a_min", "a_max", "num_classes", "class_names", "roi", "cache_rate", "channel_names", "normalization")


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


def get_dataset_config(name: str, config_file: str | None = None, *, base: DatasetConfig | None = None, **overrides) -> DatasetConfig:
    """Build the :class:`DatasetConfig` for a preset or a user's own dataset.

    Args:
        name: a key of :data:`PRESETS` or ``"custom"`` (which needs spacing, num_classes and, for
            ``intensity="window"``, a_min / a_max from ``config_file`` or ``overrides``); any name
            when ``base`` is given.
        config_file: optional JSON file with any of the keys ``spacing, intensity, a_min, a_max,
            num_classes, class_names, roi, cache_rate, channel_names, normalization``; it
            overrides the preset.
        base: start from this config instead of a preset (e.g. a plan's, :meth:`planning.Plan.dataset_config`).
            ``intensity`` / ``a_min`` / ``a_max`` given then replace the normalisation of its CT
            channels (of every channel when none is CT), e.g. a window instead of the planned
            percentiles; the other channels keep theirs.
        **overrides: the same keys (e.g. from CLI flags); ``None`` values are ignored. They win
            over the JSON file. ``class_names`` may be a list or a comma-separated string.

    Returns:
        The validated config. When ``num_classes`` is changed and no names are given, the names
        become ``background, class_1, ...``.

    Raises:
        ValueError: unknown preset, unreadable JSON, unknown keys or inconsistent values.
    """
    if base is None and name != "custom" and name not in PRESETS:
        raise ValueError(f"unknown --dataset {name!r}: pass one of {sorted(PRESETS)} or 'custom' (with --dataset_config or flags)")
    values: dict = {}
    if base is not None:
        values = {**base.to_dict(), "name": name}
    elif name in PRESETS:
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
    if base is not None and base.normalization is not None and "normalization" not in given and {"intensity", "a_min", "a_max"} & set(given):
        given["normalization"] = _override_norms(base, given)
    values.update(given)
    if name == "custom" and base is None:
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
    if values.get("normalization") is not None and len(values.get("channel_names") or []) != len(values["normalization"]) and "channel_names" not in given:
        values["channel_names"] = [f"channel_{i}" for i in range(len(values["normalization"]))]
    try:
        return DatasetConfig(**values)
    except TypeError as e:
        raise ValueError(f"dataset config: {e}") from None


def _override_norms(base: DatasetConfig, given: dict) -> list[dict]:
    """The base's per-channel normalisation with ``--intensity/--a_min/--a_max`` applied to its
    CT channels (every channel when none is CT)."""
    norms = base.channel_norms()
    targets = [i for i, n in enumerate(norms) if n["scheme"] == "ct"] or list(range(len(norms)))
    intensity = given.get("intensity") or ("window" if given.get("a_min") is not None or given.get("a_max") is not None else None)
    for i in targets:
        if intensity == "zscore":
            norms[i] = {"scheme": "zscore"}
        elif intensity == "window":
            # Validation names what is missing when a bound was not given.
            norms[i] = {"scheme": "window", "a_min": given.get("a_min"), "a_max": given.get("a_max")}
    return norms


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


def resolve_dataset(
    name: str | None,
    root: str | None = None,
    datalist: str | None = None,
    config_file: str | None = None,
    *,
    fold: int = 0,
    num_workers: int = 2,
    roi_multiple: int = 16,
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
        import planning  # planning imports this module

        roi = overrides.get("roi")
        plan = planning.plan_dataset(
            root, datalist=datalist, fold=fold, roi=tuple(roi) if roi is not None else (96, 96, 96),
            roi_multiple=roi_multiple, num_workers=num_workers,
        )
        return get_dataset_config("planned", config_file, base=plan.dataset_config(), **overrides), plan
    if name == "custom" and root and config_file is None:
        if overrides.get("num_classes") is None and overrides.get("class_names") is None:
            labels = _dataset_json_labels(os.path.join(root, "dataset.json"))
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


def thread_map(fn, items: Sequence, num_workers: int | None) -> list:
    """``[fn(x) for x in items]`` on up to ``num_workers`` threads (at most 8): file reading releases the GIL."""
    workers = max(1, min(int(num_workers or 1), len(items), 8))
    if workers == 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(fn, items))


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
    return image_io.strip_ext(filename)


def _image_paths(image) -> list[str]:
    """The file(s) of a case's ``"image"``: one path, or one per channel."""
    return [str(p) for p in image] if isinstance(image, (list, tuple)) else [str(image)]


def case_name(path, role: str = "image") -> str:
    """Case name of an image or label file: the file name without extension and without the
    nnU-Net channel suffix ``_0000`` (images) or a ``_seg``/``_label``/... suffix (labels).

    Args:
        path: file path (a DICOM series folder: its name), or a case's list of channel files
            (named after the first).
        role: ``"image"`` or ``"label"``.
    """
    if isinstance(path, (list, tuple)):
        path = path[0]
    base = os.path.basename(os.path.normpath(str(path)))
    stem = _strip_ext(base) or base
    suffixes = (IMAGE_CHANNEL_SUFFIX,) if role == "image" else LABEL_SUFFIXES
    for s in suffixes:
        if stem.endswith(s) and len(stem) > len(s):
            return stem[: -len(s)]
    return stem


def image_files(folder: str, series: bool = True) -> list[str]:
    """Sorted image files of a folder (every format of :data:`image_io.IMAGE_EXTENSIONS`), the
    rule every listing here uses; with ``series``, DICOM series sub-folders too.

    Hidden files are skipped: MSD archives ship macOS "._case.nii.gz" resource forks. The data
    files of detached headers (``.raw``, ``.zraw`` beside ``.mhd``/``.nhdr``) are not images.
    """
    out = []
    for f in os.listdir(folder):
        p = os.path.join(folder, f)
        if f.startswith("."):
            continue
        if (_strip_ext(f) is not None and os.path.isfile(p)) or (series and image_io.is_dicom_dir(p)):
            out.append(p)
    return sorted(out)


def nifti_files(folder: str) -> list[str]:
    """Image files of a folder (all readable formats, despite the older name): :func:`image_files` without DICOM folders."""
    return image_files(folder, series=False)


_nifti_files = nifti_files  # older name, used by test_seg.py


def _ending(path: str) -> str:
    return image_io.image_ext(path) or ".nii.gz"


def _group_channels(images: list[str], problems: list[str], channel_names: list[str] | None = None, skipped: set[str] | None = None) -> list[tuple[str, str | list[str]]]:
    """Group image files into cases: ``[(case name, path or [path per channel])]``.

    nnU-Net names channels ``case_0000``, ``case_0001``, ...; that naming is taken to be in use
    when ``channel_names`` (from dataset.json) lists several channels, or when some case has a
    ``_0000`` file and more. Otherwise every file is a case of its own (a ``_0000`` suffix is
    still dropped from the name), so cases named e.g. ``patient_2019`` keep their name. A case
    lacking one of the channels is reported in ``problems`` and left out.
    """
    parsed = []
    for p in images:
        base = os.path.basename(os.path.normpath(p))
        stem = _strip_ext(base) or base
        m = _CHANNEL_RE.match(stem)
        parsed.append((p, stem, m.group(1) if m else None, int(m.group(2)) if m else None))
    groups: dict[str, dict[int, str]] = {}
    for p, _, prefix, idx in parsed:
        if prefix is not None:
            groups.setdefault(prefix, {}).setdefault(idx, p)
    declared = len(channel_names) if channel_names else None
    channel_naming = (declared or 0) > 1 or any(0 in g and len(g) > 1 for g in groups.values())
    if not channel_naming:
        return [(case_name(p, "image"), p) for p, *_ in parsed]
    n = declared or max(max(g) + 1 for g in groups.values())
    names = channel_names or [f"channel_{i}" for i in range(n)]
    out: list[tuple[str, str | list[str]]] = [(stem, p) for p, stem, prefix, _ in parsed if prefix is None]
    for prefix, g in groups.items():
        first = g[min(g)]
        extra = sorted(i for i in g if i >= n)
        for i in extra:
            problems.append(f"{g[i]}: channel {i:04d} but the dataset has {n} channel(s) ({', '.join(names)}). Fix: remove the file, or list the channel in dataset.json's channel_names")
        missing = [i for i in range(n) if i not in g]
        for i in missing:
            expected = os.path.join(os.path.dirname(first), f"{prefix}_{i:04d}{_ending(first)}")
            problems.append(f"{expected}: case {prefix!r} lacks channel {i:04d} ({names[i] if i < len(names) else '?'}); its other channel files are there. Fix: add the file, or move the case's files out")
        if missing or extra:
            if skipped is not None:
                skipped.add(prefix)
            continue
        out.append((prefix, g[0] if n == 1 else [g[i] for i in range(n)]))
    return sorted(out, key=lambda t: t[0])


def _pair_folder(image_dir: str, label_dir: str | None, problems: list[str], labels_required: bool, channel_names: list[str] | None = None) -> list[dict]:
    """Pair the images (grouped by channel) and labels of two folders by case name; collect
    missing channels and unpaired files in ``problems``."""
    images = image_files(image_dir)
    if not images:
        problems.append(f"{image_dir}: no image files found ({', '.join(image_io.IMAGE_EXTENSIONS)} or DICOM series folders). Fix: put the images there (hidden files are ignored)")
        return []
    skipped: set[str] = set()
    grouped = _group_channels(images, problems, channel_names, skipped)
    by_label: dict[str, str] = {}
    label_paths: list[str] = []
    if label_dir is not None and os.path.isdir(label_dir):
        label_paths = image_files(label_dir, series=False)
        # Exact stems first so that a case literally named "x_seg" still pairs with "x_seg".
        for p in label_paths:
            by_label.setdefault(case_name(p, "label"), p)
        for p in label_paths:
            by_label[_strip_ext(os.path.basename(p)) or p] = p
    cases, used, seen = [], set(), {}
    for name, image in grouped:
        first = _image_paths(image)[0]
        stem = _strip_ext(os.path.basename(os.path.normpath(first))) or first
        if name in seen:
            problems.append(f"{first}: same case name {name!r} as {seen[name]}. Fix: keep one file per case (e.g. not both .nii and .nii.gz)")
            continue
        seen[name] = first
        lab = by_label.get(name) if isinstance(image, list) else (by_label.get(stem) or by_label.get(name))
        case = {"image": image}
        if lab is not None:
            case["label"] = lab
            used.add(lab)
        elif labels_required:
            problems.append(f"{first}: image without a label (expected {os.path.join(label_dir or '?', name + _ending(first))}). Fix: add the label file with the same case name, or move the image out")
        cases.append(case)
    if labels_required:
        for lab in label_paths:
            # The label of a case left out for a missing channel is not "without an image".
            if lab not in used and case_name(lab, "label") not in skipped:
                problems.append(f"{lab}: label without an image (expected {os.path.join(image_dir, case_name(lab, 'label') + _ending(lab))}). Fix: add the image with the same case name, or move the label out")
    return cases


def _fold_of(index: int, item: dict) -> int:
    f = item.get("fold")
    return int(f) if f is not None else index % N_AUTO_FOLDS


def _split_folds(items: list[dict], fold: int, source: str, problems: list[str], info: dict | None = None) -> tuple[list[dict], list[dict]]:
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
    if info is not None:
        info["pooled"] = True
        if has_folds:
            info["validation"] = f"fold {fold} of the 'fold' keys in {source}: {len(val)} of {len(ordered)} cases"
        else:
            info["validation"] = (
                f"fold {fold} of {N_AUTO_FOLDS} by sorted case name (cases {fold + 1}, {fold + 1 + N_AUTO_FOLDS}, ... of the sorted list, "
                f"{len(val)} of {len(ordered)}), as {source} gives no validation set"
            )
    if not has_folds:
        logger.info("%s has no validation list: fold %d of %d folds by case name validates (%d cases)", source, fold, N_AUTO_FOLDS, len(val))
    return train, val


def _channel_files(path: str, n: int | None) -> list[str] | None:
    """``case_0000.ext``, ``case_0001.ext``, ... beside ``path`` (``case.ext`` or ``case_0000.ext``): the
    first ``n``, or all consecutive ones when ``n`` is None; None when there is no ``_0000`` file."""
    stem = _strip_ext(path)
    if stem is None:
        return None
    ext = path[len(stem):]
    m = _CHANNEL_RE.match(os.path.basename(stem))
    if m and int(m.group(2)) == 0:
        stem = os.path.join(os.path.dirname(stem), m.group(1))
    if not os.path.exists(f"{stem}{IMAGE_CHANNEL_SUFFIX}{ext}"):
        return None
    files, i = [], 0
    while (n is None or i < n) and os.path.exists(f"{stem}_{i:04d}{ext}"):
        files.append(f"{stem}_{i:04d}{ext}")
        i += 1
    if n is not None and len(files) < n:
        files += [f"{stem}_{j:04d}{ext}" for j in range(len(files), n)]  # reported as missing by the checks
    return files


def _resolve(path: str, base: str, channels: int | None = None) -> str | list[str]:
    p = path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))
    if not os.path.exists(p):
        # nnU-Net v1 lists "imagesTr/case.nii.gz" while the files on disk are "case_0000.nii.gz", "case_0001.nii.gz", ...
        files = _channel_files(p, channels)
        if files:
            return files[0] if len(files) == 1 else files
    return p


def _json_items(entries, base: str, source: str, key: str, problems: list[str], labels_required: bool, channels: int | None = None) -> list[dict]:
    items = []
    if not isinstance(entries, list):
        problems.append(f"{source}: '{key}' must be a list of {{'image': ..., 'label': ...}} entries")
        return items
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"image": e}
        if not isinstance(e, dict) or "image" not in e or not e["image"]:
            problems.append(f"{source}: entry {i} of '{key}' has no 'image'. Fix: give each entry an 'image' path")
            continue
        if isinstance(e["image"], list):
            paths = [_resolve(str(p), base) for p in e["image"]]
            image = paths[0] if len(paths) == 1 else paths
        else:
            image = _resolve(str(e["image"]), base, channels)
        item = {"image": image}
        if e.get("label") is not None:
            item["label"] = _resolve(str(e["label"]), base)
        elif labels_required:
            problems.append(f"{_image_paths(image)[0]}: entry {i} of '{key}' in {source} has no 'label'. Fix: add the label path")
            continue
        if "fold" in e:
            item["fold"] = e["fold"]
        items.append(item)
    return items


def _read_dataset_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _dataset_json_classes(path: str) -> tuple[dict[int, str] | None, str | None]:
    """``({value: name}, None)`` from a dataset.json's ``labels``, ``(None, problem)`` when they
    cannot be used, ``(None, None)`` when there are none."""
    data = _read_dataset_json(path)
    labels = data.get("labels") if data else None
    if not isinstance(labels, dict) or not labels:
        return None, None
    try:
        # MSD maps value -> name; nnU-Net v2 maps name -> value.
        pairs = {int(k): str(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        if any(isinstance(v, (list, tuple)) for v in labels.values()):
            return None, f"{path}: region-based labels ({labels}) are not supported. Fix: give each class one label value"
        try:
            pairs = {int(v): str(k) for k, v in labels.items()}
        except (TypeError, ValueError):
            return None, f"{path}: 'labels' {labels} are neither value -> name (MSD) nor name -> value (nnU-Net v2). Fix: write them as one of those"
    if sorted(pairs) != list(range(len(pairs))):
        return None, f"{path}: label values {sorted(pairs)} are not 0..{len(pairs) - 1}. Fix: number the classes 0, 1, 2, ... (0 background) in dataset.json and in the label files"
    return pairs, None


def _dataset_json_labels(path: str) -> list[str] | None:
    """Class names from a dataset.json ``labels`` map (MSD or nnU-Net v2), or None."""
    pairs, _ = _dataset_json_classes(path)
    return [pairs[i] for i in range(len(pairs))] if pairs else None


def dataset_json_channels(path: str) -> list[str] | None:
    """Channel names from a dataset.json: nnU-Net v2 ``channel_names`` or MSD ``modality``
    (``{"0": "T2", "1": "ADC"}``), in channel order; None when it names none."""
    data = _read_dataset_json(path)
    if not data:
        return None
    names = data.get("channel_names", data.get("modality"))
    if not isinstance(names, dict) or not names:
        return None
    try:
        pairs = {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError):
        return None
    return [pairs[i] for i in sorted(pairs)]


def _list_cases(root: str | None, split: str, datalist: str | None, fold: int, info: dict | None = None) -> tuple[list[dict], list[str], str]:
    """Cases of one split, the problems found on the way and a description of the source.

    ``info``, when given, receives ``"validation"`` (how the validation cases are chosen, one
    line) and ``"pooled"`` (True when they are a fold of the training list).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    info = info if info is not None else {}
    info.setdefault("pooled", False)
    problems: list[str] = []
    channel_names = None
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
            problems.append(f"{source}: not valid JSON ({e}). Fix: repair the file or remove it")
            data = None
        if isinstance(data, dict):
            channel_names = dataset_json_channels(source)
        if datalist is None and not (isinstance(data, dict) and "training" in data):
            data = None  # an nnU-Net v2 dataset.json lists no files: use the folders
    n_channels = len(channel_names) if channel_names else None
    if isinstance(data, dict):
        if "training" not in data and split != "test":
            return [], [f"{source}: no 'training' list. Fix: list the cases under 'training' (each {{'image', 'label'}})"], source
        if split == "test":
            key = next((k for k in ("testing", "test") if k in data), None)
            if key is None:
                if "validation" in data:
                    key = "validation"
                else:
                    tr = _json_items(data.get("training", []), base, source, "training", problems, True, n_channels)
                    _, val = _split_folds(tr, fold, source, problems, info)
                    return val, problems, source
            return _json_items(data[key], base, source, key, problems, False, n_channels), problems, source
        training = _json_items(data["training"], base, source, "training", problems, True, n_channels)
        if "validation" in data and not any("fold" in it for it in training):
            val = _json_items(data["validation"], base, source, "validation", problems, True, n_channels)
            train = [{k: v for k, v in it.items() if k != "fold"} for it in training]
            info["validation"] = f"the 'validation' list of {source}: {len(val)} cases"
        else:
            train, val = _split_folds(training, fold, source, problems, info)
        return (train if split == "train" else val), problems, source
    # Folder layout (also nnU-Net v2, whose dataset.json names the channels but lists no files).
    source = root
    dirs = {d: os.path.join(root, d) for d in ("imagesTr", "labelsTr", "imagesVal", "labelsVal", "imagesTs", "labelsTs")}
    have = {d: os.path.isdir(p) for d, p in dirs.items()}
    if split == "test":
        for img_d, lab_d in (("imagesTs", "labelsTs"), ("imagesVal", "labelsVal")):
            if have[img_d]:
                return _pair_folder(dirs[img_d], dirs[lab_d] if have[lab_d] else None, problems, False, channel_names), problems, dirs[img_d]
        problems.append(f"{root}: no imagesTs or imagesVal folder, nor a dataset.json. Fix: put the images to predict in {dirs['imagesTs']}")
        return [], problems, source
    for d in ("imagesTr", "labelsTr"):
        if not have[d]:
            problems.append(f"{dirs[d]}: folder missing. Fix: create it with the training {'images' if d.startswith('images') else 'labels'}, or give --datalist / a dataset.json")
    if have["imagesVal"] != have["labelsVal"]:
        missing = "labelsVal" if have["imagesVal"] else "imagesVal"
        problems.append(f"{dirs[missing]}: folder missing while {'imagesVal' if missing == 'labelsVal' else 'labelsVal'} exists. Fix: create it, or remove both to validate on a fold of imagesTr")
    if split == "val" and have["imagesVal"] and have["labelsVal"]:
        val = _pair_folder(dirs["imagesVal"], dirs["labelsVal"], problems, True, channel_names)
        info["validation"] = f"the cases of {dirs['imagesVal']}: {len(val)}"
        return val, problems, dirs["imagesVal"]
    if not (have["imagesTr"] and have["labelsTr"]):
        return [], problems, source
    train = _pair_folder(dirs["imagesTr"], dirs["labelsTr"], problems, True, channel_names)
    if have["imagesVal"] or have["labelsVal"]:
        info["validation"] = f"the cases of {dirs['imagesVal']}"
        return (train if split == "train" else []), problems, dirs["imagesTr"]
    tr, val = _split_folds(train, fold, dirs["imagesTr"], problems, info)
    return (tr if split == "train" else val), problems, dirs["imagesTr"]


def list_cases(root: str | None, split: str, datalist: str | None = None, fold: int = 0) -> list[dict]:
    """List the cases of one split, images paired with labels by case name.

    Args:
        root: dataset folder (folder layout, MSD / nnU-Net v1 ``dataset.json`` with a ``training``
            list, or nnU-Net v2 raw dataset); base of relative paths in ``datalist``. May be
            ``None`` when ``datalist`` is given.
        split: ``"train"``, ``"val"`` or ``"test"`` (test: ``imagesTs``, else ``imagesVal``;
            a label is included when one with the same case name exists).
        datalist: optional MONAI datalist JSON, which takes precedence over ``root``'s layout.
        fold: validation fold for datalists with ``fold`` keys, or for the automatic 5-fold
            split used when no validation cases are listed.

    Returns:
        ``[{"image": path, "label": path}, ...]`` (no ``"label"`` for unlabeled test images);
        ``"image"`` is a list of paths, one per channel, for nnU-Net multi-channel cases
        (``case_0000``, ``case_0001``, ...); a 4-D file holds its channels itself.

    Raises:
        DataError: listing every missing folder or file, every case lacking a channel and
            every unpaired image or label.
    """
    cases, problems, _ = _list_cases(root, split, datalist, fold)
    if problems:
        raise DataError(problems)
    return cases


def describe_validation(root: str | None, datalist: str | None = None, fold: int = 0) -> str:
    """How the validation cases are chosen, in one line (for the start line and ``splits.json``).

    E.g. ``"fold 0 of 5 by sorted case name (cases 1, 6, ... of the sorted list, 2 of 10), as
    DIR/imagesTr gives no validation set"`` or ``"the cases of DIR/imagesVal: 4"``.
    """
    info: dict = {}
    cases, problems, source = _list_cases(root, "val", datalist, fold, info)
    return info.get("validation") or f"{len(cases)} validation cases from {source}" + (f" ({len(problems)} problems)" if problems else "")


def _training_pool(root: str | None, datalist: str | None, fold: int = 0) -> tuple[list[dict], list[str]]:
    """Every labelled training case (the validation fold too when validation is a fold of the
    training list, so that a plan does not depend on ``--fold``), and the listing problems."""
    info: dict = {}
    train, problems, _ = _list_cases(root, "train", datalist, fold, info)
    val, val_problems, _ = _list_cases(root, "val", datalist, fold, {})
    problems += [p for p in val_problems if p not in problems]
    return (train + val if info.get("pooled") else train), problems


def list_images(path: str, channels: int | None = None) -> list[dict]:
    """Inputs for inference from one image file, a DICOM series folder or a folder of images:
    ``[{"image": path or [path per channel]}]``.

    Multi-channel cases named the nnU-Net way are grouped: a folder's ``x_0000``, ``x_0001`` form
    one case, and a single ``x_0000`` file brings its sibling channel files along.

    Args:
        path: file or folder.
        channels: the model's input channels, when known (a missing channel file is then named).

    Raises:
        DataError: when the path does not exist, holds no image or a case lacks a channel.
    """
    problems: list[str] = []
    if os.path.isfile(path):
        if _strip_ext(os.path.basename(path)) is None:
            raise DataError([f"{path}: not an image file ({', '.join(image_io.IMAGE_EXTENSIONS)}). Fix: convert it, or pass a DICOM series folder"])
        m = _CHANNEL_RE.match(_strip_ext(os.path.basename(path)) or "")
        files = _channel_files(path, channels) if m and int(m.group(2)) == 0 and channels != 1 else None
        if files and len(files) > 1:
            return [{"image": files}]
        return [{"image": path}]
    if image_io.is_dicom_dir(path):
        return [{"image": path}]
    if os.path.isdir(path):
        files = image_files(path)
        if files:
            names = [f"channel_{i}" for i in range(channels)] if channels and channels > 1 else None
            cases = [{"image": image} for _, image in _group_channels(files, problems, names)]
            if problems:
                raise DataError(problems)
            return cases
        raise DataError([f"{path}: no image files found ({', '.join(image_io.IMAGE_EXTENSIONS)} or DICOM series folders). Fix: pass a folder of images"])
    raise DataError([f"{path}: not found. Fix: pass an existing image file or folder"])


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
    """``(handle, shape, affine)`` of an image or label file, or None with the problem recorded.

    ``shape`` includes a trailing channel axis for 4-D files (NIfTI as stored; other formats
    as their channel count); ``affine`` is RAS+ mm in every format; ``handle`` is the nibabel
    image for NIfTI (read lazily), None for the other formats.
    """
    if image_io.image_ext(path) not in NIFTI_EXTENSIONS:
        if not os.path.exists(path):
            problems.append(f"{path}: {role} file not found. Fix: check the path (or the datalist entry)")
            return None
        need = image_io.missing_library(path)
        if need:
            problems.append(f"{path}: {need}")
            return None
        try:
            h = image_io.read_header(path)
        except Exception as e:  # each library raises its own types for broken files
            problems.append(f"{path}: unreadable or corrupt {role} ({type(e).__name__}: {e}). Fix: re-export or re-download the file")
            return None
        shape = tuple(h.shape) + ((h.channels,) if h.channels > 1 or h.ndim > len(h.shape) else ())
        return None, shape, h.affine
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


def _voxels(path: str, handle) -> np.ndarray:
    if handle is not None:
        return np.asanyarray(handle.dataobj)
    data = image_io.read_array(path)
    return data[..., 0] if data.ndim == 4 and data.shape[3] == 1 else data


def _same_grid(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a[:3], b[:3], rtol=1e-5, atol=AFFINE_ATOL_MM))


def _channels_text(names: Sequence[str] | None, n: int) -> str:
    return f"{n} channel{'s' if n != 1 else ''}" + (f" ({', '.join(names)})" if names else "")


def _check_case(case: dict, num_classes: int | None, check_labels: bool, in_channels: int | None = None, channel_names: Sequence[str] | None = None) -> tuple[list[str], dict | None]:
    """Problems of one case and, when its image is usable, ``{"shape", "spacing", "channels",
    "label_values"}`` (label values None when not read). ``num_classes`` None: values not checked."""
    problems: list[str] = []
    info = None
    files = _image_paths(case["image"])
    heads = [_load_header(f, "image", problems) for f in files]
    spatial = [_spatial_shape(h[1], f, "image", problems, channels_ok=True) if h else None for f, h in zip(files, heads)]
    ishape = spatial[0]
    affine = heads[0][2] if heads[0] is not None else None
    total = sum((h[1][3] if len(h[1]) == 4 else 1) for h in heads if h is not None)
    for i, (f, h, shp) in enumerate(zip(files[1:], heads[1:], spatial[1:]), start=1):
        if h is None or shp is None or ishape is None:
            continue
        name = f" ({channel_names[i]})" if channel_names and i < len(channel_names) else ""
        if shp != ishape:
            problems.append(f"{f}: channel {i}{name} has shape {shp}, channel 0 ({files[0]}) {ishape}. Fix: every channel of a case must be on the same voxel grid; resample it to channel 0")
        elif not _same_grid(affine, h[2]):
            diff = float(np.abs(affine[:3] - h[2][:3]).max())
            problems.append(f"{f}: channel {i}{name} geometry (affine) differs from channel 0's ({files[0]}) by up to {diff:.4g} mm. Fix: resample it onto channel 0 (or re-save it with channel 0's header if the voxels do correspond)")
    complete = all(h is not None for h in heads)
    if complete and in_channels is not None and total != in_channels and all(s is not None for s in spatial):
        want = _channels_text(channel_names, in_channels)
        if len(files) == 1 and len(heads[0][1]) == 4:
            problems.append(f"{files[0]}: image is 4-D with {total} channels {heads[0][1]} but the dataset takes {want}. Fix: pass images with those channels, or a --dataset / plan with {total}")
        else:
            lacking = f"; missing: {', '.join(channel_names[total:])}" if channel_names and total < len(channel_names) else ""
            problems.append(f"{files[0]}: case {case_name(files, 'image')!r} has {total} channel{'s' if total != 1 else ''} ({len(files)} file{'s' if len(files) != 1 else ''}) but the dataset takes {want}{lacking}. Fix: give every case the same channels (nnU-Net naming case_0000, case_0001, ...)")
    if affine is not None:
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        if not np.all(np.isfinite(affine)) or np.any(zooms <= 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            problems.append(f"{files[0]}: degenerate affine (voxel sizes {zooms.round(4).tolist()}). Fix: repair the header's qform/sform")
        elif ishape is not None:
            info = {"shape": tuple(ishape), "spacing": tuple(float(z) for z in zooms), "channels": total, "label_values": None}
    if "label" not in case:
        return problems, info
    label = _load_header(case["label"], "label", problems)
    lshape = _spatial_shape(label[1], case["label"], "label", problems) if label else None
    if heads[0] is not None and label is not None and ishape is not None and lshape is not None:
        if ishape != lshape:
            problems.append(f"{case['label']}: label shape {lshape} differs from image shape {ishape} ({files[0]}). Fix: the label must be drawn on the image's voxel grid; resample it to the image")
        elif not _same_grid(affine, label[2]):
            diff = float(np.abs(affine[:3] - label[2][:3]).max())
            problems.append(
                f"{case['label']}: label affine differs from the image's ({files[0]}) by up to {diff:.4g} mm. "
                "Fix: if the voxels do correspond, re-save the label with the image's header (nibabel.Nifti1Image(label_data, image.affine)); otherwise resample the label onto the image"
            )
    if check_labels and label is not None and lshape is not None:
        top = f"0..{num_classes - 1}" if num_classes else "0, 1, 2, ..."
        try:
            data = _voxels(case["label"], label[0])
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
        bad = values[(values < 0) | (values > num_classes - 1)] if num_classes else values[values < 0]
        if bad.size:
            shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
            if num_classes:
                problems.append(
                    f"{case['label']}: label values {shown} are outside 0..{num_classes - 1} (num_classes={num_classes}). "
                    "Fix: pass the right --dataset / --num_classes, or remap the label values"
                )
            else:
                problems.append(f"{case['label']}: negative label values {shown}. Fix: store class values 0, 1, 2, ... (0 background)")
    return problems, info


def inspect_cases(
    cases: list[dict],
    num_classes: int | None = None,
    in_channels: int | None = None,
    channel_names: Sequence[str] | None = None,
    check_labels: bool = True,
    num_workers: int = 2,
) -> tuple[list[str], list[dict | None]]:
    """Read every case's headers (and label voxels): the problems, and per case its geometry.

    Args:
        cases: ``[{"image": path or [paths], "label": path (optional)}, ...]``.
        num_classes: label values must lie in ``0..num_classes - 1``; None: only collected.
        in_channels: channels each case must have (files x channels per file); None: any.
        channel_names: names of the channels, for the messages.
        check_labels: read label voxels (values; the slow part on large data).
        num_workers: threads reading files in parallel.

    Returns:
        ``(problems, infos)``: one line per problem; per case ``{"shape", "spacing", "channels",
        "label_values"}`` or None when its image is unusable.
    """
    results = thread_map(lambda c: _check_case(c, num_classes, check_labels, in_channels, channel_names), cases, num_workers)
    return [p for probs, _ in results for p in probs], [info for _, info in results]


def _note_small_volumes(cases: list[dict], infos: list[dict | None], cfg: DatasetConfig, roi: Sequence[int]) -> None:
    small = 0
    for case, info in zip(cases, infos):
        if info is not None:
            resampled = [s * z / t for s, z, t in zip(info["shape"], info["spacing"], cfg.spacing)]
            if any(r < c for r, c in zip(resampled, roi)):
                small += 1
                logger.info("%s: about %s voxels after resampling, smaller than the crop %s: it will be zero-padded", _image_paths(case["image"])[0], [round(r) for r in resampled], roi)
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
        files = _image_paths(c["image"] if isinstance(c, dict) else c)
        counts = []
        for f in files:
            h = _load_header(f, "image", problems)
            counts.append(None if h is None else (h[1][3] if len(h[1]) == 4 else 1))
        if None in counts:
            continue
        total = sum(counts)
        if total == len(names):
            continue
        if total < len(names):
            first = files[0]
            stem = _strip_ext(os.path.basename(first)) or os.path.basename(first)
            m = _CHANNEL_RE.match(stem)
            lacking = []
            for i in range(total, len(names)):
                where = f" (expected {os.path.join(os.path.dirname(first), f'{m.group(1)}_{i:04d}{_ending(first)}')})" if m else ""
                lacking.append(f"channel {i} '{names[i]}'{where}")
            problems.append(f"{first}: has {_channels_text(None, total)} but the model was trained with {_channels_text(names, len(names))}; missing {', '.join(lacking)}. Fix: give every channel (nnU-Net naming: case_0000, case_0001, ...; or one 4-D file)")
        else:
            problems.append(f"{files[0]}: has {_channels_text(None, total)} ({len(files)} file(s)) but the model was trained with {_channels_text(names, len(names))}. Fix: pass only those channels, in that order")
    return problems


def _dataset_json_problems(root: str | None, cfg: DatasetConfig | None, infos: list[dict | None], n_train: int | None) -> list[str]:
    """What a root's dataset.json says that the config or the files contradict: class count,
    label values found in the label files but not declared, channel count, numTraining."""
    if not root:
        return []
    path = os.path.join(root, "dataset.json")
    data = _read_dataset_json(path)
    if data is None:
        return []
    problems = []
    pairs, problem = _dataset_json_classes(path)
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
) -> dict[str, list[dict]]:
    """List and verify several splits, reporting every problem of all of them in one DataError.

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
        cases, probs, source = _list_cases(root, split, datalist, fold, info)
        pooled[split] = info.get("pooled")
        problems.extend(p for p in probs if p not in problems)
        if not cases and not probs:
            hint = "imagesVal/labelsVal" if split == "val" else ("imagesTs" if split == "test" else "imagesTr/labelsTr")
            problems.append(f"{source}: no {split} cases found. Fix: add cases ({hint}) or check --datalist / --fold")
        out[split] = cases
    all_cases = [c for split in splits for c in out[split]]
    infos: list[dict | None] = []
    if all_cases:
        probs, infos = inspect_cases(all_cases, cfg.num_classes, cfg.in_channels, cfg.channel_names, check_labels, num_workers)
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
        problems.extend(p for p in _dataset_json_problems(root, cfg, labelled_infos, n_train) if p not in problems)
    if problems:
        raise DataError(problems)
    return out


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


class NormalizeChannelsd(MapTransform):
    """Per-channel intensity normalisation, one scheme per channel (see ``DatasetConfig.normalization``).

    ``window``: clip to ``[a_min, a_max]`` and map to [0, 1]; ``ct``: clip to ``[lower, upper]``
    then ``(x - mean) / std`` with the dataset's foreground statistics (nnU-Net's CT scheme);
    ``zscore``: this volume's mean/std over its non-zero voxels.

    Args:
        keys: keys of channel-first images.
        norms: one dict per channel.
    """

    def __init__(self, keys, norms: Sequence[dict]) -> None:
        super().__init__(keys)
        self.norms = [dict(n) for n in norms]

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(self.norms):
                raise ValueError(f"{key} has {img.shape[0]} channels but the normalisation {len(self.norms)}; the dataset config and the inputs disagree")
            out = img.float().clone() if not img.is_floating_point() else img.clone()
            for c, n in enumerate(self.norms):
                x = out[c]
                if n["scheme"] == "window":
                    out[c] = (x.clamp(n["a_min"], n["a_max"]) - n["a_min"]) / (n["a_max"] - n["a_min"])
                elif n["scheme"] == "ct":
                    out[c] = (x.clamp(n["lower"], n["upper"]) - n["mean"]) / max(n["std"], 1e-8)
                else:
                    mask = x != 0
                    if bool(mask.any()):
                        v = x[mask]
                        std = float(v.std()) if v.numel() > 1 else 0.0
                        x[mask] = (v - v.mean()) / (std if std > 0 else 1.0)
                        out[c] = x
            d[key] = out
        return d


class _AboveThresholds:
    """Foreground for the crop, per channel: raw value above that channel's threshold (picklable for loader workers)."""

    def __init__(self, thresholds: Sequence[float]) -> None:
        self.thresholds = [float(t) for t in thresholds]

    def __call__(self, img):
        t = torch.as_tensor(self.thresholds, dtype=img.dtype if torch.is_tensor(img) and img.is_floating_point() else torch.float32)
        if not torch.is_tensor(img):
            return np.asarray(img) > np.asarray(self.thresholds).reshape((-1,) + (1,) * (np.ndim(img) - 1))
        return img > t.to(img.device).reshape((-1,) + (1,) * (img.ndim - 1))


# Air is about -1000 HU, the body above about -200: the crop keeps the bounding box of what is
# above this, unless the CT channel's own lower bound is lower (e.g. lung or airway targets).
_CT_BODY_HU = -500.0


def _crop_thresholds(cfg: DatasetConfig) -> list[float]:
    out = []
    for n in cfg.channel_norms():
        if n["scheme"] == "window":
            out.append(n["a_min"])
        elif n["scheme"] == "ct":
            out.append(min(n["lower"], _CT_BODY_HU))
        else:
            out.append(0.0)  # MRI-like: the background is 0
    return out


def _intensity(cfg: DatasetConfig) -> list:
    if cfg.normalization is not None:
        return [NormalizeChannelsd(keys="image", norms=cfg.normalization)]
    if cfg.intensity == "window":
        return [ScaleIntensityRanged(keys="image", a_min=cfg.a_min, a_max=cfg.a_max, b_min=0.0, b_max=1.0, clip=True)]
    return [NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)]


def _preprocess(cfg: DatasetConfig, keys: list[str], modes: list[str]) -> list:
    """Load (every format of :mod:`image_io`; a case's channel files are stacked, a 4-D file's
    last axis is its channels), channel first, resample, orient RAS, intensity, crop to the foreground."""
    chain = [
        image_io.load_image_transform(keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Spacingd(keys=keys, pixdim=cfg.spacing, mode=modes),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if cfg.normalization is not None:
        # Per-channel schemes: crop on the raw values first, each channel against its own
        # threshold (a CT channel's z-scored air is not 0), then normalise.
        crop = CropForegroundd(keys=keys, source_key="image", select_fn=_AboveThresholds(_crop_thresholds(cfg)), allow_smaller=True)
        return chain + [crop] + _intensity(cfg)
    crop = CropForegroundd(keys=keys, source_key="image", allow_smaller=True)
    if cfg.intensity == "window":
        # After windowing, air is exactly 0, so "> 0" is the body.
        return chain + _intensity(cfg) + [crop]
    # z-scored volumes are negative inside the body; crop on the raw (non-negative) MRI first.
    return chain + [crop] + _intensity(cfg)


# The paper's augmentation of training crops (3D UX-Net / Rep3D release): rotation about the third
# axis up to pi/30, scaling by up to 10% per axis, intensity shift up to 0.1 with probability 0.5.
ROTATE_RANGE = (0.0, 0.0, np.pi / 30)
SCALE_RANGE = (0.1, 0.1, 0.1)
SHIFT_OFFSET = 0.1
SHIFT_PROB = 0.5


def _rotation(angles: np.ndarray) -> np.ndarray:
    """(n, 3, 3) rotations composed as MONAI's ``create_rotate`` does: about axis 0, then 1, then 2."""
    n = angles.shape[0]
    out = np.broadcast_to(np.eye(3), (n, 3, 3)).copy()
    for axis, (i, j, sign) in enumerate(((1, 2, 1.0), (0, 2, -1.0), (0, 1, 1.0))):
        a = angles[:, axis]
        if not np.any(a):
            continue
        r = np.broadcast_to(np.eye(3), (n, 3, 3)).copy()
        c, s = np.cos(a), np.sin(a)
        r[:, i, i], r[:, j, j] = c, c
        r[:, i, j], r[:, j, i] = -sign * s, sign * s
        out = out @ r
    return out


class BatchAugment(Randomizable):
    """The training crops' augmentation, for a whole batch in one call, random per crop.

    Per crop, independently: a rotation (uniform in ``+-rotate_range[i]`` about axis ``i``) and a
    scaling (``1 + uniform(+-scale_range[i])`` along axis ``i``) about the crop's centre, resampled
    onto the same grid with reflection padding (image bilinear, label nearest), and with probability
    ``shift_prob`` an intensity shift ``uniform(+-shift)``. This is the distribution of MONAI's
    ``RandShiftIntensityd(shift, prob=shift_prob)`` followed by ``RandAffined(prob=1,
    rotate_range, scale_range)`` applied crop by crop (the defaults are the paper's), with the same
    geometry as MONAI's ``Affine`` (checked in the tests), but one ``affine_grid`` and one
    ``grid_sample`` per key for all crops: a few kernels on a GPU instead of MONAI's per-crop Python.
    The shift commutes with the resampling (bilinear weights sum to 1 under reflection padding).

    Args:
        rotate_range: maximum rotation in radians about each of the three axes.
        scale_range: maximum relative scaling along each axis.
        shift: maximum intensity offset.
        shift_prob: probability that a crop is shifted.

    Example::

        aug = BatchAugment().set_random_state(seed=0)
        image, label = aug(image, label)  # (N, C, D, H, W), (N, 1, D, H, W), any device
    """

    def __init__(
        self,
        rotate_range: Sequence[float] = ROTATE_RANGE,
        scale_range: Sequence[float] = SCALE_RANGE,
        shift: float = SHIFT_OFFSET,
        shift_prob: float = SHIFT_PROB,
    ) -> None:
        if len(rotate_range) != 3 or len(scale_range) != 3:
            raise ValueError(f"rotate_range and scale_range take 3 values (one per axis), got {rotate_range} and {scale_range}")
        if not 0.0 <= shift_prob <= 1.0:
            raise ValueError(f"shift_prob is a probability in [0, 1], got {shift_prob}")
        self.rotate_range = tuple(float(abs(r)) for r in rotate_range)
        self.scale_range = tuple(float(abs(s)) for s in scale_range)
        self.shift = float(abs(shift))
        self.shift_prob = float(shift_prob)

    def randomize(self, n: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        """Parameters of ``n`` crops: ``angles`` (n, 3), ``scales`` (n, 3), ``offsets`` (n,), 0 where not shifted."""
        angles = np.stack([self.R.uniform(-r, r, n) for r in self.rotate_range], axis=1)
        scales = 1.0 + np.stack([self.R.uniform(-s, s, n) for s in self.scale_range], axis=1)
        shifted = self.R.random_sample(n) < self.shift_prob
        offsets = np.where(shifted, self.R.uniform(-self.shift, self.shift, n), 0.0)
        return {"angles": angles, "scales": scales, "offsets": offsets}

    @staticmethod
    def theta(params: dict[str, np.ndarray], in_size: Sequence[int], out_size: Sequence[int]) -> np.ndarray:
        """(n, 3, 4) ``F.affine_grid`` matrices (align_corners=False) of the parameters.

        MONAI maps an output voxel's offset ``p`` from the grid centre (in voxels) to the input offset
        ``R S p`` and samples there; in ``grid_sample``'s normalised coordinates, whose axes run
        last-to-first, that is ``diag(2 / in) R S diag(out / 2)`` with rows and columns reversed.
        """
        a = _rotation(np.asarray(params["angles"], dtype=np.float64)) * np.asarray(params["scales"], dtype=np.float64)[:, None, :]
        m = (2.0 / np.asarray(in_size, dtype=np.float64))[None, :, None] * a * (np.asarray(out_size, dtype=np.float64) / 2.0)[None, None, :]
        out = np.zeros((a.shape[0], 3, 4))
        out[:, :, :3] = m[:, ::-1, ::-1]
        return out

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None = None, params: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        """Augment a batch of crops; ``params`` (from :meth:`randomize`) fixes the draw.

        Returns:
            ``(image, label)``: float32 image, label in its own dtype (nearest: values unchanged).
        """
        if image.ndim != 5:
            raise ValueError(f"BatchAugment takes a batch of 3-D crops (N, C, D, H, W), got shape {tuple(image.shape)}")
        n, size = image.shape[0], tuple(image.shape[2:])
        p = self.randomize(n) if params is None else params
        theta = torch.as_tensor(self.theta(p, size, size), dtype=torch.float32).to(image.device, non_blocking=True)
        grid = F.affine_grid(theta, [n, 1, *size], align_corners=False)
        out = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if np.any(p["offsets"]):
            out = out + torch.as_tensor(p["offsets"], dtype=torch.float32).to(image.device, non_blocking=True).view(n, 1, 1, 1, 1)
        lab = None
        if label is not None:
            lab = F.grid_sample(label.float(), grid, mode="nearest", padding_mode="reflection", align_corners=False).to(label.dtype)
        return out, lab


class RandCropAugmentd(Randomizable, MapTransform):
    """Dictionary wrapper of :class:`BatchAugment` for one crop (``image`` bilinear, ``label`` nearest).

    The per-case form of the augmentation, for :func:`get_train_transforms` with ``augment=True``;
    the loaders augment whole batches instead.
    """

    def __init__(self, keys: Sequence[str] = ("image", "label"), augment: BatchAugment | None = None) -> None:
        MapTransform.__init__(self, keys)
        self.augment = augment or BatchAugment()

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandCropAugmentd:
        super().set_random_state(seed, state)
        self.augment.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        pass

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        image_key, label_key = self.keys[0], (self.keys[1] if len(self.keys) > 1 else None)
        image = torch.as_tensor(d[image_key])
        label = torch.as_tensor(d[label_key]) if label_key in d else None
        out, lab = self.augment(image[None], None if label is None else label[None])
        d[image_key] = out[0]
        if lab is not None:
            d[label_key] = lab[0]
        return d


class _IndicesToInt32d(MapTransform):
    """Crop-centre indices (``FgBgToIndicesd`` / ``ClassesToIndicesd``) as int32: half the memory of
    int64, for cached volumes below 2**31 voxels (larger ones keep int64)."""

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            v = d[key]
            if isinstance(v, (list, tuple)):
                d[key] = [self._small(x) for x in v]
            else:
                d[key] = self._small(v)
        return d

    @staticmethod
    def _small(x):
        x = torch.as_tensor(x)
        return x.to(torch.int32) if x.numel() == 0 or int(x.max()) < 2**31 - 1 else x


_INDEX_KEYS = {"fg": "label_fg_indices", "bg": "label_bg_indices", "classes": "label_cls_indices"}


def get_train_transforms(
    cfg: DatasetConfig,
    roi: Sequence[int] | None = None,
    crop_sample: int = 2,
    device: str | torch.device | None = None,
    crop_ratios: Sequence[float] | None = None,
    augment: bool = True,
) -> Compose:
    """Training chain: pre-processing and crop-centre indices (cached), then random crops and augmentation.

    Deterministic part (what ``CacheDataset`` caches): pre-processing as :func:`get_val_transforms`,
    ``SpatialPadd`` to ``roi`` (volumes smaller than the crop are zero-padded), plain tensors, and the
    voxel indices crops may be centred on: foreground and background (``FgBgToIndicesd``), or each
    class's with ``crop_ratios`` (``ClassesToIndicesd``), kept on the CPU as int32. Computing them once
    per case replaces the scan of the whole label that ``RandCropByPosNegLabeld`` made at every call.
    With ``device`` the image and label then move there (``ToDeviced``).

    Random part: ``crop_sample`` crops of ``roi`` per case, centred on foreground and background voxels
    1:1 (``RandCropByPosNegLabeld(pos=1, neg=1)``) or on classes at ``crop_ratios``
    (``RandCropByLabelClassesd``); with ``augment`` each crop is then augmented by
    :class:`RandCropAugmentd` (the paper's rotation +-pi/30 about the third axis, scaling 0.1, shift 0.1
    with p=0.5). The chain yields a list of ``crop_sample`` dicts per case. :func:`get_loaders` builds it
    with ``augment=False`` and augments whole batches with :class:`BatchAugment` instead.

    Args:
        cfg: dataset config.
        roi: crop size in voxels; defaults to ``cfg.roi``.
        crop_sample: crops per case.
        device: when given (e.g. ``"cuda"``), the cached image and label live on that device and the
            crops are cut there.
        crop_ratios: one share per class (background first) for class-balanced crop centres;
            ``None``: the paper's 1:1 foreground/background crops.
        augment: end with the per-crop augmentation (``False``: the crops as cut).
    """
    roi = tuple(int(r) for r in (roi or cfg.roi))
    if crop_sample < 1:
        raise ValueError(f"crop_sample must be >= 1 (crops per case), got {crop_sample}")
    if crop_ratios is not None and len(crop_ratios) != cfg.num_classes:
        raise ValueError(f"crop_ratios needs one value per class ({cfg.num_classes}, background first), got {list(crop_ratios)}")
    keys = ["image", "label"]
    chain = _preprocess(cfg, keys, ["bilinear", "nearest"])
    chain += [SpatialPadd(keys=keys, spatial_size=roi, mode="constant"), EnsureTyped(keys=keys, track_meta=False)]
    # Windowed CT: background crops are centred inside the body (> a_min, i.e. > 0 after windowing),
    # not in air. z-scored MRI is negative in half the body, so there any background voxel may serve.
    image_key = "image" if cfg.intensity == "window" else None
    if crop_ratios is None:
        chain.append(FgBgToIndicesd(keys="label", image_key=image_key, image_threshold=0))
        index_keys = [_INDEX_KEYS["fg"], _INDEX_KEYS["bg"]]
        crop = RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=roi, pos=1, neg=1, num_samples=crop_sample,
            fg_indices_key=_INDEX_KEYS["fg"], bg_indices_key=_INDEX_KEYS["bg"],
        )  # fmt: skip
    else:
        chain.append(ClassesToIndicesd(keys="label", num_classes=cfg.num_classes, image_key=image_key, image_threshold=0))
        index_keys = [_INDEX_KEYS["classes"]]
        crop = RandCropByLabelClassesd(
            keys=keys, label_key="label", spatial_size=roi, ratios=list(crop_ratios), num_classes=cfg.num_classes,
            num_samples=crop_sample, indices_key=_INDEX_KEYS["classes"],
        )  # fmt: skip
    chain.append(_IndicesToInt32d(keys=index_keys))
    if device is not None:
        chain.append(ToDeviced(keys=keys, device=device))
    # The crop pops the index keys; its outputs are views of the cached volume turned into
    # MetaTensors by MONAI's global meta tracking: back to plain tensors (no copy).
    chain += [crop, EnsureTyped(keys=keys, track_meta=False)]
    if augment:
        chain.append(RandCropAugmentd(keys))
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
            image_io.load_image_transform("label", image_only=True, allow_missing_keys=True),
            EnsureChannelFirstd(keys="label", allow_missing_keys=True),
        ] + chain
    return Compose(chain)


def get_post_transforms(test_transforms: Compose, cfg: DatasetConfig, argmax: bool = True) -> Compose:
    """Post-processing of one decollated inference result ``{"image", "pred"}``, for scripts of one's own.

    ``pred`` (C logits, or one channel of class indices when ``argmax=False``) is reduced to a class
    map by argmax and inverted to the input's native grid with nearest-neighbour interpolation
    (``Invertd`` replays ``test_transforms`` backwards: uncrop, re-orient, resample). Write the result
    with :func:`image_io.write_like`, as ``test_seg.py`` does; nothing is written here.

    Args:
        test_transforms: the chain returned by :func:`get_test_transforms` that produced ``image``.
        cfg: dataset config (class count must fit in uint8).
        argmax: apply argmax over channels first (pass False if ``pred`` is already a class map).
    """
    if cfg.num_classes > 256:
        raise ValueError(f"{cfg.num_classes} classes do not fit the uint8 prediction files; use at most 256")
    chain = []
    if argmax:
        chain.append(AsDiscreted(keys="pred", argmax=True))
    chain.append(Invertd(keys="pred", transform=test_transforms, orig_keys="image", nearest_interp=True, to_tensor=True))
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

    Args:
        cfg: dataset config.
        root: dataset folder (see :func:`list_cases`).
        roi: crop size; defaults to ``cfg.roi``.
        crop_sample: crops per case per iteration.
        batch_size: cases per training batch.
        cache_rate: fraction of each split cached after the deterministic transforms.
        num_workers: loader worker processes (also threads for caching and checking); the GPU path
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
    aug_dev = _resolve_augment_device(augment_device, device)
    if device is not None and aug_dev.type != "cuda":
        raise ValueError(f"the GPU cache (device={device}) augments on its GPU; augment_device={augment_device!r} does not fit it")
    train_tf = get_train_transforms(cfg, roi, crop_sample, device=device, crop_ratios=crop_ratios, augment=False)
    train_tf.set_random_state(seed=seed + rank)
    val_tf = get_val_transforms(cfg, device=device)
    train_ds = _dataset(train_cases, train_tf, cache_rate, num_workers, copy_cache=False)
    val_ds = _dataset(val_cases, val_tf, cache_rate, num_workers)
    generator = torch.Generator().manual_seed(seed + rank)
    augment = BatchAugment().set_random_state(seed=seed + rank + 1)
    sampler = _Endless(len(train_ds), generator)
    n_batches = max(1, math.ceil(len(train_ds) / batch_size)) if len(train_ds) else 0
    if device is not None:
        # CUDA tensors cannot cross process boundaries: the crops are cut in the prefetch thread.
        inner = DataLoader(train_ds, batch_size=batch_size, sampler=sampler, num_workers=0, collate_fn=_collate_crops, generator=generator)
        train_loader = TrainLoader(inner, n_batches, "gpu", augment, aug_dev, prefetch)
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
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=num_workers, pin_memory=pin)
    return train_loader, val_loader


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


def _header_voxels(path: str) -> tuple[tuple[int, ...], np.ndarray, int]:
    """(spatial shape, voxel sizes in mm, channels) from a NIfTI header; the voxels are not read."""
    import nibabel as nib

    img = nib.load(path)
    shape = tuple(int(s) for s in img.shape)
    zooms = np.sqrt((np.asarray(img.affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    channels = shape[3] if len(shape) == 4 else 1
    return shape[:3], zooms, channels


def estimate_cache_bytes(cfg: DatasetConfig, cases: Sequence[dict], roi: Sequence[int] | None = None) -> int:
    """Bytes the cached training / validation volumes take: float32 image channels + float32 label
    per voxel of the volume resampled to ``cfg.spacing`` and padded to ``roi``.

    Read from the NIfTI headers alone (shape and voxel size), so it is an upper bound: the crop to
    the foreground, done on the voxels, makes the real cache smaller (on the brain set of
    benchmarks/RESULTS.md the cropped training volumes hold 56% of the voxels counted). Cases whose
    header cannot be read count as the largest of the others. The crop-centre indices stay on the
    CPU and are not counted.
    """
    roi = tuple(int(r) for r in (roi or cfg.roi))
    sizes, unread = [], 0
    for case in cases:
        try:
            images = case["image"] if isinstance(case["image"], (list, tuple)) else [case["image"]]
            channels, shape, zooms = 0, None, None
            for p in images:
                shape, zooms, c = _header_voxels(str(p))
                channels += c
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
) -> LoaderChoice:
    """Pick the loader path for a run whose user passed no loader flag (or passed ``requested``).

    ``"auto"``: the GPU cache when training runs on CUDA, every case is to be cached, and the
    estimated cached dataset (:func:`estimate_cache_bytes`: the training and validation volumes
    after resampling, float32 image + label, from the NIfTI headers only) fits in ``gpu_share``
    (default 40%, :data:`GPU_CACHE_SHARE`) of the GPU memory free now; else CPU workers, caching
    every case when the estimate fits in half the available RAM (:data:`RAM_CACHE_SHARE`).
    ``"gpu"`` / ``"workers"`` take that path (the reason says it was asked for).

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
        return LoaderChoice("gpu", str(dev), 1.0, 0, f"GPU cache: {size} fit in {100 * gpu_share:.0f}% of the {_gib(free)} free on {dev}", nbytes)
    return on_workers(f"{size} exceed {100 * gpu_share:.0f}% of the {_gib(free)} free on {dev}")


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

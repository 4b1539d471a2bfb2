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

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from rep3d.data.demo import DEMO_CLASS_NAMES, DEMO_ROI, DEMO_SPACING, DEMO_WINDOW
from rep3d.data.intensity import (
    SCHEMES,
    UNIFORM_SCHEMES,
    WINDOW,
    IntensityScheme,
    get_scheme,
    scheme_of,
)


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
            ``{"scheme": "window", "a_min": a, "a_max": b}`` (clip and map to [0, 1]). Each scheme
            is a class of :mod:`rep3d.data.intensity`, looked up by name.

    The number of input channels is :attr:`in_channels`; the scheme all channels share is
    :attr:`scheme`.
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
            # The config's a_min / a_max mirror channel 0's parameters when the shared scheme is a
            # uniform one that has them (a window), else they are None.
            scheme = self.scheme
            fields = scheme.required_keys if scheme is not None and scheme.uniform else ()
            if not fields:
                self.a_min = self.a_max = None
            elif self.normalization and isinstance(self.normalization[0], dict):
                self.a_min, self.a_max = (self.normalization[0].get(k) if k in fields else None for k in ("a_min", "a_max"))
        self.validate()

    @property
    def in_channels(self) -> int:
        """Number of input channels (network input channels)."""
        return len(self.channel_names)

    @property
    def scheme(self) -> IntensityScheme | None:
        """The intensity scheme every channel shares, or None when they differ (``"mixed"``)."""
        return SCHEMES.get(self.intensity) if isinstance(self.intensity, str) else None

    def channel_norms(self) -> list[dict]:
        """The normalisation of each channel, one dict per channel (see ``normalization``)."""
        if self.normalization is not None:
            return [dict(n) for n in self.normalization]
        scheme = get_scheme(self.intensity)  # a uniform scheme: its parameters are this config's fields
        return [scheme.params(**{k: getattr(self, k) for k in scheme.required_keys}) for _ in self.channel_names]

    def validate(self) -> None:
        """Raise ``ValueError`` saying what to pass when a field is inconsistent."""
        errors = []
        if len(self.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing):
            errors.append(f"spacing must be 3 positive numbers in mm (e.g. --spacing 1.5 1.5 2.0), got {self.spacing}")
        uniform = SCHEMES.get(self.intensity) if self.intensity in UNIFORM_SCHEMES else None
        if self.normalization is None and uniform is None:
            choices = " or ".join(f"{n!r} ({SCHEMES[n].modality})" for n in UNIFORM_SCHEMES)
            errors.append(f"intensity must be {choices}, got {self.intensity!r}")
        if not self.channel_names or len(set(self.channel_names)) != len(self.channel_names):
            errors.append(f"channel_names must be distinct names, one per input channel, got {self.channel_names}")
        if self.normalization is not None:
            errors += _normalization_errors(self.normalization, self.channel_names)
        elif uniform is not None:
            errors += uniform.config_problems({k: getattr(self, k) for k in uniform.required_keys})
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


def _normalization_errors(norms, channel_names: list[str]) -> list[str]:
    """What is wrong with a per-channel ``normalization`` list (empty when nothing is)."""
    if not isinstance(norms, (list, tuple)):
        return [f"normalization must be a list with one dict per channel, got {type(norms).__name__}"]
    errors = []
    if len(norms) != len(channel_names):
        errors.append(f"normalization has {len(norms)} entries but there are {len(channel_names)} channels {channel_names}: give one per channel")
    for i, n in enumerate(norms):
        where = f"normalization of channel {i} ({channel_names[i] if i < len(channel_names) else '?'})"
        scheme = scheme_of(n)
        if scheme is None:
            errors.append(f"{where}: expected {{'scheme': {' | '.join(repr(s) for s in SCHEMES)}, ...}}, got {n!r}")
            continue
        errors += [f"{where}: {p}" for p in scheme.validate(n)]
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
        DEMO_SPACING,
        "window",
        *DEMO_WINDOW,
        len(DEMO_CLASS_NAMES),
        list(DEMO_CLASS_NAMES),
        roi=DEMO_ROI,
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
    scheme = SCHEMES.get(values["intensity"]) if isinstance(values.get("intensity"), str) else None
    for key in ("a_min", "a_max"):
        # A preset's window bounds do not carry over to a scheme without them (e.g. --intensity zscore).
        if scheme is not None and key not in scheme.required_keys and key not in given:
            values[key] = None
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
    targets = [i for i, n in enumerate(norms) if get_scheme(n["scheme"]).planned] or list(range(len(norms)))
    intensity = given.get("intensity") or (WINDOW.name if given.get("a_min") is not None or given.get("a_max") is not None else None)
    scheme = SCHEMES.get(intensity) if isinstance(intensity, str) else None
    if scheme is None or not scheme.uniform:
        return norms
    for i in targets:
        # Validation names what is missing when a bound was not given.
        norms[i] = scheme.params(**{k: given.get(k) for k in scheme.required_keys})
    return norms

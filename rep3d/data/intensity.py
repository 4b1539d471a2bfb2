"""Intensity normalisation schemes, one class per scheme, looked up by name.

As nnU-Net's ``channel_name_to_normalization_mapping``, a scheme's name (the ``"scheme"`` of a
channel's normalisation dict, or ``DatasetConfig.intensity``) selects a class that knows its
parameters, checks them, builds its MONAI transform, says which raw values the foreground crop
keeps and describes itself for the start line and the export sidecar:

``window``
    CT with a fixed window: clip ``[a_min, a_max]`` and map it to [0, 1].
``ct``
    nnU-Net's CT normalisation: clip to the dataset's foreground percentiles ``[lower, upper]``
    (:data:`CT_PERCENTILES`, planned), then ``(x - mean) / std`` with its foreground statistics.
``zscore``
    per volume (MRI): ``(x - mean) / std`` over the volume's non-zero voxels; zeros stay 0.

A channel's normalisation is stored as a plain dict, ``{"scheme": name, **parameters}`` (e.g.
``{"scheme": "window", "a_min": -125, "a_max": 275}``), in dataset configs, plans and checkpoints;
:meth:`IntensityScheme.params` builds one. Look a scheme up with :func:`get_scheme` (or
:data:`SCHEMES`); this module imports nothing of Rep3D.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from monai.transforms import (
    Compose,
    MapTransform,
    NormalizeIntensityd,
    ScaleIntensityRanged,
    ThresholdIntensityd,
)

#: Foreground percentiles the ``ct`` scheme clips at (nnU-Net's 0.5 and 99.5), planned from the data.
CT_PERCENTILES = (0.5, 99.5)


#: Air is about -1000 HU, the body above about -200: the foreground crop of a ``ct`` channel keeps
#: the bounding box of what is above this, unless the channel's own lower bound is lower (e.g.
#: lung or airway targets).
CT_BODY_HU = -500.0


class IntensityScheme:
    """One intensity normalisation scheme; subclasses set the attributes and override the methods.

    Attributes:
        name: the name configs use (``"scheme"`` of a channel's dict, ``DatasetConfig.intensity``).
        required_keys: the parameters a channel's dict must give as finite numbers.
        modality: what the scheme is for, in messages (``"CT"``, ``"MRI"``).
        uniform: usable as ``DatasetConfig.intensity`` for every channel without a per-channel
            ``normalization`` (its parameters, if any, are fields of ``DatasetConfig``: ``a_min``,
            ``a_max``), and so choosable by ``--intensity``.
        planned: the parameters are statistics planned from the dataset; ``--intensity`` /
            ``--a_min`` / ``--a_max`` given with a plan replace the channels of such a scheme.
        normalise_then_crop: with ``uniform`` use, the chain normalises first and then crops to
            the voxels > 0 (after windowing, air is exactly 0); otherwise it crops the raw values.
        positive_body: after normalisation, values > 0 are the body, so background crop centres
            are taken there (windowed CT); else any background voxel may be a crop centre.
    """

    name: str = ""
    required_keys: tuple[str, ...] = ()
    modality: str = ""
    uniform: bool = False
    planned: bool = False
    normalise_then_crop: bool = False
    positive_body: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def params(self, **values) -> dict:
        """A channel's normalisation dict: ``{"scheme": name, key: value, ...}`` for ``required_keys``
        (a key not given is None, which :meth:`validate` reports)."""
        unknown = sorted(set(values) - set(self.required_keys))
        if unknown:
            raise TypeError(f"scheme {self.name!r} takes {list(self.required_keys)}, not {unknown}")
        return {"scheme": self.name, **{k: values.get(k) for k in self.required_keys}}

    def missing(self, params: Mapping) -> list[str]:
        """The required keys that ``params`` does not give as finite numbers."""
        return [k for k in self.required_keys if not isinstance(params.get(k), (int, float)) or not math.isfinite(params[k])]

    def validate(self, params: Mapping) -> list[str]:
        """Problems of a channel's normalisation dict (empty when it is usable)."""
        missing = self.missing(params)
        if missing:
            return [f"scheme {self.name!r} needs numbers for {missing}"]
        return self._problems(params)

    def _problems(self, params: Mapping) -> list[str]:
        """Problems of parameters that are all numbers."""
        return []

    def config_problems(self, params: Mapping) -> list[str]:
        """Problems of the scheme as ``DatasetConfig.intensity`` (``uniform``), its parameters taken
        from the config's fields, in the words of the flags that set them."""
        return self.validate(params)

    def normalise(self, x: torch.Tensor, params: Mapping) -> torch.Tensor:
        """One channel (a float tensor, changed in place where convenient) normalised, as
        :class:`NormalizeChannelsd` applies it."""
        raise NotImplementedError

    def transform(self, keys, params: Mapping):
        """The MONAI transform normalising every channel of ``keys`` with ``params``."""
        raise NotImplementedError

    def foreground_threshold(self, params: Mapping) -> float:
        """The raw value above which a voxel is foreground for the crop (before normalisation)."""
        raise NotImplementedError

    def describe(self, params: Mapping) -> str:
        """One line for the start of a run (the plan's description of a channel)."""
        raise NotImplementedError

    def sidecar(self, params: Mapping) -> dict:
        """The export sidecar's ``input.normalisation``: type, parameters and formula."""
        raise NotImplementedError

    def sidecar_steps(self, params: Mapping) -> list[str]:
        """The sidecar's steps for normalising and cropping to the foreground, in their order."""
        return [f"crop to the bounding box of voxels > {self.foreground_threshold(params):g} (raw values)", "normalise intensities (input.normalisation)"]


class WindowScheme(IntensityScheme):
    """CT with a fixed window: clip ``[a_min, a_max]`` and map it linearly to [0, 1]."""

    name = "window"
    required_keys = ("a_min", "a_max")
    modality = "CT"
    uniform = True
    normalise_then_crop = True
    positive_body = True

    def _problems(self, params: Mapping) -> list[str]:
        if not params["a_min"] < params["a_max"]:
            return [f"a_min ({params['a_min']}) must be below a_max ({params['a_max']})"]
        return []

    def config_problems(self, params: Mapping) -> list[str]:
        if params.get("a_min") is None or params.get("a_max") is None:
            return ["intensity 'window' needs both bounds: pass --a_min and --a_max (e.g. -125 275 for abdominal CT)"]
        return self._problems(params)

    def normalise(self, x: torch.Tensor, params: Mapping) -> torch.Tensor:
        lo, hi = params["a_min"], params["a_max"]
        return (x.clamp(lo, hi) - lo) / (hi - lo)

    def transform(self, keys, params: Mapping):
        return ScaleIntensityRanged(keys=keys, a_min=params["a_min"], a_max=params["a_max"], b_min=0.0, b_max=1.0, clip=True)

    def foreground_threshold(self, params: Mapping) -> float:
        return params["a_min"]

    def describe(self, params: Mapping) -> str:
        return f"window [{params['a_min']:.4g}, {params['a_max']:.4g}] -> [0, 1]"

    def sidecar(self, params: Mapping) -> dict:
        return {"type": "window", "a_min": params["a_min"], "a_max": params["a_max"], "b_min": 0.0, "b_max": 1.0, "clip": True,
                "formula": "clip((x - a_min) / (a_max - a_min), 0, 1)"}  # fmt: skip

    def sidecar_steps(self, params: Mapping) -> list[str]:
        return ["normalise intensities (input.normalisation)", "crop to the bounding box of voxels > 0 (the body after windowing)"]


class CTScheme(IntensityScheme):
    """nnU-Net's CT normalisation: clip to the dataset's foreground percentiles ``[lower, upper]``,
    then ``(x - mean) / std`` with the dataset's foreground mean and std (all planned)."""

    name = "ct"
    required_keys = ("lower", "upper", "mean", "std")
    modality = "CT"
    planned = True

    def _problems(self, params: Mapping) -> list[str]:
        if not (params["lower"] < params["upper"] and params["std"] > 0):
            return [f"needs lower < upper and std > 0, got {dict(params)}"]
        return []

    def normalise(self, x: torch.Tensor, params: Mapping) -> torch.Tensor:
        return (x.clamp(params["lower"], params["upper"]) - params["mean"]) / max(params["std"], 1e-8)

    def transform(self, keys, params: Mapping):
        lo, hi = params["lower"], params["upper"]
        return Compose([
            ThresholdIntensityd(keys=keys, threshold=lo, above=True, cval=lo),
            ThresholdIntensityd(keys=keys, threshold=hi, above=False, cval=hi),
            NormalizeIntensityd(keys=keys, subtrahend=params["mean"], divisor=max(params["std"], 1e-8)),
        ])  # fmt: skip

    def foreground_threshold(self, params: Mapping) -> float:
        return min(params["lower"], CT_BODY_HU)

    def describe(self, params: Mapping) -> str:
        lo, hi = CT_PERCENTILES
        return f"CT: clip [{params['lower']:.4g}, {params['upper']:.4g}] (foreground p{lo}/p{hi}), z-score with mean {params['mean']:.4g}, std {params['std']:.4g}"

    def sidecar(self, params: Mapping) -> dict:
        return {"type": "ct", **{k: params[k] for k in self.required_keys}, "formula": "(clip(x, lower, upper) - mean) / std"}

    def sidecar_steps(self, params: Mapping) -> list[str]:
        return [f"crop to the bounding box of voxels > {self.foreground_threshold(params):g} (raw CT, HU)", "normalise intensities (input.normalisation)"]


class ZScoreScheme(IntensityScheme):
    """Per volume (MRI): ``(x - mean) / std`` over each channel's non-zero voxels; zeros stay 0."""

    name = "zscore"
    modality = "MRI"
    uniform = True

    def normalise(self, x: torch.Tensor, params: Mapping) -> torch.Tensor:
        mask = x != 0
        if bool(mask.any()):
            v = x[mask]
            std = float(v.std()) if v.numel() > 1 else 0.0
            x[mask] = (v - v.mean()) / (std if std > 0 else 1.0)
        return x

    def transform(self, keys, params: Mapping):
        return NormalizeIntensityd(keys=keys, nonzero=True, channel_wise=True)

    def foreground_threshold(self, params: Mapping) -> float:
        return 0.0  # MRI-like: the background is 0

    def describe(self, params: Mapping) -> str:
        return "z-score per volume"

    def sidecar(self, params: Mapping) -> dict:
        return {"type": "zscore", "nonzero": True, "channel_wise": True, "formula": "(x - mean) / std over the non-zero voxels of each channel; zeros stay 0"}

    def sidecar_steps(self, params: Mapping) -> list[str]:
        return ["crop to the bounding box of voxels > 0 (raw MRI)", "normalise intensities (input.normalisation)"]


WINDOW, CT, ZSCORE = WindowScheme(), CTScheme(), ZScoreScheme()


#: Every scheme by name.
SCHEMES: dict[str, IntensityScheme] = {s.name: s for s in (CT, ZSCORE, WINDOW)}


#: The schemes ``DatasetConfig.intensity`` (and ``--intensity``) may name alone.
UNIFORM_SCHEMES: tuple[str, ...] = tuple(sorted(n for n, s in SCHEMES.items() if s.uniform))


def get_scheme(name) -> IntensityScheme:
    """The scheme called ``name``.

    Raises:
        ValueError: for an unknown name, naming the choices.
    """
    scheme = SCHEMES.get(name) if isinstance(name, str) else None
    if scheme is None:
        raise ValueError(f"unknown intensity scheme {name!r}: choose one of {', '.join(repr(n) for n in SCHEMES)}")
    return scheme


def scheme_of(params) -> IntensityScheme | None:
    """The scheme of a channel's normalisation dict, or None when it names none."""
    return SCHEMES.get(params.get("scheme")) if isinstance(params, dict) and isinstance(params.get("scheme"), str) else None


def sidecar_normalisation(norms: Sequence[Mapping]) -> dict:
    """The export sidecar's ``input.normalisation`` for channels normalised by ``norms``: the
    scheme's description when every channel has the same, else one per channel."""
    first = dict(norms[0])
    if all(dict(n) == first for n in norms):
        return get_scheme(first["scheme"]).sidecar(first)
    return {"type": "per_channel", "channels": [get_scheme(n["scheme"]).sidecar(n) for n in norms]}


def sidecar_steps(norms: Sequence[Mapping]) -> list[str]:
    """The export sidecar's normalise / crop steps for channels normalised by ``norms``."""
    first = dict(norms[0])
    if all(dict(n) == first for n in norms):
        return get_scheme(first["scheme"]).sidecar_steps(first)
    thresholds = ", ".join(f"{get_scheme(n['scheme']).foreground_threshold(n):g}" for n in norms)
    return [f"crop to the bounding box of the voxels above each channel's threshold ({thresholds}) in raw values", "normalise each channel (input.normalisation.channels)"]


class NormalizeChannelsd(MapTransform):
    """Per-channel intensity normalisation, one scheme per channel (see ``DatasetConfig.normalization``).

    Each channel is normalised by its scheme's :meth:`IntensityScheme.normalise`: ``window``: clip to
    ``[a_min, a_max]`` and map to [0, 1]; ``ct``: clip to ``[lower, upper]`` then ``(x - mean) / std``
    with the dataset's foreground statistics (nnU-Net's CT scheme); ``zscore``: this volume's
    mean/std over its non-zero voxels.

    Args:
        keys: keys of channel-first images.
        norms: one dict per channel.
    """

    def __init__(self, keys, norms: Sequence[dict]) -> None:
        super().__init__(keys)
        self.norms = [dict(n) for n in norms]
        self.schemes = [get_scheme(n.get("scheme")) for n in self.norms]

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(self.norms):
                raise ValueError(f"{key} has {img.shape[0]} channels but the normalisation {len(self.norms)}; the dataset config and the inputs disagree")
            out = img.float().clone() if not img.is_floating_point() else img.clone()
            for c, (scheme, n) in enumerate(zip(self.schemes, self.norms)):
                out[c] = scheme.normalise(out[c], n)
            d[key] = out
        return d

"""The deterministic MONAI transform chains of a dataset (load, channels, orientation, spacing,
intensity, foreground crop) for training, validation and inference, and their inversion."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
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
    Orientationd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    Spacingd,
    SpatialPadd,
    ToDeviced,
)

from rep3d.data.augment import RandCropAugmentd
from rep3d.data.dataset_config import DatasetConfig
from rep3d.data.image_io import load_image_transform
from rep3d.data.intensity import (  # NormalizeChannelsd also imported from here
    NormalizeChannelsd,
    get_scheme,
)


class _AboveThresholds:
    """Foreground for the crop, per channel: raw value above that channel's threshold (picklable for loader workers)."""

    def __init__(self, thresholds: Sequence[float]) -> None:
        self.thresholds = [float(t) for t in thresholds]

    def __call__(self, img):
        t = torch.as_tensor(self.thresholds, dtype=img.dtype if torch.is_tensor(img) and img.is_floating_point() else torch.float32)
        if not torch.is_tensor(img):
            return np.asarray(img) > np.asarray(self.thresholds).reshape((-1,) + (1,) * (np.ndim(img) - 1))
        return img > t.to(img.device).reshape((-1,) + (1,) * (img.ndim - 1))


def _crop_thresholds(cfg: DatasetConfig) -> list[float]:
    """Per channel, the raw value above which a voxel is foreground (its scheme's threshold)."""
    return [get_scheme(n["scheme"]).foreground_threshold(n) for n in cfg.channel_norms()]


def _intensity(cfg: DatasetConfig) -> list:
    if cfg.normalization is not None:
        return [NormalizeChannelsd(keys="image", norms=cfg.normalization)]
    # One uniform scheme for every channel (window, zscore): its MONAI transform.
    return [get_scheme(cfg.intensity).transform("image", cfg.channel_norms()[0])]


def _preprocess(cfg: DatasetConfig, keys: list[str], modes: list[str]) -> list:
    """Load (every format of :mod:`image_io`; a case's channel files are stacked, a 4-D file's
    last axis is its channels), channel first, resample, orient RAS, intensity, crop to the foreground."""
    chain = [
        load_image_transform(keys, image_only=True),
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
    if get_scheme(cfg.intensity).normalise_then_crop:
        # After windowing, air is exactly 0, so "> 0" is the body.
        return chain + _intensity(cfg) + [crop]
    # z-scored volumes are negative inside the body; crop on the raw (non-negative) MRI first.
    return chain + [crop] + _intensity(cfg)


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
    image_key = "image" if cfg.scheme is not None and cfg.scheme.positive_body else None
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
            load_image_transform("label", image_only=True, allow_missing_keys=True),
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

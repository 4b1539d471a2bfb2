"""Training and validation datasets that read the pre-processed store (:mod:`rep3d.data.store`).

A training draw memory-maps the case's arrays (``np.load(mmap_mode="r")``), draws the crop centres
with the training chain's own crop transform (the same random state, the same foreground / background
or per-class index arrays, the same centre correction as the in-memory path), then copies out just
the crops: only the pages under the crops and the few index entries drawn are read, and the map is
dropped with the draw, so a worker's private memory does not grow with the dataset. The cases a
``cache_rate`` holds in memory are read whole once (into RAM, or onto the GPU of the GPU path) and
cropped there. No case is pre-processed again at a draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    Randomizable,
    SpatialCrop,
    Transform,
)
from monai.utils import fall_back_tuple

from rep3d.runtime import thread_map

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64}


def open_case(record: dict, mmap: bool = True) -> dict:
    """A case's arrays: ``image`` (C, X, Y, Z), ``label`` (1, X, Y, Z) and its crop-centre indices
    (``fg`` and ``bg``, or ``classes``: one array per class), memory-mapped (``mmap``) or read whole."""
    mode = "r" if mmap else None
    d = {"image": np.load(record["image"], mmap_mode=mode), "label": np.load(record["label"], mmap_mode=mode)}
    if record["indices"]["rule"] == "classes":
        allc = np.load(record["classes"], mmap_mode=mode)
        off = record["indices"]["offsets"]
        d["classes"] = [allc[off[i] : off[i + 1]] for i in range(len(off) - 1)]
    else:
        d["fg"] = np.load(record["fg"], mmap_mode=mode)
        d["bg"] = np.load(record["bg"], mmap_mode=mode)
    return d


def _hold(record: dict, device: torch.device | None) -> dict:
    """A case read whole into memory: the volumes as tensors (on ``device`` when given), indices on the CPU."""
    d = open_case(record, mmap=False)
    for key in ("image", "label"):
        t = torch.from_numpy(d[key])
        d[key] = t.to(device) if device is not None else t
    return d


def _crop(arr, slices: tuple, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    if isinstance(arr, torch.Tensor):
        out = arr[slices]
        return out if out.dtype == dtype else out.to(dtype)
    out = torch.from_numpy(np.array(arr[slices]))  # the copy reads just the crop's pages of a memory map
    out = out if out.dtype == dtype else out.to(dtype)
    return out.to(device, non_blocking=True) if device is not None else out


class StoreCropd(Randomizable, Transform):
    """The training chain's crop (``RandCropByPosNegLabeld`` or ``RandCropByLabelClassesd``) applied to
    a case of the store: centres drawn by the wrapped transform's own cropper (its random state, so the
    crops equal the in-memory path's for a seed), crops sliced from the (memory-mapped) arrays.

    Input: :func:`open_case`'s dict; output: ``num_samples`` dicts ``{"image", "label"}`` of tensors,
    the label in the in-memory cache's dtype (float32).

    Args:
        crop: the MONAI crop transform of :func:`rep3d.data.transforms.get_train_transforms`.
        label_dtype: dtype of the label crops.
        device: where crops cut from memory-mapped arrays go (the GPU path); held tensors stay where they are.
    """

    def __init__(self, crop: RandCropByPosNegLabeld | RandCropByLabelClassesd, label_dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        if not isinstance(crop, (RandCropByPosNegLabeld, RandCropByLabelClassesd)):
            raise TypeError(f"StoreCropd wraps RandCropByPosNegLabeld or RandCropByLabelClassesd, got {type(crop).__name__}")
        self.crop = crop
        self.label_dtype = label_dtype
        self.device = device

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> StoreCropd:
        super().set_random_state(seed, state)
        self.crop.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, data: dict) -> list[dict]:
        cropper = self.crop.cropper
        label = data["label"]
        if isinstance(self.crop, RandCropByPosNegLabeld):
            cropper.randomize(label=label, fg_indices=data["fg"], bg_indices=data["bg"])
        else:
            cropper.randomize(label=label, indices=data["classes"])
        roi = fall_back_tuple(cropper.spatial_size, default=tuple(label.shape[1:]))
        out = []
        for center in cropper.centers:
            sl = (slice(None),) + tuple(SpatialCrop(roi_center=center, roi_size=roi).slices)
            out.append({"image": _crop(data["image"], sl, torch.float32, self.device), "label": _crop(label, sl, self.label_dtype, self.device)})
        return out


def _store_chain(train_tf: Compose, label_dtype: torch.dtype, device: torch.device | None) -> tuple[Compose, int]:
    """The training chain with its crop swapped for :class:`StoreCropd` (same position, so that
    ``set_random_state`` gives it the same seed), and the crop's index (where a draw starts)."""
    transforms = list(train_tf.transforms)
    first = train_tf.get_index_of_first(lambda t: isinstance(t, Randomizable))
    if first is None or not isinstance(transforms[first], (RandCropByPosNegLabeld, RandCropByLabelClassesd)):
        raise ValueError("the training chain has no crop by label to read from the store (get_train_transforms with augment=False)")
    transforms[first] = StoreCropd(transforms[first], label_dtype, device)
    return Compose(transforms), first


def _n_held(n: int, cache_rate: float) -> int:
    # CacheDataset's rule: the first int(n * cache_rate) cases.
    return min(n, int(n * float(cache_rate)))


class StoreTrainDataset(torch.utils.data.Dataset):
    """Training cases of the store: item ``i`` is the list of crop dicts of case ``i``, as a
    ``CacheDataset`` over :func:`get_train_transforms` gives (``augment=False``).

    Args:
        records: :meth:`rep3d.data.store.Store.records` of the cases.
        train_tf: the training chain (:func:`get_train_transforms`, ``augment=False``); its crop is swapped for
            :class:`StoreCropd` in a copy (``self.transform``) and a draw runs from there (the deterministic
            part is the store).
        cache_rate: share of the cases held in memory (the first ones, as ``CacheDataset``); the others
            are memory-mapped at each draw.
        device: where held cases live (the GPU path), and where crops of the others are moved.
        num_workers: threads reading the held cases.
    """

    def __init__(self, records: Sequence[dict], train_tf: Compose, cache_rate: float = 0.0, device: str | torch.device | None = None, num_workers: int = 1) -> None:
        self.records = list(records)
        dev = torch.device(device) if device is not None else None
        dtypes = {r["label_dtype_in_memory"] for r in self.records}
        label_dtype = _DTYPES.get(dtypes.pop(), torch.float32) if len(dtypes) == 1 else torch.float32
        self.transform, self.start = _store_chain(train_tf, label_dtype, dev)
        n = _n_held(len(self.records), cache_rate)
        self.held: list[dict | None] = thread_map(lambda r: _hold(r, dev), self.records[:n], num_workers) + [None] * (len(self.records) - n)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> list[dict]:
        data = self.held[index]
        if data is None:
            data = open_case(self.records[index])
        return self.transform(data, start=self.start)


class StoreValDataset(torch.utils.data.Dataset):
    """Validation cases of the store: item ``i`` is ``{"image", "label"}``, the whole pre-processed
    volume as the validation chain gives it (the store's padding to the ROI cut off), float32.

    Args:
        records: :meth:`rep3d.data.store.Store.records` of the cases.
        cache_rate: share of the cases held in memory; the others are read from the store at each pass.
        device: where held cases live.
        num_workers: threads reading the held cases.
    """

    def __init__(self, records: Sequence[dict], cache_rate: float = 0.0, device: str | torch.device | None = None, num_workers: int = 1) -> None:
        self.records = list(records)
        self.device = torch.device(device) if device is not None else None
        n = _n_held(len(self.records), cache_rate)
        self.held: list[dict | None] = thread_map(self._read, list(range(n)), num_workers) + [None] * (len(self.records) - n)

    def _read(self, index: int) -> dict:
        rec = self.records[index]
        d = open_case(rec)
        sl = (slice(None),) + tuple(slice(lo, lo + s) for (lo, _), s in zip(rec["pad"], rec["unpadded_shape"]))
        label_dtype = _DTYPES.get(rec["label_dtype_in_memory"], torch.float32)
        out = {"image": _crop(d["image"], sl, torch.float32, None), "label": _crop(d["label"], sl, label_dtype, None)}
        if self.device is not None:
            out = {k: v.to(self.device) for k, v in out.items()}
        return out

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        held = self.held[index]
        return held if held is not None else self._read(index)

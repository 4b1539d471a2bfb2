"""Random crops and the batched augmentation of training crops (rotation, scaling, intensity shift),
run on the GPU when the run is there."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    MapTransform,
    Randomizable,
)

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

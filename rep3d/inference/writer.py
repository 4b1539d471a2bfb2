"""Writing predictions in each input's native space and format (geometry copied from the input)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rep3d.data.image_io import image_ext, read_header, write_like
from rep3d.fileio import atomic_path

# Probabilities are stored as uint16 scaled to [0, 1] (NIfTI has no float16): 1.5e-5 resolution at a
# quarter of float32's size. Read them back with nibabel's get_fdata().
PROB_DTYPE = np.uint16


def save_like(array: np.ndarray, reference: str, path: str, dtype: type = np.uint8, scaled: bool = False) -> None:
    """Write ``array`` as NIfTI with ``reference``'s header geometry, bit for bit.

    The reference header is copied (qform, sform, their codes, pixdim, units), so the output's affine
    and orientation equal the input's exactly (an affine rebuilt from a float32 quaternion would not).

    Args:
        array: voxel data on the reference grid, its first 3 axes the reference's spatial axes.
        reference: the input image file.
        path: output file (``.nii.gz``); written to a hidden temporary name, then renamed.
        dtype: stored data type.
        scaled: store floats in ``dtype`` with a scale factor (nibabel picks it), e.g. probabilities.
    """
    import nibabel as nib

    ref = nib.load(reference)
    hdr = ref.header.copy()
    hdr.set_data_dtype(dtype)
    if not scaled:
        array = np.asarray(array).astype(dtype, copy=False)
    hdr.set_slope_inter(None, None) if scaled else hdr.set_slope_inter(1.0, 0.0)
    for key in ("cal_min", "cal_max"):
        hdr[key] = 0
    hdr["intent_code"] = 0
    # affine=None keeps the copied qform/sform fields unchanged.
    img = type(ref)(array, None, header=hdr)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


def check_written(path: str, reference: str) -> None:
    """The written label map must have the input's spatial shape and voxel-to-world matrix."""
    out, ref = read_header(path), read_header(reference)
    if tuple(out.shape) != tuple(ref.shape) or not np.allclose(out.affine, ref.affine, atol=1e-4):
        raise RuntimeError(f"{path}: written with shape {out.shape} / affine {out.affine.tolist()}, input has {ref.shape} / {ref.affine.tolist()}")


def write_prediction(seg: np.ndarray, reference: str, out_path: str) -> str:
    """Write the label map ``seg`` (the reference's spatial shape) on ``reference``'s exact grid, in the
    format ``out_path`` names. A NIfTI reference's header is copied whole (a trailing singleton axis
    of a 4-D input is kept); other formats go through :func:`image_io.write_like`."""
    if image_ext(reference) in (".nii.gz", ".nii") and image_ext(out_path) in (".nii.gz", ".nii"):
        import nibabel as nib

        shape = tuple(nib.load(reference).shape)
        if int(np.prod(shape)) != seg.size:  # several channels in the input's 4th axis
            shape = shape[:3]
        save_like(seg.reshape(shape), reference, out_path, seg.dtype.type)
        return out_path
    return write_like(seg.reshape(native_image_shape(reference)), reference, out_path, seg.dtype.type)


def native_image_shape(reference: str) -> tuple[int, ...]:
    """The input's spatial shape (without a channel axis), as the predictions are written."""
    return tuple(int(s) for s in read_header(reference).shape)


def voxel_sizes(reference: str) -> list[float]:
    import nibabel as nib

    aff = nib.load(reference).affine
    return [float(v) for v in np.sqrt((aff[:3, :3] ** 2).sum(axis=0))]


def native_probabilities(probs: torch.Tensor, item: dict, invert: Any, keep: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities resampled (linearly) to the input's native grid, and their argmax.

    Foreground classes are inverted one at a time (``invert``: an ``Invertd`` on key ``"prob"``
    replaying the test chain of ``item["image"]``), so that without ``keep`` only a few native-size
    volumes are held at once. Background is 1 - sum(foreground): the inverse of the foreground crop
    pads with zeros, right for foreground classes and wrong (0) for background.

    Args:
        probs: (1, C, ...) probabilities on the pre-processed grid.
        item: the decollated batch item holding the transformed ``"image"``.
        invert: the ``Invertd`` transform.
        keep: also return all C native probability volumes.

    Returns:
        ``(labels (X, Y, Z) int64, probabilities (C, X, Y, Z) float32 or None)``.
    """
    fg_sum = best = best_idx = None
    kept = []
    for c in range(1, probs.shape[1]):
        d = {"image": item["image"], "prob": probs[0, c : c + 1].to("cpu", torch.float32)}
        p = torch.as_tensor(invert(d)["prob"])[0].clamp_(0, 1)
        if fg_sum is None:
            fg_sum, best, best_idx = p.clone(), p.clone(), torch.ones_like(p, dtype=torch.int64)
        else:
            fg_sum += p
            better = p > best
            best = torch.where(better, p, best)
            best_idx[better] = c
        if keep:
            kept.append(p)
    bg = (1.0 - fg_sum).clamp_(0, 1)
    labels = torch.where(bg >= best, torch.zeros_like(best_idx), best_idx).numpy()
    return labels, (torch.stack([bg] + kept).numpy() if keep else None)

"""Synthetic brain MRI volumes at 1 mm, 197 x 233 x 189 voxels (the MNI ICBM152 grid), for loader benchmarks.

Each case is a T1-like head: scalp, skull, CSF, a folded cortical grey-matter ribbon, white matter,
lateral ventricles and four deep grey nuclei, with a smooth bias field and noise inside the head
(the background outside the head is exactly 0, as in skull-stripped / registered brain datasets, so
the pipeline's foreground crop has something to crop). Shapes and positions are jittered per case.
Labels (uint8): 0 background, 1 cortical grey matter, 2 white matter, 3 ventricles, 4 deep grey.

Train with ``--dataset custom --spacing 1 1 1 --intensity zscore --num_classes 5``.

Usage::

    python3 benchmarks/brain_data.py --root /tmp/brain --n_train 8 --n_val 2
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np

BRAIN_SHAPE = (197, 233, 189)
BRAIN_CLASSES = ("background", "grey_matter", "white_matter", "ventricles", "deep_grey")
# Flags of main_train.py / the dataset config that describe this data.
BRAIN_FLAGS = ["--dataset", "custom", "--spacing", "1", "1", "1", "--intensity", "zscore", "--num_classes", str(len(BRAIN_CLASSES)),
               "--class_names", ",".join(BRAIN_CLASSES)]  # fmt: skip
_T1 = {"scalp": 700.0, "skull": 120.0, "csf": 250.0, "gm": 550.0, "wm": 800.0, "deep": 640.0}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: int = 6) -> np.ndarray:
    """A smooth random field in about [-1, 1]: a coarse random grid upsampled (trilinear)."""
    from scipy.ndimage import zoom

    coarse = rng.uniform(-1.0, 1.0, size=(cells,) * 3).astype(np.float32)
    field = zoom(coarse, [s / cells for s in shape], order=1, mode="nearest", grid_mode=True)
    return field[: shape[0], : shape[1], : shape[2]]


def make_brain_case(index: int, split: str = "train", shape: tuple[int, int, int] = BRAIN_SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case: ``(image int16, label uint8, affine 4x4)`` on a 1 mm RAS grid of ``shape``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), {"train": 0, "val": 1, "test": 2}[split], int(index)]))
    # Centred mm coordinates, as broadcastable 1-D axes (no full meshgrid: 3 x 8.7M floats saved).
    axes = [np.arange(n, dtype=np.float32) - (n - 1) / 2.0 for n in shape]
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    shift = rng.uniform(-4.0, 4.0, 3).astype(np.float32)
    x, y, z = x - shift[0], y - shift[1], z - shift[2] + 8.0
    s = rng.uniform(0.93, 1.05, 3).astype(np.float32)

    def r2(cx, cy, cz, rx, ry, rz):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2

    head = r2(0, 0, 0, 78 * s[0], 98 * s[1], 84 * s[2])
    brain = r2(0, 2, 4, 66 * s[0], 84 * s[1], 68 * s[2])
    # The cortex folds: the grey/white boundary moves by a few mm with a smooth random field.
    fold = _smooth_field(rng, shape, cells=14) * 0.22
    wm = brain + fold < 0.62
    image = np.zeros(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    image[head <= 1.0] = _T1["scalp"]
    image[head <= 0.86] = _T1["skull"]
    image[brain <= 1.08] = _T1["csf"]
    gm = brain <= 1.0
    image[gm] = _T1["gm"]
    label[gm] = 1
    image[wm & gm] = _T1["wm"]
    label[wm & gm] = 2
    for side in (-1.0, 1.0):
        j = rng.uniform(0.9, 1.1, 3)
        deep = r2(side * 16 * j[0], -2 * j[1], 6 * j[2], 8 * j[0], 14 * j[1], 9 * j[2]) <= 1.0  # thalamus-like
        deep |= r2(side * 13 * j[0], 16 * j[1], 12 * j[2], 5 * j[0], 11 * j[1], 8 * j[2]) <= 1.0  # caudate-like
        image[deep] = _T1["deep"]
        label[deep] = 4
        vent = r2(side * 7 * j[0], 6 * j[1], 16 * j[2], 4.5 * j[0], 26 * j[1], 7 * j[2]) <= 1.0
        image[vent] = _T1["csf"]
        label[vent] = 3
    inside = head <= 1.0
    bias = 1.0 + 0.12 * _smooth_field(rng, shape, cells=4)
    image *= bias
    noise = rng.normal(0.0, 18.0, size=shape).astype(np.float32)
    image = np.where(inside, np.maximum(image + noise, 1.0), 0.0)
    affine = np.eye(4)
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0
    return np.round(image).astype(np.int16), label, affine


def _write_case(task: tuple) -> str:
    import nibabel as nib

    root, split, index, shape, seed = task
    image, label, affine = make_brain_case(index, split, shape, seed)
    name = f"brain_{split}_{index:03d}.nii.gz"
    dirs = {"train": ("imagesTr", "labelsTr"), "val": ("imagesVal", "labelsVal")}[split]
    for array, d in ((image, dirs[0]), (label, dirs[1])):
        os.makedirs(os.path.join(root, d), exist_ok=True)
        img = nib.Nifti1Image(array, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        tmp = os.path.join(root, d, "." + name + ".tmp.nii.gz")
        nib.save(img, tmp)
        os.replace(tmp, os.path.join(root, d, name))
    return name


def make_brain_dataset(root: str, n_train: int = 8, n_val: int = 2, shape: tuple[int, int, int] = BRAIN_SHAPE, seed: int = 0, workers: int | None = None) -> str:
    """Write ``n_train`` + ``n_val`` cases in the folder layout (imagesTr/labelsTr/imagesVal/labelsVal).

    Idempotent: a folder already holding this dataset (same arguments, ``brain_manifest.json``) is kept.
    Cases are written in parallel processes (``workers``, default one per core, at most 10).
    """
    params = {"generator": "rep3d-brain", "version": 1, "n_train": n_train, "n_val": n_val, "shape": list(shape), "seed": seed}
    manifest = os.path.join(root, "brain_manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            if json.load(f) == params:
                return root
    tasks = [(root, "train", i, tuple(shape), seed) for i in range(n_train)] + [(root, "val", i, tuple(shape), seed) for i in range(n_val)]
    workers = workers or max(1, min(len(tasks), os.cpu_count() or 1, 10))
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(_write_case, tasks))
    else:
        for t in tasks:
            _write_case(t)
    with open(manifest, "w") as f:
        json.dump(params, f)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True)
    p.add_argument("--n_train", type=int, default=8)
    p.add_argument("--n_val", type=int, default=2)
    p.add_argument("--shape", type=int, nargs=3, default=list(BRAIN_SHAPE))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(make_brain_dataset(a.root, a.n_train, a.n_val, tuple(a.shape), a.seed))


if __name__ == "__main__":
    main()

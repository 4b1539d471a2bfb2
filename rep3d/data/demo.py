"""A deterministic synthetic CT-like dataset, for the demo run and the tests.

Each case is an abdomen-like phantom defined in world coordinates (mm, RAS+): a body (elliptic
cylinder of soft tissue with a fat rim) holding a liver on the patient's right, a spleen on the
left, a pair of kidneys at the back and the spine, each with its own Hounsfield value, plus noise
and a smooth intensity drift. The phantom is sampled on each case's own voxel grid, so the files
have varied headers (RAS, LPS and LAS orientations, anisotropic spacings, different origins)
while their content agrees in world space. Images are int16 (HU), labels uint8:
0 background, 1 liver, 2 kidney, 3 spleen, 4 bone.

Usage::

    python demo_data.py --root ./demo_data          # or: from demo_data import make_demo_dataset
"""

from __future__ import annotations

import os

import numpy as np

from rep3d.fileio import atomic_path, read_json, write_json

DEMO_ROOT_DEFAULT = "./demo_data"


DEMO_CLASS_NAMES = ("background", "liver", "kidney", "spleen", "bone")


DEMO_SPACING = (2.0, 2.0, 2.0)  # the demo preset resamples every case to this


DEMO_WINDOW = (-125.0, 275.0)  # the paper's abdominal CT window


DEMO_ROI = (32, 32, 32)


DEMO_SIZE = (48, 48, 48)  # field of view in voxels of DEMO_SPACING (96 mm a side)


MANIFEST = "demo_manifest.json"


_VERSION = 1


# Mean HU per structure: distinct enough to learn in minutes, in the order they are painted.
_HU = {"air": -1000.0, "fat": -90.0, "body": 30.0, "liver": 100.0, "spleen": 150.0, "kidney": 200.0, "bone": 600.0}


_NOISE_HU = 12.0


# Header styles cycled over the cases: orientation codes and native spacing (mm).
_STYLES = (
    ("RAS", (2.0, 2.0, 2.0)),
    ("LPS", (1.6, 1.6, 2.5)),
    ("RAS", (2.4, 2.4, 3.0)),
    ("LAS", (2.0, 2.0, 1.5)),
    ("LPS", (1.8, 1.8, 2.2)),
)


_SPLITS = {"train": ("imagesTr", "labelsTr", "demo_tr"), "val": ("imagesVal", "labelsVal", "demo_val"), "test": ("imagesTs", None, "demo_ts")}


_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def _affine(codes: str, spacing: tuple[float, float, float], shape: tuple[int, int, int], origin_shift: np.ndarray) -> np.ndarray:
    """Voxel-to-RAS+ world affine with voxel axes along ``codes`` and the grid centred near 0."""
    world = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
    aff = np.eye(4)
    aff[:3, :3] = 0.0
    for i, c in enumerate(codes):
        axis, sign = world[c]
        aff[axis, i] = sign * spacing[i]
    centre_vox = (np.asarray(shape) - 1) / 2.0
    aff[:3, 3] = -aff[:3, :3] @ centre_vox + origin_shift
    return aff


def make_demo_case(index: int, split: str = "train", size: tuple[int, int, int] = DEMO_SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic case: ``(image int16 HU, label uint8, affine 4x4)`` on the case's own grid.

    Args:
        index: case index within the split.
        split: ``"train"``, ``"val"`` or ``"test"`` (separate random streams).
        size: field of view in voxels of :data:`DEMO_SPACING`.
        seed: dataset seed; the same (seed, split, index) always gives the same arrays.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODE[split], int(index)]))
    codes, spacing = _STYLES[(index + 2 * _SPLIT_CODE[split]) % len(_STYLES)]
    fov = np.asarray(size, dtype=float) * np.asarray(DEMO_SPACING)
    shape = tuple(int(max(8, round(f / s))) for f, s in zip(fov, spacing))
    aff = _affine(codes, spacing, shape, rng.uniform(-4.0, 4.0, 3))
    # World coordinates (RAS+, mm) of every voxel centre.
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=-1)
    xyz = ijk @ aff[:3, :3].T.astype(np.float32) + aff[:3, 3].astype(np.float32)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    hx, hy, hz = fov / 2.0

    def jitter(v, frac=0.04):
        return v + rng.uniform(-frac, frac) * (2 * hx)

    def scale():
        return rng.uniform(0.85, 1.15)

    def ellipsoid(c, r):
        return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0

    image = np.full(shape, _HU["air"], dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    bx, by = 0.9 * hx * rng.uniform(0.92, 1.04), 0.75 * hy * rng.uniform(0.92, 1.04)
    body_r = (x / bx) ** 2 + (y / by) ** 2
    image[body_r <= 1.0] = _HU["fat"]
    image[body_r <= 0.82] = _HU["body"]
    s = scale()
    liver = ellipsoid((jitter(0.33 * hx), jitter(0.10 * hy), jitter(0.15 * hz)), (0.38 * hx * s, 0.36 * hy * s, 0.50 * hz * s))
    s = scale()
    spleen = ellipsoid((jitter(-0.45 * hx), jitter(0.0 * hy), jitter(0.25 * hz)), (0.20 * hx * s, 0.22 * hy * s, 0.32 * hz * s))
    kidneys = np.zeros(shape, dtype=bool)
    for side in (1.0, -1.0):
        s = scale()
        kidneys |= ellipsoid((jitter(side * 0.42 * hx), jitter(-0.38 * hy), jitter(-0.15 * hz)), (0.15 * hx * s, 0.14 * hy * s, 0.30 * hz * s))
    spine = ((x - jitter(0.0, 0.01)) / (0.13 * hx)) ** 2 + ((y - (-0.52 * hy)) / (0.13 * hy)) ** 2 <= 1.0
    for mask, name, value in ((liver, "liver", 1), (spleen, "spleen", 3), (kidneys, "kidney", 2), (spine, "bone", 4)):
        mask = mask & (body_r <= 0.82)
        image[mask] = _HU[name] + rng.uniform(-10.0, 10.0)
        label[mask] = value
    # A smooth drift (scanner inhomogeneity) so that a fixed threshold alone is not enough.
    drift = 15.0 * np.sin(x / (hx + 1e-6) * rng.uniform(1.0, 2.0) + rng.uniform(0, np.pi)) * np.cos(z / (hz + 1e-6) * rng.uniform(0.5, 1.5))
    image += np.where(body_r <= 1.0, drift, 0.0).astype(np.float32)
    image += rng.normal(0.0, _NOISE_HU, shape).astype(np.float32)
    return np.clip(np.round(image), -1024, 3071).astype(np.int16), label, aff


def _save(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    # Written under a hidden name then renamed, so an interrupted run leaves no half file that
    # the case listing (which skips hidden files) would pick up.
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


def _expected_files(root: str, n: dict[str, int]) -> list[tuple[str, int, str | None, str | None]]:
    out = []
    for split, count in n.items():
        img_dir, lab_dir, prefix = _SPLITS[split]
        for i in range(count):
            name = f"{prefix}_{i:03d}.nii.gz"
            out.append((split, i, os.path.join(root, img_dir, name), os.path.join(root, lab_dir, name) if lab_dir else None))
    return out


def make_demo_dataset(
    root: str = DEMO_ROOT_DEFAULT,
    n_train: int = 8,
    n_val: int = 2,
    n_test: int = 0,
    size: tuple[int, int, int] = DEMO_SIZE,
    seed: int = 0,
) -> str:
    """Write the synthetic dataset in the folder layout (imagesTr/labelsTr/imagesVal/labelsVal,
    imagesTs when ``n_test``) and return ``root``.

    Idempotent: when ``root`` already holds a complete dataset made with the same arguments
    (``demo_manifest.json``), nothing is written. A previous demo made with other arguments is
    replaced. A folder holding other NIfTI data is refused.

    Args:
        root: output folder.
        n_train: training cases (>= 1).
        n_val: validation cases (>= 1).
        n_test: unlabeled test cases written to imagesTs.
        size: field of view in voxels at the demo preset's spacing (2 mm).
        seed: the same seed gives the same arrays.

    Raises:
        ValueError: bad counts or sizes, or ``root`` holds data that is not a demo dataset.
    """
    if n_train < 1 or n_val < 1 or n_test < 0:
        raise ValueError(f"make_demo_dataset needs n_train >= 1, n_val >= 1, n_test >= 0; got {n_train}, {n_val}, {n_test}")
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 16:
        raise ValueError(f"size must be 3 integers >= 16 (voxels at 2 mm), got {size}")
    params = {"generator": "rep3d-demo", "version": _VERSION, "n_train": n_train, "n_val": n_val, "n_test": n_test, "size": list(size), "seed": int(seed)}
    manifest_path = os.path.join(root, MANIFEST)
    old = read_json(manifest_path)
    files = _expected_files(root, {"train": n_train, "val": n_val, "test": n_test})
    if old == params and all(os.path.isfile(p) for _, _, img, lab in files for p in (img, lab) if p):
        return root
    if old is None:
        for sub in ("imagesTr", "labelsTr", "imagesVal", "labelsVal", "imagesTs"):
            d = os.path.join(root, sub)
            if os.path.isdir(d) and any(f.endswith((".nii", ".nii.gz")) and not f.startswith(".") for f in os.listdir(d)):
                raise ValueError(f"{root} already holds NIfTI data that is not a demo dataset ({d}); pick another folder for the demo")
    else:
        # Files of the previous demo that the new one does not rewrite would be listed as cases.
        keep = {p for _, _, img, lab in files for p in (img, lab) if p}
        for sub in ("imagesTr", "labelsTr", "imagesVal", "labelsVal", "imagesTs"):
            d = os.path.join(root, sub)
            if os.path.isdir(d):
                for f in os.listdir(d):
                    p = os.path.join(d, f)
                    if f.startswith("demo_") and p not in keep:
                        os.remove(p)
        os.remove(manifest_path)
    for split, i, img_path, lab_path in files:
        os.makedirs(os.path.dirname(img_path), exist_ok=True)
        image, label, aff = make_demo_case(i, split, size, seed)
        _save(image, aff, img_path)
        if lab_path:
            os.makedirs(os.path.dirname(lab_path), exist_ok=True)
            _save(label, aff, lab_path)
    write_json(params, manifest_path)
    return root

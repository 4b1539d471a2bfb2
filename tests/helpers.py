"""What several test files share: THE tiny network config, tiny training flags, the tiny model and
checkpoint, NIfTI writers and affines. Fixtures built on these live in conftest.py.

Imported as ``from helpers import ...`` (pyproject.toml puts tests/ on the path).
"""

from __future__ import annotations

import os
import zlib

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn

import networks
from rep3d.config import DataConfig, NetworkConfig, RunConfig, SlidingWindowConfig, TrainConfig
from rep3d.data.dataset_config import DatasetConfig

# --------------------------------------------------------------------------------------------------
# the tiny network: REP3D / 3D UX-Net widths 8-16-16-32, one block per stage, kernel 5, hidden 32.
# Lists, as a checkpoint's JSON config holds them (NetworkConfig turns tuples into lists too).
# Never modify it in place: copy it ({**TINY, ...}); conftest.py checks it is unchanged.

TINY: dict = {"kernel_size": 5, "depths": [1, 1, 1, 1], "feature_size": [8, 16, 16, 32], "hidden_size": 32}


def as_flags(options: dict) -> list[str]:
    """Network options as command-line flags: ``{"depths": [1, 2]} -> ["--depths", "1", "2"]``."""
    flags: list[str] = []
    for name, value in options.items():
        flags += [f"--{name}", *(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))]
    return flags


#: TINY on the command line of main_train.py, test_seg.py and erf_analysis.py
TINY_FLAGS: list[str] = as_flags(TINY)


def tiny_argv(root: str, output: str, *extra: str) -> list[str]:
    """main_train.py's flags for a tiny run on the demo dataset at ``root`` (32^3 ROI, no workers)."""
    return [
        "--root", root, "--dataset", "demo", "--output", output, "--roi", "32", "32", "32",
        "--num_workers", "0", "--lr", "1e-3", "--sw_batch_size", "2", *TINY_FLAGS, *extra,
    ]  # fmt: skip


#: test_seg.py's flags for a quick, exactly comparable CPU prediction (float32: no bf16 autocast)
PREDICT_FAST: list[str] = ["--num_workers", "0", "--gpu", "-1", "--amp", "off"]


# --------------------------------------------------------------------------------------------------
# the tiny model and its checkpoint

CLASS_NAMES = ["background", "organ", "lesion"]


def tiny_model(seed: int = 0, num_classes: int = 3) -> nn.Module:
    """A tiny REP3D (LRBM, native depthwise) in eval mode whose every weight is moved off its init, so
    that the LRBM mask is far from trivial and two seeds predict visibly differently."""
    torch.manual_seed(seed)
    net = networks.build_network("REP3D", 1, num_classes, modulation="lrbm", dwconv="native", **TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.eval()


def write_tiny_checkpoint(path, seed: int = 0, num_classes: int = 3, spacing=(2.0, 2.0, 2.0)) -> str:
    """A format-2 checkpoint (what the Trainer writes) of :func:`tiny_model`: a 2 mm windowed custom
    dataset, 32^3 ROI, sliding window of 2 windows per pass at overlap 0.25. Returns the path."""
    net = tiny_model(seed, num_classes)
    names = (CLASS_NAMES + [f"c{i}" for i in range(3, num_classes)])[:num_classes]
    ds = DatasetConfig("custom", spacing, "window", -100.0, 300.0, num_classes, names, roi=(32, 32, 32), cache_rate=0.0)
    run = RunConfig(NetworkConfig("REP3D", 1, num_classes, {"modulation": "lrbm", **TINY}), DataConfig(dataset=ds), TrainConfig(),
                    SlidingWindowConfig(sw_batch_size=2, overlap=0.25))  # fmt: skip
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    torch.save(run.checkpoint(net.state_dict(), step=1), path)
    return str(path)


# --------------------------------------------------------------------------------------------------
# affines and NIfTI writers


def affine_for(codes: str = "RAS", spacing=(1.5, 1.5, 2.0), origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    """Voxel-to-world affine whose voxel axes point along ``codes`` (any permutation, e.g. PIR)."""
    world = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    aff = np.eye(4)
    aff[:3, :3] = 0.0
    for i, (c, s) in enumerate(zip(codes, spacing)):
        axis, sign = world[c]
        aff[axis, i] = sign * s
    aff[:3, 3] = origin
    return aff


def oblique_lps() -> tuple[np.ndarray, np.ndarray]:
    """``(directions, origin)``: an LPS voxel-to-world matrix with permuted, slightly rotated axes and
    a fractional origin (directions' columns are the voxel axes)."""
    th = 0.1
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    directions = rot @ np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1.0]]) * np.array([0.9, 1.1, 2.5])
    return directions, np.array([-12.3, 40.125, 7.75])


def save_nifti(path, array, affine=None, dtype=None) -> str:
    """Write ``array`` (cast to ``dtype`` if given) as NIfTI at ``path``, creating its folder;
    the affine defaults to :func:`affine_for`'s (RAS, 1.5 x 1.5 x 2 mm)."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype)
    nib.save(nib.Nifti1Image(array, affine_for() if affine is None else affine), path)
    return path


def phantom(shape=(20, 18, 12), seed=0, ct=True, num_classes=3):
    """``(image, label)``: a body (CT: soft tissue in air; MRI: positive in zero background) with
    one slab per foreground class."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000.0 if ct else 0.0, dtype=np.float32)
    inner = tuple(slice(2, s - 2) for s in shape)
    image[inner] = (40.0 if ct else 300.0) + rng.normal(0, 10, size=image[inner].shape)
    label = np.zeros(shape, np.uint8)
    for c, idx in enumerate(np.array_split(np.arange(3, shape[0] - 3), num_classes - 1), start=1):
        label[idx[0] : idx[-1] + 1, 4:-4, 3:-3] = c
        slab = (slice(idx[0], idx[-1] + 1), slice(4, -4), slice(3, -3))
        image[slab] = (100.0 if ct else 600.0) * c + rng.normal(0, 5, size=image[slab].shape)
    return image, label


def nnunet_v2(root, n=5, channels=("CT", "PET"), labels=None, shape=(20, 18, 12), test_cases=1) -> str:
    """An nnU-Net v2 raw dataset folder of :func:`phantom` cases: ``n`` training cases with
    ``channels``, ``test_cases`` in imagesTs, and its dataset.json."""
    import json

    labels = labels or {"background": 0, "liver": 1, "tumour": 2}
    for i in range(n):
        image, label = phantom(shape, seed=i)
        for c in range(len(channels)):
            save_nifti(os.path.join(root, "imagesTr", f"case_{i:03d}_{c:04d}.nii.gz"), image if c == 0 else np.abs(image) * 0.01 + c, dtype=np.int16 if c == 0 else np.float32)
        save_nifti(os.path.join(root, "labelsTr", f"case_{i:03d}.nii.gz"), label, dtype=np.uint8)
    for i in range(test_cases):
        image, _ = phantom(shape, seed=100 + i)
        for c in range(len(channels)):
            save_nifti(os.path.join(root, "imagesTs", f"new_{i:03d}_{c:04d}.nii.gz"), image, dtype=np.int16)
    meta = {"channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": labels, "numTraining": n, "file_ending": ".nii.gz"}
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)
    return str(root)


# test_seg.py's cases: a bright off-centre box (the organ) in a body in air, on several grids.
CASE_SHAPE = (24, 20, 14)
CASE_BOX = (slice(3, 13), slice(4, 12), slice(3, 9))  # off-centre: a flipped prediction would miss it


def case_affine(kind: str) -> np.ndarray:
    """The affine of :func:`write_case`'s ``kind``: ras, lps, aniso (LAS, strongly anisotropic) or
    oblique (rotated 20 degrees about z), with a fractional origin."""
    if kind == "ras":
        a = np.diag([2.0, 2.0, 2.0, 1.0])
    elif kind == "lps":
        a = np.diag([-1.6, -1.6, 2.5, 1.0])
    elif kind == "aniso":
        a = np.diag([-1.2, 2.4, 3.5, 1.0])
    elif kind == "oblique":
        t = np.deg2rad(20)
        a = np.eye(4)
        a[:3, :3] = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ np.diag([1.5, 1.8, 2.2])
    else:
        raise ValueError(f"unknown affine kind {kind!r}")
    a[:3, 3] = [12.3, -40.1, 7.7]
    return a


def write_case(folder, name: str, kind: str, label_folder=None, qform_only: bool = False, four_d: bool = False) -> str:
    """``folder/name.nii.gz``: an int16 CT-like :data:`CASE_SHAPE` volume with the box at
    :data:`CASE_BOX` on the grid of :func:`case_affine` ``(kind)``, and its label in ``label_folder``."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # stable across runs (hash() is salted)
    img = np.full(CASE_SHAPE, -1000.0, np.float32)  # air margin: the foreground crop and its inverse are exercised
    img[1:-1, 1:-1, 1:-1] = 0.0
    img[CASE_BOX] = 200.0
    img += rng.normal(0, 5, CASE_SHAPE).astype(np.float32)
    lab = np.zeros(CASE_SHAPE, np.uint8)
    lab[CASE_BOX] = 1
    os.makedirs(folder, exist_ok=True)
    data = img.astype(np.int16)[..., None] if four_d else img.astype(np.int16)
    nimg = nib.Nifti1Image(data, case_affine(kind))
    if qform_only:  # the affine then comes from a float32 quaternion: copied, not recomputed
        nimg.set_qform(case_affine(kind), code=1)
        nimg.set_sform(None, code=0)
    path = os.path.join(folder, f"{name}.nii.gz")
    nib.save(nimg, path)
    if label_folder is not None:
        os.makedirs(label_folder, exist_ok=True)
        nib.save(nib.Nifti1Image(lab, nib.load(path).affine, header=nib.load(path).header), os.path.join(label_folder, f"{name}.nii.gz"))
    return path


class PerVoxel(nn.Module):
    """Class 1 where the windowed intensity exceeds 0.5 (write_case's box), else 0; class 2 never. A
    per-voxel function: flip-equivariant and window-independent."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-10.0, 10.0, 0.0]).view(3, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([5.0, -5.0, -100.0]))

    def forward(self, x):
        return self.conv(x)

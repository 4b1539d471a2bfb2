"""Own datasets end to end (issue 14): `main_train.py --root DIR` alone trains on an nnU-Net v2 folder
with two channels and on an MSD folder with 4-D two-channel images; the plan and the split are written
and stored; `test_seg.py` predicts with the checkpoint and --root alone.

Tiny REP3D (helpers.TINY), synthetic 20 x 18 x 12 volumes.
"""

from __future__ import annotations

import importlib.util
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import main_train
import test_seg
from helpers import TINY_FLAGS, nnunet_v2, oblique_lps, phantom, save_nifti
from rep3d.config import RunConfig
from rep3d.data.image_io import read_header, write_like

# itk's SWIG bindings warn on import under Python 3.11+; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


def msd_two_channel(root: str, n: int = 4) -> str:
    training = []
    for i in range(n):
        image, label = phantom(seed=i, ct=False)
        both = np.stack([image, image * 0.5 + 10.0], axis=-1)  # 4-D: X, Y, Z, channel
        save_nifti(os.path.join(root, "imagesTr", f"prostate_{i:02d}.nii.gz"), both)
        save_nifti(os.path.join(root, "labelsTr", f"prostate_{i:02d}.nii.gz"), label, dtype=np.uint8)
        training.append({"image": f"./imagesTr/prostate_{i:02d}.nii.gz", "label": f"./labelsTr/prostate_{i:02d}.nii.gz"})
    image, _ = phantom(seed=50, ct=False)
    save_nifti(os.path.join(root, "imagesTs", "prostate_50.nii.gz"), np.stack([image, image * 0.5 + 10.0], axis=-1))
    meta = {"modality": {"0": "T2", "1": "ADC"}, "labels": {"0": "background", "1": "zone", "2": "lesion"}, "training": training, "test": ["./imagesTs/prostate_50.nii.gz"]}
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)
    return root


@pytest.mark.parametrize("layout", ["nnunet_v2", "msd_4d"])
def test_root_alone_trains_on_two_channels_and_stores_the_plan(tmp_path, layout):
    root = str(tmp_path / "data")
    nnunet_v2(root) if layout == "nnunet_v2" else msd_two_channel(root)
    out = str(tmp_path / "run")
    logs: list[str] = []
    args = main_train.parse_args(["--root", root, "--output", out, "--max_iter", "2", "--eval_step", "2", "--num_workers", "0", "--sw_batch_size", "1", *TINY_FLAGS])
    summary = main_train.train(args, log=logs.append)
    assert summary["steps"] == 2
    ckpt = torch.load(os.path.join(out, "best_metric_model.pth"), map_location="cpu", weights_only=True)
    cfg = RunConfig.from_checkpoint(ckpt)
    assert cfg.network.in_channels == 2 and cfg.data.dataset.in_channels == 2 and cfg.network.out_channels == 3
    assert cfg.data.plan is not None and len(cfg.data.dataset.channel_norms()) == 2
    plan = json.load(open(os.path.join(out, "plan.json")))
    assert plan == json.loads(json.dumps(cfg.data.plan))
    splits = json.load(open(os.path.join(out, "splits.json")))
    assert splits["validation_cases"] and not set(map(str, splits["validation_cases"])) & set(map(str, splits["training"]))
    assert any(m.startswith("validation cases:") for m in logs)
    weight = ckpt["state_dict"]
    assert any(v.ndim == 5 and v.shape[1] == 2 for v in weight.values())  # the stem takes 2 channels
    # ... and predicts the test cases with --root alone, on each input's own grid

    pred = str(tmp_path / "pred")
    assert test_seg.main(["--trained_weights", os.path.join(out, "best_metric_model.pth"), "--root", root, "--output", pred, "--gpu", "-1"]) == 0
    test_image = os.path.join(root, "imagesTs", "new_000_0000.nii.gz" if layout == "nnunet_v2" else "prostate_50.nii.gz")
    written = nib.load(os.path.join(pred, ("new_000" if layout == "nnunet_v2" else "prostate_50") + "_seg.nii.gz"))
    src = nib.load(test_image)
    assert written.shape == src.shape[:3] and np.array_equal(written.affine, src.affine)


def test_two_channel_model_predicts_with_root_alone(tmp_path):

    root = nnunet_v2(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    main_train.train(main_train.parse_args(["--root", root, "--output", out, "--max_iter", "1", "--eval_step", "1", "--num_workers", "0", "--sw_batch_size", "1", *TINY_FLAGS]), log=lambda m: None)
    pred = str(tmp_path / "pred")
    # No dataset flag: channels, spacing and normalisation come from the checkpoint's plan.
    assert test_seg.main(["--trained_weights", os.path.join(out, "best_metric_model.pth"), "--root", root, "--output", pred, "--gpu", "-1", "--no_hd95"]) == 0
    written = os.path.join(pred, "new_000_seg.nii.gz")
    src = nib.load(os.path.join(root, "imagesTs", "new_000_0000.nii.gz"))
    assert nib.load(written).shape == src.shape and np.array_equal(nib.load(written).affine, src.affine)
    # an input missing one of the two channels is named, with the channel it lacks
    lone = tmp_path / "lone"
    lone.mkdir()
    os.link(os.path.join(root, "imagesTs", "new_000_0000.nii.gz"), lone / "solo_0000.nii.gz")
    assert test_seg.main(["--trained_weights", os.path.join(out, "best_metric_model.pth"), "--input", str(lone), "--output", str(tmp_path / "p2"), "--gpu", "-1"]) == 2


@pytest.mark.parametrize("ending", [".nrrd", ".mha"])
def test_predictions_in_the_inputs_own_format_and_geometry(tmp_path, ending):
    if ending == ".mha" and importlib.util.find_spec("itk") is None:
        pytest.skip("itk not installed (pip install -r requirements-formats.txt)")
    root = str(tmp_path / "data")
    for i in range(3):
        image, label = phantom(seed=i)
        save_nifti(os.path.join(root, "imagesTr", f"c{i}.nii.gz"), image)
        save_nifti(os.path.join(root, "labelsTr", f"c{i}.nii.gz"), label, dtype=np.uint8)
    out = str(tmp_path / "run")
    main_train.train(main_train.parse_args(["--root", root, "--output", out, "--max_iter", "1", "--eval_step", "1", "--num_workers", "0", "--sw_batch_size", "1", *TINY_FLAGS]), log=lambda m: None)
    # the input: an oblique LPS volume in the format under test, written from a NIfTI with its geometry
    image, _ = phantom(seed=9)
    directions, origin = oblique_lps()
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = directions, origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    nifti = save_nifti(str(tmp_path / "src" / "scan.nii.gz"), image, affine=ras)
    scan = write_like(image.astype(np.int16), nifti, str(tmp_path / "in" / f"scan{ending}"), dtype=np.int16)
    pred = str(tmp_path / "pred")
    assert test_seg.main(["--trained_weights", os.path.join(out, "best_metric_model.pth"), "--input", scan, "--output", pred, "--gpu", "-1"]) == 0
    written = os.path.join(pred, f"scan_seg{ending}")
    got, want = read_header(written), read_header(scan)
    assert got.shape == want.shape == image.shape
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-5)

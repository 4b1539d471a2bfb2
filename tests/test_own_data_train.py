"""Own datasets end to end (issue 14): `main_train.py --root DIR` alone trains on an nnU-Net v2 folder
with two channels and on an MSD folder with 4-D two-channel images; the plan and the split are written
and stored; `test_seg.py` predicts with the checkpoint and --root alone.

Tiny REP3D (kernel 5, widths 8-32), synthetic 20 x 18 x 12 volumes.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import main_train
from configs import RunConfig
from tests.test_own_data import affine, nnunet_v2, phantom, save

TINY = ["--feature_size", "8", "16", "16", "32", "--depths", "1", "1", "1", "1", "--kernel_size", "5", "--hidden_size", "32"]


def msd_two_channel(root: str, n: int = 4) -> str:
    training = []
    for i in range(n):
        image, label = phantom(seed=i, ct=False)
        both = np.stack([image, image * 0.5 + 10.0], axis=-1)  # 4-D: X, Y, Z, channel
        save(os.path.join(root, "imagesTr", f"prostate_{i:02d}.nii.gz"), both)
        save(os.path.join(root, "labelsTr", f"prostate_{i:02d}.nii.gz"), label, dtype=np.uint8)
        training.append({"image": f"./imagesTr/prostate_{i:02d}.nii.gz", "label": f"./labelsTr/prostate_{i:02d}.nii.gz"})
    image, _ = phantom(seed=50, ct=False)
    save(os.path.join(root, "imagesTs", "prostate_50.nii.gz"), np.stack([image, image * 0.5 + 10.0], axis=-1))
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
    args = main_train.parse_args(["--root", root, "--output", out, "--max_iter", "2", "--eval_step", "2", "--num_workers", "0", "--sw_batch_size", "1", *TINY])
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

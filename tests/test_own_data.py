"""Own datasets as people have them: nnU-Net v2 / MSD / MONAI folders, several channels, other
formats, settings planned from the data (planning.py, image_io.py, load_datasets_transforms.py).

Every dataset is synthetic, 16-32 voxels a side, written to tmp_path.
"""

from __future__ import annotations

import importlib.util
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import affine_for, nnunet_v2, oblique_lps, phantom, save_nifti
from rep3d.data.cases import case_name, describe_validation, list_cases, list_images
from rep3d.data.checks import check_cases, check_dataset, check_input_channels
from rep3d.data.dataset_config import DataError, DatasetConfig, get_dataset_config
from rep3d.data.image_io import (
    EXTRA_HINT,
    is_dicom_dir,
    output_path_like,
    read_array,
    read_header,
    write_like,
)
from rep3d.data.transforms import (
    get_post_transforms,
    get_test_transforms,
    get_val_transforms,
)
from rep3d.planning import (
    load_plan,
    plan_dataset,
    plan_roi,
    resolve_dataset,
    target_spacing,
)

# itk's SWIG bindings warn on import under Python 3.11+; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")
needs_itk = pytest.mark.skipif(importlib.util.find_spec("itk") is None, reason=f"itk not installed ({EXTRA_HINT})")


# --------------------------------------------------------------------------------------------
# nnU-Net v2, MSD and MONAI folder layouts, planned from --root alone
# --------------------------------------------------------------------------------------------


def test_nnunet_v2_two_channels_listed_planned_loaded(tmp_path):
    root = nnunet_v2(tmp_path / "Dataset001_Two")
    train, val = list_cases(root, "train"), list_cases(root, "val")
    assert len(train) == 4 and len(val) == 1
    assert all(isinstance(c["image"], list) and len(c["image"]) == 2 for c in train + val)
    assert [os.path.basename(p) for p in val[0]["image"]] == ["case_000_0000.nii.gz", "case_000_0001.nii.gz"]
    assert val[0]["label"].endswith("labelsTr/case_000.nii.gz")
    test = list_cases(root, "test")
    assert len(test) == 1 and len(test[0]["image"]) == 2 and "label" not in test[0]
    assert "fold 0 of 5 by sorted case name" in describe_validation(root) and "1 of 5" in describe_validation(root)

    cfg, plan = resolve_dataset(None, root)
    assert plan is not None and plan.layout == "nnunet_v2" and plan.n_cases == 5  # the validation fold too
    assert (cfg.name, cfg.in_channels, cfg.channel_names) == ("planned", 2, ["CT", "PET"])
    assert (cfg.num_classes, cfg.class_names) == (3, ["background", "liver", "tumour"])
    assert cfg.spacing == (1.5, 1.5, 2.0) and cfg.intensity == "mixed"
    ct, pet = cfg.channel_norms()
    assert ct["scheme"] == "ct" and pet == {"scheme": "zscore"}
    # the foreground of the phantom holds 100 and 200 HU: the percentiles bracket them
    assert 80 < ct["lower"] < 100 and 200 < ct["upper"] < 220 and 100 < ct["mean"] < 200 and ct["std"] > 0
    assert cfg.roi == (32, 32, 16)  # the median shape 20x18x12 (already at the target spacing), in multiples of 16

    out = get_val_transforms(cfg)(val[0])
    assert out["image"].shape[0] == 2 and out["label"].shape[0] == 1 and out["image"].shape[1:] == out["label"].shape[1:]
    assert float(out["image"][0].min()) >= (ct["lower"] - ct["mean"]) / ct["std"] - 1e-4  # clipped, then z-scored
    assert float(out["image"][0].max()) <= (ct["upper"] - ct["mean"]) / ct["std"] + 1e-4
    nz = out["image"][1][out["image"][1] != 0]
    assert abs(float(nz.mean())) < 1e-3 and abs(float(nz.std()) - 1) < 1e-2
    assert set(torch.unique(out["label"]).tolist()) == {0, 1, 2}
    check_dataset(cfg, root)  # all consistent: no DataError

    # the plan travels as JSON, and the config as its dict (checkpoints, configs.DataConfig)
    path = plan.save(str(tmp_path / "run" / "plan.json"))
    assert load_plan(path) == plan
    assert load_plan(path).dataset_config() == cfg
    assert DatasetConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert "channel 'CT' (CT, dataset.json): CT: clip" in plan.describe()


def test_planned_settings_overridden_by_flags_and_presets(tmp_path):
    root = nnunet_v2(tmp_path / "d", n=3)
    cfg, plan = resolve_dataset(None, root, a_min=-100.0, a_max=300.0, roi=(48, 48, 48), spacing=(2, 2, 2))
    assert plan is not None
    # a window replaces the CT channel's planned normalisation; PET keeps its own
    assert cfg.channel_norms() == [{"scheme": "window", "a_min": -100.0, "a_max": 300.0}, {"scheme": "zscore"}]
    assert (cfg.roi, cfg.spacing) == ((48, 48, 48), (2.0, 2.0, 2.0))
    cfg, plan = resolve_dataset(None, root, intensity="zscore")
    assert cfg.intensity == "zscore" and cfg.in_channels == 2
    # a preset is a preset (and says what the data contradict: its one channel, its classes)
    cfg, plan = resolve_dataset("kits", root)
    assert plan is None and cfg.in_channels == 1 and cfg.num_classes == 4
    with pytest.raises(DataError) as e:
        check_dataset(cfg, root)
    assert "lists 3 labels" in str(e.value) and "but --dataset kits takes 1 channel" in str(e.value)


def test_msd_task_with_4d_two_channel_images(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    training = []
    for i in range(4):
        image, label = phantom((18, 16, 12), seed=i, ct=False)
        save_nifti(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz", np.stack([image, image * 0.5 + 10 * (image > 0)], axis=-1), dtype=np.float32)
        save_nifti(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", label, dtype=np.uint8)
        training.append({"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w"}, "labels": {"0": "background", "1": "edema", "2": "tumour"},
        "numTraining": 4, "training": training, "test": [],
    }))
    cfg, plan = resolve_dataset(None, str(root))
    assert plan.layout == "msd" and plan.modality_source == "dataset.json"
    assert (cfg.in_channels, cfg.channel_names, cfg.intensity) == (2, ["FLAIR", "T1w"], "zscore")
    assert cfg.class_names == ["background", "edema", "tumour"]
    case = list_cases(str(root), "val")[0]
    assert isinstance(case["image"], str)  # one 4-D file holds both channels
    out = get_val_transforms(cfg)(case)
    assert out["image"].shape[0] == 2 and out["image"].shape[1:] == out["label"].shape[1:]
    test = get_test_transforms(cfg)({"image": case["image"]})
    assert torch.equal(test["image"].as_tensor(), out["image"].as_tensor())
    check_dataset(cfg, str(root))
    # a 3-D image among the 4-D ones is one channel short
    save_nifti(root / "imagesTr" / "BRATS_001.nii.gz", phantom((18, 16, 12), ct=False)[0])
    with pytest.raises(DataError, match=r"BRATS_001.nii.gz: case 'BRATS_001' has 1 channel .* takes 2 channels \(FLAIR, T1w\)"):
        check_dataset(cfg, str(root))


def test_monai_folder_classes_from_label_values_and_guessed_ct(tmp_path):
    root = tmp_path / "folder"
    for i in range(3):
        image, label = phantom((20, 18, 12), seed=i, num_classes=3)
        label[label == 2] = 3  # values 0, 1, 3: class 2 is never drawn
        save_nifti(root / "imagesTr" / f"c{i}.nii.gz", image, dtype=np.int16)
        save_nifti(root / "labelsTr" / f"c{i}.nii.gz", label, dtype=np.uint8)
    cfg, plan = resolve_dataset(None, str(root))
    assert plan.layout == "folder" and plan.modalities == ["CT"] and plan.modality_source == "guessed from intensities"
    assert (cfg.num_classes, cfg.class_names, cfg.channel_names) == (4, ["background", "class_1", "class_2", "class_3"], ["image"])
    assert plan.label_values == [0, 1, 3] and any("[2]" in n for n in plan.notes)
    out = get_val_transforms(cfg)(list_cases(str(root), "val")[0])
    assert out["image"].shape[0] == 1
    # non-negative intensities (MRI-like) are z-scored per volume
    mri = tmp_path / "mri"
    for i in range(2):
        image, label = phantom((16, 16, 16), seed=i, ct=False)
        save_nifti(mri / "imagesTr" / f"m{i}.nii.gz", image)
        save_nifti(mri / "labelsTr" / f"m{i}.nii.gz", label, dtype=np.uint8)
    cfg, plan = resolve_dataset(None, str(mri))
    assert plan.modalities == ["MRI"] and cfg.intensity == "zscore" and cfg.channel_norms() == [{"scheme": "zscore"}]


# --------------------------------------------------------------------------------------------
# the plan's rules
# --------------------------------------------------------------------------------------------


def test_anisotropic_plan_takes_the_10th_percentile_on_the_coarse_axis(tmp_path):
    root = tmp_path / "aniso"
    z_spacings = [5.0, 5.0, 5.0, 4.0, 2.5, 5.0, 5.0, 5.0, 5.0, 5.0]
    for i, dz in enumerate(z_spacings):
        image, label = phantom((32, 32, 8), seed=i, ct=False)
        save_nifti(root / "imagesTr" / f"a{i}.nii.gz", image, affine_for(spacing=(0.8, 0.8, dz)))
        save_nifti(root / "labelsTr" / f"a{i}.nii.gz", label, affine_for(spacing=(0.8, 0.8, dz)), np.uint8)
    plan = plan_dataset(str(root))
    expected_z = float(np.percentile(z_spacings, 10))  # 3.85, not the median 5
    assert plan.spacing[:2] == [0.8, 0.8] and plan.spacing[2] == pytest.approx(expected_z)
    assert "anisotropic" in plan.spacing_rule and plan.median_spacing[2] == 5.0
    # the ROI follows the median resampled shape (32 x 32 x ~10), in multiples of 16
    assert plan.roi == [32, 32, 16] and plan_roi(plan.median_resampled_shape, roi_multiple=8) == [32, 32, 16]
    assert plan_roi([200, 150, 40], (96, 96, 96), 16) == [96, 96, 48]

    # the rule itself: median when the coarse axis is not 3x coarser, or not 3x shorter in voxels
    sp = np.array([[0.8, 0.8, 5.0]] * 9 + [[0.8, 0.8, 2.0]])
    assert target_spacing(sp, np.array([[32, 32, 8]] * 10))[0] == pytest.approx([0.8, 0.8, 2.0 + 0.9 * 3.0])  # 10th percentile, linear
    assert target_spacing(sp, np.array([[32, 32, 30]] * 10)) == ([0.8, 0.8, 5.0], "median spacing")
    assert target_spacing(np.array([[1.0, 1.0, 2.5]] * 4), np.array([[64, 64, 8]] * 4))[1] == "median spacing"
    # the 10th percentile is never finer than the other axes
    sp = np.array([[0.8, 0.8, 5.0]] * 8 + [[0.8, 0.8, 0.5]] * 2)
    assert target_spacing(sp, np.array([[32, 32, 8]] * 10))[0][2] == pytest.approx(0.8, abs=1e-4)


# --------------------------------------------------------------------------------------------
# other formats: .nrrd / .nhdr / .mha read, label maps written back with the exact geometry
# --------------------------------------------------------------------------------------------


def _fake_prediction_written_back(cfg, path, out_path):
    """Pre-process ``path`` as inference does, draw a prediction, invert it and write it back."""
    from monai.data import decollate_batch, list_data_collate

    test_tf = get_test_transforms(cfg)
    batch = list_data_collate([test_tf({"image": path})])
    x = batch["image"][:, :1]
    bright = (x > x.mean()).float()
    batch["pred"] = torch.cat([1 - bright, bright], dim=1)
    post = get_post_transforms(test_tf, cfg)
    [result] = [post(d) for d in decollate_batch(batch)]
    return write_like(result["pred"], path, out_path)


def test_nrrd_inputs_planned_loaded_and_written_back(tmp_path):
    import nrrd

    root = tmp_path / "nrrd"
    directions, origin = oblique_lps()
    hdr = {"space": "left-posterior-superior", "space directions": directions.T, "space origin": origin, "kinds": ["domain"] * 3}
    for i in range(3):
        image, label = phantom((20, 16, 10), seed=i, num_classes=2)
        os.makedirs(root / "imagesTr", exist_ok=True)
        os.makedirs(root / "labelsTr", exist_ok=True)
        nrrd.write(str(root / "imagesTr" / f"n{i}.nrrd"), image.astype(np.int16), hdr, index_order="F")
        nrrd.write(str(root / "labelsTr" / f"n{i}.nrrd"), label, hdr, index_order="F")
    nrrd.write(str(root / "n_detached.nhdr"), phantom((20, 16, 10), seed=9)[0].astype(np.int16), hdr, index_order="F", detached_header=True)
    cfg, plan = resolve_dataset(None, str(root))
    assert plan.modalities == ["CT"] and cfg.num_classes == 2
    assert plan.spacing == pytest.approx([0.9, 1.1, 2.5])
    out = get_val_transforms(cfg)(list_cases(str(root), "val")[0])
    assert out["image"].shape[0] == 1 and out["image"].shape == out["label"].shape

    for src in (str(root / "imagesTr" / "n0.nrrd"), str(root / "n_detached.nhdr")):
        written = _fake_prediction_written_back(cfg, src, output_path_like(src, str(tmp_path / "pred")))
        assert written.endswith("_seg.nrrd") or written.endswith("_seg.nhdr")
        a, b = nrrd.read_header(src), nrrd.read_header(written)
        assert list(a["sizes"]) == list(b["sizes"]) and a["space"] == b["space"]
        assert np.array_equal(a["space directions"], b["space directions"]) and np.array_equal(a["space origin"], b["space origin"])
        seg = read_array(written)
        assert set(np.unique(seg)) == {0, 1}  # the bright slab came back on the native grid


@needs_itk
def test_mha_inputs_planned_loaded_and_written_back(tmp_path):
    import itk

    root = tmp_path / "mha"
    directions, origin = oblique_lps()
    spacing = np.sqrt((directions**2).sum(axis=0))

    def write_mha(path, array):
        img = itk.image_from_array(np.ascontiguousarray(array.transpose(2, 1, 0)))
        img.SetSpacing(spacing.tolist())
        img.SetOrigin(origin.tolist())
        img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(directions / spacing)))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        itk.imwrite(img, path, compression=True)
        return path

    for i in range(3):
        image, label = phantom((20, 16, 10), seed=i, num_classes=2)
        write_mha(str(root / "imagesTr" / f"m{i}.mha"), image.astype(np.int16))
        write_mha(str(root / "labelsTr" / f"m{i}.mha"), label)
    cfg, plan = resolve_dataset(None, str(root))
    assert plan.spacing == pytest.approx(spacing.tolist()) and cfg.num_classes == 2
    case = list_cases(str(root), "val")[0]
    out = get_val_transforms(cfg)(case)
    assert out["image"].shape[0] == 1 and out["image"].shape == out["label"].shape

    src = case["image"]
    written = _fake_prediction_written_back(cfg, src, output_path_like(src, str(tmp_path / "pred")))
    assert written.endswith("_seg.mha")

    def geometry(path):
        io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
        io.SetFileName(path)
        io.ReadImageInformation()
        return ([io.GetDimensions(i) for i in range(3)], [io.GetOrigin(i) for i in range(3)], [io.GetSpacing(i) for i in range(3)], [io.GetDirection(i) for i in range(3)])

    assert geometry(written) == geometry(src)
    h = read_header(written)
    assert np.array_equal(h.affine, read_header(src).affine) and h.shape == (20, 16, 10)
    assert set(np.unique(read_array(written))) == {0, 1}


def test_write_like_nifti_keeps_header_geometry_and_refuses_wrong_shapes(tmp_path):
    aff = np.array([[0, -0.8, 0, 10.5], [0.9, 0, 0.05, -3], [0, 0, 5, 2], [0, 0, 0, 1.0]])
    img = nib.Nifti1Image(np.zeros((12, 10, 6), np.int16), aff)
    img.header.set_slope_inter(2.0, -1024.0)  # a CT rescale that must not reach the labels
    img.set_qform(aff, code=1)
    ref = str(tmp_path / "ct_0000.nii.gz")
    nib.save(img, ref)
    labels = np.zeros((12, 10, 6), np.uint8)
    labels[2:5, 3:7, 1:4] = 2
    out = write_like(torch.as_tensor(labels)[None], ref, output_path_like(ref, str(tmp_path), name="ct"))
    assert out.endswith("ct_seg.nii.gz")
    back = nib.load(out)
    assert np.array_equal(back.affine, nib.load(ref).affine) and back.header.get_qform(coded=True)[1] == 1
    assert np.array_equal(np.asarray(back.dataobj), labels) and back.get_data_dtype() == np.uint8
    with pytest.raises(ValueError, match="differs from"):
        write_like(labels[:, :, :5], ref, str(tmp_path / "x.nii.gz"))


# --------------------------------------------------------------------------------------------
# one message for everything wrong
# --------------------------------------------------------------------------------------------


def test_every_problem_named_in_one_message(tmp_path):
    root = nnunet_v2(tmp_path / "Dataset002_Bad", n=6, channels=("T2", "ADC"), labels={"background": 0, "zone": 1})
    img = os.path.join(root, "imagesTr")
    lab = os.path.join(root, "labelsTr")
    image, _ = phantom((20, 18, 12), seed=1)
    os.remove(os.path.join(img, "case_001_0001.nii.gz"))  # a case missing one channel
    save_nifti(os.path.join(img, "case_002_0001.nii.gz"), image[:, :, :10])  # channels of different shapes
    save_nifti(os.path.join(img, "case_003_0001.nii.gz"), image, affine_for(origin=(12.0, -20.0, 5.0)))  # ... or geometry
    save_nifti(os.path.join(lab, "orphan.nii.gz"), np.zeros((20, 18, 12)), dtype=np.uint8)  # a label without image
    # dataset.json declares 2 classes, the label files hold 0, 1 and 2

    with pytest.raises(DataError) as e:
        resolve_dataset(None, root)
    text = str(e.value)
    expected = [
        (os.path.join(img, "case_001_0001.nii.gz"), "lacks channel 0001 (ADC)"),
        (os.path.join(img, "case_002_0001.nii.gz"), "has shape (20, 18, 10), channel 0"),
        (os.path.join(img, "case_003_0001.nii.gz"), "geometry (affine) differs from channel 0's"),
        (os.path.join(lab, "orphan.nii.gz"), "label without an image"),
        (os.path.join(root, "dataset.json"), "disagree with the label files, which also hold 2 (in "),
    ]
    for path, needle in expected:
        assert any(p.startswith(path) and needle in p and "Fix:" in p for p in e.value.problems), f"no '{needle}' for {path} in:\n{text}"
    assert len(e.value.problems) == len(expected)
    assert "case_001.nii.gz" not in text  # the label of the incomplete case is not called an orphan

    # the same data with a preset: the same problems from the checks, in one message too
    with pytest.raises(DataError) as e2:
        check_dataset(get_dataset_config("pancreas"), root)
    assert sum("lacks channel" in p for p in e2.value.problems) == 1


def test_missing_folder_reported_as_such_whatever_else_is_missing(tmp_path):
    typo = str(tmp_path / "Datset001")
    with pytest.raises(DataError) as e:
        resolve_dataset(None, typo)
    assert e.value.problems == [f"{typo}: dataset folder not found. Fix: pass an existing folder to --root"]
    with pytest.raises(DataError) as e:
        resolve_dataset("custom", typo)  # and the flags it lacks, in the same message
    assert e.value.problems[0].startswith(f"{typo}: dataset folder not found") and "--spacing" in e.value.problems[1]
    with pytest.raises(DataError, match="datalist file not found"):
        plan_dataset(None, datalist=str(tmp_path / "none.json"))


def test_inference_inputs_checked_for_the_trained_channels(tmp_path):
    cfg = get_dataset_config("custom", spacing=(1, 1, 1), intensity="zscore", num_classes=2, channel_names=["T2", "ADC"])
    assert cfg.in_channels == 2
    folder = tmp_path / "in"
    image, _ = phantom((16, 16, 16), ct=False)
    for c in (0, 1):
        save_nifti(folder / f"p1_{c:04d}.nii.gz", image)
    save_nifti(folder / "p2_0000.nii.gz", image)
    with pytest.raises(DataError, match=r"p2_0001.nii.gz: case 'p2' lacks channel 0001"):
        list_images(str(folder), channels=2)
    # a single channel file brings its siblings along
    assert list_images(str(folder / "p1_0000.nii.gz")) == [{"image": [str(folder / "p1_0000.nii.gz"), str(folder / "p1_0001.nii.gz")]}]
    assert check_input_channels(list_images(str(folder / "p1_0000.nii.gz")), cfg) == []
    [problem] = check_input_channels([{"image": str(folder / "p2_0000.nii.gz")}], cfg)
    assert problem.startswith(str(folder / "p2_0000.nii.gz")) and "missing channel 1 'ADC' (expected " + str(folder / "p2_0001.nii.gz") in problem
    four_d = save_nifti(tmp_path / "three.nii.gz", np.stack([image] * 3, axis=-1))
    assert "has 3 channels" in check_input_channels([four_d], cfg)[0]
    with pytest.raises(DataError, match="takes 2 channels"):
        check_cases([{"image": str(folder / "p2_0000.nii.gz")}], cfg)


def test_dataset_config_channels_and_old_format(tmp_path):
    old = {"name": "custom", "spacing": [2, 2, 2], "intensity": "window", "a_min": -100, "a_max": 300, "num_classes": 3,
           "class_names": ["background", "a", "b"], "roi": [32, 32, 32], "cache_rate": 0.1}
    cfg = DatasetConfig(**old)  # a checkpoint / --dataset_config of before
    assert cfg.in_channels == 1 and cfg.normalization is None and cfg == get_dataset_config("amos", **{k: v for k, v in old.items() if k != "name"}).__class__(**old)
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({**{k: v for k, v in old.items() if k != "name"}, "channel_names": ["CT", "PET"],
                             "normalization": [{"scheme": "ct", "lower": -50, "upper": 250, "mean": 80, "std": 60}, {"scheme": "zscore"}]}))
    cfg = get_dataset_config("custom", str(f))
    assert cfg.in_channels == 2 and cfg.intensity == "mixed" and cfg.a_min is None
    with pytest.raises(ValueError, match="normalization has 1 entries but there are 2 channels"):
        get_dataset_config("custom", str(f), normalization=[{"scheme": "zscore"}])
    with pytest.raises(ValueError, match=r"needs numbers for \['std'\]"):
        get_dataset_config("custom", str(f), normalization=[{"scheme": "ct", "lower": 0, "upper": 1, "mean": 0}, {"scheme": "zscore"}])
    for name in ("amos", "kits", "demo"):
        preset = get_dataset_config(name)
        assert preset.in_channels == 1 and preset.channel_norms() == [{"scheme": "window", "a_min": preset.a_min, "a_max": preset.a_max}]


@needs_itk
def test_dicom_series_folders_listed_planned_and_labels_written_as_nifti(tmp_path):
    import itk

    def write_series(folder, zyx, spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, 5.0), uid="1.2.826.0.1.3680043.2.1125"):
        os.makedirs(folder)
        for k in range(zyx.shape[0]):  # one file per slice, one series UID, positions along z
            sl = itk.image_from_array(np.ascontiguousarray(zyx[k : k + 1]))
            sl.SetSpacing(list(spacing))
            sl.SetOrigin([origin[0], origin[1], origin[2] + spacing[2] * k])
            d = sl.GetMetaDataDictionary()
            for tag, val in {"0008|0060": "CT", "0020|000d": f"{uid}.1", "0020|000e": f"{uid}.2", "0008|0018": f"{uid}.3.{k + 1}", "0020|0013": str(k + 1)}.items():
                d[tag] = val
            io = itk.GDCMImageIO.New()
            io.KeepOriginalUIDOn()
            itk.imwrite(sl, os.path.join(folder, f"IM{k:04d}.dcm"), imageio=io)

    root = tmp_path / "dicom"
    for i in range(3):
        image, label = phantom((16, 14, 8), seed=i, num_classes=2)
        series = str(root / "imagesTr" / f"patient{i}")
        write_series(series, image.astype(np.int16).transpose(2, 1, 0))
        assert is_dicom_dir(series)
        # labels drawn on the series' grid, written as NIfTI with the affine MONAI reads from it
        write_like(label, series, str(root / "labelsTr" / f"patient{i}.nii.gz"))
    assert output_path_like(series, "/out") == "/out/patient2_seg.nii.gz"
    cases = list_cases(str(root), "train") + list_cases(str(root), "val")
    assert sorted(case_name(c["image"]) for c in cases) == ["patient0", "patient1", "patient2"]
    cfg, plan = resolve_dataset(None, str(root))
    assert plan.spacing == pytest.approx([0.8, 0.9, 2.5]) and plan.modalities == ["CT"] and cfg.num_classes == 2
    out = get_val_transforms(cfg)(cases[0])
    assert out["image"].shape[0] == 1 and out["image"].shape == out["label"].shape
    assert set(torch.unique(out["label"]).tolist()) == {0, 1}

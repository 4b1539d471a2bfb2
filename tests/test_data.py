"""Tests of the data pipeline (load_datasets_transforms.py) and the demo generator (demo_data.py).

Every file is tiny and written to tmp_path; no test downloads or reads real data.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import main_train
from helpers import affine_for, save_nifti
from rep3d.cli import add_dataset_args
from rep3d.commands.train import run_config_from_args
from rep3d.data.augment import BatchAugment
from rep3d.data.cases import case_name, list_cases, list_images
from rep3d.data.checks import check_cases, check_dataset
from rep3d.data.dataset_config import DataError, get_dataset_config
from rep3d.data.demo import (
    DEMO_CLASS_NAMES,
    DEMO_SPACING,
    make_demo_case,
    make_demo_dataset,
)
from rep3d.data.image_io import output_path_like, write_like
from rep3d.data.loader_choice import choose_loader, estimate_cache_bytes
from rep3d.data.loaders import (
    TrainLoader,
    _collate_crops,
    _Endless,
    get_loaders,
    get_test_loader,
)
from rep3d.data.transforms import (
    get_post_transforms,
    get_test_transforms,
    get_train_transforms,
    get_val_transforms,
)
from rep3d.planning import resolve_dataset_config

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def phantom(shape=(20, 18, 12), num_classes=3, low=-300.0, high=500.0, seed=0):
    """An image spanning [low, high] outside-to-inside and a label using every class value."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, low, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    inner = tuple(slice(2, s - 2) for s in shape)
    image[inner] = (low + high) / 2 + rng.normal(0, 20, size=image[inner].shape)
    # one slab per foreground class along the first axis
    xs = np.array_split(np.arange(3, shape[0] - 3), num_classes - 1)
    for c, idx in enumerate(xs, start=1):
        label[idx[0] : idx[-1] + 1, 4:-4, 3:-3] = c
        image[idx[0] : idx[-1] + 1, 4:-4, 3:-3] = high
    return image, label


def make_folder_dataset(root, n_train=3, n_val=1, num_classes=3, shape=(20, 18, 12), affine=None, low=-300.0, high=500.0):
    for split, n, img_d, lab_d in (("tr", n_train, "imagesTr", "labelsTr"), ("val", n_val, "imagesVal", "labelsVal")):
        for i in range(n):
            image, label = phantom(shape, num_classes, low, high, seed=i)
            save_nifti(os.path.join(root, img_d, f"{split}{i}.nii.gz"), image, affine, np.int16)
            save_nifti(os.path.join(root, lab_d, f"{split}{i}.nii.gz"), label, affine, np.uint8)
    return str(root)


# --------------------------------------------------------------------------------------------
# presets and configuration
# --------------------------------------------------------------------------------------------

SPEC_TABLE = {
    "amos": ((1.5, 1.5, 2.0), (-125, 275), 16),
    "amos_mri": ((1.0, 1.0, 1.0), (0, 1000), 14),
    "kits": ((1.5, 1.5, 2.0), (-125, 275), 4),
    "pancreas": ((1.5, 1.5, 2.0), (-125, 275), 3),
    "hepatic": ((1.5, 1.5, 2.0), (0, 230), 3),
}


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_preset_values_match_spec(name):
    cfg = get_dataset_config(name)
    spacing, (a_min, a_max), classes = SPEC_TABLE[name]
    assert cfg.spacing == spacing
    assert (cfg.intensity, cfg.a_min, cfg.a_max) == ("window", a_min, a_max)
    assert cfg.num_classes == classes and len(cfg.class_names) == classes
    assert cfg.class_names[0] == "background" and len(set(cfg.class_names)) == classes
    assert cfg.roi == (96, 96, 96)


def test_demo_preset_matches_generator():
    cfg = get_dataset_config("demo")
    assert cfg.spacing == DEMO_SPACING
    assert cfg.class_names == list(DEMO_CLASS_NAMES)
    assert max(cfg.roi) <= 48 and cfg.cache_rate == 1.0


@pytest.mark.parametrize("name", ["amos", "amos_mri", "kits", "pancreas", "hepatic", "demo"])
def test_preset_chains(tmp_path, name):
    cfg = get_dataset_config(name, roi=(16, 16, 16))
    low, high = (cfg.a_min - 300, cfg.a_max + 300)
    image, label = phantom((22, 20, 14), cfg.num_classes, low, high)
    # 2 mm in-plane / 3 mm slices: every preset resamples
    aff = affine_for("LPS", (2.0, 2.0, 3.0))
    case = {"image": save_nifti(tmp_path / "img.nii.gz", image, aff, np.int16), "label": save_nifti(tmp_path / "lab.nii.gz", label, aff, np.uint8)}
    check_cases([case], cfg)
    classes = set(range(cfg.num_classes))

    out = get_train_transforms(cfg, crop_sample=2)(case)
    assert isinstance(out, list) and len(out) == 2
    for crop in out:
        assert tuple(crop["image"].shape) == (1, 16, 16, 16) == tuple(crop["label"].shape)
        # window -> [0, 1], then an intensity shift of at most 0.10
        assert crop["image"].min() >= -0.1 - 1e-5 and crop["image"].max() <= 1.1 + 1e-5
        assert set(torch.unique(crop["label"]).tolist()) <= classes

    val = get_val_transforms(cfg)(case)
    assert val["image"].shape == val["label"].shape and val["image"].shape[0] == 1
    assert float(val["image"].min()) >= 0.0 and float(val["image"].max()) <= 1.0
    assert float(val["image"].max()) == 1.0  # the bright structures saturate the window
    values = set(torch.unique(val["label"]).tolist())
    assert values <= classes and values == classes  # nearest resampling keeps every class, invents none
    # resampled to the preset's spacing, in RAS
    assert np.allclose(val["image"].pixdim.tolist(), cfg.spacing)
    assert nib.aff2axcodes(val["image"].affine.numpy()) == ("R", "A", "S")

    test = get_test_transforms(cfg)({"image": case["image"]})
    assert "label" not in test
    assert torch.equal(test["image"].as_tensor(), val["image"].as_tensor())


def test_zscore_custom_config(tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"spacing": [2, 2, 2], "intensity": "zscore", "num_classes": 3, "class_names": ["background", "a", "b"], "roi": [16, 16, 16]}))
    cfg = get_dataset_config("custom", str(cfg_file))
    assert (cfg.intensity, cfg.num_classes, cfg.roi) == ("zscore", 3, (16, 16, 16))
    image, label = phantom((20, 20, 12), 3, low=0.0, high=900.0)
    case = {"image": save_nifti(tmp_path / "i.nii.gz", image, affine_for(spacing=(2, 2, 2))), "label": save_nifti(tmp_path / "l.nii.gz", label, affine_for(spacing=(2, 2, 2)), np.uint8)}
    val = get_val_transforms(cfg)(case)["image"]
    nz = val[val != 0]
    assert abs(float(nz.mean())) < 1e-3 and abs(float(nz.std()) - 1.0) < 1e-2
    out = get_train_transforms(cfg, crop_sample=1)(case)
    assert tuple(out[0]["image"].shape) == (1, 16, 16, 16)


def test_config_overrides_and_json(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"num_classes": 3, "class_names": ["background", "x", "y"], "a_min": -100, "a_max": 200}))
    cfg = get_dataset_config("kits", str(f), a_max=300.0, spacing=None, class_names="background, p, q")
    assert (cfg.num_classes, cfg.a_min, cfg.a_max, cfg.spacing) == (3, -100, 300.0, (1.5, 1.5, 2.0))
    assert cfg.class_names == ["background", "p", "q"]
    # changing the class count without names gives generic names
    assert get_dataset_config("amos", num_classes=3).class_names == ["background", "class_1", "class_2"]
    assert get_dataset_config("custom", spacing=(1, 1, 1), num_classes=2, a_min=0, a_max=1).spacing == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "name, kwargs, needle",
    [
        ("nope", {}, "unknown --dataset"),
        ("custom", {"num_classes": 3}, "--spacing"),
        ("custom", {"spacing": (1, 1, 1), "num_classes": 3}, "--a_min"),
        ("amos", {"a_min": 500.0}, "a_min (500.0) must be below a_max"),
        ("amos", {"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ("amos", {"intensity": "minmax"}, "'window' (CT) or 'zscore'"),
        ("amos", {"class_names": "background,a"}, "one name per class"),
        ("amos", {"num_classes": 1}, "num_classes"),
        ("amos", {"roi": (96, 0, 96)}, "roi"),
    ],
)
def test_config_errors(name, kwargs, needle):
    with pytest.raises(ValueError, match=None) as e:
        get_dataset_config(name, **kwargs)
    assert needle in str(e.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        get_dataset_config("custom", str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{spacing: 1")
    with pytest.raises(ValueError, match="not valid JSON"):
        get_dataset_config("custom", str(bad))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"spacing": [1, 1, 1], "num_classes": 2, "pixdim": 1}))
    with pytest.raises(ValueError, match="unknown keys"):
        get_dataset_config("custom", str(unknown))


def test_cli_flags():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_workers", type=int, default=7)  # a script's own flag wins
    add_dataset_args(parser)
    add_dataset_args(parser)  # harmless twice
    args = parser.parse_args([])
    assert args.num_workers == 7 and args.loader == "auto"
    assert resolve_dataset_config(args.dataset, args.root, args.datalist).name == "demo"
    cfg = resolve_dataset_config("custom", "/x", spacing=[1, 1, 2], intensity="zscore", num_classes=3, class_names="bg,a,b", roi=[32, 32, 16])
    assert (cfg.spacing, cfg.intensity, cfg.class_names, cfg.roi) == ((1.0, 1.0, 2.0), "zscore", ["bg", "a", "b"], (32, 32, 16))
    # --root without --dataset plans from the data: a missing folder is said to be missing
    with pytest.raises(ValueError, match="/x: dataset folder not found"):
        resolve_dataset_config(None, "/x")
    # inference has no use for the training-only flags
    infer = argparse.ArgumentParser()
    add_dataset_args(infer, training=False)
    assert not {"--cache_rate", "--loader", "--cache_on_gpu", "--crop_ratios"} & set(infer._option_string_actions)


def test_flags_to_run_config(tmp_path):

    demo = run_config_from_args(main_train.parse_args([]))
    assert demo.data.is_demo and demo.data.dataset.cache_rate == 1.0 and demo.data.loader == "auto"
    root = str(tmp_path)
    flags = f"--root {root} --dataset custom --spacing 1 1 2 --intensity zscore --num_classes 3 --class_names bg,a,b --roi 32 32 16 --cache_rate 0.5 --cache_on_gpu"
    cfg = run_config_from_args(main_train.parse_args(flags.split()))
    assert cfg.data.cache_rate == 0.5 and cfg.data.loader == "gpu" and cfg.data.root == root and cfg.network.out_channels == 3
    # a datalist without --root keeps root None (paths relative to the datalist); a real preset
    # without any data is refused instead of silently training on the demo
    assert run_config_from_args(main_train.parse_args(["--dataset", "kits", "--datalist", "/d/list.json"])).data.root is None
    with pytest.raises(ValueError, match="--dataset kits needs its data"):
        run_config_from_args(main_train.parse_args(["--dataset", "kits"]))
    with pytest.raises(ValueError, match="folder not found"):
        run_config_from_args(main_train.parse_args(["--root", str(tmp_path / "typo"), "--dataset", "custom"]))


# --------------------------------------------------------------------------------------------
# listing and pairing
# --------------------------------------------------------------------------------------------


def _tagged_case(root, img_rel, lab_rel, tag):
    """Image and label whose voxels all equal ``tag``, to check which files were paired."""
    aff = affine_for("RAS", (2, 2, 2))
    save_nifti(os.path.join(root, img_rel), np.full((8, 8, 8), tag), aff, np.int16)
    if lab_rel:
        save_nifti(os.path.join(root, lab_rel), np.full((8, 8, 8), tag), aff, np.uint8)


def test_pairing_by_case_name_not_position(tmp_path):
    # Sorted, the images read x1, x, y while the labels read x, x1, y: positional pairing would
    # swap the first two cases.
    for img, lab, tag in [("x1_0000", "x1", 1), ("x_0000", "x", 2), ("y", "y_seg", 3)]:
        _tagged_case(tmp_path, f"imagesTr/{img}.nii.gz", f"labelsTr/{lab}.nii.gz", tag)
    (tmp_path / "imagesTr" / "._x1_0000.nii.gz").write_bytes(b"macOS resource fork")  # ignored
    (tmp_path / "labelsTr" / "notes.txt").write_text("ignored")
    cases = list_cases(str(tmp_path), "train", fold=0)  # no imagesVal: fold 0 of 5 validates
    val = list_cases(str(tmp_path), "val", fold=0)
    assert len(cases) + len(val) == 3
    for c in cases + val:
        assert np.asarray(nib.load(c["image"]).dataobj).max() == np.asarray(nib.load(c["label"]).dataobj).max()
    assert case_name("/a/b/case_0000.nii.gz") == "case" and case_name("c_seg.nii", "label") == "c"


def test_folder_layout_splits(tmp_path):
    root = make_folder_dataset(tmp_path, n_train=3, n_val=2)
    assert len(list_cases(root, "train")) == 3 and len(list_cases(root, "val")) == 2
    # test split: imagesVal (with its labels) when there is no imagesTs
    test = list_cases(root, "test")
    assert len(test) == 2 and all("label" in c for c in test)
    save_nifti(tmp_path / "imagesTs" / "t0.nii.gz", np.zeros((8, 8, 8)), dtype=np.int16)
    assert list_cases(root, "test") == [{"image": str(tmp_path / "imagesTs" / "t0.nii.gz")}]
    assert list_images(str(tmp_path / "imagesTs")) == [{"image": str(tmp_path / "imagesTs" / "t0.nii.gz")}]
    with pytest.raises(DataError, match="not found"):
        list_images(str(tmp_path / "nothing"))


def test_msd_dataset_json(tmp_path):
    # nnU-Net v1 style: dataset.json lists "imagesTr/case.nii.gz", the file is case_0000.nii.gz
    training = []
    for i in range(5):
        _tagged_case(tmp_path, f"imagesTr/case{i}_0000.nii.gz", f"labelsTr/case{i}.nii.gz", i % 3)
        training.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    _tagged_case(tmp_path, "imagesTs/new_0000.nii.gz", None, 0)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "pancreas", "2": "cancer"}, "training": training, "test": ["./imagesTs/new.nii.gz"]}))
    train, val = list_cases(str(tmp_path), "train", fold=1), list_cases(str(tmp_path), "val", fold=1)
    assert len(train) == 4 and len(val) == 1 and val[0]["image"].endswith("case1_0000.nii.gz")
    assert list_cases(str(tmp_path), "test") == [{"image": str(tmp_path / "imagesTs" / "new_0000.nii.gz")}]
    cfg = resolve_dataset_config("custom", str(tmp_path), spacing=[2, 2, 2], intensity="zscore")
    assert cfg.class_names == ["background", "pancreas", "cancer"]
    # a preset with another class count is reported
    with pytest.raises(DataError, match="lists 3 labels"):
        check_dataset(get_dataset_config("kits"), str(tmp_path))


def test_monai_datalist_with_folds(tmp_path):
    entries = []
    for i in range(6):
        _tagged_case(tmp_path / "data", f"im/c{i}.nii.gz", f"lb/c{i}.nii.gz", 1)
        entries.append({"image": f"im/c{i}.nii.gz", "label": f"lb/c{i}.nii.gz", "fold": i % 3})
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": entries}))
    train = list_cases(str(tmp_path / "data"), "train", datalist=str(dl), fold=2)
    val = list_cases(str(tmp_path / "data"), "val", datalist=str(dl), fold=2)
    assert sorted(os.path.basename(c["image"]) for c in val) == ["c2.nii.gz", "c5.nii.gz"]
    assert len(train) == 4 and all("fold" not in c for c in train + val)
    with pytest.raises(DataError, match=r"no case in fold 7 \(folds present: \[0, 1, 2\]\)"):
        list_cases(str(tmp_path / "data"), "val", datalist=str(dl), fold=7)
    # without --root, relative paths are taken from the datalist's folder
    (tmp_path / "data" / "dl2.json").write_text(json.dumps({"training": entries[:4], "validation": entries[4:]}))
    assert len(list_cases(None, "val", datalist=str(tmp_path / "data" / "dl2.json"))) == 2


# --------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------


def test_missing_folders(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    save_nifti(tmp_path / "imagesTr" / "a.nii.gz", np.zeros((8, 8, 8)))
    (tmp_path / "imagesVal").mkdir()
    with pytest.raises(DataError) as e:
        check_dataset(get_dataset_config("pancreas"), str(tmp_path))
    msg = str(e.value)
    assert f"{tmp_path / 'labelsTr'}: folder missing" in msg
    assert f"{tmp_path / 'labelsVal'}: folder missing" in msg
    with pytest.raises(DataError, match="dataset folder not found"):
        list_cases(str(tmp_path / "nowhere"), "train")


def test_every_bad_input_reported_at_once(tmp_path):
    cfg = get_dataset_config("pancreas", roi=(16, 16, 16))
    root = tmp_path
    shape = (12, 12, 10)
    aff = affine_for()
    good_img, good_lab = phantom(shape, 3)

    def case(name, image=good_img, label=good_lab, img_aff=aff, lab_aff=aff, lab_dtype=np.uint8):
        paths = {}
        if image is not None:
            paths["image"] = save_nifti(root / "imagesTr" / f"{name}.nii.gz", image, img_aff, np.int16)
        if label is not None:
            paths["label"] = save_nifti(root / "labelsTr" / f"{name}.nii.gz", label, lab_aff, lab_dtype)
        return paths

    case("ok")
    no_label = case("nolabel", label=None)["image"]
    no_image = case("noimage", image=None)["label"]
    two_channel = case("twochannel", image=np.stack([good_img, good_img], -1))["image"]
    flat = case("flat", image=good_img[:, :, 0], label=good_lab[:, :, 0])["image"]
    shape_mismatch = case("shape", label=good_lab[:, :, :8])["label"]
    affine_mismatch = case("affine", lab_aff=affine_for(origin=(12.0, -20.0, 5.0)))["label"]
    out_of_range = good_lab.copy()
    out_of_range[0, 0, 0] = 7
    bad_values = case("values", label=out_of_range)["label"]
    fractional = case("fraction", label=good_lab.astype(np.float32) * 0.5, lab_dtype=np.float32)["label"]
    garbage = root / "imagesTr" / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    case_lab = save_nifti(root / "labelsTr" / "garbage.nii.gz", good_lab, aff, np.uint8)
    truncated = case("truncated", image=np.random.default_rng(0).normal(size=(30, 30, 30)) * 1000)["image"]
    with open(truncated, "rb") as f:
        blob = f.read()
    with open(truncated, "wb") as f:
        f.write(blob[: len(blob) // 2])
    truncated_nii = root / "imagesTr" / "short.nii"
    nib.save(nib.Nifti1Image(good_img.astype(np.int16), aff), str(truncated_nii))
    truncated_nii.write_bytes(truncated_nii.read_bytes()[:-100])
    save_nifti(root / "labelsTr" / "short.nii.gz", good_lab, aff, np.uint8)
    make_val = make_folder_dataset  # a valid validation set so only training is wrong
    for d in ("imagesVal", "labelsVal"):
        (root / d).mkdir()
    save_nifti(root / "imagesVal" / "v.nii.gz", good_img, aff, np.int16)
    save_nifti(root / "labelsVal" / "v.nii.gz", good_lab, aff, np.uint8)
    del make_val

    with pytest.raises(DataError) as e:
        get_loaders(cfg, str(root), num_workers=0, cache_rate=0.0)
    lines = e.value.problems
    text = str(e.value)
    expected = {
        no_label: "image without a label",
        no_image: "label without an image",
        two_channel: "4-D with 2 channels",
        flat: "is 2-D",
        shape_mismatch: "label shape (12, 12, 8) differs from image shape (12, 12, 10)",
        affine_mismatch: "label affine differs",
        bad_values: "label values 7 are outside 0..2",
        fractional: "non-integer values",
        str(garbage): "unreadable or corrupt image",
        truncated: "corrupt image",
        str(truncated_nii): "corrupt image",
    }
    for path, needle in expected.items():
        hits = [line for line in lines if line.startswith(str(path)) and needle in line]
        assert hits, f"no '{needle}' line for {path} in:\n{text}"
        assert "Fix:" in hits[0]
    assert not any(line.startswith(str(root / "imagesTr" / "ok.nii.gz")) or "ok.nii.gz" in line.split(":")[0] for line in lines)
    assert not any(case_lab == line.split(":")[0] for line in lines)
    assert any(line.startswith(flat.replace("imagesTr", "labelsTr")) and "is 2-D" in line for line in lines)
    assert len(lines) == len(expected) + 1  # the 2-D label of "flat" too


def test_check_cases_accepts_4d_single_channel_and_float_labels(tmp_path):
    cfg = get_dataset_config("hepatic")
    img, lab = phantom((10, 10, 8), 3)
    case = {"image": save_nifti(tmp_path / "i.nii.gz", img[..., None], dtype=np.int16), "label": save_nifti(tmp_path / "l.nii.gz", lab, dtype=np.float32)}
    check_cases([case], cfg)
    val = get_val_transforms(cfg)(case)
    assert val["image"].ndim == 4 and val["image"].shape[0] == 1


def test_crop_larger_than_volume_is_padded(tmp_path):
    cfg = get_dataset_config("kits")
    img, lab = phantom((14, 12, 9), 4)
    aff = affine_for(spacing=(1.5, 1.5, 2.0))
    case = {"image": save_nifti(tmp_path / "i.nii.gz", img, aff, np.int16), "label": save_nifti(tmp_path / "l.nii.gz", lab, aff, np.uint8)}
    check_cases([case], cfg, roi=(24, 24, 24))  # a note, not an error
    out = get_train_transforms(cfg, roi=(24, 24, 24), crop_sample=3)(case)
    assert len(out) == 3 and all(tuple(o["image"].shape) == (1, 24, 24, 24) for o in out)


# --------------------------------------------------------------------------------------------
# inference chain inversion
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "codes, spacing, shape",
    [("RAS", (1.5, 1.5, 2.0), (21, 19, 13)), ("LPS", (0.8, 0.9, 2.5), (30, 27, 9)), ("LAS", (3.1, 1.2, 4.7), (11, 26, 7)), ("PIR", (2.0, 1.0, 1.5), (14, 13, 17))],
)
def test_inverse_restores_native_geometry(tmp_path, codes, spacing, shape):
    from monai.data import decollate_batch

    cfg = get_dataset_config("pancreas")
    aff = affine_for(codes, spacing, origin=(-30.5, 12.25, 101.0))
    image, _ = phantom(shape, 3, low=-500, high=500)
    path = save_nifti(tmp_path / "in" / f"case_{codes}_0000.nii.gz", image, aff, np.int16)
    loader, test_tf = get_test_loader(cfg, [path], num_workers=0)
    post = get_post_transforms(test_tf, cfg)
    batch = next(iter(loader))
    x = batch["image"]
    # a fake 3-class "prediction" from the pre-processed image: class 2 where it is bright
    bright = (x > 0.9).float()
    batch["pred"] = torch.cat([1 - bright, torch.zeros_like(bright), bright], dim=1)
    [result] = [post(d) for d in decollate_batch(batch)]
    assert tuple(result["pred"].shape[1:]) == shape

    out = write_like(result["pred"], path, output_path_like(path, str(tmp_path / "out"), "_seg", name=f"case_{codes}"))
    saved = nib.load(out)
    assert saved.shape == shape and saved.get_data_dtype() == np.uint8
    np.testing.assert_allclose(saved.affine, aff, atol=1e-4)
    assert nib.aff2axcodes(saved.affine) == tuple(codes)
    # content lands on the right voxels: the bright structure of the native image
    seg = np.asarray(saved.dataobj)
    truth = image >= 500
    dice = 2 * np.logical_and(seg == 2, truth).sum() / ((seg == 2).sum() + truth.sum())
    assert set(np.unique(seg)) <= {0, 2} and dice > 0.8


def test_test_loader_keeps_native_label(tmp_path):
    cfg = get_dataset_config("hepatic")
    image, label = phantom((16, 14, 10), 3)
    aff = affine_for("LPS", (1.0, 1.0, 3.0))
    case = {"image": save_nifti(tmp_path / "i.nii.gz", image, aff, np.int16), "label": save_nifti(tmp_path / "l.nii.gz", label, aff, np.uint8)}
    loader, _ = get_test_loader(cfg, [case], num_workers=0, keep_label=True)
    batch = next(iter(loader))
    assert tuple(batch["label"].shape) == (1, 1, 16, 14, 10)
    assert torch.equal(batch["label"][0, 0].as_tensor(), torch.as_tensor(label, dtype=batch["label"].dtype))


# --------------------------------------------------------------------------------------------
# demo dataset and loaders
# --------------------------------------------------------------------------------------------


def test_demo_generator_is_deterministic_and_varied(tmp_path):
    a = make_demo_case(1, "train", size=(24, 24, 24), seed=3)
    b = make_demo_case(1, "train", size=(24, 24, 24), seed=3)
    c = make_demo_case(1, "train", size=(24, 24, 24), seed=4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    root = make_demo_dataset(str(tmp_path / "demo"), n_train=5, n_val=1, n_test=1, size=(24, 24, 24), seed=3)
    img1 = nib.load(os.path.join(root, "imagesTr", "demo_tr_001.nii.gz"))
    np.testing.assert_array_equal(np.asarray(img1.dataobj), a[0])
    np.testing.assert_allclose(img1.affine, a[2], atol=1e-5)
    headers = [nib.load(c["image"]) for c in list_cases(root, "train")]
    codes = {nib.aff2axcodes(h.affine) for h in headers}
    assert {("R", "A", "S"), ("L", "P", "S")} <= codes
    assert any(len(set(np.round(h.header.get_zooms(), 3))) > 1 for h in headers)  # anisotropic
    assert all(h.get_data_dtype() == np.int16 for h in headers)
    assert nib.load(os.path.join(root, "labelsTr", "demo_tr_000.nii.gz")).get_data_dtype() == np.uint8
    labels = np.asarray(nib.load(os.path.join(root, "labelsTr", "demo_tr_000.nii.gz")).dataobj)
    assert set(np.unique(labels)) == set(range(len(DEMO_CLASS_NAMES)))
    # idempotent: a complete dataset is reused as is
    mtime = os.path.getmtime(img1.get_filename())
    assert make_demo_dataset(root, n_train=5, n_val=1, n_test=1, size=(24, 24, 24), seed=3) == root
    assert os.path.getmtime(img1.get_filename()) == mtime
    # other arguments replace it, leaving no stale case behind
    make_demo_dataset(root, n_train=2, n_val=1, size=(24, 24, 24), seed=3)
    assert len(list_cases(root, "train")) == 2 and not os.path.exists(os.path.join(root, "imagesTs", "demo_ts_000.nii.gz"))
    with pytest.raises(ValueError, match="not a demo dataset"):
        make_demo_dataset(make_folder_dataset(tmp_path / "other", 1, 1))


def test_demo_loaders(tmp_path, monkeypatch):
    root = make_demo_dataset(str(tmp_path / "demo"), n_train=3, n_val=2, size=(24, 24, 24))
    cfg = get_dataset_config("demo", roi=(16, 16, 16))
    train, val = get_loaders(cfg, root, crop_sample=2, batch_size=2, cache_rate=1.0, num_workers=0)
    batch = next(iter(train))
    assert tuple(batch["image"].shape) == (4, 1, 16, 16, 16) == tuple(batch["label"].shape)
    assert set(torch.unique(batch["label"]).tolist()) <= set(range(5))
    vals = list(val)
    assert len(vals) == 2 and all(v["image"].shape[0] == 1 and v["image"].shape == v["label"].shape for v in vals)
    # distributed: each rank gets its shard; validation shards are disjoint and cover all cases
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        tr, va = get_loaders(cfg, root, cache_rate=0.0, num_workers=0, distributed=True, check=False)
        assert len(tr.dataset) == 2
        seen += [d["image"] for d in va.dataset.data]
    assert sorted(seen) == sorted(c["image"] for c in list_cases(root, "val"))


# --------------------------------------------------------------------------------------------
# training data path (issue 12): indices in the cache, batched augmentation, loader choice
# --------------------------------------------------------------------------------------------


def _monai_affine(image, label, params, i):
    """Reference: MONAI's Affine (the geometry of the previous RandAffined) with crop i's parameters."""
    from monai.transforms import Affine

    kw = dict(
        rotate_params=[float(a) for a in params["angles"][i]], scale_params=[float(s) for s in params["scales"][i]],
        spatial_size=tuple(image.shape[2:]), padding_mode="reflection", image_only=True,
    )  # fmt: skip
    img = Affine(mode="bilinear", **kw)(image[i]).as_tensor() + float(params["offsets"][i])
    return img, Affine(mode="nearest", **kw)(label[i]).as_tensor()


@pytest.mark.parametrize("size", [(16, 16, 16), (20, 16, 12)])
def test_batch_augment_is_monai_affine_per_crop(size):
    torch.manual_seed(0)
    image = torch.rand(4, 2, *size)
    label = torch.randint(0, 4, (4, 1, *size)).float()
    aug = BatchAugment().set_random_state(seed=3)
    params = aug.randomize(4)
    # also rotations about the other two axes and no shift, so every part of the geometry is checked
    params["angles"][:, :2] = [[0.2, 0.1], [-0.1, 0.3], [0.05, -0.2], [0.0, 0.0]]
    params["offsets"][3] = 0.0
    out, lab = aug(image, label, params)
    assert out.shape == image.shape and lab.shape == label.shape and lab.dtype == label.dtype
    for i in range(4):
        ref_img, ref_lab = _monai_affine(image, label, params, i)
        assert float((out[i] - ref_img).abs().max()) < 1e-4
        assert float((lab[i] != ref_lab).float().mean()) < 1e-3  # nearest: the same voxels (ties may round apart)
    # each crop got its own draw
    fresh = aug.randomize(4)
    assert len({round(float(a), 9) for a in fresh["angles"][:, 2]}) == 4


def test_batch_augment_distribution_is_the_papers():
    aug = BatchAugment().set_random_state(seed=0)
    n = 20000
    p = aug.randomize(n)
    a, s, o = p["angles"], p["scales"], p["offsets"]
    rot = np.pi / 30
    assert np.all(a[:, :2] == 0) and np.all(np.abs(a[:, 2]) <= rot)
    # uniform(-r, r): mean 0, variance r^2 / 3 (tolerances: 5 standard errors)
    assert abs(a[:, 2].mean()) < 5 * rot / np.sqrt(3 * n)
    assert abs(a[:, 2].var() - rot**2 / 3) < 5 * rot**2 * np.sqrt(4 / 45 / n)
    assert np.all(np.abs(s - 1) <= 0.1) and np.all(np.abs(s.mean(0) - 1) < 5 * 0.1 / np.sqrt(3 * n))
    assert np.all(np.abs(s.var(0) - 0.01 / 3) < 5 * 0.01 * np.sqrt(4 / 45 / n))
    assert abs(np.corrcoef(s[:, 0], s[:, 1])[0, 1]) < 5 / np.sqrt(n)  # independent per axis
    shifted = o != 0
    assert abs(shifted.mean() - 0.5) < 5 * 0.5 / np.sqrt(n)  # p = 0.5
    assert np.all(np.abs(o) <= 0.1) and abs(o[shifted].var() - 0.01 / 3) < 5 * 0.01 * np.sqrt(4 / 45 / shifted.sum())
    with pytest.raises(ValueError, match="3 values"):
        BatchAugment(rotate_range=(0.1,))
    with pytest.raises(ValueError, match=r"\(N, C, D, H, W\)"):
        aug(torch.zeros(1, 8, 8, 8))


def _cube_case(tmp_path, size=32, lo=10, hi=22, seed=0):
    """A positive (MRI-like) volume with a smooth gradient, a bright labelled cube [lo, hi)^3 inside,
    at 1 mm: z-scored and not cropped by the pipeline (every voxel is above 0)."""
    rng = np.random.default_rng(seed)
    x = np.arange(size, dtype=np.float32)
    image = 100 + 3 * x[:, None, None] + 2 * x[None, :, None] + rng.normal(0, 5, (size,) * 3).astype(np.float32)
    label = np.zeros((size,) * 3, dtype=np.uint8)
    label[lo:hi, lo:hi, lo:hi] = 1
    image[label > 0] += 150
    aff = np.eye(4)
    return {"image": save_nifti(tmp_path / "img.nii.gz", image, aff, np.float32), "label": save_nifti(tmp_path / "lab.nii.gz", label, aff, np.uint8)}


def _cube_config(roi=(16, 16, 16)):
    return get_dataset_config("custom", spacing=(1, 1, 1), intensity="zscore", num_classes=2, roi=roi)


def test_crops_hold_foreground_one_to_one(tmp_path):
    # The cube [10, 22)^3 lies inside the valid centres [8, 24] of 16^3 crops in 32^3, and a
    # background centre moved into that range stays in the background: so the centre voxel of a
    # crop (index 8) is foreground exactly when a foreground centre was drawn, with p = 0.5.
    # The augmentation moves that voxel by at most 0.1 voxel, so it keeps its label.
    case = _cube_case(tmp_path)
    cfg = _cube_config()
    tf = get_train_transforms(cfg, crop_sample=4, augment=False)
    tf.set_random_state(seed=0)
    from monai.data import CacheDataset

    ds = CacheDataset([case], transform=tf, cache_rate=1.0, progress=False, copy_cache=False)
    cached = ds._cache[0]
    assert "label_fg_indices" in cached and cached["label_fg_indices"].dtype == torch.int32
    assert len(cached["label_fg_indices"]) == 12**3 and len(cached["label_bg_indices"]) == 32**3 - 12**3
    centres = [float(c["label"][0, 8, 8, 8]) for _ in range(100) for c in ds[0]]
    n = len(centres)
    assert abs(np.mean(centres) - 0.5) < 4 * 0.5 / np.sqrt(n), np.mean(centres)
    assert torch.equal(ds._cache[0]["image"], cached["image"])  # the cache is read, not modified
    # the same through the training loader (batched augmentation on the CPU here)
    train, _ = get_loaders(cfg, None, crop_sample=2, batch_size=1, cache_rate=1.0, num_workers=0, datalist=_datalist(tmp_path, case), check=False, augment_device="cpu")
    labels = torch.cat([b["label"] for _, b in zip(range(100), _forever(train))])
    assert labels.shape == (200, 1, 16, 16, 16)
    assert abs(float(labels[:, 0, 8, 8, 8].mean()) - 0.5) < 4 * 0.5 / np.sqrt(200)


def _datalist(tmp_path, case) -> str:
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [case], "validation": [case]}))
    return str(path)


def _forever(loader):
    while True:
        yield from loader


def _previous_chain(cfg, roi, crop_sample):
    """The random part as it was before issue 12 (full-label scan, shift, per-crop RandAffined)."""
    from monai.transforms import (
        Compose,
        RandAffined,
        RandCropByPosNegLabeld,
        RandShiftIntensityd,
    )

    keys = ["image", "label"]
    return Compose([
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=roi, pos=1, neg=1, num_samples=crop_sample),
        RandShiftIntensityd(keys="image", offsets=0.10, prob=0.5),
        RandAffined(keys=keys, mode=("bilinear", "nearest"), prob=1.0, spatial_size=roi, rotate_range=(0.0, 0.0, np.pi / 30), scale_range=(0.1, 0.1, 0.1)),
    ])  # fmt: skip


def test_augmented_batches_have_the_previous_statistics(tmp_path):
    case = _cube_case(tmp_path)
    cfg = _cube_config()
    roi = cfg.roi
    train, _ = get_loaders(cfg, None, crop_sample=2, batch_size=2, cache_rate=1.0, num_workers=0, datalist=_datalist(tmp_path, case), check=False, augment_device="cpu")
    assert len(train) == 1 and len(train.dataset) == 1
    new = []
    for _, b in zip(range(150), _forever(train)):
        assert tuple(b["image"].shape) == (4, 1, *roi) == tuple(b["label"].shape)
        new += [(float(im.mean()), float(im.std()), float(lb.mean())) for im, lb in zip(b["image"], b["label"])]
    cached = {k: v for k, v in train.dataset._cache[0].items() if k in ("image", "label")}
    old_tf = _previous_chain(cfg, roi, 4)
    old_tf.set_random_state(seed=1)
    old = [(float(c["image"].mean()), float(c["image"].std()), float(c["label"].mean())) for _ in range(150) for c in old_tf(dict(cached))]
    new, old = np.asarray(new), np.asarray(old)
    for j, what in enumerate(("mean intensity", "intensity std", "foreground share")):
        se = np.sqrt(new[:, j].var() / len(new) + old[:, j].var() / len(old))
        assert abs(new[:, j].mean() - old[:, j].mean()) < 4 * se, (what, new[:, j].mean(), old[:, j].mean(), se)
        # the spread over crops too (the shift and the crop positions make it)
        assert abs(new[:, j].std() / old[:, j].std() - 1) < 0.15, (what, new[:, j].std(), old[:, j].std())


def test_train_loader_prefetch_thread_and_errors():
    from monai.data import DataLoader

    class Crops(torch.utils.data.Dataset):
        def __init__(self, fail_at=None):
            self.fail_at, self.calls = fail_at, 0

        def __len__(self):
            return 3

        def __getitem__(self, i):
            self.calls += 1
            if self.fail_at is not None and self.calls >= self.fail_at:
                raise RuntimeError("broken case 7")
            return [{"image": torch.full((1, 8, 8, 8), float(i)), "label": torch.zeros(1, 8, 8, 8)}] * 2

    gen = torch.Generator().manual_seed(0)
    inner = DataLoader(Crops(), batch_size=2, sampler=_Endless(3, gen), num_workers=0, collate_fn=_collate_crops)
    loader = TrainLoader(inner, n_batches=2, path="workers", augment=None, device=torch.device("cpu"), prefetch=2)
    epochs = [[b["image"][:, 0, 0, 0, 0].tolist() for b in loader] for _ in range(3)]
    assert all(len(e) == 2 for e in epochs)
    drawn = [v for e in epochs for b in e for v in b][::2]  # one value per case (2 crops each)
    assert sorted(drawn[:3]) == [0.0, 1.0, 2.0] and sorted(drawn[3:6]) == [0.0, 1.0, 2.0]  # shuffled epochs, no repeats
    loader.close()
    inner = DataLoader(Crops(fail_at=4), batch_size=1, sampler=_Endless(3, gen), num_workers=0, collate_fn=_collate_crops)
    broken = TrainLoader(inner, n_batches=3, path="workers", device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="broken case 7"):
        for _ in range(3):
            list(broken)


def test_choose_loader_on_cpu(tmp_path, monkeypatch):
    root = make_folder_dataset(tmp_path, n_train=3, n_val=1, shape=(20, 18, 12))  # 1.5 x 1.5 x 2 mm
    cfg = get_dataset_config("custom", spacing=(1.0, 1.0, 1.0), intensity="zscore", num_classes=3, roi=(16, 16, 16))
    # header-only estimate: resampled to 1 mm (30 x 27 x 24), float32 image + label, 4 cases
    assert estimate_cache_bytes(cfg, list_cases(root, "train") + list_cases(root, "val")) == 4 * 30 * 27 * 24 * 8
    choice = choose_loader(cfg, root=root, device="cpu", num_workers=3)
    assert (choice.path, choice.device, choice.num_workers, choice.cache_rate) == ("workers", None, 3, 1.0)
    # a run on the CPU says why it takes workers: no CUDA device at all, or (with one) the run is on the CPU
    why = "the run is on cpu" if torch.cuda.is_available() else "no CUDA device"
    assert choice.reason.startswith("CPU workers (3)") and choice.reason.endswith(why)
    assert choose_loader(cfg, root=root, device="cpu", cache_rate=0.3).cache_rate == 0.3
    assert choose_loader(cfg, root=root, device="cpu", requested="workers").reason.endswith(why)
    if not torch.cuda.is_available():  # the CUDA machine's side is pretended below
        assert choose_loader(cfg, root=root).reason.endswith("no CUDA device")
        with pytest.raises(ValueError, match="--loader gpu"):
            choose_loader(cfg, root=root, requested="gpu")
    with pytest.raises(ValueError, match="'auto', 'gpu' or 'workers'"):
        choose_loader(cfg, root=root, requested="fast")
    # the GPU branch's decision, with a pretend GPU of 1 GiB (or 1 MiB) free
    free = {"bytes": 1024**3}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 1024**3))
    # with a GPU, a CPU run takes workers because it is on the CPU, and a GPU run because it asked to
    assert choose_loader(cfg, root=root, device="cpu").reason.endswith("the run is on cpu")
    assert choose_loader(cfg, root=root, device="cpu", requested="workers").reason.endswith("the run is on cpu")
    assert choose_loader(cfg, root=root, device="cuda", requested="workers").reason.endswith("asked for (--loader workers)")
    choice = choose_loader(cfg, root=root, device="cuda")
    assert (choice.path, choice.device, choice.cache_rate, choice.num_workers) == ("gpu", "cuda:0", 1.0, 0)
    assert choice.reason.startswith("GPU cache: 4 cases") and "40% of the 1.0 GiB free on cuda:0" in choice.reason
    assert choose_loader(cfg, root=root, device="cuda", cache_rate=0.5).path == "workers"
    free["bytes"] = 1024**2  # 40% of 1 MiB < the 0.6 MiB of the estimate
    choice = choose_loader(cfg, root=root, device="cuda", num_workers=2)
    assert choice.path == "workers" and "exceed 40%" in choice.reason and choice.cache_rate == 1.0
    assert choose_loader(cfg, root=str(tmp_path / "missing"), device="cuda").path == "workers"


def test_augmentation_statistics_match_previous_chain():
    # One fixed crop with a unit intensity gradient along the first axis, augmented many times by the
    # previous per-crop chain (RandShiftIntensityd + RandAffined) and by BatchAugment. Per output:
    # its mean (moved by the shift), its gradient along axes 0 / 1 / 2 in the centre (axis 0: the
    # scale, about 1 +- 0.1; axis 1: the rotation about the third axis, about sin(+-pi/30); axis 2:
    # untouched). Means and spreads must agree within sampling noise.
    from monai.transforms import Compose, RandAffined, RandShiftIntensityd

    size, n = 16, 400
    crop = torch.arange(size, dtype=torch.float32).view(size, 1, 1).expand(size, size, size)[None].contiguous() / size
    label = torch.zeros(1, size, size, size)
    old_tf = Compose([
        RandShiftIntensityd(keys="image", offsets=0.10, prob=0.5),
        RandAffined(keys=["image", "label"], mode=("bilinear", "nearest"), prob=1.0, spatial_size=(size,) * 3, rotate_range=(0.0, 0.0, np.pi / 30), scale_range=(0.1, 0.1, 0.1)),
    ])  # fmt: skip
    old_tf.set_random_state(seed=0)
    old = torch.stack([torch.as_tensor(old_tf({"image": crop.clone(), "label": label.clone()})["image"]) for _ in range(n)])
    new, _ = BatchAugment().set_random_state(seed=1)(crop[None].expand(n, -1, -1, -1, -1), label[None].expand(n, -1, -1, -1, -1))

    def stats(x):
        c = x[:, 0, 4:12, 4:12, 4:12]
        return np.stack([
            x.mean(dim=(1, 2, 3, 4)).numpy(),
            size * (c[:, 1:] - c[:, :-1]).mean(dim=(1, 2, 3)).numpy(),
            size * (c[:, :, 1:] - c[:, :, :-1]).mean(dim=(1, 2, 3)).numpy(),
            size * (c[:, :, :, 1:] - c[:, :, :, :-1]).mean(dim=(1, 2, 3)).numpy(),
        ], axis=1)  # fmt: skip

    s_new, s_old = stats(new), stats(old)
    names = ("mean (shift)", "gradient axis 0 (scale)", "gradient axis 1 (rotation)", "gradient axis 2")
    for j, what in enumerate(names):
        se = np.sqrt(s_new[:, j].var() / n + s_old[:, j].var() / n) + 1e-6
        assert abs(s_new[:, j].mean() - s_old[:, j].mean()) < 4 * se + 1e-4, (what, s_new[:, j].mean(), s_old[:, j].mean())
        if j < 3:  # the axis-2 gradient is 0 for both
            assert abs(s_new[:, j].std() / s_old[:, j].std() - 1) < 0.2, (what, s_new[:, j].std(), s_old[:, j].std())
    assert s_new[:, 1].std() > 0.03 and s_new[:, 2].std() > 0.03 and s_new[:, 0].std() > 0.02  # each effect is there

"""Tests of the data pipeline (load_datasets_transforms.py) and the demo generator (demo_data.py).

Every file is tiny and written to tmp_path; no test downloads or reads real data.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import demo_data  # noqa: E402
import load_datasets_transforms as ldt  # noqa: E402
from load_datasets_transforms import DataError  # noqa: E402


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


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


def write(path, array, affine=None, dtype=None) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype)
    nib.save(nib.Nifti1Image(array, affine_for() if affine is None else affine), path)
    return path


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
            write(os.path.join(root, img_d, f"{split}{i}.nii.gz"), image, affine, np.int16)
            write(os.path.join(root, lab_d, f"{split}{i}.nii.gz"), label, affine, np.uint8)
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
    cfg = ldt.get_dataset_config(name)
    spacing, (a_min, a_max), classes = SPEC_TABLE[name]
    assert cfg.spacing == spacing
    assert (cfg.intensity, cfg.a_min, cfg.a_max) == ("window", a_min, a_max)
    assert cfg.num_classes == classes and len(cfg.class_names) == classes
    assert cfg.class_names[0] == "background" and len(set(cfg.class_names)) == classes
    assert cfg.roi == (96, 96, 96)


def test_demo_preset_matches_generator():
    cfg = ldt.get_dataset_config("demo")
    assert cfg.spacing == demo_data.DEMO_SPACING
    assert cfg.class_names == list(demo_data.DEMO_CLASS_NAMES)
    assert max(cfg.roi) <= 48 and cfg.cache_rate == 1.0


@pytest.mark.parametrize("name", ["amos", "amos_mri", "kits", "pancreas", "hepatic", "demo"])
def test_preset_chains(tmp_path, name):
    cfg = ldt.get_dataset_config(name, roi=(16, 16, 16))
    low, high = (cfg.a_min - 300, cfg.a_max + 300)
    image, label = phantom((22, 20, 14), cfg.num_classes, low, high)
    # 2 mm in-plane / 3 mm slices: every preset resamples
    aff = affine_for("LPS", (2.0, 2.0, 3.0))
    case = {"image": write(tmp_path / "img.nii.gz", image, aff, np.int16), "label": write(tmp_path / "lab.nii.gz", label, aff, np.uint8)}
    ldt.check_cases([case], cfg)
    classes = set(range(cfg.num_classes))

    out = ldt.get_train_transforms(cfg, crop_sample=2)(case)
    assert isinstance(out, list) and len(out) == 2
    for crop in out:
        assert tuple(crop["image"].shape) == (1, 16, 16, 16) == tuple(crop["label"].shape)
        # window -> [0, 1], then an intensity shift of at most 0.10
        assert crop["image"].min() >= -0.1 - 1e-5 and crop["image"].max() <= 1.1 + 1e-5
        assert set(torch.unique(crop["label"]).tolist()) <= classes

    val = ldt.get_val_transforms(cfg)(case)
    assert val["image"].shape == val["label"].shape and val["image"].shape[0] == 1
    assert float(val["image"].min()) >= 0.0 and float(val["image"].max()) <= 1.0
    assert float(val["image"].max()) == 1.0  # the bright structures saturate the window
    values = set(torch.unique(val["label"]).tolist())
    assert values <= classes and values == classes  # nearest resampling keeps every class, invents none
    # resampled to the preset's spacing, in RAS
    assert np.allclose(val["image"].pixdim.tolist(), cfg.spacing)
    assert nib.aff2axcodes(val["image"].affine.numpy()) == ("R", "A", "S")

    test = ldt.get_test_transforms(cfg)({"image": case["image"]})
    assert "label" not in test
    assert torch.equal(test["image"].as_tensor(), val["image"].as_tensor())


def test_zscore_custom_config(tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"spacing": [2, 2, 2], "intensity": "zscore", "num_classes": 3, "class_names": ["background", "a", "b"], "roi": [16, 16, 16]}))
    cfg = ldt.get_dataset_config("custom", str(cfg_file))
    assert (cfg.intensity, cfg.num_classes, cfg.roi) == ("zscore", 3, (16, 16, 16))
    image, label = phantom((20, 20, 12), 3, low=0.0, high=900.0)
    case = {"image": write(tmp_path / "i.nii.gz", image, affine_for(spacing=(2, 2, 2))), "label": write(tmp_path / "l.nii.gz", label, affine_for(spacing=(2, 2, 2)), np.uint8)}
    val = ldt.get_val_transforms(cfg)(case)["image"]
    nz = val[val != 0]
    assert abs(float(nz.mean())) < 1e-3 and abs(float(nz.std()) - 1.0) < 1e-2
    out = ldt.get_train_transforms(cfg, crop_sample=1)(case)
    assert tuple(out[0]["image"].shape) == (1, 16, 16, 16)


def test_config_overrides_and_json(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"num_classes": 3, "class_names": ["background", "x", "y"], "a_min": -100, "a_max": 200}))
    cfg = ldt.get_dataset_config("kits", str(f), a_max=300.0, spacing=None, class_names="background, p, q")
    assert (cfg.num_classes, cfg.a_min, cfg.a_max, cfg.spacing) == (3, -100, 300.0, (1.5, 1.5, 2.0))
    assert cfg.class_names == ["background", "p", "q"]
    # changing the class count without names gives generic names
    assert ldt.get_dataset_config("amos", num_classes=3).class_names == ["background", "class_1", "class_2"]
    assert ldt.get_dataset_config("custom", spacing=(1, 1, 1), num_classes=2, a_min=0, a_max=1).spacing == (1.0, 1.0, 1.0)


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
        ldt.get_dataset_config(name, **kwargs)
    assert needle in str(e.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        ldt.get_dataset_config("custom", str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{spacing: 1")
    with pytest.raises(ValueError, match="not valid JSON"):
        ldt.get_dataset_config("custom", str(bad))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"spacing": [1, 1, 1], "num_classes": 2, "pixdim": 1}))
    with pytest.raises(ValueError, match="unknown keys"):
        ldt.get_dataset_config("custom", str(unknown))


def test_cli_flags():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_workers", type=int, default=7)  # a script's own flag wins
    ldt.add_dataset_args(parser)
    ldt.add_dataset_args(parser)  # harmless twice
    args = parser.parse_args([])
    assert args.num_workers == 7 and args.loader == "auto"
    assert ldt.resolve_dataset_config(args.dataset, args.root, args.datalist).name == "demo"
    cfg = ldt.resolve_dataset_config("custom", "/x", spacing=[1, 1, 2], intensity="zscore", num_classes=3, class_names="bg,a,b", roi=[32, 32, 16])
    assert (cfg.spacing, cfg.intensity, cfg.class_names, cfg.roi) == ((1.0, 1.0, 2.0), "zscore", ["bg", "a", "b"], (32, 32, 16))
    # --root without --dataset plans from the data: a missing folder is said to be missing
    with pytest.raises(ValueError, match="/x: dataset folder not found"):
        ldt.resolve_dataset_config(None, "/x")
    # inference has no use for the training-only flags
    infer = argparse.ArgumentParser()
    ldt.add_dataset_args(infer, training=False)
    assert not {"--cache_rate", "--loader", "--cache_on_gpu", "--crop_ratios"} & set(infer._option_string_actions)


def test_flags_to_run_config(tmp_path):
    import main_train

    demo = main_train.run_config_from_args(main_train.parse_args([]))
    assert demo.data.is_demo and demo.data.dataset.cache_rate == 1.0 and demo.data.loader == "auto"
    root = str(tmp_path)
    flags = f"--root {root} --dataset custom --spacing 1 1 2 --intensity zscore --num_classes 3 --class_names bg,a,b --roi 32 32 16 --cache_rate 0.5 --cache_on_gpu"
    cfg = main_train.run_config_from_args(main_train.parse_args(flags.split()))
    assert cfg.data.cache_rate == 0.5 and cfg.data.loader == "gpu" and cfg.data.root == root and cfg.network.out_channels == 3
    # a datalist without --root keeps root None (paths relative to the datalist); a real preset
    # without any data is refused instead of silently training on the demo
    assert main_train.run_config_from_args(main_train.parse_args(["--dataset", "kits", "--datalist", "/d/list.json"])).data.root is None
    with pytest.raises(ValueError, match="--dataset kits needs its data"):
        main_train.run_config_from_args(main_train.parse_args(["--dataset", "kits"]))
    with pytest.raises(ValueError, match="folder not found"):
        main_train.run_config_from_args(main_train.parse_args(["--root", str(tmp_path / "typo"), "--dataset", "custom"]))


# --------------------------------------------------------------------------------------------
# listing and pairing
# --------------------------------------------------------------------------------------------


def _tagged_case(root, img_rel, lab_rel, tag):
    """Image and label whose voxels all equal ``tag``, to check which files were paired."""
    aff = affine_for("RAS", (2, 2, 2))
    write(os.path.join(root, img_rel), np.full((8, 8, 8), tag), aff, np.int16)
    if lab_rel:
        write(os.path.join(root, lab_rel), np.full((8, 8, 8), tag), aff, np.uint8)


def test_pairing_by_case_name_not_position(tmp_path):
    # Sorted, the images read x1, x, y while the labels read x, x1, y: positional pairing would
    # swap the first two cases.
    for img, lab, tag in [("x1_0000", "x1", 1), ("x_0000", "x", 2), ("y", "y_seg", 3)]:
        _tagged_case(tmp_path, f"imagesTr/{img}.nii.gz", f"labelsTr/{lab}.nii.gz", tag)
    (tmp_path / "imagesTr" / "._x1_0000.nii.gz").write_bytes(b"macOS resource fork")  # ignored
    (tmp_path / "labelsTr" / "notes.txt").write_text("ignored")
    cases = ldt.list_cases(str(tmp_path), "train", fold=0)  # no imagesVal: fold 0 of 5 validates
    val = ldt.list_cases(str(tmp_path), "val", fold=0)
    assert len(cases) + len(val) == 3
    for c in cases + val:
        assert np.asarray(nib.load(c["image"]).dataobj).max() == np.asarray(nib.load(c["label"]).dataobj).max()
    assert ldt.case_name("/a/b/case_0000.nii.gz") == "case" and ldt.case_name("c_seg.nii", "label") == "c"


def test_folder_layout_splits(tmp_path):
    root = make_folder_dataset(tmp_path, n_train=3, n_val=2)
    assert len(ldt.list_cases(root, "train")) == 3 and len(ldt.list_cases(root, "val")) == 2
    # test split: imagesVal (with its labels) when there is no imagesTs
    test = ldt.list_cases(root, "test")
    assert len(test) == 2 and all("label" in c for c in test)
    write(tmp_path / "imagesTs" / "t0.nii.gz", np.zeros((8, 8, 8)), dtype=np.int16)
    assert ldt.list_cases(root, "test") == [{"image": str(tmp_path / "imagesTs" / "t0.nii.gz")}]
    assert ldt.list_images(str(tmp_path / "imagesTs")) == [{"image": str(tmp_path / "imagesTs" / "t0.nii.gz")}]
    with pytest.raises(DataError, match="not found"):
        ldt.list_images(str(tmp_path / "nothing"))


def test_msd_dataset_json(tmp_path):
    # nnU-Net v1 style: dataset.json lists "imagesTr/case.nii.gz", the file is case_0000.nii.gz
    training = []
    for i in range(5):
        _tagged_case(tmp_path, f"imagesTr/case{i}_0000.nii.gz", f"labelsTr/case{i}.nii.gz", i % 3)
        training.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    _tagged_case(tmp_path, "imagesTs/new_0000.nii.gz", None, 0)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "pancreas", "2": "cancer"}, "training": training, "test": ["./imagesTs/new.nii.gz"]}))
    train, val = ldt.list_cases(str(tmp_path), "train", fold=1), ldt.list_cases(str(tmp_path), "val", fold=1)
    assert len(train) == 4 and len(val) == 1 and val[0]["image"].endswith("case1_0000.nii.gz")
    assert ldt.list_cases(str(tmp_path), "test") == [{"image": str(tmp_path / "imagesTs" / "new_0000.nii.gz")}]
    cfg = ldt.resolve_dataset_config("custom", str(tmp_path), spacing=[2, 2, 2], intensity="zscore")
    assert cfg.class_names == ["background", "pancreas", "cancer"]
    # a preset with another class count is reported
    with pytest.raises(DataError, match="lists 3 labels"):
        ldt.check_dataset(ldt.get_dataset_config("kits"), str(tmp_path))


def test_monai_datalist_with_folds(tmp_path):
    entries = []
    for i in range(6):
        _tagged_case(tmp_path / "data", f"im/c{i}.nii.gz", f"lb/c{i}.nii.gz", 1)
        entries.append({"image": f"im/c{i}.nii.gz", "label": f"lb/c{i}.nii.gz", "fold": i % 3})
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": entries}))
    train = ldt.list_cases(str(tmp_path / "data"), "train", datalist=str(dl), fold=2)
    val = ldt.list_cases(str(tmp_path / "data"), "val", datalist=str(dl), fold=2)
    assert sorted(os.path.basename(c["image"]) for c in val) == ["c2.nii.gz", "c5.nii.gz"]
    assert len(train) == 4 and all("fold" not in c for c in train + val)
    with pytest.raises(DataError, match=r"no case in fold 7 \(folds present: \[0, 1, 2\]\)"):
        ldt.list_cases(str(tmp_path / "data"), "val", datalist=str(dl), fold=7)
    # without --root, relative paths are taken from the datalist's folder
    (tmp_path / "data" / "dl2.json").write_text(json.dumps({"training": entries[:4], "validation": entries[4:]}))
    assert len(ldt.list_cases(None, "val", datalist=str(tmp_path / "data" / "dl2.json"))) == 2


# --------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------


def test_missing_folders(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    write(tmp_path / "imagesTr" / "a.nii.gz", np.zeros((8, 8, 8)))
    (tmp_path / "imagesVal").mkdir()
    with pytest.raises(DataError) as e:
        ldt.check_dataset(ldt.get_dataset_config("pancreas"), str(tmp_path))
    msg = str(e.value)
    assert f"{tmp_path / 'labelsTr'}: folder missing" in msg
    assert f"{tmp_path / 'labelsVal'}: folder missing" in msg
    with pytest.raises(DataError, match="dataset folder not found"):
        ldt.list_cases(str(tmp_path / "nowhere"), "train")


def test_every_bad_input_reported_at_once(tmp_path):
    cfg = ldt.get_dataset_config("pancreas", roi=(16, 16, 16))
    root = tmp_path
    shape = (12, 12, 10)
    aff = affine_for()
    good_img, good_lab = phantom(shape, 3)

    def case(name, image=good_img, label=good_lab, img_aff=aff, lab_aff=aff, lab_dtype=np.uint8):
        paths = {}
        if image is not None:
            paths["image"] = write(root / "imagesTr" / f"{name}.nii.gz", image, img_aff, np.int16)
        if label is not None:
            paths["label"] = write(root / "labelsTr" / f"{name}.nii.gz", label, lab_aff, lab_dtype)
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
    case_lab = write(root / "labelsTr" / "garbage.nii.gz", good_lab, aff, np.uint8)
    truncated = case("truncated", image=np.random.default_rng(0).normal(size=(30, 30, 30)) * 1000)["image"]
    with open(truncated, "rb") as f:
        blob = f.read()
    with open(truncated, "wb") as f:
        f.write(blob[: len(blob) // 2])
    truncated_nii = root / "imagesTr" / "short.nii"
    nib.save(nib.Nifti1Image(good_img.astype(np.int16), aff), str(truncated_nii))
    truncated_nii.write_bytes(truncated_nii.read_bytes()[:-100])
    write(root / "labelsTr" / "short.nii.gz", good_lab, aff, np.uint8)
    make_val = make_folder_dataset  # a valid validation set so only training is wrong
    for d in ("imagesVal", "labelsVal"):
        (root / d).mkdir()
    write(root / "imagesVal" / "v.nii.gz", good_img, aff, np.int16)
    write(root / "labelsVal" / "v.nii.gz", good_lab, aff, np.uint8)
    del make_val

    with pytest.raises(DataError) as e:
        ldt.get_loaders(cfg, str(root), num_workers=0, cache_rate=0.0)
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
    cfg = ldt.get_dataset_config("hepatic")
    img, lab = phantom((10, 10, 8), 3)
    case = {"image": write(tmp_path / "i.nii.gz", img[..., None], dtype=np.int16), "label": write(tmp_path / "l.nii.gz", lab, dtype=np.float32)}
    ldt.check_cases([case], cfg)
    val = ldt.get_val_transforms(cfg)(case)
    assert val["image"].ndim == 4 and val["image"].shape[0] == 1


def test_crop_larger_than_volume_is_padded(tmp_path):
    cfg = ldt.get_dataset_config("kits")
    img, lab = phantom((14, 12, 9), 4)
    aff = affine_for(spacing=(1.5, 1.5, 2.0))
    case = {"image": write(tmp_path / "i.nii.gz", img, aff, np.int16), "label": write(tmp_path / "l.nii.gz", lab, aff, np.uint8)}
    ldt.check_cases([case], cfg, roi=(24, 24, 24))  # a note, not an error
    out = ldt.get_train_transforms(cfg, roi=(24, 24, 24), crop_sample=3)(case)
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

    cfg = ldt.get_dataset_config("pancreas")
    aff = affine_for(codes, spacing, origin=(-30.5, 12.25, 101.0))
    image, _ = phantom(shape, 3, low=-500, high=500)
    path = write(tmp_path / "in" / f"case_{codes}_0000.nii.gz", image, aff, np.int16)
    loader, test_tf = ldt.get_test_loader(cfg, [path], num_workers=0)
    post = ldt.get_post_transforms(test_tf, cfg, str(tmp_path / "out"))
    batch = next(iter(loader))
    x = batch["image"]
    # a fake 3-class "prediction" from the pre-processed image: class 2 where it is bright
    bright = (x > 0.9).float()
    batch["pred"] = torch.cat([1 - bright, torch.zeros_like(bright), bright], dim=1)
    [result] = [post(d) for d in decollate_batch(batch)]
    assert tuple(result["pred"].shape[1:]) == shape
    saved = nib.load(str(tmp_path / "out" / f"case_{codes}_seg.nii.gz"))
    assert saved.shape == shape and saved.get_data_dtype() == np.uint8
    np.testing.assert_allclose(saved.affine, aff, atol=1e-4)
    assert nib.aff2axcodes(saved.affine) == tuple(codes)
    # content lands on the right voxels: the bright structure of the native image
    seg = np.asarray(saved.dataobj)
    truth = image >= 500
    dice = 2 * np.logical_and(seg == 2, truth).sum() / ((seg == 2).sum() + truth.sum())
    assert set(np.unique(seg)) <= {0, 2} and dice > 0.8


def test_test_loader_keeps_native_label(tmp_path):
    cfg = ldt.get_dataset_config("hepatic")
    image, label = phantom((16, 14, 10), 3)
    aff = affine_for("LPS", (1.0, 1.0, 3.0))
    case = {"image": write(tmp_path / "i.nii.gz", image, aff, np.int16), "label": write(tmp_path / "l.nii.gz", label, aff, np.uint8)}
    loader, _ = ldt.get_test_loader(cfg, [case], num_workers=0, keep_label=True)
    batch = next(iter(loader))
    assert tuple(batch["label"].shape) == (1, 1, 16, 14, 10)
    assert torch.equal(batch["label"][0, 0].as_tensor(), torch.as_tensor(label, dtype=batch["label"].dtype))


# --------------------------------------------------------------------------------------------
# demo dataset and loaders
# --------------------------------------------------------------------------------------------


def test_demo_generator_is_deterministic_and_varied(tmp_path):
    a = demo_data.make_demo_case(1, "train", size=(24, 24, 24), seed=3)
    b = demo_data.make_demo_case(1, "train", size=(24, 24, 24), seed=3)
    c = demo_data.make_demo_case(1, "train", size=(24, 24, 24), seed=4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    root = demo_data.make_demo_dataset(str(tmp_path / "demo"), n_train=5, n_val=1, n_test=1, size=(24, 24, 24), seed=3)
    img1 = nib.load(os.path.join(root, "imagesTr", "demo_tr_001.nii.gz"))
    np.testing.assert_array_equal(np.asarray(img1.dataobj), a[0])
    np.testing.assert_allclose(img1.affine, a[2], atol=1e-5)
    headers = [nib.load(c["image"]) for c in ldt.list_cases(root, "train")]
    codes = {nib.aff2axcodes(h.affine) for h in headers}
    assert {("R", "A", "S"), ("L", "P", "S")} <= codes
    assert any(len(set(np.round(h.header.get_zooms(), 3))) > 1 for h in headers)  # anisotropic
    assert all(h.get_data_dtype() == np.int16 for h in headers)
    assert nib.load(os.path.join(root, "labelsTr", "demo_tr_000.nii.gz")).get_data_dtype() == np.uint8
    labels = np.asarray(nib.load(os.path.join(root, "labelsTr", "demo_tr_000.nii.gz")).dataobj)
    assert set(np.unique(labels)) == set(range(len(demo_data.DEMO_CLASS_NAMES)))
    # idempotent: a complete dataset is reused as is
    mtime = os.path.getmtime(img1.get_filename())
    assert demo_data.make_demo_dataset(root, n_train=5, n_val=1, n_test=1, size=(24, 24, 24), seed=3) == root
    assert os.path.getmtime(img1.get_filename()) == mtime
    # other arguments replace it, leaving no stale case behind
    demo_data.make_demo_dataset(root, n_train=2, n_val=1, size=(24, 24, 24), seed=3)
    assert len(ldt.list_cases(root, "train")) == 2 and not os.path.exists(os.path.join(root, "imagesTs", "demo_ts_000.nii.gz"))
    with pytest.raises(ValueError, match="not a demo dataset"):
        demo_data.make_demo_dataset(make_folder_dataset(tmp_path / "other", 1, 1))


def test_demo_loaders(tmp_path, monkeypatch):
    root = demo_data.make_demo_dataset(str(tmp_path / "demo"), n_train=3, n_val=2, size=(24, 24, 24))
    cfg = ldt.get_dataset_config("demo", roi=(16, 16, 16))
    train, val = ldt.get_loaders(cfg, root, crop_sample=2, batch_size=2, cache_rate=1.0, num_workers=0)
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
        tr, va = ldt.get_loaders(cfg, root, cache_rate=0.0, num_workers=0, distributed=True, check=False)
        assert len(tr.dataset) == 2
        seen += [d["image"] for d in va.dataset.data]
    assert sorted(seen) == sorted(c["image"] for c in ldt.list_cases(root, "val"))

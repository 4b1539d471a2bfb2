"""Tests of the pre-processed store (issue 22): build and reuse, per-case updates, interrupted builds,
crops and validation equal to the in-memory path, read-only datasets, settings keys, waiting ranks,
the preprocess.py command.

Small data throughout: the demo generator's 32^3 volumes (2 mm, the demo preset's spacing), 3
training and 1 validation case, written to temporary folders. Every test points ``REP3D_PREPROCESSED``
at a temporary folder (the autouse fixture below), so nothing is written to ``~/.cache``.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from rep3d.commands.preprocess import main as preprocess_main
from rep3d.data import store as store_mod
from rep3d.data.cases import list_cases
from rep3d.data.dataset_config import DataError, get_dataset_config
from rep3d.data.loaders import get_loaders
from rep3d.data.store import (
    ENV_VAR,
    build_store,
    case_id,
    default_base,
    prepare_store,
    resolve_base,
    store_path,
    wait_for_store,
)
from rep3d.data.store_dataset import open_case
from rep3d.inference.sliding_window import sliding_window_predict
from rep3d.metrics import DiceAccumulator


@pytest.fixture(autouse=True)
def _store_in_tmp(tmp_path, monkeypatch):
    """No test writes a store to the user's cache folder."""
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "preprocessed"))


CFG = get_dataset_config("demo")


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def all_cases(root: str) -> list[dict]:
    return list_cases(root, "train") + list_cases(root, "val")


class Writes:
    """Counts (and optionally fails) the store's case writes."""

    def __init__(self, monkeypatch, fail_after: int | None = None) -> None:
        self.ids: list[str] = []
        self.fail_after = fail_after
        real = store_mod.write_case

        def counted(folder, cid, arrays, meta):
            if self.fail_after is not None and len(self.ids) >= self.fail_after:
                raise KeyboardInterrupt  # stands for the process being stopped mid-build
            self.ids.append(cid)
            return real(folder, cid, arrays, meta)

        monkeypatch.setattr(store_mod, "write_case", counted)


def build(root: str, **kw):
    kw.setdefault("num_workers", 1)
    return build_store(CFG, all_cases(root), default_base(), root=root, progress=False, **kw)


def rewrite(path: str, delta: float) -> None:
    """Change a NIfTI file's voxels (its size or mtime changes with it)."""
    img = nib.load(path)
    data = np.asarray(img.dataobj).astype(np.float32) + delta
    out = nib.Nifti1Image(data, img.affine, img.header)
    nib.save(out, path)


def test_build_then_reuse_writes_nothing(demo, monkeypatch):
    writes = Writes(monkeypatch)
    first = build(demo)
    assert len(writes.ids) == 4 and first.report.action == "built" and first.report.added == 4
    files = sorted(os.listdir(os.path.join(first.path, "cases")))
    assert len(files) == 4 * 5  # image, label, fg, bg and the JSON per case
    index = read_json(os.path.join(first.path, "store.json"))
    assert index["settings"]["spacing"] == [2.0, 2.0, 2.0] and len(index["cases"]) == 4 and index["bytes"] == first.report.nbytes > 0
    mtimes = {f: os.stat(os.path.join(first.path, "cases", f)).st_mtime_ns for f in files}
    again = build(demo)
    assert len(writes.ids) == 4 and again.report.action == "reused" and again.path == first.path
    assert {f: os.stat(os.path.join(first.path, "cases", f)).st_mtime_ns for f in files} == mtimes
    assert "reused" in again.report.describe() and "4 cases" in again.report.describe()
    # the arrays: float32 image, uint8 label, int32 indices; the JSON keeps the geometry
    case = list_cases(demo, "train")[0]
    rec = again.record(case)
    arrays = open_case(rec)
    assert arrays["image"].dtype == np.float32 and arrays["label"].dtype == np.uint8 and arrays["fg"].dtype == np.int32
    assert isinstance(arrays["image"], np.memmap) and arrays["image"].shape == (1, *rec["shape"])
    meta = read_json(os.path.join(again.path, "cases", case_id(case) + ".json"))
    assert meta["source"][0]["path"] == os.path.abspath(case["image"]) and len(meta["affine"]) == 4
    assert [op["class"] for op in meta["transforms"]] == ["SpatialResample", "Orientation", "CropForeground"]


def test_modified_file_rebuilds_only_its_case_and_added_removed_cases(demo, monkeypatch):
    writes = Writes(monkeypatch)
    build(demo)
    train = list_cases(demo, "train")
    rewrite(train[1]["image"], 5.0)
    updated = build(demo)
    assert writes.ids[4:] == [case_id(train[1])]
    assert updated.report.action == "updated" and updated.report.rebuilt == 1 and "1 rebuilt" in updated.report.describe()
    # added: a copy of a case under a new name; removed: a case's files deleted
    for sub in ("imagesTr", "labelsTr"):
        shutil.copy(train[0]["image" if sub.startswith("images") else "label"], os.path.join(demo, sub, "demo_tr_new.nii.gz"))
    os.remove(train[2]["image"])
    os.remove(train[2]["label"])
    now = build(demo)
    added = next(c for c in list_cases(demo, "train") if "new" in c["image"])
    assert writes.ids[5:] == [case_id(added)]
    assert now.report.added == 1 and now.report.dropped == 1 and now.report.cases == 4
    left = os.listdir(os.path.join(now.path, "cases"))
    assert not any(f.startswith(case_id(train[2])) for f in left) and len(left) == 4 * 5


def test_interrupted_build_resumes_where_it_stopped(demo, monkeypatch):
    writes = Writes(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        build(demo)
    assert len(writes.ids) == 2
    path = store_path(default_base(), CFG, demo, None)
    assert not os.path.exists(os.path.join(path, "store.json"))  # not complete
    writes.fail_after = None
    done = build(demo)
    assert len(writes.ids) == 4 and set(writes.ids) == {case_id(c) for c in all_cases(demo)}
    assert done.report.added == 2 and done.report.cases == 4
    assert not [f for f in os.listdir(os.path.join(path, "cases")) if f.startswith(".")]  # no temporaries left


def test_parallel_build_writes_the_same_arrays(demo, tmp_path):
    one = build(demo)
    two = build_store(CFG, all_cases(demo), str(tmp_path / "other"), root=demo, num_workers=2, progress=False)
    assert two.report.added == 4 and set(two.cases) == set(one.cases)
    for case in all_cases(demo):
        a, b = open_case(one.record(case)), open_case(two.record(case))
        assert all(np.array_equal(a[k], b[k]) for k in ("image", "label", "fg", "bg"))


@pytest.mark.parametrize("cache_rate, crop_ratios", [(0.0, None), (0.5, None), (0.0, (1.0, 1.0, 2.0, 1.0, 1.0))])
def test_crops_and_validation_equal_the_in_memory_path(demo, cache_rate, crop_ratios):
    kw = {"crop_sample": 2, "batch_size": 2, "num_workers": 0, "seed": 3, "augment_device": "cpu", "crop_ratios": crop_ratios}
    mem_train, mem_val = get_loaders(CFG, demo, cache_rate=1.0, check=False, **kw)
    st_train, st_val = get_loaders(CFG, demo, cache_rate=cache_rate, check=False, preprocessed="auto", **kw)
    assert mem_train.store is None and st_train.store is not None
    n = 0
    for _ in range(3):  # epochs of the endless stream
        for a, b in zip(mem_train, st_train):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
            n += 1
    assert n == 3 * len(mem_train) > 0
    # validation: the same volumes, hence the same Dice, as the path without the store
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, CFG.num_classes, 1)).eval()
    dice = []
    for loader in (mem_val, st_val):
        acc = DiceAccumulator(CFG.num_classes, CFG.class_names)
        for batch in loader:
            image = torch.as_tensor(batch["image"]).as_subclass(torch.Tensor)
            acc.add(sliding_window_predict(net, image, CFG.roi, sw_batch_size=2), torch.as_tensor(batch["label"]).as_subclass(torch.Tensor))
        dice.append(acc.per_class())
    vm, vs = next(iter(mem_val)), next(iter(st_val))
    assert torch.equal(torch.as_tensor(vm["image"]).as_subclass(torch.Tensor), vs["image"]) and torch.equal(torch.as_tensor(vm["label"]).as_subclass(torch.Tensor), vs["label"])
    assert dice[0] == dice[1]


def _flipped_case(folder: str, name: str, seed: int) -> None:
    """A case at the demo preset's 2 mm, stored LPS (x and y flipped): resampling it is a re-orientation."""
    rng = np.random.default_rng(seed)
    image = np.full((30, 28, 26), -1000.0, dtype=np.float32)
    image[4:25, 3:22, 5:24] = 40.0 + rng.normal(0, 5, (21, 19, 19))
    label = np.zeros(image.shape, dtype=np.uint8)
    label[8:15, 6:12, 9:20] = 1
    label[16:22, 12:20, 7:14] = 3
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    affine[:3, 3] = (60.0, 50.0, -20.0)
    for sub, arr in (("imagesTr", image), ("labelsTr", label)):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        nib.save(nib.Nifti1Image(arr, affine), os.path.join(folder, sub, name))


def test_store_geometry_inverts_to_the_native_label(tmp_path):
    # The stored label put back on the native grid with the stored affines (MONAI's SpatialResample)
    # is the native label: the JSON holds what inversion to native space needs.
    root = str(tmp_path / "flipped")
    for i in range(2):
        _flipped_case(root, f"case_{i}.nii.gz", i)
    cases = list_cases(root, "train")
    built = build_store(CFG, cases, default_base(), root=root, num_workers=1, progress=False)
    for case in cases:
        meta = read_json(os.path.join(built.path, "cases", case_id(case) + ".json"))
        lab = open_case(built.record(case))["label"]
        box = tuple(slice(lo, lo + n) for (lo, _), n in zip(meta["pad"], meta["unpadded_shape"]))
        assert meta["unpadded_shape"] == [21, 19, 19] and meta["pad"] == [[5, 6], [6, 7], [6, 7]]  # cropped to the body, padded to 32
        stored = MetaTensor(torch.from_numpy(np.array(lab[(slice(None), *box)], dtype=np.float32)), affine=torch.tensor(meta["affine"], dtype=torch.float64))
        back = SpatialResample(mode="nearest")(stored, dst_affine=torch.tensor(meta["original_affine"], dtype=torch.float64), spatial_size=meta["original_shape"])
        np.testing.assert_array_equal(np.asarray(back[0]), np.asarray(nib.load(case["label"]).dataobj))


def test_read_only_dataset_uses_the_default_location_outside_it(demo, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_base() == str(tmp_path / "xdg" / "rep3d" / "preprocessed") == resolve_base(None) == resolve_base("auto")
    assert resolve_base("off") is None and resolve_base(str(tmp_path / "mine")) == str(tmp_path / "mine")

    def snapshot():
        return sorted((os.path.relpath(os.path.join(d, f), demo), os.stat(os.path.join(d, f)).st_mtime_ns) for d, _, fs in os.walk(demo) for f in fs)

    before = snapshot()
    for d, dirs, fs in os.walk(demo):
        for x in [d] + [os.path.join(d, f) for f in fs]:
            os.chmod(x, os.stat(x).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        train, _ = get_loaders(CFG, demo, cache_rate=0.0, num_workers=0, augment_device="cpu", preprocessed=None)
        batch = next(iter(train))
    finally:
        for d, dirs, fs in os.walk(demo):
            os.chmod(d, 0o755)
    assert batch["image"].shape == (2, 1, 32, 32, 32)
    assert train.store.path.startswith(str(tmp_path / "xdg" / "rep3d" / "preprocessed") + os.sep)
    assert snapshot() == before


def test_changed_setting_builds_a_new_store(demo, monkeypatch):
    writes = Writes(monkeypatch)
    first = build(demo)
    coarse = get_dataset_config("demo", spacing=(3.0, 3.0, 3.0))
    second = build_store(coarse, all_cases(demo), default_base(), root=demo, num_workers=1, progress=False)
    assert second.path != first.path and os.path.dirname(second.path) == os.path.dirname(first.path)
    assert len(writes.ids) == 8 and second.report.action == "built"
    assert os.path.isfile(os.path.join(first.path, "store.json"))  # the first store is left as it was
    # settings that change nothing stored keep the store: class names, cache rate, crop ratios' values
    renamed = get_dataset_config("demo", class_names="bg,a,b,c,d", cache_rate=0.5)
    assert store_path(default_base(), renamed, demo, None) == first.path
    assert store_path(default_base(), CFG, demo, None, crop_ratios=[1, 1, 1, 1, 2]) == store_path(default_base(), CFG, demo, None, crop_ratios=[1, 2, 1, 1, 1]) != first.path
    assert store_path(default_base(), CFG, demo, None, roi=(48, 48, 48)) != first.path


def test_other_ranks_wait_for_rank_0(demo):
    cases = all_cases(demo)
    got = {}
    waiter = threading.Thread(target=lambda: got.update(store=prepare_store(CFG, cases, None, root=demo, rank=1)))
    waiter.start()
    built = prepare_store(CFG, cases, None, root=demo, rank=0, num_workers=1, progress=False)
    waiter.join(timeout=60)
    assert got["store"].path == built.path and got["store"].report.action == "waited" and set(got["store"].cases) == set(built.cases)
    # a build that fails on rank 0 ends the waiting ranks with its message
    rewrite(cases[0]["image"], 1.0)
    store_mod._note_failure(built.path, DataError(["demo_tr_000.nii.gz: broken"]))
    with pytest.raises(DataError, match="broken"):
        wait_for_store(CFG, cases, default_base(), root=demo, poll_s=0.05)


def test_preprocess_command_builds_then_reuses(demo, capsys, tmp_path):
    argv = ["--root", demo, "--dataset", "demo", "--num_workers", "1", "--preprocessed", str(tmp_path / "mine")]
    assert preprocess_main(argv) == 0
    out = capsys.readouterr().out
    assert "4 cases checked" in out and "built (4 cases" in out and str(tmp_path / "mine") in out
    assert preprocess_main(argv) == 0
    assert "reused" in capsys.readouterr().out
    # a bad label is reported with the checks' one message, nothing is stored for it, no traceback
    lab = list_cases(demo, "train")[0]["label"]
    img = nib.load(lab)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 0 + 9, img.affine, img.header), lab)
    assert preprocess_main(argv) == 2
    err = capsys.readouterr().err
    assert lab in err and "Traceback" not in err
    assert preprocess_main(argv[:-2] + ["--preprocessed", "off"]) == 2
    assert "nothing to build" in capsys.readouterr().err

"""Tests of the data check's record and the kept plan (issue 22, item 7): a second start reads the
headers of unchanged cases, not their volumes; a changed file is read whole again, and a changed
class count is still checked against the recorded label values."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

import rep3d.data.checks as checks
import rep3d.data.loaders as loaders
import rep3d.planning as planning
from rep3d.data.cases import list_cases
from rep3d.data.checks import CheckRecord, check_dataset
from rep3d.data.dataset_config import DataError, get_dataset_config
from rep3d.data.store_layout import check_record_path, dataset_cache_dir
from rep3d.planning import resolve_dataset

CFG = get_dataset_config("demo")


class Reads:
    """Records every file whose voxels the checks (and the planner) read."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[str] = []
        for module in (checks, planning):
            original = module.read_array

            def counted(path, *a, _original=original, **k):
                self.paths.append(os.path.abspath(str(path)))
                return _original(path, *a, **k)

            monkeypatch.setattr(module, "read_array", counted)


def _record(tmp_path, root: str) -> CheckRecord:
    return CheckRecord(check_record_path(str(tmp_path / "pre"), root, None))


def _labels(root: str) -> list[str]:
    return [os.path.abspath(c["label"]) for split in ("train", "val") for c in list_cases(root, split)]


def test_second_check_reads_no_volume_and_a_changed_label_is_read_again(demo, tmp_path, monkeypatch):
    reads = Reads(monkeypatch)
    check_dataset(CFG, demo, record=_record(tmp_path, demo))
    assert set(_labels(demo)) <= set(reads.paths)  # the first check reads every label

    reads.paths.clear()
    again = check_dataset(CFG, demo, record=_record(tmp_path, demo))
    assert reads.paths == []
    assert [c["image"] for c in again["train"]] == [c["image"] for c in list_cases(demo, "train")]

    changed = _labels(demo)[1]
    img = nib.load(changed)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7  # outside the demo's classes: the check must see it
    nib.save(nib.Nifti1Image(data, img.affine), changed)
    reads.paths.clear()
    with pytest.raises(DataError, match="label values 7"):
        check_dataset(CFG, demo, record=_record(tmp_path, demo))
    assert changed in reads.paths
    assert not set(_labels(demo)) - {changed} & set(reads.paths)


def test_recorded_label_values_are_checked_against_a_new_class_count(demo, tmp_path, monkeypatch):
    check_dataset(CFG, demo, record=_record(tmp_path, demo))
    reads = Reads(monkeypatch)
    fewer = get_dataset_config("demo", num_classes=2, class_names=["background", "a"]) if CFG.num_classes > 2 else None
    if fewer is None:
        pytest.skip("the demo preset has two classes")
    with pytest.raises(DataError, match="outside 0..1"):
        check_dataset(fewer, demo, record=_record(tmp_path, demo))
    assert reads.paths == []


def test_a_kept_plan_is_reused_until_a_case_changes(demo, tmp_path, monkeypatch):
    cache = dataset_cache_dir(str(tmp_path / "pre"), demo, None)
    first, _ = resolve_dataset(None, demo, cache_dir=cache)
    reads = Reads(monkeypatch)
    again, plan = resolve_dataset(None, demo, cache_dir=cache)
    assert reads.paths == [] and plan is not None
    assert again == first

    image = list_cases(demo, "train")[0]["image"]
    img = nib.load(image)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 1.0 + 1.0, img.affine), image)
    reads.paths.clear()
    resolve_dataset(None, demo, cache_dir=cache)
    assert os.path.abspath(image) in reads.paths  # planned again from the files
    assert len(os.listdir(cache)) >= 3  # two plans kept and the record


def test_without_loader_workers_the_check_and_the_store_build_still_use_the_cores(demo, tmp_path, monkeypatch):
    """The GPU path starts no loader workers (num_workers 0); checking and building are parallel anyway."""
    seen: dict = {}
    real_check, real_prepare = loaders.check_dataset, loaders.prepare_store

    def check(*a, **k):
        seen["check"] = k["num_workers"]
        return real_check(*a, **k)

    def prepare(*a, **k):
        seen["store"] = k["num_workers"]
        return real_prepare(*a, **k)

    monkeypatch.setattr(loaders, "check_dataset", check)
    monkeypatch.setattr(loaders, "prepare_store", prepare)
    monkeypatch.setattr(loaders, "default_num_workers", lambda: 3)
    train, _ = loaders.get_loaders(CFG, demo, num_workers=0, preprocessed=str(tmp_path / "pre"), progress=False)
    train.close()
    assert seen == {"check": 3, "store": 3}
    assert train.check_note.startswith("data check: 4 cases in")
    train, _ = loaders.get_loaders(CFG, demo, num_workers=0, preprocessed=str(tmp_path / "pre"), progress=False)
    train.close()
    assert "4 unchanged since their last check" in train.check_note

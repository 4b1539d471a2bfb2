"""Nothing a user has is lost or silently wrong (issue 21): inputs never overwritten, one writer per
folder, file-system errors as one message with every earlier file intact, umask permissions,
non-finite voxels reported, a closing command that predicts the run's own cases, finished runs left
alone, interrupted predictions continued."""

from __future__ import annotations

import errno
import glob
import json
import os
import shlex
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import main_train
import rep3d.fileio
import test_seg
from helpers import TINY_FLAGS
from rep3d.data.checks import check_dataset
from rep3d.data.dataset_config import DataError, get_dataset_config
from rep3d.fileio import FolderLock, FolderLockedError, WriteError, atomic_path, remove_stale_temporaries, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_FLAGS = [
    "--dataset", "custom", "--spacing", "2", "2", "2", "--intensity", "window", "--a_min", "-100", "--a_max", "300",
    "--num_classes", "3", "--roi", "32", "32", "32",
]  # fmt: skip
FAST = ["--num_workers", "0", "--gpu", "-1", "--amp", "off"]
SHAPE = (32, 32, 32)


def _write_dataset(root: str, n_train: int = 2, n_val: int = 2, nan_case: str | None = None) -> str:
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    names = {"Tr": [f"tr{i}" for i in range(n_train)], "Val": [f"va{i}" for i in range(n_val)]}
    for split, cases in names.items():
        os.makedirs(os.path.join(root, f"images{split}"), exist_ok=True)
        os.makedirs(os.path.join(root, f"labels{split}"), exist_ok=True)
        for i, name in enumerate(cases):
            rng = np.random.default_rng(i + 7 * len(split))
            img = np.full(SHAPE, -1000.0, np.float32)
            img[2:-2, 2:-2, 2:-2] = 0.0
            lab = np.zeros(SHAPE, np.uint8)
            lab[6 + i : 16 + i, 6:18, 8:20] = 1
            lab[18:27, 14:24, 10:22] = 2
            img[lab == 1], img[lab == 2] = 150.0, 260.0
            img += rng.normal(0, 10, SHAPE).astype(np.float32)
            if name == nan_case:
                img[3, 3, 3], img[4, 4, 4] = np.nan, np.inf
            nib.save(nib.Nifti1Image(img, aff), os.path.join(root, f"images{split}", f"{name}.nii.gz"))
            nib.save(nib.Nifti1Image(lab, aff), os.path.join(root, f"labels{split}", f"{name}.nii.gz"))
    return root


def _train_argv(root: str, out: str, *extra: str) -> list[str]:
    return ["--root", root, *DATA_FLAGS, "--output", out, "--lr", "3e-3", "--max_iter", "2", "--eval_step", "2", "--sw_batch_size", "1", *FAST, *TINY_FLAGS, *extra]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return _write_dataset(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def finished_run(root, tmp_path_factory) -> tuple[str, list[str]]:
    """A finished tiny run on a custom dataset, and the lines it printed."""
    out = str(tmp_path_factory.mktemp("run") / "run")
    lines: list[str] = []
    main_train.train(main_train.parse_args(_train_argv(root, out)), log=lines.append)
    return out, lines


def _tree(folder: str) -> dict[str, bytes]:
    return {p: open(p, "rb").read() for p in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)) if os.path.isfile(p)}


# --------------------------------------------------------------------------------------------------
# inputs are never written


def test_output_inside_an_input_folder_is_refused_and_the_input_is_untouched(root, finished_run, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    img = nib.load(os.path.join(root, "imagesVal", "va0.nii.gz"))
    nib.save(img, src / "liver.nii.gz")
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), img.affine), src / "liver_seg.nii.gz")  # the user's own label
    before = _tree(str(src))
    ckpt = os.path.join(finished_run[0], "best_metric_model.pth")
    for out in (src, src / "sub"):
        code = test_seg.main(["--trained_weights", ckpt, "--input", str(src), "--output", str(out), *FAST])
        err = capsys.readouterr().err
        assert code == 2 and "input folder" in err and "Traceback" not in err
    assert _tree(str(src)) == before and not (src / "sub").exists()
    # --root: the image and label folders it reads are refused too
    code = test_seg.main(["--trained_weights", ckpt, "--root", root, "--split", "val", "--output", os.path.join(root, "labelsVal"), *FAST])
    assert code == 2 and "input folder" in capsys.readouterr().err


def test_predictions_beside_their_inputs_are_not_read_back_as_inputs(tmp_path):
    from rep3d.data.cases import list_images

    aff = np.eye(4)
    for name in ("case_a", "case_a_seg", "case_a_prob", "case_b"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), aff), tmp_path / f"{name}.nii.gz")
    assert sorted(os.path.basename(c["image"]) for c in list_images(str(tmp_path))) == ["case_a.nii.gz", "case_b.nii.gz"]


# --------------------------------------------------------------------------------------------------
# one writer per folder

HOLDER = """
import sys
from rep3d.fileio import FolderLock
lock = FolderLock(sys.argv[1], "holder").acquire()
print("locked", flush=True)
sys.stdin.readline()
"""


def _hold(folder: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, folder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_before_writing_and_the_lock_dies_with_its_process(root, finished_run, tmp_path, capsys):
    out = str(tmp_path / "busy")
    holder = _hold(out)
    try:
        code = main_train.main(_train_argv(root, out))
        err = capsys.readouterr().err
        assert code == 2 and f"pid {holder.pid}" in err and "in use" in err
        assert not os.path.exists(os.path.join(out, "config.json"))
        ckpt = os.path.join(finished_run[0], "best_metric_model.pth")
        code = test_seg.main(["--trained_weights", ckpt, "--root", root, "--split", "val", "--output", out, *FAST])
        assert code == 2 and f"pid {holder.pid}" in capsys.readouterr().err
        assert not glob.glob(os.path.join(out, "*seg*"))
    finally:
        holder.kill()  # as kill -9: nothing is left to clean up
        holder.wait()
    with FolderLock(out, "after"):
        pass
    with FolderLock(out, "first"), pytest.raises(FolderLockedError):
        FolderLock(out, "second").acquire()


# --------------------------------------------------------------------------------------------------
# file-system errors


@pytest.mark.parametrize(
    "failure",
    ["oserror", "torch_zip_writer"],
)
def test_disk_full_at_a_checkpoint_keeps_every_earlier_file_and_no_temporary(root, tmp_path, monkeypatch, capsys, failure):
    out = str(tmp_path / "run")
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        if os.path.basename(f).startswith(".checkpoint_last.pth."):
            calls.append(f)
        if len(calls) > 1:  # the step-2 checkpoints are written; the step-4 ones meet a full disk
            with open(f, "wb") as fh:
                fh.write(b"half a checkpoint")
            full = OSError(errno.ENOSPC, "No space left on device")
            if failure == "oserror":
                raise full
            try:  # what torch.save does: its zip writer fails while handling the OSError
                raise full
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/3: file write failed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(rep3d.fileio.torch, "save", save)
    code = main_train.main(_train_argv(root, out, "--max_iter", "4"))
    err = capsys.readouterr().err
    assert code == 1 and "cannot write" in err and "disk is full" in err and "Traceback" not in err and "--resume" in err
    state = torch.load(os.path.join(out, "checkpoint_last.pth"), map_location="cpu", weights_only=True)
    assert int(state["step"]) == 2
    torch.load(os.path.join(out, "best_metric_model.pth"), map_location="cpu", weights_only=True)
    assert not [f for f in os.listdir(out) if "tmp" in f]


def test_unwritable_output_is_one_message_before_any_data_is_read(root, finished_run, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = main_train.main(_train_argv(root, str(blocker / "run")))
    err = capsys.readouterr().err
    assert code == 1 and str(blocker) in err and "is a file" in err and "Traceback" not in err
    # a read-only file system (root ignores chmod: the failing call is faked)
    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(rep3d.fileio.tempfile, "mkstemp", read_only)
    code = main_train.main(_train_argv(root, str(tmp_path / "ro")))
    err = capsys.readouterr().err
    assert code == 1 and "read-only" in err and "Traceback" not in err
    ckpt = os.path.join(finished_run[0], "best_metric_model.pth")
    code = test_seg.main(["--trained_weights", ckpt, "--root", root, "--output", str(tmp_path / "ro2"), *FAST])
    assert code == 1 and "read-only" in capsys.readouterr().err


def test_a_failed_write_removes_its_temporary_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.json"
    write_json({"a": 1}, path)
    with pytest.raises(WriteError, match="disk is full"), atomic_path(path) as tmp:
        open(tmp, "w").write("partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["x.json"]
    (tmp_path / ".checkpoint_last.pth.k3j2h1.tmp").write_text("old writer's")
    (tmp_path / f".x.json.abc{rep3d.fileio.TMP_MARK}").write_text("ours")
    assert len(remove_stale_temporaries(tmp_path)) == 2 and os.listdir(tmp_path) == ["x.json"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_get_the_permissions_of_the_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        write_json({}, tmp_path / "a.json")
        rep3d.fileio.save_checkpoint_atomic({"x": torch.zeros(1)}, tmp_path / "c.pth")
        rep3d.fileio.write_csv([["a"], [1]], tmp_path / "m.csv")
        with atomic_path(tmp_path / "p.nii.gz", suffix=".nii.gz") as tmp:
            nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), tmp)
    finally:
        os.umask(old)
    for name in ("a.json", "c.pth", "m.csv", "p.nii.gz"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


# --------------------------------------------------------------------------------------------------
# data check


def test_non_finite_voxels_are_reported_with_the_other_problems(tmp_path):
    root = _write_dataset(str(tmp_path / "d"), n_train=2, n_val=1, nan_case="tr1")
    bad = os.path.join(root, "labelsTr", "tr0.nii.gz")
    nib.save(nib.Nifti1Image(np.full(SHAPE, 7, np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])), bad)
    cfg = get_dataset_config("custom", spacing=(2, 2, 2), intensity="window", a_min=-100, a_max=300, num_classes=3, roi=(32, 32, 32))
    with pytest.raises(DataError) as info:
        check_dataset(cfg, root)
    text = str(info.value)
    assert os.path.join(root, "imagesTr", "tr1.nii.gz") in text and "1 NaN, 1 Inf" in text
    assert bad in text  # the label problem of another case, in the same message


# --------------------------------------------------------------------------------------------------
# the closing command, finished runs, interrupted predictions


def test_the_printed_predict_command_scores_the_runs_own_validation_cases(root, finished_run, tmp_path, capsys):
    out, lines = finished_run
    line = next(l for l in "\n".join(lines).splitlines() if l.startswith("predict with: "))
    argv = shlex.split(line[len("predict with: ") :])
    assert argv[:2] == ["python3", "test_seg.py"] and "--root" in argv
    argv[argv.index("--output") + 1] = str(tmp_path / "pred")
    assert test_seg.main(argv[2:] + FAST) == 0
    with open(tmp_path / "pred" / "summary.json") as f:
        assert json.load(f)["cases"] == 2  # imagesVal's two cases, not the demo
    assert sorted(os.listdir(tmp_path / "pred")).count("va0_seg.nii.gz") == 1
    # without an input flag, a checkpoint that is not the demo's says what is missing
    code = test_seg.main(["--trained_weights", os.path.join(out, "best_metric_model.pth"), "--output", str(tmp_path / "p2"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "--root" in err and "not the demo" in err


def test_resume_of_a_finished_run_says_so_and_changes_nothing(root, finished_run, tmp_path):
    out, _ = finished_run
    before = _tree(out)
    lines: list[str] = []
    summary = main_train.train(main_train.parse_args(["--output", out, "--resume", *FAST]), log=lines.append)
    said = "\n".join(lines)
    assert "already finished (step 2 of 2)" in said and "best_metric_model.pth" in said
    assert _tree(out) == before and summary["steps"] == 2
    # a larger --max_iter continues (in a copy, so that the shared run stays finished)
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    summary = main_train.train(main_train.parse_args(["--output", copy, "--resume", "--max_iter", "4", *FAST]), log=lambda m: None)
    assert summary["steps"] == 4 and summary["steps_this_session"] == 2


def test_continue_skips_finished_predictions_and_still_scores_them(root, finished_run, tmp_path, capsys, monkeypatch):
    ckpt = os.path.join(finished_run[0], "best_metric_model.pth")
    out = tmp_path / "pred"
    argv = ["--trained_weights", ckpt, "--root", root, "--split", "val", "--output", str(out), *FAST]
    assert test_seg.main(argv) == 0
    first = json.loads((out / "summary.json").read_text())
    os.remove(out / "va1_seg.nii.gz")  # as if the run had been killed before its second case
    (out / f".va1_seg.nii.gz.x{rep3d.fileio.TMP_MARK}.nii.gz").write_bytes(b"partial")  # a killed write
    kept = (out / "va0_seg.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert test_seg.main(argv + ["--continue"]) == 0
    said = capsys.readouterr().out
    assert "skipped 1 case(s)" in said and "1 to predict" in said
    assert (out / "va0_seg.nii.gz").stat().st_mtime_ns == kept and (out / "va1_seg.nii.gz").is_file()
    assert not [f for f in os.listdir(out) if rep3d.fileio.TMP_MARK in f]
    again = json.loads((out / "summary.json").read_text())
    assert again["cases"] == 2 and again["mean_dice"] == pytest.approx(first["mean_dice"], abs=1e-6)

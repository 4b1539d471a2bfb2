"""test_seg.py: native-space geometry of the written predictions, metrics, checkpoint variants, TTA,
clear errors. Tiny REP3D, 3 classes, ~16^3 volumes after resampling to 2 mm."""

from __future__ import annotations

import csv
import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn

import rep3d.inference.predictor
import rep3d.inference.sliding_window
import test_seg
from helpers import CASE_BOX, CASE_SHAPE, CLASS_NAMES, PREDICT_FAST, TINY, TINY_FLAGS, PerVoxel, tiny_model, write_case
from networks import reparameterize_model
from rep3d.data.loaders import get_test_loader
from rep3d.inference.run import run_inference
from rep3d.inference.sliding_window import predict_volume
from rep3d.metrics import case_metrics, metrics_table, summarize_metrics

NAMES = CLASS_NAMES
DATASET = {
    "name": "custom", "spacing": [2.0, 2.0, 2.0], "intensity": "window", "a_min": -100.0, "a_max": 300.0,
    "num_classes": 3, "class_names": NAMES, "roi": [32, 32, 32], "cache_rate": 0.0,
}  # fmt: skip
FAST = PREDICT_FAST  # float32: the tests compare predictions exactly
SHAPE, BOX = CASE_SHAPE, CASE_BOX
# the settings of a bare state dict of the tiny model, on test_seg's command line
BARE_FLAGS = ["--dataset", "custom", "--spacing", "2", "2", "2", "--a_min", "-100", "--a_max", "300", "--roi", "32", "32", "32", *TINY_FLAGS]


def checkpoint(state: dict, meta: bool = True, prefix: str = "", out_channels: int = 3) -> dict:
    """A checkpoint of the first format (settings at the top level), or a bare state dict."""
    state = {prefix + k: v for k, v in state.items()}
    if not meta:
        return state
    return {
        "state_dict": state, "network": "REP3D", "network_kwargs": {"modulation": "lrbm", "dwconv": "native", **TINY},
        "in_channels": 1, "out_channels": out_channels, "dataset": {**DATASET, "num_classes": out_channels,
        "class_names": NAMES + [f"c{i}" for i in range(3, out_channels)]}, "step": 10, "best_metric": 0.5, "args": {"seed": 0},
    }  # fmt: skip


@pytest.fixture(scope="module")
def training_ckpt(tmp_path_factory) -> str:
    """helpers.tiny_model in a first-format checkpoint: this file tests that format's path (the
    format-2 one is conftest's tiny_checkpoint, used by test_export.py)."""
    path = tmp_path_factory.mktemp("ckpt") / "best_metric_model.pth"
    torch.save(checkpoint(tiny_model().state_dict()), path)
    return str(path)


def run(argv):
    return run_inference(test_seg.parse_args(argv + FAST))


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# --------------------------------------------------------------------------------------------------


def test_predictions_keep_native_geometry_and_are_aligned(tmp_path, training_ckpt, monkeypatch, capsys):
    """RAS, LPS (qform only), anisotropic LAS, oblique and a 4-D (X,Y,Z,1) input: each output has the
    input's exact shape, affine and orientation, and (per-voxel model) lands on the box it segments."""
    root = tmp_path / "data"
    kinds = {"ras": {}, "lps": {"qform_only": True}, "aniso": {}, "oblique": {"qform_only": True}, "fourd": {"four_d": True}}
    inputs = {k: write_case(root / "imagesTs", k, "ras" if k == "fourd" else k, root / "labelsTs", **kw) for k, kw in kinds.items()}
    monkeypatch.setattr(rep3d.inference.predictor, "load_model", lambda resolved, device, path: PerVoxel().eval())
    out = tmp_path / "pred"
    res = test_seg.main(["--trained_weights", training_ckpt, "--root", str(root), "--output", str(out), "--save_probabilities"] + FAST)
    assert res == 0
    printed = capsys.readouterr().out
    for k, src in inputs.items():
        ref, pred = nib.load(src), nib.load(out / f"{k}_seg.nii.gz")
        assert pred.shape == ref.shape, k
        assert np.array_equal(pred.affine, ref.affine), k
        assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(ref.affine)
        assert pred.get_data_dtype() == np.uint8
        seg = np.asarray(pred.dataobj).reshape(SHAPE)
        box = np.zeros(SHAPE, bool)
        box[BOX] = True
        assert dice(seg == 1, box) > 0.85, k
        prob = nib.load(out / f"{k}_prob.nii.gz")
        assert prob.shape == SHAPE + (3,) and np.array_equal(prob.affine, ref.affine), k
        assert dice(prob.get_fdata().argmax(-1) == 1, box) > 0.9, k
    # labels in labelsTs -> metrics files and the printed table
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == len(inputs) * 2 and {r["name"] for r in rows} == {"organ", "lesion"}
    summary = json.load(open(out / "summary.json"))
    assert summary["cases"] == len(inputs) and summary["classes"][0]["dice"] > 0.85
    assert summary["classes"][1]["n"] == 0  # no lesion in any label: not scored
    assert "organ" in printed and "mean (foreground)" in printed
    assert (out / "summary.csv").is_file() and (out / "inference_args.json").is_file()


def test_labels_folder_pairs_by_case_name(tmp_path, training_ckpt, monkeypatch):
    """--input folder + --labels folder (nnU-Net names: image case_0000, label case_seg): scored."""
    write_case(tmp_path / "img", "case_0000", "lps", label_folder=tmp_path / "lab")
    os.rename(tmp_path / "lab" / "case_0000.nii.gz", tmp_path / "lab" / "case_seg.nii.gz")
    write_case(tmp_path / "img", "other", "ras")  # no label: predicted, not scored
    monkeypatch.setattr(rep3d.inference.predictor, "load_model", lambda resolved, device, path: PerVoxel().eval())
    res = run(["--trained_weights", training_ckpt, "--input", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"), "--output", str(tmp_path / "o"), "--no_hd95"])
    assert len(res["predictions"]) == 2 and {r["case"] for r in res["rows"]} == {"case"}
    assert res["summary"]["classes"][0]["dice"] > 0.85 and "organ" in res["table"]
    assert np.isnan(res["summary"]["classes"][0]["hd95"])  # --no_hd95


def test_perfect_prediction_scores_one_and_misses_are_flagged():
    lab = np.zeros((12, 10, 8), np.uint8)
    lab[2:6, 2:6, 2:5] = 1
    lab[7:10, 5:9, 3:7] = 2
    m = case_metrics(lab, lab, 3, spacing=[1.5, 1.5, 2.0])
    assert m["dice"] == [1.0, 1.0] and m["hd95"] == [0.0, 0.0]
    rows = [{"case": "a", "class": c, "name": NAMES[c], "dice": m["dice"][c - 1], "hd95": m["hd95"][c - 1]} for c in (1, 2)]
    summary = summarize_metrics(rows, NAMES)
    table = metrics_table(summary)
    assert summary["mean_dice"] == 1.0
    lines = table.splitlines()
    assert any(line.startswith("1 organ") and "1.0000" in line for line in lines)
    assert lines[-1].startswith("mean (foreground)") and "1.0000" in lines[-1]
    # a shifted organ and a missed lesion are not perfect: Dice < 1, HD95 > 0, inf for the miss
    bad = np.roll(lab, 2, axis=0)
    bad[bad == 2] = 0
    m2 = case_metrics(bad, lab, 3, spacing=[1.5, 1.5, 2.0])
    assert m2["dice"][0] < 1.0 and m2["hd95"][0] >= 3.0 - 1e-6 and m2["dice"][1] == 0.0 and m2["hd95"][1] == float("inf")
    with pytest.raises(ValueError, match="same grid"):
        case_metrics(lab[:-1], lab, 3)


def test_checkpoint_variants_give_identical_predictions(tmp_path, training_ckpt):
    """A training checkpoint, its folded copy, a DDP (module.-prefixed) one and a bare state dict
    (settings from flags) predict the same labels and probabilities."""
    src = write_case(tmp_path / "in", "case_0000", "lps")
    net = tiny_model()
    folded = reparameterize_model(net).state_dict()
    assert not any(".modulation." in k for k in folded)
    variants = {
        "folded": (checkpoint(folded), []),
        "ddp": (checkpoint(net.state_dict(), prefix="module."), []),
        "bare": (checkpoint(folded, meta=False, prefix="module."), [*BARE_FLAGS, "--num_classes", "3", "--dwconv", "native"]),
    }
    probs = ["--save_probabilities", "--resample_probabilities"]
    ref = run(["--trained_weights", training_ckpt, "--input", src, "--output", str(tmp_path / "train")] + probs)
    seg_ref = np.asarray(nib.load(ref["predictions"][0]).dataobj)
    prob_ref = nib.load(ref["probabilities"][0])
    assert os.path.basename(ref["predictions"][0]) == "case_seg.nii.gz"  # nnU-Net _0000 suffix dropped
    assert prob_ref.shape == SHAPE + (3,) and np.array_equal(prob_ref.affine, nib.load(src).affine)
    p = prob_ref.get_fdata()
    assert np.allclose(p.sum(-1), 1.0, atol=1e-3)
    assert (p.argmax(-1) == seg_ref).mean() > 0.99  # labels = argmax of these (up to uint16 rounding)
    assert len(np.unique(seg_ref)) > 1  # a constant map would make the comparison vacuous
    for name, (ck, flags) in variants.items():
        path = tmp_path / f"{name}.pth"
        torch.save(ck, path)
        res = run(["--trained_weights", str(path), "--input", src, "--output", str(tmp_path / name)] + probs + flags)
        assert np.array_equal(np.asarray(nib.load(res["predictions"][0]).dataobj), seg_ref), name
        assert np.allclose(nib.load(res["probabilities"][0]).get_fdata(), p, atol=1e-4), name


def test_mirroring_tta_leaves_a_flip_equivariant_model_unchanged():
    torch.manual_seed(0)
    image = torch.rand(1, 1, 19, 14, 11)  # asymmetric content and size
    image[..., :5, :, :] += 1.0
    kw = dict(roi=(16, 16, 16), device=torch.device("cpu"), sw_batch_size=2, overlap=0.25)
    plain = predict_volume(PerVoxel(), image, **kw)
    tta = predict_volume(PerVoxel(), image, tta=True, **kw)
    assert plain.shape == (1, 3, 19, 14, 11)
    assert torch.allclose(plain, tta, atol=1e-5)
    # a model that is not flip-equivariant is changed by TTA (the check above can fail)
    conv = nn.Conv3d(1, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.normal_()
    a = predict_volume(conv, image, **kw)
    b = predict_volume(conv, image, tta=True, **kw)
    assert not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--num_classes", "4"], "trained for 3 classes"),
        (["--dataset", "amos"], "trained for 3 classes"),
        (["--network", "3DUXNET"], "holds a REP3D model"),
        (["--kernel_size", "7"], "--kernel_size 7 contradicts"),
    ],
)
def test_flags_contradicting_the_checkpoint_are_refused(tmp_path, training_ckpt, capsys, flags, expect):
    src = write_case(tmp_path / "in", "a", "ras")
    code = test_seg.main(["--trained_weights", training_ckpt, "--input", src, "--output", str(tmp_path / "o")] + flags + FAST)
    err = capsys.readouterr().err
    assert code == 2 and expect in err and "Traceback" not in err


def test_bare_state_dict_of_another_class_count_is_refused(tmp_path, capsys):
    src = write_case(tmp_path / "in", "a", "ras")
    torch.save(reparameterize_model(tiny_model()).state_dict(), tmp_path / "bare.pth")
    flags = [*BARE_FLAGS, "--num_classes", "5"]
    code = test_seg.main(["--trained_weights", str(tmp_path / "bare.pth"), "--input", src, "--output", str(tmp_path / "o")] + flags + FAST)
    err = capsys.readouterr().err
    assert code == 2 and "class count" in err


def test_missing_or_corrupt_inputs_give_clear_messages(tmp_path, training_ckpt, capsys):
    out = ["--output", str(tmp_path / "o")] + FAST
    assert test_seg.main(["--trained_weights", training_ckpt, "--input", str(tmp_path / "nope.nii.gz")] + out) == 2
    assert "nope.nii.gz: not found" in capsys.readouterr().err
    src = write_case(tmp_path / "in", "a", "ras")
    raw = gzip.open(src).read()
    with gzip.open(tmp_path / "in" / "b.nii.gz", "wb") as f:
        f.write(raw[: len(raw) // 2])  # truncated voxel data
    assert test_seg.main(["--trained_weights", training_ckpt, "--input", str(tmp_path / "in")] + out) == 2
    err = capsys.readouterr().err
    assert "b.nii.gz" in err and "corrupt" in err and "Traceback" not in err
    assert test_seg.main(["--trained_weights", str(tmp_path / "missing.pth"), "--input", src] + out) == 2
    assert "missing.pth does not exist" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert test_seg.main(["--trained_weights", str(tmp_path / "junk.pth"), "--input", src] + out) == 2
    assert "could not read checkpoint" in capsys.readouterr().err


def test_out_of_memory_names_the_flags(tmp_path, training_ckpt, monkeypatch, capsys):
    src = write_case(tmp_path / "in", "a", "ras")

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(rep3d.inference.sliding_window, "sliding_window_predict", oom)
    code = test_seg.main(["--trained_weights", training_ckpt, "--input", src, "--output", str(tmp_path / "o")] + FAST)
    err = capsys.readouterr().err
    assert code == 2 and "--sw_batch_size" in err and "--stitch_on_cpu" in err and "Traceback" not in err


def test_each_case_takes_its_paths_from_its_own_batch(tmp_path, training_ckpt, monkeypatch):
    """The loader yields the cases in another order than listed: every prediction still lands in the
    file of its own input, with that input's shape and affine, and is scored against its own label."""
    a = write_case(tmp_path / "img", "a", "ras", tmp_path / "lab")
    b = write_case(tmp_path / "img", "b", "aniso", tmp_path / "lab")
    for path in (b, str(tmp_path / "lab" / "b.nii.gz")):  # b gets another shape than a
        img = nib.load(path)
        nib.save(type(img)(np.asarray(img.dataobj)[:20, :18, :12], img.affine, header=img.header), path)
    listed = get_test_loader

    def reversed_loader(cfg, cases, **kwargs):
        return listed(cfg, list(reversed(cases)), **kwargs)

    monkeypatch.setattr(rep3d.inference.predictor, "get_test_loader", reversed_loader)
    monkeypatch.setattr(rep3d.inference.predictor, "load_model", lambda resolved, device, path: PerVoxel().eval())
    res = run(["--trained_weights", training_ckpt, "--input", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"), "--output", str(tmp_path / "o"), "--no_hd95"])
    assert [os.path.basename(p) for p in res["predictions"]] == ["b_seg.nii.gz", "a_seg.nii.gz"]  # the loader's order
    for src in (a, b):
        ref, pred = nib.load(src), nib.load(tmp_path / "o" / (os.path.basename(src)[: -len(".nii.gz")] + "_seg.nii.gz"))
        assert pred.shape == ref.shape and np.array_equal(pred.affine, ref.affine)
    assert {r["case"] for r in res["rows"]} == {"a", "b"} and res["summary"]["classes"][0]["dice"] > 0.85


def test_help_is_grouped_and_lists_no_training_flags(capsys):
    with pytest.raises(SystemExit):
        test_seg.parse_args(["--help"])
    text = capsys.readouterr().out
    for group in ("inputs and outputs:", "post-processing:", "sliding window:", "runtime:", "network:", "data:"):
        assert group in text
    for flag in ("--cache_rate", "--cache_on_gpu", "--loader", "--crop_ratios", "--max_iter", "--lr"):
        assert flag + " " not in text and flag + "\n" not in text, flag
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.count("\nruntime:") == 1
    # an old command line with a training flag still runs (the flag is ignored with a warning)
    with pytest.warns(UserWarning, match="--cache_rate is a training option"):
        args = test_seg.parse_args(["--trained_weights", "x.pth", "--cache_rate", "0.2", "--threads", "2"])
    assert args.trained_weights == ["x.pth"] and args.threads == 2

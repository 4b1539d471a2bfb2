"""export_model.py and the deployment side of test_seg.py: ONNX / TorchScript exports equal PyTorch,
unsupported requests refused, fold ensembles average probabilities, largest-component post-processing
(fixed and decided per class), the Predictor entry point. Tiny REP3D (helpers.TINY), 32^3 windows, CPU."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import export_model
import networks
import rep3d.inference.predictor
import rep3d.runtime
import test_seg
from helpers import CASE_BOX, CASE_SHAPE, CLASS_NAMES, PREDICT_FAST, PerVoxel, write_case, write_tiny_checkpoint
from rep3d.fileio import sha256_of
from rep3d.export.exporter import check_request, dwconv_for, export_checkpoint
from rep3d.inference.checkpoint import InferenceError, resolve_checkpoint
from rep3d.inference.exported import ExportError
from rep3d.inference.postprocess import POSTPROCESS_FILE, keep_largest_component
from rep3d.inference.predictor import Predictor, describe_precision
from rep3d.inference.run import run_inference
from rep3d.inference.sliding_window import ensemble_probabilities, predict_volume
from rep3d.runtime import resolve_amp

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

FAST = PREDICT_FAST  # float32: the tests compare predictions exactly
SHAPE, BOX, NAMES = CASE_SHAPE, CASE_BOX, CLASS_NAMES


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint):
    """Two folds of one run folder: conftest's tiny checkpoint (this module's copy) and another seed."""
    run_dir = os.path.dirname(os.path.dirname(tiny_checkpoint))
    return [tiny_checkpoint, write_tiny_checkpoint(os.path.join(run_dir, "fold_1", "best_metric_model.pth"), seed=1)]


@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    sidecar = export_checkpoint(ckpts[0], str(out), formats=["onnx", "torchscript"])
    return out, sidecar


def deploy_reference(ckpt: str) -> torch.nn.Module:
    resolved = resolve_checkpoint(ckpt)
    return networks.build_deploy_network("REP3D", 1, 3, checkpoint=resolved["checkpoint"], **{**resolved["network_kwargs"], "dwconv": "native"})


def test_onnx_and_torchscript_outputs_equal_pytorch(exported, ckpts, tmp_path):
    """The files, loaded as a user outside the repo would, give PyTorch's logits (1e-4 relative): the
    default exports (kernel 5: native depthwise path, batch and spatial axes dynamic) also at another
    size, and an FFT-path ONNX export (batch dynamic, spatial fixed to the ROI); the sidecar describes them."""
    import onnxruntime as ort

    out, sidecar = exported
    ref_model = deploy_reference(ckpts[0])
    fft = export_checkpoint(ckpts[0], str(tmp_path / "fft"), formats=["onnx"], dwconv="fft")
    sessions = {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for name, path in
                (("native", out / "model.onnx"), ("fft", tmp_path / "fft" / "model.onnx"))}  # fmt: skip
    script = torch.jit.load(str(out / "model.ts"))
    g = torch.Generator().manual_seed(1)
    for shape in [(1, 1, 32, 32, 32), (2, 1, 32, 32, 32), (2, 1, 48, 16, 32)]:
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            ref = ref_model(x).numpy()
            outputs = {"torchscript": script(x).numpy()}
        for name, session in sessions.items():
            if name == "native" or shape[2:] == (32, 32, 32):
                outputs[f"onnx-{name}"] = session.run(["logits"], {"image": x.numpy()})[0]
        scale = np.abs(ref).max()
        assert scale > 0.1
        for name, value in outputs.items():
            assert np.abs(value - ref).max() / scale < 1e-4, (name, shape)
    # a different model's output would not pass: the comparison can fail
    other = deploy_reference(ckpts[1])
    with torch.no_grad():
        assert np.abs(other(x).numpy() - ref).max() / scale > 1e-2
    files = sidecar["files"]
    assert files["onnx"]["dwconv"] == "native" and set(files["onnx"]["dynamic_axes"]) == {"0", "2", "3", "4"}
    assert files["torchscript"]["dwconv"] == "native" and set(files["torchscript"]["dynamic_axes"]) == {"0", "2", "3", "4"}
    assert fft["files"]["onnx"]["dwconv"] == "fft" and fft["files"]["onnx"]["dynamic_axes"] == {"0": "batch (any)"}
    # auto: the FFT path only where ONNX Runtime runs it faster (large kernels), never in TorchScript
    assert [dwconv_for(f, "auto", k) for f, k in (("onnx", 21), ("onnx", 5), ("onnx", None), ("torchscript", 21))] == ["fft", "native", "native", "native"]
    assert sidecar["output"]["class_names"] == NAMES and sidecar["input"]["spacing_mm"] == [2.0, 2.0, 2.0]
    assert sidecar["input"]["normalisation"]["a_min"] == -100.0 and sidecar["input"]["orientation"] == "RAS"
    assert sidecar["sliding_window"] == {"roi": [32, 32, 32], "sw_batch_size": 2, "overlap": 0.25, "mode": "gaussian"}
    assert sidecar["network"]["deploy"] is True
    assert all(files[f]["check"]["passed"] for f in ("onnx", "torchscript"))
    assert files["onnx"]["sha256"] == sha256_of(str(out / "model.onnx"))
    assert json.load(open(out / "model.json")) == json.loads(json.dumps(sidecar))


@pytest.mark.parametrize(
    "flags, expect",
    [(["--format", "tflite"], "--format tflite: not supported; choose from onnx, torchscript"),
     (["--opset", "11"], "--opset 11: not supported; this exporter writes and checks opsets 18, 19, 20"),
     (["--format", "onnx", "torchscript", "coreml", "--opset", "21"], "coreml"),
     (["--format", "torchscript", "--dwconv", "fft"], "the TorchScript tracer cannot record the FFT path")],
)  # fmt: skip
def test_export_with_another_opset_or_format_is_refused(tmp_path, ckpts, capsys, flags, expect):
    out = tmp_path / "out"
    code = export_model.main(["--trained_weights", ckpts[0], "--output", str(out)] + flags)
    err = capsys.readouterr().err
    assert code == 2 and expect in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was built or written
    with pytest.raises(ExportError, match="not supported"):
        check_request(["onnx"], 17)


def _probs(res) -> np.ndarray:
    return nib.load(res["probabilities"][0]).get_fdata()


def test_ensemble_is_the_mean_of_the_probabilities(tmp_path, ckpts):
    """--trained_weights A B, and the run folder holding fold_0/ and fold_1/, both give the mean of A's and
    B's probabilities; checkpoints of another class count are refused with one message."""
    src = write_case(tmp_path / "in", "case", "lps")
    common = ["--input", src, "--save_probabilities", "--resample_probabilities"] + FAST

    def run(weights, name):
        return run_inference(test_seg.parse_args(["--trained_weights", *weights, "--output", str(tmp_path / name)] + common))

    a, b = _probs(run([ckpts[0]], "a")), _probs(run([ckpts[1]], "b"))
    both = run(ckpts, "ab")
    folds = run([os.path.dirname(os.path.dirname(ckpts[0]))], "folds")
    assert np.abs(a - b).max() > 0.05  # the two models disagree: the mean is not either of them
    assert np.allclose(_probs(both), (a + b) / 2, atol=1e-4)
    assert np.allclose(_probs(folds), (a + b) / 2, atol=1e-4)
    seg = np.asarray(nib.load(both["predictions"][0]).dataobj)
    assert (seg == _probs(both).argmax(-1)).mean() > 0.99
    # ensemble_probabilities itself: the mean of predict_volume over the models
    models = [deploy_reference(c) for c in ckpts]
    image = torch.rand(1, 1, 40, 36, 30)
    kw = dict(sw_batch_size=2, overlap=0.25)
    mean = (predict_volume(models[0], image, (32,) * 3, torch.device("cpu"), **kw) + predict_volume(models[1], image, (32,) * 3, torch.device("cpu"), **kw)) / 2
    assert torch.allclose(ensemble_probabilities(models, image, [(32,) * 3] * 2, torch.device("cpu"), **kw), mean, atol=1e-6)

    other = write_tiny_checkpoint(tmp_path / "four" / "best_metric_model.pth", num_classes=4, spacing=(1.5, 1.5, 2.0))
    code = test_seg.main(["--trained_weights", ckpts[0], other, "--input", src, "--output", str(tmp_path / "bad")] + FAST)
    assert code == 2
    with pytest.raises(InferenceError, match=r"cannot be ensembled(.|\n)*classes 3 vs 4; class names .* spacing \[2.0, 2.0, 2.0\] vs \[1.5, 1.5, 2.0\]"):
        Predictor([ckpts[0], other])


def write_with_island(folder, name: str, label_folder=None) -> str:
    """write_case's box (the organ) plus a small bright island the label does not have."""
    path = write_case(folder, name, "ras", label_folder)
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    data[18:21, 14:17, 9:12] = 200
    nib.save(nib.Nifti1Image(data, img.affine, header=img.header), path)
    return path


def test_largest_component_removes_an_island_and_keeps_one_component():
    seg = np.zeros((20, 20, 12), np.uint8)
    seg[2:10, 2:10, 2:8] = 1
    one = seg.copy()
    seg[15:17, 15:17, 9:11] = 1  # island of class 1
    seg[15:18, 2:5, 2:5] = 2  # one component of class 2
    out = keep_largest_component(seg, [1, 2])
    assert out[15:17, 15:17, 9:11].max() == 0  # island gone
    assert np.array_equal(out[:, :, :], np.where(seg[..., :] == 2, 2, one))  # everything else unchanged
    assert np.array_equal(keep_largest_component(one, [1, 2]), one)  # one component: unchanged
    assert np.array_equal(keep_largest_component(seg, []), seg)


def test_postprocess_cli_fixed_and_auto(tmp_path, ckpts, monkeypatch):
    """--postprocess largest_component drops the planted island; --postprocess auto decides on labelled
    cases (class 1: the island costs Dice, so apply; class 2: never present, so not), stores the decision
    beside the checkpoint, and a later run without labels reuses it."""
    monkeypatch.setattr(rep3d.inference.predictor, "load_model", lambda resolved, device, path: PerVoxel().eval())
    labelled = write_with_island(tmp_path / "val", "v", tmp_path / "val_labels")
    unlabelled = write_with_island(tmp_path / "test", "t")
    island = (slice(18, 21), slice(14, 17), slice(9, 12))

    def run(weights, src, out, *extra):
        res = run_inference(test_seg.parse_args(["--trained_weights", weights, "--input", src, "--output", str(tmp_path / out), *extra] + FAST))
        return res, np.asarray(nib.load(res["predictions"][0]).dataobj).reshape(SHAPE)

    _, raw = run(ckpts[0], unlabelled, "raw")
    assert raw[island].min() == 1 and raw[BOX].mean() > 0.9  # the model does segment the island
    _, fixed = run(ckpts[0], unlabelled, "lcc", "--postprocess", "largest_component")
    assert fixed[island].max() == 0 and np.array_equal(fixed[BOX], raw[BOX])

    stored = os.path.join(os.path.dirname(ckpts[0]), POSTPROCESS_FILE)
    assert not os.path.exists(stored)
    with pytest.raises(InferenceError, match="no decision stored"):
        run(ckpts[0], unlabelled, "auto0", "--postprocess", "auto")
    res, decided = run(ckpts[0], labelled, "auto1", "--postprocess", "auto", "--labels", str(tmp_path / "val_labels"), "--no_hd95")
    decision = json.load(open(stored))
    assert decision["largest_component"] == [1]
    rows = {r["class"]: r for r in decision["classes"]}
    assert rows[1]["dice_after"] > rows[1]["dice_before"] and rows[2]["apply"] is False and rows[2]["cases"] == 0
    assert decided[island].max() == 0  # the decision was applied to this run's prediction too
    assert res["summary"]["classes"][0]["dice"] == pytest.approx(rows[1]["dice_after"], abs=1e-6)  # and scored after it
    _, reused = run(ckpts[0], unlabelled, "auto2", "--postprocess", "auto")
    assert np.array_equal(reused, fixed)


def test_predictor_checkpoint_array_and_export(tmp_path, ckpts, exported):
    """Predictor: a file and the same volume as array + affine give the CLI's labels; the ONNX export
    gives the checkpoint's labels."""
    src = write_case(tmp_path / "in", "case", "aniso")
    cli = run_inference(test_seg.parse_args(["--trained_weights", ckpts[0], "--input", src, "--output", str(tmp_path / "cli")] + FAST))
    expected = np.asarray(nib.load(cli["predictions"][0]).dataobj)
    threads = torch.get_num_threads()
    try:
        predictor = Predictor(ckpts[0], threads=1, amp="off")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert predictor.class_names == NAMES
    labels = predictor.predict(src)
    assert labels.shape == SHAPE and labels.dtype == np.uint8 and len(np.unique(labels)) > 1
    assert np.array_equal(labels, expected)
    img = nib.load(src)
    from_array, probs = predictor.predict(np.asarray(img.dataobj), affine=img.affine, return_probabilities=True)
    assert np.array_equal(from_array, expected) and probs.shape == (3,) + SHAPE
    out, _ = exported
    assert np.array_equal(Predictor(str(out / "model.json"), amp="off").predict(src), expected)
    with pytest.raises(InferenceError, match="affine"):
        predictor.predict(np.zeros(SHAPE, np.float32))


# --------------------------------------------------------------------------------------------------
# CPU precision: --amp auto takes bf16 for inference where the CPU does bf16 natively


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_on_the_cpu_follows_native_bf16(monkeypatch, native):

    monkeypatch.setattr(rep3d.runtime, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(rep3d.inference.predictor, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu, inference=True) == (torch.bfloat16 if native else None)
    assert resolve_amp("auto", cpu) is None  # training on the CPU stays float32
    assert resolve_amp("off", cpu, inference=True) is None
    assert resolve_amp("bf16", cpu) == torch.bfloat16
    line = describe_precision(cpu, resolve_amp("auto", cpu, inference=True))
    assert ("bf16 autocast (native" in line) if native else ("float32" in line)


def test_decoder_goes_channels_last_on_the_cpu_in_bf16_only():
    from networks.layout import decoder_uses_channels_last

    x = torch.zeros(1, 1, 16, 16, 16)
    assert not decoder_uses_channels_last("auto", x)
    assert decoder_uses_channels_last("auto", x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert decoder_uses_channels_last("auto", x)
        assert not decoder_uses_channels_last(False, x)


def test_bf16_cpu_inference_agrees_with_float32(tmp_path, ckpts):
    """The CPU's bf16 path (autocast, channels-last decoder) gives float32's labels up to a few boundary
    voxels, and its probabilities to bf16 precision."""
    src = write_case(tmp_path / "in", "case", "aniso")
    ref, p_ref = Predictor(ckpts[0], amp="off").predict(src, return_probabilities=True)
    bf16 = Predictor(ckpts[0], amp="bf16")
    assert bf16.sw_batch_size == 1  # one window per pass on the CPU by default
    labels, p = bf16.predict(src, return_probabilities=True)
    assert len(np.unique(ref)) > 1
    assert (labels == ref).mean() > 0.99
    assert np.abs(p - p_ref).max() < 0.1 and np.abs(p - p_ref).mean() < 0.01
    assert not np.array_equal(p, p_ref)  # bf16 did run (float32 would match exactly)

"""export_model.py --format bundle: a MONAI bundle that runs with MONAI alone and predicts what test_seg.py
predicts. Tiny REP3D (kernel 5, depths 1, widths 8-32), 3 classes, ~16^3 volumes after resampling to 2 mm.

The single model's bundle runs through ``python -m monai.bundle run`` in a subprocess whose path holds the
bundle and nothing of this repository (cwd a temporary folder, PYTHONPATH the bundle). The fold ensemble
and the two-channel model run through ``monai.bundle.run`` (what that command calls) in this process, to
save two interpreter starts (~9 s of CPU each on the 2-core machine); that their ``scripts/`` import
nothing of this repository is what the exporter checks before writing them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run, verify_metadata, verify_net_in_out

import export_model
import networks
import test_seg
from helpers import TINY
from rep3d.config import DataConfig, NetworkConfig, RunConfig, TrainConfig
from rep3d.data.dataset_config import DatasetConfig
from rep3d.data.intensity import get_scheme
from rep3d.export.bundle import ExportError, bundle_on_path, export_bundle, intensity_and_crop, source_closure
from rep3d.export.bundle_scripts.datalist import cases

NAMES = ["background", "organ", "lesion"]
WINDOW = {"scheme": "window", "a_min": -100.0, "a_max": 300.0}
SHAPE = (24, 20, 14)
BOX = (slice(3, 13), slice(4, 12), slice(3, 9))
FAST = ["--num_workers", "0", "--gpu", "-1", "--amp", "off"]

# MONAI's bundle specification (docs/source/mb_specification.rst): the keys metadata.json must have, and
# those of every tensor format specifier. "optional_packages_version" of the specification's text is
# "required_packages_version" in MONAI 1.6 (ConfigParser.read_meta renames the old name) and the model zoo's schema.
REQUIRED = ["version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task", "description",
            "authors", "copyright", "network_data_format"]  # fmt: skip
TENSOR = ["type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data", "channel_def"]


def tiny_checkpoint(path, seed: int, in_channels: int = 1, channel_names=("image",), normalization=None) -> str:
    """A training-form (unfolded, LRBM) checkpoint in the trainer's format, weights moved off their init."""
    torch.manual_seed(seed)
    net = networks.build_network("REP3D", in_channels, 3, modulation="lrbm", dwconv="native", **TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ds = DatasetConfig(name="custom", spacing=(2.0, 2.0, 2.0), intensity="window", a_min=-100.0, a_max=300.0, num_classes=3,
                       class_names=NAMES, roi=(32, 32, 32), channel_names=list(channel_names), normalization=normalization)  # fmt: skip
    run = RunConfig(network=NetworkConfig("REP3D", in_channels, 3, {"modulation": "lrbm", **TINY}), data=DataConfig(dataset=ds), training=TrainConfig())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(run.checkpoint(net.state_dict(), 10), path)
    return str(path)


def volume(seed: int, pet: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full(SHAPE, 0.0 if pet else -1000.0, np.float32)  # a margin of air: the crop is exercised
    img[1:-1, 1:-1, 1:-1] = 1.0 if pet else 0.0
    img[BOX] = 8.0 if pet else 200.0
    return img + rng.normal(0, 0.2 if pet else 5, SHAPE).astype(np.float32)


def affine(kind: str) -> np.ndarray:
    a = np.diag([2.0, 2.0, 2.0, 1.0]) if kind == "ras" else np.diag([-1.6, -1.9, 2.5, 1.0])  # LPS, anisotropic
    a[:3, 3] = [12.3, -40.1, 7.7]
    return a


def save(path, data, kind="ras") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine(kind)), path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    folds = [tiny_checkpoint(root / "cv" / f"fold_{i}" / "best_metric_model.pth", seed=i) for i in (0, 1)]
    two = tiny_checkpoint(root / "two" / "best_metric_model.pth", seed=2, in_channels=2, channel_names=("CT", "PET"), normalization=[WINDOW, {"scheme": "zscore"}])
    single = [save(root / "images" / "ras.nii.gz", volume(0)), save(root / "images" / "lps.nii.gz", volume(1), "lps")]
    four_d = save(root / "images2" / "both.nii.gz", np.stack([volume(3), volume(3, pet=True)], axis=-1), "lps")
    pair = [save(root / "images2" / f"pair_000{c}.nii.gz", volume(4, pet=bool(c))) for c in (0, 1)]
    return {"root": root, "folds": folds, "two": two, "single": single, "four_d": four_d, "pair": pair}


@pytest.fixture(scope="module")
def single_bundle(data):
    """The bundle of fold 0 alone, through the command line."""
    out = data["root"] / "rep3d_tiny"
    assert export_model.main(["--trained_weights", data["folds"][0], "--output", str(out), "--format", "bundle"]) == 0
    return out


def seg_of(weights, inputs, out) -> dict[str, np.ndarray]:
    """test_seg.py's labels (float32 on the CPU) for an image file or folder, by case name."""
    assert test_seg.main(["--trained_weights", *weights, "--input", str(inputs), "--output", str(out)] + FAST) == 0
    return {n[: -len("_seg.nii.gz")]: np.asarray(nib.load(os.path.join(out, n)).dataobj) for n in os.listdir(out) if n.endswith("_seg.nii.gz")}


def agreement(bundle_out, name: str, image: str, reference: np.ndarray) -> float:
    """Share of voxels where the bundle's prediction equals ``reference``; the prediction must be on the input's grid."""
    pred = nib.load(os.path.join(bundle_out, f"{name}_seg.nii.gz"))
    src = nib.load(image)
    assert pred.shape == src.shape[:3] and np.allclose(pred.affine, src.affine, atol=1e-5), name
    labels = np.asarray(pred.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    return float((labels == reference).mean())


def run_in_process(bundle, images, out) -> None:
    """``monai.bundle.run`` (what ``python -m monai.bundle run`` calls) here, leaving no ``scripts`` module
    and no bundle folder on ``sys.path`` behind (MONAI's run puts the bundle's root there)."""
    with bundle_on_path(str(bundle)):
        run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), dataset_dir=str(images), output_dir=str(out))
    while str(bundle) in sys.path:
        sys.path.remove(str(bundle))


def clean_env(bundle) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(bundle)
    return env


# --------------------------------------------------------------------------------------------------


def test_bundle_files_metadata_and_monai_checks(single_bundle, tmp_path):
    b = single_bundle
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md", "LICENSE",
                "scripts/datalist.py", "scripts/networks/Rep3D/network_backbone.py", "scripts/networks/dwconv.py"):  # fmt: skip
        assert (b / rel).is_file(), rel
    assert not (b / "scripts" / "ensemble.py").exists() and not (b / "scripts" / "intensity.py").exists()  # not needed here
    meta = json.load(open(b / "configs" / "metadata.json"))
    assert [k for k in REQUIRED if k not in meta] == []
    for kind, spec in [("input", meta["network_data_format"]["inputs"]["image"]), ("output", meta["network_data_format"]["outputs"]["pred"])]:
        assert [k for k in TENSOR if k not in spec] == [], kind
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == ["16*n+16"] * 3 and meta["license"] == "MIT"
    assert "MIT License" in (b / "LICENSE").read_text()

    # MONAI's verify_metadata, offline: against a schema of the specification's requirements at --filepath
    # (it downloads the schema named in the metadata only when that file is missing)
    schema = {"type": "object", "required": REQUIRED, "properties": {"network_data_format": {
        "type": "object", "required": ["inputs", "outputs"],
        "properties": {io: {"type": "object", "minProperties": 1, "additionalProperties": {"type": "object", "required": TENSOR}} for io in ("inputs", "outputs")}}}}  # fmt: skip
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    verify_metadata(meta_file=str(b / "configs" / "metadata.json"), filepath=str(tmp_path / "schema.json"))
    (tmp_path / "bad.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "copyright"}))
    with pytest.raises(ValueError, match="copyright"):
        verify_metadata(meta_file=str(tmp_path / "bad.json"), filepath=str(tmp_path / "schema.json"))
    with bundle_on_path(str(b)):  # what the command line does with PYTHONPATH=bundle
        verify_net_in_out(net_id="network_def", meta_file=str(b / "configs" / "metadata.json"), config_file=str(b / "configs" / "inference.json"), device="cpu")

    # what MONAI Label's bundle app reads, and code that travels: nothing of this repository imported
    config = json.load(open(b / "configs" / "inference.json"))
    assert {"network_def", "preprocessing", "postprocessing", "inferer", "device", "bundle_root"} <= set(config)
    assert config["network_def"]["_target_"] == "scripts.networks.Rep3D.network_backbone.REP3D" and config["network_def"]["deploy"] is True
    assert [t["_target_"] for t in config["preprocessing"]["transforms"]] == [
        "LoadImaged", "EnsureChannelFirstd", "Spacingd", "Orientationd", "ScaleIntensityRanged", "CropForegroundd"]  # fmt: skip
    assert config["inferer"] == {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 4, "overlap": 0.5, "mode": "gaussian"}
    for path in b.rglob("*.py"):
        imports = [ln.strip() for ln in path.read_text().splitlines() if ln.strip().startswith(("import ", "from "))]
        assert not [i for i in imports if i.split()[1].partition(".")[0] in ("rep3d", "networks")], path
    readme = (b / "docs" / "README.md").read_text()
    assert "monailabel start_server --app apps/monaibundle --studies images --conf models rep3d_tiny" in readme and "Not tested" in readme
    state = torch.load(b / "models" / "model.pt", weights_only=True)
    assert not any(".modulation." in k for k in state)  # folded: the deploy network's state dict


def test_monai_bundle_run_agrees_with_test_seg(single_bundle, data, tmp_path):
    """python -m monai.bundle run, with only the bundle on the path, on two inputs (RAS and an anisotropic
    LPS): predictions on each input's grid, equal to test_seg.py's for the same checkpoint."""
    images = tmp_path / "in"
    os.makedirs(images)
    for src in data["single"]:
        os.symlink(src, images / os.path.basename(src))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(single_bundle / "configs" / "inference.json"),
           "--bundle_root", str(single_bundle), "--dataset_dir", str(images), "--output_dir", str(out)]  # fmt: skip
    res = subprocess.run(cmd, cwd=tmp_path, env=clean_env(single_bundle), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    refs = seg_of([data["folds"][0]], images, tmp_path / "ref")
    for src in data["single"]:
        name = os.path.basename(src)[: -len(".nii.gz")]
        assert len(np.unique(refs[name])) > 1  # not a blank map: the comparison means something
        share = agreement(out, name, src, refs[name])
        print(f"{name}: bundle == test_seg on {100 * share:.3f}% of voxels")
        assert share >= 0.999


def test_fold_ensemble_and_two_channel_bundles(data, tmp_path):
    """A bundle of the two-fold folder ensembles both folds (= test_seg.py's mean-softmax ensemble); a
    two-channel model's bundle takes a 4-D file and an nnU-Net pair (case_0000, case_0001)."""
    ens = tmp_path / "ens"
    # check=False: both bundles are run and compared with test_seg.py below (the single model's export checks itself)
    meta = export_bundle(os.path.dirname(os.path.dirname(data["folds"][0])), str(ens), check=False)
    assert len(meta["rep3d"]["checkpoints"]) == 2 and (ens / "scripts" / "ensemble.py").is_file()
    state = torch.load(ens / "models" / "model.pt", weights_only=True)
    assert {k.split(".")[1] for k in state} == {"0", "1"} and all(k.startswith("members.") for k in state)
    two = tmp_path / "two"
    meta2 = export_bundle(data["two"], str(two), check=False)
    assert meta2["network_data_format"]["inputs"]["image"]["num_channels"] == 2 and meta2["network_data_format"]["inputs"]["image"]["channel_def"] == {"0": "CT", "1": "PET"}
    assert "_0000" in meta2["input_convention"] and "4-D" in meta2["input_convention"]
    steps = json.load(open(two / "configs" / "inference.json"))["preprocessing"]["transforms"]
    assert [t["_target_"] for t in steps][-2:] == ["CropForegroundd", "scripts.intensity.NormalizeChannelsd"]

    ens_in = tmp_path / "ens_in"
    os.makedirs(ens_in)
    os.symlink(data["single"][1], ens_in / "lps.nii.gz")
    # in this process (the single model's bundle runs alone, in a subprocess, above): the exporter refused
    # any code for scripts/ that imports more than PyTorch, MONAI, NumPy, einops and the standard library
    run_in_process(ens, ens_in, tmp_path / "ens_out")
    run_in_process(two, os.path.dirname(data["four_d"]), tmp_path / "two_out")

    ref = seg_of(data["folds"], ens_in, tmp_path / "ref_ens")["lps"]
    fold0 = seg_of(data["folds"][:1], ens_in, tmp_path / "ref_fold0")["lps"]
    assert (fold0 != ref).mean() > 0.01  # the second fold changes the labels: an ensemble of one would fail below
    assert agreement(tmp_path / "ens_out", "lps", data["single"][1], ref) == 1.0
    refs = seg_of([data["two"]], os.path.dirname(data["four_d"]), tmp_path / "ref_two")
    assert set(refs) == {"both", "pair"}
    for image, name in [(data["four_d"], "both"), (data["pair"][0], "pair")]:
        share = agreement(tmp_path / "two_out", name, image, refs[name])
        print(f"two channels, {name}: bundle == test_seg on {100 * share:.3f}% of voxels")
        assert share >= 0.999, name


def test_refusals_name_the_fix(data, tmp_path, capsys):
    out = tmp_path / "never"
    folder = os.path.dirname(os.path.dirname(data["folds"][0]))
    for flags, expect in [
        (["--format", "bundle", "onnx"], "export ONNX in a separate run"),
        (["--format", "tflite"], "choose from onnx, torchscript, bundle"),
        (["--trained_weights", folder, "--format", "bundle", "torchscript"], "2 checkpoints make a fold ensemble"),
        (["--trained_weights", folder, "--format", "onnx"], "or --format bundle for a fold ensemble"),
    ]:
        weights = [] if "--trained_weights" in flags else ["--trained_weights", data["folds"][0]]
        assert export_model.main(weights + ["--output", str(out)] + flags) == 2
        err = capsys.readouterr().err
        assert expect in err and "Traceback" not in err, flags
    assert not out.exists()
    # a network source importing a package a bundle cannot count on is named with its line
    pkg = tmp_path / "src" / "nets"
    os.makedirs(pkg / "sub")
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .model import Net\n")
    (pkg / "sub" / "model.py").write_text("import torch\nfrom .. import helpers\nimport timm\n")
    (pkg / "helpers.py").write_text("import math\n")
    with pytest.raises(ExportError, match=r"sub/model.py: line 3: imports timm"):
        source_closure("nets.sub.model", root=str(tmp_path / "src"), package="nets")
    (pkg / "sub" / "model.py").write_text("import torch\nfrom .. import helpers\n")
    assert source_closure("nets.sub.model", root=str(tmp_path / "src"), package="nets") == ["nets/helpers.py", "nets/sub/__init__.py", "nets/sub/model.py"]
    # the case listing of a bundle: channel files grouped, a missing one named
    assert cases(os.path.dirname(data["four_d"]), 2) == [{"image": data["four_d"]}, {"image": data["pair"]}]
    os.makedirs(tmp_path / "lack")
    os.symlink(data["pair"][0], tmp_path / "lack" / "p_0000.nii.gz")
    with pytest.raises(ValueError, match=r"case 'p' lacks channel file\(s\) p_0001"):
        cases(str(tmp_path / "lack"), 2)


@pytest.mark.parametrize("scheme", ["window", "zscore"])
def test_uniform_intensity_in_the_bundle_is_the_schemes_transform(scheme):
    cfg = DatasetConfig(name="x", spacing=(1, 1, 1), intensity=scheme, a_min=-100.0 if scheme == "window" else None,
                        a_max=300.0 if scheme == "window" else None, num_classes=2, class_names=["background", "a"])  # fmt: skip
    [norm] = [t for t in intensity_and_crop(cfg) if t["_target_"] != "CropForegroundd"]
    parser = ConfigParser({"t": norm})
    x = {"image": torch.randn(1, 6, 5, 4) * 300}
    got = parser.get_parsed_content("t")(dict(x))["image"]
    ref = get_scheme(scheme).transform("image", cfg.channel_norms()[0])(dict(x))["image"]
    assert torch.equal(torch.as_tensor(got), torch.as_tensor(ref))

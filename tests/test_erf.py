"""Tests of erf_analysis.py: the ERF of known convolutions, area ratios, radial profiles, kernel
statistics, the kernel-dynamics tracker (CSV, TensorBoard, resume) and the command line.

Tiny settings: REP3D / 3D UX-Net of helpers.TINY (widths 8-16-16-32, depths 1, kernel 5, hidden 32),
16^3-32^3 inputs.
"""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import erf_analysis as ea
import networks
from helpers import TINY, TINY_FLAGS
from networks.Rep3D import compute_distance_prior
from rep3d.analysis.erf import (
    AREA_THRESHOLDS,
    area_ratios,
    effective_receptive_fields,
    radial_profile,
)
from rep3d.analysis.kernels import (
    KernelDynamics,
    depthwise_convs,
    encoder_stages,
    kernel_regions,
    kernel_statistics,
)
from rep3d.data.dataset_config import get_dataset_config
from rep3d.data.demo import make_demo_dataset

NATIVE_TINY = {**TINY, "dwconv": "native"}
ROI = ["--roi", "32", "32", "32"]


def tiny(name: str = "REP3D", seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return networks.build_network(name, 1, 2, **{**NATIVE_TINY, **kw}).eval()


class DepthwiseOnly(nn.Module):
    """One depthwise convolution with given kernels (C, K, K, K): the smallest network with a known ERF."""

    def __init__(self, kernels: torch.Tensor) -> None:
        super().__init__()
        c, k = kernels.shape[0], kernels.shape[-1]
        self.conv = nn.Conv3d(c, c, k, padding=k // 2, groups=c, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(kernels[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def single_conv_erf(kernels: torch.Tensor, size: int = 16, n: int = 2) -> torch.Tensor:
    module = DepthwiseOnly(kernels)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.rand((1, kernels.shape[0], size, size, size), generator=g) for _ in range(n)]
    return effective_receptive_fields(module, [module.conv], inputs)[0]


# --------------------------------------------------------------------------------------------------
# ERF


def test_erf_of_a_depthwise_conv_is_its_kernels_absolute_pattern():
    """A true convolution with kernel h is PyTorch's cross-correlation with the flipped kernel w = flip(h);
    PyTorch stores w, and d out[c] / d x[c + o] = w[K//2 + o]: the ERF is |w| (|h| flipped) placed at the
    centre, summed over channels, and zero elsewhere."""
    k, size = 5, 16
    g = torch.Generator().manual_seed(1)
    w = torch.randn((3, k, k, k), generator=g, dtype=torch.float64).float()  # asymmetric, with negative taps
    erf = single_conv_erf(w, size)
    c, r = size // 2, k // 2
    patch = erf[c - r : c + r + 1, c - r : c + r + 1, c - r : c + r + 1]
    expected = w.abs().sum(0).double()
    torch.testing.assert_close(patch, expected, rtol=1e-6, atol=1e-6)
    # the orientation matters: the same pattern mirrored is not it
    assert not torch.allclose(patch, expected.flip(0, 1, 2), atol=1e-3)
    rest = erf.clone()
    rest[c - r : c + r + 1, c - r : c + r + 1, c - r : c + r + 1] = 0
    assert float(rest.abs().max()) == 0.0


def test_erf_hooks_are_removed_and_batches_average_like_single_inputs():
    w = torch.randn((2, 3, 3, 3), generator=torch.Generator().manual_seed(2))
    module = DepthwiseOnly(w)
    x = torch.rand((3, 2, 8, 8, 8))
    batched = effective_receptive_fields(module, [module.conv], [x])[0]
    single = effective_receptive_fields(module, [module.conv], [x[i : i + 1] for i in range(3)])[0]
    torch.testing.assert_close(batched, single)
    assert not module.conv._forward_hooks


def test_area_ratios_of_a_box_kernel_are_exact():
    """ERF of a K^3 box kernel in a 16^3 input: a uniform K^3 cube; the share held by centred cubes of
    half-width 0, 1, 2 is 1/125, 27/125, 1 for K = 5."""
    n = 16
    erf = single_conv_erf(torch.ones((1, 5, 5, 5)), n)
    ratios = area_ratios(erf)
    assert ratios[0.2] == {"ratio": 27 / n**3, "half_width": 1}
    for t in (0.3, 0.5, 0.99):
        assert ratios[t] == {"ratio": 125 / n**3, "half_width": 2}
    # the 99% ratio is the kernel's volume share, so it grows with K
    for k in (3, 7):
        assert area_ratios(single_conv_erf(torch.ones((1, k, k, k)), n))[0.99]["ratio"] == k**3 / n**3


def test_area_ratios_clip_cubes_at_the_border_and_reject_bad_input():
    scores = torch.zeros(4, 4, 4, dtype=torch.float64)
    scores[0, 0, 0] = 1.0
    scores[3, 3, 3] = 1.0
    ratios = area_ratios(scores, thresholds=(0.5, 1.0), centre=(0, 0, 0))
    assert ratios[0.5] == {"ratio": 1 / 64, "half_width": 0}
    assert ratios[1.0] == {"ratio": 1.0, "half_width": 3}  # the cube of half-width 3 at a corner is the volume
    assert math.isnan(area_ratios(torch.zeros(3, 3, 3))[0.2]["ratio"])
    with pytest.raises(ValueError, match="non-negative"):
        area_ratios(-scores)
    with pytest.raises(ValueError, match="thresholds"):
        area_ratios(scores, thresholds=(0.0,))


def test_network_area_ratios_grow_with_threshold_and_kernel_size():
    x = [torch.rand((1, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0))]
    ratios = {}
    for k in (3, 9):
        model = tiny("REP3D_Vanilla", kernel_size=k)
        encoder, stages = encoder_stages(model)
        erf = effective_receptive_fields(encoder, stages[:2], x)
        ratios[k] = [area_ratios(e) for e in erf]
    for k, per_stage in ratios.items():
        for r in per_stage:
            values = [r[t]["ratio"] for t in AREA_THRESHOLDS]
            assert values == sorted(values) and values[0] < values[-1], (k, values)
    for stage in range(2):
        for t in (0.5, 0.99):
            assert ratios[9][stage][t]["ratio"] > ratios[3][stage][t]["ratio"], (stage, t)


# --------------------------------------------------------------------------------------------------
# radial profiles and kernel statistics


@pytest.mark.parametrize("k,beta", [(5, 1.0), (21, 1.0), (7, 2.5)])
def test_radial_profile_of_the_prior_is_beta_over_d_plus_beta(k, beta):
    d, m = radial_profile(compute_distance_prior(k, beta, dtype=torch.float64))
    assert d[0] == 0.0 and math.isclose(d[1], 1.0) and math.isclose(d[2], math.sqrt(2))
    assert len(d) == len(set(d.tolist()))
    torch.testing.assert_close(torch.as_tensor(m), torch.as_tensor(beta / (d + beta)), rtol=0, atol=1e-12)


def test_radial_profile_bins():
    v = torch.zeros(5, 5, 5)
    v[2, 2, 2] = 1.0
    v[2, 2, 4] = 3.0  # distance 2
    d, m = radial_profile(v, bin_width=1.0)
    assert d.tolist() == [0.0, 1.0, 2.0, 3.0]  # (2 + 2 + 2 = 3.46 rounds to 3)
    assert m[0] == 1.0 and m[1] == 0.0 and m[2] > 0.0


def test_kernel_statistics_use_the_effective_kernel_and_report_the_mask():
    model = tiny("REP3D_FixedPrior")
    with torch.no_grad():
        for _, conv in depthwise_convs(model):
            conv.weight.fill_(1.0)  # then |W_eff| = M = P
    rows = kernel_statistics(model)
    assert [(r["stage"], r["block"]) for r in rows] == [(1, 0), (2, 0), (3, 0), (4, 0)]
    for r in rows:
        d = torch.as_tensor(r["distance"])
        prior = 1.0 / (d + 1.0)
        for key in ("weff_mean_abs", "mask", "prior"):
            torch.testing.assert_close(torch.as_tensor(r[key]), prior, rtol=1e-6, atol=1e-6)
        # periphery (d > 1.4) over centre (d = 0) of P for K = 5
        assert 0 < r["weff_periphery_to_centre"] < 0.5
    plain = kernel_statistics(tiny("REP3D_Vanilla"))
    assert all(r["mask"] is None for r in plain)
    assert len(kernel_statistics(tiny("REP3D", depths=(2, 1, 1, 1)))) == 5  # the generator's convs are not blocks


def test_kernel_regions_for_k21_are_d_le_3_and_d_gt_7():
    centre, periphery = kernel_regions(21)
    c = 10
    assert centre[c, c, c + 3] and not centre[c + 2, c + 2, c + 2]  # d = 3 in, d = 3.46 out
    assert not periphery[c, c, c + 7] and periphery[c, c + 1, c + 7]  # d = 7 out, d = 7.07 in
    assert int(centre.sum()) == 123  # lattice points with x^2 + y^2 + z^2 <= 9


# --------------------------------------------------------------------------------------------------
# kernel dynamics


class FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))


def read_rows(path: str) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_dynamics_is_a_no_op_for_networks_without_depthwise_kernels():
    assert KernelDynamics.for_model(networks.build_network("SwinUNETR", 1, 2, feature_size=12)) is None
    assert KernelDynamics.for_model(nn.Sequential(nn.Conv3d(1, 4, 3))) is None
    with pytest.raises(ValueError, match="for_model"):
        KernelDynamics(nn.Sequential(nn.Conv3d(1, 4, 3)))
    assert KernelDynamics.for_model(tiny("3DUXNET")) is not None


def test_dynamics_separates_centre_and_periphery_and_unwraps_wrappers():
    model = tiny("REP3D_Vanilla")
    dyn = KernelDynamics(model, kernel_size=5)
    assert [(r["stage"], r["centre"], r["periphery"]) for r in dyn.measure(model)] == [(s, 0.0, 0.0) for s in (1, 2, 3, 4)]
    _, periphery = kernel_regions(5)
    conv = depthwise_convs(encoder_stages(model)[1][0])[0][1]
    with torch.no_grad():
        conv.weight[..., periphery] *= 3.0  # moves the periphery of stage 1 by 2x its initial norm
    wrapper = nn.Module()
    wrapper._orig_mod = nn.DataParallel(model)  # torch.compile around DataParallel
    rows = dyn.measure(wrapper)
    assert rows[0]["centre"] == 0.0 and math.isclose(rows[0]["periphery"], 2.0, rel_tol=1e-6)
    assert all(r["centre"] == 0.0 and r["periphery"] == 0.0 for r in rows[1:])
    with pytest.raises(ValueError, match="kernel_size 7"):
        KernelDynamics(model, kernel_size=7)


def test_dynamics_measures_the_effective_kernel_of_modulated_blocks():
    model = tiny("REP3D")
    dyn = KernelDynamics(model)
    gen = next(m for name, m in model.named_modules() if name.endswith("stages.1.0.dwconv.modulation.generator"))
    with torch.no_grad():
        gen.norm_w2.bias.add_(0.5)  # only the mask of stage 2 changes: W_eff = W * M moves there
    rows = dyn.measure(model)
    assert rows[1]["centre"] > 0 and rows[1]["periphery"] > 0
    assert rows[0]["centre"] == rows[0]["periphery"] == 0.0


def test_dynamics_csv_has_one_row_per_validation_and_stage_and_survives_resume(tmp_path):
    out = str(tmp_path / "run")
    model = tiny("REP3D_Vanilla")
    dyn = KernelDynamics.for_model(model, output_dir=out)
    writer = FakeWriter()
    for step in (10, 20):
        with torch.no_grad():
            for _, conv in depthwise_convs(model):
                conv.weight.mul_(1.1)
        dyn.record(step, model, writer)
    csv_path = os.path.join(out, "kernel_dynamics.csv")
    rows = read_rows(csv_path)
    assert rows[0] == ["step", "stage", "centre", "periphery"]
    assert [(r[0], r[1]) for r in rows[1:]] == [(str(s), str(k)) for s in (10, 20) for k in (1, 2, 3, 4)]
    assert math.isclose(float(rows[1][2]), 0.1, rel_tol=1e-5) and math.isclose(float(rows[5][3]), 0.21, rel_tol=1e-5)
    assert ("kernel_dynamics/stage1_centre", pytest.approx(0.1, rel=1e-5), 10) in writer.scalars
    assert len(writer.scalars) == 2 * 4 * 2
    with open(os.path.join(out, "kernel_dynamics.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # The run is killed after logging step 20 and resumed from its step-10 checkpoint: a new tracker
    # measures from the run's start (saved snapshot), replaces the stale step-20 rows, appends after.
    resumed = tiny("REP3D_Vanilla")
    with torch.no_grad():
        for (_, conv), (_, src) in zip(depthwise_convs(resumed), depthwise_convs(model)):
            conv.weight.copy_(src.weight / 1.1)  # the weights of step 10
    dyn2 = KernelDynamics.for_model(resumed, output_dir=out, resume=True)
    assert math.isclose(dyn2.measure(resumed)[0]["centre"], 0.1, rel_tol=1e-5)
    for step in (20, 30):
        dyn2.record(step, resumed)
    rows = read_rows(csv_path)
    assert sum(r[0] == "step" for r in rows) == 1
    assert [(r[0], r[1]) for r in rows[1:]] == [(str(s), str(k)) for s in (10, 20, 30) for k in (1, 2, 3, 4)]

    # a new run (not resumed) in the same folder starts the CSV and the snapshot afresh
    dyn3 = KernelDynamics.for_model(tiny("REP3D_Vanilla", seed=5), output_dir=out)
    dyn3.record(5, tiny("REP3D_Vanilla", seed=5))
    assert [r[0] for r in read_rows(csv_path)] == ["step", "5", "5", "5", "5"]


def test_dynamics_refuses_a_snapshot_of_another_network(tmp_path):
    KernelDynamics(tiny("REP3D_Vanilla"), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="does not fit"):
        KernelDynamics(tiny("REP3D_Vanilla", kernel_size=3), output_dir=str(tmp_path), resume=True)


# --------------------------------------------------------------------------------------------------
# command line


def test_main_untrained_random_inputs_end_to_end(tmp_path):
    out = str(tmp_path / "erf")
    assert ea.main(["--trained_weights", "REP3D", "REP3D_Vanilla", "--output", out, "--cases", "2", *ROI, *TINY_FLAGS]) == 0
    for name in ("erf.json", "erf.png", "kernels.png"):
        with open(os.path.join(out, name), "rb") as f:
            head = f.read(8)
        assert name.endswith("json") or head == b"\x89PNG\r\n\x1a\n", name
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    report = json.load(open(os.path.join(out, "erf.json")))
    assert [c["label"] for c in report["checkpoints"]] == ["REP3D", "REP3D_Vanilla"]
    assert report["args"]["network_options"]["kernel_size"] == 5
    for ck in report["checkpoints"]:
        assert ck["inputs"] == "random inputs" and ck["cases"] == 2 and ck["roi"] == [32, 32, 32]
        assert [s["stage"] for s in ck["stages"]] == [1, 2, 3, 4]
        for s in ck["stages"]:
            ratios = [s["area_ratio"][str(t)] for t in AREA_THRESHOLDS]
            assert ratios == sorted(ratios) and 0 < ratios[0] < ratios[-1] <= 1
            prof = s["radial_profile"]
            assert prof["distance"][0] == 0 and max(prof["mean_contribution"]) <= 1.0
        # deeper stages see further
        assert ck["stages"][2]["area_ratio"]["0.5"] > ck["stages"][0]["area_ratio"]["0.5"]
    masks = [[k["mask"] is not None for k in ck["kernels"]] for ck in report["checkpoints"]]
    assert masks == [[True] * 4, [False] * 4]


def _options(modulation: str) -> dict:
    return {**NATIVE_TINY, "modulation": modulation}


def _save_old_format(model: nn.Module, path: str, modulation: str, **meta) -> None:
    """A checkpoint as main_train.py writes it (old format): state dict plus top-level settings."""
    torch.save({"state_dict": model.state_dict(), "network": "REP3D", "network_kwargs": _options(modulation), "in_channels": 1, "out_channels": 2, **meta}, path)


def test_main_reads_old_and_new_checkpoints_and_real_crops(tmp_path):

    root = make_demo_dataset(str(tmp_path / "demo"), n_train=1, n_val=1, size=(32, 32, 32))
    dataset = get_dataset_config("demo").to_dict()
    model = tiny("REP3D", modulation="fixed")
    old = str(tmp_path / "old_run" / "best_metric_model.pth")
    os.makedirs(os.path.dirname(old))
    _save_old_format(model, old, "fixed", dataset=dataset)
    new = str(tmp_path / "new.pth")
    network = {"name": "REP3D", "in_channels": 1, "out_channels": 2, "options": _options("fixed")}
    torch.save({"state_dict": model.state_dict(), "config": {"network": network, "data": {"dataset": dataset}}}, new)
    folded = str(tmp_path / "folded.pth")
    _save_old_format(networks.reparameterize_model(model), folded, "fixed", dataset=dataset)

    out = str(tmp_path / "erf")
    assert ea.main(["--trained_weights", old, new, folded, "--root", root, "--cases", "1", "--output", out, "--device", "cpu"]) == 0
    report = json.load(open(os.path.join(out, "erf.json")))
    cks = report["checkpoints"]
    assert [c["label"] for c in cks] == ["old_run", "new", "folded"]
    assert all(c["inputs"] == "validation crops" and c["roi"] == list(dataset["roi"]) for c in cks)
    # same weights, same crops: same ERF whatever the file format or folding
    assert cks[0]["stages"] == cks[1]["stages"]
    for a, b in zip(cks[0]["stages"], cks[2]["stages"]):
        assert a["area_ratio"] == pytest.approx(b["area_ratio"], rel=1e-4)
    assert [c["masks_learned"] for c in cks] == [True, True, False]
    assert cks[0]["kernels"][0]["mask"] is not None and cks[2]["kernels"][0]["mask"] is None
    assert cks[0]["kernels"][0]["weff_mean_abs"] == pytest.approx(cks[2]["kernels"][0]["weff_mean_abs"], rel=1e-5)


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--trained_weights", "no_such.pth", "--output", "{out}"], "--trained_weights no_such.pth"),
        (["--trained_weights", "REP3D", "--output", "{out}", "--cases", "0"], "--cases"),
        (["--trained_weights", "REP3D", "--output", "{out}", "--roi", "30", "32", "32", *TINY_FLAGS], "--roi"),
        (["--trained_weights", "REP3D", "--output", "{out}", "--labels", "a", "b"], "--labels"),
        (["--trained_weights", "REP3D", "--output", "{out}", "--root", "{out}/missing"], "--root"),
        (["--trained_weights", "{ckpt}", "--output", "{out}", "--kernel_size", "5"], "--kernel_size"),
        (["--trained_weights", "{bare}", "--output", "{out}"], "bare state dict"),
        (["--trained_weights", "REP3D"], "--output"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, argv, flag):
    ckpt, bare = str(tmp_path / "c.pth"), str(tmp_path / "bare.pth")
    model = tiny("REP3D_Vanilla")
    _save_old_format(model, ckpt, "none")
    torch.save(model.state_dict(), bare)
    argv = [a.format(out=str(tmp_path / "o"), ckpt=ckpt, bare=bare) for a in argv]
    with pytest.raises(SystemExit) as exc:
        ea.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag.format(out=str(tmp_path / "o")) in err, err
    assert "Traceback" not in err

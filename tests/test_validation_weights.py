"""Validation sees the weights it validates (issue 21, item 1).

The FFT depthwise path caches the kernel spectrum in inference. The fused AdamW that training uses on
CUDA updates parameters without bumping their version counter, so a cache keyed on the version alone
validated every plain large kernel with its stale spectrum. Fused optimizers run on the CPU too, so the
failure is reproduced here without a GPU.

Each check here fails with the cache of before the fix (no optimizer-step generation in its key, no
eval-mode condition, no drop at train()/eval()), except the modulated variants' (lrbm, fixed: their
kernel W * M never reaches the cache) and the unfused-AdamW ones (a plain step bumps the version):
those guard the paths the fix must leave working.
"""

from __future__ import annotations

import copy
import csv
import json
import os

import numpy as np
import pytest
import torch

import main_train
import networks
import rep3d.analysis.kernels
import rep3d.training.trainer
import test_seg
from helpers import TINY, TINY_FLAGS, affine_for, save_nifti
from networks.dwconv import DepthwiseConv3d
from rep3d.training.trainer import Trainer


def _optimizer(params, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, fused=True) if fused else torch.optim.AdamW(params, lr=1e-2, foreach=False)


PLAIN_KERNEL_NETS = {  # every network whose depthwise kernel reaches the FFT path unmodulated
    "REP3D_Vanilla": dict(TINY),
    "3DUXNET": dict(TINY),
    "3DUXNET_K21": {**TINY, "kernel_size": 21},  # the variant is its kernel size: TINY's 5 does not apply
}


@pytest.mark.parametrize(
    "name, fused, switch_modes",
    [(n, fused, True) for n in PLAIN_KERNEL_NETS for fused in (True, False)] + [("REP3D_Vanilla", True, False)],
)
def test_every_validation_equals_a_fresh_model_on_the_same_weights(name, fused, switch_modes):
    torch.manual_seed(0)
    net = networks.build_network(name, 1, 3, dwconv="fft", **PLAIN_KERNEL_NETS[name])
    assert any(isinstance(m, DepthwiseConv3d) and m.impl == "fft" for m in net.modules())
    opt = _optimizer(net.parameters(), fused)
    x = torch.randn(1, 1, 32, 32, 32)
    target = torch.randint(0, 3, (1, 32, 32, 32))
    # Without mode switches every step and validation is in eval mode, and no train()/eval() call
    # drops the cache in between: only the optimizer step can tell it that the weights changed.
    net.eval()
    for _ in range(2):  # the first validation fills the cache; the second is the first that can be stale
        if switch_modes:
            net.train()
        loss = torch.nn.functional.cross_entropy(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if switch_modes:
            net.eval()
        with torch.no_grad():
            seen = net(x)
            fresh = copy.deepcopy(net)  # the same weights, no cache (deepcopy drops it)
            assert all(not m._spectrum_cache for m in fresh.modules() if isinstance(m, DepthwiseConv3d))
            expected = fresh(x)
        torch.testing.assert_close(seen, expected, rtol=1e-4, atol=1e-4)


def test_an_optimizer_step_invalidates_the_cached_spectrum_of_one_layer():
    torch.manual_seed(0)
    conv = DepthwiseConv3d(4, 7, impl="fft").eval()
    opt = torch.optim.AdamW(conv.parameters(), lr=1.0, fused=True)
    x = torch.randn(1, 4, 12, 12, 12)
    with torch.no_grad():
        conv(x)  # fills the cache
    conv(x).square().sum().backward()  # eval mode, gradients on: no cache used
    version = conv.weight._version
    opt.step()
    assert conv.weight._version == version, "fused AdamW is expected to leave _version alone (the bug's cause)"
    with torch.no_grad():
        y = conv(x)
    ref = torch.nn.functional.conv3d(x, conv.weight, padding=3, groups=4)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# the run's validation Dice of its best checkpoint against test_seg.py on the same cases

SHAPE = (32, 32, 32)


def _write_iso_ras_dataset(root: str) -> str:
    """Two training and two validation cases, 2 mm isotropic RAS (the target spacing: no resampling),
    two structures inside a body, with a margin of air that the foreground crop removes."""
    aff = affine_for(spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
    for split, names in (("Tr", ("a", "b")), ("Val", ("c", "d"))):
        for i, name in enumerate(names):
            rng = np.random.default_rng(sum(map(ord, name)))
            img = np.full(SHAPE, -1000.0, np.float32)
            img[2:-2, 2:-2, 2:-2] = 0.0
            lab = np.zeros(SHAPE, np.uint8)
            o = 2 * i
            lab[6 + o : 16 + o, 6:18, 8:20] = 1
            lab[18:27, 14 + o : 24 + o, 10:22] = 2
            img[lab == 1] = 150.0
            img[lab == 2] = 260.0
            img += rng.normal(0, 10, SHAPE).astype(np.float32)
            save_nifti(os.path.join(root, f"images{split}", f"{name}.nii.gz"), img, aff)
            save_nifti(os.path.join(root, f"labels{split}", f"{name}.nii.gz"), lab, aff)
    return root


@pytest.fixture(scope="module")
def iso_root(tmp_path_factory) -> str:
    return _write_iso_ras_dataset(str(tmp_path_factory.mktemp("iso")))


class FusedAdamWTrainer(Trainer):
    """The trainer's CUDA optimizer (fused AdamW), here on the CPU; 3D UX-Net's layer scale starts at 1
    instead of 1e-6, so that its depthwise kernels shape the validation output from the first step."""

    def build_network(self):
        net = super().build_network()
        with torch.no_grad():
            for m in net.modules():
                if isinstance(getattr(m, "gamma", None), torch.nn.Parameter):
                    m.gamma.fill_(1.0)
        return net

    def configure_optimizers(self):
        opt, sched = super().configure_optimizers()
        fused = torch.optim.AdamW(opt.param_groups[0]["params"], lr=opt.defaults["lr"], weight_decay=opt.defaults["weight_decay"], fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(fused, sched.lr_lambdas[0])
        return fused, sched


VARIANTS = {
    "lrbm": ["--network", "REP3D", "--modulation", "lrbm"],
    "fixed": ["--network", "REP3D", "--modulation", "fixed"],
    "none": ["--network", "REP3D", "--modulation", "none"],
    "3DUXNET": ["--network", "3DUXNET"],
    "3DUXNET_K21": ["--network", "3DUXNET_K21", "--kernel_size", "21"],  # after TINY_FLAGS' 5: the last one counts
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_best_checkpoint_validation_dice_equals_test_seg(iso_root, tmp_path, monkeypatch, variant):
    """Every validation's probabilities equal a cache-free copy's of the network it validates, and the
    best checkpoint's validation Dice equals test_seg.py's on the same cases. Two optimizer steps, a
    validation after each: the second validation is the first that a stale cache would get wrong."""
    seen = []  # per validation call: max |probabilities - a fresh copy's|, None where not compared
    predict = rep3d.training.trainer.sliding_window_predict

    def predict_and_compare(net, image, *args, **kwargs):
        probs = predict(net, image, *args, **kwargs)
        diff = None
        if len(seen) % 2 == 0:  # the first of the 2 validation cases: one network state per validation
            with torch.no_grad():
                fresh = predict(copy.deepcopy(net), image, *args, **kwargs)  # deepcopy drops the spectrum cache
            diff = float((probs - fresh).abs().max())
        seen.append(diff)
        return probs

    monkeypatch.setattr(rep3d.training.trainer, "sliding_window_predict", predict_and_compare)
    # The training plots are test_train.py's business; here they would take a fifth of the time.
    monkeypatch.setattr(rep3d.training.trainer, "plot_curves", lambda *a, **k: None)
    monkeypatch.setattr(rep3d.analysis.kernels, "plot_kernel_dynamics", lambda *a, **k: None)
    out = str(tmp_path / "run")
    argv = [
        "--root", iso_root, "--dataset", "custom", "--spacing", "2", "2", "2", "--intensity", "window",
        "--a_min", "-100", "--a_max", "300", "--num_classes", "3", "--roi", "32", "32", "32",
        "--output", out, "--num_workers", "0", "--lr", "1e-2", "--lr_schedule", "constant", "--max_iter", "2",
        "--eval_step", "1", "--crop_sample", "1", "--sw_batch_size", "1", "--dwconv", "fft", "--amp", "off", "--gpu", "-1",
        *TINY_FLAGS, *VARIANTS[variant],
    ]  # fmt: skip
    summary = main_train.train(main_train.parse_args(argv), log=lambda m: None, trainer_class=FusedAdamWTrainer)
    with open(os.path.join(out, "validation_metrics.csv")) as f:
        steps = {int(r["step"]) for r in csv.DictReader(f)}
    assert steps == {1, 2}, "a validation after each optimizer step expected"
    compared = [d for d in seen if d is not None]
    assert len(seen) == 2 * 2 and len(compared) == 2, seen  # 2 validations of 2 cases
    assert max(compared) < 1e-4, f"{variant}: validation probabilities differ from a fresh copy's by {compared}"
    pred = str(tmp_path / "pred")
    test_seg.main(["--trained_weights", os.path.join(out, "best_metric_model.pth"), "--root", iso_root, "--output", pred, "--amp", "off", "--gpu", "-1", "--num_workers", "0", "--dwconv", "native"])
    with open(os.path.join(pred, "summary.json")) as f:
        scored = json.load(f)
    assert scored["cases"] == 2
    best = torch.load(os.path.join(out, "best_metric_model.pth"), map_location="cpu", weights_only=True)
    assert best["best_metric"] == pytest.approx(summary["best_metric"])
    assert scored["mean_dice"] == pytest.approx(summary["best_metric"], abs=1e-3), (
        f"{variant}: validation scored the best checkpoint {summary['best_metric']:.4f}, test_seg.py {scored['mean_dice']:.4f}"
    )

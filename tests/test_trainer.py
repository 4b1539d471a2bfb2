"""The Trainer's options (issue 13): losses, fine-tuning, frozen encoder, resume bookkeeping, configs.

Tiny settings as in test_train.py: helpers.TINY (REP3D widths 8-16-16-32, depths 1, kernel 5), conftest's
32^3 demo volumes.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import main_train
import networks
from helpers import TINY, affine_for, save_nifti
from helpers import tiny_argv as argv
from rep3d.config import FORMAT_VERSION, ConfigError, RunConfig, TrainConfig
from rep3d.data.dataset_config import get_dataset_config
from rep3d.data.transforms import get_train_transforms
from rep3d.training.trainer import Trainer


class Stop(Exception):
    pass


def trainer_for(args: list[str], cls: type[Trainer] = Trainer, logs: list | None = None) -> Trainer:
    return main_train.make_trainer(main_train.parse_args(args), cls, log=(logs.append if logs is not None else (lambda m: None)))


@pytest.mark.parametrize("loss", ["dicece", "dice_focal", "ce"])
def test_each_loss_lowers_the_loss_on_a_fixed_batch(demo_root, tmp_path, loss):
    trainer = trainer_for(argv(demo_root, str(tmp_path / loss), "--loss", loss, "--class_weights", "0.5", "1", "1", "1", "2", "--lr_schedule", "constant"))
    trainer.setup()
    try:
        batch = next(iter(trainer.train_loader))
        losses = [trainer.train_step(batch) for _ in range(3)]  # each value is the loss before that step's update
    finally:
        trainer.teardown()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[2] < losses[0], losses


def test_class_weights_and_crop_ratios_need_one_value_per_class(demo_root, tmp_path, capsys):
    assert main_train.main(argv(demo_root, str(tmp_path / "w"), "--class_weights", "1", "2")) == 2
    err = capsys.readouterr().err
    assert "--class_weights needs one value per class" in err and "background, liver" in err
    assert main_train.main(argv(demo_root, str(tmp_path / "w"), "--crop_ratios", "0", "0", "0", "0", "0")) == 2
    assert "--crop_ratios values" in capsys.readouterr().err


def test_fine_tuning_from_another_class_count_keeps_every_fitting_tensor(demo_root, tmp_path):
    src = networks.build_network("REP3D", 1, 3, **TINY)
    path = str(tmp_path / "three_classes.pth")
    torch.save({"state_dict": src.state_dict()}, path)
    logs: list[str] = []
    seen = {}

    class Check(Trainer):
        def on_train_start(self):
            seen["state"] = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            raise Stop

    with pytest.raises(Stop):
        trainer_for(argv(demo_root, str(tmp_path / "ft"), "--pretrained_weights", path), Check, logs).run()
    src_state, state = src.state_dict(), seen["state"]
    differing = [k for k in state if k in src_state and state[k].shape != src_state[k].shape]
    assert differing and all(k.startswith("out.") for k in differing)  # only the 3 -> 5 class head
    encoder = [k for k in src_state if k.startswith("rep3d.")]
    assert encoder
    for k in src_state:
        if k not in differing:
            torch.testing.assert_close(state[k], src_state[k], rtol=0, atol=0)
    message = next(m for m in logs if m.startswith("weights loaded"))
    assert "re-initialised" in message and all(k in message for k in differing)


def test_freeze_encoder_keeps_the_encoder_for_the_first_iterations(demo_root, tmp_path):
    snapshots = {}

    class Watch(Trainer):
        def on_train_start(self):
            snapshots[0] = self._params()

        def on_iteration_end(self, loss):
            snapshots[self.step] = self._params()

        def _params(self):
            enc = {id(p) for p in self.encoder_parameters()}
            return {
                "encoder": [p.detach().clone() for p in self.model.parameters() if id(p) in enc],
                "rest": [p.detach().clone() for p in self.model.parameters() if id(p) not in enc],
            }

    trainer_for(argv(demo_root, str(tmp_path / "fz"), "--freeze_encoder", "2", "--max_iter", "3", "--eval_step", "3"), Watch).run()
    for a, b in zip(snapshots[0]["encoder"], snapshots[2]["encoder"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[0]["rest"], snapshots[2]["rest"]))
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[2]["encoder"], snapshots[3]["encoder"]))


def test_resume_derives_defaults_again_counts_this_session_and_announces_changes(demo_root, tmp_path):
    out = str(tmp_path / "run")

    def killed_at(n):
        class Killed(Trainer):
            def on_iteration_end(self, loss):
                if self.step >= n:
                    raise Stop

        return Killed

    with pytest.raises(Stop):  # a long run, killed at step 3 (checkpoint of step 2)
        trainer_for(argv(demo_root, out, "--max_iter", "400", "--eval_step", "2"), killed_at(3)).run()
    logs: list[str] = []
    # --max_iter 6 without --warmup_iters: the warm-up is derived from 6 again (not the stored 20).
    with pytest.raises(Stop):
        trainer_for(["--output", out, "--root", demo_root, "--resume", "--max_iter", "6", "--lr", "5e-4"], killed_at(5), logs).run()
    assert any("changed now:" in m and "training.max_iter 400 -> 6" in m and "training.lr 0.001 -> 0.0005" in m for m in logs), logs
    logs.clear()
    trainer = trainer_for(["--output", out, "--root", demo_root, "--resume"], logs=logs)
    assert trainer.config.training.lr == 5e-4 and trainer.config.training.warmup == 0
    summary = trainer.run()
    # The change made at the earlier resume is announced again, not silently kept.
    assert any("changed at the resume of step 2" in m and "training.lr 0.001 -> 0.0005" in m for m in logs), logs
    assert summary["steps"] == 6 and summary["steps_this_session"] == 2
    assert any("2 iterations in" in m and "this session" in m for m in logs), logs
    ckpt = torch.load(os.path.join(out, "checkpoint_last.pth"), map_location="cpu", weights_only=True)
    assert [c["step"] for c in ckpt["config_changes"]] == [2]


def test_config_round_trip_and_older_checkpoint_formats():
    ds = get_dataset_config("demo")
    cfg = RunConfig.from_dict(
        {"network": {"name": "rep3d", "in_channels": 1, "out_channels": 5, "options": TINY}, "data": {"dataset": ds.to_dict()}, "training": {"lr": 3e-4}}
    )
    assert cfg.network.name == "REP3D" and cfg.training.lr == 3e-4 and cfg.training.warmup == 1000
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(Exception):
        cfg.training.lr = 1.0  # frozen
    # Format 1: flags under "args", network under "network"/"network_kwargs"; its stored warm-up was derived.
    v1 = {
        "state_dict": {}, "network": "REP3D", "network_kwargs": TINY, "in_channels": 1, "out_channels": 5, "dataset": ds.to_dict(),
        "args": {"max_iter": 400, "warmup_iters": 20, "lr": 2e-3, "batch_size": 1, "sw_batch_size": 2, "root": "/data"},
    }  # fmt: skip
    old = RunConfig.from_checkpoint(v1)
    assert old.network.options == TINY and old.data.root == "/data" and old.training.lr == 2e-3 and old.training.warmup_iters is None
    assert RunConfig.from_checkpoint({"state_dict": {}}) is None  # bare / release checkpoints carry no settings
    with pytest.raises(networks.CheckpointError, match="newer version"):
        RunConfig.from_checkpoint({"format_version": FORMAT_VERSION + 1, "config": {}})
    with pytest.raises(ConfigError, match="--warmup_iters"):
        RunConfig(cfg.network, cfg.data, TrainConfig(max_iter=5, warmup_iters=5)).check()


@pytest.mark.parametrize("network", ["nnUNet", "UNet3D", "MedNeXt"])
def test_the_papers_other_baselines_train_through_main_train(demo_root, tmp_path, network):
    out = str(tmp_path / network)
    flags = ["--root", demo_root, "--dataset", "demo", "--output", out, "--roi", "32", "32", "32", "--num_workers", "0", "--network", network]
    summary = main_train.train(main_train.parse_args([*flags, "--max_iter", "1", "--eval_step", "1", "--sw_batch_size", "1"]), log=lambda m: None)
    assert summary["steps"] == 1 and summary["network"] == network and 0.0 <= summary["best_metric"] <= 1.0
    ckpt = torch.load(os.path.join(out, "best_metric_model.pth"), map_location="cpu", weights_only=True)
    net = RunConfig.from_checkpoint(ckpt).network.build()
    net.load_state_dict(ckpt["state_dict"])  # the checkpoint rebuilds its network


def test_class_ratio_crops_hit_the_rare_class_at_its_ratio(tmp_path):
    image = np.full((48, 48, 48), -1000.0, np.float32)
    image[6:42, 6:42, 6:42] = 40.0  # the body: background crop centres lie inside it
    label = np.zeros(image.shape, np.uint8)
    label[12:36, 12:24, 12:36] = 1  # a large structure
    label[28:31, 28:31, 28:31] = 2  # a rare one: 27 voxels
    aff = affine_for(spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
    save_nifti(tmp_path / "img.nii.gz", image, aff)
    save_nifti(tmp_path / "lab.nii.gz", label, aff)
    cfg = get_dataset_config("custom", spacing=[2, 2, 2], a_min=-125, a_max=275, num_classes=3, roi=[16, 16, 16])
    tf = get_train_transforms(cfg, roi=(16, 16, 16), crop_sample=100, crop_ratios=[1, 1, 4], augment=False)
    tf.set_random_state(seed=0)
    centres = []
    for _ in range(3):
        for crop in tf({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}):
            assert tuple(crop["image"].shape[1:]) == (16, 16, 16)
            centres.append(int(torch.as_tensor(crop["label"])[0, 8, 8, 8]))
    share = np.bincount(centres, minlength=3) / len(centres)
    expected = np.array([1, 1, 4]) / 6
    tolerance = 4 * np.sqrt(expected * (1 - expected) / len(centres))  # 4 binomial standard deviations
    assert np.all(np.abs(share - expected) < tolerance), share
    # without ratios the rare class is centred far less often (1:1 foreground/background by volume)
    tf = get_train_transforms(cfg, roi=(16, 16, 16), crop_sample=300, augment=False)
    tf.set_random_state(seed=0)
    rare = np.mean([int(torch.as_tensor(c["label"])[0, 8, 8, 8]) == 2 for c in tf({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")})])
    assert rare < 0.2


def test_summary_reports_loop_and_step_time_per_iteration(demo_root, tmp_path):
    out = str(tmp_path / "timed")
    summary = main_train.train(main_train.parse_args(argv(demo_root, out, "--max_iter", "6", "--eval_step", "6")), log=lambda m: None)
    timing = summary["timing"]
    # iteration 1 opens the clock, 6 validates: 2-5 are timed, each loop interval holding its step
    assert timing["timed_iterations"] == 4 and timing["step_timer"] == ("cuda events" if torch.cuda.is_available() else "wall clock")
    assert timing["loop_ms_per_iter"] >= timing["step_ms_per_iter"] > 0
    assert timing["outside_step_fraction"] == pytest.approx(1 - timing["step_ms_per_iter"] / timing["loop_ms_per_iter"], abs=2e-3)
    on_disk = json.load(open(os.path.join(out, "summary.json")))
    for key in ("loop_ms_per_iter", "step_ms_per_iter", "outside_step_fraction", "loader", "data_wait_s"):
        assert key in on_disk, key
    assert on_disk["loop_ms_per_iter"] == timing["loop_ms_per_iter"] and on_disk["loader"] == summary["loader"]
    assert ("GPU cache" if torch.cuda.is_available() else "CPU workers") in summary["loader"]

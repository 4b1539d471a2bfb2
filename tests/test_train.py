"""Tests of main_train.py: outputs of a short run, resume, a killed run, DDP on CPU, bad flags.

Tiny settings throughout: helpers.TINY (REP3D widths 8-16-16-32, depths 1, kernel 5, hidden 32), a
32^3 ROI on conftest's demo dataset of 32^3 volumes.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import main_train
import networks
from helpers import TINY, tiny_argv
from rep3d.cli import network_overrides
from rep3d.commands.train import DEMO_DEFAULTS
from rep3d.config import RunConfig, default_warmup
from rep3d.data.demo import DEMO_CLASS_NAMES, make_demo_dataset
from rep3d.training.distributed import sync_buffers_from_rank0
from rep3d.training.schedule import lr_factor
from rep3d.training.trainer import Trainer, TrainingError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv: list[str], trainer_class: type[Trainer] = Trainer) -> dict:
    return main_train.train(main_train.parse_args(argv), log=lambda m: None, trainer_class=trainer_class)


class Killed(Exception):
    """Stands for the process being killed."""


def killed_after(n: int) -> type[Trainer]:
    """A trainer whose process is "killed" right after iteration ``n``, before anything more is written."""

    class KilledTrainer(Trainer):
        def on_iteration_end(self, loss: float) -> None:
            if self.step >= n:
                raise Killed

    return KilledTrainer


def inspecting(check) -> type[Trainer]:
    """A trainer that hands itself to ``check`` right before its first iteration."""

    class InspectedTrainer(Trainer):
        def on_train_start(self) -> None:
            check(self)

    return InspectedTrainer


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_short_run_writes_checkpoints_logs_args_and_plot(demo_root, tmp_path):
    out = str(tmp_path / "run")
    summary = run(tiny_argv(demo_root, out, "--max_iter", "3", "--eval_step", "2"))
    for name in ("best_metric_model.pth", "checkpoint_last.pth", "args.json", "config.json", "training_curve.png", "summary.json", "training_log.txt", "validation_metrics.csv"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
    assert summary["steps"] == 3 and 0.0 <= summary["best_metric"] <= 1.0
    assert set(summary["dice_per_class"]) == {"liver", "kidney", "spleen", "bone"}

    last = load(os.path.join(out, "checkpoint_last.pth"))
    net_cfg = last["config"]["network"]
    assert last["format_version"] == 2
    assert last["step"] == 3 and net_cfg["name"] == "REP3D" and net_cfg["in_channels"] == 1 and net_cfg["out_channels"] == 5
    assert net_cfg["options"] == TINY
    dataset = last["config"]["data"]["dataset"]
    assert dataset["class_names"] == list(DEMO_CLASS_NAMES) and dataset["roi"] == [32, 32, 32]
    for key in ("optimizer", "scheduler", "scaler", "rng", "history", "best_metric", "config"):
        assert key in last, key
    assert len(last["history"]["loss"]) == 3 and last["history"]["val_step"] == [2, 3]
    json.dumps(last["config"])  # the contract: JSON-able settings
    assert last["config"]["training"]["max_iter"] == 3 and last["config"]["training"]["warmup_iters"] is None
    # One CSV row per class (and the mean) per validation.
    rows = open(os.path.join(out, "validation_metrics.csv")).read().splitlines()
    assert rows[0] == "step,class,dice" and len(rows) == 1 + 2 * 5
    assert {r.split(",")[0] for r in rows[1:]} == {"2", "3"}
    # Kernel dynamics: one row per validation and encoder stage, plotted beside the training curve.
    dyn = open(os.path.join(out, "kernel_dynamics.csv")).read().splitlines()
    assert dyn[0] == "step,stage,centre,periphery" and sorted(r.split(",")[0] for r in dyn[1:]) == ["2"] * 4 + ["3"] * 4
    assert os.path.isfile(os.path.join(out, "kernel_dynamics.png"))
    # iteration 1 opens the loop clock and 2 and 3 validate: none is timed, on any device (the timed
    # figures are test_trainer's test_summary_reports_loop_and_step_time_per_iteration)
    assert summary["timing"] == {"timed_iterations": 0} and set(summary) >= {"loader", "data_wait_s"}
    args_json = json.load(open(os.path.join(out, "args.json")))
    assert args_json["max_iter"] == 3 and args_json["weight_decay"] == 0.08 and args_json["optim"] == "AdamW"

    best = load(os.path.join(out, "best_metric_model.pth"))
    assert "optimizer" not in best and best["step"] in (2, 3)
    # The checkpoint rebuilds its network from its own metadata, for training and for deployment.
    cfg = RunConfig.from_checkpoint(best).network
    net = cfg.build()
    net.load_state_dict(best["state_dict"])
    deployed = networks.build_deploy_network(cfg.name, cfg.in_channels, cfg.out_channels, best, **cfg.options)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), net.eval()(x), rtol=1e-4, atol=1e-4)

    # A second run into the same folder refuses instead of overwriting.
    with pytest.raises(ValueError, match="--resume"):
        run(tiny_argv(demo_root, out, "--max_iter", "3", "--eval_step", "2"))


def test_killed_run_resumes_at_its_last_checkpoint_with_equal_optimizer_state(demo_root, tmp_path):
    out = str(tmp_path / "run")
    argv = tiny_argv(demo_root, out, "--max_iter", "4", "--eval_step", "2")
    with pytest.raises(Killed):
        run(argv, killed_after(3))  # "killed" after step 3: the last checkpoint is from step 2
    saved = load(os.path.join(out, "checkpoint_last.pth"))
    assert saved["step"] == 2 and saved["optimizer"]["state"]

    seen = {}

    def check(trainer: Trainer) -> None:
        seen["step"] = trainer.step
        seen["last_epoch"] = trainer.scheduler.last_epoch
        opt = trainer.optimizer.state_dict()
        assert opt["state"].keys() == saved["optimizer"]["state"].keys()
        for k, st in opt["state"].items():
            for name, value in st.items():
                # .cpu(): the run may be on a GPU, the checkpoint is read onto the CPU
                torch.testing.assert_close(torch.as_tensor(value).cpu(), saved["optimizer"]["state"][k][name], rtol=0, atol=0)
        assert opt["param_groups"][0]["lr"] == saved["optimizer"]["param_groups"][0]["lr"]
        model_state = trainer.model.state_dict()
        for k, v in saved["state_dict"].items():
            torch.testing.assert_close(model_state[k].cpu(), v, rtol=0, atol=0)

    # Only --output and --resume: every other setting comes from the checkpoint.
    summary = run(["--root", demo_root, "--output", out, "--resume"], inspecting(check))
    assert seen == {"step": 2, "last_epoch": 2}
    assert summary["steps"] == 4 and summary["steps_this_session"] == 2
    final = load(os.path.join(out, "checkpoint_last.pth"))
    assert final["step"] == 4 and len(final["history"]["loss"]) == 4 and final["history"]["val_step"] == [2, 4]
    assert final["config"]["network"] == saved["config"]["network"]
    log = open(os.path.join(out, "training_log.txt")).read()
    assert "step 2:" in log and "step 4:" in log


def test_resume_applies_lr_and_weight_decay_given_now(demo_root, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(Killed):
        run(tiny_argv(demo_root, out, "--max_iter", "4", "--eval_step", "2", "--lr_schedule", "constant"), killed_after(3))
    seen = {}

    class Seen(Exception):
        pass

    def check(trainer: Trainer) -> None:
        group = trainer.optimizer.param_groups[0]
        seen.update(lr=group["lr"], wd=group["weight_decay"], base=trainer.scheduler.base_lrs[0])
        raise Seen

    with pytest.raises(Seen):
        run(["--root", demo_root, "--output", out, "--resume", "--lr", "1e-5", "--weight_decay", "0.01"], inspecting(check))
    assert seen == {"lr": 1e-5, "wd": 0.01, "base": 1e-5}


def test_resume_refuses_changed_network_and_missing_checkpoint(demo_root, tmp_path):
    out = str(tmp_path / "run")
    run(tiny_argv(demo_root, out, "--max_iter", "1", "--eval_step", "1"))
    with pytest.raises(ValueError, match="kernel_size"):
        run(tiny_argv(demo_root, out, "--resume", "--kernel_size", "3"))
    with pytest.raises(ValueError, match="no checkpoint"):
        run(tiny_argv(demo_root, str(tmp_path / "nothing"), "--resume"))


def test_pretrained_weights_load_weights_only(demo_root, tmp_path):
    src = str(tmp_path / "src")
    run(tiny_argv(demo_root, src, "--max_iter", "1", "--eval_step", "1"))
    best = load(os.path.join(src, "best_metric_model.pth"))

    class Seen(Exception):
        pass

    def check(trainer: Trainer) -> None:
        assert trainer.step == 0 and not trainer.optimizer.state  # a new run
        for k, v in best["state_dict"].items():
            torch.testing.assert_close(trainer.model.state_dict()[k].cpu(), v, rtol=0, atol=0)
        raise Seen

    argv = tiny_argv(demo_root, str(tmp_path / "ft"), "--pretrain", "yes", "--pretrained_weights", os.path.join(src, "best_metric_model.pth"))
    with pytest.raises(Seen):
        run(argv, inspecting(check))


def test_nonfinite_losses_are_skipped_then_stop_the_run(demo_root, tmp_path):
    class NanLoss(torch.nn.Module):
        def forward(self, logits, label):
            return logits.sum() * float("nan")

    seen = {}

    class NanTrainer(Trainer):
        def build_loss(self):
            return NanLoss()

        def on_train_start(self):
            seen.update(params=[p.detach().clone() for p in self.model.parameters()], model=self.model)

    argv = tiny_argv(demo_root, str(tmp_path / "run"), "--max_iter", "10", "--eval_step", "5", "--max_nonfinite", "2")
    with pytest.warns(RuntimeWarning, match="non-finite loss"), pytest.raises(TrainingError, match="non-finite for 2 iterations"):
        run(argv, NanTrainer)
    # Skipped steps leave the weights untouched.
    for before, after in zip(seen["params"], seen["model"].parameters()):
        torch.testing.assert_close(before, after.detach(), rtol=0, atol=0)


def test_out_of_memory_names_the_flags_to_lower(demo_root, tmp_path, monkeypatch):
    def oom(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(networks.Rep3D.network_backbone.REP3D, "forward", oom)
    with pytest.raises(TrainingError) as err:
        run(tiny_argv(demo_root, str(tmp_path / "run"), "--max_iter", "2", "--eval_step", "1"))
    for flag in ("--roi", "--crop_sample", "--batch_size", "--sw_batch_size", "--amp"):
        assert flag in str(err.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp_run_completes(tmp_path):
    # 3 validation cases over 2 ranks: uneven shards, each case must be counted once after the reduction.
    root = make_demo_dataset(str(tmp_path / "demo"), n_train=2, n_val=3, size=(32, 32, 32))
    out = str(tmp_path / "ddp")
    # The default store location, pointed at the test's folder: rank 0 builds the store, rank 1 waits for it.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", REP3D_PREPROCESSED=str(tmp_path / "preprocessed"))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), os.path.join(REPO, "main_train.py"),
        *tiny_argv(root, out, "--max_iter", "2", "--eval_step", "2", "--gpu", "-1"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = load(os.path.join(out, "checkpoint_last.pth"))
    assert ckpt["step"] == 2
    assert ckpt["metrics"]["val_cases"] == 3
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    assert proc.stdout.count("step 2: mean foreground Dice") + proc.stderr.count("step 2: mean foreground Dice") == 1  # rank 0 only
    assert "/preprocessed/" in proc.stdout and ": built (5 cases pre-processed" in proc.stdout  # the store path, said once by rank 0
    assert len(glob.glob(str(tmp_path / "preprocessed" / "*" / "*" / "cases" / "*.json"))) == 5


def test_bad_flags_give_clear_messages(demo_root, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main_train.main(tiny_argv(demo_root, out, "--batch_size", "0")) == 2
    assert "--batch_size must be >= 1" in capsys.readouterr().err
    assert main_train.main(tiny_argv(demo_root, out, "--pretrain", "True")) == 2
    assert "--pretrained_weights" in capsys.readouterr().err
    assert main_train.main(tiny_argv(str(tmp_path / "missing"), out)) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err
    assert main_train.main(tiny_argv(demo_root, out, "--dataset", "nope")) == 2
    assert "--dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main_train.parse_args(["--pretrain", "maybe"])
    assert exit_info.value.code == 2 and "boolean" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_train.parse_args(["--network", "NoSuchNet"])
    assert "REP3D" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "checkpoint_last.pth"))


def test_flag_defaults_paper_and_demo():
    paper = main_train.parse_args(["--root", "/data", "--dataset", "amos"])
    assert (paper.batch_size, paper.crop_sample, paper.lr, paper.optim, paper.max_iter, paper.eval_step) == (1, 2, 1e-4, "AdamW", 60000, 500)
    assert (paper.weight_decay, paper.num_workers, paper.gpu, paper.amp, paper.overlap, paper.sw_batch_size) == (0.08, None, 0, "auto", 0.5, 4)
    # None: one loader worker per core but one (see load_datasets_transforms.default_num_workers)
    assert paper.kernel_size is None and paper.feature_size is None and not paper.demo
    assert main_train.parse_args(["--pretrain", "no"]).pretrain is False
    assert main_train.parse_args(["--pretrain", "1"]).pretrain is True
    demo = main_train.parse_args(["--max_iter", "7"])
    assert demo.demo and demo.max_iter == 7 and demo.output == DEMO_DEFAULTS["output"]
    assert demo.feature_size == DEMO_DEFAULTS["feature_size"] and demo.kernel_size == DEMO_DEFAULTS["kernel_size"]
    swin = main_train.parse_args(["--network", "swinunetr"])
    assert swin.network == "SwinUNETR" and swin.feature_size is None  # REP3D-shaped demo widths do not apply
    assert "feature_size" not in swin.demo_defaults and "max_iter" in swin.demo_defaults
    assert network_overrides(swin.network, vars(swin)) == {}


def test_warmup_cosine_schedule():
    f = [lr_factor(s, 100, 10, "warmup_cosine") for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.01
    assert lr_factor(50, 100, 10, "constant") == 1.0
    assert default_warmup(60000) == 1000 and default_warmup(400) == 20


def _sync_buffers_worker(rank: int, init_file: str, results: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        bn = torch.nn.BatchNorm3d(2)
        bn.running_mean.fill_(float(rank + 1))  # ranks' statistics drifted apart
        sync_buffers_from_rank0(bn)
        results[rank] = bn.running_mean.tolist()
    finally:
        torch.distributed.destroy_process_group()


def test_validation_uses_rank0_batchnorm_statistics_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sync_buffers_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        assert dict(results) == {0: [1.0, 1.0], 1: [1.0, 1.0]}

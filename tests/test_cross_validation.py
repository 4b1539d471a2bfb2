"""cross_validate.py (issue 23): folds as --fold splits them, a run killed between folds resumes without redoing
the finished fold, every out-of-fold case once in cv_metrics.csv, the held-out set by the ensemble, the folder
as a test_seg.py ensemble; nnU-Net's recipe (poly schedule, deep supervision outputs and loss weights); the
reproducibility record.

Tiny settings (helpers.TINY): REP3D widths 8-16-16-32, depths 1, kernel 5, hidden 32, roi 32^3, 2 folds of
the shared 2-case demo dataset (conftest.demo_root; its validation case is the held-out set), 2 iterations
per fold, one CPU thread (the machine's two cores are shared).
"""

from __future__ import annotations

import csv
import json
import os
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cross_validate
import main_train
import networks
import rep3d.analysis.kernels
import rep3d.training.trainer
import test_seg
from helpers import PREDICT_FAST, TINY_FLAGS
from rep3d.config import RECIPES, ConfigError
from rep3d.inference.checkpoint import expand_weights
from rep3d.training.cross_validation import CrossValidationError, FoldPlan, fold_runs, plan_folds, summarize, write_plan
from rep3d.training.reproducibility import NondeterminismLog, describe_environment, environment
from rep3d.training.schedule import lr_factor
from rep3d.training.trainer import Trainer

FAST = [*PREDICT_FAST, "--sw_batch_size", "2", "--roi", "32", "32", "32"]
TRAIN_CASES = ["demo_tr_000", "demo_tr_001"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two shared cores: one thread runs these tiny networks several times faster than two competing ones.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cv_argv(root: str, output: str, *extra: str) -> list[str]:
    return ["--root", root, "--dataset", "demo", "--output", output, "--lr", "1e-3", "--max_iter", "2", "--eval_step", "1", *TINY_FLAGS, *FAST, *extra]


class Killed(Exception):
    """Stands for the process being killed."""


@pytest.fixture(scope="module")
def cv_run(demo_root, tmp_path_factory) -> dict:
    """A 2-fold cross-validation killed in fold 1 (after its step-1 checkpoint), then run again to the end."""
    with pytest.MonkeyPatch.context() as mp:
        # The training plots are test_train.py's business; here they would take a third of the time.
        mp.setattr(rep3d.training.trainer, "plot_curves", lambda *a, **k: None)
        mp.setattr(rep3d.analysis.kernels, "plot_kernel_dynamics", lambda *a, **k: None)
        return _killed_then_rerun(demo_root, str(tmp_path_factory.mktemp("cv") / "cv"))


def _killed_then_rerun(demo_root: str, out: str) -> dict:
    started: list[tuple[str, int]] = []

    class Recording(Trainer):
        def on_train_start(self) -> None:
            started.append((os.path.basename(self.output), self.step))

    class KilledInFold1(Recording):
        def on_iteration_end(self, loss: float) -> None:
            if os.path.basename(self.output) == "fold_1" and self.step >= 1:
                raise Killed

    argv = cv_argv(demo_root, out, "--folds", "2", "--postprocess", "auto")
    with pytest.raises(Killed):
        cross_validate.cross_validate(cross_validate.parse_args(argv), KilledInFold1, log=lambda m: None)
    first_session = list(started)
    fold0_best = os.path.join(out, "fold_0", "best_metric_model.pth")
    stamp = os.stat(fold0_best).st_mtime_ns
    started.clear()
    messages: list[str] = []
    result = cross_validate.cross_validate(cross_validate.parse_args(argv), Recording, log=messages.append)
    return {"out": out, "result": result, "first": first_session, "second": list(started), "fold0_stamp": stamp, "messages": messages}


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ the run


def test_killed_cross_validation_resumes_without_redoing_the_finished_fold(cv_run):
    out = cv_run["out"]
    assert cv_run["first"] == [("fold_0", 0), ("fold_1", 0)]
    # fold 0 skipped, fold 1 resumed from its step-1 checkpoint
    assert cv_run["second"] == [("fold_1", 1)]
    assert [r["status"] for r in cv_run["result"]["runs"]] == ["finished", "interrupted"]
    assert os.stat(os.path.join(out, "fold_0", "best_metric_model.pth")).st_mtime_ns == cv_run["fold0_stamp"]
    assert any("fold 0 (seed 0): finished earlier" in m for m in cv_run["messages"])
    for k in range(2):
        with open(os.path.join(out, f"fold_{k}", "summary.json")) as f:
            assert json.load(f)["steps"] == 2
    # nnU-Net's splits_final.json layout (round-robin over the sorted names), and the datalist the folds trained from
    with open(os.path.join(out, "splits.json")) as f:
        splits = json.load(f)
    assert splits == [{"train": ["demo_tr_001"], "val": ["demo_tr_000"]}, {"train": ["demo_tr_000"], "val": ["demo_tr_001"]}]
    with open(os.path.join(out, "cv_datalist.json")) as f:
        datalist = json.load(f)
    assert [(os.path.basename(e["image"]), e["fold"]) for e in datalist["training"]] == [("demo_tr_000.nii.gz", 0), ("demo_tr_001.nii.gz", 1)]
    assert [os.path.basename(e["image"]) for e in datalist["validation"]] == ["demo_val_000.nii.gz"]


def test_cv_metrics_has_every_out_of_fold_case_once_and_the_held_out_set_apart(cv_run):
    out = cv_run["out"]
    rows = read_csv(os.path.join(out, "cv_metrics.csv"))
    assert list(rows[0]) == ["case", "fold", "seed", "class", "name", "dice", "hd95", "gt_voxels", "pred_voxels"]
    keys = [(r["case"], r["class"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * 4  # 2 cases x 4 foreground classes, each once
    assert {r["case"]: int(r["fold"]) for r in rows} == {"demo_tr_000": 0, "demo_tr_001": 1}
    assert sorted(os.listdir(os.path.join(out, "oof"))) == [f"{c}_seg.nii.gz" for c in TRAIN_CASES]
    summary = read_csv(os.path.join(out, "cv_summary.csv"))
    assert [r["name"] for r in summary] == ["liver", "kidney", "spleen", "bone", "mean (foreground)"]
    dice = [float(r["dice"]) for r in rows if r["name"] == "liver"]
    assert float(summary[0]["dice_mean"]) == pytest.approx(np.mean(dice), abs=1e-5)
    assert float(summary[0]["dice_std"]) == pytest.approx(np.std(dice), abs=1e-5)
    held = read_csv(os.path.join(out, "heldout_metrics.csv"))
    assert {r["case"] for r in held} == {"demo_val_000"} and {r["fold"] for r in held} == {"ensemble"}
    assert os.path.isfile(os.path.join(out, "heldout", "demo_val_000_seg.nii.gz"))
    assert "mean (foreground)" in cv_run["result"]["table"] and cv_run["result"]["heldout_table"]


def test_postprocessing_decided_on_the_pooled_out_of_fold_predictions(cv_run):
    out = cv_run["out"]
    with open(os.path.join(out, "postprocessing.json")) as f:
        decision = json.load(f)
    assert sorted(decision["checkpoints"]) == sorted(os.path.abspath(p) for p in expand_weights(out))
    assert decision["decided_on"] == TRAIN_CASES
    assert {c["class"] for c in decision["classes"]} == {1, 2, 3, 4}


def test_test_seg_on_the_cross_validation_folder_ensembles_its_folds(cv_run, demo_root, tmp_path):
    out, pred = cv_run["out"], str(tmp_path / "pred")
    assert expand_weights(out) == [os.path.join(out, f"fold_{k}", "best_metric_model.pth") for k in range(2)]
    argv = ["--trained_weights", out, "--root", demo_root, "--split", "val", "--output", pred, "--postprocess", "auto", *PREDICT_FAST, "--sw_batch_size", "2"]
    assert test_seg.main(argv) == 0
    with open(os.path.join(pred, "inference_args.json")) as f:
        used = json.load(f)
    assert used["checkpoints"] == expand_weights(out)
    assert used["postprocess"]["largest_component"] == cv_run["result"]["postprocessing"]["largest_component"]
    # the same ensemble, post-processing and window settings as cross_validate.py's held-out prediction
    mine = np.asarray(nib.load(os.path.join(pred, "demo_val_000_seg.nii.gz")).dataobj)
    theirs = np.asarray(nib.load(os.path.join(out, "heldout", "demo_val_000_seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(mine, theirs)


def test_fold_configs_record_recipe_and_environment(cv_run):
    with open(os.path.join(cv_run["out"], "fold_0", "config.json")) as f:
        config = json.load(f)
    assert config["training"]["recipe"] == "paper" and config["data"]["fold"] == 0
    env = config["environment"]
    assert env["torch"] == torch.__version__ and set(env) >= {"monai", "cuda", "cudnn", "code"}
    assert env["code"]["commit"] == "unknown" or len(env["code"]["commit"]) == 40


# ------------------------------------------------------------------------------------------ folds and flags


def test_folds_split_as_fold_does(demo_root, tmp_path):
    plan = plan_folds(demo_root, None, 2)  # round-robin over the sorted names
    assert [[os.path.basename(c["image"]) for c in f] for f in plan.folds] == [["demo_tr_000.nii.gz"], ["demo_tr_001.nii.gz"]]
    assert len(plan.held_out) == 1  # imagesVal stays out of the folds
    with pytest.raises(CrossValidationError, match="--folds 2 or fewer"):
        plan_folds(demo_root, None, 3)
    with pytest.raises(CrossValidationError, match="at least 2 folds"):
        plan_folds(demo_root, None, 1)
    # a datalist with fold keys: its folds, and no other count
    datalist = str(tmp_path / "datalist.json")
    entries = [{**{k: v for k, v in c.items()}, "fold": i % 2} for i, c in enumerate(plan.train(-1))]
    with open(datalist, "w") as f:
        json.dump({"training": entries}, f)
    keyed = plan_folds(None, datalist)
    assert keyed.num_folds == 2 and not keyed.held_out
    with pytest.raises(CrossValidationError, match="defines 2 folds"):
        plan_folds(None, datalist, 3)
    # a folder holding other folds is refused
    write_plan(plan, str(tmp_path / "cv"))
    with pytest.raises(CrossValidationError, match="other folds"):
        write_plan(FoldPlan(folds=(plan.folds[1], plan.folds[0])), str(tmp_path / "cv"))


def test_seeds_layout_is_one_level_down_for_the_ensemble(tmp_path):
    runs = fold_runs(str(tmp_path), [0, 1], [3, 4])
    assert [os.path.basename(r.folder) for r in runs] == ["fold_0_seed_3", "fold_0_seed_4", "fold_1_seed_3", "fold_1_seed_4"]
    for r in runs:
        os.makedirs(r.folder)
        open(r.best_checkpoint, "w").close()
    assert expand_weights(str(tmp_path)) == [r.best_checkpoint for r in runs]
    # seeds are averaged per case before the statistics over cases
    rows = [{"case": c, "seed": s, "class": 1, "name": "organ", "dice": d, "hd95": 1.0} for c, s, d in (("a", 3, 0.2), ("a", 4, 0.4), ("b", 3, 0.8), ("b", 4, 0.8))]
    organ, mean = summarize(rows, ["background", "organ"])
    assert organ["cases"] == 2 and organ["dice_mean"] == pytest.approx(0.55) and organ["dice_std"] == pytest.approx(0.25)
    assert mean["dice_mean"] == pytest.approx(0.55)


def test_cross_validation_flags_refused_with_one_message(demo_root, tmp_path, capsys):
    out = str(tmp_path / "cv")
    assert cross_validate.main(cv_argv(demo_root, out, "--fold", "1")) == 2
    assert "--folds" in capsys.readouterr().err
    assert cross_validate.main(cv_argv(demo_root, out, "--seed", "1", "--seeds", "0", "1")) == 2
    assert "--seeds" in capsys.readouterr().err
    assert cross_validate.main(cv_argv(demo_root, out, "--folds", "0", "7", "--num_folds", "2")) == 2
    err = capsys.readouterr().err
    assert "the split has 2 folds" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ nnU-Net recipe


def test_recipe_defaults_and_overrides():
    nn = main_train.parse_args(["--root", "/data", "--dataset", "amos", "--network", "nnunet"])
    assert nn.recipe == "nnunet"
    assert (nn.optim, nn.lr, nn.weight_decay, nn.lr_schedule, nn.warmup_iters, nn.loss, nn.grad_clip, nn.deep_supervision) == (
        "SGD", 1e-2, 3e-5, "poly", 0, "dicece_nnunet", 12.0, True,
    )  # fmt: skip
    given = main_train.parse_args(["--root", "/data", "--dataset", "amos", "--network", "nnunet", "--lr", "3e-3", "--deep_supervision", "off"])
    assert (given.lr, given.deep_supervision, given.optim) == (3e-3, False, "SGD")
    paper = main_train.parse_args(["--root", "/data", "--dataset", "amos", "--network", "nnunet", "--recipe", "paper"])
    assert (paper.optim, paper.lr, paper.weight_decay, paper.deep_supervision) == ("AdamW", 1e-4, 0.08, False)
    rep3d = main_train.parse_args(["--root", "/data", "--dataset", "amos"])
    assert rep3d.recipe == "paper" and rep3d.recipe_defaults == []  # the paper recipe is the flags' own defaults
    assert {k: getattr(rep3d, k) for k in RECIPES["paper"] if k != "deep_supervision"} == {k: v for k, v in RECIPES["paper"].items() if k != "deep_supervision"}
    with pytest.raises(ConfigError, match="deep-supervision heads"):
        main_train.run_config_from_args(main_train.parse_args(["--deep_supervision", "on"]))


def test_poly_schedule():
    f = [lr_factor(s, 100, 0, "poly") for s in range(100)]
    assert f[0] == 1.0 and f[50] == pytest.approx(0.5**0.9) and f[99] == pytest.approx(0.01**0.9)
    assert all(a > b for a, b in zip(f, f[1:]))
    assert lr_factor(4, 100, 10, "poly") == pytest.approx(0.5) and lr_factor(10, 100, 10, "poly") == 1.0


def test_nnunet_deep_supervision_outputs_and_loss_weights(demo_root, tmp_path):
    assert Trainer.deep_supervision_weights(5) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])
    assert Trainer.deep_supervision_weights(1) == [1.0]
    # 96^3 plan: 5 outputs (strides 1, 2, 4, 8, 16); the heads add 12,352 parameters to the 31.19M
    full = networks.build_network("nnUNet", 1, 16, deep_supervision=True)
    assert full.deep_supr_num == 4 and sum(p.numel() for p in full.parameters()) == 31_189_872 + 12_352
    args = main_train.parse_args(["--root", demo_root, "--dataset", "demo", "--network", "nnUNet", "--output", str(tmp_path / "run"), *FAST])
    config = main_train.run_config_from_args(args)
    config = config.replace(network={"options": {**config.network.options, "base_filters": 4, "max_filters": 16}})
    trainer = Trainer(config)
    trainer.model = config.network.build()
    net = trainer.model.train()
    x, label = torch.rand(2, 1, 32, 32, 32), torch.randint(0, 5, (2, 1, 32, 32, 32)).float()
    outputs = net(x)
    assert [tuple(o.shape[2:]) for o in outputs] == [(32, 32, 32), (16, 16, 16), (8, 8, 8)]
    assert net.eval()(x).shape == (2, 5, 32, 32, 32)  # inference: the full-resolution output only
    loss_fn = trainer.deep_supervision_loss(trainer.build_loss())
    base = trainer.build_loss()
    weights = Trainer.deep_supervision_weights(3)
    expected = sum(w * base(o, F.interpolate(label, size=o.shape[2:], mode="nearest-exact")) for w, o in zip(weights, outputs))
    torch.testing.assert_close(loss_fn(outputs, label), expected)
    net.train()
    net.zero_grad()
    loss_fn(net(x), label).backward()
    # the lowest resolution has weight 0 (as in nnU-Net): its head gets no gradient, the others do
    assert net.deep_supervision_heads[-1].conv.conv.weight.grad.abs().max() == 0
    assert net.deep_supervision_heads[0].conv.conv.weight.grad.abs().max() > 0


def test_nnunet_recipe_trains_with_deep_supervision(demo_root, tmp_path):
    args = main_train.parse_args(["--root", demo_root, "--dataset", "demo", "--network", "nnUNet", "--output", str(tmp_path / "run"),
                                  "--max_iter", "1", "--eval_step", "1", "--deterministic", *FAST])  # fmt: skip
    config = main_train.run_config_from_args(args)
    config = config.replace(network={"options": {**config.network.options, "base_filters": 4, "max_filters": 16}})
    lines: list[str] = []
    try:
        summary = Trainer(config, log=lines.append).run()
    finally:
        torch.use_deterministic_algorithms(False)  # a process-wide switch: leave it as the other tests expect
    assert summary["steps"] == 1 and 0 <= summary["best_metric"] <= 1
    assert summary["nondeterministic_ops"] == []  # on the CPU every op used has a deterministic implementation
    start = next(m for m in lines if m.startswith("nnUNet"))
    assert "SGD lr 0.01 (poly, warm-up 0)" in start and "recipe nnunet, gradient norm clipped at 12, deep supervision" in start
    assert f"torch {torch.__version__}" in start and "deterministic algorithms on" in start
    ckpt = torch.load(str(tmp_path / "run" / "best_metric_model.pth"), map_location="cpu", weights_only=True)
    assert ckpt["config"]["network"]["options"]["deep_supervision"] is True
    assert any(k.startswith("deep_supervision_heads.") for k in ckpt["state_dict"])


# ------------------------------------------------------------------------------------------ reproducibility


def test_environment_and_nondeterminism_log():
    env = environment()
    assert env["torch"] == torch.__version__ and env["cuda"] == (torch.version.cuda or "none")
    assert f"torch {torch.__version__}" in describe_environment(env)
    assert "code unknown" in describe_environment({**env, "code": {"commit": "unknown", "modified": "unknown"}})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        log = NondeterminismLog().start()
        warnings.warn("upsample_trilinear3d_backward_out_cuda does not have a deterministic implementation, but you set ...", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
        log.stop()
    assert log.ops == {"upsample_trilinear3d_backward_out_cuda"}
    assert [str(w.message) for w in seen] == ["something else"]  # other warnings pass through

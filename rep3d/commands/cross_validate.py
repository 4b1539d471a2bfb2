"""Cross-validate a training setup: train every fold (resumable), predict each fold's own validation cases
with its best checkpoint (out of fold), pool their Dice / HD95, and predict the data's held-out set with the
ensemble of the folds.

    python3 cross_validate.py --root /data/kits --dataset kits --network nnUNet --output runs/cv_kits_nnunet
    python3 cross_validate.py --folds 3 --output runs/cv_demo          # the synthetic demo dataset, 3 folds
    python3 cross_validate.py ... --folds 0 2                           # folds 0 and 2 of the 5-fold split
    python3 cross_validate.py ... --seeds 0 1 2                         # every fold once per seed (fold_K_seed_S)
    python3 test_seg.py --trained_weights runs/cv_kits_nnunet --root /data/kits   # the folds as one ensemble

Every data, network and training flag of main_train.py applies to each fold. Run the same command again
to continue: finished folds (summary.json at --max_iter) are skipped, an interrupted one resumes from its
checkpoint_last.pth as main_train.py --resume would (flags given now replace the settings they name, except
those that define the model and its data), and the out-of-fold predictions and tables are made anew.

The folder it writes is described in :mod:`rep3d.training.cross_validation`; compare two of them (or the
metrics.csv of two test_seg.py runs) with compare_runs.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import networks
from rep3d.commands import train as train_command
from rep3d.config import ConfigError
from rep3d.data.dataset_config import DataError
from rep3d.data.demo import DEMO_ROOT_DEFAULT, make_demo_dataset
from rep3d.fileio import FolderLock, FolderLockedError, WriteError, check_writable
from rep3d.inference.checkpoint import InferenceError
from rep3d.runtime import default_num_workers, select_device
from rep3d.training.cross_validation import (
    HELDOUT_METRICS_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    CrossValidationError,
    FoldRun,
    PredictionSettings,
    collect,
    fold_runs,
    plan_folds,
    run_status,
    write_plan,
)
from rep3d.training.trainer import Trainer, TrainingError

PROG = "cross_validate.py"


def build_parser() -> argparse.ArgumentParser:
    """main_train.py's parser (every data, network, training and runtime flag) plus the cross-validation flags."""
    p = train_command.build_parser()
    p.description = __doc__.split("\n\n")[0]
    for action in p._actions:
        if action.dest == "output":
            action.help = "cross-validation folder (fold_K/ run folders, oof/, cv_metrics.csv, ...). Default: runs/cv_demo for the demo, else runs/cv_<dataset>_<network>"
        elif action.dest == "fold":
            action.help = "main_train.py's single fold: not used here (give --folds)"
        elif action.dest == "resume":
            action.help = "not needed: running the same command again continues (finished folds skipped, an interrupted one resumed)"
    cv = p.add_argument_group("cross-validation")
    cv.add_argument(
        "--folds", type=int, nargs="+", default=None, metavar="K",
        help="one number N: every fold of an N-fold split (e.g. --folds 5); several numbers: those folds of the --num_folds split "
        "(e.g. --folds 0 2). The split is main_train.py --fold's: the data's 'fold' keys when it has them, else round-robin over "
        "the training cases sorted by name. Default: every fold of that split (5 without 'fold' keys)",
    )  # fmt: skip
    cv.add_argument("--num_folds", type=int, default=None, metavar="N", help="folds of the split when --folds lists fold numbers. Default: 5 (as --fold), or the number of the data's 'fold' keys")
    cv.add_argument(
        "--seeds", type=int, nargs="+", default=None, metavar="S",
        help="train every fold once per seed, into fold_K_seed_S (without --seeds: fold_K with --seed); cv_metrics.csv has a row per "
        "seed, and the summary and compare_runs.py average the seeds of a case first; the held-out ensemble takes every run",
    )  # fmt: skip
    cv.add_argument(
        "--postprocess", choices=("none", "auto"), default="none",
        help="auto: per class, keep only the largest connected component where that raises the mean Dice of the pooled out-of-fold "
        "predictions (nnU-Net's rule); the decision goes to <output>/postprocessing.json, which test_seg.py --trained_weights <output> "
        "--postprocess auto uses, and is applied to the held-out set. cv_metrics.csv scores the raw predictions",
    )  # fmt: skip
    cv.add_argument("--no_hd95", action="store_true", help="score Dice only (HD95 is the slow part of scoring)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse like main_train.py (recipe, demo defaults, the flags given) with the cross-validation flags."""
    return train_command.parse_args(argv, parser=build_parser())


def _problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if "fold" in args.given:
        problems.append("--fold picks main_train.py's one validation fold; cross_validate.py trains --folds (e.g. --folds 5, or --folds 0 2)")
    if args.resume not in (None, "auto"):
        problems.append(f"--resume {args.resume}: cross_validate.py resumes each fold from its own folder; drop the checkpoint path (or --resume)")
    if args.seeds and "seed" in args.given:
        problems.append("--seed and --seeds: pass one of them (--seeds trains every fold once per seed)")
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        problems.append(f"--seeds {' '.join(map(str, args.seeds))}: each seed once")
    if args.folds is not None and any(k < 0 for k in args.folds):
        problems.append(f"--folds {' '.join(map(str, args.folds))}: fold numbers and counts are >= 0")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append(
            "cross_validate.py trains the folds one after another in one process, not under torchrun. For several GPUs, run one "
            "process per fold (CUDA_VISIBLE_DEVICES=K python3 cross_validate.py ... --folds K --num_folds N, same --output), "
            "then the command once more with every fold to collect (finished folds are skipped)"
        )
    return problems


def default_output(args: argparse.Namespace) -> str:
    """``runs/cv_demo`` for the demo, else ``runs/cv_<dataset or data folder name>_<network>``."""
    if args.demo:
        return "runs/cv_demo"
    source = args.dataset or os.path.basename(os.path.normpath(args.root or os.path.splitext(args.datalist)[0]))
    return os.path.join("runs", f"cv_{source}_{args.network}")


def fold_selection(args: argparse.Namespace) -> tuple[int | None, list[int] | None]:
    """``(folds of the split or None for the default, fold numbers to train or None for all)`` from --folds / --num_folds."""
    if args.folds is None:
        return args.num_folds, None
    if len(args.folds) == 1 and args.num_folds is None:
        return args.folds[0], None
    return args.num_folds, sorted(set(args.folds))


def fold_args(args: argparse.Namespace, run: FoldRun, root: str | None, datalist: str, dataset: str | None, resume: bool) -> argparse.Namespace:
    """The main_train.py flags of one run: the command line's, with the run folder, the cross-validation
    datalist, the fold and the seed; ``resume`` continues the run's ``checkpoint_last.pth``."""
    a = argparse.Namespace(**vars(args))
    a.output, a.root, a.datalist, a.fold, a.seed, a.dataset = run.folder, root, datalist, run.fold, run.seed, dataset
    a.demo = False  # the demo data now has a folder; its settings were applied when parsing
    a.resume = "auto" if resume else None
    given = set(args.given) - {"resume"}
    if resume:  # a resumed run keeps its own weights
        a.pretrained_weights, a.pretrain = None, None
        given -= {"pretrained_weights", "pretrain"}
    a.given = sorted(given)
    return a


def cross_validate(args: argparse.Namespace, trainer_class: type[Trainer] = Trainer, log: Callable[[str], None] | None = None) -> dict:
    """Train the folds, then predict and score them (see the module docstring).

    Args:
        args: :func:`parse_args`'s result.
        trainer_class: the Trainer (a subclass, e.g. with another loss) of every run.
        log: where messages go (default: print).

    Returns:
        ``{"output", "plan", "runs": [{"fold", "seed", "folder", "status"}], and collect()'s keys:
        "rows", "summary", "table", "postprocessing", "heldout_rows", "heldout_summary", "heldout_table"}``.

    Raises:
        ConfigError, CrossValidationError, DataError, InferenceError, networks.CheckpointError: problems to fix.
        TrainingError: a run stopped (non-finite loss, out of memory).
    """
    say = log or (lambda m: print(m, flush=True))
    problems = _problems(args)
    if problems:
        raise ConfigError(problems)
    root, datalist, dataset = args.root, args.datalist, args.dataset
    if args.demo:
        root = make_demo_dataset(DEMO_ROOT_DEFAULT)
        dataset = dataset or "demo"
        shown = ", ".join(f"{k}={getattr(args, k)}" for k in args.demo_defaults if k != "output")
        say(f"demo cross-validation (no --root): synthetic dataset in {os.path.abspath(root)}; demo settings: {shown}")
    output = args.output if "output" in args.given else default_output(args)
    num_folds, chosen = fold_selection(args)
    plan = plan_folds(root, datalist, num_folds)
    folds = chosen if chosen is not None else list(range(plan.num_folds))
    outside = [k for k in folds if not 0 <= k < plan.num_folds]
    if outside:
        raise CrossValidationError(f"--folds {' '.join(map(str, outside))}: the split has {plan.num_folds} folds (0-{plan.num_folds - 1}); pass fold numbers in that range")
    check_writable(output)
    cv_datalist = write_plan(plan, output)
    runs = fold_runs(output, folds, args.seeds, args.seed)
    say(
        f"cross-validation in {os.path.abspath(output)}: {plan.how}; training fold(s) {', '.join(map(str, folds))}"
        + (f" x seeds {', '.join(map(str, args.seeds))}" if args.seeds else f" with seed {args.seed}")
        + f", {args.max_iter} iterations each (folds in splits.json, the datalist they train from in {cv_datalist})"
    )
    statuses = []
    for run in runs:
        status = run_status(run, args.max_iter)
        statuses.append({"fold": run.fold, "seed": run.seed, "folder": run.folder, "status": status})
        if status == "finished":
            say(f"{run.label}: finished earlier ({run.folder}/summary.json reached step {args.max_iter}); skipped")
            continue
        say(f"{run.label}: {'resuming the interrupted run' if status == 'interrupted' else 'training'} in {run.folder}")
        train_command.make_trainer(fold_args(args, run, root, cv_datalist, dataset, status == "interrupted"), trainer_class, log).run()
    settings = PredictionSettings(
        device=select_device(args.gpu), amp=args.amp, sw_batch_size=args.sw_batch_size, overlap=args.overlap,
        num_workers=default_num_workers() if args.num_workers is None else args.num_workers, hd95=not args.no_hd95,
    )  # fmt: skip
    # one process at a time writes the pooled results (the runs' folders have their own locks)
    with FolderLock(output, PROG):
        result = collect(output, plan, runs, settings, postprocess=args.postprocess, log=say)
    return {"output": output, "plan": plan, "runs": statuses, **result}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: exit 0 done; 2 bad flags, data or checkpoint (one message, no traceback); 1 a run
    stopped or a file could not be written; 130 interrupted."""
    args = parse_args(argv)
    try:
        result = cross_validate(args)
    except (ConfigError, CrossValidationError, DataError, InferenceError, networks.CheckpointError, FolderLockedError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"{PROG}: stopped: {err}", file=sys.stderr)
        return 1
    except WriteError as err:
        print(f"{PROG}: error: {err}; once fixed, run the same command again to continue", file=sys.stderr)
        return 1
    except ValueError as err:  # setting-level messages of the data pipeline and the trainer name the flag
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted. Run the same command again to continue: finished folds are skipped, the interrupted one resumes", file=sys.stderr)
        return 130
    out = result["output"]
    print(f"\n{result['table']}\n(per case: {os.path.join(out, METRICS_FILE)}; summary: {os.path.join(out, SUMMARY_FILE)})")
    if result["heldout_table"]:
        print(f"\n{result['heldout_table']}\n(per case: {os.path.join(out, HELDOUT_METRICS_FILE)})")
    post = " --postprocess auto" if result["postprocessing"] is not None else ""
    print(f"\nthe folds as one ensemble: python3 test_seg.py --trained_weights {out}{post} --input IMAGES --output PREDICTIONS")
    return 0

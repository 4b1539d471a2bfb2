"""Train a segmentation network (REP3D by default) with the Rep3D paper's setup.

    python3 main_train.py --root /path/to/amos_ct --output ./runs/rep3d_amos_ct --dataset amos
    python3 main_train.py --output runs/demo                     # synthetic demo data, reduced REP3D, CPU minutes
    python3 main_train.py --output runs/demo --resume            # continue a stopped run where it left off
    torchrun --nproc_per_node 2 main_train.py --root ... --dataset amos --output ...   # DDP

This file is the command-line edge: it parses the flags, turns them into a :class:`configs.RunConfig`
(:func:`run_config_from_args`, the one place where flags become settings) and hands that to
:class:`trainer.Trainer`. Each validation (every ``--eval_step`` iterations and at the end) scores the
validation cases by sliding window, writes ``checkpoint_last.pth`` (everything needed to resume) and,
on improvement of the mean foreground Dice, ``best_metric_model.pth``. The output folder also gets
``config.json``, ``args.json``, ``training_curve.png``, ``training_log.txt``, ``validation_metrics.csv``,
``summary.json`` and TensorBoard logs in ``tensorboard/``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shlex
import sys
from typing import Any, Callable, Sequence

import networks
from rep3d.cli import (
    HelpFormatter,
    add_dataset_args,
    add_network_args,
    add_runtime_args,
    network_overrides,
    str2bool,
)
from rep3d.config import (
    LOSSES,
    LR_SCHEDULES,
    CUDA_GRAPH_SETTINGS,
    OPTIMIZERS,
    RECIPES,
    ConfigError,
    DataConfig,
    NetworkConfig,
    RunConfig,
    SlidingWindowConfig,
    TrainConfig,
    default_recipe,
)
from rep3d.data.dataset_config import DataError
from rep3d.data.demo import DEMO_ROOT_DEFAULT
from rep3d.data.store_layout import dataset_cache_dir
from rep3d.fileio import FolderLockedError, WriteError, jsonable
from rep3d.planning import resolve_dataset
from rep3d.runtime import default_num_workers
from rep3d.training.trainer import LAST_CKPT, Trainer, TrainingError

# Settings used when no --root is given (the synthetic demo of demo_data.py), for every flag the user
# did not set: a reduced REP3D (LRBM kept) that trains to a high Dice in a few CPU minutes on 2 cores.
# The dataset side (roi 32^3, 2 mm spacing, full caching) comes from the "demo" preset.
DEMO_DEFAULTS: dict[str, Any] = {
    "output": "runs/demo",
    "feature_size": [16, 32, 64, 128],
    "depths": [1, 1, 1, 1],
    "hidden_size": 128,
    "kernel_size": 7,
    "max_iter": 300,
    "eval_step": 50,
    "lr": 2e-3,
    # Loader workers compete with the two compute threads for 2 cores: augment in the main process.
    "num_workers": 0,
}


# Flags that map one to one onto a field of a config section (flag dest -> (section, field)).
_FIELDS: dict[str, tuple[str, str]] = {
    **{k: ("training", k) for k in (
        "output", "max_iter", "eval_step", "lr", "optim", "weight_decay", "lr_schedule", "warmup_iters", "seed", "amp",
        "compile", "cuda_graph", "max_nonfinite", "loss", "class_weights", "pretrained_weights", "freeze_encoder", "gpu",
        "recipe", "grad_clip", "deterministic",
    )},
    **{k: ("data", k) for k in ("root", "datalist", "fold", "batch_size", "crop_sample", "cache_rate", "num_workers", "loader", "crop_ratios", "preprocessed")},
    "sw_batch_size": ("sliding_window", "sw_batch_size"),
    "overlap": ("sliding_window", "overlap"),
}  # fmt: skip


# Flags that define the data a model sees (a resumed run must keep them).
_DATASET_FLAGS = ("dataset", "dataset_config", "spacing", "intensity", "a_min", "a_max", "num_classes", "class_names", "roi")




def _optim_name(value: str) -> str:
    # Case-insensitive, so that "adamw" works; argparse's choices then checks the result.
    return next((o for o in OPTIMIZERS if o.lower() == str(value).lower()), value)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: the seed's flags with the paper's defaults, grouped as data, network,
    training and runtime."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_dataset_args(p, training=True)
    add_network_args(p)
    t = p.add_argument_group("training")
    t.add_argument("--output", type=str, default=None, help="run folder (checkpoints, logs, plots). Default: runs/demo for the demo, else runs/<dataset>_<network>")
    t.add_argument("--batch_size", type=int, default=1, help="cases per iteration (each gives --crop_sample crops)")
    t.add_argument("--crop_sample", type=int, default=2, help="random crops per case per iteration")
    t.add_argument("--lr", type=float, default=1e-4, help="peak learning rate. Default: the recipe's (paper: 1e-4; nnunet: 1e-2)")
    t.add_argument("--optim", type=_optim_name, default="AdamW", choices=OPTIMIZERS, help="optimizer (AdamW: betas 0.9/0.999, eps 1e-8; SGD: momentum 0.99, Nesterov). Default: the recipe's (paper: AdamW; nnunet: SGD)")
    t.add_argument("--weight_decay", type=float, default=0.08, help="weight decay. Default: the recipe's (paper: 0.08; nnunet: 3e-5)")
    t.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="warmup_cosine", help="warmup_cosine: linear warm-up to --lr, then cosine decay to 0 at --max_iter; poly: (1 - progress)**0.9 after the warm-up (nnU-Net's); constant: --lr throughout. Default: the recipe's (paper: warmup_cosine; nnunet: poly)")
    t.add_argument("--warmup_iters", type=int, default=None, help="warm-up iterations. Default: the paper recipe's min(1000, 5%% of --max_iter), derived again when --max_iter changes; the nnunet recipe's 0")
    t.add_argument("--max_iter", type=int, default=60000, help="training iterations")
    t.add_argument("--eval_step", type=int, default=500, help="validate (and checkpoint) every this many iterations")
    t.add_argument("--loss", choices=LOSSES, default="dicece", help="dicece: Dice + cross-entropy (the paper's); dice_focal: Dice + focal; ce: cross-entropy; dicece_nnunet: nnU-Net's (Dice of the foreground classes per case, smooth 1e-5, + cross-entropy). Default: the recipe's (paper: dicece; nnunet: dicece_nnunet)")
    t.add_argument(
        "--recipe", choices=tuple(RECIPES), default=None,
        help="a named set of defaults for --optim --lr --weight_decay --lr_schedule --warmup_iters --loss --grad_clip "
        "--deep_supervision; every one of those flags given still wins. paper: AdamW lr 1e-4, wd 0.08, warm-up + cosine, "
        "DiceCE; nnunet: nnU-Net's nnUNetTrainer: SGD (Nesterov, momentum 0.99) lr 1e-2, wd 3e-5, poly decay without warm-up, "
        "dicece_nnunet, gradient norm clipped at 12, deep supervision on. Default: nnunet for --network nnUNet, paper otherwise",
    )  # fmt: skip
    t.add_argument("--deep_supervision", type=str2bool, default=None, metavar="on|off", help="supervise every decoder resolution with nnU-Net's loss weights (networks that have the heads: nnUNet). Default: the recipe's (nnunet: on)")
    t.add_argument("--grad_clip", type=float, default=None, metavar="NORM", help="clip the gradient norm to NORM before each step. Default: the recipe's (paper: none; nnunet: 12)")
    t.add_argument(
        "--deterministic", action="store_true",
        help="torch.use_deterministic_algorithms(True, warn_only=True) and deterministic cuDNN (slower on a GPU); the ops PyTorch "
        "reports as having no deterministic implementation are listed at the end and in summary.json. Not needed for the seed: "
        "--seed already fixes weights, crops and shuffling",
    )  # fmt: skip
    t.add_argument("--class_weights", type=float, nargs="+", default=None, metavar="W", help="per-class weights of the cross-entropy / focal term, one per class, background first")
    t.add_argument("--seed", type=int, default=0, help="random seed (weights, crops, shuffling)")
    t.add_argument(
        "--compile", action="store_true",
        help="run the training steps through torch.compile, with PyTorch's kernels (on an H200 55.8 ms per REP3D step after "
        "about 80 s of compiling, when the eager step took 60.8 ms: slower than the default Triton kernels + CUDA graph, 46 ms); "
        "validation uses the uncompiled model",
    )  # fmt: skip
    t.add_argument(
        "--cuda_graph", choices=CUDA_GRAPH_SETTINGS, default="auto",
        help="replay the network's forward and backward as CUDA graphs, recorded at the first step (about 0.3 s; the host issues one "
        "launch instead of ~1,150 kernels: 46.2 instead of 51.1 ms a REP3D step on an H200, same numbers). auto (default): "
        "on one GPU without --compile; on: insist; off: eager steps",
    )  # fmt: skip
    t.add_argument("--max_nonfinite", type=int, default=5, help="stop after this many non-finite losses in a row (each is skipped)")
    t.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT", help="continue a run from <output>/checkpoint_last.pth (or the given file): same step, optimizer, scheduler, scaler; settings not given now are the run's")
    t.add_argument("--pretrained_weights", type=str, default=None, help="start a new run from these weights (ours or the reference releases'); tensors whose shape differs (another class count) are re-initialised and listed")
    t.add_argument("--pretrain", type=str2bool, default=None, metavar="BOOL", help="the seed's switch for --pretrained_weights (True/False); --pretrained_weights alone is enough")
    t.add_argument("--freeze_encoder", type=int, default=0, metavar="N", help="fine-tuning: keep the encoder's weights fixed for the first N iterations (0: never)")
    add_runtime_args(p)
    return p


_UNSET = object()


def _given_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """Destinations the command line set explicitly (argparse only fills defaults for missing attributes)."""
    dests = {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS and a.dest != "help"}
    ns = argparse.Namespace(**{d: _UNSET for d in dests})
    parser.parse_args(argv, namespace=ns)
    return sorted(d for d in dests if getattr(ns, d) is not _UNSET)


def is_demo(args: argparse.Namespace) -> bool:
    """Whether the run uses the generated demo dataset (no --root, no --datalist)."""
    return args.root is None and getattr(args, "datalist", None) is None


def _shaped(network: str) -> bool:
    """Whether the demo's network-shape settings apply (REP3D and 3D UX-Net families)."""
    return all(k in networks.network_options(network) for k in ("feature_size", "kernel_size"))


def _apply_recipe(args: argparse.Namespace) -> list[str]:
    """Give every flag of ``args.recipe`` that the command line did not set the recipe's value
    (``--deep_supervision`` only for networks that have the heads); returns the flags it changed."""
    changed = []
    for key, value in RECIPES[args.recipe].items():
        if key in args.given or (key == "deep_supervision" and not networks.supports_deep_supervision(args.network)):
            continue
        if getattr(args, key) != value:
            setattr(args, key, copy.deepcopy(value))
            changed.append(key)
    return changed


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) and fill the run-dependent defaults.

    ``--recipe`` (default: the network's, :func:`configs.default_recipe`) fills the flags it names that
    were not given; then, without ``--root``, the :data:`DEMO_DEFAULTS` fill every flag neither the user
    nor the recipe set. The result has ``given`` (the flags set on the command line), ``demo`` (bool),
    ``recipe_defaults`` (the flags the recipe changed) and ``demo_defaults`` (the DEMO_DEFAULTS entries
    applied) attributes. ``parser``: a parser built on :func:`build_parser` (cross_validate.py's).
    """
    parser = parser or build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.given = _given_flags(parser, argv)
    args.demo = is_demo(args)
    args.recipe = args.recipe or default_recipe(args.network)
    args.recipe_defaults = _apply_recipe(args)
    args.demo_defaults = []
    if args.demo:
        for key, value in DEMO_DEFAULTS.items():
            if key in args.given or key in args.recipe_defaults or (key in ("feature_size", "depths", "hidden_size", "kernel_size") and not _shaped(args.network)):
                continue
            setattr(args, key, copy.deepcopy(value))
            args.demo_defaults.append(key)
    return args


def _flag_problems(args: argparse.Namespace) -> list[str]:
    """Flag combinations that no configuration can express."""
    problems = []
    if args.pretrain and not args.pretrained_weights:
        problems.append("--pretrain True needs --pretrained_weights FILE (the checkpoint to start from)")
    if args.pretrain is False and args.pretrained_weights:
        problems.append("--pretrained_weights was given with --pretrain False: drop one of them")
    if is_demo(args) and args.dataset not in (None, "demo"):
        problems.append(f"--dataset {args.dataset} needs its data: pass --root FOLDER (or --datalist FILE); without them the demo dataset is used")
    if args.resume and args.pretrained_weights:
        problems.append("--resume continues a run with its own weights; do not combine it with --pretrained_weights")
    if args.deep_supervision and not networks.supports_deep_supervision(args.network):
        having = ", ".join(n for n in networks.NETWORK_NAMES if networks.supports_deep_supervision(n))
        problems.append(f"--deep_supervision on: {args.network} has no deep-supervision heads (networks that have them: {having}); drop the flag")
    if args.cache_on_gpu and args.loader not in ("auto", "gpu"):
        problems.append(f"--cache_on_gpu is --loader gpu, but --loader {args.loader} was given: drop one of them")
    return problems


def dataset_from_args(args: argparse.Namespace):
    """``(DatasetConfig, plan or None)``: a preset or ``custom`` with flags, or (``--root`` alone) planned from the data."""

    values = {k: getattr(args, k) for k in ("spacing", "intensity", "a_min", "a_max", "num_classes", "class_names", "roi")}
    workers = default_num_workers() if args.num_workers in (None, 0) else args.num_workers
    return resolve_dataset(args.dataset, args.root, args.datalist, args.dataset_config, fold=args.fold, num_workers=workers, cache_dir=dataset_cache_dir(args.preprocessed, args.root, args.datalist), **values)


def _network_from_args(args: argparse.Namespace, dataset) -> NetworkConfig:
    options = network_overrides(args.network, vars(args), roi=dataset.roi)
    if args.deep_supervision and networks.supports_deep_supervision(args.network):
        options["deep_supervision"] = True  # only when on: runs without it keep the options they always had
    return NetworkConfig(args.network, dataset.in_channels, dataset.num_classes, options)


def _section_values(args: argparse.Namespace, section: str, only: set[str] | None = None) -> dict:
    return {f: getattr(args, k) for k, (s, f) in _FIELDS.items() if s == section and (only is None or k in only)}


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` the flags ask for (a new run).

    Raises:
        ConfigError: every impossible flag value or combination, in one message.
        ValueError: an unusable dataset setting (the message names the flag).
    """
    problems = _flag_problems(args)
    try:
        dataset, plan = dataset_from_args(args)
    except DataError as err:  # a missing folder and the other dataset problems: all in one message
        every = problems + err.problems
        raise DataError(every, header=f"{len(every)} problem{'s' if len(every) != 1 else ''} with the flags and the data; nothing was trained:") from None
    except ValueError as err:
        raise ConfigError(problems + [str(err)]) from None
    if problems:
        raise ConfigError(problems)
    training = _section_values(args, "training")
    training["output"] = args.output or f"runs/{dataset.name}_{args.network}"
    data = _section_values(args, "data")
    if args.cache_on_gpu:
        data["loader"] = "gpu"
    config = RunConfig(
        network=_network_from_args(args, dataset),
        data=DataConfig(dataset=dataset, plan=plan.to_dict() if plan is not None else None, **data),
        training=TrainConfig(**training),
        sliding_window=SlidingWindowConfig(**_section_values(args, "sliding_window")),
    )
    config.check()
    return config


def _differences(old: Any, new: Any, prefix: str) -> dict[str, list]:
    """Fields of two config sections that differ, as ``{"section.field": [old, new]}``."""
    out = {}
    for f in dataclasses.fields(old):
        a, b = jsonable(getattr(old, f.name)), jsonable(getattr(new, f.name))
        if a != b:
            out[f"{prefix}.{f.name}"] = [a, b]
    return out


def resolve_run(args: argparse.Namespace) -> tuple[RunConfig, dict | None, str | None, dict[str, list]]:
    """The run to make: ``(config, checkpoint to resume or None, its path, settings changed now)``;
    the changes are ``{"section.field": [checkpoint's value, new value]}``.

    With ``--resume`` the checkpoint's configuration is the run's; the flags given now replace the
    settings they name, except those that define the model and its data (network and options,
    dataset settings, optimizer), which must agree. Derived settings (the default warm-up) are derived
    again, and every change is recorded in the checkpoint and announced at each later resume.
    """
    if not args.resume:
        return run_config_from_args(args), None, None, {}
    problems = _flag_problems(args)
    if problems:
        raise ConfigError(problems)
    output = args.output or DEMO_DEFAULTS["output"]
    path = os.path.join(output, LAST_CKPT) if args.resume == "auto" else args.resume
    if not os.path.isfile(path):
        raise ConfigError(
            f"--resume: no checkpoint at {path}. Pass the run's --output (it holds {LAST_CKPT}) or the checkpoint "
            "path, or drop --resume to start a new run"
        )
    ckpt = networks.read_checkpoint(path)
    saved = RunConfig.from_checkpoint(ckpt, path)
    if saved is None or not all(k in ckpt for k in ("state_dict", "optimizer", "step")):
        raise networks.CheckpointError(
            f"{path} is not a full training checkpoint (no optimizer/step): --resume needs {LAST_CKPT}; "
            "to start from weights only use --pretrained_weights FILE"
        )
    given = set(args.given)
    conflicts = []
    if "network" in given and args.network != saved.network.name:
        conflicts.append(f"--network {args.network} (checkpoint: {saved.network.name})")
    new_options = network_overrides(saved.network.name, {k: getattr(args, k) for k in given if hasattr(args, k)})
    for key, value in new_options.items():
        if key != "dwconv" and key != "img_size" and jsonable(value) != jsonable(saved.network.options.get(key)):
            conflicts.append(f"--{key} {value} (checkpoint: {saved.network.options.get(key, 'the network default')})")
    if given & set(_DATASET_FLAGS):
        dataset, _ = dataset_from_args(args)
        for key in ("spacing", "intensity", "a_min", "a_max", "num_classes", "class_names", "roi"):
            if jsonable(getattr(dataset, key)) != jsonable(getattr(saved.data.dataset, key)):
                conflicts.append(f"{key} {getattr(dataset, key)} (checkpoint: {getattr(saved.data.dataset, key)})")
    if "optim" in given and args.optim != saved.training.optim:
        conflicts.append(f"--optim {args.optim} (checkpoint: {saved.training.optim})")
    if "recipe" in given and args.recipe != saved.training.recipe:
        conflicts.append(f"--recipe {args.recipe} (checkpoint: {saved.training.recipe})")
    if "deep_supervision" in given and bool(args.deep_supervision) != bool(saved.network.options.get("deep_supervision")):
        conflicts.append(f"--deep_supervision {'on' if args.deep_supervision else 'off'} (checkpoint: {'on' if saved.network.options.get('deep_supervision') else 'off'})")
    if conflicts:
        raise ConfigError(
            f"--resume {path}: these settings differ from the run being resumed: {', '.join(conflicts)}. "
            "Drop them (the checkpoint's values are used), or start a new run in another --output"
        )
    options = dict(saved.network.options)
    if "dwconv" in new_options or "dwconv" in given:
        options.pop("dwconv", None)
        options.update({k: v for k, v in new_options.items() if k == "dwconv"})
    data = _section_values(args, "data", given)
    if "cache_on_gpu" in given:
        data["loader"] = "gpu"
    training = _section_values(args, "training", given)
    training["output"] = output
    config = saved.replace(
        network=dataclasses.replace(saved.network, options=options),
        data=data,
        training=training,
        sliding_window=_section_values(args, "sliding_window", given),
    )
    config.check()
    changes = {}
    for name in ("network", "data", "training", "sliding_window"):
        changes.update(_differences(getattr(saved, name), getattr(config, name), name))
    changes.pop("training.output", None)
    return config, ckpt, path, changes


def make_trainer(args: argparse.Namespace, trainer_class: type[Trainer] = Trainer, log: Callable[[str], None] | None = None) -> Trainer:
    """The trainer (``trainer_class``, e.g. a subclass with another loss) for parsed flags."""
    config, ckpt, path, changes = resolve_run(args)
    trainer = trainer_class(config, checkpoint=ckpt, checkpoint_path=path, log=log)
    trainer.command_line = {k: v for k, v in vars(args).items() if k not in ("given", "demo_defaults")}
    if changes:
        trainer.config_changes = [{"step": int(ckpt["step"]), "changes": changes}]
    say = log or (lambda m: print(m, flush=True))
    if int(os.environ.get("RANK", "0")) == 0:
        if ckpt is not None and int(ckpt["step"]) < config.training.max_iter:
            earlier = list(ckpt.get("config_changes") or [])
            msg = f"resuming {path} at step {int(ckpt['step'])}/{config.training.max_iter} (best mean Dice {float(ckpt.get('best_metric', -1)):.4f} at step {int(ckpt.get('best_step', 0))})"
            if changes:
                msg += "; changed now: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())
            for entry in earlier:
                msg += f"; changed at the resume of step {entry['step']}: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in entry["changes"].items())
            say(msg)
        elif args.demo:

            shown = ", ".join(f"{k}={getattr(args, k)}" for k in args.demo_defaults)
            say(f"demo run (no --root): synthetic dataset in {os.path.abspath(DEMO_ROOT_DEFAULT)}; demo settings: {shown}")
    return trainer


def train(args: argparse.Namespace, log: Callable[[str], None] | None = None, trainer_class: type[Trainer] = Trainer) -> dict:
    """Train as the flags say; return the summary (best Dice, its step, per-class Dice, timing, paths).

    Raises:
        DataError: problems in the data (every one listed).
        networks.CheckpointError: a checkpoint that does not fit.
        ConfigError / ValueError: bad flags (the message names each).
        TrainingError: the loss kept being non-finite, or out of GPU memory.
    """
    return make_trainer(args, trainer_class, log).run()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: parse, train, turn known failures into messages and exit codes.

    Exit codes: 0 done; 2 bad flags, data or checkpoint (message, no traceback); 1 the run stopped
    (non-finite loss, out of memory); 130 interrupted.
    """
    args = parse_args(argv)
    prog = "main_train.py"
    try:
        train(args)
    except (DataError, networks.CheckpointError, ConfigError, FolderLockedError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"{prog}: stopped: {err}", file=sys.stderr)
        return 1
    except WriteError as err:
        # before anything trained (--output unwritable) or mid-run (disk full): every file written
        # before is intact; the checkpoint of the last validation is the one to resume from
        out = args.output or DEMO_DEFAULTS["output"]
        more = f"; every file written before is intact: once fixed, continue with python3 main_train.py --output {shlex.quote(out)} --resume" if os.path.isfile(os.path.join(out, LAST_CKPT)) else ""
        print(f"{prog}: error: {err}{more}", file=sys.stderr)
        return 1
    except ValueError as err:
        # Setting-level ValueErrors (dataset config, devices, AMP, ROI vs network) say what to pass.
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = args.output or "<output>"
        print(f"\n{prog}: interrupted. Continue from the last checkpoint with: python3 main_train.py --output {out} --resume", file=sys.stderr)
        return 130
    return 0

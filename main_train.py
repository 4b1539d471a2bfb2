"""Train a segmentation network (REP3D by default) with the Rep3D paper's setup.

    python3 main_train.py --root /path/to/amos_ct --output ./runs/rep3d_amos_ct --dataset amos
    python3 main_train.py --output runs/demo                     # synthetic demo data, reduced REP3D, CPU minutes
    python3 main_train.py --output runs/demo --resume            # continue a stopped run where it left off
    torchrun --nproc_per_node 2 main_train.py --root ... --dataset amos --output ...   # DDP

Each validation (every ``--eval_step`` iterations and at the end) scores the validation cases by
sliding window, writes ``checkpoint_last.pth`` (everything needed to resume) and, on improvement of
the mean foreground Dice, ``best_metric_model.pth``; both follow the checkpoint contract read by
``test_seg.py``. The output folder also gets ``args.json``, ``training_curve.png``,
``training_log.txt``, ``summary.json`` and TensorBoard logs in ``tensorboard/``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

import engine
import networks
from load_datasets_transforms import DataError, add_dataset_args, config_from_args, get_loaders, loader_kwargs_from_args

__all__ = ["DEMO_DEFAULTS", "TrainingError", "build_parser", "parse_args", "train", "main"]

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
# Network-shape entries of DEMO_DEFAULTS apply only to the networks that take them.
_DEMO_NETWORK_KEYS = ("feature_size", "depths", "hidden_size", "kernel_size")
_SHAPED_NETWORKS = ("REP3D", "REP3D_FixedPrior", "REP3D_Vanilla", "3DUXNET", "3DUXNET_K21", "3DUXNET_LRBM")
# Flags that define the model or the data it sees: a resumed run must keep them.
_RUN_DEFINING = (
    "network", "modulation", "kernel_size", "feature_size", "depths", "hidden_size", "dataset", "dataset_config",
    "spacing", "intensity", "a_min", "a_max", "num_classes", "class_names", "roi", "optim",
)  # fmt: skip
OOM_ADVICE = (
    "lower one of: --roi (e.g. 64 64 64; a multiple of 16), --crop_sample (crops per case, default 2), "
    "--batch_size, --sw_batch_size (validation windows per pass), or enable mixed precision with --amp bf16/fp16 "
    "(not off); --cache_on_gpu also takes GPU memory"
)
OPTIMIZERS = ("AdamW", "Adam", "SGD")
LAST_CKPT = "checkpoint_last.pth"
BEST_CKPT = "best_metric_model.pth"
CHECKPOINT_VERSION = 1


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss kept being non-finite); the message says what to change."""


class _ConfigError(ValueError):
    """A bad flag or flag combination (printed without traceback, exit code 2)."""


# --------------------------------------------------------------------------------------------------
# arguments


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (the seed's flags with the paper's defaults, plus resume/AMP/schedule)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", type=str, default=None, help="run folder (checkpoints, logs, plots). Default: runs/demo for the demo, else runs/<dataset>_<network>")
    t = p.add_argument_group("training")
    t.add_argument("--batch_size", type=int, default=1, help="cases per iteration (each gives --crop_sample crops)")
    t.add_argument("--crop_sample", type=int, default=2, help="random crops per case per iteration")
    t.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    t.add_argument("--optim", type=_optim_name, default="AdamW", choices=OPTIMIZERS, help="optimizer (AdamW: betas 0.9/0.999, eps 1e-8; SGD: momentum 0.99, Nesterov)")
    t.add_argument("--weight_decay", type=float, default=0.08, help="weight decay (the paper's AdamW value)")
    t.add_argument("--lr_schedule", choices=("warmup_cosine", "constant"), default="warmup_cosine", help="warmup_cosine: linear warm-up to --lr, then cosine decay to 0 at --max_iter; constant: --lr throughout")
    t.add_argument("--warmup_iters", type=int, default=None, help="warm-up iterations (default: min(1000, 5%% of --max_iter))")
    t.add_argument("--max_iter", type=int, default=60000, help="training iterations")
    t.add_argument("--eval_step", type=int, default=500, help="validate (and checkpoint) every this many iterations")
    t.add_argument("--seed", type=int, default=0, help="random seed (weights, crops, shuffling)")
    t.add_argument(
        "--compile", action="store_true",
        help="run the training steps through torch.compile (on an H100, 63 instead of 68 ms per REP3D iteration, "
        "after a one-off compilation of 1-2 min: worth it for long GPU runs, not for short or CPU runs); "
        "validation uses the uncompiled model",
    )  # fmt: skip
    t.add_argument("--max_nonfinite", type=int, default=5, help="stop after this many non-finite losses in a row (each is skipped)")
    t.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT", help="continue a run from <output>/checkpoint_last.pth (or the given file): same step, optimizer, scheduler, scaler; flags not given are taken from it")
    t.add_argument("--pretrain", type=engine.str2bool, default=None, metavar="BOOL", help="start from the weights of --pretrained_weights (True/False); weights only, a new run")
    t.add_argument("--pretrained_weights", type=str, default=None, help="checkpoint to take the weights from (ours, or the reference releases' layouts)")
    engine.add_network_args(p)
    engine.add_runtime_args(p)
    add_dataset_args(p)
    return p


_UNSET = object()


def _optim_name(value: str) -> str:
    # Case-insensitive, so that "adamw" works; argparse's choices then checks the result.
    return next((o for o in OPTIMIZERS if o.lower() == str(value).lower()), value)


def _given_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """Destinations the command line set explicitly (argparse only fills defaults for missing attributes)."""
    dests = {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS and a.dest != "help"}
    ns = argparse.Namespace(**{d: _UNSET for d in dests})
    parser.parse_args(argv, namespace=ns)
    return sorted(d for d in dests if getattr(ns, d) is not _UNSET)


def is_demo(args: argparse.Namespace) -> bool:
    """Whether the run uses the generated demo dataset (no --root, no --datalist)."""
    return args.root is None and getattr(args, "datalist", None) is None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) and fill the run-dependent defaults.

    Without ``--root`` the :data:`DEMO_DEFAULTS` fill every flag the user did not give. The result
    has ``given`` (the flags set on the command line), ``demo`` (bool) and ``demo_defaults`` (the
    DEMO_DEFAULTS entries applied) attributes.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.given = _given_flags(parser, argv)
    args.demo = is_demo(args)
    args.demo_defaults = []  # the DEMO_DEFAULTS entries applied (printed at start)
    if args.demo:
        for key, value in DEMO_DEFAULTS.items():
            if key in args.given:
                continue
            if key in _DEMO_NETWORK_KEYS and args.network not in _SHAPED_NETWORKS:
                continue
            setattr(args, key, copy.deepcopy(value))
            args.demo_defaults.append(key)
    return args


def _check_args(args: argparse.Namespace) -> None:
    """Refuse impossible values with a message naming the flag."""
    problems = []
    for name, low in (("batch_size", 1), ("crop_sample", 1), ("max_iter", 1), ("eval_step", 1), ("sw_batch_size", 1), ("max_nonfinite", 1), ("num_workers", 0)):
        v = getattr(args, name)
        if v is not None and v < low:
            problems.append(f"--{name} must be >= {low}, got {v}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        problems.append(f"--lr must be a positive number, got {args.lr}")
    if args.weight_decay < 0:
        problems.append(f"--weight_decay must be >= 0, got {args.weight_decay}")
    if args.warmup_iters is not None and not 0 <= args.warmup_iters < args.max_iter:
        problems.append(f"--warmup_iters must be in [0, --max_iter) = [0, {args.max_iter}), got {args.warmup_iters}")
    if not 0.0 <= args.overlap < 1.0:
        problems.append(f"--val_overlap must be in [0, 1), got {args.overlap}")
    if args.cache_rate is not None and not 0.0 <= args.cache_rate <= 1.0:
        problems.append(f"--cache_rate must be in [0, 1], got {args.cache_rate}")
    if args.roi is not None and any(r < 1 for r in args.roi):
        problems.append(f"--roi must be 3 positive integers, got {args.roi}")
    if args.pretrain and not args.pretrained_weights:
        problems.append("--pretrain True needs --pretrained_weights FILE (the checkpoint to start from)")
    if args.pretrain is False and args.pretrained_weights:
        problems.append("--pretrained_weights was given with --pretrain False: drop one of them")
    if is_demo(args) and args.dataset not in (None, "demo"):
        problems.append(f"--dataset {args.dataset} needs its data: pass --root FOLDER (or --datalist FILE); without them the demo dataset is used")
    if args.resume and args.pretrained_weights:
        problems.append("--resume continues a run with its own weights; do not combine it with --pretrained_weights")
    if problems:
        raise _ConfigError("; ".join(problems))


# --------------------------------------------------------------------------------------------------
# distributed


class _Dist:
    """Rank / world of this process; a process group is set up under torchrun (WORLD_SIZE > 1)."""

    def __init__(self, use_cuda: bool) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.backend = None
        if self.enabled and not torch.distributed.is_initialized():
            self.backend = "nccl" if use_cuda else "gloo"
            if use_cuda:
                torch.cuda.set_device(self.local_rank)
            else:
                # gloo ranks on one host share its cores: split them instead of oversubscribing.
                local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
            torch.distributed.init_process_group(backend=self.backend)
        elif self.enabled:
            self.backend = torch.distributed.get_backend()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.enabled and self.backend is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# pieces of the run


def lr_factor(step: int, max_iter: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak LR for the iteration after ``step`` completed ones (LambdaLR's epoch)."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, max_iter - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def default_warmup(max_iter: int) -> int:
    """min(1000, 5% of max_iter)."""
    return min(1000, max(0, int(0.05 * max_iter)))


def build_optimizer(model: nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of ``--optim`` over all trainable parameters, with the paper's AdamW settings."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optim == "AdamW":
        kw: dict = {}
        if device.type == "cuda":
            kw["fused"] = True  # one kernel per step instead of one per tensor
        return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay, **kw)
    if args.optim == "Adam":
        return torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    return torch.optim.SGD(params, lr=args.lr, momentum=0.99, nesterov=True, weight_decay=args.weight_decay)


def _rng_state() -> dict:
    """Global RNG states as checkpoint-safe types (tensors, lists, numbers)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _args_dict(args: argparse.Namespace) -> dict:
    return engine.jsonable(vars(args))


def plot_curves(history: dict, class_names: Sequence[str], path: str) -> None:
    """Training curve PNG: loss (raw and smoothed), validation Dice (mean and per class), LR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    steps = np.arange(1, len(history["loss"]) + 1)
    loss = np.asarray(history["loss"], dtype=float)
    ax = axes[0]
    if len(loss):
        ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label="loss")
        w = max(1, len(loss) // 50)
        if w > 1:
            smooth = np.convolve(np.nan_to_num(loss, nan=np.nanmean(loss)), np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1 :], smooth, color="tab:blue", lw=1.5, label=f"loss (mean of {w})")
    ax.set_ylabel("DiceCE loss")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    ax = axes[1]
    vsteps = history["val_step"]
    if vsteps:
        per_class = np.asarray(history["val_per_class"], dtype=float)
        for i, name in enumerate(class_names[1:]):
            ax.plot(vsteps, per_class[:, i], lw=1, alpha=0.7, marker=".", label=name)
        ax.plot(vsteps, history["val_dice"], color="black", lw=2, marker="o", label="mean (foreground)")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize="small", ncol=2)
    ax.grid(alpha=0.3)
    ax = axes[2]
    ax.plot(steps, history["lr"], color="tab:orange")
    ax.set_ylabel("learning rate")
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _infinite(loader) -> Any:
    """Batches forever: each pass over the loader is a new epoch of random crops."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise DataError(["the training loader is empty. Fix: add training cases (imagesTr/labelsTr)"])


def _load_resume(args: argparse.Namespace, parser_defaults: dict) -> tuple[argparse.Namespace, dict]:
    """Read the checkpoint of ``--resume`` and merge its arguments under the flags given now."""
    path = os.path.join(args.output, LAST_CKPT) if args.resume == "auto" else args.resume
    if not os.path.isfile(path):
        raise _ConfigError(
            f"--resume: no checkpoint at {path}. Pass the run's --output (it holds {LAST_CKPT}) or the checkpoint "
            "path, or drop --resume to start a new run"
        )
    ckpt = networks.read_checkpoint(path)
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in ("state_dict", "optimizer", "step", "args")):
        raise networks.CheckpointError(
            f"{path} is not a full training checkpoint (no optimizer/step): --resume needs {LAST_CKPT}; "
            "to start from weights only use --pretrain True --pretrained_weights FILE"
        )
    saved = dict(ckpt["args"])
    given = set(args.given)
    conflicts = []
    for key in _RUN_DEFINING:
        if key in given and key in saved and engine.jsonable(getattr(args, key)) != engine.jsonable(saved[key]):
            conflicts.append(f"--{key} {getattr(args, key)} (checkpoint: {saved[key]})")
    if conflicts:
        raise _ConfigError(
            f"--resume {path}: these flags differ from the run being resumed: {', '.join(conflicts)}. "
            "Drop them (the checkpoint's values are used), or start a new run in another --output"
        )
    merged = vars(args).copy()
    for key, value in saved.items():
        if key in given or key in ("resume", "given", "pretrain", "pretrained_weights"):
            continue
        if key in merged or key in parser_defaults:
            merged[key] = value
    for key in ("roi", "feature_size", "depths", "spacing"):
        if merged.get(key) is not None:
            merged[key] = list(merged[key])
    new = argparse.Namespace(**merged)
    new.resume = path
    return new, ckpt


def _checkpoint(model: nn.Module, args: argparse.Namespace, cfg, net_kwargs: dict, step: int, best: float, best_step: int, metrics: dict | None) -> dict:
    """The contract part of a checkpoint (what best_metric_model.pth holds)."""
    return {
        "state_dict": {k: v.detach().cpu() for k, v in engine.unwrap_model(model).state_dict().items()},
        "network": args.network,
        "network_kwargs": engine.jsonable(net_kwargs),
        "in_channels": 1,
        "out_channels": cfg.num_classes,
        "dataset": engine.jsonable(cfg.to_dict()),
        "step": int(step),
        "best_metric": float(best),
        "best_step": int(best_step),
        "metrics": engine.jsonable(metrics or {}),
        "args": _args_dict(args),
        "format_version": CHECKPOINT_VERSION,
    }


def _tensor_batch(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.as_tensor(batch["image"]).as_subclass(torch.Tensor) if hasattr(batch["image"], "as_tensor") else batch["image"]
    label = torch.as_tensor(batch["label"]).as_subclass(torch.Tensor) if hasattr(batch["label"], "as_tensor") else batch["label"]
    return image.to(device, non_blocking=True), label.to(device, non_blocking=True)


def sync_buffers_from_rank0(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics, ...) to every rank; no-op without DDP.

    DDP broadcasts buffers at the start of each training forward, after which every rank updates its
    BatchNorm statistics with its own crops: without this, each rank would validate a slightly
    different model, none of them the one rank 0 saves.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() < 2:
        return
    for buf in model.buffers():
        torch.distributed.broadcast(buf, src=0)


def validate(
    model: nn.Module, loader, cfg, args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None
) -> engine.DiceAccumulator:
    """Sliding-window Dice over this rank's validation cases, summed over all ranks."""
    acc = engine.DiceAccumulator(cfg.num_classes, cfg.class_names)
    net = engine.unwrap_model(model)  # DDP's forward would sync buffers and expects equal call counts
    sync_buffers_from_rank0(net)
    was_training = net.training
    net.eval()
    try:
        for batch in loader:
            image, label = _tensor_batch(batch, device)
            probs = engine.sliding_window_predict(
                net, image, cfg.roi, sw_batch_size=args.sw_batch_size, overlap=args.overlap, amp_dtype=amp_dtype, sw_device=device, device=device
            )
            acc.add(probs, label)
    finally:
        net.train(was_training)
    acc.all_reduce()
    return acc


# --------------------------------------------------------------------------------------------------
# the run


def train(
    args: argparse.Namespace,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = None,
    on_start: Callable[[dict], None] | None = None,
) -> dict:
    """Train as the flags say; return a summary dict (best Dice, its step, per-class Dice, paths, time).

    Args:
        args: from :func:`parse_args`.
        stop_after: for tests only: return right after this iteration (global step) without
            validating or writing anything more, as if the process had been killed there.
        log: where messages go (default: print on rank 0).
        on_start: for tests only: called right before the first iteration with ``{"model",
            "optimizer", "scheduler", "scaler", "step", "args"}``.

    Raises:
        DataError: problems in the data (every one listed).
        networks.CheckpointError: a checkpoint that does not fit.
        ValueError: bad flags (message names the flag).
        TrainingError: the loss kept being non-finite.
        torch.OutOfMemoryError: out of GPU memory (``main`` turns it into advice).
    """
    t_start = time.time()
    _check_args(args)
    parser_defaults = vars(build_parser().parse_args([]))
    if args.output is None:
        args.output = f"runs/{args.dataset or 'demo'}_{args.network}"
    ckpt = None
    if args.resume:
        args, ckpt = _load_resume(args, parser_defaults)
        _check_args(args)
    elif os.path.isfile(os.path.join(args.output, LAST_CKPT)):
        raise _ConfigError(
            f"{args.output} already holds a run ({LAST_CKPT}). Pass --resume to continue it, another --output "
            "to start a new one, or delete the folder"
        )

    device = engine.select_device(args.gpu)
    dist = _Dist(use_cuda=device.type == "cuda")
    try:
        if dist.enabled and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        main_rank = dist.main
        say = log or (lambda m: print(m, flush=True))
        if not main_rank:
            say = lambda m: None  # noqa: E731 - only rank 0 talks
        return _run(args, ckpt, device, dist, say, stop_after, on_start, t_start)
    finally:
        dist.close()


def _run(args, ckpt, device, dist: _Dist, say, stop_after, on_start, t_start) -> dict:
    import demo_data

    amp_dtype = engine.resolve_amp(args.amp, device)
    if args.warmup_iters is None:
        args.warmup_iters = default_warmup(args.max_iter)
    cfg = config_from_args(args)
    args.roi = list(cfg.roi)
    if args.dataset is None:
        args.dataset = cfg.name
    if args.demo:
        if dist.main:
            demo_data.make_demo_dataset(demo_data.DEMO_ROOT_DEFAULT)
        dist.barrier()
    if args.demo and not args.resume:
        shown = {k: getattr(args, k) for k in getattr(args, "demo_defaults", [])}
        say("demo run (no --root): synthetic dataset in " + os.path.abspath(demo_data.DEMO_ROOT_DEFAULT) + "; demo settings: " + ", ".join(f"{k}={v}" for k, v in shown.items()))

    # Model and optimizer state are built before the data so that bad network flags fail fast.
    engine.set_seed(args.seed + dist.rank)
    net_kwargs = engine.network_overrides(args, roi=cfg.roi)
    try:
        model = networks.build_network(args.network, 1, cfg.num_classes, **net_kwargs)
        networks.check_roi(model, cfg.roi)
    except ValueError as err:
        raise _ConfigError(f"--network {args.network}: {err}") from None
    if args.pretrained_weights:
        networks.load_network_weights(model, args.pretrained_weights)
        say(f"weights loaded from {args.pretrained_weights} (weights only: a new run from step 0)")
    model.to(device)
    optimizer = build_optimizer(model, args, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.max_iter, args.warmup_iters, args.lr_schedule)
    )
    use_scaler = amp_dtype == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    step, best, best_step, best_metrics = 0, -1.0, 0, {}
    history: dict = {"loss": [], "lr": [], "val_step": [], "val_dice": [], "val_per_class": []}
    train_time = 0.0
    if ckpt is not None:
        networks.load_network_weights(model, ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if use_scaler and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        # The loaded states carry the old run's peak LR, weight decay and next-step LR: without this,
        # --lr / --weight_decay / --lr_schedule given with --resume would be silently ignored (while
        # args.json recorded them). Unchanged flags reproduce the loaded values exactly.
        scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = args.lr
            group["weight_decay"] = args.weight_decay
            group["lr"] = args.lr * lr_factor(step, args.max_iter, args.warmup_iters, args.lr_schedule)
        best, best_step = float(ckpt.get("best_metric", -1.0)), int(ckpt.get("best_step", 0))
        best_metrics = dict(ckpt.get("metrics") or {})
        saved_history = ckpt.get("history") or {}
        history = {k: list(saved_history.get(k, []))[: step if k in ("loss", "lr") else None] for k in history}
        train_time = float(ckpt.get("train_time_s", 0.0))
        if dist.main and "rng" in ckpt:
            _set_rng_state(ckpt["rng"])
        else:
            engine.set_seed(args.seed + dist.rank + step)
        say(f"resuming {args.resume} at step {step}/{args.max_iter} (best mean Dice {best:.4f} at step {best_step})")

    # Data: a resumed run reseeds the crops with the step so that it does not replay the first ones.
    lk = loader_kwargs_from_args(args, cfg)
    if lk.get("device") is not None and device.type == "cuda":
        lk["device"] = str(device)
    train_loader, val_loader = get_loaders(
        cfg, crop_sample=args.crop_sample, batch_size=args.batch_size, distributed=dist.enabled, seed=args.seed + step, **lk
    )

    train_model: nn.Module = model
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    eval_model = train_model
    if args.compile:
        train_model = torch.compile(train_model)
    writer = None
    out = args.output
    if dist.main:
        os.makedirs(out, exist_ok=True)
        engine.write_json(_args_dict(args), os.path.join(out, "args.json"))
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops the events a killed run logged after its last checkpoint.
        writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=step if ckpt is not None else None)
        n_params = sum(p.numel() for p in model.parameters())
        say(
            f"{args.network} ({n_params / 1e6:.3f}M parameters) on {device}"
            + (f" x {dist.world} processes ({dist.backend})" if dist.enabled else "")
            + f", AMP {str(amp_dtype).replace('torch.', '') if amp_dtype else 'off'}; dataset {cfg.name} ({cfg.num_classes} classes), "
            f"roi {list(cfg.roi)}, {len(train_loader.dataset)} training / {len(val_loader.dataset)} validation cases"
            + (" on rank 0" if dist.enabled else "")
            + f"; {args.optim} lr {args.lr:g} ({args.lr_schedule}, warm-up {args.warmup_iters}), {args.max_iter} iterations, "
            f"validation every {args.eval_step}; output {os.path.abspath(out)}"
        )

    from monai.losses import DiceCELoss
    from tqdm import tqdm

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    batches = _infinite(train_loader)
    tty = sys.stderr.isatty()
    bar = tqdm(
        total=args.max_iter, initial=step, desc="train", unit="it", disable=not dist.main,
        dynamic_ncols=True, mininterval=0.5 if tty else 30.0, file=sys.stderr,
    )  # fmt: skip
    nonfinite = 0
    recent: list[float] = []
    t_loop = time.time()
    step_at_start = step
    # Time the loop spends blocked on the loader (the loss read-back syncs every step, so on a GPU this
    # is time the GPU sits idle waiting for data).
    data_wait = 0.0
    t_session = time.time()
    train_model.train()
    try:
        if on_start is not None:
            on_start({"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "step": step, "args": args})
        while step < args.max_iter:
            phase = "training step"
            try:
                t_data = time.perf_counter()
                batch = next(batches)
                image, label = _tensor_batch(batch, device)
                data_wait += time.perf_counter() - t_data
                optimizer.zero_grad(set_to_none=True)
                with engine.autocast(device, amp_dtype):
                    logits = train_model(image)
                loss = loss_fn(logits.float(), label)  # float32 loss: softmax/log of bf16 logits is coarse
                loss_value, finite = _loss_consensus(loss, dist)
                lr_now = optimizer.param_groups[0]["lr"]
                if finite:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    nonfinite = 0
                else:
                    nonfinite += 1
                    msg = f"step {step + 1}: non-finite loss ({loss_value}); step skipped ({nonfinite} in a row)"
                    warnings.warn(msg, RuntimeWarning, stacklevel=1)
                    if nonfinite >= args.max_nonfinite:
                        raise TrainingError(
                            f"the loss was non-finite for {nonfinite} iterations in a row (up to step {step + 1}); stopped. "
                            f"The last checkpoint ({os.path.join(out, LAST_CKPT)}) is intact. Try a lower --lr, --amp bf16 or "
                            "--amp off instead of fp16, and check the images for NaN/inf values; then --resume or start anew"
                        )
                    loss_value = float("nan")
                with warnings.catch_warnings():
                    # A skipped step still counts as an iteration of the schedule.
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                    scheduler.step()
                step += 1
                history["loss"].append(loss_value)
                history["lr"].append(lr_now)
                if writer is not None:
                    if finite:
                        writer.add_scalar("train/loss", loss_value, step)
                    writer.add_scalar("train/lr", lr_now, step)
                if finite:
                    recent = (recent + [loss_value])[-20:]
                bar.update(1)
                bar.set_postfix(
                    loss=f"{sum(recent) / max(1, len(recent)):.4f}", lr=f"{lr_now:.2e}",
                    best=f"{best:.4f}" if best >= 0 else "-", refresh=False,
                )  # fmt: skip
                if stop_after is not None and step >= stop_after:
                    return {"stopped_at": step, "output": out}
                if step % args.eval_step == 0 or step == args.max_iter:
                    phase = "validation"
                    t_val = time.time()
                    acc = validate(eval_model, val_loader, cfg, args, device, amp_dtype)
                    mean, per_class = acc.mean(), acc.per_class()
                    history["val_step"].append(step)
                    history["val_dice"].append(mean)
                    history["val_per_class"].append(per_class)
                    improved = not math.isnan(mean) and mean > best
                    if improved:
                        best, best_step = mean, step
                        best_metrics = {"mean_dice": mean, "dice_per_class": acc.as_dict(), "val_cases": acc.cases}
                    train_time += time.time() - t_loop
                    t_loop = time.time()
                    if dist.main:
                        _after_validation(
                            model, optimizer, scheduler, scaler, args, cfg, net_kwargs, step, best, best_step, best_metrics,
                            history, train_time, acc, improved, writer, bar, time.time() - t_val,
                        )  # fmt: skip
                    bar.set_postfix(loss=f"{sum(recent) / max(1, len(recent)):.4f}", lr=f"{lr_now:.2e}", best=f"{best:.4f}")
            except RuntimeError as err:
                if engine.is_oom(err):
                    raise TrainingError(f"out of GPU memory in the {phase} at step {step + 1}: {OOM_ADVICE}") from None
                raise
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    elapsed = time.time() - t_start
    summary = {
        "output": os.path.abspath(out),
        "network": args.network,
        "dataset": cfg.name,
        "steps": step,
        "steps_this_session": step - step_at_start,
        "best_metric": best,
        "best_step": best_step,
        "dice_per_class": best_metrics.get("dice_per_class", {}),
        "best_checkpoint": os.path.abspath(os.path.join(out, BEST_CKPT)),
        "last_checkpoint": os.path.abspath(os.path.join(out, LAST_CKPT)),
        "wall_time_s": round(elapsed, 1),
        "train_time_s": round(train_time, 1),
        "data_wait_s": round(data_wait, 1),
        "data_wait_fraction": round(data_wait / max(time.time() - t_session, 1e-9), 3),
    }
    if dist.main:
        engine.write_json(summary, os.path.join(out, "summary.json"))
        lines = [f"finished {step} iterations in {elapsed / 60:.1f} min (this session); best mean foreground Dice {best:.4f} at step {best_step}:"]
        if best_metrics.get("dice_per_class"):
            lines.append(engine.dice_table(best_metrics["dice_per_class"]))
        lines.append(
            f"waited for data {summary['data_wait_s']} s "
            f"({100 * summary['data_wait_fraction']:.0f}% of this session's training loop)"
            + ("; raise --num_workers or --cache_rate, or try --cache_on_gpu" if summary["data_wait_fraction"] > 0.1 else "")
        )
        lines.append(f"best checkpoint: {summary['best_checkpoint']}")
        lines.append(f"predict with: python3 test_seg.py --trained_weights {os.path.join(out, BEST_CKPT)} --output {os.path.join(out, 'predictions')}")
        say("\n".join(lines))
    return summary


def _loss_consensus(loss: torch.Tensor, dist: _Dist) -> tuple[float, bool]:
    """The loss (mean over ranks) and whether it is finite on every rank: all ranks must agree to skip
    a step, or DDP's gradient all-reduce would wait for the ones that skipped."""
    v = loss.detach().float()
    if not dist.enabled:
        value = float(v.item())
        return value, math.isfinite(value)
    ok = torch.isfinite(v)
    buf = torch.stack([torch.where(ok, v, torch.zeros_like(v)), (~ok).float()])
    torch.distributed.all_reduce(buf)
    bad = float(buf[1].item())
    return (float(buf[0].item()) / dist.world if bad == 0 else float("nan")), bad == 0


def _after_validation(
    model, optimizer, scheduler, scaler, args, cfg, net_kwargs, step, best, best_step, best_metrics,
    history, train_time, acc: engine.DiceAccumulator, improved: bool, writer, bar, val_seconds: float,
) -> None:  # fmt: skip
    """Rank 0's writes after a validation: best model, full checkpoint, logs, plot."""
    out = args.output
    mean, per_class = acc.mean(), acc.per_class()
    metrics_now = {"mean_dice": mean, "dice_per_class": acc.as_dict(), "val_cases": acc.cases}
    if improved:
        best_ckpt = _checkpoint(model, args, cfg, net_kwargs, step, best, best_step, metrics_now)
        engine.save_checkpoint_atomic(best_ckpt, os.path.join(out, BEST_CKPT))
    last = _checkpoint(model, args, cfg, net_kwargs, step, best, best_step, best_metrics)
    last.update(
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler=scaler.state_dict() if scaler.is_enabled() else {},
        rng=_rng_state(),
        history=history,
        train_time_s=float(train_time),
        last_metrics=engine.jsonable(metrics_now),
    )
    engine.save_checkpoint_atomic(last, os.path.join(out, LAST_CKPT))
    if writer is not None:
        writer.add_scalar("val/mean_dice", mean, step)
        for name, value in zip(cfg.class_names[1:], per_class):
            writer.add_scalar("val/dice_" + "".join(c if c.isalnum() else "_" for c in name), value, step)
        writer.flush()
    try:
        plot_curves(history, cfg.class_names, os.path.join(out, "training_curve.png"))
    except Exception as err:  # noqa: BLE001 - a plotting problem must not stop training
        warnings.warn(f"could not write the training curve: {err}", RuntimeWarning, stacklevel=1)
    per = ", ".join(f"{n} {v:.3f}" for n, v in zip(cfg.class_names[1:], per_class))
    line = (
        f"step {step}: mean foreground Dice {mean:.4f} ({per}); best {best:.4f} at step {best_step}"
        + (" [new best, saved]" if improved else "")
        + f"; validation {val_seconds:.1f} s, training time so far {train_time:.0f} s"
    )
    with open(os.path.join(out, "training_log.txt"), "a") as f:
        f.write(line + "\n")
    bar.write(line, file=sys.stderr if not sys.stdout.isatty() else sys.stdout)


# --------------------------------------------------------------------------------------------------
# entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: parse, train, turn known failures into messages and exit codes.

    Exit codes: 0 done; 2 bad flags, data or checkpoint (message, no traceback); 1 the run stopped
    (non-finite loss, out of memory); 130 interrupted.
    """
    args = parse_args(argv)
    prog = "main_train.py"
    try:
        train(args)
    except (DataError, networks.CheckpointError, _ConfigError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"{prog}: stopped: {err}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())

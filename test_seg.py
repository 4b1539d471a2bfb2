"""Sliding-window inference with trained Rep3D (or baseline) checkpoints, in each volume's native space.

    python test_seg.py --root /path/to/amos_ct --output ./predictions/rep3d_amos_ct \\
        --trained_weights ./runs/rep3d_amos_ct/best_metric_model.pth --sw_batch_size 4 --overlap 0.5 --gpu 0

The network is built in deploy mode through the registry (:func:`networks.build_deploy_network`): a
training checkpoint is folded on load, folded, reference-layout and DDP (``module.``) checkpoints load
as they are. Network, its options, the class count and the dataset pre-processing come from the
checkpoint (read by :meth:`configs.RunConfig.from_checkpoint`, formats 1 and 2) unless flags say
otherwise; flags that contradict it are refused with a message.

Several checkpoints (``--trained_weights A B C``, or a run folder whose sub-folders hold one
``best_metric_model.pth`` each, e.g. the five cross-validation folds) are ensembled: their softmax
probabilities are averaged before the argmax. ``--postprocess largest_component`` keeps the largest
connected component of each class; ``--postprocess auto`` decides per class on labelled cases whether
that raises Dice (as nnU-Net does) and stores the decision in ``postprocessing.json`` beside the
checkpoint for later runs.

Inputs (first match wins): ``--input`` (one NIfTI file or a folder of them), ``--datalist`` (its
``testing`` list), ``--root`` (``imagesTs``, else ``imagesVal``; ``--split`` picks another), and with
none of these the demo dataset's validation cases. Every input gets ``<output>/<case>_seg.nii.gz``
with exactly its shape, affine and header geometry; ``--save_probabilities`` adds
``<case>_prob.nii.gz``. Where labels exist (the split's ``labels*`` folder, the datalist, or
``--labels``), Dice and HD95 per case and class go to ``metrics.csv``, the per-class means to
``summary.csv`` / ``summary.json`` and the screen.

From Python, :class:`Predictor` loads a checkpoint (or several, or an export of ``export_model.py``)
once and predicts files or arrays::

    from test_seg import Predictor
    predictor = Predictor("runs/demo/best_metric_model.pth", device="cpu", threads=2)
    labels = predictor.predict("case.nii.gz")                 # (X, Y, Z) uint8, the file's grid
    labels = predictor.predict(volume, affine=affine)         # a numpy array and its 4x4 affine
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

import configs
import demo_data
import engine
import image_io
import networks
from load_datasets_transforms import (
    DataError,
    DatasetConfig,
    add_dataset_args,
    case_name,
    default_num_workers,
    get_test_loader,
    list_cases,
    check_input_channels,
    list_images,
    nifti_files,
    resolve_dataset_config,
)

logger = logging.getLogger("test_seg")

__all__ = [
    "InferenceError",
    "POSTPROCESS_CHOICES",
    "Predictor",
    "build_parser",
    "parse_args",
    "expand_weights",
    "resolve_checkpoint",
    "check_ensemble",
    "resolve_inputs",
    "load_model",
    "predict_volume",
    "ensemble_probabilities",
    "native_probabilities",
    "keep_largest_component",
    "decide_postprocessing",
    "save_like",
    "case_metrics",
    "summarize_metrics",
    "metrics_table",
    "write_metrics",
    "run_inference",
    "main",
]

# Probabilities are stored as uint16 scaled to [0, 1] (NIfTI has no float16): 1.5e-5 resolution at a
# quarter of float32's size. Read them back with nibabel's get_fdata().
_PROB_DTYPE = np.uint16
CHECKPOINT_NAME = "best_metric_model.pth"
POSTPROCESS_CHOICES = ("none", "largest_component", "auto")
POSTPROCESS_FILE = "postprocessing.json"
# Flags main_train.py shares with the data flags that inference has no use for: accepted (old command
# lines keep working) with a warning, and kept out of --help.
_TRAINING_ONLY = ("--cache_rate", "--cache_on_gpu", "--loader", "--crop_ratios")


class InferenceError(ValueError):
    """A problem the user can fix (the message names the flag or file); ``main`` exits with code 2."""


# --------------------------------------------------------------------------------------------------
# flags


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a default only where it says something: not for None / False (which mean "from the
    checkpoint" or "off", as each help text says) nor when the help already names the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower() or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class _Ignored(argparse.Action):
    """A training-only flag: accepted, ignored with a warning, not listed in --help."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 - argparse's signature
        warnings.warn(f"{option_string} is a training option (main_train.py); test_seg.py ignores it", stacklevel=2)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (also used by the tests)."""
    p = argparse.ArgumentParser(
        description="Rep3D inference: deploy-mode sliding window (one checkpoint or an ensemble), predictions in "
        "native space, optional post-processing, Dice/HD95 tables.",
        formatter_class=_HelpFormatter,
    )
    for flag in _TRAINING_ONLY:
        p.add_argument(flag, nargs="?", action=_Ignored, help=argparse.SUPPRESS, dest=f"_ignored_{flag[2:]}")
    io = p.add_argument_group("inputs and outputs")
    io.add_argument(
        "--trained_weights", required=True, nargs="+", metavar="CKPT",
        help="checkpoint .pth (best_metric_model.pth of main_train.py, a folded or reference checkpoint, or a bare state dict); "
        "several, or a run folder whose sub-folders (e.g. fold_0 ... fold_4) each hold a best_metric_model.pth: an ensemble "
        "(softmax probabilities averaged)",
    )  # fmt: skip
    io.add_argument("--output", default="./predictions", help="folder for <case>_seg.nii.gz, metrics.csv, summary.csv/json")
    io.add_argument("--input", default=None, help="a NIfTI file or a folder of them to predict (instead of --root's split)")
    io.add_argument("--labels", default=None, help="folder of ground-truth labels (matched by case name) to score the predictions against")
    io.add_argument("--split", choices=("test", "val", "train"), default="test", help="split of --root / --datalist to predict: test = imagesTs (else imagesVal) or the datalist's 'testing' list")
    io.add_argument("--save_probabilities", action="store_true", help="also write <case>_prob.nii.gz: per-class probabilities in native space, 4-D (X, Y, Z, classes), uint16 scaled to [0, 1]")
    io.add_argument(
        "--resample_probabilities",
        action="store_true",
        help="make the native-space labels from the class probabilities resampled (linearly) to the input grid, then argmax; "
        "smoother boundaries where the input grid is finer than --spacing. Without it: argmax first, labels resampled by "
        "nearest neighbour (the paper's Invertd protocol)",
    )
    io.add_argument("--no_hd95", action="store_true", help="score Dice only: HD95 is the slow part of scoring (seconds per class on large volumes with ragged predictions)")

    post = p.add_argument_group("post-processing")
    post.add_argument(
        "--postprocess", choices=POSTPROCESS_CHOICES, default="none",
        help="none; largest_component: keep the largest connected component of every foreground class (MONAI "
        "KeepLargestConnectedComponent); auto: per class, keep only the largest component where that raised the mean Dice "
        f"on labelled cases (as nnU-Net does). auto decides on the first run with labelled cases (e.g. --split val) and "
        f"stores the decision in {POSTPROCESS_FILE} beside the checkpoint (and in --output); later runs reuse it. Default: none",
    )  # fmt: skip

    sw = p.add_argument_group("sliding window")
    sw.add_argument("--mode", choices=("gaussian", "constant"), default="gaussian", help="blending of overlapping windows")
    sw.add_argument("--tta", action="store_true", help="test-time augmentation: average over mirroring of the 3 spatial axes (8 passes)")
    sw.add_argument("--stitch_on_cpu", action="store_true", help="keep the stitched probability volume in RAM while the windows run on the GPU (for large volumes that do not fit in GPU memory)")
    sw.add_argument("--sw_device", choices=("auto", "cpu"), default="auto", help="where the sliding-window output is stitched: 'cpu' is the same as --stitch_on_cpu (windows still run on --gpu)")

    rt = p.add_argument_group("runtime")
    # A bare --amp means "auto" (AMP on CUDA); add_runtime_args keeps this definition.
    rt.add_argument("--amp", nargs="?", const="auto", default="auto", choices=engine.AMP_CHOICES, help="mixed precision: auto (bf16/fp16 on CUDA; on the CPU bf16 where it runs natively (AVX512-BF16, AMX), about twice float32's speed, else off), bf16, fp16, off")
    rt.add_argument("--threads", type=int, default=None, help="CPU threads of PyTorch (torch.set_num_threads: the network on the CPU) and of ONNX Runtime for an export's model.json. Default: PyTorch's (one per core)")
    rt.add_argument("--compile", action="store_true", help="run the windows through torch.compile (one static shape): on an H100 REP3D predicts a 256x256x160 volume in about 0.72 s instead of 0.91 s, after a one-off compilation of about 30 s: pays for itself after about 150 volumes in one run")
    engine.add_runtime_args(p)
    _merge_groups(p, "runtime")
    # None: 4 windows per pass on a GPU, 1 on the CPU (REP3D, bf16, 2 cores: 2.1 s a window at 1, 2.5 s at 4)
    p.set_defaults(sw_batch_size=None)
    for action in p._actions:
        if action.dest == "sw_batch_size":
            action.help = "windows per forward pass in sliding-window inference (default: 4 on a GPU, 1 on the CPU, where single windows run faster); lower it if memory runs out"
    engine.add_network_args(p)
    add_dataset_args(p, training=False)
    # None = take it from the checkpoint (add_network_args defaults to REP3D for training).
    p.set_defaults(network=None)
    for action in p._actions:  # these only matter for checkpoints that carry no settings
        if action.dest in ("network", "modulation", "kernel_size", "feature_size", "depths", "hidden_size") and action.help:
            action.help += " (read from the checkpoint; give it only for a bare state dict)"
    return p


def _merge_groups(p: argparse.ArgumentParser, title: str) -> None:
    # engine.add_runtime_args makes its own "runtime" group: one heading in --help, not two.
    same = [g for g in p._action_groups if g.title == title]
    for g in same[1:]:
        same[0]._group_actions.extend(g._group_actions)
        p._action_groups.remove(g)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv[1:]`` when None)."""
    args = build_parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        build_parser().error(f"--threads must be >= 1, got {args.threads}")
    return args


# --------------------------------------------------------------------------------------------------
# checkpoints, dataset settings, model


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _architecture_options(name: str) -> tuple[str, ...]:
    """The options of network ``name`` that shape its weights (a flag contradicting the checkpoint's is
    refused); ``dwconv`` only chooses how the same convolution is computed, ``img_size`` is the ROI."""
    return tuple(k for k in networks.network_options(name) if k not in ("dwconv", "img_size"))


def expand_weights(paths: str | Sequence[str]) -> list[str]:
    """The checkpoint files of ``--trained_weights``: files as given; a folder stands for its own
    ``best_metric_model.pth``, else one per sub-folder (cross-validation folds), in name order.

    Raises:
        InferenceError: a folder without any such checkpoint.
    """
    out: list[str] = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths):
        path = os.fspath(path)
        if not os.path.isdir(path):
            out.append(path)
            continue
        own = os.path.join(path, CHECKPOINT_NAME)
        found = [own] if os.path.isfile(own) else sorted(glob.glob(os.path.join(path, "*", CHECKPOINT_NAME)))
        if not found:
            raise InferenceError(
                f"--trained_weights {path}: a folder, but neither it nor its sub-folders hold a {CHECKPOINT_NAME}; "
                "pass checkpoint files, or the run folder whose fold sub-folders main_train.py wrote"
            )
        out.extend(found)
    return out


def _dataset_from_flags(flags: dict) -> DatasetConfig:
    keys = ("spacing", "intensity", "a_min", "a_max", "num_classes", "class_names", "roi")
    return resolve_dataset_config(flags.get("dataset"), flags.get("root"), flags.get("datalist"), flags.get("dataset_config"), **{k: flags.get(k) for k in keys})


def _uses_demo(flags: dict) -> bool:
    return flags.get("input") is None and flags.get("root") is None and flags.get("datalist") is None


def resolve_checkpoint(path: str, flags: dict | None = None) -> dict:
    """Read one checkpoint and settle network, its options, class count and dataset settings.

    The checkpoint's stored run configuration (:meth:`configs.RunConfig.from_checkpoint`, formats 1
    and 2) fills what the flags leave open; a flag that contradicts it raises.

    Args:
        path: the checkpoint file.
        flags: flag values by name (``vars(args)`` of :func:`parse_args`; missing = not given).

    Returns:
        ``{"path", "checkpoint": object, "network": name, "network_kwargs": dict, "in_channels": int,
        "out_channels": int, "cfg": DatasetConfig, "meta": bool, "sliding_window": {"sw_batch_size",
        "overlap", "mode"}}``.

    Raises:
        networks.CheckpointError: missing, unreadable or too new a file.
        InferenceError: flags contradicting the checkpoint, or settings missing from both.
    """
    flags = dict(flags or {})
    ckpt = networks.read_checkpoint(path)
    run = configs.RunConfig.from_checkpoint(ckpt, path)
    problems = []

    ck_net = run.network.name if run else None
    name = flags.get("network") or ck_net or "REP3D"
    if flags.get("network") and ck_net and networks.canonical_name(flags["network"]) != ck_net:
        problems.append(f"--network {flags['network']}, but {path} holds a {ck_net} model: drop --network (it is read from the checkpoint) or pass the {flags['network']} checkpoint")

    # network options: checkpoint's, then flags; deploy is decided by build_deploy_network.
    kwargs = dict(run.network.architecture) if run else {}
    given = engine.network_overrides(name, flags)
    for key, value in given.items():
        if key in _architecture_options(name) and key in kwargs and not _same(kwargs[key], value):
            flag = f"--{key} {' '.join(map(str, value)) if isinstance(value, list) else value}"
            problems.append(f"{flag} contradicts {path} (trained with {key}={kwargs[key]}): drop the flag")
    kwargs.update(given)

    # dataset settings and class count
    ck_ds = run.data.dataset if run else None
    if flags.get("dataset") is not None or flags.get("dataset_config") is not None:
        cfg = _dataset_from_flags(flags)
        if ck_ds is not None:
            diffs = [k for k in ("spacing", "intensity", "a_min", "a_max") if not _same(getattr(cfg, k), getattr(ck_ds, k))]
            if diffs:
                logger.warning("--dataset %s pre-processes differently from the training run (%s): predictions may suffer", cfg.name, ", ".join(f"{k}: {getattr(cfg, k)} vs {getattr(ck_ds, k)}" for k in diffs))
    elif ck_ds is not None:
        values = dataclasses.asdict(ck_ds)
        for key in ("spacing", "intensity", "a_min", "a_max", "roi"):
            if flags.get(key) is not None:
                values[key] = flags[key]
        if flags.get("class_names"):
            values["class_names"] = [c.strip() for c in flags["class_names"].split(",") if c.strip()]
        try:
            cfg = DatasetConfig(**values)
        except (TypeError, ValueError) as err:
            raise InferenceError(f"the checkpoint's dataset settings are unusable ({err}); pass --dataset (and its flags) to set them") from None
    elif _uses_demo(flags):
        cfg = _dataset_from_flags(flags)  # the demo preset
    else:
        raise InferenceError(
            f"{path} carries no dataset settings (a bare state dict?): pass --dataset (one of amos, amos_mri, kits, "
            "pancreas, hepatic, demo) or --dataset custom with --spacing/--a_min/--a_max/--num_classes"
        )
    ck_classes = run.network.out_channels if run else None
    num_classes = flags.get("num_classes")
    if num_classes is not None and ck_classes is not None and int(num_classes) != ck_classes:
        problems.append(
            f"--num_classes {num_classes}, but {path} was trained for {ck_classes} classes: drop --num_classes or pass a checkpoint trained for {num_classes}"
        )
    elif ck_classes is not None and cfg.num_classes != ck_classes:
        problems.append(
            f"--dataset {cfg.name} has {cfg.num_classes} classes, but {path} was trained for {ck_classes} classes"
            + f" ({', '.join(ck_ds.class_names)})" * (ck_ds is not None)
            + ": drop --dataset to use the checkpoint's settings, or pass the matching checkpoint"
        )
    elif num_classes is not None and cfg.num_classes != int(num_classes):
        cfg = dataclasses.replace(cfg, num_classes=int(num_classes), class_names=["background"] + [f"class_{i}" for i in range(1, int(num_classes))])
    if flags.get("roi") is not None:
        cfg = dataclasses.replace(cfg, roi=tuple(int(r) for r in flags["roi"]))
    # Networks built for one input size (UNETR, nnFormer, TransBTS) need windows of that size; others
    # that store an img_size (SwinUNETR's check, nnUNet's planned topology) take the ROI they were
    # trained with unless --roi says otherwise.
    if kwargs.get("img_size") is not None:
        size = tuple(int(r) for r in kwargs["img_size"])
        if networks.fixed_input_size(name):
            if flags.get("roi") is not None and tuple(flags["roi"]) != size:
                problems.append(f"--roi {' '.join(map(str, flags['roi']))}: {name} was built for inputs of {' x '.join(map(str, size))}: drop --roi")
            cfg = dataclasses.replace(cfg, roi=size)
        elif flags.get("roi") is None:
            cfg = dataclasses.replace(cfg, roi=size)
    if problems:
        raise InferenceError("the flags do not fit the checkpoint:\n" + "\n".join(f"  - {p}" for p in problems))
    return {
        "path": path,
        "checkpoint": ckpt,
        "network": name,
        "network_kwargs": kwargs,
        "in_channels": run.network.in_channels if run else 1,
        "out_channels": ck_classes if ck_classes is not None else cfg.num_classes,
        "cfg": cfg,
        "meta": run is not None,
        # the sliding window the run validated with (exports describe it; the flags still decide here)
        "sliding_window": dataclasses.asdict(run.sliding_window) if run else dataclasses.asdict(configs.SlidingWindowConfig()),
    }


def check_ensemble(members: Sequence[dict]) -> DatasetConfig:
    """The dataset settings shared by the resolved checkpoints of an ensemble.

    Their probabilities can only be averaged voxel by voxel if every model sees the same pre-processed
    grid and means the same thing by each output channel: classes (count and names), input channels,
    spacing and intensity normalisation must agree (ROI and architecture may differ).

    Raises:
        InferenceError: one message listing every disagreement, checkpoint by checkpoint.
    """
    first = members[0]
    problems = []
    for m in members[1:]:
        diffs = []
        for label, get in (
            ("classes", lambda r: r["out_channels"]),
            ("class names", lambda r: list(r["cfg"].class_names)),
            ("input channels", lambda r: r["in_channels"]),
            ("spacing", lambda r: list(r["cfg"].spacing)),
            ("intensity", lambda r: r["cfg"].intensity),
            ("intensity window", lambda r: [r["cfg"].a_min, r["cfg"].a_max]),
        ):  # fmt: skip
            a, b = get(first), get(m)
            if not _same(a, b):
                diffs.append(f"{label} {a} vs {b}")
        if diffs:
            problems.append(f"{m['path']} differs from {first['path']}: {'; '.join(diffs)}")
    if problems:
        raise InferenceError(
            "these checkpoints cannot be ensembled (their probabilities would not mean the same classes on the same grid):\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\n  Pass checkpoints of one training setup (e.g. the folds of one run)."
        )
    return first["cfg"]


def load_model(resolved: dict, device: torch.device | str = "cpu", path: str = "checkpoint") -> nn.Module:
    """Build the deploy-mode network of :func:`resolve_checkpoint`'s result and load its weights.

    Raises:
        InferenceError: the weights do not fit (other network, options or class count).
    """
    try:
        model = networks.build_deploy_network(
            resolved["network"], resolved["in_channels"], resolved["out_channels"], checkpoint=resolved["checkpoint"], **resolved["network_kwargs"]
        )
    except networks.CheckpointError as err:
        raise InferenceError(f"{path} does not load into {resolved['network']} with {resolved['out_channels']} classes: {err}") from None
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# inputs


def _attach_labels(cases: list[dict], folder: str) -> list[dict]:
    if not os.path.isdir(folder):
        raise DataError([f"{folder}: labels folder not found. Fix: pass an existing folder to --labels"])
    by_name: dict[str, str] = {}
    for p in nifti_files(folder):
        by_name.setdefault(case_name(p, "label"), p)
        by_name[case_name(p, "image")] = p
    out, missing = [], []
    for c in cases:
        lab = by_name.get(case_name(c["image"], "image"))
        if lab is None:
            missing.append(c["image"])
        out.append({**c, "label": lab} if lab else dict(c))
    if missing:
        logger.warning("--labels %s: no label for %d of %d inputs (e.g. %s); those are predicted but not scored", folder, len(missing), len(cases), missing[0])
    return out


def resolve_inputs(args: argparse.Namespace, cfg: DatasetConfig | None = None) -> list[dict]:
    """The volumes to predict, ``[{"image": path or [path per channel], "label": optional path}]``.

    With ``cfg`` (the model's dataset settings) every input is checked for the channels the model was
    trained with.

    Raises:
        DataError: missing files or folders, two inputs with the same case name, or inputs without
            the model's channels (each file and missing channel named).
    """
    if args.input is not None:
        cases = list_images(args.input, channels=cfg.in_channels if cfg is not None else None)
    elif args.datalist is not None or args.root is not None:
        cases = list_cases(args.root, args.split, args.datalist, fold=args.fold)
    else:
        root = demo_data.DEMO_ROOT_DEFAULT
        if not os.path.isfile(os.path.join(root, "demo_manifest.json")):
            logger.info("no demo dataset in %s: generating it", root)
            demo_data.make_demo_dataset(root)
        print(f"no --root or --input: predicting the demo dataset's validation cases ({root})")
        cases = list_cases(root, "val")
    if not cases:
        raise DataError([f"{args.input or args.datalist or args.root}: nothing to predict. Fix: check --input / --root / --split"])
    if args.labels is not None:
        cases = _attach_labels(cases, args.labels)
    seen: dict[str, str] = {}
    dups = []
    for c in cases:
        n = case_name(c["image"], "image")
        if n in seen:
            dups.append(f"{c['image']}: same case name {n!r} as {seen[n]}, both would be written to {n}_seg.nii.gz. Fix: keep one of them")
        seen[n] = c["image"]
    if dups:
        raise DataError(dups)
    if cfg is not None:
        problems = check_input_channels(cases, cfg)
        if problems:
            raise DataError(problems, header=f"{len(problems)} input(s) lack the {cfg.in_channels} channel(s) the model was trained with ({', '.join(cfg.channel_names)}); nothing was predicted:")
    return cases


# --------------------------------------------------------------------------------------------------
# prediction and files


def predict_volume(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    roi: Sequence[int],
    device: torch.device,
    sw_batch_size: int = 4,
    overlap: float = 0.5,
    mode: str = "gaussian",
    amp_dtype: torch.dtype | None = None,
    tta: bool = False,
    stitch_on_cpu: bool = False,
) -> torch.Tensor:
    """Softmax probabilities (1, C, ...) of one pre-processed volume by sliding window.

    With ``stitch_on_cpu`` the volume and the stitched output stay in RAM and only the windows go to
    ``device``; otherwise everything lives on ``device``. Returns float32 on the stitching device.
    """
    image = torch.as_tensor(image)  # plain tensor: the metadata stays with the caller's copy
    if stitch_on_cpu or device.type == "cpu":
        return engine.sliding_window_predict(
            model, image.cpu(), roi, sw_batch_size, overlap, mode, amp_dtype, tta, sw_device=device, device=torch.device("cpu")
        )
    return engine.sliding_window_predict(model, image.to(device), roi, sw_batch_size, overlap, mode, amp_dtype, tta)


def ensemble_probabilities(
    models: Sequence[nn.Module | Callable[[torch.Tensor], torch.Tensor]], image: torch.Tensor, rois: Sequence[Sequence[int]], device: torch.device, **kwargs: Any
) -> torch.Tensor:
    """The mean of the softmax probabilities of ``models`` (each with its own window ``rois[i]``) over
    one volume: :func:`predict_volume` per model, summed in place (one extra volume of memory)."""
    total = None
    for model, roi in zip(models, rois):
        p = predict_volume(model, image, roi, device, **kwargs)
        total = p if total is None else total.add_(p.to(total.device))
        del p
    return total.div_(len(models)) if len(models) > 1 else total


def _oom_message(case: str, sw_batch_size: int, cuda: bool) -> str:
    if cuda:
        return (
            f"CUDA ran out of memory predicting {case}. Fix: lower --sw_batch_size (now {sw_batch_size}), "
            "pass --stitch_on_cpu (same as --sw_device cpu) to keep the stitched volume in RAM, "
            "use --amp bf16 / fp16, or a smaller --roi"
        )
    return f"the CPU ran out of memory predicting {case}. Fix: lower --sw_batch_size (now {sw_batch_size}), close other programs, or run on a GPU (--gpu 0)"


def _is_cpu_oom(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err).lower()


def save_like(array: np.ndarray, reference: str, path: str, dtype: type = np.uint8, scaled: bool = False) -> None:
    """Write ``array`` as NIfTI with ``reference``'s header geometry, bit for bit.

    The reference header is copied (qform, sform, their codes, pixdim, units), so the output's affine
    and orientation equal the input's exactly (an affine rebuilt from a float32 quaternion would not).

    Args:
        array: voxel data on the reference grid, its first 3 axes the reference's spatial axes.
        reference: the input image file.
        path: output file (``.nii.gz``); written to a hidden temporary name, then renamed.
        dtype: stored data type.
        scaled: store floats in ``dtype`` with a scale factor (nibabel picks it), e.g. probabilities.
    """
    import nibabel as nib

    ref = nib.load(reference)
    hdr = ref.header.copy()
    hdr.set_data_dtype(dtype)
    if not scaled:
        array = np.asarray(array).astype(dtype, copy=False)
    hdr.set_slope_inter(None, None) if scaled else hdr.set_slope_inter(1.0, 0.0)
    for key in ("cal_min", "cal_max"):
        hdr[key] = 0
    hdr["intent_code"] = 0
    # affine=None keeps the copied qform/sform fields unchanged.
    img = type(ref)(array, None, header=hdr)
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, "." + base + ".tmp.nii.gz")
    nib.save(img, tmp)
    os.replace(tmp, path)


def _check_written(path: str, reference: str) -> None:
    """The written label map must have the input's spatial shape and voxel-to-world matrix."""
    out, ref = image_io.read_header(path), image_io.read_header(reference)
    if tuple(out.shape) != tuple(ref.shape) or not np.allclose(out.affine, ref.affine, atol=1e-4):
        raise RuntimeError(f"{path}: written with shape {out.shape} / affine {out.affine.tolist()}, input has {ref.shape} / {ref.affine.tolist()}")


def write_prediction(seg: np.ndarray, reference: str, out_path: str) -> str:
    """Write the label map ``seg`` (the reference's spatial shape) on ``reference``'s exact grid, in the
    format ``out_path`` names. A NIfTI reference's header is copied whole (a trailing singleton axis
    of a 4-D input is kept); other formats go through :func:`image_io.write_like`."""
    if image_io.image_ext(reference) in (".nii.gz", ".nii") and image_io.image_ext(out_path) in (".nii.gz", ".nii"):
        import nibabel as nib

        shape = tuple(nib.load(reference).shape)
        if int(np.prod(shape)) != seg.size:  # several channels in the input's 4th axis
            shape = shape[:3]
        save_like(seg.reshape(shape), reference, out_path, seg.dtype.type)
        return out_path
    return image_io.write_like(seg.reshape(_native_shape(reference)), reference, out_path, seg.dtype.type)


def _native_shape(reference: str) -> tuple[int, ...]:
    """The input's spatial shape (without a channel axis), as the predictions are written."""
    return tuple(int(s) for s in image_io.read_header(reference).shape)


def _voxel_sizes(reference: str) -> list[float]:
    import nibabel as nib

    aff = nib.load(reference).affine
    return [float(v) for v in np.sqrt((aff[:3, :3] ** 2).sum(axis=0))]


# --------------------------------------------------------------------------------------------------
# metrics


def case_metrics(
    pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, num_classes: int, spacing: Sequence[float] | None = None, hd95: bool = True
) -> dict[str, list[float]]:
    """Dice and HD95 of one case for every foreground class, by MONAI's metrics.

    Dice: :func:`engine.dice_scores` (``DiceMetric(include_background=False)``), NaN where the label
    lacks the class. HD95: ``HausdorffDistanceMetric(percentile=95)`` in mm (``spacing``), NaN where
    neither prediction nor label has the class, inf where only one of them has it (a missed or
    hallucinated structure; MONAI would return NaN and hide it).

    Args:
        pred: class map on the label's grid, shape (X, Y, Z) (or with a leading channel of 1).
        label: ground-truth class map, same shape.
        num_classes: classes including background.
        spacing: voxel size in mm per axis (default 1).
        hd95: compute HD95 (else NaN throughout).

    Returns:
        ``{"dice": [...], "hd95": [...], "gt_voxels": [...], "pred_voxels": [...]}``, one entry per
        foreground class.
    """
    from monai.metrics import HausdorffDistanceMetric

    p = torch.as_tensor(np.asarray(pred) if not torch.is_tensor(pred) else pred).long()
    y = torch.as_tensor(np.asarray(label) if not torch.is_tensor(label) else label).long()
    spatial = tuple(y.shape[-3:])
    if p.numel() != y.numel() or tuple(p.shape[-3:]) != spatial:
        raise ValueError(f"prediction {tuple(p.shape)} and label {tuple(y.shape)} differ in shape; score them on the same grid")
    p = p.reshape((1, 1) + spatial)
    y = y.reshape((1, 1) + spatial)
    dice = engine.dice_scores(p, y, num_classes)[0].tolist()
    # One class at a time on binary masks: no (C x volume) one-hot copy of a native-size volume.
    # include_background=True because each call sees a single (foreground) channel.
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    out = {"dice": [float(d) for d in dice], "hd95": [], "gt_voxels": [], "pred_voxels": []}
    for c in range(1, num_classes):
        pc, yc = p == c, y == c
        n_p, n_y = int(pc.sum()), int(yc.sum())
        out["gt_voxels"].append(n_y)
        out["pred_voxels"].append(n_p)
        if not hd95 or (n_p == 0 and n_y == 0):
            out["hd95"].append(float("nan"))
        elif n_p == 0 or n_y == 0:
            out["hd95"].append(float("inf"))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # MONAI's deprecation notice inside get_mask_edges
                out["hd95"].append(float(hd(pc, yc, spacing=list(spacing) if spacing is not None else None)[0, 0]))
    return out


def summarize_metrics(rows: list[dict], class_names: Sequence[str]) -> dict:
    """Per-class means over cases and the mean over foreground classes.

    Args:
        rows: ``{"case", "class", "name", "dice", "hd95"}`` per case and foreground class (as in
            ``metrics.csv``); NaN Dice (class absent from the label) does not count, nor does a
            non-finite HD95 (its count is reported as ``hd95_inf``).
        class_names: all class names, background first.

    Returns:
        ``{"classes": [{"class", "name", "dice", "dice_std", "hd95", "n", "hd95_inf"}, ...],
        "mean_dice": float, "mean_hd95": float, "cases": int}``.
    """
    classes = []
    for c in range(1, len(class_names)):
        sel = [r for r in rows if int(r["class"]) == c]
        dice = np.array([r["dice"] for r in sel if not math.isnan(r["dice"])], dtype=float)
        hd = np.array([r["hd95"] for r in sel], dtype=float)
        finite = hd[np.isfinite(hd)]
        classes.append(
            {
                "class": c,
                "name": class_names[c],
                "dice": float(dice.mean()) if dice.size else float("nan"),
                "dice_std": float(dice.std()) if dice.size else float("nan"),
                "hd95": float(finite.mean()) if finite.size else float("nan"),
                "n": int(dice.size),
                "hd95_inf": int(np.isinf(hd).sum()),
            }
        )
    dices = [c["dice"] for c in classes if not math.isnan(c["dice"])]
    hds = [c["hd95"] for c in classes if not math.isnan(c["hd95"])]
    return {
        "classes": classes,
        "mean_dice": float(np.mean(dices)) if dices else float("nan"),
        "mean_hd95": float(np.mean(hds)) if hds else float("nan"),
        "cases": len({r["case"] for r in rows}),
    }


def _fmt(v: float, digits: int) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def metrics_table(summary: dict) -> str:
    """The summary of :func:`summarize_metrics` as an aligned text table (one row per class, then
    the mean over foreground classes)."""
    head = ("class", "Dice", "HD95 (mm)", "cases")
    body = [(f"{c['class']} {c['name']}", _fmt(c["dice"], 4), _fmt(c["hd95"], 2) + (f" ({c['hd95_inf']} inf)" if c["hd95_inf"] else ""), str(c["n"])) for c in summary["classes"]]
    foot = ("mean (foreground)", _fmt(summary["mean_dice"], 4), _fmt(summary["mean_hd95"], 2), str(summary["cases"]))
    widths = [max(len(r[i]) for r in [head, foot, *body]) for i in range(4)]

    def line(r):
        return "  ".join([r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])])

    rule = "-" * len(line(head))
    return "\n".join([line(head), rule, *map(line, body), rule, line(foot)])


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.6g}")
    return v


def write_metrics(rows: list[dict], summary: dict, output: str) -> dict[str, str]:
    """Write ``metrics.csv`` (per case and class), ``summary.csv`` and ``summary.json``; returns their paths."""
    paths = {k: os.path.join(output, f) for k, f in (("metrics", "metrics.csv"), ("summary_csv", "summary.csv"), ("summary_json", "summary.json"))}
    cols = ["case", "class", "name", "dice", "hd95", "gt_voxels", "pred_voxels"]
    with open(paths["metrics"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([_csv_value(r[c]) for c in cols])
    scols = ["class", "name", "dice", "dice_std", "hd95", "n", "hd95_inf"]
    with open(paths["summary_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(scols)
        for c in summary["classes"]:
            w.writerow([_csv_value(c[k]) for k in scols])
        w.writerow(["", "mean (foreground)", _csv_value(summary["mean_dice"]), "", _csv_value(summary["mean_hd95"]), summary["cases"], ""])

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None  # strict JSON has no NaN / inf
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    engine.write_json(clean(summary), paths["summary_json"])
    return paths


# --------------------------------------------------------------------------------------------------
# post-processing


def keep_largest_component(seg: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """``seg`` with only the largest connected component (26-connectivity) of each class in ``classes``
    kept; the removed voxels become background. MONAI's ``KeepLargestConnectedComponent`` with
    ``independent=True``: each class is treated on its own, so decisions per class compose.

    Raises:
        InferenceError: scikit-image (which MONAI uses for the labelling) is not installed.
    """
    classes = [int(c) for c in classes]
    if not classes:
        return seg
    from monai.transforms import KeepLargestConnectedComponent
    from monai.utils import optional_import

    if not optional_import("skimage.measure")[1]:
        raise InferenceError("--postprocess needs scikit-image (MONAI labels components with it): pip install -r requirements-deploy.txt")
    keep = KeepLargestConnectedComponent(applied_labels=classes, is_onehot=False, independent=True)
    out = keep(torch.as_tensor(np.ascontiguousarray(seg))[None])[0]
    return np.asarray(out).astype(seg.dtype, copy=False)


def _class_dice(pred: np.ndarray, label: np.ndarray, classes: Sequence[int]) -> list[float]:
    """Dice per class in ``classes`` (NaN where the label lacks the class)."""
    out = []
    for c in classes:
        p, y = pred == c, label == c
        n_y = int(y.sum())
        out.append(float("nan") if n_y == 0 else 2.0 * float(np.logical_and(p, y).sum()) / (int(p.sum()) + n_y))
    return out


def decide_postprocessing(before: dict[int, list[float]], after: dict[int, list[float]], class_names: Sequence[str]) -> dict:
    """Per class: keep the largest component only where that raises the mean Dice over the cases in
    which the class is present (nnU-Net's rule); classes never present stay unprocessed.

    Args:
        before, after: ``{class: [Dice per case]}`` without and with the largest-component filter.
        class_names: all names, background first.

    Returns:
        ``{"largest_component": [classes], "classes": [{"class", "name", "dice_before", "dice_after", "cases", "apply"}]}``.
    """
    rows, chosen = [], []
    for c in sorted(before):
        b = np.array(before[c], float)
        a = np.array(after[c], float)
        ok = ~np.isnan(b)
        mb = float(b[ok].mean()) if ok.any() else float("nan")
        ma = float(a[ok].mean()) if ok.any() else float("nan")
        apply = bool(ok.any() and ma > mb)
        if apply:
            chosen.append(int(c))
        rows.append({"class": int(c), "name": class_names[c], "dice_before": mb, "dice_after": ma, "cases": int(ok.sum()), "apply": apply})
    return {"largest_component": chosen, "classes": rows}


def _decision_path(checkpoints: Sequence[str]) -> str:
    """Where an ensemble's (or one checkpoint's) post-processing decision is stored: their common folder."""
    folders = [os.path.dirname(os.path.abspath(p)) for p in checkpoints]
    return os.path.join(os.path.commonpath(folders), POSTPROCESS_FILE)


def _load_decision(checkpoints: Sequence[str], num_classes: int) -> dict | None:
    import json

    path = _decision_path(checkpoints)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        d = json.load(f)
    stored = sorted(os.path.abspath(p) for p in d.get("checkpoints", []))
    if stored and stored != sorted(os.path.abspath(p) for p in checkpoints):
        logger.warning("%s was decided for other checkpoints (%s): not used", path, ", ".join(stored))
        return None
    classes = [int(c) for c in d.get("largest_component", [])]
    if any(not 0 < c < num_classes for c in classes):
        raise InferenceError(f"{path}: classes {classes} do not fit a {num_classes}-class model; delete the file to decide again")
    return {**d, "largest_component": classes, "path": path}


# --------------------------------------------------------------------------------------------------
# the Python entry point


def describe_precision(device: torch.device, amp_dtype: torch.dtype | None, export: bool = False) -> str:
    """Where and in what precision the windows run, for the start line: ``"cpu, 2 threads, bf16 autocast
    (native on this CPU; --amp off for float32)"``, ``"cuda:0, bf16 autocast"`` and the like."""
    if export:
        return f"the exported model (ONNX Runtime or TorchScript), float32, {torch.get_num_threads()} threads"
    if amp_dtype is None:
        precision = "float32"
    else:
        precision = f"{str(amp_dtype).replace('torch.', '').replace('bfloat16', 'bf16').replace('float16', 'fp16')} autocast"
        if device.type == "cpu":
            precision += " (native on this CPU; --amp off for float32)" if engine.cpu_has_native_bf16() else " (emulated on this CPU: slower than --amp off)"
    where = f"{device}" + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")
    return f"{where}, {precision}"


class Predictor:
    """Predict label maps in each volume's native space: load once, predict many volumes.

    Loads one checkpoint, several (an ensemble: softmax probabilities averaged; they must agree on
    classes, channels and pre-processing), a run folder of fold sub-folders, or the JSON sidecar of an
    ``export_model.py`` export (ONNX Runtime when installed, else the TorchScript file). The
    pre-processing (spacing, orientation, intensity, foreground crop) comes from the checkpoint or the
    sidecar; the result is inverted to the input's grid.

    Args:
        weights: checkpoint path(s), a run folder, or an export's ``model.json``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or a ``torch.device``.
        sw_batch_size: windows per forward pass; None: 4 on a GPU, 1 on the CPU.
        overlap: sliding-window overlap in [0, 1).
        mode: window blending, ``"gaussian"`` or ``"constant"``.
        tta: average over the 8 mirrorings of the spatial axes.
        amp: ``"auto"`` (bf16/fp16 on CUDA; on the CPU bf16 where the CPU does bf16 natively, else off),
            ``"bf16"``, ``"fp16"`` or ``"off"`` (float32 throughout).
        postprocess: ``"none"``, ``"largest_component"`` (every foreground class), ``"auto"`` (the
            decision stored beside the checkpoint by ``test_seg.py --postprocess auto``), or a list of
            classes to keep the largest component of.
        threads: CPU threads (``torch.set_num_threads``, and ONNX Runtime's for an export); None: the default.
        dwconv: depthwise convolution implementation for checkpoints (``"auto"``, ``"native"``, ``"fft"``).
        resample_probabilities: labels from the linearly resampled probabilities instead of nearest-neighbour
            resampled labels.
        compile: run the windows through ``torch.compile`` (checkpoints only).
        stitch_on_cpu: keep the stitched volume in RAM when the windows run on a GPU.
        flags: command-line flag values (``test_seg.py`` passes ``vars(args)``): pre-processing and
            network settings for checkpoints that carry none.

    Example::

        predictor = Predictor(["fold_0/best_metric_model.pth", "fold_1/best_metric_model.pth"], threads=2)
        labels = predictor.predict("case_0001.nii.gz")                       # (X, Y, Z) uint8
        labels, probs = predictor.predict(array, affine=affine, return_probabilities=True)  # probs (C, X, Y, Z)
        print(predictor.class_names)
    """

    def __init__(
        self,
        weights: str | Sequence[str],
        *,
        device: str | torch.device = "cpu",
        sw_batch_size: int | None = None,
        overlap: float = 0.5,
        mode: str = "gaussian",
        tta: bool = False,
        amp: str = "auto",
        postprocess: str | Sequence[int] = "none",
        threads: int | None = None,
        dwconv: str = "auto",
        resample_probabilities: bool = False,
        compile: bool = False,
        stitch_on_cpu: bool = False,
        flags: dict | None = None,
    ) -> None:
        if threads is not None:
            if threads < 1:
                raise InferenceError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.amp_dtype = engine.resolve_amp(amp, self.device, inference=True)
        if sw_batch_size is None:
            sw_batch_size = 4 if self.device.type == "cuda" else 1
        self.sw_batch_size, self.overlap, self.mode, self.tta = int(sw_batch_size), float(overlap), mode, bool(tta)
        self.resample_probabilities = bool(resample_probabilities)
        self.stitch_on_cpu = bool(stitch_on_cpu)
        flags = dict(flags or {})
        flags.setdefault("dwconv", dwconv)
        weights = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
        self.export: dict | None = None
        if len(weights) == 1 and str(weights[0]).endswith(".json"):
            import export_model

            self.export, runner = export_model.load_export(str(weights[0]), device=self.device, threads=threads)
            self.checkpoints = [str(weights[0])]
            self.cfg = DatasetConfig(**self.export["dataset"])
            self.out_channels = int(self.export["network"]["out_channels"])
            self.models: list = [runner]
            self.rois = [tuple(self.cfg.roi)]
            self.names = [self.export["network"]["name"]]
        else:
            self.checkpoints = expand_weights(weights)
            members = [resolve_checkpoint(p, flags) for p in self.checkpoints]
            self.cfg = check_ensemble(members)
            self.out_channels = members[0]["out_channels"]
            self.models = []
            for m in members:
                model = load_model(m, self.device, m["path"])
                self.models.append(engine.compile_for_windows(model, self.sw_batch_size) if compile else model)
            self.rois = [tuple(m["cfg"].roi) for m in members]
            self.names = [m["network"] for m in members]
            self.members = members
        self.post_classes = self._post_classes(postprocess)

    # ----------------------------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """Class names, background first."""
        return list(self.cfg.class_names)

    def _post_classes(self, postprocess: str | Sequence[int]) -> list[int]:
        if not isinstance(postprocess, str):
            return [int(c) for c in postprocess]
        if postprocess not in POSTPROCESS_CHOICES:
            raise InferenceError(f"--postprocess must be one of {', '.join(POSTPROCESS_CHOICES)}, got {postprocess!r}")
        if postprocess == "none":
            return []
        if postprocess == "largest_component":
            return list(range(1, self.out_channels))
        if self.export is not None:  # an export carries the decision made for its checkpoint
            return [int(c) for c in (self.export.get("postprocessing") or {}).get("largest_component", [])]
        decision = _load_decision(self.checkpoints, self.out_channels)
        if decision is None:
            raise InferenceError(
                f"--postprocess auto: no decision stored in {_decision_path(self.checkpoints)} yet; run test_seg.py --postprocess auto "
                "once on labelled validation cases (e.g. --split val, or --labels FOLDER) to make it"
            )
        return decision["largest_component"]

    def loader(self, cases: list[dict], num_workers: int = 0, keep_label: bool = False):
        """The inference loader over ``cases`` and its pre-processing chain (to invert with)."""
        return get_test_loader(self.cfg, cases, num_workers=num_workers, keep_label=keep_label)

    def probabilities(self, image: torch.Tensor, name: str = "the volume") -> torch.Tensor:
        """Ensemble-mean softmax probabilities (1, C, ...) of one pre-processed volume (on the stitching device)."""
        tries = [self.stitch_on_cpu] if self.stitch_on_cpu or self.device.type != "cuda" else [False, True]
        oom = None
        for cpu_stitch in tries:
            try:
                return ensemble_probabilities(
                    self.models, image, self.rois, self.device, sw_batch_size=self.sw_batch_size, overlap=self.overlap,
                    mode=self.mode, amp_dtype=self.amp_dtype, tta=self.tta, stitch_on_cpu=cpu_stitch,
                )  # fmt: skip
            except Exception as err:  # noqa: BLE001 - only out-of-memory is handled here
                if engine.is_oom(err):
                    oom = "cuda"
                elif _is_cpu_oom(err):
                    oom = "cpu"
                else:
                    raise
            # outside the except block, so that the failed attempt's tensors are freed first
            if oom == "cuda" and not cpu_stitch and torch.cuda.is_available():
                torch.cuda.empty_cache()
                logger.warning("out of GPU memory stitching %s on the GPU: retrying with the output in RAM (pass --stitch_on_cpu to start that way)", name)
        raise InferenceError(_oom_message(name, self.sw_batch_size, oom != "cpu"))

    def predict_item(self, item: dict, test_transforms: Any, keep_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The one path from a pre-processed case to its native-space result.

        Args:
            item: one decollated loader item (``"image"`` a MetaTensor that remembers its transforms).
            test_transforms: the loader's chain (:meth:`loader`), replayed backwards by ``Invertd``.
            keep_probabilities: also return the native-space probabilities.

        Returns:
            ``(labels (X, Y, Z) of the input's spatial shape, post-processed; probabilities (C, X, Y, Z)
            float32 or None)``.
        """
        from monai.transforms import Invertd

        source = str(item["image"].meta.get("filename_or_obj", "the volume"))
        probs = self.probabilities(item["image"][None], source)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        native = None
        if self.resample_probabilities or keep_probabilities:
            invert = Invertd(keys="prob", transform=test_transforms, orig_keys="image", nearest_interp=False, to_tensor=True)
            seg_p, native = native_probabilities(probs, item, invert, keep=keep_probabilities)
        if self.resample_probabilities:
            seg = seg_p
        else:
            invert = Invertd(keys="pred", transform=test_transforms, orig_keys="image", nearest_interp=True, to_tensor=True)
            pred = probs.argmax(dim=1, keepdim=True)[0].to("cpu", torch.float32)
            seg = np.asarray(torch.as_tensor(invert({"image": item["image"], "pred": pred})["pred"]).numpy())[0]
        dtype = np.uint8 if self.out_channels <= 256 else np.uint16
        seg = keep_largest_component(np.rint(seg).astype(dtype), self.post_classes)
        return seg, native

    def predict(self, image: str | np.ndarray, affine: np.ndarray | None = None, *, return_probabilities: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predict one volume; the label map comes back on the input's own grid.

        Args:
            image: a NIfTI path, or an (X, Y, Z) array (channels last, (X, Y, Z, C), for several input
                channels) in the orientation its ``affine`` describes.
            affine: the array's 4x4 voxel-to-world (RAS mm) matrix, as nibabel gives it; required with an array.
            return_probabilities: also return the class probabilities (C, X, Y, Z) on the same grid.

        Returns:
            labels (X, Y, Z) (uint8 up to 256 classes), and the probabilities when asked.
        """
        from monai.data import decollate_batch

        with tempfile.TemporaryDirectory() as tmp:
            if not isinstance(image, (str, os.PathLike)):
                if affine is None:
                    raise InferenceError("Predictor.predict: an array needs its 4x4 affine (nibabel's img.affine)")
                import nibabel as nib

                path = os.path.join(tmp, "volume.nii")  # uncompressed: written and read back fast
                nib.save(nib.Nifti1Image(np.asarray(image, dtype=np.float32), np.asarray(affine, dtype=float)), path)
                image = path
            loader, test_tf = self.loader([{"image": os.fspath(image)}])
            item = decollate_batch(next(iter(loader)))[0]
            seg, probs = self.predict_item(item, test_tf, keep_probabilities=return_probabilities)
        return (seg, probs) if return_probabilities else seg


# --------------------------------------------------------------------------------------------------
# the run


def _batches(loader: Any) -> Iterator[dict]:
    """The loader's batches; a reader error inside the loader becomes a DataError with its message."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001 - a reader error inside the loader
            text = str(err).strip().splitlines()
            raise DataError([f"a volume could not be loaded ({type(err).__name__}: {text[0] if text else ''}). Fix: re-export the file"]) from None
        yield batch


def _score(rows: list[dict], name: str, seg: np.ndarray, label: np.ndarray, label_path: str, cfg: DatasetConfig, hd95: bool) -> list[float]:
    m = case_metrics(seg, label.reshape(seg.shape), cfg.num_classes, _voxel_sizes(label_path), hd95=hd95)
    for c in range(1, cfg.num_classes):
        rows.append(
            {"case": name, "class": c, "name": cfg.class_names[c], "dice": m["dice"][c - 1], "hd95": m["hd95"][c - 1],
             "gt_voxels": m["gt_voxels"][c - 1], "pred_voxels": m["pred_voxels"][c - 1]}
        )  # fmt: skip
    return [d for d in m["dice"] if not math.isnan(d)]


def run_inference(args: argparse.Namespace) -> dict:
    """Predict every input of ``args`` and score the ones with labels.

    Returns:
        ``{"output", "predictions": [paths], "probabilities": [paths], "rows": metrics rows,
        "summary": summary or None, "table": str or None, "seconds": [per case],
        "timings": [{"case", "predict", "invert_and_save", "metrics"} seconds per case],
        "postprocessing": decision dict or None}``.

    Raises:
        InferenceError, DataError, networks.CheckpointError: problems the user can fix.
    """
    from monai.data import decollate_batch
    from tqdm import tqdm

    flags = vars(args)
    device = engine.select_device(args.gpu)
    # auto post-processing without a stored decision decides on this run's labelled cases
    deciding = False
    postprocess: str | list[int] = args.postprocess
    if args.postprocess == "auto":
        checkpoints = expand_weights(args.trained_weights)
        is_export = len(checkpoints) == 1 and checkpoints[0].endswith(".json")  # an export carries its decision
        stored = None if is_export else _load_decision(checkpoints, 10**6)
        if stored is None and not is_export:
            deciding, postprocess = True, "none"
        elif stored is not None:
            print(f"--postprocess auto: largest component kept for classes {stored['largest_component'] or 'none'} ({stored['path']}; delete it to decide again)")
    predictor = Predictor(
        args.trained_weights, device=device, sw_batch_size=args.sw_batch_size, overlap=args.overlap, mode=args.mode, tta=args.tta,
        amp=args.amp, postprocess=postprocess, threads=args.threads, dwconv=args.dwconv, resample_probabilities=args.resample_probabilities,
        compile=args.compile, stitch_on_cpu=bool(args.stitch_on_cpu or args.sw_device == "cpu"), flags=flags,
    )  # fmt: skip
    cfg = predictor.cfg
    cases = resolve_inputs(args, cfg)
    scored = any("label" in c for c in cases)
    if deciding and not scored:
        raise InferenceError(
            f"--postprocess auto: no decision stored in {_decision_path(predictor.checkpoints)} yet, and none of these inputs has a label "
            "to decide on: run once on labelled validation cases (e.g. --split val, or --labels FOLDER)"
        )
    os.makedirs(args.output, exist_ok=True)
    engine.write_json(
        {
            "args": {k: v for k, v in flags.items() if not k.startswith("_ignored_")},
            "checkpoints": predictor.checkpoints,
            "networks": predictor.names,
            "out_channels": predictor.out_channels,
            "dataset": cfg.to_dict(),
            "device": str(device),
            "amp": str(predictor.amp_dtype),
            "threads": torch.get_num_threads(),
            "postprocess": {"mode": args.postprocess, "largest_component": predictor.post_classes},
        },
        os.path.join(args.output, "inference_args.json"),
    )

    print(f"{len(cases)} case(s) on {describe_precision(device, predictor.amp_dtype, predictor.export is not None)}")
    workers = default_num_workers() if args.num_workers is None else args.num_workers
    loader, test_tf = predictor.loader(cases, num_workers=workers, keep_label=scored)
    result: dict[str, Any] = {"output": args.output, "predictions": [], "probabilities": [], "rows": [], "summary": None, "table": None,
                              "seconds": [], "timings": [], "postprocessing": None}  # fmt: skip
    fg = list(range(1, predictor.out_channels))
    before: dict[int, list[float]] = {c: [] for c in fg}
    after: dict[int, list[float]] = {c: [] for c in fg}
    labelled: list[tuple[str, str, str]] = []  # (case, prediction, label) scored after the decision
    bar = tqdm(total=len(cases), desc="predict", unit="vol", dynamic_ncols=True)
    try:
        for batch in _batches(loader):
            t0 = time.perf_counter()
            item = decollate_batch(batch)[0]
            # Every path of this case comes from its own metadata, not from its position in `cases`.
            image_path = str(item["image"].meta["filename_or_obj"])
            label_path = str(item["label"].meta["filename_or_obj"]) if "label" in item else None
            name = case_name(image_path, "image")
            native_shape = _native_shape(image_path)
            prob_path = os.path.join(args.output, f"{name}_prob.nii.gz") if args.save_probabilities else None
            seg, native = predictor.predict_item(item, test_tf, keep_probabilities=prob_path is not None)
            t_pred = time.perf_counter()
            if prob_path:
                save_like(np.moveaxis(native, 0, -1), image_path, prob_path, _PROB_DTYPE, scaled=True)
                result["probabilities"].append(prob_path)
            del native
            if seg.shape != native_shape[:3]:
                raise RuntimeError(f"{image_path}: inverted prediction has shape {seg.shape}, the image {native_shape}")
            # In the input's own format (a DICOM series gets NIfTI) and exact geometry.
            out_path = image_io.output_path_like(image_path, args.output, "_seg", name=name)
            write_prediction(seg, image_path, out_path)
            _check_written(out_path, image_path)
            result["predictions"].append(out_path)
            t_post = time.perf_counter()
            if label_path is not None:
                label = np.asarray(torch.as_tensor(item["label"]).cpu().numpy()).reshape(seg.shape)
                if deciding:
                    before_c = _class_dice(seg, label, fg)
                    after_c = _class_dice(keep_largest_component(seg, fg), label, fg)
                    for c, b, a in zip(fg, before_c, after_c):
                        before[c].append(b)
                        after[c].append(a)
                    labelled.append((name, out_path, label_path))
                else:
                    dices = _score(result["rows"], name, seg, label, label_path, cfg, not args.no_hd95)
                    bar.set_postfix(dice=f"{np.mean(dices):.3f}" if dices else "n/a")
            t_end = time.perf_counter()
            result["seconds"].append(t_end - t0)
            result["timings"].append({"case": name, "predict": t_pred - t0, "invert_and_save": t_post - t_pred, "metrics": t_end - t_post})
            bar.update(1)
    finally:
        bar.close()

    if deciding:
        result["postprocessing"] = _apply_decision(result, predictor, before, after, labelled, args)
    if result["rows"]:
        summary = summarize_metrics(result["rows"], cfg.class_names)
        result["summary"] = summary
        result["table"] = metrics_table(summary)
        result.update(write_metrics(result["rows"], summary, args.output))
    return result


def _apply_decision(result: dict, predictor: Predictor, before: dict, after: dict, labelled: list, args: argparse.Namespace) -> dict:
    """Decide --postprocess auto from the per-class Dice gathered, store the decision, and apply it to
    every prediction written in this run (then score them)."""

    cfg = predictor.cfg
    decision = decide_postprocessing(before, after, cfg.class_names)
    decision.update({"checkpoints": [os.path.abspath(p) for p in predictor.checkpoints], "decided_on": [c for c, _, _ in labelled],
                     "rule": "largest connected component kept for a class where it raised the mean Dice over the labelled cases"})  # fmt: skip
    path = _decision_path(predictor.checkpoints)
    try:
        engine.write_json(decision, path)
    except OSError as err:
        logger.warning("could not store the post-processing decision beside the checkpoint (%s): it is in --output only", err)
        path = None
    engine.write_json(decision, os.path.join(args.output, POSTPROCESS_FILE))
    chosen = decision["largest_component"]
    print(f"--postprocess auto: largest component kept for classes {chosen or 'none'} (decided on {len(labelled)} case(s); stored in {path or args.output})")
    labels = {c: l for c, _, l in labelled}
    for out_path in result["predictions"]:
        name = case_name(out_path, "image")[: -len("_seg")]
        seg = np.asarray(image_io.read_array(out_path))
        spatial = seg.reshape(seg.shape[:3])
        if chosen:
            done = keep_largest_component(spatial, chosen)
            write_prediction(done.astype(seg.dtype), out_path, out_path)
            spatial = done
        if name in labels:
            label = np.asarray(image_io.read_array(labels[name])).reshape(spatial.shape)
            _score(result["rows"], name, spatial, label, labels[name], cfg, not args.no_hd95)
    return decision


def native_probabilities(probs: torch.Tensor, item: dict, invert: Any, keep: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities resampled (linearly) to the input's native grid, and their argmax.

    Foreground classes are inverted one at a time (``invert``: an ``Invertd`` on key ``"prob"``
    replaying the test chain of ``item["image"]``), so that without ``keep`` only a few native-size
    volumes are held at once. Background is 1 - sum(foreground): the inverse of the foreground crop
    pads with zeros, right for foreground classes and wrong (0) for background.

    Args:
        probs: (1, C, ...) probabilities on the pre-processed grid.
        item: the decollated batch item holding the transformed ``"image"``.
        invert: the ``Invertd`` transform.
        keep: also return all C native probability volumes.

    Returns:
        ``(labels (X, Y, Z) int64, probabilities (C, X, Y, Z) float32 or None)``.
    """
    fg_sum = best = best_idx = None
    kept = []
    for c in range(1, probs.shape[1]):
        d = {"image": item["image"], "prob": probs[0, c : c + 1].to("cpu", torch.float32)}
        p = torch.as_tensor(invert(d)["prob"])[0].clamp_(0, 1)
        if fg_sum is None:
            fg_sum, best, best_idx = p.clone(), p.clone(), torch.ones_like(p, dtype=torch.int64)
        else:
            fg_sum += p
            better = p > best
            best = torch.where(better, p, best)
            best_idx[better] = c
        if keep:
            kept.append(p)
    bg = (1.0 - fg_sum).clamp_(0, 1)
    labels = torch.where(bg >= best, torch.zeros_like(best_idx), best_idx).numpy()
    return labels, (torch.stack([bg] + kept).numpy() if keep else None)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for problems the user can fix)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_inference(args)
    except (InferenceError, DataError, networks.CheckpointError) as err:
        print(f"test_seg.py: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # flag values refused by the data pipeline or engine (messages name the flag)
        print(f"test_seg.py: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - out-of-memory outside the guarded window loop
        if engine.is_oom(err):
            print(f"test_seg.py: error: {_oom_message('the volume', args.sw_batch_size or 4, True)}", file=sys.stderr)
            return 2
        raise
    print(f"{len(result['predictions'])} segmentation(s) written to {args.output}")
    if result["table"]:
        print(f"\nDice / HD95 over {result['summary']['cases']} labelled case(s) (per case: {result['metrics']}):")
        print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

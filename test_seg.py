"""Sliding-window inference with a trained Rep3D (or baseline) checkpoint, in each volume's native space.

    python test_seg.py --root /path/to/amos_ct --output ./predictions/rep3d_amos_ct \\
        --trained_weights ./runs/rep3d_amos_ct/best_metric_model.pth --sw_batch_size 4 --overlap 0.5 --gpu 0

The network is built in deploy mode through the registry (:func:`networks.build_deploy_network`): a
training checkpoint is folded on load, folded, reference-layout and DDP (``module.``) checkpoints load
as they are. Network, its options, the class count and the dataset pre-processing come from the
checkpoint (``main_train.py`` stores them) unless flags say otherwise; flags that contradict it are
refused with a message.

Inputs (first match wins): ``--input`` (one NIfTI file or a folder of them), ``--datalist`` (its
``testing`` list), ``--root`` (``imagesTs``, else ``imagesVal``; ``--split`` picks another), and with
none of these the demo dataset's validation cases. Every input gets ``<output>/<case>_seg.nii.gz``
with exactly its shape, affine and header geometry; ``--save_probabilities`` adds
``<case>_prob.nii.gz``. Where labels exist (the split's ``labels*`` folder, the datalist, or
``--labels``), Dice and HD95 per case and class go to ``metrics.csv``, the per-class means to
``summary.csv`` / ``summary.json`` and the screen.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

import demo_data
import engine
import networks
from load_datasets_transforms import (
    DataError,
    DatasetConfig,
    add_dataset_args,
    case_name,
    config_from_args,
    default_num_workers,
    get_post_transforms,
    get_test_loader,
    list_cases,
    list_images,
    nifti_files,
)

logger = logging.getLogger("test_seg")

__all__ = [
    "InferenceError",
    "build_parser",
    "parse_args",
    "resolve_checkpoint",
    "resolve_inputs",
    "load_model",
    "predict_volume",
    "native_probabilities",
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
# Network options whose value changes the weights' layout or meaning; a flag contradicting the
# checkpoint's is refused. dwconv only chooses how the same convolution is computed.
_ARCH_KEYS = ("modulation", "kernel_size", "feature_size", "depths", "hidden_size")


class InferenceError(ValueError):
    """A problem the user can fix (the message names the flag or file); ``main`` exits with code 2."""


# --------------------------------------------------------------------------------------------------
# flags


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (also used by the tests)."""
    p = argparse.ArgumentParser(
        description="Rep3D inference: deploy-mode sliding window, predictions in native space, Dice/HD95 tables.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--trained_weights", required=True, help="checkpoint .pth (best_metric_model.pth of main_train.py, a folded or reference checkpoint, or a bare state dict)")
    p.add_argument("--output", default="./predictions", help="folder for <case>_seg.nii.gz, metrics.csv, summary.csv/json")
    p.add_argument("--input", default=None, help="a NIfTI file or a folder of them to predict (instead of --root's split)")
    p.add_argument("--labels", default=None, help="folder of ground-truth labels (matched by case name) to score the predictions against")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="split of --root / --datalist to predict: test = imagesTs (else imagesVal) or the datalist's 'testing' list")
    p.add_argument("--no_hd95", action="store_true", help="score Dice only: HD95 is the slow part of scoring (seconds per class on large volumes with ragged predictions)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average over mirroring of the 3 spatial axes (8 passes)")
    p.add_argument("--mode", choices=("gaussian", "constant"), default="gaussian", help="blending of overlapping windows")
    p.add_argument("--compile", action="store_true", help="run the windows through torch.compile (one static shape): on an H100 REP3D predicts a 256x256x160 volume in about 0.72 s instead of 0.91 s, after a one-off compilation of about 30 s: pays for itself after about 150 volumes in one run")
    p.add_argument("--save_probabilities", action="store_true", help="also write <case>_prob.nii.gz: per-class probabilities in native space, 4-D (X, Y, Z, classes), uint16 scaled to [0, 1]")
    p.add_argument(
        "--resample_probabilities",
        action="store_true",
        help="make the native-space labels from the class probabilities resampled (linearly) to the input grid, then argmax; "
        "smoother boundaries where the input grid is finer than --spacing. Default: argmax first, labels resampled by nearest neighbour (the paper's Invertd protocol)",
    )
    p.add_argument("--stitch_on_cpu", action="store_true", help="keep the stitched probability volume in RAM while the windows run on the GPU (for large volumes that do not fit in GPU memory)")
    p.add_argument("--sw_device", choices=("auto", "cpu"), default="auto", help="where the sliding-window output is stitched: 'cpu' is the same as --stitch_on_cpu (windows still run on --gpu)")
    # A bare --amp means "auto" (AMP on CUDA); add_runtime_args keeps this definition.
    p.add_argument("--amp", nargs="?", const="auto", default="auto", choices=engine.AMP_CHOICES, help="mixed precision: auto (bf16/fp16 on CUDA, off on the CPU), bf16, fp16, off")
    engine.add_runtime_args(p)
    engine.add_network_args(p)
    add_dataset_args(p)
    # None = take it from the checkpoint (add_network_args defaults to REP3D for training).
    p.set_defaults(network=None)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv[1:]`` when None)."""
    return build_parser().parse_args(argv)


# --------------------------------------------------------------------------------------------------
# checkpoint, dataset settings, model


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _config_from_meta(meta: dict, args: argparse.Namespace) -> DatasetConfig:
    """The checkpoint's dataset settings, with the pre-processing flags the user gave on top."""
    fields = {f.name for f in dataclasses.fields(DatasetConfig)}
    values = {k: v for k, v in meta.items() if k in fields}
    for key in ("spacing", "intensity", "a_min", "a_max", "roi"):
        v = getattr(args, key, None)
        if v is not None:
            values[key] = list(v) if isinstance(v, (list, tuple)) else v
    if getattr(args, "class_names", None):
        values["class_names"] = [c.strip() for c in args.class_names.split(",") if c.strip()]
    try:
        return DatasetConfig(**values)
    except (TypeError, ValueError) as err:
        raise InferenceError(f"the checkpoint's dataset settings are unusable ({err}); pass --dataset (and its flags) to set them") from None


def _uses_demo(args: argparse.Namespace) -> bool:
    return args.input is None and args.root is None and args.datalist is None


def resolve_checkpoint(args: argparse.Namespace) -> dict:
    """Read ``--trained_weights`` and settle network, its options, class count and dataset settings.

    Checkpoint metadata (``network``, ``network_kwargs``, ``in_channels``, ``out_channels``,
    ``dataset``) fills what the flags leave open; a flag that contradicts it raises.

    Returns:
        ``{"checkpoint": object, "network": name, "network_kwargs": dict, "in_channels": int,
        "out_channels": int, "cfg": DatasetConfig, "meta": bool}``.

    Raises:
        networks.CheckpointError: missing or unreadable file.
        InferenceError: flags contradicting the checkpoint, or settings missing from both.
    """
    path = args.trained_weights
    ckpt = networks.read_checkpoint(path)
    meta = ckpt if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict) and "network" in ckpt else {}
    problems = []

    # network
    ck_net = meta.get("network")
    if ck_net is not None:
        try:
            ck_net = networks.canonical_name(ck_net)
        except ValueError:
            raise InferenceError(f"{path}: trained as network {ck_net!r}, which this code does not know ({', '.join(networks.NETWORK_NAMES)})") from None
    name = args.network or ck_net or "REP3D"
    if args.network and ck_net and args.network != ck_net:
        problems.append(f"--network {args.network}, but {path} holds a {ck_net} model: drop --network (it is read from the checkpoint) or pass the {args.network} checkpoint")

    # network options: checkpoint's, then flags; deploy is decided by build_deploy_network.
    kwargs = {k: v for k, v in dict(meta.get("network_kwargs") or {}).items() if k not in ("deploy", "dwconv")}
    given = engine.network_overrides(name, vars(args))
    for key, value in given.items():
        if key in _ARCH_KEYS and key in kwargs and not _same(kwargs[key], value):
            flag = f"--{key} {' '.join(map(str, value)) if isinstance(value, list) else value}"
            problems.append(f"{flag} contradicts {path} (trained with {key}={kwargs[key]}): drop the flag")
    kwargs.update(given)

    # dataset settings and class count
    if args.dataset is not None or args.dataset_config is not None:
        cfg = config_from_args(args)
        ck_ds = meta.get("dataset") or {}
        diffs = [k for k in ("spacing", "intensity", "a_min", "a_max") if k in ck_ds and not _same(engine.jsonable(getattr(cfg, k)), ck_ds[k])]
        if diffs:
            logger.warning("--dataset %s pre-processes differently from the training run (%s): predictions may suffer", cfg.name, ", ".join(f"{k}: {getattr(cfg, k)} vs {ck_ds[k]}" for k in diffs))
    elif meta.get("dataset"):
        cfg = _config_from_meta(dict(meta["dataset"]), args)
    elif _uses_demo(args):
        cfg = config_from_args(args)  # the demo preset
    else:
        raise InferenceError(
            f"{path} carries no dataset settings (a bare state dict?): pass --dataset (one of amos, amos_mri, kits, "
            "pancreas, hepatic, demo) or --dataset custom with --spacing/--a_min/--a_max/--num_classes"
        )
    ck_classes = meta.get("out_channels")
    if args.num_classes is not None and ck_classes is not None and int(args.num_classes) != int(ck_classes):
        problems.append(
            f"--num_classes {args.num_classes}, but {path} was trained for {ck_classes} classes: drop --num_classes or pass a checkpoint trained for {args.num_classes}"
        )
    elif ck_classes is not None and cfg.num_classes != int(ck_classes):
        names = (meta.get("dataset") or {}).get("class_names")
        problems.append(
            f"--dataset {cfg.name} has {cfg.num_classes} classes, but {path} was trained for {ck_classes} classes"
            + (f" ({', '.join(map(str, names))})" if names else "")
            + ": drop --dataset to use the checkpoint's settings, or pass the matching checkpoint"
        )
    elif args.num_classes is not None and cfg.num_classes != int(args.num_classes):
        cfg = dataclasses.replace(cfg, num_classes=int(args.num_classes), class_names=["background"] + [f"class_{i}" for i in range(1, int(args.num_classes))])
    if args.roi is not None:
        cfg = dataclasses.replace(cfg, roi=tuple(int(r) for r in args.roi))
    # Networks built for one input size (UNETR, nnFormer, ...: img_size) need windows of that size.
    if kwargs.get("img_size") is not None:
        size = tuple(int(r) for r in kwargs["img_size"])
        if args.roi is not None and tuple(args.roi) != size:
            problems.append(f"--roi {' '.join(map(str, args.roi))}: {name} was built for inputs of {' x '.join(map(str, size))}: drop --roi")
        cfg = dataclasses.replace(cfg, roi=size)
    if problems:
        raise InferenceError("the flags do not fit the checkpoint:\n" + "\n".join(f"  - {p}" for p in problems))
    return {
        "checkpoint": ckpt,
        "network": name,
        "network_kwargs": kwargs,
        "in_channels": int(meta.get("in_channels", 1)),
        "out_channels": int(ck_classes) if ck_classes is not None else cfg.num_classes,
        "cfg": cfg,
        "meta": bool(meta),
    }


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


def resolve_inputs(args: argparse.Namespace) -> list[dict]:
    """The volumes to predict, ``[{"image": path, "label": optional path}]``.

    Raises:
        DataError: missing files or folders, or two inputs with the same case name.
    """
    if args.input is not None:
        cases = list_images(args.input)
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


def _oom_message(case: str, args: argparse.Namespace, cuda: bool) -> str:
    if cuda:
        return (
            f"CUDA ran out of memory predicting {case}. Fix: lower --sw_batch_size (now {args.sw_batch_size}), "
            "pass --stitch_on_cpu (same as --sw_device cpu) to keep the stitched volume in RAM, "
            "use --amp bf16 / fp16, or a smaller --roi"
        )
    return f"the CPU ran out of memory predicting {case}. Fix: lower --sw_batch_size (now {args.sw_batch_size}), close other programs, or run on a GPU (--gpu 0)"


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
    import nibabel as nib

    out, ref = nib.load(path), nib.load(reference)
    if tuple(out.shape[: len(ref.shape)]) != tuple(ref.shape)[: len(out.shape)] or not np.array_equal(out.affine, ref.affine):
        raise RuntimeError(f"{path}: written with shape {out.shape} / affine {out.affine.tolist()}, input has {ref.shape} / {ref.affine.tolist()}")


def _native_shape(reference: str) -> tuple[int, ...]:
    import nibabel as nib

    return tuple(int(s) for s in nib.load(reference).shape)


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
# the run


def run_inference(args: argparse.Namespace) -> dict:
    """Predict every input of ``args`` and score the ones with labels.

    Returns:
        ``{"output", "predictions": [paths], "probabilities": [paths], "rows": metrics rows,
        "summary": summary or None, "table": str or None, "seconds": [per case],
        "timings": [{"case", "predict", "invert_and_save", "metrics"} seconds per case]}``.

    Raises:
        InferenceError, DataError, networks.CheckpointError: problems the user can fix.
    """
    from monai.data import decollate_batch
    from monai.transforms import Invertd
    from tqdm import tqdm

    resolved = resolve_checkpoint(args)
    cfg: DatasetConfig = resolved["cfg"]
    cases = resolve_inputs(args)
    device = engine.select_device(args.gpu)
    amp_dtype = engine.resolve_amp(args.amp, device)
    stitch_on_cpu = bool(args.stitch_on_cpu or args.sw_device == "cpu")
    model = load_model(resolved, device, args.trained_weights)
    predictor = engine.compile_for_windows(model, args.sw_batch_size) if args.compile else model
    os.makedirs(args.output, exist_ok=True)
    engine.write_json(
        {
            "args": vars(args),
            "network": resolved["network"],
            "network_kwargs": resolved["network_kwargs"],
            "out_channels": resolved["out_channels"],
            "dataset": cfg.to_dict(),
            "device": str(device),
            "amp": str(amp_dtype),
        },
        os.path.join(args.output, "inference_args.json"),
    )

    scored = any("label" in c for c in cases)
    loader, test_tf = get_test_loader(
        cfg, cases, num_workers=default_num_workers() if args.num_workers is None else args.num_workers, keep_label=scored
    )
    post = get_post_transforms(test_tf, cfg, output_dir=None, argmax=False)
    invert_prob = Invertd(keys="prob", transform=test_tf, orig_keys="image", nearest_interp=False, to_tensor=True)

    result: dict[str, Any] = {"output": args.output, "predictions": [], "probabilities": [], "rows": [], "summary": None, "table": None, "seconds": [], "timings": []}
    names = cfg.class_names
    bar = tqdm(total=len(cases), desc="predict", unit="vol", dynamic_ncols=True)
    it = iter(loader)
    try:
        for i, case in enumerate(cases):
            try:
                batch = next(it)
            except StopIteration:
                break
            except Exception as err:  # noqa: BLE001 - a reader error inside the loader
                raise DataError([f"{case['image']}: could not be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Fix: re-export the file"]) from None
            t0 = time.perf_counter()
            name = case_name(case["image"], "image")
            probs, oom = None, None
            # On CUDA, an out-of-memory while stitching on the GPU is retried once with the output in RAM.
            for cpu_stitch in [stitch_on_cpu] if stitch_on_cpu or device.type != "cuda" else [False, True]:
                try:
                    probs = predict_volume(predictor, batch["image"], cfg.roi, device, args.sw_batch_size, args.overlap, args.mode, amp_dtype, args.tta, cpu_stitch)
                    break
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
            if probs is None:
                raise InferenceError(_oom_message(case["image"], args, oom != "cpu"))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_pred = time.perf_counter()
            item = decollate_batch(batch)[0]
            native_shape = _native_shape(case["image"])
            prob_path = os.path.join(args.output, f"{name}_prob.nii.gz") if args.save_probabilities else None
            if args.resample_probabilities or prob_path:
                seg_p, native = native_probabilities(probs, item, invert_prob, keep=prob_path is not None)
                if prob_path:
                    save_like(np.moveaxis(native, 0, -1), case["image"], prob_path, _PROB_DTYPE, scaled=True)
                    result["probabilities"].append(prob_path)
                del native
            if args.resample_probabilities:
                seg = seg_p
            else:
                item["pred"] = probs.argmax(dim=1, keepdim=True)[0].to("cpu", torch.float32)
                seg = np.asarray(torch.as_tensor(post(item)["pred"]).cpu().numpy()).astype(np.int64)[0]
            if seg.shape != native_shape[:3]:
                raise RuntimeError(f"{case['image']}: inverted prediction has shape {seg.shape}, the image {native_shape}")
            out_path = os.path.join(args.output, f"{name}_seg.nii.gz")
            dtype = np.uint8 if resolved["out_channels"] <= 256 else np.uint16
            save_like(seg.reshape(native_shape), case["image"], out_path, dtype)
            _check_written(out_path, case["image"])
            result["predictions"].append(out_path)
            del probs
            t_post = time.perf_counter()
            if "label" in case:
                label = np.asarray(torch.as_tensor(item["label"]).cpu().numpy())
                m = case_metrics(seg, label.reshape(seg.shape), cfg.num_classes, _voxel_sizes(case["label"]), hd95=not args.no_hd95)
                for c in range(1, cfg.num_classes):
                    result["rows"].append(
                        {"case": name, "class": c, "name": names[c], "dice": m["dice"][c - 1], "hd95": m["hd95"][c - 1],
                         "gt_voxels": m["gt_voxels"][c - 1], "pred_voxels": m["pred_voxels"][c - 1]}
                    )
                fg = [d for d in m["dice"] if not math.isnan(d)]
                bar.set_postfix(dice=f"{np.mean(fg):.3f}" if fg else "n/a")
            t_end = time.perf_counter()
            result["seconds"].append(t_end - t0)
            result["timings"].append({"case": name, "predict": t_pred - t0, "invert_and_save": t_post - t_pred, "metrics": t_end - t_post})
            bar.update(1)
    finally:
        bar.close()

    if result["rows"]:
        summary = summarize_metrics(result["rows"], names)
        result["summary"] = summary
        result["table"] = metrics_table(summary)
        result.update(write_metrics(result["rows"], summary, args.output))
    return result


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
            print(f"test_seg.py: error: {_oom_message('the volume', args, True)}", file=sys.stderr)
            return 2
        raise
    print(f"{len(result['predictions'])} segmentation(s) written to {args.output}")
    if result["table"]:
        print(f"\nDice / HD95 over {result['summary']['cases']} labelled case(s) (per case: {result['metrics']}):")
        print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

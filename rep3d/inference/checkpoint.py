"""From a checkpoint (or a run folder, or several for an ensemble) to a model: resolution, checks
against the flags, loading with ``weights_only=True``."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

import networks
from rep3d.checkpoints import build_model, read_run
from rep3d.cli import network_overrides
from rep3d.config import SlidingWindowConfig
from rep3d.data.dataset_config import DatasetConfig
from rep3d.planning import resolve_dataset_config

logger = logging.getLogger(__name__)


CHECKPOINT_NAME = "best_metric_model.pth"


class InferenceError(ValueError):
    """A problem the user can fix (the message names the flag or file); ``main`` exits with code 2."""


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
    ckpt, run = read_run(path)
    problems = []

    ck_net = run.network.name if run else None
    name = flags.get("network") or ck_net or "REP3D"
    if flags.get("network") and ck_net and networks.canonical_name(flags["network"]) != ck_net:
        problems.append(f"--network {flags['network']}, but {path} holds a {ck_net} model: drop --network (it is read from the checkpoint) or pass the {flags['network']} checkpoint")

    # network options: checkpoint's, then flags; deploy is decided by build_deploy_network.
    kwargs = dict(run.network.architecture) if run else {}
    given = network_overrides(name, flags)
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
        "sliding_window": dataclasses.asdict(run.sliding_window) if run else dataclasses.asdict(SlidingWindowConfig()),
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
        model = build_model(resolved["network"], resolved["in_channels"], resolved["out_channels"], resolved["network_kwargs"], resolved["checkpoint"], deploy=True)
    except networks.CheckpointError as err:
        raise InferenceError(f"{path} does not load into {resolved['network']} with {resolved['out_channels']} classes: {err}") from None
    return model.to(device).eval()

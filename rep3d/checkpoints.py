"""Checkpoint -> model, the one path: read a checkpoint (``weights_only=True``), its run configuration, and
build the network it holds, in training or deploy form; or load what fits into an existing model.

    ckpt, run = read_run("runs/demo/best_metric_model.pth")
    model = build_from_run(run, ckpt, deploy=True)          # what test_seg.py predicts with
    report = load_fitting_weights(model, "other_run.pth")   # --pretrained_weights

Inference (:mod:`rep3d.inference.checkpoint`, which adds the flags), the trainer (resume and
``--pretrained_weights``) and the ERF study all go through here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

import networks
from rep3d.config import RunConfig

__all__ = ["FitReport", "build_from_run", "build_model", "load_fitting_weights", "read_run"]


def read_run(path: str | os.PathLike) -> tuple[Any, RunConfig | None]:
    """The checkpoint at ``path`` and its run configuration (None for a bare state dict or a reference
    release's file).

    Raises:
        networks.CheckpointError: missing, unreadable or too new a file (the message names it).
    """
    path = os.fspath(path)
    ckpt = networks.read_checkpoint(path)
    return ckpt, RunConfig.from_checkpoint(ckpt, path)


def build_model(name: str, in_channels: int, out_channels: int, options: Mapping[str, Any], checkpoint: Any = None, deploy: bool = False) -> nn.Module:
    """Network ``name`` with ``options``, its weights from ``checkpoint`` when given.

    ``deploy`` builds the folded inference form (:func:`networks.build_deploy_network`, which folds
    training-form weights or loads folded ones); otherwise the training form, into which
    :func:`networks.load_network_weights` fits folded or unfolded weights.

    Raises:
        networks.CheckpointError: the weights do not fit (other network, options or class count).
    """
    if deploy:
        return networks.build_deploy_network(name, in_channels, out_channels, checkpoint=checkpoint, **dict(options))
    model = networks.build_network(name, in_channels, out_channels, **dict(options))
    if checkpoint is not None:
        networks.load_network_weights(model, checkpoint)
    return model


def build_from_run(run: RunConfig, checkpoint: Any, deploy: bool = False, **options: Any) -> nn.Module:
    """The network a run configuration describes (its architecture, ``options`` on top), with the
    checkpoint's weights: see :func:`build_model`."""
    net = run.network
    return build_model(net.name, int(net.in_channels), int(net.out_channels), {**dict(net.architecture), **options}, checkpoint, deploy)


@dataclass
class FitReport:
    """What :func:`load_fitting_weights` did: tensors loaded, re-initialised (shape differs) and ignored."""

    loaded: list[str] = field(default_factory=list)
    total: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def describe(self, path: str) -> str:
        msg = f"weights loaded from {path}: {len(self.loaded)} of {self.total} tensors (weights only: a new run from step 0)"
        if self.skipped:
            msg += "; re-initialised (shapes differ, e.g. another class count): " + ", ".join(f"{k} ({why})" for k, why in sorted(self.skipped.items()))
        if self.ignored:
            msg += f"; {len(self.ignored)} checkpoint tensors the model does not have were ignored (e.g. {self.ignored[:3]})"
        return msg


def load_fitting_weights(model: nn.Module, checkpoint: Any) -> FitReport:
    """Load every tensor of ``checkpoint`` (a path or a loaded checkpoint, ours or a reference release's)
    whose name and shape fit ``model``; the others keep their values and are reported.

    Raises:
        networks.CheckpointError: unreadable file, or no tensor fits at all.
    """
    ckpt = networks.read_checkpoint(os.fspath(checkpoint)) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    state = networks.checkpoint_state_dict(ckpt)
    own = networks.unwrap_model(model).state_dict()
    skipped = {k: f"shape {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)}
    kept = {k: v for k, v in state.items() if k not in skipped}
    networks.load_network_weights(model, kept, strict=False)
    loaded = [k for k in kept if k in own]
    ignored = [] if networks.is_reference_layout(state) else [k for k in state if k not in own]
    return FitReport(loaded=loaded, total=len(own), skipped=skipped, ignored=ignored)

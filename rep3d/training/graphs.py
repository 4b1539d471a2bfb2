"""The training network's forward and backward replayed as CUDA graphs (``main_train.py --cuda_graph``).

A training step of REP3D issues about 1,150 GPU kernels; with the Triton norms the GPU finishes them faster
than the host issues them (H200: 46 ms of kernels against 51 ms a step, benchmarks/RESULTS.md, issue 25).
``torch.cuda.make_graphed_callables`` records the network's forward and backward once, for the first
batch's shape (three warm-up passes and the recording: about 0.3 s for REP3D on the H200, so it pays back
within the first ten steps), and replays them each step: the host issues one graph launch instead of every kernel
(46.2 ms a step). The loss, the optimizer, gradient clipping and AMP's scaler stay outside the graph, as
does validation (evaluation mode runs the network itself). Same kernels, same numbers; the only side
effect is that the warm-up passes show the first batch to the encoder's batch-norm running statistics
three more times (momentum 0.1: gone within a few dozen steps).

``"auto"`` (the default) records the graph where it can work: CUDA, one process (DDP's gradient hooks are
not recorded), no ``--compile``; a batch of another shape runs the network eagerly; a recording that fails
gives a warning and eager steps. ``"on"`` insists (an error names the blocker), ``"off"`` never records.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from rep3d.config import CUDA_GRAPH_SETTINGS
from rep3d.runtime import autocast

__all__ = ["StepGraph", "graph_blockers"]


def graph_blockers(device: torch.device, distributed: bool, compiled: bool) -> list[str]:
    """Why the training step cannot be recorded as a CUDA graph here (empty: it can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"the run is on {device.type}, CUDA graphs need a GPU")
    if distributed:
        reasons.append("DDP's gradient all-reduce is not recorded in a graph (several processes)")
    if compiled:
        reasons.append("--compile already runs the step through torch.compile")
    return reasons


class _Forward(nn.Module):
    """A holder whose forward calls ``net``: recorded in its place, so that ``net`` itself keeps its eager
    forward (other batch shapes, validation)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        return self.net(x)


class StepGraph:
    """The network to run a training step with: the recorded graph for the recorded batch shape, else the
    network itself.

    Args:
        setting: ``"auto"``, ``"on"`` or ``"off"`` (see the module docstring).
        blockers: :func:`graph_blockers` of the run; with ``"on"`` a non-empty list is an error.
    """

    def __init__(self, setting: str, blockers: list[str]) -> None:
        if setting not in CUDA_GRAPH_SETTINGS:
            raise ValueError(f"--cuda_graph must be one of {', '.join(CUDA_GRAPH_SETTINGS)}, got {setting!r}")
        if setting == "on" and blockers:
            raise RuntimeError(f"--cuda_graph on cannot work here: {'; '.join(blockers)}. Use --cuda_graph auto or off")
        self.setting = setting
        self.enabled = setting == "on" or (setting == "auto" and not blockers)
        self.reason = "" if self.enabled else ("--cuda_graph off" if setting == "off" else "; ".join(blockers))
        self._graphed: nn.Module | None = None
        self._key: tuple | None = None

    def describe(self) -> str:
        if not self.enabled:
            return f"CUDA graph of the step off ({self.reason})"
        if self._key is None:
            return "CUDA graph of the step: recorded at the first step"
        return f"CUDA graph of the step for batches of {list(self._key[0])}"

    def model(self, net: nn.Module, image: torch.Tensor, amp_dtype: torch.dtype | None):
        """The callable for this step's forward (``net`` in training mode)."""
        if not self.enabled:
            return net
        key = (tuple(image.shape), image.dtype, image.device)
        if self._graphed is None:
            try:
                self._graphed = self._record(net, image, amp_dtype)
                self._key = key
            except Exception as err:  # noqa: BLE001 - any failure to record: eager steps (or the error, with "on")
                if self.setting == "on":
                    raise RuntimeError(f"--cuda_graph on: recording the training step failed ({type(err).__name__}: {err}); use --cuda_graph off") from err
                warnings.warn(f"the training step could not be recorded as a CUDA graph ({type(err).__name__}: {err}); running it eagerly", RuntimeWarning, stacklevel=2)
                self.enabled, self.reason = False, f"recording failed: {type(err).__name__}"
                return net
        return self._graphed if key == self._key else net

    @staticmethod
    def _record(net: nn.Module, image: torch.Tensor, amp_dtype: torch.dtype | None) -> nn.Module:
        holder = _Forward(net).train(net.training)
        sample = image.detach().clone()
        # autocast's weight-cast cache must be off while recording (the casts become part of the graph)
        with autocast(image.device, amp_dtype, cache_enabled=False):
            return torch.cuda.make_graphed_callables(holder, (sample,), num_warmup_iters=3)

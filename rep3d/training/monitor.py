"""What a run reports about itself: the loop timer (step vs loader time) and the training curve."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from rep3d.fileio import pyplot, save_figure_atomic


def plot_curves(history: dict, class_names: list[str] | tuple[str, ...], path: str, loss_name: str = "loss") -> None:
    """Training curve PNG: loss (raw and smoothed), validation Dice (mean and per class), LR.

    The legends sit outside the axes, so that the points of short runs stay visible.
    """
    plt = pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
    steps = np.arange(1, len(history["loss"]) + 1)
    loss = np.asarray(history["loss"], dtype=float)
    ax = axes[0]
    if len(loss):
        ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label="loss")
        w = max(1, len(loss) // 50)
        if w > 1 and np.isfinite(loss).any():
            smooth = np.convolve(np.nan_to_num(loss, nan=np.nanmean(loss)), np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1 :], smooth, color="tab:blue", lw=1.5, label=f"loss (mean of {w})")
    ax.set_ylabel(f"{loss_name} loss")
    ax.grid(alpha=0.3)
    ax = axes[1]
    vsteps = history["val_step"]
    if vsteps:
        per_class = np.asarray(history["val_per_class"], dtype=float)
        for i, name in enumerate(class_names[1:]):
            ax.plot(vsteps, per_class[:, i], lw=1, alpha=0.7, marker=".", label=name)
        ax.plot(vsteps, history["val_dice"], color="black", lw=2, marker="o", label="mean (foreground)")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax = axes[2]
    ax.plot(steps, history["lr"], color="tab:orange")
    ax.set_ylabel("learning rate")
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    for ax in axes[:2]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=90)
    plt.close(fig)


class LoopTimer:
    """Time per iteration of the whole loop and of the training step alone, paired per iteration.

    The step (forward, loss, backward, optimizer) is timed with CUDA events on a GPU, read back
    lazily once the GPU has finished them (no extra synchronisation), and with the wall clock on the
    CPU. The loop time of an iteration is the wall time between the ends of two consecutive
    iterations. Iterations that include a validation (and the one after it), and the first ``warmup``
    ones of the session, are left out of both. ``outside_step_fraction`` is the share of the loop the
    device spent outside the step: waiting for data, augmenting on the same GPU, logging.
    """

    def __init__(self, device: torch.device, warmup: int = 20) -> None:
        self.cuda = device.type == "cuda"
        self.warmup = warmup
        self.loop_s: list[float] = []
        self._steps: list[Any] = []  # seconds, or (start, end) CUDA events not read yet
        self._current: Any = None
        self._t_last: float | None = None
        self._t0 = 0.0
        self._seen = 0

    def start_step(self) -> None:
        if self.cuda:
            self._current = torch.cuda.Event(enable_timing=True)
            self._current.record()
        else:
            self._t0 = time.perf_counter()

    def end_step(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._current = (self._current, end)
        else:
            self._current = time.perf_counter() - self._t0

    def end_iteration(self, count: bool = True) -> None:
        """Mark the end of an iteration; ``count=False`` for one that included a validation."""
        now = time.perf_counter()
        self._seen += 1
        if count and self._t_last is not None and self._seen > self.warmup and self._current is not None:
            self.loop_s.append(now - self._t_last)
            self._steps.append(self._current)
            if self.cuda and len(self._steps) % 64 == 0:  # read back the finished ones now and then
                self._steps[-64:] = [s[0].elapsed_time(s[1]) / 1000.0 if isinstance(s, tuple) and s[1].query() else s for s in self._steps[-64:]]
        self._current = None
        self._t_last = now if count else None

    def step_seconds(self) -> list[float]:
        """The step time of each counted iteration (waits for the GPU to finish the last ones)."""
        out = []
        for s in self._steps:
            if isinstance(s, tuple):
                s[1].synchronize()
                s = s[0].elapsed_time(s[1]) / 1000.0
            out.append(s)
        self._steps = list(out)
        return out

    def summary(self) -> dict:
        """Loop and step time per iteration (mean and median, ms) and the share outside the step."""
        step, loop = self.step_seconds(), self.loop_s
        n = len(loop)
        if n == 0:
            return {"timed_iterations": 0}
        return {
            "timed_iterations": n,
            "loop_ms_per_iter": round(1000 * sum(loop) / n, 2),
            "step_ms_per_iter": round(1000 * sum(step) / n, 2),
            "loop_ms_median": round(1000 * statistics.median(loop), 2),
            "step_ms_median": round(1000 * statistics.median(step), 2),
            "outside_step_fraction": round(max(0.0, 1.0 - sum(step) / max(sum(loop), 1e-12)), 3),
            "step_timer": "cuda events" if self.cuda else "wall clock",
        }

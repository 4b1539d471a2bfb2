"""Segmentation metrics in one place: Dice (per case, accumulated over a validation set and reduced
over DDP ranks), HD95, per-class summaries, tables and the metrics CSV files."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric

from rep3d.fileio import write_csv, write_json


def _as_label_map(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, 1, ...) class indices from probabilities/logits (N, C, ...) or a class map (N, 1, ...) / (N, ...)."""
    x = torch.as_tensor(x)
    if x.ndim >= 2 and x.shape[1] == num_classes and num_classes > 1 and x.is_floating_point() and x.ndim >= 4:
        return x.argmax(dim=1, keepdim=True)
    if x.ndim >= 2 and x.shape[1] == 1:
        return x.long() if x.is_floating_point() else x
    return x.unsqueeze(1).long() if x.is_floating_point() else x.unsqueeze(1)


def dice_scores(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-case, per-foreground-class Dice by ``monai.metrics.DiceMetric(include_background=False,
    reduction="none")``.

    Args:
        pred: probabilities or logits (N, C, ...), or a class map (N, 1, ...).
        label: ground-truth class map (N, 1, ...) (or (N, ...)).
        num_classes: classes including background.

    Returns:
        (N, num_classes - 1) float tensor on the CPU; NaN where the ground truth lacks the class
        (MONAI's ``ignore_empty``), so such cases do not count for that class.
    """
    y_pred = _as_label_map(pred, num_classes)
    y = _as_label_map(label, num_classes).to(y_pred.device)
    if y.shape[2:] != y_pred.shape[2:]:
        raise ValueError(f"prediction {tuple(y_pred.shape[2:])} and label {tuple(y.shape[2:])} differ in size; compare them on the same grid")
    metric = DiceMetric(include_background=False, reduction="none", num_classes=num_classes, ignore_empty=True)
    # Label maps (not one-hot): DiceMetric compares class by class, no (C x volume) one-hot copies.
    return metric(y_pred=y_pred, y=y).detach().float().cpu()


def class_dice(pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, classes: Sequence[int], num_classes: int | None = None) -> list[float]:
    """Dice of one case's class maps (same shape) for each class in ``classes``, by :func:`dice_scores`;
    NaN where the label lacks the class."""
    p = torch.as_tensor(np.asarray(pred) if not torch.is_tensor(pred) else pred).long()
    y = torch.as_tensor(np.asarray(label) if not torch.is_tensor(label) else label).long()
    n = int(num_classes or max(int(p.max()), int(y.max()), *classes) + 1)
    scores = dice_scores(p.reshape((1, 1) + tuple(p.shape[-3:])), y.reshape((1, 1) + tuple(y.shape[-3:])), max(n, 2))[0]
    return [float(scores[c - 1]) for c in classes]


class DiceAccumulator:
    """Running per-class Dice over validation cases, reducible across DDP ranks.

    Keeps, per foreground class, the sum of Dice over the cases where the class is present in the
    ground truth, and the number of those cases; the per-class Dice is their ratio (the mean over
    cases), the mean foreground Dice the mean over classes that were present at least once.

    Args:
        num_classes: classes including background.
        class_names: optional names (background first) for :meth:`as_dict` and :func:`dice_table`.

    Example::

        acc = DiceAccumulator(5)
        for image, label in cases:
            acc.add(sliding_window_predict(model, image, roi), label)
        acc.all_reduce()        # under DDP, every rank then holds the totals
        print(acc.mean(), acc.per_class())
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes counts background too and must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        names = list(class_names) if class_names is not None else ["background"] + [f"class_{i}" for i in range(1, num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} names for {num_classes} classes; give one per class, background first")
        self.class_names = names
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(self.num_classes - 1, dtype=torch.float64)
        self.counts = torch.zeros(self.num_classes - 1, dtype=torch.float64)
        self.cases = 0

    def add(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Score a batch (see :func:`dice_scores`) and add it; returns its (N, C-1) scores."""
        scores = dice_scores(pred, label, self.num_classes).double()
        self.add_scores(scores)
        return scores.float()

    def add_scores(self, scores: torch.Tensor) -> None:
        """Add precomputed (N, C-1) per-case scores (NaN = class absent)."""
        scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1, self.num_classes - 1)
        valid = ~torch.isnan(scores)
        self.sums += torch.where(valid, scores, torch.zeros_like(scores)).sum(0)
        self.counts += valid.sum(0).double()
        self.cases += scores.shape[0]

    def all_reduce(self) -> None:
        """Sum the totals over the ranks of the default process group (no-op without one)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        backend = torch.distributed.get_backend()
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        buf = torch.cat([self.sums, self.counts, torch.tensor([float(self.cases)], dtype=torch.float64)]).to(dev)
        torch.distributed.all_reduce(buf)
        buf = buf.cpu()
        k = self.num_classes - 1
        self.sums, self.counts, self.cases = buf[:k].clone(), buf[k : 2 * k].clone(), int(buf[-1].item())

    def per_class(self) -> list[float]:
        """Mean Dice of each foreground class (NaN for a class never present in the ground truth)."""
        return [float(s / c) if c > 0 else float("nan") for s, c in zip(self.sums.tolist(), self.counts.tolist())]

    def mean(self) -> float:
        """Mean foreground Dice over the classes that were present (NaN if none was)."""
        vals = [v for v in self.per_class() if not math.isnan(v)]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    def as_dict(self) -> dict[str, float]:
        """``{class name: Dice}`` for the foreground classes."""
        return dict(zip(self.class_names[1:], self.per_class()))


def dice_table(per_class: Sequence[float] | dict[str, float], class_names: Sequence[str] | None = None, title: str | None = None) -> str:
    """A small text table of per-class Dice and their mean (foreground classes only).

    Args:
        per_class: Dice per foreground class (list, or ``{name: dice}``).
        class_names: names of all classes, background first (ignored for a dict).
        title: optional first line.
    """
    if isinstance(per_class, dict):
        names, values = list(per_class), list(per_class.values())
    else:
        values = list(per_class)
        names = list(class_names)[1:] if class_names is not None else [f"class_{i}" for i in range(1, len(values) + 1)]
        if len(names) != len(values):
            raise ValueError(f"{len(values)} Dice values for {len(names)} foreground class names")
    width = max([len(n) for n in names] + [len("mean (foreground)")])
    lines = [title] if title else []
    for n, v in zip(names, values):
        lines.append(f"  {n:<{width}}  {'n/a' if math.isnan(v) else f'{v:.4f}'}")
    present = [v for v in values if not math.isnan(v)]
    mean = sum(present) / len(present) if present else float("nan")
    lines.append(f"  {'mean (foreground)':<{width}}  {'n/a' if math.isnan(mean) else f'{mean:.4f}'}")
    return "\n".join(lines)


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
    dice = dice_scores(p, y, num_classes)[0].tolist()
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
    write_csv([cols] + [[_csv_value(r[c]) for c in cols] for r in rows], paths["metrics"])
    scols = ["class", "name", "dice", "dice_std", "hd95", "n", "hd95_inf"]
    foot = ["", "mean (foreground)", _csv_value(summary["mean_dice"]), "", _csv_value(summary["mean_hd95"]), summary["cases"], ""]
    write_csv([scols] + [[_csv_value(c[k]) for k in scols] for c in summary["classes"]] + [foot], paths["summary_csv"])

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None  # strict JSON has no NaN / inf
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    write_json(clean(summary), paths["summary_json"])
    return paths

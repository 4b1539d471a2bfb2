"""Cross-validation of one training setup: the folds, the state of each fold's run, out-of-fold
predictions, pooled metrics, the held-out set and the post-processing decision.

A cross-validation folder (``cross_validate.py --output CV``) holds::

    splits.json           the folds, nnU-Net's splits_final.json layout: [{"train": [case, ...], "val": [...]}, ...]
    cv_datalist.json      the MONAI datalist every fold trains from: "training" with "fold" keys (absolute
                          paths), "validation" the held-out set (none when validation is a fold of the cases)
    fold_K/               main_train.py's run folder of fold K; fold_K_seed_S for each of several --seeds
    oof/                  out-of-fold predictions: each case by the fold that did not train on it (oof/seed_S/)
    cv_metrics.csv        every out-of-fold case once (per seed): case, fold, seed, class, name, dice, hd95, voxels
    cv_summary.csv        per class and for the mean: mean and std over cases (the seeds averaged per case)
    heldout/              the held-out set predicted by the ensemble of every fold (and seed), with
    heldout_metrics.csv   its per-case metrics and heldout_summary.csv (the same layout as the cv_ files)
    postprocessing.json   --postprocess auto: largest-component decision per class, made on the pooled
                          out-of-fold predictions, for the ensemble test_seg.py --trained_weights CV loads

Folds split as ``main_train.py --fold`` does (:mod:`rep3d.data.cases`): by the ``fold`` keys of the datalist
or dataset.json when it has them, else round-robin over the training cases sorted by name (case ``i`` of
the sorted list in fold ``i % N``). A validation set given with the data (``imagesVal``, a ``validation``
list) stays out of the folds: it is the held-out set.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rep3d.data.cases import (
    N_AUTO_FOLDS,
    case_name,
    collect_cases,
    list_cases,
    read_dataset_json,
    training_pool,
)
from rep3d.data.dataset_config import DataError
from rep3d.data.image_io import output_path_like
from rep3d.fileio import write_csv, write_json
from rep3d.inference.checkpoint import expand_weights
from rep3d.inference.postprocess import (
    decide_postprocessing,
    decision_path,
    keep_largest_component,
)
from rep3d.inference.predictor import Predictor
from rep3d.inference.writer import check_written, voxel_sizes, write_prediction
from rep3d.metrics import case_metrics, class_dice
from rep3d.training.trainer import BEST_CKPT, LAST_CKPT

SPLITS_FILE = "splits.json"
DATALIST_FILE = "cv_datalist.json"
METRICS_FILE = "cv_metrics.csv"
SUMMARY_FILE = "cv_summary.csv"
HELDOUT_METRICS_FILE = "heldout_metrics.csv"
HELDOUT_SUMMARY_FILE = "heldout_summary.csv"
OOF_DIR = "oof"
HELDOUT_DIR = "heldout"

METRIC_COLUMNS = ["case", "fold", "seed", "class", "name", "dice", "hd95", "gt_voxels", "pred_voxels"]
SUMMARY_COLUMNS = ["class", "name", "dice_mean", "dice_std", "hd95_mean", "hd95_std", "cases", "hd95_inf"]
MEAN_ROW = "mean (foreground)"


class CrossValidationError(ValueError):
    """Settings or a folder that a cross-validation cannot use; the message names the flag or file and the fix."""


# ---------------------------------------------------------------------------------------------- folds


@dataclass(frozen=True)
class FoldPlan:
    """The cases of every fold and the held-out set.

    Args:
        folds: per fold (index = fold number), its validation cases (``{"image", "label"}`` dicts).
        held_out: cases that no fold trains or validates on (the data's own validation set).
        how: one line on how the folds were made (for the start line and ``cv_datalist.json``).
    """

    folds: tuple[tuple[dict, ...], ...]
    held_out: tuple[dict, ...] = ()
    how: str = ""

    @property
    def num_folds(self) -> int:
        return len(self.folds)

    def val(self, fold: int) -> list[dict]:
        return list(self.folds[fold])

    def train(self, fold: int) -> list[dict]:
        return [c for k, cases in enumerate(self.folds) if k != fold for c in cases]

    def splits(self) -> list[dict[str, list[str]]]:
        """nnU-Net's ``splits_final.json``: one ``{"train": [...], "val": [...]}`` of case names per fold."""
        return [{"train": sorted(case_name(c["image"]) for c in self.train(k)), "val": sorted(case_name(c["image"]) for c in self.val(k))} for k in range(self.num_folds)]

    def datalist(self) -> dict:
        """The MONAI datalist the folds train from (``main_train.py --datalist FILE --fold K`` trains fold K)."""
        training = [{**_absolute(c), "fold": k} for k, cases in enumerate(self.folds) for c in cases]
        out: dict[str, Any] = {"description": f"cross-validation folds: {self.how}", "training": training}
        if self.held_out:
            out["validation"] = [_absolute(c) for c in self.held_out]
        return out


def _absolute(case: dict) -> dict:
    def fix(p: Any) -> Any:
        return [os.path.abspath(x) for x in p] if isinstance(p, (list, tuple)) else os.path.abspath(str(p))

    return {k: fix(v) for k, v in case.items() if k in ("image", "label")}


def _json_fold_ids(root: str | None, datalist: str | None) -> tuple[str, list[int]]:
    """The source JSON of the training list and the fold numbers its entries name (empty: no fold keys)."""
    source = datalist or (os.path.join(root, "dataset.json") if root else None)
    data = read_dataset_json(source) if source else None
    entries = data.get("training") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return source or "", []
    ids = set()
    for e in entries:
        if isinstance(e, dict) and e.get("fold") is not None:
            try:
                ids.add(int(e["fold"]))
            except (TypeError, ValueError):
                raise CrossValidationError(f"{source}: fold {e['fold']!r} is not a whole number. Fix: number the folds 0, 1, 2, ...") from None
    return source, sorted(ids)


def plan_folds(root: str | None, datalist: str | None = None, num_folds: int | None = None) -> FoldPlan:
    """The folds of a dataset, as ``main_train.py --fold K`` would validate on fold K.

    Args:
        root: dataset folder (``--root``).
        datalist: MONAI datalist (``--datalist``).
        num_folds: folds of the round-robin split (default :data:`~rep3d.data.cases.N_AUTO_FOLDS`, as
            ``--fold``); with ``fold`` keys in the data it must be their number, or None.

    Raises:
        DataError: problems listing the cases (every one).
        CrossValidationError: too few cases for the folds, or fold keys that are not 0..N-1.
    """
    pool, problems = training_pool(root, datalist)
    if problems:
        raise DataError(problems)
    info: dict = {}
    collect_cases(root, "val", datalist, 0, info)
    held_out = [] if info.get("pooled") else list_cases(root, "val", datalist)
    source, ids = _json_fold_ids(root, datalist)
    if ids:
        if ids != list(range(len(ids))):
            raise CrossValidationError(f"{source}: the 'fold' keys are {ids}; cross_validate.py needs folds numbered 0..N-1. Fix: renumber them")
        if num_folds is not None and num_folds != len(ids):
            raise CrossValidationError(
                f"{source} defines {len(ids)} folds by its 'fold' keys, but {num_folds} were asked for: drop --num_folds, "
                f"and pass --folds {len(ids)} (all) or the fold numbers to train"
            )
        folds = tuple(tuple(list_cases(root, "val", datalist, fold=k)) for k in ids)
        how = f"the {len(ids)} folds of the 'fold' keys in {source}"
    else:
        n = N_AUTO_FOLDS if num_folds is None else int(num_folds)
        if n < 2:
            raise CrossValidationError(f"--folds/--num_folds {n}: a cross-validation needs at least 2 folds")
        if n > len(pool):
            raise CrossValidationError(
                f"{n} folds but only {len(pool)} training cases in {source or root}: every fold needs a validation case. "
                f"Fix: pass --folds {len(pool)} or fewer"
            )
        ordered = sorted(pool, key=lambda c: case_name(c["image"]))
        folds = tuple(tuple(c for i, c in enumerate(ordered) if i % n == k) for k in range(n))
        how = f"{n} folds round-robin over the {len(ordered)} training cases sorted by name (case i in fold i % {n}), as --fold does"
    names = [case_name(c["image"]) for f in folds for c in f]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CrossValidationError(f"case names {dup[:5]} are in more than one fold (or twice in the data). Fix: give every case one name and one fold")
    if held_out:
        how += f"; the {len(held_out)} validation cases given with the data are held out (predicted by the ensemble of the folds)"
    return FoldPlan(folds=folds, held_out=tuple(held_out), how=how)


def write_plan(plan: FoldPlan, output: str) -> str:
    """Write ``splits.json`` and ``cv_datalist.json`` into ``output``; returns the datalist's path.

    Raises:
        CrossValidationError: ``output`` holds a cross-validation with other folds.
    """
    splits_path = os.path.join(output, SPLITS_FILE)
    if os.path.isfile(splits_path):
        with open(splits_path) as f:
            old = json.load(f)
        if old != plan.splits():
            raise CrossValidationError(
                f"{output} holds a cross-validation with other folds ({splits_path}): the data or --folds/--num_folds changed. "
                "Pass the same data and fold count to continue it, or another --output for a new one"
            )
    path = os.path.join(output, DATALIST_FILE)
    write_json(plan.datalist(), path)
    write_json(plan.splits(), splits_path)
    return path


# ---------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class FoldRun:
    """One training run of the cross-validation: a fold, a seed and its folder."""

    fold: int
    seed: int
    folder: str

    @property
    def label(self) -> str:
        return f"fold {self.fold} (seed {self.seed})"

    @property
    def best_checkpoint(self) -> str:
        return os.path.join(self.folder, BEST_CKPT)


def fold_runs(output: str, folds: Sequence[int], seeds: Sequence[int] | None, seed: int = 0) -> list[FoldRun]:
    """The runs to train: ``fold_K`` with ``seed``, or ``fold_K_seed_S`` for each of ``seeds``.

    One level below the cross-validation folder either way, so that ``test_seg.py --trained_weights CV``
    finds every run (:func:`rep3d.inference.checkpoint.expand_weights` looks one level down)."""
    if not seeds:
        return [FoldRun(k, int(seed), os.path.join(output, f"fold_{k}")) for k in folds]
    return [FoldRun(k, int(s), os.path.join(output, f"fold_{k}_seed_{s}")) for k in folds for s in seeds]


def run_status(run: FoldRun, max_iter: int) -> str:
    """``"finished"`` (its ``summary.json`` reached ``max_iter``), ``"interrupted"`` (a ``checkpoint_last.pth``
    to resume from) or ``"new"``."""
    summary = os.path.join(run.folder, "summary.json")
    if os.path.isfile(summary):
        try:
            with open(summary) as f:
                steps = int(json.load(f).get("steps", -1))
        except (OSError, ValueError, TypeError):
            steps = -1
        if steps >= max_iter:
            return "finished"
    return "interrupted" if os.path.isfile(os.path.join(run.folder, LAST_CKPT)) else "new"


# ---------------------------------------------------------------------------------------------- prediction


@dataclass
class PredictionSettings:
    """How out-of-fold and held-out cases are predicted (``test_seg.py``'s defaults)."""

    device: Any = "cpu"
    amp: str = "auto"
    sw_batch_size: int | None = None
    overlap: float = 0.5
    num_workers: int = 0
    hd95: bool = True


@dataclass
class Predictions:
    """Rows of ``cv_metrics.csv`` layout, and the per-class Dice with and without the largest-component
    filter (for ``--postprocess auto``)."""

    rows: list[dict] = field(default_factory=list)
    before: dict[int, list[float]] = field(default_factory=dict)
    after: dict[int, list[float]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def predict_cases(
    checkpoints: str | Sequence[str], cases: Sequence[dict], out_dir: str, settings: PredictionSettings, fold: Any, seed: Any,
    into: Predictions | None = None, post_classes: Sequence[int] = (), decide: bool = False,
) -> Predictions:  # fmt: skip
    """Predict labelled ``cases`` with one checkpoint or an ensemble into ``out_dir/<case>_seg...`` (each
    input's native grid and format) and score them (Dice, HD95 per class, by :func:`rep3d.metrics.case_metrics`).

    Args:
        checkpoints: checkpoint file(s) or a run folder (:class:`~rep3d.inference.predictor.Predictor`).
        cases: ``{"image", "label"}`` dicts.
        out_dir: folder of the predictions.
        settings: device, precision, sliding window, loader workers, whether to compute HD95.
        fold, seed: written into each row.
        into: add to these predictions (default: new ones).
        post_classes: classes whose largest connected component alone is kept before scoring.
        decide: also gather the per-class Dice after the largest-component filter (``--postprocess auto``).
    """
    from monai.data import decollate_batch

    out = into if into is not None else Predictions()
    predictor = Predictor.from_checkpoints(
        checkpoints, device=settings.device, amp=settings.amp, sw_batch_size=settings.sw_batch_size,
        overlap=settings.overlap, postprocess=list(post_classes),
    )  # fmt: skip
    cfg = predictor.cfg
    fg = list(range(1, predictor.out_channels))
    loader, transforms = predictor.loader(list(cases), num_workers=settings.num_workers, keep_label=True)
    for batch in loader:
        item = decollate_batch(batch)[0]
        image_path = str(item["image"].meta["filename_or_obj"])
        label_path = str(item["label"].meta["filename_or_obj"])
        name = case_name(image_path, "image")
        seg, _ = predictor.predict_item(item, transforms)
        path = output_path_like(image_path, out_dir, "_seg", name=name)
        write_prediction(seg, image_path, path)
        check_written(path, image_path)
        out.files.append(path)
        label = np.asarray(item["label"].cpu().numpy()).reshape(seg.shape)
        m = case_metrics(seg, label, cfg.num_classes, voxel_sizes(label_path), hd95=settings.hd95)
        for c in fg:
            out.rows.append({"case": name, "fold": fold, "seed": seed, "class": c, "name": cfg.class_names[c], "dice": m["dice"][c - 1],
                             "hd95": m["hd95"][c - 1], "gt_voxels": m["gt_voxels"][c - 1], "pred_voxels": m["pred_voxels"][c - 1]})  # fmt: skip
        if decide:
            kept = class_dice(keep_largest_component(seg, fg), label, fg, cfg.num_classes)
            for c, b, a in zip(fg, m["dice"], kept):
                out.before.setdefault(c, []).append(b)
                out.after.setdefault(c, []).append(a)
    return out


def store_decision(output: str, oof: Predictions, class_names: Sequence[str]) -> dict:
    """Decide ``--postprocess auto`` on the pooled out-of-fold Dice (nnU-Net's rule, :func:`decide_postprocessing`)
    and store it where ``test_seg.py --trained_weights OUTPUT --postprocess auto`` looks for it: beside the
    ensemble of every run folder of ``output``."""
    checkpoints = [os.path.abspath(p) for p in expand_weights(output)]
    decision = decide_postprocessing(oof.before, oof.after, class_names)
    decision.update(
        checkpoints=checkpoints, decided_on=sorted({r["case"] for r in oof.rows}),
        rule="largest connected component kept for a class where it raised the mean Dice over the pooled out-of-fold predictions",
    )  # fmt: skip
    path = decision_path(checkpoints)
    write_json(decision, path)
    decision["path"] = path
    return decision


# ---------------------------------------------------------------------------------------------- tables


def _csv(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.6g}")
    return v


def write_metrics_csv(rows: Sequence[dict], path: str) -> None:
    """``rows`` (:data:`METRIC_COLUMNS`) as CSV."""
    write_csv([METRIC_COLUMNS] + [[_csv(r[c]) for c in METRIC_COLUMNS] for r in rows], path)


def _per_case(rows: Sequence[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """Dice and HD95 per (case, class), averaged over the seeds (a class absent from a case stays NaN)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((str(r["case"]), int(r["class"])), []).append(r)
    out = {}
    for key, rs in groups.items():
        dice = [float(r["dice"]) for r in rs if not math.isnan(float(r["dice"]))]
        out[key] = {"dice": float(np.mean(dice)) if dice else math.nan, "hd95": float(np.mean([float(r["hd95"]) for r in rs]))}
    return out


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    return (float(v.mean()), float(v.std()), int(v.size)) if v.size else (math.nan, math.nan, 0)


def summarize(rows: Sequence[dict], class_names: Sequence[str]) -> list[dict]:
    """Per foreground class, then for the mean: Dice and HD95 mean and std over cases, the seeds of a case
    averaged first. A class absent from a case's label does not count for it; a non-finite HD95 (a missed or
    spurious structure) is left out of the HD95 mean and counted in ``hd95_inf``. The mean row is over cases
    of each case's mean over its present classes, so every case weighs the same."""
    per = _per_case(rows)
    cases = sorted({case for case, _ in per})
    out = []
    for c in range(1, len(class_names)):
        vals = [per[(k, c)] for k in cases if (k, c) in per]
        dm, ds, n = _stats([v["dice"] for v in vals])
        hm, hs, _ = _stats([v["hd95"] for v in vals])
        inf = sum(1 for v in vals if math.isinf(v["hd95"]))
        out.append({"class": c, "name": class_names[c], "dice_mean": dm, "dice_std": ds, "hd95_mean": hm, "hd95_std": hs, "cases": n, "hd95_inf": inf})
    case_dice, case_hd = [], []
    for k in cases:
        d = [per[(k, c)]["dice"] for c in range(1, len(class_names)) if (k, c) in per and not math.isnan(per[(k, c)]["dice"])]
        h = [per[(k, c)]["hd95"] for c in range(1, len(class_names)) if (k, c) in per and math.isfinite(per[(k, c)]["hd95"])]
        if d:
            case_dice.append(float(np.mean(d)))
        if h:
            case_hd.append(float(np.mean(h)))
    dm, ds, n = _stats(case_dice)
    hm, hs, _ = _stats(case_hd)
    out.append({"class": "", "name": MEAN_ROW, "dice_mean": dm, "dice_std": ds, "hd95_mean": hm, "hd95_std": hs, "cases": n, "hd95_inf": sum(r["hd95_inf"] for r in out)})
    return out


def write_summary_csv(summary: Sequence[dict], path: str) -> None:
    write_csv([SUMMARY_COLUMNS] + [[_csv(r[c]) for c in SUMMARY_COLUMNS] for r in summary], path)


def summary_table(summary: Sequence[dict], title: str = "") -> str:
    """The summary as an aligned text table: Dice and HD95 as mean +- std over cases."""

    def pm(m: float, s: float, digits: int) -> str:
        return "n/a" if math.isnan(m) else f"{m:.{digits}f} +- {s:.{digits}f}"

    head = ("class", "Dice", "HD95 (mm)", "cases")
    body = [
        (f"{r['class']} {r['name']}".strip(), pm(r["dice_mean"], r["dice_std"], 4),
         pm(r["hd95_mean"], r["hd95_std"], 2) + (f" ({r['hd95_inf']} inf)" if r["hd95_inf"] else ""), str(r["cases"]))
        for r in summary
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(4)]

    def line(row: Sequence[str]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])])

    rule = "-" * len(line(head))
    lines = ([title] if title else []) + [line(head), rule, *map(line, body[:-1]), rule, line(body[-1])]
    return "\n".join(lines)


def seed_means(rows: Sequence[dict]) -> dict[int, float]:
    """Mean foreground Dice of each seed (over its cases' per-case means), to show the seed-to-seed spread."""
    out = {}
    for s in sorted({int(r["seed"]) for r in rows}):
        mine = [r for r in rows if int(r["seed"]) == s]
        out[s] = summarize(mine, _class_names(mine))[-1]["dice_mean"]
    return out


# ---------------------------------------------------------------------------------------------- the whole


def collect(
    output: str, plan: FoldPlan, runs: Sequence[FoldRun], settings: PredictionSettings, postprocess: str = "none",
    log: Callable[[str], None] = print,
) -> dict:  # fmt: skip
    """After training: predict each run's own validation fold into ``oof/``, pool the metrics
    (``cv_metrics.csv``, ``cv_summary.csv``), decide the post-processing (``postprocess="auto"``), and predict the
    held-out set with the ensemble of every run (``heldout/``, ``heldout_metrics.csv``, ``heldout_summary.csv``).

    Returns:
        ``{"rows", "summary", "table", "postprocessing", "heldout_rows", "heldout_summary", "heldout_table"}``.
    """
    seeds = sorted({r.seed for r in runs})
    by_seed = any(os.path.basename(r.folder) != f"fold_{r.fold}" for r in runs)  # --seeds: fold_K_seed_S
    oof = Predictions()
    missing = [r for r in runs if not os.path.isfile(r.best_checkpoint)]
    if missing:
        raise CrossValidationError(
            f"{missing[0].label}: no {BEST_CKPT} in {missing[0].folder}: none of its validations scored a Dice (does its "
            "validation fold hold labelled foreground?). Check its training_log.txt; fix the data or the folds, then run again"
        )
    for run in runs:
        out_dir = os.path.join(output, OOF_DIR, f"seed_{run.seed}") if by_seed else os.path.join(output, OOF_DIR)
        log(f"{run.label}: predicting its {len(plan.val(run.fold))} validation case(s) with {run.best_checkpoint} into {out_dir}")
        predict_cases(run.best_checkpoint, plan.val(run.fold), out_dir, settings, run.fold, run.seed, into=oof, decide=postprocess == "auto")
    class_names = _class_names(oof.rows)
    summary = summarize(oof.rows, class_names)
    log(f"{len(oof.rows) // max(1, len(class_names) - 1)} out-of-fold prediction(s) scored: {os.path.join(output, METRICS_FILE)}")
    write_metrics_csv(oof.rows, os.path.join(output, METRICS_FILE))
    write_summary_csv(summary, os.path.join(output, SUMMARY_FILE))
    n_cases = len({r["case"] for r in oof.rows})
    title = f"cross-validation, {len({r.fold for r in runs})} fold(s) x {len(seeds)} seed(s), {n_cases} out-of-fold case(s) (mean +- std over cases):"
    result: dict[str, Any] = {"rows": oof.rows, "summary": summary, "table": summary_table(summary, title), "postprocessing": None,
                              "heldout_rows": [], "heldout_summary": None, "heldout_table": None}  # fmt: skip
    if len(seeds) > 1:
        result["table"] += "\nper seed, mean Dice: " + ", ".join(f"seed {s} {v:.4f}" for s, v in seed_means(oof.rows).items())
    post: list[int] = []
    if postprocess == "auto":
        decision = store_decision(output, oof, class_names)
        result["postprocessing"] = decision
        post = decision["largest_component"]
        log(f"--postprocess auto: largest component kept for classes {post or 'none'} (decided on the pooled out-of-fold predictions; stored in {decision['path']})")
    if plan.held_out:
        ensemble = expand_weights(output)
        log(f"held-out set: {len(plan.held_out)} case(s) predicted by the ensemble of {len(ensemble)} run(s) into {os.path.join(output, HELDOUT_DIR)}")
        held = predict_cases(ensemble, plan.held_out, os.path.join(output, HELDOUT_DIR), settings, "ensemble", "all", post_classes=post)
        held_summary = summarize(held.rows, class_names)
        write_metrics_csv(held.rows, os.path.join(output, HELDOUT_METRICS_FILE))
        write_summary_csv(held_summary, os.path.join(output, HELDOUT_SUMMARY_FILE))
        result.update(heldout_rows=held.rows, heldout_summary=held_summary,
                      heldout_table=summary_table(held_summary, f"held-out set, ensemble of {len(ensemble)} run(s), {len(plan.held_out)} case(s):"))  # fmt: skip
    return result


def _class_names(rows: Sequence[dict]) -> list[str]:
    """All class names, background first, from metrics rows (class number -> name)."""
    names = {int(r["class"]): str(r["name"]) for r in rows}
    return ["background"] + [names.get(c, f"class_{c}") for c in range(1, max(names) + 1)] if names else ["background"]


__all__ = [
    "CrossValidationError",
    "FoldPlan",
    "FoldRun",
    "PredictionSettings",
    "Predictions",
    "collect",
    "fold_runs",
    "plan_folds",
    "predict_cases",
    "run_status",
    "store_decision",
    "summarize",
    "summary_table",
    "write_plan",
]

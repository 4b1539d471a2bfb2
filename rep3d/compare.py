"""Paired comparison of segmentation runs on the cases they share.

Each run is one or more per-case metrics tables: ``metrics.csv`` of ``test_seg.py`` or ``cv_metrics.csv`` of
``cross_validate.py`` (columns ``case, class, name, dice, hd95``; a ``seed`` column may repeat a case).
Within a table the rows of one case and class (several seeds of a cross-validation) are averaged; several
tables of one run (several seeds of one configuration, trained apart) are averaged per case too, over the
cases every table has. Then, for each other run against the reference, per foreground class and for the
per-case mean over classes:

* the mean difference (other - reference) over the shared cases;
* a bootstrap confidence interval of that mean: the cases resampled with replacement (``scipy.stats.bootstrap``,
  percentile method, a fixed seed, 10,000 resamples by default);
* the two-sided Wilcoxon signed-rank test of the paired values (``scipy.stats.wilcoxon`` with its defaults:
  ``zero_method="wilcox"``, so cases whose difference is exactly 0 are dropped from the ranking, tied
  absolute differences get average ranks, and ``method="auto"``: the exact null distribution for up to 50
  cases without ties or zeros, else an exhaustive permutation test up to 13 cases, else the normal
  approximation without continuity correction);
* Holm's step-down correction of the class p-values of one comparison and metric (the mean row is a single
  test, outside that family). SciPy has no Holm correction, so :func:`holm` is the few lines of the method.

Pairing needs the same cases and classes: inputs that share no case, or whose classes (number and name)
differ, are refused; cases present on one side only are dropped and counted. A class absent from a case's
label (NaN Dice) does not count for that case; a non-finite HD95 (a structure missed or hallucinated, on
either side) leaves that case out of that class's HD95 test, and the count is reported.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

#: What scipy.stats.wilcoxon does with zero differences by default (they are dropped).
ZERO_METHOD = "wilcox"


METRICS = ("dice", "hd95")


#: Files looked for in a run folder, in this order.
METRICS_FILES = ("cv_metrics.csv", "metrics.csv")


MEAN = "mean"


class CompareError(ValueError):
    """Inputs that cannot be compared (the message names the files and what to pass)."""


@dataclass(frozen=True)
class RunMetrics:
    """One run's per-case metrics, averaged over its tables and seeds.

    Args:
        name: the run's label in the tables.
        paths: the metrics files read.
        values: ``{(case, class): {"dice": float, "hd95": float}}``.
        classes: ``{class number: name}`` (foreground).
        dropped: cases left out because not every table of the run has them.
    """

    name: str
    paths: tuple[str, ...]
    values: dict[tuple[str, int], dict[str, float]]
    classes: dict[int, str]
    dropped: tuple[str, ...] = ()

    @property
    def cases(self) -> set[str]:
        return {case for case, _ in self.values}


def find_metrics_file(path: str) -> str:
    """``path`` itself, or the ``cv_metrics.csv`` / ``metrics.csv`` inside a folder.

    Raises:
        CompareError: no such file.
    """
    if os.path.isdir(path):
        for name in METRICS_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise CompareError(f"{path}: a folder without {' or '.join(METRICS_FILES)}; pass the metrics file, or the folder test_seg.py / cross_validate.py wrote")
    if not os.path.isfile(path):
        raise CompareError(f"{path}: no such file; pass a metrics.csv (test_seg.py), a cv_metrics.csv (cross_validate.py) or a folder holding one")
    return path


def _number(text: str) -> float:
    text = (text or "").strip().lower()
    if text in ("", "nan", "none", "n/a"):
        return math.nan
    return float(text)


def read_table(path: str) -> tuple[dict[tuple[str, int], dict[str, float]], dict[int, str]]:
    """One metrics file: ``({(case, class): {"dice", "hd95"}}, {class: name})``, the rows of a case and class
    (one per seed) averaged: Dice over the finite values, HD95 over all (an infinite one stays infinite).

    Raises:
        CompareError: a file without the columns ``case, class, name, dice, hd95``, or unreadable values.
    """
    path = find_metrics_file(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("case", "class", "name", "dice", "hd95") if c not in (reader.fieldnames or [])]
        if missing:
            raise CompareError(f"{path}: no {', '.join(missing)} column(s); pass a metrics.csv of test_seg.py or a cv_metrics.csv of cross_validate.py")
        groups: dict[tuple[str, int], list[tuple[float, float]]] = {}
        classes: dict[int, str] = {}
        for i, row in enumerate(reader, start=2):
            try:
                key = (row["case"], int(row["class"]))
                groups.setdefault(key, []).append((_number(row["dice"]), _number(row["hd95"])))
            except (TypeError, ValueError):
                raise CompareError(f"{path}, line {i}: unreadable values {dict(row)}; fix or regenerate the file") from None
            if classes.setdefault(key[1], row["name"]) != row["name"]:
                raise CompareError(f"{path}, line {i}: class {key[1]} is named both {classes[key[1]]!r} and {row['name']!r}")
    if not groups:
        raise CompareError(f"{path}: no rows; score some cases first")
    values = {}
    for key, vals in groups.items():
        dice = [d for d, _ in vals if not math.isnan(d)]
        values[key] = {"dice": float(np.mean(dice)) if dice else math.nan, "hd95": float(np.mean([h for _, h in vals]))}
    return values, classes


def load_run(name: str, paths: Sequence[str]) -> RunMetrics:
    """A run from one or more metrics files (or folders holding one), averaged per case and class over the
    files; only the cases every file has are kept (the others are in ``dropped``).

    Raises:
        CompareError: unreadable files, or files of one run with different classes.
    """
    files = [find_metrics_file(p) for p in paths]
    tables = [read_table(p) for p in files]
    classes = tables[0][1]
    for p, (_, c) in zip(files[1:], tables[1:]):
        if c != classes:
            raise CompareError(f"run {name}: {p} has classes {c}, {files[0]} has {classes}; a run's files must score the same classes")
    case_sets = [{case for case, _ in t} for t, _ in tables]
    kept = set.intersection(*case_sets)
    dropped = tuple(sorted(set.union(*case_sets) - kept))
    values = {}
    for key in tables[0][0]:
        if key[0] not in kept:
            continue
        per = [t[key] for t, _ in tables if key in t]
        dice = [v["dice"] for v in per if not math.isnan(v["dice"])]
        values[key] = {"dice": float(np.mean(dice)) if dice else math.nan, "hd95": float(np.mean([v["hd95"] for v in per]))}
    return RunMetrics(name=name, paths=tuple(files), values=values, classes=classes, dropped=dropped)


def wilcoxon_method(differences: np.ndarray) -> str:
    """Which null distribution ``scipy.stats.wilcoxon(method="auto")`` uses for these differences."""
    d = np.asarray(differences, dtype=float)
    nonzero = d[d != 0]
    ties = len(np.unique(np.abs(nonzero))) < len(nonzero)
    if len(d) <= 50 and not ties and len(nonzero) == len(d):
        return "exact"
    if len(d) <= 13:
        return "permutation"
    return "normal approximation"


def paired_test(a: Sequence[float], b: Sequence[float], resamples: int = 10000, seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Mean of ``b - a``, its bootstrap CI (cases resampled) and the two-sided Wilcoxon signed-rank test.

    Returns:
        ``{"n", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "statistic", "p", "zeros", "method"}``;
        the CI is NaN for fewer than 2 cases; the test is scipy's, whatever the zeros (all-zero differences:
        scipy's p-value, 1.0).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = b - a
    n = int(d.size)
    out: dict[str, Any] = {"n": n, "mean_a": math.nan, "mean_b": math.nan, "mean_diff": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                           "statistic": math.nan, "p": math.nan, "zeros": int(np.sum(d == 0)), "method": ""}  # fmt: skip
    if n == 0:
        return out
    out.update(mean_a=float(a.mean()), mean_b=float(b.mean()), mean_diff=float(d.mean()))
    if n >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # identical resamples (all differences equal) warn; the CI is then that value
            ci = stats.bootstrap((d,), np.mean, n_resamples=int(resamples), confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed)).confidence_interval
        out.update(ci_low=float(ci.low), ci_high=float(ci.high))
    with warnings.catch_warnings():
        # all-zero differences make scipy's normal approximation divide 0 by 0 (it still returns its p-value)
        warnings.simplefilter("ignore")
        res = stats.wilcoxon(b, a, zero_method=ZERO_METHOD)
    out.update(statistic=float(res.statistic), p=float(res.pvalue), method=wilcoxon_method(d))
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and are not counted in the family)."""
    p = np.asarray(pvalues, dtype=float)
    finite = [i for i in np.argsort(p, kind="stable") if not math.isnan(p[i])]
    m, out, running = len(finite), [math.nan] * len(p), 0.0
    for rank, i in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


@dataclass
class Comparison:
    """One run against the reference: the table rows and what was dropped."""

    reference: str
    other: str
    shared: int
    only_reference: list[str]
    only_other: list[str]
    rows: list[dict] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.other} vs {self.reference}"


def _pairs(ref: RunMetrics, other: RunMetrics, cases: list[str], metric: str, cls: int | None) -> tuple[list[float], list[float], int]:
    """Paired values of one class (``cls``) or of the per-case mean over classes (None); and how many
    cases were left out for a non-finite value."""

    def ok(v: float) -> bool:
        return math.isfinite(v) if metric == "hd95" else not math.isnan(v)

    a, b, excluded = [], [], 0
    for case in cases:
        classes = [cls] if cls is not None else sorted(ref.classes)
        va, vb = [], []
        for c in classes:
            x, y = ref.values.get((case, c), {}).get(metric, math.nan), other.values.get((case, c), {}).get(metric, math.nan)
            if ok(x) and ok(y):
                va.append(x)
                vb.append(y)
            elif metric == "hd95" and not (math.isnan(x) and math.isnan(y)):
                excluded += cls is not None
        if va:
            a.append(float(np.mean(va)))
            b.append(float(np.mean(vb)))
    return a, b, excluded


def compare(ref: RunMetrics, other: RunMetrics, metrics: Sequence[str] = METRICS, resamples: int = 10000, seed: int = 0, confidence: float = 0.95) -> Comparison:
    """``other`` against ``ref`` on their shared cases: one row per metric and class, then the mean.

    Raises:
        CompareError: different classes, or no shared case.
    """
    if ref.classes != other.classes:
        raise CompareError(
            f"{other.name} ({', '.join(other.paths)}) scores classes {other.classes}, {ref.name} ({', '.join(ref.paths)}) "
            f"{ref.classes}: compare runs of the same dataset and classes"
        )
    shared = sorted(ref.cases & other.cases)
    if not shared:
        raise CompareError(
            f"{ref.name} ({', '.join(ref.paths)}) and {other.name} ({', '.join(other.paths)}) share no case (e.g. {sorted(ref.cases)[:2]} vs "
            f"{sorted(other.cases)[:2]}): compare runs scored on the same cases"
        )
    result = Comparison(ref.name, other.name, len(shared), sorted(ref.cases - other.cases), sorted(other.cases - ref.cases))
    for metric in metrics:
        rows = []
        for cls in [*sorted(ref.classes), None]:
            a, b, excluded = _pairs(ref, other, shared, metric, cls)
            test = paired_test(a, b, resamples, seed, confidence)
            rows.append({"comparison": result.title, "metric": metric, "class": MEAN if cls is None else cls,
                         "name": "mean over classes" if cls is None else ref.classes[cls], **test, "nonfinite_excluded": excluded})  # fmt: skip
        adjusted = holm([r["p"] for r in rows[:-1]])
        for r, p in zip(rows, [*adjusted, math.nan]):
            r["p_holm"] = p
        result.rows += rows
    return result


CSV_COLUMNS = [
    "comparison", "metric", "class", "name", "n", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "statistic", "p", "p_holm",
    "zeros", "method", "nonfinite_excluded",
]  # fmt: skip


def _fmt(v: Any, digits: int = 4, sign: bool = False) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _p(v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return f"{v:.2e}" if v < 1e-3 else f"{v:.4f}"


def markdown(comparisons: Sequence[Comparison], resamples: int = 10000, seed: int = 0, confidence: float = 0.95, dropped_within: dict[str, Sequence[str]] | None = None) -> str:
    """The comparisons as Markdown: one table per comparison and metric."""
    out = []
    for comp in comparisons:
        for metric in dict.fromkeys(r["metric"] for r in comp.rows):
            rows = [r for r in comp.rows if r["metric"] == metric]
            better = "higher is better" if metric == "dice" else "lower is better"
            unpaired = len(comp.only_reference) + len(comp.only_other)
            notes = [f"{comp.shared} shared case(s); {unpaired} dropped as unpaired"
                     + (f" (only in {comp.reference}: {', '.join(comp.only_reference[:5])}{' ...' if len(comp.only_reference) > 5 else ''}; "
                        f"only in {comp.other}: {', '.join(comp.only_other[:5])}{' ...' if len(comp.only_other) > 5 else ''})" if unpaired else "")]  # fmt: skip
            for name, cases in (dropped_within or {}).items():
                if cases and name in (comp.reference, comp.other):
                    notes.append(f"{len(cases)} case(s) of {name} left out as not in every one of its files")
            notes.append(
                f"{int(confidence * 100)}% CI: bootstrap over cases, {resamples} resamples, percentile, seed {seed}. "
                f"p: two-sided Wilcoxon signed-rank (scipy.stats.wilcoxon, zero_method='{ZERO_METHOD}': zero differences dropped, "
                f"ties get average ranks). p (Holm): over the {len(rows) - 1} classes; the mean row is one test on the per-case means."
            )
            if metric == "hd95" and any(r["nonfinite_excluded"] for r in rows):
                notes.append("non-finite HD95 (a structure missed or spurious): those cases are left out of that class (column excl.)")
            out.append(f"### {comp.title}: {metric.upper() if metric == 'hd95' else 'Dice'} (difference {comp.other} - {comp.reference}; {better})\n")
            out.append("\n".join(notes) + "\n")
            head = ["class", "cases", comp.reference, comp.other, "difference", f"{int(confidence * 100)}% CI", "p", "p (Holm)", "zero diffs"]
            if metric == "hd95":
                head.append("excl.")
            lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
            digits = 4 if metric == "dice" else 2
            for r in rows:
                label = f"**{r['name']}**" if r["class"] == MEAN else f"{r['class']} {r['name']}"
                cells = [label, str(r["n"]), _fmt(r["mean_a"], digits), _fmt(r["mean_b"], digits), _fmt(r["mean_diff"], digits, True),
                         f"[{_fmt(r['ci_low'], digits, True)}, {_fmt(r['ci_high'], digits, True)}]", _p(r["p"]),
                         "-" if r["class"] == MEAN else _p(r["p_holm"]), str(r["zeros"])]  # fmt: skip
                if metric == "hd95":
                    cells.append(str(r["nonfinite_excluded"]))
                lines.append("| " + " | ".join(cells) + " |")
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def csv_rows(comparisons: Sequence[Comparison]) -> list[list[Any]]:
    """Header and one row per comparison, metric and class (floats with 6 significant digits)."""

    def cell(v: Any) -> Any:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.6g}"
        return v

    return [CSV_COLUMNS] + [[cell(r[c]) for c in CSV_COLUMNS] for comp in comparisons for r in comp.rows]

"""Compare segmentation runs case by case: mean difference with a bootstrap CI, the Wilcoxon signed-rank test
and Holm's correction across classes, per class and for the mean, on the cases the runs share.

    python3 compare_runs.py runs/cv_nnunet runs/cv_rep3d                       # two cross-validations
    python3 compare_runs.py nnunet=runs/cv_nnunet rep3d=runs/cv_rep3d --output comparison.csv
    python3 compare_runs.py base=pred_a/metrics.csv new=pred_b/metrics.csv --metrics dice
    python3 compare_runs.py A=s0/metrics.csv,s1/metrics.csv B=t0/metrics.csv,t1/metrics.csv   # 2 seeds a side

Each RUN is ``[NAME=]PATH[,PATH...]``: a metrics.csv (test_seg.py), a cv_metrics.csv (cross_validate.py) or a
folder holding one; several paths (the seeds of one configuration) are averaged per case before the tests,
as are the seeds inside one cv_metrics.csv. Every run is compared with the reference (the first, or
``--reference NAME``); the difference is always other - reference. The statistics are described in
:mod:`rep3d.compare`; the tables are printed as Markdown, and ``--output`` writes them as CSV.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rep3d.cli import HelpFormatter
from rep3d.compare import METRICS, CompareError, compare, csv_rows, load_run, markdown
from rep3d.fileio import WriteError, write_csv

PROG = "compare_runs.py"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (also used by the tests)."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument(
        "runs", nargs="+", metavar="RUN",
        help="[NAME=]PATH[,PATH...]: a metrics.csv, a cv_metrics.csv or a folder holding one; several comma-separated paths are one "
        "run's seeds, averaged per case. NAME defaults to the folder name. At least two runs",
    )  # fmt: skip
    p.add_argument("--reference", default=None, metavar="NAME", help="the run every other is compared with (default: the first)")
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS), help="metrics to compare")
    p.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples of the cases")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (fixed: the same inputs give the same CI)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the interval")
    p.add_argument("--output", default=None, metavar="FILE.csv", help="also write the tables as CSV (one row per comparison, metric and class)")
    return p


def _default_name(path: str) -> str:
    path = os.path.normpath(path)
    if os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    return os.path.basename(path) or path


def parse_run(text: str) -> tuple[str, list[str]]:
    """``"NAME=a.csv,b.csv"`` -> ``("NAME", ["a.csv", "b.csv"])``; without ``NAME=`` the first path's folder name."""
    name, sep, rest = text.partition("=")
    if not sep or os.path.exists(text):
        name, rest = "", text
    paths = [p for p in rest.split(",") if p]
    if not paths:
        raise CompareError(f"{text!r}: no path; give RUN as [NAME=]PATH[,PATH...]")
    return name or _default_name(paths[0]), paths


def run_comparison(args: argparse.Namespace) -> dict:
    """Load the runs, compare each with the reference; returns ``{"comparisons", "markdown", "csv"}``.

    Raises:
        CompareError: fewer than two runs, unreadable files, runs without shared cases or with different classes.
    """
    if len(args.runs) < 2:
        raise CompareError(f"{len(args.runs)} run given: compare at least two (e.g. {PROG} A=runs/a B=runs/b)")
    if args.resamples < 100:
        raise CompareError(f"--resamples {args.resamples}: use at least 100 (10000 by default)")
    if not 0 < args.confidence < 1:
        raise CompareError(f"--confidence {args.confidence}: give a level in (0, 1), e.g. 0.95")
    specs = [parse_run(r) for r in args.runs]
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise CompareError(f"runs named {names}: give each a distinct NAME= (e.g. a=runs/x b=runs/y)")
    runs = [load_run(n, paths) for n, paths in specs]
    reference = args.reference or names[0]
    if reference not in names:
        raise CompareError(f"--reference {reference}: no run has that name (runs: {', '.join(names)})")
    ref = runs[names.index(reference)]
    comparisons = [compare(ref, r, args.metrics, args.resamples, args.seed, args.confidence) for r in runs if r is not ref]
    dropped = {r.name: r.dropped for r in runs}
    text = markdown(comparisons, args.resamples, args.seed, args.confidence, dropped)
    table = csv_rows(comparisons)
    if args.output:
        write_csv(table, args.output)
    return {"comparisons": comparisons, "markdown": text, "csv": table, "runs": runs}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: 0 done, 2 inputs that cannot be compared (one message, no traceback)."""
    args = build_parser().parse_args(argv)
    try:
        result = run_comparison(args)
    except (CompareError, WriteError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(result["markdown"])
    if args.output:
        print(f"(CSV: {args.output})")
    return 0

"""compare_runs.py (issue 23): paired statistics on known tables (scipy.stats.wilcoxon with its defaults, zero
differences and ties included), the bootstrap CI, Holm's correction, seeds averaged per case, and the refusals."""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
from scipy import stats

import compare_runs
from rep3d.compare import CompareError, compare, holm, load_run, paired_test, wilcoxon_method

CLASSES = {1: "liver", 2: "tumour"}


def write_metrics(path, values: dict[str, tuple[float, float]], classes=CLASSES, seeds: dict[int, dict] | None = None, hd95: float = 5.0) -> str:
    """A metrics.csv of test_seg.py (or, with ``seeds``, a cv_metrics.csv): Dice per case and class."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if seeds is None:
            w.writerow(["case", "class", "name", "dice", "hd95", "gt_voxels", "pred_voxels"])
            for case, dice in values.items():
                for (c, name), d in zip(classes.items(), dice):
                    w.writerow([case, c, name, d, hd95, 10, 10])
        else:
            w.writerow(["case", "fold", "seed", "class", "name", "dice", "hd95", "gt_voxels", "pred_voxels"])
            for seed, table in seeds.items():
                for case, dice in table.items():
                    for (c, name), d in zip(classes.items(), dice):
                        w.writerow([case, 0, seed, c, name, d, hd95, 10, 10])
    return str(path)


CASES = [f"case_{i}" for i in range(8)]
A = {c: (0.80 + 0.01 * i, 0.50 + 0.02 * i) for i, c in enumerate(CASES)}
LIVER_DIFF = [0.011, -0.004, 0.023, 0.031, 0.002, 0.017, -0.009, 0.026]  # distinct |d|: the exact test
TUMOUR_DIFF = [0.05, 0.0, 0.05, -0.02, 0.0, 0.03, 0.05, -0.03]  # zeros and ties: scipy's permutation test
B = {c: (A[c][0] + dl, A[c][1] + dt) for c, dl, dt in zip(CASES, LIVER_DIFF, TUMOUR_DIFF)}


def row(comparison, metric: str, cls) -> dict:
    return next(r for r in comparison.rows if r["metric"] == metric and r["class"] == cls)


def test_matches_scipy_wilcoxon_on_a_known_table(tmp_path):
    a = load_run("A", [write_metrics(tmp_path / "a" / "metrics.csv", A)])
    b = load_run("B", [write_metrics(tmp_path / "b" / "metrics.csv", B)])
    comp = compare(a, b, ["dice"])
    liver, tumour, mean = row(comp, "dice", 1), row(comp, "dice", 2), row(comp, "dice", "mean")
    a_liver, b_liver = [A[c][0] for c in CASES], [B[c][0] for c in CASES]
    assert liver["p"] == pytest.approx(stats.wilcoxon(b_liver, a_liver).pvalue, rel=1e-12)
    assert liver["statistic"] == stats.wilcoxon(b_liver, a_liver).statistic and liver["method"] == "exact"
    assert liver["mean_diff"] == pytest.approx(np.mean(LIVER_DIFF)) and liver["n"] == 8
    # by hand: the 2 negative differences have ranks 2 and 3 of 8 -> W = 5; 10 of the 256 sign patterns give
    # W <= 5 (sums {}, 1, 2, 3, 1+2, 4, 1+3, 5, 1+4, 2+3), so the exact two-sided p is 2 * 10 / 256
    assert liver["statistic"] == 5 and liver["p"] == pytest.approx(20 / 256)
    # zeros dropped (zero_method='wilcox', scipy's default) and ties ranked on average, as scipy does
    a_t, b_t = [A[c][1] for c in CASES], [B[c][1] for c in CASES]
    assert tumour["p"] == pytest.approx(stats.wilcoxon(b_t, a_t).pvalue, rel=1e-12)
    assert tumour["zeros"] == 2 and tumour["method"] == "permutation"
    # the mean row: per-case means over the classes
    a_m, b_m = np.mean([a_liver, a_t], axis=0), np.mean([b_liver, b_t], axis=0)
    assert mean["p"] == pytest.approx(stats.wilcoxon(b_m, a_m).pvalue, rel=1e-12)
    assert mean["mean_diff"] == pytest.approx(np.mean(b_m - a_m))
    # Holm over the two classes; the mean row is outside the family
    assert [liver["p_holm"], tumour["p_holm"]] == pytest.approx(holm([liver["p"], tumour["p"]]))
    assert math.isnan(mean["p_holm"])
    # the bootstrap CI: fixed seed, the same numbers every time, around the mean difference
    assert liver["ci_low"] < liver["mean_diff"] < liver["ci_high"]
    again = compare(a, b, ["dice"])
    assert row(again, "dice", 1)["ci_low"] == liver["ci_low"] and row(again, "dice", 1)["ci_high"] == liver["ci_high"]
    ci = stats.bootstrap((np.array(LIVER_DIFF),), np.mean, n_resamples=10000, method="percentile", rng=np.random.default_rng(0)).confidence_interval
    assert (liver["ci_low"], liver["ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_zero_differences_and_ties_as_scipy():
    same = paired_test([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    with np.errstate(invalid="ignore"):  # scipy's normal approximation divides 0 by 0 on the way to its answer
        expected = stats.wilcoxon([0.5, 0.6, 0.7], [0.5, 0.6, 0.7]).pvalue
    assert same["zeros"] == 3 and same["p"] == expected == 1.0
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2.0, 3.0, 3.0, 5.0, 6.0, 8.0]  # differences 1, 1, 0, 1, 1, 2
    test = paired_test(a, b)
    assert test["p"] == pytest.approx(stats.wilcoxon(b, a).pvalue) and test["zeros"] == 1
    assert wilcoxon_method(np.array(b) - np.array(a)) == "permutation"
    assert wilcoxon_method(np.arange(1.0, 60.0)) == "normal approximation"
    # 5 positive differences, no ties: the exact two-sided p is 2 / 2**5
    assert paired_test([0, 0, 0, 0, 0], [1, 2, 3, 4, 5])["p"] == pytest.approx(2 / 32)


def test_holm():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.2, float("nan"), 0.01]) == pytest.approx([0.2, float("nan"), 0.02], nan_ok=True)
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_seeds_are_averaged_per_case_before_the_test(tmp_path):
    # two files per side (one seed each), and one cv_metrics.csv holding both seeds: the same run
    a1 = write_metrics(tmp_path / "a1" / "metrics.csv", {c: (A[c][0] - 0.01, A[c][1]) for c in CASES})
    a2 = write_metrics(tmp_path / "a2" / "metrics.csv", {c: (A[c][0] + 0.01, A[c][1]) for c in CASES})
    both = write_metrics(tmp_path / "a" / "cv_metrics.csv", {}, seeds={0: {c: (A[c][0] - 0.01, A[c][1]) for c in CASES}, 1: {c: (A[c][0] + 0.01, A[c][1]) for c in CASES}})
    b = load_run("B", [write_metrics(tmp_path / "b" / "metrics.csv", B)])
    files = compare(load_run("A", [a1, a2]), b, ["dice"])
    folder = compare(load_run("A", [os.path.dirname(both)]), b, ["dice"])  # a run folder: its cv_metrics.csv
    expected = stats.wilcoxon([B[c][0] for c in CASES], [A[c][0] for c in CASES]).pvalue
    assert row(files, "dice", 1)["p"] == pytest.approx(expected) == row(folder, "dice", 1)["p"]
    assert row(files, "dice", 1)["mean_a"] == pytest.approx(np.mean([A[c][0] for c in CASES]))


def test_unpaired_cases_dropped_and_counted(tmp_path, capsys):
    a = write_metrics(tmp_path / "a" / "metrics.csv", {**A, "only_a": (0.1, 0.1)})
    b = write_metrics(tmp_path / "b" / "metrics.csv", {**B, "only_b": (0.9, 0.9)})
    out = str(tmp_path / "table.csv")
    assert compare_runs.main([f"base={a}", f"new={b}", "--metrics", "dice", "--output", out]) == 0
    text = capsys.readouterr().out
    assert "8 shared case(s); 2 dropped as unpaired (only in base: only_a; only in new: only_b)" in text
    assert "| 1 liver | 8 |" in text and "zero_method='wilcox'" in text
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["comparison"], r["class"]) for r in rows] == [("new vs base", "1"), ("new vs base", "2"), ("new vs base", "mean")]


def test_refuses_inputs_that_cannot_be_paired(tmp_path, capsys):
    a = write_metrics(tmp_path / "a" / "metrics.csv", A)
    other_cases = write_metrics(tmp_path / "c" / "metrics.csv", {f"x_{i}": v for i, v in enumerate(B.values())})
    other_classes = write_metrics(tmp_path / "d" / "metrics.csv", B, classes={1: "liver", 2: "cyst"})
    assert compare_runs.main([f"A={a}", f"C={other_cases}"]) == 2
    err = capsys.readouterr().err
    assert "share no case" in err and "Traceback" not in err
    assert compare_runs.main([f"A={a}", f"D={other_classes}"]) == 2
    assert "classes" in capsys.readouterr().err
    assert compare_runs.main([f"A={a}"]) == 2
    assert "at least two" in capsys.readouterr().err
    assert compare_runs.main([f"A={a}", f"B={tmp_path / 'missing.csv'}"]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(CompareError, match="same classes"):
        load_run("A", [a, other_classes])


def test_infinite_hd95_is_left_out_and_counted(tmp_path):
    a = load_run("A", [write_metrics(tmp_path / "a" / "metrics.csv", A, hd95=4.0)])
    b_path = write_metrics(tmp_path / "b" / "metrics.csv", B, hd95=3.0)
    with open(b_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r["case"] == "case_0" and r["class"] == "1":
            r["hd95"] = "inf"  # a missed structure: test_seg.py writes inf
    with open(b_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    liver = row(compare(a, load_run("B", [b_path]), ["hd95"]), "hd95", 1)
    assert liver["n"] == 7 and liver["nonfinite_excluded"] == 1 and liver["mean_diff"] == pytest.approx(-1.0)

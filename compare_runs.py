"""Compare segmentation runs case by case: mean difference, bootstrap CI, Wilcoxon signed-rank test and Holm's
correction, per class and for the mean, on the cases they share.

The command line of :mod:`rep3d.commands.compare` (also installed as ``rep3d-compare``); the statistics are
:mod:`rep3d.compare`. ``python3 compare_runs.py --help`` lists the flags."""

from __future__ import annotations

import sys

from rep3d.commands.compare import (
    build_parser,
    main,
    run_comparison,
)
from rep3d.compare import (
    CompareError,
    compare,
    holm,
    load_run,
    paired_test,
)

__all__ = [
    "CompareError",
    "build_parser",
    "compare",
    "holm",
    "load_run",
    "main",
    "paired_test",
    "run_comparison",
]

if __name__ == "__main__":
    sys.exit(main())

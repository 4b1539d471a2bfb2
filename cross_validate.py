"""Cross-validate a training setup: every fold trained (resumable), out-of-fold predictions, pooled Dice / HD95,
and the held-out set predicted by the ensemble of the folds.

The command line of :mod:`rep3d.commands.cross_validate` (also installed as ``rep3d-cv``); the library is
:mod:`rep3d.training.cross_validation`. ``python3 cross_validate.py --help`` lists the flags."""

from __future__ import annotations

import sys

from rep3d.commands.cross_validate import (
    build_parser,
    cross_validate,
    main,
    parse_args,
)
from rep3d.training.cross_validation import (
    CrossValidationError,
    FoldPlan,
    plan_folds,
    summarize,
)

__all__ = [
    "CrossValidationError",
    "FoldPlan",
    "build_parser",
    "cross_validate",
    "main",
    "parse_args",
    "plan_folds",
    "summarize",
]

if __name__ == "__main__":
    sys.exit(main())

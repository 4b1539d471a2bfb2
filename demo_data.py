"""Write the synthetic demo dataset (:mod:`rep3d.data.demo`) to a folder."""

from __future__ import annotations

import sys

from rep3d.commands.demo import (
    main,
)
from rep3d.data.demo import (
    DEMO_CLASS_NAMES,
    DEMO_ROI,
    DEMO_ROOT_DEFAULT,
    DEMO_SIZE,
    DEMO_SPACING,
    DEMO_WINDOW,
    make_demo_case,
    make_demo_dataset,
)

__all__ = [
    "DEMO_CLASS_NAMES",
    "DEMO_ROI",
    "DEMO_ROOT_DEFAULT",
    "DEMO_SIZE",
    "DEMO_SPACING",
    "DEMO_WINDOW",
    "main",
    "make_demo_case",
    "make_demo_dataset",
]

if __name__ == "__main__":
    sys.exit(main())

"""Build the pre-processed store of a dataset ahead of training (memory-mapped arrays per case).

The command line of :mod:`rep3d.commands.preprocess` (also installed as ``rep3d-preprocess``); the
store itself is :mod:`rep3d.data.store`. ``python3 preprocess.py --help`` lists the flags."""

from __future__ import annotations

import sys

from rep3d.commands.preprocess import (
    build_parser,
    main,
    preprocess,
)

__all__ = [
    "build_parser",
    "main",
    "preprocess",
]

if __name__ == "__main__":
    sys.exit(main())

"""``demo_data.py``: write the synthetic demo dataset to a folder."""

from __future__ import annotations

import argparse

from rep3d.cli import HelpFormatter
from rep3d.data.demo import DEMO_ROOT_DEFAULT, DEMO_SIZE, make_demo_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--root", default=DEMO_ROOT_DEFAULT, help="output folder")
    parser.add_argument("--n_train", type=int, default=8)
    parser.add_argument("--n_val", type=int, default=2)
    parser.add_argument("--n_test", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=3, default=list(DEMO_SIZE), help="field of view in 2 mm voxels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = make_demo_dataset(args.root, args.n_train, args.n_val, args.n_test, tuple(args.size), args.seed)
    print(f"demo dataset in {root}")
    return 0

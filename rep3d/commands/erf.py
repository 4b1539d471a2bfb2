"""``erf_analysis.py``: the command line of the ERF / kernel study."""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import networks
from rep3d.analysis.study import ErfConfig, run_analysis


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags of :func:`main`."""
    p = argparse.ArgumentParser(
        prog="erf_analysis.py",
        description="Effective receptive fields and kernel statistics of REP3D / 3D UX-Net encoders: "
        "erf.json, erf.png and kernels.png in --output.",
    )
    p.add_argument("--trained_weights", nargs="+", required=True, metavar="F",
                   help="checkpoints written by main_train.py, and/or network names (e.g. REP3D REP3D_Vanilla) for "
                   "untrained networks; several are overlaid in the figures")
    p.add_argument("--output", required=True, help="folder for erf.json, erf.png and kernels.png")
    p.add_argument("--root", default=None, help="dataset folder: average over centre crops of its validation images "
                   "(pre-processed as the checkpoint's dataset). Default: random inputs in [0, 1)")
    p.add_argument("--cases", type=_positive_int, default=4, help="inputs averaged per network (default 4)")
    p.add_argument("--roi", type=_positive_int, nargs=3, default=None, metavar="N",
                   help="input size; default: the checkpoint's ROI, else 96 96 96. Not a sliding window: one crop per case")
    p.add_argument("--dataset", default=None, help="dataset preset (amos, demo, ...) for untrained networks with --root; "
                   "checkpoints use their own settings")
    p.add_argument("--labels", nargs="+", default=None, help="legend label per --trained_weights entry")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and of untrained networks")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default: cuda if visible)")
    g = p.add_argument_group("untrained networks", "shape of the networks named in --trained_weights (not for checkpoints, "
                             "which carry their own); default: the paper's")
    g.add_argument("--feature_size", type=_positive_int, nargs=4, default=None, metavar="C")
    g.add_argument("--depths", type=_positive_int, nargs=4, default=None, metavar="N")
    g.add_argument("--kernel_size", type=_positive_int, default=None)
    g.add_argument("--hidden_size", type=_positive_int, default=None)
    g.add_argument("--modulation", choices=("lrbm", "fixed", "none"), default=None,
                   help="kernel modulation; e.g. REP3D --modulation none is REP3D_Vanilla")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point. Exit codes: 0 done; 2 bad flags, missing files, unusable checkpoints."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = []
    for source in args.trained_weights:
        if os.path.isfile(source):
            continue
        try:
            names.append(networks.canonical_name(source))
        except ValueError:
            parser.error(
                f"--trained_weights {source}: no such file, and not a network name "
                f"({', '.join(networks.NETWORK_NAMES)})"
            )
    shape_flags = {k: getattr(args, k) for k in ("feature_size", "depths", "kernel_size", "hidden_size", "modulation")}
    shape_flags = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in shape_flags.items() if v is not None}
    if shape_flags and not names:
        parser.error(f"--{next(iter(shape_flags))} shapes untrained networks only; the checkpoints carry their own settings")
    if args.root is not None and not os.path.isdir(args.root):
        parser.error(f"--root {args.root}: folder not found")
    if args.labels is not None and len(args.labels) != len(args.trained_weights):
        parser.error(f"--labels: {len(args.labels)} labels for {len(args.trained_weights)} --trained_weights entries")
    cfg = ErfConfig(
        sources=list(args.trained_weights),
        output=args.output,
        root=args.root,
        cases=args.cases,
        roi=tuple(args.roi) if args.roi else None,
        dataset=args.dataset,
        labels=args.labels,
        seed=args.seed,
        device=args.device,
        network_options=shape_flags,
    )
    try:
        run_analysis(cfg)
    except ValueError as err:  # CheckpointError, DataError and our own: the message says what to change
        parser.error(str(err))
    return 0

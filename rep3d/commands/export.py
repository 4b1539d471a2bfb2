"""``export_model.py``: the command line of the exporters (ONNX / TorchScript, and MONAI bundles)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import networks
from rep3d.export.bundle import DEFAULT_VERSION, export_bundle
from rep3d.export.exporter import (
    DEFAULT_OPSET,
    DWCONV_CHOICES,
    FORMATS,
    OPSETS,
    ExportError,
    check_request,
    export_checkpoint,
)
from rep3d.fileio import WriteError
from rep3d.inference.checkpoint import InferenceError, expand_weights

#: ``--format bundle``: a MONAI bundle folder (rep3d.export.bundle); it may hold a TorchScript file too.
BUNDLE = "bundle"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Export a trained checkpoint (folded) to ONNX and/or TorchScript with a JSON sidecar, or as a MONAI bundle "
        "(one checkpoint, or a fold ensemble), and check the export against PyTorch.",
    )
    p.add_argument("--trained_weights", required=True, nargs="+", metavar="WEIGHTS",
                   help="checkpoint .pth written by main_train.py; for --format bundle also several checkpoints or a run folder whose "
                   "sub-folders hold one best_metric_model.pth each (cross-validation folds), exported as one ensemble")  # fmt: skip
    p.add_argument("--output", required=True, help="folder for model.onnx / model.ts and model.json, or the bundle folder (its name is the bundle's)")
    p.add_argument("--format", nargs="+", default=["onnx"], metavar="FORMAT",
                   help=f"one or more of: {', '.join(FORMATS)}, or {BUNDLE} (a MONAI bundle; with torchscript also models/model.ts "
                   "inside it) (default: onnx)")  # fmt: skip
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, one of {', '.join(map(str, OPSETS))} (default: {DEFAULT_OPSET})")
    p.add_argument("--dwconv", choices=DWCONV_CHOICES, default="auto",
                   help="depthwise convolutions exported: native (dynamic spatial sizes), fft (ONNX DFT; spatial size fixed to the ROI, "
                   "batch dynamic; ONNX only) or auto: for ONNX, fft for kernels larger than 7 (REP3D's 21), native otherwise (the "
                   "faster in ONNX Runtime on the CPU, benchmarks/RESULTS.md); native for TorchScript (default: auto). "
                   "A bundle's network picks its path where it runs")  # fmt: skip
    p.add_argument("--static", action="store_true", help="export for the ROI's shape only (batch 1) instead of dynamic batch and spatial axes")
    p.add_argument("--bundle_name", default=None, help="--format bundle: the name in its metadata (default: the --output folder's name)")
    p.add_argument("--bundle_version", default=DEFAULT_VERSION, help=f"--format bundle: its version (default: {DEFAULT_VERSION})")
    return p


def _check_formats(formats: Sequence[str], opset: int, dwconv: str) -> None:
    """Refuse unknown formats (naming all of them, bundle included) and bundles mixed with ONNX."""
    bad = [f for f in formats if f not in (*FORMATS, BUNDLE)]
    if bad:
        raise ExportError(f"--format {' '.join(bad)}: not supported; choose from {', '.join(FORMATS)}, {BUNDLE}")
    if BUNDLE in formats:
        others = [f for f in formats if f not in (BUNDLE, "torchscript")]
        if others:
            raise ExportError(f"--format {BUNDLE} {' '.join(others)}: a bundle holds model.pt and, with torchscript, model.ts; export ONNX in a separate run (--format onnx)")
        return
    check_request(formats, opset, dwconv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for problems the user can fix)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        _check_formats(args.format, args.opset, args.dwconv)
        if BUNDLE in args.format:
            meta = export_bundle(args.trained_weights, args.output, torchscript="torchscript" in args.format, name=args.bundle_name, version=args.bundle_version)
            print(f"wrote the MONAI bundle {meta['name']} ({', '.join(meta['rep3d']['files'])}, configs/, scripts/, docs/README.md) to {args.output}")
            return 0
        paths = expand_weights(args.trained_weights)
        if len(paths) != 1:
            raise ExportError(f"--trained_weights: {len(paths)} checkpoints; --format {' '.join(args.format)} exports one. Pass one, or --format {BUNDLE} for a fold ensemble")
        sidecar = export_checkpoint(paths[0], args.output, args.format, args.opset, args.dwconv, dynamic=not args.static)
    except (ExportError, InferenceError, networks.CheckpointError, WriteError) as err:
        print(f"export_model.py: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"export_model.py: error: {err.name or err} is not installed: pip install -r requirements-deploy.txt", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(f['path'] for f in sidecar['files'].values())} and model.json to {args.output}")
    return 0

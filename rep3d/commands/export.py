"""``export_model.py``: the command line of the exporter."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import networks
from rep3d.export.exporter import (
    DEFAULT_OPSET,
    DWCONV_CHOICES,
    FORMATS,
    OPSETS,
    ExportError,
    check_request,
    export_checkpoint,
)
from rep3d.inference.checkpoint import InferenceError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a trained checkpoint (folded) to ONNX and/or TorchScript with a JSON sidecar, and check it against PyTorch.")
    p.add_argument("--trained_weights", required=True, help="checkpoint .pth written by main_train.py")
    p.add_argument("--output", required=True, help="folder for model.onnx / model.ts and model.json")
    p.add_argument("--format", nargs="+", default=["onnx"], metavar="FORMAT", help=f"one or more of: {', '.join(FORMATS)} (default: onnx)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, one of {', '.join(map(str, OPSETS))} (default: {DEFAULT_OPSET})")
    p.add_argument("--dwconv", choices=DWCONV_CHOICES, default="auto",
                   help="depthwise convolutions exported: native (dynamic spatial sizes), fft (ONNX DFT; spatial size fixed to the ROI, "
                   "batch dynamic; ONNX only) or auto: for ONNX, fft for kernels larger than 7 (REP3D's 21), native otherwise (the "
                   "faster in ONNX Runtime on the CPU, benchmarks/RESULTS.md); native for TorchScript (default: auto)")  # fmt: skip
    p.add_argument("--static", action="store_true", help="export for the ROI's shape only (batch 1) instead of dynamic batch and spatial axes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for problems the user can fix)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        check_request(args.format, args.opset, args.dwconv)
        sidecar = export_checkpoint(args.trained_weights, args.output, args.format, args.opset, args.dwconv, dynamic=not args.static)
    except (ExportError, InferenceError, networks.CheckpointError) as err:
        print(f"export_model.py: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"export_model.py: error: {err.name or err} is not installed: pip install -r requirements-deploy.txt", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(f['path'] for f in sidecar['files'].values())} and model.json to {args.output}")
    return 0

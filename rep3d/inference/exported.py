"""Reading an export (``model.json`` and its ONNX / TorchScript file) into a callable model."""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
import torch

#: Version of the ``model.json`` sidecar that :func:`load_export` reads.
SIDECAR_VERSION = 1


class ExportError(ValueError):
    """A request the exporter refuses, or an export that failed its check; the message says what to do."""


def export_runner(fmt: str, path: str, threads: int | None = None, device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable that runs the exported file on a torch tensor and returns a torch tensor."""
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if torch.device(device).type == "cuda" else ["CPUExecutionProvider"]
        providers = [p for p in providers if p in ort.get_available_providers()]
        session = ort.InferenceSession(path, opts, providers=providers)
        name = session.get_inputs()[0].name
        # an export whose batch axis could not be made dynamic takes one window at a time
        fixed_batch = session.get_inputs()[0].shape[0] if isinstance(session.get_inputs()[0].shape[0], int) else None

        def run(x: torch.Tensor) -> torch.Tensor:
            device = x.device
            x = x.detach().to("cpu", torch.float32).contiguous()
            parts = [x] if fixed_batch is None or x.shape[0] == fixed_batch else list(x.split(fixed_batch))
            out = np.concatenate([session.run(None, {name: p.numpy()})[0] for p in parts])
            return torch.from_numpy(out).to(device)

        run.session = session  # type: ignore[attr-defined]
        return run
    module = torch.jit.load(path, map_location=device).eval()

    def run_ts(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x.float())

    return run_ts


def load_export(path: str, device: torch.device | str = "cpu", threads: int | None = None, fmt: str | None = None) -> tuple[dict, Callable[[torch.Tensor], torch.Tensor]]:
    """Read an export's ``model.json`` and open one of its files.

    Args:
        path: the sidecar.
        device: where the TorchScript module runs (ONNX Runtime: CUDA provider when asked and installed).
        threads: CPU threads of ONNX Runtime.
        fmt: ``onnx`` or ``torchscript``; default ONNX when onnxruntime is installed, else TorchScript.

    Returns:
        ``(sidecar, run)`` where ``run(x)`` maps an (N, C, X, Y, Z) float tensor to logits.
    """
    with open(path) as f:
        sidecar = json.load(f)
    if sidecar.get("format") != "rep3d-export" or int(sidecar.get("format_version", 0)) > SIDECAR_VERSION:
        raise ExportError(f"{path}: not an export sidecar this code reads (format {sidecar.get('format')!r} v{sidecar.get('format_version')})")
    files = sidecar["files"]
    if fmt is None:
        try:
            import onnxruntime  # noqa: F401

            has_ort = True
        except ImportError:
            has_ort = False
        fmt = "onnx" if "onnx" in files and has_ort else "torchscript" if "torchscript" in files else "onnx"
    if fmt not in files:
        raise ExportError(f"{path}: holds no {fmt} file (it has {', '.join(files)})")
    folder = os.path.dirname(os.path.abspath(path))
    return sidecar, export_runner(fmt, os.path.join(folder, files[fmt]["path"]), threads=threads, device=device)

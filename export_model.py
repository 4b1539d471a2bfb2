"""Export a trained checkpoint (folded) to ONNX and/or TorchScript with a JSON sidecar, or as a MONAI
bundle (``--format bundle``: one checkpoint, or a run folder's folds as an ensemble).

The command line of :mod:`rep3d.commands.export` (also installed as ``rep3d-export``); the exporters are
:mod:`rep3d.export.exporter` and :mod:`rep3d.export.bundle`."""

from __future__ import annotations

import sys

from rep3d.commands.export import (
    main,
)
from rep3d.export.exporter import (
    DEFAULT_OPSET,
    FORMATS,
    OPSETS,
    TOLERANCE,
    check_request,
    deploy_model,
    export_checkpoint,
    export_onnx,
    export_torchscript,
    relative_error,
)
from rep3d.inference.exported import (
    ExportError,
    load_export,
)

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "FORMATS",
    "OPSETS",
    "TOLERANCE",
    "check_request",
    "deploy_model",
    "export_checkpoint",
    "export_onnx",
    "export_torchscript",
    "load_export",
    "main",
    "relative_error",
]

if __name__ == "__main__":
    sys.exit(main())

"""Predict volumes with trained checkpoints (or an export) in each input's native space, and score them.

The command line of :mod:`rep3d.commands.predict` (also installed as ``rep3d-predict``); the library is
:mod:`rep3d.inference` (:class:`rep3d.inference.predictor.Predictor` for use from Python)."""

from __future__ import annotations

import sys

from rep3d.commands.predict import (
    build_parser,
    main,
    parse_args,
)
from rep3d.inference.checkpoint import (
    InferenceError,
    check_ensemble,
    expand_weights,
    load_model,
    resolve_checkpoint,
)
from rep3d.inference.postprocess import (
    POSTPROCESS_CHOICES,
    decide_postprocessing,
    keep_largest_component,
)
from rep3d.inference.predictor import (
    Predictor,
)
from rep3d.inference.run import (
    resolve_inputs,
    run_inference,
)
from rep3d.inference.sliding_window import (
    ensemble_probabilities,
    predict_volume,
)
from rep3d.inference.writer import (
    native_probabilities,
    save_like,
)
from rep3d.metrics import (
    case_metrics,
    metrics_table,
    summarize_metrics,
    write_metrics,
)

__all__ = [
    "InferenceError",
    "POSTPROCESS_CHOICES",
    "Predictor",
    "build_parser",
    "case_metrics",
    "check_ensemble",
    "decide_postprocessing",
    "ensemble_probabilities",
    "expand_weights",
    "keep_largest_component",
    "load_model",
    "main",
    "metrics_table",
    "native_probabilities",
    "parse_args",
    "predict_volume",
    "resolve_checkpoint",
    "resolve_inputs",
    "run_inference",
    "save_like",
    "summarize_metrics",
    "write_metrics",
]

if __name__ == "__main__":
    sys.exit(main())

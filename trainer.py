"""The trainer, importable as before: ``from trainer import Trainer``. It lives in
:mod:`rep3d.training.trainer`."""

from __future__ import annotations

from rep3d.training.distributed import (
    sync_buffers_from_rank0,
)
from rep3d.training.monitor import (
    LoopTimer,
    plot_curves,
)
from rep3d.training.schedule import (
    lr_factor,
)
from rep3d.training.trainer import (
    BEST_CKPT,
    LAST_CKPT,
    OOM_ADVICE,
    Trainer,
    TrainingError,
)

__all__ = [
    "BEST_CKPT",
    "LAST_CKPT",
    "LoopTimer",
    "OOM_ADVICE",
    "Trainer",
    "TrainingError",
    "lr_factor",
    "plot_curves",
    "sync_buffers_from_rank0",
]

"""Train a segmentation network (REP3D by default) with the Rep3D paper's setup.

The command line of :mod:`rep3d.commands.train` (also installed as ``rep3d-train``); the training
itself is :class:`rep3d.training.trainer.Trainer`. ``python3 main_train.py --help`` lists the flags."""

from __future__ import annotations

import sys

from rep3d.commands.train import (
    DEMO_DEFAULTS,
    build_parser,
    main,
    make_trainer,
    parse_args,
    resolve_run,
    run_config_from_args,
    train,
)
from rep3d.config import (
    default_warmup,
)
from rep3d.training.distributed import (
    sync_buffers_from_rank0,
)
from rep3d.training.schedule import (
    lr_factor,
)
from rep3d.training.trainer import (
    OOM_ADVICE,
    TrainingError,
)

__all__ = [
    "DEMO_DEFAULTS",
    "OOM_ADVICE",
    "TrainingError",
    "build_parser",
    "default_warmup",
    "lr_factor",
    "main",
    "make_trainer",
    "parse_args",
    "resolve_run",
    "run_config_from_args",
    "sync_buffers_from_rank0",
    "train",
]

if __name__ == "__main__":
    sys.exit(main())

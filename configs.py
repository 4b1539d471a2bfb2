"""The run configuration, importable as before: ``from configs import RunConfig``. It lives in
:mod:`rep3d.config`."""

from __future__ import annotations

from rep3d.config import (
    FORMAT_VERSION,
    LOADERS,
    LOSSES,
    OPTIMIZERS,
    ConfigError,
    DataConfig,
    NetworkConfig,
    RunConfig,
    SlidingWindowConfig,
    TrainConfig,
    default_warmup,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "FORMAT_VERSION",
    "LOADERS",
    "LOSSES",
    "NetworkConfig",
    "OPTIMIZERS",
    "RunConfig",
    "SlidingWindowConfig",
    "TrainConfig",
    "default_warmup",
]

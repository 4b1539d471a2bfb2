"""Typed, frozen run configuration: what a training run is, independent of how it was asked for.

A run is four sections, each a frozen dataclass:

* :class:`NetworkConfig`: registry name, input channels, classes, constructor options;
* :class:`DataConfig`: the dataset's pre-processing (:class:`~load_datasets_transforms.DatasetConfig`,
  which also holds the ROI), where the cases are and how they are loaded and sampled;
* :class:`TrainConfig`: optimisation, schedule, loss, precision, output folder;
* :class:`SlidingWindowConfig`: how validation and inference windows are run (the window is the ROI).

``main_train.py`` builds a :class:`RunConfig` from its flags in one place and the Trainer works from it
alone. Checkpoints store ``RunConfig.to_dict()`` under ``"config"`` with ``"format_version"``;
:meth:`RunConfig.from_checkpoint` reads that back, and also the first format (flags stored as
``"args"``, written before format 2), so older runs still resume and predict::

    cfg = RunConfig.from_checkpoint(networks.read_checkpoint("runs/demo/best_metric_model.pth"))
    model = cfg.network.build()
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch.nn as nn

import networks
from rep3d.data.dataset_config import DatasetConfig
from rep3d.fileio import jsonable

#: Checkpoint format written now. 1: flags as ``"args"`` (and ``network``/``network_kwargs``/``dataset``);
#: 2: the sections of :class:`RunConfig` under ``"config"``.
FORMAT_VERSION = 2


LOSSES = ("dicece", "dice_focal", "ce", "dicece_nnunet")


OPTIMIZERS = ("AdamW", "Adam", "SGD")


LOADERS = ("auto", "gpu", "workers")


LR_SCHEDULES = ("warmup_cosine", "constant", "poly")
#: ``--cuda_graph`` (:mod:`rep3d.training.graphs`)
CUDA_GRAPH_SETTINGS = ("auto", "on", "off")


#: Named sets of training defaults (``--recipe``): the value of each flag a recipe sets when the flag is
#: not given. ``paper``: the Rep3D paper's AdamW setup (the flags' own defaults). ``nnunet``: nnU-Net v2's
#: nnUNetTrainer: SGD (Nesterov, momentum 0.99), lr 1e-2, weight decay 3e-5, polynomial decay (exponent
#: 0.9) without warm-up, Dice (foreground classes, per case, smooth 1e-5) + cross-entropy, gradient norm
#: clipped at 12, deep supervision over the decoder's resolutions (for networks that have it).
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"optim": "AdamW", "lr": 1e-4, "weight_decay": 0.08, "lr_schedule": "warmup_cosine", "warmup_iters": None,
              "loss": "dicece", "grad_clip": None, "deep_supervision": False},
    "nnunet": {"optim": "SGD", "lr": 1e-2, "weight_decay": 3e-5, "lr_schedule": "poly", "warmup_iters": 0,
               "loss": "dicece_nnunet", "grad_clip": 12.0, "deep_supervision": True},
}  # fmt: skip


def default_recipe(network: str) -> str:
    """The recipe a network trains with unless ``--recipe`` says otherwise: nnU-Net's for nnUNet, the paper's for the rest."""
    return "nnunet" if networks.canonical_name(network) == "nnUNet" else "paper"


class ConfigError(ValueError):
    """Settings that cannot work together; the message names each flag and what to pass instead."""

    def __init__(self, problems: Sequence[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


def _tuple(value: Any, cast: type = float) -> tuple | None:
    return None if value is None else tuple(cast(v) for v in value)


def default_warmup(max_iter: int) -> int:
    """Warm-up iterations when none are given: min(1000, 5% of ``max_iter``)."""
    return min(1000, max(0, int(0.05 * max_iter)))


@dataclass(frozen=True)
class NetworkConfig:
    """Which network, with which options.

    Args:
        name: registry name (see :data:`networks.NETWORK_NAMES`; case-insensitive on input).
        in_channels: image channels.
        out_channels: classes, background included.
        options: keywords of :func:`networks.build_network` that differ from the network's defaults
            (e.g. ``{"kernel_size": 7, "feature_size": [16, 32, 64, 128]}``). ``dwconv`` only picks how
            the same convolution is computed; it is not part of the model.
    """

    name: str = "REP3D"
    in_channels: int = 1
    out_channels: int = 16
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", networks.canonical_name(self.name))
        opts = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(self.options).items() if v is not None}
        object.__setattr__(self, "options", opts)

    @property
    def architecture(self) -> dict:
        """The options that shape the weights (everything but ``dwconv`` and ``deploy``)."""
        return {k: v for k, v in self.options.items() if k not in ("dwconv", "deploy")}

    def build(self, **extra: Any) -> nn.Module:
        """The network (training form); ``extra`` keywords win over :attr:`options`."""
        return networks.build_network(self.name, self.in_channels, self.out_channels, **{**self.options, **extra})


@dataclass(frozen=True)
class DataConfig:
    """The data a run sees and how it is fed.

    Args:
        dataset: pre-processing, classes and ROI (a preset or the user's own).
        root: dataset folder (``None`` with ``datalist`` None: the generated demo dataset).
        datalist: optional MONAI datalist JSON.
        fold: validation fold when the cases are split automatically or by ``fold`` keys.
        batch_size: cases per iteration.
        crop_sample: random crops per case (the batch holds ``batch_size * crop_sample`` crops).
        cache_rate: share of cases kept pre-processed in memory; ``None``: the dataset's default.
        num_workers: loader worker processes; ``None``: one per core but one, at most 8.
        loader: ``"auto"`` (GPU cache when it fits, else CPU workers), ``"gpu"`` (cache and augment on
            the GPU), ``"workers"`` (CPU worker processes).
        crop_ratios: per-class share of crop centres (``RandCropByLabelClassesd``), one per class
            with background first; ``None``: the paper's 1:1 foreground/background crops.
        plan: the plan ``dataset`` was derived from (``planning.Plan.to_dict()``) when no preset was
            given, kept for the record (``plan.json``); ``None`` for presets.
        preprocessed: where the pre-processed store lives (``--preprocessed``): ``"auto"`` (``None`` reads
            as it: ``$REP3D_PREPROCESSED``, else the user's cache folder), a base folder, or ``"off"``
            (pre-process into memory at start, no store); see :mod:`rep3d.data.store`.
    """

    dataset: DatasetConfig
    root: str | None = None
    datalist: str | None = None
    fold: int = 0
    batch_size: int = 1
    crop_sample: int = 2
    cache_rate: float | None = None
    num_workers: int | None = None
    loader: str = "auto"
    crop_ratios: tuple[float, ...] | None = None
    plan: Mapping[str, Any] | None = None
    preprocessed: str | None = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_ratios", _tuple(self.crop_ratios))
        object.__setattr__(self, "preprocessed", "auto" if self.preprocessed is None else str(self.preprocessed))

    @property
    def roi(self) -> tuple[int, int, int]:
        return tuple(self.dataset.roi)  # type: ignore[return-value]

    @property
    def is_demo(self) -> bool:
        return self.root is None and self.datalist is None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["dataset"] = self.dataset.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataConfig":
        values = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        values["dataset"] = DatasetConfig(**{k: v for k, v in dict(d["dataset"]).items() if k in {f.name for f in dataclasses.fields(DatasetConfig)}})
        return cls(**values)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping of a run (the paper's settings are the defaults).

    Args:
        output: run folder.
        max_iter: training iterations.
        eval_step: validate and checkpoint every this many iterations (and at the end).
        lr: peak learning rate.
        optim: ``AdamW`` (betas 0.9/0.999, eps 1e-8), ``Adam`` or ``SGD`` (momentum 0.99, Nesterov).
        weight_decay: the paper's AdamW value 0.08.
        lr_schedule: ``warmup_cosine`` (linear warm-up, cosine decay to 0) or ``constant``.
        warmup_iters: warm-up length; ``None`` derives it from ``max_iter`` each time (see :attr:`warmup`).
        seed: seed of weights, crops and shuffling.
        amp: ``auto``, ``bf16``, ``fp16`` or ``off``.
        compile: run the training step through ``torch.compile``.
        cuda_graph: replay the network's forward and backward as CUDA graphs: ``auto`` (where it can
            work: CUDA, one process, no ``compile``), ``on`` or ``off`` (:mod:`rep3d.training.graphs`).
        max_nonfinite: stop after this many non-finite losses in a row.
        loss: ``dicece`` (the paper's), ``dice_focal``, ``ce`` or ``dicece_nnunet`` (nnU-Net's: Dice over the
            foreground classes per case, smooth 1e-5, + cross-entropy).
        class_weights: per-class weights of the cross-entropy / focal term, background first.
        pretrained_weights: checkpoint to take initial weights from (fine-tuning; a new run).
        freeze_encoder: keep the encoder fixed for this many first iterations (0: never).
        gpu: CUDA index for a single process, -1 for the CPU.
        recipe: the named set of defaults the run started from (:data:`RECIPES`), for the record; the
            fields above hold the values used.
        grad_clip: clip the gradient norm to this before each step (nnU-Net: 12); ``None``: no clipping.
        deterministic: ``torch.use_deterministic_algorithms(True, warn_only=True)`` and deterministic cuDNN.
    """

    output: str = "runs/demo"
    max_iter: int = 60000
    eval_step: int = 500
    lr: float = 1e-4
    optim: str = "AdamW"
    weight_decay: float = 0.08
    lr_schedule: str = "warmup_cosine"
    warmup_iters: int | None = None
    seed: int = 0
    amp: str = "auto"
    compile: bool = False
    cuda_graph: str = "auto"
    max_nonfinite: int = 5
    loss: str = "dicece"
    class_weights: tuple[float, ...] | None = None
    pretrained_weights: str | None = None
    freeze_encoder: int = 0
    gpu: int | None = 0
    recipe: str = "paper"
    grad_clip: float | None = None
    deterministic: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_weights", _tuple(self.class_weights))

    @property
    def warmup(self) -> int:
        """``warmup_iters``, or min(1000, 5% of ``max_iter``) when it was not given."""
        return default_warmup(self.max_iter) if self.warmup_iters is None else int(self.warmup_iters)


@dataclass(frozen=True)
class SlidingWindowConfig:
    """Sliding-window validation/inference (the window is the dataset's ROI).

    Args:
        sw_batch_size: windows per forward pass.
        overlap: overlap of neighbouring windows, in [0, 1).
        mode: blending of overlapping windows, ``gaussian`` or ``constant``.
    """

    sw_batch_size: int = 4
    overlap: float = 0.5
    mode: str = "gaussian"


_SECTIONS = {"network": NetworkConfig, "data": DataConfig, "training": TrainConfig, "sliding_window": SlidingWindowConfig}


def _plain(cls: type, d: Mapping[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; what checkpoints store (see the module docstring)."""

    network: NetworkConfig
    data: DataConfig
    training: TrainConfig
    sliding_window: SlidingWindowConfig = field(default_factory=SlidingWindowConfig)

    def replace(self, **sections: Any) -> "RunConfig":
        """A copy with whole sections, or fields of them given as ``{"training": {"lr": 1e-5}}``, replaced."""
        new = {}
        for name, value in sections.items():
            if isinstance(value, Mapping):
                value = dataclasses.replace(getattr(self, name), **value)
            new[name] = value
        return dataclasses.replace(self, **new)

    def check(self) -> None:
        """Raise :class:`ConfigError` listing every impossible value, each with its flag."""
        t, d, s = self.training, self.data, self.sliding_window
        problems = []
        for flag, v, low in (
            ("batch_size", d.batch_size, 1), ("crop_sample", d.crop_sample, 1), ("max_iter", t.max_iter, 1),
            ("eval_step", t.eval_step, 1), ("sw_batch_size", s.sw_batch_size, 1), ("max_nonfinite", t.max_nonfinite, 1),
            ("num_workers", d.num_workers, 0), ("freeze_encoder", t.freeze_encoder, 0),
        ):  # fmt: skip
            if v is not None and v < low:
                problems.append(f"--{flag} must be >= {low}, got {v}")
        if not (t.lr > 0 and math.isfinite(t.lr)):
            problems.append(f"--lr must be a positive number, got {t.lr}")
        if t.weight_decay < 0:
            problems.append(f"--weight_decay must be >= 0, got {t.weight_decay}")
        if t.warmup_iters is not None and not 0 <= t.warmup_iters < t.max_iter:
            problems.append(f"--warmup_iters must be in [0, --max_iter) = [0, {t.max_iter}), got {t.warmup_iters}")
        if t.optim not in OPTIMIZERS:
            problems.append(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {t.optim}")
        if t.loss not in LOSSES:
            problems.append(f"--loss must be one of {', '.join(LOSSES)}, got {t.loss}")
        if t.recipe not in RECIPES:
            problems.append(f"--recipe must be one of {', '.join(RECIPES)}, got {t.recipe}")
        if t.grad_clip is not None and not (t.grad_clip > 0 and math.isfinite(t.grad_clip)):
            problems.append(f"--grad_clip must be a positive number (or not given: no clipping), got {t.grad_clip}")
        if t.lr_schedule not in LR_SCHEDULES:
            problems.append(f"--lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {t.lr_schedule}")
        if t.cuda_graph not in CUDA_GRAPH_SETTINGS:
            problems.append(f"--cuda_graph must be one of {', '.join(CUDA_GRAPH_SETTINGS)}, got {t.cuda_graph}")
        if d.loader not in LOADERS:
            problems.append(f"--loader must be one of {', '.join(LOADERS)}, got {d.loader}")
        if not 0.0 <= s.overlap < 1.0:
            problems.append(f"--val_overlap must be in [0, 1), got {s.overlap}")
        if d.cache_rate is not None and not 0.0 <= d.cache_rate <= 1.0:
            problems.append(f"--cache_rate must be in [0, 1], got {d.cache_rate}")
        n = d.dataset.num_classes
        if n != self.network.out_channels:
            problems.append(f"the network has {self.network.out_channels} outputs but the dataset {n} classes")
        for flag, values in (("class_weights", t.class_weights), ("crop_ratios", d.crop_ratios)):
            if values is None:
                continue
            if len(values) != n:
                problems.append(f"--{flag} needs one value per class, background first ({n}: {', '.join(d.dataset.class_names)}), got {len(values)}")
            elif any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
                problems.append(f"--{flag} values must be >= 0 and not all 0, got {list(values)}")
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict:
        """JSON- and ``weights_only``-safe sections (lists, numbers, strings)."""
        out = {}
        for name in _SECTIONS:
            section = getattr(self, name)
            d = section.to_dict() if hasattr(section, "to_dict") else {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
            out[name] = jsonable(d)
        return out

    def checkpoint(self, state_dict: Mapping[str, Any], step: int) -> dict:
        """The core of a checkpoint of this run (format :data:`FORMAT_VERSION`): weights, configuration
        and step; what :meth:`from_checkpoint` and ``test_seg.py`` read. The Trainer adds its own state."""
        return {"format_version": FORMAT_VERSION, "config": self.to_dict(), "state_dict": dict(state_dict), "step": int(step)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        """Inverse of :meth:`to_dict` (unknown fields are ignored, missing ones take defaults)."""
        missing = [s for s in ("network", "data") if s not in d]
        if missing:
            raise ConfigError(f"the stored run configuration lacks the sections {missing}")
        return cls(
            network=_plain(NetworkConfig, d["network"]),
            data=DataConfig.from_dict(d["data"]),
            training=_plain(TrainConfig, d.get("training") or {}),
            sliding_window=_plain(SlidingWindowConfig, d.get("sliding_window") or {}),
        )

    @classmethod
    def from_checkpoint(cls, ckpt: Any, path: str = "checkpoint") -> "RunConfig | None":
        """The run configuration stored in a checkpoint of ours, any format; ``None`` for checkpoints
        without one (bare state dicts, the authors' release).

        Raises:
            networks.CheckpointError: a format newer than this code, or settings that do not parse.
        """
        if not isinstance(ckpt, Mapping):
            return None
        version = int(ckpt.get("format_version", 1) or 1)
        if version > FORMAT_VERSION:
            raise networks.CheckpointError(
                f"{path} was written by a newer version of this code (checkpoint format {version}, this code reads up to "
                f"{FORMAT_VERSION}): update the code (git pull) to use it"
            )
        try:
            if "config" in ckpt:
                return cls.from_dict(ckpt["config"])
            if "network" in ckpt and "dataset" in ckpt:
                return cls._from_v1(ckpt)
        except (TypeError, ValueError, KeyError) as err:
            raise networks.CheckpointError(f"{path}: its stored settings cannot be read ({err}); pass the .pth main_train.py wrote") from None
        return None

    @classmethod
    def _from_v1(cls, ckpt: Mapping[str, Any]) -> "RunConfig":
        args = dict(ckpt.get("args") or {})
        dataset = DatasetConfig(**{k: v for k, v in dict(ckpt["dataset"]).items() if k in {f.name for f in dataclasses.fields(DatasetConfig)}})
        data_keys = {f.name for f in dataclasses.fields(DataConfig)} - {"dataset", "loader", "crop_ratios"}
        train_keys = {f.name for f in dataclasses.fields(TrainConfig)} - {"loss", "class_weights", "freeze_encoder", "pretrained_weights"}
        return cls(
            network=NetworkConfig(ckpt["network"], int(ckpt.get("in_channels", 1)), int(ckpt["out_channels"]), dict(ckpt.get("network_kwargs") or {})),
            data=DataConfig(dataset=dataset, **{k: args[k] for k in data_keys if k in args}),
            # A version-1 run stored its derived warm-up; it is derived again from max_iter now.
            training=TrainConfig(**{k: args[k] for k in train_keys - {"warmup_iters"} if k in args and args[k] is not None}),
            sliding_window=SlidingWindowConfig(**{k: args[k] for k in ("sw_batch_size", "overlap") if k in args}),
        )

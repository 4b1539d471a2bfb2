"""The training loop of Rep3D and its baselines, as a class to extend.

:class:`Trainer` works from a :class:`configs.RunConfig` alone (``main_train.py`` builds one from its
flags). Each concern is one method that a subclass may override, as in nnU-Net v2's trainer:

* :meth:`Trainer.build_network`, :meth:`Trainer.build_loss`, :meth:`Trainer.configure_optimizers`,
  :meth:`Trainer.build_data`;
* :meth:`Trainer.train_step` (one optimisation step on one batch), :meth:`Trainer.validate`;
* :meth:`Trainer.state_dict` / :meth:`Trainer.load_state_dict` (one symmetric pair, for checkpoints and
  resume), :meth:`Trainer.save_checkpoint`;
* hooks :meth:`Trainer.on_train_start`, :meth:`Trainer.on_iteration_end`,
  :meth:`Trainer.on_validation_end`, :meth:`Trainer.on_train_end`;
* :meth:`Trainer.run`, the skeleton that calls them.

Example, a trainer with another loss::

    class FocalTrainer(Trainer):
        def build_loss(self):
            return monai.losses.FocalLoss(to_onehot_y=True, use_softmax=True)

    summary = FocalTrainer(run_config).run()
"""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import shlex
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn

import networks
from rep3d.analysis.kernels import KernelDynamics
from rep3d.checkpoints import load_fitting_weights
from rep3d.config import ConfigError, RunConfig
from rep3d.data.cases import describe_validation, list_cases
from rep3d.data.dataset_config import DataError
from rep3d.data.demo import DEMO_ROOT_DEFAULT, make_demo_dataset
from rep3d.data.loader_choice import choose_loader
from rep3d.data.loaders import get_loaders
from rep3d.data.store import resolve_base
from rep3d.fileio import (
    FolderLock,
    check_writable,
    jsonable,
    remove_stale_temporaries,
    save_checkpoint_atomic,
    write_csv,
    write_json,
)
from rep3d.inference.sliding_window import sliding_window_predict
from rep3d.metrics import DiceAccumulator, dice_table
from rep3d.planning import Plan
from rep3d.training.graphs import StepGraph, graph_blockers
from rep3d.runtime import (
    autocast,
    is_oom,
    resolve_amp,
    rng_state,
    select_device,
    set_rng_state,
    set_seed,
    slow_conv3d_warning,
    unwrap_model,
)
from rep3d.training.distributed import _Dist, sync_buffers_from_rank0
from rep3d.training.monitor import LoopTimer, plot_curves
from rep3d.training.reproducibility import (
    NondeterminismLog,
    describe_environment,
    enable_determinism,
    environment,
)
from rep3d.training.schedule import lr_factor

LAST_CKPT = "checkpoint_last.pth"


BEST_CKPT = "best_metric_model.pth"


OOM_ADVICE = (
    "lower one of: --roi (e.g. 64 64 64; a multiple of 16), --crop_sample (crops per case, default 2), "
    "--batch_size, --sw_batch_size (validation windows per pass), or enable mixed precision with --amp bf16/fp16 "
    "(not off); the GPU data cache (--loader gpu) also takes GPU memory"
)


# Share of the loop outside the training step above which the closing lines give advice.
OUTSIDE_STEP_ADVICE = 0.15


# Modules holding the encoder, per network family (for --freeze_encoder).
_ENCODER_ATTRS = ("rep3d", "uxnet_3d", "swinViT", "vit", "input_block", "downsamples", "bottleneck", "encoder", "stem", "enc_blocks", "down_blocks")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss kept being non-finite); the message says what to change."""


def _infinite(loader) -> Iterator[Any]:
    """Batches forever: each pass over the loader is a new epoch of random crops."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise DataError(["the training loader is empty. Fix: add training cases (imagesTr/labelsTr)"])


def _tensor(x: Any, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(x).as_subclass(torch.Tensor) if hasattr(x, "as_tensor") else x
    return x.to(device, non_blocking=True)


class Trainer:
    """Train one network as a :class:`configs.RunConfig` says.

    Args:
        config: the run.
        checkpoint: a full training checkpoint (``checkpoint_last.pth`` content) to resume from, or None.
        checkpoint_path: where ``checkpoint`` was read from (for messages).
        log: where messages go (default: print on rank 0).

    After :meth:`setup` (called by :meth:`run`) the attributes ``device``, ``model``, ``optimizer``,
    ``scheduler``, ``scaler``, ``loss_fn``, ``train_loader``, ``val_loader``, ``step`` and ``history``
    are set.
    """

    def __init__(
        self, config: RunConfig, checkpoint: Mapping[str, Any] | None = None, checkpoint_path: str | None = None, log: Callable[[str], None] | None = None
    ) -> None:
        config.check()
        self.config = config
        self.resume_from = dict(checkpoint) if checkpoint is not None else None
        self.checkpoint_path = checkpoint_path
        self._log = log or (lambda m: print(m, flush=True))
        self.step = 0
        self.best, self.best_step, self.best_metrics = -1.0, 0, {}
        self.history: dict = {"loss": [], "lr": [], "val_step": [], "val_dice": [], "val_per_class": []}
        self.config_changes: list = []
        self.train_time = 0.0
        self.nonfinite = 0
        self.data_wait = 0.0
        self.loader_reason = ""
        #: The command-line flags the run was started with (set by main_train.py), written as args.json.
        self.command_line: dict | None = None

    # ------------------------------------------------------------------ messages and paths

    def log(self, message: str) -> None:
        if self.dist.main:
            self._log(message)

    @property
    def output(self) -> str:
        return self.config.training.output

    def path(self, name: str) -> str:
        return os.path.join(self.output, name)

    # ------------------------------------------------------------------ building

    def build_network(self) -> nn.Module:
        """The network of ``config.network`` (weights of ``--pretrained_weights`` loaded by :meth:`setup`)."""
        net_cfg = self.config.network
        try:
            model = net_cfg.build()
            networks.check_roi(model, self.config.data.roi, net_cfg.in_channels)
        except ValueError as err:
            raise ConfigError(f"--network {net_cfg.name}: {err}") from None
        return model

    def build_loss(self) -> nn.Module:
        """``--loss``: DiceCE (the paper's), Dice + focal, or cross-entropy; ``--class_weights`` weigh
        the cross-entropy / focal term per class. Takes logits (N, C, ...) and labels (N, 1, ...)."""
        t = self.config.training
        weight = torch.tensor(t.class_weights, dtype=torch.float32) if t.class_weights is not None else None
        if t.loss == "dicece":
            from monai.losses import DiceCELoss

            return DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)
        if t.loss == "dice_focal":
            from monai.losses import DiceFocalLoss

            return DiceFocalLoss(to_onehot_y=True, softmax=True, weight=weight)
        if t.loss == "dicece_nnunet":
            from monai.losses import DiceCELoss

            # nnU-Net's DC_and_CE_loss (3d_fullres: batch_dice off): soft Dice of the foreground classes per case + CE
            return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, smooth_nr=1e-5, smooth_dr=1e-5, weight=weight)
        return _CrossEntropy(weight)

    def deep_supervision_loss(self, loss: nn.Module) -> nn.Module:
        """``loss`` applied to every output of a deeply supervised network (nnUNet with ``--deep_supervision
        on``) and summed with :meth:`deep_supervision_weights`: MONAI's ``DeepSupervisionLoss``, which
        downsamples the labels to each output by nearest neighbour ("nearest-exact", as nnU-Net's
        DownsampleSegForDSTransform does). Other networks: ``loss`` itself."""
        if not self.config.network.options.get("deep_supervision"):
            return loss
        from monai.losses import DeepSupervisionLoss

        levels = 1 + int(networks.unwrap_model(self.model).deep_supr_num)
        return DeepSupervisionLoss(loss, weights=self.deep_supervision_weights(levels))

    @staticmethod
    def deep_supervision_weights(levels: int) -> list[float]:
        """nnU-Net's loss weights of ``levels`` outputs, full resolution first: 1 / 2**i, the lowest
        resolution 0 (it is computed but not trained), normalised to sum 1 (5 levels: 8/15, 4/15, 2/15, 1/15, 0)."""
        weights = [0.5**i for i in range(levels)]
        if levels > 1:
            weights[-1] = 0.0
        return [w / sum(weights) for w in weights]

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimizer of ``--optim`` over all trainable parameters (the paper's AdamW settings) and
        the warm-up + cosine (or constant) schedule, stepped once per iteration."""
        t = self.config.training
        params = [p for p in self.model.parameters() if p.requires_grad]
        if t.optim == "AdamW":
            fused = {"fused": True} if self.device.type == "cuda" else {}  # one kernel per step instead of one per tensor
            opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay, **fused)
        elif t.optim == "Adam":
            opt = torch.optim.Adam(params, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=t.lr, momentum=0.99, nesterov=True, weight_decay=t.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t.max_iter, t.warmup, t.lr_schedule))
        return opt, sched

    def choose_loader(self):
        """Where the training batches are made (``load_datasets_transforms.LoaderChoice``): the GPU cache
        when the run is on CUDA and the cached volumes fit, else CPU workers; ``--loader`` forces one.
        Its ``reason`` goes into the start line."""

        d = self.config.data
        if d.loader == "gpu" and self.device.type != "cuda":
            raise ConfigError("--loader gpu (--cache_on_gpu) caches on a CUDA GPU but the run is on the CPU: drop it, or run on a GPU")
        # DDP ranks would each estimate against a GPU their neighbours are filling: workers unless asked.
        requested = "workers" if self.dist.enabled and d.loader == "auto" else d.loader
        try:
            return choose_loader(
                d.dataset, root=self._root(), datalist=d.datalist, fold=d.fold, device=self.device,
                cache_rate=d.cache_rate, requested=requested, num_workers=d.num_workers, store=resolve_base(d.preprocessed) is not None,
            )  # fmt: skip
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _root(self) -> str | None:

        d = self.config.data
        return DEMO_ROOT_DEFAULT if d.is_demo else d.root

    def build_data(self) -> tuple[Any, Any]:
        """Training and validation loaders (every case checked first; one DataError lists all problems).

        A resumed run reseeds the crops with the step, so that it does not replay the first ones. The
        pre-processed store (``--preprocessed``) is built or updated first (rank 0; the other ranks wait);
        what it did goes into the loader's reason, hence the start line and ``summary.json``."""
        d = self.config.data
        choice = self.choose_loader()
        self.loader_reason = choice.reason
        loaders = get_loaders(
            d.dataset, self._root(), roi=d.roi, crop_sample=d.crop_sample, batch_size=d.batch_size, cache_rate=choice.cache_rate,
            num_workers=choice.num_workers, datalist=d.datalist, fold=d.fold, device=choice.device, distributed=self.dist.enabled,
            seed=self.config.training.seed + self.step, crop_ratios=d.crop_ratios,
            augment_device=self.device if self.device.type == "cuda" else None, preprocessed=d.preprocessed, log=self.log,
        )  # fmt: skip
        store = getattr(loaders[0], "store", None)
        if getattr(loaders[0], "check_note", None):
            self.loader_reason += "; " + loaders[0].check_note
        if store is not None and store.report is not None:
            self.loader_reason += "; " + store.report.describe()
        elif store is None:
            self.loader_reason += "; no pre-processed store (--preprocessed off): the cases are pre-processed in memory (the cached share at start, the others at every draw)"
        return loaders

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the network's encoder (for ``--freeze_encoder``)."""
        net = networks.unwrap_model(self.model)
        params = [p for attr in _ENCODER_ATTRS if isinstance(getattr(net, attr, None), nn.Module) for p in getattr(net, attr).parameters()]
        if not params:
            raise ConfigError(f"--freeze_encoder: {self.config.network.name} has no encoder module this code knows; drop the flag")
        return params

    def load_pretrained(self, path: str) -> None:
        """Start from the weights of ``path``: every tensor whose name and shape fit is loaded; the others
        (an output head for another class count, ...) keep their initial values and are listed."""
        report = load_fitting_weights(self.model, path)
        if not report.loaded:
            raise networks.CheckpointError(f"--pretrained_weights {path}: no tensor fits {self.config.network.name} with these options; check --network and its options")
        self.log(report.describe(path))

    # ------------------------------------------------------------------ set-up and tear-down

    def setup(self) -> None:
        """Device, process group, model, loss, optimizer, state (resume or pretrained), data, logs."""
        t = self.config.training
        self.device = select_device(t.gpu)
        self.dist = _Dist(use_cuda=self.device.type == "cuda")
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.dist.main:
            # One writer per run folder, checked before any data is read: rank 0 holds the lock for the
            # run's life (the kernel drops it when the process dies, kill -9 included).
            check_writable(self.output)
            self._lock = FolderLock(self.output, "main_train.py").acquire()
            stale = remove_stale_temporaries(self.output)
            if stale:
                self.log(f"removed {len(stale)} temporary file(s) left by an interrupted write in {self.output}")
        if self.resume_from is None and os.path.isfile(self.path(LAST_CKPT)):
            raise ConfigError(
                f"{self.output} already holds a run ({LAST_CKPT}). Pass --resume to continue it, another --output "
                "to start a new one, or delete the folder"
            )
        self.amp_dtype = resolve_amp(t.amp, self.device)
        try:
            self.step_graph = StepGraph(t.cuda_graph, graph_blockers(self.device, self.dist.enabled, t.compile))
        except RuntimeError as err:
            raise ConfigError(str(err)) from None
        self.environment = environment()
        self.nondeterminism = NondeterminismLog().start() if t.deterministic else None
        if t.deterministic:
            enable_determinism()
        if self.config.data.is_demo:

            if self.dist.main:
                make_demo_dataset(DEMO_ROOT_DEFAULT)
            self.dist.barrier()
        # Model and optimizer state come before the data so that bad network settings fail fast.
        set_seed(t.seed + self.dist.rank)
        self.model = self.build_network()
        if t.pretrained_weights and self.resume_from is None:
            self.load_pretrained(t.pretrained_weights)
        self.model.to(self.device)
        self.loss_fn = self.deep_supervision_loss(self.build_loss()).to(self.device)
        self.optimizer, self.scheduler = self.configure_optimizers()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if self.resume_from is not None:
            self.load_state_dict(self.resume_from)
        self.frozen = self.encoder_parameters() if t.freeze_encoder > self.step else []
        self.train_loader, self.val_loader = self.build_data()
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.eval_model = self.train_model
        if t.compile:
            self.train_model = torch.compile(self.train_model)
        self.writer = None
        if self.dist.main:
            os.makedirs(self.output, exist_ok=True)
            # the software it ran on beside the run's settings (RunConfig.from_dict ignores the extra key)
            write_json({**self.config.to_dict(), "environment": self.environment}, self.path("config.json"))
            if self.command_line is not None:
                write_json(self.command_line, self.path("args.json"))
            self.write_plan_and_splits()
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events a killed run logged after its last checkpoint.
            self.writer = SummaryWriter(self.path("tensorboard"), purge_step=self.step if self.resume_from is not None else None)
        # Centre vs periphery movement of the large kernels at each validation (the paper's convergence picture).
        self.dynamics = self.kernel_dynamics() if self.dist.main else None
        self.timer = LoopTimer(self.device, warmup=min(20, t.max_iter // 10))
        self.log(self.describe())

    def write_plan_and_splits(self) -> None:
        """``plan.json`` (when the dataset was planned from its data) and ``splits.json`` (which cases
        train and which validate, and how they were chosen), and both said at start."""

        d = self.config.data
        if d.plan is not None:

            plan = Plan.from_dict(d.plan)
            plan.save(self.path("plan.json"))
            if self.resume_from is None:
                self.log(plan.describe())
        root = self._root()
        how = describe_validation(root, d.datalist, d.fold)
        splits = {"validation": how, "fold": d.fold}
        for split, key in (("train", "training"), ("val", "validation_cases")):
            splits[key] = [c["image"] for c in list_cases(root, split, d.datalist, d.fold)]
        write_json(splits, self.path("splits.json"))
        self.log(f"validation cases: {how} (listed in {self.path('splits.json')})")

    def describe(self) -> str:
        """The start line: network, device, data, loader path, optimisation, output."""
        c, t, d = self.config, self.config.training, self.config.data
        n_params = sum(p.numel() for p in self.model.parameters())
        amp = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off"
        world = f" x {self.dist.world} processes ({self.dist.backend})" if self.dist.enabled else ""
        line = (
            f"{c.network.name} ({n_params / 1e6:.3f}M parameters) on {self.device}{world}, AMP {amp}; dataset {d.dataset.name} "
            f"({d.dataset.num_classes} classes), roi {list(d.roi)}, {len(self.train_loader.dataset)} training / "
            f"{len(self.val_loader.dataset)} validation cases{' on rank 0' if self.dist.enabled else ''}; data: {self.loader_reason}; "
            f"{t.optim} lr {t.lr:g} ({t.lr_schedule}, warm-up {t.warmup}), loss {t.loss}, {t.max_iter} iterations, "
            f"validation every {t.eval_step}; output {os.path.abspath(self.output)}; recipe {t.recipe}"
            f"{f', gradient norm clipped at {t.grad_clip:g}' if t.grad_clip is not None else ''}"
            f"{', deep supervision' if c.network.options.get('deep_supervision') else ''}; {describe_environment(self.environment)}; "
            f"deterministic algorithms {'on (warn_only; ops without one are listed at the end)' if t.deterministic else 'off'}; "
            f"{self.step_graph.describe()}"
        )
        if self.frozen:
            line += f"; encoder frozen for the first {t.freeze_encoder} iterations"
        slow = slow_conv3d_warning(self.device)
        if slow:
            line += f"\nWARNING: {slow}"
        return line

    def kernel_dynamics(self):
        """The tracker of how far the large kernels moved, centre vs periphery (None for networks without them)."""

        return KernelDynamics.for_model(self.model, output_dir=self.output, resume=self.resume_from is not None)

    def teardown(self) -> None:
        """Stop the loader's workers and threads, close the logs and the process group."""
        if hasattr(getattr(self, "train_loader", None), "close"):
            self.train_loader.close()
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        if getattr(self, "dist", None) is not None:
            if self.dist.enabled and getattr(self, "train_model", None) is not None:
                # The DDP reducer is destroyed here, while its process group still exists.
                self.train_model = unwrap_model(self.train_model)
                gc.collect()
            self.dist.close()
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None
        if getattr(self, "nondeterminism", None) is not None:
            self.nondeterminism.stop()

    # ------------------------------------------------------------------ state

    def state_dict(self, full: bool = True) -> dict:
        """The checkpoint: weights, run configuration (format :data:`configs.FORMAT_VERSION`), step and
        best metric; with ``full`` also optimizer, scheduler, scaler, RNG, history (what resume needs)."""
        weights = {k: v.detach().cpu() for k, v in unwrap_model(self.model).state_dict().items()}
        state = self.config.checkpoint(weights, self.step)
        state.update(best_metric=float(self.best), best_step=int(self.best_step), metrics=jsonable(self.best_metrics))
        if full:
            state.update(
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict() if self.scaler.is_enabled() else {},
                rng=rng_state(),
                history=self.history,
                train_time_s=float(self.train_time),
                config_changes=jsonable(self.config_changes),
            )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (full form): continue at the saved step with the same optimizer,
        scheduler, scaler and RNG state. The schedule, peak LR and weight decay of ``config`` apply from
        here on (they may have been changed for this session)."""
        t = self.config.training
        networks.load_network_weights(self.model, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        # The loaded states carry the old run's peak LR, weight decay and next-step LR: re-apply the config's.
        self.scheduler.base_lrs = [t.lr] * len(self.optimizer.param_groups)
        self.scheduler.lr_lambdas = [lambda s: lr_factor(s, t.max_iter, t.warmup, t.lr_schedule)] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = t.lr
            group["weight_decay"] = t.weight_decay
            group["lr"] = t.lr * lr_factor(self.step, t.max_iter, t.warmup, t.lr_schedule)
        self.best, self.best_step = float(state.get("best_metric", -1.0)), int(state.get("best_step", 0))
        self.best_metrics = dict(state.get("metrics") or {})
        saved = state.get("history") or {}
        self.history = {k: list(saved.get(k, []))[: self.step if k in ("loss", "lr") else None] for k in self.history}
        self.train_time = float(state.get("train_time_s", 0.0))
        self.config_changes = list(state.get("config_changes") or []) + list(self.config_changes)
        if self.dist.main and "rng" in state:
            set_rng_state(state["rng"])
        else:
            set_seed(t.seed + self.dist.rank + self.step)

    def save_checkpoint(self, path: str, full: bool = True) -> None:
        """Write :meth:`state_dict` atomically (a crash mid-write leaves the previous file intact)."""
        save_checkpoint_atomic(self.state_dict(full=full), path)

    # ------------------------------------------------------------------ steps

    def train_step(self, batch: Mapping[str, Any]) -> float:
        """One optimisation step on ``batch``; returns the loss (mean over ranks), NaN when skipped.

        A non-finite loss skips the step (on every rank); ``--max_nonfinite`` of them in a row stop the run.
        """
        image, label = _tensor(batch["image"], self.device), _tensor(batch["label"], self.device)
        self.timer.start_step()
        self.optimizer.zero_grad(set_to_none=True)
        net = self.step_graph.model(self.train_model, image, self.amp_dtype)
        with autocast(self.device, self.amp_dtype):
            logits = net(image)
        # float32 loss: softmax/log of bf16 logits is coarse (DeepSupervisionLoss casts each output of a list)
        loss = self.loss_fn(logits if isinstance(logits, (list, tuple)) else logits.float(), label)
        value, finite = self._loss_consensus(loss)
        if finite:
            self.scaler.scale(loss).backward()
            if self.frozen and self.step < self.config.training.freeze_encoder:
                for p in self.frozen:
                    p.grad = None  # the optimizer skips parameters without a gradient
            if self.config.training.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradient, not the AMP-scaled one
                nn.utils.clip_grad_norm_(self.model.parameters(), self.config.training.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.nonfinite = 0
        else:
            self.nonfinite += 1
            warnings.warn(f"step {self.step + 1}: non-finite loss ({value}); step skipped ({self.nonfinite} in a row)", RuntimeWarning, stacklevel=1)
            if self.nonfinite >= self.config.training.max_nonfinite:
                raise TrainingError(
                    f"the loss was non-finite for {self.nonfinite} iterations in a row (up to step {self.step + 1}); stopped. "
                    f"The last checkpoint ({self.path(LAST_CKPT)}) is intact. Try a lower --lr, --amp bf16 or "
                    "--amp off instead of fp16, and check the images for NaN/inf values; then --resume or start anew"
                )
            value = float("nan")
        self.timer.end_step()
        with warnings.catch_warnings():
            # A skipped step still counts as an iteration of the schedule.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        return value

    def _loss_consensus(self, loss: torch.Tensor) -> tuple[float, bool]:
        """The loss (mean over ranks) and whether it is finite on every rank: all ranks must agree to
        skip a step, or DDP's gradient all-reduce would wait for the ones that skipped."""
        v = loss.detach().float()
        if not self.dist.enabled:
            value = float(v.item())
            return value, math.isfinite(value)
        ok = torch.isfinite(v)
        buf = torch.stack([torch.where(ok, v, torch.zeros_like(v)), (~ok).float()])
        torch.distributed.all_reduce(buf)
        bad = float(buf[1].item())
        return (float(buf[0].item()) / self.dist.world if bad == 0 else float("nan")), bad == 0

    def validate(self) -> DiceAccumulator:
        """Sliding-window Dice over this rank's validation cases, summed over all ranks."""
        ds, sw = self.config.data.dataset, self.config.sliding_window
        acc = DiceAccumulator(ds.num_classes, ds.class_names)
        net = unwrap_model(self.eval_model)  # DDP's forward would sync buffers and expects equal call counts
        sync_buffers_from_rank0(net)
        was_training = net.training
        net.eval()
        try:
            for batch in self.val_loader:
                image, label = _tensor(batch["image"], self.device), _tensor(batch["label"], self.device)
                probs = sliding_window_predict(
                    net, image, ds.roi, sw_batch_size=sw.sw_batch_size, overlap=sw.overlap, mode=sw.mode,
                    amp_dtype=self.amp_dtype, sw_device=self.device, device=self.device,
                )  # fmt: skip
                acc.add(probs, label)
        finally:
            net.train(was_training)
        acc.all_reduce()
        return acc

    # ------------------------------------------------------------------ hooks

    def on_train_start(self) -> None:
        """Called once, right before the first iteration of this session."""

    def on_iteration_end(self, loss: float) -> None:
        """Called after every iteration (``self.step`` is the number of completed iterations)."""

    def on_validation_end(self, acc: DiceAccumulator, improved: bool, seconds: float) -> None:
        """Rank 0's writes after a validation: best model, full checkpoint, logs, metrics CSV, plot."""
        ds = self.config.data.dataset
        mean, per_class = acc.mean(), acc.per_class()
        if improved:
            self.save_checkpoint(self.path(BEST_CKPT), full=False)
        self.save_checkpoint(self.path(LAST_CKPT), full=True)
        if self.writer is not None:
            self.writer.add_scalar("val/mean_dice", mean, self.step)
            for name, value in zip(ds.class_names[1:], per_class):
                self.writer.add_scalar("val/dice_" + "".join(c if c.isalnum() else "_" for c in name), value, self.step)
            self.writer.flush()
        self._append_metrics_csv(acc)
        if self.dynamics is not None:
            self.dynamics.record(self.step, self.model, self.writer)
        try:
            plot_curves(self.history, ds.class_names, self.path("training_curve.png"), self.config.training.loss)
        except Exception as err:  # noqa: BLE001 - a plotting problem must not stop training
            warnings.warn(f"could not write the training curve: {err}", RuntimeWarning, stacklevel=1)
        per = ", ".join(f"{n} {v:.3f}" for n, v in zip(ds.class_names[1:], per_class))
        line = (
            f"step {self.step}: mean foreground Dice {mean:.4f} ({per}); best {self.best:.4f} at step {self.best_step}"
            + (" [new best, saved]" if improved else "")
            + f"; validation {seconds:.1f} s, training time so far {self.train_time:.0f} s"
        )
        with open(self.path("training_log.txt"), "a") as f:
            f.write(line + "\n")
        self.bar.write(line, file=sys.stderr if not sys.stdout.isatty() else sys.stdout)

    def _append_metrics_csv(self, acc: DiceAccumulator) -> None:
        """One row per class and validation in ``validation_metrics.csv`` (step, class, dice)."""
        path = self.path("validation_metrics.csv")
        rows = self._csv_rows(path)
        rows += [[self.step, name, f"{value:.6f}"] for name, value in acc.as_dict().items()] + [[self.step, "mean_foreground", f"{acc.mean():.6f}"]]
        write_csv([["step", "class", "dice"], *rows], path)

    def _csv_rows(self, path: str) -> list[list]:
        """Rows of earlier validations (of this session or of the resumed one), before the current step."""
        if not os.path.isfile(path):
            return []
        with open(path, newline="") as f:
            return [r for r in list(csv.reader(f))[1:] if r and int(r[0]) < self.step]

    def on_train_end(self, summary: dict) -> None:
        """Rank 0: ``summary.json`` and the closing lines."""
        write_json(summary, self.path("summary.json"))
        s = summary
        lines = [
            f"finished at step {s['steps']}/{self.config.training.max_iter}: {s['steps_this_session']} iterations in "
            f"{s['wall_time_s'] / 60:.1f} min this session; best mean foreground Dice {s['best_metric']:.4f} at step {s['best_step']}:"
        ]
        if s["dice_per_class"]:
            lines.append(dice_table(s["dice_per_class"]))
        timing = s.get("timing") or {}
        if timing.get("timed_iterations"):
            frac = timing["outside_step_fraction"]
            line = (
                f"loop {timing['loop_ms_per_iter']:.1f} ms per iteration, training step {timing['step_ms_per_iter']:.1f} ms "
                f"({timing['step_timer']}): {100 * frac:.0f}% of the loop outside the step; waited for the loader "
                f"{s['data_wait_s']} s; data: {self.loader_reason}"
            )
            if frac > OUTSIDE_STEP_ADVICE:
                line += (
                    ". Over 15% outside the step: the data path is the bottleneck. On a GPU, --loader gpu with --cache_rate 1.0 "
                    "if the cached volumes fit; with CPU workers, raise --num_workers (one per free core) and --cache_rate"
                )
            lines.append(line)
        if s.get("nondeterministic_ops") is not None:
            ops = s["nondeterministic_ops"]
            lines.append(
                f"--deterministic: {len(ops)} op(s) ran without a deterministic implementation (PyTorch's warn_only reports): {', '.join(ops)}"
                if ops else "--deterministic: PyTorch reported no op without a deterministic implementation"
            )
        lines.append(f"best checkpoint: {s['best_checkpoint']}")
        lines.append(f"predict with: {self.predict_command()}")
        self.log("\n".join(lines))

    def predict_command(self) -> str:
        """The test_seg.py command that predicts and scores this run's own validation cases: the data
        flags of the run (where the cases are listed; the pre-processing is read from the checkpoint),
        quoted for the shell."""
        d = self.config.data
        argv = ["python3", "test_seg.py", "--trained_weights", os.path.abspath(self.path(BEST_CKPT))]
        if d.root is not None:
            argv += ["--root", os.path.abspath(d.root)]
        if d.datalist is not None:
            argv += ["--datalist", os.path.abspath(d.datalist)]
        if d.root is not None or d.datalist is not None:
            argv += ["--split", "val", "--fold", str(d.fold)]
        argv += ["--output", os.path.abspath(self.path("predictions"))]
        return shlex.join(argv)

    def finished_already(self) -> bool:
        """Whether this is a ``--resume`` of a run that already reached ``max_iter``."""
        return self.resume_from is not None and int(self.resume_from.get("step", 0)) >= self.config.training.max_iter

    def report_finished(self) -> dict:
        """For a finished run resumed: say so, change nothing, return its recorded summary."""
        step, max_iter = int(self.resume_from.get("step", 0)), self.config.training.max_iter
        best = os.path.abspath(self.path(BEST_CKPT))
        if int(os.environ.get("RANK", "0")) == 0:
            self._log(
                f"{self.output}: the run is already finished (step {step} of {max_iter}); best mean foreground Dice "
                f"{float(self.resume_from.get('best_metric', -1)):.4f} at step {int(self.resume_from.get('best_step', 0))}, "
                f"best checkpoint {best}. Nothing was changed. To train on, pass --resume --max_iter M with M > {step}."
            )
        summary_path = self.path("summary.json")
        if os.path.isfile(summary_path):
            with open(summary_path) as f:
                return json.load(f)
        return {"output": os.path.abspath(self.output), "steps": step, "steps_this_session": 0, "best_metric": float(self.resume_from.get("best_metric", -1)),
                "best_step": int(self.resume_from.get("best_step", 0)), "best_checkpoint": best, "finished_already": True}

    # ------------------------------------------------------------------ the loop

    def validation_round(self) -> None:
        t_val = time.time()
        acc = self.validate()
        mean, per_class = acc.mean(), acc.per_class()
        self.history["val_step"].append(self.step)
        self.history["val_dice"].append(mean)
        self.history["val_per_class"].append(per_class)
        improved = not math.isnan(mean) and mean > self.best
        if improved:
            self.best, self.best_step = mean, self.step
            self.best_metrics = {"mean_dice": mean, "dice_per_class": acc.as_dict(), "val_cases": acc.cases}
        self.train_time += time.time() - self._t_loop
        if self.dist.main:
            self.on_validation_end(acc, improved, time.time() - t_val)
        self._t_loop = time.time()

    def run(self) -> dict:
        """Set up, train to ``max_iter`` with validation every ``eval_step`` iterations, return the summary."""
        from tqdm import tqdm

        if self.finished_already():
            return self.report_finished()
        t_start = time.time()
        try:
            self.setup()
            t = self.config.training
            batches = _infinite(self.train_loader)
            tty = sys.stderr.isatty()
            self.bar = tqdm(
                total=t.max_iter, initial=self.step, desc="train", unit="it", disable=not self.dist.main,
                dynamic_ncols=True, mininterval=0.5 if tty else 30.0, file=sys.stderr,
            )  # fmt: skip
            step_at_start, recent = self.step, []
            self._t_loop = t_session = time.time()
            self.train_model.train()
            self.on_train_start()
            while self.step < t.max_iter:
                try:
                    t_data = time.perf_counter()
                    batch = next(batches)
                    self.data_wait += time.perf_counter() - t_data
                    lr_now = self.optimizer.param_groups[0]["lr"]
                    loss = self.train_step(batch)
                    self.step += 1
                    self._record(loss, lr_now, recent)
                    validating = self.step % t.eval_step == 0 or self.step == t.max_iter
                    if validating:
                        self.validation_round()
                    self.timer.end_iteration(count=not validating)
                    self.on_iteration_end(loss)
                except RuntimeError as err:
                    if is_oom(err):
                        raise TrainingError(f"out of GPU memory at step {self.step + 1}: {OOM_ADVICE}") from None
                    raise
            summary = self._summary(t_start, step_at_start, t_session)
            if self.dist.main:
                self.on_train_end(summary)
            # Every rank leaves together: a rank that destroyed its process group while another's
            # gloo threads were still in the last collective could hang at exit.
            self.dist.barrier()
            return summary
        finally:
            if getattr(self, "bar", None) is not None:
                self.bar.close()
            self.teardown()

    def _record(self, loss: float, lr_now: float, recent: list[float]) -> None:
        self.history["loss"].append(loss)
        self.history["lr"].append(lr_now)
        finite = math.isfinite(loss)
        if self.writer is not None:
            if finite:
                self.writer.add_scalar("train/loss", loss, self.step)
            self.writer.add_scalar("train/lr", lr_now, self.step)
        if finite:
            recent.append(loss)
            del recent[:-20]
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{sum(recent) / max(1, len(recent)):.4f}", lr=f"{lr_now:.2e}", best=f"{self.best:.4f}" if self.best >= 0 else "-", refresh=False
        )

    def _summary(self, t_start: float, step_at_start: int, t_session: float) -> dict:
        timing = self.timer.summary()
        return {
            "output": os.path.abspath(self.output),
            "network": self.config.network.name,
            "dataset": self.config.data.dataset.name,
            "steps": self.step,
            "steps_this_session": self.step - step_at_start,
            "best_metric": self.best,
            "best_step": self.best_step,
            "dice_per_class": self.best_metrics.get("dice_per_class", {}),
            "best_checkpoint": os.path.abspath(self.path(BEST_CKPT)),
            "last_checkpoint": os.path.abspath(self.path(LAST_CKPT)),
            "wall_time_s": round(time.time() - t_start, 1),
            "train_time_s": round(self.train_time, 1),
            "data_wait_s": round(self.data_wait, 1),
            "data_wait_fraction": round(self.data_wait / max(time.time() - t_session, 1e-9), 3),
            "loader": self.loader_reason,
            "timing": timing,
            **{k: v for k, v in timing.items() if k in ("loop_ms_per_iter", "step_ms_per_iter", "outside_step_fraction")},
            "environment": self.environment,
            # None: --deterministic off; else the ops PyTorch reported as run without a deterministic implementation
            "nondeterministic_ops": sorted(self.nondeterminism.ops) if self.nondeterminism is not None else None,
        }


class _CrossEntropy(nn.Module):
    """Cross-entropy of logits (N, C, ...) against labels (N, 1, ...) holding class indices."""

    def __init__(self, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, label[:, 0].long(), weight=self.weight)

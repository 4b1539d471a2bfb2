"""See the method work: effective receptive fields, kernel statistics and kernel dynamics (issue 16).

Three tools for the encoders with large depthwise kernels (REP3D and its ablations, 3D UX-Net):

* **Effective receptive field (ERF)** of each encoder stage: the gradient of the stage output's centre
  voxel, summed over channels, with respect to the input; absolute, averaged over real crops or random
  inputs. Summarised by the high-contribution area ratios of RepLKNet's ERF analysis ("Scaling Up Your
  Kernels to 31x31", Ding et al., CVPR 2022), taken in 3-D: the smallest centred cube that holds 20%,
  30%, 50% and 99% of the total contribution, as a share of the input volume; and by the radial
  profile (mean contribution against distance from the centre).
* **Kernel statistics**: per block, the radial profile of |W_eff| (W_eff = W * M, the kernel the
  convolution applies) and, for modulated blocks, of the mask M and of the prior P = beta / (d + beta).
* **Kernel dynamics** (:class:`KernelDynamics`), for training: at each validation, how far each stage's
  effective kernels have moved from their initial values, in the centre and in the periphery.

Command line (writes ``erf.json``, ``erf.png`` and ``kernels.png`` into ``--output``)::

    python3 erf_analysis.py --trained_weights runs/lrbm/best_metric_model.pth runs/none/best_metric_model.pth \
        --root ./demo_data --cases 4 --output runs/erf
    python3 erf_analysis.py --trained_weights REP3D REP3D_Vanilla --output runs/erf_init   # untrained, random inputs

Departures from RepLKNet's script, and why:

* Gradients are taken of the stage module's output (before the per-stage channels-first LayerNorm):
  the channel sum of a LayerNorm output with unit gain and zero bias is 0 at every voxel, so its
  gradient carries no information for an untrained network.
* The contribution is |gradient| (the issue's definition), not RepLKNet's ReLU of the gradient of a
  ReLU'd centre; the area ratios are computed on the linear scores, without RepLKNet's
  ``log10(1 + s)``, which depends on the absolute scale of the scores and so is not comparable
  between networks whose gradients differ in size.
* The cube is centred on the score map's centre of mass (rounded), not on the middle of the input:
  with strided stages the output's centre voxel maps to an input position up to a few voxels off the
  middle, which would inflate the small-threshold ratios. Cubes are clipped to the input volume.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

import engine
import networks

__all__ = [
    "AREA_THRESHOLDS",
    "CENTRE_FRACTION",
    "PERIPHERY_FRACTION",
    "ErfConfig",
    "KernelDynamics",
    "analyse_source",
    "area_ratios",
    "build_parser",
    "centre_of_mass",
    "depthwise_convs",
    "effective_kernel",
    "effective_receptive_fields",
    "encoder_stages",
    "kernel_regions",
    "kernel_statistics",
    "main",
    "modulation_of",
    "plot_erf",
    "plot_kernel_dynamics",
    "plot_kernels",
    "radial_profile",
    "run_analysis",
    "summarise_erf",
]

AREA_THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)
#: Kernel regions as fractions of the kernel radius K // 2 (Euclidean distance from the centre): for
#: K = 21 the centre is d <= 3 and the periphery d > 7, the issue's definition.
CENTRE_FRACTION = 0.3
PERIPHERY_FRACTION = 0.7
# Standard checkpoint names: a checkpoint is labelled by its run folder instead.
_RUN_FILES = ("best_metric_model.pth", "checkpoint_last.pth")


# --------------------------------------------------------------------------------------------------
# model inspection


def _find_encoder(model: nn.Module) -> nn.Module | None:
    # REP3D and 3D UX-Net share networks.blocks.HierarchicalEncoder: stem/downsampling layers and a
    # ModuleList of stages, whose i-th entry produces the features of stride 2^(i+1).
    for module in engine.unwrap_model(model).modules():
        if isinstance(getattr(module, "stages", None), nn.ModuleList) and hasattr(module, "downsample_layers"):
            return module
    return None


def encoder_stages(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """The hierarchical encoder of ``model`` and its stage modules (REP3D, 3D UX-Net and variants).

    Raises:
        ValueError: the network has no such encoder (SwinUNETR, UNETR, nnFormer, TransBTS).
    """
    encoder = _find_encoder(model)
    if encoder is None:
        raise ValueError(
            f"{type(engine.unwrap_model(model)).__name__} has no staged convolutional encoder: the ERF and kernel analysis "
            "support REP3D (and REP3D_FixedPrior / REP3D_Vanilla) and the 3DUXNET variants."
        )
    return encoder, list(encoder.stages)


def _is_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv3d)
        and module.groups == module.in_channels == module.out_channels
        and max(module.kernel_size) > 1
    )


def depthwise_convs(module: nn.Module) -> list[tuple[str, nn.Conv3d]]:
    """``(name, conv)`` of every depthwise Conv3d with a kernel larger than 1 inside ``module``, in order,
    leaving out the single-channel convolutions of LRBM mask generators (they act on the prior, not on
    features)."""
    named = list(module.named_modules())
    generators = tuple(
        f"{name}.modulation." if name else "modulation."
        for name, m in named
        if isinstance(getattr(m, "modulation", None), nn.Module)
    )
    return [(name, m) for name, m in named if _is_depthwise(m) and not name.startswith(generators)]


def effective_kernel(conv: nn.Conv3d) -> torch.Tensor:
    """The kernel the convolution applies: ``equivalent_kernel()`` (W * M) for modulated convolutions
    of ``networks.Rep3D``, the weight itself otherwise (plain, or already folded). Shape (C, 1, K, K, K)."""
    fn = getattr(conv, "equivalent_kernel", None)
    return fn() if callable(fn) else conv.weight


def modulation_of(conv: nn.Conv3d) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(M, P)`` (each K x K x K) of a convolution modulated by a mask, None for a plain one."""
    modulation = getattr(conv, "modulation", None)
    if not isinstance(modulation, nn.Module) or not isinstance(getattr(modulation, "prior", None), torch.Tensor):
        return None
    return modulation(), modulation.prior


# --------------------------------------------------------------------------------------------------
# maps: radial profiles, area ratios


def _distance_grid(shape: Sequence[int], centre: Sequence[float]) -> torch.Tensor:
    """Squared Euclidean distance (float64) of every voxel of ``shape`` from ``centre``."""
    axes = [torch.arange(n, dtype=torch.float64) - float(c) for n, c in zip(shape, centre)]
    grids = torch.meshgrid(*axes, indexing="ij")
    return sum(g**2 for g in grids)


def radial_profile(
    volume: torch.Tensor | np.ndarray, centre: Sequence[float] | None = None, bin_width: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``volume`` against Euclidean distance from ``centre``.

    Args:
        volume: a 3-D map (D, H, W).
        centre: voxel coordinates of the centre. Defaults to ``(D // 2, H // 2, W // 2)`` (the centre of
            an odd kernel).
        bin_width: None (default) averages over voxels at exactly the same distance, so the profile of a
            function of the distance is that function at each distance; a number averages over bins
            ``round(d / bin_width)`` and reports the bin centres (for large maps).

    Returns:
        ``(distances, means)``, float64 arrays in increasing distance.
    """
    v = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume).detach()
    v = v.to("cpu", torch.float64)
    if v.ndim != 3:
        raise ValueError(f"radial_profile expects a 3-D map, got shape {tuple(v.shape)}.")
    if centre is None:
        centre = [n // 2 for n in v.shape]
    d2 = _distance_grid(v.shape, centre).flatten()
    if bin_width is None:
        # Squared distances of integer offsets are integers when the centre is a voxel: group exactly.
        keys = torch.round(d2 * 1e6).to(torch.int64)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, v.flatten())
        counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(d2))
        return np.sqrt(uniq.double().numpy() / 1e6), (sums / counts).numpy()
    if not bin_width > 0:
        raise ValueError(f"bin_width must be positive, got {bin_width!r}.")
    bins = torch.round(torch.sqrt(d2) / bin_width).to(torch.int64)
    sums = torch.bincount(bins, weights=v.flatten())
    counts = torch.bincount(bins).double()
    keep = counts > 0
    return (torch.arange(len(counts), dtype=torch.float64)[keep] * bin_width).numpy(), (sums[keep] / counts[keep]).numpy()


def centre_of_mass(volume: torch.Tensor) -> tuple[int, int, int]:
    """Voxel nearest the centre of mass of a non-negative 3-D map (the middle voxel for an all-zero map)."""
    v = volume.detach().to("cpu", torch.float64)
    total = float(v.sum())
    if not total > 0:
        return tuple(n // 2 for n in v.shape)  # type: ignore[return-value]
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        marginal = v.sum(other)
        pos = float((marginal * torch.arange(v.shape[axis], dtype=torch.float64)).sum()) / total
        out.append(int(round(pos)))
    return tuple(out)  # type: ignore[return-value]


def area_ratios(
    scores: torch.Tensor, thresholds: Sequence[float] = AREA_THRESHOLDS, centre: Sequence[int] | None = None
) -> dict[float, dict[str, float]]:
    """High-contribution area ratios of a 3-D contribution map (RepLKNet's definition, in 3-D).

    For each threshold t, the smallest cube centred on ``centre`` (clipped to the volume) whose scores
    sum to at least t of the total; reported as that cube's share of the volume (``ratio``) and its
    half-width in voxels (``half_width``; the unclipped side is ``2 * half_width + 1``).

    Args:
        scores: non-negative contribution map (D, H, W).
        thresholds: shares of the total contribution, each in (0, 1]. Defaults to 0.2, 0.3, 0.5, 0.99.
        centre: voxel the cubes are centred on. Defaults to the map's centre of mass.

    Returns:
        ``{t: {"ratio": float, "half_width": int}}``; NaN ratios for an all-zero map.
    """
    s = scores.detach().to("cpu", torch.float64)
    if s.ndim != 3:
        raise ValueError(f"area_ratios expects a 3-D map, got shape {tuple(s.shape)}.")
    if (s < 0).any():
        raise ValueError("area_ratios expects non-negative scores (take the absolute gradient first).")
    for t in thresholds:
        if not 0 < t <= 1:
            raise ValueError(f"thresholds must lie in (0, 1], got {t!r}.")
    if centre is None:
        centre = centre_of_mass(s)
    axes = [(torch.arange(n) - int(c)).abs() for n, c in zip(s.shape, centre)]
    grids = torch.meshgrid(*axes, indexing="ij")
    cheb = torch.maximum(torch.maximum(grids[0], grids[1]), grids[2]).flatten()  # cube index of every voxel
    mass = torch.bincount(cheb, weights=s.flatten()).cumsum(0)
    count = torch.bincount(cheb).double().cumsum(0)
    total = float(mass[-1])
    out: dict[float, dict[str, float]] = {}
    for t in thresholds:
        if not total > 0:
            out[float(t)] = {"ratio": float("nan"), "half_width": -1}
            continue
        # Relative slack: a cube holding all of the mass must pass t = 1 despite rounding in the sums.
        r = int(torch.nonzero(mass >= t * total * (1 - 1e-12))[0])
        out[float(t)] = {"ratio": float(count[r] / s.numel()), "half_width": r}
    return out


# --------------------------------------------------------------------------------------------------
# effective receptive field


def effective_receptive_fields(
    module: nn.Module, stages: Sequence[nn.Module], inputs: Iterable[torch.Tensor]
) -> list[torch.Tensor]:
    """Mean absolute input gradient of each stage output's centre voxel (summed over channels).

    ``module`` is run on every input (N, C, D, H, W), with forward hooks on ``stages`` (submodules of
    ``module`` whose outputs are 5-D feature maps). For each stage, the centre voxel
    ``out[:, :, D'//2, H'//2, W'//2]`` summed over channels and batch is differentiated with respect to
    the input; the absolute gradient is summed over batch and input channels, then averaged over all
    samples. Run ``module`` in eval mode so that samples do not interact through batch statistics.

    Returns:
        One float64 CPU map of the input's spatial size per stage.
    """
    captured: list[torch.Tensor | None] = [None] * len(stages)

    def hook(index: int) -> Callable:
        def fn(_module: nn.Module, _inp: Any, out: Any) -> None:
            captured[index] = out

        return fn

    handles = [stage.register_forward_hook(hook(i)) for i, stage in enumerate(stages)]
    sums: list[torch.Tensor | None] = [None] * len(stages)
    n = 0
    try:
        for x in inputs:
            if x.ndim != 5:
                raise ValueError(f"inputs must be 5-D (N, C, D, H, W), got shape {tuple(x.shape)}.")
            x = x.detach().clone().requires_grad_(True)
            captured[:] = [None] * len(stages)
            with torch.enable_grad():
                module(x)
                if any(c is None for c in captured):
                    raise ValueError("a stage module was not called by the forward pass: pass submodules of `module`.")
                for i, out in enumerate(captured):
                    centre = tuple(s // 2 for s in out.shape[2:])
                    target = out[(slice(None), slice(None)) + centre].sum()
                    (grad,) = torch.autograd.grad(target, x, retain_graph=i < len(stages) - 1, allow_unused=True)
                    g = torch.zeros_like(x) if grad is None else grad
                    g = g.detach().abs().sum((0, 1)).to("cpu", torch.float64)
                    sums[i] = g if sums[i] is None else sums[i] + g
            n += x.shape[0]
            captured[:] = [None] * len(stages)  # free the graph before the next input
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("effective_receptive_fields got no inputs.")
    return [s / n for s in sums]  # type: ignore[operator]


def summarise_erf(erf: torch.Tensor, thresholds: Sequence[float] = AREA_THRESHOLDS) -> dict:
    """Area ratios and the radial profile (unit-width bins, normalised to its maximum) of one ERF map."""
    centre = centre_of_mass(erf)
    ratios = area_ratios(erf, thresholds, centre)
    peak = float(erf.max())
    dist, prof = radial_profile(erf / peak if peak > 0 else erf, centre, bin_width=1.0)
    return {
        "centre": list(centre),
        "area_ratio": {str(t): v["ratio"] for t, v in ratios.items()},
        "cube_half_width": {str(t): v["half_width"] for t, v in ratios.items()},
        "radial_profile": {"distance": dist.tolist(), "mean_contribution": prof.tolist()},
    }


# --------------------------------------------------------------------------------------------------
# kernel statistics


def kernel_regions(kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (K, K, K) masks of the kernel's centre and periphery.

    Euclidean distance d from the centre tap, radius r = K // 2: centre ``d <= 0.3 r``, periphery
    ``d > 0.7 r`` (K = 21: d <= 3 and d > 7).
    """
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd number >= 3, got {kernel_size!r}.")
    r = kernel_size // 2
    d = torch.sqrt(_distance_grid((kernel_size,) * 3, (r, r, r)))
    return d <= CENTRE_FRACTION * r + 1e-9, d > PERIPHERY_FRACTION * r + 1e-9


@torch.no_grad()
def kernel_statistics(model: nn.Module, with_mask: bool = True) -> list[dict]:
    """Per depthwise block of the encoder: radial profiles of |W_eff|, and of M and P where masked.

    Args:
        model: a REP3D / 3D UX-Net network (wrappers are unwrapped).
        with_mask: report masks. Pass False when the masks are not the trained ones (a folded checkpoint
            loaded into a training-mode model keeps the generator's initial weights).

    Returns:
        One dict per block: ``stage`` (1-based), ``block`` (0-based within the stage), ``module``,
        ``kernel_size``, ``distance`` (exact distances of the kernel's taps), ``weff_mean_abs`` (mean
        |W_eff| over channels and taps at each distance), ``weff_periphery_to_centre`` (mean |W_eff| of
        the periphery over that of the centre, regions of :func:`kernel_regions`), and for masked blocks
        ``mask`` and ``prior`` (radial means of M and P), else None.
    """
    _, stages = encoder_stages(model)
    rows = []
    for s, stage in enumerate(stages, start=1):
        for b, (name, conv) in enumerate(depthwise_convs(stage)):
            w = effective_kernel(conv).detach().abs().to("cpu", torch.float64)
            k = int(w.shape[-1])
            dist, mean_abs = radial_profile(w.mean((0, 1)))
            lo, hi = kernel_regions(k)
            centre_mean = float(w[..., lo].mean())
            periphery_mean = float(w[..., hi].mean())
            row = {
                "stage": s,
                "block": b,
                "module": name,
                "kernel_size": k,
                "distance": dist.tolist(),
                "weff_mean_abs": mean_abs.tolist(),
                "weff_periphery_to_centre": periphery_mean / centre_mean if centre_mean > 0 else float("nan"),
                "mask": None,
                "prior": None,
            }
            mp = modulation_of(conv) if with_mask else None
            if mp is not None:
                row["mask"] = radial_profile(mp[0])[1].tolist()
                row["prior"] = radial_profile(mp[1])[1].tolist()
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# kernel dynamics during training


class KernelDynamics:
    """How far each encoder stage's depthwise kernels moved from their initial values, in the centre
    and in the periphery of the kernel: the paper's convergence picture, logged at every validation.

    For each stage, over all its blocks and channels, with W_eff the kernel the convolution applies
    (W * M for LRBM / fixed-prior blocks, W for plain ones)::

        centre    = ||W_eff,t - W_eff,0||_F / ||W_eff,0||_F   over taps at distance d <= 0.3 * (K // 2)
        periphery = the same over taps at d > 0.7 * (K // 2)

    (Euclidean distance from the centre tap; K = 21: d <= 3 and d > 7). The relative change makes stages
    and modulations comparable although the masks shrink the initial peripheral weights.

    Use from a training loop (rank 0 only under DDP)::

        # once, before the first iteration (after a resumed state is loaded); None: nothing to track
        dynamics = KernelDynamics.for_model(model, output_dir=out, resume=resuming)
        ...
        if dynamics is not None:                  # at each validation
            dynamics.record(step, model, writer)  # CSV, TensorBoard, kernel_dynamics.png

    The snapshot file holds every depthwise kernel once in float32 (about 53 MB for the paper's REP3D).

    Args:
        model: the network (DDP / ``torch.compile`` wrappers are unwrapped), at its initial weights, or
            resumed when ``resume`` and ``output_dir`` hold the initial snapshot.
        kernel_size: expected K; checked against the model's kernels. Defaults to None (read from them).
        output_dir: folder of ``kernel_dynamics.csv``, ``kernel_dynamics.png`` and the initial kernels
            ``kernel_dynamics_init.pt`` (which lets a resumed run measure against the true start).
            Defaults to None: nothing is written unless :meth:`log` gets a ``csv_path``.
        resume: continue a run: load the initial kernels from ``output_dir`` and append to its CSV,
            dropping the rows at or after the first step this object logs (written by the interrupted run
            after its last checkpoint). Without it the initial kernels are taken from ``model`` and a CSV
            this object writes starts afresh.

    Raises:
        ValueError: the model has no depthwise kernels (use :meth:`for_model`), a kernel size that does
            not match ``kernel_size``, or a snapshot that does not fit the model.
    """

    CSV_NAME = "kernel_dynamics.csv"
    PNG_NAME = "kernel_dynamics.png"
    INIT_NAME = "kernel_dynamics_init.pt"
    COLUMNS = ("step", "stage", "centre", "periphery")

    def __init__(
        self, model: nn.Module, kernel_size: int | None = None, output_dir: str | None = None, resume: bool = False
    ) -> None:
        kernels = self._kernels(model)
        if not any(kernels):
            raise ValueError(
                f"{type(engine.unwrap_model(model)).__name__} has no depthwise kernels in a staged encoder; use "
                "KernelDynamics.for_model(model), which returns None for such networks."
            )
        sizes = {int(w.shape[-1]) for stage in kernels for w in stage}
        if kernel_size is not None and sizes != {int(kernel_size)}:
            raise ValueError(f"kernel_size {kernel_size} given, but the model's depthwise kernels have sizes {sorted(sizes)}.")
        self.output_dir = output_dir
        self.csv_path = os.path.join(output_dir, self.CSV_NAME) if output_dir else None
        self.png_path = os.path.join(output_dir, self.PNG_NAME) if output_dir else None
        self.init_path = os.path.join(output_dir, self.INIT_NAME) if output_dir else None
        self.resume = resume
        self._started: set[str] = set()  # CSV files this object has (re)started or checked
        if resume and self.init_path and os.path.isfile(self.init_path):
            self.initial = self._load_initial(self.init_path, kernels)
        else:
            if resume:
                warnings.warn(
                    f"KernelDynamics: resuming without {self.init_path or 'an output_dir'}: kernel changes are "
                    "measured from the resumed weights, not from the run's start.",
                    stacklevel=2,
                )
            self.initial = kernels
            if self.init_path:
                os.makedirs(output_dir, exist_ok=True)
                engine.save_checkpoint_atomic({"kernels": kernels}, self.init_path)
        self.regions = {k: kernel_regions(k) for k in sizes}

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs: Any) -> "KernelDynamics | None":
        """A tracker for ``model``, or None when it has no depthwise kernels (SwinUNETR, UNETR, ...).
        ``kwargs`` go to the constructor."""
        encoder = _find_encoder(model)
        if encoder is None or not depthwise_convs(encoder):
            return None
        return cls(model, **kwargs)

    @staticmethod
    @torch.no_grad()
    def _kernels(model: nn.Module) -> list[list[torch.Tensor]]:
        encoder = _find_encoder(model)
        if encoder is None:
            return []
        return [
            [effective_kernel(conv).detach().to("cpu", torch.float32).clone() for _, conv in depthwise_convs(stage)]
            for stage in encoder.stages
        ]

    @staticmethod
    def _load_initial(path: str, current: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)["kernels"]
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
            raise ValueError(f"{path}: unreadable initial-kernel snapshot ({type(err).__name__}); delete it to measure from the resumed weights.") from None
        shapes = [[tuple(w.shape) for w in stage] for stage in current]
        if [[tuple(w.shape) for w in stage] for stage in saved] != shapes:
            raise ValueError(
                f"{path}: the initial-kernel snapshot does not fit this model (another network in the same output "
                "folder?): delete it, or resume the run it belongs to."
            )
        return saved

    def measure(self, model: nn.Module) -> list[dict]:
        """Relative change of each stage's effective kernels since the snapshot.

        Returns:
            ``[{"stage": s, "centre": float, "periphery": float}, ...]``, stages numbered from 1;
            stages without depthwise kernels are left out.
        """
        current = self._kernels(model)
        if [[tuple(w.shape) for w in st] for st in current] != [[tuple(w.shape) for w in st] for st in self.initial]:
            raise ValueError("KernelDynamics.measure: the model's depthwise kernels differ in shape from the snapshot's.")
        rows = []
        for s, (now, start) in enumerate(zip(current, self.initial), start=1):
            if not now:
                continue
            row: dict[str, Any] = {"stage": s}
            for key, index in (("centre", 0), ("periphery", 1)):
                diff = ref = 0.0
                for w_t, w_0 in zip(now, start):
                    region = self.regions[int(w_t.shape[-1])][index]
                    d = (w_t.double() - w_0.double())[..., region]
                    diff += float((d**2).sum())
                    ref += float((w_0.double()[..., region] ** 2).sum())
                row[key] = math.sqrt(diff / ref) if ref > 0 else float("nan")
            rows.append(row)
        return rows

    def log(self, step: int, rows: Sequence[Mapping[str, Any]], writer: Any = None, csv_path: str | None = None) -> None:
        """Append ``rows`` (from :meth:`measure`) at ``step`` to the CSV and to a TensorBoard writer.

        The CSV (columns step, stage, centre, periphery) gets its header once. A file the object has not
        written yet is started afresh, unless ``resume``: then its rows at ``step`` or later (logged by the
        interrupted run after its last checkpoint) are dropped and the new rows appended. TensorBoard tags:
        ``kernel_dynamics/stage{s}_centre`` and ``..._periphery``.

        Args:
            step: training iteration.
            rows: per-stage measurements.
            writer: a ``torch.utils.tensorboard.SummaryWriter`` (anything with ``add_scalar``), or None.
            csv_path: CSV file. Defaults to ``<output_dir>/kernel_dynamics.csv``; None without output_dir
                writes no CSV.
        """
        csv_path = csv_path or self.csv_path
        if writer is not None:
            for row in rows:
                for key in ("centre", "periphery"):
                    writer.add_scalar(f"kernel_dynamics/stage{row['stage']}_{key}", float(row[key]), int(step))
        if csv_path is None:
            return
        if csv_path not in self._started:
            self._start_csv(csv_path, int(step))
            self._started.add(csv_path)
        with open(csv_path, "a", newline="") as f:
            out = csv.writer(f)
            for row in rows:
                out.writerow([int(step), int(row["stage"]), repr(float(row["centre"])), repr(float(row["periphery"]))])

    def _start_csv(self, path: str, step: int) -> None:
        kept: list[list[str]] = []
        if self.resume and os.path.isfile(path) and os.path.getsize(path) > 0:
            header, body = _read_csv(path)
            if header != list(self.COLUMNS):
                raise ValueError(f"{path}: columns {header}, expected {list(self.COLUMNS)}; move the file away to start a new one.")
            kept = [r for r in body if int(r[0]) < step]
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        engine.write_csv([list(self.COLUMNS)] + kept, path)

    def record(self, step: int, model: nn.Module, writer: Any = None) -> list[dict]:
        """:meth:`measure`, :meth:`log` and, with an ``output_dir``, :func:`plot_kernel_dynamics`; returns the rows.
        A failing plot only warns: it must not stop a training run."""
        rows = self.measure(model)
        self.log(step, rows, writer)
        if self.csv_path and self.png_path:
            try:
                plot_kernel_dynamics(self.csv_path, self.png_path)
            except Exception as err:  # noqa: BLE001 - matplotlib raises many types
                warnings.warn(f"could not write {self.png_path}: {err}", RuntimeWarning, stacklevel=2)
        return rows


def _read_csv(path: str) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        lines = [r for r in csv.reader(f) if r]
    return (lines[0], lines[1:]) if lines else ([], [])


def plot_kernel_dynamics(csv_path: str, png_path: str) -> None:
    """Plot the CSV of :class:`KernelDynamics` (relative kernel change against step; one colour per
    stage, centre solid, periphery dashed) into ``png_path``, atomically."""
    header, body = _read_csv(csv_path)
    if header != list(KernelDynamics.COLUMNS):
        raise ValueError(f"{csv_path}: columns {header}, expected {list(KernelDynamics.COLUMNS)}.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    stages = sorted({int(r[1]) for r in body})
    for i, s in enumerate(stages):
        rows = sorted((int(r[0]), float(r[2]), float(r[3])) for r in body if int(r[1]) == s)
        steps = [r[0] for r in rows]
        colour = f"C{i}"
        ax.plot(steps, [r[1] for r in rows], "-o", color=colour, ms=3, label=f"stage {s} centre")
        ax.plot(steps, [r[2] for r in rows], "--s", color=colour, ms=3, label=f"stage {s} periphery")
    ax.set_xlabel("iteration")
    ax.set_ylabel(r"$\|W_t - W_0\| / \|W_0\|$ (effective kernel)")
    ax.set_title("kernel change from initialisation: centre (d <= 0.3 r) vs periphery (d > 0.7 r)", fontsize=9)
    ax.grid(alpha=0.3)
    if stages:
        ax.legend(fontsize=7, ncol=2)
    engine.save_figure_atomic(fig, png_path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# files


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------------
# checkpoints and inputs


def _run_config(checkpoint: Any, path: str) -> dict:
    """Network and dataset settings of a checkpoint of ours, in any format, through the shared reader
    (:meth:`configs.RunConfig.from_checkpoint`)."""
    import configs

    run = configs.RunConfig.from_checkpoint(checkpoint, path)
    if run is None:
        raise ValueError(
            f"{path}: the checkpoint does not say which network it holds (a bare state dict, or the authors' "
            "release?); pass a checkpoint written by main_train.py (best_metric_model.pth or checkpoint_last.pth)."
        )
    return {
        "name": run.network.name,
        "in_channels": int(run.network.in_channels),
        "out_channels": int(run.network.out_channels),
        # Without dwconv and deploy: the analysis builds the training form and lets
        # networks.load_network_weights fit folded or unfolded weights into it.
        "options": dict(run.network.architecture),
        "dataset": run.data.dataset,
    }


def _real_crops(root: str, dataset: Any, roi: Sequence[int], cases: int, in_channels: int) -> list[torch.Tensor]:
    """Centre crops (padded where smaller) of size ``roi`` of the first ``cases`` validation images,
    pre-processed as ``dataset`` (a ``load_datasets_transforms.DatasetConfig``) says."""
    import load_datasets_transforms as ldt
    from monai.transforms import ResizeWithPadOrCrop

    items = ldt.list_cases(root, "val")[:cases]
    if not items:
        raise ValueError(f"--root {root}: no validation cases found (imagesVal/labelsVal or a fold of imagesTr).")
    transform = ldt.get_val_transforms(dataset)
    crop = ResizeWithPadOrCrop(spatial_size=tuple(int(r) for r in roi))
    out = []
    for item in items:
        image = crop(transform(dict(item))["image"])
        image = torch.as_tensor(np.asarray(image), dtype=torch.float32)
        if image.shape[0] != in_channels:
            raise ValueError(f"{item['image']}: {image.shape[0]} channels, but the network takes {in_channels}.")
        out.append(image[None])
    return out


# --------------------------------------------------------------------------------------------------
# the analysis


@dataclass
class ErfConfig:
    """Settings of one analysis run (what :func:`main` parses).

    Args:
        sources: checkpoint paths, or registry network names (untrained, built with ``network_options``).
        output: output folder.
        root: dataset folder for real crops (validation split); None uses random inputs in [0, 1).
        cases: inputs averaged per network. Defaults to 4.
        roi: input crop size; defaults to the checkpoint's dataset ROI, else (96, 96, 96).
        dataset: dataset preset for sources without dataset settings (untrained networks) when ``root``.
        labels: one plot label per source; defaults to the run folder / file / network name.
        seed: seed of the random inputs and the untrained networks' initialisation.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        network_options: ``build_network`` keywords for untrained networks (feature_size, kernel_size, ...).
    """

    sources: list[str]
    output: str
    root: str | None = None
    cases: int = 4
    roi: tuple[int, int, int] | None = None
    dataset: str | None = None
    labels: list[str] | None = None
    seed: int = 0
    device: str = "auto"
    network_options: dict = field(default_factory=dict)


def _label(source: str) -> str:
    if not os.path.isfile(source):
        return source
    base = os.path.basename(source)
    parent = os.path.basename(os.path.dirname(os.path.abspath(source)))
    return parent if base in _RUN_FILES and parent else os.path.splitext(base)[0]


def _load_model(source: str, cfg: ErfConfig) -> tuple[nn.Module, dict, bool]:
    """The network of one source, its settings and whether its masks are the trained ones."""
    if os.path.isfile(source):
        ckpt = networks.read_checkpoint(source)
        run = _run_config(ckpt, source)
        model = networks.build_network(run["name"], run["in_channels"], run["out_channels"], **run["options"])
        networks.load_network_weights(model, ckpt)
        state = ckpt.get("state_dict", {}) if isinstance(ckpt, Mapping) else {}
        learned_masks = any(".modulation." in k for k in state)
        return model, run, learned_masks
    name = networks.canonical_name(source)
    torch.manual_seed(cfg.seed)
    model = networks.build_network(name, 1, 2, **cfg.network_options)
    run = {"name": name, "in_channels": 1, "out_channels": 2, "options": dict(cfg.network_options), "dataset": None}
    return model, run, True


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu.")
    return torch.device(name)


def analyse_source(source: str, cfg: ErfConfig, log: Callable[[str], None] = print) -> dict:
    """ERF and kernel statistics of one checkpoint or untrained network (one entry of ``erf.json``)."""
    device = _device(cfg.device)
    model, run, learned_masks = _load_model(source, cfg)
    model = model.to(device).eval()
    encoder, stages = encoder_stages(model)
    dataset = run["dataset"]
    if dataset is None and cfg.dataset is not None:
        import load_datasets_transforms as ldt  # MONAI transforms: imported only when they are needed

        dataset = ldt.get_dataset_config(cfg.dataset)
    roi = tuple(cfg.roi or (dataset.roi if dataset is not None else (96, 96, 96)))
    networks.check_roi(model, roi, run["in_channels"])
    if cfg.root is not None:
        if dataset is None:
            raise ValueError(f"{source}: no dataset settings to pre-process --root with; pass --dataset (e.g. amos, demo).")
        inputs = _real_crops(cfg.root, dataset, roi, cfg.cases, run["in_channels"])
        kind = "validation crops"
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        inputs = [torch.rand((1, run["in_channels"], *roi), generator=g) for _ in range(cfg.cases)]
        kind = "random inputs"
    log(f"{source}: {run['name']}, ERF of {len(stages)} stages over {len(inputs)} {kind} of {roi}")
    erfs = effective_receptive_fields(encoder, stages, (x.to(device) for x in inputs))
    stage_rows = []
    for s, erf in enumerate(erfs, start=1):
        row = {"stage": s, **summarise_erf(erf)}
        stage_rows.append(row)
    return {
        "source": os.path.abspath(source) if os.path.isfile(source) else source,
        "network": run["name"],
        "options": run["options"],
        "inputs": kind,
        "cases": len(inputs),
        "roi": list(roi),
        "dataset": dataset.name if dataset is not None else None,
        "stages": stage_rows,
        "kernels": kernel_statistics(model, with_mask=learned_masks),
        "masks_learned": learned_masks,
        "_maps": [e.numpy().astype(np.float32) for e in erfs],  # for the figures, dropped from the JSON
    }


def run_analysis(cfg: ErfConfig, log: Callable[[str], None] = print) -> dict:
    """Analyse every source, write ``erf.json``, ``erf.png`` and ``kernels.png`` into ``cfg.output``.

    Returns:
        The content of ``erf.json``.
    """
    if cfg.cases < 1:
        raise ValueError(f"--cases must be at least 1, got {cfg.cases}.")
    labels = list(cfg.labels) if cfg.labels else [_label(s) for s in cfg.sources]
    if len(labels) != len(cfg.sources):
        raise ValueError(f"--labels: {len(labels)} labels for {len(cfg.sources)} --trained_weights entries; give one each.")
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):  # keep legend entries apart
        seen[lab] = seen.get(lab, 0) + 1
        if seen[lab] > 1:
            labels[i] = f"{lab} ({seen[lab]})"
    os.makedirs(cfg.output, exist_ok=True)
    results = []
    for source, label in zip(cfg.sources, labels):
        entry = analyse_source(source, cfg, log)
        entry["label"] = label
        results.append(entry)
    report = {
        "version": 1,
        "thresholds": list(AREA_THRESHOLDS),
        "definitions": {
            "erf": "mean over inputs of |d(sum over channels of the stage output's centre voxel) / d input|",
            "area_ratio": "share of the input volume of the smallest cube, centred on the ERF's centre of mass and "
            "clipped to the input, that holds the threshold's share of the total contribution",
            "radial_profile": "mean of the ERF (normalised to its maximum) in unit-width bins of distance from that centre",
            "kernel_regions": f"centre d <= {CENTRE_FRACTION} * (K // 2), periphery d > {PERIPHERY_FRACTION} * (K // 2)",
        },
        "args": engine.jsonable(asdict(cfg)),
        "checkpoints": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
    }
    engine.write_json(report, os.path.join(cfg.output, "erf.json"))
    plot_erf(results, os.path.join(cfg.output, "erf.png"))
    plot_kernels(results, os.path.join(cfg.output, "kernels.png"))
    log(f"wrote {os.path.join(cfg.output, 'erf.json')}, erf.png and kernels.png")
    return report


# --------------------------------------------------------------------------------------------------
# figures


def _slices(volume: np.ndarray, centre: Sequence[int]) -> np.ndarray:
    """The three orthogonal slices through ``centre`` side by side (NaN gaps), padded to one height."""
    z, y, x = centre
    planes = [volume[z], volume[:, y], volume[:, :, x]]
    height = max(p.shape[0] for p in planes)
    cols = []
    for p in planes:
        pad = np.full((height, p.shape[1]), np.nan)
        pad[: p.shape[0]] = p
        cols += [pad, np.full((height, 2), np.nan)]
    return np.concatenate(cols[:-1], axis=1)


def plot_erf(results: Sequence[Mapping[str, Any]], path: str) -> None:
    """ERF figure: per network a row of stages (axial | coronal | sagittal slices through the ERF's
    centre, log10 of the map over its maximum), and a last row of radial profiles, networks overlaid."""
    plt = _pyplot()
    n_stages = max(len(r["stages"]) for r in results)
    fig, axes = plt.subplots(
        len(results) + 1, n_stages, figsize=(3.4 * n_stages, 2.2 * (len(results) + 1)), squeeze=False, layout="constrained"
    )
    image = None
    for i, r in enumerate(results):
        for s, (stage, erf) in enumerate(zip(r["stages"], r["_maps"])):
            ax = axes[i][s]
            peak = float(erf.max())
            shown = np.log10(np.clip(erf / peak, 1e-4, None)) if peak > 0 else np.zeros_like(erf)
            image = ax.imshow(_slices(shown, stage["centre"]), cmap="magma", vmin=-4, vmax=0)
            ax.set_xticks([])
            ax.set_yticks([])
            a50 = stage["area_ratio"].get("0.5")
            ax.set_title(f"{r['label']}: stage {stage['stage']}" + (f"\n50% in {100 * a50:.2g}% of volume" if a50 == a50 else ""), fontsize=8)
    for s in range(n_stages):
        ax = axes[-1][s]
        for i, r in enumerate(results):
            if s < len(r["stages"]):
                prof = r["stages"][s]["radial_profile"]
                # Zero beyond the ERF's support: gaps, not a drop to an arbitrary floor.
                values = np.asarray(prof["mean_contribution"], dtype=float)
                ax.semilogy(prof["distance"], np.where(values > 0, values, np.nan), color=f"C{i}", label=r["label"])
        ax.set_xlabel("distance from centre (voxels)", fontsize=8)
        ax.set_title(f"stage {s + 1}: radial profile", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1][0].set_ylabel("mean contribution / max", fontsize=8)
    axes[-1][0].legend(fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes[:-1].ravel().tolist(), shrink=0.6, label="log10(ERF / max); slices: axial | coronal | sagittal")
    engine.save_figure_atomic(fig, path)
    plt.close(fig)


def plot_kernels(results: Sequence[Mapping[str, Any]], path: str) -> None:
    """Kernel figure: per stage, mean |W_eff| against distance from the kernel centre (a line per
    block, networks in colours); below, for masked blocks, the mask M (solid) against the prior P (dashed)."""
    plt = _pyplot()
    rows = [r["kernels"] for r in results]
    n_stages = max((k["stage"] for ks in rows for k in ks), default=0)
    if n_stages == 0:
        raise ValueError("no depthwise kernels to plot.")
    has_mask = any(k["mask"] is not None for ks in rows for k in ks)
    n_rows = 2 if has_mask else 1
    fig, axes = plt.subplots(n_rows, n_stages, figsize=(3.4 * n_stages, 3.0 * n_rows), squeeze=False, layout="constrained")
    styles = ["-", "--", ":", "-."]
    prior_drawn: set[int] = set()
    for i, (r, ks) in enumerate(zip(results, rows)):
        for k in ks:
            style = styles[k["block"] % len(styles)]
            ax = axes[0][k["stage"] - 1]
            ax.semilogy(k["distance"], np.clip(k["weff_mean_abs"], 1e-12, None), style, color=f"C{i}", label=f"{r['label']} b{k['block']}")
            if k["mask"] is not None:
                ax2 = axes[1][k["stage"] - 1]
                ax2.plot(k["distance"], k["mask"], style, color=f"C{i}", label=f"{r['label']} M b{k['block']}")
                if k["stage"] not in prior_drawn:  # the prior depends on K and beta only: once per panel
                    ax2.plot(k["distance"], k["prior"], "--", color="k", lw=0.8, label="prior P")
                    prior_drawn.add(k["stage"])
    for s in range(n_stages):
        axes[0][s].set_title(f"stage {s + 1}: mean |W_eff|", fontsize=9)
        axes[-1][s].set_xlabel("distance from kernel centre (taps)", fontsize=8)
        for row in axes:
            row[s].grid(alpha=0.3)
        if has_mask:
            axes[1][s].set_title(f"stage {s + 1}: mask M vs prior P", fontsize=9)
    axes[0][0].legend(fontsize=6)
    if has_mask:
        axes[1][0].legend(fontsize=6)
    engine.save_figure_atomic(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags of :func:`main`."""
    p = argparse.ArgumentParser(
        prog="erf_analysis.py",
        description="Effective receptive fields and kernel statistics of REP3D / 3D UX-Net encoders: "
        "erf.json, erf.png and kernels.png in --output.",
    )
    p.add_argument("--trained_weights", nargs="+", required=True, metavar="F",
                   help="checkpoints written by main_train.py, and/or network names (e.g. REP3D REP3D_Vanilla) for "
                   "untrained networks; several are overlaid in the figures")
    p.add_argument("--output", required=True, help="folder for erf.json, erf.png and kernels.png")
    p.add_argument("--root", default=None, help="dataset folder: average over centre crops of its validation images "
                   "(pre-processed as the checkpoint's dataset). Default: random inputs in [0, 1)")
    p.add_argument("--cases", type=_positive_int, default=4, help="inputs averaged per network (default 4)")
    p.add_argument("--roi", type=_positive_int, nargs=3, default=None, metavar="N",
                   help="input size; default: the checkpoint's ROI, else 96 96 96. Not a sliding window: one crop per case")
    p.add_argument("--dataset", default=None, help="dataset preset (amos, demo, ...) for untrained networks with --root; "
                   "checkpoints use their own settings")
    p.add_argument("--labels", nargs="+", default=None, help="legend label per --trained_weights entry")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and of untrained networks")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default: cuda if visible)")
    g = p.add_argument_group("untrained networks", "shape of the networks named in --trained_weights (not for checkpoints, "
                             "which carry their own); default: the paper's")
    g.add_argument("--feature_size", type=_positive_int, nargs=4, default=None, metavar="C")
    g.add_argument("--depths", type=_positive_int, nargs=4, default=None, metavar="N")
    g.add_argument("--kernel_size", type=_positive_int, default=None)
    g.add_argument("--hidden_size", type=_positive_int, default=None)
    g.add_argument("--modulation", choices=("lrbm", "fixed", "none"), default=None,
                   help="kernel modulation; e.g. REP3D --modulation none is REP3D_Vanilla")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point. Exit codes: 0 done; 2 bad flags, missing files, unusable checkpoints."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = []
    for source in args.trained_weights:
        if os.path.isfile(source):
            continue
        try:
            names.append(networks.canonical_name(source))
        except ValueError:
            parser.error(
                f"--trained_weights {source}: no such file, and not a network name "
                f"({', '.join(networks.NETWORK_NAMES)})"
            )
    shape_flags = {k: getattr(args, k) for k in ("feature_size", "depths", "kernel_size", "hidden_size", "modulation")}
    shape_flags = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in shape_flags.items() if v is not None}
    if shape_flags and not names:
        parser.error(f"--{next(iter(shape_flags))} shapes untrained networks only; the checkpoints carry their own settings")
    if args.root is not None and not os.path.isdir(args.root):
        parser.error(f"--root {args.root}: folder not found")
    if args.labels is not None and len(args.labels) != len(args.trained_weights):
        parser.error(f"--labels: {len(args.labels)} labels for {len(args.trained_weights)} --trained_weights entries")
    cfg = ErfConfig(
        sources=list(args.trained_weights),
        output=args.output,
        root=args.root,
        cases=args.cases,
        roi=tuple(args.roi) if args.roi else None,
        dataset=args.dataset,
        labels=args.labels,
        seed=args.seed,
        device=args.device,
        network_options=shape_flags,
    )
    try:
        run_analysis(cfg)
    except ValueError as err:  # CheckpointError, DataError and our own: the message says what to change
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())

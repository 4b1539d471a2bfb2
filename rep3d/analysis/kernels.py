"""Kernel statistics of the large depthwise kernels (centre vs periphery energy, the LRBM mask) and
their dynamics over training (:class:`KernelDynamics`)."""

from __future__ import annotations

import csv
import math
import os
import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from rep3d.analysis.erf import distance_grid, radial_profile
from rep3d.fileio import pyplot, save_checkpoint_atomic, save_figure_atomic, write_csv
from rep3d.runtime import unwrap_model

#: Kernel regions as fractions of the kernel radius K // 2 (Euclidean distance from the centre): for
#: K = 21 the centre is d <= 3 and the periphery d > 7, the issue's definition.
CENTRE_FRACTION = 0.3


PERIPHERY_FRACTION = 0.7


def _find_encoder(model: nn.Module) -> nn.Module | None:
    # REP3D and 3D UX-Net share networks.blocks.HierarchicalEncoder: stem/downsampling layers and a
    # ModuleList of stages, whose i-th entry produces the features of stride 2^(i+1).
    for module in unwrap_model(model).modules():
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
            f"{type(unwrap_model(model)).__name__} has no staged convolutional encoder: the ERF and kernel analysis "
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


def kernel_regions(kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (K, K, K) masks of the kernel's centre and periphery.

    Euclidean distance d from the centre tap, radius r = K // 2: centre ``d <= 0.3 r``, periphery
    ``d > 0.7 r`` (K = 21: d <= 3 and d > 7).
    """
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd number >= 3, got {kernel_size!r}.")
    r = kernel_size // 2
    d = torch.sqrt(distance_grid((kernel_size,) * 3, (r, r, r)))
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
                f"{type(unwrap_model(model)).__name__} has no depthwise kernels in a staged encoder; use "
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
                save_checkpoint_atomic({"kernels": kernels}, self.init_path)
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
        write_csv([list(self.COLUMNS)] + kept, path)

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
    plt = pyplot()
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
    save_figure_atomic(fig, png_path)
    plt.close(fig)


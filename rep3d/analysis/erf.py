"""Effective receptive fields: gradients of the centre output with respect to the input, radial
profiles, area ratios, and their figures."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from rep3d.fileio import pyplot, save_figure_atomic

AREA_THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)


def distance_grid(shape: Sequence[int], centre: Sequence[float]) -> torch.Tensor:
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
    d2 = distance_grid(v.shape, centre).flatten()
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
    plt = pyplot()
    n_stages = max(len(r["stages"]) for r in results)
    n_maps = len(results)
    # A map panel holds three slices side by side (about 3.3 : 1), so its row needs less height than
    # the profiles' row; equal rows left most of the figure blank.
    fig, axes = plt.subplots(
        n_maps + 1, n_stages, figsize=(3.4 * n_stages, 1.6 * n_maps + 2.6), squeeze=False, layout="constrained",
        gridspec_kw={"height_ratios": [1.0] * n_maps + [1.7]},
    )  # fmt: skip
    fig.suptitle("Effective receptive field per encoder stage: axial | coronal | sagittal slices through its centre", fontsize=9)
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
        for s in range(len(r["stages"]), n_stages):  # a network with fewer stages: no empty frames
            axes[i][s].set_axis_off()
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
        # The label must be shorter than the bar: constrained layout makes room for its width, not for a
        # rotated label that overruns the bar's ends (the slice order is in the title instead).
        cbar = fig.colorbar(image, ax=axes[:-1].ravel().tolist(), fraction=0.03, aspect=12 * n_maps)
        cbar.set_label("log10(ERF / max)", fontsize=8)
        cbar.ax.tick_params(labelsize=7)
    # "tight" as well: whatever still reaches past the canvas (a long label of the user's) is kept.
    save_figure_atomic(fig, path, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)


def plot_kernels(results: Sequence[Mapping[str, Any]], path: str) -> None:
    """Kernel figure: per stage, mean |W_eff| against distance from the kernel centre (a line per
    block, networks in colours); below, for masked blocks, the mask M (solid) against the prior P (dashed)."""
    plt = pyplot()
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
    save_figure_atomic(fig, path, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)

"""Sliding-window prediction of whole volumes (MONAI's inferer), test-time mirroring, compiled windows,
and the mean of several models' probabilities (ensembles)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference

from rep3d.runtime import autocast


def _flip_sets(spatial_dims: int) -> Iterator[tuple[int, ...]]:
    dims = tuple(range(2, 2 + spatial_dims))
    for r in range(len(dims) + 1):
        yield from itertools.combinations(dims, r)


def compile_for_windows(model: nn.Module, sw_batch_size: int, **compile_kwargs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile(model)`` for sliding-window inference, compiled for one input shape only.

    Every window has the ROI's shape, so the compiled graph is reused for every window batch of every
    volume; a short last batch is padded with zeros to ``sw_batch_size`` (and cropped from the output)
    instead of triggering a recompilation. The first call compiles (about 30 s for REP3D on an H100).
    ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode="reduce-overhead"``).
    """
    compiled = torch.compile(model, dynamic=False, **compile_kwargs)

    def predict(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n < sw_batch_size:
            x = torch.cat([x, x.new_zeros((sw_batch_size - n, *x.shape[1:]))])
        return compiled(x)[:n]

    return predict


def sliding_window_predict(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    roi: Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.5,
    mode: str = "gaussian",
    amp_dtype: torch.dtype | None = None,
    tta: bool = False,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Softmax probabilities of ``model`` over a whole volume, by MONAI's sliding-window inferer.

    Runs under ``torch.no_grad()``; put the model in eval mode first.

    Args:
        model: the network (logits out).
        image: (N, C_in, D, H, W) volume; volumes smaller than ``roi`` are padded (and cropped back).
        roi: window size in voxels.
        sw_batch_size: windows per forward pass.
        overlap: window overlap in [0, 1).
        mode: blending of overlapping windows, ``"gaussian"`` (default) or ``"constant"``.
        amp_dtype: autocast dtype of the forward passes (``None`` = float32); windows are stitched in float32.
        tta: also average over the mirrorings of the spatial axes (all 8 flip combinations in 3-D,
            each flipped back): 8x the compute.
        sw_device: where the windows run (default: ``image``'s device).
        device: where the stitched output is kept (e.g. ``"cpu"`` to save GPU memory on big volumes).

    Returns:
        float32 probabilities (N, C_out, D, H, W) on ``device``.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"--overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise ValueError(f"--sw_batch_size must be >= 1, got {sw_batch_size}")
    roi = [int(r) for r in roi]
    run_device = torch.device(sw_device) if sw_device is not None else image.device

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with autocast(run_device, amp_dtype):
            out = model(x)
        return out.float()  # stitch in float32: bf16 accumulation loses the small weights at window edges

    def once(x: torch.Tensor) -> torch.Tensor:
        logits = sliding_window_inference(
            x, roi, sw_batch_size, predictor, overlap=overlap, mode=mode, sw_device=sw_device, device=device
        )
        return torch.softmax(torch.as_tensor(logits).float(), dim=1)

    with torch.no_grad():
        if not tta:
            return once(image)
        total = None
        n = 0
        for dims in _flip_sets(image.ndim - 2):
            x = torch.flip(image, dims) if dims else image
            p = once(x)
            p = torch.flip(p, dims) if dims else p
            total = p if total is None else total.add_(p)
            n += 1
        return total.div_(n)


def predict_volume(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    roi: Sequence[int],
    device: torch.device,
    sw_batch_size: int = 4,
    overlap: float = 0.5,
    mode: str = "gaussian",
    amp_dtype: torch.dtype | None = None,
    tta: bool = False,
    stitch_on_cpu: bool = False,
) -> torch.Tensor:
    """Softmax probabilities (1, C, ...) of one pre-processed volume by sliding window.

    With ``stitch_on_cpu`` the volume and the stitched output stay in RAM and only the windows go to
    ``device``; otherwise everything lives on ``device``. Returns float32 on the stitching device.
    """
    image = torch.as_tensor(image)  # plain tensor: the metadata stays with the caller's copy
    if stitch_on_cpu or device.type == "cpu":
        return sliding_window_predict(
            model, image.cpu(), roi, sw_batch_size, overlap, mode, amp_dtype, tta, sw_device=device, device=torch.device("cpu")
        )
    return sliding_window_predict(model, image.to(device), roi, sw_batch_size, overlap, mode, amp_dtype, tta)


def ensemble_probabilities(
    models: Sequence[nn.Module | Callable[[torch.Tensor], torch.Tensor]], image: torch.Tensor, rois: Sequence[Sequence[int]], device: torch.device, **kwargs: Any
) -> torch.Tensor:
    """The mean of the softmax probabilities of ``models`` (each with its own window ``rois[i]``) over
    one volume: :func:`predict_volume` per model, summed in place (one extra volume of memory)."""
    total = None
    for model, roi in zip(models, rois):
        p = predict_volume(model, image, roi, device, **kwargs)
        total = p if total is None else total.add_(p.to(total.device))
        del p
    return total.div_(len(models)) if len(models) > 1 else total

"""Export a trained checkpoint for use outside this repository: ONNX and/or TorchScript, with a JSON sidecar.

    python export_model.py --trained_weights runs/demo/best_metric_model.pth --output exports/demo
    python export_model.py --trained_weights best_metric_model.pth --output out --format onnx torchscript

The network is folded first (deploy form: LRBM masks multiplied into the kernels, so every Rep3D block
is a plain DWConv -> BN -> GELU; the ONNX exporter folds BN into the convolution too). Written to
``--output``:

* ``model.onnx`` (ONNX opset 18-20, default 20; ONNX Runtime, 3D Slicer, MONAI Deploy) and/or
  ``model.ts`` (TorchScript, ``torch.jit.load`` from Python or ``torch::jit::load`` from C++). Input
  ``image`` (N, C, X, Y, Z) float32, output ``logits`` (N, classes, X, Y, Z): apply softmax over axis 1.
  The batch axis is always dynamic. The spatial axes are dynamic (REP3D / 3D UX-Net: any multiple of
  16) for the native depthwise path; the FFT path plans its transform sizes per input size, so it is
  exported for the ROI (what sliding-window inference feeds it). Networks built for one input size are
  exported for it.
* ``model.json``: everything needed to use the export without this repository: input channels and
  their normalisation, target spacing and orientation, ROI, class names, sliding-window settings,
  the post-processing decision of ``test_seg.py --postprocess auto`` if one is stored beside the
  checkpoint, the axes that are dynamic, the files' SHA-256, and the self-check's result.
  ``test_seg.Predictor`` reads it directly (``Predictor("out/model.json")``).

Each export is then checked: ONNX Runtime's / TorchScript's output on random inputs (the ROI, and for a
dynamic export also a second batch and spatial size) must equal PyTorch's within 1e-4 relative
(max |difference| / max |PyTorch output|, float32); the script says so, and exits with an error if not.

Depthwise convolution (``--dwconv``): the FFT path exports to ONNX (``DFT`` nodes, transform lengths
rounded up to powers of two, the only lengths ONNX Runtime's DFT is fast for). In ONNX Runtime on the
CPU that is faster for REP3D's 21^3 kernels (8.0 s against 15.0 s per 96^3 window natively) and slower
for 3D UX-Net's 7^3 (5.6 s against 4.4 s) (2 cores, benchmarks/RESULTS.md), so ``auto`` (the
default) exports kernels larger than 7 through the FFT and smaller ones natively. TorchScript always
gets the native path (``torch.jit.trace`` fails on the FFT path in torch 2.13). ``--dwconv native``
gives an ONNX file with dynamic spatial axes.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

import networks
from networks import fftconv
from rep3d.data.intensity import sidecar_normalisation, sidecar_steps
from rep3d.fileio import sha256_of, write_json
from rep3d.inference.checkpoint import load_model, resolve_checkpoint
from rep3d.inference.exported import SIDECAR_VERSION, ExportError, export_runner
from rep3d.inference.postprocess import load_decision
from rep3d.runtime import unwrap_model

logger = logging.getLogger(__name__)


FORMATS = ("onnx", "torchscript")


#: ONNX opsets this exporter is tested with: torch's ONNX exporter writes 18 and newer; 20 is the newest
#: that the ONNX Runtime versions of 3D Slicer / MONAI Deploy of 2025 and later read.
OPSETS = (18, 19, 20)


DEFAULT_OPSET = 20


#: max |export - PyTorch| / max |PyTorch| allowed by the self-check (float32).
TOLERANCE = 1e-4


_FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}


DWCONV_CHOICES = ("auto", "native", "fft")


#: Largest depthwise kernel exported natively by ``--dwconv auto``; larger ones take the FFT path in ONNX.
#: Measured in ONNX Runtime on the 2-core development machine (benchmarks/RESULTS.md, "CPU inference"):
#: REP3D's 21^3 kernels 8.0 s per 96^3 window through DFT against 15.0 s natively; 3D UX-Net's 7^3
#: kernels 5.6 s through DFT against 4.4 s natively.
NATIVE_MAX_KERNEL = 7


def dwconv_for(fmt: str, dwconv: str = "auto", kernel_size: int | None = None) -> str:
    """The depthwise implementation exported to ``fmt``: ``dwconv`` itself, or for ``auto`` the
    faster one in ONNX Runtime for this kernel size (FFT above :data:`NATIVE_MAX_KERNEL`, native up
    to it) and always the native one in TorchScript (the tracer cannot record the FFT path)."""
    if dwconv != "auto":
        return dwconv
    return "fft" if fmt == "onnx" and kernel_size is not None and kernel_size > NATIVE_MAX_KERNEL else "native"


def _largest_kernel(resolved: dict) -> int | None:
    """The largest depthwise kernel of the resolved checkpoint's network (None without any)."""
    if not networks.network_accepts(resolved["network"], "dwconv"):
        return None
    model = networks.build_network(resolved["network"], resolved["in_channels"], resolved["out_channels"], **{**resolved["network_kwargs"], "dwconv": "native"})
    sizes = [m.kernel_size[0] for m in model.modules() if isinstance(m, networks.DepthwiseConv3d)]
    return max(sizes) if sizes else None


def _has_dwconv(model: nn.Module) -> bool:
    return any(isinstance(m, networks.DepthwiseConv3d) for m in model.modules())


def check_request(formats: Sequence[str], opset: int, dwconv: str = "auto") -> list[str]:
    """The formats to write, de-duplicated; refuses unknown formats, untested opsets and TorchScript
    of the FFT path (torch.jit.trace fails on it: RuntimeError unordered_map::at, torch 2.13).

    Raises:
        ExportError: naming the accepted values.
    """
    problems = []
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        problems.append(f"--format {' '.join(bad)}: not supported; choose from {', '.join(FORMATS)}")
    if not formats:
        problems.append(f"--format needs at least one of {', '.join(FORMATS)}")
    if int(opset) not in OPSETS:
        problems.append(f"--opset {opset}: not supported; this exporter writes and checks opsets {', '.join(map(str, OPSETS))} (default {DEFAULT_OPSET})")
    if dwconv not in DWCONV_CHOICES:
        problems.append(f"--dwconv {dwconv}: choose from {', '.join(DWCONV_CHOICES)}")
    elif dwconv == "fft" and "torchscript" in formats:
        problems.append("--format torchscript with --dwconv fft: the TorchScript tracer cannot record the FFT path; use --dwconv auto (the default) or native")
    if problems:
        raise ExportError("; ".join(problems))
    return list(dict.fromkeys(formats))


def deploy_model(resolved: dict, dwconv: str = "native") -> nn.Module:
    """The folded (deploy) network of a resolved checkpoint (``test_seg.resolve_checkpoint``), in eval
    mode on the CPU, its depthwise convolutions set to ``dwconv`` (``native`` or ``fft``)."""

    if dwconv not in ("native", "fft"):
        raise ExportError(f"deploy_model: dwconv must be native or fft, got {dwconv!r}")
    kwargs = dict(resolved["network_kwargs"])
    if networks.network_accepts(resolved["network"], "dwconv"):
        kwargs["dwconv"] = dwconv
    model = load_model({**resolved, "network_kwargs": kwargs}, "cpu", resolved["path"])
    return networks.set_dwconv_impl(model, dwconv).eval()


def _size_divisor(model: nn.Module) -> int | None:
    return getattr(unwrap_model(model), "size_divisor", None)


def export_onnx(model: nn.Module, path: str, example: torch.Tensor, dynamic: bool = True, opset: int = DEFAULT_OPSET, dynamic_spatial: bool = True) -> dict:
    """Export ``model`` to ONNX with torch's exporter (``torch.export`` based).

    Args:
        model: eval-mode network (logits out).
        path: the ``.onnx`` file.
        example: an input of the ROI's size.
        dynamic: dynamic batch and spatial axes (spatial sizes multiples of the network's
            ``size_divisor``); falls back to a dynamic batch only, then to the example's shape, when the
            network cannot be exported that way.
        opset: ONNX opset.
        dynamic_spatial: try dynamic spatial axes (False: batch only, e.g. for the FFT path).

    Returns:
        ``{"dynamic_axes": {axis: rule}, "opset": int}``.
    """
    from torch.export import Dim

    divisor = _size_divisor(model)
    attempts: list[tuple[dict, dict]] = []
    if dynamic and dynamic_spatial and divisor:
        spatial = {i: int(divisor) * Dim(f"{a}_{divisor}", min=1, max=4096 // int(divisor)) for i, a in zip((2, 3, 4), "xyz")}
        attempts.append(({0: Dim("batch", min=1, max=4096), **spatial}, {"0": "batch (any)", **{str(i): f"multiple of {divisor}" for i in spatial}}))
    if dynamic:
        attempts.append(({0: Dim("batch", min=1, max=4096)}, {"0": "batch (any)"}))
    attempts.append(({}, {}))
    last: Exception | None = None
    for shapes, described in attempts:
        try:
            with warnings.catch_warnings(), _quiet_exporter(), _power_of_two_fft(model):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model, (example,), path, dynamo=True, opset_version=int(opset), input_names=["image"], output_names=["logits"],
                    dynamic_shapes={"x": shapes} if shapes else None, external_data=False, verbose=False,
                )  # fmt: skip
            return {"dynamic_axes": described, "opset": int(opset)}
        except Exception as err:  # noqa: BLE001 - the exporter raises many types; the next attempt is simpler
            last = err
            logger.info("ONNX export with dynamic axes %s failed (%s): trying %s", described or "none", type(err).__name__, "fewer" if shapes else "none")
    raise ExportError(f"the ONNX export failed: {type(last).__name__}: {str(last).strip().splitlines()[0] if str(last).strip() else ''}")


@contextlib.contextmanager
def _power_of_two_fft(model: nn.Module) -> Iterator[None]:
    """While exporting, size the FFT path's transforms to powers of two instead of the smallest
    {2, 3, 5, 7}-smooth length. Any length >= N + K // 2 gives the same exact convolution; ONNX Runtime's
    DFT is fast only for powers of two (one rfftn + irfftn of 48 x 48^3 at length 60: 19 s, at 64: 5 s,
    2 shared cores), while PyTorch's FFT prefers the smooth lengths (1.2 s against 1.6 s)."""
    if not any(getattr(m, "impl", None) == "fft" for m in model.modules()):
        yield
        return

    def clear() -> None:
        fftconv.fft_plan.cache_clear()
        for m in model.modules():
            if isinstance(m, networks.DepthwiseConv3d):
                m.clear_spectrum_cache()

    smooth = fftconv.next_fast_len
    fftconv.next_fast_len = lambda n, even=False: 1 << max(int(n) - 1, 0).bit_length()
    clear()
    try:
        yield
    finally:
        fftconv.next_fast_len = smooth
        clear()


class _quiet_exporter:
    """Silence the exporter's progress lines and its notices about optional packages (torchvision)."""

    def __enter__(self):
        self._levels = {}
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes", "onnxscript"):
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(logging.ERROR)
        self._stdout = sys.stdout
        sys.stdout = open(os.devnull, "w")  # the "[torch.onnx] ..." progress lines go to stdout
        return self

    def __exit__(self, *exc):
        sys.stdout.close()
        sys.stdout = self._stdout
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        return False


def export_torchscript(model: nn.Module, path: str, example: torch.Tensor) -> dict:
    """Trace ``model`` to TorchScript and freeze it (BN folded into the convolutions by
    ``torch.jit.freeze``). With the native depthwise path the traced graph takes any input size the
    network takes; with the FFT path the transform sizes are those of ``example``.

    Returns:
        ``{"dynamic_axes": {...}}``.
    """
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notices about shape checks turned into constants
        traced = torch.jit.trace(model, example, check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
    frozen.save(path)
    uses_fft = any(getattr(m, "impl", None) == "fft" for m in model.modules())
    divisor = _size_divisor(model)
    dynamic = {"0": "batch (any)"}
    if divisor and not uses_fft and not getattr(model, "img_size", None):
        dynamic.update({str(i): f"multiple of {divisor}" for i in (2, 3, 4)})
    return {"dynamic_axes": dynamic}


def relative_error(out: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    """max |out - ref| / max |ref| (float64)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        return float("inf")
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))


def _check_inputs(example: torch.Tensor, dynamic_axes: dict, divisor: int | None) -> list[torch.Tensor]:
    """Random inputs for the self-check: the ROI, and a second batch / spatial size where dynamic."""
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(example.shape, generator=g)]
    shape = list(example.shape)
    if "0" in dynamic_axes:
        shape[0] = 2
    if divisor and all(str(i) in dynamic_axes for i in (2, 3, 4)):
        shape[2] += divisor
        shape[4] = max(divisor, shape[4] - divisor)
    if shape != list(example.shape):
        inputs.append(torch.randn(shape, generator=g))
    return inputs


def export_checkpoint(
    checkpoint: str,
    output: str,
    formats: Sequence[str] = ("onnx",),
    opset: int = DEFAULT_OPSET,
    dwconv: str = "auto",
    dynamic: bool = True,
    flags: dict | None = None,
) -> dict:
    """Fold, export, check and describe one checkpoint; returns the sidecar written to ``output/model.json``.

    Args:
        checkpoint: a checkpoint of ``main_train.py`` (formats 1 and 2; bare state dicts need ``flags``
            with their settings, as for ``test_seg.py``).
        output: folder for the files.
        formats: ``onnx`` and/or ``torchscript``.
        opset: ONNX opset (one of :data:`OPSETS`).
        dwconv: depthwise convolution implementation exported: ``native`` (dynamic sizes), ``fft``
            (spatial size fixed to the ROI; ONNX only) or ``auto``: per format, :func:`dwconv_for`.
        dynamic: export dynamic batch and spatial axes where possible.
        flags: ``test_seg.py`` flag values for checkpoints without stored settings.

    Raises:
        ExportError: an unsupported format or opset, a failed export, or a check beyond :data:`TOLERANCE`.
    """

    formats = check_request(formats, opset, dwconv)
    resolved = resolve_checkpoint(checkpoint, dict(flags or {}))
    cfg = resolved["cfg"]
    models: dict[str, nn.Module] = {}
    kernel = _largest_kernel(resolved) if dwconv == "auto" else None
    example = torch.randn(1, resolved["in_channels"], *cfg.roi)
    os.makedirs(output, exist_ok=True)
    files: dict[str, dict] = {}
    for fmt in formats:
        path = os.path.join(output, _FILES[fmt])
        impl = dwconv_for(fmt, dwconv, kernel)
        if impl not in models:
            models[impl] = deploy_model(resolved, impl)
        model = models[impl]
        if fmt == "onnx":
            info = export_onnx(model, path, example, dynamic=dynamic, opset=opset, dynamic_spatial=impl == "native" or not _has_dwconv(model))
        else:
            info = export_torchscript(model, path, example)
        run = export_runner(fmt, path)
        checks = []
        for x in _check_inputs(example, info["dynamic_axes"], _size_divisor(model)):
            with torch.no_grad():
                ref = model(x)
            err = relative_error(run(x), ref)
            checks.append({"input_shape": list(x.shape), "max_relative_error": err})
        worst = max(c["max_relative_error"] for c in checks)
        ok = worst <= TOLERANCE
        label = "ONNX Runtime" if fmt == "onnx" else "TorchScript"
        print(f"{label}: {path}: output {'equals' if ok else 'DIFFERS FROM'} PyTorch's within {TOLERANCE:g} relative "
              f"(float32; max relative difference {worst:.2e} over inputs {', '.join('x'.join(map(str, c['input_shape'])) for c in checks)})")  # fmt: skip
        if not ok:
            raise ExportError(f"{path}: the {label} output differs from PyTorch's by {worst:.2e} relative (> {TOLERANCE:g}); do not use this export")
        files[fmt] = {"path": _FILES[fmt], "sha256": sha256_of(path), "dwconv": impl if _has_dwconv(model) else None, **info, "check": {"tolerance": TOLERANCE, "passed": True, "inputs": checks}}
    sidecar = describe(resolved, model, files)
    write_json(sidecar, os.path.join(output, "model.json"))
    return sidecar


def describe(resolved: dict, model: nn.Module, files: dict) -> dict:
    """The sidecar: what a program outside this repository needs to feed the export and read its output."""
    cfg = resolved["cfg"]
    norm = sidecar_normalisation(cfg.channel_norms())
    decision = None
    try:

        decision = load_decision([resolved["path"]], resolved["out_channels"])
    except Exception:  # noqa: BLE001 - a missing or unreadable decision just leaves it out
        decision = None
    return {
        "format": "rep3d-export",
        "format_version": SIDECAR_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "exported_with": {"torch": torch.__version__, "source_checkpoint": os.path.abspath(resolved["path"]), "checkpoint_sha256": sha256_of(resolved["path"])},
        "network": {
            "name": resolved["network"], "in_channels": resolved["in_channels"], "out_channels": resolved["out_channels"],
            "options": {k: v for k, v in resolved["network_kwargs"].items() if k != "dwconv"}, "deploy": True,
            "spatial_multiple_of": _size_divisor(model),
        },  # fmt: skip
        "files": files,
        "input": {
            "name": "image",
            "layout": "N, C, X, Y, Z: voxel axes after re-orienting to RAS (first axis towards Right, second Anterior, third Superior)",
            "dtype": "float32",
            "channels": resolved["in_channels"],
            "orientation": "RAS",
            "spacing_mm": list(cfg.spacing),
            "normalisation": norm,
            "steps": [
                "load the NIfTI volume (channel first)",
                f"resample to spacing {list(cfg.spacing)} mm (bilinear)",
                "re-orient to RAS",
                *sidecar_steps(cfg.channel_norms()),
                "predict by sliding window (sliding_window), softmax over the class axis",
                "undo the crop, orientation and resampling (nearest neighbour for labels) to return to the input's grid",
            ],  # fmt: skip
        },
        "output": {"name": "logits", "layout": "N, classes, X, Y, Z", "activation": "softmax over axis 1, then argmax = class index",
                   "num_classes": resolved["out_channels"], "class_names": list(cfg.class_names)},  # fmt: skip
        "sliding_window": {"roi": list(cfg.roi), **resolved.get("sliding_window", {"overlap": 0.5, "mode": "gaussian", "sw_batch_size": 4})},
        "postprocessing": {"largest_component": decision["largest_component"]} if decision else {"largest_component": []},
        "dataset": cfg.to_dict(),
    }

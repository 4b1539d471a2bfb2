"""Pieces shared by ``main_train.py`` and ``test_seg.py``: network and runtime flags, device and AMP
selection, sliding-window prediction, the Dice metric, atomic checkpoints, seeding.

    parser = argparse.ArgumentParser()
    engine.add_network_args(parser)
    engine.add_runtime_args(parser)
    args = parser.parse_args()
    device = engine.select_device(args.gpu)
    model = networks.build_network(args.network, 1, 5, **engine.network_overrides(args)).to(device)
    probs = engine.sliding_window_predict(model, image, roi=(96, 96, 96), amp_dtype=engine.resolve_amp("auto", device, inference=True))
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import random
import tempfile
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric

import networks
from networks.Rep3D import MODULATIONS

logger = logging.getLogger(__name__)

__all__ = [
    "AMP_CHOICES",
    "DiceAccumulator",
    "compile_for_windows",
    "add_network_args",
    "add_runtime_args",
    "autocast",
    "cpu_has_native_bf16",
    "dice_scores",
    "dice_table",
    "is_oom",
    "jsonable",
    "network_overrides",
    "resolve_amp",
    "save_checkpoint_atomic",
    "select_device",
    "set_seed",
    "sliding_window_predict",
    "str2bool",
    "unwrap_model",
    "write_csv",
    "write_json",
    "write_text_atomic",
    "save_figure_atomic",
]

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


# --------------------------------------------------------------------------------------------------
# flags


def str2bool(value: str | bool) -> bool:
    """argparse ``type`` for real booleans: True/False, yes/no, 1/0, on/off (any case)."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("true", "t", "yes", "y", "1", "on"):
        return True
    if v in ("false", "f", "no", "n", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False, yes/no, 1/0), got {value!r}")


def _network_name(value: str) -> str:
    try:
        return networks.canonical_name(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    # A script may define one of these flags its own way first (test_seg.py's bare --amp): keep it.
    if any(f in parser._option_string_actions for f in flags):
        return
    parser.add_argument(*flags, **kwargs)


def add_network_args(parser: argparse.ArgumentParser) -> None:
    """Add the network flags: ``--network --modulation --kernel_size --dwconv --feature_size --depths
    --hidden_size``.

    Every option except ``--network`` (default REP3D) and ``--dwconv`` (default auto) defaults to
    ``None``, meaning "the network's own default" (the paper's settings), so that a checkpoint's
    settings can fill in what the user did not give.

    Args:
        parser: the script's parser.
    """
    g = parser.add_argument_group("network")
    g.add_argument("--network", type=_network_name, default="REP3D", help=f"network to build (case-insensitive): {', '.join(networks.NETWORK_NAMES)}")
    g.add_argument("--modulation", choices=MODULATIONS, default=None, help="kernel modulation of REP3D / 3DUXNET: lrbm (M = P + f(P), the paper's), fixed (M = P), none (plain kernel). Default: the network's own")
    g.add_argument("--kernel_size", type=int, default=None, help="depthwise kernel size (odd; REP3D 21, 3DUXNET 7 by default)")
    g.add_argument("--dwconv", choices=networks.DWCONV_IMPLS, default="auto", help="how large depthwise convolutions are computed: native conv3d, fft, or auto (per shape and device); same result")
    g.add_argument("--feature_size", type=int, nargs=4, default=None, metavar="C", help="channels of the 4 encoder stages (paper: 48 96 192 384); smaller for quick experiments")
    g.add_argument("--depths", type=int, nargs=4, default=None, metavar="N", help="blocks per encoder stage (paper: 2 2 2 2)")
    g.add_argument("--hidden_size", type=int, default=None, help="bottleneck channels (paper: 768)")


def network_overrides(name: str, values: Mapping[str, Any], roi: Sequence[int] | None = None) -> dict:
    """Keyword arguments of :func:`networks.build_network` for network ``name`` from flag values.

    Only the options the network takes are kept (``networks.network_options``); ``None`` values (not
    given) are dropped, and so is ``dwconv="auto"`` (every network's default). Lists stay lists
    (JSON- and ``weights_only``-friendly checkpoints).

    Args:
        name: registry name.
        values: flag values by name (e.g. ``vars(args)`` at a script's edge).
        roi: when given, networks built for one input size (UNETR, nnFormer, ...: an ``img_size``
            constructor argument) get ``img_size=roi``.
    """
    options = networks.network_options(name)
    out = {}
    for key in options:
        v = values.get(key)
        if v is None or (key == "dwconv" and v == "auto") or key == "img_size":
            continue
        out[key] = list(v) if isinstance(v, (list, tuple)) else v
    # Declaring img_size means "built for the ROI" (the registry's test checks it against the constructors).
    if roi is not None and "img_size" in options:
        out["img_size"] = [int(r) for r in roi]
    return out


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--gpu --amp --sw_batch_size --overlap/--val_overlap`` (``--roi`` comes with the dataset
    flags of ``load_datasets_transforms.add_dataset_args``: its default is the preset's ROI), as a
    "runtime" group."""
    group = parser.add_argument_group("runtime")
    _add(
        group,
        "--gpu",
        type=int,
        default=0,
        help="CUDA device index for a single-process run (-1 = CPU; falls back to CPU when no GPU is visible). "
        "Not for multi-GPU: select GPUs with CUDA_VISIBLE_DEVICES and launch with torchrun --nproc_per_node N (DDP)",
    )
    _add(group, "--amp", choices=AMP_CHOICES, default="auto", help="mixed precision: auto (bf16 on GPUs that support it, else fp16; off on CPU), bf16, fp16 (CUDA only), off")
    _add(group, "--sw_batch_size", type=int, default=4, help="windows per forward pass in sliding-window inference; lower it if GPU memory runs out")
    _add(group, "--overlap", "--val_overlap", dest="overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")


# --------------------------------------------------------------------------------------------------
# device, precision


def select_device(gpu: int | None) -> torch.device:
    """The device to run on.

    Args:
        gpu: CUDA index, ``-1`` for CPU, ``None`` for "cuda:0 if available". When no GPU is visible the
            CPU is used (with a warning if a GPU index was asked for explicitly other than 0).

    Raises:
        ValueError: an index beyond the visible GPUs.
    """
    if gpu is not None and gpu < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if gpu not in (None, 0):
            warnings.warn(f"--gpu {gpu} asked for but no CUDA GPU is visible: running on the CPU", stacklevel=2)
        return torch.device("cpu")
    index = 0 if gpu is None else int(gpu)
    n = torch.cuda.device_count()
    if index >= n:
        raise ValueError(f"--gpu {index}: only {n} GPU(s) visible (indices 0..{n - 1}); pass one of those, or -1 for the CPU")
    # Fixed input sizes (crops, sliding windows): let cuDNN pick the fastest algorithms once.
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda", index)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bfloat16 convolutions and matrix products natively (AVX512-BF16 or AMX,
    through oneDNN). Elsewhere bf16 on the CPU is emulated and slower than float32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: str, device: torch.device, inference: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device`` (``None`` = full float32).

    ``auto``: bf16 on CUDA GPUs that support it, else fp16. On the CPU: off for training, and for
    inference (``inference=True``) bf16 where the CPU does bf16 natively (:func:`cpu_has_native_bf16`:
    twice float32's speed for REP3D there, same Dice; benchmarks/RESULTS.md), else off. ``bf16`` is
    allowed on the CPU; ``fp16`` needs CUDA.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {AMP_CHOICES}, got {amp!r}")
    device = torch.device(device)
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if inference and device.type == "cpu" and cpu_has_native_bf16() else None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA GPU; on the CPU pass --amp bf16 or --amp off")
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``device`` in ``dtype``; a no-op context when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


unwrap_model = networks.unwrap_model  # the one unwrapper (DDP, DataParallel, torch.compile), re-exported


# --------------------------------------------------------------------------------------------------
# inference


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


# --------------------------------------------------------------------------------------------------
# metrics


def _as_label_map(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, 1, ...) class indices from probabilities/logits (N, C, ...) or a class map (N, 1, ...) / (N, ...)."""
    x = torch.as_tensor(x)
    if x.ndim >= 2 and x.shape[1] == num_classes and num_classes > 1 and x.is_floating_point() and x.ndim >= 4:
        return x.argmax(dim=1, keepdim=True)
    if x.ndim >= 2 and x.shape[1] == 1:
        return x.long() if x.is_floating_point() else x
    return x.unsqueeze(1).long() if x.is_floating_point() else x.unsqueeze(1)


def dice_scores(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-case, per-foreground-class Dice by ``monai.metrics.DiceMetric(include_background=False,
    reduction="none")``.

    Args:
        pred: probabilities or logits (N, C, ...), or a class map (N, 1, ...).
        label: ground-truth class map (N, 1, ...) (or (N, ...)).
        num_classes: classes including background.

    Returns:
        (N, num_classes - 1) float tensor on the CPU; NaN where the ground truth lacks the class
        (MONAI's ``ignore_empty``), so such cases do not count for that class.
    """
    y_pred = _as_label_map(pred, num_classes)
    y = _as_label_map(label, num_classes).to(y_pred.device)
    if y.shape[2:] != y_pred.shape[2:]:
        raise ValueError(f"prediction {tuple(y_pred.shape[2:])} and label {tuple(y.shape[2:])} differ in size; compare them on the same grid")
    metric = DiceMetric(include_background=False, reduction="none", num_classes=num_classes, ignore_empty=True)
    # Label maps (not one-hot): DiceMetric compares class by class, no (C x volume) one-hot copies.
    return metric(y_pred=y_pred, y=y).detach().float().cpu()


class DiceAccumulator:
    """Running per-class Dice over validation cases, reducible across DDP ranks.

    Keeps, per foreground class, the sum of Dice over the cases where the class is present in the
    ground truth, and the number of those cases; the per-class Dice is their ratio (the mean over
    cases), the mean foreground Dice the mean over classes that were present at least once.

    Args:
        num_classes: classes including background.
        class_names: optional names (background first) for :meth:`as_dict` and :func:`dice_table`.

    Example::

        acc = DiceAccumulator(5)
        for image, label in cases:
            acc.add(sliding_window_predict(model, image, roi), label)
        acc.all_reduce()        # under DDP, every rank then holds the totals
        print(acc.mean(), acc.per_class())
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes counts background too and must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        names = list(class_names) if class_names is not None else ["background"] + [f"class_{i}" for i in range(1, num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} names for {num_classes} classes; give one per class, background first")
        self.class_names = names
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(self.num_classes - 1, dtype=torch.float64)
        self.counts = torch.zeros(self.num_classes - 1, dtype=torch.float64)
        self.cases = 0

    def add(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Score a batch (see :func:`dice_scores`) and add it; returns its (N, C-1) scores."""
        scores = dice_scores(pred, label, self.num_classes).double()
        self.add_scores(scores)
        return scores.float()

    def add_scores(self, scores: torch.Tensor) -> None:
        """Add precomputed (N, C-1) per-case scores (NaN = class absent)."""
        scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1, self.num_classes - 1)
        valid = ~torch.isnan(scores)
        self.sums += torch.where(valid, scores, torch.zeros_like(scores)).sum(0)
        self.counts += valid.sum(0).double()
        self.cases += scores.shape[0]

    def all_reduce(self) -> None:
        """Sum the totals over the ranks of the default process group (no-op without one)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        backend = torch.distributed.get_backend()
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        buf = torch.cat([self.sums, self.counts, torch.tensor([float(self.cases)], dtype=torch.float64)]).to(dev)
        torch.distributed.all_reduce(buf)
        buf = buf.cpu()
        k = self.num_classes - 1
        self.sums, self.counts, self.cases = buf[:k].clone(), buf[k : 2 * k].clone(), int(buf[-1].item())

    def per_class(self) -> list[float]:
        """Mean Dice of each foreground class (NaN for a class never present in the ground truth)."""
        return [float(s / c) if c > 0 else float("nan") for s, c in zip(self.sums.tolist(), self.counts.tolist())]

    def mean(self) -> float:
        """Mean foreground Dice over the classes that were present (NaN if none was)."""
        vals = [v for v in self.per_class() if not math.isnan(v)]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    def as_dict(self) -> dict[str, float]:
        """``{class name: Dice}`` for the foreground classes."""
        return dict(zip(self.class_names[1:], self.per_class()))


def dice_table(per_class: Sequence[float] | dict[str, float], class_names: Sequence[str] | None = None, title: str | None = None) -> str:
    """A small text table of per-class Dice and their mean (foreground classes only).

    Args:
        per_class: Dice per foreground class (list, or ``{name: dice}``).
        class_names: names of all classes, background first (ignored for a dict).
        title: optional first line.
    """
    if isinstance(per_class, dict):
        names, values = list(per_class), list(per_class.values())
    else:
        values = list(per_class)
        names = list(class_names)[1:] if class_names is not None else [f"class_{i}" for i in range(1, len(values) + 1)]
        if len(names) != len(values):
            raise ValueError(f"{len(values)} Dice values for {len(names)} foreground class names")
    width = max([len(n) for n in names] + [len("mean (foreground)")])
    lines = [title] if title else []
    for n, v in zip(names, values):
        lines.append(f"  {n:<{width}}  {'n/a' if math.isnan(v) else f'{v:.4f}'}")
    present = [v for v in values if not math.isnan(v)]
    mean = sum(present) / len(present) if present else float("nan")
    lines.append(f"  {'mean (foreground)':<{width}}  {'n/a' if math.isnan(mean) else f'{mean:.4f}'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# files, seeds, errors


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, keys as strings and anything else JSON cannot hold as ``str``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, so a reader never sees half a file."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_csv(rows: Sequence[Sequence[Any]], path: str | os.PathLike) -> None:
    """Write ``rows`` (the header first) as CSV, atomically (see :func:`write_text_atomic`)."""
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    write_text_atomic(buf.getvalue(), path)


def save_figure_atomic(fig: Any, path: str | os.PathLike, dpi: int = 100) -> None:
    """``fig.savefig`` as PNG to a temporary file in the same folder, then renamed over ``path``."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``jsonable(obj)`` to ``path`` atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(json.dumps(jsonable(obj), indent=1) + "\n", path)


def save_checkpoint_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then ``os.replace``d
    over ``path``: a crash mid-write leaves the previous checkpoint intact."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU). Does not force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is a CUDA (or other accelerator) out-of-memory error."""
    if isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()

"""Command-line pieces shared by every script: the one flag helper and help formatter, and the data,
network and runtime flag groups."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Mapping

import networks
from networks.Rep3D import MODULATIONS
from rep3d.data.dataset_config import PRESETS
from rep3d.data.intensity import UNIFORM_SCHEMES
from rep3d.runtime import AMP_CHOICES


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The help formatter of every script: descriptions keep their line breaks, and a flag's default is
    shown only where it says something: not for None / False (which mean "from the preset / checkpoint"
    or "off", as each help text says), nor when the help already names the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower() or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: str, **kwargs: Any) -> None:
    """``parser.add_argument(*flags, **kwargs)`` unless the script already defined one of ``flags`` its
    own way (test_seg.py's bare ``--amp``, a script's own ``--num_workers``): the shared flag groups
    never override a script's flag."""
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
    add_flag(
        group,
        "--gpu",
        type=int,
        default=0,
        help="CUDA device index for a single-process run (-1 = CPU; falls back to CPU when no GPU is visible). "
        "Not for multi-GPU: select GPUs with CUDA_VISIBLE_DEVICES and launch with torchrun --nproc_per_node N (DDP)",
    )
    add_flag(group, "--amp", choices=AMP_CHOICES, default="auto", help="mixed precision: auto (bf16 on GPUs that support it, else fp16; off on CPU), bf16, fp16 (CUDA only), off")
    add_flag(group, "--sw_batch_size", type=int, default=4, help="windows per forward pass in sliding-window inference; lower it if GPU memory runs out")
    add_flag(group, "--overlap", "--val_overlap", dest="overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")


def add_dataset_args(parser: argparse.ArgumentParser, training: bool = True) -> None:
    """Add the data flags shared by ``main_train.py`` and ``test_seg.py``, as a "data" group.

    Flags: ``--root --dataset --dataset_config --spacing --intensity --a_min --a_max
    --num_classes --class_names --roi --datalist --fold --num_workers``; with ``training`` also
    ``--cache_rate --loader --cache_on_gpu --crop_ratios --preprocessed``. Preset-dependent flags default to ``None``
    (= take the preset's value). A flag the script already defined is left alone.

    Args:
        parser: the script's parser.
        training: add the flags that only training uses.
    """
    parser = parser.add_argument_group("data")  # type: ignore[assignment]  # shares the parser's option table
    add_flag(parser, "--root", type=str, default=None, help="dataset folder (imagesTr/labelsTr/imagesVal/labelsVal[/imagesTs], or with an MSD dataset.json). Without it the synthetic demo dataset is generated and used.")
    add_flag(parser, "--dataset", type=str, default=None, help=f"preset: {', '.join(PRESETS)}, or 'custom' (give --spacing/--num_classes/... or --dataset_config). Default: 'demo' without --root.")
    add_flag(parser, "--dataset_config", type=str, default=None, help="JSON file with spacing, intensity, a_min, a_max, num_classes, class_names, roi; overrides the preset")
    add_flag(parser, "--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"), help="target voxel spacing in mm (overrides the preset)")
    add_flag(parser, "--intensity", type=str, choices=UNIFORM_SCHEMES, default=None, help="'window' (CT: clip [a_min, a_max] -> [0, 1]) or 'zscore' (MRI: per-volume normalisation)")
    add_flag(parser, "--a_min", type=float, default=None, help="lower intensity window bound (HU for CT)")
    add_flag(parser, "--a_max", type=float, default=None, help="upper intensity window bound")
    add_flag(parser, "--num_classes", type=int, default=None, help="number of classes including background; not for picking network outputs of a preset (it sets them)")
    add_flag(parser, "--class_names", type=str, default=None, help="comma-separated class names, background first, e.g. 'background,liver,tumour'")
    add_flag(parser, "--roi", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), help="training crop / sliding-window ROI in voxels (default: the preset's, 96 96 96 for the paper's datasets)")
    add_flag(parser, "--datalist", type=str, default=None, help="MONAI datalist JSON ('training' with optional 'fold' keys, 'validation', 'testing'); relative paths are taken from --root")
    add_flag(parser, "--fold", type=int, default=0, help="validation fold when the datalist has 'fold' keys or no validation set is given (5 folds by name)")
    add_flag(parser, "--num_workers", type=int, default=None, help="data-loading worker processes (0 loads in the main process; default: one per CPU core but one, at most 8)")
    if not training:
        return
    add_flag(parser, "--cache_rate", type=float, default=None, help="fraction of the cases held in memory (RAM, or the GPU with --loader gpu) instead of read through the pre-processed store's memory maps; no case is pre-processed again whatever its value. Default: all on the GPU path when they fit, none on the CPU workers (the page cache keeps the store). With --preprocessed off: the fraction pre-processed once into memory, the others at every draw (default: all when they fit in RAM, else the preset's 0.1)")
    add_flag(parser, "--loader", choices=("auto", "gpu", "workers"), default="auto", help="how training batches are made: gpu (cached volumes on the GPU, random transforms there), workers (CPU worker processes), auto (the GPU cache when CUDA is used and the cached volumes fit, else workers; the start line says which and why)")
    add_flag(parser, "--cache_on_gpu", action="store_true", help="the same as --loader gpu")
    add_flag(parser, "--crop_ratios", type=float, nargs="+", default=None, metavar="R", help="class-balanced crops for small structures: one ratio per class, background first (e.g. 1 1 4 for a rare class 2); default: the paper's 1:1 foreground/background crops")
    add_flag(
        parser, "--preprocessed", type=str, default=None, metavar="DIR|off",
        help="where the pre-processed store lives: every case resampled, normalised and cropped once, kept as memory-mapped "
        "arrays that training crops from, rebuilt per case when a source file changes (preprocess.py builds it ahead). "
        "A sub-folder per dataset and settings hash is made in DIR. Default: $REP3D_PREPROCESSED, else "
        "$XDG_CACHE_HOME/rep3d/preprocessed (~/.cache/rep3d/preprocessed): outside the dataset, so a read-only dataset "
        "folder works. 'off': no store, the cases are pre-processed into memory at every start (--cache_rate of them)",
    )  # fmt: skip

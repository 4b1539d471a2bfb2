"""Sliding-window inference with trained Rep3D (or baseline) checkpoints, in each volume's native space.

    python test_seg.py --root /path/to/amos_ct --output ./predictions/rep3d_amos_ct \
        --trained_weights ./runs/rep3d_amos_ct/best_metric_model.pth --sw_batch_size 4 --overlap 0.5 --gpu 0

The network is built in deploy mode through the registry (:func:`networks.build_deploy_network`): a
training checkpoint is folded on load, folded, reference-layout and DDP (``module.``) checkpoints load
as they are. Network, its options, the class count and the dataset pre-processing come from the
checkpoint (read by :meth:`configs.RunConfig.from_checkpoint`, formats 1 and 2) unless flags say
otherwise; flags that contradict it are refused with a message.

Several checkpoints (``--trained_weights A B C``, or a run folder whose sub-folders hold one
``best_metric_model.pth`` each, e.g. the five cross-validation folds) are ensembled: their softmax
probabilities are averaged before the argmax. ``--postprocess largest_component`` keeps the largest
connected component of each class; ``--postprocess auto`` decides per class on labelled cases whether
that raises Dice (as nnU-Net does) and stores the decision in ``postprocessing.json`` beside the
checkpoint for later runs.

Inputs (first match wins): ``--input`` (one NIfTI file or a folder of them), ``--datalist`` (its
``testing`` list), ``--root`` (``imagesTs``, else ``imagesVal``; ``--split`` picks another), and with
none of these the demo dataset's validation cases. Every input gets ``<output>/<case>_seg.nii.gz``
with exactly its shape, affine and header geometry; ``--save_probabilities`` adds
``<case>_prob.nii.gz``. Where labels exist (the split's ``labels*`` folder, the datalist, or
``--labels``), Dice and HD95 per case and class go to ``metrics.csv``, the per-class means to
``summary.csv`` / ``summary.json`` and the screen.

From Python, :class:`Predictor` loads a checkpoint (or several, or an export of ``export_model.py``)
once and predicts files or arrays::

    from test_seg import Predictor
    predictor = Predictor("runs/demo/best_metric_model.pth", device="cpu", threads=2)
    labels = predictor.predict("case.nii.gz")                 # (X, Y, Z) uint8, the file's grid
    labels = predictor.predict(volume, affine=affine)         # a numpy array and its 4x4 affine
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence

import networks
from rep3d.cli import (
    HelpFormatter,
    add_dataset_args,
    add_network_args,
    add_runtime_args,
)
from rep3d.data.dataset_config import DataError
from rep3d.fileio import FolderLockedError, WriteError
from rep3d.inference.checkpoint import InferenceError
from rep3d.inference.postprocess import POSTPROCESS_CHOICES, POSTPROCESS_FILE
from rep3d.inference.predictor import oom_message
from rep3d.inference.run import run_inference
from rep3d.runtime import AMP_CHOICES, is_oom

# Flags main_train.py shares with the data flags that inference has no use for: accepted (old command
# lines keep working) with a warning, and kept out of --help.
_TRAINING_ONLY = ("--cache_rate", "--cache_on_gpu", "--loader", "--crop_ratios")




class _Ignored(argparse.Action):
    """A training-only flag: accepted, ignored with a warning, not listed in --help."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 - argparse's signature
        warnings.warn(f"{option_string} is a training option (main_train.py); test_seg.py ignores it", stacklevel=2)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (also used by the tests)."""
    p = argparse.ArgumentParser(
        description="Rep3D inference: deploy-mode sliding window (one checkpoint or an ensemble), predictions in "
        "native space, optional post-processing, Dice/HD95 tables.",
        formatter_class=HelpFormatter,
    )
    for flag in _TRAINING_ONLY:
        p.add_argument(flag, nargs="?", action=_Ignored, help=argparse.SUPPRESS, dest=f"_ignored_{flag[2:]}")
    io = p.add_argument_group("inputs and outputs")
    io.add_argument(
        "--trained_weights", required=True, nargs="+", metavar="CKPT",
        help="checkpoint .pth (best_metric_model.pth of main_train.py, a folded or reference checkpoint, or a bare state dict); "
        "several, or a run folder whose sub-folders (e.g. fold_0 ... fold_4) each hold a best_metric_model.pth: an ensemble "
        "(softmax probabilities averaged)",
    )  # fmt: skip
    io.add_argument(
        "--output", default="./predictions",
        help="folder for <case>_seg.<ext> (the input's format), metrics.csv, summary.csv/json. It must not be an input or "
        "label folder nor inside one (refused: predictions there could replace a file such as liver_seg.nii.gz and be "
        "read as inputs next time); one test_seg.py at a time writes it (a lock)",
    )  # fmt: skip
    io.add_argument(
        "--continue", dest="continue_prediction", action="store_true",
        help="skip cases whose prediction is already in --output (written by an interrupted run: predictions are written "
        "under a temporary name and renamed, so a file there is complete); they are scored from their files. Use it only "
        "with the same model and flags as the interrupted run",
    )  # fmt: skip
    io.add_argument("--input", default=None, help="a NIfTI file or a folder of them to predict (instead of --root's split)")
    io.add_argument("--labels", default=None, help="folder of ground-truth labels (matched by case name) to score the predictions against")
    io.add_argument("--split", choices=("test", "val", "train"), default="test", help="split of --root / --datalist to predict: test = imagesTs (else imagesVal) or the datalist's 'testing' list")
    io.add_argument("--save_probabilities", action="store_true", help="also write <case>_prob.nii.gz: per-class probabilities in native space, 4-D (X, Y, Z, classes), uint16 scaled to [0, 1]")
    io.add_argument(
        "--resample_probabilities",
        action="store_true",
        help="make the native-space labels from the class probabilities resampled (linearly) to the input grid, then argmax; "
        "smoother boundaries where the input grid is finer than --spacing. Without it: argmax first, labels resampled by "
        "nearest neighbour (the paper's Invertd protocol)",
    )
    io.add_argument("--no_hd95", action="store_true", help="score Dice only: HD95 is the slow part of scoring (seconds per class on large volumes with ragged predictions)")

    post = p.add_argument_group("post-processing")
    post.add_argument(
        "--postprocess", choices=POSTPROCESS_CHOICES, default="none",
        help="none; largest_component: keep the largest connected component of every foreground class (MONAI "
        "KeepLargestConnectedComponent); auto: per class, keep only the largest component where that raised the mean Dice "
        f"on labelled cases (as nnU-Net does). auto decides on the first run with labelled cases (e.g. --split val) and "
        f"stores the decision in {POSTPROCESS_FILE} beside the checkpoint (and in --output); later runs reuse it. Default: none",
    )  # fmt: skip

    sw = p.add_argument_group("sliding window")
    sw.add_argument("--mode", choices=("gaussian", "constant"), default="gaussian", help="blending of overlapping windows")
    sw.add_argument("--tta", action="store_true", help="test-time augmentation: average over mirroring of the 3 spatial axes (8 passes)")
    sw.add_argument("--stitch_on_cpu", action="store_true", help="keep the stitched probability volume in RAM while the windows run on the GPU (for large volumes that do not fit in GPU memory)")
    sw.add_argument("--sw_device", choices=("auto", "cpu"), default="auto", help="where the sliding-window output is stitched: 'cpu' is the same as --stitch_on_cpu (windows still run on --gpu)")

    rt = p.add_argument_group("runtime")
    # A bare --amp means "auto" (AMP on CUDA); add_runtime_args keeps this definition.
    rt.add_argument("--amp", nargs="?", const="auto", default="auto", choices=AMP_CHOICES, help="mixed precision: auto (bf16/fp16 on CUDA; on the CPU bf16 where it runs natively (AVX512-BF16, AMX), about twice float32's speed, else off), bf16, fp16, off")
    rt.add_argument("--threads", type=int, default=None, help="CPU threads of PyTorch (torch.set_num_threads: the network on the CPU) and of ONNX Runtime for an export's model.json. Default: PyTorch's (one per core)")
    rt.add_argument("--compile", action="store_true", help="run the windows through torch.compile (one static shape), with PyTorch's kernels: on an H200 REP3D predicts a 256x256x160 volume in 0.64 s after a one-off compilation of about 21 s, against 0.54 s for the default eager windows with the Triton norm kernels")
    add_runtime_args(p)
    _merge_groups(p, "runtime")
    # None: 4 windows per pass on a GPU, 1 on the CPU (REP3D, bf16, 2 cores: 2.1 s a window at 1, 2.5 s at 4)
    p.set_defaults(sw_batch_size=None)
    for action in p._actions:
        if action.dest == "sw_batch_size":
            action.help = "windows per forward pass in sliding-window inference (default: 4 on a GPU, 1 on the CPU, where single windows run faster); lower it if memory runs out"
    add_network_args(p)
    add_dataset_args(p, training=False)
    # None = take it from the checkpoint (add_network_args defaults to REP3D for training).
    p.set_defaults(network=None)
    for action in p._actions:  # these only matter for checkpoints that carry no settings
        if action.dest in ("network", "modulation", "kernel_size", "feature_size", "depths", "hidden_size") and action.help:
            action.help += " (read from the checkpoint; give it only for a bare state dict)"
    return p


def _merge_groups(p: argparse.ArgumentParser, title: str) -> None:
    # engine.add_runtime_args makes its own "runtime" group: one heading in --help, not two.
    same = [g for g in p._action_groups if g.title == title]
    for g in same[1:]:
        same[0]._group_actions.extend(g._group_actions)
        p._action_groups.remove(g)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv[1:]`` when None)."""
    args = build_parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        build_parser().error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for problems the user can fix)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_inference(args)
    except (InferenceError, DataError, networks.CheckpointError, FolderLockedError) as err:
        print(f"test_seg.py: error: {err}", file=sys.stderr)
        return 2
    except WriteError as err:  # the predictions and metrics written before are intact
        print(f"test_seg.py: error: {err}; predictions written before are intact (add --continue to skip them next time)", file=sys.stderr)
        return 1
    except ValueError as err:  # flag values refused by the data pipeline or engine (messages name the flag)
        print(f"test_seg.py: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - out-of-memory outside the guarded window loop
        if is_oom(err):
            print(f"test_seg.py: error: {oom_message('the volume', args.sw_batch_size or 4, True)}", file=sys.stderr)
            return 2
        raise
    print(f"{len(result['predictions'])} segmentation(s) written to {args.output}")
    if result["table"]:
        print(f"\nDice / HD95 over {result['summary']['cases']} labelled case(s) (per case: {result['metrics']}):")
        print(result["table"])
    return 0

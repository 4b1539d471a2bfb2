"""Inference over a folder or a dataset split: inputs, prediction, writing, scoring."""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from typing import Any, Iterator

import numpy as np
import torch

from rep3d.data.cases import (
    case_name,
    image_paths,
    list_cases,
    list_images,
    nifti_files,
)
from rep3d.data.checks import check_input_channels
from rep3d.data.dataset_config import DataError, DatasetConfig
from rep3d.data.demo import DEMO_ROOT_DEFAULT, make_demo_dataset
from rep3d.data.image_io import output_path_like, read_array
from rep3d.fileio import (
    FolderLock,
    check_writable,
    remove_stale_temporaries,
    write_json,
)
from rep3d.inference.checkpoint import InferenceError, expand_weights
from rep3d.inference.postprocess import (
    POSTPROCESS_FILE,
    decide_postprocessing,
    decision_path,
    keep_largest_component,
    load_decision,
)
from rep3d.inference.predictor import Predictor, describe_precision
from rep3d.inference.writer import (
    PROB_DTYPE,
    check_written,
    native_image_shape,
    save_like,
    voxel_sizes,
    write_prediction,
)
from rep3d.metrics import (
    case_metrics,
    class_dice,
    metrics_table,
    summarize_metrics,
    write_metrics,
)
from rep3d.runtime import default_num_workers, select_device, slow_conv3d_warning

logger = logging.getLogger(__name__)


def _attach_labels(cases: list[dict], folder: str) -> list[dict]:
    if not os.path.isdir(folder):
        raise DataError([f"{folder}: labels folder not found. Fix: pass an existing folder to --labels"])
    by_name: dict[str, str] = {}
    for p in nifti_files(folder):
        by_name.setdefault(case_name(p, "label"), p)
        by_name[case_name(p, "image")] = p
    out, missing = [], []
    for c in cases:
        lab = by_name.get(case_name(c["image"], "image"))
        if lab is None:
            missing.append(c["image"])
        out.append({**c, "label": lab} if lab else dict(c))
    if missing:
        logger.warning("--labels %s: no label for %d of %d inputs (e.g. %s); those are predicted but not scored", folder, len(missing), len(cases), missing[0])
    return out


def resolve_inputs(args: argparse.Namespace, cfg: DatasetConfig | None = None) -> list[dict]:
    """The volumes to predict, ``[{"image": path or [path per channel], "label": optional path}]``.

    With ``cfg`` (the model's dataset settings) every input is checked for the channels the model was
    trained with.

    Raises:
        DataError: missing files or folders, two inputs with the same case name, or inputs without
            the model's channels (each file and missing channel named).
    """
    if args.input is not None:
        cases = list_images(args.input, channels=cfg.in_channels if cfg is not None else None)
    elif args.datalist is not None or args.root is not None:
        cases = list_cases(args.root, args.split, args.datalist, fold=args.fold)
    else:
        if cfg is not None and cfg.name != "demo":
            raise InferenceError(
                f"no input flag: the checkpoint was trained on dataset {cfg.name!r}, not the demo. Pass --root DATASET_FOLDER "
                "(with --split val for its validation cases, as main_train.py's closing 'predict with' line shows), "
                "--datalist FILE, or --input FILE_OR_FOLDER"
            )
        root = DEMO_ROOT_DEFAULT
        if not os.path.isfile(os.path.join(root, "demo_manifest.json")):
            logger.info("no demo dataset in %s: generating it", root)
            make_demo_dataset(root)
        print(f"no --root or --input: predicting the demo dataset's validation cases ({root})")
        cases = list_cases(root, "val")
    if not cases:
        raise DataError([f"{args.input or args.datalist or args.root}: nothing to predict. Fix: check --input / --root / --split"])
    if args.labels is not None:
        cases = _attach_labels(cases, args.labels)
    seen: dict[str, str] = {}
    dups = []
    for c in cases:
        n = case_name(c["image"], "image")
        if n in seen:
            dups.append(f"{c['image']}: same case name {n!r} as {seen[n]}, both would be written to {n}_seg.nii.gz. Fix: keep one of them")
        seen[n] = c["image"]
    if dups:
        raise DataError(dups)
    if cfg is not None:
        problems = check_input_channels(cases, cfg)
        if problems:
            raise DataError(problems, header=f"{len(problems)} input(s) lack the {cfg.in_channels} channel(s) the model was trained with ({', '.join(cfg.channel_names)}); nothing was predicted:")
    return cases


def _input_folders(args: argparse.Namespace, cases: list[dict]) -> list[str]:
    """Every folder this run reads inputs or labels from."""
    folders = set()
    for c in cases:
        for key in ("image", "label"):
            for p in [c[key]] if isinstance(c.get(key), str) else list(c.get(key) or []):
                folders.add(os.path.realpath(p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))))
    for folder in (args.input, args.labels):
        if folder and os.path.isdir(folder):
            folders.add(os.path.realpath(folder))
    return sorted(folders)


def check_output_folder(args: argparse.Namespace, cases: list[dict]) -> None:
    """Refuse an ``--output`` that is an input folder or inside one: predictions (``<case>_seg...``)
    written among the inputs could replace a user's file (a label ``liver_seg.nii.gz`` beside
    ``liver.nii.gz``) and be read back as inputs by the next run.

    Raises:
        InferenceError: naming the folder and the fix.
    """
    out = os.path.realpath(args.output)
    for folder in _input_folders(args, cases):
        if out == folder or os.path.commonpath([out, folder]) == folder:
            where = "is" if out == folder else "is inside"
            raise InferenceError(
                f"--output {args.output} {where} the input folder {folder}: predictions written there could overwrite "
                f"the inputs (a file named <case>_seg beside <case>) and be read as inputs next time. Pass an --output "
                f"outside every input and label folder, e.g. {os.path.join(os.path.dirname(folder), os.path.basename(folder) + '_predictions')}"
            )


def _batches(loader: Any) -> Iterator[dict]:
    """The loader's batches; a reader error inside the loader becomes a DataError with its message."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001 - a reader error inside the loader
            text = str(err).strip().splitlines()
            raise DataError([f"a volume could not be loaded ({type(err).__name__}: {text[0] if text else ''}). Fix: re-export the file"]) from None
        yield batch


def _score(rows: list[dict], name: str, seg: np.ndarray, label: np.ndarray, label_path: str, cfg: DatasetConfig, hd95: bool) -> list[float]:
    m = case_metrics(seg, label.reshape(seg.shape), cfg.num_classes, voxel_sizes(label_path), hd95=hd95)
    for c in range(1, cfg.num_classes):
        rows.append(
            {"case": name, "class": c, "name": cfg.class_names[c], "dice": m["dice"][c - 1], "hd95": m["hd95"][c - 1],
             "gt_voxels": m["gt_voxels"][c - 1], "pred_voxels": m["pred_voxels"][c - 1]}
        )  # fmt: skip
    return [d for d in m["dice"] if not math.isnan(d)]


def run_inference(args: argparse.Namespace) -> dict:
    """Predict every input of ``args`` and score the ones with labels.

    Returns:
        ``{"output", "predictions": [paths], "probabilities": [paths], "rows": metrics rows,
        "summary": summary or None, "table": str or None, "seconds": [per case],
        "timings": [{"case", "predict", "invert_and_save", "metrics"} seconds per case],
        "postprocessing": decision dict or None}``.

    Raises:
        InferenceError, DataError, networks.CheckpointError: problems the user can fix.
    """
    flags = vars(args)
    device = select_device(args.gpu)
    # auto post-processing without a stored decision decides on this run's labelled cases
    deciding = False
    postprocess: str | list[int] = args.postprocess
    if args.postprocess == "auto":
        checkpoints = expand_weights(args.trained_weights)
        is_export = len(checkpoints) == 1 and checkpoints[0].endswith(".json")  # an export carries its decision
        stored = None if is_export else load_decision(checkpoints, 10**6)
        if stored is None and not is_export:
            deciding, postprocess = True, "none"
        elif stored is not None:
            print(f"--postprocess auto: largest component kept for classes {stored['largest_component'] or 'none'} ({stored['path']}; delete it to decide again)")
    predictor = Predictor(
        args.trained_weights, device=device, sw_batch_size=args.sw_batch_size, overlap=args.overlap, mode=args.mode, tta=args.tta,
        amp=args.amp, postprocess=postprocess, threads=args.threads, dwconv=args.dwconv, resample_probabilities=args.resample_probabilities,
        compile=args.compile, stitch_on_cpu=bool(args.stitch_on_cpu or args.sw_device == "cpu"), flags=flags,
    )  # fmt: skip
    cfg = predictor.cfg
    cases = resolve_inputs(args, cfg)
    check_output_folder(args, cases)
    check_writable(args.output)  # before any image is read
    lock = FolderLock(args.output, "test_seg.py").acquire()  # one writer of the output folder
    try:
        return _predict_cases(args, predictor, cases, flags, device, deciding)
    finally:
        lock.release()


def _predict_cases(args: argparse.Namespace, predictor: Predictor, cases: list[dict], flags: dict, device: torch.device, deciding: bool) -> dict:
    from monai.data import decollate_batch
    from tqdm import tqdm

    cfg = predictor.cfg
    remove_stale_temporaries(args.output)
    done: list[tuple[dict, str]] = []
    if getattr(args, "continue_prediction", False):
        if deciding:
            print("--continue: ignored while --postprocess auto decides (every case is predicted for the decision)")
        else:
            todo = []
            for c in cases:
                out_path = output_path_like(image_paths(c["image"])[0], args.output, "_seg", name=case_name(c["image"], "image"))
                (done.append((c, out_path)) if os.path.isfile(out_path) else todo.append(c))
            if done:
                print(f"--continue: skipped {len(done)} case(s) whose prediction is already in {args.output} ({len(todo)} to predict)")
            cases = todo
    scored = any("label" in c for c in cases) or any("label" in c for c, _ in done)
    if deciding and not scored:
        raise InferenceError(
            f"--postprocess auto: no decision stored in {decision_path(predictor.checkpoints)} yet, and none of these inputs has a label "
            "to decide on: run once on labelled validation cases (e.g. --split val, or --labels FOLDER)"
        )
    os.makedirs(args.output, exist_ok=True)
    write_json(
        {
            "args": {k: v for k, v in flags.items() if not k.startswith("_ignored_")},
            "checkpoints": predictor.checkpoints,
            "networks": predictor.names,
            "out_channels": predictor.out_channels,
            "dataset": cfg.to_dict(),
            "device": str(device),
            "amp": str(predictor.amp_dtype),
            "threads": torch.get_num_threads(),
            "postprocess": {"mode": args.postprocess, "largest_component": predictor.post_classes},
        },
        os.path.join(args.output, "inference_args.json"),
    )

    print(f"{len(cases)} case(s) on {describe_precision(device, predictor.amp_dtype, predictor.export is not None)}")
    slow = slow_conv3d_warning(device)
    if slow:
        print(f"WARNING: {slow}")
    workers = default_num_workers() if args.num_workers is None else args.num_workers
    loader, test_tf = predictor.loader(cases, num_workers=workers, keep_label=scored) if cases else ([], None)
    result: dict[str, Any] = {"output": args.output, "predictions": [], "probabilities": [], "rows": [], "summary": None, "table": None,
                              "seconds": [], "timings": [], "postprocessing": None}  # fmt: skip
    fg = list(range(1, predictor.out_channels))
    before: dict[int, list[float]] = {c: [] for c in fg}
    after: dict[int, list[float]] = {c: [] for c in fg}
    labelled: list[tuple[str, str, str]] = []  # (case, prediction, label) scored after the decision
    bar = tqdm(total=len(cases), desc="predict", unit="vol", dynamic_ncols=True)
    try:
        for batch in _batches(loader):
            t0 = time.perf_counter()
            item = decollate_batch(batch)[0]
            # Every path of this case comes from its own metadata, not from its position in `cases`.
            image_path = str(item["image"].meta["filename_or_obj"])
            label_path = str(item["label"].meta["filename_or_obj"]) if "label" in item else None
            name = case_name(image_path, "image")
            native_shape = native_image_shape(image_path)
            prob_path = os.path.join(args.output, f"{name}_prob.nii.gz") if args.save_probabilities else None
            seg, native = predictor.predict_item(item, test_tf, keep_probabilities=prob_path is not None)
            t_pred = time.perf_counter()
            if prob_path:
                save_like(np.moveaxis(native, 0, -1), image_path, prob_path, PROB_DTYPE, scaled=True)
                result["probabilities"].append(prob_path)
            del native
            if seg.shape != native_shape[:3]:
                raise RuntimeError(f"{image_path}: inverted prediction has shape {seg.shape}, the image {native_shape}")
            # In the input's own format (a DICOM series gets NIfTI) and exact geometry.
            out_path = output_path_like(image_path, args.output, "_seg", name=name)
            write_prediction(seg, image_path, out_path)
            check_written(out_path, image_path)
            result["predictions"].append(out_path)
            t_post = time.perf_counter()
            if label_path is not None:
                label = np.asarray(torch.as_tensor(item["label"]).cpu().numpy()).reshape(seg.shape)
                if deciding:
                    before_c = class_dice(seg, label, fg, cfg.num_classes)
                    after_c = class_dice(keep_largest_component(seg, fg), label, fg, cfg.num_classes)
                    for c, b, a in zip(fg, before_c, after_c):
                        before[c].append(b)
                        after[c].append(a)
                    labelled.append((name, out_path, label_path))
                else:
                    dices = _score(result["rows"], name, seg, label, label_path, cfg, not args.no_hd95)
                    bar.set_postfix(dice=f"{np.mean(dices):.3f}" if dices else "n/a")
            t_end = time.perf_counter()
            result["seconds"].append(t_end - t0)
            result["timings"].append({"case": name, "predict": t_pred - t0, "invert_and_save": t_post - t_pred, "metrics": t_end - t_post})
            bar.update(1)
    finally:
        bar.close()
    for c, out_path in done:  # predictions of an earlier run (--continue): scored from their files
        result["predictions"].append(out_path)
        if "label" in c:
            seg = np.asarray(read_array(out_path))
            seg = seg.reshape(seg.shape[:3])
            _score(result["rows"], case_name(c["image"], "image"), seg, np.asarray(read_array(c["label"])), c["label"], cfg, not args.no_hd95)

    if deciding:
        result["postprocessing"] = _apply_decision(result, predictor, before, after, labelled, args)
    if result["rows"]:
        summary = summarize_metrics(result["rows"], cfg.class_names)
        result["summary"] = summary
        result["table"] = metrics_table(summary)
        result.update(write_metrics(result["rows"], summary, args.output))
    return result


def _apply_decision(result: dict, predictor: Predictor, before: dict, after: dict, labelled: list, args: argparse.Namespace) -> dict:
    """Decide --postprocess auto from the per-class Dice gathered, store the decision, and apply it to
    every prediction written in this run (then score them)."""

    cfg = predictor.cfg
    decision = decide_postprocessing(before, after, cfg.class_names)
    decision.update({"checkpoints": [os.path.abspath(p) for p in predictor.checkpoints], "decided_on": [c for c, _, _ in labelled],
                     "rule": "largest connected component kept for a class where it raised the mean Dice over the labelled cases"})  # fmt: skip
    path = decision_path(predictor.checkpoints)
    try:
        write_json(decision, path)
    except OSError as err:
        logger.warning("could not store the post-processing decision beside the checkpoint (%s): it is in --output only", err)
        path = None
    write_json(decision, os.path.join(args.output, POSTPROCESS_FILE))
    chosen = decision["largest_component"]
    print(f"--postprocess auto: largest component kept for classes {chosen or 'none'} (decided on {len(labelled)} case(s); stored in {path or args.output})")
    labels = {c: l for c, _, l in labelled}
    for out_path in result["predictions"]:
        name = case_name(out_path, "image")[: -len("_seg")]
        seg = np.asarray(read_array(out_path))
        spatial = seg.reshape(seg.shape[:3])
        if chosen:
            done = keep_largest_component(spatial, chosen)
            write_prediction(done.astype(seg.dtype), out_path, out_path)
            spatial = done
        if name in labels:
            label = np.asarray(read_array(labels[name])).reshape(spatial.shape)
            _score(result["rows"], name, spatial, label, labels[name], cfg, not args.no_hd95)
    return decision

"""Which cases a dataset has and how images, channels and labels pair up: the folder layouts, MSD /
nnU-Net ``dataset.json``, MONAI datalists, folds."""

from __future__ import annotations

import json
import logging
import os
import re

from rep3d.data.dataset_config import DataError
from rep3d.data.image_io import IMAGE_EXTENSIONS, image_ext, is_dicom_dir, strip_ext
from rep3d.fileio import read_json

logger = logging.getLogger(__name__)


SPLITS = ("train", "val", "test")


NIFTI_EXTENSIONS = (".nii.gz", ".nii")


IMAGE_CHANNEL_SUFFIX = "_0000"


# nnU-Net channel files: "<case>_0000", "<case>_0001", ... (four digits).
CHANNEL_RE = re.compile(r"^(.+)_(\d{4})$")


LABEL_SUFFIXES = ("_seg", "_labels", "_label", "_gt", "_mask")


N_AUTO_FOLDS = 5


# Tolerance on the 3 x 4 voxel-to-world matrix when comparing an image with its label: NIfTI
# stores it in float32, so identical geometry written by two tools can differ in the last digits.
AFFINE_ATOL_MM = 1e-3


def image_paths(image) -> list[str]:
    """The file(s) of a case's ``"image"``: one path, or one per channel."""
    return [str(p) for p in image] if isinstance(image, (list, tuple)) else [str(image)]


def case_name(path, role: str = "image") -> str:
    """Case name of an image or label file: the file name without extension and without the
    nnU-Net channel suffix ``_0000`` (images) or a ``_seg``/``_label``/... suffix (labels).

    Args:
        path: file path (a DICOM series folder: its name), or a case's list of channel files
            (named after the first).
        role: ``"image"`` or ``"label"``.
    """
    if isinstance(path, (list, tuple)):
        path = path[0]
    base = os.path.basename(os.path.normpath(str(path)))
    stem = strip_ext(base) or base
    suffixes = (IMAGE_CHANNEL_SUFFIX,) if role == "image" else LABEL_SUFFIXES
    for s in suffixes:
        if stem.endswith(s) and len(stem) > len(s):
            return stem[: -len(s)]
    return stem


def image_files(folder: str, series: bool = True) -> list[str]:
    """Sorted image files of a folder (every format of :data:`image_io.IMAGE_EXTENSIONS`), the
    rule every listing here uses; with ``series``, DICOM series sub-folders too.

    Hidden files are skipped: MSD archives ship macOS "._case.nii.gz" resource forks. The data
    files of detached headers (``.raw``, ``.zraw`` beside ``.mhd``/``.nhdr``) are not images.
    """
    out = []
    for f in os.listdir(folder):
        p = os.path.join(folder, f)
        if f.startswith("."):
            continue
        if (strip_ext(f) is not None and os.path.isfile(p)) or (series and is_dicom_dir(p)):
            out.append(p)
    return sorted(out)


def nifti_files(folder: str) -> list[str]:
    """Image files of a folder (all readable formats, despite the older name): :func:`image_files` without DICOM folders."""
    return image_files(folder, series=False)


_nifti_files = nifti_files  # older name, used by test_seg.py


def image_ending(path: str) -> str:
    return image_ext(path) or ".nii.gz"


def _group_channels(images: list[str], problems: list[str], channel_names: list[str] | None = None, skipped: set[str] | None = None) -> list[tuple[str, str | list[str]]]:
    """Group image files into cases: ``[(case name, path or [path per channel])]``.

    nnU-Net names channels ``case_0000``, ``case_0001``, ...; that naming is taken to be in use
    when ``channel_names`` (from dataset.json) lists several channels, or when some case has a
    ``_0000`` file and more. Otherwise every file is a case of its own (a ``_0000`` suffix is
    still dropped from the name), so cases named e.g. ``patient_2019`` keep their name. A case
    lacking one of the channels is reported in ``problems`` and left out.
    """
    parsed = []
    for p in images:
        base = os.path.basename(os.path.normpath(p))
        stem = strip_ext(base) or base
        m = CHANNEL_RE.match(stem)
        parsed.append((p, stem, m.group(1) if m else None, int(m.group(2)) if m else None))
    groups: dict[str, dict[int, str]] = {}
    for p, _, prefix, idx in parsed:
        if prefix is not None:
            groups.setdefault(prefix, {}).setdefault(idx, p)
    declared = len(channel_names) if channel_names else None
    channel_naming = (declared or 0) > 1 or any(0 in g and len(g) > 1 for g in groups.values())
    if not channel_naming:
        return [(case_name(p, "image"), p) for p, *_ in parsed]
    n = declared or max(max(g) + 1 for g in groups.values())
    names = channel_names or [f"channel_{i}" for i in range(n)]
    out: list[tuple[str, str | list[str]]] = [(stem, p) for p, stem, prefix, _ in parsed if prefix is None]
    for prefix, g in groups.items():
        first = g[min(g)]
        extra = sorted(i for i in g if i >= n)
        for i in extra:
            problems.append(f"{g[i]}: channel {i:04d} but the dataset has {n} channel(s) ({', '.join(names)}). Fix: remove the file, or list the channel in dataset.json's channel_names")
        missing = [i for i in range(n) if i not in g]
        for i in missing:
            expected = os.path.join(os.path.dirname(first), f"{prefix}_{i:04d}{image_ending(first)}")
            problems.append(f"{expected}: case {prefix!r} lacks channel {i:04d} ({names[i] if i < len(names) else '?'}); its other channel files are there. Fix: add the file, or move the case's files out")
        if missing or extra:
            if skipped is not None:
                skipped.add(prefix)
            continue
        out.append((prefix, g[0] if n == 1 else [g[i] for i in range(n)]))
    return sorted(out, key=lambda t: t[0])


def _pair_folder(image_dir: str, label_dir: str | None, problems: list[str], labels_required: bool, channel_names: list[str] | None = None) -> list[dict]:
    """Pair the images (grouped by channel) and labels of two folders by case name; collect
    missing channels and unpaired files in ``problems``."""
    images = image_files(image_dir)
    if not images:
        problems.append(f"{image_dir}: no image files found ({', '.join(IMAGE_EXTENSIONS)} or DICOM series folders). Fix: put the images there (hidden files are ignored)")
        return []
    skipped: set[str] = set()
    grouped = _group_channels(images, problems, channel_names, skipped)
    by_label: dict[str, str] = {}
    label_paths: list[str] = []
    if label_dir is not None and os.path.isdir(label_dir):
        label_paths = image_files(label_dir, series=False)
        # Exact stems first so that a case literally named "x_seg" still pairs with "x_seg".
        for p in label_paths:
            by_label.setdefault(case_name(p, "label"), p)
        for p in label_paths:
            by_label[strip_ext(os.path.basename(p)) or p] = p
    cases, used, seen = [], set(), {}
    for name, image in grouped:
        first = image_paths(image)[0]
        stem = strip_ext(os.path.basename(os.path.normpath(first))) or first
        if name in seen:
            problems.append(f"{first}: same case name {name!r} as {seen[name]}. Fix: keep one file per case (e.g. not both .nii and .nii.gz)")
            continue
        seen[name] = first
        lab = by_label.get(name) if isinstance(image, list) else (by_label.get(stem) or by_label.get(name))
        case = {"image": image}
        if lab is not None:
            case["label"] = lab
            used.add(lab)
        elif labels_required:
            problems.append(f"{first}: image without a label (expected {os.path.join(label_dir or '?', name + image_ending(first))}). Fix: add the label file with the same case name, or move the image out")
        cases.append(case)
    if labels_required:
        for lab in label_paths:
            # The label of a case left out for a missing channel is not "without an image".
            if lab not in used and case_name(lab, "label") not in skipped:
                problems.append(f"{lab}: label without an image (expected {os.path.join(image_dir, case_name(lab, 'label') + image_ending(lab))}). Fix: add the image with the same case name, or move the label out")
    return cases


def _fold_of(index: int, item: dict) -> int:
    f = item.get("fold")
    return int(f) if f is not None else index % N_AUTO_FOLDS


def _split_folds(items: list[dict], fold: int, source: str, problems: list[str], info: dict | None = None) -> tuple[list[dict], list[dict]]:
    """Train / validation split: by the items' ``fold`` keys, else 5 folds by sorted case name."""
    if not items:
        return [], []
    has_folds = any("fold" in it for it in items)
    ordered = items if has_folds else sorted(items, key=lambda c: case_name(c["image"]))
    folds = {_fold_of(i, it) for i, it in enumerate(ordered)}
    if fold not in folds:
        problems.append(f"{source}: no case in fold {fold} (folds present: {sorted(folds)}). Fix: pass --fold with one of those")
        return ordered, []
    train = [{k: v for k, v in it.items() if k != "fold"} for i, it in enumerate(ordered) if _fold_of(i, it) != fold]
    val = [{k: v for k, v in it.items() if k != "fold"} for i, it in enumerate(ordered) if _fold_of(i, it) == fold]
    if info is not None:
        info["pooled"] = True
        if has_folds:
            info["validation"] = f"fold {fold} of the 'fold' keys in {source}: {len(val)} of {len(ordered)} cases"
        else:
            info["validation"] = (
                f"fold {fold} of {N_AUTO_FOLDS} by sorted case name (cases {fold + 1}, {fold + 1 + N_AUTO_FOLDS}, ... of the sorted list, "
                f"{len(val)} of {len(ordered)}), as {source} gives no validation set"
            )
    if not has_folds:
        logger.info("%s has no validation list: fold %d of %d folds by case name validates (%d cases)", source, fold, N_AUTO_FOLDS, len(val))
    return train, val


def _channel_files(path: str, n: int | None) -> list[str] | None:
    """``case_0000.ext``, ``case_0001.ext``, ... beside ``path`` (``case.ext`` or ``case_0000.ext``): the
    first ``n``, or all consecutive ones when ``n`` is None; None when there is no ``_0000`` file."""
    stem = strip_ext(path)
    if stem is None:
        return None
    ext = path[len(stem):]
    m = CHANNEL_RE.match(os.path.basename(stem))
    if m and int(m.group(2)) == 0:
        stem = os.path.join(os.path.dirname(stem), m.group(1))
    if not os.path.exists(f"{stem}{IMAGE_CHANNEL_SUFFIX}{ext}"):
        return None
    files, i = [], 0
    while (n is None or i < n) and os.path.exists(f"{stem}_{i:04d}{ext}"):
        files.append(f"{stem}_{i:04d}{ext}")
        i += 1
    if n is not None and len(files) < n:
        files += [f"{stem}_{j:04d}{ext}" for j in range(len(files), n)]  # reported as missing by the checks
    return files


def _resolve(path: str, base: str, channels: int | None = None) -> str | list[str]:
    p = path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))
    if not os.path.exists(p):
        # nnU-Net v1 lists "imagesTr/case.nii.gz" while the files on disk are "case_0000.nii.gz", "case_0001.nii.gz", ...
        files = _channel_files(p, channels)
        if files:
            return files[0] if len(files) == 1 else files
    return p


def _json_items(entries, base: str, source: str, key: str, problems: list[str], labels_required: bool, channels: int | None = None) -> list[dict]:
    items = []
    if not isinstance(entries, list):
        problems.append(f"{source}: '{key}' must be a list of {{'image': ..., 'label': ...}} entries")
        return items
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"image": e}
        if not isinstance(e, dict) or "image" not in e or not e["image"]:
            problems.append(f"{source}: entry {i} of '{key}' has no 'image'. Fix: give each entry an 'image' path")
            continue
        if isinstance(e["image"], list):
            paths = [_resolve(str(p), base) for p in e["image"]]
            image = paths[0] if len(paths) == 1 else paths
        else:
            image = _resolve(str(e["image"]), base, channels)
        item = {"image": image}
        if e.get("label") is not None:
            item["label"] = _resolve(str(e["label"]), base)
        elif labels_required:
            problems.append(f"{image_paths(image)[0]}: entry {i} of '{key}' in {source} has no 'label'. Fix: add the label path")
            continue
        if "fold" in e:
            item["fold"] = e["fold"]
        items.append(item)
    return items


def read_dataset_json(path: str) -> dict | None:
    """A dataset.json's content, or None (missing, unreadable or not a JSON object)."""
    return read_json(path)


def dataset_json_classes(path: str) -> tuple[dict[int, str] | None, str | None]:
    """``({value: name}, None)`` from a dataset.json's ``labels``, ``(None, problem)`` when they
    cannot be used, ``(None, None)`` when there are none."""
    data = read_dataset_json(path)
    labels = data.get("labels") if data else None
    if not isinstance(labels, dict) or not labels:
        return None, None
    try:
        # MSD maps value -> name; nnU-Net v2 maps name -> value.
        pairs = {int(k): str(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        if any(isinstance(v, (list, tuple)) for v in labels.values()):
            return None, f"{path}: region-based labels ({labels}) are not supported. Fix: give each class one label value"
        try:
            pairs = {int(v): str(k) for k, v in labels.items()}
        except (TypeError, ValueError):
            return None, f"{path}: 'labels' {labels} are neither value -> name (MSD) nor name -> value (nnU-Net v2). Fix: write them as one of those"
    if sorted(pairs) != list(range(len(pairs))):
        return None, f"{path}: label values {sorted(pairs)} are not 0..{len(pairs) - 1}. Fix: number the classes 0, 1, 2, ... (0 background) in dataset.json and in the label files"
    return pairs, None


def dataset_json_labels(path: str) -> list[str] | None:
    """Class names from a dataset.json ``labels`` map (MSD or nnU-Net v2), or None."""
    pairs, _ = dataset_json_classes(path)
    return [pairs[i] for i in range(len(pairs))] if pairs else None


def dataset_json_channels(path: str) -> list[str] | None:
    """Channel names from a dataset.json: nnU-Net v2 ``channel_names`` or MSD ``modality``
    (``{"0": "T2", "1": "ADC"}``), in channel order; None when it names none."""
    data = read_dataset_json(path)
    if not data:
        return None
    names = data.get("channel_names", data.get("modality"))
    if not isinstance(names, dict) or not names:
        return None
    try:
        pairs = {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError):
        return None
    return [pairs[i] for i in sorted(pairs)]


def collect_cases(root: str | None, split: str, datalist: str | None, fold: int, info: dict | None = None) -> tuple[list[dict], list[str], str]:
    """Cases of one split, the problems found on the way and a description of the source.

    ``info``, when given, receives ``"validation"`` (how the validation cases are chosen, one
    line) and ``"pooled"`` (True when they are a fold of the training list).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    info = info if info is not None else {}
    info.setdefault("pooled", False)
    problems: list[str] = []
    channel_names = None
    if datalist is not None:
        source = datalist
        if not os.path.isfile(datalist):
            return [], [f"{datalist}: datalist file not found. Fix: pass the path of a MONAI datalist JSON to --datalist"], source
        base = root if root else os.path.dirname(os.path.abspath(datalist))
    else:
        if root is None:
            raise ValueError("list_cases: pass root (the dataset folder) or datalist")
        if not os.path.isdir(root):
            return [], [f"{root}: dataset folder not found. Fix: pass an existing folder to --root"], root
        source = os.path.join(root, "dataset.json")
        base = root
    data = None
    if os.path.isfile(source):
        try:
            with open(source) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            if datalist is not None:
                return [], [f"{source}: not valid JSON ({e}). Fix: repair the file"], source
            problems.append(f"{source}: not valid JSON ({e}). Fix: repair the file or remove it")
            data = None
        if isinstance(data, dict):
            channel_names = dataset_json_channels(source)
        if datalist is None and not (isinstance(data, dict) and "training" in data):
            data = None  # an nnU-Net v2 dataset.json lists no files: use the folders
    n_channels = len(channel_names) if channel_names else None
    if isinstance(data, dict):
        if "training" not in data and split != "test":
            return [], [f"{source}: no 'training' list. Fix: list the cases under 'training' (each {{'image', 'label'}})"], source
        if split == "test":
            key = next((k for k in ("testing", "test") if k in data), None)
            if key is None:
                if "validation" in data:
                    key = "validation"
                else:
                    tr = _json_items(data.get("training", []), base, source, "training", problems, True, n_channels)
                    _, val = _split_folds(tr, fold, source, problems, info)
                    return val, problems, source
            return _json_items(data[key], base, source, key, problems, False, n_channels), problems, source
        training = _json_items(data["training"], base, source, "training", problems, True, n_channels)
        if "validation" in data and not any("fold" in it for it in training):
            val = _json_items(data["validation"], base, source, "validation", problems, True, n_channels)
            train = [{k: v for k, v in it.items() if k != "fold"} for it in training]
            info["validation"] = f"the 'validation' list of {source}: {len(val)} cases"
        else:
            train, val = _split_folds(training, fold, source, problems, info)
        return (train if split == "train" else val), problems, source
    # Folder layout (also nnU-Net v2, whose dataset.json names the channels but lists no files).
    source = root
    dirs = {d: os.path.join(root, d) for d in ("imagesTr", "labelsTr", "imagesVal", "labelsVal", "imagesTs", "labelsTs")}
    have = {d: os.path.isdir(p) for d, p in dirs.items()}
    if split == "test":
        for img_d, lab_d in (("imagesTs", "labelsTs"), ("imagesVal", "labelsVal")):
            if have[img_d]:
                return _pair_folder(dirs[img_d], dirs[lab_d] if have[lab_d] else None, problems, False, channel_names), problems, dirs[img_d]
        problems.append(f"{root}: no imagesTs or imagesVal folder, nor a dataset.json. Fix: put the images to predict in {dirs['imagesTs']}")
        return [], problems, source
    for d in ("imagesTr", "labelsTr"):
        if not have[d]:
            problems.append(f"{dirs[d]}: folder missing. Fix: create it with the training {'images' if d.startswith('images') else 'labels'}, or give --datalist / a dataset.json")
    if have["imagesVal"] != have["labelsVal"]:
        missing = "labelsVal" if have["imagesVal"] else "imagesVal"
        problems.append(f"{dirs[missing]}: folder missing while {'imagesVal' if missing == 'labelsVal' else 'labelsVal'} exists. Fix: create it, or remove both to validate on a fold of imagesTr")
    if split == "val" and have["imagesVal"] and have["labelsVal"]:
        val = _pair_folder(dirs["imagesVal"], dirs["labelsVal"], problems, True, channel_names)
        info["validation"] = f"the cases of {dirs['imagesVal']}: {len(val)}"
        return val, problems, dirs["imagesVal"]
    if not (have["imagesTr"] and have["labelsTr"]):
        return [], problems, source
    train = _pair_folder(dirs["imagesTr"], dirs["labelsTr"], problems, True, channel_names)
    if have["imagesVal"] or have["labelsVal"]:
        info["validation"] = f"the cases of {dirs['imagesVal']}"
        return (train if split == "train" else []), problems, dirs["imagesTr"]
    tr, val = _split_folds(train, fold, dirs["imagesTr"], problems, info)
    return (tr if split == "train" else val), problems, dirs["imagesTr"]


def list_cases(root: str | None, split: str, datalist: str | None = None, fold: int = 0) -> list[dict]:
    """List the cases of one split, images paired with labels by case name.

    Args:
        root: dataset folder (folder layout, MSD / nnU-Net v1 ``dataset.json`` with a ``training``
            list, or nnU-Net v2 raw dataset); base of relative paths in ``datalist``. May be
            ``None`` when ``datalist`` is given.
        split: ``"train"``, ``"val"`` or ``"test"`` (test: ``imagesTs``, else ``imagesVal``;
            a label is included when one with the same case name exists).
        datalist: optional MONAI datalist JSON, which takes precedence over ``root``'s layout.
        fold: validation fold for datalists with ``fold`` keys, or for the automatic 5-fold
            split used when no validation cases are listed.

    Returns:
        ``[{"image": path, "label": path}, ...]`` (no ``"label"`` for unlabeled test images);
        ``"image"`` is a list of paths, one per channel, for nnU-Net multi-channel cases
        (``case_0000``, ``case_0001``, ...); a 4-D file holds its channels itself.

    Raises:
        DataError: listing every missing folder or file, every case lacking a channel and
            every unpaired image or label.
    """
    cases, problems, _ = collect_cases(root, split, datalist, fold)
    if problems:
        raise DataError(problems)
    return cases


def describe_validation(root: str | None, datalist: str | None = None, fold: int = 0) -> str:
    """How the validation cases are chosen, in one line (for the start line and ``splits.json``).

    E.g. ``"fold 0 of 5 by sorted case name (cases 1, 6, ... of the sorted list, 2 of 10), as
    DIR/imagesTr gives no validation set"`` or ``"the cases of DIR/imagesVal: 4"``.
    """
    info: dict = {}
    cases, problems, source = collect_cases(root, "val", datalist, fold, info)
    return info.get("validation") or f"{len(cases)} validation cases from {source}" + (f" ({len(problems)} problems)" if problems else "")


def training_pool(root: str | None, datalist: str | None, fold: int = 0) -> tuple[list[dict], list[str]]:
    """Every labelled training case (the validation fold too when validation is a fold of the
    training list, so that a plan does not depend on ``--fold``), and the listing problems."""
    info: dict = {}
    train, problems, _ = collect_cases(root, "train", datalist, fold, info)
    val, val_problems, _ = collect_cases(root, "val", datalist, fold, {})
    problems += [p for p in val_problems if p not in problems]
    return (train + val if info.get("pooled") else train), problems


def _without_predictions(files: list[str]) -> list[str]:
    """``files`` less test_seg.py's outputs of another file of the list (``<case>_seg<ext>``,
    ``<case>_prob<ext>`` beside ``<case><ext>``): a folder predicted into before is not read back as inputs."""
    stems = {strip_ext(os.path.basename(f)) for f in files}
    kept, skipped = [], []
    for f in files:
        stem = strip_ext(os.path.basename(f)) or ""
        base = next((stem[: -len(s)] for s in ("_seg", "_prob") if stem.endswith(s)), None)
        (skipped if base and base in stems else kept).append(f)
    if skipped:
        logger.warning("%d file(s) look like predictions of other inputs in the same folder (e.g. %s) and are not predicted", len(skipped), skipped[0])
    return kept


def list_images(path: str, channels: int | None = None) -> list[dict]:
    """Inputs for inference from one image file, a DICOM series folder or a folder of images:
    ``[{"image": path or [path per channel]}]``.

    Multi-channel cases named the nnU-Net way are grouped: a folder's ``x_0000``, ``x_0001`` form
    one case, and a single ``x_0000`` file brings its sibling channel files along.

    Args:
        path: file or folder.
        channels: the model's input channels, when known (a missing channel file is then named).

    Raises:
        DataError: when the path does not exist, holds no image or a case lacks a channel.
    """
    problems: list[str] = []
    if os.path.isfile(path):
        if strip_ext(os.path.basename(path)) is None:
            raise DataError([f"{path}: not an image file ({', '.join(IMAGE_EXTENSIONS)}). Fix: convert it, or pass a DICOM series folder"])
        m = CHANNEL_RE.match(strip_ext(os.path.basename(path)) or "")
        files = _channel_files(path, channels) if m and int(m.group(2)) == 0 and channels != 1 else None
        if files and len(files) > 1:
            return [{"image": files}]
        return [{"image": path}]
    if is_dicom_dir(path):
        return [{"image": path}]
    if os.path.isdir(path):
        files = _without_predictions(image_files(path))
        if files:
            names = [f"channel_{i}" for i in range(channels)] if channels and channels > 1 else None
            cases = [{"image": image} for _, image in _group_channels(files, problems, names)]
            if problems:
                raise DataError(problems)
            return cases
        raise DataError([f"{path}: no image files found ({', '.join(IMAGE_EXTENSIONS)} or DICOM series folders). Fix: pass a folder of images"])
    raise DataError([f"{path}: not found. Fix: pass an existing image file or folder"])

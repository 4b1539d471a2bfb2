"""Post-processing of label maps: largest connected component per class, and the decision whether
it helps (nnU-Net's rule), stored beside the checkpoints."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from rep3d.inference.checkpoint import InferenceError

logger = logging.getLogger(__name__)


POSTPROCESS_CHOICES = ("none", "largest_component", "auto")


POSTPROCESS_FILE = "postprocessing.json"


def keep_largest_component(seg: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """``seg`` with only the largest connected component (26-connectivity) of each class in ``classes``
    kept; the removed voxels become background. MONAI's ``KeepLargestConnectedComponent`` with
    ``independent=True``: each class is treated on its own, so decisions per class compose.

    Raises:
        InferenceError: scikit-image (which MONAI uses for the labelling) is not installed.
    """
    classes = [int(c) for c in classes]
    if not classes:
        return seg
    from monai.transforms import KeepLargestConnectedComponent
    from monai.utils import optional_import

    if not optional_import("skimage.measure")[1]:
        raise InferenceError("--postprocess needs scikit-image (MONAI labels components with it): pip install -r requirements-deploy.txt")
    keep = KeepLargestConnectedComponent(applied_labels=classes, is_onehot=False, independent=True)
    out = keep(torch.as_tensor(np.ascontiguousarray(seg))[None])[0]
    return np.asarray(out).astype(seg.dtype, copy=False)


def decide_postprocessing(before: dict[int, list[float]], after: dict[int, list[float]], class_names: Sequence[str]) -> dict:
    """Per class: keep the largest component only where that raises the mean Dice over the cases in
    which the class is present (nnU-Net's rule); classes never present stay unprocessed.

    Args:
        before, after: ``{class: [Dice per case]}`` without and with the largest-component filter.
        class_names: all names, background first.

    Returns:
        ``{"largest_component": [classes], "classes": [{"class", "name", "dice_before", "dice_after", "cases", "apply"}]}``.
    """
    rows, chosen = [], []
    for c in sorted(before):
        b = np.array(before[c], float)
        a = np.array(after[c], float)
        ok = ~np.isnan(b)
        mb = float(b[ok].mean()) if ok.any() else float("nan")
        ma = float(a[ok].mean()) if ok.any() else float("nan")
        apply = bool(ok.any() and ma > mb)
        if apply:
            chosen.append(int(c))
        rows.append({"class": int(c), "name": class_names[c], "dice_before": mb, "dice_after": ma, "cases": int(ok.sum()), "apply": apply})
    return {"largest_component": chosen, "classes": rows}


def decision_path(checkpoints: Sequence[str]) -> str:
    """Where an ensemble's (or one checkpoint's) post-processing decision is stored: their common folder."""
    folders = [os.path.dirname(os.path.abspath(p)) for p in checkpoints]
    return os.path.join(os.path.commonpath(folders), POSTPROCESS_FILE)


def load_decision(checkpoints: Sequence[str], num_classes: int) -> dict | None:
    import json

    path = decision_path(checkpoints)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        d = json.load(f)
    stored = sorted(os.path.abspath(p) for p in d.get("checkpoints", []))
    if stored and stored != sorted(os.path.abspath(p) for p in checkpoints):
        logger.warning("%s was decided for other checkpoints (%s): not used", path, ", ".join(stored))
        return None
    classes = [int(c) for c in d.get("largest_component", [])]
    if any(not 0 < c < num_classes for c in classes):
        raise InferenceError(f"{path}: classes {classes} do not fit a {num_classes}-class model; delete the file to decide again")
    return {**d, "largest_component": classes, "path": path}

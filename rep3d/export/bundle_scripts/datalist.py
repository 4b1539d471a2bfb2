"""The cases a bundle predicts: the image files of ``--dataset_dir``, and the names of the outputs.

Input convention (also in the bundle's docs/README.md and configs/metadata.json):

* a model of one input channel: every image file of the folder is a case;
* a model of several channels: each case is either one 4-D file whose last axis holds the channels
  (NIfTI as the Medical Segmentation Decathlon stores them), or one file per channel named as nnU-Net
  names them, ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... in channel order.

Every prediction is written as ``<case>_seg.nii.gz`` (the nnU-Net channel suffix ``_0000`` dropped).
Part of a MONAI bundle exported by Rep3D (MIT licence); imports only the standard library and MONAI.
"""

from __future__ import annotations

import os
import re

from monai.data.folder_layout import default_name_formatter

#: File endings read as images, longest first (".nii.gz" before ".gz").
IMAGE_ENDINGS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha", ".mhd")

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _stem(name: str) -> str | None:
    low = name.lower()
    for ending in IMAGE_ENDINGS:
        if low.endswith(ending):
            return name[: -len(ending)]
    return None


def cases(folder: str, in_channels: int = 1) -> list[dict]:
    """``[{"image": path or [path per channel]}]`` for the image files of ``folder``, sorted by name.

    Args:
        folder: the images (``--dataset_dir``).
        in_channels: the model's input channels; above 1, nnU-Net channel files are grouped per case
            and any other image file is taken as a 4-D file holding all channels.

    Raises:
        ValueError: a missing or empty folder, or a case lacking one of its channel files (the message
            names the file to add).
    """
    if not os.path.isdir(folder):
        raise ValueError(f"--dataset_dir {folder}: no such folder; pass the folder of the images to segment")
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and _stem(n) is not None)
    if not names:
        raise ValueError(f"--dataset_dir {folder}: no image files ({', '.join(IMAGE_ENDINGS)})")
    if in_channels <= 1:
        return [{"image": os.path.join(folder, n)} for n in names]
    groups: dict[str, dict[int, str]] = {}
    out: list[tuple[str, dict]] = []
    for n in names:
        match = _CHANNEL.match(_stem(n) or "")
        if match is None:
            out.append((n, {"image": os.path.join(folder, n)}))  # one 4-D file: all channels
        else:
            groups.setdefault(match["case"], {})[int(match["channel"])] = os.path.join(folder, n)
    problems = []
    for case, files in sorted(groups.items()):
        missing = [c for c in range(in_channels) if c not in files]
        extra = sorted(c for c in files if c >= in_channels)
        if missing:
            problems.append(f"case {case!r} lacks channel file(s) {', '.join(f'{case}_{c:04d}' for c in missing)} (the model takes {in_channels} channels)")
        if extra:
            problems.append(f"case {case!r} has channel file(s) {', '.join(f'{case}_{c:04d}' for c in extra)} beyond the model's {in_channels} channels")
        out.append((case, {"image": [files[c] for c in range(in_channels) if c in files]}))
    if problems:
        raise ValueError(f"--dataset_dir {folder}: " + "; ".join(problems) + ". Fix: add or remove those files")
    return [item for _, item in sorted(out, key=lambda t: t[0])]


def case_name(metadict: dict, saver) -> dict:
    """``SaveImaged``'s ``output_name_formatter``: the input's file name without its image ending and
    without the nnU-Net channel suffix ``_0000``, so ``case_0000.nii.gz`` gives ``case_seg.nii.gz``."""
    kwargs = default_name_formatter(metadict, saver)
    base = os.path.basename(str(kwargs["subject"]))
    stem = _stem(base) or base
    kwargs["subject"] = stem.removesuffix("_0000")
    return kwargs

"""Writing files so that nothing already written is lost: every writer goes through a temporary file
in the destination folder, then an atomic rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Sequence

import numpy as np
import torch


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


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

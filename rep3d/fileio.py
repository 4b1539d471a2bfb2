"""Writing files so that nothing already written is lost, and a folder has one writer.

Every writer of the project goes through :func:`atomic_path`: the file is written under a temporary
name in its destination folder, flushed, given the permissions the user's umask gives (as ``open()``
would; ``tempfile.mkstemp`` alone would leave 0600), then renamed over the destination in one step. A
write that fails (disk full, read-only file system, no permission, a path under a file) removes its
temporary file and raises :class:`WriteError`, whose message names the path and the fix; the file it
would have replaced is untouched. Temporary names carry :data:`TMP_MARK`, so that those left by a
killed process are found and removed by :func:`remove_stale_temporaries`.

:class:`FolderLock` is an ``fcntl`` lock on ``<folder>/.rep3d.lock`` held for the life of a process that
writes the folder (a training run, a prediction run): the kernel releases it when the process dies,
even by ``kill -9``, so nothing is left to clean up.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from typing import Any, Sequence

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # not POSIX (Windows): folders are not locked
    fcntl = None

__all__ = [
    "FolderLock",
    "FolderLockedError",
    "TMP_MARK",
    "WriteError",
    "atomic_path",
    "check_writable",
    "jsonable",
    "pyplot",
    "read_json",
    "remove_stale_temporaries",
    "save_checkpoint_atomic",
    "save_figure_atomic",
    "sha256_of",
    "write_csv",
    "write_json",
    "write_text_atomic",
]

#: In the name of every temporary file of :func:`atomic_path`.
TMP_MARK = ".rep3d-tmp"
LOCK_NAME = ".rep3d.lock"

_FIXES = {
    errno.ENOSPC: "the disk is full: free space there, or write elsewhere (another --output)",
    errno.EDQUOT: "the disk quota is exceeded: free space there, or write elsewhere (another --output)",
    errno.EROFS: "the file system is read-only: write elsewhere (another --output)",
    errno.EACCES: "no permission to write there: fix the folder's permissions, or write elsewhere (another --output)",
    errno.EPERM: "no permission to write there: fix the folder's permissions, or write elsewhere (another --output)",
    errno.ENOTDIR: "a part of the path is a file, not a folder: pass a folder path (another --output)",
    errno.EISDIR: "the path is a folder: pass a file path",
    errno.ENAMETOOLONG: "the path is too long: pass a shorter one",
}


class WriteError(OSError):
    """A file or folder could not be written; the message names the path, the reason and the fix."""

    def __init__(self, path: str | os.PathLike, err: BaseException) -> None:
        code = _errno_of(err)
        reason = os.strerror(code) if code else str(err).splitlines()[0] if str(err) else type(err).__name__
        fix = _FIXES.get(code, "check the path, its folder's permissions and free space")
        super().__init__(code, f"cannot write {os.fspath(path)}: {reason}; {fix}")
        self.path = os.fspath(path)

    def __str__(self) -> str:
        return str(self.args[1])


def _errno_of(err: BaseException | None) -> int | None:
    """The errno behind ``err``: its own, or that of the OSError it was raised from (torch.save's zip
    writer turns a full disk into a RuntimeError raised while handling the OSError)."""
    seen = 0
    while err is not None and seen < 8:
        if getattr(err, "errno", None):
            return int(err.errno)
        if "No space left" in str(err):
            return errno.ENOSPC
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _is_write_failure(err: BaseException) -> bool:
    # torch.save reports a failed write (disk full) as a RuntimeError from its zip writer.
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and ("inline_container" in str(err) or "file write failed" in str(err)))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _makedirs(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise WriteError(folder, err) from None
    if not os.path.isdir(folder):
        raise WriteError(folder, NotADirectoryError(errno.ENOTDIR, "not a directory"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", fsync: bool = False) -> Iterator[str]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends cleanly.

    Args:
        path: the destination file (its folder is created).
        suffix: ending of the temporary name, for writers that choose the format by extension
            (``".nii.gz"`` for nibabel).
        fsync: flush the file to disk before the rename (checkpoints).

    Raises:
        WriteError: the folder or file could not be written (the temporary file is removed).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    _makedirs(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TMP_MARK + suffix, dir=folder)
        os.close(fd)
    except OSError as err:
        raise WriteError(path, err) from None
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if _is_write_failure(err) and not isinstance(err, WriteError):
            raise WriteError(path, err) from None
        raise


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`): a reader never sees half a file."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)


def write_csv(rows: Sequence[Sequence[Any]], path: str | os.PathLike) -> None:
    """Write ``rows`` (the header first) as CSV, atomically."""
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    write_text_atomic(buf.getvalue(), path)


def save_figure_atomic(fig: Any, path: str | os.PathLike, dpi: int = 100, **savefig: Any) -> None:
    """``fig.savefig`` as PNG, atomically; ``savefig`` keywords (e.g. ``bbox_inches="tight"``) pass through."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, **savefig)


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


def read_json(path: str | os.PathLike) -> dict | None:
    """The object in a JSON file, or None when the file is missing, unreadable, not JSON or not an object
    (the readers of records, indexes, manifests and dataset.json treat all of these as absent)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``jsonable(obj)`` to ``path`` atomically."""
    write_text_atomic(json.dumps(jsonable(obj), indent=1) + "\n", path)


def save_checkpoint_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_path`, flushed to disk before the rename: a crash or a full
    disk mid-write leaves the previous checkpoint intact."""
    with atomic_path(path, fsync=True) as tmp:
        torch.save(obj, tmp)


def check_writable(folder: str | os.PathLike, flag: str = "--output") -> str:
    """Create ``folder`` if needed and prove it can be written (a probe file, removed); returns its path.

    Raises:
        WriteError: naming ``flag`` and the fix.
    """
    folder = os.fspath(folder)
    try:
        write_text_atomic("", os.path.join(folder, ".rep3d-write-check"))
        os.remove(os.path.join(folder, ".rep3d-write-check"))
    except WriteError as err:
        raise WriteError(folder, OSError(err.errno, f"{flag} {folder} is not writable ({os.strerror(err.errno) if err.errno else err})")) from None
    except OSError as err:
        raise WriteError(folder, err) from None
    return folder


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files that killed writes left in ``folder`` (and its direct sub-folders);
    returns their paths. Call it only while holding the folder's :class:`FolderLock`."""
    folder = os.fspath(folder)
    removed = []
    for d in [folder] + [os.path.join(folder, s) for s in (os.listdir(folder) if os.path.isdir(folder) else []) if os.path.isdir(os.path.join(folder, s))]:
        for name in os.listdir(d) if os.path.isdir(d) else []:
            # ours, and the ".<name>.<random>.tmp" of the writers before TMP_MARK existed
            if name.startswith(".") and (TMP_MARK in name or (name.endswith(".tmp") and name.count(".") >= 3)):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(d, name))
                    removed.append(os.path.join(d, name))
    return removed


class FolderLockedError(RuntimeError):
    """Another process holds the folder's lock (the message names it)."""


class FolderLock:
    """An exclusive ``fcntl`` lock on ``<folder>/.rep3d.lock`` for one writer of a folder.

    The lock file records the holder (pid, host, command); a second process gets a
    :class:`FolderLockedError` naming it, before it writes anything. The kernel drops the lock when the
    holder exits or is killed, so a stale lock file is harmless (the next process takes it over).

    Example::

        with FolderLock("runs/demo", "main_train.py"):
            ...  # the only writer of runs/demo
    """

    def __init__(self, folder: str | os.PathLike, what: str = "another process") -> None:
        self.folder = os.fspath(folder)
        self.what = what
        self.path = os.path.join(self.folder, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        _makedirs(self.folder)
        if fcntl is None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as err:
            raise WriteError(self.path, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise FolderLockedError(
                f"{self.folder} is in use by {holder or 'another process'}: wait for it to finish (or stop it), "
                f"or pass another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({self.what}: {' '.join(sys.argv)[:300]})\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (exports and bundles record it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

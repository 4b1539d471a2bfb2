"""Where the pre-processed stores live and what identifies their contents: the base folder
(``--preprocessed`` / ``$REP3D_PREPROCESSED`` / the user's cache folder), the dataset key, each
case's id and source identity (path, size, mtime_ns of every file), the per-case JSONs on disk, and
the opened :class:`Store` with its :class:`StoreReport`. Building is :mod:`rep3d.data.store`; see
its docstring for the layout on disk.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rep3d.data.cases import case_name, image_paths
from rep3d.fileio import WriteError, read_json

#: Bumped whenever the arrays or their meaning change: a new version builds new stores.
STORE_FORMAT_VERSION = 1

#: Environment variable naming the stores' base folder (``--preprocessed`` wins over it).
ENV_VAR = "REP3D_PREPROCESSED"

#: ``--preprocessed off``: no store, the cases are pre-processed into memory at start.
OFF = "off"

#: ``--preprocessed`` not given: the default base folder.
AUTO = "auto"

INDEX_FILE = "store.json"

#: The data check's record of the cases that passed it (:class:`rep3d.data.checks.CheckRecord`).
CHECK_RECORD_FILE = "checks.json"

FAILED_FILE = "build_failed.json"

CASES = "cases"

_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


class StoreError(WriteError):
    """The store cannot be written or used; the message names the folder and the fix (``--preprocessed``)."""

    def __init__(self, path: str, message: str, code: int | None = None) -> None:
        OSError.__init__(self, code or 0, message)
        self.path = path

    def __str__(self) -> str:
        return self.strerror or ""


def default_base() -> str:
    """The base folder of the stores when ``--preprocessed`` is not given: ``$REP3D_PREPROCESSED``,
    else ``$XDG_CACHE_HOME/rep3d/preprocessed``, else ``~/.cache/rep3d/preprocessed``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(cache), "rep3d", "preprocessed")


def resolve_base(preprocessed: str | None) -> str | None:
    """The base folder ``--preprocessed`` names: ``None`` for ``off``, :func:`default_base` for
    ``None`` / ``"auto"``, else the folder itself."""
    if preprocessed is None or str(preprocessed).strip().lower() == AUTO:
        return default_base()
    if str(preprocessed).strip().lower() == OFF:
        return None
    return os.path.abspath(os.path.expanduser(str(preprocessed)))


def dataset_cache_dir(preprocessed: str | None, root: str | None, datalist: str | None) -> str | None:
    """``<base>/<dataset key>``: the dataset's folder of stores, which also keeps its plans and the
    data check's record of unchanged cases (:data:`CHECK_RECORD_FILE`); None for ``off``."""
    base = resolve_base(preprocessed)
    return None if base is None else os.path.join(base, dataset_key(root, datalist))


def check_record_path(preprocessed: str | None, root: str | None, datalist: str | None) -> str | None:
    """The :class:`rep3d.data.checks.CheckRecord` file of the dataset, shared by all its stores; None for ``off``."""
    folder = dataset_cache_dir(preprocessed, root, datalist)
    return None if folder is None else os.path.join(folder, CHECK_RECORD_FILE)


def label_dtype(num_classes: int) -> np.dtype:
    """uint8 labels up to 256 classes, int16 above."""
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.int16)


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def source_digest(*sources: str) -> str:
    """Digest of Python sources without their docstrings, comments and layout (their ASTs): what keys a
    store or a kept plan to the code that made it, so that editing a comment does not invalidate them."""
    h = hashlib.sha256()
    for source in sources:
        tree = ast.parse(textwrap.dedent(source))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        h.update(hashlib.sha256(ast.dump(tree).encode()).hexdigest().encode())
    return h.hexdigest()[:16]


def dataset_key(root: str | None, datalist: str | None) -> str:
    """The dataset's sub-folder: the dataset folder's (or datalist's) name and a hash of the real paths."""
    parts = [os.path.realpath(p) if p else "" for p in (root, datalist)]
    named = root or datalist or "dataset"
    name = _ID_CHARS.sub("_", os.path.basename(os.path.normpath(named)).split(".")[0]).strip("_") or "dataset"
    return f"{name[:60]}-{hashlib.sha1('|'.join(parts).encode()).hexdigest()[:10]}"


def file_identity(path: str) -> dict:
    """``{"path", "size", "mtime_ns"}`` of a source file; a DICOM series folder counts its files
    (total size, newest mtime, and a digest of their names, sizes and mtimes). Missing: size -1."""
    p = os.path.abspath(str(path))
    try:
        st = os.stat(p)
    except OSError:
        return {"path": p, "size": -1, "mtime_ns": 0}
    if not os.path.isdir(p):
        return {"path": p, "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
    entries = []
    for folder, _, files in os.walk(p):
        for f in sorted(files):
            s = os.stat(os.path.join(folder, f))
            entries.append(f"{os.path.relpath(os.path.join(folder, f), p)}:{s.st_size}:{s.st_mtime_ns}")
    entries.sort()
    sizes = [int(e.rsplit(":", 2)[1]) for e in entries]
    mtimes = [int(e.rsplit(":", 2)[2]) for e in entries]
    return {"path": p, "size": sum(sizes), "mtime_ns": max(mtimes, default=0), "files": hashlib.sha1("\n".join(entries).encode()).hexdigest()[:16]}


def case_identity(case: dict) -> list[dict]:
    """The identity of every source file of a case: its image channels, then its label."""
    return [file_identity(p) for p in image_paths(case["image"])] + ([file_identity(case["label"])] if case.get("label") else [])


def case_id(case: dict) -> str:
    """The case's name in the store: its case name and a hash of its image paths (unique across splits)."""
    paths = [os.path.abspath(p) for p in image_paths(case["image"])]
    name = _ID_CHARS.sub("_", case_name(case["image"])).strip("_")[:80] or "case"
    return f"{name}-{hashlib.sha1('|'.join(paths).encode()).hexdigest()[:10]}"


def _gib(nbytes: float) -> str:
    return f"{nbytes / 1024**3:.2f} GiB" if nbytes >= 0.1 * 1024**3 else f"{nbytes / 1024**2:.1f} MiB"


@dataclass(frozen=True)
class StoreReport:
    """What :func:`prepare_store` did, for the run's start line.

    Attributes:
        path: the store folder.
        action: ``"built"`` (no case was there), ``"updated"`` (some built, rebuilt or dropped),
            ``"reused"`` (nothing to do), ``"waited"`` (another process or rank 0 built it).
        cases: cases in the store now.
        added, rebuilt, dropped: cases built new, rebuilt for changed sources, removed.
        seconds: time taken (checks, building, waiting).
        nbytes: the store's size on disk.
    """

    path: str
    action: str
    cases: int
    added: int = 0
    rebuilt: int = 0
    dropped: int = 0
    seconds: float = 0.0
    nbytes: int = 0

    def describe(self) -> str:
        size = f"{self.cases} cases, {_gib(self.nbytes)} on disk"
        if self.action == "built":
            return f"store {self.path}: built ({self.added} cases pre-processed in {self.seconds:.1f} s), {size}"
        if self.action == "updated":
            parts = ", ".join(f"{n} {w}" for n, w in ((self.added, "added"), (self.rebuilt, "rebuilt (sources changed)"), (self.dropped, "dropped")) if n)
            return f"store {self.path}: updated in {self.seconds:.1f} s ({parts}; the other cases reused), {size}"
        if self.action == "waited":
            return f"store {self.path}: built by another process, waited {self.seconds:.1f} s, {size}"
        return f"store {self.path}: reused (every case up to date, checked in {self.seconds:.1f} s), {size}"


class Store:
    """A complete store, as read from its folder: its settings and every case's metadata.

    Attributes:
        path: the store folder.
        settings: :func:`store_settings` of the store.
        cases: case id -> the case's JSON (``cases/<id>.json``).
        report: how :func:`prepare_store` got it (``None`` when opened directly).
    """

    def __init__(self, path: str, settings: dict, cases: dict[str, dict], report: StoreReport | None = None) -> None:
        self.path = path
        self.settings = settings
        self.cases = cases
        self.report = report

    def record(self, case: dict) -> dict:
        """The reading record of a listed case: paths of its arrays, shapes, padding, index layout."""
        cid = case_id(case)
        meta = self.cases.get(cid)
        if meta is None:
            raise StoreError(self.path, f"{image_paths(case['image'])[0]}: not in the store {self.path} (a bug: the store was built for other cases)")
        folder = os.path.join(self.path, CASES)
        rec = {"id": cid, "source": image_paths(case["image"])[0], **{k: os.path.join(folder, f) for k, f in meta["files"].items()}}
        rec.update({k: meta[k] for k in ("shape", "unpadded_shape", "pad", "channels", "indices", "label_dtype_in_memory")})
        return rec

    def records(self, cases: Sequence[dict]) -> list[dict]:
        return [self.record(c) for c in cases]

    def nbytes(self) -> int:
        return sum(int(m.get("bytes", 0)) for m in self.cases.values())


def _read_cases(path: str) -> dict[str, dict]:
    folder = os.path.join(path, CASES)
    out = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith(".json") and not name.startswith("."):
            meta = read_json(os.path.join(folder, name))
            if meta is not None and "files" in meta and "source" in meta:
                out[name[: -len(".json")]] = meta
    return out


def _complete(path: str, meta: dict, settings_id: str) -> bool:
    """The case's arrays are all there with the sizes it recorded, for these settings."""
    if meta.get("settings") != settings_id:
        return False
    folder = os.path.join(path, CASES)
    try:
        return sum(os.path.getsize(os.path.join(folder, f)) for f in meta["files"].values()) == int(meta.get("bytes", -1))
    except OSError:
        return False


def _remove_case_files(path: str, keep: set[str]) -> int:
    """Remove the files of every case not in ``keep`` (its JSON first); returns the cases removed."""
    folder = os.path.join(path, CASES)
    gone = set()
    names = sorted(os.listdir(folder), key=lambda n: not n.endswith(".json")) if os.path.isdir(folder) else []
    for name in names:
        cid = name.split(".")[0]
        if name.startswith(".") or cid in keep:
            continue
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, name))
            if name.endswith(".json"):
                gone.add(cid)
    return len(gone)


def _store_write_error(path: str, err: BaseException) -> StoreError:
    code = getattr(err, "errno", None)
    if isinstance(err, WriteError):
        reason = str(err).split(": ", 1)[-1].split(";")[0] if ": " in str(err) else str(err)
    else:
        reason = os.strerror(code) if code else str(err)
    return StoreError(
        path,
        f"cannot write the pre-processed store {path}: {reason}. Fix: pass --preprocessed DIR (a writable folder with room "
        f"for the pre-processed cases, or set {ENV_VAR}), or --preprocessed off (pre-process into memory at start instead)",
        code,
    )


def _fresh_from_index(path: str, cases: Sequence[dict]) -> dict[str, dict] | None:
    """The case JSONs, when ``store.json`` lists every case of ``cases`` with its current source identity."""
    index = read_json(os.path.join(path, INDEX_FILE))
    if index is None or index.get("format") != STORE_FORMAT_VERSION:
        return None
    listed = index.get("cases", {})
    for c in cases:
        entry = listed.get(case_id(c))
        if entry is None or entry.get("source") != case_identity(c):
            return None
    metas = _read_cases(path)
    sid = os.path.basename(path)
    out = {}
    for c in cases:
        m = metas.get(case_id(c))
        if m is None or not _complete(path, m, sid):
            return None
        out[case_id(c)] = m
    return out

"""What a run needs to be repeated: the software it ran on, the code's version, and deterministic algorithms.

* :func:`environment`: torch, MONAI, CUDA and cuDNN versions, and the git commit of the code (with whether
  the working tree differed from it); recorded in ``config.json`` and said in the start line.
* :func:`enable_determinism`: ``torch.use_deterministic_algorithms(True, warn_only=True)``, deterministic
  cuDNN (no autotuning) and the cuBLAS workspace setting that CUDA's matrix products need to be repeatable.
* :class:`NondeterminismLog`: collects the operations that PyTorch reports, with ``warn_only``, as having no
  deterministic implementation, the first time each one runs, while letting every other warning through.

What determinism does not cover: the seed fixes weights, crops and shuffling, but loader workers and
the GPU augmentation still run in parallel, a resumed run continues from the saved RNG state (not the
same stream as an uninterrupted run), and results can differ between GPU models, CUDA/cuDNN versions
and thread counts even with every flag on.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from typing import Any

import monai
import torch

#: The code whose commit is recorded: the folder holding the ``rep3d`` package.
CODE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


#: cuBLAS needs a fixed workspace for repeatable results on CUDA >= 10.2 (PyTorch's reproducibility notes).
CUBLAS_WORKSPACE = ":4096:8"


# PyTorch's warn_only message: "<op> does not have a deterministic implementation, but you set ...".
_NONDETERMINISTIC = re.compile(r"^(.*?) does not have a deterministic implementation")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", CODE_ROOT, *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def code_version() -> dict[str, Any]:
    """``{"commit": sha or "unknown", "modified": bool or "unknown"}`` of the code in :data:`CODE_ROOT`;
    ``modified``: tracked files differ from the commit (untracked files are not counted)."""
    sha = _git("rev-parse", "HEAD")
    if not sha:
        return {"commit": "unknown", "modified": "unknown"}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha.strip(), "modified": bool(status.strip()) if status is not None else "unknown"}


def environment() -> dict[str, Any]:
    """The software a run uses: Python, torch, MONAI, CUDA and cuDNN versions (``"none"`` without them),
    and :func:`code_version`."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "monai": monai.__version__,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(cudnn) if cudnn else "none",
        "code": code_version(),
    }


def describe_environment(env: dict[str, Any]) -> str:
    """One line for the start line, e.g. ``torch 2.13.0, MONAI 1.6.1, CUDA none, cuDNN none; code 9477bb8e1f2a (modified)``."""
    code = env.get("code") or {}
    commit = str(code.get("commit", "unknown"))
    state = {True: " (modified)", False: "", "unknown": " (modified: unknown)"}.get(code.get("modified"), "")
    shown = commit[:12] if commit != "unknown" else "unknown (not a git checkout)"
    return f"torch {env['torch']}, MONAI {env['monai']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; code {shown}{state if commit != 'unknown' else ''}"


def enable_determinism() -> None:
    """Deterministic algorithms where PyTorch has them (``warn_only``: the others still run, and say so),
    deterministic cuDNN without autotuning, and cuBLAS's fixed workspace (set before CUDA is first used;
    an existing ``CUBLAS_WORKSPACE_CONFIG`` is kept)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


class NondeterminismLog:
    """Collect the operations that ran without a deterministic implementation (PyTorch's ``warn_only``
    warnings), between :meth:`start` and :meth:`stop`; other warnings are shown as usual.

    Example::

        log = NondeterminismLog().start()
        train()
        log.stop()
        print(sorted(log.ops))      # e.g. ['upsample_trilinear3d_backward_out_cuda']
    """

    def __init__(self) -> None:
        self.ops: set[str] = set()
        self._saved: Any = None

    def start(self) -> "NondeterminismLog":
        if self._saved is not None:
            return self
        # The warnings filters are left alone: under the default filter each operation's warning reaches
        # the hook at least once (once per calling location), which is all the list needs.
        self._saved = warnings.showwarning
        warnings.showwarning = self._show
        return self

    def _show(self, message: Any, category: type, filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
        match = _NONDETERMINISTIC.match(str(message))
        if match:
            self.ops.add(match.group(1).strip())
            return
        self._saved(message, category, filename, lineno, file, line)

    def stop(self) -> None:
        if self._saved is None:
            return
        if warnings.showwarning == self._show:
            warnings.showwarning = self._saved
        self._saved = None

"""Where and how a run computes: device choice, mixed precision, seeding and RNG state, worker counts,
thread pools, out-of-memory detection."""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import networks

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def select_device(gpu: int | str | None) -> torch.device:
    """The device to run on: the one rule of every script.

    Args:
        gpu: CUDA index, ``-1`` for CPU, ``None`` for "cuda:0 if available" (``--gpu``); or a name
            (``--device``): ``"auto"`` (the same as None), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. When no
            GPU is visible an index falls back to the CPU (with a warning if one other than 0 was asked
            for explicitly); the name ``cuda`` is refused.

    Raises:
        ValueError: an index beyond the visible GPUs, or ``cuda`` asked for by name without one.
    """
    if isinstance(gpu, str):
        name = gpu.strip().lower()
        if name == "auto":
            gpu = None
        elif name == "cpu":
            return torch.device("cpu")
        elif name == "cuda" or name.startswith("cuda:"):
            if not torch.cuda.is_available():
                raise ValueError(f"--device {gpu}: no CUDA device is visible; use --device cpu.")
            gpu = int(name.partition(":")[2] or 0)
        else:
            raise ValueError(f"--device {gpu!r}: use auto, cpu, cuda or cuda:N")
    if gpu is not None and gpu < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if gpu not in (None, 0):
            warnings.warn(f"--gpu {gpu} asked for but no CUDA GPU is visible: running on the CPU", stacklevel=2)
        return torch.device("cpu")
    index = 0 if gpu is None else int(gpu)
    n = torch.cuda.device_count()
    if index >= n:
        raise ValueError(f"--gpu {index}: only {n} GPU(s) visible (indices 0..{n - 1}); pass one of those, or -1 for the CPU")
    # Fixed input sizes (crops, sliding windows): let cuDNN pick the fastest algorithms once.
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda", index)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bfloat16 convolutions and matrix products natively (AVX512-BF16 or AMX,
    through oneDNN). Elsewhere bf16 on the CPU is emulated and slower than float32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: str, device: torch.device, inference: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device`` (``None`` = full float32).

    ``auto``: bf16 on CUDA GPUs that support it, else fp16. On the CPU: off for training, and for
    inference (``inference=True``) bf16 where the CPU does bf16 natively (:func:`cpu_has_native_bf16`:
    twice float32's speed for REP3D there, same Dice; benchmarks/RESULTS.md), else off. ``bf16`` is
    allowed on the CPU; ``fp16`` needs CUDA.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {AMP_CHOICES}, got {amp!r}")
    device = torch.device(device)
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if inference and device.type == "cpu" and cpu_has_native_bf16() else None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA GPU; on the CPU pass --amp bf16 or --amp off")
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``device`` in ``dtype``; a no-op context when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, cache_enabled=cache_enabled)


unwrap_model = networks.unwrap_model  # the one unwrapper (DDP, DataParallel, torch.compile), re-exported


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU). Does not force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is a CUDA (or other accelerator) out-of-memory error."""
    if isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def thread_map(fn, items: Sequence, num_workers: int | None) -> list:
    """``[fn(x) for x in items]`` on up to ``num_workers`` threads (at most 8): file reading releases the GIL."""
    workers = max(1, min(int(num_workers or 1), len(items), 8))
    if workers == 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(fn, items))


def default_num_workers() -> int:
    """Loader workers when --num_workers is not given: one per CPU core but one (for the training loop), 1 to 8.

    Two workers (the seed's value) left an H100 waiting for data half of the time with 96^3 crops
    (benchmarks/RESULTS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, cores - 1))


def rng_state() -> dict:
    """Global RNG states as checkpoint-safe types (tensors, lists, numbers)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def slow_conv3d_warning(device: torch.device) -> str | None:
    """A warning for PyTorch builds known to run 3-D convolutions several times slower under AMP, else None.

    torch 2.9.0 disables cuDNN for conv3d and falls back to vol2col (about 4x slower with AMP and several
    times the memory: pytorch#166122, reported from nnU-Net, nnU-Net#3002); 2.9.1 re-enables cuDNN only
    with cuDNN >= 9.15 (its wheels pin 9.13). requirements.txt excludes 2.9.0.
    """
    version = torch.__version__.split("+")[0]
    if version == "2.9.0":
        return "torch 2.9.0 runs 3-D convolutions about 4x slower under AMP (cuDNN disabled for conv3d, pytorch#166122): install torch 2.8 or >= 2.9.1"
    if version.startswith("2.9.") and device.type == "cuda":
        cudnn = torch.backends.cudnn.version() or 0
        if cudnn < 91500:
            return f"torch {version} with cuDNN {cudnn} leaves 3-D convolutions on the slow vol2col path (pytorch#166122): install nvidia-cudnn >= 9.15, or torch >= 2.10"
    return None

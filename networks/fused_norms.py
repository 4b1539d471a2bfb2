"""Fused instance norm + LeakyReLU (+ residual) for MONAI's decoder blocks: speed only, no architecture.

MONAI's ``UnetResBlock`` runs ``conv1 -> norm1 -> LeakyReLU -> conv2 -> norm2 -> (+ residual, itself
``conv3 -> norm3`` when the width changes) -> LeakyReLU``; ``UnetBasicBlock`` the same without the
residual. In eager PyTorch each norm is a statistics pass and a normalise pass, and the activation and the
residual add are two more passes over the activation, forward and backward: on the H200 these memory-bound
passes took 24 of the 57 ms of kernel time of a REP3D training step (benchmarks/RESULTS.md, issue 25).

Here each "norm (+ norm of the residual + add) + LeakyReLU" is one small function, compiled on CUDA with
``torch.compile`` (dynamic shapes: one compilation per function serves every decoder level and batch
size) into a reduction and a single elementwise kernel, and their backward likewise. The blocks keep their
modules, parameters and state-dict keys (:func:`use_fused_norms` only swaps the class of each block for a
subclass whose ``forward`` calls these functions). Elsewhere (CPU, inside a ``torch.compile`` of the whole
model, ONNX / TorchScript export, or when the compilation fails) the stock forward runs.

The statistics are computed in float32 whatever the input's dtype, as the stock norm does, and the result
is returned in the dtype of the normalised input.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock

from .layout import ChannelsLastInstanceNorm3d, memory_format_of

__all__ = ["FusedUnetBasicBlock", "FusedUnetResBlock", "norm_act", "norm_add_act", "use_fused_norms"]



def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors, else ``x`` itself (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _normalised(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = _wide(x)
    var, mean = torch.var_mean(xf, dim=(2, 3, 4), keepdim=True, correction=0)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * _wide(weight).view(1, -1, 1, 1, 1) + _wide(bias).view(1, -1, 1, 1, 1)
    return y


def _like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    y = y.to(x.dtype)
    return y.contiguous(memory_format=torch.channels_last_3d) if memory_format_of(x) == torch.channels_last_3d else y.contiguous()


def norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, slope: float) -> torch.Tensor:
    """``leaky_relu(instance_norm(x))`` in one pass (per sample and channel over D, H, W)."""
    return _like(F.leaky_relu(_normalised(x, weight, bias, eps), slope), x)


def norm_add_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor,
    r_weight: torch.Tensor | None,
    r_bias: torch.Tensor | None,
    r_eps: float,
    r_norm: bool,
    slope: float,
) -> torch.Tensor:
    """``leaky_relu(instance_norm(x) + r)`` with ``r`` the residual, itself instance-normalised when ``r_norm``."""
    r = _normalised(residual, r_weight, r_bias, r_eps) if r_norm else _wide(residual)
    return _like(F.leaky_relu(_normalised(x, weight, bias, eps) + r, slope), x)


_COMPILED: dict = {}
_STATE = {"failed": False}


def _compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[fn]


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    """Whether Triton is installed (inductor's CUDA kernels need it); found, not imported, and looked up
    once per process (every fused block asks at every forward)."""
    return importlib.util.find_spec("triton") is not None


def _exporting() -> bool:
    return bool(torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def fused_wanted(setting: bool | str, x: torch.Tensor) -> bool:
    """Whether a block with ``fused_norms = setting`` fuses for input ``x``: ``"auto"`` on CUDA in eager
    mode with Triton, unless a compilation failed in this process; True also elsewhere, uncompiled (tests)."""
    if setting is False or _exporting() or torch.compiler.is_compiling():
        return False
    if setting == "auto":
        return x.is_cuda and not _STATE["failed"] and _triton_available()
    return True


def _probe(x: torch.Tensor) -> None:
    """Compile both functions and run them forward and backward once on a small tensor like ``x``, so
    that a compiler that cannot build them (its backward is compiled only at the first backward) fails
    here, where it can be caught, and not in the middle of a training step."""
    t = torch.randn(2, 4, 4, 4, 4, device=x.device, dtype=x.dtype).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    r = torch.randn_like(t).requires_grad_()
    with torch.enable_grad():
        out = _compiled(norm_act)(t, None, None, 1e-5, 0.01).float().sum()
        for r_norm in (True, False):
            out = out + _compiled(norm_add_act)(t, None, None, 1e-5, r, None, None, 1e-5, r_norm, 0.01).float().sum()
        out.backward()


def _call(fn, x: torch.Tensor, *args):
    if not x.is_cuda or _STATE["failed"]:
        return fn(x, *args)
    try:
        if not _STATE.get("probed"):
            _probe(x)
            _STATE["probed"] = True
        return _compiled(fn)(x, *args)
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the stock forward
        _STATE["failed"] = True
        warnings.warn(f"fused decoder norms disabled: torch.compile failed ({type(err).__name__}: {err}); the stock norms are used", stacklevel=3)
        return None


def _norm_args(norm: nn.Module) -> tuple:
    return (norm.weight, norm.bias, float(norm.eps))


def _fusable(block: nn.Module) -> bool:
    norms = [m for m in (getattr(block, n, None) for n in ("norm1", "norm2", "norm3")) if m is not None]
    plain = all(isinstance(m, (nn.InstanceNorm3d, ChannelsLastInstanceNorm3d)) and not getattr(m, "track_running_stats", False) for m in norms)
    return plain and isinstance(getattr(block, "lrelu", None), nn.LeakyReLU)


class _Fused:
    """What both fused blocks share: when to fuse, and ``lrelu(norm(conv(x)))`` as one fused call."""

    fused_norms: bool | str = "auto"

    def _fuse(self, inp: torch.Tensor) -> float | None:
        """The LeakyReLU slope when this call fuses, else None."""
        return float(self.lrelu.negative_slope) if fused_wanted(self.fused_norms, inp) else None

    def _conv_norm_act(self, conv: nn.Module, norm: nn.Module, x: torch.Tensor, slope: float) -> torch.Tensor | None:
        return _call(norm_act, conv(x), *_norm_args(norm), slope)


class FusedUnetResBlock(_Fused, UnetResBlock):
    """``UnetResBlock`` whose norms, residual add and activations run fused (see the module docstring)."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        slope = self._fuse(inp)
        out = None if slope is None else self._conv_norm_act(self.conv1, self.norm1, inp, slope)
        if out is None:
            return super().forward(inp)
        out = self.conv2(out)
        residual = self.conv3(inp) if hasattr(self, "conv3") else inp
        r_norm = hasattr(self, "norm3")
        r_args = _norm_args(self.norm3) if r_norm else (None, None, 0.0)
        fused = _call(norm_add_act, out, *_norm_args(self.norm2), residual, *r_args, r_norm, slope)
        return super().forward(inp) if fused is None else fused


class FusedUnetBasicBlock(_Fused, UnetBasicBlock):
    """``UnetBasicBlock`` whose norms and activations run fused (see the module docstring)."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        slope = self._fuse(inp)
        out = None if slope is None else self._conv_norm_act(self.conv1, self.norm1, inp, slope)
        out = None if out is None else self._conv_norm_act(self.conv2, self.norm2, out, slope)
        return super().forward(inp) if out is None else out


def use_fused_norms(module: nn.Module, setting: bool | str = "auto") -> int:
    """Give every ``UnetResBlock`` / ``UnetBasicBlock`` inside ``module`` with plain instance norms and a
    LeakyReLU the fused forward (same modules, parameters and state dict); returns how many blocks.

    ``setting``: ``"auto"`` (CUDA, eager, Triton), True (always; uncompiled off CUDA), or False / ``"off"``
    (stock): the ``--fused_norms`` value can be passed as it is.
    """
    setting = False if setting == "off" else setting
    count = 0
    for block in module.modules():
        if type(block) in (UnetResBlock, FusedUnetResBlock) and _fusable(block):
            block.__class__ = FusedUnetResBlock
        elif type(block) in (UnetBasicBlock, FusedUnetBasicBlock) and _fusable(block):
            block.__class__ = FusedUnetBasicBlock
        else:
            continue
        block.fused_norms = setting
        count += 1
    return count

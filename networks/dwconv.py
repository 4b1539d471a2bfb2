"""Depthwise 3-D convolution with a selectable implementation.

Large depthwise kernels (21^3) are where REP3D and the 3D UX-Net variants spend their time, so every
such convolution in this package goes through :class:`DepthwiseConv3d`, whose ``impl`` picks how the
convolution is computed:

* ``"native"``: ``torch.nn.functional.conv3d`` with ``groups=C``.
* ``"fft"``: an exact FFT convolution (:func:`networks.fftconv.fft_depthwise_conv3d`), run in float32
  even under autocast; 117x faster than native for REP3D's eight 21^3 convs (fwd+bwd, H100).
* ``"auto"`` (default): :func:`networks.fftconv.fft_is_faster` per call, from a cost model calibrated
  on an H100 and on CPU: FFT for K >= 5 on CUDA at the REP3D / 3D UX-Net stage shapes, native for K=3.

All implementations compute the same function: stride 1, zero 'same' padding of ``K // 2``, odd ``K``.
Numbers: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import fftconv

DWCONV_IMPLS = ("auto", "native", "fft")

# Generation of parameter updates: bumped after every optimizer step of any optimizer in the process.
# The fused AdamW/SGD kernels (the trainer's default on CUDA) write the parameters in place without
# bumping their ``_version`` counter, so a cache keyed on the version alone would survive an update.
_param_generation = 0


def _bump_generation(*_args, **_kwargs) -> None:
    global _param_generation
    _param_generation += 1


register_optimizer_step_post_hook(_bump_generation)


def parameter_generation() -> int:
    """Number of optimizer steps taken so far in this process, by any optimizer (0 before the first)."""
    return _param_generation


def check_impl(impl: str) -> str:
    if impl not in DWCONV_IMPLS:
        raise ValueError(f"dwconv implementation must be one of {DWCONV_IMPLS}, got {impl!r}.")
    return impl


def native_depthwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference depthwise convolution: ``F.conv3d`` with ``groups = channels`` and 'same' padding.

    The input is made contiguous (NCDHW) first: a channels-last input (what a channels-first
    LayerNorm written with ``movedim`` returns) sends cuDNN to its NDHWC depthwise kernels, about 2x
    slower for large kernels on an H100 (benchmarks/RESULTS.md).
    """
    k = weight.shape[-3:]
    return F.conv3d(x.contiguous(), weight, bias, padding=(k[0] // 2, k[1] // 2, k[2] // 2), groups=x.shape[1])


def depthwise_conv3d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, impl: str = "auto"
) -> torch.Tensor:
    """Depthwise 'same' convolution of ``x`` (N, C, D, H, W) with ``weight`` (C, 1, K, K, K).

    Args:
        x: input volume batch.
        weight: one kernel per channel.
        bias: optional per-channel bias.
        impl: ``"native"``, ``"fft"`` or ``"auto"``.
    """
    if not _use_fft(impl, x, weight):
        return native_depthwise_conv3d(x, weight, bias)
    return fftconv.fft_depthwise_conv3d(x, weight, bias)


def _use_fft(impl: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``impl`` means the FFT path for this input and kernel (``auto`` asks the cost model)."""
    check_impl(impl)
    if impl != "auto":
        return impl == "fft"
    return fftconv.fft_is_faster(x, weight)


class DepthwiseConv3d(nn.Conv3d):
    """``nn.Conv3d(C, C, K, padding=K // 2, groups=C)`` whose forward goes through :func:`depthwise_conv3d`.

    It keeps ``nn.Conv3d``'s parameter names (``weight``, ``bias``) so that checkpoints of the reference
    releases load unchanged. ``forward(x, weight)`` convolves with a given kernel instead of
    ``self.weight``: that is how a modulated kernel ``W * M`` is applied without re-binding the parameter.

    Inference cache: when the module is in eval mode and the FFT path convolves with ``self.weight``
    with no gradient able to reach it (under ``torch.no_grad()``/``inference_mode()``, or with
    ``weight.requires_grad`` off), the kernel spectrum is computed once per input size and reused. It
    is dropped at every ``train()``/``eval()`` call and keyed on the weight's storage, version counter,
    device and dtype and on the process's optimizer-step count (:func:`parameter_generation`; fused
    optimizers update parameters without bumping their version), so loading weights, any optimizer
    step (fused or not), a train/eval switch or ``.to()`` invalidates it; it is never saved in the state
    dict nor copied by ``copy.deepcopy``. :meth:`clear_spectrum_cache` drops it.

    Args:
        channels: number of input and output channels.
        kernel_size: odd kernel size K.
        bias: whether the convolution has a per-channel bias. Defaults to False.
        impl: ``"auto"`` (default), ``"native"`` or ``"fft"``.
    """

    #: input sizes whose spectrum is kept per layer (sliding-window inference needs one; a last,
    #: smaller window or a second model input size may need another)
    spectrum_cache_size: int = 4

    def __init__(self, channels: int, kernel_size: int, bias: bool = False, impl: str = "auto") -> None:
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for a 'same' depthwise convolution, got {kernel_size}.")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)
        self.impl = check_impl(impl)
        self._spectrum_cache: dict = {}

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if weight is None and self._may_cache() and _use_fft(self.impl, x, self.weight):
            spectrum = self._cached_spectrum(x)
            return fftconv.fft_depthwise_conv3d(x, self.weight, self.bias, kernel_spectrum=spectrum)
        w = self.weight if weight is None else weight
        return depthwise_conv3d(x, w, self.bias, self.impl)

    def _may_cache(self) -> bool:
        # Only in eval mode and when no gradient can flow to the weight: the cached spectrum is
        # detached from it. In training mode the weights change between calls.
        return (
            not self.training
            and not (torch.is_grad_enabled() and self.weight.requires_grad)
            and not torch.compiler.is_compiling()
        )

    def _cached_spectrum(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        size = tuple(x.shape[2:])
        # Inference-mode tensors cannot be saved for a backward pass later: keep them apart.
        key = (
            w.data_ptr(),
            w._version,
            _param_generation,
            w.device,
            w.dtype,
            tuple(w.shape),
            torch.is_inference_mode_enabled(),
        )
        hit = self._spectrum_cache.get(size)
        if hit is not None and hit[0] == key:
            return hit[1]
        spectrum = fftconv.fft_kernel_spectrum(w, size)
        self._spectrum_cache.pop(size, None)
        while len(self._spectrum_cache) >= self.spectrum_cache_size:
            self._spectrum_cache.pop(next(iter(self._spectrum_cache)))
        self._spectrum_cache[size] = (key, spectrum)
        return spectrum

    def clear_spectrum_cache(self) -> None:
        """Drop the cached kernel spectra (they are rebuilt on the next inference call)."""
        self._spectrum_cache = {}

    def train(self, mode: bool = True):  # noqa: D102 - nn.Module's
        # Entering or leaving training mode brackets every weight update of a training loop: a spectrum
        # built before it may describe weights that no longer exist.
        self.clear_spectrum_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001 - nn.Module's signature
        self.clear_spectrum_cache()  # a device/dtype move would leave the old spectra behind
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # deepcopy and pickle: the cache is derived data
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_spectrum_cache"] = {}
        return state

    def extra_repr(self) -> str:
        return super().extra_repr() + f", impl={self.impl}"


def set_dwconv_impl(model: nn.Module, impl: str) -> nn.Module:
    """Set the implementation of every :class:`DepthwiseConv3d` in ``model`` (in place); returns ``model``."""
    check_impl(impl)
    for m in model.modules():
        if isinstance(m, DepthwiseConv3d):
            m.impl = impl
    return model

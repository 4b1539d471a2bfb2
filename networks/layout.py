"""Memory-layout and kernel choices: speed only, no architecture.

Nothing here changes what a network computes or its state dict; it changes how tensors are laid out
in memory so that cuDNN's 3-D convolutions and the instance norms of MONAI's decoder blocks run on
channels-last (NDHWC) tensors without layout copies between them, and which kernels run them
(benchmarks/RESULTS.md):

* :func:`memory_format_of`, :func:`to_channels_last_3d`: inspect and convert layouts;
* :class:`ChannelsLastInstanceNorm3d` and :func:`use_channels_last_instance_norms`: an instance norm
  that keeps a channels-last input channels-last (same parameters and keys as ``nn.InstanceNorm3d``);
* :func:`decoder_uses_channels_last`: what a network's ``decoder_channels_last`` setting means for one
  input (``"auto"``: on CUDA in eager mode);
* :data:`instance_norm_impl`, :func:`triton_kernels`: PyTorch's kernels or the Triton ones of
  :mod:`networks.triton_norm` (the default where Triton runs);
* :class:`FusedUnetResBlock`, :class:`FusedUnetBasicBlock` and :func:`use_fused_block_tails`: MONAI's
  decoder blocks with their "norm (+ add) + LeakyReLU" tails as fused Triton kernels on CUDA.
"""

from __future__ import annotations

import importlib
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock
from torch.autograd.function import once_differentiable

__all__ = [
    "ChannelsLastInstanceNorm3d",
    "FusedUnetBasicBlock",
    "FusedUnetResBlock",
    "decoder_uses_channels_last",
    "memory_format_of",
    "to_channels_last_3d",
    "use_channels_last_instance_norms",
    "use_fused_block_tails",
]


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last_3d`` for a 5-D channels-last tensor (with more than one channel), else contiguous."""
    if x.ndim == 5 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def to_channels_last_3d(x: torch.Tensor) -> torch.Tensor:
    """``x`` with channels-last (NDHWC) strides, also for a single channel, where ``x.contiguous(memory_format=...)``
    keeps NCDHW strides and the convolutions that follow would choose NCDHW."""
    out = torch.empty_like(x, memory_format=torch.channels_last_3d)
    return out.copy_(x)


#: Which kernels the decoder's norms (and the encoders' channels-first LayerNorms) run on CUDA tensors
#: (speed only; the same function):
#:
#: * ``"auto"`` (the default): the Triton kernels of :mod:`networks.triton_norm` where Triton loads and runs
#:   on the GPU (checked once, on first use; otherwise a warning and PyTorch's kernels as below). On the
#:   H200 they took an eager REP3D training step from 62.9 to 51.1 ms and its deploy inference of a
#:   256 x 256 x 160 volume from 0.774 to 0.544 s (benchmarks/RESULTS.md, issue 25, session 4): the
#:   decoder blocks' "norm (+ add) + LeakyReLU" tails become one statistics pass and one elementwise pass
#:   each way, the encoders' LayerNorms one pass;
#: * ``"triton"``: the same, and an error where Triton does not run;
#: * ``"pytorch"``: PyTorch's kernels, with the statistics chosen as ``"auto"`` does without Triton (below);
#: * ``"batch_norm"``: PyTorch's channels-last batch-norm kernels one sample at a time (Welford statistics);
#: * ``"sums"``: the same with the statistics from float32 sums of x and x^2 over the whole batch,
#:   ``var = E[x^2] - mean^2``, which loses about 1e-7 (mean / std)^2 of 1/std to cancellation (1.3e-4 at
#:   |mean| / std = 30, measured).
#:
#: Without Triton, ``"auto"`` takes ``"sums"`` for bf16 / fp16 activations (whose own rounding, 4e-3 in
#: bf16, is far larger) of at least :data:`SUMS_MIN_VOXELS` voxels a sample, where it is the faster of the
#: two (H200, 4 x 48 x 96^3: forward 1.06 against 1.37 ms), ``"batch_norm"`` otherwise.
instance_norm_impl = "auto"
INSTANCE_NORM_IMPLS = ("auto", "triton", "pytorch", "batch_norm", "sums")
SUMS_MIN_VOXELS = 2**18
_triton: dict = {}  # "module": the loaded networks.triton_norm; "error": why it did not load under "auto"


def _check_impl() -> None:
    if instance_norm_impl not in INSTANCE_NORM_IMPLS:
        raise ValueError(f"instance_norm_impl must be one of {', '.join(INSTANCE_NORM_IMPLS)}, got {instance_norm_impl!r}")


def stats_mode(x: torch.Tensor) -> str:
    """How the PyTorch-kernel path computes the statistics of ``x``: ``"sums"`` or ``"batch_norm"``."""
    _check_impl()
    if instance_norm_impl in ("auto", "triton", "pytorch"):
        reduced = x.dtype in (torch.bfloat16, torch.float16)
        return "sums" if reduced and x[0, 0].numel() >= SUMS_MIN_VOXELS else "batch_norm"
    return instance_norm_impl


def _load_triton(device: torch.device):
    # by name: a network's sources stay free of Triton (networks/triton_norm.py's docstring)
    module = importlib.import_module(".triton_norm", __package__)
    with torch.enable_grad():  # (the first use may be inside torch.no_grad(): inference)
        probe = [torch.randn(2, 8, 4, 5, 6, device=device).contiguous(memory_format=torch.channels_last_3d).requires_grad_() for _ in range(3)]
        for kw in ({}, {"slope": 0.01}, {"residual": probe[2], "slope": 0.01}, {"b": probe[1], "slope": 0.01}):
            module.fused_norm(probe[0], **kw).sum().backward()
        w, b = torch.ones(8, device=device, requires_grad=True), torch.zeros(8, device=device, requires_grad=True)
        module.layer_norm_channels_first(probe[0].detach().contiguous().requires_grad_(), w, b, 1e-6, torch.float32).sum().backward()
    return module


def triton_kernels(x: torch.Tensor):
    """:mod:`networks.triton_norm` where :data:`instance_norm_impl` asks for Triton's kernels and they run,
    else None. The first call loads the module and runs each of its kernels forward and backward on small
    tensors on ``x``'s device, so that a Triton that cannot compile for this GPU is found there: under
    ``"auto"`` with one warning (PyTorch's kernels from then on), under ``"triton"`` as its own error."""
    _check_impl()
    if instance_norm_impl not in ("auto", "triton"):
        return None
    if "module" not in _triton:
        if "error" in _triton and instance_norm_impl == "auto":
            return None
        try:
            _triton["module"] = _load_triton(x.device)
        except Exception as err:  # noqa: BLE001 - any failure to import or compile: PyTorch's kernels
            if instance_norm_impl == "triton":
                raise
            _triton["error"] = err
            # sources shipped without the Triton module (a MONAI bundle's copy of networks/) run PyTorch's
            # kernels by design: no warning there
            if not (isinstance(err, ModuleNotFoundError) and (err.name or "").endswith("triton_norm")):
                warnings.warn(f"Triton's norm kernels do not run here ({type(err).__name__}: {err}); using PyTorch's (slower) kernels", stacklevel=2)
            return None
    return _triton["module"]


def triton_kernels_for(x: torch.Tensor):
    """:func:`triton_kernels` for an input ``x`` of a norm or block, or None where PyTorch's path runs:
    off CUDA, for float64 tensors (the Triton kernels compute in float32), and inside torch.compile /
    TorchScript / ONNX export."""
    if not x.is_cuda or x.dtype == torch.float64:
        return None
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return None
    return triton_kernels(x)


def _stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and 1/sqrt(var + eps) of a channels-last (N, C, D, H, W) tensor, float32, (N, C)."""
    n, c = x.shape[:2]
    if stats_mode(x) == "batch_norm":
        x4 = x.view(n, c, -1, x.shape[-1])
        stats = [torch.batch_norm_stats(x4[i : i + 1], eps) for i in range(n)]
        return torch.stack([m for m, _ in stats]), torch.stack([s for _, s in stats])
    v = x.permute(0, 2, 3, 4, 1).reshape(n, -1, c)  # a view of the NDHWC memory: (N, voxels, C)
    count = v.shape[1]
    mean = v.sum(1, dtype=torch.float32) / count
    root = torch.linalg.vector_norm(v, dim=1, dtype=torch.float32)
    var = (root * root / count - mean * mean).clamp_min_(0)
    return mean, torch.rsqrt(var + eps)


class _ChannelsLastInstanceNormCUDA(torch.autograd.Function):
    """Instance norm of a channels-last (NDHWC) CUDA tensor with PyTorch's channels-last batch-norm kernels
    (the SyncBatchNorm building blocks), one sample at a time, each sample seen as a 4-D (1, C, D*H, W)
    channels-last tensor. Output and input gradient are written into fresh NDHWC tensors: no slices or
    concatenations enter the autograd graph (those cost a full-size copy per sample in the backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n, c, d, h, w = x.shape
        x4 = x.view(n, c, d * h, w)
        out = torch.empty_like(x, memory_format=torch.channels_last_3d)
        out4 = out.view(n, c, d * h, w)
        mean, invstd = _stats(x, eps)
        for i in range(n):
            torch.batch_norm_elemt(x4[i : i + 1], weight, bias, mean[i], invstd[i], eps, out=out4[i : i + 1])
        ctx.save_for_backward(x, weight, mean, invstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        n, c, d, h, w = x.shape
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x4 = x.view(n, c, d * h, w)
        g4 = grad_out.contiguous(memory_format=torch.channels_last_3d).view(n, c, d * h, w)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last_3d) if need_x else None
        grad_w = grad_b = None
        count = torch.full((1,), d * h * w, dtype=torch.int32, device=x.device)
        for i in range(n):
            sum_dy, sum_dy_xmu, gw, gb = torch.batch_norm_backward_reduce(
                g4[i : i + 1], x4[i : i + 1], mean[i], invstd[i], weight, need_x, need_w, need_b
            )
            if need_w:
                grad_w = gw if grad_w is None else grad_w + gw
            if need_b:
                grad_b = gb if grad_b is None else grad_b + gb
            if need_x:
                torch.ops.aten.batch_norm_backward_elemt.out(  # (torch.batch_norm_backward_elemt has no out=)
                    g4[i : i + 1], x4[i : i + 1], mean[i], invstd[i], weight, sum_dy, sum_dy_xmu, count,
                    out=grad_x.view(n, c, d * h, w)[i : i + 1],
                )
        return grad_x, grad_w, grad_b, None


class ChannelsLastInstanceNorm3d(nn.Module):
    """Instance normalisation that keeps a channels-last (NDHWC) input channels-last.

    Computes what ``nn.InstanceNorm3d`` (no running statistics) computes, with the same parameters and
    state-dict keys. ``F.instance_norm`` copies its input to NCDHW first; here each sample is normalised
    with batch-norm kernels in training form (statistics over that sample's voxels, per channel), which
    exist for channels-last tensors, so a decoder run in ``channels_last_3d`` needs no layout copies around
    its norms. Contiguous (NCDHW) inputs take ``F.instance_norm`` unchanged. (On the CPU the channels-last
    batch norm is less accurate in float32 when |mean| >> std, one reason the decoder uses this layout
    on CUDA and for bf16 on the CPU only by default.)

    Args:
        num_features: channels C.
        eps: added to the variance. Defaults to 1e-5 (PyTorch's and MONAI's value).
        affine: learn a per-channel scale and shift. Defaults to False (MONAI's "instance" norm).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = False) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    @classmethod
    def from_instance_norm(cls, norm: nn.InstanceNorm3d) -> "ChannelsLastInstanceNorm3d":
        new = cls(norm.num_features, norm.eps, affine=False)
        if norm.affine:  # share the parameters themselves (same keys, same tensors)
            new.weight, new.bias = norm.weight, norm.bias
        return new

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if memory_format_of(x) != torch.channels_last_3d:
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        if x.is_cuda and not torch.compiler.is_compiling():
            kernels = triton_kernels_for(x)
            if kernels is not None:
                return kernels.TritonInstanceNorm.apply(x, self.weight, self.bias, self.eps)
            return _ChannelsLastInstanceNormCUDA.apply(x, self.weight, self.bias, self.eps)
        # Elsewhere (CPU, or traced by torch.compile): the same with functional ops, which autograd and
        # inductor understand; the batch statistics of one sample are its instance statistics.
        n, c, d, h, w = x.shape
        if n == 1:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        # The 4-D view is taken of the whole batch, then sliced, so that every sample keeps its batch
        # stride (a size-1 view gets an arbitrary one, which the CPU batch-norm backward misreads).
        x4 = x.view(n, c, d * h, w)
        outs = [F.batch_norm(x4[i : i + 1], None, None, self.weight, self.bias, True, 0.0, self.eps) for i in range(n)]
        return torch.cat(outs).view(n, c, d, h, w)


def use_channels_last_instance_norms(module: nn.Module) -> int:
    """Replace every ``nn.InstanceNorm3d`` without running statistics inside ``module`` by a
    :class:`ChannelsLastInstanceNorm3d` (same result, same state dict); returns how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.InstanceNorm3d) and not child.track_running_stats:
            setattr(module, name, ChannelsLastInstanceNorm3d.from_instance_norm(child))
            count += 1
        else:
            count += use_channels_last_instance_norms(child)
    return count


def decoder_uses_channels_last(setting: bool | str, x: torch.Tensor) -> bool:
    """Whether a decoder with ``decoder_channels_last = setting`` runs channels-last for input ``x``.

    Args:
        setting: True, False or ``"auto"``: channels-last in eager mode on CUDA, and on the CPU under
            bf16 autocast (or for a bf16 input). cuDNN's 3-D convolutions run natively in NDHWC (in NCDHW
            they transpose each input and output); oneDNN's bf16 ones gain 27% from it on the CPU (REP3D
            per 96^3 window, 2 cores: 2.45 -> 1.79 s) while its float32 ones lose a little (5.4 -> 5.6 s);
            under torch.compile inductor does better with NCDHW (benchmarks/RESULTS.md).
        x: the network input.
    """
    if setting == "auto":
        if torch.compiler.is_compiling():
            return False
        if x.is_cuda:
            return True
        cpu_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        return x.device.type == "cpu" and (cpu_bf16 or x.dtype == torch.bfloat16)
    if not isinstance(setting, bool):
        raise ValueError(f"decoder_channels_last must be True, False or 'auto', got {setting!r}.")
    return setting


def _fused_kernels(inp: torch.Tensor):
    """The Triton module for a block's input (:func:`triton_kernels_for`), on channels-last inputs only."""
    if not inp.is_contiguous(memory_format=torch.channels_last_3d):
        return None
    return triton_kernels_for(inp)


def _single_channel_conv(block_conv: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``block_conv(x)`` for a single-channel ``x`` (the image into ``encoder1``) as one gather of each
    voxel's k^3 neighbourhood and one matrix product, or None where ``block_conv`` is not a plain
    stride-1 'same' ``Conv3d`` (a MONAI ``Convolution`` holding only its ``conv``). cuDNN has no
    tensor-core kernel for one input channel and runs a generic one (1.4 ms of a 4-window deploy batch of
    REP3D on the H200; zero-padding the input to 8 channels was slower still). Returns channels-last."""
    conv = getattr(block_conv, "conv", None)
    if list(block_conv.children()) != [conv] or not isinstance(conv, nn.Conv3d) or x.shape[1] != 1 or conv.in_channels != 1:
        return None
    k = conv.kernel_size
    if conv.groups != 1 or conv.padding_mode != "zeros" or set(conv.stride) | set(conv.dilation) != {1} or tuple(conv.padding) != tuple(i // 2 for i in k) or min(k) == 1 or any(i % 2 == 0 for i in k):
        return None
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    n, _, d, h, w = x.shape
    p = conv.padding
    xp = F.pad(x.to(dtype), (p[2], p[2], p[1], p[1], p[0], p[0])).contiguous()
    st = xp.stride()
    cols = xp.as_strided((n, d, h, w, *k), (st[0], st[2], st[3], st[4], st[2], st[3], st[4])).reshape(n * d * h * w, -1)
    weight = conv.weight.to(dtype).reshape(conv.out_channels, -1)
    y = cols @ weight.t() if conv.bias is None else torch.addmm(conv.bias.to(dtype), cols, weight.t())
    return y.view(n, d, h, w, conv.out_channels).permute(0, 4, 1, 2, 3)


def _first_conv(block: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    out = _single_channel_conv(block.conv1, inp) if inp.shape[1] == 1 else None
    return block.conv1(inp) if out is None else out


def _norm_args(norm: "ChannelsLastInstanceNorm3d") -> dict:
    return {"weight_a": norm.weight, "bias_a": norm.bias, "eps": norm.eps}


def _first_half(block: nn.Module, kernels, inp: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``conv2(LeakyReLU(norm1(conv1(inp))))`` of a MONAI block, the norm and activation fused; and the slope."""
    slope = block.lrelu.negative_slope
    return block.conv2(kernels.fused_norm(_first_conv(block, inp), **_norm_args(block.norm1), slope=slope)), slope


class FusedUnetResBlock(UnetResBlock):
    """MONAI's ``UnetResBlock`` whose "norm -> LeakyReLU" and "norm (+ the residual's norm) -> add ->
    LeakyReLU" tails run as the fused Triton kernels of :mod:`networks.triton_norm` where
    :func:`_fused_kernels` allows, else MONAI's forward. Same modules, parameters and state dict."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        kernels = _fused_kernels(inp)
        if kernels is None:
            return super().forward(inp)
        out, slope = _first_half(self, kernels, inp)
        if hasattr(self, "conv3"):
            norm3 = self.norm3
            return kernels.fused_norm(out, **_norm_args(self.norm2), b=self.conv3(inp), weight_b=norm3.weight, bias_b=norm3.bias, slope=slope)
        return kernels.fused_norm(out, **_norm_args(self.norm2), residual=inp, slope=slope)


class FusedUnetBasicBlock(UnetBasicBlock):
    """MONAI's ``UnetBasicBlock`` with its two "norm -> LeakyReLU" tails fused, as :class:`FusedUnetResBlock`."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        kernels = _fused_kernels(inp)
        if kernels is None:
            return super().forward(inp)
        out, slope = _first_half(self, kernels, inp)
        return kernels.fused_norm(out, **_norm_args(self.norm2), slope=slope)


def _fusable(block: nn.Module) -> bool:
    norms = [getattr(block, name) for name in ("norm1", "norm2", "norm3") if hasattr(block, name)]
    if not isinstance(block.lrelu, nn.LeakyReLU) or not all(isinstance(n, ChannelsLastInstanceNorm3d) for n in norms):
        return False
    # the residual's norm is fused with norm2: one eps, both affine or neither
    return len(norms) < 3 or (norms[1].eps == norms[2].eps and (norms[1].weight is None) == (norms[2].weight is None))


def use_fused_block_tails(module: nn.Module) -> int:
    """Give every MONAI ``UnetResBlock`` / ``UnetBasicBlock`` inside ``module`` whose norms are
    :class:`ChannelsLastInstanceNorm3d` and whose activation is a LeakyReLU the fused forward of
    :class:`FusedUnetResBlock` / :class:`FusedUnetBasicBlock` (its class is swapped for the subclass: same
    modules, parameters and state dict); returns how many blocks."""
    count = 0
    for block in module.modules():
        for stock, fused in ((UnetResBlock, FusedUnetResBlock), (UnetBasicBlock, FusedUnetBasicBlock)):
            if type(block) is stock and _fusable(block):
                block.__class__ = fused
                count += 1
    return count

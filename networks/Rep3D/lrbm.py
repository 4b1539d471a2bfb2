"""LRBM: the learnable spatial modulation of a large depthwise kernel (Rep3D, ICML 2026).

    P[k]  = beta / (||k - c||_2 + beta)      distance-decay prior, c the kernel centre
    M     = P + f_theta(P)                    f_theta: the LRBM generator
    W_eff = W * M                             element-wise; the convolution uses W_eff

With M fixed, a gradient step of lr on W moves W_eff by -lr * M^2 * dL/dW_eff: the mask is a
spatially varying learning rate, faster at the kernel centre. Folding for deployment is
``equivalent_kernel`` (pure maths) followed by a module swap in the owning block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks import check_kernel_size, check_positive_int
from ..dwconv import DepthwiseConv3d, check_impl

MODULATIONS = ("lrbm", "fixed", "none")


def check_modulation(modulation: str) -> str:
    if modulation not in MODULATIONS:
        raise ValueError(
            f"modulation must be one of {MODULATIONS} ('lrbm': M = P + f(P), the paper's default; "
            f"'fixed': M = P; 'none': plain large kernel), got {modulation!r}."
        )
    return modulation


@dataclass(frozen=True)
class LRBMConfig:
    """How the large depthwise kernel of every block is built and modulated: one object, made once by the
    network constructor and shared by all its blocks (REP3D, and 3D UX-Net with the paper's LRBM ablation).

    Frozen, so that no block can change what the others were built with; use ``dataclasses.replace`` for
    a variant. The defaults are REP3D's (the paper's); 3D UX-Net uses ``kernel_size=7, modulation="none"``.
    Every field is checked here, so a bad value fails once, before any block is built.

    Args:
        kernel_size: odd depthwise kernel size K. Defaults to 21.
        modulation: ``"lrbm"`` (M = P + f(P), default), ``"fixed"`` (M = P) or ``"none"`` (M = 1, a plain
            large kernel).
        beta: decay scale of the distance prior P. Defaults to 1.
        generator_kernel_size: kernel size of the LRBM generator's convolutions (odd). Defaults to 7.
        generator_depth: number of generator convolutions. Defaults to 2.
        deploy: build the folded inference form only (no mask, no generator, no prior), to load folded
            weights into. Defaults to False.
        dwconv: how the depthwise convolution is computed, ``"auto"`` (default), ``"native"`` or ``"fft"``
            (same result; see :mod:`networks.dwconv`). This is the build-time choice:
            :func:`networks.set_dwconv_impl` switches built modules later.

    Example::

        cfg = LRBMConfig(kernel_size=21, modulation="fixed")
        block = Rep3DBlock(48, cfg)
    """

    kernel_size: int = 21
    modulation: str = "lrbm"
    beta: float = 1.0
    generator_kernel_size: int = 7
    generator_depth: int = 2
    deploy: bool = False
    dwconv: str = "auto"

    def __post_init__(self) -> None:
        check_kernel_size(self.kernel_size)
        check_modulation(self.modulation)
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta > 0:
            raise ValueError(f"beta must be a positive number, got {self.beta!r}; the paper uses 1.")
        check_kernel_size(self.generator_kernel_size, "generator_kernel_size")
        check_positive_int("generator_depth", self.generator_depth)
        if not isinstance(self.deploy, bool):
            raise ValueError(f"deploy must be True or False, got {self.deploy!r}.")
        check_impl(self.dwconv)

    @property
    def built_modulation(self) -> str:
        """The modulation the kernels are built with: ``"none"`` for a deploy build, else ``modulation``."""
        return "none" if self.deploy else self.modulation


def compute_distance_prior(
    kernel_size: int,
    beta: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reciprocal distance-decay prior ``P[k] = beta / (||k - c||_2 + beta)`` on a K x K x K grid.

    Args:
        kernel_size: odd kernel size K.
        beta: decay scale; larger values flatten the prior. Defaults to 1 (the paper's value).
        device: device of the returned tensor.
        dtype: dtype of the returned tensor.

    Returns:
        A (K, K, K) tensor, 1 at the centre, decreasing with Euclidean distance from it.
    """
    check_kernel_size(kernel_size)
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta!r}.")
    offsets = torch.arange(kernel_size, device=device, dtype=torch.float64) - kernel_size // 2
    dz, dy, dx = torch.meshgrid(offsets, offsets, offsets, indexing="ij")
    dist = torch.sqrt(dz**2 + dy**2 + dx**2)
    return (beta / (dist + beta)).to(dtype)


class MapLayerNorm(nn.Module):
    """LayerNorm over a whole single-channel K^3 map, with one scalar gain and bias.

    Normalising over the map (not over the single channel, which would make the output equal to the
    bias whatever the input) keeps the generator's output a function of its input. The scalar affine
    keeps the parameter names and shapes of the reference release (``weight``/``bias`` of shape [1]).
    """

    def __init__(self, init_weight: float = 1.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((1,), float(init_weight)))
        self.bias = nn.Parameter(torch.zeros(1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-3:], eps=self.eps) * self.weight + self.bias


class LRBMGenerator(nn.Module):
    """The LRBM generator f_theta: conv -> LN -> (sigmoid -> conv -> LN) x (depth - 1) on the prior map.

    Every convolution is single-channel with 'same' padding, so the output keeps the K^3 size. One
    mask serves all channels of a block: a few hundred parameters per convolution.

    Args:
        kernel_size: generator convolution kernel size. Defaults to 7 (the paper's value).
        depth: number of convolutions. Defaults to 2 (the paper's value).
        init_scale: initial gain of the last LayerNorm; see the note below. Defaults to 1e-2.

    Initialisation: the last LayerNorm's gain starts at ``init_scale`` (small) and its bias at 0, so
    f_theta(P) is about ``init_scale`` in magnitude and M starts near the prior P: training begins from
    the Fixed-Prior model and the generator learns a correction. The gain is small rather than 0
    because a zero gain would give every earlier generator parameter a zero gradient at the start.
    """

    def __init__(self, kernel_size: int = 7, depth: int = 2, init_scale: float = 1e-2) -> None:
        super().__init__()
        check_kernel_size(kernel_size, "generator_kernel_size")
        check_positive_int("generator_depth", depth)
        self.depth = depth
        # Names follow the reference release (prior_conv, norm_w, prior_conv2, norm_w2, ...) so that
        # its generator weights map onto ours.
        for i in range(1, depth + 1):
            suffix = "" if i == 1 else str(i)
            # No bias: the LayerNorm right after subtracts the map's mean, so a bias would get no gradient.
            self.add_module(f"prior_conv{suffix}", nn.Conv3d(1, 1, kernel_size, padding=kernel_size // 2, bias=False))
            self.add_module(f"norm_w{suffix}", MapLayerNorm(init_weight=init_scale if i == depth else 1.0))

    def forward(self, prior: torch.Tensor) -> torch.Tensor:
        """Map a (K, K, K) prior to the (K, K, K) correction f_theta(prior)."""
        x = prior[None, None]
        for i in range(1, self.depth + 1):
            suffix = "" if i == 1 else str(i)
            if i > 1:
                x = torch.sigmoid(x)
            x = getattr(self, f"norm_w{suffix}")(getattr(self, f"prior_conv{suffix}")(x))
        return x[0, 0]


class KernelModulation(nn.Module):
    """Produces the modulation mask M of one block's K^3 depthwise kernel.

    Args:
        config: the block's settings; uses ``kernel_size``, ``modulation`` (``"lrbm"``: M = P + f(P), or
            ``"fixed"``: M = P), ``beta``, ``generator_kernel_size`` and ``generator_depth``.
    """

    def __init__(self, config: LRBMConfig) -> None:
        super().__init__()
        if config.modulation == "none":
            raise ValueError("KernelModulation needs modulation 'lrbm' or 'fixed'; for 'none' build no modulation.")
        self.modulation = config.modulation
        # Persistent although it is a function of K and beta: its presence in a state dict marks a
        # training (unfolded) checkpoint, whose weight is W rather than W * M (see networks.load_network_weights).
        self.register_buffer("prior", compute_distance_prior(config.kernel_size, config.beta))
        self.generator = (
            LRBMGenerator(config.generator_kernel_size, config.generator_depth) if config.modulation == "lrbm" else None
        )

    #: M computed for this forward pass by :func:`batched_masks` (set and cleared by :func:`precomputed_masks`).
    precomputed: torch.Tensor | None = None

    def forward(self) -> torch.Tensor:
        """Return M, a (K, K, K) float32 tensor."""
        if self.generator is None:
            return self.prior
        if self.precomputed is not None:
            return self.precomputed
        # The mask is tiny and scales every kernel element: compute it in float32 even under autocast.
        with torch.autocast(device_type=self.prior.device.type, enabled=False):
            prior = self.prior if self.prior.dtype == torch.float64 else self.prior.float()
            return prior + self.generator(prior)

    def extra_repr(self) -> str:
        return f"modulation={self.modulation}, kernel_size={self.prior.shape[0]}"


def _generator_signature(m: KernelModulation) -> tuple:
    g = m.generator
    return (tuple(m.prior.shape), m.prior.device, g.depth, g.prior_conv.kernel_size, g.norm_w.eps)


def batched_masks(modulations: Sequence[KernelModulation]) -> list[torch.Tensor]:
    """M = P + f(P) of several blocks' LRBM generators in one pass: their single-channel convolutions
    become one grouped convolution (one group per block), their map LayerNorms one ``layer_norm`` over
    the stacked maps. The same function as calling each module (up to float32 rounding), with a handful
    of kernel launches instead of a handful per block; gradients reach every generator.

    Args:
        modulations: modules with generators of one signature (prior size, generator kernel and depth).
    """
    if not modulations:
        return []
    first = modulations[0]
    if any(m.generator is None or _generator_signature(m) != _generator_signature(first) for m in modulations):
        raise ValueError("batched_masks needs LRBM generators of one signature (prior size, generator kernel and depth)")
    n, depth = len(modulations), first.generator.depth
    with torch.autocast(device_type=first.prior.device.type, enabled=False):
        prior = torch.stack([m.prior.float() for m in modulations])  # (n, K, K, K)
        x = prior[None]  # (1, n, K, K, K): one channel per block
        for i in range(1, depth + 1):
            suffix = "" if i == 1 else str(i)
            if i > 1:
                x = torch.sigmoid(x)
            convs = [getattr(m.generator, f"prior_conv{suffix}") for m in modulations]
            norms = [getattr(m.generator, f"norm_w{suffix}") for m in modulations]
            weight = torch.cat([c.weight.float() for c in convs])  # (n, 1, g, g, g)
            x = F.conv3d(x, weight, padding=convs[0].padding, groups=n)
            x = F.layer_norm(x, x.shape[-3:], eps=norms[0].eps)
            gain = torch.cat([nm.weight.float() for nm in norms]).view(1, n, 1, 1, 1)
            bias = torch.cat([nm.bias.float() for nm in norms]).view(1, n, 1, 1, 1)
            x = x * gain + bias
        masks = prior + x[0]
    return list(masks.unbind(0))


@contextlib.contextmanager
def precomputed_masks(module: nn.Module) -> Iterator[None]:
    """For the forward pass run inside: every LRBM mask of ``module`` computed at once by
    :func:`batched_masks` (per generator signature), then used by its block; cleared on exit.

    Eager mode only (inside ``torch.compile`` each block computes its own mask, which the compiler
    fuses); nothing to do for folded (deployed) or fixed-prior models.
    """
    if torch.compiler.is_compiling():
        yield
        return
    groups: dict[tuple, list[KernelModulation]] = {}
    for m in module.modules():
        if isinstance(m, KernelModulation) and m.generator is not None:
            groups.setdefault(_generator_signature(m), []).append(m)
    batched = [mods for mods in groups.values() if len(mods) > 1]
    try:
        for mods in batched:
            for m, mask in zip(mods, batched_masks(mods)):
                m.precomputed = mask
        yield
    finally:
        for mods in batched:
            for m in mods:
                m.precomputed = None


def modulated_kernel(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """W_eff = W * M, with M (K, K, K) broadcast over the (C, 1, K, K, K) depthwise weight."""
    if mask is None:
        return weight
    return weight * mask.to(weight.dtype)


class ModulatedDepthwiseConv3d(DepthwiseConv3d):
    """A depthwise 'same' convolution whose kernel is modulated by an LRBM mask during training.

    In training and evaluation before folding, the convolution uses ``W_eff = W * M`` with M computed
    in that forward pass, so both W and the generator get gradients; ``self.weight`` is never re-bound.
    :meth:`reparameterize` folds W_eff into ``self.weight`` and drops the generator and prior; the module
    then behaves exactly like a plain :class:`DepthwiseConv3d` (the deployed form).

    Args:
        channels: number of channels C.
        config: kernel size, modulation (none when ``config.deploy``), LRBM settings and implementation
            (``config.dwconv``); kept as ``self.config``.
        bias: whether the convolution has a bias (the mask never touches it). Defaults to False.
    """

    def __init__(self, channels: int, config: LRBMConfig, bias: bool = False) -> None:
        if not isinstance(config, LRBMConfig):
            raise TypeError(f"config must be an LRBMConfig, got {type(config).__name__}.")
        super().__init__(channels, config.kernel_size, bias=bias, impl=config.dwconv)
        self.config = config
        self.modulation = None if config.built_modulation == "none" else KernelModulation(config)

    @property
    def is_folded(self) -> bool:
        return self.modulation is None

    def equivalent_kernel(self) -> torch.Tensor:
        """W_eff = W * M for the current parameters (differentiable; mutates nothing)."""
        return modulated_kernel(self.weight, None if self.modulation is None else self.modulation())

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if weight is None and self.modulation is not None:
            weight = self.equivalent_kernel()
        return super().forward(x, weight)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the mask into the weight, in place, and drop the generator and prior. Idempotent."""
        if self.modulation is None:
            return
        folded = self.equivalent_kernel().detach().to(self.weight.dtype)
        self.weight.copy_(folded)
        del self.modulation
        self.modulation = None

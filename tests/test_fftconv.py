"""The exact FFT depthwise convolution: outputs and gradients against a float64 native convolution,
kernel cropping, autocast, the LRBM mask path, the inference spectrum cache and the dispatch."""

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY
from networks import build_network, dwconv, fftconv
from networks.dwconv import DepthwiseConv3d, depthwise_conv3d, set_dwconv_impl
from networks.fftconv import (
    fft_depthwise_conv3d,
    fft_is_faster,
    fft_kernel_spectrum,
    fft_plan,
    next_fast_len,
)
from networks.Rep3D import LRBMConfig, ModulatedDepthwiseConv3d

TOL = 1e-5  # relative (norm) error allowed against float64


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def reference(x, w, b, grad):
    """float64 native convolution and its gradients."""
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    k = w.shape[2:]
    y = F.conv3d(xd, wd, bd, padding=(k[0] // 2, k[1] // 2, k[2] // 2), groups=x.shape[1])
    inputs = (xd, wd) if bd is None else (xd, wd, bd)
    return (y, *torch.autograd.grad(y, inputs, grad.double()))


# Stage shapes of a 96^3 crop (48, 24, 12, 6 voxels, 21^3 kernel) scaled down, plus odd/even sizes,
# anisotropic volumes, and kernels wider than the volume (K > 2N - 1: taps must be cropped).
CASES = [
    # (batch, channels, spatial size, kernel, bias)
    (2, 4, (12, 12, 12), 5, False),
    (2, 4, (11, 11, 11), 7, True),
    (1, 4, (6, 6, 6), 21, False),  # 21 > 2*6-1: the REP3D last stage
    (2, 3, (3, 3, 3), 21, True),  # 21 > 2*3-1, odd
    (3, 2, (7, 4, 9), 5, True),  # anisotropic, odd and even, batch 3
    (2, 4, (6, 6, 6), 11, False),  # 11 == 2*6-1: exactly reachable, no crop
    (1, 2, (1, 1, 1), 3, False),  # a single voxel: only the centre tap matters
    (2, 4, (10, 12, 8), 9, True),
]


@pytest.mark.parametrize("batch,channels,size,k,bias", CASES)
def test_matches_float64_native(batch, channels, size, k, bias):
    g = torch.Generator().manual_seed(hash((batch, channels, size, k)) % 2**31)
    x = torch.randn(batch, channels, *size, generator=g, requires_grad=True)
    w = torch.randn(channels, 1, k, k, k, generator=g, requires_grad=True)
    b = torch.randn(channels, generator=g, requires_grad=True) if bias else None
    y = fft_depthwise_conv3d(x, w, b)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.is_contiguous()
    grad = torch.randn(y.shape, generator=g)
    inputs = (x, w) if b is None else (x, w, b)
    got = torch.autograd.grad(y, inputs, grad)
    ref = reference(x, w, b, grad)
    for name, a, r in zip(("output", "grad_x", "grad_w", "grad_b"), (y, *got), ref):
        assert rel_err(a, r) < TOL, f"{name}: relative error {rel_err(a, r):.2e}"


def test_cropped_taps_get_zero_gradient():
    # Taps farther than N - 1 from the centre never touch the volume: their gradient is exactly 0.
    x = torch.randn(2, 3, 4, 4, 4)
    w = torch.randn(3, 1, 21, 21, 21, requires_grad=True)
    fft_depthwise_conv3d(x, w).square().sum().backward()
    assert fft_plan((4, 4, 4), (21, 21, 21)).kernel_crop == (7, 7, 7)
    outer = w.grad.clone()
    assert outer[:, :, 7:14, 7:14, 7:14].abs().min() > 0
    outer[:, :, 7:14, 7:14, 7:14] = 0
    assert torch.count_nonzero(outer) == 0


def test_only_input_or_only_weight_gradient():
    x = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    w = torch.randn(3, 1, 5, 5, 5)
    fft_depthwise_conv3d(x, w).sum().backward()
    assert x.grad is not None
    x2 = torch.randn(2, 3, 8, 8, 8)
    w2 = torch.randn(3, 1, 5, 5, 5, requires_grad=True)
    y = fft_depthwise_conv3d(x2, w2)
    (gw,) = torch.autograd.grad(y, w2, torch.ones_like(y))
    assert rel_err(gw, reference(x2, w2, None, torch.ones_like(y))[2]) < TOL


def test_float64_inputs_compute_in_float64():
    x = torch.randn(1, 2, 9, 9, 9, dtype=torch.float64)
    w = torch.randn(2, 1, 7, 7, 7, dtype=torch.float64)
    y = fft_depthwise_conv3d(x, w)
    assert y.dtype == torch.float64
    assert rel_err(y, F.conv3d(x, w, padding=3, groups=2)) < 1e-12


def test_autocast_bf16_runs_the_fft_in_float32(monkeypatch):
    seen = []
    rfftn = torch.fft.rfftn

    def spy(t, *args, **kwargs):
        seen.append(t.dtype)
        return rfftn(t, *args, **kwargs)

    x = torch.randn(2, 4, 10, 10, 10, requires_grad=True)
    w = torch.randn(4, 1, 7, 7, 7, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    monkeypatch.setattr(torch.fft, "rfftn", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fft_depthwise_conv3d(x.to(torch.bfloat16), w, b)
        native = F.conv3d(x, w, b, padding=3, groups=4)
    assert seen and all(d == torch.float32 for d in seen)
    assert y.dtype == native.dtype == torch.bfloat16  # same dtype as F.conv3d under autocast
    # The input was rounded to bf16 by the caller; from there on everything is float32 until the
    # final rounding of the output, so it equals the float32 result on that input, rounded.
    exact = fft_depthwise_conv3d(x.detach().to(torch.bfloat16).float(), w.detach(), b.detach())
    assert torch.equal(y.detach(), exact.to(torch.bfloat16))
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("modulation,k,size", [("lrbm", 5, (12, 12, 12)), ("lrbm", 21, (6, 6, 6)), ("fixed", 7, (11, 10, 9))])
def test_lrbm_mask_gradients_match_native(modulation, k, size, monkeypatch):
    """W_eff = W * M goes through the FFT op: W and the generator must get the native gradients."""
    torch.manual_seed(0)
    fft = ModulatedDepthwiseConv3d(4, LRBMConfig(kernel_size=k, modulation=modulation, dwconv="fft"))
    with torch.no_grad():  # a generator far from its near-identity start, so M clearly depends on it
        for p in fft.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ref = copy.deepcopy(fft)
    ref.impl = "native"
    x = torch.randn(2, 4, *size)
    grad = torch.randn(2, 4, *size)
    y = fft(x)
    y.backward(grad)
    # The reference convolves in float64 (the generator computes M in float32 whatever the module
    # dtype, so the module itself cannot be made float64): float64 native conv of the same W * M.
    native = lambda xx, ww, bb=None: F.conv3d(xx.double(), ww.double(), padding=k // 2, groups=4).float()  # noqa: E731
    monkeypatch.setattr(dwconv, "native_depthwise_conv3d", native)
    y_ref = ref(x)
    y_ref.backward(grad)
    assert rel_err(y, y_ref) < TOL
    names = [n for n, _ in fft.named_parameters()]
    assert any("generator" in n for n in names) == (modulation == "lrbm")
    grads = {n: p.grad for n, p in fft.named_parameters()}
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), "every parameter needs a gradient"
    # W gets M * dL/dW_eff: this checks the gradient that the FFT op returns, element by element.
    assert rel_err(grads["weight"], grads_ref["weight"]) < TOL
    # The generator's gradients: one relative error over all of them. A single scalar (a LayerNorm
    # bias ahead of another LayerNorm) can be a near-cancelling sum whose float32 rounding in the
    # generator itself (not in the convolution) exceeds 1e-5 relative, also with native float32.
    gen = [n for n in names if n != "weight"]
    if gen:
        flat = torch.cat([grads[n].flatten() for n in gen])
        flat_ref = torch.cat([grads_ref[n].flatten() for n in gen])
        assert rel_err(flat, flat_ref) < TOL


def test_deploy_spectrum_cache(monkeypatch):
    torch.manual_seed(0)
    conv = DepthwiseConv3d(4, 7, bias=True, impl="fft").eval()
    x = torch.randn(2, 4, 12, 12, 12)
    calls = []
    real = fftconv.fft_kernel_spectrum
    monkeypatch.setattr(fftconv, "fft_kernel_spectrum", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y0 = F.conv3d(x, conv.weight, conv.bias, padding=3, groups=4)
        y1 = conv(x)
        y2 = conv(x)
        assert len(calls) == 1, "the kernel spectrum must be computed once per input size"
        assert torch.equal(y1, y2) and rel_err(y1, y0) < TOL
        conv(torch.randn(1, 4, 8, 8, 8))  # another input size: another spectrum
        assert len(calls) == 2
        conv.weight.mul_(2.0)  # in place, as an optimizer step or load_state_dict would
        y3 = conv(x)
        assert len(calls) == 3, "an in-place weight change must invalidate the cache"
        assert rel_err(y3, F.conv3d(x, conv.weight, conv.bias, padding=3, groups=4)) < TOL
        conv.load_state_dict({"weight": torch.randn(4, 1, 7, 7, 7), "bias": torch.zeros(4)})
        assert rel_err(conv(x), F.conv3d(x, conv.weight, conv.bias, padding=3, groups=4)) < TOL
        assert len(calls) == 4
    assert "_spectrum_cache" not in "".join(conv.state_dict())
    assert copy.deepcopy(conv)._spectrum_cache == {}
    # With gradients wanted, no cache: the weight must get its gradient.
    n = len(calls)
    conv.train()
    conv(x).sum().backward()
    assert len(calls) == n and conv.weight.grad is not None


def test_deployed_rep3d_uses_cache_and_matches_native():
    torch.manual_seed(0)
    net = build_network("REP3D", 1, 3, **TINY, deploy=True, dwconv="fft").eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        y_fft = net(x)
        y_fft2 = net(x)
        cached = [m for m in net.modules() if isinstance(m, DepthwiseConv3d) and m._spectrum_cache]
        y_native = set_dwconv_impl(net, "native")(x)
    assert len(cached) == 4
    assert torch.equal(y_fft, y_fft2)
    assert rel_err(y_fft, y_native) < 1e-4  # float32 native vs float32 FFT through a whole network


def test_dispatch_and_arguments():
    x = torch.randn(1, 2, 6, 6, 6)
    w = torch.randn(2, 1, 5, 5, 5)
    for impl in ("auto", "native", "fft"):
        assert rel_err(depthwise_conv3d(x, w, impl=impl), reference(x, w, None, torch.zeros_like(x))[0]) < TOL
    with pytest.raises(ValueError, match="dwconv implementation"):
        depthwise_conv3d(x, w, impl="cudnn")
    with pytest.raises(ValueError, match=r"\(2, 1, K, K, K\)"):
        fft_depthwise_conv3d(x, torch.randn(3, 1, 5, 5, 5))
    with pytest.raises(ValueError, match="odd"):
        fft_depthwise_conv3d(x, torch.randn(2, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="fft_kernel_spectrum"):
        fft_depthwise_conv3d(x, w, kernel_spectrum=fft_kernel_spectrum(w, (8, 8, 8)))


def test_fast_lengths_and_plan():
    assert [next_fast_len(n) for n in (1, 11, 13, 17, 58, 97)] == [1, 12, 14, 18, 60, 98]
    assert next_fast_len(35, even=True) == 36
    plan = fft_plan((48, 48, 48), (21, 21, 21))
    assert plan.fft_shape == (60, 60, 60) and plan.kernel_crop == (0, 0, 0)
    assert all(L >= 48 + 10 for L in plan.fft_shape)
    assert fft_plan((6, 6, 6), (21, 21, 21)).kernel_crop == (5, 5, 5)


def test_auto_picks_fft_for_large_kernels_only():
    assert fft_is_faster(torch.empty(2, 48, 48, 48, 48, device="meta"), torch.empty(48, 1, 21, 21, 21, device="meta"))
    assert not fft_is_faster(torch.empty(2, 4, 16, 16, 16), torch.empty(4, 1, 1, 1, 1))

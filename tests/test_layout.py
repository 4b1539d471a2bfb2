"""The channels-last decoder path: same numbers as NCDHW, same state dict, layout kept through the norms."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import TINY
from networks import build_network, layout
from networks.layout import (
    ChannelsLastInstanceNorm3d,
    memory_format_of,
    to_channels_last_3d,
)
from rep3d.inference.sliding_window import compile_for_windows

FFT_TINY = {**TINY, "dwconv": "fft"}
CL = torch.channels_last_3d


def _norm_case(norm, x, g):
    x = x.clone().requires_grad_()
    y = norm(x)
    (y * g).sum().backward()
    grads = [x.grad] + [p.grad for p in norm.parameters()]
    return y, grads


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("affine", [False, True])
def test_channels_last_instance_norm_equals_instance_norm(n, affine):
    torch.manual_seed(0)
    # An offset mean (|mean| >> std) and odd sizes; float64 so that any difference is a logic error.
    x = torch.randn(n, 6, 5, 7, 9, dtype=torch.float64) * 0.1 + 3.0
    g = torch.randn_like(x)
    ref = nn.InstanceNorm3d(6, affine=affine).double()
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    ours = ChannelsLastInstanceNorm3d.from_instance_norm(copy.deepcopy(ref))
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    y_ref, g_ref = _norm_case(ref, x, g)
    for fmt in (torch.contiguous_format, CL):
        y, grads = _norm_case(ours, x.contiguous(memory_format=fmt), g)
        assert memory_format_of(y) == fmt  # channels-last in, channels-last out
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
        for a, b in zip(grads, g_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        ours.zero_grad(set_to_none=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the custom CUDA autograd path needs a GPU")
@pytest.mark.parametrize("stats", ["batch_norm", "sums", "auto"])
@pytest.mark.parametrize("n", [1, 3])
def test_channels_last_instance_norm_cuda_matches(n, stats, monkeypatch):
    monkeypatch.setattr(layout, "instance_norm_impl", stats)
    torch.manual_seed(0)
    x = (torch.randn(n, 24, 10, 12, 14, device="cuda") * 0.1 + 2.0).contiguous(memory_format=CL)
    g = torch.randn_like(x)
    norm = ChannelsLastInstanceNorm3d(24, affine=True).cuda()
    y, grads = _norm_case(norm, x, g)
    ref = nn.InstanceNorm3d(24, affine=True).cuda().double()
    y_ref, g_ref = _norm_case(ref, x.double().contiguous(), g.double())
    assert memory_format_of(y) == CL
    # float32 sums over a sample's voxels: errors relative to each tensor's largest value ('sums' also
    # loses about 1e-7 (mean / std)^2 = 4e-5 here to the cancellation in E[x^2] - mean^2)
    tol = 2e-4 if stats == "sums" else 2e-5
    for a, b in zip([y] + grads, [y_ref] + g_ref):
        assert (a.double() - b).abs().max() <= tol * b.abs().max()


def test_instance_statistics_as_sums_match_float64(monkeypatch):
    monkeypatch.setattr(layout, "instance_norm_impl", "sums")
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 6, 7, 8) * torch.tensor([0.5, 1.0, 3.0, 0.5, 2.0]).view(1, 5, 1, 1, 1) + 4.0).contiguous(memory_format=CL)
    mean, invstd = layout._stats(x, 1e-5)  # |mean| / std up to 8: ~1e-7 (mean/std)^2 lost to cancellation
    var, m = torch.var_mean(x.double(), dim=(2, 3, 4), correction=0)
    assert mean.dtype == invstd.dtype == torch.float32 and mean.shape == (3, 5)
    torch.testing.assert_close(mean.double(), m, rtol=1e-6, atol=0)
    torch.testing.assert_close(invstd.double(), torch.rsqrt(var + 1e-5), rtol=1e-4, atol=0)


def test_instance_statistics_auto_sums_only_long_reduced_precision_samples(monkeypatch):
    big, small = (1, 2, 64, 64, 64), (2, 4, 32, 32, 32)  # 2^18 and 2^15 voxels a sample
    assert layout.instance_norm_impl == "auto"
    assert layout.stats_mode(torch.empty(big, dtype=torch.bfloat16)) == "sums"
    assert layout.stats_mode(torch.empty(big, dtype=torch.float16)) == "sums"
    assert layout.stats_mode(torch.empty(big)) == "batch_norm"  # float32: keep Welford's accuracy
    assert layout.stats_mode(torch.empty(small, dtype=torch.bfloat16)) == "batch_norm"
    monkeypatch.setattr(layout, "instance_norm_impl", "batch_norm")
    assert layout.stats_mode(torch.empty(big, dtype=torch.bfloat16)) == "batch_norm"
    monkeypatch.setattr(layout, "instance_norm_impl", "welford")
    with pytest.raises(ValueError, match="instance_norm_impl"):
        layout.stats_mode(torch.empty(small))


def test_triton_kernels_fall_back_under_auto_and_fail_when_asked_for(monkeypatch):
    """Without Triton: "auto" warns once and takes PyTorch's kernels, "triton" says why, the PyTorch
    choices never try; off CUDA no choice loads it."""
    tries = []

    def no_triton(name, package=None):
        tries.append(name)
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(layout, "_triton", {})
    monkeypatch.setattr(layout.importlib, "import_module", no_triton)
    x = torch.zeros(1, 2, 2, 2, 2)
    for impl in ("batch_norm", "sums", "triton", "auto"):
        monkeypatch.setattr(layout, "instance_norm_impl", impl)
        assert layout.triton_kernels_for(x) is None  # a CPU tensor
    assert tries == []
    monkeypatch.setattr(layout, "instance_norm_impl", "auto")
    with pytest.warns(UserWarning, match="No module named 'triton'"):
        assert layout.triton_kernels(x) is None
    assert layout.triton_kernels(x) is None and len(tries) == 1  # the warning once, no second try
    monkeypatch.setattr(layout, "instance_norm_impl", "triton")
    with pytest.raises(ImportError, match="triton"):
        layout.triton_kernels(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA")
@pytest.mark.parametrize("case", range(6))
def test_triton_instance_norm_matches_float64(case):
    from benchmarks.triton_norm_check import CASES, case_errors, tolerance

    shape, affine, dtype = CASES[case]
    assert max(case_errors(shape, affine, dtype, "cuda")) <= tolerance(dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA")
@pytest.mark.parametrize("case", range(6))
def test_triton_fused_tails_match_float64(case):
    from benchmarks.triton_norm_check import FUSED_CASES, fused_case_errors, tolerance

    shape, affine, dtype, mode = FUSED_CASES[case]
    assert max(fused_case_errors(shape, affine, dtype, mode, "cuda")) <= tolerance(dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA")
@pytest.mark.parametrize("case", range(3))
def test_triton_channels_first_layer_norm_matches_float64(case):
    from benchmarks.triton_norm_check import LN_CASES, layer_norm_errors, tolerance

    shape, dtype, out_dtype = LN_CASES[case]
    assert max(layer_norm_errors(shape, dtype, out_dtype, "cuda")) <= tolerance(dtype)


def test_single_channel_conv_by_gather_equals_the_convolution():
    """encoder1's 3^3 convolution of the 1-channel image as a neighbourhood gather and a matrix product:
    the convolution's output and weight / bias / input gradients (float64), channels-last; None where it
    does not apply."""
    from monai.networks.blocks.dynunet_block import get_conv_layer

    torch.manual_seed(0)
    conv = get_conv_layer(3, 1, 6, kernel_size=3, stride=1, conv_only=False, act=None, norm=None, bias=True).double()
    x = torch.randn(2, 1, 5, 7, 9, dtype=torch.float64, requires_grad=True)  # (the ERF differentiates the input)
    g = torch.randn(2, 6, 5, 7, 9, dtype=torch.float64)
    outs = []
    for fn in (lambda: layout._single_channel_conv(conv, x), lambda: conv(x)):
        conv.zero_grad(set_to_none=True)
        x.grad = None
        y = fn()
        (y * g).sum().backward()
        outs.append([y, conv.conv.weight.grad, conv.conv.bias.grad, x.grad])
    assert outs[0][0].is_contiguous(memory_format=CL)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    strided = get_conv_layer(3, 1, 6, kernel_size=3, stride=2, conv_only=False, act=None, norm=None)
    assert layout._single_channel_conv(strided, x.detach().float()) is None
    assert layout._single_channel_conv(conv, torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)) is None


def _logits_and_grads(net, x):
    net.zero_grad(set_to_none=True)
    y = net(x)
    (y.float() ** 2).mean().backward()
    return y.detach().float(), torch.cat([p.grad.flatten().float() for p in net.parameters()])


def test_fused_block_tails_keep_modules_and_stock_forward_off_cuda():
    """The decoder's MONAI blocks get the fused forward by a class swap: same modules and state dict,
    still MONAI's classes; on the CPU they run MONAI's forward (the same numbers as unswapped blocks)."""
    from monai.networks.blocks.dynunet_block import UnetResBlock

    torch.manual_seed(0)
    net = build_network("REP3D", **FFT_TINY).double()
    blocks = [m for m in net.modules() if isinstance(m, UnetResBlock)]
    assert blocks and all(type(m) is layout.FusedUnetResBlock for m in blocks)
    stock = copy.deepcopy(net)
    for m in stock.modules():
        if type(m) is layout.FusedUnetResBlock:
            m.__class__ = UnetResBlock
    assert list(stock.state_dict()) == list(net.state_dict())
    x = torch.randn(1, 1, 16, 16, 32, dtype=torch.float64)
    for a, b in zip(_logits_and_grads(net, x), _logits_and_grads(stock, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA")
def test_triton_decoder_matches_pytorch_kernels(monkeypatch):
    """A tiny REP3D with the fused Triton tails gives the logits and gradients of PyTorch's kernels
    (float32, channels-last decoder on CUDA)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # (TF32 rounding would amplify norm-rounding differences)
    torch.manual_seed(0)
    net = build_network("REP3D", **FFT_TINY).cuda()
    x = torch.randn(2, 1, 32, 32, 32, device="cuda")
    monkeypatch.setattr(layout, "instance_norm_impl", "batch_norm")
    ref = _logits_and_grads(net, x)
    monkeypatch.setattr(layout, "instance_norm_impl", "triton")
    ours = _logits_and_grads(net, x)
    errors = [float((a - b).norm() / b.norm()) for a, b in zip(ours, ref)]
    assert max(errors) < 1e-4, errors


def test_to_channels_last_single_channel_gets_channels_last_strides():
    x = torch.randn(2, 1, 4, 5, 6)
    y = to_channels_last_3d(x)
    assert y.stride() == (120, 1, 30, 6, 1)
    assert torch.equal(y, x)
    # A convolution fed this tensor keeps the channels-last layout (a plain .contiguous(...) would not).
    out = F.conv3d(y, torch.randn(8, 1, 3, 3, 3), padding=1)
    assert out.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("name", ["REP3D", "3DUXNET"])
def test_decoder_layouts_agree_in_float64(name):
    torch.manual_seed(0)
    a = build_network(name, 1, 3, **FFT_TINY).double().train()
    b = copy.deepcopy(a)
    a.decoder_channels_last, b.decoder_channels_last = False, True
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in b.modules())  # all swapped for the layout-aware norm
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    ya, yb = a(x), b(x)
    assert yb.is_contiguous()  # logits come back NCDHW whatever the decoder ran in
    torch.testing.assert_close(yb, ya, rtol=0, atol=1e-10)
    w = torch.linspace(-1, 1, ya.numel(), dtype=torch.float64).view_as(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    for (name_a, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad is None) == (pb.grad is None), name_a
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-7, atol=1e-9, msg=name_a)


def test_decoder_layout_auto_is_ncdhw_on_cpu():
    torch.manual_seed(0)
    model = build_network("REP3D", 1, 3, **FFT_TINY).eval()
    seen = []
    for m in model.modules():
        if isinstance(m, ChannelsLastInstanceNorm3d):
            m.register_forward_hook(lambda mod, inp, out: seen.append(memory_format_of(inp[0])))
    with torch.no_grad():
        model(torch.randn(1, 1, 32, 32, 32))
    assert model.decoder_channels_last == "auto"
    assert seen and set(seen) == {torch.contiguous_format}


def test_compile_for_windows_pads_the_last_batch(monkeypatch):
    calls = []

    def fake_compile(model, **kw):
        assert kw.get("dynamic") is False

        def run(x):
            calls.append(x.shape[0])
            return model(x)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    net = nn.Conv3d(1, 2, 1)
    predict = compile_for_windows(net, sw_batch_size=4)
    x = torch.randn(3, 1, 4, 4, 4)
    out = predict(x)
    assert calls == [4]  # padded to the compiled batch size
    assert out.shape == (3, 2, 4, 4, 4)
    torch.testing.assert_close(out, net(x))
    predict(torch.randn(4, 1, 4, 4, 4))
    assert calls == [4, 4]

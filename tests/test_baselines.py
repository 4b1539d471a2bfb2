"""Baselines in the registry: 3D UX-Net (+K21, +LRBM), SwinUNETR, UNETR, nnFormer, TransBTS, nnUNet,
UNet3D, MedNeXt; and the registry's account of each network's options.

Full-size models are only built to count parameters (and, for 3D UX-Net, to compare the state-dict
layout with the authors' release); everything that runs a forward pass uses reduced widths.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import MedNeXtB, MedNeXtL

import networks
from helpers import TINY
from networks import (
    LRBMConfig,
    build_deploy_network,
    build_network,
    fixed_input_size,
    load_network_weights,
    network_accepts,
    network_options,
    reparameterize_model,
    unwrap_model,
)
from networks.monai_nets import plan_nnunet_topology
from networks.Rep3D import LRBMGenerator, ModulatedDepthwiseConv3d

REFERENCE = Path(__file__).resolve().parent / "reference" / "3DUXNET_16cls_state_dict.json"

# (network, classes, millions of parameters), each to be met within 0.1M: SPEC section 3, and the paper's
# table for nnU-Net (31.2M) and 3D U-Net (4.81M, which is the count at 5 classes: 4.825M at 16).
PARAM_COUNTS = [
    ("3DUXNET", 16, 53.007),
    ("SwinUNETR", 16, 62.187),
    ("UNETR", 16, 92.803),
    ("nnFormer", 16, 149.333),
    ("TransBTS", 17, 31.577),
    ("nnUNet", 16, 31.2),
    ("UNet3D", 16, 4.81),
    ("UNet3D", 5, 4.81),
]

UX_TINY = {**TINY, "dwconv": "native"}

# name -> (overrides of a reduced-width build, an input size it takes, an input size it refuses)
SMALL = {
    "3DUXNET": (UX_TINY, (32, 32, 32), (32, 32, 20)),
    "3DUXNET_LRBM": (UX_TINY, (32, 32, 32), (32, 32, 20)),
    # (32, 32, 64): the bottleneck keeps 2 voxels, which instance norm needs in training mode.
    "SwinUNETR": (dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), (32, 32, 64), (32, 32, 48)),
    "UNETR": (dict(img_size=32, feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4), (32, 32, 32), (32, 32, 48)),
    # window 3 on an 8^3 grid exercises padding to whole windows; window 2 the shifted-window mask.
    "nnFormer": (
        dict(img_size=(16, 32, 32), embed_dim=12, num_heads=(1, 2, 2, 4), window_size=(3, 2, 2, 2), drop_path_rate=0.0),
        (16, 32, 32),
        (16, 32, 48),
    ),
    "TransBTS": (
        dict(img_size=16, embed_dim=64, num_heads=4, num_layers=1, mlp_dim=128, base_channels=8),
        (16, 16, 16),
        (24, 16, 16),
    ),
    # Planned for a 32^3 ROI: strides 1, 2, 2, 2 (total 8), filters 4, 8, 16, 16.
    "nnUNet": (dict(img_size=32, base_filters=4, max_filters=16), (32, 32, 32), (32, 32, 20)),
    "UNet3D": (dict(channels=(4, 8, 8, 16, 16)), (32, 32, 32), (32, 32, 24)),
    "MedNeXt": (dict(variant="S", init_filters=4), (32, 32, 32), (32, 32, 24)),
}

# A value for each option of networks.network_options (img_size: the SMALL size of that network).
OPTION_VALUES = {
    **TINY,
    "modulation": "fixed",
    "dwconv": "native",
    "beta": 2.0,
    "generator_kernel_size": 3,
    "generator_depth": 1,
    "variant": "S",
}


@pytest.fixture(scope="module")
def full_uxnet():
    return build_network("3DUXNET", 1, 16)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize("name,classes,millions", PARAM_COUNTS, ids=[f"{p[0]}-{p[1]}" for p in PARAM_COUNTS])
def test_parameter_count_matches_paper(name, classes, millions, full_uxnet):
    model = full_uxnet if name == "3DUXNET" else build_network(name, 1, classes)
    n = count(model)
    assert abs(n - millions * 1e6) < 0.1e6, f"{name}: {n / 1e6:.3f}M parameters, SPEC says {millions}M"


def test_nnunet_topology_is_planned_for_the_roi():
    kernels, strides = plan_nnunet_topology((96, 96, 96))
    assert strides == [(1, 1, 1)] + [(2, 2, 2)] * 5 and kernels == [(3, 3, 3)] * 6
    # nnU-Net's own bottleneck edge (4) stops one pooling earlier at 96^3; both agree at 128^3.
    assert len(plan_nnunet_topology(96, min_feature_map_size=4)[1]) == 5
    assert plan_nnunet_topology(128, min_feature_map_size=4) == plan_nnunet_topology(128)
    # A short axis stops pooling first; a coarse axis waits (1-wide kernels) until the others catch up.
    assert plan_nnunet_topology((96, 96, 64))[1][-1] == (2, 2, 1)
    kernels, strides = plan_nnunet_topology((96, 96, 48), spacing=(1.5, 1.5, 4.0))
    assert kernels[0] == (3, 3, 1) and strides[1] == (2, 2, 1)
    net = build_network("nnUNet", 1, 16)  # the paper's settings
    assert list(net.filters) == [32, 64, 128, 256, 320, 320]
    assert net.img_size == (96, 96, 96) and not net.deep_supervision


@pytest.mark.parametrize("variant,reference", [("B", MedNeXtB), ("L", MedNeXtL)])
def test_mednext_variants_are_monai_s(variant, reference):
    ours = build_network("MedNeXt", 1, 16, variant=variant)
    theirs = reference(spatial_dims=3, in_channels=1, out_channels=16, kernel_size=3)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


# -------------------------------------------------------------------- forward, backward, gradients


@pytest.mark.parametrize("name", list(SMALL))
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    overrides, size, _ = SMALL[name]
    model = build_network(name, 2, 3, **overrides)
    x = torch.randn(2, 2, *size)
    y = model(x)
    assert y.shape == (2, 3, *size)
    # A loss that weights every output voxel differently, so no gradient vanishes by symmetry.
    (y * torch.randn_like(y)).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing[:5]}"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradients: {bad[:5]}"
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 3, *size)


@pytest.mark.parametrize("name", list(SMALL))
def test_bad_input_size_names_the_roi(name):
    overrides, _, bad = SMALL[name]
    model = build_network(name, 1, 3, **overrides).eval()
    with pytest.raises(ValueError, match="--roi"):
        with torch.no_grad():
            model(torch.randn(1, 1, *bad))


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("SwinUNETR", dict(img_size=(96, 96, 80))),
        ("UNETR", dict(img_size=(96, 96, 72))),
        ("nnFormer", dict(img_size=(96, 96, 80))),
        ("TransBTS", dict(img_size=(96, 96, 92))),
        ("nnUNet", dict(img_size=(96, 96, 100))),
        ("nnUNet", dict(img_size=(8, 8, 8))),
    ],
)
def test_bad_roi_at_construction_names_the_roi(name, overrides):
    # Build-time checks run before any layer is built, so these are cheap even at full width.
    with pytest.raises(ValueError, match="--roi"):
        build_network(name, 1, 3, **overrides)


def test_unknown_override_is_a_value_error():
    with pytest.raises(ValueError, match="does not accept"):
        build_network("nnFormer", 1, 3, not_an_option=1)
    # Constructors that hand **kwargs on to MONAI: the same message, naming the network's options.
    for name in ("SwinUNETR", "nnUNet", "UNet3D", "MedNeXt"):
        with pytest.raises(ValueError, match=f"network {name} does not accept not_an_option"):
            build_network(name, 1, 3, not_an_option=1)
    with pytest.raises(ValueError, match="variant, kernel_size"):
        build_network("MedNeXt", 1, 3, not_an_option=1)


@pytest.mark.parametrize("name", ["MedNeXt"])  # nnUNet takes it (issue 23): see tests/test_cross_validation.py
def test_deep_supervision_is_refused(name):
    with pytest.raises(ValueError, match="deep supervision"):
        build_network(name, 1, 3, deep_supervision=True)


@pytest.mark.parametrize("name", ["nnUNet", "UNet3D", "MedNeXt"])
def test_check_roi_refuses_unusable_rois_of_new_baselines(name):
    overrides, good, bad = SMALL[name]
    model = build_network(name, 1, 3, **overrides)
    networks.check_roi(model, good)
    with pytest.raises(ValueError, match="--roi"):
        networks.check_roi(model, bad)
    # One bottleneck voxel: its norm cannot normalise it; the message names a larger ROI.
    with pytest.raises(ValueError, match="single voxel.*--roi"):
        networks.check_roi(model, (8, 8, 8) if name == "nnUNet" else (16, 16, 16))


# ------------------------------------------------------------------------------- registry options


@pytest.mark.parametrize("name", networks.NETWORK_NAMES)
def test_declared_options_are_accepted_and_build(name):
    options = network_options(name)
    assert isinstance(options, tuple)
    for option in options:
        assert network_accepts(name, option), f"{name} declares {option!r}, which its constructor does not take"
    base = dict(SMALL[name][0]) if name in SMALL else {}
    values = {o: (SMALL[name][1] if o == "img_size" else OPTION_VALUES[o]) for o in options}
    model = build_network(name, 1, 3, **{**base, **values})
    if "modulation" in options:  # the large-kernel networks: every kernel option reached the config
        assert model.lrbm_config == LRBMConfig(
            kernel_size=5, modulation="fixed", beta=2.0, generator_kernel_size=3, generator_depth=1, dwconv="native"
        )


def test_img_size_and_fixed_input_size_agree_with_the_constructors():
    takes_roi = {n for n in networks.NETWORK_NAMES if "img_size" in network_options(n)}
    assert takes_roi == {n for n in networks.NETWORK_NAMES if network_accepts(n, "img_size")}
    assert {n for n in networks.NETWORK_NAMES if fixed_input_size(n)} == {"UNETR", "nnFormer", "TransBTS"}
    assert {n for n in networks.NETWORK_NAMES if fixed_input_size(n)} <= takes_roi
    assert network_options("rep3d") == network_options("REP3D")  # case-insensitive, like build_network
    with pytest.raises(ValueError, match="unknown network"):
        network_options("rep4d")


def test_unwrap_model_removes_every_wrapper():
    net = torch.nn.Conv3d(1, 2, 1)
    compiled = torch.compile(net)  # compiles lazily: never called here
    assert unwrap_model(net) is net
    assert unwrap_model(compiled) is net
    assert unwrap_model(torch.nn.DataParallel(compiled)) is net


# ----------------------------------------------------------------------------- 3D UX-Net layout


def test_uxnet_state_dict_matches_release_exactly(full_uxnet):
    reference = json.loads(REFERENCE.read_text())
    ours = {k: list(v.shape) for k, v in full_uxnet.state_dict().items()}
    assert sorted(ours) == sorted(reference)
    assert ours == reference
    # A checkpoint in the release's layout loads strictly, through torch and through the registry.
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) for k, shape in reference.items()}
    full_uxnet.load_state_dict(state, strict=True)
    load_network_weights(full_uxnet, state, strict=True)
    assert torch.equal(full_uxnet.uxnet_3d.stages[0][0].dwconv.weight, state["uxnet_3d.stages.0.0.dwconv.weight"])


def test_uxnet_deploy_builds_share_the_release_layout():
    """The deploy builds of 3DUXNET and 3DUXNET_LRBM have the plain layout (tiny widths: same key set)."""
    plain = build_network("3DUXNET", 1, 3, **UX_TINY).state_dict()
    for name in ("3DUXNET", "3DUXNET_LRBM"):
        deployed = build_network(name, 1, 3, deploy=True, **UX_TINY).state_dict()
        assert {k: v.shape for k, v in deployed.items()} == {k: v.shape for k, v in plain.items()}
    lrbm = build_network("3DUXNET_LRBM", 1, 3, **UX_TINY).state_dict()
    assert any(".dwconv.modulation.generator." in k for k in lrbm)


def test_uxnet_k21_uses_kernel_21():
    # TINY without its kernel size: 3DUXNET_K21 is the variant whose kernel (21) is the point
    model = build_network("3DUXNET_K21", 1, 3, **{k: v for k, v in TINY.items() if k != "kernel_size"})
    assert model.uxnet_3d.stages[0][0].dwconv.weight.shape == (8, 1, 21, 21, 21)


# --------------------------------------------------------------------------- 3D UX-Net + LRBM fold


def _lrbm_uxnet():
    torch.manual_seed(0)
    # Layer scale 1 instead of 1e-6, so that the (modulated) blocks change the output visibly.
    model = build_network("3DUXNET_LRBM", 1, 3, layer_scale_init_value=1.0, **UX_TINY)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LRBMGenerator):  # far from the near-identity initialisation: M differs from P
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_uxnet_lrbm_folds_exactly():
    model = _lrbm_uxnet()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        ref = model(x)
        folded = reparameterize_model(model)
        out = folded(x)
        # The mask matters: dropping it without folding changes the output clearly.
        unmasked = copy.deepcopy(model)
        for m in unmasked.modules():
            if isinstance(m, ModulatedDepthwiseConv3d):
                m.modulation = None
        assert _rel(unmasked(x), ref) > 1e-3
    assert _rel(out, ref) < 1e-5
    assert not any(isinstance(m, ModulatedDepthwiseConv3d) and not m.is_folded for m in folded.modules())
    assert not any(".modulation." in k for k in folded.state_dict())
    # The training checkpoint deploys through the registry: folded on load, same output.
    deployed = build_deploy_network("3DUXNET_LRBM", 1, 3, checkpoint=model.state_dict(), layer_scale_init_value=1.0, **UX_TINY)
    with torch.no_grad():
        assert _rel(deployed(x), ref) < 1e-5


def test_swin_unetr_refuses_inputs_too_small_for_its_bottleneck():
    net = build_network("SwinUNETR", 1, 2, feature_size=12, depths=(1, 1, 1, 1))
    for mode in (net.train, net.eval):
        mode()
        with pytest.raises(ValueError, match="--roi 64 64 64"):
            net(torch.randn(1, 1, 32, 32, 32))

"""REP3D: prior, LRBM generator, gradient flow, the SGD identity, deploy folding, checkpoints, arguments."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import networks
from helpers import TINY
from networks import (
    build_deploy_network,
    build_network,
    load_network_weights,
    reparameterize_model,
)
from networks.Rep3D import (
    KernelModulation,
    LRBMConfig,
    LRBMGenerator,
    ModulatedDepthwiseConv3d,
    Rep3DBlock,
    compute_distance_prior,
)

REFERENCE = Path(__file__).resolve().parent / "reference" / "REP3D_16cls_state_dict.json"
VARIANTS = ["lrbm", "fixed", "none"]


def tiny_rep3d(modulation="lrbm", out_channels=3, **kw):
    return build_network("REP3D", 1, out_channels, **{**TINY, "modulation": modulation, "dwconv": "native", **kw})


def perturb_generators(model, seed=0):
    """Give LRBM generators weights far from their near-identity initialisation, so that the mask
    differs clearly from the prior and folding is tested on a non-trivial M."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LRBMGenerator):
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


# ------------------------------------------------------------------------------------- the prior


@pytest.mark.parametrize("k", [3, 5, 21])
def test_prior_formula_centre_and_symmetry(k):
    p = compute_distance_prior(k, beta=1.0)
    assert p.shape == (k, k, k)
    c = k // 2
    assert p[c, c, c].item() == pytest.approx(1.0)
    for dims in [(0,), (1,), (2,), (0, 1, 2)]:
        assert torch.equal(p, torch.flip(p, dims))
    # the formula at a few offsets, beta = 2
    p2 = compute_distance_prior(k, beta=2.0)
    for idx in [(0, 0, 0), (c, c, 0), (c, 0, k - 1)]:
        d = math.sqrt(sum((i - c) ** 2 for i in idx))
        assert p2[idx].item() == pytest.approx(2.0 / (d + 2.0), rel=1e-6)


def test_prior_strictly_decreasing_with_distance():
    k = 7
    p = compute_distance_prior(k).flatten()
    off = torch.arange(k) - k // 2
    dz, dy, dx = torch.meshgrid(off, off, off, indexing="ij")
    d2 = (dz**2 + dy**2 + dx**2).flatten()
    order = torch.argsort(d2)
    d_sorted, p_sorted = d2[order], p[order]
    farther = d_sorted[1:] > d_sorted[:-1]
    assert torch.all(p_sorted[1:][farther] < p_sorted[:-1][farther])
    same = d_sorted[1:] == d_sorted[:-1]
    assert torch.allclose(p_sorted[1:][same], p_sorted[:-1][same])


def test_prior_rejects_bad_arguments():
    with pytest.raises(ValueError, match="odd"):
        compute_distance_prior(4)
    with pytest.raises(ValueError, match="beta"):
        compute_distance_prior(5, beta=0.0)


# --------------------------------------------------------------------------------- the generator


def test_generator_keeps_shape_and_depends_on_input():
    torch.manual_seed(0)
    gen = LRBMGenerator(kernel_size=7, depth=2)
    p = compute_distance_prior(21)
    out = gen(p)
    assert out.shape == (21, 21, 21)
    assert not torch.allclose(gen(p), gen(p.flip(0) * 0.5 + torch.rand_like(p)))
    # depth 3 also keeps the size
    assert LRBMGenerator(kernel_size=3, depth=3)(compute_distance_prior(5)).shape == (5, 5, 5)


def test_mask_starts_near_prior():
    torch.manual_seed(0)
    mod = KernelModulation(LRBMConfig(kernel_size=21, modulation="lrbm"))
    m = mod()
    assert m.shape == (21, 21, 21)
    assert (m - mod.prior).abs().max() < 0.1
    assert not torch.equal(m, mod.prior)
    assert torch.equal(KernelModulation(LRBMConfig(kernel_size=21, modulation="fixed"))(), compute_distance_prior(21))


# ---------------------------------------------------------------------------- gradients, the SGD identity


@pytest.mark.parametrize("modulation", VARIANTS)
def test_every_trainable_parameter_gets_a_gradient(modulation):
    torch.manual_seed(0)
    net = tiny_rep3d(modulation)
    net.train()
    x = torch.randn(2, 1, 32, 32, 32)
    loss = net(x).square().mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient: {missing}"
    bad = [n for n, p in net.named_parameters() if p.requires_grad and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient: {bad}"
    zero = [n for n, p in net.named_parameters() if p.requires_grad and p.grad.abs().max() == 0]
    assert not zero, f"zero gradient: {zero}"
    if modulation == "lrbm":
        assert any(".generator." in n for n, _ in net.named_parameters())


def test_forward_does_not_rebind_parameters():
    torch.manual_seed(0)
    conv = ModulatedDepthwiseConv3d(4, LRBMConfig(kernel_size=5, modulation="lrbm", dwconv="native"))
    before = {n: (id(p), p.detach().clone()) for n, p in conv.named_parameters()}
    conv(torch.randn(1, 4, 8, 8, 8))
    conv(torch.randn(1, 4, 8, 8, 8))
    for n, p in conv.named_parameters():
        assert id(p) == before[n][0]
        assert torch.equal(p, before[n][1])


def test_sgd_step_on_w_is_a_spatial_learning_rate_m_squared():
    torch.manual_seed(0)
    conv = ModulatedDepthwiseConv3d(3, LRBMConfig(kernel_size=5, modulation="fixed", dwconv="native")).double()
    mask = conv.modulation().detach()
    x = torch.randn(2, 3, 9, 9, 9, dtype=torch.float64)
    target = torch.randn(2, 3, 9, 9, 9, dtype=torch.float64)

    w_eff0 = conv.equivalent_kernel()
    w_eff0.retain_grad()
    loss = torch.nn.functional.mse_loss(conv(x, w_eff0), target)
    loss.backward()
    grad_w_eff = w_eff0.grad.detach()

    lr = 0.1
    opt = torch.optim.SGD([conv.weight], lr=lr)
    opt.step()
    w_eff1 = conv.equivalent_kernel().detach()
    expected = -lr * mask**2 * grad_w_eff
    torch.testing.assert_close(w_eff1 - w_eff0.detach(), expected, rtol=1e-10, atol=1e-12)
    # and the step is genuinely non-uniform: the centre moves faster than the corners per unit gradient
    assert mask[2, 2, 2] ** 2 > 4 * mask[0, 0, 0] ** 2


# --------------------------------------------------------------------------------------- folding


@pytest.mark.parametrize("modulation", VARIANTS)
def test_folding_preserves_eval_outputs(modulation):
    torch.manual_seed(0)
    net = tiny_rep3d(modulation)
    perturb_generators(net)
    with torch.no_grad():
        randomise_bn(net)
    net.eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        before = net(x)
        folded = reparameterize_model(net)
        after = folded(x)
    rel = ((after - before).norm() / before.norm()).item()
    assert rel < 1e-5
    # the copy is folded, the original untouched
    assert not any(".modulation." in k for k in folded.state_dict())
    if modulation != "none":
        assert any(".modulation." in k for k in net.state_dict())
    # folded == built with deploy=True: same keys, and the weights load strictly
    deploy = tiny_rep3d(modulation, deploy=True).eval()
    assert set(deploy.state_dict()) == set(folded.state_dict())
    load_network_weights(deploy, folded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), after)


def test_block_fold_is_idempotent_and_drops_generator():
    torch.manual_seed(0)
    block = Rep3DBlock(4, LRBMConfig(kernel_size=5, modulation="lrbm", dwconv="native")).eval()
    perturb_generators(block)
    x = torch.randn(1, 4, 10, 10, 10)
    with torch.no_grad():
        y0 = block(x)
        w_eff = block.equivalent_kernel().clone()
        block.reparameterize()
        block.reparameterize()
        y1 = block(x)
    assert block.deploy
    assert block.dwconv.modulation is None
    assert not any("prior" in k or "generator" in k for k in block.state_dict())
    torch.testing.assert_close(block.dwconv.weight, w_eff)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)


def test_deploy_build_has_only_plain_convs():
    net = tiny_rep3d("lrbm", deploy=True)
    assert not any("prior" in k or "generator" in k or "modulation" in k for k in net.state_dict())
    block = net.rep3d.stages[0][0]
    assert block.deploy
    assert block.dwconv.bias is None


# ------------------------------------------------------------------------------ the LRBM config


@pytest.mark.parametrize("name", ["REP3D", "3DUXNET_LRBM"])
def test_one_frozen_lrbm_config_is_shared_by_every_block(name):
    net = build_network(name, 1, 3, **{**TINY, "dwconv": "native", "beta": 2.0, "generator_kernel_size": 3, "generator_depth": 1})
    cfg = net.lrbm_config
    assert isinstance(cfg, LRBMConfig)
    assert (cfg.kernel_size, cfg.beta, cfg.generator_kernel_size, cfg.generator_depth) == (5, 2.0, 3, 1)
    encoder = net.rep3d if name == "REP3D" else net.uxnet_3d
    blocks = [b for stage in encoder.stages for b in stage]
    convs = [m for m in net.modules() if isinstance(m, ModulatedDepthwiseConv3d)]
    assert len(blocks) == len(convs) == 4
    assert encoder.config is cfg
    assert all(b.config is cfg for b in blocks) and all(c.config is cfg for c in convs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kernel_size = 7
    # The settings took effect in every block: prior with beta 2, one 3^3 generator conv.
    for conv in convs:
        torch.testing.assert_close(conv.modulation.prior, compute_distance_prior(5, beta=2.0))
        assert conv.modulation.generator.depth == 1
        assert conv.modulation.generator.prior_conv.weight.shape == (1, 1, 3, 3, 3)
    # A folded copy still shares one config among its blocks.
    folded = reparameterize_model(net)
    assert all(m.config is folded.lrbm_config for m in folded.modules() if isinstance(m, ModulatedDepthwiseConv3d))


def test_deploy_flag_travels_in_the_config():
    net = tiny_rep3d("lrbm", deploy=True)
    assert net.lrbm_config.deploy and net.lrbm_config.built_modulation == "none"
    assert all(m.modulation is None for m in net.modules() if isinstance(m, ModulatedDepthwiseConv3d))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kernel_size=4), "odd"),
        (dict(modulation="lrbn"), "modulation"),
        (dict(beta=0.0), "beta"),
        (dict(generator_kernel_size=6), "generator_kernel_size"),
        (dict(generator_depth=0), "generator_depth"),
        (dict(dwconv="cudnn"), "dwconv"),
        (dict(deploy="yes"), "deploy"),
    ],
)
def test_lrbm_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LRBMConfig(**kwargs)


def test_build_deploy_network_folds_a_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = tiny_rep3d("lrbm")
    perturb_generators(net)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    deployed = build_deploy_network("REP3D", 1, 3, str(path), **{**TINY, "dwconv": "native"})
    assert not any(".modulation." in k for k in deployed.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), net.eval()(x), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------- reference checkpoints


def test_reference_layout_loads_into_deploy_model():
    shapes = json.loads(REFERENCE.read_text())
    g = torch.Generator().manual_seed(0)
    ref = {k: (torch.randn(v, generator=g) if v else torch.tensor(7)) for k, v in shapes.items()}
    net = build_network("REP3D", 1, 16, deploy=True, dwconv="native")
    load_network_weights(net, ref)  # strict: every model tensor must be present
    own = net.state_dict()
    skipped = []
    for k, v in ref.items():
        if k in own:
            assert torch.equal(own[k], v), k
        else:
            skipped.append(k)
    assert skipped and all(any(s in k for s in ("prior_map", "prior_conv", "norm_w")) for k in skipped)


@pytest.mark.parametrize("modulation", ["lrbm", "fixed"])
def test_folded_weights_into_a_training_model_are_not_masked_twice(modulation):
    """Fine-tuning from a deployed checkpoint: the training model's effective kernels equal the loaded ones."""
    torch.manual_seed(0)
    trained = tiny_rep3d(modulation)
    perturb_generators(trained)
    folded = reparameterize_model(trained.eval())
    fresh = tiny_rep3d(modulation)  # its own generator initialisation
    load_network_weights(fresh, folded.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), folded(x), rtol=1e-5, atol=1e-5)


def test_reference_layout_loads_into_training_model_for_fine_tuning():
    shapes = json.loads(REFERENCE.read_text())
    ref = {k: (torch.rand(v) + 0.5 if v else torch.tensor(7)) for k, v in shapes.items()}
    net = build_network("REP3D", 1, 16, dwconv="native")
    load_network_weights(net, ref)
    block = net.rep3d.stages[0][0]
    torch.testing.assert_close(block.equivalent_kernel(), ref["rep3d.stages.0.0.dwconv.weight"])


def test_checkpoint_with_other_class_count_is_refused():
    a = tiny_rep3d("none", out_channels=3, deploy=True)
    b = tiny_rep3d("none", out_channels=5, deploy=True)
    with pytest.raises(networks.CheckpointError, match="class count"):
        load_network_weights(a, b.state_dict())


def test_training_checkpoint_into_deploy_model_says_how_to_fold():
    with pytest.raises(networks.CheckpointError, match="reparameterize_model"):
        load_network_weights(tiny_rep3d("lrbm", deploy=True), tiny_rep3d("lrbm").state_dict())


# --------------------------------------------------------------------------------- parameter counts


def count(net):
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_parameter_counts_match_the_paper():
    fixed = count(build_network("REP3D", 1, 16, modulation="fixed"))
    assert abs(fixed - 65.827e6) <= 0.001e6
    lrbm = count(build_network("REP3D", 1, 16))
    assert fixed < lrbm <= 66.2e6
    assert count(build_network("REP3D", 1, 16, deploy=True)) == fixed


# -------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kernel_size=4), "odd"),
        (dict(depths=(1, 1, 1), feature_size=(8, 16, 16, 32)), "4 stages"),
        (dict(depths=(1, 1, 1, 1), feature_size=(8, 16, 32)), "4 stages"),
        (dict(depths=(1, 0, 1, 1)), "positive"),
        (dict(modulation="lrbn"), "modulation"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(generator_kernel_size=6), "generator_kernel_size"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_rep3d(**kwargs) if "modulation" not in kwargs else build_network("REP3D", 1, 3, **{**TINY, **kwargs})


def test_bad_input_size_names_a_usable_roi():
    net = tiny_rep3d("none")
    with pytest.raises(ValueError, match="--roi 32 32 32"):
        net(torch.randn(1, 1, 30, 33, 32))


def test_unknown_network_lists_choices():
    with pytest.raises(ValueError, match="REP3D"):
        build_network("rep4d")
    with pytest.raises(ValueError, match="does not accept"):
        build_network("REP3D", 1, 3, **TINY, not_an_option=1)


def test_corrupt_checkpoint_message_names_file_and_fix(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(networks.CheckpointError, match="broken.pth") as err:
        load_network_weights(tiny_rep3d("none"), str(bad))
    assert "copy it again" in str(err.value) and "weights_only" not in str(err.value)


def test_check_roi_refuses_without_running_the_network():
    net = tiny_rep3d("lrbm")
    networks.check_roi(net, (32, 48, 64))
    with pytest.raises(ValueError, match="--roi 32 32 32"):
        networks.check_roi(net, (30, 33, 32))

"""The batched LRBM masks (issue 25): every mask of an encoder in one grouped pass, the same function
as each block's own generator, with the same gradients."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import networks
import networks.Rep3D.rep3d_encoder as rep3d_encoder
import networks.UXNet_3D.uxnet_encoder as uxnet_encoder
from helpers import TINY
from networks.Rep3D.lrbm import KernelModulation, batched_masks

NATIVE_TINY = {**TINY, "dwconv": "native"}


def _perturbed(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = networks.build_network(name, 1, 3, modulation="lrbm", **NATIVE_TINY)
    with torch.no_grad():  # generators away from their near-identity start
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def test_batched_masks_equal_each_blocks_own():
    mods = [m for m in _perturbed("REP3D").modules() if isinstance(m, KernelModulation)]
    assert len(mods) == 4
    for own, batched in zip([m() for m in mods], batched_masks(mods)):
        torch.testing.assert_close(batched, own, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one signature"):
        batched_masks([m for m in networks.build_network("REP3D", 1, 3, modulation="fixed", **NATIVE_TINY).modules() if isinstance(m, KernelModulation)])


@pytest.mark.parametrize("name, module", [("REP3D", rep3d_encoder), ("3DUXNET", uxnet_encoder)])
def test_network_outputs_and_gradients_match_the_per_block_masks(name, module, monkeypatch):
    net = _perturbed(name)
    x = torch.randn(1, 1, 32, 32, 32)
    net(x).square().mean().backward()
    batched = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    ref = copy.deepcopy(net)
    ref.zero_grad(set_to_none=True)
    monkeypatch.setattr(module, "precomputed_masks", lambda m: contextlib.nullcontext())
    ref(x).square().mean().backward()
    generator = [n for n in batched if "modulation.generator" in n]
    assert generator, "the generators must get gradients through the batched masks"
    for n, p in ref.named_parameters():
        if p.grad is not None:
            scale = p.grad.abs().max().item() + 1e-12
            assert (batched[n] - p.grad).abs().max().item() / scale < 1e-3, n
    assert all(m.precomputed is None for m in net.modules() if isinstance(m, KernelModulation)), "masks must not outlive the forward"

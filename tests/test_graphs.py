"""main_train.py --cuda_graph: where it records the step, what it falls back to, and (CUDA) the same
numbers as eager steps."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn

import main_train
from helpers import TINY, tiny_argv
from networks import build_network
from rep3d.training import graphs
from rep3d.training.graphs import StepGraph, graph_blockers


def test_blockers_name_what_stops_a_graph():
    assert graph_blockers(torch.device("cuda", 0), False, False) == []
    reasons = graph_blockers(torch.device("cpu"), True, True)
    assert len(reasons) == 3 and "cpu" in reasons[0] and "DDP" in reasons[1] and "--compile" in reasons[2]
    off = StepGraph("auto", reasons)
    net = nn.Linear(2, 2)
    assert not off.enabled and off.model(net, torch.zeros(1, 2), None) is net and "off (the run is on cpu" in off.describe()
    with pytest.raises(RuntimeError, match="--cuda_graph on cannot work here: the run is on cpu"):
        StepGraph("on", reasons[:1])
    with pytest.raises(ValueError, match="--cuda_graph must be one of"):
        StepGraph("yes", [])


def test_recorded_shape_only_and_failures_fall_back(monkeypatch):
    """The recording serves batches of its shape; another shape runs the network; a recording that fails
    warns and leaves eager steps under auto, and is an error under on."""
    recorded = nn.Identity()
    monkeypatch.setattr(StepGraph, "_record", staticmethod(lambda net, image, amp: recorded))
    g, net = StepGraph("auto", []), nn.Identity()
    assert g.model(net, torch.zeros(2, 1, 4, 4, 4), None) is recorded
    assert g.model(net, torch.zeros(2, 1, 4, 4, 4), None) is recorded
    assert g.model(net, torch.zeros(1, 1, 4, 4, 4), None) is net  # a smaller last batch
    assert "batches of [2, 1, 4, 4, 4]" in g.describe()

    def broken(net, image, amp):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StepGraph, "_record", staticmethod(broken))
    g = StepGraph("auto", [])
    with pytest.warns(RuntimeWarning, match="could not be recorded"):
        assert g.model(net, torch.zeros(1), None) is net
    assert not g.enabled and g.model(net, torch.zeros(1), None) is net and "recording failed" in g.describe()
    with pytest.raises(RuntimeError, match="--cuda_graph on: recording the training step failed .*--cuda_graph off"):
        StepGraph("on", []).model(net, torch.zeros(1), None)


def test_cuda_graph_on_without_a_gpu_is_a_clear_error(demo_root, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main_train.main(tiny_argv(demo_root, out, "--gpu", "-1", "--cuda_graph", "on", "--max_iter", "1")) == 2
    err = capsys.readouterr().err
    assert "--cuda_graph on cannot work here: the run is on cpu" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(out, "checkpoint_last.pth"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_recorded_steps_equal_eager_steps():
    """Three AdamW steps of a tiny REP3D through the recorded graph and eagerly: same losses and weights."""
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    net = build_network("REP3D", 1, 3, **TINY).cuda().train()
    nets = {"eager": net, "graph": copy.deepcopy(net)}
    x = torch.randn(2, 1, 32, 32, 32, device="cuda")
    losses = {}
    for label, model in nets.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step_graph = StepGraph("on" if label == "graph" else "off", [])
        losses[label] = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            with graphs.autocast(x.device, torch.bfloat16):
                out = step_graph.model(model, x, torch.bfloat16)(x)
            loss = (out.float() ** 2).mean()
            loss.backward()
            opt.step()
            losses[label].append(float(loss))
    torch.testing.assert_close(losses["graph"], losses["eager"], rtol=2e-2, atol=0)
    for a, b in zip(nets["graph"].parameters(), nets["eager"].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)

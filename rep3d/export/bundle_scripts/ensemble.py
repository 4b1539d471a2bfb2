"""A fold ensemble for a MONAI bundle: the softmax probabilities of every fold's model, averaged.

``FoldEnsemble`` holds the folds' networks (its state dict, ``models/model.pt``, has each fold's
weights under ``members.<i>.``). ``EnsembleSlidingWindowInferer`` predicts a whole volume the way
Rep3D's ``test_seg.py`` ensembles: each fold by MONAI's sliding-window inferer (its own window),
softmax of the stitched logits, then the mean over the folds; it returns probabilities, so the
bundle's post-processing takes the argmax without another softmax.

Part of a MONAI bundle exported by Rep3D (MIT licence); imports only PyTorch and MONAI.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.inferers import Inferer, SlidingWindowInferer


class FoldEnsemble(nn.Module):
    """The networks of several folds; ``forward`` returns the mean of their softmax probabilities.

    Args:
        members: one network per fold (logits out), all of the same classes and input channels.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("FoldEnsemble needs at least one network")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for member in self.members:
            p = torch.softmax(member(x).float(), dim=1)
            total = p if total is None else total + p
        return total / len(self.members)


class EnsembleSlidingWindowInferer(Inferer):
    """Sliding-window inference of a :class:`FoldEnsemble`, fold by fold; returns mean probabilities.

    Args:
        roi_sizes: the window of each fold (one per member, in order).
        sw_batch_size: windows per forward pass.
        overlap: window overlap in [0, 1).
        mode: blending of overlapping windows, ``"gaussian"`` or ``"constant"``.
        kwargs: other arguments of ``monai.inferers.SlidingWindowInferer``.
    """

    def __init__(self, roi_sizes: Sequence[Sequence[int]], sw_batch_size: int = 1, overlap: float = 0.5, mode: str = "gaussian", **kwargs) -> None:
        super().__init__()
        self.inferers = [SlidingWindowInferer(roi_size=list(r), sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, **kwargs) for r in roi_sizes]

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        members = list(getattr(network, "members", [network]))
        if len(members) != len(self.inferers):
            raise ValueError(f"the inferer has {len(self.inferers)} windows (roi_sizes) but the network {len(members)} folds")
        total = None
        for inferer, member in zip(self.inferers, members):
            p = torch.softmax(torch.as_tensor(inferer(inputs, member, *args, **kwargs)).float(), dim=1)
            total = p if total is None else total.add_(p)
        return total.div_(len(members)) if len(members) > 1 else total

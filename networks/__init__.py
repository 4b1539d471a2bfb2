"""Network registry: every script and test builds its networks here.

    net = build_network("REP3D", in_channels=1, out_channels=16, modulation="lrbm")
    deployed = reparameterize_model(net)            # folded copy for inference
    load_network_weights(deployed, "best_metric_model.pth")
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .dwconv import DWCONV_IMPLS, DepthwiseConv3d, set_dwconv_impl

__all__ = [
    "DWCONV_IMPLS",
    "NETWORK_NAMES",
    "CheckpointError",
    "build_network",
    "build_deploy_network",
    "canonical_name",
    "check_roi",
    "checkpoint_state_dict",
    "load_network_weights",
    "network_accepts",
    "reparameterize_model",
    "set_dwconv_impl",
]


@dataclass(frozen=True)
class _Entry:
    target: str  # "module:Class"
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    deployable: bool = False


_REGISTRY: dict[str, _Entry] = {
    "REP3D": _Entry("networks.Rep3D.network_backbone:REP3D", {"modulation": "lrbm"}, "Rep3D with LRBM (the paper's model)", deployable=True),
    "REP3D_FixedPrior": _Entry("networks.Rep3D.network_backbone:REP3D", {"modulation": "fixed"}, "Rep3D, M = P (ablation)", deployable=True),
    "REP3D_Vanilla": _Entry("networks.Rep3D.network_backbone:REP3D", {"modulation": "none"}, "Rep3D blocks, plain 21^3 kernel (ablation)", deployable=True),
    "3DUXNET": _Entry("networks.UXNet_3D.network_backbone:UXNET", {}, "3D UX-Net, kernel 7", deployable=True),
    "3DUXNET_K21": _Entry("networks.UXNet_3D.network_backbone:UXNET", {"kernel_size": 21}, "3D UX-Net, kernel 21 (ablation)", deployable=True),
    "3DUXNET_LRBM": _Entry("networks.UXNet_3D.network_backbone:UXNET", {"modulation": "lrbm"}, "3D UX-Net with the LRBM mask (ablation)", deployable=True),
    "SwinUNETR": _Entry("networks.monai_nets:build_swin_unetr", {}, "MONAI SwinUNETR, feature size 48"),
    "UNETR": _Entry("networks.monai_nets:build_unetr", {}, "MONAI UNETR, feature size 16, hidden 768"),
    "nnFormer": _Entry("networks.nnFormer.nnFormer:nnFormer", {}, "nnFormer, crop 96, embed 192"),
    "TransBTS": _Entry("networks.TransBTS.TransBTS:TransBTS", {}, "TransBTS, img 96, embed 512"),
}

NETWORK_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def canonical_name(name: str) -> str:
    """Registry name for ``name`` (case-insensitive); ValueError listing the choices otherwise."""
    for key in _REGISTRY:
        if key.lower() == str(name).lower():
            return key
    raise ValueError(f"unknown network {name!r}; choose one of: {', '.join(NETWORK_NAMES)}.")


def _constructor(entry: _Entry):
    module, attr = entry.target.split(":")
    return getattr(importlib.import_module(module), attr)


def build_network(name: str, in_channels: int = 1, out_channels: int = 16, **overrides: Any) -> nn.Module:
    """Build a registered network with the paper's defaults.

    Args:
        name: one of :data:`NETWORK_NAMES` (case-insensitive).
        in_channels: image channels.
        out_channels: classes, background included.
        overrides: constructor keywords replacing the defaults, e.g. ``modulation``, ``kernel_size``,
            ``deploy`` for REP3D; ``dwconv`` (``"auto"``/``"native"``/``"fft"``) for the networks with
            large depthwise kernels. ``None`` values are ignored, so CLI defaults can pass through.
    """
    key = canonical_name(name)
    entry = _REGISTRY[key]
    kwargs = dict(entry.defaults)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    ctor = _constructor(entry)
    try:
        return ctor(in_channels=in_channels, out_channels=out_channels, **kwargs)
    except TypeError as err:  # an override the constructor does not know
        raise ValueError(f"network {key} does not accept these options: {err}") from None


def network_accepts(name: str, keyword: str) -> bool:
    """Whether the constructor of network ``name`` takes the keyword ``keyword`` (e.g. ``img_size``)."""
    return keyword in inspect.signature(_constructor(_REGISTRY[canonical_name(name)])).parameters


def check_roi(model: nn.Module, roi: Sequence[int], in_channels: int = 1) -> None:
    """Raise the network's own ValueError (naming a usable ``--roi``) if it cannot take crops of size
    ``roi``, without running it: lets a script fail before loading any data. Networks built for one
    input size (UNETR, nnFormer, TransBTS) check their ``img_size`` when constructed."""
    check = getattr(_unwrap(model), "check_input", None)
    if check is not None:
        check(torch.empty((1, in_channels, *[int(r) for r in roi]), device="meta"))


def is_deployable(name: str) -> bool:
    """Whether the network has re-parameterisable (foldable) blocks and a ``deploy`` flag."""
    return _REGISTRY[canonical_name(name)].deployable


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every re-parameterisable module of ``model`` (LRBM masks into kernels) for inference.

    Args:
        model: any network; modules without a ``reparameterize`` method are left alone.
        inplace: fold ``model`` itself instead of a deep copy. Defaults to False.

    Returns:
        The folded model (``model`` itself when ``inplace``). Folding twice is harmless.
    """
    model = _unwrap(model)
    if not inplace:
        model = copy.deepcopy(model)
    for module in list(model.modules()):
        if module is not model and hasattr(module, "reparameterize"):
            module.reparameterize()
    if hasattr(model, "reparameterize") and callable(model.reparameterize):
        model.reparameterize()
    return model


# --------------------------------------------------------------------------------------------------
# checkpoints


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into (message says what to change)."""


_PREFIXES = ("module.", "_orig_mod.")
# Reference-release REP3D layout: the generator sits on the block, the prior is a per-channel map.
_REF_GENERATOR = re.compile(r"^(.*)\.(prior_conv\d*|norm_w\d*)\.(weight|bias)$")
_REF_PRIOR = re.compile(r"^(.*)\.prior_map$")


def checkpoint_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint object (ours, the reference releases', or a bare one)."""
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "network_weights", "net"):
            if key in checkpoint and isinstance(checkpoint[key], Mapping):
                return checkpoint_state_dict(checkpoint[key])
        if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            state = dict(checkpoint)
            for prefix in _PREFIXES:  # DDP / torch.compile wrappers
                if state and all(k.startswith(prefix) for k in state):
                    state = {k[len(prefix) :]: v for k, v in state.items()}
            return state
    raise CheckpointError("the checkpoint holds no model state dict (expected a dict of tensors or a 'state_dict' entry).")


def read_checkpoint(path: str) -> Any:
    """``torch.load`` with ``weights_only=True`` and a clear message for missing or corrupt files."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; pass the .pth written by main_train.py.") from None
    except Exception as err:  # noqa: BLE001 - unpickling raises many types
        # torch's own text suggests weights_only=False, which is wrong advice for an untrusted or broken file.
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        reason = type(err).__name__ if not first or "weights_only" in first else first
        raise CheckpointError(
            f"could not read checkpoint {path} ({reason}): it is not a PyTorch checkpoint of tensors, or it is "
            "truncated; copy it again, or pass the .pth that main_train.py wrote."
        ) from None


def is_reference_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """A checkpoint of the authors' release (prior_map buffers, generator on the block)."""
    return any(_REF_PRIOR.match(k) for k in state)


def is_unfolded(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` is a training (unfolded) checkpoint of ours: its kernels are W, not W * M."""
    return not is_reference_layout(state) and any(".modulation." in k for k in state)


def unfolded_modulation(state: Mapping[str, torch.Tensor]) -> str | None:
    """``"lrbm"`` or ``"fixed"`` for an unfolded checkpoint of ours, else None."""
    if not is_unfolded(state):
        return None
    return "lrbm" if any(".modulation.generator." in k for k in state) else "fixed"


def _from_reference_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the reference release's generator and prior entries. Its stored kernels already act as
    W_eff (its training path re-binds the weight to W * M), so it loads as a folded model; its
    generator is not reusable (its LayerNorm over one channel made the output a constant)."""
    return {k: v for k, v in state.items() if not (_REF_PRIOR.match(k) or _REF_GENERATOR.match(k))}


def _unfold_loaded_kernels(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Folded kernels (W * M) loaded into a model that modulates its kernels: store W = W_eff / M,
    so that the model's effective kernels start equal to the loaded ones instead of being masked twice."""
    from .Rep3D.lrbm import ModulatedDepthwiseConv3d

    for name, module in model.named_modules():
        if isinstance(module, ModulatedDepthwiseConv3d) and module.modulation is not None and f"{name}.weight" in state:
            with torch.no_grad():
                mask = module.modulation().to(module.weight.dtype)
                if mask.abs().min() < 1e-6:
                    raise CheckpointError(f"cannot unfold the loaded kernel of {name}: its mask has (near-)zero entries.")
                module.weight.div_(mask)


def load_network_weights(model: nn.Module, checkpoint: Any, strict: bool = True) -> nn.Module:
    """Load weights into ``model`` from a path or a checkpoint object, checking every tensor.

    Accepts our checkpoints (full training checkpoints or bare state dicts), ``module.``-prefixed
    (DDP) ones and the reference releases' layouts. ``strict`` requires every model tensor to be
    present; shapes must always match. Raises :class:`CheckpointError` with what to change.

    A folded checkpoint (deployed, or the reference release's) loaded into a model that modulates its
    kernels (training mode, e.g. to fine-tune) keeps the generator's initial weights and stores
    W = W_eff / M, so that the effective kernels equal the loaded ones.
    """
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        checkpoint = read_checkpoint(str(checkpoint))
    state = checkpoint_state_dict(checkpoint)
    target = _unwrap(model)
    own = target.state_dict()
    if is_reference_layout(state):
        state = _from_reference_layout(state)
    folded_source = not is_unfolded(state)
    if is_unfolded(state) and not any(".modulation." in k for k in own):
        raise CheckpointError(
            f"the checkpoint is a training (unfolded, modulation={unfolded_modulation(state)}) checkpoint but the model "
            "is folded (deploy): build the training model, load it, then fold it with networks.reparameterize_model "
            "(networks.build_deploy_network does this)."
        )
    mismatched = [
        f"  {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        hint = ""
        if any(line.strip().startswith("out.") for line in mismatched):
            hint = " The output layer differs: the checkpoint was trained for another class count (check --dataset / --num_classes)."
        raise CheckpointError(
            "checkpoint tensors do not fit the model (different network or settings?)." + hint + "\n" + "\n".join(mismatched[:20])
        )
    missing = sorted(set(own) - set(state))
    if folded_source:  # a folded checkpoint has no generator or prior: those keep their initial values
        missing = [k for k in missing if ".modulation." not in k]
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint does not match the model: {len(missing)} missing tensors (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). Check --network and its options "
            "(--modulation, --kernel_size) against those the checkpoint was trained with."
        )
    target.load_state_dict(state, strict=False)
    if folded_source:
        _unfold_loaded_kernels(target, state)
    return model


def build_deploy_network(
    name: str, in_channels: int, out_channels: int, checkpoint: Any = None, **overrides: Any
) -> nn.Module:
    """Build ``name`` for inference and load ``checkpoint`` into it, folding on the way if needed.

    A training checkpoint of ours (unfolded) is loaded into a training-mode twin and folded with
    :func:`reparameterize_model`; folded and reference-layout checkpoints load into the deploy model
    directly. Networks without foldable blocks are built and loaded as they are. Returns the model in
    eval mode.
    """
    if checkpoint is not None and (isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__")):
        checkpoint = read_checkpoint(str(checkpoint))
    state = checkpoint_state_dict(checkpoint) if checkpoint is not None else None
    overrides = dict(overrides)
    if is_deployable(name):
        mod = unfolded_modulation(state) if state is not None else None
        if mod is not None:
            overrides.update(deploy=False, modulation=mod)
            model = load_network_weights(build_network(name, in_channels, out_channels, **overrides), state)
            return reparameterize_model(model, inplace=True).eval()
        overrides["deploy"] = True
    model = build_network(name, in_channels, out_channels, **overrides)
    if state is not None:
        load_network_weights(model, state)
    return model.eval()

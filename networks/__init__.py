"""Network registry: every script and test builds its networks here.

    net = build_network("REP3D", in_channels=1, out_channels=16, modulation="lrbm")
    deployed = reparameterize_model(net)            # folded copy for inference
    load_network_weights(deployed, "best_metric_model.pth")

The registry is also the one place that says which options a network takes
(:func:`network_options`) and whether it only takes inputs of the size it was built for
(:func:`fixed_input_size`); scripts ask it instead of keeping their own lists.
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
from .Rep3D.lrbm import LRBMConfig, ModulatedDepthwiseConv3d

__all__ = [
    "DWCONV_IMPLS",
    "NETWORK_NAMES",
    "CheckpointError",
    "LRBMConfig",
    "build_network",
    "build_deploy_network",
    "canonical_name",
    "check_roi",
    "checkpoint_state_dict",
    "fixed_input_size",
    "load_network_weights",
    "network_accepts",
    "network_options",
    "network_target",
    "reparameterize_model",
    "supports_deep_supervision",
    "set_dwconv_impl",
    "unwrap_model",
]


@dataclass(frozen=True)
class _Entry:
    target: str  # "module:Class"
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    #: The options a user sets for this network (command-line flags), each a keyword of the constructor
    #: with the meaning the flag has for every network that takes it (e.g. ``feature_size`` = the four
    #: encoder stage widths, so SwinUNETR, whose ``feature_size`` is one int, does not list it).
    #: ``img_size`` means "pass the ROI". Other constructor keywords stay accepted by build_network.
    options: tuple[str, ...] = ()
    #: Takes only inputs of exactly ``img_size`` (a learned positional embedding, fixed windows).
    fixed_input_size: bool = False
    #: Has re-parameterisable (foldable) blocks and a ``deploy`` flag (set by build_deploy_network).
    deployable: bool = False
    #: Takes ``deep_supervision=True`` (extra segmentation heads; a list of outputs in training mode).
    deep_supervision: bool = False


# The large-kernel networks: encoder shape, decoder bottleneck, and the kernel / LRBM settings that make
# their LRBMConfig.
_LARGE_KERNEL_OPTIONS = (
    "modulation", "kernel_size", "dwconv", "feature_size", "depths", "hidden_size",
    "beta", "generator_kernel_size", "generator_depth",
)
_REP3D = "networks.Rep3D.network_backbone:REP3D"
_UXNET = "networks.UXNet_3D.network_backbone:UXNET"

_REGISTRY: dict[str, _Entry] = {
    "REP3D": _Entry(_REP3D, {"modulation": "lrbm"}, "Rep3D with LRBM (the paper's model)", _LARGE_KERNEL_OPTIONS, deployable=True),
    "REP3D_FixedPrior": _Entry(_REP3D, {"modulation": "fixed"}, "Rep3D, M = P (ablation)", _LARGE_KERNEL_OPTIONS, deployable=True),
    "REP3D_Vanilla": _Entry(_REP3D, {"modulation": "none"}, "Rep3D blocks, plain 21^3 kernel (ablation)", _LARGE_KERNEL_OPTIONS, deployable=True),
    "3DUXNET": _Entry(_UXNET, {}, "3D UX-Net, kernel 7", _LARGE_KERNEL_OPTIONS, deployable=True),
    "3DUXNET_K21": _Entry(_UXNET, {"kernel_size": 21}, "3D UX-Net, kernel 21 (ablation)", _LARGE_KERNEL_OPTIONS, deployable=True),
    "3DUXNET_LRBM": _Entry(_UXNET, {"modulation": "lrbm"}, "3D UX-Net with the LRBM mask (ablation)", _LARGE_KERNEL_OPTIONS, deployable=True),
    # img_size is only checked (multiples of 32): SwinUNETR takes any such size.
    "SwinUNETR": _Entry("networks.monai_nets:build_swin_unetr", {}, "MONAI SwinUNETR, feature size 48", ("img_size",)),
    "UNETR": _Entry("networks.monai_nets:build_unetr", {}, "MONAI UNETR, feature size 16, hidden 768", ("img_size",), fixed_input_size=True),
    "nnFormer": _Entry("networks.nnFormer.nnFormer:nnFormer", {}, "nnFormer, crop 96, embed 192", ("img_size",), fixed_input_size=True),
    "TransBTS": _Entry("networks.TransBTS.TransBTS:TransBTS", {}, "TransBTS, img 96, embed 512", ("img_size",), fixed_input_size=True),
    # img_size plans the topology; the network then takes any multiple of its total stride.
    "nnUNet": _Entry("networks.monai_nets:build_nnunet", {}, "nnU-Net 3d_fullres topology for the ROI (MONAI DynUNet)", ("img_size",), deep_supervision=True),
    "UNet3D": _Entry("networks.monai_nets:build_unet3d", {}, "3D U-Net (MONAI UNet, 16-256 channels, 2 residual units)"),
    "MedNeXt": _Entry("networks.monai_nets:build_mednext", {}, "MONAI MedNeXt, variant B, kernel 3", ("variant", "kernel_size")),
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


def network_options(name: str) -> tuple[str, ...]:
    """The options a user can set for network ``name`` (case-insensitive), as keywords of
    :func:`build_network`: e.g. ``("modulation", "kernel_size", "dwconv", "feature_size", "depths",
    "hidden_size", ...)`` for REP3D, ``("img_size",)`` for UNETR. Each has the same meaning for every
    network that lists it; ``img_size`` means "pass the ROI" (see :func:`fixed_input_size`)."""
    return _REGISTRY[canonical_name(name)].options


def fixed_input_size(name: str) -> bool:
    """Whether network ``name`` takes only inputs of exactly the ``img_size`` it was built with (UNETR,
    nnFormer, TransBTS), so that sliding-window inference must use that window. Networks that list
    ``img_size`` in :func:`network_options` without being fixed-size use it to check or plan for the ROI."""
    return _REGISTRY[canonical_name(name)].fixed_input_size


def network_target(name: str) -> tuple[str, str, dict[str, Any]]:
    """Where network ``name``'s constructor lives and the defaults the registry gives it:
    ``(module, attribute, defaults)``, e.g. ``("networks.Rep3D.network_backbone", "REP3D",
    {"modulation": "lrbm"})``. ``build_network(name, ...)`` calls ``module.attribute(in_channels=...,
    out_channels=..., **{**defaults, **overrides})``; a MONAI bundle's ``network_def`` names the same."""
    entry = _REGISTRY[canonical_name(name)]
    module, attr = entry.target.split(":")
    return module, attr, dict(entry.defaults)


def _accepted_keywords(ctor) -> set[str] | None:
    """Keyword parameters of ``ctor``; None when it also takes ``**kwargs`` (the callee decides)."""
    params = inspect.signature(ctor).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def _unknown_options(key: str, names: Sequence[str]) -> ValueError:
    entry = _REGISTRY[key]
    takes = f"its options are {', '.join(entry.options)}" if entry.options else "it has no options"
    return ValueError(
        f"network {key} does not accept {', '.join(sorted(names))}: {takes} "
        f"(and the other keywords of its constructor, {entry.target.replace(':', '.')})."
    )


def build_network(name: str, in_channels: int = 1, out_channels: int = 16, **overrides: Any) -> nn.Module:
    """Build a registered network with the paper's defaults.

    Args:
        name: one of :data:`NETWORK_NAMES` (case-insensitive).
        in_channels: image channels.
        out_channels: classes, background included.
        overrides: constructor keywords replacing the defaults: the options of :func:`network_options`
            (e.g. ``modulation``, ``kernel_size`` for REP3D; ``img_size`` for UNETR), ``deploy`` for the
            deployable networks, or any other keyword of the network's constructor. ``None`` values are
            ignored, so CLI defaults can pass through.

    Raises:
        ValueError: an unknown network, a keyword the network does not take (naming its options), or a
            bad value (the network's own message).
    """
    key = canonical_name(name)
    entry = _REGISTRY[key]
    kwargs = dict(entry.defaults)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    ctor = _constructor(entry)
    accepted = _accepted_keywords(ctor)
    if accepted is not None and set(kwargs) - accepted:
        raise _unknown_options(key, list(set(kwargs) - accepted))
    try:
        return ctor(in_channels=in_channels, out_channels=out_channels, **kwargs)
    except TypeError as err:
        # A keyword that a **kwargs constructor handed on to a class that does not know it.
        match = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if match is None:
            raise
        raise _unknown_options(key, [match.group(1)]) from None


def network_accepts(name: str, keyword: str) -> bool:
    """Whether the constructor of network ``name`` takes the keyword ``keyword`` (e.g. ``img_size``)."""
    return keyword in inspect.signature(_constructor(_REGISTRY[canonical_name(name)])).parameters


def check_roi(model: nn.Module, roi: Sequence[int], in_channels: int = 1) -> None:
    """Raise the network's own ValueError (naming a usable ``--roi``) if it cannot take crops of size
    ``roi``, without running it: lets a script fail before loading any data. Networks built for one
    input size (UNETR, nnFormer, TransBTS) check their ``img_size`` when constructed."""
    check = getattr(unwrap_model(model), "check_input", None)
    if check is not None:
        check(torch.empty((1, in_channels, *[int(r) for r in roi]), device="meta"))


def supports_deep_supervision(name: str) -> bool:
    """Whether network ``name`` can be built with ``deep_supervision=True`` (nnUNet)."""
    return _REGISTRY[canonical_name(name)].deep_supervision


def is_deployable(name: str) -> bool:
    """Whether the network has re-parameterisable (foldable) blocks and a ``deploy`` flag."""
    return _REGISTRY[canonical_name(name)].deployable


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare network inside DDP / DataParallel / ``torch.compile`` wrappers (nested ones too); ``model``
    itself when unwrapped. The one unwrap helper: use it to save, load, fold or inspect a model."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every re-parameterisable module of ``model`` (LRBM masks into kernels) for inference.

    Args:
        model: any network; modules without a ``reparameterize`` method are left alone.
        inplace: fold ``model`` itself instead of a deep copy. Defaults to False.

    Returns:
        The folded model (``model`` itself when ``inplace``). Folding twice is harmless.
    """
    model = unwrap_model(model)
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
    target = unwrap_model(model)
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

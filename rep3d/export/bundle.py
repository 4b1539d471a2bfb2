"""Export a checkpoint, or the folds of a cross-validation run, as a MONAI bundle.

    python export_model.py --trained_weights runs/demo/best_metric_model.pth --output bundles/rep3d_demo --format bundle
    python export_model.py --trained_weights runs/amos_cv --output bundles/rep3d_amos --format bundle   # fold ensemble

The bundle follows MONAI's bundle specification and runs with MONAI alone (this repository need not be
on the path): ``python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR
--dataset_dir IMAGES --output_dir OUT``. Written to ``DIR``:

* ``configs/metadata.json``: versions, task, authors, copyright, licence, and ``network_data_format``
  (the network's input: channels, window shape, value range, channel names; its output: one channel
  per class, with the class names), plus the input convention and where the weights came from.
* ``configs/inference.json``: the training run's pre-processing as MONAI transforms (``LoadImaged``,
  ``EnsureChannelFirstd``, ``Spacingd``, ``Orientationd`` RAS, the intensity scheme and the foreground
  crop, in the order the run used), MONAI's sliding-window inferer with the run's ROI and overlap,
  softmax and argmax, ``Invertd`` back to each input's grid and ``SaveImaged``; the ids MONAI Label's
  bundle app reads (``network_def``, ``preprocessing``, ``inferer``, ``postprocessing``, ``device``,
  ``bundle_root``) are there.
* ``models/model.pt``: the state dict of the folded (deploy) network; for a fold ensemble, that of
  ``scripts.ensemble.FoldEnsemble``, each fold's weights under ``members.<i>.``. With TorchScript also
  ``models/model.ts`` (one model only).
* ``scripts/``: the code the configs name: the network's sources copied from ``networks/`` (only the
  modules it imports, each checked to import nothing but PyTorch, MONAI, NumPy, einops and the standard
  library), the case listing (:mod:`rep3d.export.bundle_scripts.datalist`), the fold ensemble when
  there are several checkpoints, and the per-channel normalisation (:mod:`rep3d.data.intensity`)
  when the channels are normalised differently.
* ``docs/README.md`` (how to run it, with MONAI, MONAI Label and 3D Slicer), ``configs/logging.conf``
  and ``LICENSE`` (MIT, the project's).

After writing, the bundle is checked in this process: its ``network_def`` is built from the copied
sources, loads ``models/model.pt`` strictly and must give the outputs of the folded checkpoint(s)
within :data:`rep3d.export.exporter.TOLERANCE`; the other config items must instantiate.
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import importlib.metadata
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence

import monai
import numpy as np
import torch
import torch.nn as nn
from monai.bundle import ConfigParser
from monai.data import save_net_with_metadata

import networks
from rep3d.data.dataset_config import DatasetConfig
from rep3d.data.intensity import get_scheme
from rep3d.export.bundle_docs import LICENSE_FILE, bundle_readme, logging_conf
from rep3d.export.exporter import (
    TOLERANCE,
    deploy_model,
    export_torchscript,
    relative_error,
)
from rep3d.fileio import atomic_path, jsonable, sha256_of, write_json, write_text_atomic
from rep3d.inference.checkpoint import (
    check_ensemble,
    expand_weights,
    resolve_checkpoint,
)
from rep3d.inference.exported import ExportError

#: Version written to a new bundle's metadata (``--bundle_version`` sets another).
DEFAULT_VERSION = "0.1.0"

#: The bundle metadata schema of MONAI's model zoo; ``verify_metadata`` downloads it from here.
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"

#: Top-level packages the code copied into a bundle may import (besides the standard library).
ALLOWED_IMPORTS = ("torch", "monai", "numpy", "einops")

_TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundle_scripts")
_INTENSITY_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "intensity.py")
_NETWORKS_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(networks.__file__)))
_RAS_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]


# ---------------------------------------------------------------------------------------- sources


def _module_file(module: str, root: str) -> str | None:
    base = os.path.join(root, *module.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _imports(path: str) -> Iterator[tuple[int, str, list[str], str]]:
    """``(level, module or "", names, "line N")`` of every import in the file (functions included)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name, [], f"line {node.lineno}"
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", [a.name for a in node.names], f"line {node.lineno}"


def _foreign(name: str) -> bool:
    top = name.partition(".")[0]
    return top not in ALLOWED_IMPORTS and top not in sys.stdlib_module_names and top != "__future__"


def source_closure(module: str, root: str = _NETWORKS_ROOT, package: str = "networks") -> list[str]:
    """The files (relative to ``root``) that importing ``module`` runs, within ``package``: the module,
    what it imports relatively, and the ``__init__`` of every sub-package on the way (the top
    package's own ``__init__``, the registry, is left out: the bundle gets a stub).

    Raises:
        ExportError: a file imports a third-party package other than :data:`ALLOWED_IMPORTS`, imports
            ``package`` absolutely (the copy lives under ``scripts.``) or takes a name from the top
            package's ``__init__``; the message names the file and the statement.
    """
    seen: dict[str, str] = {}
    todo = [module]
    problems = []
    while todo:
        mod = todo.pop()
        parts = mod.split(".")
        for i in range(2, len(parts)):  # sub-package __init__ files run first
            if ".".join(parts[:i]) not in seen:
                todo.append(".".join(parts[:i]))
        path = _module_file(mod, root)
        if path is None or mod in seen or mod == package:
            continue
        seen[mod] = path
        rel = os.path.relpath(path, root)
        pkg = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        for level, name, names, text in _imports(path):
            if level == 0:
                if name.partition(".")[0] == package:
                    problems.append(f"{rel}: {text}: an absolute import of {package}; make it relative (the bundle's copy is scripts.{package})")
                elif _foreign(name):
                    problems.append(f"{rel}: {text}: imports {name.partition('.')[0]}, which a MONAI bundle cannot count on (allowed: {', '.join(ALLOWED_IMPORTS)}, the standard library)")
                continue
            base = pkg.split(".")[: len(pkg.split(".")) - (level - 1)]
            target = ".".join(base + ([name] if name else []))
            for n in names:
                if _module_file(f"{target}.{n}", root) is not None:
                    todo.append(f"{target}.{n}")
                elif target == package:
                    problems.append(f"{rel}: {text}: takes {n} from {package}/__init__.py, which the bundle does not carry; import it from its module")
                else:
                    todo.append(target)
            if not names:
                todo.append(target)
    if problems:
        raise ExportError("the network's sources cannot go into a bundle:\n" + "\n".join(f"  - {p}" for p in problems))
    return sorted(os.path.relpath(p, root) for p in seen.values())


def check_standalone(path: str) -> None:
    """Refuse a file for ``scripts/`` that imports anything but :data:`ALLOWED_IMPORTS` and the standard library."""
    bad = [f"{text} imports {name}" for level, name, _, text in _imports(path) if level == 0 and _foreign(name)]
    if bad:
        raise ExportError(f"{path} cannot go into a bundle: {'; '.join(bad)} (allowed: {', '.join(ALLOWED_IMPORTS)}, the standard library)")


def _copy(src: str, dst: str) -> None:
    check_standalone(src)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


# ---------------------------------------------------------------------------------------- configs


def network_def(resolved: dict) -> dict:
    """The ``network_def`` of one resolved checkpoint: its constructor under ``scripts.``, deploy form."""
    name = resolved["network"]
    module, attr, defaults = networks.network_target(name)
    kwargs = {**defaults, **{k: v for k, v in resolved["network_kwargs"].items() if k not in ("dwconv", "deploy")}}
    if networks.is_deployable(name):
        kwargs["deploy"] = True
    if networks.network_accepts(name, "dwconv"):
        kwargs["dwconv"] = "auto"  # the same weights; the faster path on the device it runs on
    return jsonable({"_target_": f"scripts.{module}.{attr}", "in_channels": resolved["in_channels"], "out_channels": resolved["out_channels"], **kwargs})


def _uniform_intensity(cfg: DatasetConfig) -> dict:
    """MONAI's transform for a scheme shared by every channel (what rep3d.data.transforms uses)."""
    params = cfg.channel_norms()[0]
    if cfg.intensity == "window":
        return {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": params["a_min"], "a_max": params["a_max"], "b_min": 0.0, "b_max": 1.0, "clip": True}
    if cfg.intensity == "zscore":
        return {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}
    raise ExportError(f"intensity scheme {cfg.intensity!r} has no MONAI transform in the bundle exporter; add it to rep3d/export/bundle.py")


def intensity_and_crop(cfg: DatasetConfig) -> list[dict]:
    """Normalisation and foreground crop, in the order of ``rep3d.data.transforms``' chain."""
    if cfg.normalization is not None:
        thresholds = [float(get_scheme(n["scheme"]).foreground_threshold(n)) for n in cfg.channel_norms()]
        select = f"$lambda x: x > torch.as_tensor({thresholds}, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)"
        crop = {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "select_fn": select, "allow_smaller": True}
        return [crop, {"_target_": "scripts.intensity.NormalizeChannelsd", "keys": "image", "norms": jsonable(cfg.channel_norms())}]
    crop = {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "allow_smaller": True}
    norm = _uniform_intensity(cfg)
    return [norm, crop] if get_scheme(cfg.intensity).normalise_then_crop else [crop, norm]


def inference_config(members: Sequence[dict], cfg: DatasetConfig) -> dict:
    """``configs/inference.json`` for the resolved checkpoints (several: a fold ensemble)."""
    sw = members[0]["sliding_window"]
    defs = [network_def(m) for m in members]
    ensemble = len(members) > 1
    preprocessing = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": list(cfg.spacing), "mode": "bilinear"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": _RAS_LABELS},
        *intensity_and_crop(cfg),
    ]  # fmt: skip
    window = {"sw_batch_size": int(sw["sw_batch_size"]), "overlap": float(sw["overlap"]), "mode": sw["mode"]}
    if ensemble:
        inferer = {"_target_": "scripts.ensemble.EnsembleSlidingWindowInferer", "roi_sizes": [list(m["cfg"].roi) for m in members], **window}
        post = []  # the ensemble inferer returns probabilities
    else:
        inferer = {"_target_": "SlidingWindowInferer", "roi_size": list(cfg.roi), **window}
        post = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
    post += [
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image", "nearest_interp": True, "to_tensor": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg", "output_ext": ".nii.gz",
         "output_dtype": "$numpy.uint8" if cfg.num_classes <= 256 else "$numpy.uint16", "resample": False, "separate_folder": False,
         "squeeze_end_dims": True, "output_name_formatter": {"_target_": "scripts.datalist.case_name", "_mode_": "callable"}},
    ]  # fmt: skip
    return {
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/images'",
        "in_channels": members[0]["in_channels"],
        "datalist": {"_target_": "scripts.datalist.cases", "folder": "@dataset_dir", "in_channels": "@in_channels"},
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "scripts.ensemble.FoldEnsemble", "members": defs} if ensemble else defs[0],
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 0},
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'", "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader", "network": "@network",
            "inferer": "@inferer", "postprocessing": "@postprocessing", "val_handlers": "@handlers", "amp": False,
        },  # fmt: skip
        "run": ["$@evaluator.run()"],
    }


# ---------------------------------------------------------------------------------------- metadata


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _modality(cfg: DatasetConfig) -> str:
    """The spec's modality ("CT", "MR"); for channels of different kinds, their names joined by "+"."""
    kinds = {get_scheme(n["scheme"]).modality for n in cfg.channel_norms()}
    return {"CT": "CT", "MRI": "MR"}.get(kinds.pop(), "n/a") if len(kinds) == 1 else "+".join(cfg.channel_names)


def _spatial_shape(members: Sequence[dict], model: nn.Module) -> list:
    """The window shape in the spec's notation: for networks of a size divisor d, multiples of d from 2d
    on ("d*n+d": one voxel at the bottleneck cannot be instance-normalised) where the ROI allows,
    else the ROI itself."""
    d = getattr(networks.unwrap_model(model), "size_divisor", None)
    roi = list(members[0]["cfg"].roi)
    if d and not any(networks.fixed_input_size(m["network"]) for m in members):
        return [f"{int(d)}*n+{int(d)}" if r >= 2 * d else f"{int(d)}*n" for r in roi]
    return roi


def input_convention(cfg: DatasetConfig) -> str:
    """The files a bundle takes per case (also the README's wording)."""
    if cfg.in_channels == 1:
        return "one 3-D image file per case (NIfTI, or NRRD / MetaImage where MONAI has their readers)"
    names = ", ".join(f"{i}: {n}" for i, n in enumerate(cfg.channel_names))
    return (
        f"{cfg.in_channels} channels ({names}) per case: either one 4-D file whose last axis holds them in this order, "
        f"or one file per channel named <case>_0000.nii.gz ... <case>_{cfg.in_channels - 1:04d}.nii.gz (nnU-Net's naming); "
        "MONAI Label sends one file per image, so use 4-D files there"
    )


def bundle_metadata(members: Sequence[dict], cfg: DatasetConfig, model: nn.Module, name: str, version: str, authors: str, copyright: str) -> dict:
    """``configs/metadata.json``: every key MONAI's bundle specification requires, and Rep3D's record."""
    ensemble = len(members) > 1
    norms = cfg.channel_norms()
    window_only = cfg.normalization is None and cfg.intensity == "window"
    foreground = list(cfg.class_names[1:])
    what = f"{len(members)}-fold ensemble of {', '.join(sorted({m['network'] for m in members}))}" if ensemble else members[0]["network"]
    channels = {str(i): n for i, n in enumerate(cfg.channel_names)}
    classes = {str(i): n for i, n in enumerate(cfg.class_names)}
    # MONAI 1.6 reads "optional_packages_version" as the old name of "required_packages_version": the
    # packages only some inputs need are listed under rep3d instead.
    optional = {k: v for k, v in (("pynrrd", _version("pynrrd")), ("itk", _version("itk")), ("fire", _version("fire"))) if v}
    return jsonable({
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"exported by Rep3D's export_model.py --format bundle from {len(members)} checkpoint(s)"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": _version("nibabel") or "5.0", "pytorch-ignite": _version("pytorch-ignite") or "0.4.11"},
        "name": name,
        "task": f"3-D segmentation of {', '.join(foreground) or 'the foreground'} ({cfg.num_classes} classes with background)",
        "description": (
            f"{what} (Rep3D, deploy form: re-parameterised kernels folded), trained on dataset '{cfg.name}'. "
            f"Input: {input_convention(cfg)}. Pre-processing: resampling to {list(cfg.spacing)} mm, RAS orientation, "
            f"{'; '.join(get_scheme(n['scheme']).describe(n) for n in norms)}, crop to the foreground; sliding window "
            f"{'x'.join(map(str, cfg.roi))}. Output: one label map per case on the input's own grid."
        ),
        "authors": authors,
        "copyright": copyright,
        "license": "MIT",
        "intended_use": "research; not for clinical or diagnostic use",
        "data_source": f"the training run's dataset '{cfg.name}'",
        "data_type": "nibabel",
        "references": ["Lee et al., Spatially-Adaptive Gradient Re-parameterization for 3D Large Kernel Optimization, ICML 2026"],
        "image_classes": f"{cfg.in_channels} channel(s): {', '.join(cfg.channel_names)}; {input_convention(cfg)}",
        "pred_classes": f"{cfg.num_classes} channels, {'mean softmax probabilities of the folds' if ensemble else 'logits'}; argmax = class index: "
                        + ", ".join(f"{k} {v}" for k, v in classes.items()),  # fmt: skip
        "input_convention": input_convention(cfg),
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": _modality(cfg), "num_channels": cfg.in_channels,
                "spatial_shape": _spatial_shape(members, model), "dtype": "float32", "value_range": [0, 1] if window_only else [],
                "is_patch_data": True, "channel_def": channels,
            }},
            "outputs": {"pred": {
                "type": "image", "format": "labels", "modality": "n/a", "num_channels": cfg.num_classes, "spatial_shape": _spatial_shape(members, model),
                "dtype": "float32", "value_range": [0, 1] if ensemble else [], "is_patch_data": True, "channel_def": classes,
            }},
        },  # fmt: skip
        "rep3d": {
            "networks": [{"name": m["network"], "options": {k: v for k, v in m["network_kwargs"].items() if k != "dwconv"}, "roi": list(m["cfg"].roi)} for m in members],
            "checkpoints": [{"file": os.path.abspath(m["path"]), "sha256": sha256_of(m["path"])} for m in members],
            "spacing_mm": list(cfg.spacing),
            "normalisation": norms,
            "sliding_window": members[0]["sliding_window"],
            "optional_packages_version": optional,
            "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    })  # fmt: skip


# ---------------------------------------------------------------------------------------- export


def _ensemble_state(models: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    if len(models) == 1:
        return {k: v.detach().clone() for k, v in models[0].state_dict().items()}
    return {f"members.{i}.{k}": v.detach().clone() for i, m in enumerate(models) for k, v in m.state_dict().items()}


def _check_shape(members: Sequence[dict], models: Sequence[nn.Module]) -> tuple[int, ...]:
    """A small input every member takes: twice the size divisor (within the ROI), else the ROI."""
    shapes = set()
    for m, model in zip(members, models):
        divisor = getattr(networks.unwrap_model(model), "size_divisor", None)
        roi = tuple(m["cfg"].roi)
        shapes.add(tuple(min(r, 2 * int(divisor)) for r in roi) if divisor and not networks.fixed_input_size(m["network"]) else roi)
    return shapes.pop() if len(shapes) == 1 else tuple(members[0]["cfg"].roi)


@contextlib.contextmanager
def bundle_on_path(folder: str) -> Iterator[None]:
    """``folder`` first on ``sys.path`` with no ``scripts`` package imported, and none left afterwards
    (as MONAI Label loads bundles): a bundle's ``scripts`` is not mixed up with another's."""

    def unload() -> None:
        for key in [k for k in sys.modules if k == "scripts" or k.startswith("scripts.")]:
            del sys.modules[key]

    unload()
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)
        unload()


def check_bundle(folder: str, models: Sequence[nn.Module], shape: Sequence[int], in_channels: int) -> float:
    """Build the bundle's ``network_def`` from its own ``scripts/``, load ``models/model.pt`` strictly and
    compare with ``models`` (the folded checkpoints) on a random input; instantiate the other items.

    Returns:
        the max relative difference of the outputs.

    Raises:
        ExportError: an item that does not build, weights that do not load, or outputs beyond :data:`TOLERANCE`.
    """
    parser = ConfigParser()
    parser.read_config(os.path.join(folder, "configs", "inference.json"))
    parser.read_meta(os.path.join(folder, "configs", "metadata.json"))
    parser["bundle_root"] = folder
    with bundle_on_path(folder):
        try:
            net = parser.get_parsed_content("network_def", instantiate=True)
            net.load_state_dict(torch.load(os.path.join(folder, "models", "model.pt"), map_location="cpu", weights_only=True), strict=True)
            for item in ("preprocessing", "inferer", "postprocessing"):
                parser.get_parsed_content(item, instantiate=True)
        except Exception as err:  # noqa: BLE001 - any failure to build is the exporter's fault; say which
            raise ExportError(f"the bundle in {folder} does not build from its own configs ({type(err).__name__}: {str(err).strip()[:400]}); please report it") from None
        x = torch.randn((1, in_channels, *shape), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = net.eval()(x)
            if len(models) == 1:
                ref = models[0](x)
            else:
                ref = sum(torch.softmax(m(x).float(), dim=1) for m in models) / len(models)
    err = relative_error(got, ref)
    if not err <= TOLERANCE:
        raise ExportError(f"the bundle's network differs from the checkpoint's by {err:.2e} relative (> {TOLERANCE:g}); do not use {folder}")
    return err


def _clear_previous(output: str, torchscript: bool) -> None:
    """An earlier bundle in ``output`` (it has configs/metadata.json) loses what this export rewrites or
    no longer has: its ``scripts/`` (another network, or no ensemble now) and a ``models/model.ts``."""
    if not os.path.isfile(os.path.join(output, "configs", "metadata.json")):
        return
    shutil.rmtree(os.path.join(output, "scripts"), ignore_errors=True)
    if not torchscript and os.path.isfile(os.path.join(output, "models", "model.ts")):
        os.remove(os.path.join(output, "models", "model.ts"))


def write_torchscript(model: nn.Module, path: str, cfg: DatasetConfig, meta: dict, config: dict) -> str:
    """``models/model.ts``: the traced, frozen network with the bundle's metadata and inference config as
    extra files (MONAI's ``save_net_with_metadata``, as the bundle specification describes), checked
    against PyTorch on an input of the ROI; returns its SHA-256.

    Raises:
        ExportError: TorchScript's output differs from PyTorch's beyond :data:`TOLERANCE`.
    """
    example = torch.randn(1, cfg.in_channels, *cfg.roi, generator=torch.Generator().manual_seed(0))
    with atomic_path(path) as tmp:
        export_torchscript(model, tmp, example)
        frozen = torch.jit.load(tmp)
        with open(tmp, "wb") as f:  # the same module again, with the extra files
            save_net_with_metadata(frozen, f, meta_values=meta, more_extra_files={"inference.json": json.dumps(config).encode()})
    with torch.no_grad():
        err = relative_error(torch.jit.load(path)(example), model(example))
    if not err <= TOLERANCE:
        raise ExportError(f"{path}: TorchScript differs from PyTorch by {err:.2e} relative (> {TOLERANCE:g}); do not use it")
    return sha256_of(path)


def _license_text() -> tuple[str, str]:
    """The project's licence and its copyright line."""
    path = os.path.join(_NETWORKS_ROOT, LICENSE_FILE)
    if not os.path.isfile(path):
        raise ExportError(f"{path} is missing: the bundle carries the project's LICENSE; restore it from the repository")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip().lower().startswith("copyright")), "Copyright (c) the Rep3D authors")
    return text, line


def export_bundle(
    weights: str | Sequence[str],
    output: str,
    torchscript: bool = False,
    name: str | None = None,
    version: str = DEFAULT_VERSION,
    authors: str | None = None,
    flags: dict | None = None,
    check: bool = True,
) -> dict:
    """Write the MONAI bundle of a checkpoint, several, or a run folder (one model per fold sub-folder:
    a fold ensemble) to ``output``; returns its metadata.

    Args:
        weights: as ``test_seg.py --trained_weights``: checkpoint file(s) or a run folder.
        output: the bundle folder (its name is the bundle's name unless ``name`` is given).
        torchscript: also write ``models/model.ts`` (one model only), checked against PyTorch.
        name: the bundle's name in its metadata.
        version: the bundle's version.
        authors: the metadata's authors (default: those of the project's copyright line).
        flags: ``test_seg.py`` flag values for checkpoints without stored settings.
        check: build the written bundle and compare it with the checkpoints (:func:`check_bundle`);
            False only where the bundle is run and compared end to end anyway (the tests).

    Raises:
        ExportError: networks whose sources cannot travel, TorchScript of an ensemble, or a bundle that
            fails its check.
        InferenceError: checkpoints that cannot be read or ensembled (their message names them).
    """
    paths = expand_weights(weights)
    members = [resolve_checkpoint(p, dict(flags or {})) for p in paths]
    cfg = check_ensemble(members)
    if torchscript and len(members) > 1:
        raise ExportError(f"--format bundle torchscript: {len(members)} checkpoints make a fold ensemble, which is exported as model.pt only; drop torchscript")
    if cfg.num_classes > 65536:
        raise ExportError(f"{cfg.num_classes} classes do not fit the uint16 label files of SaveImaged")
    models = [deploy_model(m, "native") for m in members]
    output = os.path.abspath(output)
    license_text, copyright_line = _license_text()
    authors = authors or copyright_line.split(")", 1)[-1].strip(" 0123456789").strip() or "the Rep3D authors"
    bundle_name = name or os.path.basename(output.rstrip(os.sep))

    _clear_previous(output, torchscript)
    # scripts/: the network sources, then our helpers
    for m in members:
        module, _, _ = networks.network_target(m["network"])
        for rel in source_closure(module):
            _copy(os.path.join(_NETWORKS_ROOT, rel), os.path.join(output, "scripts", rel))
    write_text_atomic('"""Network sources copied from Rep3D\'s networks/ package (MIT licence); the configs name their modules directly."""\n',
                      os.path.join(output, "scripts", "networks", "__init__.py"))  # fmt: skip
    write_text_atomic('"""Code of this MONAI bundle (Rep3D, MIT licence): networks/, the case listing, the ensemble."""\n', os.path.join(output, "scripts", "__init__.py"))
    _copy(os.path.join(_TEMPLATES, "datalist.py"), os.path.join(output, "scripts", "datalist.py"))
    if len(members) > 1:
        _copy(os.path.join(_TEMPLATES, "ensemble.py"), os.path.join(output, "scripts", "ensemble.py"))
    if cfg.normalization is not None:
        _copy(_INTENSITY_SOURCE, os.path.join(output, "scripts", "intensity.py"))

    # models/, configs/, docs/
    meta = bundle_metadata(members, cfg, models[0], bundle_name, version, authors, copyright_line)
    config = inference_config(members, cfg)
    with atomic_path(os.path.join(output, "models", "model.pt"), fsync=True) as tmp:
        torch.save(_ensemble_state(models), tmp)
    files = {"models/model.pt": sha256_of(os.path.join(output, "models", "model.pt"))}
    if torchscript:
        files["models/model.ts"] = write_torchscript(models[0], os.path.join(output, "models", "model.ts"), cfg, meta, config)
    meta["rep3d"]["files"] = files
    write_json(config, os.path.join(output, "configs", "inference.json"))
    write_json(meta, os.path.join(output, "configs", "metadata.json"))
    write_text_atomic(logging_conf(), os.path.join(output, "configs", "logging.conf"))
    write_text_atomic(bundle_readme(meta, config, bundle_name), os.path.join(output, "docs", "README.md"))
    write_text_atomic(license_text, os.path.join(output, "LICENSE"))

    if not check:
        return meta
    err = check_bundle(output, models, _check_shape(members, models), cfg.in_channels)
    print(f"bundle {output}: network_def built from its scripts/ loads models/model.pt and equals the folded checkpoint"
          f"{'s (mean softmax)' if len(models) > 1 else ''} within {TOLERANCE:g} relative (max difference {err:.2e})")  # fmt: skip
    return meta

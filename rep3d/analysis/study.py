"""The ERF / kernel study of ``erf_analysis.py``: models from checkpoints or fresh, inputs, results."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

import networks
from rep3d.analysis.erf import (
    AREA_THRESHOLDS,
    effective_receptive_fields,
    plot_erf,
    plot_kernels,
    summarise_erf,
)
from rep3d.analysis.kernels import (
    CENTRE_FRACTION,
    PERIPHERY_FRACTION,
    encoder_stages,
    kernel_statistics,
)
from rep3d.checkpoints import build_model, read_run
from rep3d.config import RunConfig
from rep3d.data.cases import list_cases
from rep3d.data.dataset_config import get_dataset_config
from rep3d.data.transforms import get_val_transforms
from rep3d.fileio import jsonable, write_json
from rep3d.runtime import select_device

# Standard checkpoint names: a checkpoint is labelled by its run folder instead.
_RUN_FILES = ("best_metric_model.pth", "checkpoint_last.pth")


def _run_config(run: RunConfig | None, path: str) -> dict:
    """Network and dataset settings of a checkpoint of ours, in any format (its :class:`RunConfig` as
    :func:`rep3d.checkpoints.read_run` gives it)."""
    if run is None:
        raise ValueError(
            f"{path}: the checkpoint does not say which network it holds (a bare state dict, or the authors' "
            "release?); pass a checkpoint written by main_train.py (best_metric_model.pth or checkpoint_last.pth)."
        )
    return {
        "name": run.network.name,
        "in_channels": int(run.network.in_channels),
        "out_channels": int(run.network.out_channels),
        # Without dwconv and deploy: the analysis builds the training form and lets
        # networks.load_network_weights fit folded or unfolded weights into it.
        "options": dict(run.network.architecture),
        "dataset": run.data.dataset,
    }


def _real_crops(root: str, dataset: Any, roi: Sequence[int], cases: int, in_channels: int) -> list[torch.Tensor]:
    """Centre crops (padded where smaller) of size ``roi`` of the first ``cases`` validation images,
    pre-processed as ``dataset`` (a ``load_datasets_transforms.DatasetConfig``) says."""
    from monai.transforms import ResizeWithPadOrCrop

    items = list_cases(root, "val")[:cases]
    if not items:
        raise ValueError(f"--root {root}: no validation cases found (imagesVal/labelsVal or a fold of imagesTr).")
    transform = get_val_transforms(dataset)
    crop = ResizeWithPadOrCrop(spatial_size=tuple(int(r) for r in roi))
    out = []
    for item in items:
        image = crop(transform(dict(item))["image"])
        image = torch.as_tensor(np.asarray(image), dtype=torch.float32)
        if image.shape[0] != in_channels:
            raise ValueError(f"{item['image']}: {image.shape[0]} channels, but the network takes {in_channels}.")
        out.append(image[None])
    return out


@dataclass
class ErfConfig:
    """Settings of one analysis run (what :func:`main` parses).

    Args:
        sources: checkpoint paths, or registry network names (untrained, built with ``network_options``).
        output: output folder.
        root: dataset folder for real crops (validation split); None uses random inputs in [0, 1).
        cases: inputs averaged per network. Defaults to 4.
        roi: input crop size; defaults to the checkpoint's dataset ROI, else (96, 96, 96).
        dataset: dataset preset for sources without dataset settings (untrained networks) when ``root``.
        labels: one plot label per source; defaults to the run folder / file / network name.
        seed: seed of the random inputs and the untrained networks' initialisation.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        network_options: ``build_network`` keywords for untrained networks (feature_size, kernel_size, ...).
    """

    sources: list[str]
    output: str
    root: str | None = None
    cases: int = 4
    roi: tuple[int, int, int] | None = None
    dataset: str | None = None
    labels: list[str] | None = None
    seed: int = 0
    device: str = "auto"
    network_options: dict = field(default_factory=dict)


def _label(source: str) -> str:
    if not os.path.isfile(source):
        return source
    base = os.path.basename(source)
    parent = os.path.basename(os.path.dirname(os.path.abspath(source)))
    return parent if base in _RUN_FILES and parent else os.path.splitext(base)[0]


def _load_model(source: str, cfg: ErfConfig) -> tuple[nn.Module, dict, bool]:
    """The network of one source, its settings and whether its masks are the trained ones."""
    if os.path.isfile(source):
        ckpt, run_config = read_run(source)
        run = _run_config(run_config, source)
        model = build_model(run["name"], run["in_channels"], run["out_channels"], run["options"], ckpt)
        state = ckpt.get("state_dict", {}) if isinstance(ckpt, Mapping) else {}
        learned_masks = any(".modulation." in k for k in state)
        return model, run, learned_masks
    name = networks.canonical_name(source)
    torch.manual_seed(cfg.seed)
    model = networks.build_network(name, 1, 2, **cfg.network_options)
    run = {"name": name, "in_channels": 1, "out_channels": 2, "options": dict(cfg.network_options), "dataset": None}
    return model, run, True


def analyse_source(source: str, cfg: ErfConfig, log: Callable[[str], None] = print) -> dict:
    """ERF and kernel statistics of one checkpoint or untrained network (one entry of ``erf.json``)."""
    device = select_device(cfg.device)
    model, run, learned_masks = _load_model(source, cfg)
    model = model.to(device).eval()
    encoder, stages = encoder_stages(model)
    dataset = run["dataset"]
    if dataset is None and cfg.dataset is not None:

        dataset = get_dataset_config(cfg.dataset)
    roi = tuple(cfg.roi or (dataset.roi if dataset is not None else (96, 96, 96)))
    networks.check_roi(model, roi, run["in_channels"])
    if cfg.root is not None:
        if dataset is None:
            raise ValueError(f"{source}: no dataset settings to pre-process --root with; pass --dataset (e.g. amos, demo).")
        inputs = _real_crops(cfg.root, dataset, roi, cfg.cases, run["in_channels"])
        kind = "validation crops"
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        inputs = [torch.rand((1, run["in_channels"], *roi), generator=g) for _ in range(cfg.cases)]
        kind = "random inputs"
    log(f"{source}: {run['name']}, ERF of {len(stages)} stages over {len(inputs)} {kind} of {roi}")
    erfs = effective_receptive_fields(encoder, stages, (x.to(device) for x in inputs))
    stage_rows = []
    for s, erf in enumerate(erfs, start=1):
        row = {"stage": s, **summarise_erf(erf)}
        stage_rows.append(row)
    return {
        "source": os.path.abspath(source) if os.path.isfile(source) else source,
        "network": run["name"],
        "options": run["options"],
        "inputs": kind,
        "cases": len(inputs),
        "roi": list(roi),
        "dataset": dataset.name if dataset is not None else None,
        "stages": stage_rows,
        "kernels": kernel_statistics(model, with_mask=learned_masks),
        "masks_learned": learned_masks,
        "_maps": [e.numpy().astype(np.float32) for e in erfs],  # for the figures, dropped from the JSON
    }


def run_analysis(cfg: ErfConfig, log: Callable[[str], None] = print) -> dict:
    """Analyse every source, write ``erf.json``, ``erf.png`` and ``kernels.png`` into ``cfg.output``.

    Returns:
        The content of ``erf.json``.
    """
    if cfg.cases < 1:
        raise ValueError(f"--cases must be at least 1, got {cfg.cases}.")
    labels = list(cfg.labels) if cfg.labels else [_label(s) for s in cfg.sources]
    if len(labels) != len(cfg.sources):
        raise ValueError(f"--labels: {len(labels)} labels for {len(cfg.sources)} --trained_weights entries; give one each.")
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):  # keep legend entries apart
        seen[lab] = seen.get(lab, 0) + 1
        if seen[lab] > 1:
            labels[i] = f"{lab} ({seen[lab]})"
    os.makedirs(cfg.output, exist_ok=True)
    results = []
    for source, label in zip(cfg.sources, labels):
        entry = analyse_source(source, cfg, log)
        entry["label"] = label
        results.append(entry)
    report = {
        "version": 1,
        "thresholds": list(AREA_THRESHOLDS),
        "definitions": {
            "erf": "mean over inputs of |d(sum over channels of the stage output's centre voxel) / d input|",
            "area_ratio": "share of the input volume of the smallest cube, centred on the ERF's centre of mass and "
            "clipped to the input, that holds the threshold's share of the total contribution",
            "radial_profile": "mean of the ERF (normalised to its maximum) in unit-width bins of distance from that centre",
            "kernel_regions": f"centre d <= {CENTRE_FRACTION} * (K // 2), periphery d > {PERIPHERY_FRACTION} * (K // 2)",
        },
        "args": jsonable(asdict(cfg)),
        "checkpoints": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
    }
    write_json(report, os.path.join(cfg.output, "erf.json"))
    plot_erf(results, os.path.join(cfg.output, "erf.png"))
    plot_kernels(results, os.path.join(cfg.output, "kernels.png"))
    log(f"wrote {os.path.join(cfg.output, 'erf.json')}, erf.png and kernels.png")
    return report

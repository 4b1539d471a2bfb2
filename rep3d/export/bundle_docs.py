"""The text files of a MONAI bundle written by :mod:`rep3d.export.bundle`: ``docs/README.md`` (how to
run the bundle with MONAI, MONAI Label and 3D Slicer) and ``configs/logging.conf``."""

from __future__ import annotations

#: The project's licence file at the repository root, copied into every bundle.
LICENSE_FILE = "LICENSE"


def logging_conf() -> str:
    """``configs/logging.conf``: MONAI's run logs to the console (``monai.bundle run`` reads this file)."""
    return "\n".join([
        "[loggers]", "keys=root", "",
        "[handlers]", "keys=consoleHandler", "",
        "[formatters]", "keys=fullFormatter", "",
        "[logger_root]", "level=INFO", "handlers=consoleHandler", "",
        "[handler_consoleHandler]", "class=StreamHandler", "level=INFO", "formatter=fullFormatter", "args=(sys.stdout,)", "",
        "[formatter_fullFormatter]", "format=%(asctime)s - %(name)s - %(levelname)s - %(message)s", "",
    ])  # fmt: skip


def monai_label_section(name: str, multichannel: bool) -> str:
    """The README section on serving the bundle with MONAI Label and using it from 3D Slicer."""
    four_d = (
        "\nThis model takes several channels: MONAI Label sends one file per image, so put each case in `images/` as one\n"
        "4-D NIfTI file whose last axis holds the channels in the order of `channel_def` in `configs/metadata.json`.\n"
    ) if multichannel else ""  # fmt: skip
    return f"""## MONAI Label and 3D Slicer

The bundle has what MONAI Label's bundle app reads for inference: `network_def`, `preprocessing`,
`inferer`, `postprocessing`, `device` and `bundle_root` in `configs/inference.json`, `models/model.pt`, and
`network_data_format` in `configs/metadata.json` (its input `image`, its output `pred`, and the class names
in `channel_def`, which become the labels). Serve it with the `monaibundle` sample app; a bundle whose name
is not in the MONAI model zoo is taken from the app's `model/` folder:

```bash
pip install monailabel
monailabel apps --download --name monaibundle --output apps
cp -r {name} apps/monaibundle/model/{name}       # or a symbolic link
monailabel start_server --app apps/monaibundle --studies images --conf models {name} --conf skip_trainers true
```

`images` is a folder of the volumes to label (NIfTI); the server listens on http://127.0.0.1:8000.
`--conf skip_trainers true` serves inference only (the bundle has no training config). The app first looks
the name up in the model zoo's list on GitHub; without internet access add `--conf zoo_source ngc`: with a
source other than `github` it takes an existing `model/<name>` folder without asking the zoo.
{four_d}
In 3D Slicer (5.0 or later): install the extension once (View > Extensions Manager > Active Learning >
MONAI Label > Install, then Restart), open the MONAI Label module, enter the server address
(http://127.0.0.1:8000) and click the refresh button next to it. Click **Next Sample** to load a volume
from the server's studies (or load one with File > Add Data and click **Upload Volume**); under **Auto
Segmentation** pick the model `{name}` and click **Run**: the label map comes back as segments, one per
class, on the volume's own grid. Correct it with the Segment Editor if needed and click **Submit Label**
to store it with the server's studies.

Not tested with this export: MONAI Label and 3D Slicer were not installed where Rep3D's exporter was
developed. The commands and clicks above are from MONAI Label's documentation (the `monaibundle` app's
README, its bundle tutorial and quick-start) and its bundle inference task, which reads the config ids
and metadata keys listed at the top of this section.
"""


#: The transform arguments the README lists beside each pre-processing step.
_SHOWN = ("pixdim", "axcodes", "a_min", "a_max", "nonzero", "norms")


def _settings(transform: dict) -> str:
    shown = [f"{k}={transform[k]}" for k in _SHOWN if k in transform]
    return f" ({', '.join(shown)})" if shown else ""


def bundle_readme(meta: dict, config: dict, name: str) -> str:
    """``docs/README.md`` of a bundle with metadata ``meta`` and inference config ``config``."""
    fmt = meta["network_data_format"]
    inp, out = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    classes = "\n".join(f"| {k} | {v} |" for k, v in out["channel_def"].items())
    channels = "\n".join(f"| {k} | {v} |" for k, v in inp["channel_def"].items())
    steps = "\n".join(f"{i}. `{t['_target_']}`{_settings(t)}" for i, t in enumerate(config["preprocessing"]["transforms"], 1))
    inferer = config["inferer"]
    roi = inferer.get("roi_size") or inferer.get("roi_sizes")
    members = meta["rep3d"]["networks"]
    ensemble = len(members) > 1
    fold_text = (
        f"\nA fold ensemble of {len(members)} models: `scripts/ensemble.py`'s `FoldEnsemble` holds them (their weights are\n"
        "`members.<i>.*` in `models/model.pt`) and `EnsembleSlidingWindowInferer` predicts each fold by sliding window, takes\n"
        "the softmax of its stitched logits and averages the folds, as Rep3D's `test_seg.py` ensembles.\n"
    ) if ensemble else ""  # fmt: skip
    return f"""# {name}

{meta['task']}.

{meta['description']}
{fold_text}
Version {meta['version']}, exported with MONAI {meta['monai_version']} and PyTorch {meta['pytorch_version']}.
Research use only; not for clinical or diagnostic use.

## Input

{meta['input_convention'][0].upper() + meta['input_convention'][1:]}.

| channel | name |
| --- | --- |
{channels}

Pre-processing (`preprocessing` in `configs/inference.json`, the training run's):

{steps}

The network sees windows of {roi} voxels (`{inferer['_target_']}`, overlap {inferer['overlap']},
{inferer['mode']} blending, {inferer['sw_batch_size']} windows per pass).

## Output

`<case>_seg.nii.gz` per case (the nnU-Net channel suffix `_0000` dropped), one class index per voxel, on the
input's own grid (`Invertd` undoes the crop, orientation and resampling; nearest neighbour):

| value | class |
| --- | --- |
{classes}

## Run with MONAI

Needs `monai`, `torch`, `nibabel`, `pytorch-ignite` and `fire` (`pip install "monai[nibabel,ignite,fire]"`);
nothing of the Rep3D repository: the network's code is in `scripts/`.

```bash
python -m monai.bundle run --config_file {name}/configs/inference.json --bundle_root {name} \\
    --dataset_dir IMAGES --output_dir OUT
```

`run` puts the bundle folder on the Python path itself (for `scripts`). Add `--device '$torch.device("cpu")'`
to force the CPU, `--inferer#sw_batch_size 1` to use less memory. MONAI's own checks (here the bundle folder
must be on the path):

```bash
PYTHONPATH={name} python -m monai.bundle verify_net_in_out network_def \\
    --meta_file {name}/configs/metadata.json --config_file {name}/configs/inference.json --device cpu
python -m monai.bundle verify_metadata --meta_file {name}/configs/metadata.json --filepath schema.json
```

(`verify_metadata` downloads the schema named in `metadata.json` to `schema.json`; it needs the internet once.)

{monai_label_section(name, int(inp['num_channels']) > 1)}
## Licence

MIT (`LICENSE`): the weights and the code in `scripts/` are Rep3D's. {meta['copyright']}.
"""

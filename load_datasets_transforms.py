"""Dataset presets, per-dataset MONAI transform chains and loaders: the names readers of the paper look for.

The code lives in the :mod:`rep3d.data` package, one job per module, and is re-exported here:

* the presets of the paper (``amos``, ``amos_mri``, ``kits``, ``pancreas``, ``hepatic``) and ``demo``:
  :data:`PRESETS`, :class:`DatasetConfig`, :func:`get_dataset_config` (:mod:`rep3d.data.dataset_config`);
* the transform chains of a dataset config: :func:`get_train_transforms`, :func:`get_val_transforms`,
  :func:`get_test_transforms`, :func:`get_post_transforms` (:mod:`rep3d.data.transforms`; the random
  crops and batched augmentation in :mod:`rep3d.data.augment`);
* the loaders: :func:`get_loaders`, :func:`get_test_loader` (:mod:`rep3d.data.loaders`) and the
  choice between the GPU cache and CPU workers (:mod:`rep3d.data.loader_choice`);
* listing and pairing the cases (:mod:`rep3d.data.cases`), checking them (:mod:`rep3d.data.checks`),
  choosing a preset or a plan made from the data (:mod:`rep3d.planning`).

Example::

    from load_datasets_transforms import get_dataset_config, get_loaders
    cfg = get_dataset_config("amos")
    train_loader, val_loader = get_loaders(cfg, root="/data/amos")
"""

from __future__ import annotations

from rep3d.cli import (
    add_dataset_args,
)
from rep3d.data.augment import (
    BatchAugment,
)
from rep3d.data.cases import (
    case_name,
    dataset_json_channels,
    describe_validation,
    image_files,
    list_cases,
    list_images,
    nifti_files,
)
from rep3d.data.checks import (
    check_cases,
    check_dataset,
    check_input_channels,
    inspect_cases,
)
from rep3d.data.dataset_config import (
    PRESETS,
    DataError,
    DatasetConfig,
    get_dataset_config,
)
from rep3d.data.loader_choice import (
    GPU_CACHE_SHARE,
    LoaderChoice,
    choose_loader,
    estimate_cache_bytes,
)
from rep3d.data.loaders import (
    TrainLoader,
    get_loaders,
    get_test_loader,
)
from rep3d.data.transforms import (
    NormalizeChannelsd,
    get_post_transforms,
    get_test_transforms,
    get_train_transforms,
    get_val_transforms,
)
from rep3d.planning import (
    resolve_dataset,
    resolve_dataset_config,
)
from rep3d.runtime import (
    default_num_workers,
)

__all__ = [
    "BatchAugment",
    "DataError",
    "DatasetConfig",
    "GPU_CACHE_SHARE",
    "LoaderChoice",
    "NormalizeChannelsd",
    "PRESETS",
    "TrainLoader",
    "add_dataset_args",
    "case_name",
    "check_cases",
    "check_dataset",
    "check_input_channels",
    "choose_loader",
    "dataset_json_channels",
    "default_num_workers",
    "describe_validation",
    "estimate_cache_bytes",
    "get_dataset_config",
    "get_loaders",
    "get_post_transforms",
    "get_test_loader",
    "get_test_transforms",
    "get_train_transforms",
    "get_val_transforms",
    "image_files",
    "inspect_cases",
    "list_cases",
    "list_images",
    "nifti_files",
    "resolve_dataset",
    "resolve_dataset_config",
]

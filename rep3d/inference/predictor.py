"""The :class:`Predictor`: deploy-mode inference of one model or an ensemble, or of an export, on
volumes in memory or files."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rep3d.data.dataset_config import DatasetConfig
from rep3d.data.loaders import get_test_loader
from rep3d.inference.checkpoint import (
    InferenceError,
    check_ensemble,
    expand_weights,
    load_model,
    resolve_checkpoint,
)
from rep3d.inference.exported import load_export
from rep3d.inference.postprocess import (
    POSTPROCESS_CHOICES,
    decision_path,
    keep_largest_component,
    load_decision,
)
from rep3d.inference.sliding_window import compile_for_windows, ensemble_probabilities
from rep3d.inference.writer import native_probabilities
from rep3d.runtime import cpu_has_native_bf16, is_oom, resolve_amp

logger = logging.getLogger(__name__)


def oom_message(case: str, sw_batch_size: int, cuda: bool) -> str:
    if cuda:
        return (
            f"CUDA ran out of memory predicting {case}. Fix: lower --sw_batch_size (now {sw_batch_size}), "
            "pass --stitch_on_cpu (same as --sw_device cpu) to keep the stitched volume in RAM, "
            "use --amp bf16 / fp16, or a smaller --roi"
        )
    return f"the CPU ran out of memory predicting {case}. Fix: lower --sw_batch_size (now {sw_batch_size}), close other programs, or run on a GPU (--gpu 0)"


def _is_cpu_oom(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err).lower()


def describe_precision(device: torch.device, amp_dtype: torch.dtype | None, export: bool = False) -> str:
    """Where and in what precision the windows run, for the start line: ``"cpu, 2 threads, bf16 autocast
    (native on this CPU; --amp off for float32)"``, ``"cuda:0, bf16 autocast"`` and the like."""
    if export:
        return f"the exported model (ONNX Runtime or TorchScript), float32, {torch.get_num_threads()} threads"
    if amp_dtype is None:
        precision = "float32"
    else:
        precision = f"{str(amp_dtype).replace('torch.', '').replace('bfloat16', 'bf16').replace('float16', 'fp16')} autocast"
        if device.type == "cpu":
            precision += " (native on this CPU; --amp off for float32)" if cpu_has_native_bf16() else " (emulated on this CPU: slower than --amp off)"
    where = f"{device}" + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")
    return f"{where}, {precision}"


#: Predictor options that only checkpoints take (an export is already built, folded and fixed).
_CHECKPOINT_ONLY = ("dwconv", "compile", "flags")


def _is_export(weights: str | os.PathLike | Sequence[str]) -> bool:
    """Whether ``Predictor(weights)`` names an export's sidecar (one ``.json`` file) rather than checkpoints."""
    items = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
    return len(items) == 1 and os.fspath(items[0]).endswith(".json")


class Predictor:
    """Predict label maps in each volume's native space: load once, predict many volumes.

    Loads one checkpoint, several (an ensemble: softmax probabilities averaged; they must agree on
    classes, channels and pre-processing), a run folder of fold sub-folders, or the JSON sidecar of an
    ``export_model.py`` export (ONNX Runtime when installed, else the TorchScript file). The
    pre-processing (spacing, orientation, intensity, foreground crop) comes from the checkpoint or the
    sidecar; the result is inverted to the input's grid.

    Build it with :meth:`from_checkpoints` or :meth:`from_export`; ``Predictor(weights, ...)`` takes either
    (a ``.json`` file is an export) and the same keywords.

    Args:
        weights: checkpoint path(s), a run folder, or an export's ``model.json``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or a ``torch.device``.
        sw_batch_size: windows per forward pass; None: 4 on a GPU, 1 on the CPU.
        overlap: sliding-window overlap in [0, 1).
        mode: window blending, ``"gaussian"`` or ``"constant"``.
        tta: average over the 8 mirrorings of the spatial axes.
        amp: ``"auto"`` (bf16/fp16 on CUDA; on the CPU bf16 where the CPU does bf16 natively, else off),
            ``"bf16"``, ``"fp16"`` or ``"off"`` (float32 throughout).
        postprocess: ``"none"``, ``"largest_component"`` (every foreground class), ``"auto"`` (the
            decision stored beside the checkpoint by ``test_seg.py --postprocess auto``), or a list of
            classes to keep the largest component of.
        threads: CPU threads (``torch.set_num_threads``, and ONNX Runtime's for an export); None: the default.
        dwconv: depthwise convolution implementation for checkpoints (``"auto"``, ``"native"``, ``"fft"``).
        resample_probabilities: labels from the linearly resampled probabilities instead of nearest-neighbour
            resampled labels.
        compile: run the windows through ``torch.compile`` (checkpoints only).
        stitch_on_cpu: keep the stitched volume in RAM when the windows run on a GPU.
        flags: command-line flag values (``test_seg.py`` passes ``vars(args)``): pre-processing and
            network settings for checkpoints that carry none.

    Example::

        predictor = Predictor.from_checkpoints(["fold_0/best_metric_model.pth", "fold_1/best_metric_model.pth"], threads=2)
        exported = Predictor.from_export("export/model.json")
        labels = predictor.predict("case_0001.nii.gz")                       # (X, Y, Z) uint8
        labels, probs = predictor.predict(array, affine=affine, return_probabilities=True)  # probs (C, X, Y, Z)
        print(predictor.class_names)
    """

    def __init__(self, weights: str | Sequence[str], **options) -> None:
        # Kept for ``Predictor(checkpoint_or_folder)`` and ``Predictor("model.json")``: the two named
        # constructors below are the API; this one only tells them apart.
        built = (Predictor.from_export if _is_export(weights) else Predictor.from_checkpoints)(weights, **options)
        self.__dict__.update(built.__dict__)

    @classmethod
    def from_checkpoints(
        cls,
        weights: str | Sequence[str],
        *,
        dwconv: str = "auto",
        compile: bool = False,
        flags: dict | None = None,
        postprocess: str | Sequence[int] = "none",
        **options,
    ) -> "Predictor":
        """A predictor of one checkpoint, several (an ensemble), or a run folder (its own
        ``best_metric_model.pth``, else one per fold sub-folder). ``options``: see the class."""
        self = cls.__new__(cls)
        self._setup(**options)
        self._load_checkpoints(weights, flags, dwconv, compile)
        self.post_classes = self._post_classes(postprocess)
        return self

    @classmethod
    def from_export(cls, sidecar: str | os.PathLike | Sequence[str], *, postprocess: str | Sequence[int] = "none", **options) -> "Predictor":
        """A predictor of an ``export_model.py`` export, from its ``model.json`` sidecar (ONNX Runtime when
        installed, else the TorchScript file). ``options``: see the class; the checkpoint-only ones
        (``dwconv``, ``compile``, ``flags``) do not apply to an export and are ignored."""
        if not isinstance(sidecar, (str, os.PathLike)):
            (sidecar,) = list(sidecar)
        for key in _CHECKPOINT_ONLY:
            options.pop(key, None)
        self = cls.__new__(cls)
        self._setup(**options)
        self._load_export(os.fspath(sidecar), options.get("threads"))
        self.post_classes = self._post_classes(postprocess)
        return self

    def _setup(
        self,
        *,
        device: str | torch.device = "cpu",
        sw_batch_size: int | None = None,
        overlap: float = 0.5,
        mode: str = "gaussian",
        tta: bool = False,
        amp: str = "auto",
        threads: int | None = None,
        resample_probabilities: bool = False,
        stitch_on_cpu: bool = False,
    ) -> None:
        if threads is not None:
            if threads < 1:
                raise InferenceError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.amp_dtype = resolve_amp(amp, self.device, inference=True)
        if sw_batch_size is None:
            sw_batch_size = 4 if self.device.type == "cuda" else 1
        self.sw_batch_size, self.overlap, self.mode, self.tta = int(sw_batch_size), float(overlap), mode, bool(tta)
        self.resample_probabilities = bool(resample_probabilities)
        self.stitch_on_cpu = bool(stitch_on_cpu)
        self.export: dict | None = None

    def _load_export(self, sidecar: str, threads: int | None) -> None:
        self.export, runner = load_export(sidecar, device=self.device, threads=threads)
        self.checkpoints = [sidecar]
        self.cfg = DatasetConfig(**self.export["dataset"])
        self.out_channels = int(self.export["network"]["out_channels"])
        self.models: list = [runner]
        self.rois = [tuple(self.cfg.roi)]
        self.names = [self.export["network"]["name"]]

    def _load_checkpoints(self, weights: str | Sequence[str], flags: dict | None, dwconv: str, compile: bool) -> None:
        flags = dict(flags or {})
        flags.setdefault("dwconv", dwconv)
        self.checkpoints = expand_weights(weights)
        members = [resolve_checkpoint(p, flags) for p in self.checkpoints]
        self.cfg = check_ensemble(members)
        self.out_channels = members[0]["out_channels"]
        self.models = []
        for m in members:
            model = load_model(m, self.device, m["path"])
            self.models.append(compile_for_windows(model, self.sw_batch_size) if compile else model)
        self.rois = [tuple(m["cfg"].roi) for m in members]
        self.names = [m["network"] for m in members]
        self.members = members

    # ----------------------------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """Class names, background first."""
        return list(self.cfg.class_names)

    def _post_classes(self, postprocess: str | Sequence[int]) -> list[int]:
        if not isinstance(postprocess, str):
            return [int(c) for c in postprocess]
        if postprocess not in POSTPROCESS_CHOICES:
            raise InferenceError(f"--postprocess must be one of {', '.join(POSTPROCESS_CHOICES)}, got {postprocess!r}")
        if postprocess == "none":
            return []
        if postprocess == "largest_component":
            return list(range(1, self.out_channels))
        if self.export is not None:  # an export carries the decision made for its checkpoint
            return [int(c) for c in (self.export.get("postprocessing") or {}).get("largest_component", [])]
        decision = load_decision(self.checkpoints, self.out_channels)
        if decision is None:
            raise InferenceError(
                f"--postprocess auto: no decision stored in {decision_path(self.checkpoints)} yet; run test_seg.py --postprocess auto "
                "once on labelled validation cases (e.g. --split val, or --labels FOLDER) to make it"
            )
        return decision["largest_component"]

    def loader(self, cases: list[dict], num_workers: int = 0, keep_label: bool = False):
        """The inference loader over ``cases`` and its pre-processing chain (to invert with)."""
        return get_test_loader(self.cfg, cases, num_workers=num_workers, keep_label=keep_label)

    def probabilities(self, image: torch.Tensor, name: str = "the volume") -> torch.Tensor:
        """Ensemble-mean softmax probabilities (1, C, ...) of one pre-processed volume (on the stitching device)."""
        tries = [self.stitch_on_cpu] if self.stitch_on_cpu or self.device.type != "cuda" else [False, True]
        oom = None
        for cpu_stitch in tries:
            try:
                return ensemble_probabilities(
                    self.models, image, self.rois, self.device, sw_batch_size=self.sw_batch_size, overlap=self.overlap,
                    mode=self.mode, amp_dtype=self.amp_dtype, tta=self.tta, stitch_on_cpu=cpu_stitch,
                )  # fmt: skip
            except Exception as err:  # noqa: BLE001 - only out-of-memory is handled here
                if is_oom(err):
                    oom = "cuda"
                elif _is_cpu_oom(err):
                    oom = "cpu"
                else:
                    raise
            # outside the except block, so that the failed attempt's tensors are freed first
            if oom == "cuda" and not cpu_stitch and torch.cuda.is_available():
                torch.cuda.empty_cache()
                logger.warning("out of GPU memory stitching %s on the GPU: retrying with the output in RAM (pass --stitch_on_cpu to start that way)", name)
        raise InferenceError(oom_message(name, self.sw_batch_size, oom != "cpu"))

    def predict_item(self, item: dict, test_transforms: Any, keep_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The one path from a pre-processed case to its native-space result.

        Args:
            item: one decollated loader item (``"image"`` a MetaTensor that remembers its transforms).
            test_transforms: the loader's chain (:meth:`loader`), replayed backwards by ``Invertd``.
            keep_probabilities: also return the native-space probabilities.

        Returns:
            ``(labels (X, Y, Z) of the input's spatial shape, post-processed; probabilities (C, X, Y, Z)
            float32 or None)``.
        """
        from monai.transforms import Invertd

        source = str(item["image"].meta.get("filename_or_obj", "the volume"))
        probs = self.probabilities(item["image"][None], source)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        native = None
        if self.resample_probabilities or keep_probabilities:
            invert = Invertd(keys="prob", transform=test_transforms, orig_keys="image", nearest_interp=False, to_tensor=True)
            seg_p, native = native_probabilities(probs, item, invert, keep=keep_probabilities)
        if self.resample_probabilities:
            seg = seg_p
        else:
            invert = Invertd(keys="pred", transform=test_transforms, orig_keys="image", nearest_interp=True, to_tensor=True)
            pred = probs.argmax(dim=1, keepdim=True)[0].to("cpu", torch.float32)
            seg = np.asarray(torch.as_tensor(invert({"image": item["image"], "pred": pred})["pred"]).numpy())[0]
        dtype = np.uint8 if self.out_channels <= 256 else np.uint16
        seg = keep_largest_component(np.rint(seg).astype(dtype), self.post_classes)
        return seg, native

    def predict(self, image: str | np.ndarray, affine: np.ndarray | None = None, *, return_probabilities: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predict one volume; the label map comes back on the input's own grid.

        Args:
            image: a NIfTI path, or an (X, Y, Z) array (channels last, (X, Y, Z, C), for several input
                channels) in the orientation its ``affine`` describes.
            affine: the array's 4x4 voxel-to-world (RAS mm) matrix, as nibabel gives it; required with an array.
            return_probabilities: also return the class probabilities (C, X, Y, Z) on the same grid.

        Returns:
            labels (X, Y, Z) (uint8 up to 256 classes), and the probabilities when asked.
        """
        from monai.data import decollate_batch

        with tempfile.TemporaryDirectory() as tmp:
            if not isinstance(image, (str, os.PathLike)):
                if affine is None:
                    raise InferenceError("Predictor.predict: an array needs its 4x4 affine (nibabel's img.affine)")
                import nibabel as nib

                path = os.path.join(tmp, "volume.nii")  # uncompressed: written and read back fast
                nib.save(nib.Nifti1Image(np.asarray(image, dtype=np.float32), np.asarray(affine, dtype=float)), path)
                image = path
            loader, test_tf = self.loader([{"image": os.fspath(image)}])
            item = decollate_batch(next(iter(loader)))[0]
            seg, probs = self.predict_item(item, test_tf, keep_probabilities=return_probabilities)
        return (seg, probs) if return_probabilities else seg

"""Image files in the formats Rep3D reads: headers, voxel data and label maps written back.

Formats: NIfTI (``.nii``, ``.nii.gz``, through nibabel), NRRD (``.nrrd``, ``.nhdr``, through
pynrrd), MetaImage (``.mha``, ``.mhd``, through ITK: the ``itk`` package, which is large and so an
optional extra, see :data:`EXTRA_HINT`) and DICOM series (a folder of slices, through MONAI's
readers: ITK from the same extra, or pydicom when that is installed instead). The training and
inference chains load the voxels with MONAI's ``LoadImaged`` (see :func:`load_image_transform`);
this module gives the cheap header reads used to check and plan a dataset, and :func:`write_like`,
which writes a label map with the exact grid of the image it was predicted from, in that image's
format.

Geometry is reported as MONAI's readers report it: the array in the file's own voxel order
(i, j, k) and a 4 x 4 voxel-to-world affine in RAS+ mm (NRRD and ITK files store LPS; MONAI and
this module flip the first two world axes), so files of different formats can be compared.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np

from rep3d.fileio import atomic_path

#: File endings read as images, longest first so that ".nii.gz" wins over ".gz".
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")


#: What to install for the formats that need the optional ``itk`` package (~270 MB of wheels).
EXTRA_HINT = "pip install -r requirements-formats.txt (the 'itk' package)"


_ITK_EXTS = (".mha", ".mhd")


_NRRD_EXTS = (".seg.nrrd", ".nrrd", ".nhdr")


@dataclass(frozen=True)
class Header:
    """Geometry and storage of one image file (or DICOM series), as MONAI will load it.

    Attributes:
        shape: spatial shape (i, j, k) in the file's voxel order.
        channels: channels (or time points) stored in the file; 1 for a plain 3-D volume.
        affine: 4 x 4 voxel-to-world matrix, RAS+ mm.
        ndim: dimensions of the stored array including any channel axis (2 for a 2-D image).
        array_shape: the stored array's shape, channels last: NIfTI's as stored (e.g. 5-D
            kept 5-D); for the other formats ``shape`` plus ``(channels,)`` when the file has a
            channel axis. Default: so derived from the fields above.
        dtype: the voxel type stored on disk (per channel component), or None where the reader
            does not say (DICOM series, NRRD ``block``).
        data_offset: NIfTI: the byte offset of the voxel data in the (uncompressed) file, for
            the truncation test of :mod:`checks`; None for the other formats.
    """

    shape: tuple[int, ...]
    channels: int
    affine: np.ndarray
    ndim: int
    array_shape: tuple[int, ...] = ()
    dtype: np.dtype | None = None
    data_offset: int | None = None

    def __post_init__(self) -> None:
        if not self.array_shape:
            extra = (self.channels,) if self.channels > 1 or self.ndim > len(self.shape) else ()
            object.__setattr__(self, "array_shape", tuple(self.shape) + extra)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each voxel axis (column norms of the affine)."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def data_bytes(self) -> int | None:
        """Bytes of the voxel data as stored, uncompressed (None when ``dtype`` is unknown)."""
        return int(np.prod(self.array_shape)) * self.dtype.itemsize if self.dtype is not None else None


def image_ext(path: str) -> str | None:
    """The image file ending of ``path`` (lower case, e.g. ``".nii.gz"``), or None."""
    low = path.lower()
    for ext in IMAGE_EXTENSIONS:
        if low.endswith(ext):
            return ext
    return None


def strip_ext(filename: str) -> str | None:
    """``filename`` without its image ending, or None when it is not an image file."""
    ext = image_ext(filename)
    return filename[: -len(ext)] if ext else None


def is_dicom_dir(path: str) -> bool:
    """True for a folder holding DICOM slices (``*.dcm`` files, or files with the DICM preamble)."""
    if not os.path.isdir(path):
        return False
    try:
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
    except OSError:
        return False
    for n in names[:8]:
        p = os.path.join(path, n)
        if not os.path.isfile(p):
            continue
        if n.lower().endswith(".dcm"):
            return True
        try:
            with open(p, "rb") as f:
                f.seek(128)
                if f.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False


def missing_library(path: str) -> str | None:
    """What must be installed to read ``path``, or None when its reader is available."""
    ext = image_ext(path)
    if ext in _ITK_EXTS and importlib.util.find_spec("itk") is None:
        return f"reading {ext} files needs the 'itk' package. Fix: {EXTRA_HINT}"
    if ext in _NRRD_EXTS and importlib.util.find_spec("nrrd") is None:
        return "reading NRRD files needs the 'pynrrd' package. Fix: pip install -r requirements.txt"
    if ext is None and os.path.isdir(path) and importlib.util.find_spec("itk") is None and importlib.util.find_spec("pydicom") is None:
        return f"reading DICOM series needs the 'itk' package (or 'pydicom'). Fix: {EXTRA_HINT}"
    return None


# NRRD "type" field values (the spec's synonyms) by numpy type; the byte order does not change the size.
_NRRD_TYPES = {
    "i1": ("signed char", "int8", "int8_t"),
    "u1": ("uchar", "unsigned char", "uint8", "uint8_t"),
    "i2": ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    "u2": ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    "i4": ("int", "signed int", "int32", "int32_t"),
    "u4": ("uint", "unsigned int", "uint32", "uint32_t"),
    "i8": ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"),
    "u8": ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    "f4": ("float",),
    "f8": ("double",),
}
_NRRD_DTYPE = {name: np.dtype(code) for code, names in _NRRD_TYPES.items() for name in names}


def _lps_to_ras(affine: np.ndarray) -> np.ndarray:
    out = np.array(affine, dtype=np.float64)
    out[:2] *= -1.0
    return out


def _nrrd_affine(header: dict) -> tuple[np.ndarray, list[int]]:
    """RAS affine of an NRRD header and the indices of its spatial axes (MONAI's convention)."""
    directions = header.get("space directions")
    if directions is None:
        raise ValueError("no 'space directions' in the NRRD header (the voxel-to-world geometry)")
    rows = [np.asarray(d, dtype=np.float64) if d is not None else None for d in directions]
    spatial = [i for i, d in enumerate(rows) if d is not None and np.all(np.isfinite(d))]
    if len(spatial) < 2:
        raise ValueError(f"NRRD header has {len(spatial)} spatial axes")
    n = len(spatial)
    affine = np.eye(n + 1)
    affine[:n, :n] = np.stack([rows[i] for i in spatial], axis=1)[:n]
    origin = header.get("space origin")
    affine[:n, n] = np.asarray(origin, dtype=np.float64)[:n] if origin is not None else 0.0
    if affine.shape != (4, 4):
        return affine, spatial
    # As MONAI's NrrdReader: LPS, or no space given (assumed LPS), becomes RAS; other spaces stay.
    if header.get("space", "left-posterior-superior") in ("left-posterior-superior", "LPS"):
        affine = _lps_to_ras(affine)
    return affine, spatial


def _itk_header(path: str) -> Header:
    import itk

    io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise ValueError("ITK found no reader for this file")
    io.SetFileName(path)
    io.ReadImageInformation()
    n = io.GetNumberOfDimensions()
    shape = tuple(int(io.GetDimensions(i)) for i in range(n))
    spacing = [io.GetSpacing(i) for i in range(n)]
    affine = np.eye(n + 1)
    for i in range(n):
        affine[:n, i] = np.asarray(io.GetDirection(i), dtype=np.float64)[:n] * spacing[i]
        affine[i, n] = io.GetOrigin(i)
    channels = int(io.GetNumberOfComponents())
    ndim = n + (1 if channels > 1 else 0)
    kind = str(io.GetComponentTypeAsString(io.GetComponentType())).lower()
    size = int(io.GetComponentSize())
    try:
        dtype = np.dtype(f"{'f' if kind in ('float', 'double') else 'u' if kind.startswith('unsigned') else 'i'}{size}")
    except TypeError:
        dtype = None
    if n == 4:  # a 4-D MetaImage: channels (or time) along the last axis, as MONAI reads it
        channels, shape = shape[3] * channels, shape[:3]
        spatial = np.eye(4)
        spatial[:3, :3], spatial[:3, 3] = affine[:3, :3], affine[:3, 4]
        affine = spatial
    if affine.shape == (4, 4):
        affine = _lps_to_ras(affine)
    return Header(shape=shape[:3], channels=channels, affine=affine, ndim=ndim, dtype=dtype)


def _nifti_header(path: str) -> Header:
    import nibabel as nib

    img = nib.load(path)
    shape = tuple(int(s) for s in img.shape)
    affine = np.asarray(img.affine, dtype=np.float64)
    try:
        dtype = np.dtype(img.header.get_data_dtype())
        offset = int(getattr(img.dataobj, "offset", 0) or img.header.get_data_offset())
    except Exception:  # noqa: BLE001 - a header without them: no truncation test
        dtype, offset = None, None
    channels = shape[3] if len(shape) == 4 else 1
    return Header(shape=shape[:3], channels=channels, affine=affine, ndim=len(shape), array_shape=shape, dtype=dtype, data_offset=offset)


def read_header(path: str) -> Header:
    """Read the geometry (and stored voxel type) of an image file or DICOM series folder without
    its voxels (DICOM: with). The one header reader of Rep3D: checks, planning and the cache
    estimate all read headers through it, in every format.

    Raises:
        ValueError: unsupported file or missing reader library (the message says what to install).
        Exception: whatever the reading library raises for a broken file.
    """
    need = missing_library(path)
    if need:
        raise ValueError(need)
    ext = image_ext(path)
    if ext in (".nii.gz", ".nii"):
        return _nifti_header(path)
    if ext in _NRRD_EXTS:
        import nrrd

        hdr = nrrd.read_header(path)
        sizes = [int(s) for s in hdr["sizes"]]
        affine, spatial = _nrrd_affine(hdr)
        others = [sizes[i] for i in range(len(sizes)) if i not in spatial]
        dtype = _NRRD_DTYPE.get(str(hdr.get("type", "")).strip().lower())
        return Header(shape=tuple(sizes[i] for i in spatial), channels=int(np.prod(others)) if others else 1, affine=affine, ndim=len(sizes), dtype=dtype)
    if ext in _ITK_EXTS:
        return _itk_header(path)
    if os.path.isdir(path):
        if not is_dicom_dir(path):
            raise ValueError("a folder that holds no DICOM files (*.dcm)")
        img = _load_monai(path)
        shape = tuple(int(s) for s in img.shape)
        return Header(shape=shape[-3:], channels=shape[0] if len(shape) == 4 else 1, affine=np.asarray(img.affine, dtype=np.float64), ndim=3)
    raise ValueError(f"not an image format Rep3D reads (endings {', '.join(IMAGE_EXTENSIONS)}, or a DICOM series folder)")


def _load_monai(path: str):
    from monai.transforms import LoadImage

    loader = LoadImage(image_only=True, ensure_channel_first=False)
    loader.register(_nrrd_reader())
    return loader(path)


def read_array(path: str) -> np.ndarray:
    """The voxels of an image or label as a numpy array in the file's voxel order (i, j, k[, c]).

    NIfTI keeps its stored dtype (scaling applied only when the header asks for it); the other
    formats come through MONAI's readers as float32, channels last.
    """
    ext = image_ext(path)
    if ext in (".nii.gz", ".nii"):
        import nibabel as nib

        return np.asanyarray(nib.load(path).dataobj)
    need = missing_library(path)
    if need:
        raise ValueError(need)
    img = _load_monai(path)
    arr = np.asarray(img)
    ch = img.meta.get("original_channel_dim") if hasattr(img, "meta") else None
    if arr.ndim == 4 and ch == 0:
        arr = np.moveaxis(arr, 0, -1)
    return arr


def _nrrd_reader():
    """MONAI's NrrdReader, also for ``.nhdr`` detached headers (pynrrd reads both)."""
    from monai.data import NrrdReader

    class _NrrdReader(NrrdReader):
        def verify_suffix(self, filename) -> bool:
            names = filename if isinstance(filename, (list, tuple)) else [filename]
            return importlib.util.find_spec("nrrd") is not None and all(image_ext(str(n)) in _NRRD_EXTS for n in names)

    return _NrrdReader()


def load_image_transform(keys, **kwargs):
    """``LoadImaged`` for every format above: MONAI's reader choice plus ``.nhdr`` through pynrrd.

    Args:
        keys: dictionary keys to load.
        **kwargs: passed to ``LoadImaged`` (e.g. ``image_only=True``).
    """
    from monai.transforms import LoadImaged

    loader = LoadImaged(keys=keys, **kwargs)
    loader.register(_nrrd_reader())
    return loader


def output_path_like(reference: str, out_dir: str, postfix: str = "_seg", name: str | None = None) -> str:
    """Where :func:`write_like` should write the label map of ``reference``: ``out_dir/<name><postfix><ext>``.

    ``ext`` is the reference's ending (``.nii.gz`` for a DICOM series folder); ``name`` defaults
    to the reference's file name without ending.
    """
    ext = image_ext(reference) or ".nii.gz"
    if ext == ".seg.nrrd":
        ext = ".nrrd"
    base = os.path.basename(os.path.normpath(reference))
    stem = name if name is not None else (strip_ext(base) or base)
    return os.path.join(out_dir, f"{stem}{postfix}{ext}")


def write_like(array, reference: str, out_path: str, dtype=np.uint8) -> str:
    """Write a label map on the exact voxel grid of ``reference``, in the format of ``out_path``.

    The geometry is copied from the reference file's own header (NIfTI qform/sform and codes, NRRD
    space/directions/origin, MetaImage origin/spacing/direction), not recomputed, so the written
    file has the reference's shape and affine/direction exactly. A DICOM series reference is
    written as NIfTI (``out_path`` should end in ``.nii.gz``) with the affine MONAI reads from it.

    Args:
        array: label map (numpy array or tensor; a leading channel axis of 1 is dropped) in the
            reference's voxel order, i.e. the spatial shape MONAI loads the reference with.
        reference: the image the labels belong to (for several channel files, any one of them).
        out_path: file to write; its ending picks the format (``.nii.gz``, ``.nii``, ``.nrrd``,
            ``.nhdr``, ``.mha``, ``.mhd``). Parent folders are created.
        dtype: stored type (uint8 holds up to 256 classes).

    Returns:
        ``out_path``.

    Raises:
        ValueError: when the array's shape is not the reference's spatial shape, or the format is unknown.
    """
    arr = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    ref = read_header(reference)
    if tuple(arr.shape) != tuple(ref.shape):
        raise ValueError(f"write_like: label shape {tuple(arr.shape)} differs from {reference}'s spatial shape {tuple(ref.shape)}; invert the pre-processing first")
    arr = np.ascontiguousarray(arr.astype(dtype))
    out_ext = image_ext(out_path)
    if out_ext is None:
        raise ValueError(f"write_like: {out_path} has no image ending ({', '.join(IMAGE_EXTENSIONS)})")
    final = out_path
    if out_ext in (".nhdr", ".mhd"):  # a detached header names its data file: written in place
        _write_like(arr, ref, reference, final, out_ext, dtype)
    else:  # a temporary name in the same folder, then renamed: a crash leaves no half file
        with atomic_path(final, suffix=out_ext) as tmp:
            _write_like(arr, ref, reference, tmp, out_ext, dtype)
    return final


def _write_like(arr: np.ndarray, ref, reference: str, out_path: str, out_ext: str, dtype) -> None:
    ref_ext = image_ext(reference)
    if out_ext in (".nii.gz", ".nii"):
        import nibabel as nib

        if ref_ext in (".nii.gz", ".nii"):
            src = nib.load(reference)
            hdr = src.header.copy()
            hdr.set_data_dtype(dtype)
            hdr.set_slope_inter(1.0, 0.0)  # a CT's rescale slope must not scale class indices
            img = nib.Nifti1Image(arr, src.affine, hdr)
            qform, qcode = src.header.get_qform(coded=True)
            sform, scode = src.header.get_sform(coded=True)
            img.set_qform(qform if qform is not None else src.affine, code=int(qcode))
            img.set_sform(sform if sform is not None else src.affine, code=int(scode))
        else:
            img = nib.Nifti1Image(arr, ref.affine)
        nib.save(img, out_path)
        return
    if out_ext in _NRRD_EXTS:
        import nrrd

        if ref_ext in _NRRD_EXTS:
            src = nrrd.read_header(reference)
            _, spatial = _nrrd_affine(src)
            hdr = {k: src[k] for k in ("space", "space origin", "space units", "measurement frame") if k in src}
            hdr["space directions"] = np.asarray([src["space directions"][i] for i in spatial], dtype=np.float64)
            if "kinds" in src:
                hdr["kinds"] = [src["kinds"][i] for i in spatial]
        else:
            lps = _lps_to_ras(ref.affine)  # the same flip takes RAS back to LPS
            hdr = {"space": "left-posterior-superior", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3], "kinds": ["domain"] * 3}
        hdr["encoding"] = "gzip"
        nrrd.write(out_path, arr, hdr, index_order="F", detached_header=out_ext == ".nhdr")
        return
    if out_ext in _ITK_EXTS:
        need = missing_library(out_path)
        if need:
            raise ValueError(need)
        import itk

        img = itk.image_from_array(np.ascontiguousarray(arr.transpose(2, 1, 0)))
        if ref_ext in _ITK_EXTS:
            io = itk.ImageIOFactory.CreateImageIO(reference, itk.CommonEnums.IOFileMode_ReadMode)
            io.SetFileName(reference)
            io.ReadImageInformation()
            img.SetOrigin([io.GetOrigin(i) for i in range(3)])
            img.SetSpacing([io.GetSpacing(i) for i in range(3)])
            direction = np.stack([np.asarray(io.GetDirection(i), dtype=np.float64)[:3] for i in range(3)], axis=1)
        else:
            lps = _lps_to_ras(ref.affine)
            spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
            img.SetOrigin(lps[:3, 3].tolist())
            img.SetSpacing(spacing.tolist())
            direction = lps[:3, :3] / spacing
        img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
        itk.imwrite(img, out_path, compression=True)
        return
    raise ValueError(f"write_like: cannot write {out_ext}")

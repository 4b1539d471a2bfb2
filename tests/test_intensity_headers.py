"""Intensity schemes looked up by name (rep3d.data.intensity) and the one header reader for every
format (rep3d.data.image_io.read_header) used by the checks and the cache estimate.

Expected values are computed here with numpy from the formulas, not through the code under test.
"""

from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import CropForegroundd, NormalizeIntensityd, ScaleIntensityRanged

from rep3d.data.checks import check_cases, inspect_cases
from rep3d.data.dataset_config import DataError, DatasetConfig, get_dataset_config
from rep3d.data.image_io import read_header
from rep3d.data.intensity import (
    CT_BODY_HU,
    SCHEMES,
    CTScheme,
    IntensityScheme,
    NormalizeChannelsd,
    WindowScheme,
    ZScoreScheme,
    get_scheme,
    sidecar_normalisation,
    sidecar_steps,
)
from rep3d.data.loader_choice import estimate_cache_bytes
from rep3d.data.transforms import _crop_thresholds, _intensity, _preprocess

# --------------------------------------------------------------------------------------------
# schemes: lookup, keys, messages
# --------------------------------------------------------------------------------------------


def test_lookup_by_name_and_required_keys():
    assert list(SCHEMES) == ["ct", "zscore", "window"]
    for name, cls, keys in (("window", WindowScheme, ("a_min", "a_max")), ("ct", CTScheme, ("lower", "upper", "mean", "std")), ("zscore", ZScoreScheme, ())):
        scheme = get_scheme(name)
        assert isinstance(scheme, cls) and isinstance(scheme, IntensityScheme)
        assert scheme.name == name and scheme.required_keys == keys and SCHEMES[name] is scheme
    assert [n for n, s in SCHEMES.items() if s.uniform] == ["zscore", "window"]  # --intensity's choices
    with pytest.raises(ValueError, match=r"unknown intensity scheme 'minmax': choose one of 'ct', 'zscore', 'window'"):
        get_scheme("minmax")
    with pytest.raises(ValueError, match="choose one of"):
        get_scheme(None)
    # the stored format: plain dicts
    assert get_scheme("window").params(a_min=-1, a_max=2) == {"scheme": "window", "a_min": -1, "a_max": 2}
    assert get_scheme("zscore").params() == {"scheme": "zscore"}
    assert list(get_scheme("ct").params(lower=1, upper=2, mean=0, std=1)) == ["scheme", "lower", "upper", "mean", "std"]


def test_validate_each_scheme():
    w, ct, z = get_scheme("window"), get_scheme("ct"), get_scheme("zscore")
    assert w.validate({"scheme": "window", "a_min": 0, "a_max": 1}) == [] and z.validate({"scheme": "zscore"}) == []
    assert w.validate({"scheme": "window", "a_min": 5.0}) == ["scheme 'window' needs numbers for ['a_max']"]
    assert w.validate({"scheme": "window", "a_min": 5.0, "a_max": 1.0}) == ["a_min (5.0) must be below a_max (1.0)"]
    assert ct.validate({"scheme": "ct", "lower": 0, "upper": 1, "mean": 0, "std": math.nan}) == ["scheme 'ct' needs numbers for ['std']"]
    bad = {"scheme": "ct", "lower": 2.0, "upper": 1.0, "mean": 0.0, "std": 1.0}
    assert ct.validate(bad) == [f"needs lower < upper and std > 0, got {bad}"]
    assert w.config_problems({"a_min": None, "a_max": 3}) == ["intensity 'window' needs both bounds: pass --a_min and --a_max (e.g. -125 275 for abdominal CT)"]


@pytest.mark.parametrize(
    "norm, message",
    [
        ({"scheme": "minmax"}, "normalization of channel 0 (image): expected {'scheme': 'ct' | 'zscore' | 'window', ...}, got {'scheme': 'minmax'}"),
        ("zscore", "normalization of channel 0 (image): expected {'scheme': 'ct' | 'zscore' | 'window', ...}, got 'zscore'"),
        ({"scheme": "ct", "lower": -100, "upper": 200, "mean": 10}, "normalization of channel 0 (image): scheme 'ct' needs numbers for ['std']"),
        ({"scheme": "window", "a_min": "-100", "a_max": 200}, "normalization of channel 0 (image): scheme 'window' needs numbers for ['a_min']"),
        ({"scheme": "window", "a_min": 300, "a_max": 200}, "normalization of channel 0 (image): a_min (300) must be below a_max (200)"),
        ({"scheme": "ct", "lower": 1, "upper": 2, "mean": 0, "std": 0}, "normalization of channel 0 (image): needs lower < upper and std > 0, got {'scheme': 'ct', 'lower': 1, 'upper': 2, 'mean': 0, 'std': 0}"),
    ],
)
def test_config_messages_per_channel(norm, message):
    with pytest.raises(ValueError) as err:
        DatasetConfig("x", (1, 1, 1), "zscore", None, None, 2, ["background", "fg"], normalization=[norm])
    assert str(err.value) == f"dataset config 'x': {message}"


def test_config_messages_uniform():
    with pytest.raises(ValueError) as err:
        DatasetConfig("x", (1, 1, 1), "ct", None, None, 2, ["background", "fg"])
    assert str(err.value) == "dataset config 'x': intensity must be 'window' (CT) or 'zscore' (MRI), got 'ct'"
    with pytest.raises(ValueError) as err:
        DatasetConfig("x", (1, 1, 1), "window", -100.0, None, 2, ["background", "fg"])
    assert "intensity 'window' needs both bounds: pass --a_min and --a_max (e.g. -125 275 for abdominal CT)" in str(err.value)
    with pytest.raises(ValueError, match=r"a_min \(500.0\) must be below a_max \(275.0\)"):
        get_dataset_config("amos", a_min=500.0)


def test_config_fields_and_overrides():
    # --intensity zscore drops a preset's window; a window config's norms are its bounds
    z = get_dataset_config("amos", intensity="zscore")
    assert (z.a_min, z.a_max, z.channel_norms()) == (None, None, [{"scheme": "zscore"}])
    w = get_dataset_config("amos")
    assert w.scheme is get_scheme("window") and w.channel_norms() == [{"scheme": "window", "a_min": -125.0, "a_max": 275.0}]
    # per-channel: window mirrors channel 0's bounds, other schemes clear them, mixed has no scheme
    ct = {"scheme": "ct", "lower": -900.0, "upper": 300.0, "mean": 40.0, "std": 150.0}
    planned = DatasetConfig("p", (1, 1, 1), "zscore", None, None, 2, ["background", "fg"], channel_names=["CT", "T1"], normalization=[ct, {"scheme": "zscore"}])
    assert planned.intensity == "mixed" and planned.scheme is None and planned.a_min is None
    win = DatasetConfig("p", (1, 1, 1), "zscore", None, None, 2, ["background", "fg"], normalization=[{"scheme": "window", "a_min": -5, "a_max": 5}])
    assert (win.intensity, win.a_min, win.a_max) == ("window", -5, 5)
    # --a_min/--a_max on a plan replace its CT channels only
    over = get_dataset_config("planned", base=planned, a_min=-100.0, a_max=200.0)
    assert over.normalization == [{"scheme": "window", "a_min": -100.0, "a_max": 200.0}, {"scheme": "zscore"}]
    assert get_dataset_config("planned", base=planned, intensity="zscore").normalization == [{"scheme": "zscore"}, {"scheme": "zscore"}]
    # the stored dict keeps its keys (checkpoints, plans)
    assert planned.to_dict()["normalization"] == [ct, {"scheme": "zscore"}] and planned.to_dict()["intensity"] == "mixed"
    assert DatasetConfig(**{k: v for k, v in planned.to_dict().items()}).channel_norms() == planned.channel_norms()


# --------------------------------------------------------------------------------------------
# schemes: transforms, crop thresholds, descriptions
# --------------------------------------------------------------------------------------------

_X = np.array([[[-1200.0, -300.0], [0.0, 40.0]], [[80.0, 275.0], [500.0, 0.0]]], dtype=np.float32)  # 2x2x2 voxels


def _channel(x=_X):
    return torch.as_tensor(x[None].copy())


def test_window_transform():
    a, b = -125.0, 275.0
    expected = (np.clip(_X, a, b) - a) / (b - a)
    params = {"scheme": "window", "a_min": a, "a_max": b}
    tf = get_scheme("window").transform("image", params)
    assert isinstance(tf, ScaleIntensityRanged)
    np.testing.assert_allclose(np.asarray(tf({"image": _channel()})["image"])[0], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(NormalizeChannelsd("image", [params])({"image": _channel()})["image"])[0], expected, rtol=1e-6, atol=1e-7)
    assert get_scheme("window").foreground_threshold(params) == a


def test_ct_transform():
    p = {"scheme": "ct", "lower": -1000.0, "upper": 300.0, "mean": 42.0, "std": 120.0}
    expected = (np.clip(_X, -1000.0, 300.0) - 42.0) / 120.0
    np.testing.assert_allclose(np.asarray(NormalizeChannelsd("image", [p])({"image": _channel()})["image"])[0], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(get_scheme("ct").transform("image", p)({"image": _channel()})["image"])[0], expected, rtol=1e-6, atol=1e-6)
    assert get_scheme("ct").foreground_threshold(p) == -1000.0  # its own lower bound, below the body's
    assert get_scheme("ct").foreground_threshold({**p, "lower": -200.0}) == CT_BODY_HU == -500.0


def test_zscore_transform():
    nz = _X[_X != 0]
    # the uniform chain: MONAI NormalizeIntensityd (population std) over the non-zero voxels
    expected = np.where(_X != 0, (_X - nz.mean()) / nz.std(ddof=0), 0.0)
    tf = get_scheme("zscore").transform("image", {"scheme": "zscore"})
    assert isinstance(tf, NormalizeIntensityd) and tf.normalizer.nonzero and tf.normalizer.channel_wise
    np.testing.assert_allclose(np.asarray(tf({"image": _channel()})["image"])[0], expected, rtol=1e-5, atol=1e-6)
    # per channel (NormalizeChannelsd): the sample std, as before
    expected1 = np.where(_X != 0, (_X - nz.mean()) / nz.std(ddof=1), 0.0)
    np.testing.assert_allclose(np.asarray(NormalizeChannelsd("image", [{"scheme": "zscore"}])({"image": _channel()})["image"])[0], expected1, rtol=1e-5, atol=1e-6)
    # an all-zero channel stays zero; one voxel is centred with std 1
    assert torch.count_nonzero(NormalizeChannelsd("image", [{"scheme": "zscore"}])({"image": torch.zeros(1, 2, 2, 2)})["image"]) == 0
    one = np.zeros((2, 2, 2), np.float32)
    one[0, 0, 0] = 7.0
    assert float(NormalizeChannelsd("image", [{"scheme": "zscore"}])({"image": _channel(one)})["image"][0, 0, 0, 0]) == 0.0
    assert get_scheme("zscore").foreground_threshold({"scheme": "zscore"}) == 0.0


def test_mixed_channels_and_chains():
    ct = {"scheme": "ct", "lower": -1000.0, "upper": 300.0, "mean": 42.0, "std": 120.0}
    win = {"scheme": "window", "a_min": -125.0, "a_max": 275.0}
    x = np.stack([_X, _X + 100, _X])
    out = np.asarray(NormalizeChannelsd("image", [ct, {"scheme": "zscore"}, win])({"image": torch.as_tensor(x)})["image"])
    nz = x[1][x[1] != 0]
    np.testing.assert_allclose(out[0], (np.clip(_X, -1000, 300) - 42) / 120, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[1], np.where(x[1] != 0, (x[1] - nz.mean()) / nz.std(ddof=1), 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[2], (np.clip(_X, -125, 275) + 125) / 400, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="3 channels but the normalisation 2"):
        NormalizeChannelsd("image", [ct, win])({"image": torch.as_tensor(x)})
    cfg = DatasetConfig("m", (1, 1, 1), "zscore", None, None, 2, ["background", "fg"], channel_names=["a", "b", "c"], normalization=[ct, {"scheme": "zscore"}, win])
    assert _crop_thresholds(cfg) == [-1000.0, 0.0, -125.0]
    chain = _preprocess(cfg, ["image"], ["bilinear"])
    assert isinstance(chain[-2], CropForegroundd) and isinstance(chain[-1], NormalizeChannelsd)  # raw crop, then normalise
    # uniform configs: window normalises then crops, zscore crops the raw MRI first
    w = get_dataset_config("amos")
    [tf] = _intensity(w)
    assert isinstance(tf, ScaleIntensityRanged) and (tf.scaler.a_min, tf.scaler.a_max, tf.scaler.b_min, tf.scaler.b_max, tf.scaler.clip) == (-125.0, 275.0, 0.0, 1.0, True)
    chain = _preprocess(w, ["image"], ["bilinear"])
    assert isinstance(chain[-2], ScaleIntensityRanged) and isinstance(chain[-1], CropForegroundd)
    chain = _preprocess(get_dataset_config("amos", intensity="zscore"), ["image"], ["bilinear"])
    assert isinstance(chain[-2], CropForegroundd) and isinstance(chain[-1], NormalizeIntensityd)


def test_descriptions():
    ct = {"scheme": "ct", "lower": -1000.0, "upper": 312.5, "mean": 42.125, "std": 120.0}
    assert get_scheme("ct").describe(ct) == "CT: clip [-1000, 312.5] (foreground p0.5/p99.5), z-score with mean 42.12, std 120"
    assert get_scheme("window").describe({"scheme": "window", "a_min": -125, "a_max": 275}) == "window [-125, 275] -> [0, 1]"
    assert get_scheme("zscore").describe({"scheme": "zscore"}) == "z-score per volume"
    # the export sidecar of the uniform schemes, as written before
    assert sidecar_normalisation([{"scheme": "window", "a_min": -100.0, "a_max": 200.0}] * 2) == {
        "type": "window", "a_min": -100.0, "a_max": 200.0, "b_min": 0.0, "b_max": 1.0, "clip": True, "formula": "clip((x - a_min) / (a_max - a_min), 0, 1)"}  # fmt: skip
    assert sidecar_normalisation([{"scheme": "zscore"}]) == {
        "type": "zscore", "nonzero": True, "channel_wise": True, "formula": "(x - mean) / std over the non-zero voxels of each channel; zeros stay 0"}  # fmt: skip
    assert sidecar_steps([{"scheme": "window", "a_min": 0, "a_max": 1}]) == ["normalise intensities (input.normalisation)", "crop to the bounding box of voxels > 0 (the body after windowing)"]
    assert sidecar_steps([{"scheme": "zscore"}]) == ["crop to the bounding box of voxels > 0 (raw MRI)", "normalise intensities (input.normalisation)"]
    assert sidecar_normalisation([ct])["type"] == "ct" and sidecar_steps([ct])[0] == "crop to the bounding box of voxels > -1000 (raw CT, HU)"
    mixed = sidecar_normalisation([ct, {"scheme": "zscore"}])
    assert mixed["type"] == "per_channel" and [c["type"] for c in mixed["channels"]] == ["ct", "zscore"]


# --------------------------------------------------------------------------------------------
# one header reader: NIfTI and NRRD alike
# --------------------------------------------------------------------------------------------

_SPACING = (2.0, 1.5, 3.0)
_ORIGIN = (-10.0, 20.0, 5.0)


def _affine(spacing=_SPACING, origin=_ORIGIN) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def _write(path: str, data: np.ndarray, affine: np.ndarray) -> str:
    """Write ``data`` (i, j, k[, c]) with a RAS ``affine`` as NIfTI or NRRD (by the ending)."""
    if path.endswith(".nii.gz"):
        nib.save(nib.Nifti1Image(data, affine), path)
        return path
    import nrrd

    lps = affine.copy()
    lps[:2] *= -1.0  # RAS -> LPS, NRRD's space
    directions = lps[:3, :3].T  # one row per axis
    kinds = ["domain"] * 3
    if data.ndim == 4:  # channels last, as MONAI reads them: a non-spatial last axis
        directions = np.vstack([directions, np.full(3, np.nan)])
        kinds = kinds + ["list"]
    hdr = {"space": "left-posterior-superior", "space directions": directions, "space origin": lps[:3, 3], "kinds": kinds}
    nrrd.write(path, data, hdr, index_order="F")
    return path


def _dataset(root: str, ext: str) -> list[dict]:
    """Three cases: one single-channel, one with two channel files, one 4-D two-channel file."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (20, 16, 10)
    img = lambda: rng.integers(-1000, 1000, size=shape).astype(np.int16)  # noqa: E731
    lab = np.zeros(shape, np.uint8)
    lab[5:10, 4:8, 2:6] = 1
    p = lambda name: os.path.join(root, name + ext)  # noqa: E731
    return [
        {"image": _write(p("a_0000"), img(), _affine()), "label": _write(p("a"), lab, _affine())},
        {"image": [_write(p("b_0000"), img(), _affine()), _write(p("b_0001"), img(), _affine())], "label": _write(p("b"), lab, _affine())},
        {"image": _write(p("c"), np.stack([img(), img()], axis=-1), _affine((1.0, 1.0, 1.0)))},
    ]


def test_read_header_same_for_nifti_and_nrrd(tmp_path):
    nii = _dataset(str(tmp_path / "nii"), ".nii.gz")
    nrd = _dataset(str(tmp_path / "nrrd"), ".nrrd")
    for a, b in zip(nii, nrd):
        for fa, fb in zip(*(c["image"] if isinstance(c["image"], list) else [c["image"]] for c in (a, b))):
            ha, hb = read_header(fa), read_header(fb)
            assert ha.shape == hb.shape and ha.channels == hb.channels and ha.array_shape == hb.array_shape
            np.testing.assert_allclose(ha.affine, hb.affine)
            assert ha.spacing == hb.spacing and ha.dtype == hb.dtype == np.dtype(np.int16)
            assert ha.data_bytes == hb.data_bytes == int(np.prod(ha.array_shape)) * 2
    h = read_header(nii[2]["image"])
    assert (h.shape, h.channels, h.array_shape, h.ndim) == ((20, 16, 10), 2, (20, 16, 10, 2), 4)
    assert read_header(nii[0]["image"]).data_offset == 352 and read_header(nrd[0]["image"]).data_offset is None
    assert read_header(nrd[0]["label"]).dtype == np.dtype(np.uint8)


def test_estimate_cache_bytes_every_format(tmp_path):
    cfg = get_dataset_config("custom", spacing=(1.0, 1.0, 1.0), intensity="zscore", num_classes=2, roi=(16, 16, 16))
    # by hand: 20x16x10 at 2x1.5x3 mm -> 40x24x30 at 1 mm; the 1 mm case stays 20x16x10, padded to 20x16x16
    big, small = 40 * 24 * 30, 20 * 16 * 16
    expected = big * 4 * (1 + 1) + big * 4 * (2 + 1) + small * 4 * 2
    nii = estimate_cache_bytes(cfg, _dataset(str(tmp_path / "nii"), ".nii.gz"))
    nrd = estimate_cache_bytes(cfg, _dataset(str(tmp_path / "nrrd"), ".nrrd"))
    assert nii == nrd == expected > 0  # NRRD counted 0 bytes before (NIfTI-only header reads)
    # an unreadable case counts as the largest of the others
    broken = _dataset(str(tmp_path / "nrrd2"), ".nrrd")
    with open(broken[2]["image"], "wb") as f:
        f.write(b"not an image")
    assert estimate_cache_bytes(cfg, broken) == big * 4 * 2 + big * 4 * 3 + big * 4 * 3


def _bad_cases(root: str, ext: str) -> list[dict]:
    os.makedirs(root, exist_ok=True)
    shape = (12, 10, 8)
    img = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    lab = np.zeros(shape, np.uint8)
    lab[2:5, 2:5, 2:5] = 1
    bad_values = lab.copy()
    bad_values[0, 0, 0] = 5
    p = lambda name: os.path.join(root, name + ext)  # noqa: E731
    shifted = _affine(origin=(-9.0, 20.0, 5.0))
    return [
        {"image": _write(p("good"), img, _affine()), "label": _write(p("good_seg"), lab, _affine())},
        {"image": _write(p("values"), img, _affine()), "label": _write(p("values_seg"), bad_values, _affine())},
        {"image": _write(p("shape"), img, _affine()), "label": _write(p("shape_seg"), lab[:, :, :7].copy(), _affine())},
        {"image": _write(p("moved"), img, _affine()), "label": _write(p("moved_seg"), lab, shifted)},
        {"image": _write(p("twochan"), img, _affine()), "label": _write(p("twochan_seg"), np.stack([lab, lab], axis=-1), _affine())},
        {"image": _write(p("nolabel"), img, _affine()), "label": p("nolabel_missing")},
        {"image": [_write(p("multi_0000"), img, _affine()), _write(p("multi_0001"), img, _affine(spacing=(2.0, 1.5, 3.5)))]},
    ]


def test_checks_same_problems_for_nrrd_as_for_nifti(tmp_path):
    cfg = get_dataset_config("custom", spacing=(1.0, 1.0, 1.0), intensity="zscore", num_classes=3, roi=(8, 8, 8))
    reports = []
    for ext in (".nii.gz", ".nrrd"):
        root = str(tmp_path / ext.strip("."))
        cases = _bad_cases(root, ext)
        cfg_ch = get_dataset_config("custom", spacing=(1.0, 1.0, 1.0), intensity="zscore", num_classes=3, roi=(8, 8, 8), channel_names=["a", "b"])
        with pytest.raises(DataError) as err:
            check_cases(cases[:-1], cfg)
        with pytest.raises(DataError) as err2:
            check_cases(cases[-1:], cfg_ch)
        problems, infos = inspect_cases(cases, cfg.num_classes)
        assert infos[0] == {"shape": (12, 10, 8), "spacing": _SPACING, "channels": 1, "label_values": [0, 1]}
        reports.append([p.replace(root, "ROOT").replace(ext, ".EXT") for p in err.value.problems + err2.value.problems])
    nii, nrd = reports
    assert nii == nrd
    text = "\n".join(nii)
    assert len(nii) == 6, text
    assert "ROOT/values_seg.EXT: label values 5 are outside 0..2 (num_classes=3)" in text
    assert "ROOT/shape_seg.EXT: label shape (12, 10, 7) differs from image shape (12, 10, 8)" in text
    assert "ROOT/moved_seg.EXT: label affine differs from the image's (ROOT/moved.EXT) by up to 1 mm" in text
    assert "ROOT/twochan_seg.EXT: label is 4-D with 2 channels/time points (12, 10, 8, 2)" in text
    assert "ROOT/nolabel_missing.EXT: label file not found" in text
    assert "ROOT/multi_0001.EXT: channel 1 (b) geometry (affine) differs from channel 0's (ROOT/multi_0000.EXT) by up to 0.5 mm" in text


def test_nifti_extras_through_the_one_reader(tmp_path):
    # a 5-D NIfTI keeps its stored shape (not taken for 4-D); a truncated one is caught by its size
    five = str(tmp_path / "five.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4, 1, 2), np.int16), np.eye(4)), five)
    assert read_header(five).array_shape == (6, 5, 4, 1, 2)
    ok = str(tmp_path / "ok.nii")
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), np.eye(4)), ok)
    cut = str(tmp_path / "cut.nii")
    with open(ok, "rb") as f:
        data = f.read()
    with open(cut, "wb") as f:
        f.write(data[:-40])
    problems, _ = inspect_cases([{"image": five}, {"image": ok}, {"image": cut}])
    assert len(problems) == 2
    assert problems[0].startswith(f"{five}: image is 5-D (6, 5, 4, 1, 2); expected a 3-D volume")
    assert problems[1].startswith(f"{cut}: corrupt image: the voxel data cannot be read")

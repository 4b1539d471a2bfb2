"""Shared fixtures: the demo dataset, the tiny checkpoint; the pre-processed store of training runs
kept in the session's temporary folder; a guard that no test changed the tiny network config in
place. The constants and writers behind them are in helpers.py."""

from __future__ import annotations

import copy
import shutil

import pytest
from helpers import TINY, TINY_FLAGS, write_tiny_checkpoint

from rep3d.data.demo import make_demo_dataset

_TINY, _TINY_FLAGS = copy.deepcopy(TINY), list(TINY_FLAGS)


@pytest.fixture(autouse=True, scope="session")
def _preprocessed_store_in_tmp(tmp_path_factory):
    """Training writes its pre-processed store under ``$REP3D_PREPROCESSED``, else the user's cache
    folder: the suite's goes to its temporary folder (tests that need another point it elsewhere)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REP3D_PREPROCESSED", str(tmp_path_factory.mktemp("preprocessed")))
        yield


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> str:
    """The demo dataset (2 training cases, 1 validation case, 32^3), written once per session.
    Read-only: runs write into their own ``--output``."""
    return make_demo_dataset(str(tmp_path_factory.mktemp("demo")), n_train=2, n_val=1, size=(32, 32, 32))


@pytest.fixture(scope="session")
def _small_demo_source(tmp_path_factory) -> str:
    return make_demo_dataset(str(tmp_path_factory.mktemp("small_demo")), n_train=3, n_val=1, size=(32, 32, 32))


@pytest.fixture
def demo(tmp_path, _small_demo_source) -> str:
    """A fresh, writable copy of a 4-case demo dataset (3 training, 1 validation, 32^3) per test:
    tests that modify, add or remove files take this one, not the shared ``demo_root``."""
    return shutil.copytree(_small_demo_source, str(tmp_path / "demo"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A format-2 checkpoint of helpers.tiny_model (seed 0, 3 classes), at ``.../run/fold_0/
    best_metric_model.pth`` in a folder of its own per test module (a module may write beside it)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("run") / "fold_0" / "best_metric_model.pth")


@pytest.fixture(autouse=True, scope="module")
def _tiny_config_unchanged():
    yield
    assert TINY == _TINY and TINY_FLAGS == _TINY_FLAGS, "a test modified helpers.TINY / TINY_FLAGS in place: copy them instead"

"""Shared fixtures. The builders are plain functions in ``tests/helpers.py``; call those directly
for other sizes/spacings/seeds (``from helpers import make_msd_dataset``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from helpers import make_msd_dataset, make_nnunetv2_dataset, shared_data


def pytest_configure(config):
    """The planner's remembered step times go to a folder of this test session, not the user's home
    (subprocesses inherit it)."""
    os.environ["MEDSEG_HOME"] = tempfile.mkdtemp(prefix="medseg_home_")


@pytest.fixture
def msd_dataset(tmp_path: Path) -> Path:
    """A clean MSD-layout dataset: 4 cases (20, 24, 16), 1 mm, modality MRI, labels 0/1/2."""
    return make_msd_dataset(tmp_path / "msd")


@pytest.fixture
def nnunetv2_dataset(tmp_path: Path) -> Path:
    """A clean nnU-Net v2-layout dataset: 4 cases (20, 24, 16), 1 mm, channels T1/T2, labels 0/1/2."""
    return make_nnunetv2_dataset(tmp_path / "nnunetv2")


@pytest.fixture
def shared_data_dir() -> Path:
    """The shared real-data folder (``$MEDSEG_SHARED_DATA``, else ``<repo>/../shared/data``).

    Skips the test when it is absent."""
    path = shared_data()
    if path is None:
        pytest.skip("shared data folder not found (set MEDSEG_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A work directory with a 3d_fullres model (1 input channel "MRI", labels 0/1/2) trained for one
    epoch on a synthetic 4-case dataset, fold 0. Shared by the tests that only read it."""
    from helpers import make_msd_dataset
    from test_training import _tiny_plan

    from medseg.training.loop import train_fold

    root = tmp_path_factory.mktemp("tiny_model")
    ds = make_msd_dataset(root / "ds", n_cases=4)
    _tiny_plan(ds, root / "wd")
    train_fold(root / "wd", "3d_fullres", 0, epochs=1)
    return root / "wd"

"""Synthetic data sets shared by the data tests (generated once per session, tiny sizes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pkdot.data.synthetic import write_synthetic


@pytest.fixture(scope="session")
def biovid_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Biovid Part A: 4 subjects x 5 classes x 2 windows, 160-pixel frames."""
    return write_synthetic(
        "biovid", tmp_path_factory.mktemp("biovid_a"), subjects=4, samples_per_class=2, seed=3, progress=False
    )


@pytest.fixture(scope="session")
def biovid_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Biovid Part B: 2 subjects x 5 classes x 1 window, 64-pixel frames."""
    return write_synthetic(
        "biovid",
        tmp_path_factory.mktemp("biovid_b"),
        subjects=2,
        samples_per_class=1,
        part="B",
        frame_size=64,
        seed=5,
        progress=False,
    )


@pytest.fixture(scope="session")
def affwild2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Aff-Wild2: 4 subjects x 2 videos (a _left/_right pair each) of 4 s, 96-pixel frames."""
    return write_synthetic(
        "affwild2",
        tmp_path_factory.mktemp("affwild2"),
        subjects=4,
        videos_per_subject=2,
        seconds_per_video=4.0,
        frame_size=96,
        seed=7,
        progress=False,
    )

"""Shared fixtures: small synthetic TEMPO granules and shards made from them. Shared
constants and functions are in ``helpers/common.py``."""

from __future__ import annotations

import shutil

import pytest
from helpers.common import SMALL, TILE

from data_prep import make_shards, synthesize


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth"))
    assert synthesize.main([out] + SMALL) == 0
    return out


@pytest.fixture(scope="session")
def shard_dir(synth_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("shards") / "shards")
    assert make_shards.main([synth_dir, out, "--shard-size", "300KB"] + TILE) == 0
    return out


@pytest.fixture
def synth_copy(synth_dir, tmp_path) -> str:
    """A private copy of the synthetic granules that a test may damage."""
    dst = str(tmp_path / "granules")
    shutil.copytree(synth_dir, dst)
    return dst


@pytest.fixture(scope="session")
def train_shards(synth_dir, tmp_path_factory) -> str:
    """Shards small enough that 2 ranks each get several (4 samples per shard)."""
    out = str(tmp_path_factory.mktemp("train_shards") / "shards")
    assert make_shards.main([synth_dir, out, "--max-samples-per-shard", "4"] + TILE) == 0
    return out

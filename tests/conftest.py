"""Shared fixtures: small synthetic TEMPO granules and shards made from them."""

from __future__ import annotations

import os
import shutil

import pytest

from data_prep import make_shards, synthesize

REFERENCE_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                             "reference_data"))

SMALL = ["--granules", "4", "--mirror-steps", "32", "--xtrack", "48", "--channels", "64",
         "--seed", "3", "--l2-extra-mirror-steps", "1"]
TILE = ["--tile-size", "16", "--quiet"]


def reference_file(name: str) -> str:
    path = os.path.join(REFERENCE_DIR, name)
    if not os.path.exists(path):
        pytest.skip(f"reference data not present: {path}")
    return path


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


def tiny_overrides(shards: str, out_dir: str) -> list[str]:
    """A model small enough to train for a few steps on CPU in seconds."""
    return [f"data.shards={shards}", "data.batch_size=4", "data.num_workers=0",
            "data.shuffle_buffer=8", "data.shuffle_initial=4",
            "model.in_channels=64", "model.channels=[16,16]", "model.latent_channels=4",
            "model.head_hidden=[16]", "model.tile_size=16", "model.attn_heads=2",
            "optim.lr=3e-3", "optim.warmup_steps=0", "train.progress=false",
            f"train.output_dir={out_dir}", "train.log_every=1", "train.val_every=0"]

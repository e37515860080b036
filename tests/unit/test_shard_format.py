"""The shard-folder contract (data_prep.shard_format): both writers produce the same
metadata keys, readers check them, and the trainer checks the model against them."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from helpers.common import DEMO

from data_prep import convert_pt_tiles, shard_format
from data_prep.util import read_json


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    """A research .pt folder with one unreadable file, converted."""
    import torch

    src = tmp_path_factory.mktemp("pt")
    rng = np.random.default_rng(1)
    for i in range(4):
        torch.save(torch.from_numpy(rng.uniform(1e11, 1e13, (2, 8, 8, 12)).astype(np.float32)),
                   src / f"granule{i}.pt")
    (src / "granule9.pt").write_bytes(b"not a tensor")
    out = str(tmp_path_factory.mktemp("converted") / "shards")
    assert convert_pt_tiles.main([str(src), out]) == 1  # one file could not be read
    return out


def test_both_writers_write_the_same_contract(shard_dir, converted):
    for folder, source, tile in ((shard_dir, "make_shards", 16), (converted, "convert_pt_tiles", 8)):
        man = read_json(os.path.join(folder, shard_format.MANIFEST))
        assert man["source"] == source and man["tile_size"] == tile
        assert man["l2_order"] == list(shard_format.L2_ORDER)
        assert man["geo_order"] == list(shard_format.GEO_ORDER)
        assert man["l2_units"] == shard_format.L2_UNITS
        sizes = read_json(os.path.join(folder, shard_format.SIZES))
        assert man["shard_bytes"] == {rel: os.path.getsize(os.path.join(folder, rel))
                                      for rel in sizes}
        assert set(man["counts"]) >= {"written", "per_split", "granules", "granule_errors"}
        assert man["counts"]["granule_errors"] == len(man["granule_errors"])
        assert man["counts"]["written"] == sum(sizes.values())
        # the loader's part of it, alone in header.json
        head = read_json(os.path.join(folder, shard_format.HEADER))
        assert head == shard_format.header(man)
        assert set(head) == set(shard_format.manifest_header("", 0)) | {"shard_bytes"}
        assert head["shard_bytes"] == man["shard_bytes"] and head["tile_size"] == tile
    errors = read_json(os.path.join(converted, shard_format.MANIFEST))["granule_errors"]
    assert list(errors) == ["granule9"]


def test_write_metadata_refuses_a_manifest_without_the_header(tmp_path):
    with pytest.raises(shard_format.ShardFormatError, match="missing .*tile_size"):
        shard_format.write_metadata(str(tmp_path), {}, {}, {"format": shard_format.FORMAT})
    man = shard_format.manifest_header("test", 4)
    with pytest.raises(shard_format.ShardFormatError, match="train/x.tar"):
        shard_format.write_metadata(str(tmp_path), {"train/x.tar": 3}, {}, man)
    assert not os.path.exists(tmp_path / shard_format.SIZES)  # nothing half-written


@pytest.mark.parametrize("key, value, message", [
    ("format", "tempo-vae-shards/0", "format 'tempo-vae-shards/0'"),
    ("geo_order", ["longitude", "latitude", "sza", "vza"], "geo_order"),
    ("l2_order", ["O3TOT", "NO2", "HCHO", "CLDO4"], "l2_order"),
])
@pytest.mark.parametrize("old_folder", [False, True])
def test_loader_refuses_a_folder_of_another_contract(shard_dir, tmp_path, key, value, message,
                                                     old_folder):
    """The loader checks header.json; in a folder written before it existed, manifest.json."""
    from train.data import DataError, ShardSet

    copy = str(tmp_path / "shards")
    shutil.copytree(shard_dir, copy)
    if old_folder:
        os.unlink(os.path.join(copy, shard_format.HEADER))
    path = os.path.join(copy, shard_format.MANIFEST if old_folder else shard_format.HEADER)
    man = read_json(path)
    man[key] = value
    with open(path, "w") as f:
        json.dump(man, f)
    with pytest.raises(DataError, match=f"{path}: {message}"):
        ShardSet.open(copy, "train")


def test_folder_without_header_falls_back_to_the_manifest(shard_dir, tmp_path, caplog):
    """Folders written before header.json existed: the same header, taken from the whole
    manifest with a logged note; the start-up size check still holds."""
    from train.data import DataError, ShardSet

    copy = str(tmp_path / "shards")
    shutil.copytree(shard_dir, copy)
    new = ShardSet.open(copy, "train")
    assert "header.json" not in caplog.text
    os.unlink(os.path.join(copy, shard_format.HEADER))
    with caplog.at_level("INFO", logger="train.data"):
        old = ShardSet.open(copy, "train")
    assert old.header == new.header and old.tile_size == 16
    assert f"{os.path.join(copy, shard_format.HEADER)} does not exist" in caplog.text
    assert "manifest.json instead (" in caplog.text and "bytes read)" in caplog.text
    rel = sorted(new.sizes)[0]
    with open(os.path.join(copy, rel), "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(DataError, match=f"{rel}: .* bytes, manifest.json says"):
        ShardSet.open(copy, "train")


def test_loader_exposes_channels_and_tile_size(shard_dir):
    from train.data import ShardSet

    s = ShardSet.open(shard_dir, "train")
    assert s.tile_size == 16 and s.channels == 64


def test_model_tile_size_must_match_the_shards(train_shards, tmp_path, capsys):
    from helpers.common import tiny_overrides

    from train import main

    args = ["--config", DEMO] + tiny_overrides(train_shards, str(tmp_path / "run"))
    assert main.main(args + ["model.tile_size=32"]) == 2
    err = capsys.readouterr().err
    assert "model.tile_size=32 but the shards" in err and "hold 16 x 16 tiles" in err

"""Streaming loader: exactly-once epochs across simulated ranks with real worker processes,
deterministic order, equal batch counts, alignment under augmentation, resume, errors."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from helpers.common import TILE, epoch_batches, resumed_epoch
from helpers.damage import corrupt_member, private_copy, truncate_half

from data_prep import make_shards, samples
from data_prep.util import atomic_write_json
from train.config import DataConfig
from train.data import DataError, build_loader, plan_epoch
from train.transforms import L2Transform


@pytest.fixture(scope="module")
def many_shards(synth_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("loader") / "shards")
    assert make_shards.main([synth_dir, out, "--max-samples-per-shard", "4"] + TILE) == 0
    return out


def cfg(root, **kw):
    base = dict(shards=root, batch_size=3, num_workers=2, shuffle_buffer=6, shuffle_initial=3)
    return DataConfig(**(base | kw))


def train_keys(root, split="train"):
    from data_prep.samples import iter_tar

    sizes = json.load(open(os.path.join(root, "sizes.json")))
    return sorted(raw["__key__"] for rel in sizes if rel.startswith(split)
                  for raw in iter_tar(os.path.join(root, rel)))


def real_keys(batches):
    return [k for b in batches for k, v in zip(b["keys"], b["real"].tolist()) if v]


@pytest.mark.parametrize("world", [1, 2])
def test_epoch_is_exactly_the_training_set(many_shards, world):
    sizes = json.load(open(os.path.join(many_shards, "sizes.json")))
    assert len({n for k, n in sizes.items() if k.startswith("train")}) > 1  # uneven shards
    res = epoch_batches(cfg(many_shards), world)
    keys = [k for _, bs in res for k in real_keys(bs)]
    assert sorted(keys) == train_keys(many_shards)  # every sample once, no duplicates
    counts = {len(bs) for _, bs in res} | {n for n, _ in res}
    assert len(counts) == 1  # same number of batches on every rank, equal to len()
    for _, bs in res:
        for b in bs:
            assert b["l1"].shape[0] == 3 and b["l1"].dtype == torch.float16
            assert b["l2_t"].shape == b["l2"].shape and b["real"].dtype == torch.bool


def test_order_changes_per_epoch_and_repeats_per_seed(many_shards):
    c = cfg(many_shards)
    e0 = [real_keys(bs) for _, bs in epoch_batches(c, 2, epoch=0)]
    e0b = [real_keys(bs) for _, bs in epoch_batches(c, 2, epoch=0)]
    e1 = [real_keys(bs) for _, bs in epoch_batches(c, 2, epoch=1)]
    other = [real_keys(bs) for _, bs in epoch_batches(dataclasses.replace(c, seed=5), 2)]
    assert e0 == e0b
    assert e0 != e1 and e0 != other
    assert sorted(sum(e1, [])) == sorted(sum(e0, []))


@pytest.mark.timeout(120)
def test_uneven_shards_give_equal_batches_and_finish(many_shards):
    plan = plan_epoch({"a": 10, "b": 1, "c": 1, "d": 7}, 2, 0, 0)
    assert sorted(sum(plan, [])) == ["a", "b", "c", "d"]
    c = cfg(many_shards, batch_size=2, num_workers=1)
    res = epoch_batches(c, 3)
    assert len({len(bs) for _, bs in res}) == 1
    assert sorted(k for _, bs in res for k in real_keys(bs)) == train_keys(many_shards)
    pads = sum(int((~b["real"]).sum()) for _, bs in res for b in bs)
    assert pads > 0  # padding happened, and it is flagged, not counted twice


def test_too_few_shards_is_a_clear_error(many_shards):
    with pytest.raises(DataError, match="readers in epoch mode.*data.mode=resampled"):
        build_loader(cfg(many_shards, num_workers=4), "train", 0, 8)
    # resampled mode runs with the same shards
    loader = build_loader(cfg(many_shards, num_workers=2, mode="resampled"), "train", 0, 8)
    assert len(list(loader)) == len(loader)


def test_resampled_mode_equal_and_deterministic(many_shards):
    c = cfg(many_shards, mode="resampled", samples_per_epoch=30)
    a = epoch_batches(c, 2)
    b = epoch_batches(c, 2)
    assert [real_keys(bs) for _, bs in a] == [real_keys(bs) for _, bs in b]
    assert len({len(bs) for _, bs in a}) == 1
    assert all(bool(x["real"].all()) for _, bs in a for x in bs)  # endless: never padded


def test_validation_each_sample_once_over_ranks(many_shards):
    c = cfg(many_shards, num_workers=2)
    for world in (1, 3):
        res = epoch_batches(c, world, split="val")
        assert sorted(k for _, bs in res for k in real_keys(bs)) == train_keys(many_shards,
                                                                                 "val")
        assert len({len(bs) for _, bs in res}) == 1
    # deterministic and not augmented
    a = epoch_batches(c, 1, split="val")[0][1]
    b = epoch_batches(c, 1, split="val")[0][1]
    assert all(torch.equal(x["l1"], y["l1"]) for x, y in zip(a, b))


def test_resume_mid_epoch_gives_the_same_batches(many_shards):
    ref, state, rest = resumed_epoch(cfg(many_shards), epoch=3, consumed=3)
    assert state == {"epoch": 3, "batches_consumed": 3, "segments": [], "errors": {}}
    assert [b["keys"] for b in rest] == [b["keys"] for b in ref[3:]]
    assert all(torch.equal(x["l1"], y["l1"]) for x, y in zip(rest, ref[3:]))


# ----------------------------------------------------------------------------- alignment


def _pattern_shards(root, n=6, c=3, t=8):
    """Shards whose L1 channel 0, every L2 product and every geo field hold the same
    asymmetric pattern, so any transform applied to one but not another shows."""
    import webdataset as wds

    os.makedirs(os.path.join(root, "train"))
    base = np.arange(t * t, dtype=np.float32).reshape(t, t)
    w = wds.ShardWriter(os.path.join(root, "train", "%02d.tar"), maxcount=2, encoder=False,
                        verbose=0)
    for i in range(n):
        pat = base + 100 * i
        l1 = np.stack([pat / 1000.0] * c)
        w.write(samples.encode(f"s{i}", l1, np.stack([pat] * 4) / 1000.0, np.stack([pat] * 4),
                               {"granule": "g", "l2_order": ["NO2", "O3TOT", "HCHO", "CLDO4"]}))
    w.close()
    atomic_write_json(os.path.join(root, "sizes.json"),
                      {f"train/{i:02d}.tar": 2 for i in range(n // 2)})
    l2 = {p: {"mad": 1.0, "mean": 0.0, "std": 1.0} for p in ["NO2", "O3TOT", "HCHO", "CLDO4"]}
    atomic_write_json(os.path.join(root, "stats.json"), {"l2": l2})


def test_augmentation_keeps_l1_l2_geo_aligned(tmp_path):
    _pattern_shards(str(tmp_path))
    c = cfg(str(tmp_path), batch_size=2, num_workers=1, augment=True)
    seen_transforms = set()
    for epoch in range(4):
        loader = build_loader(c, "train")
        loader.set_epoch(epoch)
        for b in loader:
            for j in range(2):
                l1 = b["l1"][j, 0].float() * 1000.0
                np.testing.assert_allclose(b["geo"][j, 0], l1, atol=0.6)
                np.testing.assert_allclose(b["geo"][j, 3], b["geo"][j, 0])
                np.testing.assert_allclose(b["l2"][j, 2] * 1000.0, b["geo"][j, 0], atol=0.01)
                g = b["geo"][j, 0]
                seen_transforms.add((bool(g[0, 0] < g[0, 1]), bool(g[0, 0] < g[1, 0])))
    assert len(seen_transforms) > 1  # augmentation did happen


@pytest.mark.parametrize("kind", ["research", "linear"])
def test_l2_transform_roundtrip(kind):
    stats = {"NO2": {"mad": 2e15, "median": 1e15, "mean": 0, "std": 1},
             "HCHO": {"mad": 4e15, "median": 5e15, "mean": 0, "std": 1},
             "O3TOT": {"mad": 10, "mean": 310.0, "std": 25.0}, "CLDO4": {"mad": 0.1}}
    tr = L2Transform(stats, kind)
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randn(5, 4, 4, generator=g, dtype=torch.float64) * 5e15,
                     300 + 30 * torch.randn(5, 4, 4, generator=g, dtype=torch.float64),
                     torch.randn(5, 4, 4, generator=g, dtype=torch.float64) * 8e15,
                     torch.rand(5, 4, 4, generator=g, dtype=torch.float64)], dim=1)
    x[0, 0, 0, 0] = float("nan")
    y = tr.forward(x)
    assert torch.isnan(y[0, 0, 0, 0]) and torch.isfinite(y[1:]).all()
    back = tr.inverse(y)
    torch.testing.assert_close(back[1:], x[1:], rtol=1e-9, atol=1e-6)
    with pytest.raises(ValueError, match="l2.NO2.mad"):
        L2Transform(stats | {"NO2": {"mad": 0.0, "median": 0.0}}, kind)
    if kind == "linear":
        # NO2/HCHO are affine in physical units: a mean in model space is the physical mean
        m = tr.forward(x[1:]).mean(dim=0, keepdim=True)
        torch.testing.assert_close(tr.inverse(m)[0, 0], x[1:, 0].mean(0), rtol=1e-9, atol=1.0)
        assert tr.params()["no2_centre"] == 1e15
        with pytest.raises(ValueError, match="l2.HCHO.median"):
            L2Transform(stats | {"HCHO": {"mad": 4e15, "median": float("nan")}}, kind)
    else:
        # asinh: the inverse of the mean in model space is not the physical mean
        m = tr.forward(x[1:]).mean(dim=0, keepdim=True)
        assert not torch.allclose(tr.inverse(m)[0, 0], x[1:, 0].mean(0), rtol=1e-3)


# ----------------------------------------------------------------------------- bad data




def test_bad_sample_stops_with_key_or_is_skipped_and_counted(many_shards, tmp_path):
    root, sizes, train = private_copy(many_shards, str(tmp_path / "s"))
    rel = train[0]
    key = next(samples.iter_tar(os.path.join(root, rel)))["__key__"]
    corrupt_member(root, rel, key, "l1.npy", b"not an array")
    c = cfg(root, num_workers=0)
    with pytest.raises(samples.SampleError, match=f"{rel} sample '{key}'.*not a valid .npy"):
        list(build_loader(c, "train"))
    loader = build_loader(dataclasses.replace(c, on_error="skip"), "train")
    batches = list(loader)
    assert loader.errors == {"bad_array": 1}
    assert key not in real_keys(batches)
    assert len(batches) == len(loader)
    assert sorted(real_keys(batches) + [key]) == train_keys(many_shards)


def test_nonfinite_l1_and_size_mismatch_are_named(many_shards, tmp_path):
    root, sizes, train = private_copy(many_shards, str(tmp_path / "s"))
    rel = train[1]
    raw = next(samples.iter_tar(os.path.join(root, rel)))
    l1 = samples.npy_array(raw["l1.npy"]).copy()
    l1[0, 0, 0] = np.inf
    corrupt_member(root, rel, raw["__key__"], "l1.npy", samples.npy_bytes(l1))
    c = cfg(root, num_workers=0, augment=False)
    with pytest.raises(samples.SampleError, match=f"sample '{raw['__key__']}': l1 holds NaN"):
        list(build_loader(c, "train"))
    # sizes.json that disagrees with a shard: named, or counted when skipping
    sizes[rel] += 2
    json.dump(sizes, open(os.path.join(root, "sizes.json"), "w"))
    loader = build_loader(dataclasses.replace(c, on_error="skip"), "train")
    list(loader)
    assert loader.errors == {"nonfinite_l1": 1, "size_mismatch": 2}
    clean, _, _ = private_copy(many_shards, str(tmp_path / "clean"))
    json.dump(sizes, open(os.path.join(clean, "sizes.json"), "w"))
    with pytest.raises(samples.SampleError, match=f"{rel}: .* samples, sizes.json says"):
        list(build_loader(cfg(clean, num_workers=0), "train"))


def test_truncated_shard_stops_naming_it_or_is_skipped_and_counted(many_shards, tmp_path):
    root, sizes, train = private_copy(many_shards, str(tmp_path / "s"))
    rel = train[0]
    truncate_half(os.path.join(root, rel))
    # found before reading: its size differs from the one make_shards recorded
    with pytest.raises(DataError, match=f"1 train shard.*{rel}: .* bytes, header.json says"):
        build_loader(cfg(root, num_workers=0), "train")
    # without the recorded sizes, the reader still stops at the damage and names it
    for name in ("manifest.json", "header.json"):
        man = json.load(open(os.path.join(root, name)))
        del man["shard_bytes"]
        atomic_write_json(os.path.join(root, name), man)
    with pytest.raises(samples.ShardError, match=rel):
        list(build_loader(cfg(root, num_workers=0), "train"))
    loader = build_loader(cfg(root, num_workers=0, on_error="skip"), "train")
    got = real_keys(list(loader))
    lost = loader.errors["unreadable_shard"]
    assert 1 <= lost <= sizes[rel] and set(loader.errors) == {"unreadable_shard"}
    assert len(got) == len(set(got)) == sum(n for k, n in sizes.items()
                                            if k.startswith("train")) - lost


def test_workers_leave_stop_signals_to_their_rank(many_shards):
    """SLURM and `kill -- -PGID` signal every process: a loader worker that died of SIGTERM
    would fail the rank before it could save its checkpoint."""
    import signal

    import psutil

    loader = build_loader(cfg(many_shards, num_workers=1, batch_size=2), "train")
    it = iter(loader)
    first = next(it)
    workers = psutil.Process().children()
    assert workers
    for w in workers:
        w.send_signal(signal.SIGTERM)
        w.send_signal(signal.SIGUSR1)
    rest = list(it)
    assert len(real_keys([first] + rest)) == len(train_keys(many_shards))

"""make_shards / compute_stats / inspect_shards / convert_pt_tiles end to end."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import netCDF4
import numpy as np
import pytest
from helpers.common import TILE

from data_prep import compute_stats, convert_pt_tiles, inspect_shards, make_shards, samples, tempo
from data_prep.granule import ReadOptions, normalise, read_granule
from data_prep.stats import BottomKSample, ChannelMoments, log_radiance


def load(path):
    with open(path) as f:
        return json.load(f)


def all_samples(shard_dir):
    out = {}
    for rel in load(os.path.join(shard_dir, "sizes.json")):
        for raw in inspect_shards.iter_tar_samples(os.path.join(shard_dir, rel)):
            out[raw["__key__"]] = samples.decode(raw, rel) | {"shard": rel}
    return out


def test_float16_storage_error_bound():
    z = np.random.default_rng(0).uniform(-10, 10, 100_000).astype(np.float32)
    back = samples.npy_array(samples.npy_bytes(z.astype(np.float16))).astype(np.float32)
    assert np.all(np.abs(back - z) <= samples.FLOAT16_REL_ERROR * np.abs(z) + 1e-7)


def test_npy_buffer_bytes_equal_numpys():
    rng = np.random.default_rng(1)
    for shape, dtype in (((7, 3, 5), np.float16), ((1028, 64, 64), np.float16),
                         ((4, 2), np.float32), ((3,), np.int64)):
        data, payload = samples.npy_buffer(shape, dtype)
        a = rng.normal(size=shape).astype(dtype)
        payload[...] = a
        assert bytes(data) == samples.npy_bytes(a)
        np.testing.assert_array_equal(samples.npy_array(data), a)


@pytest.mark.parametrize("with_torch", [True, False])
def test_float16_cast_bits_equal_numpys(with_torch, monkeypatch):
    """The cast used for the tiles gives numpy's bits (round to nearest even) over the
    whole range a tile holds: 0, -0, float16 subnormals and underflow, ties, the clip."""
    import torch

    from data_prep.granule import _to_float16

    if not with_torch:
        monkeypatch.delitem(sys.modules, "torch")
    rng = np.random.default_rng(2)
    z = np.concatenate([rng.uniform(-10, 10, 200_000), rng.normal(0, 1e-4, 100_000),
                        rng.normal(0, 1e-7, 1000), [0.0, -0.0, 10.0, -10.0, 2.0**-24,
                                                    2.0**-25, 1 + 2.0**-11, 1 + 3 * 2.0**-11]]
                       ).astype(np.float32)
    ties = (rng.integers(-2**14, 2**14, 10_000) * 2 + 1).astype(np.float32) * 2.0**-11
    z = np.concatenate([z, ties.astype(np.float32)])
    out = np.empty(z.shape, np.float16)
    _to_float16(z, out)
    np.testing.assert_array_equal(out.view(np.uint16), z.astype(np.float16).view(np.uint16))
    assert torch.get_num_threads() >= 1


def test_tiles_equal_per_tile_normalisation_exactly(synth_dir, monkeypatch):
    """cut_tiles' band-wise work (in place, reused buffers, one cast per band, row-wise
    transposes into the .npy bytes) gives exactly the bytes of normalising, filling,
    casting and transposing each tile on its own, with either float16 cast."""
    from data_prep.granule import TileOptions, cut_tiles

    found, _ = tempo.discover(tempo.find_files(synth_dir))
    g = read_granule(sorted(found.values(), key=lambda x: x.gid)[0], ReadOptions())
    c = g.radiance.shape[-1]
    rng = np.random.default_rng(3)
    mean = rng.normal(20, 1, c).astype(np.float32)
    std = rng.uniform(0.05, 2, c).astype(np.float32)
    t = TileOptions(size=8, stride=6, min_valid_fraction=0.0)
    for with_torch in (True, False):
        if not with_torch:
            monkeypatch.delitem(sys.modules, "torch", raising=False)
        n = 0
        for rec, sample in cut_tiles(g, mean, std, t):
            if sample is None:
                continue
            r, col = rec["row"], rec["col"]
            rad = g.radiance[r:r + t.size, col:col + t.size]
            bad = ~np.isfinite(rad)
            z = normalise(rad, mean, std)
            z[bad] = 0.0
            z[bad.sum(-1) / c > t.max_bad_channel_fraction] = 0.0
            want = np.ascontiguousarray(z.astype(np.float16).transpose(2, 0, 1))
            assert bytes(sample[samples.L1_KEY]) == samples.npy_bytes(want), rec["key"]
            n += 1
        assert n > 4


def test_roundtrip_equals_source(synth_dir, shard_dir):
    """Every sample, read with plain tarfile + numpy, equals the source granule within the
    documented float16 tolerance; L2 equals the reader's values exactly (NaN included)."""
    stats = load(os.path.join(shard_dir, "stats.json"))
    mean, std = (np.asarray(stats["l1"][k], np.float32) for k in ("mean", "std"))
    found, _ = tempo.discover(tempo.find_files(synth_dir))
    granules = {g.gid.key: read_granule(g, ReadOptions()) for g in found.values()}
    got = all_samples(shard_dir)
    assert got
    for key, s in got.items():
        g = granules[s["meta"]["granule"]]
        r, c, t = s["meta"]["row"], s["meta"]["col"], s["meta"]["size"]
        want = normalise(g.radiance[r:r + t, c:c + t], mean, std).transpose(2, 0, 1)
        want = np.where(np.isfinite(want), want, 0.0)
        l1 = s["l1"].astype(np.float32)
        assert np.all(np.abs(l1 - want) <= samples.FLOAT16_REL_ERROR * np.abs(want) + 1e-6), key
        np.testing.assert_array_equal(s["l2"], g.l2[:, r:r + t, c:c + t])
        np.testing.assert_array_equal(s["geo"], g.geo[:, r:r + t, c:c + t])
        assert s["meta"]["l2_order"] == ["NO2", "O3TOT", "HCHO", "CLDO4"]


def test_webdataset_reads_the_same(shard_dir):
    import webdataset as wds

    sizes = load(os.path.join(shard_dir, "sizes.json"))
    urls = [os.path.join(shard_dir, rel) for rel in sorted(sizes)]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    keys = [s["__key__"] for s in ds]
    assert sorted(keys) == sorted(all_samples(shard_dir)) and len(keys) == sum(sizes.values())


def test_counts_tie_out_and_splits_are_disjoint(synth_dir, shard_dir):
    man = load(os.path.join(shard_dir, "manifest.json"))
    sizes = load(os.path.join(shard_dir, "sizes.json"))
    c = man["counts"]
    assert c["written"] == sum(sizes.values()) == sum(c["per_split"].values())
    assert c["candidate_tiles"] == c["written"] + sum(c["dropped"].values())
    # 4 granules, 32x48 used grid (L2 has one extra row, trimmed), 16x16 tiles -> 2x3 each
    assert c["candidate_tiles"] == 4 * 2 * 3
    assert set(man["splits"]["train"]).isdisjoint(man["splits"]["val"])
    assert len(man["splits"]["val"]) == 1  # round(4 * 0.3)
    for g in man["granules"].values():
        assert g["mirror_steps_trimmed"]["NO2"] == 1 and g["mirror_steps_used"] == 32
    per_granule = {}
    for s in all_samples(shard_dir).values():
        split = s["shard"].split("/")[0]
        assert s["meta"]["granule"] in man["splits"][split]
        per_granule.setdefault(s["meta"]["granule"], set()).add(split)
    assert all(len(v) == 1 for v in per_granule.values())
    summary, problems = inspect_shards.inspect(shard_dir, progress=False)
    assert problems == [] and summary["samples"] == c["per_split"]


def test_stats_equal_numpy(synth_dir, shard_dir):
    man = load(os.path.join(shard_dir, "manifest.json"))
    stats = load(os.path.join(shard_dir, "stats.json"))
    found, _ = tempo.discover(tempo.find_files(synth_dir))
    train = [g for g in found.values() if g.gid.key in man["splits"]["train"]]
    ags = [read_granule(g, ReadOptions()) for g in train]
    logs = np.concatenate([log_radiance(a.radiance).reshape(-1, a.radiance.shape[-1])
                           for a in ags]).astype(np.float64)
    np.testing.assert_allclose(stats["l1"]["mean"], np.nanmean(logs, 0), rtol=1e-9)
    np.testing.assert_allclose(stats["l1"]["std"], np.nanstd(logs, 0), rtol=1e-6)
    for i, p in enumerate(["NO2", "O3TOT", "HCHO", "CLDO4"]):
        v = np.concatenate([a.l2[i].ravel() for a in ags]).astype(np.float64)
        v = v[np.isfinite(v)]
        s = stats["l2"][p]
        assert s["count"] == v.size and s["median_mad_exact"]
        assert s["median"] == pytest.approx(np.median(v), rel=1e-12)
        assert s["mad"] == pytest.approx(np.median(np.abs(v - np.median(v))), rel=1e-12)
        assert s["mean"] == pytest.approx(v.mean(), rel=1e-9)
        assert s["std"] == pytest.approx(v.std(), rel=1e-6)


def test_mergeable_stats_do_not_depend_on_order():
    rng = np.random.default_rng(1)
    parts = [rng.normal(i, 1 + i, (50 + 10 * i, 3)) for i in range(4)]
    a, b = ChannelMoments.empty(3), ChannelMoments.empty(3)
    for p in parts:
        a.update(p)
    for p in reversed(parts):
        b.update(p)
    allv = np.concatenate(parts)
    np.testing.assert_allclose(a.mean, allv.mean(0))
    np.testing.assert_allclose(b.std, allv.std(0))
    k1, k2 = BottomKSample.empty(100), BottomKSample.empty(100)
    for i, p in enumerate(parts):
        k1.update(p[:, 0], f"part{i}")
    for i in reversed(range(4)):
        k2.update(parts[i][:, 0], f"part{i}")
    np.testing.assert_array_equal(k1.values, k2.values)
    assert not k1.exact and k1.values.size == 100


def test_rerun_is_idempotent(synth_dir, tmp_path, capsys):
    out = str(tmp_path / "s")
    args = [synth_dir, out, "--shard-size", "300KB"] + TILE
    assert make_shards.main(args) == 0
    before = {f: (os.stat(f).st_mtime_ns, open(f, "rb").read())
              for f in glob.glob(os.path.join(out, "*", "*.tar"))}
    assert make_shards.main(args) == 0
    after = {f: (os.stat(f).st_mtime_ns, open(f, "rb").read())
             for f in glob.glob(os.path.join(out, "*", "*.tar"))}
    assert before == after  # nothing rewritten
    # a fresh run of the same inputs gives byte-identical shards
    out2 = str(tmp_path / "s2")
    assert make_shards.main([synth_dir, out2, "--shard-size", "300KB"] + TILE) == 0
    for f, (_, data) in before.items():
        assert open(f.replace(out, out2), "rb").read() == data


def test_resume_after_kill(synth_dir, tmp_path):
    """SIGKILL a real run after its first finished unit; the re-run completes it with the
    same shards as an uninterrupted run and no duplicates."""
    ref = str(tmp_path / "ref")
    args = ["--shard-size", "120KB"] + TILE
    assert make_shards.main([synth_dir, ref] + args) == 0
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.make_shards", synth_dir, out]
                            + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not glob.glob(os.path.join(out, ".done", "*.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(glob.glob(os.path.join(out, ".done", "*.json")))
    assert n_done >= 1
    # also leave debris: a half-written temp shard and a stray shard of an unfinished unit
    os.makedirs(os.path.join(out, ".tmp", "train-00001"), exist_ok=True)
    open(os.path.join(out, ".tmp", "train-00001", "0000.tar"), "wb").write(b"partial")
    assert make_shards.main([synth_dir, out] + args) == 0
    assert load(os.path.join(out, "sizes.json")) == load(os.path.join(ref, "sizes.json"))
    assert set(all_samples(out)) == set(all_samples(ref))
    assert inspect_shards.inspect(out, progress=False)[1] == []
    assert not os.path.exists(os.path.join(out, ".tmp"))


# ----------------------------------------------------------------------------- bad input


def _run(synth, tmp_path, *extra):
    out = str(tmp_path / "shards")
    code = make_shards.main([synth, out] + TILE + list(extra))
    man = os.path.join(out, "manifest.json")
    return code, (load(man) if os.path.exists(man) else None), out


def _rad(d, i=0):
    return sorted(glob.glob(os.path.join(d, "TEMPO_RAD_*.nc")))[i]


def test_truncated_rad_file_is_reported_and_others_written(synth_copy, tmp_path, capsys):
    bad = _rad(synth_copy, 1)
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 3)
    code, man, out = _run(synth_copy, tmp_path)
    assert code == 1
    key = tempo.parse_name(bad).gid.key
    assert os.path.basename(bad) in man["granule_errors"][key]
    assert man["counts"]["written"] > 0 and inspect_shards.inspect(out, False)[1] == []
    assert os.path.basename(bad) in capsys.readouterr().err


def test_non_netcdf_file_with_tempo_name(synth_copy, tmp_path):
    bad = _rad(synth_copy, 0)
    open(bad, "w").write("this is not netCDF")
    code, man, _ = _run(synth_copy, tmp_path)
    assert code == 1
    msg = man["granule_errors"][tempo.parse_name(bad).gid.key]
    assert "not a readable netCDF4 file" in msg and os.path.basename(bad) in msg


def test_missing_variable_and_group(synth_copy, tmp_path):
    bad = _rad(synth_copy, 0)
    with netCDF4.Dataset(bad, "w") as ds:  # a RAD file without the band group
        ds.createDimension("mirror_step", 4)
    code, man, _ = _run(synth_copy, tmp_path)
    assert code == 1 and "missing group 'band_290_490_nm'" in \
        man["granule_errors"][tempo.parse_name(bad).gid.key]
    no2 = sorted(glob.glob(os.path.join(synth_copy, "TEMPO_NO2_*.nc")))[1]
    with netCDF4.Dataset(no2, "w") as ds:
        ds.createGroup("product")
    with pytest.raises(tempo.TempoFileError, match="missing variable 'product/vertical"):
        tempo.read_l2(no2, "NO2")


def test_l2_without_l1_is_counted(synth_copy, tmp_path):
    bad = _rad(synth_copy, 2)
    os.unlink(bad)
    code, man, _ = _run(synth_copy, tmp_path)
    assert code == 0
    key = tempo.parse_name(bad).gid.key
    reasons = [f["reason"] for f in man["ignored_files"]
               if key in f["path"] and "/truth/" not in f["path"]]
    assert len(reasons) == 4 and all("no RAD L1 file" in r for r in reasons)
    assert man["counts"]["granules"] == 3


def test_mismatched_grid_is_an_error(synth_copy, tmp_path, capsys):
    rad = _rad(synth_copy, 0)
    key = tempo.parse_name(rad).gid
    hcho = os.path.join(synth_copy, tempo.file_name("HCHO", key))
    with netCDF4.Dataset(hcho, "w") as ds:
        ds.createDimension("mirror_step", 33)
        ds.createDimension("xtrack", 40)
        p = ds.createGroup("product")
        p.createVariable("vertical_column", "f8", ("mirror_step", "xtrack"))[:] = 1e16
        p.createVariable("main_data_quality_flag", "i2", ("mirror_step", "xtrack"))[:] = 0
    code, man, _ = _run(synth_copy, tmp_path)
    assert code == 1 and "xtrack size 40 does not match" in man["granule_errors"][key.key]
    # the mirror-step mismatch of the synthetic data is an error when asked for
    capsys.readouterr()
    code, man, _ = _run(synth_copy, tmp_path / "strict", "--mirror-step-policy", "error")
    err = capsys.readouterr().err
    assert code == 1 and man is None and "no training granule could be read" in err
    assert "33 mirror steps but the RAD file has 32" in err


def test_nan_radiance_and_all_fill_product(synth_copy, tmp_path):
    rad = _rad(synth_copy, 0)
    gid = tempo.parse_name(rad).gid
    with netCDF4.Dataset(rad, "a") as ds:
        v = ds["band_290_490_nm"]["radiance"]
        v.set_auto_maskandscale(False)
        a = v[...]
        a[0:16, 0:16, :] = np.nan  # a whole tile: dropped
        a[20, 20, 5] = np.inf  # one value: filled and counted
        v[...] = a
    with netCDF4.Dataset(os.path.join(synth_copy, tempo.file_name("O3TOT", gid)), "a") as ds:
        v = ds["product"]["column_amount_o3"]
        v[...] = np.full(v.shape, v.getncattr("_FillValue"), np.float32)  # its own fill
    code, man, out = _run(synth_copy, tmp_path)
    assert code == 0
    recs = {r["key"]: r for r in man["tiles"] if r["granule"] == gid.key}
    assert recs[f"{gid.key}_r0000_c0000"]["reason"] == "l1_valid_fraction_below_min"
    assert recs[f"{gid.key}_r0016_c0016"]["l1_filled_values"] >= 1
    assert man["counts"]["dropped"]["l1_valid_fraction_below_min"] >= 1
    assert man["granules"][gid.key]["all_invalid_products"] == ["O3TOT"]
    assert inspect_shards.inspect(out, False)[1] == []  # no NaN reached the shards


def test_output_dir_holding_something_else(synth_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    code = make_shards.main([synth_dir, str(out)] + TILE)
    assert code == 2 and "not a shard folder of ours" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "precious"
    code = make_shards.main([synth_dir, str(out), "--overwrite"] + TILE)
    assert code == 2 and (out / "thesis.tex").exists()


def test_changed_options_need_overwrite(synth_dir, tmp_path, capsys):
    out = str(tmp_path / "s")
    assert make_shards.main([synth_dir, out] + TILE) == 0
    assert make_shards.main([synth_dir, out, "--stride", "8"] + TILE) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert make_shards.main([synth_dir, out, "--stride", "8", "--overwrite"] + TILE) == 0
    assert load(os.path.join(out, "manifest.json"))["options"]["tile"]["stride"] == 8


def test_inspect_catches_corruption(shard_dir, tmp_path):
    import shutil

    from helpers.damage import truncate_half

    bad = str(tmp_path / "bad")
    shutil.copytree(shard_dir, bad)
    rel = sorted(load(os.path.join(bad, "sizes.json")))[0]
    truncate_half(os.path.join(bad, rel))
    _, problems = inspect_shards.inspect(bad, progress=False)
    assert any(rel in p for p in problems)
    assert any(p.startswith(f"{rel}: ") and "bytes, manifest.json says" in p for p in problems)
    assert inspect_shards.main([bad, "--quiet"]) == 1


def test_inspect_checks_header_and_stats_and_writes_a_missing_header(shard_dir, tmp_path,
                                                                      caplog):
    import shutil

    copy = str(tmp_path / "s")
    shutil.copytree(shard_dir, copy)
    head_path = os.path.join(copy, "header.json")
    head = load(head_path)
    head["tile_size"] = 32  # disagrees with the manifest: the loader would believe it
    json.dump(head, open(head_path, "w"))
    stats_path = os.path.join(copy, "stats.json")
    stats = load(stats_path)
    stats["l1"]["std"][3] = 0.0
    json.dump(stats, open(stats_path, "w"))
    _, problems = inspect_shards.inspect(copy, progress=False)
    assert problems == [f"{head_path} differs from the header of manifest.json (in: "
                        "tile_size); the loader reads header.json",
                        f"{stats_path}: l1 mean or std not finite, or std not positive"]
    stats["l1"]["std"] = stats["l1"]["std"][:-1]
    json.dump(stats, open(stats_path, "w"))
    assert "channels" in inspect_shards.inspect(copy, progress=False)[1][1]
    # a folder written before header.json existed: a note, not a problem; --write-header
    shutil.copy(os.path.join(shard_dir, "stats.json"), stats_path)
    os.unlink(head_path)
    summary, problems = inspect_shards.inspect(copy, progress=False)
    assert problems == [] and "header.json: missing" in summary["notes"][0]
    with caplog.at_level("INFO"):
        assert inspect_shards.main([copy, "--quiet", "--write-header"]) == 0
    assert f"wrote {head_path}" in caplog.text
    assert load(head_path) == load(os.path.join(shard_dir, "header.json"))
    assert inspect_shards.inspect(copy, progress=False) == (
        inspect_shards.inspect(shard_dir, progress=False))
    with open(head_path, "a") as f:  # there but damaged: a problem
        f.write("}")
    assert "header.json is not valid JSON" in inspect_shards.inspect(copy, progress=False)[1][0]


def test_compute_stats_cli(synth_dir, tmp_path):
    out = str(tmp_path / "stats.json")
    assert compute_stats.main([synth_dir, out, "--workers", "2"]) == 0
    s = load(out)
    assert len(s["granules"]) == 4 and len(s["l1"]["mean"]) == 64


def test_convert_pt_tiles(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    src = tmp_path / "pt"
    (src / "l2_NO2").mkdir(parents=True)
    (src / "l2_CLDO4").mkdir()
    raw = {}
    for i in range(4):
        rad = rng.uniform(1e11, 1e13, (3, 8, 8, 20)).astype(np.float32)
        raw[f"granule{i}"] = rad
        torch.save(torch.from_numpy(rad), src / f"granule{i}.pt")
        no2 = rng.normal(2.0, 1.0, (3, 8, 8)).astype(np.float32)  # research scaling: /1e15
        no2[0, 0, 0] = np.nan
        torch.save(torch.from_numpy(no2), src / "l2_NO2" / f"granule{i}.pt")
        torch.save(torch.from_numpy(rng.uniform(0, 1, (3, 8, 8)).astype(np.float32)),
                   src / "l2_CLDO4" / f"granule{i}.pt")
    out = str(tmp_path / "shards")
    assert convert_pt_tiles.main([str(src), out]) == 0
    assert inspect_shards.inspect(out, progress=False)[1] == []
    stats = load(os.path.join(out, "stats.json"))
    mean, std = (np.asarray(stats["l1"][k], np.float32) for k in ("mean", "std"))
    got = all_samples(out)
    assert len(got) == 12
    s = got["granule1_t0002"]
    want = normalise(raw["granule1"][2], mean, std).transpose(2, 0, 1)
    assert np.all(np.abs(s["l1"].astype(np.float32) - want)
                  <= samples.FLOAT16_REL_ERROR * np.abs(want) + 1e-6)
    no2 = torch.load(src / "l2_NO2" / "granule1.pt").numpy()[2]
    np.testing.assert_allclose(s["l2"][0], no2 * 1e15, rtol=1e-6)
    assert np.isnan(s["l2"][1]).all() and np.isnan(s["l2"][2]).all()  # missing products
    assert "O3TOT" in s["meta"]["missing_products"]
    with tarfile.open(os.path.join(out, sorted(load(os.path.join(out, "sizes.json")))[0])) as t:
        assert all(m.name.count(".") >= 1 for m in t.getmembers())


def test_convert_pt_tiles_bad_input(tmp_path, capsys):
    import torch

    src = tmp_path / "pt"
    src.mkdir()
    torch.save(torch.zeros(2, 4, 4, 5), src / "a.pt")
    torch.save(torch.zeros(2, 4, 4, 5), src / "b.pt")
    (src / "l2_NO2").mkdir()
    torch.save(torch.zeros(3, 4, 4), src / "l2_NO2" / "a.pt")
    (src / "c.pt").write_bytes(b"garbage")
    code = convert_pt_tiles.main([str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "c.pt: not a readable torch tensor file" in err
    assert "l2_NO2/a.pt: shape (3, 4, 4), expected (2, 4, 4)" in err


def test_ignored_files_are_reported_by_reason(synth_dir, tmp_path, capsys):
    """The synthetic truth files are not granules: the summary says so, with an example,
    instead of a bare count."""
    assert make_shards.describe_ignored([]) == "0"
    text = make_shards.describe_ignored([("a/x.nc", "not a TEMPO granule file name"),
                                         ("a/y.nc", "not a TEMPO granule file name"),
                                         ("b/z.nc", "product FOO is not used")])
    assert text.startswith("3 (2 not a TEMPO granule file name, e.g. a/x.nc; 1 product FOO")
    out = str(tmp_path / "shards")
    assert make_shards.main([synth_dir, out, "--tile-size", "16"]) == 0
    err = capsys.readouterr().err
    assert "INFO data_prep.make_shards:" in err
    assert "not a TEMPO granule file name, e.g. truth/" in err

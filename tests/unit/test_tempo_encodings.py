"""Reading TEMPO files as NASA writes them: quality bitfields, netCDF encodings (fill,
missing_value, valid_range, packed integers, default fill), absolute mirror steps, leap
seconds, and the shard-level consequences (QA counts, radiance_error, sample keys)."""

from __future__ import annotations

import datetime as dt
import glob
import io
import json
import os
import tarfile

import netCDF4
import numpy as np
import pytest
from helpers.common import TILE, reference_file

from data_prep import convert_pt_tiles, inspect_shards, make_shards, samples, synthesize, tempo
from data_prep.granule import ReadOptions, read_granule

GRID = ["--mirror-steps", "20", "--xtrack", "24", "--channels", "32"]


@pytest.fixture(scope="module")
def scan_dir(tmp_path_factory) -> str:
    """Three granules of one scan, the third one mirror step short (as S012G03)."""
    out = str(tmp_path_factory.mktemp("scan"))
    assert synthesize.main([out, "--granules", "3", "--seed", "5", "--short-granules", "3",
                            "--bad-geolocation-rate", "0.01"] + GRID) == 0
    return out


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory) -> str:
    """The same granules as scan_dir, with re-processed (packed / missing_value) L2."""
    out = str(tmp_path_factory.mktemp("packed"))
    assert synthesize.main([out, "--granules", "3", "--seed", "5", "--short-granules", "3",
                            "--bad-geolocation-rate", "0.01", "--l2-encoding", "packed"]
                           + GRID) == 0
    return out


def _file(d, prod, i=0):
    return sorted(glob.glob(os.path.join(d, f"TEMPO_{prod}_*.nc")))[i]


def _truth(d, i=0):
    with netCDF4.Dataset(sorted(glob.glob(os.path.join(d, "truth", "*.nc")))[i]) as t:
        return {k: np.ma.filled(t[k][:], np.nan) for k in t.variables}


def _raw(path, var):
    with netCDF4.Dataset(path) as ds:
        ds.set_auto_maskandscale(False)
        return np.asarray(ds[var][:])


# ----------------------------------------------------------------------------- QA rules


def test_qa_rule_forms():
    cld = tempo.DEFAULT_QA["CLDO4"]
    flags = np.array([0, 1 << 13, 1 << 12, 1 << 2, (1 << 9) | (1 << 13), 1 << 14, 1 << 0],
                     np.int16)
    np.testing.assert_array_equal(cld.passes(flags), [1, 1, 0, 1, 0, 1, 0])
    o3 = tempo.DEFAULT_QA["O3TOT"]
    u = np.array([0, 2, 7, 1 << 6, (1 << 7) | 3, 1 << 15], np.uint16)
    np.testing.assert_array_equal(o3.passes(u), [1, 0, 0, 1, 0, 1])
    r = tempo.QARule.parse("accept:0,1", tempo.DEFAULT_QA["NO2"])
    assert r.variable == "product/main_data_quality_flag" and r.bits is None
    np.testing.assert_array_equal(r.passes(np.array([0, 1, 2])), [1, 1, 0])
    r = tempo.QARule.parse("variable:product/quality_flag;bits:0-2;accept:0,1")
    assert r.bits == (0, 1, 2) and r.accept == (0, 1)
    with pytest.raises(ValueError, match="needs 'variable'"):
        tempo.QARule.parse("bits:0-2")
    assert tempo.QARule.parse("none") is None
    with pytest.raises(ValueError, match="bad QA item 'bit:3'"):
        tempo.QARule.parse("bit:3", cld)
    with pytest.raises(ValueError, match="unknown product 'SO2'"):
        tempo.qa_rules({"SO2": None})
    back = tempo.QARule.from_json(json.loads(json.dumps(cld.to_json())))
    assert back == cld
    assert cld.removed_by(np.array([1 << 12, (1 << 12) | 1])) == {"bit 0": 1, "bit 12": 2}


def test_clear_sky_cloud_fraction_is_kept_and_error_bits_removed(scan_dir):
    n = dict(clear_kept=0, error_written=0, warn_kept=0)
    for i in range(3):
        path = _file(scan_dir, "CLDO4", i)
        raw_val = _raw(path, "product/cloud_fraction")
        flag = _raw(path, "product/processing_quality_flag")
        with netCDF4.Dataset(path) as ds:
            assert "_FillValue" not in ds["product/processing_quality_flag"].ncattrs()
            assert "bit 13" in ds["product/processing_quality_flag"].comment
        f = tempo.read_l2(path, "CLDO4")
        written = raw_val != tempo.CLDO4_FILL
        clear = (flag >> 13) & 1 == 1
        assert (raw_val[clear & written] == 0).all()
        errors = (flag & 0b1001100001001) != 0  # bits 0, 3, 8, 9, 12
        keep = ~errors & written
        # clear sky with only bit 13 (and warnings) set: kept as 0
        assert (f.values[clear & keep] == 0).all()
        n["clear_kept"] += int((clear & keep).sum())
        # every pixel with a fraction error bit is NaN, written value or not
        assert np.isnan(f.values[errors]).all() and np.isfinite(f.values[keep]).all()
        n["error_written"] += int((errors & written).sum())
        # warnings (2, 4) and the cloud-pressure bit 14 do not remove the fraction
        warn = ((flag >> 2) & 1 == 1) | ((flag >> 14) & 1 == 1)
        assert np.isfinite(f.values[warn & keep]).all()
        n["warn_kept"] += int((warn & keep).sum())
        assert f.n_bad_qa == int((errors & written).sum())
        assert f.qa_removed.get("bit 9", 0) == int((errors & written & (flag >> 9 & 1 == 1)).sum())
        # the old "flag <= 0" test would have removed every clear-sky pixel
        old = tempo.QARule("product/processing_quality_flag", None, (0,))
        assert not np.isfinite(tempo.read_l2(path, "CLDO4", old).values[clear]).any()
    assert n["clear_kept"] > 50 and n["error_written"] >= 2 and n["warn_kept"] > 20, n


def test_o3tot_error_code_and_warnings(scan_dir):
    n_err_written = 0
    for i in range(3):
        path = _file(scan_dir, "O3TOT", i)
        with netCDF4.Dataset(path) as ds:
            v = ds["product/quality_flag"]
            assert v.dtype == np.uint16 and "_FillValue" not in v.ncattrs()
            assert ds["product/column_amount_o3"].getncattr("_FillValue") == \
                np.float32(tempo.O3TOT_FILL)
        flag = _raw(path, "product/quality_flag").astype(np.int64)
        f = tempo.read_l2(path, "O3TOT")
        code = flag & 7
        written = _raw(path, "product/column_amount_o3") != np.float32(tempo.O3TOT_FILL)
        n_err_written += int(((code != 0) & written).sum())  # error codes on written values
        assert np.isnan(f.values[code != 0]).all()
        warn_only = (code == 0) & (flag != 0)
        assert warn_only.sum() > 10 and np.isfinite(f.values[warn_only]).all()
    assert n_err_written >= 5


def test_invalid_geolocation_is_nan(scan_dir):
    rad = _file(scan_dir, "RAD")
    with netCDF4.Dataset(rad) as ds:
        lat = ds["band_290_490_nm/latitude"]
        assert lat.getncattr("_FillValue") == np.float32(tempo.GEO_FILL) > 0
    raw = _raw(rad, "band_290_490_nm/latitude")
    bad = _truth(scan_dir)["invalid_geolocation"].astype(bool)
    assert bad.sum() >= 2 and (raw[bad] == np.float32(9.969209968386869e36)).all()
    g = tempo.read_l1(rad)
    for a in (g.latitude, g.longitude, g.sza, g.vza, g.saa, g.vaa):
        assert np.isnan(a[bad]).all() and np.isfinite(a[~bad]).all()
    assert g.n_invalid_geolocation == bad.sum()
    found, _ = tempo.discover(tempo.find_files(scan_dir))
    ag = read_granule(sorted(found.values(), key=lambda x: x.gid)[0], ReadOptions())
    assert np.isnan(ag.geo[:, bad]).all() and np.nanmax(np.abs(ag.geo)) < 1000


def test_netcdf_default_fill_and_attributes_are_honoured(tmp_path):
    """A float without _FillValue holds the netCDF default fill where unwritten; packed,
    missing_value and valid_range variables decode through the same reader."""
    assert tempo.NC_DEFAULT_FILL == netCDF4.default_fillvals["f4"] == -tempo.RAD_FILL
    path = str(tmp_path / "TEMPO_CLDO4_L2_V03_20250115T150000Z_S001G01.nc")
    with netCDF4.Dataset(path, "w") as ds:
        ds.createDimension("mirror_step", 2)
        ds.createDimension("xtrack", 3)
        p = ds.createGroup("product")
        v = p.createVariable("cloud_fraction", "f4", ("mirror_step", "xtrack"))
        v[0, :] = [0.0, 0.5, np.nan]  # row 1 never written: default fill
        q = p.createVariable("processing_quality_flag", "i2", ("mirror_step", "xtrack"))
        q[...] = 0
    f = tempo.read_l2(path, "CLDO4")
    np.testing.assert_array_equal(np.isnan(f.values), [[0, 0, 1], [1, 1, 1]])
    assert f.n_fill == 4 and f.values[0, 1] == 0.5


def test_fill_only_variables_decode_as_netcdf4_masks_them(tmp_path):
    """Variables whose decoding is only a fill value are read without masked arrays; the
    values and the invalid set are netCDF4's masked read (plus NaN/Inf) for every kind,
    and variables with other attributes still go through netCDF4."""
    path = str(tmp_path / "f.nc")
    rng = np.random.default_rng(0)
    kinds = {  # name: (type, attributes, expect the fill-only path)
        "f4_fill": ("f4", {"_FillValue": np.float32(tempo.RAD_FILL)}, True),
        "f4_default": ("f4", {}, True),
        "f8_fill": ("f8", {"_FillValue": -1e30}, True),
        "i2_fill": ("i2", {"_FillValue": np.int16(tempo.PQF_FILL)}, True),
        "u2_default": ("u2", {}, True),
        "i1_default": ("i1", {}, False),
        "f4_nan_fill": ("f4", {"_FillValue": np.float32(np.nan)}, False),
        "f4_range": ("f4", {"_FillValue": np.float32(-1), "valid_range": [0, 5]}, False),
        "i2_packed": ("i2", {"_FillValue": np.int16(-9999), "scale_factor": 0.5}, False),
        "i2_missing": ("i2", {"missing_value": np.int16(7)}, False),
    }
    with netCDF4.Dataset(path, "w") as ds:
        ds.createDimension("m", 6)
        ds.createDimension("x", 50)
        for name, (typ, attrs, _) in kinds.items():
            v = ds.createVariable(name, typ, ("m", "x"),
                                  fill_value=attrs.pop("_FillValue", None))
            for k, a in attrs.items():
                v.setncattr(k, a)
            v.set_auto_maskandscale(False)
            data = rng.integers(-3, 9, (5, 50)).astype(typ)
            if typ[0] == "f":
                data[0, :3] = [np.nan, np.inf, -np.inf]
            if "fill" in name:
                data[1, ::7] = v.getncattr("_FillValue")
            data[2, 4] = 7
            v[:5] = data  # row 5 never written: default fill or _FillValue
    with netCDF4.Dataset(path) as ds:
        for name, (_, _, plain) in kinds.items():
            v = ds[name]
            assert (tempo._plain_fill(v) is not None) == plain, name
            for rows in (None, slice(1, 4)):
                v.set_auto_maskandscale(True)
                v.set_always_mask(True)
                ref = v[rows] if rows is not None else v[...]
                want_bad = np.ma.getmaskarray(ref) | ~np.isfinite(np.ma.getdata(ref))
                got, bad = tempo.read_field(ds, name, path, rows, dtype=None)
                np.testing.assert_array_equal(bad, want_bad, name)
                np.testing.assert_array_equal(got[~bad], np.ma.getdata(ref)[~bad], name)
                assert rows or bad.any(), name  # the data hold invalid values of each kind
            got, bad = tempo.read_field(ds, name, path, extra_fill=7)  # a decoded value
            assert bad[2, 4] == (name != "i2_packed") and np.isnan(got[2, 4]) == bad[2, 4]


def test_packed_and_missing_value_encodings_read_like_nasa_ones(scan_dir, packed_dir):
    for prod in ("CLDO4", "O3TOT", "HCHO"):
        for i in range(3):
            a = tempo.read_l2(_file(scan_dir, prod, i), prod)
            b = tempo.read_l2(_file(packed_dir, prod, i), prod)
            # packed fractions > 1 fall outside valid_range: invalid either way
            np.testing.assert_array_equal(np.isnan(a.values), np.isnan(b.values), prod)
            ok = np.isfinite(a.values)
            np.testing.assert_allclose(b.values[ok], a.values[ok],
                                       atol=5.1e-5 if prod == "CLDO4" else 0, rtol=1e-6)
    with netCDF4.Dataset(_file(packed_dir, "CLDO4")) as ds:
        v = ds["product/cloud_fraction"]
        assert v.dtype == np.int16 and v.scale_factor == np.float32(1e-4)
    with netCDF4.Dataset(_file(packed_dir, "O3TOT")) as ds:
        assert "missing_value" in ds["product/column_amount_o3"].ncattrs()
    with netCDF4.Dataset(_file(packed_dir, "HCHO")) as ds:
        assert "_FillValue" not in ds["product/vertical_column"].ncattrs()


def test_packed_counts_without_scale_are_refused(packed_dir, tmp_path):
    """A packed fraction whose scale_factor is lost reads as counts up to 10000: the
    reader refuses it, naming the file and variable, instead of writing counts."""
    import shutil

    path = str(tmp_path / os.path.basename(_file(packed_dir, "CLDO4")))
    shutil.copy(_file(packed_dir, "CLDO4"), path)
    with netCDF4.Dataset(path, "a") as ds:
        v = ds["product/cloud_fraction"]
        v.delncattr("scale_factor")
        v.delncattr("add_offset")
    with pytest.raises(tempo.TempoFileError, match=r"cloud_fraction.*outside \[-0.5, 1.5\]"):
        tempo.read_l2(path, "CLDO4")


def test_packed_cloud_fraction_stats_are_physical(packed_dir, tmp_path):
    out = str(tmp_path / "shards")
    assert make_shards.main([packed_dir, out, "--val-fraction", "0"] + TILE) == 0
    with open(os.path.join(out, "stats.json")) as fh:
        cld = json.load(fh)["l2"]["CLDO4"]
    assert 0.1 < cld["mean"] < 0.6  # not raw counts (thousands)


# ----------------------------------------------------------------------------- layout


def test_synthetic_rad_layout(scan_dir):
    with netCDF4.Dataset(_file(scan_dir, "RAD")) as ds:
        band = ds["band_290_490_nm"]
        assert {"xtrack", "spectral_channel"} <= set(band.dimensions)
        assert "xtrack" not in ds.dimensions and "spectral_channel" not in ds.dimensions
        assert ds["time"].dimensions == ("mirror_step",)
        r = band["radiance"]
        assert r.getncattr("_FillValue") == np.float32(tempo.RAD_FILL) < 0
        assert band["radiance_error"].shape == r.shape
        assert band["pixel_quality_flag"].getncattr("_FillValue") == tempo.PQF_FILL
        assert "geolocation" not in ds.groups


def test_mirror_steps_are_absolute_and_131_vs_132(scan_dir):
    steps = []
    for i in range(3):
        g = tempo.read_l1(_file(scan_dir, "RAD", i))
        steps.append(g.mirror_step)
        for prod in tempo.L2_ORDER:  # the products of one granule share the grid
            f = tempo.read_l2(_file(scan_dir, prod, i), prod)
            np.testing.assert_array_equal(f.mirror_step, g.mirror_step)
    assert [s.size for s in steps] == [20, 20, 19]
    np.testing.assert_array_equal(np.concatenate(steps), np.arange(59))
    found, _ = tempo.discover(tempo.find_files(scan_dir))
    g3 = sorted(found.values(), key=lambda x: x.gid)[2]
    ag = read_granule(g3, ReadOptions(mirror_step_policy="error"))
    assert ag.mirror_step[0] == 40 and ag.radiance.shape[0] == 19


def test_alignment_by_mirror_step_coordinate(scan_dir, tmp_path):
    """An L2 file holding a different set of mirror steps is aligned by position, not by
    row index."""
    import shutil

    d = str(tmp_path / "g")
    shutil.copytree(scan_dir, d)
    path = _file(d, "O3TOT", 1)
    ref = tempo.read_l2(path, "O3TOT").values
    with netCDF4.Dataset(path, "a") as ds:  # drop the first row: steps 21..39
        ms = ds["mirror_step"][:]
        ds["mirror_step"][:] = np.concatenate([ms[1:], [ms[-1] + 1]])
        v = ds["product/column_amount_o3"]
        v[...] = np.concatenate([v[1:], v[-1:]])
        q = ds["product/quality_flag"]
        q[...] = np.concatenate([q[1:], q[-1:]])
    found, _ = tempo.discover(tempo.find_files(d))
    g = sorted(found.values(), key=lambda x: x.gid)[1]
    ag = read_granule(g, ReadOptions())
    assert ag.mirror_step[0] == 21 and ag.report["mirror_steps_trimmed"]["RAD"] == 1
    np.testing.assert_array_equal(ag.l2[1], ref[1:].astype(np.float32))
    with pytest.raises(tempo.TempoFileError, match="mirror steps"):
        read_granule(g, ReadOptions(mirror_step_policy="error"))


def test_time_is_gps_seconds_and_sample_time_is_utc(scan_dir, tmp_path):
    t = dt.datetime(2024, 6, 1, 21, 16, 14, tzinfo=dt.UTC)
    plain = (t - tempo.TIME_EPOCH).total_seconds()
    assert tempo.utc_to_tempo_time(t) - plain == 18
    assert tempo.tempo_time_to_utc(tempo.utc_to_tempo_time(t)) == t
    assert tempo.utc_to_tempo_time(dt.datetime(1981, 6, 30, tzinfo=dt.UTC)) == \
        (dt.datetime(1981, 6, 30, tzinfo=dt.UTC) - tempo.TIME_EPOCH).total_seconds()
    out = str(tmp_path / "s")
    assert make_shards.main([scan_dir, out, "--val-fraction", "0"] + TILE) == 0
    rel = sorted(json.load(open(os.path.join(out, "sizes.json"))))[0]
    s = samples.decode(next(inspect_shards.iter_tar_samples(os.path.join(out, rel))))
    g = tempo.read_l1(_file(scan_dir, "RAD", 0))
    mid = g.time[s["meta"]["row"] + s["meta"]["size"] // 2]
    want = tempo.tempo_time_to_utc(mid)
    assert s["meta"]["time"] == want.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    start = tempo.parse_name(_file(scan_dir, "RAD", 0)).gid.datetime
    assert abs((want - start).total_seconds() - 3.033 * (s["meta"]["row"] + 8)) < 0.01
    assert s["meta"]["mirror_step"] == s["meta"]["row"]  # first granule of its scan


@pytest.mark.reference
@pytest.mark.parametrize("name,steps,first", [
    ("TEMPO_NO2_L2_V03_20240601T210934Z_S012G01_subsetted.nc4", 132, 0),
    ("TEMPO_NO2_L2_V03_20240601T211614Z_S012G02_subsetted.nc4", 132, 132),
    ("TEMPO_NO2_L2_V03_20240601T212254Z_S012G03_subsetted.nc4", 131, 264)])
def test_real_granules_of_one_scan(name, steps, first):
    path = reference_file(name)
    spec = tempo.L2Product("NO2", "product/vertical_column_stratosphere", "molecules/cm^2",
                           None)
    f = tempo.read_l2(path, "NO2", spec=spec)
    assert f.values.shape == (steps, 2048)
    np.testing.assert_array_equal(f.mirror_step, np.arange(first, first + steps))
    valid = f.values[np.isfinite(f.values)]
    assert 0.9 < valid.size / f.values.size < 1.0 and 2.0e15 < valid.min() < valid.max() < 4.5e15
    with netCDF4.Dataset(path) as ds:
        since = float(ds.getncattr("time_coverage_start_since_epoch"))
        start = dt.datetime.strptime(ds.time_coverage_start, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=dt.UTC)
        time0 = float(ds["geolocation/time"][0])
    assert 0 <= since - tempo.utc_to_tempo_time(start) < 1  # 18 leap seconds counted
    assert 0 <= (tempo.tempo_time_to_utc(time0) - start).total_seconds() < 1
    assert tempo.parse_name(path).gid.datetime == start


# ----------------------------------------------------------------------------- shards


def test_qa_rules_reach_the_manifest(scan_dir, tmp_path, capsys):
    out = str(tmp_path / "a")
    assert make_shards.main([scan_dir, out, "--val-fraction", "0"] + TILE) == 0
    man = json.load(open(os.path.join(out, "manifest.json")))
    q = man["counts"]["qa_removed"]
    assert q["CLDO4"]["pixels"] > 0 and q["CLDO4"].get("bit 9", 0) > 0
    assert q["NO2"]["value 2"] > 0 and "bit 13" not in q["CLDO4"]
    assert man["qa_rules"]["CLDO4"]["bits"] == [0, 3, 8, 9, 12]
    per_granule = sum(g["l2"]["CLDO4"]["bad_qa"] for g in man["granules"].values())
    assert per_granule == q["CLDO4"]["pixels"]
    # a looser NO2 rule from the command line and no QA for HCHO from a rules file
    rules = tmp_path / "qa.json"
    rules.write_text(json.dumps({"HCHO": None}))
    out2 = str(tmp_path / "b")
    assert make_shards.main([scan_dir, out2, "--val-fraction", "0", "--qa", "NO2=accept:0,1",
                             "--qa-rules", str(rules)] + TILE) == 0
    man2 = json.load(open(os.path.join(out2, "manifest.json")))
    q2 = man2["counts"]["qa_removed"]
    assert q2["NO2"]["pixels"] == q["NO2"]["value 2"] and "value 1" not in q2["NO2"]
    assert q2["HCHO"]["pixels"] == 0 and man2["qa_rules"]["HCHO"] is None
    capsys.readouterr()
    assert make_shards.main([scan_dir, str(tmp_path / "c"), "--qa", "NO2=bit:1"] + TILE) == 2
    assert "bad QA item 'bit:1'" in capsys.readouterr().err


def test_radiance_error_in_shards(scan_dir, tmp_path):
    out = str(tmp_path / "e")
    assert make_shards.main([scan_dir, out, "--val-fraction", "0", "--radiance-error"]
                            + TILE) == 0
    assert inspect_shards.inspect(out, progress=False)[1] == []
    stats = json.load(open(os.path.join(out, "stats.json")))
    std = np.asarray(stats["l1"]["std"], np.float32)
    found, _ = tempo.discover(tempo.find_files(scan_dir))
    ags = {g.gid.key: read_granule(g, ReadOptions(radiance_error=True))
           for g in found.values()}
    n = 0
    for rel in json.load(open(os.path.join(out, "sizes.json"))):
        for raw in samples.iter_tar(os.path.join(out, rel)):
            assert samples.SIGMA_KEY in raw
            sig = samples.npy_array(raw[samples.SIGMA_KEY]).astype(np.float32)
            s = samples.decode(raw)
            assert sig.shape == s["l1"].shape and sig.dtype == np.float32
            ag = ags[s["meta"]["granule"]]
            r, c, t = s["meta"]["row"], s["meta"]["col"], s["meta"]["size"]
            rad = ag.radiance[r:r + t, c:c + t]
            # d log(max(I, 1)) / std_c, capped at the "unknown" value
            want = (ag.radiance_error[r:r + t, c:c + t] / (np.maximum(rad, 1.0) * std))
            want = np.minimum(want.transpose(2, 0, 1), samples.SIGMA_UNKNOWN)
            ok = np.isfinite(want)
            np.testing.assert_allclose(sig[ok], want[ok], rtol=2e-3)
            assert (sig[~ok] == samples.SIGMA_UNKNOWN).all()
            n += 1
    assert n > 0
    # off by default: no member, and the same l1 bytes
    out2 = str(tmp_path / "f")
    assert make_shards.main([scan_dir, out2, "--val-fraction", "0"] + TILE) == 0
    rel = sorted(json.load(open(os.path.join(out2, "sizes.json"))))[0]
    assert samples.SIGMA_KEY not in next(samples.iter_tar(os.path.join(out2, rel)))


def test_dotted_pt_names_convert_to_valid_keys(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    src = tmp_path / "pt"
    src.mkdir()
    names = [f"granule_2024.06.0{i}_S012G01" for i in range(1, 4)]
    for name in names:
        torch.save(torch.from_numpy(rng.uniform(1e11, 1e13, (3, 8, 8, 12)).astype(np.float32)),
                   src / f"{name}.pt")
    out = str(tmp_path / "shards")
    assert convert_pt_tiles.main([str(src), out, "--val-fraction", "0"]) == 0
    assert inspect_shards.inspect(out, progress=False)[1] == []
    keys = set()
    for rel in json.load(open(os.path.join(out, "sizes.json"))):
        for raw in samples.iter_tar(os.path.join(out, rel)):
            s = samples.decode(raw, rel)
            keys.add(s["__key__"])
            assert s["meta"]["granule"] in names and "." not in s["__key__"]
    assert len(keys) == 9 and "granule_2024_06_01_S012G01_t0002" in keys
    # two names that would share a key: refused, naming both
    torch.save(torch.zeros(1, 8, 8, 12), src / "granule_2024_06_01_S012G01.pt")
    code = convert_pt_tiles.main([str(src), str(tmp_path / "o2")])
    assert code == 2


def test_reader_rejects_a_dotted_key_naming_it(tmp_path):
    src = samples.encode("a_r0000_c0000", np.zeros((2, 4, 4), np.float16),
                         np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.float32), {})
    path = str(tmp_path / "bad.tar")
    with tarfile.open(path, "w") as tf:
        for ext in samples.SAMPLE_KEYS:
            data = src[ext]
            info = tarfile.TarInfo(f"granule_2024.06.01_t0000.{ext}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(samples.ShardError, match=r"granule_2024\.06\.01_t0000\.l1\.npy"):
        list(samples.iter_tar(path))
    with pytest.raises(samples.SampleError, match="invalid sample key 'x.y'"):
        samples.encode("x.y", np.zeros((1, 1, 1)), np.zeros((4, 1, 1)), np.zeros((4, 1, 1)), {})
    assert samples.safe_key("granule_2024.06.01_S012G01") == "granule_2024_06_01_S012G01"


def test_radiance_fill_and_flags_are_nan(scan_dir, tmp_path):
    import shutil

    path = str(tmp_path / os.path.basename(_file(scan_dir, "RAD")))
    shutil.copy(_file(scan_dir, "RAD"), path)
    with netCDF4.Dataset(path, "a") as ds:
        b = ds["band_290_490_nm"]
        b["radiance"].set_auto_maskandscale(False)
        b["radiance"][0, 0, :4] = b["radiance"].getncattr("_FillValue")
        b["pixel_quality_flag"][1, 1, 5] = 1 << 5  # saturated
        b["pixel_quality_flag"][2, 2, 6] = tempo.PQF_FILL  # flag missing
    g = tempo.read_l1(path)
    assert np.isnan(g.radiance[0, 0, :4]).all() and np.isnan(g.radiance[1, 1, 5])
    assert np.isnan(g.radiance[2, 2, 6]) and g.n_invalid >= 6
    assert np.isfinite(g.radiance[3:]).mean() > 0.999

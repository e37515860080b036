"""Reader and synthetic-file tests: names, layout against real TEMPO files, determinism,
and realism of synthetic radiance against real TROPOMI spectra."""

from __future__ import annotations

import glob
import os

import netCDF4
import numpy as np
import pytest
from helpers.common import reference_file

from data_prep import synthesize, tempo


def test_parse_name_and_discover():
    n = tempo.parse_name("/x/TEMPO_NO2_L2_V03_20240328T154353Z_S008G01.nc4")
    assert n.product == "NO2" and n.level == "L2" and n.version == 3
    assert n.gid == tempo.GranuleId("20240328T154353Z", 8, 1)
    assert tempo.parse_name("TEMPO_NO2_L2_V03_20240601T210934Z_S012G01_subsetted.nc4").suffix \
        == "_subsetted"
    assert tempo.parse_name("TEMPO_IRR_L1_V03_20240328T040959Z.nc") is None
    files = ["TEMPO_RAD_L1_V03_20240328T154353Z_S008G01.nc",
             "TEMPO_NO2_L2_V03_20240328T154353Z_S008G01.nc",
             "TEMPO_IRR_L1_V03_20240328T040959Z.nc", "notes.txt"]
    granules, ignored = tempo.discover(files)
    (g,) = granules.values()
    assert g.rad.startswith("TEMPO_RAD") and set(g.l2) == {"NO2"}
    assert {p for p, _ in ignored} == {"TEMPO_IRR_L1_V03_20240328T040959Z.nc", "notes.txt"}


@pytest.mark.reference
def test_reader_on_real_tempo_l2():
    path = reference_file("TEMPO_NO2_L2_V03_20240328T154353Z_S008G01.nc4")
    f = tempo.read_l2(path, "NO2")
    assert f.values.shape == (1, 1)
    assert f.attrs["scan_num"] == 8 and f.attrs["granule_num"] == 1
    assert "TEMPO_RAD_L1_V03_20240328T154353Z_S008G01.nc" in f.attrs["input_files"]
    # every pixel is either a finite value or counted as fill / bad QA
    assert np.isfinite(f.values).sum() + f.n_fill + f.n_bad_qa == 1


@pytest.mark.reference
def test_reader_on_real_full_granule_grid():
    path = reference_file("TEMPO_NO2_L2_V03_20240601T210934Z_S012G01_subsetted.nc4")
    with pytest.raises(tempo.TempoFileError, match="vertical_column_troposphere"):
        tempo.read_l2(path, "NO2")  # the subset lacks it: the error names the variable
    spec = tempo.L2Product("NO2", "product/vertical_column_stratosphere", "molecules/cm^2", None)
    f = tempo.read_l2(path, "NO2", spec=spec)
    assert f.values.shape == (132, 2048)
    valid = f.values[np.isfinite(f.values)]
    assert 0.9 < valid.size / f.values.size < 1.0 and f.n_fill == f.values.size - valid.size
    assert 2.0e15 < valid.min() and valid.max() < 4.5e15


@pytest.mark.reference
def test_synthetic_l2_layout_matches_real(synth_dir):
    real = netCDF4.Dataset(reference_file("TEMPO_NO2_L2_V03_20240328T154353Z_S008G01.nc4"))
    syn = netCDF4.Dataset(glob.glob(os.path.join(synth_dir, "TEMPO_NO2_L2_*.nc"))[0])
    try:
        assert set(real.groups) <= set(syn.groups)
        for path in ("product/vertical_column_troposphere", "product/main_data_quality_flag",
                     "geolocation/latitude", "geolocation/time",
                     "geolocation/solar_zenith_angle"):
            grp, name = path.split("/")
            rv, sv = real[grp][name], syn[grp][name]
            assert rv.dimensions == sv.dimensions, path
            assert rv.dtype == sv.dtype, path
            assert rv.getncattr("_FillValue") == sv.getncattr("_FillValue"), path
        for attr in ("scan_num", "granule_num", "time_coverage_start", "input_files",
                     "product_type", "time_reference"):
            assert attr in syn.ncattrs(), attr
        name = tempo.parse_name(syn.filepath())
        assert tempo.file_name("RAD", name.gid) in syn.getncattr("input_files")
    finally:
        real.close()
        syn.close()


def test_synthetic_is_deterministic_and_truth_is_separate(tmp_path):
    args = ["--granules", "1", "--mirror-steps", "8", "--xtrack", "16", "--channels", "32"]
    for d, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert synthesize.main([str(tmp_path / d), "--seed", seed] + args) == 0
    rad = {d: tempo.read_l1(glob.glob(str(tmp_path / d / "TEMPO_RAD_*.nc"))[0]).radiance
           for d in "abc"}
    np.testing.assert_array_equal(rad["a"], rad["b"])
    assert not np.allclose(np.nan_to_num(rad["a"]), np.nan_to_num(rad["c"]))
    truth = glob.glob(str(tmp_path / "a" / "truth" / "*.nc"))
    assert len(truth) == 1 and tempo.parse_name(truth[0]) is None  # never mistaken for input
    with netCDF4.Dataset(truth[0]) as t:
        assert {"no2_trop", "o3", "hcho", "cloud_fraction", "cloud_pressure"} <= set(t.variables)


def test_retrievals_are_truth_plus_noise(synth_dir):
    """Valid L2 pixels scatter around the truth with the precision the truth file states
    (the photon-noise bound of the spectra, physics.retrieval_precision)."""
    truth_file = sorted(glob.glob(os.path.join(synth_dir, "truth", "*.nc")))[0]
    key = os.path.basename(truth_file)[len("TEMPO_TRUTH_"):-3]
    with netCDF4.Dataset(truth_file) as t:
        o3 = t["o3"][:].filled(np.nan)
        prec = t["precision_O3TOT"][:].filled(np.nan)
        cf = t["cloud_fraction"][:].filled(np.nan)
    f = tempo.read_l2(os.path.join(synth_dir, f"TEMPO_O3TOT_L2_V03_{key}.nc"), "O3TOT")
    vals = f.values[: o3.shape[0]]
    ok = np.isfinite(vals)
    assert ok.mean() > 0.5
    z = (vals[ok] - o3[ok]) / prec[ok]
    assert abs(z.mean()) < 0.1 and 0.9 < z.std() < 1.1
    no2 = tempo.read_l2(os.path.join(synth_dir, f"TEMPO_NO2_L2_V03_{key}.nc"), "NO2").values
    # QA removes cloudy pixels: no valid NO2 where the cloud fraction is above 0.5
    assert not np.isfinite(no2[: cf.shape[0]][cf > 0.5]).any()


def _highpass(x, wl, width_nm=3.0):
    n = int(width_nm / (wl[1] - wl[0])) | 1
    lx = np.log(x)
    return lx - np.convolve(np.pad(lx, n // 2, mode="edge"), np.ones(n) / n, "valid")


def synthetic_granule_and_tropomi(tmp_path, use_files: bool):
    """A small synthetic RAD granule read back (real cross-sections and solar spectrum when
    ``use_files``, else the built-in shapes) and the path of the TROPOMI reference file;
    skips without the reference data."""
    ref = reference_file("tropomi_band3_reference_radiance_20230608.nc")
    args = [str(tmp_path), "--granules", "1", "--mirror-steps", "8", "--xtrack", "16"]
    if use_files:
        args += ["--xsec-dir", os.path.dirname(ref)]
    assert synthesize.main(args) == 0
    return tempo.read_l1(glob.glob(str(tmp_path / "TEMPO_RAD_*.nc"))[0]), ref


@pytest.mark.reference
@pytest.mark.parametrize("use_files", [True, False])
def test_synthetic_radiance_resembles_real_tropomi(tmp_path, use_files):
    """Synthetic UV radiance on the TROPOMI band-3 grid: same order of magnitude, and with
    real spectroscopy, the same fine structure (high-pass correlation)."""
    g, ref = synthetic_granule_and_tropomi(tmp_path, use_files)
    spec = np.nanmean(g.radiance.reshape(-1, g.radiance.shape[-1]), axis=0)
    with netCDF4.Dataset(ref) as d:
        d.set_auto_mask(False)
        row = d["reference_radiance"].shape[0] // 2
        twl = d["reference_wavelength"][row].astype(float)
        # mol s-1 m-2 nm-1 sr-1 -> photons s-1 cm-2 nm-1 sr-1
        trad = d["reference_radiance"][row].astype(float) * 6.02214e23 / 1e4
    syn = np.interp(twl, g.wavelength.mean(axis=0), spec)
    m = (twl > 310) & (twl < 398)
    ratio = np.median(syn[m] / trad[m])
    assert 0.1 < ratio < 10, ratio
    corr = np.corrcoef(_highpass(syn, twl)[m], _highpass(trad, twl)[m])[0, 1]
    assert corr > (0.9 if use_files else 0.3), corr


# TROPOMI reference scene: equator, 2023-06-08, Sentinel-5P overpass at 13:30 local solar
# time: cos(SZA) = cos(declination 22.9 deg) * cos(hour angle 22.5 deg) -> SZA 31.7 deg.
TROPOMI_SZA = 31.7


@pytest.mark.reference
@pytest.mark.parametrize("use_files", [True, False])
def test_synthetic_radiance_per_band_within_2x_of_tropomi(tmp_path, use_files):
    """Mean radiance / cos(SZA) in every 5-nm band from 305 to 400 nm within a factor 2 of
    the TROPOMI reference row at nadir, for synthetic pixels of similar geometry (viewing
    zenith < 30 deg, SZA < 50 deg). Below 314 nm the light comes from scattering above
    and inside the ozone layer; a model without it is ~30x too dark there."""
    g, ref = synthetic_granule_and_tropomi(tmp_path, use_files)
    sel = (g.vza < 30) & (g.sza < 50)
    assert sel.sum() >= 20
    syn = np.nanmean((g.radiance / np.cos(np.radians(g.sza))[..., None])[sel], axis=0)
    wl = g.wavelength.mean(axis=0)
    with netCDF4.Dataset(ref) as d:
        d.set_auto_mask(False)
        row = d["reference_radiance"].shape[0] // 2
        twl = d["reference_wavelength"][row].astype(float)
        trad = d["reference_radiance"][row].astype(float) * 6.02214e23 / 1e4
    trad /= np.cos(np.radians(TROPOMI_SZA))
    ratios = {}
    for lo in range(305, 400, 5):
        s, t = (wl >= lo) & (wl < lo + 5), (twl >= lo) & (twl < lo + 5)
        ratios[lo] = syn[s].mean() / trad[t].mean()
    assert all(0.5 < r < 2.0 for r in ratios.values()), ratios
    assert syn[wl < 314].mean() > 1e11  # not the near-zero UV of a full-column-only model


def test_solar_zenith_angles_stay_where_retrievals_work(synth_dir):
    for path in sorted(glob.glob(os.path.join(synth_dir, "truth", "*.nc"))):
        with netCDF4.Dataset(path) as t:
            sza = t["sza"][:]
            vza = t["vza"][:]
        assert sza.max() < 88 and (sza > 80).mean() < 0.05
        amf = 1 / np.cos(np.radians(sza)) + 1 / np.cos(np.radians(vza))
        assert amf.max() < 15


def test_l2_precision_matches_the_signal_in_the_spectra():
    """The HCHO retrieval noise equals (twice) the photon-noise bound obtained by
    perturbing the forward model: a column change of 1e16 moves the high-passed log
    radiance by far less than its noise, so single-pixel HCHO is imprecise."""
    from data_prep import physics

    wl = synthesize.wavelengths(4, 1028)
    sampled = physics.sample(physics.Spectra.analytic(), wl, 0.6)
    rng = np.random.default_rng(0)
    f = synthesize.truth_fields(rng, 3, 4, 0)
    rad = physics.radiance(sampled, wl, f).astype(np.float64)
    sigma = physics.shot_noise(rad, 800.0).astype(np.float64)
    prec = physics.retrieval_precision(sampled, wl, f, rad, sigma)
    f2 = dict(f, hcho=f["hcho"] + 1e16)
    dlog = np.log(physics.radiance(sampled, wl, f2).astype(np.float64)) - np.log(rad)
    w = (wl[0] >= 328.5) & (wl[0] <= 356.5)
    x = wl[0, w]
    x = (x - x.mean()) / np.ptp(x)
    for i in range(3):
        for j in range(4):
            d = dlog[i, j, w]
            d = d - np.polyval(np.polyfit(x, d, 3), x)  # what a DOAS fit can see
            noise = sigma[i, j, w] / rad[i, j, w]
            bound = 1e16 / np.sqrt(np.sum((d / noise) ** 2))
            assert prec["HCHO"][i, j] == pytest.approx(
                physics.RETRIEVAL_NOISE_FACTOR * bound, rel=0.05)
            assert np.abs(d).max() < np.median(noise)  # 1e16 is below one channel's noise
    assert prec["HCHO"].min() > 5e15

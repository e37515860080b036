"""Write synthetic TEMPO granules in the real file layout, with known truth.

Inputs: none (or real cross-sections with ``--xsec-dir``). Outputs, per granule, in OUT_DIR:

    TEMPO_RAD_L1_V03_<ts>_S<scan>G<gran>.nc     band_290_490_nm/{radiance, nominal_wavelength,
                                                pixel_quality_flag, latitude, ...}, time
    TEMPO_{NO2,O3TOT,HCHO,CLDO4}_L2_V03_....nc  product/, support_data/, geolocation/,
                                                qa_statistics/ as in real L2 files
    truth/TEMPO_TRUTH_<ts>_S<scan>G<gran>.nc    the true fields per pixel (not a TEMPO file)

Radiances follow ``data_prep.physics``; L2 "retrievals" are truth + retrieval noise with QA
failures where real retrievals fail (cloudy pixels, high solar zenith angle) and some fill.
The same seed gives the same files.

    python -m data_prep.synthesize data/synthetic --granules 4 --mirror-steps 64 --xtrack 256
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from data_prep import physics
from data_prep.tempo import (
    FLOAT_FILL,
    INT16_FILL,
    L1_BAND,
    GranuleId,
    file_name,
    seconds_since_epoch,
)

PRODUCT_TITLES = {"NO2": "nitrogen dioxide", "O3TOT": "total ozone", "HCHO": "formaldehyde",
                  "CLDO4": "cloud"}


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], length: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``length`` pixels."""
    noise = rng.standard_normal(shape)
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    filt = np.exp(-((ky**2 + kx**2) * (np.pi * length) ** 2) / 2.0)
    f = np.fft.irfft2(np.fft.rfft2(noise) * filt, s=shape)
    f -= f.mean()
    return f / (f.std() + 1e-12)


def plumes(rng: np.random.Generator, shape: tuple[int, int], n: int, scale: float) -> np.ndarray:
    """Sum of ``n`` elongated Gaussian plumes with log-normal amplitudes around ``scale``."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    out = np.zeros(shape)
    for _ in range(n):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        sy, sx = rng.uniform(1.5, 6.0), rng.uniform(1.5, 12.0)
        ang = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dy * np.cos(ang) + dx * np.sin(ang)
        v = -dy * np.sin(ang) + dx * np.cos(ang)
        out += scale * rng.lognormal(0.0, 0.7) * np.exp(-0.5 * ((u / sy) ** 2 + (v / sx) ** 2))
    return out


def truth_fields(rng: np.random.Generator, m: int, x: int, index: int) -> dict[str, np.ndarray]:
    """True geophysical state on the (mirror_step, xtrack) grid of one granule."""
    shape = (m, x)
    lm = max(4.0, min(m, x) / 8)
    rows = np.linspace(0, 1, m)[:, None]
    cols = np.linspace(0, 1, x)[None, :]
    sza0 = 25.0 + 12.0 * index % 40
    f = {
        "sza": np.clip(sza0 + 30.0 * rows + 35.0 * cols + 2 * smooth_field(rng, shape, 4 * lm),
                       5.0, 89.0),
        "vza": np.clip(15.0 + 50.0 * cols + 0 * rows, 0.0, 80.0),
        "raa": 60.0 + 90.0 * rows + 0 * cols,
        "latitude": 17.0 + 44.0 * (1 - cols) + 0.5 * rows,
        "longitude": -125.0 + 6.0 * (index % 10) + 5.0 * rows + 0 * cols,
        "albedo": np.clip(0.06 + 0.025 * smooth_field(rng, shape, lm), 0.02, 0.3),
        "surface_pressure": np.clip(990.0 - 40 * smooth_field(rng, shape, 2 * lm), 700, 1030),
        "no2_strat": 3.0e15 + 3.0e14 * smooth_field(rng, shape, 4 * lm),
        "o3": 320.0 + 30.0 * smooth_field(rng, shape, 3 * lm),
    }
    cf = np.clip(0.45 * smooth_field(rng, shape, lm) + 0.25, 0.0, 1.0)
    f["cloud_fraction"] = cf
    f["cloud_pressure"] = np.clip(650.0 + 150.0 * smooth_field(rng, shape, lm), 200.0,
                                  f["surface_pressure"] - 20.0)
    f["no2_trop"] = np.maximum(1.0e15 + 5.0e14 * smooth_field(rng, shape, lm)
                               + plumes(rng, shape, max(2, m * x // 2000), 8.0e15), 1.0e14)
    f["hcho"] = np.maximum(6.0e15 + 2.5e15 * smooth_field(rng, shape, 2 * lm)
                           + plumes(rng, shape, max(1, m * x // 4000), 8.0e15), 5.0e14)
    return {k: np.asarray(v, dtype=np.float64) for k, v in f.items()}


def wavelengths(x: int, c: int, lo: float = 290.0, hi: float = 490.0) -> np.ndarray:
    """(xtrack, channel) nominal wavelengths: a linear grid with a small cross-track smile."""
    base = np.linspace(lo, hi, c)
    smile = 0.03 * np.cos(np.linspace(-np.pi / 2, np.pi / 2, x)) ** 2
    return (base[None, :] + smile[:, None]).astype(np.float32)


def _put(group, name, data, dims, fill=None, **attrs):
    kw = {"fill_value": fill} if fill is not None else {}
    v = group.createVariable(name, data.dtype, dims, **kw)
    v[...] = data
    for k, val in attrs.items():
        v.setncattr(k, val)
    return v


def _geolocation(grp, f, dims, time_s):
    _put(grp, "time", time_s, ("mirror_step",), np.float64(FLOAT_FILL),
         units="seconds since 1980-01-06T00:00:00Z")
    for name, key, units in (("latitude", "latitude", "degrees_north"),
                             ("longitude", "longitude", "degrees_east"),
                             ("solar_zenith_angle", "sza", "degrees"),
                             ("viewing_zenith_angle", "vza", "degrees"),
                             ("relative_azimuth_angle", "raa", "degrees")):
        _put(grp, name, f[key].astype(np.float32), dims, np.float32(FLOAT_FILL), units=units)


def _global_attrs(ds, product: str, level: str, gid: GranuleId, t0: dt.datetime, t1: dt.datetime,
                  inputs: list[str]):
    ds.setncatts({
        "product_type": product, "processing_level": level[-1], "processing_version": np.int32(3),
        "scan_num": np.int32(gid.scan), "granule_num": np.int32(gid.granule),
        "time_coverage_start": t0.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "time_coverage_end": t1.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "time_reference": "1980-01-06T00:00:00Z",
        "local_granule_id": file_name(product, gid),
        "project": "TEMPO", "source": "synthetic (tempo-vae data_prep.synthesize)",
        "title": f"Synthetic TEMPO {'Level 1 radiance' if level == 'L1' else 'Level 2 ' + PRODUCT_TITLES.get(product, product)}",
        "Conventions": "CF-1.6, ACDD-1.3",
    })
    if inputs:
        ds.setncattr("input_files", ", ".join(inputs))


def write_granule(out_dir: str, gid: GranuleId, index: int, args, sampled, wl, rng, compress,
                  source: str = ""):
    import netCDF4

    m, x, c = args.mirror_steps, args.xtrack, args.channels
    f = truth_fields(rng, m, x, index)
    t0 = gid.datetime
    time_s = seconds_since_epoch(t0) + np.arange(m) * 3.0
    t1 = t0 + dt.timedelta(seconds=3.0 * m)

    # ---- L1 radiance, computed in row blocks to bound memory
    rad = np.empty((m, x, c), np.float32)
    rows = max(1, int(2e7 // (x * c)))
    for r0 in range(0, m, rows):
        sl = slice(r0, min(m, r0 + rows))
        rad[sl] = physics.radiance(sampled, wl, {k: v[sl] for k, v in f.items()})
    snr_ref = args.snr
    rad += rng.standard_normal(rad.shape, dtype=np.float32) * (
        np.sqrt(np.maximum(rad, 0) * 1e13) / snr_ref).astype(np.float32)
    pqf = np.zeros((m, x, c), np.int16)
    bad = rng.random((m, x, c), dtype=np.float32) < args.bad_pixel_rate
    pqf[bad] = 4  # "bad pixel" bit
    rad[bad] = FLOAT_FILL
    rad_name = file_name("RAD", gid)
    with netCDF4.Dataset(os.path.join(out_dir, rad_name + ".part"), "w") as ds:
        _global_attrs(ds, "RAD", "L1", gid, t0, t1, [])
        ds.createDimension("mirror_step", m)
        ds.createDimension("xtrack", x)
        ds.createDimension("spectral_channel", c)
        _put(ds, "time", time_s, ("mirror_step",), units="seconds since 1980-01-06T00:00:00Z")
        b = ds.createGroup(L1_BAND)
        v = b.createVariable("radiance", np.float32, ("mirror_step", "xtrack", "spectral_channel"),
                             fill_value=np.float32(FLOAT_FILL), zlib=compress, complevel=1,
                             chunksizes=(1, min(x, 512), c))
        v[...] = rad
        v.units = "photons/(s cm^2 nm sr)"
        _put(b, "nominal_wavelength", wl, ("xtrack", "spectral_channel"), units="nm")
        _put(b, "pixel_quality_flag", pqf, ("mirror_step", "xtrack", "spectral_channel"),
             flag_masks=np.int16([1, 2, 4, 8]),
             flag_meanings="saturated transient bad_pixel missing")
        _put(b, "ground_pixel_quality_flag", np.zeros((m, x), np.int32), ("mirror_step", "xtrack"))
        for name, key in (("latitude", "latitude"), ("longitude", "longitude"),
                          ("solar_zenith_angle", "sza"), ("viewing_zenith_angle", "vza"),
                          ("relative_azimuth_angle", "raa")):
            _put(b, name, f[key].astype(np.float32), ("mirror_step", "xtrack"),
                 np.float32(FLOAT_FILL), units="degrees")
    os.replace(os.path.join(out_dir, rad_name + ".part"), os.path.join(out_dir, rad_name))

    # ---- L2 "retrievals": truth + noise, QA failures, fill
    ml2 = m + args.l2_extra_mirror_steps
    cf, sza = f["cloud_fraction"], f["sza"]

    def pad_rows(a, value):
        if ml2 == m:
            return a
        extra = np.full((ml2 - m,) + a.shape[1:], value, dtype=a.dtype)
        return np.concatenate([a, extra], axis=0)

    def retrieval(truth, noise, flag_rules, fill_rate, fill_sza):
        val = truth + rng.standard_normal(truth.shape) * noise
        flag = np.zeros(truth.shape, np.int16)
        for level, cond in flag_rules:
            flag[cond] = np.maximum(flag[cond], level)
        fill = (sza > fill_sza) | (rng.random(truth.shape) < fill_rate)
        val[fill] = FLOAT_FILL
        flag[fill] = INT16_FILL
        return pad_rows(val, FLOAT_FILL), pad_rows(flag, np.int16(INT16_FILL))

    l2 = {
        "NO2": retrieval(f["no2_trop"], 7.0e14 * (1 + 2 * cf),
                         [(1, cf > 0.25), (2, (cf > 0.5) | (sza > 80))], 0.003, 85.0),
        "O3TOT": retrieval(f["o3"], 3.0, [(1, sza > 84)], 0.002, 88.0),
        "HCHO": retrieval(f["hcho"], 3.0e15 * (1 + cf),
                          [(1, cf > 0.3), (2, (cf > 0.6) | (sza > 80))], 0.004, 85.0),
        "CLDO4": retrieval(cf, 0.03, [(1, sza > 82)], 0.001, 88.0),
    }
    cld_val, cld_flag = l2["CLDO4"]
    ok = cld_flag == 0
    cld_val[ok] = np.clip(cld_val[ok], 0.0, 1.0)
    cp = pad_rows(f["cloud_pressure"] + rng.standard_normal((m, x)) * 25.0, FLOAT_FILL)
    geo_f = {k: pad_rows(v, FLOAT_FILL) for k, v in f.items()}
    time_l2 = np.concatenate([time_s, time_s[-1] + 3.0 * np.arange(1, ml2 - m + 1)])
    dims = ("mirror_step", "xtrack")
    cldo4_name = file_name("CLDO4", gid)
    for prod, (val, flag) in l2.items():
        name = file_name(prod, gid)
        inputs = [rad_name, f"TEMPO_IRR_L1_V03_{gid.timestamp[:8]}T000000Z.nc"]
        if prod in ("NO2", "HCHO"):
            inputs.append(cldo4_name)
        part = os.path.join(out_dir, name + ".part")
        with netCDF4.Dataset(part, "w") as ds:
            _global_attrs(ds, prod, "L2", gid, t0, t1, inputs)
            ds.createDimension("mirror_step", ml2)
            ds.createDimension("xtrack", x)
            geo = ds.createGroup("geolocation")
            _geolocation(geo, geo_f, dims, time_l2)
            p = ds.createGroup("product")
            sup = ds.createGroup("support_data")
            qa = ds.createGroup("qa_statistics")
            ffill, ifill = np.float64(FLOAT_FILL), np.int16(INT16_FILL)
            if prod == "NO2":
                _put(p, "vertical_column_troposphere", val, dims, ffill, units="molecules/cm^2")
                strat = pad_rows(f["no2_strat"] + rng.standard_normal((m, x)) * 2e14, FLOAT_FILL)
                _put(p, "vertical_column_stratosphere", strat, dims, ffill, units="molecules/cm^2")
                _put(p, "vertical_column_troposphere_uncertainty",
                     np.where(val == FLOAT_FILL, FLOAT_FILL, 7.0e14), dims, ffill,
                     units="molecules/cm^2")
                _put(p, "main_data_quality_flag", flag, dims, ifill,
                     flag_values=np.int32([0, 1, 2]), flag_meanings="normal suspicious bad")
                _put(sup, "eff_cloud_fraction", pad_rows(cf.astype(np.float32), np.float32(FLOAT_FILL)),
                     dims, np.float32(FLOAT_FILL))
            elif prod == "HCHO":
                _put(p, "vertical_column", val, dims, ffill, units="molecules/cm^2")
                _put(p, "vertical_column_uncertainty",
                     np.where(val == FLOAT_FILL, FLOAT_FILL, 3.0e15), dims, ffill,
                     units="molecules/cm^2")
                _put(p, "main_data_quality_flag", flag, dims, ifill,
                     flag_values=np.int32([0, 1, 2]), flag_meanings="normal suspicious bad")
            elif prod == "O3TOT":
                _put(p, "column_amount_o3", val.astype(np.float32), dims, np.float32(FLOAT_FILL),
                     units="DU")
                _put(p, "quality_flag", flag, dims, ifill)
                _put(p, "fc", pad_rows(cf.astype(np.float32), np.float32(FLOAT_FILL)), dims,
                     np.float32(FLOAT_FILL))
            else:
                _put(p, "cloud_fraction", val.astype(np.float32), dims, np.float32(FLOAT_FILL))
                _put(p, "cloud_pressure", np.where(val == FLOAT_FILL, FLOAT_FILL, cp)
                     .astype(np.float32), dims, np.float32(FLOAT_FILL), units="hPa")
                _put(p, "processing_quality_flag", flag, dims, ifill)
            _put(sup, "surface_pressure", geo_f["surface_pressure"].astype(np.float32), dims,
                 np.float32(FLOAT_FILL), units="hPa")
            _put(qa, "fit_rms_residual", np.full((ml2, x), 1e-3, np.float32), dims,
                 np.float32(FLOAT_FILL))
        os.replace(part, os.path.join(out_dir, name))

    # ---- truth, in its own folder: not a TEMPO file
    tdir = os.path.join(out_dir, "truth")
    os.makedirs(tdir, exist_ok=True)
    tname = os.path.join(tdir, f"TEMPO_TRUTH_{gid.key}.nc")
    with netCDF4.Dataset(tname + ".part", "w") as ds:
        ds.setncatts({"description": "true state used to synthesize the granule",
                      "seed": np.int64(args.seed), "spectra": source})
        ds.createDimension("mirror_step", m)
        ds.createDimension("xtrack", x)
        for k, v in f.items():
            _put(ds, k, v, dims)
    os.replace(tname + ".part", tname)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_prep.synthesize",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir", help="folder to write granules into (created)")
    p.add_argument("--granules", type=int, default=4, help="number of granules")
    p.add_argument("--mirror-steps", type=int, default=64, help="mirror steps per granule")
    p.add_argument("--xtrack", type=int, default=256, help="cross-track pixels")
    p.add_argument("--channels", type=int, default=1028, help="spectral channels, 290-490 nm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--xsec-dir", default=None,
                   help="read real cross-sections and solar spectrum from this folder "
                        "(format of the reference data); analytic shapes otherwise")
    p.add_argument("--slit-fwhm", type=float, default=0.6, help="slit FWHM in nm")
    p.add_argument("--snr", type=float, default=800.0, help="SNR at a radiance of 1e13")
    p.add_argument("--bad-pixel-rate", type=float, default=1e-5,
                   help="fraction of radiance values flagged bad and set to fill")
    p.add_argument("--l2-extra-mirror-steps", type=int, default=0,
                   help="L2 files get this many more mirror steps than L1 (as in some real "
                        "granules, 132 vs 131)")
    p.add_argument("--start", default="2025-01-15T15:00:00",
                   help="UTC time of the first granule")
    p.add_argument("--compress", action="store_true", help="zlib-compress radiance")
    args = p.parse_args(argv)
    for k in ("granules", "mirror_steps", "xtrack", "channels"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.l2_extra_mirror_steps < 0:
        p.error("--l2-extra-mirror-steps must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    spectra = (physics.Spectra.from_dir(args.xsec_dir) if args.xsec_dir
               else physics.Spectra.analytic())
    wl = wavelengths(args.xtrack, args.channels)
    sampled = physics.sample(spectra, wl, args.slit_fwhm)
    start = dt.datetime.fromisoformat(args.start).replace(tzinfo=dt.UTC)
    t_start = time.time()
    for i in tqdm(range(args.granules), desc="granules", unit="granule", file=sys.stderr):
        rng = np.random.default_rng([args.seed, i])
        scan, gran = 1 + i // 10, 1 + i % 10
        t = start + dt.timedelta(hours=i // 10, minutes=7 * (i % 10))
        gid = GranuleId(t.strftime("%Y%m%dT%H%M%SZ"), scan, gran)
        write_granule(args.out_dir, gid, i, args, sampled, wl, rng, args.compress,
                      spectra.source)
    print(f"wrote {args.granules} granules ({args.mirror_steps}x{args.xtrack}x{args.channels}, "
          f"spectra: {spectra.source}) to {args.out_dir} in {time.time() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

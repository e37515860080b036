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

import datetime as dt
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from data_prep import physics
from data_prep.logs import get_logger, setup_logging
from data_prep.tempo import (
    CLDO4_FILL,
    FLOAT_FILL,
    GEO_FILL,
    INT16_FILL,
    L1_BAND,
    NC_DEFAULT_FILL,
    O3TOT_FILL,
    PQF_FILL,
    RAD_FILL,
    GranuleId,
    file_name,
    utc_to_tempo_time,
)
from data_prep.util import argument_parser

log = get_logger(__name__)

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
    # TEMPO looks at North America from 91 W: solar zenith angles of a daytime scan grow
    # across the field of regard; retrievals stop near 80-88 deg, so few pixels go there.
    sza0 = 18.0 + (7.0 * index) % 16
    saa = -120.0 + 60.0 * rows + 100.0 * cols
    vaa = 150.0 - 40.0 * cols + 0 * rows
    raa = (saa - vaa + 180.0) % 360.0 - 180.0
    f = {
        "sza": np.clip(sza0 + 20.0 * rows + 28.0 * cols + 2 * smooth_field(rng, shape, 4 * lm),
                       5.0, 88.0),
        "vza": np.clip(15.0 + 50.0 * cols + 0 * rows, 0.0, 80.0),
        "saa": saa,
        "vaa": vaa,
        "raa": np.abs(raa),
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
    v.set_auto_maskandscale(False)  # write the encoded values exactly as given
    v[...] = data
    for k, val in attrs.items():
        v.setncattr(k, val)
    return v


CLDO4_FLAG_COMMENT = (
    "bit 0 geometry error; bit 1 not used; bit 2 warning; bit 3 surface input error; "
    "bit 4 warning; bit 5 warning; bit 6 O2-O2 slant column error; bit 7 warning; "
    "bit 8 466 nm radiance/irradiance error; bit 9 cloud fraction out of range; "
    "bit 10 warning; bit 11 warning; bit 12 cloud fraction not computed; "
    "bit 13 cloud pressure not computed; bit 14 cloud pressure out of range; bit 15 warning")
O3TOT_FLAG_COMMENT = (
    "bits 0-2 error code: 0 good, 1 glint, 2 solar zenith angle > 84 deg, 3-7 retrieval "
    "failures; bit 6 cross-track; bit 7 climatological cloud pressure; bit 8 INR; "
    "bit 9 solar zenith angle >= 88 deg; bits 10-15 radiance/irradiance missing, error or "
    "warning")
PQF_MEANINGS = ("missing bad_pixel processing_error transient rts saturated noise_underflow "
                "dark_error offset_error smear_error straylight_error nonlinear hot cold")


def _l1_geolocation(b, f, dims, bad_geo):
    """Per-band geolocation, +9.969e36 (fill) on pixels whose geolocation is invalid."""
    for name, key, units in (("latitude", "latitude", "degrees_north"),
                             ("longitude", "longitude", "degrees_east"),
                             ("solar_zenith_angle", "sza", "degrees"),
                             ("solar_azimuth_angle", "saa", "degrees"),
                             ("viewing_zenith_angle", "vza", "degrees"),
                             ("viewing_azimuth_angle", "vaa", "degrees")):
        a = f[key].astype(np.float32)
        a[bad_geo] = np.float32(GEO_FILL)
        _put(b, name, a, dims, np.float32(GEO_FILL), units=units)


def _l2_geolocation(grp, f, dims, time_s):
    _put(grp, "time", time_s, ("mirror_step",), np.float64(FLOAT_FILL), standard_name="time",
         units="seconds since 1980-01-06T00:00:00Z", valid_min=0.0, valid_max=1.0e10)
    for name, key, units, lo, hi in (
            ("latitude", "latitude", "degrees_north", -90, 90),
            ("longitude", "longitude", "degrees_east", -180, 180),
            ("solar_zenith_angle", "sza", "degrees", 0, 90),
            ("solar_azimuth_angle", "saa", "degrees", -180, 180),
            ("viewing_zenith_angle", "vza", "degrees", 0, 90),
            ("viewing_azimuth_angle", "vaa", "degrees", -180, 180),
            ("relative_azimuth_angle", "raa", "degrees", -180, 180)):
        _put(grp, name, f[key].astype(np.float32), dims, np.float32(FLOAT_FILL), units=units,
             valid_min=np.float32(lo), valid_max=np.float32(hi))


def _global_attrs(ds, product: str, level: str, gid: GranuleId, t0: dt.datetime, t1: dt.datetime,
                  inputs: list[str]):
    ds.setncatts({
        "product_type": product, "processing_level": level[-1], "processing_version": np.int32(3),
        "scan_num": np.int32(gid.scan), "granule_num": np.int32(gid.granule),
        "time_coverage_start": t0.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "time_coverage_end": t1.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "time_coverage_start_since_epoch": np.float64(utc_to_tempo_time(t0)),
        "time_coverage_end_since_epoch": np.float64(utc_to_tempo_time(t1)),
        "time_reference": "1980-01-06T00:00:00Z",
        "local_granule_id": file_name(product, gid),
        "project": "TEMPO", "source": "synthetic (tempo-vae data_prep.synthesize)",
        "title": f"Synthetic TEMPO {'Level 1 radiance' if level == 'L1' else 'Level 2 ' + PRODUCT_TITLES.get(product, product)}",
        "Conventions": "CF-1.6, ACDD-1.3",
    })
    if inputs:
        ds.setncattr("input_files", ", ".join(inputs))


MIRROR_STEP_SECONDS = 3.033  # exposure cadence of a real granule (S012, 2024-06-01)


def mirror_step_counts(args, gran: int) -> int:
    """Mirror steps of granule number ``gran`` (1-based within its scan)."""
    return args.mirror_steps - (1 if gran in args.short_granules else 0)


def write_granule(out_dir: str, gid: GranuleId, index: int, args, sampled, wl, rng, compress,
                  source: str = "", first_step: int = 0):
    """Write one granule's RAD, L2 and truth files (layout: DESIGN.md section 2).

    ``first_step`` is the absolute scan position of its first mirror step."""
    import netCDF4

    m, x, c = mirror_step_counts(args, gid.granule), args.xtrack, args.channels
    f = truth_fields(rng, m, x, index)
    t0 = gid.datetime
    time_s = utc_to_tempo_time(t0) + np.arange(m) * MIRROR_STEP_SECONDS
    t1 = t0 + dt.timedelta(seconds=MIRROR_STEP_SECONDS * m)
    steps = np.arange(first_step, first_step + m, dtype=np.int32)

    # ---- L1 radiance, computed in row blocks to bound memory
    rad = np.empty((m, x, c), np.float32)
    rows = max(1, int(2e7 // (x * c)))
    for r0 in range(0, m, rows):
        sl = slice(r0, min(m, r0 + rows))
        rad[sl] = physics.radiance(sampled, wl, {k: v[sl] for k, v in f.items()})
    sigma = physics.shot_noise(rad, args.snr)
    prec = physics.retrieval_precision(sampled, wl, f, rad, sigma)
    rad += rng.standard_normal(rad.shape, dtype=np.float32) * sigma
    rad_err = physics.round_significant(sigma, 2)  # as written by the L1 processor
    pqf = np.zeros((m, x, c), np.int16)
    bad = rng.random((m, x, c), dtype=np.float32) < args.bad_pixel_rate
    pqf[bad] = 2  # bit 1: bad pixel
    rad[bad] = np.float32(RAD_FILL)
    rad_err[bad] = np.float32(RAD_FILL)
    bad_geo = rng.random((m, x)) < args.bad_geolocation_rate
    rad_name = file_name("RAD", gid)
    with netCDF4.Dataset(os.path.join(out_dir, rad_name + ".part"), "w") as ds:
        _global_attrs(ds, "RAD", "L1", gid, t0, t1, [])
        ds.createDimension("mirror_step", m)
        _put(ds, "mirror_step", steps, ("mirror_step",), long_name="scan mirror position index")
        _put(ds, "time", time_s, ("mirror_step",), units="seconds since 1980-01-06T00:00:00Z",
             comment="exposure start; GPS seconds (leap seconds counted)")
        _put(ds, "exposure_time", np.full(m, 2.78, np.float64), ("mirror_step",), units="s")
        b = ds.createGroup(L1_BAND)
        b.createDimension("xtrack", x)
        b.createDimension("spectral_channel", c)
        cube = ("mirror_step", "xtrack", "spectral_channel")
        for name, data in (("radiance", rad), ("radiance_error", rad_err)):
            v = b.createVariable(name, np.float32, cube, fill_value=np.float32(RAD_FILL),
                                 zlib=compress, complevel=1, chunksizes=(1, x, c))
            v.set_auto_maskandscale(False)
            v[...] = data
            v.units = "photons/(s cm^2 nm sr)"
        b["radiance_error"].comment = "absolute 1-sigma error, 2 significant digits"
        _put(b, "nominal_wavelength", wl, ("xtrack", "spectral_channel"), units="nm")
        _put(b, "pixel_quality_flag", pqf, cube, np.int16(PQF_FILL),
             flag_masks=np.int16([1 << i for i in range(14)]), flag_meanings=PQF_MEANINGS)
        _put(b, "ground_pixel_quality_flag", np.zeros((m, x), np.int32), ("mirror_step", "xtrack"))
        _l1_geolocation(b, f, ("mirror_step", "xtrack"), bad_geo)
    os.replace(os.path.join(out_dir, rad_name + ".part"), os.path.join(out_dir, rad_name))

    # ---- L2 "retrievals": truth + noise, QA flags as NASA writes them, fill
    ml2 = m + args.l2_extra_mirror_steps
    cf, sza = f["cloud_fraction"], f["sza"]

    def pad_rows(a, value):
        if ml2 == m:
            return a
        extra = np.full((ml2 - m,) + a.shape[1:], value, dtype=a.dtype)
        return np.concatenate([a, extra], axis=0)

    def noisy(truth, noise):
        return truth + rng.standard_normal(truth.shape) * noise

    l2: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for prod, key in (("NO2", "no2_trop"), ("HCHO", "hcho")):
        val = noisy(f[key], prec[prod])
        flag = np.zeros((m, x), np.int16)  # 0 normal, 1 suspicious, 2 bad
        flag[cf > 0.25 if prod == "NO2" else cf > 0.3] = 1
        flag[(cf > (0.5 if prod == "NO2" else 0.6)) | (sza > 80)] = 2
        fill = (sza > 85) | (rng.random((m, x)) < 0.003)
        val[fill] = FLOAT_FILL
        flag[fill] = INT16_FILL
        l2[prod] = pad_rows(val, FLOAT_FILL), pad_rows(flag, np.int16(INT16_FILL))

    o3 = noisy(f["o3"], prec["O3TOT"])
    o3f = np.zeros((m, x), np.uint16)  # bits 0-2 error code, higher bits warnings
    o3f[rng.random((m, x)) < 0.01] = 1  # sun glint: a value is written, flagged an error
    o3f[sza > 84] = 2
    failed = rng.random((m, x)) < 0.002
    o3f[failed] = rng.integers(3, 8, int(failed.sum())).astype(np.uint16)
    o3f[rng.random((m, x)) < 0.05] |= np.uint16(1 << 6)  # cross-track warning
    o3f[rng.random((m, x)) < 0.10] |= np.uint16(1 << 7)  # climatological cloud pressure
    o3f[sza >= 88] |= np.uint16(1 << 9)
    o3[failed | (sza >= 88)] = O3TOT_FILL
    l2["O3TOT"] = (pad_rows(o3.astype(np.float32), np.float32(O3TOT_FILL)),
                   pad_rows(o3f, np.uint16(1 << 10)))  # extra rows: radiance missing

    raw = noisy(cf, prec["CLDO4"])
    cld = np.clip(raw, 0.0, 1.0)
    over = raw > 1.02
    cld[over] = raw[over]
    cpf = np.zeros((m, x), np.int16)
    cpf[cld == 0.0] |= 1 << 13  # clear sky: cloud pressure not computed, fraction valid (0)
    cpf[over] |= 1 << 9  # fraction out of range (written, invalid)
    cpf[sza > 82] |= 1  # geometry error
    not_computed = rng.random((m, x)) < 0.002
    cpf[not_computed] |= 1 << 12
    for bit, rate in ((2, 0.05), (4, 0.05), (14, 0.02)):  # warnings and a pressure error
        cpf[rng.random((m, x)) < rate] |= np.int16(1 << bit)
    cld[(sza > 82) | not_computed] = CLDO4_FILL
    cp = f["cloud_pressure"] + rng.standard_normal((m, x)) * 25.0
    cp[(cld == CLDO4_FILL) | ((cpf >> 13) & 1 == 1)] = CLDO4_FILL
    l2["CLDO4"] = (pad_rows(cld.astype(np.float32), np.float32(CLDO4_FILL)),
                   pad_rows(cpf, np.int16(1 << 12)))

    geo_f = {k: pad_rows(v, FLOAT_FILL) for k, v in f.items()}
    time_l2 = np.concatenate([time_s, time_s[-1] + MIRROR_STEP_SECONDS
                              * np.arange(1, ml2 - m + 1)])
    steps_l2 = np.arange(first_step, first_step + ml2, dtype=np.int32)
    dims = ("mirror_step", "xtrack")
    cldo4_name = file_name("CLDO4", gid)
    packed = args.l2_encoding == "packed"
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
            _put(ds, "mirror_step", steps_l2, ("mirror_step",),
                 long_name="scan mirror position index")
            _put(ds, "xtrack", np.arange(x, dtype=np.int32), ("xtrack",),
                 long_name="pixel index along slit")
            geo = ds.createGroup("geolocation")
            _l2_geolocation(geo, geo_f, dims, time_l2)
            p = ds.createGroup("product")
            sup = ds.createGroup("support_data")
            qa = ds.createGroup("qa_statistics")
            ffill, ifill = np.float64(FLOAT_FILL), np.int16(INT16_FILL)
            qa_kw = dict(valid_min=np.int16(0), valid_max=np.int16(2),
                         flag_values=np.int32([0, 1, 2]), flag_meanings="normal suspicious bad")
            if prod == "NO2":
                _put(p, "vertical_column_troposphere", val, dims, ffill, units="molecules/cm^2")
                strat = pad_rows(f["no2_strat"] + rng.standard_normal((m, x)) * 2e14, FLOAT_FILL)
                _put(p, "vertical_column_stratosphere", strat, dims, ffill, units="molecules/cm^2")
                _put(p, "vertical_column_troposphere_uncertainty",
                     np.where(val == FLOAT_FILL, FLOAT_FILL, pad_rows(prec["NO2"], 0.0)),
                     dims, ffill, units="molecules/cm^2")
                _put(p, "main_data_quality_flag", flag, dims, ifill, **qa_kw)
                _put(sup, "eff_cloud_fraction", pad_rows(cf.astype(np.float32),
                                                         np.float32(FLOAT_FILL)),
                     dims, np.float32(FLOAT_FILL))
            elif prod == "HCHO":
                if packed:  # no _FillValue: unwritten cells hold the netCDF default fill
                    _put(p, "vertical_column", np.where(val == FLOAT_FILL, NC_DEFAULT_FILL,
                                                        val), dims, units="molecules/cm^2")
                else:
                    _put(p, "vertical_column", val, dims, ffill, units="molecules/cm^2")
                _put(p, "vertical_column_uncertainty",
                     np.where(val == FLOAT_FILL, FLOAT_FILL, pad_rows(prec["HCHO"], 0.0)),
                     dims, ffill, units="molecules/cm^2")
                _put(p, "main_data_quality_flag", flag, dims, ifill, **qa_kw)
            elif prod == "O3TOT":
                if packed:  # missing_value instead of _FillValue
                    _put(p, "column_amount_o3", np.where(val == np.float32(O3TOT_FILL),
                                                         np.float32(-999.0), val),
                         dims, units="DU", missing_value=np.float32(-999.0))
                else:
                    _put(p, "column_amount_o3", val, dims, np.float32(O3TOT_FILL), units="DU")
                _put(p, "quality_flag", flag, dims, comment=O3TOT_FLAG_COMMENT)  # no fill
                _put(p, "fc", pad_rows(cf.astype(np.float32), np.float32(O3TOT_FILL)), dims,
                     np.float32(O3TOT_FILL))
            else:
                if packed:  # int16 counts x 1e-4 with a valid range
                    counts = np.where(val == np.float32(CLDO4_FILL), -32767,
                                      np.round(val.astype(np.float64) * 1e4)).astype(np.int16)
                    _put(p, "cloud_fraction", counts, dims, np.int16(-32767),
                         scale_factor=np.float32(1e-4), add_offset=np.float32(0.0),
                         valid_range=np.int16([0, 10000]), units="1")
                else:
                    _put(p, "cloud_fraction", val, dims, np.float32(CLDO4_FILL), units="1")
                _put(p, "cloud_pressure", pad_rows(cp.astype(np.float32),
                                                   np.float32(CLDO4_FILL)),
                     dims, np.float32(CLDO4_FILL), units="hPa")
                _put(p, "processing_quality_flag", flag, dims, comment=CLDO4_FLAG_COMMENT)
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
        _put(ds, "mirror_step", steps, ("mirror_step",))
        for k, v in f.items():
            _put(ds, k, v, dims)
        for k, v in prec.items():
            _put(ds, f"precision_{k}", np.asarray(v, np.float64), dims,
                 comment="1-sigma retrieval noise added to the truth")
        _put(ds, "invalid_geolocation", bad_geo.astype(np.int8), dims)
    os.replace(tname + ".part", tname)
    return m


def parse_args(argv=None):
    p = argument_parser("python -m data_prep.synthesize", __doc__)
    p.add_argument("out_dir", help="folder to write granules into (created)")
    p.add_argument("--granules", type=int, default=4, help="number of granules")
    p.add_argument("--mirror-steps", type=int, default=64, help="mirror steps per granule")
    p.add_argument("--xtrack", type=int, default=256, help="cross-track pixels")
    p.add_argument("--channels", type=int, default=1028, help="spectral channels, 290-490 nm")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the fields, geometry, noise and QA failures (same seed, "
                        "same files)")
    p.add_argument("--xsec-dir", default=None,
                   help="read real cross-sections and solar spectrum from this folder "
                        "(format of the reference data); analytic shapes otherwise")
    p.add_argument("--slit-fwhm", type=float, default=0.6, help="slit FWHM in nm")
    p.add_argument("--snr", type=float, default=800.0, help="SNR at a radiance of 1e13")
    p.add_argument("--bad-pixel-rate", type=float, default=1e-5,
                   help="fraction of radiance values flagged bad and set to fill")
    p.add_argument("--bad-geolocation-rate", type=float, default=1e-3,
                   help="fraction of pixels whose L1 geolocation is invalid (+9.969e36)")
    p.add_argument("--short-granules", default="",
                   help="comma-separated granule numbers (within a scan) that get one mirror "
                        "step fewer, as real scans have 132 and 131 (S012G03: 131)")
    p.add_argument("--l2-encoding", choices=("nasa", "packed"), default="nasa",
                   help="nasa: the encodings of real L2 files; packed: legal re-processed "
                        "encodings (CLDO4 fraction int16 x 1e-4 with valid_range, O3TOT with "
                        "missing_value, HCHO without _FillValue)")
    p.add_argument("--l2-extra-mirror-steps", type=int, default=0,
                   help="L2 files get this many more mirror steps than L1 (real products of "
                        "one granule agree; this tests the alignment of mismatched files)")
    p.add_argument("--start", default="2025-01-15T15:00:00",
                   help="UTC time of the first granule")
    p.add_argument("--compress", action="store_true", help="zlib-compress radiance")
    args = p.parse_args(argv)
    setup_logging()
    for k in ("granules", "mirror_steps", "xtrack", "channels"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.l2_extra_mirror_steps < 0:
        p.error("--l2-extra-mirror-steps must be >= 0")
    try:
        args.short_granules = {int(g) for g in args.short_granules.split(",") if g.strip()}
    except ValueError:
        p.error("--short-granules: a comma-separated list of granule numbers")
    if args.mirror_steps < 2 and args.short_granules:
        p.error("--short-granules needs --mirror-steps >= 2")
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
    first_step = 0
    for i in tqdm(range(args.granules), desc="granules", unit="granule", file=sys.stderr):
        rng = np.random.default_rng([args.seed, i])
        scan, gran = 1 + i // 10, 1 + i % 10
        if gran == 1:
            first_step = 0  # mirror_step counts absolute scan positions
        t = start + dt.timedelta(hours=i // 10, minutes=7 * (i % 10))
        gid = GranuleId(t.strftime("%Y%m%dT%H%M%SZ"), scan, gran)
        first_step += write_granule(args.out_dir, gid, i, args, sampled, wl, rng, args.compress,
                                    spectra.source, first_step)
    log.info(f"wrote {args.granules} granules ({args.mirror_steps}x{args.xtrack}x{args.channels}, "
          f"spectra: {spectra.source}) to {args.out_dir} in {time.time() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

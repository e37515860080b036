"""Spectroscopy and a small radiative model for synthetic TEMPO radiances.

Radiance per pixel and channel (photons s^-1 cm^-2 nm^-1 sr^-1):

    I = F0(l) * mu0 / pi * R(l) * exp(-sum_i sigma_i(l) * S_i)

with R the sum of a single-scattering Rayleigh path reflectance (summed over pressure
layers, each seeing only the ozone above it) and surface and cloud reflectances attenuated
by Rayleigh extinction (tau_R = 0.0088 * l_um^-4.05 * p/1013), and S_i the slant columns of NO2 (troposphere and stratosphere), O3, HCHO and O2-O2
(whose column scales with the square of the pressure of the reflecting level, so it sees
the cloud pressure). Cross-sections and the solar spectrum are convolved with a Gaussian
slit on a fine grid and sampled at each cross-track position's wavelengths. The
absorption-after-convolution error (the "I0 effect") is ignored.

Spectra come from real laboratory files (``Spectra.from_dir``, the format of the project's
reference data) or from analytic built-in shapes (``Spectra.analytic``) that have the right
magnitudes and band structure but are not measurements.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

DU = 2.6867e16  # molecules/cm^2 per Dobson unit
O4_COLUMN_SURFACE = 1.35e43  # molecules^2/cm^5, O2-O2 vertical column at 1013 hPa
FINE_STEP_NM = 0.02


@dataclasses.dataclass
class Spectra:
    """Absorption cross-sections (cm^2/molecule; O4 in cm^5/molecule^2) and solar flux
    on a common fine wavelength grid (nm)."""

    wl: np.ndarray
    no2: np.ndarray
    o3: np.ndarray
    hcho: np.ndarray
    o4: np.ndarray
    solar: np.ndarray
    source: str

    @staticmethod
    def fine_grid(lo: float = 285.0, hi: float = 495.0) -> np.ndarray:
        return np.arange(lo, hi + FINE_STEP_NM / 2, FINE_STEP_NM)

    @classmethod
    def analytic(cls, lo: float = 285.0, hi: float = 495.0) -> Spectra:
        wl = cls.fine_grid(lo, hi)
        # NO2: broad visible band with ~5.5 nm vibronic structure, ~5e-19 cm^2 near 410 nm.
        no2 = 4.5e-19 * np.exp(-(((wl - 420.0) / 75.0) ** 2)) * (
            1.0 + 0.35 * np.sin(2 * np.pi * (wl - 300.0) / 5.6))
        # O3: Huggins bands, log-linear decay from ~1.5e-18 at 290 nm, 3.5 nm structure.
        o3 = 10.0 ** (-17.8 - 0.065 * (wl - 290.0)) * (
            1.0 + 0.25 * np.sin(2 * np.pi * (wl - 290.0) / 3.5))
        o3 = np.maximum(o3, 0.0) + 1e-23 * np.exp(-(((wl - 600.0) / 80.0) ** 2))
        # HCHO: banded 300-360 nm absorption, ~5e-20 cm^2 peaks, zero above ~370 nm.
        hcho = 3.5e-20 * np.exp(-(((wl - 328.0) / 22.0) ** 2)) * np.maximum(
            0.0, 1.0 + 0.85 * np.sin(2 * np.pi * (wl - 301.0) / 7.4))
        # O2-O2 collision-induced bands (centre nm, peak cm^5/molecule^2, sigma nm).
        o4 = np.zeros_like(wl)
        for c, a, w in ((343.9, 0.9e-46, 1.3), (360.9, 4.1e-46, 1.5), (380.3, 2.4e-46, 1.5),
                        (446.8, 0.8e-46, 2.0), (477.2, 6.4e-46, 1.9)):
            o4 += a * np.exp(-0.5 * ((wl - c) / w) ** 2)
        return cls(wl, no2, o3, hcho, o4, analytic_solar(wl), "analytic")

    @classmethod
    def from_dir(cls, path: str, lo: float = 285.0, hi: float = 495.0,
                 o3_temperature_k: float = 225.0) -> Spectra:
        """Read real cross-sections and the SAO2010 solar spectrum from ``path``.

        Expected files (whitespace columns; '#'/'*' headers): ``no2r_97.nm``,
        ``o3abs_brion_195_660_vacfinal.dat`` (c0 c1 c2 in 1e-20 cm^2),
        ``H2CO_Meller_Moortgat_MPI.txt``, ``O4_294K_BISA.dat``, ``sao2010_solref_vac.dat``.
        Missing files fall back to the analytic shape for that species.
        """
        wl = cls.fine_grid(lo, hi)
        base = cls.analytic(lo, hi)
        used = []

        def load(name: str, ncols: int = 2):
            p = os.path.join(path, name)
            if not os.path.exists(p):
                return None
            used.append(name)
            return read_columns(p, ncols)

        def on_grid(cols, y):
            return np.interp(wl, cols[:, 0], y, left=0.0, right=0.0)

        no2 = load("no2r_97.nm")
        o3 = load("o3abs_brion_195_660_vacfinal.dat", 4)
        hcho = load("H2CO_Meller_Moortgat_MPI.txt")
        o4 = load("O4_294K_BISA.dat")
        sol = load("sao2010_solref_vac.dat")
        if not used:
            raise FileNotFoundError(f"no known cross-section or solar files in {path}")
        dtk = o3_temperature_k - 273.15
        return cls(
            wl,
            on_grid(no2, no2[:, 1]) if no2 is not None else base.no2,
            on_grid(o3, (o3[:, 1] + o3[:, 2] * dtk + o3[:, 3] * dtk**2) * 1e-20)
            if o3 is not None else base.o3,
            np.maximum(on_grid(hcho, hcho[:, 1]), 0.0) if hcho is not None else base.hcho,
            np.maximum(on_grid(o4, o4[:, 1]), 0.0) if o4 is not None else base.o4,
            on_grid(sol, sol[:, 1]) if sol is not None else base.solar,
            "files:" + ",".join(used),
        )


def read_columns(path: str, ncols: int) -> np.ndarray:
    """Numeric rows of a whitespace-separated text file (headers and odd lines skipped)."""
    rows = []
    with open(path, errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) < ncols or line.lstrip()[:1] in ("#", "*", "!"):
                continue
            try:
                rows.append([float(p) for p in parts[:ncols]])
            except ValueError:
                continue
    if not rows:
        raise ValueError(f"{path}: no numeric rows with {ncols} columns")
    a = np.asarray(rows, dtype=np.float64)
    return a[np.argsort(a[:, 0], kind="stable")]


def analytic_solar(wl: np.ndarray) -> np.ndarray:
    """Photon flux at 1 AU (photons s^-1 cm^-2 nm^-1): a 5778 K Planck shape scaled to
    ~4.5e14 at 450 nm, with fixed Fraunhofer lines (Ca II K/H, Balmer, and a
    deterministic forest of weaker lines)."""
    h, c, k = 6.62607e-34, 2.99792e8, 1.380649e-23
    lam = wl * 1e-9
    shape = 1.0 / lam**4 / np.expm1(h * c / (lam * k * 5778.0))
    ref = 1.0 / (450e-9) ** 4 / np.expm1(h * c / (450e-9 * k * 5778.0))
    flux = 4.5e14 * shape / ref
    # below ~400 nm the real Sun is much darker than a blackbody (line blanketing)
    flux *= 0.55 + 0.45 / (1.0 + np.exp(-(wl - 385.0) / 12.0))
    depth = np.zeros_like(wl)
    for centre, d, w in ((393.37, 0.9, 0.9), (396.85, 0.85, 0.8), (410.17, 0.5, 0.4),
                         (434.05, 0.55, 0.4), (486.13, 0.6, 0.45), (430.8, 0.45, 0.3),
                         (382.0, 0.5, 0.5), (358.1, 0.5, 0.5)):
        depth = np.maximum(depth, d * np.exp(-0.5 * ((wl - centre) / w) ** 2))
    rng = np.random.default_rng(20250914)  # fixed: the same solar lines in every dataset
    for centre in rng.uniform(wl[0], wl[-1], 400):
        d, w = rng.uniform(0.05, 0.45), rng.uniform(0.03, 0.12)
        depth = np.maximum(depth, d * np.exp(-0.5 * ((wl - centre) / w) ** 2))
    return flux * (1.0 - depth)


def slit_convolve(wl: np.ndarray, y: np.ndarray, fwhm_nm: float) -> np.ndarray:
    """Convolve a uniformly sampled spectrum with a normalised Gaussian slit."""
    step = wl[1] - wl[0]
    sigma = fwhm_nm / 2.3548
    half = int(np.ceil(4 * sigma / step))
    x = np.arange(-half, half + 1) * step
    kern = np.exp(-0.5 * (x / sigma) ** 2)
    kern /= kern.sum()
    return np.convolve(np.pad(y, half, mode="edge"), kern, mode="valid")


def sample(spectra: Spectra, target_wl: np.ndarray, fwhm_nm: float) -> dict[str, np.ndarray]:
    """Slit-convolved spectra sampled at target wavelengths (any shape, e.g. (X, C))."""
    out = {}
    for name in ("no2", "o3", "hcho", "o4", "solar"):
        conv = slit_convolve(spectra.wl, getattr(spectra, name), fwhm_nm)
        out[name] = np.interp(target_wl.ravel(), spectra.wl, conv).reshape(target_wl.shape)
    return out


def rayleigh_tau(wl_nm: np.ndarray) -> np.ndarray:
    """Rayleigh optical depth of a 1013 hPa atmosphere."""
    return 0.0088 * (wl_nm / 1000.0) ** -4.05


def ozone_fraction_above(p_hpa: np.ndarray) -> np.ndarray:
    """Fraction of the ozone column above pressure ``p_hpa``: a smooth profile with half
    the column above 30 hPa and ~86% above 100 hPa (a mid-latitude ozone profile's
    stratospheric peak)."""
    r = (np.asarray(p_hpa, np.float64) / 30.0) ** 1.5
    return r / (1.0 + r)


# bottom edges of the single-scattering Rayleigh layers, as fractions of the bottom pressure
RAYLEIGH_EDGES = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.35, 0.65, 1.0)


def radiance(sampled: dict[str, np.ndarray], wl: np.ndarray, f: dict[str, np.ndarray]) -> np.ndarray:
    """Top-of-atmosphere radiance (M, X, C) float32 from the fields ``f`` (each (M, X)).

    ``sampled`` holds (X, C) spectra from :func:`sample`, ``wl`` is (X, C) nm. Field keys:
    sza, vza, raa (deg), albedo, cloud_fraction, cloud_pressure, surface_pressure (hPa),
    no2_trop, no2_strat, hcho (molecules/cm^2), o3 (DU).

    Rayleigh single scattering is summed over the pressure layers ``RAYLEIGH_EDGES``, each
    attenuated by the ozone above it only (``ozone_fraction_above``): below ~314 nm, where
    the full ozone column absorbs almost everything, the light that reaches the sensor is
    scattered above or inside the ozone layer. Surface and cloud reflection see the whole
    column.
    """
    f32 = {k: np.asarray(v, np.float32)[..., None] for k, v in f.items()}  # (M, X, 1)
    sp = {k: np.asarray(v, np.float32)[None] for k, v in sampled.items()}  # (1, X, C)
    mu0 = np.cos(np.radians(f32["sza"]))
    mu = np.cos(np.radians(f32["vza"]))
    s0, s = np.sqrt(1 - mu0**2), np.sqrt(1 - mu**2)
    cos_scat = -mu0 * mu + s0 * s * np.cos(np.radians(f32["raa"]))
    phase = 0.75 * (1.0 + cos_scat**2)
    amf = 1.0 / mu0 + 1.0 / mu
    cf = f32["cloud_fraction"]
    ps = f32["surface_pressure"] / np.float32(1013.25)
    pc = f32["cloud_pressure"] / np.float32(1013.25)
    tau_r = rayleigh_tau(wl)[None].astype(np.float32)  # (1, X, C)
    # diffuse transmittance (half the Rayleigh-scattered light goes on forward):
    # exp(-tau_R * p / 2 * AMF) instead of the direct beam's exp(-tau_R * p * AMF)
    ext_s = np.exp(-0.5 * tau_r * (amf * ps))
    ext_c = np.exp(-0.5 * tau_r * (amf * pc))
    # tropospheric absorbers are partly shielded by clouds and seen with a smaller AMF
    amf_trop = amf * (0.6 * (1 - cf) + 0.15 * cf)
    # O2-O2 column in units of O4_COLUMN_SURFACE (1.35e43 does not fit float32)
    o4_col = (1 - cf) * ps**2 + cf * pc**2
    o4_xsec = (sampled["o4"] * O4_COLUMN_SURFACE).astype(np.float32)[None]
    tau_other = (sp["no2"] * (f32["no2_trop"] * amf_trop + f32["no2_strat"] * amf)
                 + sp["hcho"] * (f32["hcho"] * amf_trop) + o4_xsec * (o4_col * amf))
    tau_o3 = sp["o3"] * (f32["o3"] * np.float32(DU) * amf)  # full slant optical depth
    # Rayleigh: layers down to the cloud-weighted bottom, geometrically spaced in pressure
    # so that the few hPa above the ozone peak (all that is seen below ~310 nm) are resolved.
    # Channels where even 600 DU at the largest AMF absorb < 1% use the closed form.
    p_bot = (1 - cf) * ps + cf * pc  # (M, X, 1) in units of 1013.25 hPa
    uv = (sampled["o3"].max(axis=0) * 600 * DU * float(amf.max())) > 0.01  # (C,)
    rho_ray = ((1.0 - np.exp(-tau_r * amf * p_bot)) / amf * np.exp(-tau_o3)).astype(np.float32)
    if uv.any():
        tr, to3 = tau_r[..., uv], tau_o3[..., uv]
        edges = [np.zeros_like(p_bot)] + [p_bot * np.float32(q) for q in RAYLEIGH_EDGES]
        acc = np.zeros(np.broadcast_shapes(to3.shape, tr.shape), np.float32)
        for top, bot in zip(edges[:-1], edges[1:], strict=True):
            p_mid = 0.5 * (top + bot)
            g = ozone_fraction_above(p_mid * 1013.25).astype(np.float32)
            acc += (bot - top) * np.exp(-(tr * (amf * p_mid) + to3 * g))
        rho_ray[..., uv] = acc * tr
    # multiple scattering: about (1 + tau_R) times the single-scattered light
    rho_ray *= phase / (4.0 * mu * mu0) * (1.0 + tau_r * p_bot)
    refl_surf = ((1 - cf) * f32["albedo"] * ext_s + cf * 0.8 * ext_c) * np.exp(-tau_o3)
    rad = sp["solar"] * mu0 / np.float32(np.pi) * (rho_ray + refl_surf) * np.exp(-tau_other)
    return rad.astype(np.float32, copy=False)


def shot_noise(rad: np.ndarray, snr_at_1e13: float) -> np.ndarray:
    """1-sigma noise (radiance units) of a photon-noise-limited detector whose SNR is
    ``snr_at_1e13`` at a radiance of 1e13 and scales with sqrt(radiance)."""
    return (np.sqrt(np.maximum(rad, 0.0) * 1e13) / snr_at_1e13).astype(np.float32)


def round_significant(x: np.ndarray, digits: int) -> np.ndarray:
    """Round to ``digits`` significant digits (as the L1 processor writes radiance_error)."""
    x = np.asarray(x, np.float64)
    with np.errstate(divide="ignore"):
        e = np.floor(np.log10(np.abs(np.where(x == 0, 1.0, x))))
    scale = 10.0 ** (digits - 1 - e)
    return (np.round(x * scale) / scale).astype(np.float32)


# fitting windows (nm) of the operational retrievals whose photon-noise precision we mimic
RETRIEVAL_WINDOWS = {"NO2": (405.0, 465.0), "HCHO": (328.5, 356.5), "O3TOT": (312.0, 340.0)}
# closure polynomial order per window: DOAS fits (NO2, HCHO) remove a cubic; total ozone
# uses the absorption step across its window, with only a linear reflectance term
CLOSURE_ORDER = {"NO2": 3, "HCHO": 3, "O3TOT": 1}
RETRIEVAL_NOISE_FACTOR = 2.0  # real retrievals: interferences and the closure polynomial
CLOUD_FRACTION_PRECISION = 0.03  # limited by the surface albedo, not by photon noise


def differential(xsec: np.ndarray, wl: np.ndarray, window: tuple[float, float],
                 order: int = 3) -> np.ndarray:
    """Cross-section minus its polynomial fit over ``window`` (the part a DOAS fit with a
    closure polynomial of ``order`` can see); 0 outside the window. (C,) arrays."""
    w = (wl >= window[0]) & (wl <= window[1])
    out = np.zeros_like(xsec, dtype=np.float64)
    if w.sum() > order + 1:
        x = (wl[w] - wl[w].mean()) / max(np.ptp(wl[w]), 1e-9)
        coef = np.polyfit(x, xsec[w], order)
        out[w] = xsec[w] - np.polyval(coef, x)
    return out


def retrieval_precision(sampled: dict[str, np.ndarray], wl: np.ndarray,
                        f: dict[str, np.ndarray], rad: np.ndarray,
                        sigma: np.ndarray) -> dict[str, np.ndarray]:
    """1-sigma retrieval noise per pixel ((M, X) arrays, L2 units) consistent with the
    spectra: the photon-noise (Cramer-Rao) bound of a fit of the differential cross-section
    over the product's window, 1 / (AMF * sqrt(sum_c (dsigma_c / (sigma_I,c / I_c))^2)),
    times ``RETRIEVAL_NOISE_FACTOR``. NO2 and HCHO in molecules/cm^2 (tropospheric AMF of
    :func:`radiance`), O3TOT in DU; CLDO4 is ``CLOUD_FRACTION_PRECISION``.
    ``rad`` and ``sigma`` are (M, X, C) radiance and its 1-sigma noise."""
    mu0 = np.cos(np.radians(f["sza"]))
    mu = np.cos(np.radians(f["vza"]))
    amf = 1.0 / mu0 + 1.0 / mu
    cf = f["cloud_fraction"]
    amf_eff = {"NO2": amf * (0.6 * (1 - cf) + 0.15 * cf),
               "HCHO": amf * (0.6 * (1 - cf) + 0.15 * cf), "O3TOT": amf * DU}
    wl_mean = wl.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr2 = np.nan_to_num((rad.astype(np.float64) / sigma) ** 2, nan=0.0, posinf=0.0)
    out = {}
    for prod, key in (("NO2", "no2"), ("HCHO", "hcho"), ("O3TOT", "o3")):
        d = differential(sampled[key].mean(axis=0), wl_mean, RETRIEVAL_WINDOWS[prod],
                         CLOSURE_ORDER[prod])
        info = snr2 @ (d**2)  # (M, X): sum over channels
        with np.errstate(divide="ignore"):
            out[prod] = RETRIEVAL_NOISE_FACTOR / (amf_eff[prod] * np.sqrt(info))
        out[prod] = np.minimum(out[prod], 1e30)
    out["CLDO4"] = np.full(cf.shape, CLOUD_FRACTION_PRECISION)
    return out


SLANT_COLUMN_ABSORBERS = ("no2", "o3", "hcho", "o4")


def slant_column_operator(spectra: Spectra, wl: np.ndarray, fwhm_nm: float
                          ) -> tuple[np.ndarray, list[str]]:
    """The linear map from a pixel's log radiance to DOAS slant columns.

    For each window of ``RETRIEVAL_WINDOWS`` (NO2 405-465 nm, HCHO 328.5-356.5 nm, O3TOT
    312-340 nm) a least-squares fit of log I over the window's channels with the
    slit-convolved cross-sections of ``SLANT_COLUMN_ABSORBERS`` and a closure polynomial of
    ``CLOSURE_ORDER`` (Beer-Lambert: log I = P(l) - sum_i sigma_i(l) S_i; Platt & Stutz,
    *Differential Optical Absorption Spectroscopy*, 2008, ch. 8). ``wl`` (C,) is the
    channels' wavelength grid (nm), ``fwhm_nm`` the slit's full width at half maximum.

    Returns (P, names): P (K, C) float64 with K = 3 windows x 4 absorbers, so that
    ``P @ log_I`` gives the slant columns S (molecules/cm^2; O2-O2 in units of
    ``O4_COLUMN_SURFACE``); channels outside a window have weight 0, and an absorber whose
    cross-section is zero across a window gets a zero row. A constant added to log I (the
    solar spectrum, a mean spectrum) shifts S by a constant. No Ring pseudo-absorber and no
    wavelength shift are fitted. ``names`` are 'WINDOW:absorber'. Raises ValueError for a
    grid that is not 1-D or a window with fewer channels than fitted terms.
    """
    wl = np.asarray(wl, np.float64)
    if wl.ndim != 1:
        raise ValueError(f"wavelength grid must be 1-D (C,), got shape {wl.shape}")
    sampled = sample(spectra, wl, fwhm_nm)
    sampled["o4"] = sampled["o4"] * O4_COLUMN_SURFACE
    rows, names = [], []
    for window, (lo, hi) in RETRIEVAL_WINDOWS.items():
        inside = (wl >= lo) & (wl <= hi)
        t = (wl[inside] - wl[inside].mean()) / max(np.ptp(wl[inside]), 1e-9) \
            if inside.any() else wl[inside]
        xs = [sampled[a][inside] for a in SLANT_COLUMN_ABSORBERS]
        present = [bool(np.abs(x).max(initial=0.0) > 0) for x in xs]
        cols = [x for x, p in zip(xs, present, strict=True) if p]
        cols += [t ** k for k in range(CLOSURE_ORDER[window] + 1)]
        if inside.sum() < len(cols):
            raise ValueError(f"window {window} ({lo}-{hi} nm) holds {int(inside.sum())} "
                             f"channels, fewer than the {len(cols)} fitted terms")
        a = np.stack(cols, 1)
        norm = np.abs(a).max(0)
        fit = np.linalg.pinv(a / norm) / norm[:, None]  # (terms, channels in window)
        j = 0
        for absorber, p in zip(SLANT_COLUMN_ABSORBERS, present, strict=True):
            row = np.zeros(wl.shape[0])
            if p:
                row[inside] = -fit[j]  # log I falls by sigma * S
                j += 1
            rows.append(row)
            names.append(f"{window}:{absorber}")
    return np.stack(rows), names

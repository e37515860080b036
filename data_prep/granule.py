"""One granule from files to tiles: read, align L1 with L2, mask, normalise, cut.

Used by ``compute_stats`` (the aligned pixels) and ``make_shards`` (the tiles).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from data_prep import samples
from data_prep.stats import LOG_CLAMP_MIN, Z_CLIP, log_radiance
from data_prep.tempo import (
    DEFAULT_QA,
    L1_BAND,
    L2_ORDER,
    GranuleFiles,
    QARule,
    TempoFileError,
    qa_rules_json,
    read_l1,
    read_l2,
    tempo_time_to_utc,
)


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How granules are read. ``qa`` holds one rule per product in JSON form
    (``QARule.to_json``, None = no QA; default ``tempo.DEFAULT_QA``)."""

    band: str = L1_BAND
    l1_fill: float | None = None  # an extra radiance value to treat as invalid
    l1_quality_mask: int = 0xFFFF
    mirror_step_policy: str = "trim"  # "trim": use the mirror steps L1 and L2 share; "error"
    require_products: bool = False  # a granule missing an L2 product is an error
    qa: dict = dataclasses.field(default_factory=lambda: qa_rules_json(DEFAULT_QA))
    radiance_error: bool = False  # also read radiance_error (for l1_sigma.npy)

    def qa_rule(self, product: str) -> QARule | None:
        d = self.qa.get(product, DEFAULT_QA[product] and DEFAULT_QA[product].to_json())
        return None if d is None else QARule.from_json(d, where=f"QA rule {product}")


@dataclasses.dataclass(frozen=True)
class TileOptions:
    size: int = 64
    stride: int = 64
    min_valid_fraction: float = 0.95  # of L1 pixels with good radiance
    max_bad_channel_fraction: float = 0.05  # a pixel with more bad channels is invalid


@dataclasses.dataclass
class AlignedGranule:
    key: str
    files: list[str]
    radiance: np.ndarray  # (M, X, C) float32, NaN invalid
    wavelength: np.ndarray  # (X, C)
    l2: np.ndarray  # (4, M, X) float32 physical, NaN invalid
    geo: np.ndarray  # (4, M, X) float32
    time: np.ndarray  # (M,) TEMPO time, seconds since 1980-01-06 with leap seconds
    report: dict  # counts: invalid radiance, fill / bad QA per product, trimmed rows, ...
    mirror_step: np.ndarray | None = None  # (M,) absolute scan positions
    radiance_error: np.ndarray | None = None  # (M, X, C) float32, radiance units


def read_granule(g: GranuleFiles, opts: ReadOptions) -> AlignedGranule:
    """Read the RAD file and every L2 product of a granule onto one grid.

    Rows are matched by the files' absolute ``mirror_step`` coordinates (by index for files
    without one): the granule keeps the mirror steps present in the RAD file and every L2
    file (``mirror_step_policy="trim"``) or fails when they differ (``"error"``).
    """
    if g.rad is None:
        raise TempoFileError(next(iter(g.l2.values()), g.gid.key),
                             f"no RAD L1 file for granule {g.gid.key}")
    missing = [p for p in L2_ORDER if p not in g.l2]
    if missing and opts.require_products:
        raise TempoFileError(g.rad, f"granule {g.gid.key} has no {', '.join(missing)} L2 file")
    l1 = read_l1(g.rad, opts.band, opts.l1_fill, opts.l1_quality_mask,
                 radiance_error=opts.radiance_error)
    m, x, _ = l1.radiance.shape
    report: dict = {"l1_invalid_values": l1.n_invalid,
                    "l1_invalid_geolocation_pixels": l1.n_invalid_geolocation,
                    "missing_products": missing, "l1_mirror_steps": m, "l2": {}}
    fields = {}
    common = l1.mirror_step
    for p, path in sorted(g.l2.items()):
        rule = opts.qa_rule(p)
        f = read_l2(path, p, rule)
        mp, xp = f.values.shape
        if xp != x:
            raise TempoFileError(path, f"xtrack size {xp} does not match the RAD file's {x} "
                                       f"({g.rad})")
        if not np.array_equal(f.mirror_step, l1.mirror_step) and \
                opts.mirror_step_policy == "error":
            raise TempoFileError(path, f"{mp} mirror steps but the RAD file has {m} ({g.rad}); "
                                       "use --mirror-step-policy trim to use the common rows")
        n_valid = int(np.isfinite(f.values).sum())
        report["l2"][p] = {"mirror_steps": mp, "fill": f.n_fill, "bad_qa": f.n_bad_qa,
                           "qa_removed": f.qa_removed, "qa_rule": f.qa_rule,
                           "valid": n_valid}
        if n_valid == 0:
            report.setdefault("all_invalid_products", []).append(p)
        fields[p] = f
        common = np.intersect1d(common, f.mirror_step)
    for path, ms in [(g.rad, l1.mirror_step)] + [(f.path, f.mirror_step)
                                                 for f in fields.values()]:
        if not np.all(np.diff(ms) > 0):
            raise TempoFileError(path, "'mirror_step' is not increasing")
    rows = np.searchsorted(l1.mirror_step, common) if common.size else np.zeros(0, int)
    report["mirror_steps_used"] = int(rows.size)
    report["mirror_steps_trimmed"] = {"RAD": m - rows.size} | {
        p: f.values.shape[0] - rows.size for p, f in fields.items()}
    l2 = np.full((len(L2_ORDER), rows.size, x), np.nan, np.float32)
    for i, p in enumerate(L2_ORDER):
        if p in fields:
            f = fields[p]
            l2[i] = f.values[np.searchsorted(f.mirror_step, common)]
    # the common rows are one run of the RAD file's rows (always, unless a file skips
    # mirror steps): select them with a slice, a view instead of a copy of the radiance
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:
        rows = slice(int(rows[0]), int(rows[-1]) + 1)
    geo = np.stack([l1.latitude, l1.longitude, l1.sza, l1.vza])[:, rows]
    files = [g.rad] + [g.l2[p] for p in L2_ORDER if p in g.l2]
    err = None if l1.radiance_error is None else l1.radiance_error[rows]
    return AlignedGranule(g.gid.key, files, l1.radiance[rows], l1.wavelength, l2, geo,
                          l1.time[rows], report, l1.mirror_step[rows], err)


def normalise(rad: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(..., C) radiance -> clipped z-scores of log radiance, NaN kept."""
    z = (log_radiance(rad) - mean.astype(np.float32)) / std.astype(np.float32)
    return np.clip(z, -Z_CLIP, Z_CLIP, out=z)


def normalised_error(rad: np.ndarray, err: np.ndarray, std: np.ndarray) -> np.ndarray:
    """1-sigma radiance error (radiance units, (..., C)) -> 1-sigma of the normalised
    radiance: d log(I) / std_c = err / (I * std_c). float32, NaN/Inf where undefined."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.abs(err) / (np.maximum(rad, 1.0) * std.astype(np.float32))).astype(
            np.float32)


class _Normalised:
    """Work shared by the tiles of one band of rows (``size`` rows from ``r0``), done once
    per band instead of once per tile: ``n_bad(r0)`` (size, X') invalid channels per
    pixel, and ``l1_npy(r0, c0)`` the .npy bytes of the tile at column ``c0``: float16
    (C, size, size) of ``normalise(radiance)`` with invalid values (channel mean, 0) and
    pixels with too many invalid channels (all 0) filled. The band is normalised one
    tile row at a time in reused buffers (the passes stay in cache), each row cast to
    float16 once and transposed into every tile of the band. Only the current band is
    kept (memory of one band, not of the granule); columns no tile uses are left out.
    Elementwise identical to normalising, casting and transposing each tile."""

    def __init__(self, radiance: np.ndarray, positions, t: TileOptions, mean, std):
        cols = max(c for _, c in positions) + t.size
        self.radiance, self.size, self.t = radiance[:, :cols], t.size, t
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        self.columns: dict[int, list[int]] = {}
        for r0, c0 in positions:
            self.columns.setdefault(r0, []).append(c0)
        c = radiance.shape[-1]
        self._bad = np.empty((t.size, cols, c), bool)
        self._z = np.empty((cols, c), np.float32)  # one tile row
        self._z16 = np.empty((cols, c), samples.L1_DTYPE)
        self._r0: int | None = None
        self._n_bad = None
        self._tiles: dict[int, memoryview] | None = None

    def _band(self, r0: int) -> None:
        if self._r0 != r0:
            rad = self.radiance[r0:r0 + self.size]
            np.logical_not(np.isfinite(rad, out=self._bad), out=self._bad)
            self._n_bad = self._bad.sum(axis=-1, dtype=np.int32)
            self._tiles, self._r0 = None, r0

    def n_bad(self, r0: int) -> np.ndarray:
        self._band(r0)
        return self._n_bad

    def l1_npy(self, r0: int, c0: int) -> memoryview:
        self._band(r0)
        if self._tiles is None:
            self._tiles = self._normalise_band(r0)
        return self._tiles.pop(c0)

    def _normalise_band(self, r0: int) -> dict[int, memoryview]:
        c = self._z.shape[-1]
        tiles, chw = {}, {}
        for c0 in self.columns[r0]:
            tiles[c0], chw[c0] = samples.npy_buffer((c, self.size, self.size),
                                                    samples.L1_DTYPE)
        z, z16 = self._z, self._z16
        for y in range(self.size):
            np.maximum(self.radiance[r0 + y], np.float32(LOG_CLAMP_MIN), out=z)
            np.log(z, out=z)
            np.subtract(z, self.mean, out=z)
            np.divide(z, self.std, out=z)
            np.clip(z, -Z_CLIP, Z_CLIP, out=z)
            np.copyto(z, 0.0, where=self._bad[y])
            z[self._n_bad[y] / c > self.t.max_bad_channel_fraction] = 0.0
            _to_float16(z, z16)
            for c0, a in chw.items():  # (W, C) -> (C, W): row y of each tile
                np.copyto(a[:, y], z16[c0:c0 + self.size].T)
        return tiles


def _to_float16(src: np.ndarray, dst: np.ndarray) -> None:
    """``dst[...] = src`` cast to float16 (round to nearest even, as numpy's cast): with
    torch's vectorised conversion when torch is already loaded in this process (e.g.
    make_shards workers with enough granules to amortise its import), numpy's otherwise
    (the same bits for finite values; numpy casts one value at a time where its build has
    no float16 instructions)."""
    torch = sys.modules.get("torch")
    if torch is not None and src.flags.c_contiguous and dst.flags.c_contiguous:
        torch.from_numpy(dst).copy_(torch.from_numpy(src))
    else:
        np.copyto(dst, src, casting="same_kind")


def tile_positions(m: int, x: int, t: TileOptions) -> list[tuple[int, int]]:
    return [(r, c) for r in range(0, m - t.size + 1, t.stride)
            for c in range(0, x - t.size + 1, t.stride)]


def _iso(seconds: float) -> str | None:
    """TEMPO time -> ISO 8601 UTC (leap seconds removed), None for NaN."""
    t = tempo_time_to_utc(seconds)
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def cut_tiles(g: AlignedGranule, mean: np.ndarray, std: np.ndarray, t: TileOptions):
    """Yield (record, sample-or-None) for every candidate tile of the granule.

    ``record`` is the manifest entry (key, position, status, reason, counts); ``sample`` is
    the encoded sample dict for tiles that are kept.
    """
    m, x, c = g.radiance.shape
    positions = tile_positions(m, x, t)
    prep = _Normalised(g.radiance, positions, t, mean, std) if positions else None
    for r0, c0 in positions:
        key = f"{g.key}_r{r0:04d}_c{c0:04d}"
        n_bad = prep.n_bad(r0)[:, c0:c0 + t.size]  # (H, W) invalid channels
        bad_frac = n_bad / c  # (H, W)
        pixel_ok = bad_frac <= t.max_bad_channel_fraction
        valid_frac = float(pixel_ok.mean())
        l2 = g.l2[:, r0:r0 + t.size, c0:c0 + t.size]
        l2_valid = {p: float(np.isfinite(l2[i]).mean()) for i, p in enumerate(L2_ORDER)}
        rec = {"key": key, "granule": g.key, "row": r0, "col": c0,
               "l1_valid_fraction": round(valid_frac, 6), "l2_valid_fraction": l2_valid}
        if valid_frac < t.min_valid_fraction:
            rec.update(status="dropped", reason="l1_valid_fraction_below_min")
            yield rec, None
            continue
        l1 = prep.l1_npy(r0, c0)  # float16 (C, H, W); invalid values 0, counted:
        filled = int(n_bad.sum())
        geo = g.geo[:, r0:r0 + t.size, c0:c0 + t.size]
        tmid = g.time[r0 + t.size // 2] if g.time.size else np.nan
        meta = {"key": key, "granule": g.key, "row": r0, "col": c0, "size": t.size,
                "time": _iso(tmid), "time_tempo": None if not np.isfinite(tmid) else
                float(tmid), "files": [f.rsplit("/", 1)[-1] for f in g.files],
                "l1_filled_values": filled, "l1_invalid_pixels": int((~pixel_ok).sum()),
                "l2_valid_fraction": l2_valid, "l2_order": list(L2_ORDER)}
        if g.mirror_step is not None:
            meta["mirror_step"] = int(g.mirror_step[r0])  # absolute scan position of row 0
        sample = samples.encode(key, l1, l2, geo, meta)
        if g.radiance_error is not None:
            rad = g.radiance[r0:r0 + t.size, c0:c0 + t.size]  # (H, W, C)
            sigma = normalised_error(rad, g.radiance_error[r0:r0 + t.size, c0:c0 + t.size],
                                     std)
            sigma[~np.isfinite(rad) | ~pixel_ok[..., None]] = np.inf
            sample[samples.SIGMA_KEY] = samples.npy_bytes(np.minimum(
                sigma.transpose(2, 0, 1), samples.SIGMA_UNKNOWN).astype(samples.L1_DTYPE))
        rec.update(status="written", l1_filled_values=filled)
        yield rec, sample

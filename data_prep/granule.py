"""One granule from files to tiles: read, align L1 with L2, mask, normalise, cut.

Used by ``compute_stats`` (the aligned pixels) and ``make_shards`` (the tiles).
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np

from data_prep import samples
from data_prep.stats import LOG_CLAMP_MIN, Z_CLIP, log_radiance
from data_prep.tempo import (
    L1_BAND,
    L2_ORDER,
    TIME_EPOCH,
    GranuleFiles,
    TempoFileError,
    read_l1,
    read_l2,
)


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    band: str = L1_BAND
    l1_fill: float = -1.0e30
    l1_quality_mask: int = 0xFFFF
    mirror_step_policy: str = "trim"  # "trim": use the rows L1 and L2 share; "error"
    require_products: bool = False  # a granule missing an L2 product is an error


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
    time: np.ndarray  # (M,) seconds since 1980-01-06
    report: dict  # counts: invalid radiance, fill / bad QA per product, trimmed rows, ...


def read_granule(g: GranuleFiles, opts: ReadOptions) -> AlignedGranule:
    """Read the RAD file and every L2 product of a granule onto one grid."""
    if g.rad is None:
        raise TempoFileError(next(iter(g.l2.values()), g.gid.key),
                             f"no RAD L1 file for granule {g.gid.key}")
    missing = [p for p in L2_ORDER if p not in g.l2]
    if missing and opts.require_products:
        raise TempoFileError(g.rad, f"granule {g.gid.key} has no {', '.join(missing)} L2 file")
    l1 = read_l1(g.rad, opts.band, opts.l1_fill, opts.l1_quality_mask)
    m, x, _ = l1.radiance.shape
    report: dict = {"l1_invalid_values": l1.n_invalid, "missing_products": missing,
                    "l1_mirror_steps": m, "l2": {}}
    fields = {}
    for p, path in sorted(g.l2.items()):
        f = read_l2(path, p)
        mp, xp = f.values.shape
        if xp != x:
            raise TempoFileError(path, f"xtrack size {xp} does not match the RAD file's {x} "
                                       f"({g.rad})")
        if mp != m and opts.mirror_step_policy == "error":
            raise TempoFileError(path, f"{mp} mirror steps but the RAD file has {m} ({g.rad}); "
                                       "use --mirror-step-policy trim to use the common rows")
        n_valid = int(np.isfinite(f.values).sum())
        report["l2"][p] = {"mirror_steps": mp, "fill": f.n_fill, "bad_qa": f.n_bad_qa,
                           "valid": n_valid}
        if n_valid == 0:
            report.setdefault("all_invalid_products", []).append(p)
        fields[p] = f.values
    rows = min([m] + [v.shape[0] for v in fields.values()])
    report["mirror_steps_used"] = rows
    report["mirror_steps_trimmed"] = {"RAD": m - rows} | {p: v.shape[0] - rows
                                                         for p, v in fields.items()}
    l2 = np.full((len(L2_ORDER), rows, x), np.nan, np.float32)
    for i, p in enumerate(L2_ORDER):
        if p in fields:
            l2[i] = fields[p][:rows]
    geo = np.stack([l1.latitude, l1.longitude, l1.sza, l1.vza])[:, :rows]
    files = [g.rad] + [g.l2[p] for p in L2_ORDER if p in g.l2]
    return AlignedGranule(g.gid.key, files, l1.radiance[:rows], l1.wavelength, l2, geo,
                          l1.time[:rows], report)


def normalise(rad: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(..., C) radiance -> clipped z-scores of log radiance, NaN kept."""
    z = (log_radiance(rad) - mean.astype(np.float32)) / std.astype(np.float32)
    return np.clip(z, -Z_CLIP, Z_CLIP, out=z)


class _Normalised:
    """Work shared by the tiles of one band of rows (``size`` rows from ``r0``), done once
    per band in place instead of once per tile: ``n_bad(r0)`` (size, X') invalid channels
    per pixel and ``z(r0)`` (size, X', C) float32 = ``normalise(radiance)`` with invalid
    values (channel mean, 0) and pixels with too many invalid channels (all 0) filled.
    Only the current band is kept (memory of one band, not of the granule); columns no
    tile uses are left out. Elementwise identical to normalising each tile."""

    def __init__(self, radiance: np.ndarray, positions, t: TileOptions, mean, std):
        cols = max(c for _, c in positions) + t.size
        self.radiance, self.size, self.t = radiance[:, :cols], t.size, t
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        self._r0: int | None = None
        self._bad = self._n_bad = self._z = None

    def _band(self, r0: int) -> None:
        if self._r0 != r0:
            rad = self.radiance[r0:r0 + self.size]
            self._bad = ~np.isfinite(rad)
            self._n_bad = self._bad.sum(axis=-1, dtype=np.int32)
            self._z, self._r0 = None, r0

    def n_bad(self, r0: int) -> np.ndarray:
        self._band(r0)
        return self._n_bad

    def z(self, r0: int) -> np.ndarray:
        self._band(r0)
        if self._z is None:
            z = np.maximum(self.radiance[r0:r0 + self.size], np.float32(LOG_CLAMP_MIN))
            np.log(z, out=z)
            np.subtract(z, self.mean, out=z)
            np.divide(z, self.std, out=z)
            np.clip(z, -Z_CLIP, Z_CLIP, out=z)
            z[self._bad] = 0.0
            z[self._n_bad / z.shape[-1] > self.t.max_bad_channel_fraction] = 0.0
            self._z = z
        return self._z


def tile_positions(m: int, x: int, t: TileOptions) -> list[tuple[int, int]]:
    return [(r, c) for r in range(0, m - t.size + 1, t.stride)
            for c in range(0, x - t.size + 1, t.stride)]


def _iso(seconds: float) -> str | None:
    if not np.isfinite(seconds):
        return None
    return (TIME_EPOCH + dt.timedelta(seconds=float(seconds))).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
        z = prep.z(r0)[:, c0:c0 + t.size]  # invalid values already 0, counted:
        filled = int(n_bad.sum())
        # cast first, then transpose the half-size copy: (C, H, W)
        l1 = np.ascontiguousarray(z.astype(samples.L1_DTYPE).transpose(2, 0, 1))
        geo = g.geo[:, r0:r0 + t.size, c0:c0 + t.size]
        tmid = g.time[r0 + t.size // 2] if g.time.size else np.nan
        meta = {"key": key, "granule": g.key, "row": r0, "col": c0, "size": t.size,
                "time": _iso(tmid), "files": [f.rsplit("/", 1)[-1] for f in g.files],
                "l1_filled_values": filled, "l1_invalid_pixels": int((~pixel_ok).sum()),
                "l2_valid_fraction": l2_valid, "l2_order": list(L2_ORDER)}
        rec.update(status="written", l1_filled_values=filled)
        yield rec, samples.encode(key, l1, l2, geo, meta)

"""Streaming, mergeable statistics for radiance normalisation and L2 transforms.

``ChannelMoments`` keeps count, mean and M2 per channel (Chan et al. parallel update), so
partial results from workers merge exactly. ``BottomKSample`` keeps the k values with the
smallest random keys, which is a uniform sample of everything seen and merges exactly
(union, keep the k smallest); when fewer than k values were seen it holds them all and the
median and MAD are exact.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from data_prep.tempo import L2_ORDER

LOG_CLAMP_MIN = 1.0  # radiance is clamped to >= 1 before the log (as the research code)
Z_CLIP = 10.0
MAD_SCALE = 1.4826  # MAD -> standard deviation for a normal distribution


def log_radiance(rad: np.ndarray) -> np.ndarray:
    """log(clamp(radiance, min=1)), NaN preserved, float32."""
    return np.log(np.maximum(rad, np.float32(LOG_CLAMP_MIN))).astype(np.float32, copy=False)


@dataclasses.dataclass
class ChannelMoments:
    count: np.ndarray  # (C,) int64
    mean: np.ndarray  # (C,) float64
    m2: np.ndarray  # (C,) float64

    @classmethod
    def empty(cls, channels: int) -> ChannelMoments:
        return cls(np.zeros(channels, np.int64), np.zeros(channels), np.zeros(channels))

    def update(self, x: np.ndarray) -> None:
        """Add rows of x (N, C); NaN entries are ignored per channel. float32 input is
        summed in float64 without a float64 copy: deviations from the float32-rounded mean
        are squared in float32 (relative error ~1e-7) and summed in float64, and the offset
        of that rounded mean is removed exactly (sum of squares minus (sum)^2 / n)."""
        x = np.asarray(x)
        if x.dtype != np.float32:
            x = x.astype(np.float64, copy=False)
        finite = np.isfinite(x)
        n = finite.sum(axis=0)
        if not n.any():
            return
        all_finite = bool((n == x.shape[0]).all())
        xs = x if all_finite else np.where(finite, x, x.dtype.type(0))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, xs.sum(axis=0, dtype=np.float64) / np.maximum(n, 1), 0.0)
            d = xs - mean.astype(x.dtype)
            if not all_finite:
                d[~finite] = 0
            sd = d.sum(axis=0, dtype=np.float64)
            m2 = np.einsum("ij,ij->j", d, d, dtype=np.float64) - sd * sd / np.maximum(n, 1)
        self.merge(ChannelMoments(n.astype(np.int64), mean, np.maximum(m2, 0.0)))

    def merge(self, other: ChannelMoments) -> None:
        n = self.count + other.count
        safe = np.maximum(n, 1)
        delta = other.mean - self.mean
        self.mean = self.mean + delta * other.count / safe
        self.m2 = self.m2 + other.m2 + delta**2 * self.count * other.count / safe
        self.count = n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / np.maximum(self.count, 1))

    def to_dict(self) -> dict:
        return {"count": self.count.tolist(), "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> ChannelMoments:
        return cls(np.asarray(d["count"], np.int64), np.asarray(d["mean"], np.float64),
                   np.asarray(d["m2"], np.float64))


@dataclasses.dataclass
class BottomKSample:
    k: int
    keys: np.ndarray  # (n,) float64 in [0, 1)
    values: np.ndarray  # (n,) float64
    seen: int = 0

    @classmethod
    def empty(cls, k: int) -> BottomKSample:
        return cls(k, np.empty(0), np.empty(0), 0)

    def update(self, values: np.ndarray, seed_text: str) -> None:
        """Add the finite entries of ``values``; keys come from a generator seeded by
        ``seed_text`` (e.g. the granule id), so results do not depend on worker order."""
        v = np.asarray(values, np.float64).ravel()
        v = v[np.isfinite(v)]
        seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little")
        keys = np.random.default_rng(seed).random(v.size)
        self.merge(BottomKSample(self.k, keys, v, v.size))

    def merge(self, other: BottomKSample) -> None:
        keys = np.concatenate([self.keys, other.keys])
        values = np.concatenate([self.values, other.values])
        if keys.size > self.k:
            idx = np.argpartition(keys, self.k - 1)[: self.k]
            keys, values = keys[idx], values[idx]
        order = np.argsort(keys, kind="stable")
        self.keys, self.values = keys[order], values[order]
        self.seen += other.seen

    @property
    def exact(self) -> bool:
        return self.seen <= self.k


@dataclasses.dataclass
class L2Moments:
    """Per product: exact count/mean/M2/min/max and a bottom-k sample for median and MAD."""

    moments: ChannelMoments
    samples: dict[str, BottomKSample]
    vmin: np.ndarray
    vmax: np.ndarray

    @classmethod
    def empty(cls, k: int = 1_000_000) -> L2Moments:
        n = len(L2_ORDER)
        return cls(ChannelMoments.empty(n), {p: BottomKSample.empty(k) for p in L2_ORDER},
                   np.full(n, np.inf), np.full(n, -np.inf))

    def update(self, l2: np.ndarray, seed_text: str) -> None:
        """l2: (4, ...) physical values, NaN invalid, order L2_ORDER."""
        flat = l2.reshape(len(L2_ORDER), -1)
        self.moments.update(flat.T)
        with np.errstate(invalid="ignore"):
            self.vmin = np.fmin(self.vmin, np.nanmin(np.where(np.isfinite(flat), flat, np.inf), 1))
            self.vmax = np.fmax(self.vmax, np.nanmax(np.where(np.isfinite(flat), flat, -np.inf), 1))
        for i, p in enumerate(L2_ORDER):
            self.samples[p].update(flat[i], f"{seed_text}/{p}")

    def merge(self, other: L2Moments) -> None:
        self.moments.merge(other.moments)
        for p in L2_ORDER:
            self.samples[p].merge(other.samples[p])
        self.vmin = np.fmin(self.vmin, other.vmin)
        self.vmax = np.fmax(self.vmax, other.vmax)


@dataclasses.dataclass
class DatasetStats:
    """Everything the shards and the loader need to normalise and to undo it."""

    l1: ChannelMoments  # of log(clamp(radiance, 1))
    l2: L2Moments
    wavelength: np.ndarray  # (C,) mean nominal wavelength, nm
    granules: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def empty(cls, channels: int, k: int = 1_000_000) -> DatasetStats:
        return cls(ChannelMoments.empty(channels), L2Moments.empty(k), np.zeros(channels), [])

    def merge(self, other: DatasetStats) -> None:
        total = len(self.granules) + len(other.granules)
        if total:
            self.wavelength = (self.wavelength * len(self.granules)
                               + other.wavelength * len(other.granules)) / total
        self.l1.merge(other.l1)
        self.l2.merge(other.l2)
        self.granules = sorted(self.granules + other.granules)

    def to_json(self) -> dict:
        """The stats file: normalisation spectra and the L2 transform parameters."""
        l1_std = self.l1.std
        out = {
            "format": "tempo-vae-stats/1",
            "granules": self.granules,
            "l1": {
                "transform": f"clip((log(max(radiance, {LOG_CLAMP_MIN})) - mean) / std, "
                             f"-{Z_CLIP}, {Z_CLIP})",
                "mean": self.l1.mean.tolist(),
                "std": np.maximum(l1_std, 1e-6).tolist(),
                "count": self.l1.count.tolist(),
                "m2": self.l1.m2.tolist(),
                "wavelength_nm": self.wavelength.tolist(),
            },
            "l2": {},
        }
        l2_std = self.l2.moments.std
        for i, p in enumerate(L2_ORDER):
            s = self.l2.samples[p]
            n = int(self.l2.moments.count[i])
            if s.values.size:
                med = float(np.median(s.values))
                mad = float(np.median(np.abs(s.values - med)))
            else:
                med, mad = float("nan"), float("nan")
            out["l2"][p] = {
                "count": n, "mean": float(self.l2.moments.mean[i]) if n else float("nan"),
                "std": float(l2_std[i]) if n else float("nan"),
                "m2": float(self.l2.moments.m2[i]),
                "min": float(self.l2.vmin[i]) if n else float("nan"),
                "max": float(self.l2.vmax[i]) if n else float("nan"),
                "median": med, "mad": mad, "median_mad_exact": bool(s.exact),
                "sample_size": int(s.values.size),
            }
        return out

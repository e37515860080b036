"""The shard sample format, shared by the writers, ``inspect_shards`` and the loader.

A sample is a group of tar members with one key (``<granule>_r<row>_c<col>``):

    <key>.l1.npy   float16 (C, H, W)  normalised radiance, clip((log(max(I,1)) - mean)/std, +-10)
    <key>.l2.npy   float32 (4, H, W)  NO2, O3TOT, HCHO, CLDO4 in physical units, NaN = invalid
    <key>.geo.npy  float32 (4, H, W)  latitude, longitude, solar and viewing zenith angle (deg)
    <key>.json     granule, time, tile position, validity counts

float16 keeps the normalised radiance to within half a unit in the last place:
|error| <= 2**-11 * |z| (<= 0.0049 at the clip limit |z| = 10, <= 0.0015 for |z| < 3),
which in physical units is a relative radiance error of std_c * |error| per channel.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np

L1_KEY, L2_KEY, GEO_KEY, META_KEY = "l1.npy", "l2.npy", "geo.npy", "json"
SAMPLE_KEYS = (L1_KEY, L2_KEY, GEO_KEY, META_KEY)
GEO_ORDER = ("latitude", "longitude", "sza", "vza")
L1_DTYPE, L2_DTYPE, GEO_DTYPE = np.float16, np.float32, np.float32
FLOAT16_REL_ERROR = 2.0**-11


class SampleError(ValueError):
    """A sample that cannot be decoded; the message names the shard and key."""

    def __init__(self, message: str, reason: str = "bad_sample"):
        super().__init__(message)
        self.reason = reason


class ShardError(SampleError):
    """A shard that cannot be read on (truncated, not a tar)."""

    def __init__(self, message: str):
        super().__init__(message, "unreadable_shard")


def iter_tar(path: str):
    """Yield raw samples ``{"__key__": key, ext: bytearray, ...}`` of a tar shard in file
    order, reading each member once into a writable buffer (no further copies). Members
    are grouped by key, the file name up to its first '.'."""
    cur: dict = {}
    key = None
    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, _, ext = base.partition(".")
                if cur and cur["__key__"] != key:
                    yield cur
                    cur = {}
                cur["__key__"] = key
                buf = bytearray(member.size)
                f = tf.extractfile(member)
                if f.readinto(buf) != member.size:
                    raise EOFError(f"member {member.name} is short")
                cur[ext] = buf
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"{path}: unreadable tar shard after key '{key}' ({e})") from None
    if cur:
        yield cur


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def npy_array(data: bytes | bytearray | memoryview, where: str = "") -> np.ndarray:
    """Decode .npy bytes without copying the payload (the result views ``data``)."""
    try:
        f = io.BytesIO(data)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        count = int(np.prod(shape)) if shape else 1
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=f.tell())
    except Exception as e:  # numpy raises several types for bad headers
        raise SampleError(f"{where}: not a valid .npy array ({e})", "bad_array") from None
    return arr.reshape(shape, order="F" if fortran else "C")


def encode(key: str, l1: np.ndarray, l2: np.ndarray, geo: np.ndarray, meta: dict) -> dict:
    return {
        "__key__": key,
        L1_KEY: npy_bytes(l1.astype(L1_DTYPE, copy=False)),
        L2_KEY: npy_bytes(l2.astype(L2_DTYPE, copy=False)),
        GEO_KEY: npy_bytes(geo.astype(GEO_DTYPE, copy=False)),
        META_KEY: json.dumps(meta, sort_keys=True).encode(),
    }


def decode(sample: dict, where: str = "") -> dict:
    """Raw tar members -> arrays, checking presence, dtypes and shapes."""
    key = sample.get("__key__", "?")
    here = f"{where} sample '{key}'"
    missing = [k for k in SAMPLE_KEYS if k not in sample]
    if missing:
        raise SampleError(f"{here}: missing members {missing}", "missing_members")
    l1 = npy_array(sample[L1_KEY], f"{here} {L1_KEY}")
    l2 = npy_array(sample[L2_KEY], f"{here} {L2_KEY}")
    geo = npy_array(sample[GEO_KEY], f"{here} {GEO_KEY}")
    if l1.ndim != 3 or l1.dtype != L1_DTYPE:
        raise SampleError(f"{here}: l1 has shape {l1.shape} dtype {l1.dtype}, want (C,H,W) "
                          "float16", "bad_array")
    if l2.shape != (4,) + l1.shape[1:] or l2.dtype != L2_DTYPE:
        raise SampleError(f"{here}: l2 has shape {l2.shape} dtype {l2.dtype}, want "
                          f"{(4,) + l1.shape[1:]} float32", "bad_array")
    if geo.shape != (4,) + l1.shape[1:]:
        raise SampleError(f"{here}: geo has shape {geo.shape}, want {(4,) + l1.shape[1:]}",
                          "bad_array")
    try:
        meta = json.loads(bytes(sample[META_KEY]))
    except ValueError as e:
        raise SampleError(f"{here}: json member is not valid JSON ({e})", "bad_json") from None
    return {"__key__": key, "l1": l1, "l2": l2, "geo": geo, "meta": meta}

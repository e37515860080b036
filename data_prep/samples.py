"""The shard sample format, shared by the writers, ``inspect_shards`` and the loader.

A sample is a group of tar members with one key (``<granule>_r<row>_c<col>``):

    <key>.l1.npy   float16 (C, H, W)  normalised radiance, clip((log(max(I,1)) - mean)/std, +-10)
    <key>.l2.npy   float32 (4, H, W)  NO2, O3TOT, HCHO, CLDO4 in physical units, NaN = invalid
    <key>.geo.npy  float32 (4, H, W)  latitude, longitude, solar and viewing zenith angle (deg)
    <key>.json     granule, time (UTC), mirror_step, tile position, validity counts
    <key>.l1_sigma.npy  float16 (C, H, W), optional (``make_shards --radiance-error``): the
                   RAD file's 1-sigma ``radiance_error`` in normalised units,
                   err / (I * std_c); 65504 (float16 max) where unknown. Same bytes as l1
                   (C*H*W*2: 8.4 MB for a 1028x64x64 tile).

Keys are ``[A-Za-z0-9_-]+``: tar members are grouped into samples at the first '.' of
their base name (WebDataset's rule), so a key holding a '.' would split a sample
(``safe_key`` makes any name into a valid key; readers reject invalid keys, naming them).

float16 keeps the normalised radiance to within half a unit in the last place:
|error| <= 2**-11 * |z| (<= 0.0049 at the clip limit |z| = 10, <= 0.0015 for |z| < 3),
which in physical units is a relative radiance error of std_c * |error| per channel.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile

import numpy as np

from data_prep.shard_format import GEO_ORDER  # noqa: F401  (re-exported)

L1_KEY, L2_KEY, GEO_KEY, META_KEY = "l1.npy", "l2.npy", "geo.npy", "json"
SAMPLE_KEYS = (L1_KEY, L2_KEY, GEO_KEY, META_KEY)
L1_DTYPE, L2_DTYPE, GEO_DTYPE = np.float16, np.float32, np.float32
SIGMA_KEY = "l1_sigma.npy"
MEMBER_NAMES = SAMPLE_KEYS + (SIGMA_KEY,)
SIGMA_UNKNOWN = 65504.0  # float16 max: no error estimate for this value
_KEY_RE = re.compile(r"[A-Za-z0-9_\-]+")


def safe_key(name: str) -> str:
    """A sample key the tar format can hold for ``name``: every character outside
    ``[A-Za-z0-9_-]`` (dots above all) becomes '_'. ``granule_2024.06.01_S012G01`` ->
    ``granule_2024_06_01_S012G01``."""
    out = re.sub(r"[^A-Za-z0-9_\-]", "_", name)
    if not out:
        raise ValueError(f"cannot make a sample key from {name!r}")
    return out


def check_key(key: str, where: str = "") -> str:
    """Raise SampleError naming ``key`` unless it is a valid sample key."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise SampleError(f"{where}: invalid sample key {key!r} (keys are [A-Za-z0-9_-]+; a "
                          "'.' would split the sample's members)", "bad_key")
    return key
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


class LazyMember:
    """A large tar member left on disk: where it is, plus its first bytes (the .npy
    header). ``read_into`` reads the payload straight into a caller's buffer."""

    __slots__ = ("path", "offset", "size", "head")

    def __init__(self, path: str, offset: int, size: int, head: bytes):
        self.path, self.offset, self.size, self.head = path, offset, size, head

    def __len__(self) -> int:
        return self.size

    def read_into(self, dst: memoryview, skip: int, where: str) -> None:
        """Read ``len(dst)`` bytes starting ``skip`` bytes into the member."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            n = os.preadv(fd, [dst], self.offset + skip)
        finally:
            os.close(fd)
        if n != len(dst):
            raise ShardError(f"{where}: member cut short ({n} of {len(dst)} bytes)")


def iter_tar(path: str, lazy_min: int | None = None):
    """Yield raw samples ``{"__key__": key, ext: bytearray, ...}`` of a tar shard in file
    order. Each member is read once, straight from the file into a writable buffer; with
    ``lazy_min``, members of at least that many bytes are returned as ``LazyMember``
    (read later, directly into their final place). Members are grouped by key, the file
    name up to its first '.'."""
    cur: dict = {}
    key = None
    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, _, ext = base.partition(".")
                if ext not in MEMBER_NAMES or not _KEY_RE.fullmatch(key):
                    err = ShardError(
                        f"{path}: member '{member.name}' is not <key>.<one of "
                        f"{', '.join(MEMBER_NAMES)}> with a key of [A-Za-z0-9_-]; a sample "
                        f"key holding '.' splits its sample (key read: '{key}')")
                    err.reason = "bad_key"
                    raise err
                if cur and cur["__key__"] != key:
                    yield cur
                    cur = {}
                cur["__key__"] = key
                fh.seek(member.offset_data)
                if lazy_min is not None and member.size >= lazy_min:
                    head = fh.read(min(member.size, 512))
                    cur[ext] = LazyMember(path, member.offset_data, member.size, head)
                    continue
                buf = bytearray(member.size)
                if fh.readinto(buf) != member.size:
                    raise EOFError(f"member {member.name} is cut short")
                cur[ext] = buf
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"{path}: unreadable tar shard after key '{key}' ({e})") from None
    if cur:
        yield cur


class LazyArray:
    """A .npy array whose payload is still in its shard (see ``LazyMember``)."""

    __slots__ = ("member", "shape", "dtype", "payload_offset", "ndim")

    def __init__(self, member: LazyMember, shape, dtype, payload_offset: int):
        self.member, self.shape, self.dtype = member, tuple(shape), dtype
        self.payload_offset, self.ndim = payload_offset, len(shape)

    def read_into(self, dst: np.ndarray, where: str = "") -> None:
        if dst.shape != self.shape or dst.dtype != self.dtype or not dst.flags.c_contiguous:
            raise ValueError(f"{where}: destination {dst.shape} {dst.dtype} does not fit")
        self.member.read_into(memoryview(dst).cast("B"), self.payload_offset, where)


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[tuple, bytes] = {}


def npy_buffer(shape: tuple[int, ...], dtype) -> tuple[memoryview, np.ndarray]:
    """An unfilled .npy file in memory: ``(data, payload)``, ``data`` its bytes (a
    memoryview, as a shard writer takes bytes), ``payload`` a writable C-order array of
    ``shape`` and ``dtype`` over ``data`` after the header. Once ``payload`` is filled,
    ``data`` equals ``npy_bytes(payload)``: the array is written in place, with no copy
    into a file buffer (and no zeroing of the payload first)."""
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    head = _NPY_HEADERS.get((shape, dtype.str))
    if head is None:  # numpy's own header for the shape (written once per shape)
        full = npy_bytes(np.broadcast_to(np.zeros((), dtype), shape))
        head = _NPY_HEADERS[shape, dtype.str] = full[:len(full) - dtype.itemsize *
                                                     int(np.prod(shape))]
    data = np.empty(len(head) + dtype.itemsize * int(np.prod(shape)), np.uint8)
    data[:len(head)] = np.frombuffer(head, np.uint8)
    return memoryview(data), data[len(head):].view(dtype).reshape(shape)


_HEADER_CACHE: dict[bytes, tuple] = {}


def _npy_header(data, where: str) -> tuple:
    """(shape, fortran_order, dtype, payload offset) of .npy bytes; headers repeat across
    samples, so parsed ones are cached by their raw bytes."""
    head = bytes(data[:16])
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise SampleError(f"{where}: not a valid .npy array (bad magic)", "bad_array")
    major = head[6]
    hlen = int.from_bytes(head[8:10], "little") if major == 1 else \
        int.from_bytes(head[8:12], "little")
    start = 10 if major == 1 else 12
    raw = bytes(data[:start + hlen])
    hit = _HEADER_CACHE.get(raw)
    if hit is None:
        try:
            f = io.BytesIO(raw)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except Exception as e:  # numpy raises several types for bad headers
            raise SampleError(f"{where}: not a valid .npy array ({e})", "bad_array") from None
        if dtype.hasobject:
            raise SampleError(f"{where}: object arrays are not allowed", "bad_array")
        hit = (shape, fortran, dtype, start + hlen)
        if len(_HEADER_CACHE) < 256:
            _HEADER_CACHE[raw] = hit
    return hit


def npy_array(data, where: str = ""):
    """Decode .npy bytes without copying the payload (the result views ``data``); a
    ``LazyMember`` gives a ``LazyArray`` (header checked, payload not read)."""
    if isinstance(data, LazyMember):
        shape, fortran, dtype, offset = _npy_header(data.head, where)
        count = int(np.prod(shape)) if shape else 1
        if fortran or data.size - offset != count * dtype.itemsize:
            raise SampleError(f"{where}: not a valid .npy array (payload of "
                              f"{data.size - offset} bytes for shape {shape} {dtype})",
                              "bad_array")
        return LazyArray(data, shape, dtype, offset)
    shape, fortran, dtype, offset = _npy_header(data, where)
    count = int(np.prod(shape)) if shape else 1
    if len(data) - offset != count * dtype.itemsize:
        raise SampleError(f"{where}: not a valid .npy array (payload of {len(data) - offset} "
                          f"bytes for shape {shape} {dtype})", "bad_array")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape, order="F" if fortran else "C")


def encode(key: str, l1: np.ndarray | bytearray, l2: np.ndarray, geo: np.ndarray,
           meta: dict) -> dict:
    """A sample dict for a shard writer; raises SampleError for a key the format cannot
    hold (see ``safe_key``). ``l1`` may be its .npy bytes already (``npy_buffer``)."""
    check_key(key, "encode")
    return {
        "__key__": key,
        L1_KEY: l1 if isinstance(l1, memoryview) else npy_bytes(l1.astype(L1_DTYPE, copy=False)),
        L2_KEY: npy_bytes(l2.astype(L2_DTYPE, copy=False)),
        GEO_KEY: npy_bytes(geo.astype(GEO_DTYPE, copy=False)),
        META_KEY: json.dumps(meta, sort_keys=True).encode(),
    }


def decode(sample: dict, where: str = "") -> dict:
    """Raw tar members -> arrays, checking presence, dtypes and shapes."""
    key = sample.get("__key__", "?")
    here = f"{where} sample '{key}'"
    check_key(key, where)
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

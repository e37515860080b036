"""TEMPO file layout: names, product definitions, quality rules and netCDF readers.

Everything that knows where a variable lives in a TEMPO file, how it is encoded and which
quality flags invalidate it is here, so that the other steps (synthesis, shard making,
inference) agree on one layout. Facts and their sources: DESIGN.md section 2 (the public
TEMPO processing code Smithsonian/tempo_sdpc, QDOAS's TEMPO reader, real files).

File names: ``TEMPO_<PROD>_<LEVEL>_V0x_YYYYMMDDTHHMMSSZ_SsssGgg.nc`` (``.nc4`` accepted).
An L2 file pairs with the RAD L1 file of the same timestamp, scan and granule.

Decoding. Every variable is read through one function, :func:`read_field`, which relies on
netCDF4-python's CF decoding (``set_auto_maskandscale(True)`` + ``set_always_mask(True)``):
``scale_factor``/``add_offset`` are applied, and values equal to ``_FillValue`` or
``missing_value``, outside ``valid_min``/``valid_max``/``valid_range``, or (for variables
without ``_FillValue``) equal to the netCDF default fill of their type
(``netCDF4.default_fillvals``, 9.969e36 for floats, 65535 for uint16) are masked. On top of
that, NaN and Inf are invalid. Readers turn invalid values into NaN and count them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
from collections.abc import Iterable

import numpy as np

# the channel order of every l2 array written: the shard-folder contract's (re-exported)
from data_prep.shard_format import L2_ORDER  # noqa: F401

# Fill values as NASA writes them (DESIGN.md section 2). Readers never test against these:
# they honour each variable's own attributes. The synthetic generator writes them.
FLOAT_FILL = -1.0e30  # NO2 / HCHO L2 values, L2 geolocation
INT16_FILL = -9999  # NO2 / HCHO main_data_quality_flag, CLDO4 processing_quality_flag
NC_DEFAULT_FILL = 9.969209968386869e36  # netCDF4.default_fillvals["f4"] and ["f8"]
RAD_FILL = -NC_DEFAULT_FILL  # RAD radiance / radiance_error _FillValue
GEO_FILL = NC_DEFAULT_FILL  # RAD per-band geolocation _FillValue, also on invalid pixels
O3TOT_FILL = -1.2676506e30  # O3TOT column_amount_o3 (float32)
CLDO4_FILL = -9999.0  # CLDO4 cloud_fraction (float32)
PQF_FILL = -32767  # RAD pixel_quality_flag (int16)

TIME_EPOCH = dt.datetime(1980, 1, 6, tzinfo=dt.UTC)  # TEMPO time reference (GPS epoch)
# UTC dates from which GPS time (TEMPO's ``time``, counted with leap seconds from
# 1980-01-06) runs ahead of UTC by the given number of seconds (IERS Bulletin C). A real
# file's ``time_coverage_start_since_epoch`` exceeds the plain UTC difference by 18 s.
LEAP_SECONDS = tuple((dt.datetime(*d, tzinfo=dt.UTC), n) for d, n in (
    ((1981, 7, 1), 1), ((1982, 7, 1), 2), ((1983, 7, 1), 3), ((1985, 7, 1), 4),
    ((1988, 1, 1), 5), ((1990, 1, 1), 6), ((1991, 1, 1), 7), ((1992, 7, 1), 8),
    ((1993, 7, 1), 9), ((1994, 7, 1), 10), ((1996, 1, 1), 11), ((1997, 7, 1), 12),
    ((1999, 1, 1), 13), ((2006, 1, 1), 14), ((2009, 1, 1), 15), ((2012, 7, 1), 16),
    ((2015, 7, 1), 17), ((2017, 1, 1), 18)))

L1_BAND = "band_290_490_nm"

_NAME_RE = re.compile(
    r"^TEMPO_(?P<product>[A-Z0-9]+)_(?P<level>L[12])_V(?P<version>\d+)_"
    r"(?P<timestamp>\d{8}T\d{6}Z)_S(?P<scan>\d{3})G(?P<granule>\d{2})"
    r"(?P<suffix>[A-Za-z0-9_\-]*)\.nc4?$"
)


class TempoFileError(Exception):
    """A TEMPO file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _int_list(text: str, what: str) -> tuple[int, ...]:
    """'0,3,8-9' -> (0, 3, 8, 9)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise ValueError(f"{what}: {part!r} is not an integer or a range a-b") from None
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class QARule:
    """Which values of an L2 quality flag keep a pixel.

    A pixel passes when ``flag & mask`` is one of ``accept``, where ``mask`` has the listed
    ``bits`` set (``bits=None``: the whole flag value). So ``bits=None, accept=(0,)`` keeps
    flag == 0; ``bits=(0, 3), accept=(0,)`` rejects pixels with bit 0 or bit 3 set and
    ignores every other bit; ``bits=(0, 1, 2), accept=(0,)`` keeps error code 0 of a 3-bit
    field. A flag that is itself missing (its fill, or outside its valid range) fails.
    ``source`` says where the rule comes from.
    """

    variable: str  # path of the flag inside the file, "group/var"
    bits: tuple[int, ...] | None = None
    accept: tuple[int, ...] = (0,)
    source: str = ""

    @property
    def mask(self) -> int:
        return -1 if self.bits is None else sum(1 << b for b in self.bits)

    def passes(self, flag: np.ndarray) -> np.ndarray:
        """Boolean array: which (integer) flag values keep their pixel."""
        f = np.asarray(flag).astype(np.int64) & self.mask
        return np.isin(f, np.asarray(self.accept, np.int64))

    def removed_by(self, flag: np.ndarray) -> dict[str, int]:
        """For failing flag values: how many have each rejecting bit set (bit rules) or
        each rejected value (value rules). Keys ``"bit N"`` or ``"value V"``."""
        f = np.asarray(flag).astype(np.int64)
        if self.bits is None:
            vals, n = np.unique(f, return_counts=True)
            return {f"value {int(v)}": int(c) for v, c in zip(vals, n, strict=True)}
        return {f"bit {b}": int(((f >> b) & 1).sum()) for b in self.bits
                if ((f >> b) & 1).any()}

    def describe(self) -> str:
        where = "flag" if self.bits is None else \
            "flag & bits " + ",".join(str(b) for b in self.bits)
        return f"{self.variable}: keep {where} in {{{','.join(map(str, self.accept))}}}"

    def to_json(self) -> dict:
        return {"variable": self.variable,
                "bits": None if self.bits is None else list(self.bits),
                "accept": list(self.accept), "source": self.source}

    @classmethod
    def from_json(cls, d: dict, default: QARule | None = None, where: str = "") -> QARule:
        """A rule from a JSON object; missing keys come from ``default``."""
        unknown = set(d) - {"variable", "bits", "accept", "source"}
        if unknown:
            raise ValueError(f"{where}: unknown QA rule keys {sorted(unknown)} "
                             "(allowed: variable, bits, accept, source)")
        variable = d.get("variable", default.variable if default else None)
        if not variable:
            raise ValueError(f"{where}: a QA rule needs 'variable' (the flag's path)")
        bits = d["bits"] if "bits" in d else (default.bits if default else None)
        accept = d["accept"] if "accept" in d else ((0,) if "bits" in d or not default
                                                    else default.accept)
        try:
            bits = None if bits is None else tuple(int(b) for b in bits)
            accept = tuple(int(a) for a in accept)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: 'bits' and 'accept' must be lists of integers") from None
        if bits is not None and any(not 0 <= b < 63 for b in bits):
            raise ValueError(f"{where}: bits must be in 0..62")
        return cls(variable, bits, accept, d.get("source", "user rule" if d else ""))

    @classmethod
    def parse(cls, spec: str, default: QARule | None = None, where: str = "") -> QARule | None:
        """Command-line form: ``none`` (no QA), or ``;``-separated items ``bits:LIST``,
        ``accept:LIST``, ``variable:PATH`` with LIST like ``0,3,8-9``. ``bits`` alone means
        accept 0 (none of those bits set); ``accept`` alone tests the whole flag value."""
        spec = spec.strip()
        if spec.lower() == "none":
            return None
        d: dict = {}
        for item in spec.split(";"):
            key, sep, val = item.partition(":")
            key = key.strip()
            if not sep or key not in ("bits", "accept", "variable"):
                raise ValueError(f"{where}: bad QA item {item!r} (want bits:LIST, accept:LIST, "
                                 "variable:PATH or none)")
            d[key] = val.strip() if key == "variable" else list(_int_list(val, where))
        if "accept" in d and "bits" not in d:
            d["bits"] = None
        return cls.from_json(d | {"source": f"--qa {spec}"}, default, where)


_SRC = "DESIGN.md section 2 (tempo_sdpc)"
DEFAULT_QA: dict[str, QARule | None] = {
    # main_data_quality_flag: 0 normal, 1 suspicious, 2 bad; keep normal only.
    "NO2": QARule("product/main_data_quality_flag", None, (0,),
                  f"{_SRC}: main_data_quality_flag 0 normal, 1 suspicious, 2 bad"),
    "HCHO": QARule("product/main_data_quality_flag", None, (0,),
                   f"{_SRC}: main_data_quality_flag 0 normal, 1 suspicious, 2 bad"),
    # quality_flag uint16: bits 0-2 an error code (0 good), higher bits warnings.
    "O3TOT": QARule("product/quality_flag", (0, 1, 2), (0,),
                    f"{_SRC} L1_o3_total: bits 0-2 error code (0 good), bits 6-15 warnings"),
    # processing_quality_flag bitfield: the error bits that concern the fraction. Bits 13
    # (cloud pressure not computed, set on every clear-sky pixel) and 14 concern the cloud
    # pressure; 2, 4, 5, 7, 10, 11, 15 are warnings.
    "CLDO4": QARule("product/processing_quality_flag", (0, 3, 8, 9, 12), (0,),
                    f"{_SRC} L1_cloud_o4: fraction errors 0 geometry, 3 surface input, "
                    "8 466 nm radiance/irradiance, 9 out of range, 12 not computed"),
}


@dataclasses.dataclass(frozen=True)
class L2Product:
    """Where one L2 product lives in its file and which quality rule applies."""

    name: str
    variable: str  # path inside the file, "group/var"
    units: str
    qa: QARule | None  # None: no quality flag (e.g. subsetted files)
    # values that pass QA must lie in this range, else the file is misread (e.g. packed
    # counts without their scale_factor): a generous physical range, not a QA rule
    plausible: tuple[float, float] = (-np.inf, np.inf)


L2_PRODUCTS: dict[str, L2Product] = {
    "NO2": L2Product("NO2", "product/vertical_column_troposphere", "molecules/cm^2",
                     DEFAULT_QA["NO2"], (-1e18, 1e19)),
    "O3TOT": L2Product("O3TOT", "product/column_amount_o3", "DU", DEFAULT_QA["O3TOT"],
                       (50.0, 1000.0)),
    "HCHO": L2Product("HCHO", "product/vertical_column", "molecules/cm^2", DEFAULT_QA["HCHO"],
                      (-1e19, 1e19)),
    "CLDO4": L2Product("CLDO4", "product/cloud_fraction", "1", DEFAULT_QA["CLDO4"],
                       (-0.5, 1.5)),
}


def qa_rules(overrides: dict | None = None, where: str = "QA rules") -> dict[str, QARule | None]:
    """The default rules with ``overrides`` applied: product -> rule JSON object (keys
    merged into the default), ``None`` (no QA) or a command-line spec string."""
    rules = dict(DEFAULT_QA)
    for p, v in (overrides or {}).items():
        if p not in L2_PRODUCTS:
            raise ValueError(f"{where}: unknown product {p!r} (one of {', '.join(L2_ORDER)})")
        if v is None:
            rules[p] = None
        elif isinstance(v, str):
            rules[p] = QARule.parse(v, DEFAULT_QA[p], f"{where} {p}")
        elif isinstance(v, dict):
            rules[p] = QARule.from_json(v, DEFAULT_QA[p], f"{where} {p}")
        else:
            raise ValueError(f"{where} {p}: a rule is an object, a spec string or null")
    return rules


def qa_rules_json(rules: dict[str, QARule | None]) -> dict:
    return {p: (r.to_json() if r else None) for p, r in rules.items()}


@dataclasses.dataclass(frozen=True, order=True)
class GranuleId:
    """Identity shared by all files of one granule."""

    timestamp: str  # YYYYMMDDTHHMMSSZ
    scan: int
    granule: int

    @property
    def key(self) -> str:
        return f"{self.timestamp}_S{self.scan:03d}G{self.granule:02d}"

    @property
    def datetime(self) -> dt.datetime:
        return dt.datetime.strptime(self.timestamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)


@dataclasses.dataclass(frozen=True)
class TempoName:
    product: str
    level: str
    version: int
    gid: GranuleId
    suffix: str = ""


def parse_name(path: str | os.PathLike) -> TempoName | None:
    """Parse a TEMPO granule file name; None for anything else (IRR files included)."""
    m = _NAME_RE.match(os.path.basename(str(path)))
    if not m:
        return None
    return TempoName(m["product"], m["level"], int(m["version"]),
                     GranuleId(m["timestamp"], int(m["scan"]), int(m["granule"])), m["suffix"])


def file_name(product: str, gid: GranuleId, version: int = 3, ext: str = "nc") -> str:
    level = "L1" if product in ("RAD", "IRR") else "L2"
    return f"TEMPO_{product}_{level}_V{version:02d}_{gid.key}.{ext}"


@dataclasses.dataclass
class GranuleFiles:
    """The files found for one granule: its RAD file and any L2 products."""

    gid: GranuleId
    rad: str | None = None
    l2: dict[str, str] = dataclasses.field(default_factory=dict)


def discover(paths: Iterable[str]) -> tuple[dict[GranuleId, GranuleFiles], list[tuple[str, str]]]:
    """Group files by granule. Returns (granules, ignored) with ignored = [(path, reason)]."""
    granules: dict[GranuleId, GranuleFiles] = {}
    ignored: list[tuple[str, str]] = []
    for path in sorted(paths):
        name = parse_name(path)
        if name is None:
            ignored.append((path, "not a TEMPO granule file name"))
            continue
        g = granules.setdefault(name.gid, GranuleFiles(name.gid))
        if name.product == "RAD":
            if g.rad is not None:
                ignored.append((path, f"second RAD file for granule {name.gid.key} ({g.rad})"))
                continue
            g.rad = path
        elif name.product in L2_PRODUCTS:
            if name.product in g.l2:
                ignored.append((path, f"second {name.product} file for granule {name.gid.key}"))
                continue
            g.l2[name.product] = path
        else:
            ignored.append((path, f"product {name.product} is not used"))
    return granules, ignored


def find_files(root: str) -> list[str]:
    """Every file below root (recursively), sorted."""
    out = []
    for dirpath, _, files in os.walk(root):
        out.extend(os.path.join(dirpath, f) for f in files if not f.startswith("."))
    return sorted(out)


# ----------------------------------------------------------------------------- time


def utc_to_tempo_time(t: dt.datetime) -> float:
    """UTC datetime -> TEMPO ``time``: seconds since 1980-01-06T00:00:00Z counted with leap
    seconds (GPS time; 18 s more than the plain UTC difference from 2017 on)."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    leap = 0
    for start, n in LEAP_SECONDS:
        if t >= start:
            leap = n
    return (t - TIME_EPOCH).total_seconds() + leap


def tempo_time_to_utc(seconds: float) -> dt.datetime | None:
    """TEMPO ``time`` (seconds since 1980-01-06, leap seconds counted) -> UTC datetime;
    None for NaN. Inverse of :func:`utc_to_tempo_time`."""
    if not np.isfinite(seconds):
        return None
    leap = 0
    for start, n in LEAP_SECONDS:
        if seconds >= (start - TIME_EPOCH).total_seconds() + n:
            leap = n
    return TIME_EPOCH + dt.timedelta(seconds=float(seconds) - leap)


seconds_since_epoch = utc_to_tempo_time  # the name earlier callers use


# ----------------------------------------------------------------------------- readers


def _open(path: str):
    import netCDF4

    if not os.path.exists(path):
        raise TempoFileError(path, "file does not exist")
    try:
        ds = netCDF4.Dataset(path, "r")
    except OSError as e:
        raise TempoFileError(path, f"not a readable netCDF4 file ({e})") from None
    # CF decoding by netCDF4-python for every variable (see the module docstring)
    ds.set_auto_maskandscale(True)
    ds.set_always_mask(True)
    return ds


def _var(ds, path: str, where: str):
    group = ds
    *groups, name = path.split("/")
    for gname in groups:
        if gname not in group.groups:
            raise TempoFileError(where, f"missing group '{gname}' (looking for '{path}')")
        group = group.groups[gname]
    if name not in group.variables:
        raise TempoFileError(where, f"missing variable '{path}'")
    return group.variables[name]


def _has(ds, path: str) -> bool:
    try:
        _var(ds, path, "")
        return True
    except TempoFileError:
        return False


# attributes whose decoding only netCDF4's masked path does (scale, offset, ranges, ...)
_CF_DECODING_ATTRS = frozenset(("scale_factor", "add_offset", "missing_value", "valid_min",
                                "valid_max", "valid_range", "_Unsigned"))
_MASK_BLOCK = 1 << 22  # values per block when invalid values are found without netCDF4


def _plain_fill(v):
    """The one value that marks a missing value of ``v``, when netCDF4's CF decoding of
    ``v`` reduces to "equal to that value" (a numeric variable without scale, offset,
    ``missing_value``, valid range or ``_Unsigned``; its ``_FillValue`` if that holds exactly
    in the variable's type, else for types wider than a byte the netCDF default fill),
    as netCDF4-python's ``_toma`` masks it. None for every other variable: those are
    decoded by netCDF4 itself."""
    if v.dtype.kind not in "fiu" or not _CF_DECODING_ATTRS.isdisjoint(v.ncattrs()):
        return None
    if "_FillValue" in v.ncattrs():
        fill = np.asarray(v.getncattr("_FillValue"))
        try:
            cast = fill.astype(v.dtype)
        except (TypeError, ValueError):
            return None
        # an inexact or NaN fill: netCDF4 decodes (it may ignore the attribute)
        return cast.reshape(()) if fill.size == 1 and bool(cast == fill) else None
    if v.dtype.itemsize == 1:  # byte types: netCDF4 also looks at the no_fill setting
        return None
    import netCDF4

    return np.asarray(netCDF4.default_fillvals[v.dtype.str[1:]], v.dtype).reshape(())


def _plain_invalid(data: np.ndarray, fill, extra_fill) -> np.ndarray:
    """Boolean array: ``data`` equal to ``fill`` or ``extra_fill``, or not finite; computed
    in blocks of ``_MASK_BLOCK`` values (bounded temporaries, cache-sized passes)."""
    invalid = np.empty(data.shape, bool)
    flat, out = data.reshape(-1), invalid.reshape(-1)
    tmp = np.empty(min(flat.size, _MASK_BLOCK), bool)
    for i in range(0, flat.size, _MASK_BLOCK):
        d, inv = flat[i:i + _MASK_BLOCK], out[i:i + _MASK_BLOCK]
        t = tmp[:d.size]
        np.equal(d, fill, out=inv)
        if data.dtype.kind == "f":
            np.logical_or(inv, np.logical_not(np.isfinite(d, out=t), out=t), out=inv)
        if extra_fill is not None:
            np.logical_or(inv, np.equal(d, extra_fill, out=t), out=inv)
    return invalid


def read_field(ds, path: str, where: str, rows: slice | None = None,
               dtype=np.float64, extra_fill: float | None = None, mark_invalid: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
    """Read and decode one variable: ``(values, invalid)``.

    The one decoding path for every variable read here (radiance, geolocation, angles,
    time, L2 values, flags). netCDF4-python applies ``scale_factor``/``add_offset`` and
    masks ``_FillValue``, ``missing_value``, values outside ``valid_min``/``valid_max``/
    ``valid_range`` and, without ``_FillValue``, the netCDF default fill of the type; NaN
    and Inf are also invalid, as is ``extra_fill`` when given. A variable whose decoding
    is only its fill value (radiance, flags and geolocation in NASA files) is read
    without masked arrays and its fill found here, by netCDF4's rule (:func:`_plain_fill`):
    the same values and the same invalid set, without the masked copies. ``values`` has
    ``dtype`` (None: the variable's own type);
    for a float dtype invalid values are NaN, for an integer dtype they hold 0 (use
    ``invalid``); ``mark_invalid=False`` leaves them as read, for a caller that marks a
    larger set itself. ``rows`` selects along the first dimension. Raises TempoFileError naming
    the file and variable when the data cannot be read (e.g. a truncated file).
    """
    v = _var(ds, path, where)
    fill = _plain_fill(v)
    v.set_auto_maskandscale(fill is None)
    v.set_always_mask(fill is None)
    try:
        a = v[rows] if rows is not None else v[...]
    except (OSError, RuntimeError, IndexError, ValueError) as e:
        raise TempoFileError(where, f"cannot read '{path}' ({e}); the file may be "
                                    "truncated") from None
    if fill is None:
        data = np.ma.getdata(a)
        invalid = np.ma.getmaskarray(a)
        if data.dtype.kind == "f":
            invalid = invalid | ~np.isfinite(data)
        if extra_fill is not None:
            invalid = invalid | (data == extra_fill)
    else:
        data = np.asarray(a)
        invalid = _plain_invalid(data, fill, extra_fill)
    dtype = data.dtype if dtype is None else np.dtype(dtype)
    if dtype.kind != "f" and data.dtype.kind == "f":
        data = np.where(invalid, 0.0, data)  # fill before a float -> int cast
    out = data.astype(dtype, copy=False)
    if mark_invalid and invalid.any():
        np.copyto(out, np.nan if dtype.kind == "f" else 0, where=invalid)
    return out, invalid


def _read(ds, path: str, where: str) -> np.ndarray:
    """Raw values without decoding (coordinates such as ``mirror_step``)."""
    v = _var(ds, path, where)
    try:
        return np.ma.getdata(v[...])
    except (OSError, RuntimeError, IndexError) as e:
        raise TempoFileError(where, f"cannot read '{path}' ({e}); the file may be "
                                    "truncated") from None


def _mirror_steps(ds, n: int, where: str) -> np.ndarray:
    """The root ``mirror_step`` coordinate (absolute scan positions), or 0..n-1 when a
    file has none."""
    if "mirror_step" not in ds.variables:
        return np.arange(n, dtype=np.int64)
    ms, bad = read_field(ds, "mirror_step", where, dtype=np.int64)
    if ms.shape != (n,):
        raise TempoFileError(where, f"'mirror_step' has shape {ms.shape}, expected ({n},)")
    if bad.any():  # a cut-down file whose coordinate holds fill: positions are unknown
        return np.arange(n, dtype=np.int64)
    return ms


def _read_rows(ds, path: str, where: str, m: int, rows_per_read: int,
               extra_fill: float | None, mark_invalid: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
    """``read_field`` of a (mirror_step, ...) variable as float32: in one read when its
    decoding is only its fill value (no masked copies, no copy into a second array), else
    ``rows_per_read`` mirror steps at a time (netCDF4's masked temporaries stay small)."""
    v = _var(ds, path, where)
    if _plain_fill(v) is not None:
        return read_field(ds, path, where, None, np.float32, extra_fill, mark_invalid)
    out = np.empty(v.shape, np.float32)
    invalid = np.empty(v.shape, bool)
    for r0 in range(0, m, rows_per_read):
        rows = slice(r0, min(m, r0 + rows_per_read))
        out[rows], invalid[rows] = read_field(ds, path, where, rows, np.float32, extra_fill,
                                              mark_invalid)
    return out, invalid


GEO_VARIABLES = ("latitude", "longitude", "solar_zenith_angle", "viewing_zenith_angle",
                 "solar_azimuth_angle", "viewing_azimuth_angle")


@dataclasses.dataclass
class L1Granule:
    """Radiance of one band on the (mirror_step, xtrack) grid, NaN where invalid."""

    path: str
    radiance: np.ndarray  # (M, X, C) float32 photons s^-1 cm^-2 nm^-1 sr^-1
    wavelength: np.ndarray  # (X, C) nm (nominal_wavelength)
    latitude: np.ndarray  # (M, X) degrees_north
    longitude: np.ndarray  # (M, X) degrees_east
    sza: np.ndarray  # (M, X) degrees
    vza: np.ndarray  # (M, X) degrees
    time: np.ndarray  # (M,) TEMPO time: seconds since 1980-01-06, leap seconds counted
    n_invalid: int  # radiance values that were fill, NaN, Inf or flagged
    mirror_step: np.ndarray | None = None  # (M,) int64 absolute scan positions
    radiance_error: np.ndarray | None = None  # (M, X, C) float32 1-sigma, radiance units
    n_invalid_geolocation: int = 0  # (M, X) pixels with any invalid geolocation value
    saa: np.ndarray | None = None  # (M, X) solar azimuth, degrees (NaN if absent)
    vaa: np.ndarray | None = None  # (M, X) viewing azimuth, degrees (NaN if absent)


def read_l1(path: str, band: str = L1_BAND, fill: float | None = None,
            quality_mask: int = 0xFFFF, radiance_error: bool = False,
            rows_per_read: int = 16) -> L1Granule:
    """Read a RAD L1 file (layout: DESIGN.md section 2).

    Radiance values that are invalid by the variable's own attributes (``_FillValue``
    -9.969e36 in real files; see :func:`read_field`), non-finite, equal to ``fill`` (an
    extra value, None for none) or flagged (``pixel_quality_flag & quality_mask``, a missing
    flag counts as flagged) become NaN and are counted. Small or negative radiances (noise
    at the darkest channels) are data and are kept. Per-band geolocation that is invalid
    (``_FillValue`` +9.969e36, also written on pixels whose geolocation is invalid) becomes
    NaN. ``radiance_error=True`` also reads ``radiance_error`` (NaN where the radiance is).
    The flags are read ``rows_per_read`` mirror steps at a time, and so is the radiance
    when netCDF4 must decode it (scale, offset, ranges), to bound memory; radiance whose
    decoding is its fill value only (NASA's) is read in one piece, without a second copy.
    Raises TempoFileError for a missing band, variable or inconsistent shapes.
    """
    ds = _open(path)
    try:
        if band not in ds.groups:
            raise TempoFileError(path, f"missing group '{band}' (groups: {sorted(ds.groups)})")
        rv = _var(ds, f"{band}/radiance", path)
        if rv.ndim != 3:
            raise TempoFileError(path, f"'{band}/radiance' has shape {rv.shape}, expected "
                                       "(mirror_step, xtrack, spectral_channel)")
        m, x, c = (int(n) for n in rv.shape)
        wl, _ = read_field(ds, f"{band}/nominal_wavelength", path, dtype=np.float32)
        if wl.shape != (x, c):
            raise TempoFileError(path, f"nominal_wavelength shape {wl.shape} does not match "
                                       f"radiance {rv.shape}")
        pqf_var = _var(ds, f"{band}/pixel_quality_flag", path)
        if tuple(pqf_var.shape) not in ((m, x), (m, x, c)):
            raise TempoFileError(path, f"pixel_quality_flag shape {pqf_var.shape} does not "
                                       f"match radiance {rv.shape}")
        step = max(1, rows_per_read)
        # invalid radiance is marked NaN below, with the flagged values
        rad, bad = _read_rows(ds, f"{band}/radiance", path, m, step, fill, False)
        for r0 in range(0, m, step):
            rows = slice(r0, min(m, r0 + step))
            # the flag's own integer type (an int64 copy of a granule's flags costs more
            # than the test), viewed unsigned so that every bit of the mask is testable
            pqf, flagged = read_field(ds, f"{band}/pixel_quality_flag", path, rows, None,
                                      mark_invalid=False)
            if pqf.dtype.kind == "i":
                pqf = pqf.view(pqf.dtype.str.replace("i", "u"))
            if quality_mask & ((1 << 8 * pqf.itemsize) - 1) == (1 << 8 * pqf.itemsize) - 1:
                set_bits = pqf != 0  # the mask holds every bit of the flag
            else:
                set_bits = (pqf & quality_mask) != 0
            flagged |= set_bits  # a missing flag (its fill) counts as flagged
            b = bad[rows]
            b |= flagged if flagged.ndim == 3 else flagged[..., None]
            np.copyto(rad[rows], np.nan, where=b)
        n_bad = int(np.count_nonzero(bad))
        err = None
        if radiance_error:
            err, _ = _read_rows(ds, f"{band}/radiance_error", path, m, step, None)
            np.copyto(err, np.nan, where=bad)
        geo: dict[str, np.ndarray] = {}
        geo_bad = np.zeros((m, x), bool)
        for k in GEO_VARIABLES:
            if k.endswith("azimuth_angle") and not _has(ds, f"{band}/{k}"):
                geo[k] = np.full((m, x), np.nan, np.float32)
                continue
            a, a_bad = read_field(ds, f"{band}/{k}", path, dtype=np.float32)
            if a.shape != (m, x):
                raise TempoFileError(path, f"'{band}/{k}' shape {a.shape} != grid {(m, x)}")
            geo[k] = a
            geo_bad |= a_bad
        time = read_field(ds, "time", path)[0] if "time" in ds.variables else \
            np.full(m, np.nan)
        if time.shape != (m,):
            raise TempoFileError(path, f"'time' has shape {time.shape}, expected ({m},)")
        return L1Granule(path, rad, wl, geo["latitude"], geo["longitude"],
                         geo["solar_zenith_angle"], geo["viewing_zenith_angle"], time, n_bad,
                         _mirror_steps(ds, m, path), err, int(geo_bad.sum()),
                         geo["solar_azimuth_angle"], geo["viewing_azimuth_angle"])
    finally:
        ds.close()


@dataclasses.dataclass
class L2Field:
    """One L2 product on its grid, NaN where invalid or failing QA."""

    path: str
    product: str
    values: np.ndarray  # (M, X) float64, physical units, NaN where invalid
    n_fill: int  # values invalid by their own encoding (fill, missing, out of range)
    n_bad_qa: int  # valid values removed by the QA rule
    attrs: dict
    mirror_step: np.ndarray | None = None  # (M,) absolute scan positions
    qa_removed: dict = dataclasses.field(default_factory=dict)  # see QARule.removed_by
    qa_rule: str | None = None  # QARule.describe() of the rule applied


_SPEC_RULE = object()


def read_l2(path: str, product: str, qa=_SPEC_RULE, spec: L2Product | None = None) -> L2Field:
    """Read one L2 product; invalid values (by the variable's own attributes, see
    :func:`read_field`) and QA failures become NaN. Negative columns are kept.

    ``qa``: a :class:`QARule`, None (no QA), or omitted for the product's default rule
    (``DEFAULT_QA``). ``spec`` overrides where the product lives (default
    ``L2_PRODUCTS[product]``). Pixels whose flag is itself missing fail QA
    (``qa_removed["flag_missing"]``). Raises TempoFileError naming the file and variable.
    """
    spec = spec or L2_PRODUCTS[product]
    rule = spec.qa if qa is _SPEC_RULE else qa
    ds = _open(path)
    try:
        attrs = {k: ds.getncattr(k) for k in ds.ncattrs()}
        vals, fill_mask = read_field(ds, spec.variable, path)
        if vals.ndim != 2:
            raise TempoFileError(path, f"'{spec.variable}' has shape {vals.shape}, expected "
                                       "(mirror_step, xtrack)")
        qa_bad = np.zeros(vals.shape, bool)
        removed: dict[str, int] = {}
        if rule is not None:
            flag, flag_missing = read_field(ds, rule.variable, path, dtype=np.int64)
            if flag.shape != vals.shape:
                raise TempoFileError(path, f"'{rule.variable}' shape {flag.shape} != "
                                           f"{vals.shape}")
            fails = ~rule.passes(flag) & ~flag_missing
            qa_bad = (fails | flag_missing) & ~fill_mask
            if (flag_missing & ~fill_mask).any():
                removed["flag_missing"] = int((flag_missing & ~fill_mask).sum())
            removed.update(rule.removed_by(flag[fails & ~fill_mask]))
        vals[qa_bad] = np.nan
        lo, hi = spec.plausible
        with np.errstate(invalid="ignore"):
            out = (vals < lo) | (vals > hi)
        if out.any():
            raise TempoFileError(path, f"'{spec.variable}': {int(out.sum())} values that pass "
                                       f"QA lie outside [{lo:g}, {hi:g}] {spec.units} (e.g. "
                                       f"{vals[out][0]:g}); its encoding (scale_factor, "
                                       "fill) is not what the file says")
        return L2Field(path, product, vals, int(fill_mask.sum()), int(qa_bad.sum()), attrs,
                       _mirror_steps(ds, vals.shape[0], path), removed,
                       rule.describe() if rule else None)
    finally:
        ds.close()

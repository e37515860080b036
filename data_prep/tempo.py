"""TEMPO file layout: names, product definitions and netCDF readers.

Everything that knows where a variable lives in a TEMPO file is here, so that the other
steps (synthesis, shard making, inference) agree on one layout.

File names: ``TEMPO_<PROD>_<LEVEL>_V0x_YYYYMMDDTHHMMSSZ_SsssGgg.nc`` (``.nc4`` accepted).
An L2 file pairs with the RAD L1 file of the same timestamp, scan and granule.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
from collections.abc import Iterable

import numpy as np

FLOAT_FILL = -1.0e30
INT16_FILL = -9999
TIME_EPOCH = dt.datetime(1980, 1, 6, tzinfo=dt.UTC)  # TEMPO time reference (GPS epoch)

L1_BAND = "band_290_490_nm"
L2_ORDER = ("NO2", "O3TOT", "HCHO", "CLDO4")  # channel order of every l2 array we write

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


@dataclasses.dataclass(frozen=True)
class L2Product:
    """Where one L2 product lives in its file and how its quality flag is read."""

    name: str
    variable: str  # path inside the file, "group/var"
    units: str
    qa_variable: str | None  # None: no quality flag (e.g. subsetted files)
    qa_max_good: int = 0  # a pixel is kept when 0 <= flag <= qa_max_good


L2_PRODUCTS: dict[str, L2Product] = {
    "NO2": L2Product("NO2", "product/vertical_column_troposphere", "molecules/cm^2",
                     "product/main_data_quality_flag", 0),
    "O3TOT": L2Product("O3TOT", "product/column_amount_o3", "DU", "product/quality_flag", 0),
    "HCHO": L2Product("HCHO", "product/vertical_column", "molecules/cm^2",
                      "product/main_data_quality_flag", 0),
    "CLDO4": L2Product("CLDO4", "product/cloud_fraction", "1",
                       "product/processing_quality_flag", 0),
}


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


# ----------------------------------------------------------------------------- readers


def _open(path: str):
    import netCDF4

    if not os.path.exists(path):
        raise TempoFileError(path, "file does not exist")
    try:
        ds = netCDF4.Dataset(path, "r")
    except OSError as e:
        raise TempoFileError(path, f"not a readable netCDF4 file ({e})") from None
    ds.set_auto_maskandscale(False)
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


def _read(ds, path: str, where: str) -> np.ndarray:
    v = _var(ds, path, where)
    try:
        return np.asarray(v[...])
    except (OSError, RuntimeError, IndexError) as e:
        raise TempoFileError(where, f"cannot read '{path}' ({e}); the file may be truncated") from None


def _float_invalid(a: np.ndarray, fill: float | None) -> np.ndarray:
    bad = ~np.isfinite(a) | (a <= -1.0e29)
    if fill is not None:
        bad |= a == fill
    return bad


@dataclasses.dataclass
class L1Granule:
    """Radiance of one band on the (mirror_step, xtrack) grid."""

    path: str
    radiance: np.ndarray  # (M, X, C) float32, NaN where invalid
    wavelength: np.ndarray  # (X, C) nm
    latitude: np.ndarray  # (M, X)
    longitude: np.ndarray  # (M, X)
    sza: np.ndarray  # (M, X) degrees
    vza: np.ndarray  # (M, X) degrees
    time: np.ndarray  # (M,) seconds since 1980-01-06
    n_invalid: int  # radiance values that were fill, NaN, Inf or flagged


def read_l1(path: str, band: str = L1_BAND, fill: float | None = FLOAT_FILL,
            quality_mask: int = 0xFFFF) -> L1Granule:
    """Read a RAD L1 file. Values that are fill, non-finite or flagged
    (``pixel_quality_flag & quality_mask``) become NaN and are counted. Small or negative
    radiances (noise at the darkest channels) are data and are kept."""
    ds = _open(path)
    ds.set_auto_mask(False)  # same values (invalid ones are found below), no masked copy
    try:
        if band not in ds.groups:
            raise TempoFileError(path, f"missing group '{band}' (groups: {sorted(ds.groups)})")
        rad = _read(ds, f"{band}/radiance", path).astype(np.float32, copy=False)
        if rad.ndim != 3:
            raise TempoFileError(path, f"'{band}/radiance' has shape {rad.shape}, expected "
                                       "(mirror_step, xtrack, spectral_channel)")
        wl = _read(ds, f"{band}/nominal_wavelength", path).astype(np.float32)
        if wl.shape != rad.shape[1:]:
            raise TempoFileError(path, f"nominal_wavelength shape {wl.shape} does not match "
                                       f"radiance {rad.shape}")
        bad = _float_invalid(rad, fill)
        pqf_var = _var(ds, f"{band}/pixel_quality_flag", path)
        pqf = np.asarray(pqf_var[...])
        if pqf.dtype.kind in "iu" and quality_mask >> (8 * pqf.dtype.itemsize) == 0:
            pqf = pqf.view(pqf.dtype.str.replace("i", "u"))  # bit test without an int64 copy
            quality_mask = pqf.dtype.type(quality_mask)
        else:
            pqf = pqf.astype(np.int64)
        if pqf.shape == rad.shape[:2]:
            pqf = pqf[..., None]
        elif pqf.shape != rad.shape:
            raise TempoFileError(path, f"pixel_quality_flag shape {pqf.shape} does not match "
                                       f"radiance {rad.shape}")
        bad |= (pqf & quality_mask) != 0
        rad[bad] = np.nan  # rad is this function's own array
        geo = {k: _read(ds, f"{band}/{k}", path).astype(np.float32) for k in
               ("latitude", "longitude", "solar_zenith_angle", "viewing_zenith_angle")}
        for k, a in geo.items():
            if a.shape != rad.shape[:2]:
                raise TempoFileError(path, f"'{band}/{k}' shape {a.shape} != grid {rad.shape[:2]}")
            a[_float_invalid(a, fill)] = np.nan
        time = _read(ds, "time", path).astype(np.float64) if "time" in ds.variables else \
            np.full(rad.shape[0], np.nan)
        return L1Granule(path, rad, wl, geo["latitude"], geo["longitude"],
                         geo["solar_zenith_angle"], geo["viewing_zenith_angle"], time,
                         int(bad.sum()))
    finally:
        ds.close()


@dataclasses.dataclass
class L2Field:
    """One L2 product on its grid, NaN where fill or failing QA."""

    path: str
    product: str
    values: np.ndarray  # (M, X) float64, physical units, NaN where invalid
    n_fill: int
    n_bad_qa: int
    attrs: dict


def read_l2(path: str, product: str, qa_max_good: int | None = None,
            spec: L2Product | None = None) -> L2Field:
    """Read one L2 product; fill and QA failures become NaN (negative columns are kept).

    ``spec`` overrides where the product lives (default ``L2_PRODUCTS[product]``)."""
    spec = spec or L2_PRODUCTS[product]
    ds = _open(path)
    try:
        attrs = {k: ds.getncattr(k) for k in ds.ncattrs()}
        v = _var(ds, spec.variable, path)
        fill = v.getncattr("_FillValue") if "_FillValue" in v.ncattrs() else FLOAT_FILL
        vals = _read(ds, spec.variable, path).astype(np.float64)
        if vals.ndim != 2:
            raise TempoFileError(path, f"'{spec.variable}' has shape {vals.shape}, expected "
                                       "(mirror_step, xtrack)")
        fill_mask = _float_invalid(vals, fill)
        if spec.qa_variable is None:
            qa_bad = np.zeros(vals.shape, bool)
        else:
            qa = _read(ds, spec.qa_variable, path).astype(np.int64)
            if qa.shape != vals.shape:
                raise TempoFileError(path, f"'{spec.qa_variable}' shape {qa.shape} != {vals.shape}")
            limit = spec.qa_max_good if qa_max_good is None else qa_max_good
            qa_bad = ((qa < 0) | (qa > limit)) & ~fill_mask
        vals[fill_mask | qa_bad] = np.nan
        return L2Field(path, product, vals, int(fill_mask.sum()), int(qa_bad.sum()), attrs)
    finally:
        ds.close()


def seconds_since_epoch(t: dt.datetime) -> float:
    return (t - TIME_EPOCH).total_seconds()

"""L2 maps and latent means for TEMPO granules from an exported model.

    python -m train.predict runs/demo/model data/new_granules/ runs/demo/predictions/
    python -m train.predict runs/demo/model TEMPO_RAD_L1_V03_..._S012G03.nc ... runs/demo/predictions/

INPUT is any mix of RAD L1 files and folders (searched recursively); L2 files of the same
granule (NO2, O3TOT, HCHO, CLDO4), when present, are read too and shown beside the
prediction. For each granule with a RAD file, OUT_DIR receives

    tempo_vae_<timestamp>_S<scan>G<granule>.nc    CF-1.8 netCDF on the granule's
        (mirror_step, xtrack) grid: NO2, O3TOT, HCHO, CLDO4 in physical units, the latent
        means (latent_channel, mirror_step, xtrack), latitude/longitude, the L2 inputs when
        present, fill values, provenance (model, checkpoint step, input files)
    tempo_vae_<...>.png                          quick look: maps of the four products,
        beside the L2 when present

How the granule is covered. The radiance is read and normalised exactly as the training
shards were (same band, fill and quality masking, statistics, float16 rounding, invalid
values set to the channel mean). Tiles of the model's tile size are cut on the shards'
regular grid (rows and columns 0, T, 2T, ...), so predictions on those tiles are the ones
validation computes. Where the granule does not end on a tile boundary, one more tile is
placed flush with the last row (column); it overlaps its neighbour and fills only the
pixels the regular grid leaves uncovered. Overlap rather than padding: every tile then
holds real radiance of the kind the model was trained on, whereas padded pixels (a
constant or mirrored spectrum) do not occur in training and change the predictions of
their neighbours through the convolutions. Only a granule dimension smaller than one tile
is mirrored (reflect-padded) up to a tile; the padding is cut off again.

The head predicts on the latent grid (1/f of the tile size): each latent cell's value is
given to the f x f pixels it covers. Pixels whose radiance is invalid (more than the
shards' max_bad_channel_fraction of channels fill, flagged or non-finite) are fill in every
output. Inference is batched and deterministic (posterior mean, ``sample=False``); on a GPU
in bf16 autocast unless --precision fp32.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time

import numpy as np

from data_prep.logs import get_logger, setup_logging
from data_prep.shard_format import L2_ORDER
from data_prep.util import argument_parser

log = get_logger(__name__)

NC_FILL = np.float32(-1.0e30)
PRODUCT_ATTRS = {
    "NO2": {"long_name": "tropospheric NO2 vertical column (model prediction)",
            "units": "molecules/cm^2"},
    "O3TOT": {"long_name": "total ozone column (model prediction)", "units": "DU"},
    "HCHO": {"long_name": "HCHO vertical column (model prediction)", "units": "molecules/cm^2"},
    "CLDO4": {"long_name": "effective cloud fraction (model prediction)", "units": "1",
              "standard_name": "cloud_area_fraction"},
}
L2_SOURCE = {"NO2": "product/vertical_column_troposphere", "O3TOT": "product/column_amount_o3",
             "HCHO": "product/vertical_column", "CLDO4": "product/cloud_fraction"}


class PredictError(Exception):
    """An input that cannot be predicted; the message names the file and the problem."""


# ----------------------------------------------------------------------------- tiles


def axis_starts(n: int, t: int) -> list[int]:
    """Tile starts along an axis of n pixels: the regular grid 0, t, 2t, ... and, when it
    leaves pixels uncovered, one more start flush with the end (n - t). n < t: [0]."""
    if n <= t:
        return [0]
    starts = list(range(0, n - t + 1, t))
    if starts[-1] + t < n:
        starts.append(n - t)
    return starts


def tile_starts(m: int, x: int, t: int) -> list[tuple[int, int]]:
    """(row, col) starts covering an m x x grid; regular-grid tiles come first in each row
    and rows of the regular grid before the flush last row."""
    return [(r, c) for r in axis_starts(m, t) for c in axis_starts(x, t)]


def normalise_tile(rad: np.ndarray, mean: np.ndarray, std: np.ndarray,
                   max_bad_channel_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, C) radiance (NaN invalid) -> ((C, H, W) float16 model input, (H, W) valid
    pixels), exactly as ``data_prep.granule.cut_tiles`` makes shard tiles."""
    from data_prep.granule import normalise
    from data_prep.samples import L1_DTYPE

    bad = ~np.isfinite(rad)
    pixel_ok = bad.mean(axis=-1) <= max_bad_channel_fraction
    z = normalise(rad, mean, std)
    z[bad] = 0.0
    z[~pixel_ok] = 0.0
    return np.ascontiguousarray(z.transpose(2, 0, 1), dtype=L1_DTYPE), pixel_ok


def resolve_device(device: str, precision: str):
    """(torch.device, autocast dtype or None) from 'auto'|'cpu'|'cuda[:n]' and
    'auto'|'bf16'|'fp32' (auto: cuda + bf16 when a GPU is present, else cpu + fp32)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    return dev, (torch.bfloat16 if precision == "bf16" else None)


def predict_tiles(model, tiles: np.ndarray, batch_size: int = 16, device=None,
                  autocast_dtype=None, progress=None, geo: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Head predictions and latent means for (N, C, T, T) normalised tiles.

    ``geo`` (N, 4, T, T) latitude, longitude, SZA, VZA in degrees (the shards' geo member)
    is required by a model trained with viewing geometry (model.geometry not 'none');
    ValueError otherwise.

    Returns (pred (N, 4, T/f, T/f) float32 physical units, order NO2, O3TOT, HCHO, CLDO4;
    mean (N, Z, T/f, T/f) float32 latent posterior means). Deterministic (``sample=False``)."""
    import torch

    device = device or next(model.parameters()).device
    transform = model.pretrained.transform
    if geo is None and getattr(model, "uses_geometry", False):
        raise ValueError(f"the model uses viewing geometry (model.geometry="
                         f"{model.cfg.geometry!r}): pass geo (N, 4, T, T)")
    preds, means = [], []
    with torch.inference_mode():
        for i in range(0, len(tiles), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(tiles[i:i + batch_size])).to(device)
            x = x.float()
            g = (torch.from_numpy(np.ascontiguousarray(geo[i:i + batch_size])).to(device)
                 if geo is not None else None)
            with torch.autocast(device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                out = model(x, sample=False, geo=g)
            preds.append(transform.inverse(out["l2_pred"].float()).cpu().numpy())
            means.append(out["mean"].float().cpu().numpy())
            if progress is not None:
                progress.update(len(x))
    return np.concatenate(preds), np.concatenate(means)


# ----------------------------------------------------------------------------- granules


def _read_inputs(rad_path: str, l2_paths: dict, pre) -> dict:
    from data_prep.tempo import TempoFileError, read_l1, read_l2

    band = pre.read.get("band", "band_290_490_nm")
    try:
        l1 = read_l1(rad_path, band, pre.read.get("l1_fill", -1.0e30),
                     int(pre.read.get("l1_quality_mask", 0xFFFF)))
    except TempoFileError as e:
        raise PredictError(str(e)) from None
    m, x, c = l1.radiance.shape
    if c != pre.cfg.model.in_channels:
        raise PredictError(f"{rad_path}: {band} has {c} spectral channels but the model "
                           f"({pre.path}) expects {pre.cfg.model.in_channels}")
    l2 = np.full((len(L2_ORDER), m, x), np.nan, np.float32)
    present, rows = [], {}
    for i, p in enumerate(L2_ORDER):
        if p not in l2_paths:
            continue
        try:
            f = read_l2(l2_paths[p], p)
        except TempoFileError as e:
            raise PredictError(str(e)) from None
        if f.values.shape[1] != x:
            raise PredictError(f"{l2_paths[p]}: xtrack size {f.values.shape[1]} differs from the "
                               f"RAD file's {x} ({rad_path})")
        k = min(m, f.values.shape[0])
        l2[i, :k] = f.values[:k]
        present.append(p)
        rows[p] = int(f.values.shape[0])
    mirror_step = np.arange(m, dtype=np.int32)
    try:
        import netCDF4

        with netCDF4.Dataset(rad_path) as ds:
            if "mirror_step" in ds.variables and ds["mirror_step"].shape == (m,):
                mirror_step = np.asarray(ds["mirror_step"][:], np.int32)
    except OSError:
        pass
    return {"l1": l1, "l2": l2, "l2_present": present, "l2_rows": rows,
            "mirror_step": mirror_step}


def predict_granule(model, rad_path: str, l2_paths: dict | None = None, batch_size: int = 16,
                    device=None, autocast_dtype=None, progress: bool = False) -> dict:
    """Predict one granule on its RAD grid.

    Returns a dict: ``pred`` (4, M, X) float32 physical units, NaN where the radiance is
    invalid; ``latent`` (Z, M, X) float32; ``valid`` (M, X) bool; ``l2`` (4, M, X) the L2
    inputs (NaN where absent, fill or bad QA); ``latitude``, ``longitude``, ``sza``, ``vza``
    (M, X); ``time`` (M,); ``mirror_step`` (M,); ``tiles`` the (row, col) starts used;
    ``files``. Raises PredictError naming the file (missing band, wrong channel count,
    unreadable or truncated file)."""
    from tqdm import tqdm

    pre = model.pretrained
    l2_paths = l2_paths or {}
    inp = _read_inputs(rad_path, l2_paths, pre)
    l1 = inp["l1"]
    rad = l1.radiance
    m, x, _ = rad.shape
    t = int(pre.cfg.model.tile_size)
    f = pre.latent_factor
    pm, px = max(0, t - m), max(0, t - x)
    if pm or px:  # a granule smaller than one tile: mirror it up to a tile
        if (pm and m < 2) or (px and x < 2):
            raise PredictError(f"{rad_path}: a {m} x {x} grid is too small to predict")
        rad = np.pad(rad, ((0, pm), (0, px), (0, 0)), mode="reflect")
    geo = np.stack([l1.latitude, l1.longitude, l1.sza, l1.vza]).astype(np.float32)  # (4, M, X)
    if pm or px:
        geo = np.pad(geo, ((0, 0), (0, pm), (0, px)), mode="reflect")
    starts = tile_starts(rad.shape[0], rad.shape[1], t)
    maxbad = float(pre.tile.get("max_bad_channel_fraction", 0.05))
    valid = np.zeros(rad.shape[:2], bool)
    bar = tqdm(total=len(starts), desc=os.path.basename(rad_path)[:40], unit="tile",
               disable=not progress, file=sys.stderr, leave=False)
    preds, means = [], []
    tiles = np.empty((min(batch_size, len(starts)), rad.shape[2], t, t), np.float16)
    geo_tiles = np.empty((len(tiles), 4, t, t), np.float32)
    for b0 in range(0, len(starts), batch_size):  # one batch of tiles in memory at a time
        chunk = starts[b0:b0 + batch_size]
        for i, (r0, c0) in enumerate(chunk):
            tiles[i], ok = normalise_tile(rad[r0:r0 + t, c0:c0 + t], pre.l1_mean, pre.l1_std,
                                          maxbad)
            valid[r0:r0 + t, c0:c0 + t] = ok
            geo_tiles[i] = geo[:, r0:r0 + t, c0:c0 + t]
        p_, z_ = predict_tiles(model, tiles[:len(chunk)], batch_size, device, autocast_dtype,
                               bar, geo_tiles[:len(chunk)])
        preds.append(p_)
        means.append(z_)
    bar.close()
    pred_t, mean_t = np.concatenate(preds), np.concatenate(means)
    z = mean_t.shape[1]
    pred = np.full((4,) + rad.shape[:2], np.nan, np.float32)
    latent = np.full((z,) + rad.shape[:2], np.nan, np.float32)
    filled = np.zeros(rad.shape[:2], bool)
    for i, (r0, c0) in enumerate(starts):
        todo = ~filled[r0:r0 + t, c0:c0 + t]
        if not todo.any():
            continue
        up_p = pred_t[i].repeat(f, axis=-2).repeat(f, axis=-1)
        up_z = mean_t[i].repeat(f, axis=-2).repeat(f, axis=-1)
        pred[:, r0:r0 + t, c0:c0 + t][:, todo] = up_p[:, todo]
        latent[:, r0:r0 + t, c0:c0 + t][:, todo] = up_z[:, todo]
        filled[r0:r0 + t, c0:c0 + t] = True
    pred, latent, valid = pred[:, :m, :x], latent[:, :m, :x], valid[:m, :x]
    assert filled[:m, :x].all()
    pred[:, ~valid] = np.nan
    latent[:, ~valid] = np.nan
    files = [rad_path] + [l2_paths[p] for p in L2_ORDER if p in inp["l2_present"]]
    return {"pred": pred, "latent": latent, "valid": valid, "l2": inp["l2"],
            "l2_present": inp["l2_present"], "latitude": l1.latitude, "longitude": l1.longitude,
            "sza": l1.sza, "vza": l1.vza, "time": l1.time, "mirror_step": inp["mirror_step"],
            "tiles": starts, "padded": (pm, px), "files": files}


# ----------------------------------------------------------------------------- writing


def _fill(a: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(a), a, NC_FILL).astype(np.float32)


def write_netcdf(path: str, res: dict, pre, key: str) -> None:
    """CF-1.8 netCDF of one granule's prediction, written to ``path + '.part'`` and renamed
    when complete."""
    import netCDF4

    m, x = res["valid"].shape
    tmp = path + ".part"
    try:
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as ds:
            ds.createDimension("mirror_step", m)
            ds.createDimension("xtrack", x)
            ds.createDimension("latent_channel", res["latent"].shape[0])
            v = ds.createVariable("mirror_step", "i4", ("mirror_step",))
            v[:] = res["mirror_step"]
            v.long_name = "mirror step (scan position) of the RAD file"
            v = ds.createVariable("xtrack", "i4", ("xtrack",))
            v[:] = np.arange(x, dtype=np.int32)
            v.long_name = "cross-track pixel index"
            v = ds.createVariable("latent_channel", "i4", ("latent_channel",))
            v[:] = np.arange(res["latent"].shape[0], dtype=np.int32)
            v.long_name = "latent channel index"
            if np.isfinite(res["time"]).any():
                v = ds.createVariable("time", "f8", ("mirror_step",), fill_value=-1.0e30)
                v[:] = np.where(np.isfinite(res["time"]), res["time"], -1.0e30)
                v.standard_name = "time"
                v.long_name = "exposure start time of the mirror step"
                v.units = "seconds since 1980-01-06 00:00:00"
                v.comment = ("copied from the RAD file, which counts leap seconds (GPS time): "
                             "18 s more than UTC in 2017-2026")
            for name, units, std, arr in (("latitude", "degrees_north", "latitude",
                                           res["latitude"]),
                                          ("longitude", "degrees_east", "longitude",
                                           res["longitude"])):
                v = ds.createVariable(name, "f4", ("mirror_step", "xtrack"), fill_value=NC_FILL)
                v[:] = _fill(arr)
                v.units, v.standard_name = units, std
            for name, arr, std in (("solar_zenith_angle", res["sza"], "solar_zenith_angle"),
                                   ("viewing_zenith_angle", res["vza"], "sensor_zenith_angle")):
                v = ds.createVariable(name, "f4", ("mirror_step", "xtrack"), fill_value=NC_FILL)
                v[:] = _fill(arr)
                v.units, v.long_name, v.standard_name = "degree", name.replace("_", " "), std
                v.coordinates = "latitude longitude"
            f = pre.latent_factor
            for i, p in enumerate(L2_ORDER):
                v = ds.createVariable(p, "f4", ("mirror_step", "xtrack"), fill_value=NC_FILL,
                                      zlib=True, complevel=1)
                v[:] = _fill(res["pred"][i])
                v.setncatts(PRODUCT_ATTRS[p])
                v.coordinates = "latitude longitude"
                v.comment = (f"L2 head output on the latent grid: constant over the {f} x {f} "
                             "pixels of each latent cell; fill where the radiance is invalid")
                if p in res["l2_present"]:
                    w = ds.createVariable(f"{p}_L2", "f4", ("mirror_step", "xtrack"),
                                          fill_value=NC_FILL, zlib=True, complevel=1)
                    w[:] = _fill(res["l2"][i])
                    w.long_name = f"{p} from the TEMPO L2 file ({L2_SOURCE[p]}); fill where " \
                                  "fill or failing QA"
                    w.units = PRODUCT_ATTRS[p]["units"]
                    if "standard_name" in PRODUCT_ATTRS[p]:
                        w.standard_name = PRODUCT_ATTRS[p]["standard_name"]
                    w.coordinates = "latitude longitude"
            v = ds.createVariable("latent_mean", "f4", ("latent_channel", "mirror_step", "xtrack"),
                                  fill_value=NC_FILL, zlib=True, complevel=1)
            v[:] = _fill(res["latent"])
            v.long_name = "posterior mean of the VAE latent"
            v.units = "1"
            v.coordinates = "latitude longitude"
            v = ds.createVariable("radiance_valid", "i1", ("mirror_step", "xtrack"))
            v[:] = res["valid"].astype(np.int8)
            v.long_name = "radiance usable for the model"
            v.flag_values = np.array([0, 1], np.int8)
            v.flag_meanings = "invalid valid"
            v.coordinates = "latitude longitude"
            info = pre.info
            ds.setncatts({
                "Conventions": "CF-1.8",
                "title": f"tempo-vae L2 predictions for TEMPO granule {key}",
                "source": f"tempo-vae model, checkpoint step {info['step']}",
                "model": pre.path,
                "model_checkpoint": info["source_checkpoint"],
                "model_checkpoint_step": np.int64(info["step"]),
                "model_weights_sha256": info["weights_sha256"],
                "input_files": ", ".join(os.path.basename(p) for p in res["files"]),
                "input_paths": ", ".join(os.path.abspath(p) for p in res["files"]),
                "tiling": f"tiles of {pre.cfg.model.tile_size} pixels on the regular grid; "
                          "an overlapping tile flush with the last row/column covers the "
                          "remainder (fills only uncovered pixels)",
                "padding_rows_cols": f"{res['padded'][0]} {res['padded'][1]}",
                "inference": "posterior mean (deterministic)",
                "history": f"{dt.datetime.now(dt.UTC):%Y-%m-%dT%H:%M:%SZ} python -m train.predict",
                "date_created": f"{dt.datetime.now(dt.UTC):%Y-%m-%dT%H:%M:%SZ}",
            })
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_quicklook(path: str, res: dict, key: str) -> None:
    """PNG: one map per product (rows: model, and the L2 when present), shared colour
    scale per product (2nd-98th percentile of both)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if res["l2_present"] else 1
    fig, axes = plt.subplots(rows, 4, figsize=(16, 3.6 * rows), squeeze=False)
    for i, p in enumerate(L2_ORDER):
        both = [res["pred"][i]] + ([res["l2"][i]] if rows == 2 else [])
        vals = np.concatenate([a[np.isfinite(a)] for a in both])
        lo, hi = (np.percentile(vals, [2, 98]) if vals.size else (0.0, 1.0))
        for j, (a, label) in enumerate(zip(both, ("model", "L2"))):
            ax = axes[j, i]
            im = ax.imshow(a, origin="lower", vmin=lo, vmax=hi, cmap="viridis", aspect="auto",
                           interpolation="nearest")
            ax.set_title(f"{p} {label}" + ("" if label == "model" or p in res["l2_present"]
                                           else " (absent)"), fontsize=9)
            ax.set_xlabel("xtrack", fontsize=8)
            ax.set_ylabel("mirror step", fontsize=8)
            fig.colorbar(im, ax=ax, label=PRODUCT_ATTRS[p]["units"])
    fig.suptitle(f"tempo-vae {key}")
    fig.tight_layout()
    tmp = path + ".part"
    try:
        fig.savefig(tmp, dpi=80, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- CLI


def gather_granules(inputs: list[str]):
    """(granules with a RAD file, ignored [(path, reason)]) from files and folders."""
    from data_prep.tempo import discover, find_files

    files, ignored = [], []
    for p in inputs:
        if os.path.isdir(p):
            files += find_files(p)
        elif os.path.exists(p):
            files.append(p)
        else:
            ignored.append((p, "does not exist"))
    granules, more = discover(files)
    ignored += [(p, r) for p, r in more if "/truth/" not in p.replace(os.sep, "/")]
    out = []
    for g in sorted(granules.values(), key=lambda g: g.gid):
        if g.rad is None:
            ignored += [(p, f"no RAD L1 file for granule {g.gid.key}") for p in g.l2.values()]
            continue
        out.append(g)
    return out, ignored


def parse_args(argv=None):
    p = argument_parser("python -m train.predict", __doc__)
    p.add_argument("model", help="model folder written by python -m train.export")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="RAD L1 files and/or folders (L2 files beside them are used too)")
    p.add_argument("out_dir", help="folder for one .nc and one .png per granule")
    p.add_argument("--batch-size", type=int, default=16, help="tiles per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda[:N]")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on a GPU, fp32 on CPU")
    p.add_argument("--no-png", action="store_true", help="skip the quick-look images")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(quiet=getattr(args, "quiet", False))
    from tqdm import tqdm

    from train.export import ExportError
    from train.model import load_pretrained

    dev, ac = resolve_device(args.device, args.precision)
    try:
        model = load_pretrained(args.model, dev)
    except ExportError as e:
        log.error(str(e))
        return 2
    granules, ignored = gather_granules(args.inputs)
    for p, r in ignored:
        log.warning(f"ignored: {p}: {r}")
    if not granules:
        log.error("no RAD L1 file among the inputs")
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    failed, done, t0 = {}, 0, time.perf_counter()
    for g in tqdm(granules, desc="granules", unit="granule", disable=args.quiet,
                  file=sys.stderr):
        key = g.gid.key
        nc = os.path.join(args.out_dir, f"tempo_vae_{key}.nc")
        png = nc[:-3] + ".png"
        if os.path.exists(nc) and not args.overwrite:
            failed[key] = f"{nc} exists (use --overwrite)"
            continue
        written = []
        try:
            res = predict_granule(model, g.rad, g.l2, args.batch_size, dev, ac,
                                  progress=not args.quiet)
            write_netcdf(nc, res, model.pretrained, key)
            written.append(nc)
            if not args.no_png:
                write_quicklook(png, res, key)
                written.append(png)
        except BaseException as e:
            for path in written:  # a granule is written whole or not at all
                os.unlink(path)
            if not isinstance(e, PredictError):
                raise
            failed[key] = str(e)
            continue
        done += 1
    dt_s = time.perf_counter() - t0
    log.info(f"{done} of {len(granules)} granules predicted into {args.out_dir} in {dt_s:.1f}s "
             f"(model step {model.pretrained.step}, device {dev}, "
             f"{'bf16' if ac is not None else 'fp32'})")
    for k, e in failed.items():
        log.error(f"granule {k}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

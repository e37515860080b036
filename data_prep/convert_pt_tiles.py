"""Migrate the research code's ``.pt`` tile files to our WebDataset shards.

Inputs: INPUT_DIR holding ``<name>.pt`` files, each a float tensor of raw radiance tiles
[N, H, W, C] (one granule's tiles per file), and optional ``l2_<PRODUCT>/<name>.pt``
tensors [N, H, W] for NO2, O3TOT, HCHO, CLDO4 (NaN = invalid), stored with the research
code's scaling (NO2 / 1e15, HCHO / 1e16 by default; change with ``--l2-scale``).

Outputs: the same layout as ``make_shards`` (train/, val/, sizes.json, stats.json,
header.json, manifest.json); files are split 70/30 with seed 42 by file, as the research code did.
Geolocation is not in the research format, so ``geo.npy`` is all NaN. Sample keys are
``<name>_t<index>`` with every character outside ``[A-Za-z0-9_-]`` of the file name (dots
above all, as in ``granule_2024.06.01_S012G01.pt``) replaced by '_'; the metadata keeps the
file name.

    python -m data_prep.convert_pt_tiles old_tiles/ data/shards_from_pt
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
from tqdm import tqdm

from data_prep import samples, shard_format
from data_prep.granule import normalise
from data_prep.logs import get_logger, setup_logging
from data_prep.make_shards import parse_size, split_granules
from data_prep.shard_format import L2_ORDER, SPLITS
from data_prep.stats import DatasetStats, log_radiance
from data_prep.util import argument_parser

log = get_logger(__name__)

DEFAULT_SCALES = {"NO2": 1e15, "O3TOT": 1.0, "HCHO": 1e16, "CLDO4": 1.0}


class ConvertError(Exception):
    pass


def _load(path: str) -> np.ndarray:
    import torch

    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConvertError(f"{path}: not a readable torch tensor file ({e})") from None
    if not isinstance(t, torch.Tensor):
        raise ConvertError(f"{path}: holds a {type(t).__name__}, expected a tensor")
    return t.float().numpy()


def load_file(in_dir: str, name: str, scales: dict[str, float]):
    rad = _load(os.path.join(in_dir, name + ".pt"))
    if rad.ndim != 4:
        raise ConvertError(f"{name}.pt: shape {rad.shape}, expected [N, H, W, C]")
    n, h, w, _ = rad.shape
    l2 = np.full((n, len(L2_ORDER), h, w), np.nan, np.float32)
    missing = []
    for i, p in enumerate(L2_ORDER):
        path = os.path.join(in_dir, f"l2_{p}", name + ".pt")
        if not os.path.exists(path):
            missing.append(p)
            continue
        a = _load(path)
        if a.shape != (n, h, w):
            raise ConvertError(f"{path}: shape {a.shape}, expected {(n, h, w)} to match {name}.pt")
        l2[:, i] = a * scales[p]
    return rad, l2, missing


def main(argv=None) -> int:
    p = argument_parser("python -m data_prep.convert_pt_tiles", __doc__)
    p.add_argument("input_dir", help="research tile folder: *.pt radiance files [N, H, W, C] "
                                     "and l2_<PRODUCT>/<same name>.pt [N, H, W]")
    p.add_argument("out_dir", help="shard folder to create (train/, val/, sizes.json, "
                                   "stats.json, header.json, manifest.json)")
    p.add_argument("--val-fraction", type=float, default=0.3,
                   help="fraction of .pt files (granules) put in the validation split")
    p.add_argument("--seed", type=int, default=42, help="seed of the train/val split")
    p.add_argument("--shard-size", type=parse_size, default="1GB",
                   help="target shard size (B, KB, MB, GB)")
    p.add_argument("--l2-scale", action="append", default=[], metavar="PRODUCT=FACTOR",
                   help="physical value = stored value x FACTOR, repeatable (built in: "
                        "NO2=1e15, HCHO=1e16, others 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    args = p.parse_args(argv)
    setup_logging()
    scales = dict(DEFAULT_SCALES)
    for item in args.l2_scale:
        k, _, v = item.partition("=")
        if k not in scales:
            p.error(f"--l2-scale: unknown product {k!r} (one of {', '.join(L2_ORDER)})")
        try:
            scales[k] = float(v)
        except ValueError:
            p.error(f"--l2-scale {item!r}: FACTOR is not a number")
    if not os.path.isdir(args.input_dir):
        p.error(f"input folder {args.input_dir} does not exist")
    names = sorted(f[:-3] for f in os.listdir(args.input_dir) if f.endswith(".pt"))
    if not names:
        log.error(f"no .pt files in {args.input_dir}")
        return 2
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        if not args.overwrite:
            log.error(f"{args.out_dir} is not empty; use a new folder or --overwrite")
            return 2
        if not os.path.exists(os.path.join(args.out_dir, "sizes.json")):
            log.error(f"{args.out_dir} is not a shard folder; refusing to overwrite it")
            return 2
        shutil.rmtree(args.out_dir)
    # sample keys cannot hold '.', so dotted names (granule_2024.06.01_S012G01) get a key
    # with '_' in their place; two names that would share a key are an error
    keys = {n: samples.safe_key(n) for n in names}
    by_key: dict[str, list[str]] = {}
    for n, k in keys.items():
        by_key.setdefault(k, []).append(n)
    clash = {k: v for k, v in by_key.items() if len(v) > 1}
    if clash:
        for k, v in clash.items():
            log.error(f"files {', '.join(f + '.pt' for f in v)} would all get the sample "
                  f"key '{k}'; rename one")
        return 2
    split = split_granules(names, args.val_fraction, args.seed)

    # pass 1: stats from the training files
    stats = None
    errors: dict[str, str] = {}
    for name in tqdm([n for n in names if split[n] == "train"], desc="stats"):
        try:
            rad, l2, _ = load_file(args.input_dir, name, scales)
        except ConvertError as e:
            errors[name] = str(e)
            continue
        st = DatasetStats.empty(rad.shape[-1])
        st.l1.update(log_radiance(rad).reshape(-1, rad.shape[-1]))
        st.l2.update(l2.transpose(1, 0, 2, 3), name)
        st.granules = [name]
        if stats is None:
            stats = st
        else:
            stats.merge(st)
    if stats is None:
        log.error("no training file could be read")
        for e in errors.values():
            log.error(f"{e}")
        return 1
    stats_json = stats.to_json()
    mean = np.asarray(stats_json["l1"]["mean"], np.float32)
    std = np.asarray(stats_json["l1"]["std"], np.float32)

    # pass 2: shards
    import webdataset as wds

    tmp = os.path.join(args.out_dir, ".tmp")
    os.makedirs(tmp, exist_ok=True)
    sizes: dict[str, int] = {}
    tiles = []
    tile_hw: set[tuple[int, int]] = set()
    for s in SPLITS:
        os.makedirs(os.path.join(args.out_dir, s), exist_ok=True)
        counts: dict[str, int] = {}
        writer = wds.ShardWriter(os.path.join(tmp, f"{s}-%06d.tar"), maxsize=args.shard_size,
                                 encoder=False, verbose=0, mtime=0.0)
        for name in tqdm([n for n in names if split[n] == s], desc=s):
            try:
                rad, l2, missing = load_file(args.input_dir, name, scales)
            except ConvertError as e:
                errors[name] = str(e)
                continue
            for i in range(rad.shape[0]):
                key = f"{keys[name]}_t{i:04d}"
                bad = ~np.isfinite(rad[i])
                z = normalise(rad[i], mean, std)
                z[bad] = 0.0
                l1 = z.transpose(2, 0, 1)  # (C, H, W)
                tile_hw.add(l1.shape[1:])
                geo = np.full((4,) + l1.shape[1:], np.nan, np.float32)
                meta = {"key": key, "granule": name, "tile_index": i, "source": name + ".pt",
                        "missing_products": missing, "l1_filled_values": int(bad.sum()),
                        "l2_order": list(L2_ORDER)}
                writer.write(samples.encode(key, l1, l2[i], geo, meta))
                fname = os.path.basename(writer.fname)
                counts[fname] = counts.get(fname, 0) + 1
                tiles.append({"key": key, "granule": name, "status": "written",
                              "l1_filled_values": int(bad.sum())})
        writer.close()
        for fname, n in sorted(counts.items()):
            rel = f"{s}/{fname}"
            os.replace(os.path.join(tmp, fname), os.path.join(args.out_dir, rel))
            sizes[rel] = n
    shutil.rmtree(tmp, ignore_errors=True)
    per_split = {s: sum(n for k, n in sizes.items() if k.startswith(s + "/")) for s in SPLITS}
    if len(tile_hw) > 1 or any(h != w for h, w in tile_hw):
        log.error(f"tiles of several or non-square sizes {sorted(tile_hw)}: the shard format "
                  "holds square tiles of one size; convert them in separate folders")
        return 2
    # one .pt file holds one granule's tiles: its errors are the granule errors
    manifest = shard_format.manifest_header("convert_pt_tiles", next(iter(tile_hw))[0]
                                            if tile_hw else 0) | {
        "l2_scales_applied": scales,
        "splits": {s: sorted(n for n in names if split[n] == s) for s in SPLITS},
        "counts": {"written": len(tiles), "per_split": per_split, "dropped": {},
                   "granules": len(names), "granule_errors": len(errors)},
        "granule_errors": errors, "tiles": tiles}
    shard_format.write_metadata(args.out_dir, sizes, stats_json, manifest)
    log.info(f"{len(tiles)} tiles from {len(names) - len(errors)} files -> {args.out_dir} "
             f"({per_split}); file errors: {len(errors)}")
    for e in errors.values():
        log.error(f"{e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

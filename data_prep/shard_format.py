"""The shard-folder contract: what ``make_shards`` and ``convert_pt_tiles`` write and what the
loader, ``inspect_shards``, ``train.export`` and ``train.evaluate`` read. One owner for the
file names, the array orders and units, and the manifest's common keys; the per-sample
members are in ``data_prep.samples``.

    SHARD_DIR/
      train/*.tar, val/*.tar   WebDataset shards (members: data_prep.samples)
      sizes.json               {"train/<name>.tar": samples, ...}, every shard of both splits
      stats.json               normalisation statistics (data_prep.stats.DatasetStats.to_json):
                               l1 mean/std per channel of log(max(I, 1)), l2 per product
      header.json              the small part of the manifest the loader reads at start
                               (``header``): the keys of ``manifest_header`` and
                               ``shard_bytes`` {shard: bytes}; about 80 bytes per shard
      manifest.json            the keys of ``manifest_header`` (format, source, orders, units,
                               tile_size) and, from every writer: ``counts`` (written,
                               per_split, granules, granule_errors, ...), ``granule_errors``
                               {granule: message}, ``shard_bytes`` {shard: bytes},
                               ``splits`` {split: [granules]}, ``tiles`` [per-tile records];
                               at a month of TEMPO (~3,600 granules) tens of MB, so readers
                               that only need the header read ``header.json``

Folders written before ``header.json`` existed have only ``manifest.json``; readers then
take the header from it (``header`` of the whole manifest), at the cost of reading it all.

A granule is the unit of the train/val split: a TEMPO granule for ``make_shards``, one
``.pt`` file of the research code (one granule's tiles) for ``convert_pt_tiles``.
"""

from __future__ import annotations

import os

from data_prep.util import atomic_write_json

FORMAT = "tempo-vae-shards/1"
SIZES, STATS, MANIFEST, HEADER = "sizes.json", "stats.json", "manifest.json", "header.json"
SPLITS = ("train", "val")

# channel order of every l2 array, and their physical units (DESIGN.md sections 1-2: NO2
# vertical_column_troposphere, HCHO vertical_column in molecules/cm^2; O3TOT
# column_amount_o3 in Dobson units; CLDO4 cloud_fraction, unitless)
L2_ORDER = ("NO2", "O3TOT", "HCHO", "CLDO4")
L2_UNITS = {"NO2": "molecules/cm^2", "O3TOT": "DU", "HCHO": "molecules/cm^2", "CLDO4": "1"}
# channel order of every geo array: degrees north, degrees east, solar and viewing zenith
GEO_ORDER = ("latitude", "longitude", "sza", "vza")
GEO_UNITS = {"latitude": "degrees_north", "longitude": "degrees_east", "sza": "degree",
             "vza": "degree"}


class ShardFormatError(ValueError):
    """A shard folder whose metadata breaks the contract; the message names file and key."""


def manifest_header(source: str, tile_size: int) -> dict:
    """The keys every writer's manifest starts with. ``tile_size``: tile height = width in
    pixels (the model's ``model.tile_size`` must equal it)."""
    return {"format": FORMAT, "source": source, "l2_order": list(L2_ORDER),
            "l2_units": dict(L2_UNITS), "geo_order": list(GEO_ORDER), "tile_size": tile_size}


def header(manifest: dict) -> dict:
    """The part of ``manifest`` the loader needs at start, written as ``header.json``: the
    keys of ``manifest_header`` that it has, ``shard_bytes`` (checked against local shards)
    and, for manifests without ``tile_size``, the plan's ``options.tile`` (``tile_size``
    reads either)."""
    out = {k: manifest[k] for k in manifest_header("", 0) if k in manifest}
    if "tile_size" not in out and "tile" in manifest.get("options", {}):
        out["options"] = {"tile": manifest["options"]["tile"]}
    if "shard_bytes" in manifest:
        out["shard_bytes"] = manifest["shard_bytes"]
    return out


def write_metadata(out_dir: str, sizes: dict[str, int], stats: dict | None,
                   manifest: dict) -> None:
    """Write ``stats.json`` (unless ``stats`` is None: written earlier), ``header.json``,
    ``sizes.json`` (sorted) and ``manifest.json`` atomically, in that order:
    ``sizes.json``, which readers look for first, never names shards whose statistics or
    header are missing. Adds ``shard_bytes`` (the byte size of every listed shard, which
    the loader checks at start) when the writer has not. Raises ShardFormatError when the
    manifest lacks a header key or a listed shard is missing."""
    missing = [k for k in manifest_header("", 0) if k not in manifest]
    if missing:
        raise ShardFormatError(f"{os.path.join(out_dir, MANIFEST)}: missing {missing} "
                               "(start it with shard_format.manifest_header)")
    if "shard_bytes" not in manifest:
        try:
            manifest["shard_bytes"] = {rel: os.path.getsize(os.path.join(out_dir, rel))
                                       for rel in sorted(sizes)}
        except OSError as e:
            raise ShardFormatError(f"{out_dir}: a shard listed in {SIZES} is missing ({e})") \
                from None
    if stats is not None:
        atomic_write_json(os.path.join(out_dir, STATS), stats)
    atomic_write_json(os.path.join(out_dir, HEADER), header(manifest))
    atomic_write_json(os.path.join(out_dir, SIZES), dict(sorted(sizes.items())))
    atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)


def check_manifest(manifest: dict, where: str) -> None:
    """Raise ShardFormatError naming ``where`` and the key when the manifest's (or
    header's) format or array orders are not the ones this code reads. Manifests written before ``geo_order``
    was recorded are accepted (their order is GEO_ORDER)."""
    fmt = manifest.get("format", FORMAT)
    if fmt != FORMAT:
        raise ShardFormatError(f"{where}: format {fmt!r}, this version reads {FORMAT!r}")
    for key, want in (("l2_order", L2_ORDER), ("geo_order", GEO_ORDER)):
        got = tuple(manifest.get(key, want))
        if got != want:
            raise ShardFormatError(f"{where}: {key} {list(got)} differs from {list(want)}")


def tile_size(manifest: dict) -> int | None:
    """Tile height = width in pixels, from ``tile_size`` or (older manifests) the plan's
    ``options.tile.size``; None when the manifest does not say."""
    if "tile_size" in manifest:
        return int(manifest["tile_size"])
    size = manifest.get("options", {}).get("tile", {}).get("size")
    return int(size) if size is not None else None

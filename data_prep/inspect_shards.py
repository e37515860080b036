"""Check a shard folder end to end and print a summary.

Input: a shard folder made by ``make_shards`` or ``convert_pt_tiles``, in any form that
``data.shards`` accepts (``train/shard_source.py``): a local folder, an ``http(s)://``
prefix, an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``memory://...``), a
``pipe:COMMAND {}`` command, or a brace-expanded shard list (then only the listed shards
are checked, and the split totals are not compared with the manifest). ``sizes.json``,
``stats.json``, ``header.json`` and ``manifest.json`` are read from the same place, and
every shard is streamed once through the loader's reader (remote: with reconnection,
``--retries``).

Checks: every sample decodes, shapes and dtypes agree, the radiance is finite, keys are
unique, per-shard counts equal ``sizes.json``, split totals equal the manifest, no granule
is in both splits, ``stats.json`` has one finite mean and positive std per channel,
``header.json`` equals the header of ``manifest.json`` (a folder without it, written before
it existed, is noted; ``--write-header`` adds it to a local folder). Local folders also:
byte sizes equal the recorded ones and no shard file is missing from ``sizes.json``.
Exit code 0 when everything holds, 1 on any problem (each printed with its address, shard
and key).

    python -m data_prep.inspect_shards data/shards
    python -m data_prep.inspect_shards https://data.example.org/tempo/shards
    python -m data_prep.inspect_shards "pipe:aws s3 cp s3://bucket/shards/{} -"
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import numpy as np
from tqdm import tqdm

from data_prep import samples, shard_format
from data_prep.logs import get_logger, setup_logging
from data_prep.util import argument_parser, atomic_write_json
from train.shard_source import RemoteShardReader, ShardSource, SourceError

log = get_logger(__name__)


def iter_tar_samples(path: str):
    """Raw samples of one local shard (see ``samples.iter_tar``)."""
    return samples.iter_tar(path)


def _read(source: ShardSource, name: str, problems: list[str]):
    """A JSON file of the folder, or None with the reason added to ``problems``."""
    if source.local and not os.path.exists(source.address(name)):
        problems.append(f"{source.address(name)}: missing")
        return None
    try:
        return source.read_json(name)
    except SourceError as e:
        problems.append(str(e))
        return None


def _check_stats(stats: dict, channels: int | None, where: str, problems: list[str]) -> None:
    try:
        mean = np.asarray(stats["l1"]["mean"], np.float64)
        std = np.asarray(stats["l1"]["std"], np.float64)
        stats["l2"]
    except (KeyError, TypeError, ValueError) as e:
        problems.append(f"{where}: no l1 mean/std or l2 section ({type(e).__name__}: {e})")
        return
    if mean.shape != std.shape or (channels is not None and mean.shape != (channels,)):
        problems.append(f"{where}: l1 mean {mean.shape} and std {std.shape} per channel, the "
                        f"tiles have {channels} channels")
    elif not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        problems.append(f"{where}: l1 mean or std not finite, or std not positive")


def _check_header(source: ShardSource, manifest: dict | None, problems: list[str],
                  notes: list[str]) -> None:
    head_addr = source.address(shard_format.HEADER)
    if source.local and not os.path.exists(head_addr):
        notes.append(f"{head_addr}: missing (a folder written before it existed: the loader "
                     "reads the whole manifest.json instead; --write-header adds it)")
        return
    try:
        head = source.read_json(shard_format.HEADER)
    except SourceError as e:
        if source.local:  # there, but unreadable
            problems.append(str(e))
        else:  # missing or unreachable: a remote source does not say which
            notes.append(f"{e} (a folder written before header.json existed lacks it: the "
                         "loader reads the whole manifest.json instead)")
        return
    try:
        shard_format.check_manifest(head, head_addr)
    except shard_format.ShardFormatError as e:
        problems.append(str(e))
    ref = shard_format.header(manifest) if manifest is not None else head
    if head != ref:
        diff = sorted(k for k in set(head) | set(ref) if head.get(k) != ref.get(k))
        problems.append(f"{head_addr} differs from the header of manifest.json (in: "
                        f"{', '.join(diff)}); the loader reads header.json")


def inspect(shard_dir: str, progress: bool = True, retries: int = 3
            ) -> tuple[dict, list[str]]:
    """Check the shard folder ``shard_dir`` (any ``data.shards`` form, see the module
    docstring). Returns (summary, problems): the summary counts shards, samples per split,
    the l1 shape (C, H, W), the fraction of invalid L2 values and granules per split, plus
    ``notes`` (things that are not errors); every problem is a line naming its address,
    shard and sample. Nothing is raised for bad data; ``retries``: reconnections per
    remote shard."""
    problems: list[str] = []
    notes: list[str] = []
    try:
        source = ShardSource.parse(shard_dir)
    except SourceError as e:
        return {}, [str(e)]
    sizes_json = _read(source, shard_format.SIZES, problems)
    if sizes_json is None:
        return {}, problems
    manifest = _read(source, shard_format.MANIFEST, problems)
    if manifest is not None:
        try:
            shard_format.check_manifest(manifest, source.address(shard_format.MANIFEST))
        except shard_format.ShardFormatError as e:
            problems.append(str(e))
    _check_header(source, manifest, problems, notes)
    stats = _read(source, shard_format.STATS, problems)
    sizes = {k: int(v) for k, v in sizes_json.items()}
    if source.listed is not None:
        unknown = [k for k in source.listed if k not in sizes]
        problems.extend(f"{source.address(k)}: listed but not in sizes.json" for k in unknown)
        sizes = {k: sizes[k] for k in source.listed if k in sizes}
    elif source.local:
        root = source.root
        on_disk = sorted(os.path.relpath(os.path.join(d, f), root)
                         for s in shard_format.SPLITS
                         for d, _, fs in os.walk(os.path.join(root, s))
                         for f in fs if f.endswith(".tar"))
        for rel in sorted(set(on_disk) - set(sizes)):
            problems.append(f"{rel}: shard on disk but not in sizes.json")
    recorded = (manifest or {}).get("shard_bytes", {})
    keys: Counter = Counter()
    granules = {"train": set(), "val": set()}
    per_split = Counter()
    shape = None
    nonfinite_l2 = 0
    total_l2 = 0
    for rel in tqdm(sorted(sizes), desc="shards", unit="shard", disable=not progress,
                    file=sys.stderr):
        split = rel.split("/", 1)[0]
        if source.local:
            path = source.address(rel)
            if not os.path.exists(path):
                problems.append(f"{rel}: listed in sizes.json but missing")
                continue
            if rel in recorded and os.path.getsize(path) != recorded[rel]:
                problems.append(f"{rel}: {os.path.getsize(path)} bytes, manifest.json says "
                                f"{recorded[rel]}")
            stream = iter_tar_samples(path)
        else:
            stream = RemoteShardReader(source, rel, sizes[rel], retries)
        n = 0
        try:
            for raw in stream:
                n += 1
                try:
                    s = samples.decode(raw, rel)
                except samples.SampleError as e:
                    problems.append(str(e))
                    continue
                keys[s["__key__"]] += 1
                if shape is None:
                    shape = s["l1"].shape
                elif s["l1"].shape != shape:
                    problems.append(f"{rel} sample '{s['__key__']}': l1 shape {s['l1'].shape} "
                                    f"differs from {shape}")
                if not np.isfinite(s["l1"]).all():
                    problems.append(f"{rel} sample '{s['__key__']}': non-finite l1 values")
                nonfinite_l2 += int((~np.isfinite(s["l2"])).sum())
                total_l2 += s["l2"].size
                granules.setdefault(split, set()).add(s["meta"].get("granule"))
        except samples.ShardError as e:
            problems.append(f"{rel}: after {n} samples: {e}")
        if n != sizes[rel] and source.local:  # the remote reader names a short stream
            problems.append(f"{rel}: {n} samples, sizes.json says {sizes[rel]}")
        per_split[split] += n
    for k, c in keys.items():
        if c > 1:
            problems.append(f"sample key '{k}' appears {c} times")
    both = granules["train"] & granules["val"]
    if both:
        problems.append(f"granules in both train and val: {sorted(both)}")
    if stats is not None:
        _check_stats(stats, shape[0] if shape else None, source.address(shard_format.STATS),
                     problems)
    if manifest is not None and source.listed is None:
        want = manifest["counts"]["per_split"]
        for s in ("train", "val"):
            if want.get(s, 0) != per_split[s]:
                problems.append(f"{s}: {per_split[s]} samples in shards, manifest says "
                                f"{want.get(s, 0)}")
    summary = {"shards": len(sizes), "samples": dict(per_split), "l1_shape": shape,
               "l2_invalid_fraction": (nonfinite_l2 / total_l2) if total_l2 else None,
               "granules": {s: len(g) for s, g in granules.items()}, "notes": notes}
    return summary, problems


def write_header(shard_dir: str) -> str | None:
    """Write ``header.json`` of a local folder from its ``manifest.json`` when it is missing
    (folders written before the header existed); returns its path, or None when it was
    there already. Raises SourceError for a folder that is not local or a manifest that
    cannot be read."""
    source = ShardSource.parse(shard_dir)
    if not source.local or source.listed is not None:
        raise SourceError(f"{shard_dir}: --write-header writes into a local shard folder only "
                          "(write header.json there, then copy it next to the remote shards)")
    path = source.address(shard_format.HEADER)
    if os.path.exists(path):
        return None
    atomic_write_json(path, shard_format.header(source.read_json(shard_format.MANIFEST)))
    return path


def main(argv=None) -> int:
    p = argument_parser("python -m data_prep.inspect_shards", __doc__)
    p.add_argument("shard_dir", help="shard folder made by make_shards or convert_pt_tiles, in "
                                     "any form of data.shards: a local folder, an http(s):// "
                                     "or fsspec URL (s3://, gs://, memory://), 'pipe:COMMAND "
                                     "{}' or a brace-expanded shard list")
    p.add_argument("--retries", type=int, default=3,
                   help="reconnections per remote shard whose stream fails part-way")
    p.add_argument("--write-header", action="store_true",
                   help="after a check without problems, write header.json from "
                        "manifest.json when it is missing (local folders only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    setup_logging()
    summary, problems = inspect(args.shard_dir, not args.quiet, args.retries)
    print(f"{args.shard_dir}: {summary.get('shards', 0)} shards, samples {summary.get('samples')}, "
          f"l1 shape {summary.get('l1_shape')}, granules {summary.get('granules')}, "
          f"L2 invalid fraction {summary.get('l2_invalid_fraction')}")
    for note in summary.get("notes", []):
        log.info(f"note: {note}")
    for pr in problems:
        log.error(f"problem: {pr}")
    print("OK" if not problems else f"{len(problems)} problems")
    if args.write_header:
        if problems:
            log.error("header.json not written: fix the problems first")
        else:
            try:
                path = write_header(args.shard_dir)
            except (SourceError, OSError) as e:
                log.error(str(e))
                return 1
            log.info(f"wrote {path}" if path else "header.json present and equal to the "
                     "manifest's header: nothing to write")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

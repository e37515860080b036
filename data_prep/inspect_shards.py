"""Check a shard folder end to end and print a summary.

Input: SHARD_DIR made by ``make_shards`` or ``convert_pt_tiles``. Opens every sample of every
shard with plain ``tarfile``, decodes the arrays, checks shapes, dtypes and finiteness of
the radiance, that keys are unique, that per-shard counts equal ``sizes.json``, that totals
equal the manifest, and that no granule is in both splits. Exit code 0 when everything
holds, 1 on any problem (each printed with its shard and key).

    python -m data_prep.inspect_shards data/shards
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import numpy as np
from tqdm import tqdm

from data_prep import samples, shard_format
from data_prep.logs import get_logger, setup_logging
from data_prep.util import argument_parser, read_json

log = get_logger(__name__)


def iter_tar_samples(path: str):
    """Raw samples of one shard (see ``samples.iter_tar``)."""
    return samples.iter_tar(path)


def inspect(shard_dir: str, progress: bool = True) -> tuple[dict, list[str]]:
    problems: list[str] = []
    sizes_path = os.path.join(shard_dir, shard_format.SIZES)
    if not os.path.exists(sizes_path):
        return {}, [f"{sizes_path}: missing"]
    sizes = read_json(sizes_path)
    manifest_path = os.path.join(shard_dir, shard_format.MANIFEST)
    manifest = read_json(manifest_path) if os.path.exists(manifest_path) else None
    if manifest is None:
        problems.append(f"{manifest_path}: missing")
    else:
        try:
            shard_format.check_manifest(manifest, manifest_path)
        except shard_format.ShardFormatError as e:
            problems.append(str(e))
    on_disk = sorted(os.path.relpath(os.path.join(d, f), shard_dir)
                     for s in shard_format.SPLITS
                     for d, _, fs in os.walk(os.path.join(shard_dir, s))
                     for f in fs if f.endswith(".tar"))
    for rel in sorted(set(on_disk) - set(sizes)):
        problems.append(f"{rel}: shard on disk but not in sizes.json")
    keys: Counter = Counter()
    granules = {"train": set(), "val": set()}
    per_split = Counter()
    shape = None
    nonfinite_l2 = 0
    total_l2 = 0
    for rel in tqdm(sorted(sizes), desc="shards", unit="shard", disable=not progress,
                    file=sys.stderr):
        path = os.path.join(shard_dir, rel)
        split = rel.split("/", 1)[0]
        if not os.path.exists(path):
            problems.append(f"{rel}: listed in sizes.json but missing")
            continue
        recorded = (manifest or {}).get("shard_bytes", {}).get(rel)
        if recorded is not None and os.path.getsize(path) != recorded:
            problems.append(f"{rel}: {os.path.getsize(path)} bytes, manifest.json says "
                            f"{recorded}")
        n = 0
        try:
            for raw in iter_tar_samples(path):
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
        if n != sizes[rel]:
            problems.append(f"{rel}: {n} samples, sizes.json says {sizes[rel]}")
        per_split[split] += n
    for k, c in keys.items():
        if c > 1:
            problems.append(f"sample key '{k}' appears {c} times")
    both = granules["train"] & granules["val"]
    if both:
        problems.append(f"granules in both train and val: {sorted(both)}")
    if manifest is not None:
        want = manifest["counts"]["per_split"]
        for s in ("train", "val"):
            if want.get(s, 0) != per_split[s]:
                problems.append(f"{s}: {per_split[s]} samples in shards, manifest says "
                                f"{want.get(s, 0)}")
    summary = {"shards": len(sizes), "samples": dict(per_split), "l1_shape": shape,
               "l2_invalid_fraction": (nonfinite_l2 / total_l2) if total_l2 else None,
               "granules": {s: len(g) for s, g in granules.items()}}
    return summary, problems


def main(argv=None) -> int:
    p = argument_parser("python -m data_prep.inspect_shards", __doc__)
    p.add_argument("shard_dir", help="shard folder made by make_shards or convert_pt_tiles "
                                     "(with sizes.json and manifest.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    setup_logging()
    summary, problems = inspect(args.shard_dir, not args.quiet)
    print(f"{args.shard_dir}: {summary.get('shards', 0)} shards, samples {summary.get('samples')}, "
          f"l1 shape {summary.get('l1_shape')}, granules {summary.get('granules')}, "
          f"L2 invalid fraction {summary.get('l2_invalid_fraction')}")
    for pr in problems:
        log.error(f"problem: {pr}")
    print("OK" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""TEMPO granules -> normalised tiles -> WebDataset tar shards.

Inputs: INPUT_DIR with RAD L1 and L2 (NO2, O3TOT, HCHO, CLDO4) granules, real or synthetic,
searched recursively. Outputs in OUT_DIR:

    train/*.tar, val/*.tar   WebDataset shards (sample format: data_prep/samples.py)
    sizes.json               shard path relative to OUT_DIR -> number of samples
    stats.json               normalisation stats from a seeded sample of the training
                             granules (--stats-fraction; compute_stats)
    manifest.json            every candidate tile: written, or dropped with its reason;
                             every input file used or ignored; the QA rules and what
                             each removed (per product, per bit or value, per granule)
    header.json              the part of the manifest the loader reads at start (format,
                             orders, units, tile size, shard byte sizes)
    plan.json                inputs and options of this run (a re-run must match it)
    units.json               the train/val split and the work units (granules of each)

Granules are split into train/val by a seeded permutation (no granule in both), grouped
into work units of about one shard's worth of tiles, and units run in parallel. Each unit
writes into ``.tmp/`` and moves finished shards into place before recording itself in
``.done/``; a re-run skips finished units and redoes the rest, so an interrupted run
completes without duplicates or lost tiles.

    python -m data_prep.make_shards data/synthetic data/shards --workers 2

On many nodes the same work runs as three steps with the same inputs and options: one
``--step plan`` (split, statistics, units), N independent ``--step run --task-index I
--num-tasks N`` (task I runs units I, I+N, I+2N, ...; a SLURM job array:
``scripts/make_shards_array.sbatch``), one ``--step merge`` (sizes.json, header.json,
manifest.json, checks). The result is byte for byte that of one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import sys
import tarfile
import time

import numpy as np
from tqdm import tqdm

from data_prep import compute_stats, shard_format
from data_prep.granule import ReadOptions, TileOptions, cut_tiles, read_granule, tile_positions
from data_prep.logs import get_logger, setup_logging
from data_prep.samples import L1_DTYPE
from data_prep.shard_format import FORMAT, SPLITS
from data_prep.tempo import (
    GranuleFiles,
    TempoFileError,
    discover,
    find_files,
    qa_rules,
    qa_rules_json,
)
from data_prep.util import argument_parser, atomic_write_json, read_json, reuse_freed_memory

log = get_logger(__name__)

# torch casts tiles to float16 (granule._to_float16) much faster than numpy's build does
# here, one value at a time (bench/bench_shards.py: 0.005 s against 0.17 s per granule of
# 132 x 512 x 1028, four times that at 2048 xtrack), but importing it costs ~1.5 s per
# worker: workers load it when each has at least this many granules to write
TORCH_CAST_MIN_GRANULES = 4


class OutputDirError(Exception):
    pass


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GB, 500MB, 123456)")
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m[2].lower()]
    return int(float(m[1]) * mult)


def load_qa_rules(path: str | None, specs: list[str]) -> dict:
    """Default QA rules, then the JSON file ``path``, then ``PRODUCT=RULE`` specs.
    Raises ValueError / OSError naming the file or spec."""
    overrides: dict = {}
    if path:
        obj = read_json(path)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: QA rules must be a JSON object {{PRODUCT: rule}}")
        overrides.update(obj)
    rules = qa_rules(overrides, f"{path}" if path else "QA rules")
    for spec in specs:
        prod, sep, rule = spec.partition("=")
        if not sep:
            raise ValueError(f"--qa {spec!r}: want PRODUCT=RULE")
        prod = prod.strip()
        rules[prod] = qa_rules({prod: rule}, f"--qa {spec!r}")[prod]
    return rules


def split_granules(keys: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Deterministic granule-level split: a seeded permutation of the sorted keys."""
    keys = sorted(keys)
    n_val = int(round(len(keys) * val_fraction))
    if val_fraction > 0 and len(keys) >= 2:
        n_val = min(max(n_val, 1), len(keys) - 1)
    order = np.random.default_rng(seed).permutation(len(keys))
    val = {keys[i] for i in order[:n_val]}
    return {k: ("val" if k in val else "train") for k in keys}


def _grid_shape(path: str, band: str) -> tuple[int, int, int] | None:
    import netCDF4

    try:
        with netCDF4.Dataset(path) as ds:
            return tuple(int(n) for n in ds.groups[band].variables["radiance"].shape)
    except Exception:
        return None


@dataclasses.dataclass
class Unit:
    id: str
    split: str
    granules: list[str]


def plan_units(granules: dict[str, GranuleFiles], split: dict[str, str], tile: TileOptions,
               band: str, shard_bytes: int, radiance_error: bool = False) -> list[Unit]:
    units: list[Unit] = []
    for s in SPLITS:
        keys = sorted(k for k, v in split.items() if v == s)
        n_units = 0
        cur: list[str] = []
        size = 0.0
        for k in keys:
            shape = _grid_shape(granules[k].rad, band) if granules[k].rad else None
            if shape is None:
                est = 0.0
            else:
                m, x, c = shape
                n = len(tile_positions(m, x, tile))
                l1 = c * tile.size**2 * np.dtype(L1_DTYPE).itemsize
                est = n * (l1 * (2 if radiance_error else 1) + 32 * tile.size**2)
            if cur and size + est > shard_bytes:
                units.append(Unit(f"{s}-{n_units:05d}", s, cur))
                n_units += 1
                cur, size = [], 0.0
            cur.append(k)
            size += est
        if cur:
            units.append(Unit(f"{s}-{n_units:05d}", s, cur))
    return units


class TarShardWriter:
    """Numbered tar shards (``pattern % index``, from 0), each closed when it holds
    ``max_count`` samples or ``max_bytes`` of payload: the rules and the bytes of
    webdataset's ``ShardWriter(..., encoder=False, mtime=0.0)`` (tested), written with the
    standard library's tar headers and each payload written straight from its buffer
    (no copy through ``BytesIO``, no 16 KiB copy loop, no torch import in workers).

    ``write(sample)``: ``sample`` maps ``__key__`` to the key and extensions to bytes; its
    members are written in sorted extension order as ``<key>.<ext>``."""

    user = group = "bigdata"
    mode = 0o444

    def __init__(self, pattern: str, max_count: int, max_bytes: float):
        self.pattern, self.max_count, self.max_bytes = pattern, max_count, max_bytes
        self.shard, self.count, self.size = 0, 0, 0
        self.fname: str | None = None
        self._f = None
        self._offset = 0

    def _next(self) -> None:
        self.close()
        self.fname = self.pattern % self.shard
        self.shard += 1
        self._f = open(self.fname, "wb")
        self.count = self.size = self._offset = 0

    def _member(self, name: str, data) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode = len(data), 0.0, self.mode
        ti.uname, ti.gname = self.user, self.group
        head = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        pad = -len(data) % tarfile.BLOCKSIZE
        self._f.write(head)
        self._f.write(data)
        if pad:
            self._f.write(tarfile.NUL * pad)
        self._offset += len(head) + len(data) + pad

    def write(self, sample: dict) -> None:
        if self._f is None or self.count >= self.max_count or self.size >= self.max_bytes:
            self._next()
        key = sample["__key__"]
        for ext in sorted(k for k in sample if k != "__key__"):
            data = sample[ext]
            if isinstance(data, str):
                data = data.encode()
            self._member(f"{key}.{ext}", data)
            self.size += len(data)
        self.count += 1

    def close(self) -> None:
        if self._f is None:
            return
        end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)
        self._offset += len(end)
        end += tarfile.NUL * (-self._offset % tarfile.RECORDSIZE)
        self._f.write(end)
        self._f.close()
        self._f = None


def _unit_files(out_dir: str, unit: Unit) -> list[str]:
    return glob.glob(os.path.join(out_dir, unit.split, f"{unit.id}-*.tar"))


def process_unit(out_dir: str, unit: Unit, granules: dict[str, GranuleFiles], mean, std,
                 read_opts: ReadOptions, tile: TileOptions, shard_bytes: int,
                 max_count: int) -> dict:
    """Write one unit's shards and record it as done. Safe to re-run after a crash."""
    for f in _unit_files(out_dir, unit):
        os.unlink(f)
    tmp = os.path.join(out_dir, ".tmp", unit.id)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    counts: dict[str, int] = {}
    records, reports, errors = [], {}, {}
    # fixed mtime: identical inputs give identical bytes
    writer = TarShardWriter(os.path.join(tmp, "%04d.tar"), max_count, shard_bytes)
    try:
        for key in unit.granules:
            try:
                ag = read_granule(granules[key], read_opts)
            except TempoFileError as e:
                errors[key] = str(e)
                continue
            reports[key] = ag.report | {"files": ag.files}
            n_pos = 0
            for rec, sample in cut_tiles(ag, mean, std, tile):
                n_pos += 1
                if sample is not None:
                    writer.write(sample)
                    name = os.path.basename(writer.fname)
                    counts[name] = counts.get(name, 0) + 1
                records.append(rec)
            if n_pos == 0:
                records.append({"key": None, "granule": key, "status": "dropped",
                                "reason": "granule_smaller_than_tile",
                                "grid": list(ag.radiance.shape[:2])})
            del ag
    finally:
        writer.close()
    shards, nbytes = {}, {}
    for name in sorted(counts):
        rel = f"{unit.split}/{unit.id}-{name}"
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, rel))
        shards[rel] = counts[name]
        nbytes[rel] = os.path.getsize(os.path.join(out_dir, rel))
    shutil.rmtree(tmp, ignore_errors=True)
    done = {"unit": unit.id, "split": unit.split, "granules": unit.granules, "shards": shards,
            "shard_bytes": nbytes, "records": records, "reports": reports, "errors": errors}
    atomic_write_json(os.path.join(out_dir, ".done", f"{unit.id}.json"), done)
    return done


def _unit_job(job):
    """``process_unit`` in a worker: ``job = (torch_threads, process_unit arguments)``;
    ``torch_threads`` None: cast with numpy; else load torch for the casts and, if > 0,
    limit its threads to that many."""
    torch_threads, args = job
    if torch_threads is not None:
        import torch

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
    return process_unit(*args)


def _check_out_dir(out_dir: str, plan: dict, overwrite: bool) -> None:
    plan_path = os.path.join(out_dir, "plan.json")
    if not os.path.exists(out_dir):
        return
    entries = [e for e in os.listdir(out_dir)]
    if not entries:
        return
    if os.path.exists(plan_path):
        old = read_json(plan_path)
        if old == plan:
            return
        if not overwrite:
            diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            raise OutputDirError(
                f"{out_dir} holds shards made from other inputs or options (differs in: "
                f"{', '.join(diff)}); use a new folder or --overwrite")
    elif not overwrite:
        raise OutputDirError(f"{out_dir} is not empty and is not a shard folder of ours "
                             f"({len(entries)} entries, no plan.json); use a new folder")
    else:
        raise OutputDirError(f"{out_dir} is not a shard folder of ours; refusing to delete it "
                             "even with --overwrite")
    for name in SPLITS + (".done", ".tmp"):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    for name in (shard_format.SIZES, shard_format.HEADER, shard_format.MANIFEST,
                 shard_format.STATS, "plan.json", "units.json"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.unlink(os.path.join(out_dir, name))


def build_manifest(out_dir: str, plan: dict, units: list[Unit], ignored, split) -> dict:
    sizes: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    tiles, reports, errors = [], {}, {}
    for u in units:
        d = read_json(os.path.join(out_dir, ".done", f"{u.id}.json"))
        sizes.update(d["shards"])
        nbytes.update(d.get("shard_bytes", {}))
        tiles.extend(d["records"])
        reports.update(d["reports"])
        errors.update(d["errors"])
    qa_removed: dict[str, dict[str, int]] = {}
    for rep in reports.values():
        for p, r in rep.get("l2", {}).items():
            q = qa_removed.setdefault(p, {"pixels": 0})
            q["pixels"] += r.get("bad_qa", 0)
            for k, n in r.get("qa_removed", {}).items():
                q[k] = q.get(k, 0) + n
    dropped: dict[str, int] = {}
    for r in tiles:
        if r["status"] == "dropped":
            dropped[r["reason"]] = dropped.get(r["reason"], 0) + 1
    written = sum(1 for r in tiles if r["status"] == "written")
    per_split = {s: sum(n for k, n in sizes.items() if k.startswith(s + "/")) for s in SPLITS}
    manifest = shard_format.manifest_header("make_shards", plan["options"]["tile"]["size"]) | {
        "options": plan["options"],
        "splits": {s: sorted(k for k, v in split.items() if v == s) for s in SPLITS},
        "counts": {"candidate_tiles": sum(1 for r in tiles if r["key"]),
                   "written": written, "dropped": dropped, "per_split": per_split,
                   "granules": len(split), "granule_errors": len(errors),
                   "ignored_files": len(ignored),
                   "qa_removed": qa_removed},  # L2 pixels per product, and per bit / value
        "qa_rules": plan["options"]["read"].get("qa"),
        "shard_bytes": dict(sorted(nbytes.items())),  # the trainer checks these at start
        "granule_errors": errors,
        "ignored_files": [{"path": p, "reason": r} for p, r in ignored],
        "granules": reports,
        "tiles": tiles,
    }
    shard_format.write_metadata(out_dir, sizes, None, manifest)  # stats.json: at --step plan
    return manifest


def sample_granules(keys: list[str], fraction: float, min_granules: int, seed: int) -> list[str]:
    """Deterministic sample of granule keys for the statistics: a seeded permutation of the
    sorted keys, the first ``max(min_granules, ceil(fraction * n))`` of them (all when that
    is n or more), returned sorted."""
    keys = sorted(keys)
    n = min(len(keys), max(min_granules, math.ceil(fraction * len(keys))))
    order = np.random.default_rng([seed, 5]).permutation(len(keys))
    return sorted(keys[i] for i in order[:n])


def _discover(args):
    """(granules by key, ignored files, plan dict) from the input folder and options."""
    try:
        rules = load_qa_rules(args.qa_rules, args.qa)
    except (OSError, ValueError) as e:
        raise OutputDirError(str(e)) from None
    read_opts = ReadOptions(band=args.band, mirror_step_policy=args.mirror_step_policy,
                            require_products=args.require_products, qa=qa_rules_json(rules),
                            radiance_error=args.radiance_error)
    tile = TileOptions(args.tile_size, args.stride or args.tile_size, args.min_valid_fraction,
                       args.max_bad_channel_fraction)
    if not os.path.isdir(args.input_dir):
        raise OutputDirError(f"input folder {args.input_dir} does not exist")
    files = find_files(args.input_dir)
    found, ignored = discover(files)
    for g in list(found.values()):
        if g.rad is None:
            for p in g.l2.values():
                ignored.append((p, f"no RAD L1 file for granule {g.gid.key}"))
            del found[g.gid]
    granules = {g.gid.key: g for g in found.values()}
    if not granules:
        raise OutputDirError(f"no granule with a RAD L1 file in {args.input_dir} "
                             f"({len(files)} files looked at)")
    plan = {"format": FORMAT, "inputs": sorted(os.path.relpath(f, args.input_dir)
                                               for g in granules.values()
                                               for f in [g.rad, *g.l2.values()]),
            "options": {"tile": dataclasses.asdict(tile), "read": dataclasses.asdict(read_opts),
                        "val_fraction": args.val_fraction, "seed": args.seed,
                        "shard_bytes": args.shard_size, "max_samples_per_shard":
                            args.max_samples_per_shard,
                        "stats": os.path.abspath(args.stats) if args.stats else None,
                        "stats_fraction": args.stats_fraction,
                        "stats_min_granules": args.stats_min_granules}}
    plan = json.loads(json.dumps(plan))  # the form plan.json holds (lists, not tuples)
    return granules, ignored, plan, read_opts, tile


def step_plan(args, granules, plan, read_opts, tile) -> int:
    """Write plan.json, stats.json (sampled training granules, or --stats) and units.json."""
    _check_out_dir(args.out_dir, plan, args.overwrite)
    os.makedirs(args.out_dir, exist_ok=True)
    for s in SPLITS + (".done",):
        os.makedirs(os.path.join(args.out_dir, s), exist_ok=True)
    atomic_write_json(os.path.join(args.out_dir, "plan.json"), plan)
    split = split_granules(list(granules), args.val_fraction, args.seed)
    stats_path = os.path.join(args.out_dir, "stats.json")
    if args.stats:
        atomic_write_json(stats_path, read_json(args.stats))
    elif not os.path.exists(stats_path):
        train = [k for k, v in split.items() if v == "train"]
        use = sample_granules(train, args.stats_fraction, args.stats_min_granules, args.seed)
        if not args.quiet and len(use) < len(train):
            log.info(f"statistics from {len(use)} of {len(train)} training granules "
                     f"(--stats-fraction {args.stats_fraction})")
        st, errs = compute_stats.compute([granules[k] for k in use], read_opts, args.workers,
                                         progress=not args.quiet)
        for k, e in errs.items():
            log.warning(f"stats skip granule {k}: {e}")
        if st is None:
            log.error("no training granule could be read; nothing written")
            return 1
        out = st.to_json()
        out["sampled_from"] = {"training_granules": len(train), "used": len(use),
                               "fraction": args.stats_fraction,
                               "min_granules": args.stats_min_granules}
        atomic_write_json(stats_path, out)
    units_path = os.path.join(args.out_dir, "units.json")
    if not os.path.exists(units_path):
        units = plan_units(granules, split, tile, args.band, args.shard_size,
                           args.radiance_error)
        atomic_write_json(units_path, {"split": split,
                                       "units": [dataclasses.asdict(u) for u in units]})
    return 0


def _load_units(out_dir: str) -> tuple[dict, list[Unit]]:
    d = read_json(os.path.join(out_dir, "units.json"))
    return d["split"], [Unit(**u) for u in d["units"]]


def _require_plan(args, plan) -> None:
    path = os.path.join(args.out_dir, "plan.json")
    for name in ("plan.json", "stats.json", "units.json"):
        if not os.path.exists(os.path.join(args.out_dir, name)):
            raise OutputDirError(f"{os.path.join(args.out_dir, name)} is missing: run "
                                 "--step plan first (same inputs and options)")
    old = read_json(path)
    if old != plan:
        diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        raise OutputDirError(f"{path} was planned with other inputs or options (differs in: "
                             f"{', '.join(diff)}); give every step the same ones")


def step_run(args, granules, read_opts, tile, task_index: int, num_tasks: int) -> int:
    """Run the units of this task (unit i belongs to task i mod num_tasks) that are not done
    yet; returns the number of units run."""
    stats = read_json(os.path.join(args.out_dir, "stats.json"))
    mean = np.asarray(stats["l1"]["mean"], np.float32)
    std = np.asarray(stats["l1"]["std"], np.float32)
    _, units = _load_units(args.out_dir)
    mine = [u for i, u in enumerate(units) if i % num_tasks == task_index]
    todo = []
    for u in mine:
        marker = os.path.join(args.out_dir, ".done", f"{u.id}.json")
        if os.path.exists(marker) and not read_json(marker)["errors"]:
            continue
        todo.append(u)
    skipped = len(mine) - len(todo)
    if skipped and not args.quiet:
        log.info(f"resuming: {skipped} of {len(mine)} work units already done")
    parallel = args.workers > 1 and len(todo) > 1
    n_workers = min(args.workers, len(todo)) if parallel else 1
    n_granules = sum(len(u.granules) for u in todo)
    # torch in pool workers runs on one thread (one worker per core); inline, as it is set
    torch_threads = (1 if parallel else 0) \
        if n_granules >= TORCH_CAST_MIN_GRANULES * n_workers else None
    jobs = [(torch_threads, (args.out_dir, u, granules, mean, std, read_opts, tile,
                             args.shard_size, args.max_samples_per_shard)) for u in todo]
    # workers reuse the pages of one band's tile buffers for the next
    with (compute_stats.pool_context().Pool(n_workers, reuse_freed_memory) if parallel
          else compute_stats._Inline()) as pool:
        for _ in tqdm(pool.imap_unordered(_unit_job, jobs), total=len(jobs), desc="shards",
                      unit="unit", disable=args.quiet, file=sys.stderr):
            pass
    return len(jobs)


def verify(out_dir: str, manifest: dict) -> list[str]:
    """Cheap checks of a merged folder (no shard is opened): every shard of sizes.json is
    there with the byte size its unit recorded, header.json agrees with the manifest, and
    the counts tie out."""
    problems = []
    sizes = read_json(os.path.join(out_dir, "sizes.json"))
    for rel, nbytes in manifest["shard_bytes"].items():
        path = os.path.join(out_dir, rel)
        if not os.path.exists(path):
            problems.append(f"{rel}: missing")
        elif os.path.getsize(path) != nbytes:
            problems.append(f"{rel}: {os.path.getsize(path)} bytes, its unit wrote {nbytes}")
    if set(sizes) != set(manifest["shard_bytes"]):
        problems.append("sizes.json and manifest.json list different shards")
    if read_json(os.path.join(out_dir, shard_format.HEADER)) != shard_format.header(manifest):
        problems.append("header.json differs from the header of manifest.json")
    c = manifest["counts"]
    if sum(sizes.values()) != c["written"]:
        problems.append(f"sizes.json counts {sum(sizes.values())} samples, the manifest "
                        f"{c['written']} written tiles")
    on_disk = {os.path.join(s, f) for s in SPLITS for f in os.listdir(os.path.join(out_dir, s))}
    extra = sorted(on_disk - set(sizes))
    if extra:
        problems.append(f"{len(extra)} shard file(s) not in sizes.json, e.g. {extra[0]}")
    return problems


def describe_ignored(ignored: list[tuple[str, str]], base: str | None = None) -> str:
    """``ignored`` [(path, reason)] as a count per reason with one example each (relative
    to ``base`` when given), e.g. ``16 (16 not a TEMPO granule file name, e.g.
    truth/TEMPO_TRUTH_..._S001G01.nc; all listed in manifest.json)``."""
    if not ignored:
        return "0"
    by_reason: dict[str, list[str]] = {}
    for path, reason in ignored:
        by_reason.setdefault(reason, []).append(os.path.relpath(path, base) if base else path)
    parts = [f"{len(paths)} {reason}, e.g. {paths[0]}" for reason, paths in
             sorted(by_reason.items(), key=lambda kv: -len(kv[1]))]
    return f"{len(ignored)} ({'; '.join(parts)}; all listed in manifest.json)"


def step_merge(args, plan, ignored, t0: float) -> int:
    split, units = _load_units(args.out_dir)
    missing = [(i, u.id) for i, u in enumerate(units)
               if not os.path.exists(os.path.join(args.out_dir, ".done", f"{u.id}.json"))]
    if missing:
        log.error(f"{len(missing)} of {len(units)} work units are not done, e.g. unit "
                  f"{missing[0][0]} ({missing[0][1]}); run --step run for their tasks "
                  "(unit i belongs to task i mod --num-tasks)")
        return 1
    shutil.rmtree(os.path.join(args.out_dir, ".tmp"), ignore_errors=True)
    man = build_manifest(args.out_dir, plan, units, ignored, split)
    problems = verify(args.out_dir, man)
    for p in problems:
        log.error(p)
    c = man["counts"]
    log.info(f"{c['written']} tiles written ({c['per_split']['train']} train, "
             f"{c['per_split']['val']} val) of {c['candidate_tiles']} candidates from "
             f"{c['granules']} granules in {time.time() - t0:.1f}s; dropped: "
             f"{json.dumps(c['dropped'])}; ignored files: {describe_ignored(ignored, args.input_dir)}; "
             f"granule errors: {c['granule_errors']}")
    for k, e in man["granule_errors"].items():
        log.error(f"granule {k}: {e}")
    return 1 if man["granule_errors"] or problems else 0


def run(args) -> int:
    t0 = time.time()
    if args.workers > 1 and args.step != "merge":
        compute_stats.start_pool_server()
    try:
        granules, ignored, plan, read_opts, tile = _discover(args)
        if args.step in ("plan", "all"):
            rc = step_plan(args, granules, plan, read_opts, tile)
            if rc or args.step == "plan":
                if not rc and not args.quiet:
                    n = len(_load_units(args.out_dir)[1])
                    log.info(f"planned {n} work units in {args.out_dir}/units.json")
                return rc
        _require_plan(args, plan)
        if args.step in ("run", "all"):
            n = step_run(args, granules, read_opts, tile, args.task_index, args.num_tasks)
            if args.step == "run":
                if not args.quiet:
                    log.info(f"task {args.task_index} of {args.num_tasks}: {n} work units run")
                return 0
        return step_merge(args, plan, ignored, t0)
    except OutputDirError as e:
        log.error(str(e))
        return 2


def parse_args(argv=None):
    p = argument_parser("python -m data_prep.make_shards", __doc__)
    p.add_argument("input_dir", help="folder with TEMPO granules (searched recursively)")
    p.add_argument("out_dir", help="folder for shards, stats and manifest")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    p.add_argument("--shard-size", type=parse_size, default="1GB",
                   help="target size of a shard (B, KB, MB, GB)")
    p.add_argument("--max-samples-per-shard", type=int, default=100000,
                   help="at most this many tiles per shard")
    p.add_argument("--tile-size", type=int, default=64,
                   help="tile height and width in pixels (mirror steps x cross-track)")
    p.add_argument("--stride", type=int, default=None,
                   help="step between tile origins (default: the tile size, no overlap)")
    p.add_argument("--min-valid-fraction", type=float, default=TileOptions.min_valid_fraction,
                   help="drop tiles with fewer valid L1 pixels than this")
    p.add_argument("--max-bad-channel-fraction", type=float,
                   default=TileOptions.max_bad_channel_fraction,
                   help="a pixel with more invalid channels than this is invalid")
    p.add_argument("--val-fraction", type=float, default=0.3,
                   help="fraction of granules in the validation split")
    p.add_argument("--seed", type=int, default=42, help="seed of the train/val split")
    p.add_argument("--stats", default=None, help="use this stats JSON instead of computing it")
    p.add_argument("--stats-fraction", type=float, default=0.1,
                   help="statistics from this fraction of the training granules (a seeded "
                        "sample; error against full statistics: bench/README.md)")
    p.add_argument("--stats-min-granules", type=int, default=8,
                   help="but from at least this many (all when there are fewer)")
    p.add_argument("--step", choices=("all", "plan", "run", "merge"), default="all",
                   help="all: everything in this process; plan / run / merge: the steps of "
                        "a job over many nodes (scripts/make_shards_array.sbatch)")
    p.add_argument("--task-index", type=int, default=0,
                   help="--step run: this task's index; it runs units i with i mod "
                        "--num-tasks == index (e.g. $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num-tasks", type=int, default=1,
                   help="--step run: number of tasks sharing the units")
    p.add_argument("--band", default=ReadOptions.band, help="RAD band group to read")
    p.add_argument("--mirror-step-policy", choices=("trim", "error"), default="trim",
                   help="L1/L2 with different mirror-step counts: use common rows, or fail")
    p.add_argument("--require-products", action="store_true",
                   help="a granule missing any L2 product is an error (default: NaN targets)")
    p.add_argument("--qa", action="append", default=[], metavar="PRODUCT=RULE",
                   help="quality rule of one L2 product, replacing its default: 'none', or "
                        "';'-separated bits:LIST (reject a pixel with any of these bits set), "
                        "accept:LIST (kept values of the flag, or of its listed bits), "
                        "variable:PATH; e.g. --qa NO2=accept:0,1 --qa CLDO4=bits:0,3,8,9,12. "
                        "Defaults (DESIGN.md section 2, tempo_sdpc): NO2, HCHO "
                        "main_data_quality_flag accept:0; O3TOT quality_flag bits:0-2 "
                        "(error code 0); CLDO4 processing_quality_flag bits:0,3,8,9,12 "
                        "(clear sky, bit 13, is kept)")
    p.add_argument("--qa-rules", default=None, metavar="JSON",
                   help="file of quality rules: {PRODUCT: {variable, bits, accept} | null}; "
                        "keys merge into the defaults; --qa applies after it")
    p.add_argument("--radiance-error", action="store_true",
                   help="also store the RAD radiance_error per tile as <key>.l1_sigma.npy "
                        "(float16, normalised units): as many bytes again as l1 "
                        "(C*H*W*2, 8.4 MB for a 1028x64x64 tile)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards made with other options in OUT_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    setup_logging(quiet=args.quiet)
    if args.tile_size < 1 or (args.stride is not None and args.stride < 1):
        p.error("--tile-size and --stride must be >= 1")
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if not 0 < args.stats_fraction <= 1 or args.stats_min_granules < 1:
        p.error("--stats-fraction must be in (0, 1] and --stats-min-granules >= 1")
    if args.num_tasks < 1 or not 0 <= args.task_index < args.num_tasks:
        p.error("--task-index must be in [0, --num-tasks)")
    return args


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

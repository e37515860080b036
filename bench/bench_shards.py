"""make_shards throughput against reading the same radiance with netCDF4; bytes per tile.

Synthesizes (once, kept in --workdir) 2 granules at the real granule depth and spectral
size, 132 mirror steps x 512 xtrack x 1028 channels (a real granule has 2048 xtrack; 512
keeps the bench short), uncompressed (``--compress``: radiance deflated as in NASA's
files), and in one run measures:

  raw read      netCDF4 reads the radiance variable of the 2 RAD files, one process,
                without masked arrays (the fastest plain read; best of --repeats)
  make_shards   end to end in a fresh process (the time of ``make_shards.main``: discovery,
                planning, fork server and worker start-up, netCDF read of RAD + 4 L2 files,
                QA, alignment, normalisation, tiling, tar writing, manifest), one worker per
                core, one unit per granule: (a) with the statistics pass (here every
                granule: fewer than --stats-min-granules), (b) statistics given (--stats),
                the month-scale case where the sampled statistics read ~10% of the granules
  stats pass    the statistics of (a) alone, in this process
  by stage      one granule in this process (warm), with numpy's and with torch's
                float16 cast (make_shards workers use torch's when each has at least
                ``make_shards.TORCH_CAST_MIN_GRANULES`` granules: its import costs ~1.5 s)

and prints ratios raw read time / make_shards time (higher is better; goal >= 0.5), bytes
per tile, the read bandwidth a GPU needs at the research model's speed, and what
byte-shuffled zstd (numcodecs Blosc, if installed) would save on the radiance and how fast
it decodes against a plain read of the same bytes. Only ratios measured within one run are
meaningful on a shared machine.

    python bench/bench_shards.py [--workdir /tmp/bench_shards] [--workers N] [--against REV]
                                 [--compress]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import compute_stats, make_shards, samples, synthesize  # noqa: E402
from data_prep.granule import ReadOptions  # noqa: E402
from data_prep.tempo import L1_BAND, discover, find_files  # noqa: E402
from data_prep.util import (  # noqa: E402
    HelpFormatter,
    atomic_write_json,
    read_json,
    reuse_freed_memory,
)

RESEARCH_TILES_PER_S = 43.0  # research code, one GPU (bench/README.md, GPU section)


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def raw_read(files: list[str], masked: bool = False,
             variables: tuple[str, ...] = ("radiance",)) -> None:
    import netCDF4

    for f in files:
        with netCDF4.Dataset(f) as ds:
            for name in variables:
                v = ds.groups[L1_BAND].variables[name]
                v.set_auto_mask(masked)
                v[...]


def stages(granule, stats: dict, repeats: int) -> dict[str, float]:
    """Seconds per stage for one granule in this process (best of ``repeats``, warm)."""
    import tempfile

    import torch

    from data_prep import granule as gmod
    from data_prep.granule import TileOptions, cut_tiles, read_granule

    torch.set_num_threads(1)  # one worker per core
    reuse_freed_memory()  # as make_shards' workers do
    mean = np.asarray(stats["l1"]["mean"], np.float32)
    std = np.asarray(stats["l1"]["std"], np.float32)
    ag = read_granule(granule, ReadOptions())
    out = {"read_granule (RAD + L2 read, QA, align)":
           best_of(repeats, lambda: read_granule(granule, ReadOptions()))}
    out["  of which: netCDF4 read of radiance + pixel_quality_flag"] = best_of(
        repeats, lambda: raw_read([granule.rad], variables=("radiance", "pixel_quality_flag")))
    tiles = []

    def cut():
        tiles[:] = [s for _, s in cut_tiles(ag, mean, std, TileOptions()) if s is not None]

    out["cut_tiles, torch's float16 cast"] = best_of(repeats, cut)
    saved = sys.modules.pop("torch")  # granule._to_float16 falls back to numpy
    try:
        out["cut_tiles, numpy's float16 cast"] = best_of(repeats, cut)
    finally:
        sys.modules["torch"] = saved
    # the cast alone, on as many values as cut_tiles casts (one tile row at a time)
    n_rows = len({r for r, _ in gmod.tile_positions(*ag.radiance.shape[:2], TileOptions())})
    z = np.clip(np.random.default_rng(0).normal(0, 3, ag.radiance.shape[1:]), -10, 10
                ).astype(np.float32)
    z16 = np.empty(z.shape, np.float16)
    rows = n_rows * TileOptions().size
    out["  of which: float16 cast, torch"] = best_of(
        repeats, lambda: [gmod._to_float16(z, z16) for _ in range(rows)])
    out["  of which: float16 cast, numpy"] = best_of(
        repeats, lambda: [np.copyto(z16, z, casting="same_kind") for _ in range(rows)])
    with tempfile.TemporaryDirectory() as d:
        def write():
            w = make_shards.TarShardWriter(os.path.join(d, "%04d.tar"), 10**6, 1e12)
            for s in tiles:
                w.write(s)
            w.close()
        out["tar write"] = best_of(repeats, write)
    return out


def codec_figures(out: str, n_tiles: int, repeats: int) -> None:
    """Blosc (zstd, byte shuffle) on the L1 members of the written shards."""
    try:
        from numcodecs import Blosc
    except ImportError:
        print("byte-shuffled zstd: numcodecs is not installed (pip install numcodecs); skipped")
        return
    Blosc.use_threads = False  # one loader worker = one core
    print("byte-shuffled zstd (numcodecs Blosc) of the L1 float16 members, lossless:")
    arrays, total = [], 0
    for path in sorted(glob.glob(os.path.join(out, "train", "*.tar"))):
        for raw in samples.iter_tar(path):
            arrays.append(samples.npy_array(raw[samples.L1_KEY]))
            total += sum(len(v) for k, v in raw.items() if k != "__key__")
    l1_bytes = sum(a.nbytes for a in arrays)
    dst = np.empty_like(arrays[0])
    paths = sorted(glob.glob(os.path.join(out, "train", "*.tar")))

    def plain():  # the loader's path: each L1 payload read from its shard into the batch
        for path in paths:
            for raw in samples.iter_tar(path, 1 << 20):
                samples.npy_array(raw[samples.L1_KEY]).read_into(dst)

    t_plain = best_of(repeats, plain)
    for level in (1, 3):
        codec = Blosc(cname="zstd", clevel=level, shuffle=Blosc.SHUFFLE)
        t = time.perf_counter()
        enc = [codec.encode(a) for a in arrays]
        t_enc = time.perf_counter() - t
        comp = sum(len(e) for e in enc)

        def decode(codec=codec, enc=enc):
            for e in enc:
                codec.decode(e, out=dst)

        t_dec = best_of(repeats, decode)
        per_tile = (total - l1_bytes + comp) / n_tiles
        print(f"  zstd level {level} + byte shuffle: L1 {l1_bytes / comp:.2f}x smaller, "
              f"sample {total / n_tiles / 1e6:.2f} -> {per_tile / 1e6:.2f} MB "
              f"({total / n_tiles / per_tile:.2f}x); decode {l1_bytes / t_dec / 1e9:.2f} GB/s "
              f"per core = {t_plain / t_dec:.2f}x the loader's read of the same tiles "
              f"from the shards ({l1_bytes / t_plain / 1e9:.2f} GB/s); encode "
              f"{l1_bytes / t_enc / 1e9:.2f} GB/s per core")


def make_shards_fresh(tree: str, gran: str, out: str, common: list[str],
                      stats: str | None) -> float:
    """Seconds of ``make_shards.main`` of the source tree ``tree`` in a fresh process
    (fork server and workers started anew; the interpreter's own start and imports not
    counted)."""
    import subprocess

    code = ("import sys, time; from data_prep import make_shards; t = time.perf_counter(); "
            "assert make_shards.main(sys.argv[1:]) == 0; print(time.perf_counter() - t)")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", code, gran, out] + common + \
        (["--stats", stats] if stats else [])
    r = subprocess.run(cmd, cwd=tree, env=dict(os.environ, PYTHONPATH=tree),
                       capture_output=True, text=True, check=True)
    return float(r.stdout.split()[-1])


def against_revision(rev: str, gran: str, workdir: str, common: list[str], stats: str,
                     repeats: int) -> None:
    """make_shards of git revision ``rev`` (exported with ``git archive``) against this tree,
    each in a fresh process, interleaved, best of ``repeats``."""
    import subprocess

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    old = os.path.join(workdir, f"rev-{rev}")
    if not os.path.exists(os.path.join(old, "data_prep")):
        os.makedirs(old, exist_ok=True)
        archive = subprocess.run(["git", "-C", here, "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
    outs = {old: os.path.join(workdir, "shards-rev"), here: os.path.join(workdir, "shards-this")}
    best: dict = {}
    for _ in range(repeats):
        for name, tree in ((rev, old), ("this tree", here)):
            for given in (False, True):
                t = make_shards_fresh(tree, gran, outs[tree], common, stats if given else None)
                best[name, given] = min(best.get((name, given), t), t)
    a, b = (read_json(os.path.join(outs[t], "sizes.json")) for t in (old, here))
    same = a == b and all(open(os.path.join(outs[old], k), "rb").read()
                          == open(os.path.join(outs[here], k), "rb").read() for k in a)
    print(f"  shards of both, statistics given: {'byte-identical' if same else 'DIFFERENT'}")
    for given in (False, True):
        what = "statistics given" if given else "with statistics pass"
        print(f"  {what:22s} {rev}: {best[rev, given]:6.2f} s, this tree: "
              f"{best['this tree', given]:6.2f} s -> {best[rev, given] / best['this tree', given]:.1f}x "
              "faster")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--granules", type=int, default=2, help="synthetic RAD + L2 granules")
    p.add_argument("--mirror-steps", type=int, default=132, help="mirror steps per granule")
    p.add_argument("--xtrack", type=int, default=512, help="cross-track pixels")
    p.add_argument("--channels", type=int, default=1028, help="spectral channels")
    p.add_argument("--compress", action="store_true",
                   help="deflate the radiance (level 1, one chunk per mirror step) as NASA's "
                        "RAD files are; the raw read then includes decompression")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="make_shards workers (one per core)")
    p.add_argument("--repeats", type=int, default=3, help="timings per figure (best taken)")
    p.add_argument("--workdir", default="/tmp/bench_shards",
                   help="granules and shards (granules reused when present)")
    p.add_argument("--against", metavar="GIT_REV", default=None,
                   help="also time make_shards of this git revision, interleaved with this "
                        "tree (fresh processes, best of 2)")
    args = p.parse_args()
    gran = os.path.join(args.workdir, f"granules_{args.granules}x{args.mirror_steps}x"
                                      f"{args.xtrack}x{args.channels}"
                                      + ("_deflated" if args.compress else ""))
    if not os.path.exists(os.path.join(gran, "done")):
        shutil.rmtree(gran, ignore_errors=True)
        synthesize.main([gran, "--granules", str(args.granules), "--mirror-steps",
                         str(args.mirror_steps), "--xtrack", str(args.xtrack), "--channels",
                         str(args.channels), "--seed", "1"]
                        + (["--compress"] if args.compress else []))
        open(os.path.join(gran, "done"), "w").close()
    found, _ = discover(find_files(gran))
    rad_files = sorted(g.rad for g in found.values())
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.join(args.workdir, "shards")
    stats_file = os.path.join(args.workdir, "stats.json")
    # one unit per granule: a month has thousands of units; two granules need two
    shard = str(int(args.mirror_steps * args.xtrack * args.channels * 2 * 0.9))
    common = ["--quiet", "--val-fraction", "0", "--workers", str(args.workers),
              "--shard-size", shard]

    def stats_only():
        st, _ = compute_stats.compute(list(found.values()), ReadOptions(), args.workers,
                                      progress=False)
        atomic_write_json(stats_file, st.to_json())

    raw_read(rad_files)  # page cache warm for everyone
    t_stats = best_of(1, stats_only)
    t_raw = best_of(args.repeats, lambda: raw_read(rad_files))
    t_masked = best_of(args.repeats, lambda: raw_read(rad_files, masked=True))
    t_a = make_shards_fresh(here, gran, out, common, None)
    t_b = min(make_shards_fresh(here, gran, out, common, stats_file) for _ in range(2))
    t_raw = min(t_raw, best_of(args.repeats, lambda: raw_read(rad_files)))  # noise check
    per_stage = stages(next(iter(found.values())), read_json(stats_file), 2)

    sizes = read_json(os.path.join(out, "sizes.json"))
    n = sum(sizes.values())
    tar_bytes = sum(os.path.getsize(os.path.join(out, k)) for k in sizes)
    m, x, c = args.mirror_steps, args.xtrack, args.channels
    print(f"{args.granules} granules of {m} x {x} x {c}"
          f"{', radiance deflated' if args.compress else ', uncompressed'}; {n} tiles of "
          f"{c} x 64 x 64 in {len(sizes)} shards; {args.workers} workers (cores: "
          f"{os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at the end: other work "
          "on the cores slows the parallel figures, not the per-core one)")
    print(f"raw netCDF4 read of the radiance      {t_raw:7.2f} s  (1 process; masked "
          f"arrays, netCDF4's default: {t_masked:.2f} s)")
    print(f"make_shards (a) with statistics pass  {t_a:7.2f} s  ratio raw/e2e "
          f"{t_raw / t_a:.2f} (vs the default read {t_masked / t_a:.2f})")
    print(f"make_shards (b) statistics given      {t_b:7.2f} s  ratio raw/e2e "
          f"{t_raw / t_b:.2f} (vs the default read {t_masked / t_b:.2f})")
    print(f"statistics pass alone                 {t_stats:7.2f} s  ratio raw/stats "
          f"{t_raw / t_stats:.2f}")
    per_granule = t_raw / len(rad_files)
    write = per_stage["tar write"]
    read = per_stage["read_granule (RAD + L2 read, QA, align)"]
    for cast in ("torch", "numpy"):
        total = read + per_stage[f"cut_tiles, {cast}'s float16 cast"] + write
        print(f"one granule, one process, {cast}'s cast: {total:.2f} s = ratio raw/pipeline "
              f"per core {per_granule / total:.2f} (vs the default read "
              f"{t_masked / len(rad_files) / total:.2f})")
    print(f"  by stage (make_shards casts with torch in workers of at least "
          f"{make_shards.TORCH_CAST_MIN_GRANULES} granules; here each has "
          f"{args.granules / args.workers:g})")
    for k, v in per_stage.items():
        print(f"  {k:58s} {v:6.3f} s")
    per_tile = tar_bytes / n
    l1 = c * 64 * 64 * 2
    print(f"bytes per tile: {per_tile / 1e6:.3f} MB in the shards (L1 float16 "
          f"{l1 / 1e6:.3f} MB = {l1 / per_tile:.1%}; L2 + geo float32 "
          f"{2 * 4 * 64 * 64 * 4 / 1e6:.3f} MB; json + tar headers the rest)")
    bw = RESEARCH_TILES_PER_S * per_tile
    print(f"GPU read bandwidth at the research model's {RESEARCH_TILES_PER_S:.0f} tiles/s: "
          f"{bw / 1e6:.0f} MB/s per GPU, {8 * bw / 1e9:.2f} GB/s for 8 GPUs")
    codec_figures(out, n, args.repeats)
    if args.against:
        print(f"make_shards end to end against revision {args.against}:")
        against_revision(args.against, gran, args.workdir, common, stats_file, 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

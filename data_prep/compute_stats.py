"""Normalisation statistics from the training granules.

Inputs: a folder of TEMPO granules (RAD L1 + L2). Output: a stats JSON with, per spectral
channel, the mean and std of log(max(radiance, 1)) over valid pixels, and per L2 product
count, mean, std, min, max, median and MAD (for the asinh/z-score transforms). Partial
results are computed per granule in parallel and merged exactly.

    python -m data_prep.compute_stats data/synthetic data/stats.json --workers 2

``make_shards`` runs this on its training split; run it alone to inspect or reuse stats
(``make_shards --stats FILE``).
"""

from __future__ import annotations

import multiprocessing as mp
import sys

import numpy as np
from tqdm import tqdm

from data_prep.granule import ReadOptions, read_granule
from data_prep.logs import get_logger, setup_logging
from data_prep.stats import DatasetStats, log_radiance
from data_prep.tempo import GranuleFiles, TempoFileError, discover, find_files
from data_prep.util import argument_parser, atomic_write_json, reuse_freed_memory

log = get_logger(__name__)


def granule_stats(g: GranuleFiles, opts: ReadOptions, k: int = 1_000_000) -> DatasetStats:
    ag = read_granule(g, opts)
    m, x, c = ag.radiance.shape
    st = DatasetStats.empty(c, k)
    rows = max(1, int(4e6 // (x * c)))
    for r0 in range(0, m, rows):
        st.l1.update(log_radiance(ag.radiance[r0:r0 + rows]).reshape(-1, c))
    st.l2.update(ag.l2, ag.key)
    st.wavelength = ag.wavelength.astype(np.float64).mean(axis=0)
    st.granules = [ag.key]
    return st


def _job(args):
    g, opts, k = args
    try:
        return g.gid.key, granule_stats(g, opts, k), None
    except TempoFileError as e:
        return g.gid.key, None, str(e)


def compute(granules: list[GranuleFiles], opts: ReadOptions, workers: int = 1,
            k: int = 1_000_000, progress: bool = True) -> tuple[DatasetStats | None, dict]:
    """Merge per-granule stats; returns (stats or None if nothing was read, errors)."""
    total: DatasetStats | None = None
    errors: dict[str, str] = {}
    jobs = [(g, opts, k) for g in granules]
    # workers reuse the memory of one granule's buffers for the next
    with (pool_context().Pool(workers, reuse_freed_memory) if workers > 1
          else _Inline()) as pool:
        it = pool.imap_unordered(_job, jobs)
        for key, st, err in tqdm(it, total=len(jobs), desc="stats", unit="granule",
                                 disable=not progress, file=sys.stderr):
            if err:
                errors[key] = err
                continue
            if total is None:
                total = st
            elif st.l1.count.shape != total.l1.count.shape:
                errors[key] = (f"granule {key} has {st.l1.count.size} channels, others have "
                               f"{total.l1.count.size}")
            else:
                total.merge(st)
    return total, errors


def pool_context():
    """Worker processes from a fork server where the platform has one: the server is
    started once, clean (no threads), with numpy, netCDF4 and the reading code imported,
    and each worker is forked from it in milliseconds. A plain fork of the calling process
    is not used: a process with threads (OpenBLAS, OpenMP, tqdm's monitor, a caller's
    own) can hand a worker a lock that is never released, and the worker hangs; spawn
    (elsewhere) imports everything again in each worker (~0.4 s)."""
    methods = mp.get_all_start_methods()
    if "forkserver" not in methods:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # not the commands' own modules: run as ``python -m``, they are the fork server's
    # __main__, and preloading them too makes runpy warn
    ctx.set_forkserver_preload(["numpy", "netCDF4", "data_prep.granule", "data_prep.stats"])
    return ctx


def start_pool_server() -> None:
    """Start the fork server of :func:`pool_context` now, without waiting for it: its
    imports (~0.2 s) then overlap the caller's own work (discovery, planning) instead of
    delaying the first pool."""
    if pool_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


class _Inline:
    """Pool stand-in that runs jobs in this process (workers=1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap_unordered(fn, jobs):
        return map(fn, jobs)


def main(argv=None) -> int:
    p = argument_parser("python -m data_prep.compute_stats", __doc__)
    p.add_argument("input_dir", help="folder with TEMPO granules (searched recursively)")
    p.add_argument("out_json", help="stats file to write")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (one per core)")
    p.add_argument("--band", default=ReadOptions.band, help="RAD band group to read")
    p.add_argument("--sample-size", type=int, default=1_000_000,
                   help="values kept per L2 product for median/MAD (exact below this)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="use a seeded sample of this fraction of the granules")
    p.add_argument("--min-granules", type=int, default=8,
                   help="with --fraction: but at least this many")
    p.add_argument("--seed", type=int, default=42, help="seed of the granule sample")
    args = p.parse_args(argv)
    setup_logging()
    if not 0 < args.fraction <= 1 or args.min_granules < 1:
        p.error("--fraction must be in (0, 1] and --min-granules >= 1")
    granules, ignored = discover(find_files(args.input_dir))
    usable = {g.gid.key: g for g in granules.values() if g.rad is not None}
    if not usable:
        log.error(f"no RAD L1 granules found in {args.input_dir}")
        return 2
    from data_prep.make_shards import sample_granules

    usable = [usable[k] for k in sample_granules(list(usable), args.fraction,
                                                 args.min_granules, args.seed)]
    stats, errors = compute(usable, ReadOptions(band=args.band), args.workers, args.sample_size)
    for key, err in errors.items():
        log.error(f"granule {key}: {err}")
    if stats is None:
        return 1
    atomic_write_json(args.out_json, stats.to_json())
    log.info(f"stats from {len(stats.granules)} granules written to {args.out_json} "
          f"({len(errors)} granules failed, {len(ignored)} files ignored)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""Error of normalisation statistics computed from a sample of the training granules.

make_shards computes the per-channel mean/std of log radiance from a seeded sample of the
training granules (--stats-fraction, at least --stats-min-granules) so that the statistics
do not cost a second pass over every granule. This script synthesizes a set of granules
(default 40 granules of 32 x 64 x 256, different scenes and geometry), computes exact
per-granule statistics once, merges the full set and, for each fraction and 10 sampling
seeds, the sampled set, and prints:

  mean shift   max over channels of |mean_sample - mean_full| / std_full: the offset this
               puts on the normalised radiance z (in units of z)
  std error    max over channels of |std_sample / std_full - 1|: the relative scale error
               of z

(median and worst over the seeds).

    python bench/bench_stats_sample.py [--granules 40] [--workdir /tmp/bench_stats]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import compute_stats, synthesize  # noqa: E402
from data_prep.granule import ReadOptions  # noqa: E402
from data_prep.make_shards import sample_granules  # noqa: E402
from data_prep.tempo import discover, find_files  # noqa: E402


def merged(parts):
    total = copy.deepcopy(parts[0])
    for p in parts[1:]:
        total.merge(copy.deepcopy(p))
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--granules", type=int, default=40)
    p.add_argument("--mirror-steps", type=int, default=32)
    p.add_argument("--xtrack", type=int, default=64)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--workdir", default="/tmp/bench_stats")
    args = p.parse_args()
    gran = os.path.join(args.workdir, f"granules_{args.granules}x{args.mirror_steps}x"
                                      f"{args.xtrack}x{args.channels}")
    if not os.path.exists(os.path.join(gran, "done")):
        synthesize.main([gran, "--granules", str(args.granules), "--mirror-steps",
                         str(args.mirror_steps), "--xtrack", str(args.xtrack), "--channels",
                         str(args.channels), "--seed", "7"])
        open(os.path.join(gran, "done"), "w").close()
    found, _ = discover(find_files(gran))
    per = {g.gid.key: compute_stats.granule_stats(g, ReadOptions(), k=1000)
           for g in found.values() if g.rad is not None}
    keys = sorted(per)
    full = merged([per[k] for k in keys]).l1
    print(f"{len(keys)} granules of {args.mirror_steps} x {args.xtrack} x {args.channels}; "
          f"full statistics from {int(full.count.max())} pixels per channel")
    print(f"{'fraction':>8} {'granules':>8} {'mean shift (z units)':>24} "
          f"{'std error (relative)':>24}")
    for f in args.fractions:
        shifts, scales, n = [], [], 0
        for seed in range(args.seeds):
            use = sample_granules(keys, f, 1, seed)
            n = len(use)
            s = merged([per[k] for k in use]).l1
            shifts.append(float(np.max(np.abs(s.mean - full.mean) / full.std)))
            scales.append(float(np.max(np.abs(s.std / full.std - 1))))
        print(f"{f:8.2f} {n:8d} {np.median(shifts):11.4f} (max {max(shifts):.4f}) "
              f"{np.median(scales):11.4f} (max {max(scales):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

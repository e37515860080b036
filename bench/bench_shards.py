"""Shard writing: throughput against a raw write of the same bytes, and bytes per tile.

Synthesizes granules (default 2 x 64 mirror steps x 256 xtrack x 1028 channels, 64x64
tiles), then in one run measures:

  raw      the encoded sample bytes written with plain file.write to one file
  shards   the same samples written with webdataset's ShardWriter (tar framing)
  e2e      make_shards end to end (netCDF read, align, normalise, cut, encode, write)

and prints ratios (this machine is shared: only ratios within one run are meaningful),
plus bytes per tile against the research code's fp32 ``.pt`` files ([64, H, W, C]).

    python bench/bench_shards.py [--granules 2] [--workdir /tmp/bench_shards]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import make_shards, synthesize  # noqa: E402
from data_prep.granule import ReadOptions, TileOptions, cut_tiles, read_granule  # noqa: E402
from data_prep.tempo import discover, find_files  # noqa: E402
from data_prep.util import read_json  # noqa: E402


def best_of(n, fn):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--granules", type=int, default=2)
    p.add_argument("--mirror-steps", type=int, default=64)
    p.add_argument("--xtrack", type=int, default=256)
    p.add_argument("--channels", type=int, default=1028)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench_shards-")
    gran = os.path.join(work, "granules")
    if not os.path.exists(gran):
        synthesize.main([gran, "--granules", str(args.granules), "--mirror-steps",
                         str(args.mirror_steps), "--xtrack", str(args.xtrack), "--channels",
                         str(args.channels)])
    found, _ = discover(find_files(gran))
    ags = [read_granule(g, ReadOptions()) for g in found.values()]
    c = ags[0].radiance.shape[-1]
    mean, std = np.zeros(c, np.float32) + 29.0, np.ones(c, np.float32)
    encoded = [s for ag in ags for _, s in cut_tiles(ag, mean, std, TileOptions()) if s]
    n = len(encoded)
    payload = sum(len(v) for s in encoded for k, v in s.items() if k != "__key__")
    print(f"{n} tiles of {c}x64x64, {payload / n / 1e6:.2f} MB of arrays per tile")

    import webdataset as wds

    def raw():
        with open(os.path.join(work, "raw.bin"), "wb") as f:
            for s in encoded:
                for k, v in s.items():
                    if k != "__key__":
                        f.write(v)
            f.flush()
            os.fsync(f.fileno())

    def shards():
        d = os.path.join(work, "sw")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        w = wds.ShardWriter(os.path.join(d, "%04d.tar"), maxsize=1e9, encoder=False,
                            verbose=0, mtime=0.0)
        for s in encoded:
            w.write(s)
        w.close()
        for f in os.listdir(d):
            with open(os.path.join(d, f), "rb+") as fh:
                os.fsync(fh.fileno())

    def e2e():
        out = os.path.join(work, "e2e")
        shutil.rmtree(out, ignore_errors=True)
        make_shards.main([gran, out, "--quiet", "--val-fraction", "0"])

    t_raw = best_of(args.repeats, raw)
    t_sh = best_of(args.repeats, shards)
    t_e2e = best_of(1, e2e)
    tar_bytes = sum(os.path.getsize(os.path.join(work, "sw", f))
                    for f in os.listdir(os.path.join(work, "sw")))

    import torch

    batch = torch.from_numpy(np.ascontiguousarray(
        ags[0].radiance[:64, :64].astype(np.float32)[None].repeat(64, 0)))  # [64, H, W, C]
    pt_path = os.path.join(work, "research.pt")
    torch.save(batch, pt_path)
    pt_per_tile = os.path.getsize(pt_path) / 64
    print(f"raw write      {n / t_raw:8.1f} tiles/s  {payload / t_raw / 1e9:.3f} GB/s")
    print(f"ShardWriter    {n / t_sh:8.1f} tiles/s  ratio to raw {t_raw / t_sh:.2f}")
    print(f"make_shards    {n / t_e2e:8.1f} tiles/s  ratio to raw {t_raw / t_e2e:.2f} "
          "(includes netCDF read + stats pass + normalise; 1 worker)")
    print(f"bytes per tile: shards {tar_bytes / n / 1e6:.2f} MB, research fp32 .pt "
          f"{pt_per_tile / 1e6:.2f} MB -> {pt_per_tile / (tar_bytes / n):.2f}x smaller")
    sizes = read_json(os.path.join(work, "e2e", "sizes.json"))
    print(f"(e2e wrote {sum(sizes.values())} tiles in {len(sizes)} shards; workdir {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

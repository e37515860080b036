"""Bytes a rank reads at start from a remote shard folder of a month of TEMPO: with
``header.json`` against a folder without it (which the loader reads as before: the whole
``manifest.json``).

Makes a small real shard folder (``synthesize`` + ``make_shards``: 2 granules of
16 x 64 x 1028, tiles of 16, so stats.json has all 1028 channels), then pads its metadata
to month scale with ``shard_format.write_metadata`` (the writers' own code): ``--granules``
granules of ``--tiles-per-granule`` tile records and per-granule QA reports, copied from
the real ones, and ``--shards`` entries in sizes.json and shard_bytes. A web server on
127.0.0.1 (Python's http.server in a thread, counting the bytes it sends per file) serves
the folder; what one rank does at start (``build_loader`` of train and of val; loader
workers are forked and inherit it) is run with header.json and again without it. Prints
the bytes per file, the totals, their ratio and the ratio of start-up times (best of
``--repeats``, interleaved; only ratios within one run are meaningful here).

    python bench/bench_start_bytes.py [--granules 3600] [--tiles-per-granule 64] [--shards 2000]
"""

from __future__ import annotations

import argparse
import copy
import functools
import http.server
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import make_shards, shard_format, synthesize  # noqa: E402
from data_prep.util import HelpFormatter, read_json  # noqa: E402
from train.config import DataConfig  # noqa: E402
from train.data import build_loader  # noqa: E402


class _Counting(http.server.SimpleHTTPRequestHandler):
    sent: dict[str, int] = {}

    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile):
        n = os.fstat(source.fileno()).st_size - source.tell()
        _Counting.sent[self.path] = _Counting.sent.get(self.path, 0) + n
        super().copyfile(source, outputfile)


def small_folder(work: str) -> str:
    gran, out = os.path.join(work, "granules"), os.path.join(work, "shards")
    assert synthesize.main([gran, "--granules", "2", "--mirror-steps", "16", "--xtrack", "64",
                            "--seed", "1"]) == 0
    assert make_shards.main([gran, out, "--tile-size", "16", "--quiet"]) == 0
    return out


def pad_to_month(folder: str, granules: int, tiles_per_granule: int, shards: int) -> None:
    """Month-scale manifest and sizes (see the module docstring), written by the writers'
    ``shard_format.write_metadata``; the real shards stay listed first."""
    man = read_json(os.path.join(folder, shard_format.MANIFEST))
    sizes = read_json(os.path.join(folder, shard_format.SIZES))
    rep = next(iter(man["granules"].values()))
    tile = next(r for r in man["tiles"] if r["status"] == "written")
    # 120 granules a day: 12 scans of 10 granules
    names = [f"202501{1 + g // 120:02d}T{11 + g % 120 // 10:02d}0000Z_"
             f"S{1 + g % 120 // 10:03d}G{1 + g % 10:02d}" for g in range(granules)]
    n_train = int(0.7 * granules)
    man["splits"] = {"train": names[:n_train], "val": names[n_train:]}
    man["granules"] = {n: copy.deepcopy(rep) for n in names}
    man["tiles"] = [dict(tile, granule=n, row=r * 64, col=c * 64,
                         key=f"{n}_r{r * 64:04d}_c{c * 64:04d}")
                    for n in names for r in range(2)
                    for c in range(tiles_per_granule // 2)]
    i = 0
    while len(sizes) < shards:
        split = "train" if i < 0.7 * shards else "val"
        sizes.setdefault(f"{split}/{split}-{i:05d}-0000.tar", 116)
        i += 1
    man["shard_bytes"] = dict(man["shard_bytes"], **{
        k: 116 * 8_560_000 for k in sizes if k not in man["shard_bytes"]})
    man["counts"]["per_split"] = {s: sum(v for k, v in sizes.items() if k.startswith(s))
                                  for s in shard_format.SPLITS}
    shard_format.write_metadata(folder, sizes, None, man)


def start(spec: str) -> float:
    """What one rank does at start: the train and the val loader."""
    t = time.perf_counter()
    for split in ("train", "val"):
        build_loader(DataConfig(shards=spec, batch_size=8, num_workers=2), split)
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--granules", type=int, default=3600, help="granules in the manifest "
                   "(a month of TEMPO: about 3,600)")
    p.add_argument("--tiles-per-granule", type=int, default=64,
                   help="tile records per granule (132 x 2048 pixels in tiles of 64: 2 x 32)")
    p.add_argument("--shards", type=int, default=2000,
                   help="shards in sizes.json (about 2 TB of 8.56 MB tiles in 1 GB shards)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None, help="kept when given (default: a temporary "
                   "folder, removed)")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench_start_bytes_")
    try:
        new = small_folder(work)
        pad_to_month(new, args.granules, args.tiles_per_granule, args.shards)
        old = os.path.join(work, "shards-without-header")
        shutil.copytree(new, old)
        os.unlink(os.path.join(old, shard_format.HEADER))
        httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_Counting, directory=work))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        folders = {"without header.json (as before)": os.path.basename(old),
                   "with header.json": os.path.basename(new)}
        best: dict[str, float] = {}
        sent: dict[str, dict[str, int]] = {}
        try:
            for _ in range(args.repeats):
                for label, name in folders.items():
                    _Counting.sent.clear()
                    dt = start(f"{url}/{name}")
                    best[label] = min(best.get(label, dt), dt)
                    sent[label] = {k.rsplit("/", 1)[1]: v for k, v in _Counting.sent.items()}
        finally:
            httpd.shutdown()
            httpd.server_close()
        man_mb = os.path.getsize(os.path.join(new, shard_format.MANIFEST)) / 1e6
        print(f"month-scale folder: {args.granules} granules, "
              f"{args.granules * args.tiles_per_granule} tile records, {args.shards} shards; "
              f"manifest.json {man_mb:.1f} MB")
        print("bytes one rank reads at start (train + val loader) over http from 127.0.0.1:")
        totals = {}
        for label in folders:
            totals[label] = sum(sent[label].values())
            files = ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in sorted(sent[label].items()))
            print(f"  {label:32s} {totals[label] / 1e6:8.3f} MB  ({files})  "
                  f"start {best[label]:.2f} s")
        a, b = folders
        print(f"ratio: {totals[a] / totals[b]:.0f}x fewer bytes, start "
              f"{best[a] / best[b]:.1f}x faster with header.json (best of {args.repeats})")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

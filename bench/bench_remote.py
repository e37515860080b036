"""Loader throughput from remote shard sources against the local folder.

Reads the training split of a shard folder (default: the one bench_shards.py writes, 32
tiles of 1028 x 64 x 64) through ``train.data.build_loader`` (batch 8, no augmentation)
from: the local folder, a web server on 127.0.0.1 (Python's http.server in a thread of
this process; webdataset's gopen / curl), ``pipe:cat`` and fsspec (``file://``), with 0
and 2 loader workers; interleaved repeats, best of each. Prints tiles/s and GB/s of L1 and
the ratio to the local folder, against the 368 MB/s per GPU that the research model's
speed needs (bench/README.md). Only ratios within one run are meaningful here.

    python bench/bench_remote.py [--shards /tmp/bench_shards/shards] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.config import DataConfig  # noqa: E402
from train.data import build_loader  # noqa: E402

NEED_GB_S = 0.368  # per GPU at 43 tiles/s (bench/README.md)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def epoch(spec: str, workers: int) -> tuple[float, int, int]:
    cfg = DataConfig(shards=spec, batch_size=8, num_workers=workers, shuffle_buffer=8,
                     shuffle_initial=4, augment=False)
    loader = build_loader(cfg, "train")
    t = time.perf_counter()
    n = nbytes = 0
    for b in loader:
        v = int(b["real"].sum())
        n += v
        nbytes += v * b["l1"][0].numel() * b["l1"].element_size()
    return time.perf_counter() - t, n, nbytes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shards", default="/tmp/bench_shards/shards",
                   help="shard folder (python bench/bench_shards.py makes the default)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    root = os.path.abspath(args.shards)
    if not os.path.exists(os.path.join(root, "sizes.json")):
        print(f"error: no shards in {root}; run python bench/bench_shards.py first",
              file=sys.stderr)
        return 2
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(_Quiet, directory=root))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    sources = {"local folder": root,
               "http (127.0.0.1)": f"http://127.0.0.1:{httpd.server_address[1]}",
               "pipe:cat": f"pipe:cat {root}/{{}}",
               "fsspec file://": f"file://{root}"}
    best: dict = {}
    info = {}
    try:
        for _ in range(args.repeats):
            for name, spec in sources.items():
                for w in (0, 2):
                    dt, n, nbytes = epoch(spec, w)
                    best[name, w] = min(best.get((name, w), dt), dt)
                    info[name, w] = (n, nbytes)
    finally:
        httpd.shutdown()
    for w in (0, 2):
        ref = best["local folder", w]
        print(f"{w} loader workers:")
        for name in sources:
            n, nbytes = info[name, w]
            dt = best[name, w]
            print(f"  {name:18s} {n / dt:8.1f} tiles/s  {nbytes / dt / 1e9:5.2f} GB/s  "
                  f"ratio to local {ref / dt:.2f}  ({nbytes / dt / 1e9 / NEED_GB_S:.1f}x the "
                  f"{NEED_GB_S * 1e3:.0f} MB/s a GPU needs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inference speed: predict's batched tile inference vs the validation loop on the same
tiles, and seconds per granule end to end, in one run.

  predict     train.predict.predict_tiles on the validation tiles (in memory, float16 as
              stored): batched forward with sample=False, inverse L2 transforms, latent
              means copied back
  validation  the trainer's validation pass on the same tiles: the shard loader (read,
              decode, batch), forward with sample=False, inverse transforms, ValMetrics
  granule     predict_granule + netCDF + quick-look PNG for each granule (read RAD and L2,
              normalise, tile, forward, stitch, write), seconds per granule

Both tile paths run interleaved, best of --repeats, same batch size, device and precision.
Without --model the script makes its own data and model (synthetic granules, shards, a
1-step single-process run of --config, export) in a temporary folder.

    python bench/bench_predict.py                                        # CPU, seconds
    python bench/bench_predict.py --model export/demo --shards data/demo/shards \
        --granules data/demo/granules --device cuda --batch-size 64
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model(work: str, args) -> tuple[str, str, str]:
    """Synthetic granules -> shards -> 1 training step -> exported model folder."""
    from data_prep import make_shards, synthesize

    g, s, r, m = (os.path.join(work, n) for n in ("granules", "shards", "run", "model"))
    synthesize.main([g, "--granules", str(args.n_granules), "--mirror-steps", "48", "--xtrack",
                     "64", "--channels", str(args.channels), "--seed", "0"])
    make_shards.main([g, s, "--tile-size", "16", "--quiet", "--max-samples-per-shard", "24"])
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS",
                                                                          "1"))
    p = subprocess.run([sys.executable, "train/main.py", "--config", args.config,
                        f"data.shards={s}", f"train.output_dir={r}", "train.steps=1",
                        f"model.in_channels={args.channels}", "train.progress=false",
                        "data.num_workers=0", "train.val_every=0"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr[-3000:])
    from train.export import export

    export(r, m)
    return m, s, g


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="exported model folder (default: make one)")
    p.add_argument("--shards", help="shard folder whose val split is timed")
    p.add_argument("--granules", help="folder of granules for the end-to-end timing")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "training", "demo.yaml"))
    p.add_argument("--n-granules", type=int, default=4, help="synthetic granules to make")
    p.add_argument("--channels", type=int, default=128, help="channels of synthetic data")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    args = p.parse_args(argv)

    from data_prep.tempo import discover, find_files
    from train.config import load_config
    from train.data import build_loader
    from train.metrics import ValMetrics
    from train.model import load_pretrained
    from train.predict import (
        predict_granule,
        predict_tiles,
        resolve_device,
        write_netcdf,
        write_quicklook,
    )

    work = tempfile.mkdtemp(prefix="bench_predict_")
    if args.model:
        model_dir, shards, granules = args.model, args.shards, args.granules
        if not shards or not granules:
            p.error("--model needs --shards and --granules")
    else:
        model_dir, shards, granules = make_model(work, args)
    dev, ac = resolve_device(args.device, args.precision)
    model = load_pretrained(model_dir, dev)
    cfg = load_config(os.path.join(model_dir, "config.yaml"))
    dcfg = dataclasses.replace(cfg.data, shards=shards, batch_size=args.batch_size,
                               num_workers=0)
    loader = build_loader(dcfg, "val")
    tiles = []
    for b in loader:
        tiles += [b["l1"][i].numpy() for i in range(len(b["keys"])) if b["real"][i]]
    tiles = np.stack(tiles)
    transform = model.pretrained.transform

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run_predict() -> float:
        sync()
        t0 = time.perf_counter()
        predict_tiles(model, tiles, args.batch_size, dev, ac)
        sync()
        return time.perf_counter() - t0

    def run_validation() -> float:
        sync()
        t0 = time.perf_counter()
        metrics = ValMetrics(dev, cfg.loss.l2_min_valid_fraction)
        loader.set_epoch(0)  # the whole split again, as Trainer.validate does
        seen = 0
        with torch.inference_mode():
            for b in loader:
                x = b["l1"].to(dev).float()
                with torch.autocast(dev.type, dtype=ac, enabled=ac is not None):
                    out = model(x, sample=False)
                pred = transform.inverse(out["l2_pred"].float())
                metrics.update(x, out["recon"].float(), b["l2"].to(dev), pred, b["real"].to(dev))
                seen += int(b["real"].sum())
        metrics.compute()
        assert seen == len(tiles), (seen, len(tiles))
        sync()
        return time.perf_counter() - t0

    run_predict(), run_validation()  # warm-up
    tp, tv = [], []
    for _ in range(args.repeats):
        tp.append(run_predict())
        tv.append(run_validation())
    n = len(tiles)
    found, _ = discover(find_files(granules))
    gs = [g for g in sorted(found.values(), key=lambda g: g.gid) if g.rad]
    per = []
    out = os.path.join(work, "pred")
    os.makedirs(out, exist_ok=True)
    for g in gs:
        t0 = time.perf_counter()
        res = predict_granule(model, g.rad, g.l2, args.batch_size, dev, ac)
        t1 = time.perf_counter()
        nc = os.path.join(out, f"{g.gid.key}.nc")
        write_netcdf(nc, res, model.pretrained, g.gid.key)
        t2 = time.perf_counter()
        write_quicklook(nc[:-3] + ".png", res, g.gid.key)
        per.append((t1 - t0, t2 - t1, time.perf_counter() - t2, res["valid"].shape,
                    len(res["tiles"])))
    prec = "bf16" if ac is not None else "fp32"
    print(f"device {dev} ({prec}), batch {args.batch_size}, {n} validation tiles of "
          f"{tiles.shape[1]} x {tiles.shape[2]} x {tiles.shape[3]}, best of {args.repeats}")
    print(f"predict_tiles    {n / min(tp):10.1f} tiles/s")
    print(f"validation loop  {n / min(tv):10.1f} tiles/s   (loader + forward + metrics)")
    print(f"ratio predict / validation: {min(tv) / min(tp):.2f}")
    if per:
        tot = [a + b + c for a, b, c, _, _ in per]
        m, x = per[0][3]
        print(f"end to end: {np.mean(tot):.3f} s per granule ({len(per)} granules of {m} x {x} "
              f"pixels, {per[0][4]} tiles each): predict {np.mean([a for a, *_ in per]):.3f} s, "
              f"netCDF {np.mean([b for _, b, *_ in per]):.3f} s, PNG "
              f"{np.mean([c for _, _, c, *_ in per]):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

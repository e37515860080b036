"""Train-step throughput: our Trainer's step vs a bare PyTorch loop, in one run.

Both run the same model, batch and loss on the same in-memory batch (the loader is
benchmarked separately by bench_loader.py), interleaved, best of --repeats:

  ours   Trainer.train_step: accelerate (DeepSpeed when launched with a DeepSpeed config),
         loss terms normalised over the step (its counts all-reduced), the all-reduce of
         stop/non-finite flags, clipping, scheduler
  bare   model -> VAELoss -> backward -> clip_grad_norm_ -> AdamW step, plain PyTorch, in
         the "--bare-precision" (fp32 = the research setup)

Prints tiles/s of each, the ratio ours/bare, MFU (on a GPU with a known bf16 peak) and
peak GPU memory.

CPU (ratio of step overheads, tiny model, fp32 both):
    python bench/bench_train_step.py
GPU, research model, ZeRO-2 bf16 vs research fp32 one GPU:
    accelerate launch --config_file accelerate_configs/single_gpu.yaml \
        bench/bench_train_step.py --size research --batch-size 32 --bare-precision fp32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from train.runtime import setup_cpu_deepspeed  # noqa: E402

setup_cpu_deepspeed()

from data_prep import samples  # noqa: E402
from data_prep.util import atomic_write_json  # noqa: E402
from train.config import load_config  # noqa: E402
from train.losses import VAELoss  # noqa: E402
from train.model import build_model  # noqa: E402
from train.trainer import Trainer, train_flops_per_sample  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {
    "tiny": ["model.in_channels=64", "model.channels=[32,32,64]", "model.latent_channels=8",
             "model.head_hidden=[64,64]", "model.tile_size=16", "model.attn_heads=4"],
    "research": [],
}


def fake_shards(root: str, c: int, t: int, n: int = 8) -> None:
    """A minimal shard folder so the Trainer can be built (its loader is not timed)."""
    import webdataset as wds

    for split in ("train", "val"):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        w = wds.ShardWriter(os.path.join(root, split, "%02d.tar"), maxcount=n // 2,
                            encoder=False, verbose=0)
        for i in range(n):
            w.write(samples.encode(f"{split}{i}", np.zeros((c, t, t)), np.ones((4, t, t)),
                                   np.zeros((4, t, t)), {"granule": "g"}))
        w.close()
    atomic_write_json(os.path.join(root, "sizes.json"),
                      {f"{s}/{i:02d}.tar": n // 2 for s in ("train", "val") for i in range(2)})
    l2 = {p: {"mad": 1.0, "mean": 0.0, "std": 1.0} for p in ("NO2", "O3TOT", "HCHO", "CLDO4")}
    atomic_write_json(os.path.join(root, "stats.json"),
                      {"l1": {"mean": [0.0] * c, "std": [1.0] * c}, "l2": l2})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bare-precision", choices=("fp32", "bf16"), default="fp32")
    args = p.parse_args()
    cfg_path = os.path.join(ROOT, "configs", "training", "research_parity_l2_supervised.yaml")
    work = tempfile.mkdtemp(prefix="bench_step-")
    over = SIZES[args.size] + [f"data.shards={work}", f"data.batch_size={args.batch_size}",
                               "data.num_workers=0", f"train.output_dir={work}/run",
                               "train.progress=false", "optim.grad_clip=1.0"]
    cfg = load_config(cfg_path, over)
    fake_shards(work, cfg.model.in_channels, cfg.model.tile_size)
    trainer = Trainer(cfg)
    dev = trainer.accelerator.device
    b, c, t = args.batch_size, cfg.model.in_channels, cfg.model.tile_size
    g = torch.Generator().manual_seed(0)
    batch = {"l1": torch.randn(b, c, t, t, generator=g).half(),
             "l2_t": torch.randn(b, 4, t, t, generator=g), "real": torch.ones(b, dtype=bool),
             "geo": torch.zeros(b, 4, t, t),
             "keys": [f"k{i}" for i in range(b)]}

    bare = build_model(cfg.model, cfg.loss).to(dev)
    bare_dtype = torch.bfloat16 if args.bare_precision == "bf16" else torch.float32
    bare = bare.to(bare_dtype)
    opt = torch.optim.AdamW(bare.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay)
    loss_fn = VAELoss(cfg.loss)

    def bare_step():
        # the batch arrives as the loader makes it (fp16 L1), like ours
        xb = batch["l1"].to(dev).to(bare_dtype)
        l2b, rb = batch["l2_t"].to(dev), batch["real"].to(dev)
        out = bare(xb)
        terms = loss_fn(out, xb, l2b, rb)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours_step():
        trainer.train_step([batch])  # one optimizer step of one micro-batch

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed(fn):
        for _ in range(args.warmup):
            fn()
        sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync()
        dt = time.perf_counter() - t0
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        return args.steps * b / dt, mem

    best = {"ours": (0.0, 0.0), "bare": (0.0, 0.0)}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours_step), ("bare", bare_step)):
            r = timed(fn)
            if r[0] > best[name][0]:
                best[name] = r
    flops = train_flops_per_sample(cfg.model)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if trainer.is_main:
        print(f"device {device}; model {args.size} ({trainer.n_params / 1e6:.1f}M params, "
              f"{flops / 1e9:.1f} GFLOP/tile train); batch {b} x {c} x {t} x {t}; "
              f"best of {args.repeats} x {args.steps} steps")
        for name, prec in (("ours", f"deepspeed={trainer.deepspeed} "
                                    f"precision={trainer.accelerator.mixed_precision}"),
                           ("bare", f"plain PyTorch {args.bare_precision}")):
            tps, mem = best[name]
            mfu = (f", MFU {tps * flops / trainer.peak_flops:.1%}" if trainer.peak_flops else "")
            print(f"{name:<5} {tps:9.2f} tiles/s  ({prec}{mfu}, peak mem {mem:.1f} GiB)")
        print(f"ratio ours/bare = {best['ours'][0] / best['bare'][0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

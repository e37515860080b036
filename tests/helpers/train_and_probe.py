"""Launched by tests with `accelerate launch`: train like train/main.py, then run the live
(possibly ZeRO-3 partitioned) model on a fixed input on every rank and save the output on
rank 0, so a test can compare it with weights converted from the checkpoint."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from train.runtime import setup_cpu_deepspeed  # noqa: E402

setup_cpu_deepspeed()

from train.config import load_config  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def main():
    probe_path, config, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg)
    trainer.fit()
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, cfg.model.in_channels, cfg.model.tile_size, cfg.model.tile_size,
                    generator=g)
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model(x, sample=False)  # the model casts to its weights' dtype
    if trainer.is_main:
        torch.save({"x": x, "recon": out["recon"].float(), "l2_pred": out["l2_pred"].float(),
                    "dtype": str(trainer.accelerator.unwrap_model(trainer.model).compute_dtype)}, probe_path)


if __name__ == "__main__":
    main()

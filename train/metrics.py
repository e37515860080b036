"""Validation metrics in physical units, as sums that reduce exactly across ranks.

Per product (NO2, O3TOT, HCHO, CLDO4): predictions are mapped back to physical units with
the inverse L2 transforms and compared with targets pooled NaN-aware to the latent grid in
physical units. Each rank accumulates n, sum(e), sum(e^2), sum(y), sum(y^2) in float64;
after an all-reduce of those sums, RMSE = sqrt(sum(e^2)/n), bias = sum(e)/n and
R^2 = 1 - sum(e^2) / (sum(y^2) - sum(y)^2/n) are exact for the whole validation set.
"""

from __future__ import annotations

import math

import torch

from data_prep.shard_format import L2_ORDER
from train.losses import nan_pool

FIELDS = ("n", "sum_e", "sum_e2", "sum_y", "sum_y2")


class ValMetrics:
    def __init__(self, device, min_valid_fraction: float):
        self.device = device
        self.min_valid = min_valid_fraction
        self.l2 = torch.zeros(len(L2_ORDER), len(FIELDS), dtype=torch.float64, device=device)
        self.rec = torch.zeros(4, dtype=torch.float64, device=device)  # n_el, sum|e|, sum e^2, n

    def update(self, x, recon, l2_phys, pred_phys, real) -> None:
        """x, recon: (B, C, H, W); l2_phys: (B, 4, H, W) targets; pred_phys: (B, 4, h, w);
        real: (B,) bool, False for padding (ignored)."""
        real = real.to(torch.bool)
        e = (recon.double() - x.double())[real]
        self.rec += torch.stack([torch.tensor(e.numel(), dtype=torch.float64, device=e.device),
                                 e.abs().sum(), e.pow(2).sum(),
                                 real.sum().to(torch.float64)])
        factor = l2_phys.shape[-1] // pred_phys.shape[-1]
        y = nan_pool(l2_phys.double(), factor, self.min_valid)
        has_target = torch.isfinite(y) & real[:, None, None, None]
        err = torch.where(has_target, pred_phys.double() - torch.nan_to_num(y), 0.0)
        y0 = torch.where(has_target, y, 0.0)
        self.l2 += torch.stack([has_target.sum(dim=(0, 2, 3)).double(), err.sum(dim=(0, 2, 3)),
                                err.pow(2).sum(dim=(0, 2, 3)), y0.sum(dim=(0, 2, 3)),
                                y0.pow(2).sum(dim=(0, 2, 3))], dim=1)

    def reduce(self, accelerator) -> None:
        if accelerator is not None and accelerator.num_processes > 1:
            self.l2 = accelerator.reduce(self.l2, reduction="sum")
            self.rec = accelerator.reduce(self.rec, reduction="sum")

    def compute(self) -> dict[str, float]:
        n_el, s1, s2, n = self.rec.tolist()
        out = {"recon_mae": s1 / max(n_el, 1), "recon_rmse": math.sqrt(s2 / max(n_el, 1)),
               "samples": n}
        for i, p in enumerate(L2_ORDER):
            cnt, se, se2, sy, sy2 = self.l2[i].tolist()
            out[f"l2/{p}_n"] = cnt
            if cnt == 0:
                for k in ("rmse", "bias", "r2"):
                    out[f"l2/{p}_{k}"] = float("nan")
                continue
            sst = sy2 - sy * sy / cnt
            out[f"l2/{p}_rmse"] = math.sqrt(se2 / cnt)
            out[f"l2/{p}_bias"] = se / cnt
            out[f"l2/{p}_r2"] = 1.0 - se2 / sst if sst > 0 else float("nan")
        return out

"""L2 target transforms (model space) and their exact inverses (physical units).

As in the research code: NO2 and HCHO ``asinh(x / (1.4826 * MAD))``, O3TOT z-score,
CLDO4 ``logit(0.01 + 0.98 * x)``. Parameters come from the shards' ``stats.json``.
Channel dimension is -3: tensors are (..., 4, H, W) in the order NO2, O3TOT, HCHO, CLDO4.
"""

from __future__ import annotations

import math

import torch

from data_prep.shard_format import L2_ORDER
from data_prep.stats import MAD_SCALE

CLD_EPS = 0.01


class L2Transform:
    def __init__(self, l2_stats: dict):
        def need(p, k):
            v = float(l2_stats[p][k])
            if not math.isfinite(v) or (k in ("mad", "std") and v <= 0):
                raise ValueError(f"stats.json: l2.{p}.{k} = {v} cannot be used for the "
                                 f"{p} transform (too few valid {p} pixels in training data?)")
            return v

        self.no2_scale = MAD_SCALE * need("NO2", "mad")
        self.hcho_scale = MAD_SCALE * need("HCHO", "mad")
        self.o3_mean = need("O3TOT", "mean")
        self.o3_std = need("O3TOT", "std")

    def params(self) -> dict:
        return {"no2_scale": self.no2_scale, "hcho_scale": self.hcho_scale,
                "o3_mean": self.o3_mean, "o3_std": self.o3_std, "cld_eps": CLD_EPS}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Physical -> model space; NaN stays NaN."""
        no2, o3, hcho, cld = x.unbind(-3)
        cld = CLD_EPS + (1 - 2 * CLD_EPS) * cld.clamp(0.0, 1.0)
        return torch.stack([torch.asinh(no2 / self.no2_scale), (o3 - self.o3_mean) / self.o3_std,
                            torch.asinh(hcho / self.hcho_scale), torch.logit(cld)], dim=-3)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Model space -> physical units."""
        no2, o3, hcho, cld = y.unbind(-3)
        return torch.stack([torch.sinh(no2) * self.no2_scale, o3 * self.o3_std + self.o3_mean,
                            torch.sinh(hcho) * self.hcho_scale,
                            (torch.sigmoid(cld) - CLD_EPS) / (1 - 2 * CLD_EPS)], dim=-3)


assert L2_ORDER == ("NO2", "O3TOT", "HCHO", "CLDO4")

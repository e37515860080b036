"""L2 target transforms (model space) and their exact inverses (physical units).

``research`` (as in the research code): NO2 and HCHO ``asinh(x / (1.4826 * MAD))``, O3TOT
z-score, CLDO4 ``logit(0.01 + 0.98 * x)``. ``linear``: NO2 and HCHO ``(x - median) /
(1.4826 * MAD)``, the others as ``research``. With a squared error in model space the head
estimates the mean of the target given the input in that space; the operational L2 is the
truth plus zero-mean retrieval noise, so in a linear space that mean is the truth's, while
asinh compresses the noise's large excursions unevenly and biases the estimate (on the
synthetic benchmark, HCHO: bias -1.4e15 molecules/cm^2, R^2 against the truth below 0).
Parameters come from the shards' ``stats.json``. Channel dimension is -3: tensors are
(..., 4, H, W) in the order NO2, O3TOT, HCHO, CLDO4.
"""

from __future__ import annotations

import math

import torch

from data_prep.shard_format import L2_ORDER
from data_prep.stats import MAD_SCALE

CLD_EPS = 0.01
KINDS = ("research", "linear")


class L2Transform:
    """Physical units <-> model space for the four products (``kind``: see the module
    docstring). Raises ValueError naming the stats.json key that cannot be used."""

    def __init__(self, l2_stats: dict, kind: str = "research"):
        if kind not in KINDS:
            raise ValueError(f"L2 transform {kind!r}: must be one of {KINDS}")
        self.kind = kind
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
        # centres of the linear kind (0 for research: asinh is centred on zero)
        lin = kind == "linear"
        self.no2_centre = need("NO2", "median") if lin else 0.0
        self.hcho_centre = need("HCHO", "median") if lin else 0.0

    def params(self) -> dict:
        return {"kind": self.kind, "no2_scale": self.no2_scale, "hcho_scale": self.hcho_scale,
                "no2_centre": self.no2_centre, "hcho_centre": self.hcho_centre,
                "o3_mean": self.o3_mean, "o3_std": self.o3_std, "cld_eps": CLD_EPS}

    def _trace(self, v: torch.Tensor, centre: float, scale: float) -> torch.Tensor:
        return (v - centre) / scale if self.kind == "linear" else torch.asinh(v / scale)

    def _trace_inverse(self, u: torch.Tensor, centre: float, scale: float) -> torch.Tensor:
        return u * scale + centre if self.kind == "linear" else torch.sinh(u) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Physical -> model space; NaN stays NaN."""
        no2, o3, hcho, cld = x.unbind(-3)
        cld = CLD_EPS + (1 - 2 * CLD_EPS) * cld.clamp(0.0, 1.0)
        return torch.stack([self._trace(no2, self.no2_centre, self.no2_scale),
                            (o3 - self.o3_mean) / self.o3_std,
                            self._trace(hcho, self.hcho_centre, self.hcho_scale),
                            torch.logit(cld)], dim=-3)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Model space -> physical units."""
        no2, o3, hcho, cld = y.unbind(-3)
        return torch.stack([self._trace_inverse(no2, self.no2_centre, self.no2_scale),
                            o3 * self.o3_std + self.o3_mean,
                            self._trace_inverse(hcho, self.hcho_centre, self.hcho_scale),
                            (torch.sigmoid(cld) - CLD_EPS) / (1 - 2 * CLD_EPS)], dim=-3)


assert L2_ORDER == ("NO2", "O3TOT", "HCHO", "CLDO4")

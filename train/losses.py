"""VAE + L2 loss with named terms, computed in fp32 over valid samples only.

    nll   = sum over (C, H, W) of rec / exp(s) + s, s the learned scalar log-variance,
            rec = |x - x_hat| (l1) or (x - x_hat)^2 (l2); summed over valid samples and
            divided by the nominal batch size (the research code's normalisation)
    kl    = kl_weight x sum of KL(q(z|x) || N(0, I)) over valid samples / batch size
    l2/P  = weight_P x mean over valid latent cells of (pred - target)^2, targets in model
            space pooled NaN-aware to the latent grid; exactly 0 when nothing is valid

Padding samples (``valid=False``) contribute nothing to any term.
"""

from __future__ import annotations

import torch

from data_prep.tempo import L2_ORDER


def nan_pool(x: torch.Tensor, factor: int, min_valid_fraction: float) -> torch.Tensor:
    """Average (B, K, H, W) over factor x factor blocks ignoring NaN; a block with fewer
    than ``min_valid_fraction`` valid pixels becomes NaN. Returns (B, K, H/f, W/f)."""
    if factor == 1:
        return x
    b, k, h, w = x.shape
    if h % factor or w % factor:
        raise ValueError(f"target size {h}x{w} is not divisible by the pooling factor {factor}")
    blocks = x.reshape(b, k, h // factor, factor, w // factor, factor)
    valid = torch.isfinite(blocks)
    n = valid.sum(dim=(3, 5))
    total = torch.where(valid, blocks, torch.zeros((), dtype=x.dtype, device=x.device))
    mean = total.sum(dim=(3, 5)) / n.clamp(min=1)
    keep = n >= min_valid_fraction * factor * factor
    keep &= n > 0
    return torch.where(keep, mean, torch.full_like(mean, float("nan")))


class VAELoss:
    """Owns the loss weights; ``__call__`` returns a dict of named fp32 terms and 'loss'."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.l2_weights = [float(w) for w in cfg.l2_weights]

    @property
    def supervised(self) -> bool:
        return any(w != 0 for w in self.l2_weights)

    def __call__(self, out: dict, x: torch.Tensor, l2_t: torch.Tensor,
                 valid: torch.Tensor) -> dict[str, torch.Tensor]:
        b = x.shape[0]
        w = valid.to(torch.float32)  # (B,)
        x = x.float()
        recon = out["recon"].float()
        diff = (x - recon).abs() if self.cfg.recon == "l1" else (x - recon).pow(2)
        per_sample = diff.sum(dim=(1, 2, 3))  # (B,)
        s = out["rec_logvar"].float()
        n_el = x[0].numel()
        nll = ((per_sample / torch.exp(s) + s * n_el) * w).sum() / b
        kl = (out["kl"].float() * w).sum() / b
        n_valid = w.sum().clamp(min=1)
        terms = {
            "nll": nll,
            "kl": kl,
            "recon_" + self.cfg.recon: (per_sample * w).sum() / (n_valid * n_el),
            "rec_logvar": s.detach(),
        }
        loss = nll + self.cfg.kl_weight * kl
        if "l2_pred" in out:
            pred = out["l2_pred"].float()  # (B, 4, h, w)
            factor = l2_t.shape[-1] // pred.shape[-1]
            target = nan_pool(l2_t.float(), factor, self.cfg.l2_min_valid_fraction)
            mask = torch.isfinite(target) & valid[:, None, None, None]
            err = torch.where(mask, pred - torch.nan_to_num(target), torch.zeros_like(pred))
            count = mask.sum(dim=(0, 2, 3))  # (4,)
            per_product = err.pow(2).sum(dim=(0, 2, 3)) / count.clamp(min=1)
            for i, p in enumerate(L2_ORDER):
                terms[f"l2/{p}"] = per_product[i]
                terms[f"l2/{p}_valid_cells"] = count[i].float()
                loss = loss + self.l2_weights[i] * per_product[i]
        terms["loss"] = loss
        return terms


def build_loss(cfg) -> VAELoss:
    return VAELoss(cfg)

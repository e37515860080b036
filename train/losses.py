"""VAE + L2 loss with named terms, computed in fp32 over real samples only, normalised over
the whole optimizer step.

For one optimizer step (every micro-batch on every rank), with N the number of real
samples (``real``: not padding) and C_P the number of latent cells with a target for
product P (enough valid L2 pixels, ``loss.l2_min_valid_fraction``), both counted over the
whole step:

    nll   = sum over real samples of sum over (C, H, W) of (rec / exp(s) + s) / N,
            s the learned scalar log-variance, rec = |x - x_hat| (loss.recon=abs) or
            (x - x_hat)^2 (loss.recon=squared)
    kl    = kl_weight x sum over real samples of KL(q(z|x) || N(0, I)) / N
    l2/P  = weight_P x sum over latent cells with a target of (pred - target)^2 / C_P,
            targets in model space pooled NaN-aware to the latent grid; exactly 0 when
            C_P = 0 (logged: l2/P_target_cells, this micro-batch's cells with a target)

A micro-batch's terms are its share of these sums (its own sums over the step's
denominators ``StepCounts``), so the terms of all micro-batches on all ranks add up to the
step's objective however the global batch is split: as token-count normalisation in
language-model trainers. Padding samples (``real=False``) contribute nothing.

``loss.recon_reduction`` = 'mean' divides the VAE part (nll + kl_weight x kl) by the elements
of a tile, C x H x W: a per-element likelihood, so the L2 weights are relative to a
reconstruction of order 1 whatever the tile size and channel count, and the scalar
log-variance's gradient is a mean (order 1) instead of a sum over ~1e5-1e6 elements. 'sum'
is the research code's objective. The balance between VAE and L2 in the ratio of the
weights is otherwise the same: 'mean' equals 'sum' with every L2 weight x C x H x W.
``loss.l2_share`` > 0 multiplies every L2 term by one factor ``l2_balance`` (see
``VAELoss.rebalance``).
"""

from __future__ import annotations

import dataclasses

import torch

from data_prep.shard_format import L2_ORDER

# terms that are not shares of a sum (reported as they are, not added over micro-batches)
NOT_ADDITIVE = ("rec_logvar",)
# the logged reconstruction error per element (normalised units) for each loss.recon
RECON_TERM = {"abs": "recon_mae", "squared": "recon_mse"}


def nan_pool(x: torch.Tensor, factor: int, min_valid_fraction: float) -> torch.Tensor:
    """Average (B, K, H, W) over factor x factor blocks ignoring NaN; a block with fewer
    than ``min_valid_fraction`` valid (finite) pixels becomes NaN: that latent cell has no
    target. Returns (B, K, H/f, W/f)."""
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
    has_target = (n >= min_valid_fraction * factor * factor) & (n > 0)
    return torch.where(has_target, mean, torch.full_like(mean, float("nan")))


def encoder_gradient_shares(contributions: dict[str, torch.Tensor],
                            moments: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each loss term's share of the gradient that enters the encoder.

    contributions: {name: weighted scalar term} that add up to the loss (``VAELoss.
    contributions``); moments: the encoder output (B, 2Z, h, w) (``out["moments"]``), through
    which every term's gradient reaches the encoder parameters (the decoder and head sit
    after it). Returns {name: ||d term / d moments|| / sum over terms of the same norm}
    (shares in [0, 1] adding up to 1) and {"norm/" + name: the norm}, detached fp32. Costs
    one extra backward through the decoder and head per term (the graph is kept)."""
    norms = {}
    for name, term in contributions.items():
        g = None
        if term.requires_grad:
            (g,) = torch.autograd.grad(term, moments, retain_graph=True, allow_unused=True)
        norms[name] = (g.detach().float().norm() if g is not None
                       else torch.zeros((), device=moments.device))
    total = torch.stack(list(norms.values())).sum().clamp(min=1e-30)
    out = {name: n / total for name, n in norms.items()}
    out.update({f"norm/{name}": n for name, n in norms.items()})
    return out


@dataclasses.dataclass
class StepCounts:
    """Denominators of one optimizer step: real samples and, per product (L2_ORDER), latent
    cells with a target, summed over every micro-batch of the step on every rank."""
    samples: float
    target_cells: list[float]

    def as_tensor(self, device=None) -> torch.Tensor:
        """(1 + len(L2_ORDER),) float64: samples, then target cells per product."""
        return torch.tensor([self.samples, *self.target_cells], dtype=torch.float64,
                            device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> StepCounts:
        v = [float(x) for x in t.tolist()]
        return cls(v[0], v[1:])

    def __add__(self, other: StepCounts) -> StepCounts:
        return StepCounts(self.samples + other.samples,
                          [a + b for a, b in zip(self.target_cells, other.target_cells)])


class VAELoss:
    """Owns the loss weights; ``__call__`` returns a dict of named fp32 terms and 'loss'."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.l2_weights = [float(w) for w in cfg.l2_weights]
        # multiplier of every L2 term: 1, or set by ``rebalance`` (loss.l2_share > 0)
        self.l2_balance = 1.0

    @property
    def supervised(self) -> bool:
        return any(w != 0 for w in self.l2_weights)

    def _target_mask(self, l2_t: torch.Tensor, real: torch.Tensor, latent: int):
        """Targets pooled to the (latent x latent) grid and the mask of cells that have one
        (finite target, real sample): (B, 4, latent, latent) each."""
        factor = l2_t.shape[-1] // latent
        target = nan_pool(l2_t.float(), factor, self.cfg.l2_min_valid_fraction)
        has_target = torch.isfinite(target) & real.to(torch.bool)[:, None, None, None]
        return target, has_target

    def counts(self, l2_t: torch.Tensor, real: torch.Tensor, latent: int) -> StepCounts:
        """This micro-batch's real samples and cells with a target per product, for a latent
        grid of ``latent`` x ``latent`` cells. l2_t: (B, 4, H, W) model-space targets."""
        _, has_target = self._target_mask(l2_t, real, latent)
        return StepCounts(float(real.sum()),
                          [float(c) for c in has_target.sum(dim=(0, 2, 3))])

    def __call__(self, out: dict, x: torch.Tensor, l2_t: torch.Tensor,
                 real: torch.Tensor, norm: StepCounts | None = None
                 ) -> dict[str, torch.Tensor]:
        """Terms of this micro-batch as shares of the step's objective, over ``norm`` (the
        step's StepCounts; default: this micro-batch alone). x: (B, C, H, W) input, out: the
        model output, l2_t: (B, 4, H, W) model-space targets (NaN: none), real: (B,) bool,
        False for padding."""
        w = real.to(torch.float32)  # (B,)
        x = x.float()
        recon = out["recon"].float()
        latent = out["l2_pred"].shape[-1] if "l2_pred" in out else 1
        if norm is None:
            norm = self.counts(l2_t, real, latent)
        n = max(norm.samples, 1.0)
        diff = (x - recon).abs() if self.cfg.recon == "abs" else (x - recon).pow(2)
        per_sample = diff.sum(dim=(1, 2, 3))  # (B,)
        s = out["rec_logvar"].float()
        n_el = x[0].numel()
        nll = ((per_sample / torch.exp(s) + s * n_el) * w).sum() / n
        kl = (out["kl"].float() * w).sum() / n
        terms = {
            "nll": nll,
            "kl": kl,
            RECON_TERM[self.cfg.recon]: (per_sample * w).sum() / (n * n_el),
            "rec_logvar": s.detach(),
        }
        scale = 1.0 / n_el if self.cfg.recon_reduction == "mean" else 1.0
        loss = scale * (nll + self.cfg.kl_weight * kl)
        if "l2_pred" in out:
            pred = out["l2_pred"].float()  # (B, 4, h, w)
            target, has_target = self._target_mask(l2_t, real, latent)
            err = torch.where(has_target, pred - torch.nan_to_num(target), torch.zeros_like(pred))
            step_cells = torch.tensor(norm.target_cells, dtype=torch.float32, device=pred.device)
            per_product = err.pow(2).sum(dim=(0, 2, 3)) / step_cells.clamp(min=1)
            target_cells = has_target.sum(dim=(0, 2, 3))
            for i, p in enumerate(L2_ORDER):
                terms[f"l2/{p}"] = per_product[i]
                terms[f"l2/{p}_target_cells"] = target_cells[i].float()
                loss = loss + self.l2_balance * self.l2_weights[i] * per_product[i]
        terms["loss"] = loss
        return terms


    def contributions(self, terms: dict[str, torch.Tensor], n_elements: int
                      ) -> dict[str, torch.Tensor]:
        """The weighted terms of ``__call__``'s result that add up to 'loss': reconstruction
        (nll), kl and l2/<P> for every product with a non-zero weight. ``n_elements``: the
        elements C x H x W of one input tile."""
        scale = 1.0 / n_elements if self.cfg.recon_reduction == "mean" else 1.0
        parts = {"reconstruction": scale * terms["nll"],
                 "kl": scale * self.cfg.kl_weight * terms["kl"]}
        for i, p in enumerate(L2_ORDER):
            if f"l2/{p}" in terms and self.l2_weights[i] != 0:
                parts[f"l2/{p}"] = self.l2_balance * self.l2_weights[i] * terms[f"l2/{p}"]
        return parts

    def supervision_norms(self, terms: dict[str, torch.Tensor], n_elements: int,
                          moments: torch.Tensor) -> torch.Tensor:
        """(2,) fp32: the norms of the gradient at the encoder output ``moments`` of the VAE
        part (reconstruction + kl) and of the L2 part at l2_balance = 1 (sum over products of
        weight x term). The graph is kept."""
        parts = self.contributions(terms, n_elements)
        vae = parts["reconstruction"] + parts["kl"]
        l2 = sum(v for k, v in parts.items() if k.startswith("l2/")) / self.l2_balance
        norms = []
        for term in (vae, l2):
            g = None
            if isinstance(term, torch.Tensor) and term.requires_grad:
                (g,) = torch.autograd.grad(term, moments, retain_graph=True, allow_unused=True)
            norms.append(g.detach().float().norm() if g is not None
                         else torch.zeros((), device=moments.device))
        return torch.stack(norms)

    def rebalance(self, norms: torch.Tensor, share: float) -> float:
        """Set l2_balance so that the L2 part is ``share`` of the summed gradient norms at the
        encoder output: lambda = share / (1 - share) x |g_vae| / |g_l2|, from
        ``supervision_norms`` (averaged over ranks by the caller), clamped to [1e-6, 1e9];
        unchanged when either norm is 0 or not finite. Returns the new value."""
        vae, l2 = (float(v) for v in norms)
        if vae > 0 and l2 > 0 and all(map(torch.isfinite, norms)):
            lam = share / (1.0 - share) * vae / l2
            self.l2_balance = min(max(lam, 1e-6), 1e9)
        return self.l2_balance

    def total(self, terms: dict[str, torch.Tensor], n_elements: int) -> torch.Tensor:
        """The loss from the terms with the current l2_balance."""
        return sum(self.contributions(terms, n_elements).values())


def build_loss(cfg) -> VAELoss:
    return VAELoss(cfg)

"""The gradient of one optimizer step, per loss term, for a fixed global batch of 4 tiles
split over this process's ranks and ``ACCUM`` micro-batches per rank.

Importable (``step_gradients(cfg, accum)`` in one process) and launchable
(`torchrun --nproc_per_node 2 tests/helpers/step_gradients.py OUT 1,2 CONFIG [k=v ...]`,
with ACCELERATE_USE_CPU=true for DDP on CPU); rank 0 saves {accum: {term: {param: grad}}}
to OUT.
The targets are mostly NaN (NO2 in tile 0 has a handful of latent cells with a target) and tile 3 is
padding (``real=False``), so the per-term normalisation is what decides the gradient.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

TERMS = ("nll", "kl", "l2/NO2", "l2/O3TOT", "l2/HCHO", "l2/CLDO4")
GLOBAL_BATCH = 4


def fixed_batch(channels: int, tile: int) -> dict:
    """4 tiles: random L1, L2 targets with per-tile, per-product valid fractions from 3% to
    90%, the last tile padding."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(GLOBAL_BATCH, channels, tile, tile, generator=g).to(torch.float16)
    l2 = torch.randn(GLOBAL_BATCH, 4, tile, tile, generator=g)
    frac = torch.tensor([[0.03, 0.9, 0.5, 0.7], [0.9, 0.1, 0.6, 0.3],
                         [0.4, 0.8, 0.05, 0.9], [0.5, 0.5, 0.5, 0.5]])
    keep = torch.rand(GLOBAL_BATCH, 4, tile, tile, generator=g) < frac[:, :, None, None]
    l2 = torch.where(keep, l2, torch.full_like(l2, float("nan")))
    geo = torch.zeros(GLOBAL_BATCH, 4, tile, tile)
    return {"l1": x, "l2_t": l2, "geo": geo, "real": torch.tensor([True, True, True, False]),
            "keys": [f"tile{i}" for i in range(GLOBAL_BATCH)]}


def _split(batch: dict, rank: int, world: int, accum: int) -> list[dict]:
    per_rank = GLOBAL_BATCH // world
    micro = per_rank // accum
    out = []
    for j in range(accum):
        lo = rank * per_rank + j * micro
        out.append({k: v[lo:lo + micro] for k, v in batch.items()})
    return out


class OneTerm:
    """The trainer's loss with 'loss' replaced by one term. ``own_counts``: normalise each
    micro-batch by its own counts (the normalisation that depends on the split)."""

    def __init__(self, inner, term, own_counts=False):
        self.inner, self.term, self.own_counts = inner, term, own_counts

    def counts(self, *a):
        return self.inner.counts(*a)

    def __call__(self, out, x, l2_t, real, norm=None):
        t = self.inner(out, x, l2_t, real, None if self.own_counts else norm)
        # + 0 x the full loss: every parameter stays in the graph (DDP needs that)
        return t | {"loss": t[self.term] + 0.0 * t["loss"]}


class Deterministic(torch.nn.Module):
    """The model with the posterior mean instead of a sample (no sampling noise)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, generator=None, sample=True, geo=None):
        return self.inner(x, sample=False, geo=geo)


def step_gradients(cfg, accum: int, trainer=None, own_counts=False) -> dict:
    """{term: {parameter name: gradient}} of one step on the fixed batch (on every rank)."""
    from train.losses import build_loss
    from train.model import build_model
    from train.trainer import Trainer

    if trainer is None:
        trainer = Trainer(cfg, build_model_fn=lambda *a: Deterministic(build_model(*a)))
    trainer.accelerator.gradient_accumulation_steps = accum
    trainer.grad_shares = False  # the loss below is one term, not the sum of contributions
    grads: dict = {}

    def capture(*a, **kw):  # record instead of updating: every term sees the same model
        grads[term] = {n: p.grad.detach().double().clone()
                       for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
                       if p.grad is not None}
    trainer.optimizer.step = capture
    batch = fixed_batch(cfg.model.in_channels, cfg.model.tile_size)
    window = _split(batch, trainer.rank, trainer.world, accum)
    for term in TERMS:
        trainer.loss_fn = OneTerm(build_loss(cfg.loss), term, own_counts)
        res = trainer.train_step(window)
        assert not res.skipped
    return grads


def main():
    out, accum, config, *overrides = sys.argv[1:]
    from train.runtime import setup_cpu_deepspeed

    setup_cpu_deepspeed()
    from train.config import load_config
    from train.model import build_model
    from train.trainer import Trainer

    cfg = load_config(config, overrides + ["optim.grad_accum=1"])
    trainer = Trainer(cfg, build_model_fn=lambda *a: Deterministic(build_model(*a)))
    grads = {a: step_gradients(cfg, a, trainer) for a in map(int, accum.split(","))}
    if trainer.is_main:
        torch.save(grads, out)


if __name__ == "__main__":
    main()

"""Optimizer and learning-rate schedule: AdamW with decoupled weight decay on weights only,
linear warmup then cosine decay (or constant), stepped exactly once per optimizer step.

The schedule is deliberately not passed through ``accelerator.prepare``: Accelerate's
scheduler wrapper steps the wrapped scheduler once per process at every optimizer step
(it assumes the per-process batch shrinks with the number of processes), so on N ranks the
schedule would run N times too fast. The trainer steps it itself after every optimizer step
that was taken, and saves its state with the trainer state.
"""

from __future__ import annotations

import math

import torch


def lr_lambda(cfg):
    """Multiplier of ``optim.lr`` after ``step`` optimizer steps (0-based): linear warmup over
    ``optim.warmup_steps`` steps, then cosine from 1 to ``optim.min_lr_ratio`` at
    ``train.steps`` (or 1 for ``optim.schedule=constant``)."""
    o, total = cfg.optim, cfg.train.steps

    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        t = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def build_optimizer(model: torch.nn.Module, cfg):
    """(AdamW, LambdaLR) for ``model``: weight decay on parameters with >= 2 dimensions
    (convolution and linear weights), none on biases, norms and the scalar log-variance."""
    o = cfg.optim
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    return optimizer, scheduler

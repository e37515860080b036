"""train/main.py with one fault injected, for the fault tests. Launched like main.py
(`accelerate launch ... tests/helpers/faulty_main.py --config ...`); the fault comes from
TEMPO_VAE_FAULT=KIND:NUMBER[:RANK] (RANK: every rank when left out) and reaches the trainer
through its constructor seams (model, loss, checkpoint I/O):

  nan_loss:S      the reconstruction term of training micro-step S is NaN
  inf_grad:S      the loss of micro-step S is finite but its gradients are not
  no_space:N      the N-th checkpoint's free-space check sees a full disk
  enospc_write:S  at the checkpoint of step S, writing the rank's files fails with ENOSPC
  hang:S          micro-step S never finishes (a rank stuck in I/O)
  stop:S          the rank sends itself SIGUSR1 during micro-step S (a preemption notice)
"""

import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from train import main as main_module  # noqa: E402

KINDS = ("nan_loss", "inf_grad", "no_space", "enospc_write", "hang", "stop")


def _fault():
    kind, step, *rank = os.environ["TEMPO_VAE_FAULT"].split(":")
    if kind not in KINDS:
        raise SystemExit(f"TEMPO_VAE_FAULT: unknown kind {kind!r}")
    here = int(os.environ.get("RANK", "0"))
    return kind, int(step), (not rank or int(rank[0]) == here)


class ChangedOutput:
    """The loss, applied to ``change(n, model_output)`` (n: 1-based call)."""

    def __init__(self, inner, change):
        self.inner, self.change, self.n = inner, change, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, out, *args, **kw):
        self.n += 1
        return self.inner(self.change(self.n, out), *args, **kw)


def _seams(kind: str, step: int) -> dict:
    """Trainer keyword arguments that inject the fault."""
    import shutil
    import signal
    import time

    import torch

    from train.losses import build_loss
    from train.model import build_model

    def loss(change):
        return lambda cfg: {"loss_fn": ChangedOutput(build_loss(cfg.loss), change)}

    if kind == "nan_loss":
        return loss(lambda n, out: dict(out, recon=out["recon"] * float("nan"))
                    if n == step else out)
    if kind == "hang":
        def stuck(n, out):
            while n == step:
                time.sleep(3600)
            return out
        return loss(stuck)
    if kind == "stop":
        def preempt(n, out):
            if n == step:
                os.kill(os.getpid(), signal.SIGUSR1)
            return out
        return loss(preempt)
    if kind == "inf_grad":
        class InfGrad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                return g * float("inf")

        calls = {"n": 0}

        def faulty_model(*args, **kw):
            m = build_model(*args, **kw)

            def hook(module, inputs, out):
                if not module.training:
                    return out
                calls["n"] += 1
                return dict(out, recon=InfGrad.apply(out["recon"])) if calls["n"] == step \
                    else out
            m.register_forward_hook(hook)
            return m
        return lambda cfg: {"build_model_fn": faulty_model}
    if kind == "no_space":
        calls = {"n": 0}

        def full_disk(path):
            u = shutil.disk_usage(path)
            calls["n"] += 1
            return type(u)(u.total, u.total, 0) if calls["n"] == step else u
        return lambda cfg: {"checkpoint_io": {"disk_usage": full_disk}}
    # enospc_write
    def failing_save(obj, f, *args, **kw):
        if f"step_{step:08d}.partial" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return torch.save(obj, f, *args, **kw)
    return lambda cfg: {"checkpoint_io": {"save_file": failing_save}}


def main() -> int:
    kind, step, here = _fault()
    from train.trainer import Trainer

    seams = _seams(kind, step) if here else (lambda cfg: {})
    return main_module.main(make_trainer=lambda cfg: Trainer(cfg, **seams(cfg)))


if __name__ == "__main__":
    main_module.exit_process(main())

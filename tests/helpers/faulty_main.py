"""train/main.py with one fault injected, for the fault tests. Launched like main.py
(`accelerate launch ... tests/helpers/faulty_main.py --config ...`); the fault comes from
TEMPO_VAE_FAULT=KIND:NUMBER[:RANK] (RANK: every rank when left out):

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


def _fault():
    kind, step, *rank = os.environ["TEMPO_VAE_FAULT"].split(":")
    here = int(os.environ.get("RANK", "0"))
    return kind, int(step), (not rank or int(rank[0]) == here)


def _wrap_loss(trainer_module, change) -> None:
    """The trainer's loss first applies ``change(n, model_output)`` (n: 1-based call)."""
    build_loss = trainer_module.build_loss
    calls = {"n": 0}

    class Wrapped:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, out, *args, **kw):
            calls["n"] += 1
            return self.inner(change(calls["n"], out), *args, **kw)
    trainer_module.build_loss = lambda cfg: Wrapped(build_loss(cfg))


def _install(kind: str, step: int, here: bool) -> None:
    import shutil

    import torch

    import train.trainer as trainer_module

    calls = {"n": 0}
    if kind == "nan_loss" and here:
        _wrap_loss(trainer_module, lambda n, out: dict(out, recon=out["recon"] * float("nan"))
                   if n == step else out)
    elif kind == "inf_grad" and here:
        class InfGrad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                return g * float("inf")

        build_model = trainer_module.build_model

        def faulty_build_model(*args, **kw):
            m = build_model(*args, **kw)

            def hook(module, inputs, out):
                if not module.training or out["recon"].device.type == "meta":
                    return out
                calls["n"] += 1
                if calls["n"] == step:
                    out = dict(out, recon=InfGrad.apply(out["recon"]))
                return out
            m.register_forward_hook(hook)
            return m
        trainer_module.build_model = faulty_build_model
    elif kind == "no_space" and here:
        disk_usage = shutil.disk_usage

        def full_disk(path):
            u = disk_usage(path)
            if os.path.basename(os.path.normpath(path)) == "checkpoints":
                calls["n"] += 1
                if calls["n"] == step:
                    return type(u)(u.total, u.total, 0)
            return u
        shutil.disk_usage = full_disk
    elif kind == "enospc_write" and here:
        save = torch.save

        def failing_save(obj, f, *args, **kw):
            if f"step_{step:08d}.partial" in str(f):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return save(obj, f, *args, **kw)
        torch.save = failing_save
    elif kind == "hang" and here:
        import time

        def stuck(n, out):
            while n == step:
                time.sleep(3600)
            return out
        _wrap_loss(trainer_module, stuck)
    elif kind == "stop" and here:
        import signal

        def preempt(n, out):
            if n == step:
                os.kill(os.getpid(), signal.SIGUSR1)
            return out
        _wrap_loss(trainer_module, preempt)
    elif kind not in ("nan_loss", "inf_grad", "no_space", "enospc_write", "hang", "stop"):
        raise SystemExit(f"TEMPO_VAE_FAULT: unknown kind {kind!r}")


if __name__ == "__main__":
    _install(*_fault())
    sys.exit(main_module.main())

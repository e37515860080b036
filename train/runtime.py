"""Process set-up that must happen before Accelerate and DeepSpeed start: stop-signal
handlers (installed first thing, so a preemption during start-up is not lost) and the
DeepSpeed CPU set-up on machines without a GPU."""

from __future__ import annotations

import importlib
import os
import signal
import sys

# SIGTERM: what schedulers, Kubernetes and torch elastic send; SIGUSR1: the usual SLURM
# "time is nearly up" signal (`#SBATCH --signal=USR1@120`)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []
# set by train.launch when a stop signal came before this rank was started
STOP_ENV = "TEMPO_VAE_STOP_SIGNAL"


def _on_stop_signal(signum, frame) -> None:
    _received.append(signum)


def install_stop_handlers() -> None:
    """Record SIGTERM/SIGUSR1 instead of dying; the trainer checks at every step, finishes
    it on all ranks, saves a checkpoint and exits 0. Idempotent."""
    for s in STOP_SIGNALS:
        signal.signal(s, _on_stop_signal)
    inherited = os.environ.get(STOP_ENV, "")
    if inherited.isdigit() and not _received:
        _received.append(int(inherited))


def stop_with_launcher() -> None:
    """Under torch elastic: have the kernel send this rank SIGTERM if its launcher dies (an
    unhandled signal, the OOM killer), so the ranks checkpoint and stop instead of training
    on without a launcher. Workers are started from the agent's main thread, so the signal
    cannot come from a thread ending."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() == 1:  # the launcher was gone before the request took effect
        _on_stop_signal(int(signal.SIGTERM), None)


def stop_signal() -> int | None:
    """The first stop signal this process received, or None."""
    return _received[0] if _received else None


def setup_cpu_deepspeed() -> None:
    """On a machine without CUDA: use DeepSpeed's CPU accelerator, and do not build its
    shared-memory all-reduce op.

    DeepSpeed JIT-compiles that op (used only by its inference all-reduce, never by
    training) in every process on CPU. The compile costs each fresh machine tens of
    seconds, and a rank killed while compiling leaves torch's extension lock file behind,
    after which every later start waits on it forever. Training collectives use
    torch.distributed (gloo) either way."""
    import torch

    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        # import_module: `import deepspeed.comm.torch as m` binds the torch package itself
        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:  # DeepSpeed is optional for single-process and DDP runs
        return
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None

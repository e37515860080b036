"""`accelerate launch` with preemption handled at the launcher.

    python -m train.launch --config_file accelerate_configs/multi_gpu_zero2.yaml \\
        train/main.py --config configs/training/train_vae_l2_supervised.yaml

Takes exactly the arguments of `accelerate launch` (one launcher per node, as usual) and
differs from it in four ways:

- when the training script is `train/main.py`, its run config is loaded here first: a bad
  key, type or value exits 2 at once, naming the key, before any rank starts.

- SIGTERM or SIGUSR1 sent to this process is passed on to the training processes it
  started. They finish the current step on every rank, save a complete checkpoint and exit
  0, and then this process exits 0. (A bare `accelerate launch` dies on SIGUSR1 and leaves
  its ranks without a launcher; on SIGTERM it gives them 30 s and exits 1.)
- if the ranks are still running TEMPO_VAE_STOP_GRACE_S seconds (default 900) after the
  signal, they are killed and the exit code is 1. Keep it below the scheduler's own grace
  period (SLURM KillWait, Kubernetes terminationGracePeriodSeconds).
- the exit code is that of the first rank that failed, e.g. 2 for a bad configuration,
  instead of 1 for any failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from data_prep.logs import get_logger, setup_logging
from train.runtime import STOP_ENV, STOP_SIGNALS

log = get_logger(__name__)

DEFAULT_GRACE_S = 900.0


def _say(msg: str) -> None:
    """Unbuffered write: safe in a signal handler that interrupted another write."""
    os.write(2, f"train.launch: {msg}\n".encode())


class _Forwarder:
    """Passes stop signals to this process's children (the ranks on this node, started by
    torch elastic or by Accelerate's single-process launcher) and kills them after the grace
    period. Ranks not started yet inherit the request through the environment."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signal: int | None = None
        self.killed = False

    def install(self) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, self._on_signal)

    def _children(self):
        import psutil

        return psutil.Process().children(recursive=False)

    def _on_signal(self, signum, frame) -> None:
        first = self.signal is None
        self.signal = signum
        os.environ[STOP_ENV] = str(int(signum))  # for ranks spawned from now on
        children = self._children()
        for c in children:
            try:
                c.send_signal(signum)
            except Exception:  # it exited meanwhile
                pass
        _say(f"{signal.Signals(signum).name}: asked {len(children)} training process(es) to "
             f"save a checkpoint and stop (grace {self.grace_s:g} s)")
        if first:
            t = threading.Timer(self.grace_s, self._kill)
            t.daemon = True
            t.start()

    def _kill(self) -> None:
        self.killed = True
        _say(f"the training processes did not stop within {self.grace_s:g} s of the signal; "
             "killing them")
        for c in self._children():
            try:
                c.kill()
            except Exception:
                pass


def _grace_from_env() -> float:
    raw = os.environ.get("TEMPO_VAE_STOP_GRACE_S", str(DEFAULT_GRACE_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise SystemExit(f"train.launch: TEMPO_VAE_STOP_GRACE_S={raw!r} must be a positive "
                         "number of seconds")
    return value


def _is_train_main(path: str) -> bool:
    """``train/main.py`` or the ``tempo-vae-train`` console script."""
    name = os.path.basename(path)
    return name == "tempo-vae-train" or (
        name == "main.py" and os.path.basename(os.path.dirname(os.path.abspath(path))) == "train")


def check_run_config(argv: list[str]) -> str | None:
    """When the training script is this project's ``train/main.py`` (or the
    ``tempo-vae-train`` console script), load its run config
    (``--config`` file and ``section.key=value`` overrides) here, in one process and before
    any rank starts, and return the error message of a bad one (None when it loads, or when
    the script is another one). Saves the 10-20 s a rank needs to import torch, DeepSpeed
    and Accelerate before it could report the same error."""
    script_at = next((i for i, a in enumerate(argv) if _is_train_main(a)), None)
    if script_at is None:
        return None
    from train.config import ConfigError, load_config
    from train.main import parse_args

    try:
        args = parse_args(argv[script_at + 1:])
    except SystemExit:  # argparse has printed the problem; the rank would do the same
        return "bad arguments to train/main.py (see above)"
    if args.help_config:
        return None
    try:
        load_config(args.config, args.overrides)
    except ConfigError as e:
        return str(e)
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fwd = _Forwarder(_grace_from_env())
    fwd.install()  # before the slow imports: a signal during start-up is kept
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Options of `accelerate launch` follow.\n", flush=True)
    else:
        setup_logging()
        problem = check_run_config(argv)
        if problem:
            log.error(problem)
            return 2
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    # torch elastic would install its own SIGTERM handler (30 s, then exit 1); leave SIGTERM
    # and SIGUSR1 to the forwarder, keep its handling of the interactive signals
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    try:
        launch_command(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 1
        how = (f"exit code {failure.exitcode}" if failure.exitcode > 0
               else f"signal {failure.signal_name()}")
        log.error(f"rank {rank} failed ({how}); exiting {code}")
        return 1 if fwd.killed else code
    except subprocess.CalledProcessError as e:  # Accelerate's single-process launcher
        return 1 if fwd.killed else (e.returncode if e.returncode > 0 else 1)
    if fwd.signal is not None:
        log.info(f"stopped by {signal.Signals(fwd.signal).name} after a checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())

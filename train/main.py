"""Train the TEMPO VAE + L2 head.

    accelerate launch --config_file accelerate_configs/cpu_deepspeed_zero2.yaml \
        train/main.py --config configs/training/demo.yaml [section.key=value ...]

Also runs as a single process: ``python train/main.py --config ...``. Exit codes: 0 done
(or stopped by SIGTERM/SIGUSR1 after saving a checkpoint), 2 bad configuration or data
(the message names the key or file and the fix), 3 a non-finite loss or gradient (the
message names the step, the terms and the batch's sample keys), 4 a checkpoint could not be
written (disk full, folder not writable; the previous checkpoint is intact), 1 any other
failure. Under `accelerate launch` the launcher exits 1 whatever the rank's code;
`python -m train.launch` passes it on.
"""

from __future__ import annotations

import argparse
import os
import sys

from train.runtime import (
    install_stop_handlers,
    setup_cpu_deepspeed,
    stop_with_launcher,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train/main.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Overrides: dotted keys, e.g. optim.lr=3e-4 "
                                       "data.batch_size=16 train.resume=latest")
    p.add_argument("--config", help="YAML run config (configs/training/*.yaml)")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_args(argv)


def main(argv=None, make_trainer=None) -> int:
    """Run from the command line; ``make_trainer(cfg)`` replaces ``Trainer(cfg)`` (tests
    inject faults through the trainer's constructor seams)."""
    install_stop_handlers()  # before the slow imports: a SIGTERM during start-up is kept
    stop_with_launcher()
    args = parse_args(argv)
    from train.config import ConfigError, describe, load_config

    if args.help_config:
        print(describe())
        return 0
    from data_prep.logs import get_logger, log_collective_error, setup_logging

    # the launcher's environment gives the rank before Accelerate exists
    setup_logging(rank=int(os.environ.get("RANK", "0")),
                  world=int(os.environ.get("WORLD_SIZE", "1")))
    log = get_logger("train.main")
    setup_cpu_deepspeed()
    from train.errors import EXIT_FAILURE, exit_code
    from train.trainer import Trainer

    trainer = cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        trainer = (make_trainer or Trainer)(cfg)
        trainer.fit()
    except Exception as e:
        code = exit_code(e)
        if code is not None:
            if isinstance(e, ConfigError):  # the same config, the same message on every rank
                log_collective_error(log, str(e))
            else:  # data, non-finite, checkpoint: each rank says what it saw itself
                log.error(str(e))
            return code
        if trainer is None or ("timed out" not in str(e).lower()
                               and "timeout" not in str(e).lower()):
            raise
        first = str(e).splitlines()[0][:300]
        log.error(f"rank {trainer.rank} waited {cfg.train.collective_timeout_s} s for the "
                  f"other ranks after step {trainer.step} ({first}); another rank stopped "
                  "answering (hung I/O, a lost node): see its log. The last checkpoint is "
                  "intact; resume with train.resume=latest (train.collective_timeout_s sets "
                  "the wait)")
        return EXIT_FAILURE
    return 0


def exit_process(code: int) -> None:
    """Exit with ``code``. A rank of a multi-process run skips the interpreter's teardown
    (``os._exit`` after flushing; everything the run writes is closed by then): with the
    process group still up, a background thread destroyed during teardown can abort the
    process (``terminate called without an active exception``, SIGABRT), and the launcher
    then reports the signal instead of the exit code (seen under ZeRO-2 on CPU, after a NaN
    loss on one rank and after a run that finished)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())

"""Failures of a training run and their process exit codes, in one place.

    0  finished, or stopped by SIGTERM/SIGUSR1 after saving a checkpoint
    1  any other failure (a rank stopped answering, a crash)
    2  bad configuration or data: the message names the key or file and the fix
    3  a non-finite loss or gradient (train.on_nonfinite=raise)
    4  a checkpoint could not be written; the previous one is intact
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_CHECKPOINT = 4


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient with train.on_nonfinite=raise (exit code 3)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact (exit code 4)."""


def exit_code(err: BaseException) -> int | None:
    """The exit code of a known failure, or None for an unexpected one (a traceback)."""
    from train.config import ConfigError
    from train.data import DataError

    if isinstance(err, (ConfigError, DataError)):
        return EXIT_CONFIG
    if isinstance(err, NonFiniteError):
        return EXIT_NONFINITE
    if isinstance(err, CheckpointError):
        return EXIT_CHECKPOINT
    return None

"""Logging set-up shared by every command of the project (the standard ``logging`` module).

    from data_prep.logs import get_logger, setup_logging
    log = get_logger(__name__)
    setup_logging(verbose=args.verbose)           # a data-prep command
    setup_logging(rank=rank, world=world)         # a training rank

Lines go to stderr as ``2026-11-29 09:30:01 INFO train.trainer: message``; with several
ranks the rank is in the prefix (``[rank 1/8]``) and, by default, only rank 0 logs INFO:
every rank logs WARNING and above, so a problem seen on one rank is not hidden, while an
error that every rank meets together (a bad config, a non-finite step all ranks agreed on)
is logged once, by rank 0, through :func:`log_collective_error`.

``TEMPO_VAE_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR) overrides the level on every rank.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT_LOGGERS = ("train", "data_prep", "bench", "__main__")  # __main__: a script run by path
LEVEL_ENV = "TEMPO_VAE_LOG_LEVEL"
_state = {"rank": 0}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (pytest's capture,
    a redirect made after set-up), not to the stream that was current at set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class _RankFilter(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = self.prefix
        return True


def setup_logging(rank: int = 0, world: int = 1, verbose: bool = False,
                  quiet: bool = False) -> None:
    """Configure the project's loggers (idempotent: a second call replaces the handler).

    Args:
        rank, world: this process's rank and the number of ranks (training); the rank goes
            into the prefix when ``world > 1`` and ranks other than 0 log WARNING and above.
        verbose: DEBUG instead of INFO; quiet: WARNING instead of INFO.
    Raises:
        ValueError: ``TEMPO_VAE_LOG_LEVEL`` is set to something that is not a level name.
    """
    _state["rank"] = rank
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    if rank != 0:
        level = max(level, logging.WARNING)
    forced = os.environ.get(LEVEL_ENV, "").strip().upper()
    if forced:
        if forced not in logging.getLevelNamesMapping():
            raise ValueError(f"{LEVEL_ENV}={forced!r} is not a logging level "
                             "(DEBUG, INFO, WARNING, ERROR)")
        level = logging.getLevelNamesMapping()[forced]
    handler = _StderrHandler()
    handler.addFilter(_RankFilter(f"[rank {rank}/{world}] " if world > 1 else ""))
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(rank_prefix)s%(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S"))
    for name in ROOT_LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, "_tempo_vae", False)]:
            logger.removeHandler(old)
        handler._tempo_vae = True
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (its ``__name__``). A module run with ``python -m``
    is called ``__main__``; its logger takes the module's real name (``train.export``), so
    that it sits under the loggers ``setup_logging`` configures."""
    if name == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        name = spec.name if spec is not None and spec.name else name
    return logging.getLogger(name)


def log_collective_error(logger: logging.Logger, msg: str) -> None:
    """An error that every rank meets at the same point (they agreed on it through a
    collective, or read the same config): logged by rank 0 only; other ranks log it at
    DEBUG, so ``TEMPO_VAE_LOG_LEVEL=DEBUG`` still shows every rank's view."""
    if _state["rank"] == 0:
        logger.error(msg)
    else:
        logger.debug(msg)

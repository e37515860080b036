"""Small file helpers: every file we publish appears whole or not at all."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file here: 0o666 less the umask
    (temporary files are created 0o600, which others on a shared cluster cannot read)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n")
                       .encode())


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and ``(default: X)`` after every option that has a
    default worth showing (not None, False, '' or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        d = action.default  # identity for None/False: 0 == False, and 0 is worth showing
        if d is None or d is False or (isinstance(d, str | list) and not d) \
                or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def argument_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of a command: ``prog`` as users type it, the first paragraph of
    the module docstring ``doc`` as description and the rest as epilog, defaults shown."""
    head, _, rest = (doc or "").strip().partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=head, epilog=rest or None,
                                   formatter_class=HelpFormatter)


def reuse_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let this process reuse the memory of large freed buffers (glibc's malloc; returns
    False and changes nothing elsewhere). Blocks up to ``mmap_threshold`` bytes (32 MiB
    is glibc's maximum) come from the heap instead of fresh mappings, and up to
    ``trim_threshold`` bytes of freed heap stay with the process: the buffers a worker
    allocates granule after granule (tiles, flag blocks) then reuse pages instead of
    faulting in new zeroed ones, which costs ~20 % of a granule's time on a VM. The
    price is memory kept by the process after use (at most ``trim_threshold``)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and \
        bool(mallopt(m_trim_threshold, trim_threshold))

"""Where shards are read from: a local folder, object storage, a web server or a command.

``data.shards`` (and ``ShardSource.parse``) accepts:

    /data/shards                      a local folder (fast path: large members are read
                                      with ``preadv`` straight into their batch)
    https://host/prefix, http://...   a URL prefix, read with webdataset's ``gopen`` (curl)
    s3://bucket/prefix, gs://...      any fsspec protocol (``s3fs`` / ``gcsfs`` installed;
                                      ``pip install tempo-vae[remote]``)
    pipe:COMMAND {}                   a command that writes the file to stdout; ``{}`` is
                                      replaced by the path relative to the shard folder,
                                      e.g. ``pipe:aws s3 cp s3://bucket/shards/{} -``
    .../train/train-{00000..00031}-0000.tar     a brace-expanded shard list (webdataset's
                                      form; join several with ``::``), in any of the forms
                                      above, including ``pipe:cat /data/train/x-{0..3}.tar``

In every form ``sizes.json``, ``stats.json`` and ``header.json`` (or, in folders written
before it existed, ``manifest.json``) are read from the same place as the shards: the folder above ``train/`` and ``val/``. A shard list restricts a
split to the listed shards (each must be in ``sizes.json``); a split none of whose shards
is listed keeps all of its shards.

Remote shards are streamed once, front to back. A connection that fails part-way (or a
stream that ends before ``sizes.json``'s sample count) is reopened, and the samples
already delivered are skipped, up to ``retries`` times; after that ``ShardError`` names
the shard, the address and the samples delivered, so nothing is lost silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tarfile
import time
from collections.abc import Iterator

from data_prep import samples

_SPLIT_SHARD = re.compile(r"(?P<rel>(?:train|val)/[^/\s'\"]+\.tar)")
_URL = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://")
GOPEN_SCHEMES = ("http", "https")


class SourceError(Exception):
    """A shard location that cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class ShardSource:
    """Address of every file of a shard folder: ``prefix + relative path + suffix``.

    ``kind`` is ``local`` (a folder), ``gopen`` (http(s) and ``pipe:``, webdataset's
    ``gopen``) or ``fsspec`` (s3://, gs://, memory://, any other fsspec protocol).
    ``listed``: relative shard paths selected by a shard list, or None for all."""

    spec: str
    kind: str
    prefix: str
    suffix: str = ""
    listed: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, spec: str) -> ShardSource:
        """Parse a ``data.shards`` value (forms in the module docstring).

        Raises SourceError for a list whose entries do not end in ``train|val/NAME.tar``,
        entries from different folders, or a ``pipe:`` folder without ``{}``."""
        spec = str(spec).strip()
        if _is_list(spec):
            from webdataset.shardlists import expand_urls

            entries = expand_urls(spec)
            prefixes, rels = set(), []
            for e in entries:
                matches = list(_SPLIT_SHARD.finditer(e))
                if not matches:
                    raise SourceError(f"data.shards: list entry {e!r} does not name a shard "
                                      "as .../train/NAME.tar or .../val/NAME.tar")
                m = matches[-1]
                prefixes.add((e[:m.start()], e[m.end():]))
                rels.append(m["rel"])
            if len(prefixes) != 1:
                raise SourceError(f"data.shards: the listed shards are in {len(prefixes)} "
                                  f"different folders, e.g. {sorted(prefixes)[:2]}; a list "
                                  "must come from one shard folder (its sizes.json)")
            prefix, suffix = prefixes.pop()
            kind = _kind(prefix)
            if kind == "local" and suffix:
                raise SourceError(f"data.shards: unexpected text after the shard name in {spec}")
            return cls(spec, kind, prefix, suffix, tuple(dict.fromkeys(rels)))
        if spec.startswith("pipe:"):
            if "{}" not in spec:
                raise SourceError(f"data.shards: {spec!r} is a pipe: command without {{}} (the "
                                  "place of the file's path relative to the shard folder), "
                                  "e.g. 'pipe:cat /data/shards/{}'")
            prefix, suffix = spec.split("{}", 1)
            return cls(spec, "gopen", prefix, suffix)
        kind = _kind(spec)
        if kind == "local":
            return cls(spec, "local", os.path.join(spec, ""))
        return cls(spec, kind, spec.rstrip("/") + "/")

    @property
    def local(self) -> bool:
        return self.kind == "local"

    @property
    def root(self) -> str:
        """The shard folder (local path or URL) for messages."""
        return self.prefix.rstrip("/") or self.spec

    def address(self, rel: str) -> str:
        """The path, URL or ``pipe:`` command of ``rel`` (e.g. ``train/x-0000.tar``)."""
        return f"{self.prefix}{rel}{self.suffix}"

    def open(self, rel: str):
        """A binary stream of ``rel``; the caller closes it. Errors (missing file, failed
        connection, command exit status) surface as OSError here or while reading."""
        addr = self.address(rel)
        if self.kind == "local":
            return open(addr, "rb")
        if self.kind == "gopen":
            from webdataset.gopen import gopen

            return gopen(addr, "rb")
        try:
            import fsspec
        except ImportError as e:  # pragma: no cover - fsspec is a dependency
            raise SourceError(f"{addr}: reading it needs fsspec ({e})") from None
        try:
            return fsspec.open(addr, "rb").open()
        except ImportError as e:
            raise SourceError(f"{addr}: the fsspec back-end for this protocol is not "
                              f"installed ({e}); pip install s3fs or gcsfs") from None

    def read_bytes(self, rel: str) -> bytes:
        """The whole of a small file; OSError when it cannot be read."""
        f = self.open(rel)
        try:
            data = f.read()
        finally:
            f.close()
        return data

    def read_json(self, rel: str):
        """Parse a JSON file of the folder. Raises SourceError naming its address."""
        addr = self.address(rel)
        try:
            data = self.read_bytes(rel)
        except (OSError, ValueError) as e:
            raise SourceError(f"{addr} cannot be read ({e})") from None
        try:
            return json.loads(data)
        except ValueError as e:
            raise SourceError(f"{addr} is not valid JSON ({e})") from None


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:  # the stream failed already; its error is the one reported
        pass


def _is_list(spec: str) -> bool:
    return "::" in spec or re.search(r"\{[^{}]*(?:,|\.\.)[^{}]*\}", spec) is not None \
        or spec.endswith(".tar")


def _kind(prefix: str) -> str:
    if prefix.startswith("pipe:"):
        return "gopen"
    m = _URL.match(prefix)
    if not m:
        return "local"
    scheme = m["scheme"].lower()
    if scheme == "file":
        return "fsspec"
    return "gopen" if scheme in GOPEN_SCHEMES else "fsspec"


_CHUNK = 1 << 22


def _read_into(stream, mv: memoryview) -> int:
    """Fill ``mv`` from ``stream``; the number of bytes read (short only at end of stream)."""
    pos = 0
    while pos < len(mv):
        chunk = stream.read(min(len(mv) - pos, _CHUNK))
        if not chunk:
            break
        mv[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
    return pos


def _read_exact(stream, n: int, what: str) -> bytearray:
    buf = bytearray(n)
    got = _read_into(stream, memoryview(buf))
    if got != n:
        raise EOFError(f"{what} cut short ({got} of {n} bytes)")
    return buf


def _pax_records(data: bytes) -> dict[str, str]:
    """Records ``"<length> <key>=<value>\n"`` of a POSIX.1-2001 extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"", b"\0"):
        sp = data.index(b" ", pos)
        n = int(data[pos:sp])
        key, _, value = bytes(data[sp + 1:pos + n - 1]).partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += n
    return out


def iter_tar_stream(stream, where: str) -> Iterator[dict]:
    """Raw samples ``{"__key__": key, ext: bytearray}`` of a tar read front to back from a
    non-seekable stream (grouped by key like ``samples.iter_tar``). Headers are parsed by
    the standard library (``tarfile.TarInfo.frombuf``), with POSIX extended (pax) and GNU
    long-name headers applied; each member's payload is read once, in large chunks,
    straight into its buffer (tarfile's own stream mode passes every 10 KiB block through
    joined byte strings). Every sample but the last is followed by
    another key's header, so it is complete when yielded; the caller decides about the
    last one (see ``RemoteShardReader``). Raises tarfile.TarError or EOFError on damage."""
    cur: dict = {}
    pax: dict[str, str] = {}
    long_name: str | None = None
    while True:
        head = bytearray(tarfile.BLOCKSIZE)
        got = _read_into(stream, memoryview(head))
        if got == 0 or head.count(0) == tarfile.BLOCKSIZE:
            break  # end of stream at a member boundary, or the end-of-archive blocks
        if got != tarfile.BLOCKSIZE:
            raise EOFError(f"tar header cut short ({got} of {tarfile.BLOCKSIZE} bytes)")
        ti = tarfile.TarInfo.frombuf(bytes(head), "utf-8", "surrogateescape")
        size = int(pax.get("size", ti.size)) if ti.type not in (
            tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME) else ti.size
        pad = -size % tarfile.BLOCKSIZE
        if ti.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            data = _read_exact(stream, size + pad, f"{ti.name} extended header")[:size]
            if ti.type != tarfile.XGLTYPE:  # global headers: nothing we use
                pax = _pax_records(data)
            continue
        if ti.type == tarfile.GNUTYPE_LONGNAME:
            data = _read_exact(stream, size + pad, "GNU long name")[:size]
            long_name = bytes(data).rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        name = pax.get("path", long_name or ti.name)
        pax, long_name = {}, None
        if ti.type not in tarfile.REGULAR_TYPES:
            if size + pad:
                _read_exact(stream, size + pad, f"member {name}")
            continue
        key, _, ext = os.path.basename(name).partition(".")
        if cur and cur["__key__"] != key:
            yield cur
            cur = {}
        cur["__key__"] = key
        cur[ext] = _read_exact(stream, size, f"member {name}")
        if pad:
            _read_exact(stream, pad, f"member {name} padding")
    if cur:
        yield cur


class RemoteShardReader:
    """Samples of one remote shard, exactly once, with reconnection.

    ``want`` is the shard's sample count from sizes.json. A read that fails part-way, or
    that ends after fewer than ``want`` samples, is retried ``retries`` times (waiting
    ``backoff_s`` x attempt); samples already yielded are skipped on the new stream (tar
    order is fixed). The last sample is held back until the stream closed cleanly with the
    right count."""

    def __init__(self, source: ShardSource, rel: str, want: int, retries: int = 3,
                 backoff_s: float = 0.5):
        self.source, self.rel, self.want = source, rel, want
        self.retries, self.backoff_s = retries, backoff_s
        self.attempts = 0  # streams opened

    def __iter__(self) -> Iterator[dict]:
        addr = self.source.address(self.rel)
        delivered = 0
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * attempt)
            self.attempts += 1
            seen, pending, stream = 0, None, None
            try:
                stream = self.source.open(self.rel)
                try:
                    for raw in iter_tar_stream(stream, addr):
                        if pending is not None:
                            seen += 1
                            if seen > delivered:
                                delivered += 1
                                yield pending
                        pending = raw
                except GeneratorExit:  # the consumer stopped early: no retry, no error
                    _close_quietly(stream)
                    raise
                stream.close()  # a gopen pipe raises here on a failed command
            except (OSError, EOFError, tarfile.TarError, ValueError, SourceError) as e:
                if stream is not None:
                    _close_quietly(stream)
                last_error = f"{type(e).__name__}: {e}"
                continue
            total = seen + (pending is not None)
            if total != self.want:
                last_error = f"stream ended after {total} samples, sizes.json says {self.want}"
                if total > self.want:
                    break  # a different shard; retrying will not help
                continue
            if pending is not None and total > delivered:
                delivered += 1
                yield pending
            return
        raise samples.ShardError(
            f"{addr}: shard {self.rel} could not be read after {self.attempts} attempt(s) "
            f"({last_error}); {delivered} of {self.want} samples delivered")

"""Damaging a copy of a shard folder, for the tests of what readers do with bad data."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

from data_prep.util import atomic_write_json


def private_copy(src, dst):
    """A copy of shard folder ``src`` that a test may damage: (its path, its sizes.json, its
    train shards in order)."""
    shutil.copytree(src, dst)
    sizes = json.load(open(os.path.join(dst, "sizes.json")))
    return dst, sizes, sorted(k for k in sizes if k.startswith("train"))


def truncate_half(path):
    """Cut a file to half its size, as an interrupted copy or a full disk leaves it."""
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def corrupt_member(root, rel, key, ext, data):
    """Rewrite shard ``rel`` with member ``key.ext`` replaced by ``data`` (or removed), and
    record its new size in the manifest and header.json, as if make_shards had written it
    so: the damage is then for the reader to find (the start-up size check is tested
    separately)."""
    path = os.path.join(root, rel)
    with tarfile.open(path) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(path, "w") as t:
        for m, d in members:
            if m.name == f"{key}.{ext}":
                if data is None:
                    continue
                d = data
            m.size = len(d)
            t.addfile(m, io.BytesIO(d))
    for name in ("manifest.json", "header.json"):
        man_path = os.path.join(root, name)
        man = json.load(open(man_path))
        man["shard_bytes"][rel] = os.path.getsize(path)
        atomic_write_json(man_path, man)

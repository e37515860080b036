"""Shards read from a web server on 127.0.0.1, from ``pipe:`` commands, from shard lists and
from an fsspec file system: the same batches as the local folder, exact resume, and a
connection dropped part-way through a shard either retried (nothing lost or repeated) or
stopped naming the shard."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers.common import TILE, epoch_batches, resumed_epoch
from helpers.damage import truncate_half
from helpers.http_server import make_handler, reset, serve

from data_prep import make_shards, samples
from train.config import DataConfig
from train.data import DataError, build_loader
from train.shard_source import ShardSource, SourceError


@pytest.fixture(scope="module")
def shards(synth_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("remote") / "shards")
    assert make_shards.main([synth_dir, out, "--max-samples-per-shard", "4"] + TILE) == 0
    return out


Handler = make_handler()  # drops, requests and bytes sent per path (helpers.http_server)


@pytest.fixture(scope="module")
def server(shards):
    with serve(shards, Handler) as url:
        yield url


@pytest.fixture(autouse=True)
def _reset_handler():
    reset(Handler)


def cfg(root, **kw):
    base = dict(shards=root, batch_size=3, num_workers=2, shuffle_buffer=6, shuffle_initial=3)
    return DataConfig(**(base | kw))


def batches(c, world=1, split="train"):
    """Epoch 1 of every rank (see helpers.common.epoch_batches)."""
    return epoch_batches(c, world, split, epoch=1)


def same(a, b):
    """Same batch counts per rank, same keys, real flags and tensors in the same order."""
    assert [n for n, _ in a] == [n for n, _ in b]
    for (_, xs), (_, ys) in zip(a, b):
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys):
            assert x["keys"] == y["keys"]
            assert torch.equal(x["real"], y["real"])
            assert torch.equal(x["l1"], y["l1"])
            assert torch.equal(x["l2"].nan_to_num(-1), y["l2"].nan_to_num(-1))


def shard_names(root, split="train"):
    sizes = json.load(open(os.path.join(root, "sizes.json")))
    return sorted(k for k in sizes if k.startswith(split + "/"))


def all_keys(root, rels):
    return sorted(raw["__key__"] for rel in rels
                  for raw in samples.iter_tar(os.path.join(root, rel)))


def real_keys(res):
    return sorted(k for _, bs in res for b in bs
                  for k, v in zip(b["keys"], b["real"].tolist()) if v)


@pytest.mark.parametrize("world", [1, 2])
def test_http_epoch_equals_local_folder(shards, server, world):
    local = batches(cfg(shards), world)
    remote = batches(cfg(server), world)
    same(local, remote)
    assert real_keys(remote) == all_keys(shards, shard_names(shards))  # exactly once
    reads = [Handler.requests.get(f"/{r}", 0) for r in shard_names(shards)]
    # each shard streamed once; one more opening of a shard for the padding template
    assert min(reads) == 1 and sum(reads) <= len(reads) + 1


def test_http_validation_split_and_resume(shards, server):
    same(batches(cfg(shards), 2, "val"), batches(cfg(server), 2, "val"))
    ref, _, rest = resumed_epoch(cfg(server), epoch=2, consumed=2)
    assert [b["keys"] for b in rest] == [b["keys"] for b in ref[2:]]
    assert all(torch.equal(x["l1"], y["l1"]) for x, y in zip(rest, ref[2:]))


def test_connection_dropped_mid_shard_is_retried(shards, server):
    victim = shard_names(shards)[1]
    Handler.drops[f"/{victim}"] = 2
    res = batches(cfg(server, num_workers=0))
    same(batches(cfg(shards, num_workers=0)), res)  # nothing lost, nothing twice
    assert Handler.requests[f"/{victim}"] == 3  # two cut streams, then a whole one


def test_connection_dropped_every_time_names_the_shard(shards, server):
    victim = shard_names(shards)[0]
    Handler.drops[f"/{victim}"] = 100
    with pytest.raises(samples.ShardError, match=victim.replace("/", ".")) as e:
        batches(cfg(server, num_workers=0, shard_retries=1))
    assert "2 attempt(s)" in str(e.value)
    # skip mode: the rest is delivered once and what the shard lost is counted
    Handler.drops[f"/{victim}"] = 100
    loader = build_loader(cfg(server, num_workers=0, shard_retries=1, on_error="skip"), "train")
    loader.set_epoch(1)
    got = [k for b in loader for k, v in zip(b["keys"], b["real"].tolist()) if v]
    others = [r for r in shard_names(shards) if r != victim]
    want = all_keys(shards, others)
    victim_keys = all_keys(shards, [victim])
    assert len(got) == len(set(got))
    assert set(want) <= set(got) and set(got) <= set(want) | set(victim_keys)
    lost = len(set(victim_keys) - set(got))
    assert lost > 0 and loader.errors == {"unreadable_shard": lost}


def test_pipe_cat_folder_and_brace_list(shards):
    local = batches(cfg(shards))
    same(local, batches(cfg(f"pipe:cat {shards}/{{}}")))
    names = shard_names(shards)
    stems = [os.path.basename(n)[: -len(".tar")] for n in names[:3]]
    listed = f"pipe:cat {shards}/train/{{{','.join(stems)}}}.tar"
    src = ShardSource.parse(listed)
    assert src.listed == tuple(names[:3]) and src.kind == "gopen"
    res = batches(cfg(listed, num_workers=1))
    assert real_keys(res) == all_keys(shards, names[:3])
    local_list = f"{shards}/train/{{{','.join(stems)}}}.tar"  # the same list, local reader
    assert ShardSource.parse(local_list).local
    assert real_keys(batches(cfg(local_list, num_workers=1))) == all_keys(shards, names[:3])
    # a split none of whose shards is listed keeps all of them
    assert real_keys(batches(cfg(listed, num_workers=1), split="val")) == \
        all_keys(shards, shard_names(shards, "val"))


def test_http_brace_list_with_two_lists(shards, server):
    names = shard_names(shards)
    spec = "::".join(f"{server}/{n}" for n in (names[0], names[-1]))
    res = batches(cfg(spec, num_workers=0))
    assert real_keys(res) == all_keys(shards, [names[0], names[-1]])


def test_fsspec_memory_filesystem(shards):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.put(shards, "/tempo-test-shards", recursive=True)
    try:
        same(batches(cfg(shards, num_workers=0)),
             batches(cfg("memory://tempo-test-shards", num_workers=0)))
    finally:
        fs.rm("/tempo-test-shards", recursive=True)


def test_remote_errors_are_clear(shards, server):
    with pytest.raises(DataError, match="sizes.json cannot be read"):
        build_loader(cfg(f"{server}/no-such-folder"), "train")
    with pytest.raises(DataError, match="does not know"):
        build_loader(cfg(f"{server}/train/not-a-shard-0000.tar"), "train")
    with pytest.raises(SourceError, match="without"):
        ShardSource.parse("pipe:cat /data/shards")
    with pytest.raises(SourceError, match="different folders"):
        ShardSource.parse(f"{server}/a/train/x.tar::{server}/b/train/y.tar")


@pytest.mark.parametrize("fmt", ["PAX_FORMAT", "GNU_FORMAT", "USTAR_FORMAT"])
def test_stream_reader_follows_tar_formats(shards, fmt):
    """Long names (pax / GNU headers), directories and every format tarfile writes; and the
    same samples as the local reader for real shards."""
    import io
    import tarfile

    from train.shard_source import iter_tar_stream

    rng = np.random.default_rng(0)
    names = ["d" * 120 + "/k1.x", "dir/k1.y", "k2.x"]
    if fmt == "USTAR_FORMAT":
        names[0] = "k1.x"
    payloads = [rng.bytes(700 + i) for i in range(3)]
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=getattr(tarfile, fmt)) as tf:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in zip(names, payloads):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    bio.seek(0)
    got = list(iter_tar_stream(bio, "test"))
    assert [g["__key__"] for g in got] == ["k1", "k2"]
    assert got[0]["x"] == payloads[0] and got[0]["y"] == payloads[1]
    assert got[1]["x"] == payloads[2]
    with pytest.raises(EOFError):  # cut inside a member
        list(iter_tar_stream(io.BytesIO(bio.getvalue()[:1500]), "test"))
    for rel in shard_names(shards)[:2]:
        with open(os.path.join(shards, rel), "rb") as f:
            ours = list(iter_tar_stream(f, rel))
        ref = list(samples.iter_tar(os.path.join(shards, rel)))
        assert ours == ref


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_rank_training_over_http_equals_local(shards, server, tmp_path):
    """2 ranks under ZeRO-2 train on shards served over HTTP, one of them cut part-way once:
    the same per-step losses, bitwise, as from the local folder."""
    from helpers.common import DEMO, ROOT, check, launch, scalars, tiny_overrides

    zero2 = os.path.join(ROOT, "accelerate_configs", "cpu_deepspeed_zero2.yaml")
    Handler.drops[f"/{shard_names(shards)[2]}"] = 1
    losses = []
    for name, root in (("local", shards), ("http", server)):
        out = str(tmp_path / name)
        args = ["--config", DEMO] + tiny_overrides(root, out) + [
            "train.steps=5", "optim.schedule=constant", "data.shuffle_buffer=4"]
        check(launch(zero2, "train/main.py", args))
        losses.append(dict(scalars(out, "train/loss")))
    assert sorted(losses[0]) == list(range(1, 6))
    assert losses[0] == losses[1]
    assert Handler.requests[f"/{shard_names(shards)[2]}"] >= 2  # the cut stream was retried


def test_start_reads_the_header_not_the_manifest(shards, server, tmp_path, caplog):
    """A rank's loaders read sizes.json, stats.json and the small header.json; a folder
    written before header.json existed still loads, from the whole manifest, with a note."""
    for split in ("train", "val"):
        build_loader(cfg(server), split)
    assert Handler.requests.get("/header.json") == 2
    assert "/manifest.json" not in Handler.requests
    old = str(tmp_path / "old")
    shutil.copytree(shards, old)
    os.unlink(os.path.join(old, "header.json"))
    old_handler = make_handler()
    with serve(old, old_handler) as url, caplog.at_level("INFO", logger="train.data"):
        loader = build_loader(cfg(url), "train")
        nbytes = os.path.getsize(os.path.join(old, "manifest.json"))
        assert old_handler.sent["/manifest.json"] == nbytes
        # inspect_shards notes the missing header; it is no problem
        from data_prep import inspect_shards

        summary, problems = inspect_shards.inspect(url, progress=False)
    assert problems == [] and f"{url}/header.json cannot be read" in summary["notes"][0]
    assert loader.shards.header == build_loader(cfg(server), "train").shards.header
    assert f"{url}/manifest.json instead ({nbytes:,} bytes read)" in caplog.text


@pytest.mark.parametrize("form", ["http", "pipe", "memory", "http-list"])
def test_inspect_remote_folder(shards, server, form, capsys):
    """inspect_shards reads every form of data.shards, streaming each shard once."""
    from data_prep import inspect_shards

    local, problems = inspect_shards.inspect(shards, progress=False)
    assert problems == [] and local["notes"] == []
    names = shard_names(shards)
    if form == "memory":
        fsspec = pytest.importorskip("fsspec")
        fs = fsspec.filesystem("memory")
        fs.put(shards, "/tempo-inspect", recursive=True)
        spec = "memory://tempo-inspect"
    else:
        spec = {"http": server, "pipe": f"pipe:cat {shards}/{{}}",
                "http-list": "::".join(f"{server}/{n}" for n in names[:2])}[form]
    try:
        got, problems = inspect_shards.inspect(spec, progress=False)
        assert problems == [] and got["notes"] == []
        if form == "http-list":
            assert got["shards"] == 2 and got["samples"] == {
                "train": sum(json.load(open(os.path.join(shards, "sizes.json")))[n]
                             for n in names[:2])}
        else:
            assert got == local
            assert inspect_shards.main([spec, "--quiet"]) == 0
            assert capsys.readouterr().out.strip().endswith("OK")
        if form.startswith("http"):  # each listed shard streamed once
            assert all(Handler.requests[f"/{n}"] == (1 if form == "http-list" else 2)
                       for n in names[:2])
    finally:
        if form == "memory":
            fs.rm("/tempo-inspect", recursive=True)


def test_inspect_remote_problems_name_the_address(shards, server, tmp_path):
    from data_prep import inspect_shards

    _, problems = inspect_shards.inspect(f"{server}/no-such-folder", progress=False)
    assert len(problems) == 1 and f"{server}/no-such-folder/sizes.json" in problems[0]
    _, problems = inspect_shards.inspect("memory://no-such-folder", progress=False)
    assert "memory://no-such-folder/sizes.json" in problems[0]
    victim = shard_names(shards)[1]
    Handler.drops[f"/{victim}"] = 1  # cut once: retried, nothing to report
    assert inspect_shards.inspect(server, progress=False)[1] == []
    Handler.drops[f"/{victim}"] = 100
    _, problems = inspect_shards.inspect(server, progress=False, retries=1)
    assert len(problems) == 2  # the shard, and its split's total against the manifest
    assert problems[0].startswith(f"{victim}: after ") and f"{server}/{victim}" in problems[0]
    assert "2 attempt(s)" in problems[0] and problems[1].startswith("train: ")
    # a shard cut short on the server: found while streaming, named with its address
    bad = str(tmp_path / "bad")
    shutil.copytree(shards, bad)
    truncate_half(os.path.join(bad, victim))
    with serve(bad) as url:
        _, problems = inspect_shards.inspect(url, progress=False, retries=0)
    assert any(p.startswith(f"{victim}: ") and f"{url}/{victim}" in p for p in problems)

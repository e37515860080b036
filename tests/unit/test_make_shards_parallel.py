"""make_shards as plan -> independent tasks by index -> merge: the same bytes as one
process; statistics from a seeded sample of training granules; the tar writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers.common import ROOT, TILE

from data_prep import make_shards, samples, shard_format, tempo
from data_prep.granule import ReadOptions, read_granule
from data_prep.stats import log_radiance

OPTS = ["--shard-size", "150KB"] + TILE


def tree(root: str) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes), without the per-unit markers."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), root)
            if not rel.startswith(".done"):
                out[rel] = open(os.path.join(d, f), "rb").read()
    return out


@pytest.fixture(scope="module")
def one_process(synth_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one") / "shards")
    assert make_shards.main([synth_dir, out] + OPTS) == 0
    return out


def test_tasks_by_index_then_merge_equal_one_process(synth_dir, one_process, tmp_path, capsys):
    out = str(tmp_path / "shards")
    assert make_shards.main([synth_dir, out, "--step", "plan"] + OPTS) == 0
    units = json.load(open(os.path.join(out, "units.json")))["units"]
    assert len(units) >= 4  # enough to share
    # merging before every unit is done names a missing one
    assert make_shards.main([synth_dir, out, "--step", "run", "--task-index", "2",
                             "--num-tasks", "3"] + OPTS) == 0
    capsys.readouterr()
    assert make_shards.main([synth_dir, out, "--step", "merge"] + OPTS) == 1
    assert "not done" in capsys.readouterr().err
    # tasks in any order; each runs only its units
    for i in (1, 0):  # task 0 with 2 worker processes
        assert make_shards.main([synth_dir, out, "--step", "run", "--task-index", str(i),
                                 "--num-tasks", "3", "--workers", str(2 - i)] + OPTS) == 0
        done = sorted(f[:-5] for f in os.listdir(os.path.join(out, ".done")))
        assert done == sorted(u["id"] for j, u in enumerate(units) if j % 3 >= i)
    assert make_shards.main([synth_dir, out, "--step", "merge"] + OPTS) == 0
    assert tree(out) == tree(one_process)
    # the merge step writes the loader's header beside the manifest
    head = json.load(open(os.path.join(out, shard_format.HEADER)))
    man = json.load(open(os.path.join(out, shard_format.MANIFEST)))
    assert head == shard_format.header(man) and set(head) >= {"format", "tile_size",
                                                              "shard_bytes"}
    assert "tiles" not in head and "granules" not in head


def test_steps_must_share_inputs_and_options(synth_dir, tmp_path, capsys):
    out = str(tmp_path / "shards")
    assert make_shards.main([synth_dir, out, "--step", "run"] + OPTS) == 2
    assert "--step plan first" in capsys.readouterr().err
    assert make_shards.main([synth_dir, out, "--step", "plan"] + OPTS) == 0
    assert make_shards.main([synth_dir, out, "--step", "run", "--stride", "8"] + OPTS) == 2
    assert "differs in: options" in capsys.readouterr().err


def test_merge_finds_a_damaged_shard(synth_dir, tmp_path, capsys):
    out = str(tmp_path / "shards")
    for step in ("plan", "run"):
        assert make_shards.main([synth_dir, out, "--step", step] + OPTS) == 0
    sizes_before = sorted(os.listdir(os.path.join(out, "train")))
    victim = os.path.join(out, "train", sizes_before[0])
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    capsys.readouterr()
    assert make_shards.main([synth_dir, out, "--step", "merge"] + OPTS) == 1
    assert f"train/{sizes_before[0]}" in capsys.readouterr().err


def test_sampled_statistics(synth_dir, tmp_path):
    keys = [f"g{i:03d}" for i in range(40)]
    a = make_shards.sample_granules(keys, 0.1, 1, 42)
    assert a == make_shards.sample_granules(list(reversed(keys)), 0.1, 1, 42)
    assert len(a) == 4 and set(a) <= set(keys) and a != keys[:4]
    assert len(make_shards.sample_granules(keys, 0.1, 8, 42)) == 8
    assert make_shards.sample_granules(keys[:3], 0.1, 8, 42) == keys[:3]
    out = str(tmp_path / "shards")
    assert make_shards.main([synth_dir, out, "--stats-fraction", "0.3",
                             "--stats-min-granules", "1"] + OPTS) == 0
    stats = json.load(open(os.path.join(out, "stats.json")))
    man = json.load(open(os.path.join(out, "manifest.json")))
    train = man["splits"]["train"]
    assert stats["sampled_from"]["training_granules"] == len(train) == 3
    assert len(stats["granules"]) == 1 and set(stats["granules"]) <= set(train)
    found, _ = tempo.discover(tempo.find_files(synth_dir))
    used = [read_granule(g, ReadOptions()) for g in found.values()
            if g.gid.key in stats["granules"]]
    logs = np.concatenate([log_radiance(g.radiance).reshape(-1, g.radiance.shape[-1])
                           for g in used]).astype(np.float64)
    np.testing.assert_allclose(stats["l1"]["mean"], np.nanmean(logs, 0), rtol=1e-9)
    np.testing.assert_allclose(stats["l1"]["std"], np.nanstd(logs, 0), rtol=1e-6)


def test_tar_writer_matches_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    rng = np.random.default_rng(0)
    items = [samples.encode(f"k{i:03d}", rng.standard_normal((5, 4, 4)),
                            rng.standard_normal((4, 4, 4)), rng.standard_normal((4, 4, 4)),
                            {"i": i, "pad": "x" * i * 37}) for i in range(11)]
    for maxcount, maxsize in ((4, 1e9), (100, 3000)):
        ref = wds.ShardWriter(str(tmp_path / "a%03d.tar"), maxcount=maxcount, maxsize=maxsize,
                              encoder=False, verbose=0, mtime=0.0)
        ours = make_shards.TarShardWriter(str(tmp_path / "b%03d.tar"), maxcount, maxsize)
        for s in items:
            ref.write(s)
            ours.write(s)
        ref.close()
        ours.close()
        a = sorted(f for f in os.listdir(tmp_path) if f.startswith("a"))
        b = sorted(f for f in os.listdir(tmp_path) if f.startswith("b"))
        assert len(a) == len(b) > 1
        for x, y in zip(a, b):
            assert (tmp_path / x).read_bytes() == (tmp_path / y).read_bytes()
            os.unlink(tmp_path / x)
            os.unlink(tmp_path / y)


@pytest.mark.slow
def test_array_script_runs_the_steps(synth_dir, one_process, tmp_path):
    out = str(tmp_path / "shards")
    script = os.path.join(ROOT, "scripts", "make_shards_array.sbatch")
    env = dict(os.environ, PYTHON=sys.executable, SLURM_CPUS_PER_TASK="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def step(name, **extra):
        subprocess.run(["bash", script, synth_dir, out] + OPTS,
                       env=env | {"MAKE_SHARDS_STEP": name} | extra, check=True, cwd=ROOT)

    step("plan")
    for i in (12, 10, 11):  # an array --array=10-12
        step("run", SLURM_ARRAY_TASK_ID=str(i), SLURM_ARRAY_TASK_MIN="10",
             SLURM_ARRAY_TASK_COUNT="3")
    step("merge")
    assert tree(out) == tree(one_process)


def test_float32_moments_match_float64():
    from data_prep.stats import ChannelMoments

    rng = np.random.default_rng(3)
    x = (rng.normal(25.0, 0.3, (20000, 7))).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = np.nan
    x[:, 3] = np.nan  # a channel with nothing valid
    a, b = ChannelMoments.empty(7), ChannelMoments.empty(7)
    for part in np.array_split(x, 3):
        a.update(part)  # float32 path
        b.update(part.astype(np.float64))
    ref = x.astype(np.float64)
    ok = np.arange(7) != 3
    np.testing.assert_array_equal(a.count, np.isfinite(ref).sum(0))
    np.testing.assert_allclose(a.mean[ok], np.nanmean(ref[:, ok], 0), rtol=1e-12)
    np.testing.assert_allclose(a.std[ok], np.nanstd(ref[:, ok], 0), rtol=1e-6)
    np.testing.assert_allclose(a.std[ok], b.std[ok], rtol=1e-6)
    assert a.count[3] == 0 and a.mean[3] == 0 and a.m2[3] == 0

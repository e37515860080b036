"""What several test modules share: paths, the tiny model's overrides, and running real
training processes (``accelerate launch``, ``train.launch``, a single process) on CPU.

Imported as ``from helpers.common import ...`` (``tests/`` is on sys.path through
``tests/conftest.py``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REFERENCE_DIR = os.path.abspath(os.path.join(ROOT, "..", "shared", "reference_data"))
DEMO = os.path.join(ROOT, "configs", "training", "demo.yaml")
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
HELPERS = os.path.join("tests", "helpers")  # scripts run by launchers, relative to ROOT

# small synthetic granules and the tile size of the shards made from them
SMALL = ["--granules", "4", "--mirror-steps", "32", "--xtrack", "48", "--channels", "64",
         "--seed", "3", "--l2-extra-mirror-steps", "1"]
TILE = ["--tile-size", "16", "--quiet"]


def reference_file(name: str) -> str:
    """Path of a file of ../shared/reference_data; skips the test when it is absent."""
    path = os.path.join(REFERENCE_DIR, name)
    if not os.path.exists(path):
        pytest.skip(f"reference data not present: {path}")
    return path


def tiny_overrides(shards: str, out_dir: str) -> list[str]:
    """A model small enough to train for a few steps on CPU in seconds."""
    return [f"data.shards={shards}", "data.batch_size=4", "data.num_workers=0",
            "data.shuffle_buffer=8", "data.shuffle_initial=4",
            "model.in_channels=64", "model.channels=[16,16]", "model.latent_channels=4",
            "model.head_hidden=[16]", "model.tile_size=16", "model.attn_heads=2",
            "optim.lr=3e-3", "optim.warmup_steps=0", "train.progress=false",
            f"train.output_dir={out_dir}", "train.log_every=1", "train.val_every=0"]


def env() -> dict:
    """Environment of a training process on CPU: DeepSpeed's CPU accelerator, one OpenMP
    thread per rank, unbuffered output, and this checkout's code first on the path."""
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             PYTHONPATH=ROOT)
    e.pop("CUDA_VISIBLE_DEVICES", None)
    return e


def launch(config_file, script, args, extra=(), timeout=500, launcher=None, **env_vars):
    """Run ``launcher`` (default: accelerate launch) with ``config_file`` and wait for it."""
    cmd = [*(launcher or [ACCELERATE, "launch"]), "--config_file", config_file, *extra, script,
           *args]
    return subprocess.run(cmd, cwd=ROOT, env=env() | env_vars, capture_output=True, text=True,
                          timeout=timeout)


def train_run(shards: str, out: str, *extra: str) -> str:
    """A single-process training run of the tiny model (the cheapest real checkpoint)."""
    p = subprocess.run([sys.executable, "train/main.py", "--config", DEMO,
                        *tiny_overrides(shards, out), "train.steps=6", *extra],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return out


def scalars(run_dir, tag):
    """[(step, value)] of a TensorBoard scalar of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def check(proc):
    """Assert a finished process exited 0, showing the end of its output otherwise."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def resumed_epoch(data_cfg, epoch: int, consumed: int, rank: int = 1, world: int = 2):
    """Train-split batches of one rank in ``epoch``: (all of them from an uninterrupted
    loader, the saved state of a loader stopped after ``consumed`` batches, and what a new
    loader restored from that state yields)."""
    from train.data import build_loader

    full = build_loader(data_cfg, "train", rank, world)
    full.set_epoch(epoch)
    ref = list(full)
    part = build_loader(data_cfg, "train", rank, world)
    part.set_epoch(epoch)
    it = iter(part)
    for _ in range(consumed):
        next(it)
    state = part.state_dict()
    resumed = build_loader(data_cfg, "train", rank, world)
    resumed.load_state_dict(state)
    return ref, state, list(resumed)


def epoch_batches(data_cfg, world: int = 1, split: str = "train", epoch: int = 0):
    """[(len(loader), its batches)] of every rank of ``world`` for one epoch of ``split``."""
    from train.data import build_loader

    out = []
    for rank in range(world):
        loader = build_loader(data_cfg, split, rank, world)
        loader.set_epoch(epoch)
        out.append((len(loader), list(loader)))
    return out

"""Faults with real processes: exact resume, preemption by signal, SIGKILL during a
checkpoint save, corrupt data in a training run, bad configuration."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers.common import ACCELERATE, DEMO, ROOT, check, env, launch, scalars, tiny_overrides


def fault_overrides(shards: str, out: str) -> list[str]:
    """The tiny model without the encoder-gradient shares: faults are injected at the n-th
    call of the loss or of the model's forward, and under DeepSpeed the shares add one of
    each at every log step."""
    return tiny_overrides(shards, out) + ["train.grad_shares=false"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ZERO2 = os.path.join(ROOT, "accelerate_configs", "cpu_deepspeed_zero2.yaml")


def losses(run_dir):
    return dict(scalars(run_dir, "train/loss"))


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_mid_epoch_gives_identical_losses(train_shards, tmp_path, mode):
    """N steps straight == N/2 steps, stop, resume to N: bitwise equal per-step losses
    (2 processes, ZeRO-2, bf16 on CPU). 7 steps of batch 4 on 2 ranks, stopped after 4: the
    stop falls mid-epoch (an epoch here is 3 batches per rank)."""
    common = ["--config", DEMO] + [o for o in fault_overrides(train_shards, "")
                                   if not o.startswith("train.output_dir")]
    # constant lr: the "interrupted" run is made by asking for fewer steps, and a cosine
    # schedule depends on train.steps (a real preemption keeps train.steps)
    common += [f"data.mode={mode}", "data.samples_per_epoch=20", "train.steps=7",
               "optim.schedule=constant"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    check(launch(ZERO2, "train/main.py", common + [f"train.output_dir={a}"]))
    check(launch(ZERO2, "train/main.py", common + [f"train.output_dir={b}", "train.steps=4"]))
    p = launch(ZERO2, "train/main.py", common + [f"train.output_dir={b}", "train.resume=latest"])
    check(p)
    assert "at step 4" in p.stderr
    la, lb = losses(a), losses(b)
    assert sorted(la) == list(range(1, 8)) and sorted(lb) == list(range(1, 8))
    assert [la[s] for s in range(1, 8)] == [lb[s] for s in range(1, 8)]


def _children(pid):
    import psutil

    return psutil.Process(pid).children(recursive=True)


def _wait_for(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _start_endless_run(train_shards, out, launcher):
    """A 2-rank ZeRO-2 run that would train for ever; returns once it is training."""
    args = ["--config", DEMO] + fault_overrides(train_shards, out) + [
        "train.steps=100000", "train.ckpt_every=0"]
    cmd = launcher + ["--config_file", ZERO2, "train/main.py", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    events = os.path.join(out, "tb", "events*")
    _wait_for(lambda: glob.glob(events) and os.path.getsize(glob.glob(events)[0]) > 2000,
              300, "training to start")
    return proc, args


def _ranks_of(out):
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "train/main.py" in cmd and out in cmd and "launch" not in cmd:
            found.append(p)
    return found


def _checkpoint_step(out):
    ck = os.path.join(out, "checkpoints")
    name = open(os.path.join(ck, "latest")).read().strip()
    return json.load(open(os.path.join(ck, name, "trainer_state.json")))["step"]  # complete


def test_sigusr1_to_one_rank_saves_and_exits_zero_then_resumes(train_shards, tmp_path):
    out = str(tmp_path / "run")
    proc, args = _start_endless_run(train_shards, out, [ACCELERATE, "launch"])
    try:
        workers = _ranks_of(out)
        assert len(workers) == 2
        workers[-1].send_signal(signal.SIGUSR1)
        so, se = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, se[-4000:]
    assert "stop requested (signal" in se
    step = _checkpoint_step(out)
    assert step >= 1
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["finished"] is False and summary["step"] == step
    p = launch(ZERO2, "train/main.py", args[:-2] + [f"train.steps={step + 2}",
                                                    "train.resume=latest"])
    check(p)
    assert f"at step {step}" in p.stderr


LAUNCHERS = {"train.launch": [sys.executable, "-m", "train.launch"],
             "accelerate": [ACCELERATE, "launch"]}


@pytest.mark.parametrize("launcher, sig, code", [
    ("train.launch", signal.SIGUSR1, 0),  # forwarded; exits 0 after the checkpoint
    ("accelerate", signal.SIGTERM, 1),  # torch elastic forwards it, then re-raises: exit 1
    ("accelerate", signal.SIGUSR1, -signal.SIGUSR1),  # kills the launcher; ranks get SIGTERM
])
def test_signal_to_the_launcher_leaves_a_complete_checkpoint(train_shards, tmp_path, launcher,
                                                             sig, code):
    out = str(tmp_path / "run")
    proc, _ = _start_endless_run(train_shards, out, LAUNCHERS[launcher])
    try:
        proc.send_signal(sig)
        so, se = proc.communicate(timeout=300)
        # the ranks are gone too (none trains on without its launcher) ...
        _wait_for(lambda: not _ranks_of(out), 120, "the ranks to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, se[-4000:]
    # ... and they left a complete checkpoint, named by `latest`
    assert _checkpoint_step(out) >= 1
    assert not glob.glob(os.path.join(out, "checkpoints", "*.partial"))


def test_signal_while_the_ranks_start_still_saves_and_exits_zero(train_shards, tmp_path):
    out = str(tmp_path / "run")
    args = ["--config", DEMO] + fault_overrides(train_shards, out) + [
        "train.steps=100000", "train.ckpt_every=0"]
    proc = subprocess.Popen(LAUNCHERS["train.launch"] + ["--config_file", ZERO2,
                                                         "train/main.py", *args],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(_ranks_of(out)) == 2, 120, "the ranks to start")
        time.sleep(1.0)  # they are importing and initialising, long before the first step
        proc.send_signal(signal.SIGTERM)
        so, se = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, se[-4000:]
    assert _checkpoint_step(out) == 1  # the first step, then the stop


def test_sigkill_during_checkpoint_keeps_the_previous_one(train_shards, tmp_path):
    out = str(tmp_path / "run")
    ck = os.path.join(out, "checkpoints")
    args = ["--config", DEMO] + fault_overrides(train_shards, out) + [
        "train.steps=100000", "train.ckpt_every=1", "train.keep_last=2"]
    cmd = [ACCELERATE, "launch", "--config_file", ZERO2, "train/main.py", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # wait until at least one checkpoint is complete and the next save is under way
        _wait_for(lambda: os.path.exists(os.path.join(ck, "latest")) and
                  glob.glob(os.path.join(ck, "*.partial")), 300, "a checkpoint save")
    finally:
        # SIGKILL the whole tree: the launcher and the ranks (in their own sessions)
        for c in _children(proc.pid):
            c.send_signal(signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(0.5)
    name = open(os.path.join(ck, "latest")).read().strip()
    assert os.path.exists(os.path.join(ck, name, "trainer_state.json"))  # complete
    step = json.load(open(os.path.join(ck, name, "trainer_state.json")))["step"]
    p = launch(ZERO2, "train/main.py", args[:-3] + [f"train.steps={step + 1}",
                                                    "train.resume=latest"])
    check(p)
    assert f"at step {step}" in p.stderr, p.stderr[-2000:]
    assert not glob.glob(os.path.join(ck, "*.partial"))  # the half-written save is cleaned up
    done = sorted(d for d in os.listdir(ck) if d.startswith("step_") and "partial" not in d)
    assert done[-1] == f"step_{step + 1:08d}"


def test_corrupt_sample_stops_or_is_skipped_and_counted(train_shards, tmp_path):
    from helpers.damage import corrupt_member, private_copy, truncate_half

    from data_prep import samples

    root, sizes, train = private_copy(train_shards, str(tmp_path / "shards"))
    rel = train[0]
    key = next(samples.iter_tar(os.path.join(root, rel)))["__key__"]
    corrupt_member(root, rel, key, "json", None)  # a sample with a missing member
    out = str(tmp_path / "run")
    args = ["--config", DEMO] + fault_overrides(root, out) + ["train.steps=3"]  # one epoch
    p = launch(ZERO2, "train/main.py", args)
    assert p.returncode != 0
    assert f"sample '{key}': missing members ['json']" in p.stderr
    # and a truncated shard: with skip, both are counted, per reason
    cut = train[-1]
    truncate_half(os.path.join(root, cut))
    p = launch(ZERO2, "train/main.py", args + ["data.on_error=skip"])
    check(p)
    summary = json.load(open(os.path.join(out, "summary.json")))
    lost = summary["data_errors"].pop("unreadable_shard")
    assert 1 <= lost <= sizes[cut] and summary["data_errors"] == {"missing_members": 1}
    assert "missing_members" in p.stderr and "unreadable_shard" in p.stderr
    assert dict(scalars(out, "data/skipped_missing_members"))[3] == 1


def test_bad_configuration_fails_before_training_with_exit_2(train_shards, tmp_path):
    out = str(tmp_path / "run")
    base = ["--config", DEMO] + fault_overrides(train_shards, out) + ["train.steps=2"]
    # through train.launch the rank's exit code 2 reaches the shell (accelerate launch: 1)
    p = launch(ZERO2, "train/main.py", base + ["data.shards=/no/such/dir"],
               launcher=LAUNCHERS["train.launch"])
    assert p.returncode == 2 and "shard folder /no/such/dir does not exist" in p.stderr
    p = launch(ZERO2, "train/main.py", base + ["model.in_channels=65"])
    assert "model.in_channels=65 but the shards" in p.stderr
    # a DeepSpeed JSON whose fixed batch size does not match batch x accumulation x ranks
    ds = json.load(open(os.path.join(ROOT, "accelerate_configs", "ds_zero2.json")))
    ds["train_batch_size"] = 64
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds))
    acc_path = tmp_path / "accelerate.yaml"
    acc_path.write_text(open(ZERO2).read().replace("accelerate_configs/ds_zero2.json",
                                                   str(ds_path)))
    p = launch(str(acc_path), "train/main.py", base, launcher=LAUNCHERS["train.launch"])
    assert p.returncode == 2, p.stderr[-3000:]
    assert ("DeepSpeed train_batch_size=64 but data.batch_size x optim.grad_accum x 2 ranks gives "
            f"8 (DeepSpeed requires train_batch_size = micro batch x accumulation x ranks): "
            f"{ds_path} sets train_batch_size=64; set it to \"auto\"" in p.stderr)
    # accumulation from the launcher, not from the JSON (which says "auto"): named as such
    p = launch(ZERO2, "train/main.py", base, extra=["--gradient_accumulation_steps", "2"],
               launcher=LAUNCHERS["train.launch"])
    assert p.returncode == 2, p.stderr[-3000:]
    assert ("gradient accumulation 2 from `accelerate launch --gradient_accumulation_steps 2`"
            in p.stderr and "optim.grad_accum=1" in p.stderr and "auto" not in p.stderr)
    check(launch(ZERO2, "train/main.py", base))
    p = launch(ZERO2, "train/main.py", base + ["model.latent_channels=8", "train.resume=latest"])
    assert p.returncode != 0 and "cannot resume" in p.stderr and "latent_channels" in p.stderr


FAULTY = "tests/helpers/faulty_main.py"


@pytest.mark.parametrize("fault, mode", [
    ("nan_loss:3:1", "raise"), ("nan_loss:3:1", "skip"),  # on rank 1 only
    ("inf_grad:3", "raise"), ("inf_grad:3", "skip")])
def test_nonfinite_step_stops_naming_it_or_is_skipped_and_counted(train_shards, tmp_path,
                                                                  fault, mode):
    out = str(tmp_path / "run")
    args = ["--config", DEMO] + fault_overrides(train_shards, out) + [
        "train.steps=5", "train.ckpt_every=0", f"train.on_nonfinite={mode}"]
    p = launch(ZERO2, FAULTY, args, launcher=LAUNCHERS["train.launch"], TEMPO_VAE_FAULT=fault)
    what = "loss" if fault.startswith("nan_loss") else "gradient norm (inf)"
    if mode == "raise":
        assert p.returncode == 3, p.stderr[-3000:]
        assert f"non-finite {what} at step 3" in p.stderr
        assert "batch keys ['" in p.stderr and "train.on_nonfinite=skip" in p.stderr
        if what == "loss":
            assert "rank 1 terms: ['nll', 'recon_mae', 'loss']" in p.stderr  # offending terms
        assert not os.path.exists(os.path.join(out, "checkpoints"))  # nothing bad is saved
        return
    check(p)
    assert p.stderr.count("skipped step (1 so far)") == 1  # once, not once per rank
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["step"] == 5 and summary["skipped_steps"] == 1
    assert all(v == v for v in losses(out).values())  # nothing non-finite reached the model
    assert dict(scalars(out, "train/skipped_steps"))[5] == 1


@pytest.mark.parametrize("fault", ["no_space:2:1", "enospc_write:4:1"])
def test_full_disk_at_a_checkpoint_keeps_the_previous_one(train_shards, tmp_path, fault):
    """no_space: the free-space check before the second save fails on rank 1 (all ranks stop
    together, nothing written). enospc_write: rank 1's writes of that save fail midway
    (ENOSPC from the write itself); the job stops from that rank."""
    out = str(tmp_path / "run")
    ck = os.path.join(out, "checkpoints")
    args = ["--config", DEMO] + fault_overrides(train_shards, out) + [
        "train.steps=6", "train.ckpt_every=2"]
    t0 = time.time()
    p = launch(ZERO2, FAULTY, args, launcher=LAUNCHERS["train.launch"], TEMPO_VAE_FAULT=fault)
    assert p.returncode == 4, p.stderr[-3000:]
    assert time.time() - t0 < 240  # the other rank is not left waiting in a collective
    if fault.startswith("no_space"):
        assert "cannot save checkpoint step_00000004 (rank 1: 0.00 GB free in" in p.stderr
    else:
        assert "checkpoint step_00000004 could not be written on rank 1: [Errno 28]" in p.stderr
    assert "step_00000002, is intact" in p.stderr
    assert open(os.path.join(ck, "latest")).read().strip() == "step_00000002"
    assert _checkpoint_step(out) == 2
    if fault.startswith("enospc"):  # the half-written save is dropped and training resumes
        p = launch(ZERO2, "train/main.py", args + ["train.resume=latest"])
        check(p)
        assert "at step 2" in p.stderr and "removing incomplete checkpoint" in p.stderr
        assert open(os.path.join(ck, "latest")).read().strip() == "step_00000006"


def test_a_rank_that_hangs_fails_the_job_in_bounded_time(train_shards, tmp_path):
    """Rank 1 never finishes micro-step 4: rank 0 gives up after train.collective_timeout_s
    and says why, the launcher stops rank 1, and the step-2 checkpoint is there to resume."""
    out = str(tmp_path / "run")
    args = ["--config", DEMO] + fault_overrides(train_shards, out) + [
        "train.steps=6", "train.ckpt_every=2", "train.collective_timeout_s=10"]
    t0 = time.time()
    p = launch(ZERO2, FAULTY, args, launcher=LAUNCHERS["train.launch"], timeout=400,
               TEMPO_VAE_FAULT="hang:4:1")
    assert p.returncode == 1, p.stderr[-3000:]
    assert "rank 0 waited 10 s for the other ranks after step 3" in p.stderr
    assert time.time() - t0 < 200
    assert _checkpoint_step(out) == 2


def test_schedule_counts_and_a_stop_inside_an_accumulation_window(train_shards, tmp_path):
    """2 ranks, ZeRO-2, bf16, grad_accum=2, warmup + cosine over 8 steps. The logged lr of
    step s is lr x lr_lambda(s - 1) (the schedule is not N times too fast); samples_seen is
    the number of real tiles in every micro-batch on every rank; DeepSpeed accumulates in
    fp32. SIGUSR1 during the second micro-step of step 2: the step completes, a checkpoint
    is saved, and the resumed run's per-step losses equal the uninterrupted run's bitwise.
    The same 2-rank DeepSpeed checkpoint then resumes on 1 rank, and that one on 2 ranks
    (universal checkpoints)."""
    from train.config import load_config
    from train.data import build_loader
    from train.optim import lr_lambda

    common = ["--config", DEMO] + [o for o in fault_overrides(train_shards, "")
                                   if not o.startswith("train.output_dir")]
    common += ["optim.grad_accum=2", "optim.schedule=cosine", "optim.warmup_steps=4",
               "optim.lr=1e-3", "train.steps=8", "train.ckpt_every=0"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    p = launch(ZERO2, "train/main.py", common + [f"train.output_dir={a}"])
    check(p)
    assert "grad_accum_dtype=float32" in p.stderr
    cfg = load_config(DEMO, common[2:])
    f = lr_lambda(cfg)
    lrs = dict(scalars(a, "train/lr"))
    assert sorted(lrs) == list(range(1, 9))
    for s in range(1, 9):
        assert lrs[s] == pytest.approx(1e-3 * f(s - 1), rel=1e-6), s
    # every real tile of the 8 x 2 micro-batches of each rank, counted independently
    want = 0
    for rank in (0, 1):
        loader, left, epoch = build_loader(cfg.data, "train", rank, 2), 16, 0
        while left:
            loader.set_epoch(epoch)
            for batch in loader:
                want += int(batch["real"].sum())
                left -= 1
                if not left:
                    break
            epoch += 1
    summary = json.load(open(os.path.join(a, "summary.json")))
    assert summary["samples_seen"] == want
    assert dict(scalars(a, "train/samples_seen"))[8] == want
    state = json.load(open(os.path.join(a, "checkpoints", "step_00000008",
                                        "trainer_state.json")))
    assert state["scheduler"]["last_epoch"] == 8
    # preempted in the middle of the window of step 2 (micro-step 4 of rank 1)
    p = launch(ZERO2, FAULTY, common + [f"train.output_dir={b}"], TEMPO_VAE_FAULT="stop:4:1")
    check(p)
    assert "stop requested" in p.stderr and _checkpoint_step(b) == 2
    p = launch(ZERO2, "train/main.py", common + [f"train.output_dir={b}", "train.resume=latest"])
    check(p)
    la, lb = losses(a), losses(b)
    assert [la[s] for s in range(1, 9)] == [lb[s] for s in range(1, 9)]
    assert json.load(open(os.path.join(b, "summary.json")))["samples_seen"] == want
    # the same 2-rank ZeRO-2 checkpoint on 1 rank, converted to DeepSpeed's universal
    # checkpoint and re-partitioned: the loaded weights give the same validation as the
    # weights that were saved (train.steps=8: validate and save at once) ...
    val = json.load(open(os.path.join(a, "summary.json")))["val"]
    p = launch(ZERO2, "train/main.py", common + [f"train.output_dir={a}", "train.resume=latest"],
               extra=["--num_processes", "1"], launcher=LAUNCHERS["train.launch"])
    check(p)
    assert "to a universal checkpoint for 1 ranks" in p.stderr
    assert "elastic resume: checkpoint from 2 ranks" in p.stderr and "at step 8" in p.stderr
    val1 = json.load(open(os.path.join(a, "summary.json")))["val"]
    assert val1["samples"] == val["samples"]
    for k in ("recon_mae", "l2/NO2_rmse", "l2/CLDO4_rmse"):
        assert val1[k] == pytest.approx(val[k], rel=1e-5), k
    # ... and the checkpoint that 1 rank saved, back on 2 ranks
    state = json.load(open(os.path.join(a, "checkpoints", "step_00000008",
                                        "trainer_state.json")))
    assert state["world_size"] == 1
    p = launch(ZERO2, "train/main.py", common + [f"train.output_dir={a}", "train.resume=latest"])
    check(p)
    assert "to a universal checkpoint for 2 ranks" in p.stderr and "at step 8" in p.stderr
    val2 = json.load(open(os.path.join(a, "summary.json")))["val"]
    for k in ("recon_mae", "l2/NO2_rmse", "l2/CLDO4_rmse"):
        assert val2[k] == pytest.approx(val[k], rel=1e-5), k

"""Real `accelerate launch` runs on CPU: 2-process ZeRO-2 and ZeRO-3, checkpoints, resume,
fp32 conversion with DeepSpeed's own zero_to_fp32.py, and two "machines" on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers.common import ACCELERATE, DEMO, ROOT, check, env, launch, scalars, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_zero2_two_processes_train_checkpoint_and_resume(train_shards, tmp_path):
    out = str(tmp_path / "run")
    cfg = os.path.join(ROOT, "accelerate_configs", "cpu_deepspeed_zero2.yaml")
    args = ["--config", DEMO] + tiny_overrides(train_shards, out)
    p = launch(cfg, "train/main.py", args + ["train.steps=12", "train.ckpt_every=6"])
    check(p)
    assert "2 ranks; deepspeed=True precision=bf16" in p.stderr
    loss = [v for _, v in scalars(out, "train/recon_mae")]
    assert len(loss) == 12 and all(map(lambda v: v == v, loss))  # finite
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3  # it learns on the tiny set
    ck = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(ck)) == ["latest", "step_00000006", "step_00000012"]
    assert open(os.path.join(ck, "latest")).read().strip() == "step_00000012"
    state = json.load(open(os.path.join(ck, "step_00000012", "trainer_state.json")))
    assert state["step"] == 12 and state["world_size"] == 2
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["val"]["samples"] == 6  # every validation tile, counted once
    # resume: starts at the saved step and continues to the new total
    p = launch(cfg, "train/main.py", args + ["train.steps=16", "train.ckpt_every=0",
                                             "train.resume=latest"])
    check(p)
    assert "resumed from" in p.stderr and "at step 12" in p.stderr
    steps = [s for s, _ in scalars(out, "train/loss")]
    assert max(steps) == 16 and 13 in steps
    assert json.load(open(os.path.join(out, "summary.json")))["step"] == 16


def test_zero3_checkpoint_converts_to_fp32_weights_matching_live_model(train_shards, tmp_path):
    out = str(tmp_path / "run")
    probe = str(tmp_path / "probe.pt")
    cfg = os.path.join(ROOT, "accelerate_configs", "cpu_deepspeed_zero3.yaml")
    p = launch(cfg, "tests/helpers/train_and_probe.py",
               [probe, DEMO] + tiny_overrides(train_shards, out) + ["train.steps=4"])
    check(p)
    ckpt = os.path.join(out, "checkpoints", "step_00000004")
    conv = subprocess.run([sys.executable, os.path.join(ckpt, "zero_to_fp32.py"), ckpt,
                           str(tmp_path / "fp32"), "--safe_serialization"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0, conv.stderr[-3000:]
    from safetensors.torch import load_file

    from train.config import load_config
    from train.model import build_model

    files = [f for f in os.listdir(tmp_path / "fp32") if f.endswith(".safetensors")]
    state = {}
    for f in files:
        state.update(load_file(str(tmp_path / "fp32" / f)))
    cfg_run = load_config(os.path.join(ckpt, "config.yaml"))
    model = build_model(cfg_run.model, cfg_run.loss)
    model.load_state_dict(state, strict=True)  # every key present, none extra
    assert all(v.dtype == torch.float32 for v in state.values())
    live = torch.load(probe)
    model.eval()
    with torch.no_grad():
        bf = model.to(torch.bfloat16)(live["x"].to(torch.bfloat16), sample=False)
    # the live model ran with bf16 copies of the same fp32 master weights
    torch.testing.assert_close(bf["recon"].float(), live["recon"], rtol=0.02, atol=0.02)
    torch.testing.assert_close(bf["l2_pred"].float(), live["l2_pred"], rtol=0.02, atol=0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_on_localhost(train_shards, tmp_path):
    out = str(tmp_path / "run")
    cfg = os.path.join(ROOT, "accelerate_configs", "cpu_deepspeed_zero2.yaml")
    port = _free_port()
    args = ["--config", DEMO] + tiny_overrides(train_shards, out) + ["train.steps=4"]
    procs = []
    for rank in (0, 1):
        extra = ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                 "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                 "--deepspeed_multinode_launcher", "standard"]
        cmd = [ACCELERATE, "launch", "--config_file", cfg, *extra, "train/main.py", *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=500) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, so[-2000:] + se[-4000:]
    assert "2 ranks" in outs[0][1]  # the start-up log line, on stderr
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["step"] == 4 and summary["samples_seen"] > 0


def test_loss_balance_and_gradient_shares_under_zero2(train_shards, tmp_path):
    """The L2 factor and the encoder-gradient shares need gradients at the encoder output;
    under DeepSpeed they are taken without going through the engine's hooked outputs (which
    ended in an IndexError inside ZeRO-2's backward epilogue)."""
    out = str(tmp_path / "run")
    cfg = os.path.join(ROOT, "accelerate_configs", "cpu_deepspeed_zero2.yaml")
    args = ["--config", DEMO] + tiny_overrides(train_shards, out) + [
        "train.steps=4", "loss.l2_share=0.5", "loss.l2_share_every=2", "train.grad_shares=true"]
    check(launch(cfg, "train/main.py", args))
    balance = [v for _, v in scalars(out, "train/l2_balance")]
    assert len(balance) == 4 and balance[-1] != 1.0  # re-set at steps 1 and 3
    shares = [v for _, v in scalars(out, "train/grad_share/reconstruction")]
    assert len(shares) == 4 and all(0.0 < v < 1.0 for v in shares)


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def torchrun(script, args, nproc=2, timeout=400):
    """`torchrun` with Accelerate's DDP on CPU (gloo): the non-DeepSpeed multi-rank path."""
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env() | {"ACCELERATE_USE_CPU": "true"},
                          capture_output=True, text=True, timeout=timeout)


def test_two_ranks_give_the_one_process_step_gradient(train_shards, tmp_path):
    """The same 4 tiles (NaN-heavy targets, one padding tile): 1 process x batch 4 and
    2 ranks (DDP) x 1 micro-batch of 2 or x 2 micro-batches of 1 give the same gradient of
    every loss term."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
    from step_gradients import TERMS, step_gradients

    from train.config import load_config

    args = tiny_overrides(train_shards, str(tmp_path / "run")) + ["optim.grad_clip=0",
                                                                  "data.batch_size=2"]
    out = str(tmp_path / "grads.pt")
    p = torchrun("tests/helpers/step_gradients.py", [out, "1,2", DEMO] + args)
    check(p)
    ranks = torch.load(out)
    ref = step_gradients(load_config(DEMO, args), 1)
    for accum in (1, 2):
        for term in TERMS:
            a, b = ref[term], ranks[accum][term]
            assert a.keys() == b.keys() and a, term
            err = max(float((a[k] - b[k]).abs().max()) for k in a)
            scale = max(float(v.abs().max()) for v in a.values())
            assert err <= 1e-5 * scale, (accum, term, err / scale)


def test_elastic_resume_between_one_and_two_ranks(train_shards, tmp_path):
    """DDP: 2 ranks stop mid-epoch, 1 process resumes, 2 ranks resume again; each resume
    continues the step count, the schedule and the sample count."""
    out = str(tmp_path / "run")
    args = ["--config", DEMO] + tiny_overrides(train_shards, out) + [
        "optim.schedule=cosine", "train.ckpt_every=0"]
    check(torchrun("train/main.py", args + ["train.steps=2"]))
    summary = json.load(open(os.path.join(out, "summary.json")))
    p = subprocess.run([sys.executable, "train/main.py", *args, "train.steps=4",
                        "train.resume=latest"], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=300)
    check(p)
    assert "elastic resume: checkpoint from 2 ranks" in p.stderr and "at step 2" in p.stderr
    p = torchrun("train/main.py", args + ["train.steps=6", "train.resume=latest"])
    check(p)
    assert "elastic resume: checkpoint from 1 ranks" in p.stderr and "at step 4" in p.stderr
    final = json.load(open(os.path.join(out, "summary.json")))
    assert final["step"] == 6 and final["samples_seen"] > summary["samples_seen"]
    state = json.load(open(os.path.join(out, "checkpoints", "step_00000006",
                                        "trainer_state.json")))
    assert state["world_size"] == 2 and state["scheduler"]["last_epoch"] == 6
    assert [s for s, _ in scalars(out, "train/loss")][-2:] == [5, 6]

"""scripts/slurm_multinode.sbatch run under stand-ins for srun, scontrol and the per-node
launcher: the arguments each node's train.launch receives, and the requeue decision taken
from summary.json and the exit code."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from helpers.common import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "slurm_multinode.sbatch")


def _exe(path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def slurm(tmp_path):
    """PATH with `scontrol` and `srun` stand-ins. srun runs its command as node 0 with a
    `python` stand-in first on PATH that records its argv and ends the way FAKE_END says."""
    bin_dir, node_bin = tmp_path / "bin", tmp_path / "node_bin"
    bin_dir.mkdir()
    node_bin.mkdir()
    log = tmp_path / "calls.jsonl"
    _exe(bin_dir / "scontrol", f"""#!/bin/bash
if [ "$1" = show ]; then echo node-a; echo node-b; exit 0; fi
{sys.executable} -c 'import json,sys; print(json.dumps(["scontrol"]+sys.argv[1:]))' "$@" >> {log}
""")
    _exe(bin_dir / "srun", f"""#!/bin/bash
shift  # --kill-on-bad-exit=1
SLURM_NODEID=0 PATH={node_bin}:$PATH exec "$@"
""")
    _exe(node_bin / "python", f"""#!{sys.executable}
import json, os, sys
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(["python"] + sys.argv[1:]) + "\\n")
end = os.environ["FAKE_END"]
if end.startswith("exit"):
    sys.exit(int(end[4:]))
out = os.environ["FAKE_OUT"]
os.makedirs(out, exist_ok=True)
json.dump({{"finished": end == "finished"}}, open(os.path.join(out, "summary.json"), "w"))
""")

    def run(end: str, *overrides: str):
        out = tmp_path / "run"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
        env.update(PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{env['PATH']}",
                   PYTHONPATH=ROOT, FAKE_END=end, FAKE_OUT=str(out), SLURM_NNODES="2",
                   SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_ID="77", GPUS_PER_NODE="4")
        if log.exists():
            log.unlink()
        p = subprocess.run(["bash", SCRIPT, "configs/training/demo.yaml",
                            f"train.output_dir={out}", *overrides],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        calls = [json.loads(line) for line in log.read_text().splitlines()] \
            if log.exists() else []
        return p, calls
    return run


def test_node_launcher_gets_rank_total_and_overrides_intact(slurm):
    p, calls = slurm("finished", "train.steps=7", "optim.betas=[0.9, 0.99]")
    assert p.returncode == 0, p.stderr
    (launch,) = [c for c in calls if c[0] == "python"]
    args = launch[1:]
    assert args[:2] == ["-m", "train.launch"]
    assert args[args.index("--machine_rank") + 1] == "0"
    assert args[args.index("--num_processes") + 1] == "8"  # 2 nodes x 4 GPUs
    assert args[args.index("--main_process_ip") + 1] == "node-a"
    assert args[-2:] == ["train.steps=7", "optim.betas=[0.9, 0.99]"]  # one argument each
    assert "train.resume=latest" in args
    assert not [c for c in calls if c[0] == "scontrol"]  # finished: no requeue
    assert "run finished" in p.stdout


def test_stopped_run_requeues_itself(slurm):
    p, calls = slurm("stopped")
    assert p.returncode == 0, p.stderr
    assert ["scontrol", "requeue", "77"] in calls


def test_failed_run_is_not_requeued_and_keeps_its_exit_code(slurm):
    p, calls = slurm("exit2")
    assert p.returncode == 2
    assert not [c for c in calls if c[0] == "scontrol"]
    assert "not requeueing" in p.stderr

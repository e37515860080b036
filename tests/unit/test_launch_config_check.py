"""train.launch loads train/main.py's run config itself before starting any rank."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers.common import DEMO, ROOT

from train.launch import check_run_config

ZERO2 = os.path.join(ROOT, "accelerate_configs", "cpu_deepspeed_zero2.yaml")


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-3", "unknown key optim.lrr"),
    ("optim.grad_accum=x", "optim.grad_accum: expected an integer"),
    ("data.mode=sometimes", "data.mode: must be 'epoch' or 'resampled'"),
])
def test_bad_config_is_reported_with_its_key(override, message):
    problem = check_run_config(["--config_file", ZERO2, "train/main.py", "--config", DEMO,
                                override])
    assert problem is not None and message in problem


def test_good_config_and_other_scripts_pass():
    assert check_run_config(["--config_file", ZERO2, "train/main.py", "--config", DEMO,
                             "optim.lr=3e-4"]) is None
    assert check_run_config(["--config_file", ZERO2, "other/main.py", "optim.lrr=1"]) is None


def test_launcher_exits_2_before_importing_accelerate():
    code = ("import sys; from train.launch import main; rc = main(sys.argv[1:]); "
            "assert 'accelerate' not in sys.modules, 'launcher imported accelerate'; "
            "sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "--config_file", ZERO2, "train/main.py",
                        "--config", DEMO, "optim.lrr=1e-3"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "ERROR train.launch: unknown key optim.lrr" in p.stderr

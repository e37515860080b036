"""data_prep.logs: prefixes, levels per rank, collective errors once."""

from __future__ import annotations

import pytest

from data_prep.logs import get_logger, log_collective_error, setup_logging


def lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_single_process_info_with_time_level_and_module(capsys):
    setup_logging()
    get_logger("data_prep.make_shards").info("wrote %d shards", 3)
    get_logger("data_prep.make_shards").debug("hidden")
    (line,) = lines(capsys)
    assert line.endswith(" INFO data_prep.make_shards: wrote 3 shards")
    assert line[:4].isdigit() and line[10] == " "  # date first


def test_rank_prefix_and_only_rank0_logs_info(capsys):
    log = get_logger("train.trainer")
    setup_logging(rank=1, world=4)
    log.info("step 10")
    log.warning("slow shard")
    log_collective_error(log, "bad config")
    out = lines(capsys)
    assert len(out) == 1 and out[0].endswith("WARNING [rank 1/4] train.trainer: slow shard")
    setup_logging(rank=0, world=4)
    log.info("step 10")
    log_collective_error(log, "bad config")
    out = lines(capsys)
    assert [o.split(" ", 2)[2] for o in out] == ["INFO [rank 0/4] train.trainer: step 10",
                                                 "ERROR [rank 0/4] train.trainer: bad config"]


def test_level_from_environment(monkeypatch, capsys):
    monkeypatch.setenv("TEMPO_VAE_LOG_LEVEL", "debug")
    setup_logging(rank=3, world=4)
    log_collective_error(get_logger("train.main"), "seen at debug")
    assert lines(capsys)[0].endswith("DEBUG [rank 3/4] train.main: seen at debug")
    monkeypatch.setenv("TEMPO_VAE_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match="TEMPO_VAE_LOG_LEVEL='LOUD'"):
        setup_logging()


def test_a_module_run_with_dash_m_logs_under_its_own_name(tmp_path):
    """`python -m data_prep.synthesize` names itself __main__; its INFO lines still show,
    under the module's real name."""
    import subprocess
    import sys

    from helpers.common import ROOT

    p = subprocess.run([sys.executable, "-m", "data_prep.synthesize", str(tmp_path / "g"),
                        "--granules", "1", "--mirror-steps", "4", "--xtrack", "4",
                        "--channels", "8"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "INFO data_prep.synthesize: wrote 1 granules" in p.stderr

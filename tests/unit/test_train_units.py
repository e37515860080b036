"""Losses, model, config: unit tests (fast, single process)."""

from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch
from helpers.common import ROOT

from train.config import ConfigError, LossConfig, ModelConfig, describe, load_config
from train.losses import VAELoss, nan_pool
from train.model import DiagonalGaussian, build_model, count_parameters


def test_nan_pool_counts_valid_pixels_only():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    x[0, 0, 0, 0] = float("nan")  # one of four pixels in the top-left block
    x[0, 0, 2:, 2:] = float("nan")  # a whole block
    out = nan_pool(x, 2, 0.5)
    assert out[0, 0, 0, 0] == pytest.approx((1 + 4 + 5) / 3)  # not NaN: 3 of 4 valid
    assert out[0, 0, 0, 1] == pytest.approx((2 + 3 + 6 + 7) / 4)
    assert torch.isnan(out[0, 0, 1, 1])
    assert torch.isnan(nan_pool(x, 2, 0.9)[0, 0, 0, 0])  # 3/4 < 0.9


def _out(b=3, c=5, h=8, lat=2, kl=None):
    g = torch.Generator().manual_seed(0)
    return {"recon": torch.randn(b, c, h, h, generator=g),
            "l2_pred": torch.randn(b, 4, h // 2, h // 2, generator=g),
            "kl": torch.rand(b, generator=g) if kl is None else kl,
            "rec_logvar": torch.tensor(0.5)}


def test_loss_terms_masking_padding_and_no_target():
    cfg = LossConfig(kl_weight=0.01, l2_weights=[1.0, 0.0, 2.0, 0.5], l2_min_valid_fraction=0.5)
    loss = VAELoss(cfg)
    out = _out()
    x = torch.randn(3, 5, 8, 8, generator=torch.Generator().manual_seed(1))
    l2 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    l2[:, 1] = float("nan")  # O3TOT invalid everywhere
    real = torch.tensor([True, True, False])
    t = loss(out, x, l2, real)
    assert all(torch.isfinite(v) for v in t.values())
    assert t["l2/O3TOT"] == 0.0 and t["l2/O3TOT_target_cells"] == 0
    # padding sample contributes nothing: changing it changes no term
    x2, l22 = x.clone(), l2.clone()
    x2[2] += 100.0
    l22[2] = 7.0
    t2 = loss(out | {"recon": out["recon"]}, x2, l22, real)
    for k in t:
        assert torch.allclose(t[k], t2[k]), k
    # nll by hand: sum over real samples of (|x - x_hat| / e^s + s) / real samples
    s = 0.5
    want = sum(((x[i] - out["recon"][i]).abs() / math.exp(s) + s).sum() for i in (0, 1)) / 2
    assert t["nll"] == pytest.approx(float(want), rel=1e-5)
    kl = (out["kl"][0] + out["kl"][1]) / 2
    total = t["nll"] + 0.01 * kl + 1.0 * t["l2/NO2"] + 2.0 * t["l2/HCHO"] + 0.5 * t["l2/CLDO4"]
    assert t["loss"] == pytest.approx(float(total), rel=1e-5)


def test_l2_loss_is_mse_over_cells_with_a_target():
    cfg = LossConfig(l2_weights=[1, 1, 1, 1], l2_min_valid_fraction=1.0)
    out = _out(b=1, c=1, h=4)
    out["l2_pred"] = torch.zeros(1, 4, 2, 2)
    l2 = torch.full((1, 4, 4, 4), 2.0)
    l2[0, 0, 0, 0] = float("nan")  # kills the top-left NO2 cell at threshold 1.0
    t = VAELoss(cfg)(out, torch.zeros(1, 1, 4, 4), l2, torch.tensor([True]))
    assert t["l2/NO2"] == pytest.approx(4.0) and t["l2/NO2_target_cells"] == 3
    assert t["l2/HCHO_target_cells"] == 4


def test_no_real_sample_gives_exact_zero_not_nan():
    t = VAELoss(LossConfig())(_out(), torch.randn(3, 5, 8, 8), torch.full((3, 4, 8, 8), float("nan")),
                              torch.zeros(3, dtype=torch.bool))
    for k, v in t.items():
        if k != "rec_logvar":
            assert float(v) == 0.0, k


def test_kl_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    post = DiagonalGaussian(torch.cat([mean, logvar], 1), -30, 20)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    want = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), want, rtol=1e-5, atol=1e-5)
    s = post.sample(torch.Generator().manual_seed(1))
    assert s.shape == mean.shape and not torch.equal(s, post.mode())


def test_model_shapes_and_research_size():
    cfg = ModelConfig(in_channels=16, channels=[16, 16, 32], latent_channels=4, tile_size=16,
                      head_hidden=[8, 8], attn_heads=2, attn_resolutions=[8])
    m = build_model(cfg)
    x = torch.randn(2, 16, 16, 16)
    out = m(x, generator=torch.Generator().manual_seed(0))
    assert out["recon"].shape == x.shape
    assert out["l2_pred"].shape == (2, 4, 4, 4) and out["kl"].shape == (2,)
    # the head is fed the decoded sample: same noise -> same prediction
    out2 = m(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["l2_pred"], out2["l2_pred"])
    with torch.device("meta"):
        big = build_model(ModelConfig())
    assert 26e6 < count_parameters(big) < 28e6  # research model: 27.3M


def test_every_shipped_config_loads():
    paths = glob.glob(os.path.join(ROOT, "configs", "training", "*.yaml"))
    assert len(paths) >= 3
    for p in paths:
        cfg = load_config(p)
        assert cfg.train.steps >= 1, p
    sup = load_config(os.path.join(ROOT, "configs", "training", "train_vae_l2_supervised.yaml"))
    par = load_config(os.path.join(ROOT, "configs", "training",
                                   "research_parity_l2_supervised.yaml"))
    uns = load_config(os.path.join(ROOT, "configs", "training", "train_vae_default.yaml"))
    assert par.loss.l2_weights == [0.1] * 4 and uns.loss.l2_weights == [0.0] * 4
    assert par.loss.recon_reduction == "sum" and par.optim.grad_clip == 0
    assert sup.loss.recon_reduction == "mean" and sup.loss.l2_share > 0
    for c in (sup, par):
        assert c.optim.lr == 1e-4 and c.optim.betas == [0.9, 0.95] and c.data.batch_size == 32
        assert c.model.channels == [512, 256, 128] and c.train.steps == 200000


def test_overrides_win_and_bad_keys_fail():
    p = os.path.join(ROOT, "configs", "training", "demo.yaml")
    cfg = load_config(p, ["optim.lr=5e-4", "data.batch_size=3", "model.channels=[8,16]"])
    assert cfg.optim.lr == 5e-4 and cfg.data.batch_size == 3 and cfg.model.channels == [8, 16]
    with pytest.raises(ConfigError, match="unknown key optim.lrr"):
        load_config(p, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="data.batch_size: expected an integer"):
        load_config(p, ["data.batch_size=1.5"])
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config(p, ["train.steps=many"])
    with pytest.raises(ConfigError, match="loss.l2_weights: needs 4"):
        load_config(p, ["loss.l2_weights=[1,2]"])
    assert "data.batch_size" in describe() and "optim.lr" in describe()


def test_main_exits_2_on_bad_config(capsys):
    from train import main

    p = os.path.join(ROOT, "configs", "training", "demo.yaml")
    assert main.main(["--config", p, "bogus.key=1"]) == 2
    assert "unknown key bogus" in capsys.readouterr().err
    assert main.main(["--config", p, "data.shards=/nonexistent/shards"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_skipping_nonfinite_steps_stops_a_diverged_run():
    from types import SimpleNamespace

    from train.config import load_config
    from train.trainer import NonFiniteError, Trainer

    cfg = load_config(None, ["train.on_nonfinite=skip", "train.max_skipped_in_a_row=3"])
    t = SimpleNamespace(cfg=cfg, skipped_steps=0, skipped_in_a_row=0, is_main=True)
    Trainer._nonfinite(t, "step 1")
    Trainer._nonfinite(t, "step 2")
    t.skipped_in_a_row = 0  # a good step in between resets the run of skips
    Trainer._nonfinite(t, "step 4")
    Trainer._nonfinite(t, "step 5")
    with pytest.raises(NonFiniteError, match="3 steps in a row.*last: step 6.*lower optim.lr"):
        Trainer._nonfinite(t, "step 6")
    assert t.skipped_steps == 5
    t.cfg = load_config(None, [])  # default: raise at once, with the fix named
    with pytest.raises(NonFiniteError, match="step 7; set train.on_nonfinite=skip"):
        Trainer._nonfinite(t, "step 7")


def test_a_stop_signal_sent_before_a_rank_started_is_inherited():
    """train.launch passes a stop that came before the ranks existed in the environment."""
    import subprocess
    import sys

    code = ("from train.runtime import install_stop_handlers, stop_signal; "
            "install_stop_handlers(); print(stop_signal())")
    root = ROOT

    def run(**env):
        return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                              text=True, env=os.environ | env, check=True).stdout.strip()
    assert run(TEMPO_VAE_STOP_SIGNAL="10") == "10"
    assert run() == "None"


def _tiny_cfg(train_shards, tmp_path, *extra):
    from helpers.common import tiny_overrides

    p = os.path.join(ROOT, "configs", "training", "demo.yaml")
    return load_config(p, tiny_overrides(train_shards, str(tmp_path / "run"))
                       + ["optim.grad_clip=0", "data.batch_size=2", *extra])


def _max_rel_diff(a: dict, b: dict) -> float:
    num = max(float((a[k] - b[k]).abs().max()) for k in a)
    return num / max(float(v.abs().max()) for v in a.values())


def test_step_gradient_is_the_same_for_one_batch_or_micro_batches(train_shards, tmp_path):
    """The same 4 tiles (NaN-heavy targets, one padding tile) as one batch of 4 or as two
    micro-batches of 2: the same gradient for every loss term, within fp32 rounding."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
    from step_gradients import TERMS, step_gradients

    cfg = _tiny_cfg(train_shards, tmp_path)
    one = step_gradients(cfg, 1)
    trainer_cfg = _tiny_cfg(train_shards, tmp_path, "optim.grad_accum=2")
    two = step_gradients(trainer_cfg, 2)
    for term in TERMS:
        assert one[term].keys() == two[term].keys() and one[term], term
        assert _max_rel_diff(one[term], two[term]) < 1e-5, term
    # the check has teeth: each micro-batch normalised by its own counts differs
    own = step_gradients(trainer_cfg, 2, own_counts=True)
    for term in ("nll", "kl", "l2/NO2"):
        assert _max_rel_diff(one[term], own[term]) > 0.05, term


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_elastic_resume_continues_the_epoch_with_exactly_the_unseen_samples(train_shards, mode):
    """2 ranks x 2 workers consume 2 batches each and stop; 1 rank x 1 worker with another
    batch size resumes, stops again, and 3 ranks finish the epoch: every training sample
    exactly once (epoch mode), and the next epoch is a normal one."""
    import json

    from train.config import DataConfig
    from train.data import build_loader

    sizes = json.load(open(os.path.join(train_shards, "sizes.json")))
    total = sum(n for k, n in sizes.items() if k.startswith("train/"))
    base = DataConfig(shards=train_shards, batch_size=3, num_workers=2, shuffle_buffer=6,
                      shuffle_initial=3, mode=mode, samples_per_epoch=40)

    def run(world, workers, batch, position, layout, stop_after=None):
        c = dataclasses.replace(base, num_workers=workers, batch_size=batch)
        keys, lens = [], set()
        for rank in range(world):
            loader = build_loader(c, "train", rank, world)
            if position is not None:
                loader.restore(position, layout, {})
            lens.add(len(loader))
            for i, b in enumerate(loader):
                keys += [k for k, v in zip(b["keys"], b["real"].tolist()) if v]
                if i + 1 == stop_after:
                    break
        assert len(lens) == 1  # every rank the same number of batches
        return keys, loader.position(), loader.layout(), lens.pop()

    import dataclasses

    k1, pos, lay, _ = run(2, 2, 3, None, None, stop_after=2)
    assert pos == {"epoch": 0, "batches_consumed": 2, "segments": []} and len(k1) > 6
    k2, pos, lay, _ = run(1, 0, 4, pos, lay, stop_after=1)
    assert len(pos["segments"]) == 1 and pos["batches_consumed"] == 1
    k3, pos, lay, n3 = run(3, 1, 2, pos, lay)
    if mode == "epoch":
        seen = k1 + k2 + k3
        assert len(seen) == len(set(seen)) == total  # each sample exactly once
    else:  # the epoch's nominal length, in whole batches of the last layout
        assert 40 <= len(k1 + k2 + k3) < 40 + 3 * 2
    # after the resumed epoch, the next one is a normal one
    c = dataclasses.replace(base, num_workers=1, batch_size=2)
    loader = build_loader(c, "train", 0, 3)
    loader.restore(pos, lay, {})
    assert len(loader) >= n3


class _OneProcess:
    """The part of an Accelerator the checkpoint manager uses, for one process."""
    process_index, num_processes, is_main_process, device = 0, 1, True, "cpu"

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "model.bin"), "wb") as f:
            f.write(b"\0" * 1000)


def test_checkpoint_manager_saves_rotates_and_never_moves_latest_on_failure(tmp_path):
    import errno

    from train.checkpoint import CheckpointManager
    from train.errors import CheckpointError

    d = str(tmp_path / "checkpoints")
    m = CheckpointManager(_OneProcess(), d, keep_last=2, n_params=10)
    assert m.resolve("latest", log=lambda s: None) is None
    for step in (1, 2, 3):
        m.save(step, {"rank": 0}, {"step": step}, "a: 1\n")
    assert sorted(os.listdir(d)) == ["latest", "step_00000002", "step_00000003"]
    assert m.resolve("latest") == os.path.join(d, "step_00000003")
    assert torch.load(os.path.join(d, "step_00000003", "trainer_rank0.pt")) == {"rank": 0}
    # a full disk found before writing: nothing written, latest unchanged
    full = CheckpointManager(_OneProcess(), d, 2, 10, disk_usage=lambda p: type(
        __import__("shutil").disk_usage(p))(100, 100, 0))
    with pytest.raises(CheckpointError, match="step_00000004 .*0.00 GB free.*step_00000003, "
                                               "is intact"):
        full.save(4, {}, {"step": 4}, "")
    assert not os.path.exists(os.path.join(d, "step_00000004.partial"))

    def enospc(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    broken = CheckpointManager(_OneProcess(), d, 2, 10, save_file=enospc)
    with pytest.raises(CheckpointError, match="could not be written on rank 0: .*No space"):
        broken.save(5, {}, {"step": 5}, "")
    assert open(os.path.join(d, "latest")).read().strip() == "step_00000003"
    assert os.path.isdir(os.path.join(d, "step_00000005.partial"))
    logged = []
    m.remove_partial(logged.append)
    assert not os.path.exists(os.path.join(d, "step_00000005.partial")) and logged
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        m.resolve(str(tmp_path))


def test_one_process_fit_counts_every_micro_batch_and_follows_the_schedule(train_shards,
                                                                         tmp_path):
    """grad_accum=2, warmup + cosine: samples_seen is every real tile of every micro-batch,
    the schedule advances once per optimizer step (train/lr of step s = lr x f(s - 1))."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.data import build_loader
    from train.optim import lr_lambda
    from train.trainer import Trainer

    cfg = _tiny_cfg(train_shards, tmp_path, "optim.grad_accum=2", "optim.schedule=cosine",
                    "optim.warmup_steps=2", "optim.lr=1e-3", "train.steps=5",
                    "train.ckpt_every=0", "data.batch_size=4")
    summary = Trainer(cfg).fit()
    want, left, epoch = 0, 10, 0
    loader = build_loader(cfg.data, "train")
    while left:
        loader.set_epoch(epoch)
        for b in loader:
            want, left = want + int(b["real"].sum()), left - 1
            if not left:
                break
        epoch += 1
    assert summary["samples_seen"] == want and want > 10 * 4 // 2
    ev = EventAccumulator(os.path.join(cfg.train.output_dir, "tb"))
    ev.Reload()
    f = lr_lambda(cfg)
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in ev.Scalars("train/lr")] == \
        [(s, 1e-3 * f(s - 1)) for s in range(1, 6)]
    state = json.load(open(os.path.join(cfg.train.output_dir, "checkpoints", "step_00000005",
                                        "trainer_state.json")))
    assert state["scheduler"]["last_epoch"] == 5 and state["samples_seen"] == want


def test_reconstruction_error_names_are_not_processing_levels():
    """loss.recon says abs/squared (L1/L2 are TEMPO processing levels here); the old names
    fail with the new one, and the logged term says what it measures."""
    from train.config import ConfigError, load_config
    from train.losses import RECON_TERM

    assert load_config(None, []).loss.recon == "abs" and RECON_TERM["abs"] == "recon_mae"
    with pytest.raises(ConfigError, match="loss.recon: 'l1' is now called 'abs'"):
        load_config(None, ["loss.recon=l1"])
    with pytest.raises(ConfigError, match="loss.recon: 'l2' is now called 'squared'"):
        load_config(None, ["loss.recon=l2"])

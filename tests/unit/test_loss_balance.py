"""Loss balance, clipping and viewing geometry: the pieces that make the L2 supervision heard."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.common import ROOT, env, tiny_overrides

from data_prep.tempo import L2_ORDER, discover, find_files
from train.config import LossConfig, ModelConfig, load_config
from train.losses import VAELoss, encoder_gradient_shares
from train.model import build_model, geometry_features

BENCH = os.path.join(ROOT, "configs", "training", "benchmark.yaml")
PARITY = os.path.join(ROOT, "configs", "training", "benchmark_research_parity.yaml")


def tiny_model(geometry: str = "none") -> torch.nn.Module:
    cfg = ModelConfig(in_channels=6, channels=[8, 8], latent_channels=4, head_hidden=[8],
                      tile_size=8, attn_heads=2, geometry=geometry)
    torch.manual_seed(0)
    return build_model(cfg, LossConfig())


def batch(b: int = 2, c: int = 6, t: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, t, t, generator=g)
    l2 = torch.randn(b, 4, t, t, generator=g)
    geo = torch.stack([torch.full((b, t, t), 40.0), torch.full((b, t, t), -100.0),
                       torch.rand(b, t, t, generator=g) * 70, torch.rand(b, t, t, generator=g) * 60],
                      1)
    return x, l2, geo, torch.ones(b, dtype=torch.bool)


# ----------------------------------------------------------------------------- shares


def test_gradient_shares_are_each_terms_norm_over_the_sum():
    m = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = torch.randn(2, 3, 4, 4)
    parts = {"a": (2 * m).sum(), "b": (m * w).sum(), "c": torch.zeros(())}
    s = encoder_gradient_shares(parts, m)
    na, nb = 2 * math.sqrt(m.numel()), float(w.norm())
    assert float(s["a"]) == pytest.approx(na / (na + nb), rel=1e-5)
    assert float(s["b"]) == pytest.approx(nb / (na + nb), rel=1e-5)
    assert float(s["c"]) == 0.0 and float(s["norm/b"]) == pytest.approx(nb, rel=1e-5)
    assert m.grad is None  # nothing accumulated into the leaves


def test_mean_reduction_is_the_sum_objective_over_the_tile_elements():
    model = tiny_model()
    x, l2, _, real = batch()
    out = model(x, generator=torch.Generator().manual_seed(1))
    n_el = x[0].numel()
    w = [0.1, 0.2, 0.3, 0.4]
    summed = VAELoss(LossConfig(recon_reduction="sum", l2_weights=[v * n_el for v in w]))
    mean = VAELoss(LossConfig(recon_reduction="mean", l2_weights=w))
    ts, tm = summed(out, x, l2, real), mean(out, x, l2, real)
    assert float(tm["loss"].detach()) == pytest.approx(float(ts["loss"].detach()) / n_el, rel=1e-5)
    assert float(tm["loss"]) == pytest.approx(float(mean.total(tm, n_el)), rel=1e-6)
    # the scalar log-variance's gradient is a mean, not a sum over elements
    gs, = torch.autograd.grad(ts["nll"], model.logvar, retain_graph=True)
    gm, = torch.autograd.grad(mean.contributions(tm, n_el)["reconstruction"], model.logvar)
    assert float(gm) == pytest.approx(float(gs) / n_el, rel=1e-4)


def test_rebalance_gives_the_supervision_the_stated_share():
    model = tiny_model("both")
    x, l2, geo, real = batch()
    out = model(x, generator=torch.Generator().manual_seed(1), geo=geo)
    loss = VAELoss(LossConfig(recon_reduction="mean", l2_weights=[1, 2, 0, 1], l2_share=0.3))
    terms = loss(out, x, l2, real)
    n_el = x[0].numel()
    lam = loss.rebalance(loss.supervision_norms(terms, n_el, out["moments"]), 0.3)
    assert lam != 1.0
    vae, l2n = (float(v) for v in loss.supervision_norms(terms, n_el, out["moments"]))
    assert lam * l2n / (lam * l2n + vae) == pytest.approx(0.3, rel=1e-4)
    # the loss now carries the factor on every L2 term, the VAE part unchanged
    parts = loss.contributions(terms, n_el)
    assert float(parts["l2/O3TOT"]) == pytest.approx(lam * 2 * float(terms["l2/O3TOT"]), rel=1e-6)
    assert "l2/HCHO" not in parts
    assert float(loss.total(terms, n_el)) == pytest.approx(
        float(sum(parts.values())), rel=1e-6)


# ----------------------------------------------------------------------------- geometry


def test_geometry_features():
    geo = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 5.0, 60.0, 60.0],
                        [0.0, 0.0, float("nan"), 10.0]]).T.reshape(1, 4, 3, 1)
    f = geometry_features(geo)[0, :, :, 0]  # (3 features, 3 pixels)
    assert torch.allclose(f[:, 0], torch.ones(3))
    assert torch.allclose(f[:, 1], torch.tensor([0.5, 0.5, 0.5]), atol=1e-6)
    assert torch.equal(f[:, 2], torch.zeros(3))  # invalid geolocation: all 0
    with pytest.raises(ValueError, match="geo must be"):
        geometry_features(torch.zeros(1, 3, 2, 2))


@pytest.mark.parametrize("mode", ["encoder", "head", "both"])
def test_geometry_reaches_the_head_output(mode):
    model = tiny_model(mode).eval()
    x, _, geo, _ = batch()
    with pytest.raises(ValueError, match="needs geo"):
        model(x, sample=False)
    a = model(x, sample=False, geo=geo)
    geo2 = geo.clone()
    geo2[:, 2] += 20.0
    b = model(x, sample=False, geo=geo2)
    assert not torch.allclose(a["l2_pred"], b["l2_pred"])
    # the encoder sees it only in 'encoder'/'both'
    assert torch.equal(a["mean"], b["mean"]) == (mode == "head")
    n_in = model.encoder.conv_in.in_channels
    assert n_in == 6 + (3 if mode in ("encoder", "both") else 0)


def test_research_model_ignores_geometry():
    model = tiny_model("none").eval()
    x, _, geo, _ = batch()
    assert torch.equal(model(x, sample=False)["l2_pred"],
                       model(x, sample=False, geo=geo)["l2_pred"])


# ----------------------------------------------------------------------------- configs


def test_benchmark_configs_differ_only_in_the_objective():
    new, parity = load_config(BENCH), load_config(PARITY)
    assert parity.loss.recon_reduction == "sum" and parity.optim.grad_clip == 0
    assert parity.model.geometry == "none" and parity.loss.l2_share == 0
    assert parity.loss.l2_weights == [0.1] * 4
    assert new.loss.recon_reduction == "mean" and not new.optim.clip_logvar
    assert new.model.geometry != "none"
    assert new.data.l2_transform == "linear" and parity.data.l2_transform == "research"
    for section in ("data", "train"):
        a, b = vars(getattr(new, section)).copy(), vars(getattr(parity, section)).copy()
        for k in ("output_dir", "l2_transform"):
            a.pop(k, None), b.pop(k, None)
        assert a == b, section
    a, b = vars(new.model).copy(), vars(parity.model).copy()
    for k in ("geometry", "spectral_input", "slant_columns", "xsec_dir"):
        a.pop(k), b.pop(k)
    assert a == b
    assert parity.model.spectral_input == "zscore" and parity.model.slant_columns == "none"


# ----------------------------------------------------------------------------- trainer


def test_training_with_geometry_balance_and_shares_then_export_and_predict(
        train_shards, synth_dir, tmp_path):
    """One real run with the new objective: clipping leaves the log-variance out, the L2
    factor is re-set, shares reach TensorBoard, and the exported model predicts granules
    with their geometry."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.export import export
    from train.model import load_pretrained
    from train.predict import predict_granule
    from train.trainer import Trainer

    out = str(tmp_path / "run")
    cfg = load_config(BENCH, tiny_overrides(train_shards, out) + [
        "train.steps=4", "loss.l2_share=0.5", "loss.l2_share_every=2", "train.log_every=2",
        "optim.grad_clip=1e-3"])
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    trainer = Trainer(cfg)
    names = {id(p) for p in trainer.clip_params}
    assert id(trainer.model.logvar) not in names
    assert len(names) == len(list(trainer.model.parameters())) - 1
    summary = trainer.fit()
    assert summary["finished"]
    assert trainer.loss_fn.l2_balance != 1.0
    # the factor is saved with the checkpoint, as the resume reads it
    latest = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    state = json.load(open(os.path.join(out, "checkpoints", latest, "trainer_state.json")))
    assert state["l2_balance"] == trainer.loss_fn.l2_balance
    ea = EventAccumulator(os.path.join(out, "tb"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    for t in ["train/grad_share/reconstruction", "train/grad_share/kl", "train/l2_balance"] + \
            [f"train/grad_share/l2/{p}" for p in L2_ORDER]:
        assert t in tags, t
    # at a re-set step the L2 terms together hold about the stated share... of the summed
    # per-term norms, which is at most the share of the norm of their sum
    l2 = sum(ea.Scalars(f"train/grad_share/l2/{p}")[0].value for p in L2_ORDER)
    assert 0.5 - 1e-3 <= l2 < 1.0

    model_dir = export(out, str(tmp_path / "model"))
    model = load_pretrained(model_dir)
    assert model.uses_geometry
    # the slant-column map built at the start (benchmark.yaml: analytic cross-sections) is in
    # the exported weights, equal to the trained model's
    assert model.slant is not None and model.slant.operator.abs().sum() > 0
    assert torch.equal(model.slant.operator, trainer.model.slant.operator.cpu())
    granules, _ = discover(find_files(synth_dir))
    g = next(g for g in granules.values() if g.rad)
    res = predict_granule(model, g.rad)
    assert np.isfinite(res["pred"][:, res["valid"]]).all()


def test_clip_logvar_true_clips_everything_together(train_shards, tmp_path):
    from train.trainer import Trainer

    cfg = load_config(PARITY, tiny_overrides(train_shards, str(tmp_path / "r")) + [
        "train.steps=1", "optim.grad_clip=1.0"])
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    trainer = Trainer(cfg)
    assert len(trainer.clip_params) == len(list(trainer.model.parameters()))


@pytest.mark.slow
def test_benchmark_command_smoke(tmp_path):
    out = str(tmp_path / "bench")
    p = subprocess.run([sys.executable, "scripts/benchmark.py", out, "--smoke", "--steps", "3",
                        "--mlp-epochs", "1"], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "supervised head vs truth" in p.stdout and "Wall time" in p.stdout
    r = json.load(open(os.path.join(out, "benchmark.json")))
    assert set(r["r2"]["supervised head vs truth"]) == set(L2_ORDER)
    assert r["steps"] == 3 and r["seconds"]["train_supervised"] > 0
    # the conditioning probe runs on the same data and prints every product's rows
    p = subprocess.run([sys.executable, "scripts/spectral_input_probe.py",
                        os.path.join(out, "data", "granules"), os.path.join(out, "data", "shards"),
                        "--steps", "3", "--xsec-dir", "analytic"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and "least" in line]
    assert [row.split(" | ")[0][2:] for row in rows if "z-scores" in row] == list(L2_ORDER)
    assert [row.split(" | ")[0][2:] for row in rows if "slant columns" in row] == list(L2_ORDER)
    # the benchmark's model took the synthesis' cross-sections (analytic without --xsec-dir)
    assert "model.xsec_dir=analytic" in r["overrides"]
    assert "condition number" in p.stdout


# ----------------------------------------------------------------------------- spectral input


def test_highpass_input_holds_what_the_zscores_hold_and_exposes_absorption():
    from train.model import SpectralHighPass

    c, t = 64, 4
    hp = SpectralHighPass(c, degree=3)
    wl = torch.linspace(300, 480, c)
    std = torch.linspace(0.3, 0.6, c)
    g = torch.Generator().manual_seed(0)
    # smooth brightness per pixel + a narrow absorption band of random depth
    smooth = torch.randn(8, 1, t, t, generator=g) + 0.5 * torch.randn(8, 1, t, t, generator=g) \
        * ((wl - 390) / 90)[None, :, None, None]
    band = torch.exp(-0.5 * ((wl - 330) / 2.0) ** 2)[None, :, None, None]
    depth = torch.rand(8, 1, t, t, generator=g) * 0.05
    x = (smooth - depth * band) / std[None, :, None, None]
    hp.init_scales(std, wl, x)
    out = hp.raw(x)
    v, _ = hp.basis()
    recon = out[:, :c] + torch.einsum("ck,bkhw->bchw", v, out[:, c:])
    assert torch.allclose(recon, x * std[None, :, None, None], atol=1e-4)
    # the residual at the band centre follows the absorption depth, not the brightness
    r = out[:, int(torch.argmin((wl - 330).abs()))].flatten()
    corr = torch.corrcoef(torch.stack([r, depth.flatten()]))[0, 1]
    assert corr < -0.95
    scaled = hp(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(hp(x), scaled)
    assert torch.allclose(scaled.flatten(2).std(dim=(0, 2)), torch.ones(c + 4), atol=0.05)
    # in a model: buffers travel with the weights
    cfg = ModelConfig(in_channels=c, channels=[8, 8], latent_channels=4, head_hidden=[8],
                      tile_size=t, attn_heads=2, spectral_input="highpass", highpass_degree=3)
    m = build_model(cfg, LossConfig())
    m.init_spectral_scales(std, wl, x)
    assert torch.equal(m.state_dict()["highpass.scale"], hp.scale)
    assert m.encoder.conv_in.in_channels == c + 4
    # a module-wide bf16 cast (DeepSpeed's bf16 engine) leaves the transform's buffers float32
    # and its arithmetic too: the encoder input is the float32 one, cast once at the end
    ref = m._encoder_input(x, None)
    m.to(torch.bfloat16)
    assert m.highpass.wavelength.dtype == torch.float32 and m.highpass.scale.dtype \
        == torch.float32 and m.encoder.conv_in.weight.dtype == torch.bfloat16
    assert torch.equal(m.highpass.wavelength, wl) and torch.equal(m.highpass.scale, hp.scale)
    assert torch.equal(m._encoder_input(x, None), ref.to(torch.bfloat16))
    # a bf16 wavelength grid would not do: 2 nm steps, the polynomial basis off
    assert (wl.bfloat16().float() - wl).abs().max() > 0.4


def test_slant_column_operator_recovers_the_columns_of_a_beer_lambert_spectrum():
    from data_prep import physics

    wl = np.linspace(290.0, 490.0, 1028)
    spectra = physics.Spectra.analytic()
    xs = physics.sample(spectra, wl, 0.6)
    cols = {"no2": 3e16, "o3": 320 * physics.DU, "hcho": 1.2e16, "o4": 0.8}
    t = (wl - 390.0) / 100.0
    log_i = 2.0 - 0.7 * t - sum(xs[k] * (v * (physics.O4_COLUMN_SURFACE if k == "o4" else 1))
                                for k, v in cols.items())
    op, names = physics.slant_column_operator(spectra, wl, 0.6)
    assert op.shape == (12, 1028) and names[:4] == ["NO2:no2", "NO2:o3", "NO2:hcho", "NO2:o4"]
    got = dict(zip(names, op @ log_i, strict=True))
    for window in physics.RETRIEVAL_WINDOWS:
        for k, v in cols.items():
            assert got[f"{window}:{k}"] == pytest.approx(v, rel=1e-6), (window, k)
    # only the window's channels count; a constant spectrum added to every pixel (solar
    # Fraunhofer lines, a mean spectrum) shifts each column by the same constant
    w = physics.RETRIEVAL_WINDOWS["HCHO"]
    assert (op[names.index("HCHO:hcho")][(wl < w[0]) | (wl > w[1])] == 0).all()
    fraunhofer = np.sin(wl / 0.37)
    shift = op @ fraunhofer
    assert np.allclose(op @ (log_i + fraunhofer) - op @ log_i, shift)
    # an absorber without cross-section in a window gets a zero row, the others still fit
    no_hcho = physics.Spectra(spectra.wl, spectra.no2, spectra.o3, 0 * spectra.hcho, spectra.o4,
                              spectra.solar, "test")
    op2, _ = physics.slant_column_operator(no_hcho, wl, 0.6)
    assert not op2[names.index("HCHO:hcho")].any()
    assert op2[names.index("HCHO:o3")] @ log_i != 0
    with pytest.raises(ValueError, match="1-D"):
        physics.slant_column_operator(spectra, wl[None], 0.6)
    with pytest.raises(ValueError, match=r"window NO2 \(405.0-465.0 nm\) holds 7 channels, fewer than the 8"):
        physics.slant_column_operator(spectra, np.linspace(290.0, 490.0, 24), 0.6)


@pytest.mark.parametrize("route", ["encoder", "head", "both"])
def test_slant_columns_feed_the_model_as_configured(route, tmp_path):
    from train.model import slant_column_operator_for

    c, t = 64, 8
    cfg = ModelConfig(in_channels=c, channels=[8, 8], latent_channels=4, head_hidden=[8],
                      tile_size=t, attn_heads=2, slant_columns=route, xsec_dir="analytic")
    wl = np.linspace(290.0, 490.0, c)
    op = slant_column_operator_for(cfg, wl)
    assert op.shape == (12, c)
    m = build_model(cfg, LossConfig()).eval()
    assert m.encoder.conv_in.in_channels == c + (12 if route != "head" else 0)
    assert m.head.net[0].in_channels == 4 + (12 if route != "encoder" else 0)
    g = torch.Generator().manual_seed(0)
    std = torch.linspace(0.2, 0.5, c)
    x = torch.randn(6, c, t, t, generator=g)
    m.init_slant_columns(std, torch.from_numpy(op), x)
    f = m.slant(x)
    raw = torch.einsum("kc,bchw->bkhw", torch.from_numpy(op), x.double() * std.double()[:, None, None])
    ref = (raw - raw.mean((0, 2, 3), keepdim=True)) / raw.std((0, 2, 3), keepdim=True)
    assert torch.allclose(f.double(), ref, atol=1e-3)
    # the head output depends on the columns whichever way they enter
    a = m(x, sample=False)["l2_pred"]
    with torch.no_grad():
        m.slant.offset += m.slant.scale
    assert not torch.allclose(a, m(x, sample=False)["l2_pred"])
    # buffers: saved with the weights, float32 under a module-wide bf16 cast
    assert torch.equal(m.state_dict()["slant.operator"], m.slant.operator)
    # inside an autocast region (predict on a GPU) the transform still computes in float32
    plain = m.slant(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(m.slant(x), plain)
    m.to(torch.bfloat16)
    assert m.slant.operator.dtype == torch.float32 and m.slant.std.dtype == torch.float32
    assert m(x.half(), sample=False)["l2_pred"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="operator"):
        m.init_slant_columns(std, torch.zeros(11, c), x)
    missing = dataclasses.replace(cfg, xsec_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        slant_column_operator_for(missing, wl)


@pytest.mark.parametrize("geometry", ["none", "encoder", "head", "both"])
def test_head_gets_vertical_columns_when_geometry_and_slant_columns_reach_it(geometry):
    from train.model import slant_column_operator_for

    c, t = 64, 8
    cfg = ModelConfig(in_channels=c, channels=[8, 8], latent_channels=4, head_hidden=[8],
                      tile_size=t, attn_heads=2, slant_columns="both", xsec_dir="analytic",
                      geometry=geometry)
    m = build_model(cfg, LossConfig()).eval()
    x, _, geo, _ = batch(b=3, c=c, t=t)
    m.init_slant_columns(torch.ones(c), torch.from_numpy(
        slant_column_operator_for(cfg, np.linspace(290.0, 490.0, c))), x)
    geo_in_head = geometry in ("head", "both")
    assert m.vertical_columns_in_head == geo_in_head
    assert m.head.net[0].in_channels == 4 + 12 + (3 + 12 if geo_in_head else 0)
    enc, head = m._side_inputs(x, geo if geometry != "none" else None)
    s = m.slant(x)
    if geo_in_head:
        g = geometry_features(geo)
        assert torch.equal(head[:, :3], g) and torch.equal(head[:, 3:15], s)
        assert torch.allclose(head[:, 15:], s * g[:, 2:3])
    else:
        assert torch.equal(head, s)
    assert enc.shape[1] == 12 + (3 if geometry in ("encoder", "both") else 0)


def test_slant_columns_need_cross_sections():
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="model.xsec_dir: model.slant_columns=both needs"):
        load_config(BENCH, ["model.slant_columns=both", "model.xsec_dir=null"])
    with pytest.raises(ConfigError, match="model.slant_columns: must be"):
        load_config(BENCH, ["model.slant_columns=pixels"])



# ----------------------------------------------------------------------------- conditioning


def _probe_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "spectral_input_probe", os.path.join(ROOT, "scripts", "spectral_input_probe.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_whitening_lets_adam_find_a_faint_absorption_that_it_misses_on_zscores():
    """The finding scripts/spectral_input_probe.py measures on the benchmark, on a small
    problem with the same structure: large correlated modes (brightness, slope, curvature)
    and a faint absorption band whose depth is the target. Least squares finds the band;
    Adam on z-scores does not (the band's direction has a tiny variance); on the whitened
    spectrum the same model, optimiser and steps get what least squares gets."""
    probe = _probe_module()
    g = torch.Generator().manual_seed(0)
    n, c = 20000, 48
    wl = torch.linspace(0, 1, c, dtype=torch.float64)
    big = torch.randn(n, 3, generator=g, dtype=torch.float64) \
        * torch.tensor([30.0, 10.0, 3.0], dtype=torch.float64)
    modes = torch.stack([torch.ones(c, dtype=torch.float64), wl - 0.5, (wl - 0.5) ** 2])
    band = torch.exp(-0.5 * ((wl - 0.6) / 0.03) ** 2)
    depth = torch.rand(n, generator=g, dtype=torch.float64)
    x = (big @ modes + 0.05 * depth[:, None] * band
         + 1e-2 * torch.randn(n, c, generator=g, dtype=torch.float64)).numpy()
    z = (x - x.mean(0)) / x.std(0)
    mean, proj, _ = probe.whitening(z, eps=1e-12)
    w = (z - mean) @ proj
    np.testing.assert_allclose(np.cov(w.T), np.eye(c), atol=0.02)
    t = (depth - depth.mean()) / depth.std()
    a = np.c_[z, np.ones(n)]
    coef = np.linalg.lstsq(a, t.numpy(), rcond=None)[0]
    ceiling = 1 - np.mean((a @ coef - t.numpy()) ** 2)
    assert ceiling > 0.7

    def adam_r2(feats):
        torch.manual_seed(0)
        lin = torch.nn.Linear(c, 1)
        opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
        f, y = torch.from_numpy(feats).float(), t.float()
        for _ in range(300):
            loss = torch.nn.functional.mse_loss(lin(f).squeeze(1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return 1 - loss.item()

    assert adam_r2(z) < 0.2
    assert adam_r2(w) > 0.95 * ceiling


def test_a_bf16_model_with_geometry_takes_the_shards_float16_tiles():
    """Under DeepSpeed's bf16 engine the trainer hands the model the shards' float16
    z-scores; the model casts them, and the geometry features for encoder and head, to its
    weights' dtype."""
    c, t = 16, 4
    cfg = ModelConfig(in_channels=c, channels=[8, 8], latent_channels=4, head_hidden=[8],
                      tile_size=t, attn_heads=2, spectral_input="highpass", highpass_degree=2,
                      geometry="both")
    m = build_model(cfg, LossConfig())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, t, t, generator=g)
    m.init_spectral_scales(torch.ones(c), torch.linspace(300, 480, c), x)
    geo = torch.stack([torch.zeros(2, t, t), torch.zeros(2, t, t),
                       torch.full((2, t, t), 30.0), torch.full((2, t, t), 20.0)], 1)
    m.to(torch.bfloat16)
    out = m(x.half(), sample=False, geo=geo)
    assert m.compute_dtype == torch.bfloat16
    assert out["l2_pred"].dtype == torch.bfloat16 and out["recon"].dtype == torch.bfloat16

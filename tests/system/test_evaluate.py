"""train.evaluate: head metrics equal the trainer's validation; probes, ridge, truth."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.common import ROOT, env, train_run

from train.evaluate import (
    EvaluateError,
    evaluate,
    fit_linear,
    fit_mlp,
    r2_score,
    run_probes,
    run_ridge,
)
from train.export import export
from train.transforms import L2Transform


@pytest.fixture(scope="module")
def trained(train_shards, tmp_path_factory):
    base = tmp_path_factory.mktemp("ev")
    run = train_run(train_shards, str(base / "run"))
    return run, export(run, str(base / "model"))


def test_head_cell_metrics_equal_the_trainers_validation(trained, train_shards, synth_dir):
    run, model = trained
    res, plots = evaluate(model, train_shards, os.path.join(synth_dir, "truth"), batch_size=5,
                          mlp_epochs=2, progress=False)
    val = json.load(open(os.path.join(run, "summary.json")))["val"]
    for p in ("NO2", "O3TOT", "HCHO", "CLDO4"):
        h = res["head"]["cell"][p]
        assert h["n"] == val[f"l2/{p}_n"] > 0
        for k in ("rmse", "bias", "r2"):
            assert h[k] == pytest.approx(val[f"l2/{p}_{k}"], rel=1e-6, abs=1e-12), (p, k)
        # per pixel: every valid L2 pixel of the validation tiles
        assert res["head"]["pixel"][p]["n"] >= h["n"]
    assert res["recon_mae"] == pytest.approx(val["recon_mae"], rel=1e-6)
    assert res["tiles"] == {"train": 18, "val": 6}
    # the truth is paired with the right pixels: the synthetic L2 is truth + small noise
    assert res["l2_vs_truth"]["pixel"]["O3TOT"]["r2"] > 0.9
    assert res["l2_vs_truth"]["pixel"]["CLDO4"]["r2"] > 0.9
    assert res["head_vs_truth"]["pixel"]["O3TOT"]["n"] == 6 * 16 * 16  # all valid pixels
    # ridge sees only pixels where the product is valid, in both splits
    for p in ("NO2", "CLDO4"):
        assert res["ridge"][p]["n"] == res["head"]["pixel"][p]["n"]
    assert res["probes"]["linear"]["CLDO4"]["n_val"] == res["head"]["cell"]["CLDO4"]["n"]
    assert set(plots) >= {"head vs L2 (cells)", "L2 vs truth (pixels)", "ridge vs L2 (pixels)"}


def test_a_run_folder_is_evaluated_like_its_export(trained, train_shards):
    run, model = trained
    a, _ = evaluate(run, train_shards, probes=False, ridge=False, progress=False)
    b, _ = evaluate(model, train_shards, probes=False, ridge=False, progress=False)
    assert a["step"] == b["step"] == 6
    assert a["head"] == b["head"] and a["recon_mae"] == b["recon_mae"]


def test_probes_recover_a_linear_and_a_nonlinear_target():
    g = np.random.default_rng(0)
    x = g.normal(size=(1500, 8))
    y_lin = x @ g.normal(size=8) + 0.05 * g.normal(size=1500)
    assert r2_score(y_lin[1000:], fit_linear(x[:1000], y_lin[:1000], x[1000:])) > 0.99
    y_nl = np.sin(2 * x[:, 0]) + x[:, 1] ** 2
    r2_lin = r2_score(y_nl[1000:], fit_linear(x[:1000], y_nl[:1000], x[1000:]))
    r2_mlp = r2_score(y_nl[1000:], fit_mlp(x[:1000], y_nl[:1000], x[1000:], epochs=40))
    assert r2_lin < 0.3 < 0.8 < r2_mlp  # the MLP probe sees what a linear one cannot


def _transform():
    stats = {"NO2": {"mad": 1e15}, "HCHO": {"mad": 2e15},
             "O3TOT": {"mean": 300.0, "std": 20.0}, "CLDO4": {}}
    return L2Transform(stats)


def test_probe_r2_is_computed_on_valid_validation_cells_only():
    g = np.random.default_rng(1)
    t = _transform()
    feats = {s: g.normal(size=(400, 4)) for s in ("train", "val")}
    targ_t = {s: np.full((400, 4), np.nan) for s in feats}
    for s in feats:
        targ_t[s][:, 1] = feats[s] @ np.array([1.0, -0.5, 0.2, 0.0])  # O3TOT, model space
        targ_t[s][::3, 1] = np.nan  # invalid cells
    targ_p = {s: np.asarray(t.inverse(torch.as_tensor(np.nan_to_num(targ_t[s]).T[:, :, None]))
                            [:, :, 0]).T for s in feats}
    for s in feats:
        targ_p[s][np.isnan(targ_t[s])] = np.nan
    out = run_probes(feats, targ_t, targ_p, t, mlp_epochs=2, seed=0, progress=False)
    q = out["linear"]["O3TOT"]
    assert q["n_train"] == q["n_val"] == 400 - 134
    assert q["r2_model_space"] > 0.999 and q["r2"] > 0.999 and abs(q["bias"]) < 1e-6
    assert np.isnan(out["linear"]["NO2"]["r2"])  # no cell with a target: reported, not invented
    sub = run_probes(feats, targ_t, targ_p, t, mlp_epochs=1, seed=0, progress=False,
                     max_cells=50)
    assert sub["linear"]["O3TOT"]["n_train"] == 50 and sub["linear"]["O3TOT"]["n_val"] == 266


def test_ridge_fits_only_where_the_l2_is_valid():
    g = np.random.default_rng(2)
    t = _transform()
    pix = {}
    for s in ("train", "val"):
        x = g.normal(size=(600, 6))
        y = np.full((600, 4), np.nan)
        y[:, 1] = 300 + 20 * (x[:, 0] - 0.5 * x[:, 3])  # O3TOT in DU, linear in features
        y[:200, 1] = np.nan
        if s == "train":
            x[:200] = 1e3  # garbage features where the product is invalid: must be unused
        pix[s] = {"x": x, "y": y}
    out, pairs = run_ridge(pix, t, seed=0)
    assert out["O3TOT"]["n_train"] == 400 and out["O3TOT"]["n"] == 400
    assert out["O3TOT"]["r2"] > 0.99
    assert pairs["O3TOT"].shape == (400, 2)


def test_ridge_is_scored_against_the_truth_on_cell_means():
    from train.evaluate import cell_features

    g = np.random.default_rng(3)
    t = _transform()
    # one 4 x 4 tile of 3 channels, cells of 2 x 2: features are the cell means
    l1 = g.normal(size=(3, 4, 4)).astype(np.float32)
    geo = np.zeros((4, 4, 4), np.float32)
    geo[2], geo[3] = 30.0, 10.0
    geo[2, 0, 0] = np.nan  # invalid geolocation: the whole top-left cell has no features
    f = cell_features(l1, geo, 2)
    assert f.shape == (4, 3 + 3)
    assert np.allclose(f[3, :3], l1[:, 2:, 2:].mean(axis=(1, 2)))
    assert np.allclose(f[3, 3], np.cos(np.radians(30.0)))
    assert not np.isfinite(f[0]).all() and np.isfinite(f[1:]).all()
    # a linear truth: the ridge fitted on pixels predicts the cells' truth
    pix = {}
    for s in ("train", "val"):
        x = g.normal(size=(600, 6))
        y = np.full((600, 4), np.nan)
        y[:, 1] = 300 + 20 * (x[:, 0] - 0.5 * x[:, 3])
        pix[s] = {"x": x, "y": y}
    cx = g.normal(size=(50, 6))
    truth = np.full((50, 4), np.nan)
    truth[:, 1] = 300 + 20 * (cx[:, 0] - 0.5 * cx[:, 3])
    truth[:5, 1] = np.nan
    out, _ = run_ridge(pix, t, seed=0, cells={"x": cx, "truth": truth})
    assert out["O3TOT"]["truth_cell"]["n"] == 45 and out["O3TOT"]["truth_cell"]["r2"] > 0.99


def test_cli_outputs_and_mismatched_normalisation(trained, train_shards, tmp_path):
    _, model = trained
    out = str(tmp_path / "ev")
    p = subprocess.run([sys.executable, "-m", "train.evaluate", model, train_shards, "--out",
                        out, "--quiet", "--mlp-epochs", "1", "--no-ridge"], cwd=ROOT,
                       env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["evaluation.json", "evaluation.md"] + \
        [f"scatter_{q}.png" for q in ("CLDO4", "HCHO", "NO2", "O3TOT")]
    assert "| O3TOT | head | cell |" in p.stdout and "Probe protocol" in p.stdout
    other = str(tmp_path / "shards")
    shutil.copytree(train_shards, other)
    sp = os.path.join(other, "stats.json")
    st = json.load(open(sp))
    st["l1"]["mean"] = [m + 0.1 for m in st["l1"]["mean"]]
    json.dump(st, open(sp, "w"))
    with pytest.raises(EvaluateError, match="normalised with other radiance statistics"):
        evaluate(model, other, progress=False)
    p = subprocess.run([sys.executable, "-m", "train.evaluate", model, other, "--out",
                        str(tmp_path / "ev2"), "--quiet"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "other radiance statistics" in p.stderr
    assert not os.path.exists(str(tmp_path / "ev2"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_research_question_script_tiny(tmp_path):
    """The one-command comparison at a tiny setting: both runs, both evaluations, a table."""
    out = str(tmp_path / "rq")
    p = subprocess.run([sys.executable, "scripts/research_question.py", out, "--granules", "4",
                        "--mirror-steps", "32", "--xtrack", "48", "--channels", "64",
                        "--steps", "4", "--mlp-epochs", "1", "model.channels=[16,16]",
                        "model.latent_channels=4", "model.head_hidden=[16]",
                        "model.attn_heads=2", "data.num_workers=0", "data.batch_size=4",
                        "train.val_every=0"], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=500)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "| linear probe (model space) |" in p.stdout
    r = json.load(open(os.path.join(out, "comparison.json")))
    assert r["l2_weights"] == [0.1, 0.1, 0.1, 0.1] and r["steps"] == 4
    sup = json.load(open(os.path.join(out, "supervised", "eval", "evaluation.json")))
    uns = json.load(open(os.path.join(out, "unsupervised", "eval", "evaluation.json")))
    assert sup["supervised"] and not uns["supervised"]
    assert r["r2"]["MLP probe (model space)"]["O3TOT"]["unsupervised"] == \
        uns["probes"]["mlp"]["O3TOT"]["r2_model_space"]

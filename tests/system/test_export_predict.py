"""Export a trained checkpoint, load it without DeepSpeed, predict whole granules."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import netCDF4
import numpy as np
import pytest
import torch
from helpers.common import DEMO, ROOT, env, tiny_overrides, train_run

from data_prep import synthesize
from data_prep.tempo import L2_ORDER, discover, find_files, read_l1
from train.export import ExportError, export
from train.model import build_model, load_pretrained
from train.predict import (
    PredictError,
    axis_starts,
    normalise_tile,
    predict_granule,
    predict_tiles,
)


@pytest.fixture(scope="module")
def run_dir(train_shards, tmp_path_factory) -> str:
    return train_run(train_shards, str(tmp_path_factory.mktemp("run") / "run"))


@pytest.fixture(scope="module")
def model_dir(run_dir, tmp_path_factory) -> str:
    return export(run_dir, str(tmp_path_factory.mktemp("export") / "model"))


def granule_files(folder: str):
    granules, _ = discover(find_files(folder))
    return {g.gid.key: g for g in granules.values() if g.rad}


def close(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Equal up to float32 summation order: 1e-5 relative, or 1e-5 of the product's largest
    magnitude (values near zero). a, b: (4, h, w)."""
    scale = np.nanmax(np.abs(b), axis=(1, 2), keepdims=True)
    return np.abs(a - b) <= 1e-5 * np.abs(b) + 1e-5 * scale


# ----------------------------------------------------------------------------- export


def test_export_writes_a_self_contained_folder_equal_to_the_checkpoint(run_dir, model_dir):
    from safetensors.torch import load_file

    from train.config import load_config

    assert sorted(os.listdir(model_dir)) == ["README.md", "config.yaml", "export.json",
                                             "model.safetensors", "stats.json"]
    model = load_pretrained(model_dir)
    assert not model.training and model.pretrained.step == 6
    ck = os.path.join(run_dir, "checkpoints", "step_00000006")
    cfg = load_config(os.path.join(ck, "config.yaml"))
    ref = build_model(cfg.model, cfg.loss)
    ref.load_state_dict(load_file(os.path.join(ck, "model.safetensors")))
    ref.eval()
    x = torch.randn(2, 64, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x, sample=False), ref(x, sample=False)
    for k in ("recon", "l2_pred", "mean"):
        assert torch.equal(a[k], b[k]), k
    card = open(os.path.join(model_dir, "README.md")).read()
    assert "step 6" in card and "| NO2 |" in card and "train" in card
    # the L2 transform parameters are those of the shards' stats
    tp = model.pretrained.info["l2_transform"]
    assert tp["o3_mean"] == pytest.approx(model.pretrained.stats["l2"]["O3TOT"]["mean"])


def test_export_reads_a_ddp_checkpoint(run_dir, model_dir, tmp_path):
    """Accelerate saves a DDP-wrapped model with its 'module.' key prefix (save_state calls
    get_state_dict(model, unwrap=False)); the export strips it."""
    from safetensors.torch import load_file, save_file

    src = os.path.join(run_dir, "checkpoints", "step_00000006")
    ck = str(tmp_path / "ddp" / "checkpoints" / "step_00000006")
    shutil.copytree(src, ck)
    w = os.path.join(ck, "model.safetensors")
    save_file({"module." + k: v for k, v in load_file(w).items()}, w)
    out = export(ck, str(tmp_path / "model"))
    a, b = load_pretrained(out), load_pretrained(model_dir)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_load_pretrained_needs_neither_deepspeed_nor_the_run_folder(model_dir, tmp_path):
    moved = str(tmp_path / "elsewhere")
    shutil.copytree(model_dir, moved)
    code = ("import sys; sys.modules['deepspeed'] = None\n"  # any import of it fails
            "from train.model import load_pretrained\n"
            f"m = load_pretrained({moved!r}); print('step', m.pretrained.step)\n"
            "assert 'accelerate' not in sys.modules")
    p = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step 6" in p.stdout


def test_export_refuses_existing_folder_and_damaged_model_folders(run_dir, model_dir, tmp_path):
    with pytest.raises(ExportError, match="exists"):
        export(run_dir, model_dir)
    bad = str(tmp_path / "bad")
    shutil.copytree(model_dir, bad)
    w = os.path.join(bad, "model.safetensors")
    with open(w, "r+b") as f:
        f.truncate(os.path.getsize(w) // 2)
    with pytest.raises(ExportError, match="model.safetensors.*truncated"):
        load_pretrained(bad)
    # normalisation stats for another channel count
    bad2 = str(tmp_path / "bad2")
    shutil.copytree(model_dir, bad2)
    import json

    sp = os.path.join(bad2, "stats.json")
    st = json.load(open(sp))
    st["l1"]["mean"] = st["l1"]["mean"][:32]
    json.dump(st, open(sp, "w"))
    with pytest.raises(ExportError, match="stats.json: normalisation for 32 channels.*64"):
        load_pretrained(bad2)
    os.remove(os.path.join(bad2, "config.yaml"))
    with pytest.raises(ExportError, match="config.yaml is missing"):
        load_pretrained(bad2)
    assert not os.path.exists(str(tmp_path / "none.partial"))
    with pytest.raises(ExportError, match="neither a checkpoint"):
        export(str(tmp_path), str(tmp_path / "none"))
    assert not os.path.exists(str(tmp_path / "none"))


# ----------------------------------------------------------------------------- predict


def test_predictions_on_tiles_equal_validation(model_dir, synth_dir, train_shards):
    """The validation path (loader batch -> model(sample=False) -> inverse transforms) and
    predict on the whole granule give the same values on every validation tile."""
    import dataclasses

    from train.config import load_config
    from train.data import build_loader

    model = load_pretrained(model_dir)
    cfg = load_config(os.path.join(model_dir, "config.yaml"))
    loader = build_loader(dataclasses.replace(cfg.data, shards=train_shards, num_workers=0),
                          "val")
    f, t = model.pretrained.latent_factor, 16
    want = {}
    with torch.no_grad():
        for batch in loader:
            out = model(batch["l1"].float(), sample=False)
            pred = model.pretrained.transform.inverse(out["l2_pred"].float())
            for i, key in enumerate(batch["keys"]):
                if batch["real"][i]:
                    want[key] = (pred[i].numpy(), out["mean"][i].numpy(), batch["l1"][i].numpy())
    assert len(want) == 6
    files = granule_files(synth_dir)
    checked = 0
    for gkey in {k.rsplit("_r", 1)[0] for k in want}:
        g = files[gkey]
        res = predict_granule(model, g.rad, g.l2, batch_size=5)
        rad = read_l1(g.rad).radiance
        for key, (p, z, x) in want.items():
            if not key.startswith(gkey):
                continue
            r0, c0 = int(key[-10:-6]), int(key[-4:])
            # the same model input, bit for bit (float16, as stored in the shards)
            x_pred, _ = normalise_tile(rad[r0:r0 + t, c0:c0 + t], model.pretrained.l1_mean,
                                       model.pretrained.l1_std, 0.05)
            assert np.array_equal(x_pred, x), key
            # the same outputs up to float32 summation order (batch composition differs)
            got = res["pred"][:, r0:r0 + t:f, c0:c0 + t:f]
            ok = np.isfinite(got)
            assert ok.mean() > 0.9
            assert close(got, p)[ok].all(), key
            zg = res["latent"][:, r0:r0 + t:f, c0:c0 + t:f]
            zok = np.isfinite(zg)
            np.testing.assert_allclose(zg[zok], z[zok], rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked == 6


def test_bf16_autocast_is_close_to_fp32(model_dir):
    model = load_pretrained(model_dir)
    x = np.random.default_rng(0).normal(size=(3, 64, 16, 16)).astype(np.float16)
    p32, z32 = predict_tiles(model, x, 2)
    p16, z16 = predict_tiles(model, x, 2, autocast_dtype=torch.bfloat16)
    assert p16.dtype == np.float32 and not np.array_equal(p16, p32)  # really ran in bf16
    scale = np.abs(z32).max()
    assert np.abs(z16 - z32).max() < 0.05 * scale


def test_axis_starts_cover_with_flush_last_tile():
    assert axis_starts(48, 16) == [0, 16, 32]
    assert axis_starts(70, 16) == [0, 16, 32, 48, 54]
    assert axis_starts(10, 16) == [0]


@pytest.fixture(scope="module")
def odd_granules(tmp_path_factory) -> str:
    """One 48 x 70 granule and one 10 x 70 granule (smaller than a tile in one axis)."""
    out = str(tmp_path_factory.mktemp("odd"))
    assert synthesize.main([out + "/a", "--granules", "1", "--mirror-steps", "48", "--xtrack",
                            "70", "--channels", "64", "--seed", "5"]) == 0
    assert synthesize.main([out + "/b", "--granules", "1", "--mirror-steps", "10", "--xtrack",
                            "70", "--channels", "64", "--seed", "6",
                            "--start", "2025-02-01T15:00:00"]) == 0
    return out


def test_granule_not_a_multiple_of_the_tile_is_covered_completely(model_dir, odd_granules):
    model = load_pretrained(model_dir)
    (g,) = granule_files(odd_granules + "/a").values()
    res = predict_granule(model, g.rad, g.l2)
    assert res["pred"].shape == (4, 48, 70) and res["latent"].shape[1:] == (48, 70)
    v = res["valid"]
    assert v.mean() > 0.95
    assert np.isfinite(res["pred"][:, v]).all() and np.isfinite(res["latent"][:, v]).all()
    assert np.isnan(res["pred"][:, ~v]).all()
    assert (0, 54) in res["tiles"] and res["padded"] == (0, 0)
    # the flush tile fills the last 6 columns: equal to that tile predicted on its own
    tile = res["tiles"].index((16, 54))
    rad = read_l1(g.rad).radiance[16:32, 54:70]
    x, _ = normalise_tile(rad, model.pretrained.l1_mean, model.pretrained.l1_std, 0.05)
    p, _ = predict_tiles(model, x[None])
    edge = p[0].repeat(2, -2).repeat(2, -1)[:, :, 10:]
    got = res["pred"][:, 16:32, 64:70]
    ok = np.isfinite(got)
    assert close(got, edge)[ok].all()
    assert tile > 0
    # smaller than one tile in the mirror-step direction: mirrored up to a tile, cut back
    (g,) = granule_files(odd_granules + "/b").values()
    res = predict_granule(model, g.rad, g.l2)
    assert res["pred"].shape == (4, 10, 70) and res["padded"] == (6, 0)
    assert np.isfinite(res["pred"][:, res["valid"]]).all()


def test_granule_without_l2_files(model_dir, odd_granules, tmp_path):
    from train.predict import write_netcdf, write_quicklook

    model = load_pretrained(model_dir)
    (g,) = granule_files(odd_granules + "/a").values()
    res = predict_granule(model, g.rad)  # RAD only
    assert res["l2_present"] == [] and np.isnan(res["l2"]).all()
    with_l2 = predict_granule(model, g.rad, g.l2)
    np.testing.assert_array_equal(res["pred"], with_l2["pred"])  # L2 only shown, never used
    nc = str(tmp_path / "x.nc")
    write_netcdf(nc, res, model.pretrained, "x")
    write_quicklook(str(tmp_path / "x.png"), res, "x")
    with netCDF4.Dataset(nc) as ds:
        assert "NO2" in ds.variables and "NO2_L2" not in ds.variables
        assert ds.input_files == os.path.basename(g.rad)
    assert os.path.getsize(str(tmp_path / "x.png")) > 1000


def test_predict_cli_writes_cf_netcdf_and_png(model_dir, odd_granules, tmp_path):
    import xarray as xr

    out = str(tmp_path / "pred")
    p = subprocess.run([sys.executable, "-m", "train.predict", model_dir, odd_granules + "/a",
                        out, "--quiet"], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (nc,) = glob.glob(os.path.join(out, "*.nc"))
    assert os.path.exists(nc[:-3] + ".png") and not glob.glob(os.path.join(out, "*.part"))
    ds = xr.open_dataset(nc)
    assert dict(ds.sizes) == {"mirror_step": 48, "xtrack": 70, "latent_channel": 4}
    assert ds.attrs["Conventions"] == "CF-1.8"
    assert int(ds.attrs["model_checkpoint_step"]) == 6
    assert "TEMPO_RAD_L1" in ds.attrs["input_files"] and "TEMPO_NO2_L2" in ds.attrs["input_files"]
    assert ds["O3TOT"].attrs["units"] == "DU" and ds["CLDO4"].attrs["standard_name"] == \
        "cloud_area_fraction"
    assert ds["latitude"].attrs["units"] == "degrees_north"
    assert set(ds["NO2"].coords) >= {"latitude", "longitude"}
    for p_ in L2_ORDER:
        assert p_ + "_L2" in ds
    with netCDF4.Dataset(nc) as raw:
        assert raw["NO2"]._FillValue == np.float32(-1e30)
    valid = ds["radiance_valid"].values.astype(bool)
    assert np.isfinite(ds["O3TOT"].values[valid]).all()
    assert np.isnan(ds["O3TOT"].values[~valid]).all()  # fill decoded to NaN by xarray


# ----------------------------------------------------------------------------- bad input


def _rename_band(path: str) -> None:
    with netCDF4.Dataset(path, "a") as ds:
        ds.renameGroup("band_290_490_nm", "band_540_740_nm_x")


def test_bad_granules_give_clear_errors_and_write_nothing(model_dir, synth_dir, tmp_path):
    src = str(tmp_path / "in")
    shutil.copytree(synth_dir, src)
    files = granule_files(src)
    keys = sorted(files)
    _rename_band(files[keys[0]].rad)
    rad = files[keys[1]].rad
    with open(rad, "r+b") as f:
        f.truncate(os.path.getsize(rad) // 3)
    model = load_pretrained(model_dir)
    with pytest.raises(PredictError, match="missing group 'band_290_490_nm'"):
        predict_granule(model, files[keys[0]].rad)
    with pytest.raises(PredictError, match=os.path.basename(rad)):
        predict_granule(model, rad)
    out = str(tmp_path / "pred")
    p = subprocess.run([sys.executable, "-m", "train.predict", model_dir, src, out, "--quiet",
                        "--no-png"], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1
    assert f"granule {keys[0]}" in p.stderr and "band_290_490_nm" in p.stderr
    assert f"granule {keys[1]}" in p.stderr
    written = sorted(os.listdir(out))
    assert written == [f"tempo_vae_{k}.nc" for k in keys[2:]]  # the good ones, whole


def test_wrong_channel_count_is_named(model_dir, tmp_path):
    out = str(tmp_path / "g")
    assert synthesize.main([out, "--granules", "1", "--mirror-steps", "16", "--xtrack", "16",
                            "--channels", "32", "--seed", "1"]) == 0
    (g,) = granule_files(out).values()
    with pytest.raises(PredictError, match="32 spectral channels but the model .* expects 64"):
        predict_granule(load_pretrained(model_dir), g.rad)


# ----------------------------------------------------------------------------- ZeRO


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_checkpoint_exports_and_matches_the_live_model(train_shards, tmp_path):
    out = str(tmp_path / "run")
    probe = str(tmp_path / "probe.pt")
    acc = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cfg = os.path.join(ROOT, "accelerate_configs", "cpu_deepspeed_zero3.yaml")
    p = subprocess.run([acc, "launch", "--config_file", cfg, "tests/helpers/train_and_probe.py",
                        probe, DEMO, *tiny_overrides(train_shards, out), "train.steps=4"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    q = subprocess.run([sys.executable, "-m", "train.export", out, str(tmp_path / "model")],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-3000:]
    assert "deepspeed checkpoint" in q.stderr
    model = load_pretrained(str(tmp_path / "model"))
    live = torch.load(probe)
    with torch.no_grad():
        bf = model.to(torch.bfloat16)(live["x"].to(torch.bfloat16), sample=False)
    torch.testing.assert_close(bf["recon"].float(), live["recon"], rtol=0.02, atol=0.02)
    torch.testing.assert_close(bf["l2_pred"].float(), live["l2_pred"], rtol=0.02, atol=0.02)


def test_model_folder_files_are_readable_like_any_new_file(model_dir):
    """The weights (written through a temporary file) get the same mode as the other files,
    so a model folder on a shared file system is readable by others as usual."""
    from data_prep.util import default_file_mode

    modes = {f: os.stat(os.path.join(model_dir, f)).st_mode & 0o777
             for f in os.listdir(model_dir)}
    assert set(modes.values()) == {default_file_mode()}, modes

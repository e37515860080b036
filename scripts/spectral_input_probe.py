"""Why the model did not learn NO2, measured without the model: the same per-pixel
regressions fit by least squares and by Adam, on z-scores and on whitened spectra.

    python scripts/spectral_input_probe.py runs/benchmark/data/granules \\
        runs/benchmark/data/shards --xsec-dir ../shared/reference_data

Reads the RAD files and the synthetic truth of the benchmark's granules (the split of the
shards' manifest.json: training granules fit, validation granules score), takes log
radiance, z-scores it with the training pixels' channel mean and std (what the shards
hold), and fits for each product, per pixel, with the truth as target (standardised):

- least squares (ridge, alpha 1e-3 on standardised features): the linear ceiling;
- with ``--xsec-dir``, least squares on the 12 DOAS slant columns the model computes with
  model.slant_columns, the 3 geometry features and the columns times 2 / AMF (27 numbers
  instead of 1028: what that model input makes linear);
- a linear model and a 1-hidden-layer MLP (64, GELU) trained with AdamW (lr 2e-3, weight
  decay 0.05, batch 2048 pixels, ``--steps`` steps: the trainer's optimiser settings), on
  the z-scores and on the whitened spectra (:func:`whitening` from 32768 training pixels,
  eps 1e-6: each principal component divided by the square root of its variance).

Scores: R^2 against the truth on validation pixels and on 4 x 4 cell means (the level at
which the benchmark scores the head). Also printed: the eigenvalue spread of the z-scores'
covariance (condition number). Results are printed as a markdown table.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_prep.tempo import L2_ORDER, parse_name, read_l1  # noqa: E402
from data_prep.util import argument_parser  # noqa: E402

TRUTH_VARS = {"NO2": "no2_trop", "O3TOT": "o3", "HCHO": "hcho", "CLDO4": "cloud_fraction"}
CELL = 4


def load(granules: str, shards: str, max_granules: int | None):
    """(z (N, C) float32, truth (N, 4), is_val (N,), ok (N,), shape (M, X), extra) for the
    pixels of the granules, ok where every channel is valid; z from training pixels' mean
    and std of log radiance. extra: std (C,) of that log radiance, wavelength (C,) nm (the
    first granule's, averaged over cross-track) and geometry (N, 2) SZA, VZA (degrees)."""
    import netCDF4

    manifest = json.load(open(os.path.join(shards, "manifest.json")))
    val = set(manifest["splits"].get("val", []))
    logs, truth, is_val, shape, geo, wl = [], [], [], None, [], None
    rads = sorted(glob.glob(os.path.join(granules, "TEMPO_RAD_L1_*.nc")))[:max_granules]
    if not rads:
        sys.exit(f"error: no TEMPO_RAD_L1_*.nc in {granules}")
    for path in rads:
        name = parse_name(path)
        if name is None:
            sys.exit(f"error: {path}: not a TEMPO file name")
        g = name.gid.key
        tpath = os.path.join(granules, "truth", f"TEMPO_TRUTH_{g}.nc")
        if not os.path.exists(tpath):
            sys.exit(f"error: {tpath} not found (truth of {path})")
        l1 = read_l1(path)
        m, x, c = l1.radiance.shape
        if wl is None:
            wl = np.asarray(l1.wavelength, np.float64).mean(0)
        if shape not in (None, (m, x)):
            sys.exit(f"error: {path} is {m} x {x}, the others {shape}: cells need one shape")
        shape = (m, x)
        with np.errstate(invalid="ignore", divide="ignore"):
            logs.append(np.log(l1.radiance).reshape(-1, c))
        with netCDF4.Dataset(tpath) as ds:
            truth.append(np.stack([np.asarray(ds[TRUTH_VARS[p]][:], np.float64).ravel()
                                   for p in L2_ORDER], 1))
            geo.append(np.stack([np.asarray(ds[k][:], np.float64).ravel()
                                 for k in ("sza", "vza")], 1))
        is_val.append(np.full(m * x, g in val))
    x = np.concatenate(logs)
    truth, is_val = np.concatenate(truth), np.concatenate(is_val)
    ok = np.isfinite(x).all(1)
    mean, std = x[ok & ~is_val].mean(0), x[ok & ~is_val].std(0)
    z = np.where(ok[:, None], (x - mean) / std, 0.0).astype(np.float32)
    return z, truth, is_val, ok, shape, {"std": std, "wavelength": wl,
                                          "geometry": np.concatenate(geo)}


def whitening(pixels: np.ndarray, eps: float = 1e-6
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA whitening fitted to ``pixels`` (N, C): (mean (C,), projection (C, C), the
    covariance's eigenvalues (C,), descending); the whitened spectrum is (x - mean) @
    projection. Each principal component is divided by sqrt(its variance + eps x the
    largest variance) (eps bounds the gain of pure-noise directions)."""
    p = pixels.astype(np.float64)
    mean = p.mean(0)
    ev, vec = np.linalg.eigh(np.cov((p - mean).T))
    ev, vec = np.clip(ev[::-1], 0, None), vec[:, ::-1]
    return mean, vec / np.sqrt(ev + eps * ev[0]), ev


def cells(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Per-pixel values of whole granules (G * M * X,) -> 4 x 4 cell means (flat)."""
    m, x = shape
    return a.reshape(-1, m // CELL, CELL, x // CELL, CELL).mean((2, 4)).ravel()


def r2(y: np.ndarray, p: np.ndarray) -> float:
    return float(1 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def fit_product(product: str, y: np.ndarray, inputs: dict, z: np.ndarray, tr: np.ndarray,
                ok: np.ndarray, is_val: np.ndarray, shape: tuple[int, int], steps: int,
                least_squares: dict | None = None) -> list[tuple]:
    """Least squares on z-scores (and on each of ``least_squares``: name -> (N, k)
    features), then Adam linear / MLP on each input, for one product's truth ``y`` (N,);
    rows (product, model, input, R^2 pixel, R^2 cell) on validation."""
    import torch
    from sklearn.linear_model import Ridge

    va = ok & is_val
    cell_ok = (cells(ok.astype(float), shape) == 1.0) & (cells(is_val.astype(float), shape) == 1.0)
    fin = np.isfinite(y)
    ym, ys = y[tr & fin].mean(), y[tr & fin].std()
    t = np.where(fin, (y - ym) / ys, 0.0).astype(np.float32)
    yc = cells(np.where(fin, y, np.nan), shape)
    sel_c = cell_ok & np.isfinite(yc)

    def score(pred_std: np.ndarray) -> tuple[float, float]:
        pred = pred_std * ys + ym
        pc = cells(np.where(ok, pred, 0.0), shape)
        return r2(y[va & fin], pred[va & fin]), r2(yc[sel_c], pc[sel_c])

    fit = tr & fin
    rows = [(product, "least squares", "z-scores",
             *score(Ridge(alpha=1e-3).fit(z[fit], t[fit]).predict(z)))]
    for name, feats in (least_squares or {}).items():
        f = (feats - feats[fit].mean(0)) / np.maximum(feats[fit].std(0), 1e-12)
        rows.append((product, "least squares", name,
                     *score(Ridge(alpha=1e-3).fit(f[fit], t[fit]).predict(f))))
    for in_name, feats in inputs.items():
        xt, yt = torch.from_numpy(feats[fit]), torch.from_numpy(t[fit])
        for model_name in ("Adam linear", "Adam MLP 64"):
            net = (torch.nn.Linear(feats.shape[1], 1) if model_name == "Adam linear" else
                   torch.nn.Sequential(torch.nn.Linear(feats.shape[1], 64), torch.nn.GELU(),
                                       torch.nn.Linear(64, 1)))
            opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05)
            for _ in range(steps):
                idx = torch.randint(0, len(xt), (2048,))
                loss = torch.nn.functional.mse_loss(net(xt[idx]).squeeze(1), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                pred = net(torch.from_numpy(feats)).squeeze(1).double().numpy()
            rows.append((product, model_name, in_name, *score(pred)))
    return rows


def slant_features(z: np.ndarray, extra: dict, xsec_dir: str, fwhm: float) -> np.ndarray:
    """(N, 12 + 3 + 12) float64: the DOAS slant columns the model computes with
    model.slant_columns (``data_prep.physics.slant_column_operator`` on log I - mean),
    the geometry features (cos SZA, cos VZA, 2 / geometric AMF) and the columns times
    2 / AMF (a vertical column is a slant column over the air-mass factor)."""
    import types

    import torch

    from train.model import geometry_features, slant_column_operator_for

    op = slant_column_operator_for(types.SimpleNamespace(xsec_dir=xsec_dir, slit_fwhm_nm=fwhm),
                                   extra["wavelength"])
    cols = (z.astype(np.float64) * extra["std"]) @ op.T
    sza_vza = extra["geometry"].T[:, :, None, None]  # (2, N, 1, 1) -> geo (N, 4, 1, 1)
    geo = torch.from_numpy(np.concatenate([np.zeros_like(sza_vza), sza_vza], 0)
                           .transpose(1, 0, 2, 3).copy())
    g = geometry_features(geo)[:, :, 0, 0].double().numpy()
    return np.concatenate([cols, g, cols * g[:, 2:3]], 1)


def main(argv=None) -> int:
    ap = argument_parser("python scripts/spectral_input_probe.py", __doc__)
    ap.add_argument("granules", help="folder of the benchmark's granules (with truth/)")
    ap.add_argument("shards", help="their shard folder (manifest.json gives the split)")
    ap.add_argument("--steps", type=int, default=600, help="Adam steps per fit")
    ap.add_argument("--max-granules", type=int, default=None, help="use the first N granules")
    ap.add_argument("--seed", type=int, default=0, help="seed of the Adam fits")
    ap.add_argument("--xsec-dir", default=None,
                    help="cross-sections the granules were synthesised with ('analytic': the "
                    "built-in shapes): adds least squares on the model's DOAS slant columns "
                    "(model.slant_columns) with the geometry; none: that row is left out")
    ap.add_argument("--slit-fwhm", type=float, default=0.6, help="slit FWHM (nm) of those rows")
    a = ap.parse_args(argv)
    import torch

    t0 = time.perf_counter()
    z, truth, is_val, ok, shape, extra = load(a.granules, a.shards, a.max_granules)
    tr = ok & ~is_val
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    sub = rng.choice(np.where(tr)[0], min(32768, int(tr.sum())), replace=False)
    mean, proj, ev = whitening(z[sub])
    w = ((z - mean) @ proj).astype(np.float32)
    inputs = {"z-scores": z, "whitened": w}
    print(f"{int(is_val.size / shape[0] / shape[1])} granules of {shape[0]} x {shape[1]} x "
          f"{z.shape[1]}; {int(tr.sum())} training / {int((ok & is_val).sum())} validation "
          f"pixels; z-score covariance eigenvalues {ev[0]:.3g} .. {ev[-1]:.3g} (condition "
          f"number {ev[0] / ev[-1]:.2g}); loaded in {time.perf_counter() - t0:.0f} s",
          flush=True)
    least_squares = {}
    if a.xsec_dir:
        least_squares["slant columns + geometry"] = slant_features(z, extra, a.xsec_dir,
                                                                   a.slit_fwhm)
    rows = []
    for i, p in enumerate(L2_ORDER):
        rows += fit_product(p, truth[:, i], inputs, z, tr, ok, is_val, shape, a.steps,
                            least_squares)
        print(f"{p} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(f"\nR^2 against the truth, validation granules ({a.steps} Adam steps of batch 2048, "
          "AdamW lr 2e-3 wd 0.05):\n")
    print("| product | model | input | pixel | cell |\n|---|---|---|---|---|")
    for p, m, i, rp, rc in rows:
        print(f"| {p} | {m} | {i} | {rp:.3f} | {rc:.3f} |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())

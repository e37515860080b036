"""Evaluate an exported model on shards: head metrics, the probe protocol, baselines.

    python -m train.evaluate runs/demo/model data/demo/shards --truth data/demo/granules/truth

Everything is computed on the shards' validation split (models, probes and baselines are
fit on the training split only), per product (NO2, O3TOT, HCHO, CLDO4), in physical units
unless marked "model space":

- head: the L2 head's predictions (posterior mean, inverse L2 transforms) against the L2
  per latent cell (targets pooled NaN-aware over the cell's f x f pixels, a cell counted
  when at least loss.l2_min_valid_fraction of them are valid: exactly the trainer's
  validation metrics) and per pixel (each cell's value given to its pixels, every valid L2
  pixel counted); against the synthetic truth too with --truth. RMSE, bias, R^2, n.
- probes (the research protocol; any checkpoint, supervised or not): from the latent means
  of a cell to the cell's pooled L2 target in model space (the transforms the head is
  trained with), a linear least-squares probe and an MLP probe (hidden 512-512, ReLU,
  dropout 0.1, Adam), fit on training cells where the product is valid (at most
  --max-cells, a seeded uniform draw), R^2 on validation cells, in model space and, after
  the inverse transform, in physical units. The MLP is torch, not scikit-learn:
  MLPRegressor has no dropout.
- ridge baseline: per pixel, from the normalised spectrum plus viewing geometry (cos SZA,
  cos VZA, the geometric air-mass factor 1/cos SZA + 1/cos VZA) to the product in model
  space, fit only on training pixels where that product's L2 is valid (alpha by
  leave-one-out cross-validation, RidgeCV), scored on validation pixels where it is valid.
  At most --max-pixels pixels per split are used, drawn uniformly per tile (seeded). With
  --truth the fitted ridge is also applied to the mean features of each validation latent
  cell and scored against the cell's truth (``ridge[P]["truth_cell"]``): the level at
  which the head is scored against the truth.
- l2_vs_truth (with --truth): the operational L2 against the truth per pixel, the
  reference a model can be judged by.

Outputs in --out: evaluation.json, evaluation.md (the tables, also printed) and
scatter_<PRODUCT>.png (density of prediction vs reference for each method).
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

from data_prep.logs import get_logger, setup_logging
from data_prep.shard_format import L2_ORDER, L2_UNITS
from data_prep.util import argument_parser

log = get_logger(__name__)

TRUTH_VARS = {"NO2": "no2_trop", "O3TOT": "o3", "HCHO": "hcho", "CLDO4": "cloud_fraction"}
UNITS = L2_UNITS


class EvaluateError(Exception):
    """Shards, truth or model that cannot be evaluated together; names the file."""


# ----------------------------------------------------------------------------- metrics


class Scores:
    """Per product n, sum(e), sum(e^2), sum(y), sum(y^2) in float64, plus a seeded uniform
    subsample of (reference, prediction) pairs for plots."""

    def __init__(self, keep: int = 20000, seed: int = 0):
        self.sums = np.zeros((len(L2_ORDER), 5))
        self.keep = keep
        self.rng = np.random.default_rng(seed)
        self.pairs: list[list[np.ndarray]] = [[] for _ in L2_ORDER]
        self.keys: list[list[np.ndarray]] = [[] for _ in L2_ORDER]

    def update(self, ref: np.ndarray, pred: np.ndarray) -> None:
        """ref, pred: (N, 4, ...) physical units; entries where either is NaN are skipped."""
        ref = np.moveaxis(np.asarray(ref, np.float64), 1, 0).reshape(len(L2_ORDER), -1)
        pred = np.moveaxis(np.asarray(pred, np.float64), 1, 0).reshape(len(L2_ORDER), -1)
        for i in range(len(L2_ORDER)):
            m = np.isfinite(ref[i]) & np.isfinite(pred[i])
            y, e = ref[i][m], pred[i][m] - ref[i][m]
            self.sums[i] += [m.sum(), e.sum(), (e * e).sum(), y.sum(), (y * y).sum()]
            if y.size:
                self.pairs[i].append(np.stack([y, pred[i][m]], 1))
                self.keys[i].append(self.rng.random(y.size))
                if sum(len(k) for k in self.keys[i]) > 4 * self.keep:
                    self._shrink(i)

    def _shrink(self, i: int) -> None:
        k = np.concatenate(self.keys[i])
        p = np.concatenate(self.pairs[i])
        idx = np.argsort(k)[: self.keep]
        self.keys[i], self.pairs[i] = [k[idx]], [p[idx]]

    def sample(self, i: int) -> np.ndarray:
        if not self.pairs[i]:
            return np.empty((0, 2))
        self._shrink(i)
        return self.pairs[i][0]

    def result(self) -> dict:
        out = {}
        for i, p in enumerate(L2_ORDER):
            n, se, se2, sy, sy2 = self.sums[i]
            if n == 0:
                out[p] = {"n": 0, "rmse": math.nan, "bias": math.nan, "r2": math.nan}
                continue
            sst = sy2 - sy * sy / n
            out[p] = {"n": int(n), "rmse": math.sqrt(se2 / n), "bias": se / n,
                      "r2": 1.0 - se2 / sst if sst > 0 else math.nan}
        return out


def r2_score(y: np.ndarray, p: np.ndarray) -> float:
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    sst = ((y - y.mean()) ** 2).sum()
    return float(1.0 - ((y - p) ** 2).sum() / sst) if y.size > 1 and sst > 0 else math.nan


# ----------------------------------------------------------------------------- data


def iter_split(shards: str, split: str):
    """Decoded samples of one split in a fixed order (sorted shards, file order)."""
    from data_prep import samples
    from data_prep.util import read_json

    sizes = read_json(os.path.join(shards, "sizes.json"))
    for name in sorted(k for k, v in sizes.items() if k.startswith(split + "/") and int(v) > 0):
        path = os.path.join(shards, name)
        if not os.path.exists(path):
            raise EvaluateError(f"{path} is listed in sizes.json but does not exist")
        n = 0
        try:
            for raw in samples.iter_tar(path):
                yield samples.decode(raw, name)
                n += 1
        except samples.SampleError as e:
            raise EvaluateError(str(e)) from None
        if n != int(sizes[name]):
            raise EvaluateError(f"{path}: {n} samples, sizes.json says {sizes[name]}")


def check_shards(model, shards: str) -> dict:
    """The shards' stats must be the model's normalisation; returns sizes.json."""
    from data_prep.util import read_json

    for name in ("sizes.json", "stats.json"):
        if not os.path.exists(os.path.join(shards, name)):
            raise EvaluateError(f"{os.path.join(shards, name)} is missing: {shards} is not a "
                                "shard folder (data_prep.make_shards)")
    st = read_json(os.path.join(shards, "stats.json"))
    pre = model.pretrained
    mean = np.asarray(st["l1"]["mean"], np.float32)
    std = np.asarray(st["l1"]["std"], np.float32)
    if mean.shape != pre.l1_mean.shape:
        raise EvaluateError(f"{shards}/stats.json: {mean.shape[0]} channels, the model "
                            f"({pre.path}) has {pre.l1_mean.shape[0]}")
    if not (np.allclose(mean, pre.l1_mean, rtol=1e-6, atol=1e-6)
            and np.allclose(std, pre.l1_std, rtol=1e-6, atol=1e-6)):
        raise EvaluateError(f"{shards} was normalised with other radiance statistics than the "
                            f"model ({pre.path}/stats.json): its tiles are not the model's "
                            "input; re-make the shards with make_shards --stats "
                            f"{pre.path}/stats.json")
    return read_json(os.path.join(shards, "sizes.json"))


class TruthReader:
    """Per-pixel truth tiles from ``<dir>/TEMPO_TRUTH_<granule>.nc`` (data_prep.synthesize)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.cache: dict[str, np.ndarray] = {}

    def tile(self, meta: dict) -> np.ndarray:
        import netCDF4

        g = meta["granule"]
        if g not in self.cache:
            path = os.path.join(self.folder, f"TEMPO_TRUTH_{g}.nc")
            if not os.path.exists(path):
                raise EvaluateError(f"{path} not found: no truth for granule {g}")
            try:
                with netCDF4.Dataset(path) as ds:
                    self.cache = {g: np.stack([np.asarray(ds[TRUTH_VARS[p]][:], np.float64)
                                               for p in L2_ORDER])}
            except (OSError, IndexError, KeyError) as e:
                raise EvaluateError(f"{path}: unreadable truth file ({e})") from None
        r, c, s = meta["row"], meta["col"], meta["size"]
        t = self.cache[g][:, r:r + s, c:c + s]
        if t.shape[1:] != (s, s):
            raise EvaluateError(f"truth of granule {g} is {self.cache[g].shape[1:]}, too small "
                                f"for tile {meta['key']}")
        return t


def geometry_features(geo: np.ndarray) -> np.ndarray:
    """(..., 4 [lat, lon, sza, vza]) -> (..., 3): cos SZA, cos VZA, 1/cos SZA + 1/cos VZA."""
    cs = np.cos(np.radians(geo[..., 2]))
    cv = np.cos(np.radians(geo[..., 3]))
    amf = 1.0 / np.clip(cs, 0.05, None) + 1.0 / np.clip(cv, 0.05, None)
    return np.stack([cs, cv, amf], -1)


# ----------------------------------------------------------------------------- probes


def fit_linear(xtr, ytr, xva):
    from sklearn.linear_model import LinearRegression

    return LinearRegression().fit(xtr, ytr).predict(xva)


def fit_mlp(xtr, ytr, xva, hidden=(512, 512), dropout=0.1, epochs=100, batch_size=256,
            lr=1e-3, seed=0):
    """MLP probe (ReLU, dropout) trained with Adam on standardised inputs and target."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    ym, ys = float(ytr.mean()), float(ytr.std() + 1e-12)
    xt = torch.as_tensor((xtr - mu) / sd, dtype=torch.float32)
    yt = torch.as_tensor((ytr - ym) / ys, dtype=torch.float32)
    layers, cin = [], xt.shape[1]
    for h in hidden:
        layers += [nn.Linear(cin, h), nn.ReLU(), nn.Dropout(dropout)]
        cin = h
    net = nn.Sequential(*layers, nn.Linear(cin, 1))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    n = len(xt)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = ((net(xt[idx])[:, 0] - yt[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        out = net(torch.as_tensor((xva - mu) / sd, dtype=torch.float32))[:, 0].numpy()
    return out * ys + ym


def _inverse_one(transform, i: int, y: np.ndarray) -> np.ndarray:
    """Inverse transform of product i for a flat array (model space -> physical)."""
    import torch

    full = torch.zeros(len(L2_ORDER), y.size, 1, dtype=torch.float64)
    full[i, :, 0] = torch.as_tensor(y, dtype=torch.float64)
    return transform.inverse(full)[i, :, 0].numpy()


def run_probes(feats: dict, targets_t: dict, targets_p: dict, transform, mlp_epochs: int,
               seed: int, progress: bool, max_cells: int = 0) -> dict:
    """Linear and MLP probes per product; feats[split] (N, Z), targets_*[split] (N, 4).
    ``max_cells`` > 0: fit on at most that many training cells (a seeded uniform draw)."""
    out: dict = {"linear": {}, "mlp": {}}
    for i, p in enumerate(L2_ORDER):
        mtr = np.isfinite(targets_t["train"][:, i])
        if max_cells and mtr.sum() > max_cells:
            keep = np.random.default_rng([seed, i]).choice(np.flatnonzero(mtr), max_cells,
                                                           replace=False)
            mtr = np.zeros_like(mtr)
            mtr[keep] = True
        mva = np.isfinite(targets_t["val"][:, i])
        for kind in ("linear", "mlp"):
            if mtr.sum() < 10 or mva.sum() < 2:
                out[kind][p] = {"n_train": int(mtr.sum()), "n_val": int(mva.sum()),
                                "r2_model_space": math.nan, "r2": math.nan,
                                "rmse": math.nan, "bias": math.nan}
                continue
            t0 = time.perf_counter()
            xtr, ytr = feats["train"][mtr], targets_t["train"][mtr, i]
            xva = feats["val"][mva]
            if kind == "linear":
                pred = fit_linear(xtr, ytr, xva)
            else:
                pred = fit_mlp(xtr, ytr, xva, epochs=mlp_epochs, seed=seed)
            yva = targets_t["val"][mva, i]
            phys = _inverse_one(transform, i, pred)
            yp = targets_p["val"][mva, i]
            e = phys - yp
            out[kind][p] = {"n_train": int(mtr.sum()), "n_val": int(mva.sum()),
                            "r2_model_space": r2_score(yva, pred), "r2": r2_score(yp, phys),
                            "rmse": float(np.sqrt((e * e).mean())), "bias": float(e.mean())}
            if progress:
                log.info(f"{kind} probe {p}: R^2 {out[kind][p]['r2_model_space']:.3f} (model "
                         f"space) in {time.perf_counter() - t0:.1f}s")
    return out


def cell_features(l1: np.ndarray, geo: np.ndarray, f: int) -> np.ndarray:
    """Ridge features averaged over each f x f latent cell of one tile: (C, H, W) spectrum
    and (4, H, W) geo -> (H/f * W/f, C + 3), rows in the order of the cells (row-major).
    A cell with a pixel of invalid geolocation gets non-finite features."""
    c, h, w = l1.shape
    feats = np.concatenate([l1.astype(np.float32),
                            geometry_features(geo.transpose(1, 2, 0)).transpose(2, 0, 1)
                            .astype(np.float32)])
    k = feats.shape[0]
    blocks = feats.reshape(k, h // f, f, w // f, f).mean(axis=(2, 4))
    return blocks.reshape(k, -1).T


def run_ridge(pix: dict, transform, seed: int, cells: dict | None = None
              ) -> tuple[dict, dict]:
    """Ridge per product from spectrum + geometry; returns (metrics, {product: pairs}).
    Pixels with non-finite features (invalid geolocation) are left out of the fit and the
    score, and counted in ``metrics["pixels_without_features"]``.

    ``cells`` ({"x": (N, C + 3) cell-mean features, "truth": (N, 4) truth per cell}, from
    :func:`cell_features`): the fitted ridge is also applied to each validation cell's mean
    features (a linear model's mean prediction over the cell, in model space), inverted to
    physical units and scored against the cell's truth: ``metrics[P]["truth_cell"]``, the
    level at which the head is scored against the truth."""
    from sklearn.linear_model import RidgeCV

    out, pairs = {}, {}
    xtr_all = pix["train"]["x"]
    # a pixel whose geolocation is invalid (NaN angles in the shards' geo) has no features
    ftr, fva = np.isfinite(xtr_all).all(1), np.isfinite(pix["val"]["x"]).all(1)
    out["pixels_without_features"] = {"train": int((~ftr).sum()), "val": int((~fva).sum())}
    for i, p in enumerate(L2_ORDER):
        ytr_p = pix["train"]["y"][:, i]
        mtr = np.isfinite(ytr_p) & ftr
        mva = np.isfinite(pix["val"]["y"][:, i]) & fva
        if mtr.sum() < 10 or mva.sum() < 2:
            out[p] = {"n_train": int(mtr.sum()), "n": int(mva.sum()), "r2": math.nan,
                      "rmse": math.nan, "bias": math.nan, "alpha": math.nan}
            continue
        ytr_t = transform_one(transform, i, ytr_p[mtr])
        mu, sd = xtr_all[mtr].mean(0), xtr_all[mtr].std(0) + 1e-6  # valid pixels only
        model = RidgeCV(alphas=np.logspace(-3, 4, 15)).fit((xtr_all[mtr] - mu) / sd, ytr_t)
        pred_t = model.predict((pix["val"]["x"][mva] - mu) / sd)
        phys = _inverse_one(transform, i, pred_t)
        y = pix["val"]["y"][mva, i]
        e = phys - y
        out[p] = {"n_train": int(mtr.sum()), "n": int(mva.sum()), "r2": r2_score(y, phys),
                  "rmse": float(np.sqrt((e * e).mean())), "bias": float(e.mean()),
                  "alpha": float(model.alpha_)}
        if cells is not None:
            ok = np.isfinite(cells["x"]).all(1) & np.isfinite(cells["truth"][:, i])
            yc = cells["truth"][ok, i]
            pc = _inverse_one(transform, i, model.predict((cells["x"][ok] - mu) / sd))
            ec = pc - yc
            out[p]["truth_cell"] = {"n": int(ok.sum()), "r2": r2_score(yc, pc),
                                    "rmse": float(np.sqrt((ec * ec).mean())) if ok.any()
                                    else math.nan,
                                    "bias": float(ec.mean()) if ok.any() else math.nan}
        pairs[p] = np.stack([y, phys], 1)
    return out, pairs


def transform_one(transform, i: int, y: np.ndarray) -> np.ndarray:
    """Forward transform of product i for a flat array (physical -> model space)."""
    import torch

    full = torch.zeros(len(L2_ORDER), y.size, 1, dtype=torch.float64)
    full[:, :, 0] = torch.as_tensor(y, dtype=torch.float64)
    return transform.forward(full)[i, :, 0].numpy()


# ----------------------------------------------------------------------------- main pass


def export_to_temp(source: str, shards: str) -> str:
    """A run or checkpoint folder (any kind) exported into a temporary model folder; the
    normalisation stats come from the run's data.shards, else from ``shards``."""
    import tempfile

    from train.export import ExportError, export

    out = os.path.join(tempfile.mkdtemp(prefix="tempo_vae_eval_"), "model")
    try:
        return export(source, out)
    except ExportError as e:
        if "stats.json not found" not in str(e):
            raise
        return export(source, out, shards=shards)


def evaluate(model_dir: str, shards: str, truth: str | None = None, batch_size: int = 32,
             max_pixels: int = 50000, probes: bool = True, ridge: bool = True,
             mlp_epochs: int = 100, seed: int = 0, device: str = "cpu",
             progress: bool = True, max_cells: int = 200000) -> tuple[dict, dict]:
    """All metrics as a dict (see the module doc) and the plot samples."""
    import torch
    from tqdm import tqdm

    from train.losses import nan_pool
    from train.metrics import ValMetrics
    from train.model import load_pretrained

    if not os.path.exists(os.path.join(model_dir, "export.json")):
        model_dir = export_to_temp(model_dir, shards)
    model = load_pretrained(model_dir, device)
    pre = model.pretrained
    sizes = check_shards(model, shards)
    transform = pre.transform
    f = pre.latent_factor
    min_valid = pre.cfg.loss.l2_min_valid_fraction
    truth_reader = TruthReader(truth) if truth else None
    n_tiles = {s: sum(int(v) for k, v in sizes.items() if k.startswith(s + "/"))
               for s in ("train", "val")}
    if n_tiles["val"] == 0:
        raise EvaluateError(f"{shards}: no validation tiles")
    rng = np.random.default_rng(seed)

    cell_metrics = ValMetrics(torch.device(device), min_valid)
    sc = {k: Scores(seed=seed) for k in ("head_pixel", "head_cell", "head_truth_pixel",
                                         "head_truth_cell", "l2_truth_pixel")}
    feats: dict = {"train": [], "val": []}
    targ_t: dict = {"train": [], "val": []}
    targ_p: dict = {"train": [], "val": []}
    pix: dict = {s: {"x": [], "y": []} for s in ("train", "val")}
    cells: dict = {"x": [], "truth": []}  # validation cells, for ridge vs truth
    splits = ["val"] + (["train"] if (probes or ridge) else [])

    def flush(split, batch):
        x = torch.from_numpy(np.stack([b["l1"] for b in batch])).to(device).float()
        l2 = torch.from_numpy(np.stack([b["l2"] for b in batch])).to(device)  # (B, 4, H, W)
        geo = torch.from_numpy(np.stack([b["geo"] for b in batch])).to(device)  # (B, 4, H, W)
        with torch.inference_mode():
            out = model(x, sample=False, geo=geo)
            pred = transform.inverse(out["l2_pred"].float())
            mean = out["mean"].float()
            if split == "val":
                cell_metrics.update(x, out["recon"].float(), l2, pred,
                                    torch.ones(len(batch), dtype=torch.bool, device=device))
            pooled_p = nan_pool(l2.double(), f, min_valid)
            pooled_t = nan_pool(transform.forward(l2).double(), f, min_valid)
        z = mean.shape[1]
        feats[split].append(mean.permute(0, 2, 3, 1).reshape(-1, z).cpu().numpy())
        targ_t[split].append(pooled_t.permute(0, 2, 3, 1).reshape(-1, 4).cpu().numpy())
        targ_p[split].append(pooled_p.permute(0, 2, 3, 1).reshape(-1, 4).cpu().numpy())
        pred_np, l2_np = pred.cpu().numpy(), l2.cpu().numpy()
        up = pred_np.repeat(f, -2).repeat(f, -1)
        if split == "val":
            sc["head_cell"].update(pooled_p.cpu().numpy(), pred_np)
            sc["head_pixel"].update(l2_np, up)
            if truth_reader is not None:
                tr = np.stack([truth_reader.tile(b["meta"]) for b in batch])
                sc["head_truth_pixel"].update(tr, up)
                trc = nan_pool(torch.from_numpy(tr), f, 0.0).numpy()
                sc["head_truth_cell"].update(trc, pred_np)
                sc["l2_truth_pixel"].update(tr, l2_np)
                if ridge:  # cell-mean features: a linear model's mean over the cell's pixels
                    cells["x"].append(np.concatenate([cell_features(b["l1"], b["geo"], f)
                                                      for b in batch]))
                    cells["truth"].append(trc.transpose(0, 2, 3, 1).reshape(-1, 4))
        if ridge:
            per_tile = max(1, math.ceil(max_pixels / max(1, n_tiles[split])))
            for b in batch:
                c, h, w = b["l1"].shape
                k = min(per_tile, h * w)
                idx = rng.choice(h * w, k, replace=False)
                spec = b["l1"].reshape(c, -1)[:, idx].T.astype(np.float32)
                geo = geometry_features(b["geo"].reshape(4, -1)[:, idx].T)
                pix[split]["x"].append(np.concatenate([spec, geo.astype(np.float32)], 1))
                pix[split]["y"].append(b["l2"].reshape(4, -1)[:, idx].T.astype(np.float64))

    t0 = time.perf_counter()
    for split in splits:
        bar = tqdm(total=n_tiles[split], desc=f"{split} tiles", unit="tile",
                   disable=not progress, file=sys.stderr)
        batch: list = []
        for s in iter_split(shards, split):
            if s["l1"].shape[0] != pre.cfg.model.in_channels:
                raise EvaluateError(f"{shards} sample {s['__key__']}: {s['l1'].shape[0]} "
                                    f"channels, the model expects {pre.cfg.model.in_channels}")
            batch.append(s)
            if len(batch) == batch_size:
                flush(split, batch)
                bar.update(len(batch))
                batch = []
        if batch:
            flush(split, batch)
            bar.update(len(batch))
        bar.close()
    t_pass = time.perf_counter() - t0
    for d in (feats, targ_t, targ_p):
        for s in list(d):
            d[s] = np.concatenate(d[s]) if d[s] else np.empty((0, 4))
    res = cell_metrics.compute()
    result: dict = {
        "model": pre.path, "step": pre.step, "shards": os.path.abspath(shards),
        "truth": os.path.abspath(truth) if truth else None,
        "supervised": any(w > 0 for w in pre.cfg.loss.l2_weights),
        "l2_weights": list(pre.cfg.loss.l2_weights),
        "tiles": n_tiles, "latent_factor": f, "units": UNITS,
        "recon_mae": res["recon_mae"], "recon_rmse": res["recon_rmse"],
        "head": {"cell": {p: {"n": int(res[f"l2/{p}_n"]), "rmse": res[f"l2/{p}_rmse"],
                              "bias": res[f"l2/{p}_bias"], "r2": res[f"l2/{p}_r2"]}
                          for p in L2_ORDER},
                 "pixel": sc["head_pixel"].result()},
        "seconds": {"forward_pass": t_pass},
    }
    plots = {"head vs L2 (cells)": sc["head_cell"]}
    if truth_reader is not None:
        result["head_vs_truth"] = {"cell": sc["head_truth_cell"].result(),
                                   "pixel": sc["head_truth_pixel"].result()}
        result["l2_vs_truth"] = {"pixel": sc["l2_truth_pixel"].result()}
        plots["head vs truth (pixels)"] = sc["head_truth_pixel"]
        plots["L2 vs truth (pixels)"] = sc["l2_truth_pixel"]
    if probes:
        t0 = time.perf_counter()
        result["probes"] = run_probes(feats, targ_t, targ_p, transform, mlp_epochs, seed,
                                      progress, max_cells)
        result["probes"]["protocol"] = (
            "latent means per cell -> pooled L2 in model space; fit on train cells where "
            "valid, scored on val cells; linear least squares; MLP 512-512 ReLU dropout 0.1, "
            f"Adam 1e-3, batch 256, {mlp_epochs} epochs; at most {max_cells} training cells")
        result["seconds"]["probes"] = time.perf_counter() - t0
    if ridge:
        t0 = time.perf_counter()
        for s in pix:
            pix[s] = {"x": np.concatenate(pix[s]["x"]), "y": np.concatenate(pix[s]["y"])}
        cell_data = ({k: np.concatenate(v) for k, v in cells.items()} if cells["x"] else None)
        result["ridge"], ridge_pairs = run_ridge(pix, transform, seed, cell_data)
        result["ridge"]["features"] = ("normalised spectrum (C) + cos SZA, cos VZA, "
                                       "1/cos SZA + 1/cos VZA; per pixel, at most "
                                       f"{max_pixels} pixels per split")
        result["seconds"]["ridge"] = time.perf_counter() - t0
        plots["ridge vs L2 (pixels)"] = ridge_pairs
    return result, plots


# ----------------------------------------------------------------------------- reports


def _g(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(r: dict) -> str:
    """The evaluation as markdown tables."""
    kind = "L2-supervised" if r["supervised"] else "unsupervised"
    lines = [f"# Evaluation: {r['model']} (step {r['step']}, {kind})", "",
             f"Shards {r['shards']}: {r['tiles']['train']} train / {r['tiles']['val']} val "
             f"tiles; latent cell = {r['latent_factor']} x {r['latent_factor']} pixels; "
             f"reconstruction MAE {_g(r['recon_mae'])} (normalised units).", "",
             "## Against the L2 (validation split, physical units)", "",
             "| product | method | level | n | RMSE | bias | R^2 |",
             "|---|---|---|---|---|---|---|"]
    for p in L2_ORDER:
        rows = [("head", "cell", r["head"]["cell"][p]), ("head", "pixel", r["head"]["pixel"][p])]
        if "ridge" in r:
            rows.append(("ridge (spectrum + geometry)", "pixel", r["ridge"][p]))
        if "probes" in r:
            for k in ("linear", "mlp"):
                q = r["probes"][k][p]
                rows.append((f"{k} probe", "cell", q | {"n": q["n_val"]}))
        for name, level, m in rows:
            lines.append(f"| {p} | {name} | {level} | {_g(m.get('n'))} | {_g(m.get('rmse'))} | "
                         f"{_g(m.get('bias'))} | {_g(m.get('r2'))} |")
    if "probes" in r:
        lines += ["", "## Probe protocol (R^2 on validation cells, model space)", "",
                  "| product | linear | MLP 512-512 |", "|---|---|---|"]
        for p in L2_ORDER:
            lines.append(f"| {p} | {_g(r['probes']['linear'][p]['r2_model_space'])} | "
                         f"{_g(r['probes']['mlp'][p]['r2_model_space'])} |")
    if "l2_vs_truth" in r:
        lines += ["", "## Against the synthetic truth (validation split, per pixel unless "
                      "marked)", "",
                  "| product | method | level | n | RMSE | bias | R^2 |",
                  "|---|---|---|---|---|---|---|"]
        for p in L2_ORDER:
            rows = [("head", "cell", r["head_vs_truth"]["cell"][p]),
                    ("head", "pixel", r["head_vs_truth"]["pixel"][p]),
                    ("operational L2", "pixel", r["l2_vs_truth"]["pixel"][p])]
            if "truth_cell" in r.get("ridge", {}).get(p, {}):
                rows.append(("ridge (spectrum + geometry)", "cell", r["ridge"][p]["truth_cell"]))
            for name, level, m in rows:
                lines.append(f"| {p} | {name} | {level} | {_g(m['n'])} | {_g(m['rmse'])} | "
                             f"{_g(m['bias'])} | {_g(m['r2'])} |")
    lines += ["", "Units: " + ", ".join(f"{p} {u}" for p, u in UNITS.items()), ""]
    return "\n".join(lines)


def scatter_plots(out_dir: str, plots: dict) -> list[str]:
    """One PNG per product: density (hexbin) of prediction vs reference per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for i, p in enumerate(L2_ORDER):
        panels = []
        for name, src in plots.items():
            pairs = src.sample(i) if isinstance(src, Scores) else src.get(p, np.empty((0, 2)))
            panels.append((name, pairs))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
        for ax, (name, pairs) in zip(axes[0], panels):
            ax.set_title(f"{p}: {name}", fontsize=9)
            ax.set_xlabel(f"reference ({UNITS[p]})", fontsize=8)
            ax.set_ylabel(f"prediction ({UNITS[p]})", fontsize=8)
            if len(pairs) < 2:
                ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
                continue
            lo, hi = np.percentile(pairs, [0.5, 99.5])
            ax.hexbin(pairs[:, 0], pairs[:, 1], gridsize=40, bins="log", mincnt=1,
                      extent=(lo, hi, lo, hi), cmap="viridis")
            ax.plot([lo, hi], [lo, hi], "r--", lw=0.8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"scatter_{p}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def parse_args(argv=None):
    p = argument_parser("python -m train.evaluate", __doc__)
    p.add_argument("model", help="model folder written by python -m train.export, or a run "
                                 "or checkpoint folder (exported on the fly)")
    p.add_argument("shards", help="shard folder (data_prep.make_shards) normalised with the "
                                  "model's stats")
    p.add_argument("--truth", default=None,
                   help="folder of TEMPO_TRUTH_<granule>.nc files (data_prep.synthesize)")
    p.add_argument("--out", default="evaluation", help="folder for the JSON, table and plots")
    p.add_argument("--batch-size", type=int, default=32, help="tiles per forward pass")
    p.add_argument("--max-pixels", type=int, default=50000,
                   help="pixels per split for the ridge baseline (uniform per tile)")
    p.add_argument("--mlp-epochs", type=int, default=100, help="MLP probe epochs")
    p.add_argument("--max-cells", type=int, default=200000,
                   help="training cells the probes are fit on (a seeded uniform draw; 0: all)")
    p.add_argument("--no-probes", action="store_true", help="skip the probe protocol")
    p.add_argument("--no-ridge", action="store_true", help="skip the ridge baseline")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="seed of subsampling and probes")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(quiet=getattr(args, "quiet", False))
    from data_prep.util import atomic_write_bytes, atomic_write_json
    from train.export import ExportError

    try:
        result, plots = evaluate(args.model, args.shards, args.truth, args.batch_size,
                                 args.max_pixels, not args.no_probes, not args.no_ridge,
                                 args.mlp_epochs, args.seed, args.device, not args.quiet,
                                 args.max_cells)
    except (EvaluateError, ExportError) as e:
        log.error(str(e))
        return 2
    os.makedirs(args.out, exist_ok=True)
    md = markdown(result)
    result["plots"] = scatter_plots(args.out, plots)
    atomic_write_json(os.path.join(args.out, "evaluation.json"), result)
    atomic_write_bytes(os.path.join(args.out, "evaluation.md"), md.encode())
    print(md)
    log.info(f"written: {args.out}/evaluation.json, evaluation.md, scatter_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

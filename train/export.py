"""Export a training checkpoint as a self-contained model folder, and load one back.

    python -m train.export runs/demo runs/demo/model            # the run's latest checkpoint
    python -m train.export runs/demo/checkpoints/step_00000300 runs/demo/model

The folder (written under a temporary name, renamed when complete):

    model.safetensors   fp32 weights of the whole module (VAE + L2 head + log-variance)
    config.yaml         the run configuration (its ``model`` and ``loss`` sections build the
                        module)
    stats.json          the shards' statistics: radiance normalisation (per-channel mean
                        and std of log(max(radiance, 1))) and the L2 statistics that define
                        the L2 transforms
    export.json         format, source checkpoint and step, the L2 transform parameters,
                        the tile and read options the shards were cut with, the
                        validation metrics at that step, and the size and SHA-256 of
                        model.safetensors
    README.md           a short model card

Checkpoints of every training set-up are read: DeepSpeed ZeRO 1/2/3 (consolidated to
fp32 with DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``), DDP and one
process (Accelerate's ``model.safetensors``). Loading (``load_pretrained``) needs neither
DeepSpeed nor the run folder.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import sys

import numpy as np

from data_prep.logs import get_logger, setup_logging
from data_prep.util import argument_parser

log = get_logger(__name__)

FORMAT = "tempo-vae-model/1"
WEIGHTS = "model.safetensors"
FILES = (WEIGHTS, "config.yaml", "stats.json", "export.json", "README.md")


class ExportError(Exception):
    """A checkpoint or model folder that cannot be used; the message names the file."""


# ----------------------------------------------------------------------------- reading


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder from a run folder (its ``checkpoints/latest``), a
    ``checkpoints`` folder, or a checkpoint folder itself."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, "trainer_state.json")):
        return path
    for ck in (os.path.join(path, "checkpoints"), path):
        latest = os.path.join(ck, "latest")
        if os.path.exists(latest):
            name = open(latest).read().strip()
            found = os.path.join(ck, name)
            if os.path.exists(os.path.join(found, "trainer_state.json")):
                return found
            raise ExportError(f"{latest} names {name}, which is not a complete checkpoint")
    raise ExportError(f"{path} is neither a checkpoint folder (no trainer_state.json) nor a run "
                      "folder with checkpoints/latest")


def _strip_prefixes(state: dict) -> dict:
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def checkpoint_state_dict(ckpt: str) -> tuple[dict, str]:
    """fp32 state dict of the model in a checkpoint folder, and the kind of checkpoint."""
    import torch

    ds_dir = os.path.join(ckpt, "pytorch_model")
    if os.path.isdir(ds_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="pytorch_model")
        except (FileNotFoundError, ValueError, RuntimeError, KeyError, EOFError) as e:
            raise ExportError(f"{ds_dir}: cannot consolidate the DeepSpeed checkpoint "
                              f"({type(e).__name__}: {e})") from None
        kind = "deepspeed"
    elif os.path.exists(os.path.join(ckpt, "model.safetensors")):
        from safetensors.torch import load_file

        try:
            state = load_file(os.path.join(ckpt, "model.safetensors"))
        except Exception as e:  # safetensors raises its own error type for damaged files
            raise ExportError(f"{ckpt}/model.safetensors: unreadable ({e})") from None
        kind = "accelerate"
    elif os.path.exists(os.path.join(ckpt, "pytorch_model.bin")):
        state = torch.load(os.path.join(ckpt, "pytorch_model.bin"), map_location="cpu",
                           weights_only=True)
        kind = "accelerate"
    else:
        raise ExportError(f"{ckpt}: no model weights (pytorch_model/ from DeepSpeed or "
                          "model.safetensors from Accelerate)")
    state = _strip_prefixes(state)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}, kind


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(info: dict, cfg) -> str:
    from data_prep.shard_format import L2_ORDER

    val = info.get("validation", {})
    units = info["l2_units"]
    lines = [
        f"# tempo-vae model (step {info['step']})", "",
        f"Convolutional VAE on TEMPO {info['read']['band']} radiance "
        f"({cfg.model.in_channels} channels) with an L2 head predicting "
        f"{', '.join(L2_ORDER)} on the latent grid "
        f"({cfg.model.latent_channels} channels, 1/{info['latent_factor']} of the tile size).",
        "",
        f"- Parameters: {info['parameters']:,}",
        f"- Trained: {info['step']} optimizer steps, {info.get('samples_seen', '?')} tiles seen, "
        f"{info['world_size']} rank(s), checkpoint kind: {info['checkpoint_kind']}",
        f"- L2 supervision weights (NO2, O3TOT, HCHO, CLDO4): {list(cfg.loss.l2_weights)}",
        f"- Data: shards {info['shards']} ({info['train_tiles']} training tiles from "
        f"{len(info['train_granules'])} granules), tiles {info['tile']['size']} x "
        f"{info['tile']['size']}",
        f"- Exported from {info['source_checkpoint']} on {info['exported']}", "",
        "## Last validation before this checkpoint (physical units, per latent cell)", "",
        "| product | n | RMSE | bias | R^2 | units |", "|---|---|---|---|---|---|",
    ]
    for p in L2_ORDER:
        lines.append(f"| {p} | {_fmt(val.get(f'l2/{p}_n', float('nan')))} | "
                     f"{_fmt(val.get(f'l2/{p}_rmse', float('nan')))} | "
                     f"{_fmt(val.get(f'l2/{p}_bias', float('nan')))} | "
                     f"{_fmt(val.get(f'l2/{p}_r2', float('nan')))} | {units[p]} |")
    lines += ["", f"Reconstruction MAE (normalised units): "
                  f"{_fmt(val.get('recon_mae', float('nan')))}", "",
              "## Use", "", "In Python:", "",
              "    from train.model import load_pretrained",
              "    model = load_pretrained('THIS_FOLDER')   # eval mode, fp32, CPU", "",
              "L2 maps for RAD granules, from the shell:", "",
              "    python -m train.predict THIS_FOLDER RAD_FILES... OUT_DIR", ""]
    return "\n".join(lines)


def export(source: str, out_dir: str, shards: str | None = None, overwrite: bool = False) -> str:
    """Write the model folder ``out_dir`` from a run or checkpoint folder. Returns out_dir.

    Raises ExportError (missing or unreadable checkpoint, stats or manifest; weights that do
    not fit the config; an existing ``out_dir`` without ``overwrite``)."""
    from safetensors.torch import save_file

    from data_prep.util import atomic_write_json, default_file_mode, read_json
    from train.config import ConfigError, dump, load_config
    from train.model import build_model, count_parameters
    from train.transforms import L2Transform

    ckpt = resolve_checkpoint(source)
    try:
        cfg = load_config(os.path.join(ckpt, "config.yaml"))
    except ConfigError as e:
        raise ExportError(f"{ckpt}/config.yaml: {e}") from None
    state_json = read_json(os.path.join(ckpt, "trainer_state.json"))
    shards = os.path.abspath(shards or cfg.data.shards)
    stats_path = os.path.join(shards, "stats.json")
    if not os.path.exists(stats_path):
        raise ExportError(f"{stats_path} not found: the normalisation stats of the training "
                          "shards are needed; pass --shards FOLDER")
    stats = read_json(stats_path)
    n_ch = len(stats["l1"]["mean"])
    if n_ch != cfg.model.in_channels:
        raise ExportError(f"{stats_path} has {n_ch} channels but the checkpoint's model has "
                          f"model.in_channels={cfg.model.in_channels}: not the shards it "
                          "was trained on")
    man_path = os.path.join(shards, "manifest.json")
    manifest = read_json(man_path) if os.path.exists(man_path) else {}
    options = manifest.get("options", {})
    tile = options.get("tile", {"size": cfg.model.tile_size, "stride": cfg.model.tile_size,
                                "min_valid_fraction": 0.95, "max_bad_channel_fraction": 0.05})
    if tile["size"] != cfg.model.tile_size:
        raise ExportError(f"{man_path}: tiles of {tile['size']} pixels but model.tile_size="
                          f"{cfg.model.tile_size}")
    from data_prep.granule import ReadOptions

    read = options.get("read", dataclasses.asdict(ReadOptions()))

    state, kind = checkpoint_state_dict(ckpt)
    model = build_model(cfg.model, cfg.loss)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{ckpt}: weights do not fit the checkpoint's config ({e})") from None

    if os.path.exists(out_dir):
        if not overwrite:
            raise ExportError(f"{out_dir} exists; choose a new folder or pass --overwrite")
        if os.path.isdir(out_dir) and not os.path.exists(os.path.join(out_dir, "export.json")) \
                and os.listdir(out_dir):
            raise ExportError(f"{out_dir} is not a model folder of ours; refusing to replace it")
    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        weights = os.path.join(tmp, WEIGHTS)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights,
                  metadata={"format": FORMAT, "step": str(state_json["step"])})
        os.chmod(weights, default_file_mode())  # readable like the other files
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(dump(cfg))
        atomic_write_json(os.path.join(tmp, "stats.json"), stats)
        transform = L2Transform(stats["l2"], cfg.data.l2_transform)
        sizes = read_json(os.path.join(shards, "sizes.json")) \
            if os.path.exists(os.path.join(shards, "sizes.json")) else {}
        info = {
            "format": FORMAT,
            "step": int(state_json["step"]),
            "samples_seen": int(state_json.get("samples_seen", 0)),
            "world_size": int(state_json.get("world_size", 1)),
            "checkpoint_kind": kind,
            "source_checkpoint": ckpt,
            "shards": shards,
            "train_tiles": sum(int(v) for k, v in sizes.items() if k.startswith("train/")),
            "train_granules": manifest.get("splits", {}).get("train", stats.get("granules", [])),
            "exported": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "parameters": count_parameters(model),
            "latent_factor": 2 ** (len(cfg.model.channels) - 1),
            "l2_order": ["NO2", "O3TOT", "HCHO", "CLDO4"],
            "l2_units": {"NO2": "molecules/cm^2", "O3TOT": "DU", "HCHO": "molecules/cm^2",
                         "CLDO4": "1"},
            "l2_transform": transform.params(),
            "l1_transform": stats["l1"].get("transform", ""),
            "tile": tile,
            "read": read,
            "validation": state_json.get("last_val", {}),
            "weights_bytes": os.path.getsize(weights),
            "weights_sha256": _sha256(weights),
        }
        atomic_write_json(os.path.join(tmp, "export.json"), info)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(info, cfg))
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass
class PretrainedInfo:
    """What inference needs besides the weights (attached to the model as ``.pretrained``).

    l1_mean, l1_std: (C,) float32, of log(max(radiance, 1)); wavelength: (C,) nm;
    transform: the L2 transforms (``inverse`` maps head outputs to physical units);
    tile / read: the options the training shards were cut and read with; info: export.json.
    """

    path: str
    cfg: object
    l1_mean: np.ndarray
    l1_std: np.ndarray
    wavelength: np.ndarray
    transform: object
    tile: dict
    read: dict
    info: dict
    stats: dict

    @property
    def step(self) -> int:
        return int(self.info["step"])

    @property
    def latent_factor(self) -> int:
        return int(self.info["latent_factor"])


def read_model_folder(path: str, verify: bool = True) -> tuple[PretrainedInfo, dict]:
    """(info, fp32 state dict) of an exported model folder.

    Raises ExportError naming the file: a missing file, weights whose size or SHA-256
    differ from export.json (truncated or replaced), normalisation stats whose channel
    count differs from the model's, an unknown format."""
    from safetensors.torch import load_file

    from data_prep.util import read_json
    from train.config import ConfigError, load_config
    from train.transforms import L2Transform

    for name in FILES:
        if not os.path.exists(os.path.join(path, name)):
            raise ExportError(f"{os.path.join(path, name)} is missing: {path} is not a complete "
                              "model folder (make one with python -m train.export)")
    try:
        info = read_json(os.path.join(path, "export.json"))
        stats = read_json(os.path.join(path, "stats.json"))
    except ValueError as e:
        raise ExportError(f"{path}: export.json or stats.json is not valid JSON ({e})") from None
    if info.get("format") != FORMAT:
        raise ExportError(f"{path}/export.json: format {info.get('format')!r}, expected {FORMAT}")
    weights = os.path.join(path, WEIGHTS)
    size = os.path.getsize(weights)
    if size != info["weights_bytes"]:
        raise ExportError(f"{weights}: {size} bytes but export.json says {info['weights_bytes']}"
                          " (truncated or replaced)")
    if verify and _sha256(weights) != info["weights_sha256"]:
        raise ExportError(f"{weights}: SHA-256 differs from export.json (corrupt or replaced)")
    try:
        cfg = load_config(os.path.join(path, "config.yaml"))
    except ConfigError as e:
        raise ExportError(f"{path}/config.yaml: {e}") from None
    mean = np.asarray(stats["l1"]["mean"], np.float32)
    std = np.asarray(stats["l1"]["std"], np.float32)
    if mean.shape != (cfg.model.in_channels,) or std.shape != mean.shape:
        raise ExportError(f"{path}/stats.json: normalisation for {mean.shape[0]} channels (std "
                          f"{std.shape[0]}) but the model has model.in_channels="
                          f"{cfg.model.in_channels}")
    if not (np.all(np.isfinite(mean)) and np.all(std > 0)):
        raise ExportError(f"{path}/stats.json: non-finite mean or non-positive std")
    try:
        state = load_file(weights)
    except Exception as e:  # safetensors' own error type
        raise ExportError(f"{weights}: unreadable ({e})") from None
    wl = np.asarray(stats["l1"].get("wavelength_nm", np.full(mean.shape, np.nan)), np.float32)
    pre = PretrainedInfo(os.path.abspath(path), cfg, mean, std, wl,
                         L2Transform(stats["l2"], cfg.data.l2_transform),
                         info["tile"], info["read"], info, stats)
    return pre, state


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argument_parser("python -m train.export", __doc__)
    p.add_argument("source", help="run folder (uses checkpoints/latest) or checkpoint folder")
    p.add_argument("out_dir", help="model folder to write")
    p.add_argument("--shards", default=None,
                   help="shard folder the model was trained on (default: data.shards of the "
                        "checkpoint's config)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(quiet=getattr(args, "quiet", False))
    from train.runtime import setup_cpu_deepspeed

    setup_cpu_deepspeed()
    try:
        out = export(args.source, args.out_dir, args.shards, args.overwrite)
    except ExportError as e:
        log.error(str(e))
        return 2
    info = json.load(open(os.path.join(out, "export.json")))
    log.info(f"exported step {info['step']} ({info['checkpoint_kind']} checkpoint, "
             f"{info['parameters']:,} parameters) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Typed, strict run configuration: nested dataclasses, YAML, dotted overrides.

    cfg = load_config("configs/training/demo.yaml", ["optim.lr=3e-4", "train.steps=50"])

Unknown keys and values of the wrong type raise ``ConfigError`` naming the key. Every
field carries its documentation (``python train/main.py --help-config`` prints it).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


def doc_field(default: Any, doc: str):
    """A config field with documentation; lists get a fresh copy per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class DataConfig:
    shards: str = doc_field("data/shards",
        "shards made by data_prep.make_shards (sizes.json, stats.json, header.json, "
        "manifest.json, train/, val/): a local folder, a URL prefix (https://, s3://, gs://), "
        "'pipe:CMD {}' ({} = path in the folder), or a brace-expanded shard list "
        "(.../train/x-{0000..0031}.tar; lists join with '::')")
    batch_size: int = doc_field(8, "tiles per micro-batch per rank")
    num_workers: int = doc_field(2,
        "DataLoader worker processes per rank (0: read in the main process)")
    mode: str = doc_field("epoch",
        "'epoch': each training sample once per epoch; 'resampled': shards drawn with replacement, "
        "endless")
    samples_per_epoch: int = doc_field(0,
        "resampled mode: nominal epoch length in samples (0: the number of training samples)")
    shuffle_buffer: int = doc_field(64, "samples held in each worker's shuffle buffer")
    shuffle_initial: int = doc_field(32, "samples buffered before the first one is emitted")
    l2_transform: str = doc_field("research",
        "L2 targets' model space (train/transforms.py): 'research' (NO2/HCHO asinh, as the "
        "research code) or 'linear' (NO2/HCHO centred on the median, scaled by 1.4826 MAD: "
        "the head's squared error then estimates the truth's mean under zero-mean L2 noise)")
    augment: bool = doc_field(True, "random flips / 90-degree rotations of training tiles")
    seed: int = doc_field(0, "seed of shard order, shuffle buffers and augmentation")
    pin_memory: bool = doc_field(False, "pin batch memory (GPU runs)")
    prefetch_factor: int = doc_field(2, "batches prefetched per worker")
    shard_retries: int = doc_field(3,
        "remote shards: reopen a stream that failed part-way this many times (samples already read "
        "are skipped), then fail naming it")
    on_error: str = doc_field("raise",
        "bad sample or shard: 'raise' stops naming shard and key; 'skip' goes on and counts it per "
        "reason")


@dataclass
class ModelConfig:
    in_channels: int = doc_field(1028, "spectral channels of the input tiles")
    channels: list[int] = doc_field([512, 256, 128],
        "encoder widths per level, from the input resolution down; the spatial size halves between "
        "levels (decoder mirrors it)")
    num_res_blocks: int = doc_field(1, "ResNet blocks per level")
    attn_resolutions: list[int] = doc_field([],
        "spatial sizes at which encoder/decoder levels get self-attention (the research model: "
        "none)")
    mid_attention: bool = doc_field(True, "self-attention in the middle block")
    attn_heads: int = doc_field(4, "attention heads")
    norm_groups: int = doc_field(8, "GroupNorm groups")
    norm_eps: float = doc_field(1e-6, "GroupNorm epsilon")
    activation: str = doc_field("gelu", "gelu | silu | relu")
    latent_channels: int = doc_field(32, "latent channels")
    double_z: bool = doc_field(True,
        "encoder predicts mean and log-variance (a VAE); false: plain AE")
    logvar_min: float = doc_field(-30.0, "posterior log-variance clamp, low")
    logvar_max: float = doc_field(20.0, "posterior log-variance clamp, high")
    head_hidden: list[int] = doc_field([512, 512], "L2 head hidden widths (1x1 convolutions)")
    head_outputs: int = doc_field(4, "L2 products predicted (NO2, O3TOT, HCHO, CLDO4)")
    tile_size: int = doc_field(64, "input tile height/width (for FLOP counting and checks)")
    spectral_input: str = doc_field("zscore",
        "encoder input: 'zscore' (the normalised radiance, the research model) or 'highpass' (per "
        "pixel, the log radiance's residual from a polynomial in wavelength plus the polynomial's "
        "coefficients; see train/model.py)")
    highpass_degree: int = doc_field(5, "polynomial degree of spectral_input='highpass'")
    geometry: str = doc_field("none",
        "viewing geometry from the samples' geo member (cos SZA, cos VZA, 2/geometric air-mass "
        "factor): 'encoder' (extra input channels), 'head' (appended to the head's input per "
        "latent cell), 'both', or 'none' (the research model)")
    slant_columns: str = doc_field("none",
        "per-pixel DOAS slant columns of NO2, O3, HCHO and O2-O2 in the NO2, HCHO and O3TOT "
        "retrieval windows (12 features, a fixed least-squares map of the log radiance; see "
        "train/model.py): 'encoder', 'head', 'both', or 'none' (the research model)")
    xsec_dir: str | None = doc_field(None,
        "folder of laboratory cross-section files for model.slant_columns (the format of "
        "../shared/reference_data, read by data_prep.physics.Spectra.from_dir), or 'analytic' "
        "for the built-in shapes synthesize uses without --xsec-dir; read once at the start of "
        "training, exported models carry the map")
    slit_fwhm_nm: float = doc_field(0.6,
        "instrument slit FWHM (nm) the cross-sections are convolved with for "
        "model.slant_columns (TEMPO: 0.6 nm, Zoogman et al. 2017, JQSRT 186, 17-39; synthesize's "
        "--slit-fwhm default)")


@dataclass
class LossConfig:
    recon: str = doc_field("abs",
        "reconstruction error per element: 'abs' (|x - x_hat|, logged as recon_mae; the "
        "research code's L1 loss) or 'squared' ((x - x_hat)^2, logged as recon_mse)")
    recon_reduction: str = doc_field("sum",
        "'sum': the VAE terms summed over a tile's C x H x W elements (the research objective); "
        "'mean': divided by C x H x W, a per-element likelihood on the scale of the L2 terms (see "
        "train/losses.py)")
    logvar_init: float = doc_field(6.0,
        "initial learned log-variance of the reconstruction (0 fixes nothing; see learn_logvar)")
    learn_logvar: bool = doc_field(True, "learn the scalar reconstruction log-variance")
    kl_weight: float = doc_field(1e-6, "weight of the KL term")
    l2_weights: list[float] = doc_field([0.1, 0.1, 0.1, 0.1],
        "weight per product (NO2, O3TOT, HCHO, CLDO4); all 0: unsupervised")
    l2_share: float = doc_field(0.0,
        "0: the L2 terms weigh l2_weights as they are. In (0, 1): all L2 terms are also multiplied "
        "by one factor, re-set every l2_share_every steps, that makes the supervision this share "
        "of the gradient entering the encoder (norm of the L2 part / sum of the norms of the VAE "
        "and L2 parts, at the encoder output); l2_weights then only set the products' relative "
        "weights. Under DeepSpeed the norms come from a second forward at the posterior mean; "
        "not under ZeRO-3")
    l2_share_every: int = doc_field(10,
        "steps between re-settings of the L2 factor (loss.l2_share)")
    l2_min_valid_fraction: float = doc_field(0.5,
        "a latent cell gets a target if at least this fraction of its pixels is valid")


@dataclass
class OptimConfig:
    lr: float = doc_field(1e-4, "peak learning rate")
    betas: list[float] = doc_field([0.9, 0.95], "AdamW betas")
    weight_decay: float = doc_field(0.05, "AdamW weight decay")
    eps: float = doc_field(1e-8, "AdamW epsilon")
    warmup_steps: int = doc_field(0, "linear warmup steps")
    min_lr_ratio: float = doc_field(0.1, "cosine decay floor as a fraction of lr")
    schedule: str = doc_field("cosine", "cosine | constant")
    grad_clip: float = doc_field(1.0,
        "gradient norm clip (0: off); under DeepSpeed its gradient_clipping")
    clip_logvar: bool = doc_field(False,
        "include the scalar reconstruction log-variance in the clipped gradient norm. false: it is "
        "left out (with 'sum' reduction its gradient, one term per tile element, would otherwise "
        "be nearly all of the norm and shrink every update); Adam normalises its step on its own. "
        "DeepSpeed clips every parameter together whatever this says")
    grad_accum: int = doc_field(1, "micro-batches per optimizer step")


@dataclass
class TrainConfig:
    output_dir: str = doc_field("runs/default", "run folder: checkpoints, TensorBoard logs, config")
    steps: int = doc_field(1000, "optimizer steps to train")
    seed: int = doc_field(0, "seed of model initialisation and posterior sampling")
    log_every: int = doc_field(10, "steps between log lines / scalars")
    val_every: int = doc_field(200, "steps between validations (0: only at the end)")
    val_batches: int = doc_field(0,
        "validation batches per rank (0: the whole validation split, each tile once whatever the "
        "number of ranks; > 0: the tiles validated depend on the number of ranks)")
    ckpt_every: int = doc_field(500, "steps between checkpoints (0: only at the end)")
    keep_last: int = doc_field(3, "checkpoints kept")
    resume: str = doc_field("", "'' (fresh), 'latest', or a checkpoint folder")
    image_every: int = doc_field(0, "steps between TensorBoard images (0: at validation)")
    peak_tflops: float = doc_field(0.0,
        "device bf16 peak TFLOP/s for MFU (0: from the device name)")
    on_nonfinite: str = doc_field("raise",
        "non-finite loss/grad: 'raise' (stop, naming the term and keys) or 'skip' (skip the step, "
        "counted)")
    max_skipped_in_a_row: int = doc_field(20,
        "with on_nonfinite=skip: stop after this many consecutive skipped steps (the run has "
        "diverged)")
    collective_timeout_s: int = doc_field(1800,
        "a rank that stops answering (hung I/O, a lost node) fails the job after this many seconds")
    progress: bool = doc_field(True, "progress bar on the main process")
    grad_shares: bool = doc_field(True,
        "at log steps, log each loss term's share of the gradient entering the encoder "
        "(grad_share/<term>; one extra backward through decoder and head per term, under "
        "DeepSpeed also one extra forward at the posterior mean; not under ZeRO-3)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- loading


def _check(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errs = []
        for t in typing.get_args(tp):
            try:
                return _check(value, t, key)
            except ConfigError as e:
                errs.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (inner,) = typing.get_args(tp)
        return [_check(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown key {prefix + '.' if prefix else ''}{unknown[0]} "
                          f"(in {where}; known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _check(value, tp, key)
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    cur[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse {raw!r} ({e})") from None
    return key.strip(), value


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    data: dict = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    for o in overrides:
        key, value = parse_override(o)
        _set_dotted(data, key, value)
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    def need(cond, key, msg):
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    need(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    need(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(cfg.data.mode in ("epoch", "resampled"), "data.mode", "must be 'epoch' or 'resampled'")
    need(cfg.data.on_error in ("raise", "skip"), "data.on_error", "must be 'raise' or 'skip'")
    need(cfg.model.activation in ("gelu", "silu", "relu"), "model.activation",
         "must be gelu, silu or relu")
    need(len(cfg.model.channels) >= 1, "model.channels", "needs at least one level")
    for i, w in enumerate(cfg.model.channels):
        need(w >= 1 and w % cfg.model.norm_groups == 0, "model.channels",
             f"level {i} width {w} is not divisible by model.norm_groups={cfg.model.norm_groups}")
    need(cfg.model.tile_size % 2 ** (len(cfg.model.channels) - 1) == 0, "model.tile_size",
         f"must be divisible by 2^(levels-1) = {2 ** (len(cfg.model.channels) - 1)}")
    need(cfg.data.l2_transform in ("research", "linear"), "data.l2_transform",
         "must be research or linear")
    need(cfg.model.spectral_input in ("zscore", "highpass"), "model.spectral_input",
         "must be zscore or highpass")
    need(0 <= cfg.model.highpass_degree <= 12, "model.highpass_degree", "must be in 0..12")
    need(cfg.model.geometry in ("none", "encoder", "head", "both"), "model.geometry",
         "must be none, encoder, head or both")
    need(cfg.model.slant_columns in ("none", "encoder", "head", "both"), "model.slant_columns",
         "must be none, encoder, head or both")
    need(cfg.model.slant_columns == "none" or bool(cfg.model.xsec_dir), "model.xsec_dir",
         f"model.slant_columns={cfg.model.slant_columns} needs a folder of cross-section files "
         "(e.g. ../shared/reference_data) or 'analytic'")
    need(cfg.model.slit_fwhm_nm > 0, "model.slit_fwhm_nm", "must be > 0")
    renamed = {"l1": "abs", "l2": "squared"}  # L1/L2 name TEMPO processing levels here
    need(cfg.loss.recon not in renamed, "loss.recon",
         f"{cfg.loss.recon!r} is now called {renamed.get(cfg.loss.recon)!r}")
    need(cfg.loss.recon in ("abs", "squared"), "loss.recon", "must be abs or squared")
    need(cfg.loss.recon_reduction in ("sum", "mean"), "loss.recon_reduction",
         "must be sum or mean")
    need(0.0 <= cfg.loss.l2_share < 1.0, "loss.l2_share", "must be in [0, 1)")
    need(cfg.loss.l2_share_every >= 1, "loss.l2_share_every", "must be >= 1")
    need(len(cfg.loss.l2_weights) == cfg.model.head_outputs, "loss.l2_weights",
         f"needs {cfg.model.head_outputs} entries (one per product)")
    need(len(cfg.optim.betas) == 2, "optim.betas", "needs two numbers")
    need(cfg.optim.schedule in ("cosine", "constant"), "optim.schedule", "cosine or constant")
    need(cfg.optim.grad_accum >= 1, "optim.grad_accum", "must be >= 1")
    need(cfg.train.steps >= 1, "train.steps", "must be >= 1")
    need(cfg.train.on_nonfinite in ("raise", "skip"), "train.on_nonfinite", "raise or skip")
    need(cfg.train.max_skipped_in_a_row >= 1, "train.max_skipped_in_a_row", "must be >= 1")
    need(cfg.train.collective_timeout_s >= 1, "train.collective_timeout_s", "must be >= 1")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls=Config, prefix: str = "") -> str:
    """Every key with its type, default and documentation."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"[{key}]")
            lines.append(describe(tp, key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {key} = {default!r}  ({getattr(tp, '__name__', str(tp))}) "
                         f"{f.metadata.get('doc', '')}")
    return "\n".join(lines)

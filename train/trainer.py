"""The training loop: Accelerate (+ DeepSpeed ZeRO 1/2/3 or DDP or one process), bf16,
gradient accumulation and clipping, warmup + cosine, validation in physical units,
TensorBoard, atomic rotating checkpoints, exact and elastic resume, graceful preemption.

One optimizer step optimises the same objective whatever the number of ranks N and the
accumulation A: the step's A micro-batches are read first on every rank, their real
samples (not padding) and L2 latent cells with a target are summed over all ranks in one
all-reduce, and every term of every micro-batch is normalised by those step totals
(``train.losses``). The averaging over ranks and accumulation steps that DDP, DeepSpeed
and Accelerate apply is undone by a factor N x A on each micro-batch loss, so the update
is the gradient of the step's objective. The schedule is stepped once per optimizer step
(``train.optim``), and a stop request is honoured only between optimizer steps.

Pieces: ``train.checkpoint`` (storage), ``train.optim`` (optimizer, schedule),
``train.telemetry`` (TensorBoard), ``train.errors`` (failures and exit codes).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
import signal
import sys
import time

import torch
import yaml

from data_prep.logs import get_logger
from data_prep.shard_format import L2_ORDER
from data_prep.util import atomic_write_bytes, atomic_write_json
from train.checkpoint import CheckpointManager
from train.config import Config, ConfigError, dump, to_dict
from train.data import ERROR_REASONS, build_loader
from train.errors import EXIT_CHECKPOINT, EXIT_NONFINITE, CheckpointError, NonFiniteError
from train.losses import NOT_ADDITIVE, StepCounts, build_loss, encoder_gradient_shares
from train.metrics import ValMetrics
from train.model import build_model, count_parameters, slant_column_operator_for
from train.optim import build_optimizer, lr_lambda
from train.runtime import install_stop_handlers, stop_signal
from train.telemetry import NullSink, TensorBoardSink

log = get_logger(__name__)

__all__ = ["Trainer", "StepResult", "NonFiniteError", "CheckpointError", "EXIT_NONFINITE",
           "EXIT_CHECKPOINT", "lr_lambda", "make_accelerator", "format_summary"]

# dense bf16 peak TFLOP/s by device name fragment (vendor datasheets)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
# step values that are the same on every rank (not shares of a sum over ranks)
SAME_ON_ALL_RANKS = (*NOT_ADDITIVE, "grad_norm")


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    timeout = datetime.timedelta(seconds=cfg.train.collective_timeout_s)
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # without gloo every CPU rank believes it is alone
        handler = InitProcessGroupKwargs(backend="gloo", timeout=timeout)
    else:
        handler = InitProcessGroupKwargs(timeout=timeout)
    return Accelerator(gradient_accumulation_steps=cfg.optim.grad_accum,
                       kwargs_handlers=[handler])


def train_flops_per_sample(model_cfg) -> float:
    """Forward + backward FLOPs of one tile, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        m = build_model(model_cfg)
        x = torch.empty(1, model_cfg.in_channels, model_cfg.tile_size, model_cfg.tile_size)
        geo = torch.zeros(1, 4, model_cfg.tile_size, model_cfg.tile_size)
    counter = FlopCounterMode(display=False)
    with counter:
        out = m(x, sample=False, geo=geo)
        (out["recon"].sum() + out["l2_pred"].sum()).backward()
    return float(counter.get_total_flops())


def latent_size(model_cfg) -> int:
    """Side of the latent grid: the tile halves between encoder levels."""
    return model_cfg.tile_size // 2 ** (len(model_cfg.channels) - 1)


@dataclasses.dataclass
class StepResult:
    """One optimizer step. ``terms``: this rank's shares of the step's loss terms (detached
    tensors; their sum over ranks is the step's value, except SAME_ON_ALL_RANKS);
    ``counts``: real samples and L2 cells with a target of the step, all ranks; ``lr``: the
    learning rate the step used; ``skipped``: dropped as non-finite; ``stop``: a rank
    received a stop signal (every rank agrees)."""
    terms: dict
    counts: StepCounts
    lr: float
    skipped: bool = False
    stop: bool = False


def _launcher_source(key: str) -> str | None:
    """Where Accelerate took a DeepSpeed value from, when not from the JSON: the
    `accelerate launch` option or the accelerate config file, passed as an environment
    variable."""
    env = {"gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
           "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING"}.get(key)
    if env and os.environ.get(env, "auto") != "auto":
        opt = "--" + key
        return (f"`accelerate launch {opt} {os.environ[env]}` (or {key} in the accelerate "
                f"config file; it reaches the ranks as {env}) sets it; drop that option")
    return None


class Trainer:
    """Wires the run together. Seams for tests: ``accelerator``, ``build_model_fn``
    (``(model_cfg, loss_cfg) -> module``), ``loss_fn``, ``stop_fn`` (returns a signal
    number or None) and ``checkpoint_io`` (keyword arguments of CheckpointManager, e.g.
    ``disk_usage``, ``save_file``) replace the defaults."""

    def __init__(self, cfg: Config, accelerator=None, build_model_fn=None, loss_fn=None,
                 stop_fn=None, checkpoint_io: dict | None = None):
        from accelerate.utils import DistributedType, set_seed

        self.cfg = cfg
        self.accelerator = accelerator = accelerator or make_accelerator(cfg)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.stop_fn = stop_fn or stop_signal
        self.out_dir = cfg.train.output_dir
        set_seed(cfg.train.seed)  # identical initialisation on every rank

        self.train_loader = build_loader(cfg.data, "train", self.rank, self.world)
        self.val_loader = build_loader(cfg.data, "val", self.rank, self.world)
        self.transform = self.train_loader.transform
        n_ch = self.train_loader.shards.channels
        if n_ch != cfg.model.in_channels:
            raise ConfigError(f"model.in_channels={cfg.model.in_channels} but the shards in "
                              f"{cfg.data.shards} have {n_ch} channels; set model.in_channels="
                              f"{n_ch}")
        tile = self.train_loader.shards.tile_size
        if tile is not None and tile != cfg.model.tile_size:
            raise ConfigError(f"model.tile_size={cfg.model.tile_size} but the shards in "
                              f"{cfg.data.shards} hold {tile} x {tile} tiles; set "
                              f"model.tile_size={tile} (the FLOPs per tile and the MFU are "
                              "computed from it)")

        self.model = (build_model_fn or build_model)(cfg.model, cfg.loss)
        if cfg.model.spectral_input == "highpass" or cfg.model.slant_columns != "none":
            self._init_spectral_scales()
        self.n_params = count_parameters(self.model)
        self.loss_fn = loss_fn or build_loss(cfg.loss)
        self.latent = latent_size(cfg.model)
        optimizer, self.scheduler = build_optimizer(self.model, cfg)
        self.lr_at = lr_lambda(cfg)

        if accelerator.gradient_accumulation_steps != cfg.optim.grad_accum:
            src = _launcher_source("gradient_accumulation_steps") or "the Accelerator"
            raise ConfigError(f"gradient accumulation {accelerator.gradient_accumulation_steps} from "
                              f"{src}, but optim.grad_accum={cfg.optim.grad_accum}: the run "
                              "config sets the accumulation")
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.ds_config: dict = {}
        if self.deepspeed:
            self.ds_config = self._reconcile_deepspeed()
        self.ckpt = CheckpointManager(accelerator, os.path.join(self.out_dir, "checkpoints"),
                                      cfg.train.keep_last, self.n_params,
                                      on_exit=lambda: self.sink.flush(),
                                      **(checkpoint_io or {}))
        self.resume_path = self.ckpt.resolve(cfg.train.resume, self._log)
        self.resume_state = None
        self.universal: str | None = None  # DeepSpeed tag to load re-partitioned, see resume
        if self.resume_path:
            self.resume_state = self._check_resume(self.resume_path)
        # the scalar reconstruction log-variance is clipped apart unless optim.clip_logvar
        self.clip_params = [p for n, p in self.model.named_parameters()
                            if cfg.optim.clip_logvar or n != "logvar"]
        zero3 = self.deepspeed and \
            int(self.ds_config.get("zero_optimization", {}).get("stage", 0)) == 3
        if cfg.loss.l2_share > 0 and zero3:
            raise ConfigError("loss.l2_share > 0 measures gradients at the encoder output, "
                              "which ZeRO-3 cannot do: set loss.l2_share=0 (fixed "
                              "loss.l2_weights) or use ZeRO-1/2")
        self.grad_shares = cfg.train.grad_shares and not zero3
        if cfg.train.grad_shares and zero3:
            self._log("note: train.grad_shares is not computed under ZeRO-3 (partitioned "
                      "parameters cannot be re-entered for a partial backward)")
        # the scheduler is not prepared: see train.optim
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)

        # posterior sampling noise: a generator per rank, saved with checkpoints
        self.gen = torch.Generator(device=accelerator.device)
        self.gen.manual_seed(cfg.train.seed * 1000003 + self.rank)
        self.step = 0
        self.samples_seen = 0
        self.skipped_steps = 0
        self.skipped_in_a_row = 0
        self.last_val: dict = {}
        self.sink = NullSink()
        self.flops_per_sample = train_flops_per_sample(cfg.model)
        peak = cfg.train.peak_tflops
        if not peak and torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
        self.peak_flops = peak * 1e12

    # ------------------------------------------------------------------ set-up
    def _reconcile_deepspeed(self) -> dict:
        """Fill the DeepSpeed values the run config owns; stop (ConfigError) when the JSON or
        the launcher fixed one to another value, naming where it came from."""
        cfg, accelerator = self.cfg, self.accelerator
        plugin = accelerator.state.deepspeed_plugin
        ds = plugin.deepspeed_config
        json_path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed JSON")
        mb, o = cfg.data.batch_size, cfg.optim
        ours = {"train_micro_batch_size_per_gpu": (mb, "data.batch_size"),
                "gradient_accumulation_steps": (o.grad_accum, "optim.grad_accum"),
                "train_batch_size": (mb * o.grad_accum * self.world,
                                     f"data.batch_size x optim.grad_accum x {self.world} "
                                     "ranks"),
                "gradient_clipping": (o.grad_clip, "optim.grad_clip")}
        for key, (value, source) in ours.items():
            theirs = ds.get(key, "auto")
            if theirs != "auto" and theirs != value:
                launcher = _launcher_source(key)
                where = launcher or (f"{json_path} sets {key}={theirs}; set it to \"auto\" "
                                     "there (the trainer fills it)")
                raise ConfigError(
                    f"DeepSpeed {key}={theirs} but {source} gives {value} (DeepSpeed "
                    "requires train_batch_size = micro batch x accumulation x ranks): "
                    f"{where}, or change {source.split(' ')[0]}")
            ds[key] = value
        return ds

    def _init_spectral_scales(self) -> None:
        """Buffers of the spectral transforms from the shards' stats and the first training
        batch as rank 0 of one would read it (identical on every rank; a resume overwrites
        them with the checkpoint's): the input scales of model.spectral_input='highpass', the
        slant-column operator of model.slant_columns (cross-sections from model.xsec_dir on
        the shards' wavelength grid) and its centre and scales."""
        cfg = self.cfg
        stats = self.train_loader.shards.stats["l1"]
        if "wavelength_nm" not in stats:
            what = ("model.spectral_input=highpass" if cfg.model.spectral_input == "highpass"
                    else f"model.slant_columns={cfg.model.slant_columns}")
            raise ConfigError(f"{what} needs l1.wavelength_nm in {cfg.data.shards}/stats.json")
        loader = build_loader(dataclasses.replace(cfg.data, num_workers=0), "train", 0, 1)
        batch = next(iter(loader))
        x = batch["l1"][batch["real"]].float()
        std, wl = torch.tensor(stats["std"]), torch.tensor(stats["wavelength_nm"])
        self.model.init_spectral_scales(std, wl, x)
        if cfg.model.slant_columns != "none":
            try:
                operator = slant_column_operator_for(cfg.model, stats["wavelength_nm"])
            except (OSError, ValueError) as e:
                raise ConfigError(f"model.slant_columns={cfg.model.slant_columns}: {e}") from None
            self.model.init_slant_columns(std, torch.from_numpy(operator), x)

    # ------------------------------------------------------------------ state
    def _layout(self) -> dict:
        """What a checkpoint's sharded files and loader position depend on."""
        return {"world_size": self.world, "num_workers": max(1, self.cfg.data.num_workers),
                "batch_size": self.cfg.data.batch_size, "grad_accum": self.cfg.optim.grad_accum,
                "deepspeed": self.deepspeed,
                "zero_stage": int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
                if self.deepspeed else None}

    def state_dict(self) -> dict:
        """The JSON trainer state (main process): world-size independent."""
        return {"step": self.step, "samples_seen": self.samples_seen,
                "skipped_steps": self.skipped_steps, "l2_balance": self.loss_fn.l2_balance,
                "scheduler": {"last_epoch": self.scheduler.last_epoch,
                              "base_lrs": list(self.scheduler.base_lrs)},
                "loader": self.train_loader.position(),
                "data_errors": self._data_errors(),
                "last_val": self.last_val} | self._layout()

    def _check_resume(self, path: str) -> dict:
        """Read a checkpoint's state and check it can be resumed here, before anything is
        loaded (ConfigError: exit 2, naming the fix)."""
        saved = yaml.safe_load(open(os.path.join(path, "config.yaml")))
        now = to_dict(self.cfg)
        for section in ("model",):
            if saved.get(section) != now[section]:
                diff = sorted(k for k in now[section]
                              if saved.get(section, {}).get(k) != now[section][k])
                raise ConfigError(
                    f"cannot resume from {path}: its {section} config differs in {diff}; "
                    "use the checkpoint's config.yaml or start a new output_dir")
        state = json.load(open(os.path.join(path, "trainer_state.json")))
        state.setdefault("world_size", None)
        self.universal = None
        stage = self._layout()["zero_stage"]
        other_stage = state.get("zero_stage") not in (None, stage)
        if self.deepspeed and (state["world_size"] not in (None, self.world) or other_stage):
            if not state.get("deepspeed", True):
                raise ConfigError(
                    f"cannot resume {path} (saved without DeepSpeed) under DeepSpeed: resume "
                    "it with the launch set-up that saved it")
            self.universal = self._universal_checkpoint(path, state["world_size"])
        elif state.get("deepspeed") is not None and bool(state["deepspeed"]) != self.deepspeed:
            raise ConfigError(
                f"cannot resume {path}: saved {'with' if state['deepspeed'] else 'without'} "
                f"DeepSpeed, resumed {'with' if self.deepspeed else 'without'} it; resume it "
                "with the launch set-up that saved it")
        return state

    def _universal_checkpoint(self, path: str, saved_world: int) -> str:
        """DeepSpeed's ZeRO files are partitioned per rank and stage: convert them once to
        DeepSpeed's universal checkpoint (``pytorch_model_universal`` next to them, written
        by the main process, atomically) and have the engine load that, re-partitioned for
        this number of ranks and ZeRO stage."""
        tag = "pytorch_model_universal"
        dst = os.path.join(path, tag)
        problem = ""
        if self.is_main and not os.path.isdir(dst):
            import subprocess

            self._log(f"converting {path} (saved by {saved_world} ranks) to a universal "
                      f"checkpoint for {self.world} ranks")
            tmp = dst + ".partial"
            shutil.rmtree(tmp, ignore_errors=True)
            p = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                                "--input_folder", os.path.join(path, "pytorch_model"),
                                "--output_folder", tmp, "--inject_missing_state",
                                "--num_extract_workers", "1", "--num_merge_workers", "1"],
                               capture_output=True, text=True)
            if p.returncode == 0:
                os.replace(tmp, dst)
            else:
                last = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
                problem = f"converting it to a universal checkpoint failed ({last})"
        failed = self._reduce(torch.tensor([float(bool(problem))], device=self.accelerator.device))
        if failed.item() > 0:  # every rank stops, before anything is loaded
            raise ConfigError(
                f"cannot resume {path} (saved by {saved_world} ranks) on {self.world} ranks: "
                f"{problem or 'the conversion failed on the main process'}; resume on "
                f"{saved_world} ranks, or convert it yourself with `python -m "
                f"deepspeed.checkpoint.ds_to_universal --input_folder "
                f"{os.path.join(path, 'pytorch_model')} --output_folder {dst} "
                "--inject_missing_state`")
        self.ds_config["checkpoint"] = {"load_universal": True}
        return tag

    def resume(self, path: str, state: dict) -> None:
        """Load model, optimizer, RNG, schedule and loader position from ``path``."""
        same = state.get("world_size") == self.world
        if self.universal:  # another number of DeepSpeed ranks: re-partitioned states
            self.model.load_checkpoint(path, tag=self.universal, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
        else:
            self.accelerator.load_state(path)
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.loss_fn.l2_balance = float(state.get("l2_balance", 1.0))
        self.last_val = state.get("last_val", {})
        self.scheduler.last_epoch = self.step  # one schedule step per optimizer step
        for group, lr in zip(self.scheduler.optimizer.param_groups, self._lrs(self.step)):
            group["lr"] = lr
        self.scheduler._last_lr = self._lrs(self.step)
        layout = {k: state.get(k) for k in self._layout()}
        loader = dict(state["loader"])
        rank_file = os.path.join(path, f"trainer_rank{self.rank}.pt")
        if same and os.path.exists(rank_file):
            r = torch.load(rank_file, weights_only=False)
            self.gen.set_state(r["generator"])
            errors = r["loader"].get("errors", {})
        else:  # the global counts, held by rank 0
            errors = state.get("data_errors", {}) if self.rank == 0 else {}
        self.train_loader.restore(loader, layout, errors)
        if {k: layout[k] for k in self.train_loader.layout()} != self.train_loader.layout():
            self._log(f"elastic resume: checkpoint from {state.get('world_size')} ranks x "
                      f"{state.get('num_workers')} workers, batch {state.get('batch_size')}; "
                      f"continuing epoch {loader['epoch']} on {self.world} ranks with "
                      "exactly the samples it has not seen yet")
        self._log(f"resumed from {path} at step {self.step}")

    def _lrs(self, step: int) -> list[float]:
        return [b * self.lr_at(step) for b in self.scheduler.base_lrs]

    def _log(self, msg: str) -> None:
        """An INFO line (shown by rank 0; see data_prep.logs)."""
        log.info(msg)

    def save_checkpoint(self) -> str:
        rank_state = {"generator": self.gen.get_state(),
                      "loader": self.train_loader.state_dict()}
        return self.ckpt.save(self.step, rank_state, self.state_dict(), dump(self.cfg))

    # ------------------------------------------------------------------ steps
    def _batch_to_device(self, batch):
        dev = self.accelerator.device
        # the shards' float16 z-scores as they are: the model casts them to its weights'
        # dtype (bf16 under DeepSpeed), after its float32 spectral transform
        x = batch["l1"].to(dev, non_blocking=True)
        return x, batch["l2_t"].to(dev), batch["real"].to(dev), batch["geo"].to(dev)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="sum") if self.world > 1 else t

    def step_counts(self, window: list[dict]) -> StepCounts:
        """Real samples and L2 cells with a target of the step's micro-batches, all ranks."""
        local = StepCounts(0.0, [0.0] * len(L2_ORDER))
        for b in window:
            local = local + self.loss_fn.counts(b["l2_t"], b["real"], self.latent)
        return StepCounts.from_tensor(self._reduce(local.as_tensor(self.accelerator.device)))

    def train_step(self, window: list[dict]) -> StepResult:
        """One optimizer step over ``window`` (optim.grad_accum micro-batches)."""
        accelerator, model = self.accelerator, self.model
        n_micro = len(window)
        counts = self.step_counts(window)
        # DDP / DeepSpeed average gradients over ranks, Accelerate / DeepSpeed divide the
        # loss by the accumulation steps: undo both, the terms are already step shares
        scale = float(self.world * n_micro)
        lr = float(self.scheduler.optimizer.param_groups[0]["lr"])
        sums: dict[str, torch.Tensor] = {}
        bad_msg, stop, skipped = None, False, False
        accelerator.step = 0  # accumulation phase: the window's last micro-batch syncs
        for j, batch in enumerate(window):
            x, l2_t, real, geo = self._batch_to_device(batch)
            with accelerator.accumulate(model):
                last = j == n_micro - 1
                if accelerator.sync_gradients != last:
                    raise RuntimeError(f"accumulation out of phase at micro-batch {j + 1}")
                out = model(x, generator=self.gen, geo=geo)
                terms = self.loss_fn(out, x, l2_t, real, counts)
                if j == 0:
                    self._balance_and_shares(out, x, terms, (l2_t, real, geo, counts))
                bad, stop_now = self._all_flags(not bool(torch.isfinite(terms["loss"])))
                stop = stop or stop_now
                if bad:
                    names = [k for k, v in terms.items() if not bool(torch.isfinite(v).all())]
                    msg = (f"non-finite loss at step {self.step + 1} (micro-batch {j + 1} of "
                           f"{n_micro}; rank {self.rank} terms: {names or 'finite here'}; "
                           f"batch keys {batch['keys']})")
                    if self.cfg.train.on_nonfinite == "raise":
                        self._nonfinite(msg)
                    bad_msg = bad_msg or msg
                # with a non-finite loss the gradients are non-finite too: the step is
                # dropped below (DeepSpeed drops it itself), and the accumulation phase of
                # every engine stays the same as in a good step
                accelerator.backward(terms["loss"] * scale)
                for k, v in terms.items():
                    v = v.detach()
                    sums[k] = v if (k in NOT_ADDITIVE or k not in sums) else sums[k] + v
                if last:
                    clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 \
                        else float("inf")
                    grad_norm = accelerator.clip_grad_norm_(self.clip_params, clip)
                    finite = grad_norm is None or math.isfinite(float(grad_norm))
                    if bad_msg or not finite:
                        # every rank takes this branch (global flags, global norm). Under
                        # DeepSpeed the update is already dropped (ZeRO 1-3 skip a step whose
                        # gradient norm is not finite); otherwise before optimizer.step
                        self._nonfinite(bad_msg or (
                            f"non-finite gradient norm ({float(grad_norm)}) at step "
                            f"{self.step + 1} with a finite loss; batch keys "
                            f"{batch['keys']} (rank {self.rank})"))
                        skipped = True
                    else:
                        self.skipped_in_a_row = 0
                        self.optimizer.step()
                        self.scheduler.step()
                    self.optimizer.zero_grad()
                    if grad_norm is not None:
                        sums["grad_norm"] = torch.as_tensor(float(grad_norm))
        return StepResult(sums, counts, lr, skipped=skipped, stop=stop)

    def _balance_and_shares(self, out: dict, x: torch.Tensor, terms: dict, batch: tuple) -> None:
        """On the step's first micro-batch: re-set the L2 factor (loss.l2_share, every
        loss.l2_share_every steps, norms averaged over ranks; terms["loss"] recomputed) and,
        at log steps, add each term's share of the encoder gradient to ``terms``.
        ``batch``: (l2_t, real, geo, counts) of this micro-batch."""
        n_el, share = x[0].numel(), self.cfg.loss.l2_share
        balance = share > 0 and self.loss_fn.supervised \
            and self.step % self.cfg.loss.l2_share_every == 0
        shares = self.grad_shares and ((self.step + 1) % self.cfg.train.log_every == 0
                                       or self.step == 0)
        if not (balance or shares):
            return
        grad_out, grad_terms = out, terms
        if self.deepspeed:
            # DeepSpeed's engine hooks its forward outputs: a gradient taken through them
            # (autograd.grad) runs the engine's backward epilogue with no parameter gradient
            # (IndexError in ZeRO 1/2). The norms come from a second forward of the bare
            # module at the posterior mean instead, whose graph the engine does not see
            l2_t, real, geo, counts = batch
            grad_out = self.accelerator.unwrap_model(self.model)(x, sample=False, geo=geo)
            grad_terms = self.loss_fn(grad_out, x, l2_t, real, counts)
        if balance:
            norms = self.loss_fn.supervision_norms(grad_terms, n_el, grad_out["moments"])
            if self.world > 1:
                norms = self.accelerator.reduce(norms, reduction="mean")
            self.loss_fn.rebalance(norms, share)
            terms["loss"] = self.loss_fn.total(terms, n_el)
        if shares:
            parts = self.loss_fn.contributions(grad_terms, n_el)
            found = encoder_gradient_shares(parts, grad_out["moments"])
            terms.update({f"grad_share/{k}": v for k, v in found.items()})

    def _all_flags(self, nonfinite: bool) -> tuple[bool, bool]:
        """(any rank non-finite, any rank asked to stop): one small all-reduce."""
        t = torch.tensor([float(nonfinite), float(self.stop_fn() is not None)],
                         device=self.accelerator.device)
        t = self._reduce(t)
        return bool(t[0] > 0), bool(t[1] > 0)

    def _nonfinite(self, msg: str) -> None:
        """Raise (default) or count a skipped step; all ranks call this together."""
        if self.cfg.train.on_nonfinite == "raise":
            raise NonFiniteError(msg + "; set train.on_nonfinite=skip to skip such steps")
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        if self.is_main:  # every rank skips the same step
            log.warning(f"skipped step ({self.skipped_steps} so far): {msg}")
        if self.skipped_in_a_row >= self.cfg.train.max_skipped_in_a_row:
            raise NonFiniteError(f"{self.skipped_in_a_row} steps in a row were non-finite "
                                 f"(train.max_skipped_in_a_row); last: {msg}. The run has "
                                 "diverged: resume from an earlier checkpoint with a lower "
                                 "optim.lr or a stronger optim.grad_clip")

    @torch.no_grad()
    def validate(self) -> dict:
        model = self.model
        model.eval()
        metrics = ValMetrics(self.accelerator.device, self.cfg.loss.l2_min_valid_fraction)
        first = None
        self.val_loader.set_epoch(0)  # the whole split, same order, every time
        for i, batch in enumerate(self.val_loader):
            if self.cfg.train.val_batches and i >= self.cfg.train.val_batches:
                break
            x, _, real, geo = self._batch_to_device(batch)
            out = model(x, sample=False, geo=geo)
            pred = self.transform.inverse(out["l2_pred"].float())
            metrics.update(x.float(), out["recon"].float(), batch["l2"].to(self.accelerator.device),
                           pred, real)
            if first is None:
                first = (x[:1].float().cpu(), out["recon"][:1].float().cpu(),
                         batch["l2"][:1], pred[:1].cpu())
        metrics.reduce(self.accelerator)
        model.train()
        res = metrics.compute()
        if self.is_main and first is not None:
            self._images(*first)
        return res

    def _images(self, x, recon, l2, pred) -> None:
        from train.viz import l2_maps_image, spectra_image

        self.sink.image("val/spectra_input_vs_recon", spectra_image(x[0], recon[0]), self.step)
        self.sink.image("val/l2_target_vs_pred", l2_maps_image(l2[0], pred[0]), self.step)

    # ------------------------------------------------------------------ loop
    def _micro_batches(self):
        """Training micro-batches without end, epoch after epoch, from the loader's
        position."""
        loader = self.train_loader
        while True:
            if loader.state.batches_consumed < len(loader):
                yield from loader
            loader.set_epoch(loader.state.epoch + 1)

    def fit(self) -> dict:
        accelerator, cfg = self.accelerator, self.cfg
        if self.resume_path:
            self.resume(self.resume_path, self.resume_state)
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            atomic_write_bytes(os.path.join(self.out_dir, "config.yaml"), dump(cfg).encode())
            self.sink = TensorBoardSink(self.out_dir)
        self.ckpt.remove_partial(self._log)
        install_stop_handlers()  # main.py installs them first thing; other callers here
        accum_dtype = self._grad_accum_dtype()
        self._log(f"model {self.n_params / 1e6:.2f}M parameters, "
                  f"{self.flops_per_sample / 1e9:.2f} GFLOP/tile (train); {self.world} ranks; "
                  f"deepspeed={self.deepspeed} precision={accelerator.mixed_precision}"
                  f"{f' grad_accum_dtype={accum_dtype}' if accum_dtype else ''}; "
                  f"{self.train_loader.shards.total} train tiles, "
                  f"{len(self.train_loader)} batches/epoch/rank, "
                  f"{cfg.optim.grad_accum} micro-batches/step")
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", unit="step",
                   disable=not (self.is_main and cfg.train.progress), file=sys.stderr,
                   dynamic_ncols=True)
        window = {"t0": time.perf_counter(), "wait": 0.0, "results": []}
        stopped = False
        self.model.train()
        batches = self._micro_batches()
        while self.step < cfg.train.steps and not stopped:
            t_wait = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.optim.grad_accum)]
            window["wait"] += time.perf_counter() - t_wait
            res = self.train_step(micro)
            stopped = res.stop
            if res.skipped:
                continue  # not a step: the schedule, the count and the data move on
            self.step += 1
            self.samples_seen += int(res.counts.samples)
            window["results"].append(res)
            bar.update(1)
            self._after_step(window, bar)
        bar.close()
        if stopped:
            sig = self.stop_fn()
            where = f"{signal.Signals(sig).name} here" if sig else "on another rank"
            self._log(f"stop requested (signal {where}): saving a checkpoint at step {self.step}")
            path = self.save_checkpoint()
            summary = {"finished": False, "stopped_by": "signal", "step": self.step,
                       "checkpoint": path, "samples_seen": self.samples_seen,
                       "skipped_steps": self.skipped_steps}
            if self.is_main:  # what a job script reads to decide whether to requeue
                atomic_write_json(os.path.join(self.out_dir, "summary.json"), summary)
                self.sink.close()
            return summary
        self.last_val = self.validate()
        self._write_val(self.last_val)
        if cfg.train.ckpt_every >= 0:
            self.save_checkpoint()
        summary = {"finished": True, "step": self.step, "samples_seen": self.samples_seen,
                   "skipped_steps": self.skipped_steps, "data_errors": self._data_errors(),
                   "val": self.last_val}
        if self.is_main:
            atomic_write_json(os.path.join(self.out_dir, "summary.json"), summary)
            print(format_summary(summary), flush=True)  # the run's result, on stdout
            self.sink.close()
        return summary

    def _grad_accum_dtype(self) -> str | None:
        """The dtype DeepSpeed accumulates gradients in (None without DeepSpeed)."""
        if not self.deepspeed:
            return None
        opt = getattr(self.model, "optimizer", None)
        dt = getattr(opt, "gradient_accumulation_dtype", None)
        return str(dt).replace("torch.", "") if dt is not None else None

    def _data_errors(self) -> dict:
        """Samples skipped per reason, all ranks (a collective: every rank calls it)."""
        counts = self.train_loader.errors
        unknown = sorted(set(counts) - set(ERROR_REASONS))
        if unknown:
            raise RuntimeError(f"data error reasons {unknown} missing from ERROR_REASONS")
        if self.world == 1:
            return {k: counts[k] for k in ERROR_REASONS if counts.get(k)}
        t = torch.tensor([float(counts.get(r, 0)) for r in ERROR_REASONS],
                         device=self.accelerator.device)
        t = self._reduce(t)
        return {r: int(v) for r, v in zip(ERROR_REASONS, t.tolist()) if v}

    def _after_step(self, window, bar) -> None:
        cfg = self.cfg
        if self.step % cfg.train.log_every == 0 or self.step == 1:
            self._log_window(window, bar)
        if cfg.train.val_every and self.step % cfg.train.val_every == 0 \
                and self.step < cfg.train.steps:
            self.last_val = self.validate()
            self._write_val(self.last_val)
        if cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0 \
                and self.step < cfg.train.steps:
            self.save_checkpoint()

    def _log_window(self, window, bar) -> None:
        """Means over the steps since the last log of each step's value for the whole
        global batch (shares summed over ranks), throughput over all ranks."""
        dt = max(time.perf_counter() - window["t0"], 1e-9)
        results = window["results"]
        keys = sorted({k for r in results for k in r.terms})
        mean = torch.tensor([float(torch.stack([r.terms[k].double().cpu() for r in results
                                                if k in r.terms]).mean()) for k in keys],
                            dtype=torch.float64, device=self.accelerator.device)
        # a rank's share of the gradient is a ratio: averaged over ranks, as shared values
        shared = torch.tensor([k in SAME_ON_ALL_RANKS or k.startswith("grad_share/")
                               for k in keys], device=mean.device)
        mean = torch.where(shared, mean / self.world, mean)
        vals = dict(zip(keys, self._reduce(mean).tolist()))
        tiles = sum(r.counts.samples for r in results)
        tiles_per_s = tiles / dt
        errors = self._data_errors()
        s, step = self.sink, self.step
        for k, v in vals.items():
            s.scalar(f"train/{k}", v, step)
        s.scalar("train/lr", results[-1].lr, step)
        s.scalar("train/l2_balance", self.loss_fn.l2_balance, step)
        s.scalar("train/skipped_steps", self.skipped_steps, step)
        s.scalar("train/samples_seen", self.samples_seen, step)
        s.scalar("perf/tiles_per_s", tiles_per_s, step)
        s.scalar("perf/data_wait_fraction", window["wait"] / dt, step)
        if self.peak_flops:
            s.scalar("perf/mfu", tiles_per_s * self.flops_per_sample
                     / (self.peak_flops * self.world), step)
        for reason, n in errors.items():
            s.scalar(f"data/skipped_{reason}", n, step)
        bar.set_postfix(loss=f"{vals['loss']:.4g}", recon=f"{vals.get('recon_mae', vals.get('recon_mse', 0)):.3f}",
                        tiles_s=f"{tiles_per_s:.1f}")
        if errors and self.is_main:
            log.warning(f"step {self.step}: skipped samples so far: {errors}")
        window.update(t0=time.perf_counter(), wait=0.0, results=[])

    def _write_val(self, res: dict) -> None:
        for k, v in res.items():
            if isinstance(v, float) and math.isfinite(v):
                self.sink.scalar(f"val/{k}", v, self.step)
        self.sink.flush()


def format_summary(summary: dict) -> str:
    v = summary["val"]
    lines = [f"done: {summary['step']} steps, {summary['samples_seen']} tiles seen, "
             f"{summary['skipped_steps']} steps skipped, data errors {summary['data_errors']}",
             f"validation ({int(v.get('samples', 0))} tiles): reconstruction MAE "
             f"{v.get('recon_mae', float('nan')):.4f} (normalised units)",
             f"{'product':<8} {'n':>8} {'RMSE':>12} {'bias':>12} {'R^2':>8}"]
    units = {"NO2": "molec/cm2", "O3TOT": "DU", "HCHO": "molec/cm2", "CLDO4": "1"}
    for p in L2_ORDER:
        lines.append(f"{p:<8} {int(v.get(f'l2/{p}_n', 0)):>8} {v.get(f'l2/{p}_rmse', 0):>12.4g} "
                     f"{v.get(f'l2/{p}_bias', 0):>12.4g} {v.get(f'l2/{p}_r2', 0):>8.3f}  "
                     f"({units[p]})")
    return "\n".join(lines)

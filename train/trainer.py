"""The training loop: Accelerate (+ DeepSpeed ZeRO 1/2/3 or DDP or one process), bf16,
gradient accumulation and clipping, warmup + cosine, validation in physical units,
TensorBoard, atomic rotating checkpoints, exact resume, and graceful preemption."""

from __future__ import annotations

import datetime
import glob
import json
import math
import os
import shutil
import signal
import sys
import time

import torch
import yaml

from data_prep.tempo import L2_ORDER
from data_prep.util import atomic_write_bytes, atomic_write_json
from train.config import Config, ConfigError, dump, to_dict
from train.data import build_loader
from train.losses import build_loss
from train.metrics import ValMetrics
from train.model import build_model, count_parameters
from train.runtime import install_stop_handlers, stop_signal

# dense bf16 peak TFLOP/s by device name fragment (vendor datasheets)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


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


def lr_lambda(cfg):
    o, total = cfg.optim, cfg.train.steps

    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        t = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


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


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient with train.on_nonfinite=raise (exit code 3)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact (exit code 4)."""


EXIT_NONFINITE = 3
EXIT_CHECKPOINT = 4


class Trainer:
    def __init__(self, cfg: Config, accelerator=None):
        from accelerate.utils import DistributedType, set_seed

        self.cfg = cfg
        self.acc = accelerator or make_accelerator(cfg)
        acc = self.acc
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        self.out_dir = cfg.train.output_dir
        self.ckpt_dir = os.path.join(self.out_dir, "checkpoints")
        set_seed(cfg.train.seed)  # identical initialisation on every rank

        self.train_loader = build_loader(cfg.data, "train", self.rank, self.world)
        self.val_loader = build_loader(cfg.data, "val", self.rank, self.world)
        self.transform = self.train_loader.dataset.transform
        n_ch = len(self.train_loader.dataset.shards.stats["l1"]["mean"])
        if n_ch != cfg.model.in_channels:
            raise ConfigError(f"model.in_channels={cfg.model.in_channels} but the shards in "
                              f"{cfg.data.shards} have {n_ch} channels; set model.in_channels="
                              f"{n_ch}")

        self.model = build_model(cfg.model, cfg.loss)
        if cfg.model.spectral_input == "highpass":
            self._init_spectral_scales()
        self.n_params = count_parameters(self.model)
        self.loss_fn = build_loss(cfg.loss)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        o = cfg.optim
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:
            ds = acc.state.deepspeed_plugin.deepspeed_config
            mb = cfg.data.batch_size
            ours = {"train_micro_batch_size_per_gpu": (mb, "data.batch_size"),
                    "gradient_accumulation_steps": (o.grad_accum, "optim.grad_accum"),
                    "train_batch_size": (mb * o.grad_accum * self.world,
                                         f"data.batch_size x optim.grad_accum x {self.world} "
                                         "ranks"),
                    "gradient_clipping": (o.grad_clip, "optim.grad_clip")}
            for key, (value, source) in ours.items():
                theirs = ds.get(key, "auto")
                if theirs != "auto" and theirs != value:
                    raise ConfigError(
                        f"the DeepSpeed config sets {key}={theirs} but {source} gives {value} "
                        "(DeepSpeed requires train_batch_size = micro batch x accumulation x "
                        f"ranks); set {key} to \"auto\" in the DeepSpeed JSON (the trainer "
                        f"fills it) or change {source.split(' ')[0]}")
                ds[key] = value
        # the scalar reconstruction log-variance is clipped apart unless optim.clip_logvar
        self.clip_params = [p for n, p in self.model.named_parameters()
                            if o.clip_logvar or n != "logvar"]
        zero3 = self.deepspeed and acc.state.deepspeed_plugin.zero_stage == 3
        self.grad_shares = cfg.train.grad_shares and not zero3
        if cfg.loss.l2_share > 0 and zero3:
            raise ConfigError("loss.l2_share > 0 measures gradients at the encoder output, "
                              "which ZeRO-3 cannot do: set loss.l2_share=0 (fixed "
                              "loss.l2_weights) or use ZeRO-1/2")
        if cfg.train.grad_shares and zero3:
            self._log("note: train.grad_shares is not computed under ZeRO-3 (partitioned "
                      "parameters cannot be re-entered for a partial backward)")
        self.model, self.optimizer, self.scheduler = acc.prepare(self.model, optimizer, scheduler)
        self.in_dtype = torch.bfloat16 if (self.deepspeed and acc.mixed_precision == "bf16") \
            else torch.float32

        # posterior sampling noise: a generator per rank, saved with checkpoints
        self.gen = torch.Generator(device=acc.device)
        self.gen.manual_seed(cfg.train.seed * 1000003 + self.rank)
        self.step = 0
        self.samples_seen = 0
        self.skipped_steps = 0
        self.skipped_in_a_row = 0
        self._balance_due = True  # re-set the L2 factor (loss.l2_share) at the next step
        self._ckpt_bytes: int | None = None  # see _checkpoint_bytes
        self.last_val: dict = {}
        self.writer = None
        self.flops_per_sample = train_flops_per_sample(cfg.model)
        peak = cfg.train.peak_tflops
        if not peak and torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
        self.peak_flops = peak * 1e12

    def _init_spectral_scales(self) -> None:
        """Input scales of model.spectral_input='highpass' from the first training batch as
        rank 0 of one would read it (identical on every rank; a resume overwrites them with
        the checkpoint's)."""
        import dataclasses

        stats = self.train_loader.dataset.shards.stats["l1"]
        if "wavelength_nm" not in stats:
            raise ConfigError(f"model.spectral_input=highpass needs l1.wavelength_nm in "
                              f"{self.cfg.data.shards}/stats.json")
        loader = build_loader(dataclasses.replace(self.cfg.data, num_workers=0), "train", 0, 1)
        batch = next(iter(loader))
        x = batch["l1"][batch["valid"]].float()
        self.model.init_spectral_scales(torch.tensor(stats["std"]),
                                        torch.tensor(stats["wavelength_nm"]), x)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen,
                "skipped_steps": self.skipped_steps, "l2_balance": self.loss_fn.l2_balance,
                "loader": self.train_loader.state_dict(), "last_val": self.last_val}

    def load_state_dict(self, d: dict) -> None:
        self.step = int(d["step"])
        self.samples_seen = int(d["samples_seen"])
        self.skipped_steps = int(d.get("skipped_steps", 0))
        self.loss_fn.l2_balance = float(d.get("l2_balance", 1.0))
        self._balance_due = self.step % self.cfg.loss.l2_share_every == 0
        self.train_loader.load_state_dict(d["loader"])
        self.last_val = d.get("last_val", {})

    # ------------------------------------------------------------------ checkpoints
    def _log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def save_checkpoint(self) -> str:
        """Write ``step_N.partial`` on every rank, then (rank 0) rename it to ``step_N`` and
        point ``latest`` at it. A checkpoint that cannot be written never touches ``latest``:
        a full or unwritable disk found beforehand stops every rank together with
        CheckpointError; a write that fails midway stops the job from the failing rank."""
        acc = self.acc
        name = f"step_{self.step:08d}"
        final = os.path.join(self.ckpt_dir, name)
        tmp = final + ".partial"
        self._preflight(name)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(tmp)  # every rank (DeepSpeed shards its states)
            torch.save({"generator": self.gen.get_state(),
                        "loader": self.train_loader.state_dict()},
                       os.path.join(tmp, f"trainer_rank{self.rank}.pt"))
        except Exception as e:
            self._abort_save(name, e)
        acc.wait_for_everyone()
        if self.is_main:
            try:
                atomic_write_json(os.path.join(tmp, "trainer_state.json"),
                                  self.state_dict() | {"world_size": self.world})
                atomic_write_bytes(os.path.join(tmp, "config.yaml"), dump(self.cfg).encode())
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)  # complete: only now does it get its real name
                atomic_write_bytes(os.path.join(self.ckpt_dir, "latest"),
                                   (name + "\n").encode())
            except Exception as e:
                self._abort_save(name, e)
            self._rotate(keep=name)
        acc.wait_for_everyone()
        return final

    def _last_checkpoint(self) -> str | None:
        try:
            name = open(os.path.join(self.ckpt_dir, "latest")).read().strip()
        except OSError:
            return None
        return os.path.join(self.ckpt_dir, name) if name else None

    def _intact(self) -> str:
        last = self._last_checkpoint()
        return (f"the last complete checkpoint, {last}, is intact (train.resume=latest)"
                if last else "there is no earlier checkpoint")

    def _checkpoint_bytes(self) -> int:
        """Room one more checkpoint needs: the size of the last one (measured once per
        process: every checkpoint of a run has the same tensors), or, before the first, 16
        bytes per parameter (weights, fp32 master copy and two Adam moments)."""
        if self._ckpt_bytes is None:
            last = self._last_checkpoint()
            if not (last and os.path.isdir(last)):
                return 16 * self.n_params
            self._ckpt_bytes = sum(os.path.getsize(os.path.join(d, f))
                                   for d, _, files in os.walk(last) for f in files)
        return self._ckpt_bytes

    def _preflight(self, name: str) -> None:
        """Every rank checks that it can write the checkpoint folder and that it has room
        for one more checkpoint; all ranks agree before anything is written."""
        problem = ""
        try:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            probe = os.path.join(self.ckpt_dir, f".write_test.rank{self.rank}")
            with open(probe, "wb") as f:
                f.write(b"ok")
            os.remove(probe)
            need = int(self._checkpoint_bytes() * 1.05) + (16 << 20)
            free = shutil.disk_usage(self.ckpt_dir).free
            if free < need:
                problem = (f"{free / 1e9:.2f} GB free in {self.ckpt_dir}, a checkpoint needs "
                           f"about {need / 1e9:.2f} GB")
        except OSError as e:
            problem = f"cannot write to {self.ckpt_dir}: {e}"
        flags = torch.tensor([float(bool(problem))], device=self.acc.device)
        if self.world > 1:
            flags = self.acc.reduce(flags, reduction="sum")
        if flags.item() > 0:
            where = f"rank {self.rank}: {problem}" if problem else "a problem on another rank"
            raise CheckpointError(
                f"cannot save checkpoint {name} ({where}); {self._intact()}. Free space (or "
                "lower train.keep_last) or set train.output_dir to a writable place, then "
                "resume")

    def _abort_save(self, name: str, err: Exception) -> None:
        """A write failed midway on this rank. The other ranks are inside the save's
        collectives and cannot be told, so with several ranks this one exits at once and the
        launcher stops the rest; ``latest`` still names the previous checkpoint."""
        if isinstance(err, OSError):
            what = f"could not be written on rank {self.rank}: {err}"
        else:  # typically a collective broken by a peer that failed to write
            first = str(err).splitlines()[0][:300] if str(err) else ""
            what = (f"was interrupted on rank {self.rank} ({type(err).__name__}: {first}); a "
                    "write error reported by another rank is the likely cause")
        msg = (f"checkpoint {name} {what}; {self._intact()}; the incomplete {name}.partial "
               "is removed at the next start")
        if self.world == 1:
            raise CheckpointError(msg) from err
        print(f"error: {msg}", file=sys.stderr, flush=True)
        if self.writer is not None:
            self.writer.flush()
        sys.stdout.flush()
        os._exit(EXIT_CHECKPOINT)

    def _rotate(self, keep: str) -> None:
        done = sorted(d for d in os.listdir(self.ckpt_dir)
                      if d.startswith("step_") and not d.endswith(".partial"))
        for d in done[:-self.cfg.train.keep_last] if self.cfg.train.keep_last > 0 else []:
            if d != keep:
                shutil.rmtree(os.path.join(self.ckpt_dir, d), ignore_errors=True)

    def resolve_resume(self) -> str | None:
        r = self.cfg.train.resume
        if not r:
            return None
        if r == "latest":
            p = os.path.join(self.ckpt_dir, "latest")
            if not os.path.exists(p):
                self._log(f"resume=latest: no checkpoint in {self.ckpt_dir}; starting fresh")
                return None
            r = os.path.join(self.ckpt_dir, open(p).read().strip())
        if not os.path.isdir(r) or not os.path.exists(os.path.join(r, "trainer_state.json")):
            raise ConfigError(f"train.resume: {r} is not a complete checkpoint folder")
        return r

    def resume(self, path: str) -> None:
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
        if state.get("world_size") not in (None, self.world):
            self._log(f"note: checkpoint from {state['world_size']} ranks, resuming on "
                      f"{self.world}: the data order differs from an uninterrupted run")
        self.acc.load_state(path)
        self.load_state_dict(state)
        rank_file = os.path.join(path, f"trainer_rank{self.rank}.pt")
        if os.path.exists(rank_file) and state.get("world_size") == self.world:
            r = torch.load(rank_file, weights_only=False)
            self.gen.set_state(r["generator"])
            self.train_loader.load_state_dict(r["loader"])
        self._log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ signals
    def _all_flags(self, nonfinite: bool) -> tuple[bool, bool]:
        """(any rank non-finite, any rank asked to stop): one small all-reduce per step."""
        t = torch.tensor([float(nonfinite), float(stop_signal() is not None)],
                         device=self.acc.device)
        if self.world > 1:
            t = self.acc.reduce(t, reduction="sum")
        return bool(t[0] > 0), bool(t[1] > 0)

    # ------------------------------------------------------------------ steps
    def _batch_to_device(self, batch):
        dev = self.acc.device
        x = batch["l1"].to(dev, non_blocking=True).to(self.in_dtype)
        return x, batch["l2_t"].to(dev), batch["valid"].to(dev), batch["geo"].to(dev)

    def train_step(self, batch) -> dict | None:
        """One micro-batch; returns loss terms (floats) when an optimizer step completed."""
        acc, model = self.acc, self.model
        x, l2_t, valid, geo = self._batch_to_device(batch)
        with acc.accumulate(model):
            out = model(x, generator=self.gen, geo=geo)
            terms = self.loss_fn(out, x, l2_t, valid)
            share = self.cfg.loss.l2_share
            if share > 0 and self.loss_fn.supervised and self._balance_due:
                norms = self.loss_fn.supervision_norms(terms, x[0].numel(), out["moments"])
                if self.world > 1:
                    norms = self.acc.reduce(norms, reduction="mean")
                self.loss_fn.rebalance(norms, share)
                terms["loss"] = self.loss_fn.total(terms, x[0].numel())
                self._balance_due = False
            if self.grad_shares and ((self.step + 1) % self.cfg.train.log_every == 0
                                     or self.step == 0):
                from train.losses import encoder_gradient_shares

                parts = self.loss_fn.contributions(terms, x[0].numel())
                shares = encoder_gradient_shares(parts, out["moments"])
                terms.update({f"grad_share/{k}": v for k, v in shares.items()})
            bad_local = not bool(torch.isfinite(terms["loss"]))
            bad, stop = self._all_flags(bad_local)
            if bad:
                names = [k for k, v in terms.items() if not bool(torch.isfinite(v).all())]
                self._nonfinite(f"non-finite loss at step {self.step + 1} (rank {self.rank} "
                                f"terms: {names or 'finite here'}; batch keys {batch['keys']})")
                self.optimizer.zero_grad()
                return {"_stop": stop}
            acc.backward(terms["loss"])
            grad_norm = None
            if acc.sync_gradients:
                clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
                grad_norm = acc.clip_grad_norm_(self.clip_params, clip)
                if grad_norm is not None and not math.isfinite(float(grad_norm)):
                    # the global norm: every rank takes this branch. Under DeepSpeed the
                    # update is already dropped (ZeRO 1-3 skip a step whose gradient norm
                    # is not finite); otherwise it is dropped here, before optimizer.step
                    self._nonfinite(f"non-finite gradient norm ({float(grad_norm)}) at step "
                                    f"{self.step + 1} with a finite loss; batch keys "
                                    f"{batch['keys']} (rank {self.rank})")
                    self.optimizer.zero_grad()
                    return {"_stop": stop}
            self.skipped_in_a_row = 0
            self._balance_due = (self.step + 1) % self.cfg.loss.l2_share_every == 0
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        # detached tensors: converted to numbers only at log steps (no per-step device sync)
        result = {k: v.detach() for k, v in terms.items()}
        if grad_norm is not None:
            result["grad_norm"] = torch.as_tensor(grad_norm)
        result["_stop"] = stop
        result["_synced"] = acc.sync_gradients
        return result

    def _nonfinite(self, msg: str) -> None:
        """Raise (default) or count a skipped step; all ranks call this together."""
        if self.cfg.train.on_nonfinite == "raise":
            raise NonFiniteError(msg + "; set train.on_nonfinite=skip to skip such steps")
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        print(f"warning: skipped step ({self.skipped_steps} so far): {msg}", file=sys.stderr,
              flush=True)
        if self.skipped_in_a_row >= self.cfg.train.max_skipped_in_a_row:
            raise NonFiniteError(f"{self.skipped_in_a_row} steps in a row were non-finite "
                                 f"(train.max_skipped_in_a_row); last: {msg}. The run has "
                                 "diverged: resume from an earlier checkpoint with a lower "
                                 "optim.lr or a stronger optim.grad_clip")

    @torch.no_grad()
    def validate(self) -> dict:
        model = self.model
        model.eval()
        metrics = ValMetrics(self.acc.device, self.cfg.loss.l2_min_valid_fraction)
        first = None
        self.val_loader.set_epoch(0)  # the whole split, same order, every time
        for i, batch in enumerate(self.val_loader):
            if self.cfg.train.val_batches and i >= self.cfg.train.val_batches:
                break
            x, _, valid, geo = self._batch_to_device(batch)
            out = model(x, sample=False, geo=geo)
            pred = self.transform.inverse(out["l2_pred"].float())
            metrics.update(x.float(), out["recon"].float(), batch["l2"].to(self.acc.device),
                           pred, valid)
            if first is None:
                first = (x[:1].float().cpu(), out["recon"][:1].float().cpu(),
                         batch["l2"][:1], pred[:1].cpu())
        metrics.reduce(self.acc)
        model.train()
        res = metrics.compute()
        if self.writer is not None and first is not None:
            self._images(*first)
        return res

    def _images(self, x, recon, l2, pred) -> None:
        from train.viz import l2_maps_image, spectra_image

        self.writer.add_image("val/spectra_input_vs_recon", spectra_image(x[0], recon[0]),
                              self.step)
        self.writer.add_image("val/l2_target_vs_pred", l2_maps_image(l2[0], pred[0]), self.step)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        acc, cfg = self.acc, self.cfg
        path = self.resolve_resume()
        if path:
            self.resume(path)
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            atomic_write_bytes(os.path.join(self.out_dir, "config.yaml"), dump(cfg).encode())
            for stale in glob.glob(os.path.join(self.ckpt_dir, "*.partial")):
                self._log(f"removing incomplete checkpoint {stale} (a save was interrupted)")
                shutil.rmtree(stale, ignore_errors=True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.out_dir, "tb"))
        install_stop_handlers()  # main.py installs them first thing; other callers here
        self._log(f"model {self.n_params / 1e6:.2f}M parameters, "
                  f"{self.flops_per_sample / 1e9:.2f} GFLOP/tile (train); {self.world} ranks; "
                  f"deepspeed={self.deepspeed} precision={acc.mixed_precision}; "
                  f"{self.train_loader.dataset.shards.total} train tiles, "
                  f"{len(self.train_loader)} batches/epoch/rank")
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", unit="step",
                   disable=not (self.is_main and cfg.train.progress), file=sys.stderr,
                   dynamic_ncols=True)
        window = {"t0": time.perf_counter(), "wait": 0.0, "tiles": 0, "terms": []}
        stopped_by = None
        self.model.train()
        while self.step < cfg.train.steps and stopped_by is None:
            t_wait = time.perf_counter()
            for batch in self.train_loader:
                window["wait"] += time.perf_counter() - t_wait
                window["tiles"] += int(batch["valid"].sum())
                res = self.train_step(batch)
                if res.get("_synced"):
                    self.step += 1
                    self.samples_seen += int(batch["valid"].sum()) * self.world
                    window["terms"].append(res)
                    bar.update(1)
                    self._after_step(window, bar)
                if res.get("_stop"):
                    stopped_by = "signal"
                    break
                if self.step >= cfg.train.steps:
                    break
                t_wait = time.perf_counter()
            else:
                self.train_loader.set_epoch(self.train_loader.state.epoch + 1)
        bar.close()
        if stopped_by:
            sig = stop_signal()
            where = f"{signal.Signals(sig).name} here" if sig else "on another rank"
            self._log(f"stop requested (signal {where}): saving a checkpoint at step {self.step}")
            path = self.save_checkpoint()
            summary = {"finished": False, "stopped_by": "signal", "step": self.step,
                       "checkpoint": path, "samples_seen": self.samples_seen,
                       "skipped_steps": self.skipped_steps}
            if self.is_main:  # what a job script reads to decide whether to requeue
                atomic_write_json(os.path.join(self.out_dir, "summary.json"), summary)
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
            self._log(format_summary(summary))
            self.writer.close()
        return summary

    def _data_errors(self) -> dict:
        counts = self.train_loader.errors
        keys = sorted(counts)
        if self.world > 1:
            # same key set is not guaranteed: reduce a fixed-order vector of known reasons
            reasons = ["bad_array", "missing_members", "bad_json", "nonfinite_l1",
                       "unreadable_shard", "size_mismatch", "bad_sample"]
            t = torch.tensor([float(counts.get(r, 0)) for r in reasons], device=self.acc.device)
            t = self.acc.reduce(t, reduction="sum")
            return {r: int(v) for r, v in zip(reasons, t.tolist()) if v}
        return {k: counts[k] for k in keys}

    def _after_step(self, window, bar) -> None:
        cfg = self.cfg
        if self.step % cfg.train.log_every == 0 or self.step == 1:
            dt = time.perf_counter() - window["t0"]
            terms = window["terms"]
            keys = [k for k in terms[-1] if not k.startswith("_")]
            mean = {k: float(torch.stack([torch.as_tensor(t[k], dtype=torch.float64).cpu()
                                          for t in terms if k in t]).mean()) for k in keys}
            vec = torch.tensor([mean[k] for k in keys] + [window["tiles"]], dtype=torch.float64,
                               device=self.acc.device)
            if self.world > 1:
                vec = self.acc.reduce(vec, reduction="sum")
                vec[:-1] /= self.world
            vals = dict(zip(keys, vec[:-1].tolist()))
            tiles_per_s = float(vec[-1]) / max(dt, 1e-9)
            errors = self._data_errors()
            if self.writer is not None:
                for k, v in vals.items():
                    self.writer.add_scalar(f"train/{k}", v, self.step)
                self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
                self.writer.add_scalar("train/l2_balance", self.loss_fn.l2_balance, self.step)
                self.writer.add_scalar("train/skipped_steps", self.skipped_steps, self.step)
                self.writer.add_scalar("perf/tiles_per_s", tiles_per_s, self.step)
                self.writer.add_scalar("perf/data_wait_fraction", window["wait"] / max(dt, 1e-9),
                                       self.step)
                if self.peak_flops:
                    self.writer.add_scalar("perf/mfu", tiles_per_s * self.flops_per_sample
                                           / (self.peak_flops * self.world), self.step)
                for reason, n in errors.items():
                    self.writer.add_scalar(f"data/skipped_{reason}", n, self.step)
                bar.set_postfix(loss=f"{vals['loss']:.4g}", l1=f"{vals.get('recon_l1', 0):.3f}",
                                tiles_s=f"{tiles_per_s:.1f}")
            if errors and self.is_main:
                print(f"step {self.step}: skipped samples so far: {errors}", file=sys.stderr)
            window.update(t0=time.perf_counter(), wait=0.0, tiles=0, terms=[])
        if cfg.train.val_every and self.step % cfg.train.val_every == 0 \
                and self.step < cfg.train.steps:
            self.last_val = self.validate()
            self._write_val(self.last_val)
        if cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0 \
                and self.step < cfg.train.steps:
            self.save_checkpoint()

    def _write_val(self, res: dict) -> None:
        if self.writer is None:
            return
        for k, v in res.items():
            if isinstance(v, float) and math.isfinite(v):
                self.writer.add_scalar(f"val/{k}", v, self.step)
        self.writer.flush()


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

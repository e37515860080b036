"""Checkpoint storage: atomic, rotating, checked before writing, shared by every rank.

Layout of ``<output_dir>/checkpoints``::

    latest                     name of the last complete checkpoint (written last)
    step_00001000/             one complete checkpoint
        pytorch_model/ ...     model and optimizer state: DeepSpeed's own files (sharded
                               per rank under ZeRO), or Accelerate's for DDP / one process
        random_states_R.pkl    RNG states of rank R (Accelerate)
        trainer_rankR.pt       rank R: posterior-sampling generator, loader position
        trainer_state.json     step, samples seen, schedule, loader position (all ranks),
                               data-error counts (all ranks), world size, workers, batch size
        config.yaml            the run configuration
    step_00001000.partial/     a save in progress (removed at the next start)
"""

from __future__ import annotations

import os
import shutil
import sys

import torch

from data_prep.logs import get_logger
from data_prep.util import atomic_write_bytes, atomic_write_json
from train.errors import EXIT_CHECKPOINT, CheckpointError

log = get_logger(__name__)


class CheckpointManager:
    """Saves and finds checkpoints for one rank; every rank calls ``save`` together.

    ``accelerator``: the Accelerator (its ``save_state`` writes model, optimizer and RNG states);
    ``n_params``: parameter count, for the free-space estimate before the first save;
    ``on_exit``: called before this rank exits on a failed write (flush logs);
    ``disk_usage``, ``save_file``: shutil.disk_usage and torch.save unless a test injects
    a full disk or a failing write."""

    def __init__(self, accelerator, ckpt_dir: str, keep_last: int, n_params: int, on_exit=None,
                 disk_usage=None, save_file=None):
        self.accelerator = accelerator
        self.dir = ckpt_dir
        self.keep_last = keep_last
        self.n_params = n_params
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.on_exit = on_exit
        self._bytes: int | None = None  # see checkpoint_bytes
        self.disk_usage = disk_usage or shutil.disk_usage
        self.save_file = save_file or torch.save

    # ------------------------------------------------------------------ finding
    def last(self) -> str | None:
        """The folder ``latest`` names, or None."""
        try:
            name = open(os.path.join(self.dir, "latest")).read().strip()
        except OSError:
            return None
        return os.path.join(self.dir, name) if name else None

    def intact(self) -> str:
        last = self.last()
        return (f"the last complete checkpoint, {last}, is intact (train.resume=latest)"
                if last else "there is no earlier checkpoint")

    def resolve(self, resume: str, log=print) -> str | None:
        """The checkpoint folder ``train.resume`` asks for ('' none, 'latest', a folder);
        raises ConfigError when the folder is not a complete checkpoint."""
        from train.config import ConfigError

        if not resume:
            return None
        r = resume
        if r == "latest":
            r = self.last()
            if r is None:
                log(f"resume=latest: no checkpoint in {self.dir}; starting fresh")
                return None
        if not os.path.isdir(r) or not os.path.exists(os.path.join(r, "trainer_state.json")):
            raise ConfigError(f"train.resume: {r} is not a complete checkpoint folder")
        return r

    def remove_partial(self, log=print) -> None:
        """Main process: drop ``*.partial`` folders left by an interrupted save."""
        if not self.is_main or not os.path.isdir(self.dir):
            return
        for d in sorted(os.listdir(self.dir)):
            if d.endswith(".partial"):
                stale = os.path.join(self.dir, d)
                log(f"removing incomplete checkpoint {stale} (a save was interrupted)")
                shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ saving
    def save(self, step: int, rank_state: dict, main_state: dict, config_text: str) -> str:
        """Write ``step_N.partial`` on every rank, then (main process) rename it to ``step_N``
        and point ``latest`` at it. A checkpoint that cannot be written never touches
        ``latest``: a full or unwritable disk found beforehand stops every rank together
        with CheckpointError; a write that fails midway stops the job from the failing rank.

        ``rank_state``: this rank's own state (``trainer_rankR.pt``); ``main_state``: the
        JSON trainer state, written by the main process."""
        accelerator = self.accelerator
        name = f"step_{step:08d}"
        final = os.path.join(self.dir, name)
        tmp = final + ".partial"
        self.preflight(name)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(tmp)  # every rank (DeepSpeed shards its states)
            self.save_file(rank_state, os.path.join(tmp, f"trainer_rank{self.rank}.pt"))
        except Exception as e:
            self.abort(name, e)
        accelerator.wait_for_everyone()
        if self.is_main:
            try:
                atomic_write_json(os.path.join(tmp, "trainer_state.json"), main_state)
                atomic_write_bytes(os.path.join(tmp, "config.yaml"), config_text.encode())
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)  # complete: only now does it get its real name
                atomic_write_bytes(os.path.join(self.dir, "latest"), (name + "\n").encode())
            except Exception as e:
                self.abort(name, e)
            self.rotate(keep=name)
        accelerator.wait_for_everyone()
        return final

    def checkpoint_bytes(self) -> int:
        """Room one more checkpoint needs: the size of the last one (measured once per
        process: every checkpoint of a run has the same tensors), or, before the first, 16
        bytes per parameter (weights, fp32 master copy and two Adam moments)."""
        if self._bytes is None:
            last = self.last()
            if not (last and os.path.isdir(last)):
                return 16 * self.n_params
            self._bytes = sum(os.path.getsize(os.path.join(d, f))
                              for d, _, files in os.walk(last) for f in files)
        return self._bytes

    def preflight(self, name: str) -> None:
        """Every rank checks that it can write the checkpoint folder and that it has room
        for one more checkpoint; all ranks agree before anything is written."""
        problem = ""
        try:
            os.makedirs(self.dir, exist_ok=True)
            probe = os.path.join(self.dir, f".write_test.rank{self.rank}")
            with open(probe, "wb") as f:
                f.write(b"ok")
            os.remove(probe)
            need = int(self.checkpoint_bytes() * 1.05) + (16 << 20)
            free = self.disk_usage(self.dir).free
            if free < need:
                problem = (f"{free / 1e9:.2f} GB free in {self.dir}, a checkpoint needs "
                           f"about {need / 1e9:.2f} GB")
        except OSError as e:
            problem = f"cannot write to {self.dir}: {e}"
        flags = torch.tensor([float(bool(problem))], device=self.accelerator.device)
        if self.world > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        if flags.item() > 0:
            where = f"rank {self.rank}: {problem}" if problem else "a problem on another rank"
            raise CheckpointError(
                f"cannot save checkpoint {name} ({where}); {self.intact()}. Free space (or "
                "lower train.keep_last) or set train.output_dir to a writable place, then "
                "resume")

    def abort(self, name: str, err: Exception) -> None:
        """A write failed midway on this rank. The other ranks are inside the save's
        collectives and cannot be told, so with several ranks this one exits at once and the
        launcher stops the rest; ``latest`` still names the previous checkpoint."""
        if isinstance(err, OSError):
            what = f"could not be written on rank {self.rank}: {err}"
        else:  # typically a collective broken by a peer that failed to write
            first = str(err).splitlines()[0][:300] if str(err) else ""
            what = (f"was interrupted on rank {self.rank} ({type(err).__name__}: {first}); a "
                    "write error reported by another rank is the likely cause")
        msg = (f"checkpoint {name} {what}; {self.intact()}; the incomplete {name}.partial "
               "is removed at the next start")
        if self.world == 1:
            raise CheckpointError(msg) from err
        log.error(msg)  # this rank's own failure: logged whatever its rank
        if self.on_exit is not None:
            self.on_exit()
        sys.stdout.flush()
        os._exit(EXIT_CHECKPOINT)

    def rotate(self, keep: str) -> None:
        done = sorted(d for d in os.listdir(self.dir)
                      if d.startswith("step_") and not d.endswith(".partial"))
        for d in done[:-self.keep_last] if self.keep_last > 0 else []:
            if d != keep:
                shutil.rmtree(os.path.join(self.dir, d), ignore_errors=True)

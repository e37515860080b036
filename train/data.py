"""Streaming loader: WebDataset tar shards -> batches on every rank, exactly accounted.

The pipeline of one (rank, worker) slot, in order:

    shard list            sizes.json of the split (shard -> sample count)
    shard shuffle         permutation from (seed, epoch): identical on every rank
    split by node+worker  greedy balance of shards over world x workers slots (same plan
                          everywhere); `resampled` draws shards with replacement instead
    tar samples           members grouped by key, read once into writable buffers
    shuffle buffer        `shuffle_buffer` raw samples, first output after `shuffle_initial`
    decode                .npy -> tensors (no copy), shapes/dtypes/finite L1 checked
    augment               flips and 90-degree rotations, the same for L1, L2 and geo
    L2 transforms         physical -> model space (train/transforms.py); both are kept
    batch                 stacked tensors + `real` mask (not padding) + keys

Every slot yields the same number of batches per epoch; slots with fewer samples pad with
copies flagged ``real=False`` that losses and metrics ignore, so each sample counts exactly
once per epoch and no rank waits in a collective for another that ran dry. All randomness
comes from generators seeded by (seed, epoch, rank, worker); nothing uses global RNG state.
Batches are CPU tensors and are not passed through ``accelerator.prepare``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep import samples, shard_format
from data_prep.logs import get_logger
from data_prep.util import read_json
from train.runtime import STOP_SIGNALS
from train.shard_source import RemoteShardReader, ShardSource, SourceError
from train.transforms import L2Transform

SPLIT_IDS = {"train": 0, "val": 1}
# every reason a sample or shard can be skipped for (samples.SampleError and the reader)
ERROR_REASONS = ("bad_array", "missing_members", "bad_json", "nonfinite_l1", "unreadable_shard",
                 "size_mismatch", "bad_sample")
LAZY_MIN_BYTES = 1 << 20  # members this large stay on disk until read into their batch

log = get_logger(__name__)


class DataError(Exception):
    """Shards or settings that cannot feed the run; the message says what to do."""


def slot_rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


@dataclasses.dataclass
class ShardSet:
    root: str
    split: str
    sizes: dict[str, int]  # path relative to root -> samples, this split only
    stats: dict
    source: ShardSource | None = None  # None: the local folder ``root``
    header: dict = dataclasses.field(default_factory=dict)  # shard_format.header

    @classmethod
    def open(cls, root: str, split: str, strict: bool = True) -> ShardSet:
        """The shards of ``split`` in ``root``: a local folder, a URL prefix, a ``pipe:``
        command or a shard list (``train/shard_source.py``). ``strict``: also fail when a
        local shard's byte size differs from the one make_shards recorded (truncated or
        rewritten); otherwise the reader finds and counts the damage. Remote shards are
        not probed at start; damage is found (and named) while they are streamed."""
        try:
            source = ShardSource.parse(root)
        except SourceError as e:
            raise DataError(str(e)) from None
        if not source.local:
            return cls._open_remote(source, split)
        root = source.root
        sizes_path = os.path.join(root, "sizes.json")
        if not os.path.isdir(root):
            raise DataError(f"shard folder {root} does not exist; make it with "
                            "python -m data_prep.make_shards INPUT_DIR " + root)
        for name in ("sizes.json", "stats.json"):
            if not os.path.exists(os.path.join(root, name)):
                raise DataError(f"{os.path.join(root, name)} is missing: {root} is not a "
                                "finished shard folder (re-run data_prep.make_shards)")
        sizes = _split_sizes(read_json(sizes_path), split, source, sizes_path)
        on_disk = {}  # one stat per shard: existence and byte size
        for k in sizes:
            try:
                on_disk[k] = os.stat(os.path.join(root, k)).st_size
            except FileNotFoundError:
                pass
        missing = [k for k in sizes if k not in on_disk]
        if missing:
            raise DataError(f"{sizes_path} lists {len(missing)} {split} shards that do not "
                            f"exist, e.g. {missing[0]}; sizes.json disagrees with the shards")
        header, head_path = _read_header(source)
        expected = header.get("shard_bytes", {})
        wrong = {k: n for k, n in on_disk.items() if k in expected and n != expected[k]}
        if strict and wrong:
            k = sorted(wrong)[0]
            raise DataError(
                f"{len(wrong)} {split} shard(s) in {root} differ in size from {head_path} "
                f"(truncated or rewritten), e.g. {k}: {wrong[k]} bytes, "
                f"{os.path.basename(head_path)} says {expected[k]}; re-create them (data_prep.make_shards ... --overwrite) or set "
                "data.on_error=skip to train without the samples they lose (counted)")
        return cls(root, split, dict(sorted(sizes.items())),
                   read_json(os.path.join(root, shard_format.STATS)), source, header)

    @classmethod
    def _open_remote(cls, source: ShardSource, split: str) -> ShardSet:
        try:
            sizes_json = source.read_json(shard_format.SIZES)
            stats = source.read_json(shard_format.STATS)
        except SourceError as e:
            raise DataError(f"{e}: {source.root} is not a reachable, finished shard folder "
                            "(make_shards writes sizes.json, stats.json, header.json, "
                            "manifest.json)") from None
        sizes = _split_sizes(sizes_json, split, source, source.address(shard_format.SIZES))
        header, _ = _read_header(source)
        return cls(source.root, split, dict(sorted(sizes.items())), stats, source, header)

    def raw_samples(self, name: str, retries: int = 3) -> Iterator[dict]:
        """Raw samples of one shard in file order (local: large members stay lazy)."""
        if self.source is None or self.source.local:
            return samples.iter_tar(os.path.join(self.root, name), LAZY_MIN_BYTES)
        return iter(RemoteShardReader(self.source, name, self.sizes[name], retries))

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    @property
    def channels(self) -> int:
        """Spectral channels of the tiles (from the normalisation statistics)."""
        return len(self.stats["l1"]["mean"])

    @property
    def tile_size(self) -> int | None:
        """Tile height = width in pixels, or None when the folder does not say."""
        return shard_format.tile_size(self.header)


def _split_sizes(sizes_json: dict, split: str, source: ShardSource, where: str) -> dict:
    sizes = {k: int(v) for k, v in sizes_json.items()
             if k.startswith(split + "/") and int(v) > 0}
    listed = [k for k in (source.listed or ()) if k.startswith(split + "/")]
    if listed:
        unknown = [k for k in listed if k not in sizes_json]
        if unknown:
            raise DataError(f"data.shards lists {len(unknown)} shard(s) that {where} does not "
                            f"know, e.g. {unknown[0]}; their sample counts are needed for "
                            "exact epochs")
        sizes = {k: sizes[k] for k in listed if k in sizes}
    if not sizes:
        raise DataError(f"no {split} shards listed in {where}")
    return sizes


_FALLBACK_NOTED: set[str] = set()


def _read_header(source: ShardSource) -> tuple[dict, str]:
    """The folder's header (``shard_format.HEADER``: format, orders, tile size, shard byte
    sizes) and the address it came from, checked against this code's contract. A folder
    written before header.json existed: the header of the whole manifest.json, with a
    logged note (once per folder and process). A local folder with neither file: {} (not
    checked). Raises DataError naming the file on a contract mismatch, or when a remote
    folder has neither file."""
    head, man = source.address(shard_format.HEADER), source.address(shard_format.MANIFEST)
    if source.local and not os.path.exists(head):
        if not os.path.exists(man):
            return {}, head
        err = f"{head} does not exist"
    else:
        try:
            header = source.read_json(shard_format.HEADER)
        except SourceError as e:
            header, err = None, str(e)
        if header is not None:
            _check_manifest(header, head)
            return header, head
    try:
        data = source.read_bytes(shard_format.MANIFEST)
        manifest = json.loads(data)
    except (OSError, ValueError, SourceError) as e:
        raise DataError(f"{err}, and {man} cannot be read either ({e}): {source.root} is "
                        "not a finished shard folder (make_shards and convert_pt_tiles write "
                        "both)") from None
    if source.root not in _FALLBACK_NOTED:
        _FALLBACK_NOTED.add(source.root)
        log.info(f"{err}; the header was taken from {man} instead ({len(data):,} "
                 "bytes read). Folders written before header.json existed lack it; "
                 "python -m data_prep.inspect_shards FOLDER --write-header adds it")
    _check_manifest(manifest, man)
    return shard_format.header(manifest), man


def _check_manifest(manifest: dict, where: str) -> None:
    try:
        shard_format.check_manifest(manifest, where)
    except shard_format.ShardFormatError as e:
        raise DataError(str(e)) from None


def plan_epoch(sizes: dict[str, int], slots: int, seed: int, epoch: int) -> list[list[str]]:
    """Shards of each slot for one epoch: a seeded shuffle, then each shard to the slot with
    the fewest samples so far (ties: lowest slot). Deterministic, the same on all ranks."""
    names = sorted(sizes)
    order = slot_rng(seed, epoch, 7).permutation(len(names))
    load = [0] * slots
    plan: list[list[str]] = [[] for _ in range(slots)]
    for i in order:
        s = min(range(slots), key=lambda j: (load[j], j))
        plan[s].append(names[i])
        load[s] += sizes[names[i]]
    return plan


class ShardStream(IterableDataset):
    """One rank's share of a split; each DataLoader worker is one slot of the plan."""

    def __init__(self, shards: ShardSet, cfg, rank: int, world_size: int, train: bool,
                 transform: L2Transform | None = None):
        super().__init__()
        self.shards, self.cfg = shards, cfg
        self.rank, self.world = rank, world_size
        self.train = train
        self.mode = cfg.mode if train else "epoch"
        self.workers = max(1, cfg.num_workers)
        self.slots = self.world * self.workers
        self.batch_size = cfg.batch_size
        self.transform = transform or L2Transform(shards.stats["l2"], cfg.l2_transform)
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch already consumed (resume)
        # elastic resume: samples of this epoch consumed under an earlier layout (shard ->
        # keys), the nominal samples they stand for (resampled mode), and how many such
        # earlier segments there were (a fresh random stream for each)
        self.exclude: dict[str, set[str]] = {}
        self.excluded_nominal = 0
        self.segment = 0
        if self.mode not in ("epoch", "resampled"):
            raise DataError(f"data.mode must be 'epoch' or 'resampled', not {self.mode!r}")
        if self.mode == "epoch" and train and len(shards.sizes) < self.slots:
            raise DataError(
                f"{shards.split}: {len(shards.sizes)} shards cannot feed {self.world} ranks x "
                f"{self.workers} workers = {self.slots} readers in epoch mode; make more, "
                "smaller shards (make_shards --shard-size), lower data.num_workers, or set "
                "data.mode=resampled")
        self._template = None
        self._staging: np.ndarray | None = None

    # -- sizes -------------------------------------------------------------------------
    def batches_per_slot(self, epoch: int) -> int:
        """Batches of each slot in ``epoch``; in an epoch resumed under another layout, those
        that cover the samples not consumed yet (0 when none is left)."""
        b = self.batch_size
        resumed = self.segment > 0 and epoch == self.epoch
        if self.mode == "resampled":
            n = self.cfg.samples_per_epoch or self.shards.total
            if resumed:
                return max(0, math.ceil((n - self.excluded_nominal) / (self.slots * b)))
            return max(1, math.ceil(n / (self.slots * b)))
        plan = plan_epoch(self.shards.sizes, self.slots, self.cfg.seed + 1000 * self.train,
                          epoch)
        left = [sum(self.shards.sizes[s] - (len(self.exclude.get(s, ())) if resumed else 0)
                    for s in p) for p in plan]
        n = max(math.ceil(k / b) for k in left)
        return n if resumed else max(1, n)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return self.batches_per_slot(self.epoch) * self.workers

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if epoch != self.epoch:
            self.exclude, self.excluded_nominal, self.segment = {}, 0, 0
        self.epoch, self.skip_batches = epoch, skip_batches

    # -- stages --------------------------------------------------------------------------
    def _shard_sequence(self, slot: int, rng: np.random.Generator) -> Iterator[str]:
        if self.mode == "resampled":
            names = sorted(self.shards.sizes)
            p = np.asarray([self.shards.sizes[n] for n in names], np.float64)
            p /= p.sum()
            while True:
                yield names[int(rng.choice(len(names), p=p))]
        plan = plan_epoch(self.shards.sizes, self.slots, self.cfg.seed + 1000 * self.train,
                          self.epoch)
        yield from plan[slot]

    def _tar_samples(self, shard_names: Iterator[str], counters: dict) -> Iterator[dict]:
        for name in shard_names:
            path = os.path.join(self.shards.root, name)
            want = self.shards.sizes[name]
            seen = self.exclude.get(name, ()) if self.segment else ()
            n = 0
            try:
                for raw in self.shards.raw_samples(name, self.cfg.shard_retries):
                    n += 1
                    if raw.get("__key__") in seen:
                        continue  # consumed before an elastic resume
                    raw["__shard__"] = name
                    yield raw
            except samples.ShardError as e:
                self._fail(e, counters, missing=max(0, want - n))
                continue
            if n != want:
                self._fail(samples.SampleError(
                    f"{path}: {n} samples, sizes.json says {want}", "size_mismatch"),
                    counters, missing=max(0, want - n))

    def _fail(self, err: samples.SampleError, counters: dict, missing: int = 1) -> None:
        if self.cfg.on_error != "skip":
            raise err
        counters[err.reason] = counters.get(err.reason, 0) + max(1, missing)

    def _shuffled(self, it: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        if not self.train or self.cfg.shuffle_buffer <= 1:
            yield from it
            return
        size = self.cfg.shuffle_buffer
        initial = max(1, min(self.cfg.shuffle_initial, size))
        buf: list[dict] = []

        def pop_random() -> dict:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            return buf.pop()

        it = iter(it)
        for s in it:
            buf.append(s)
            if len(buf) < size:  # grow towards `size`: read one extra per output
                extra = next(it, None)
                if extra is not None:
                    buf.append(extra)
            if len(buf) >= initial:
                yield pop_random()
        while buf:
            yield pop_random()

    def _decode(self, raw: dict) -> dict:
        """Arrays are views of the tar member buffers; a large L1 stays a LazyArray that
        the batch stage reads straight into the batch tensor."""
        s = samples.decode(raw, raw["__shard__"])
        if isinstance(s["l1"], np.ndarray):
            self._check_finite(torch.from_numpy(s["l1"]), raw["__shard__"], s["__key__"])
        return {"key": s["__key__"], "shard": raw["__shard__"], "l1": s["l1"], "l2": s["l2"],
                "geo": s["geo"], "aug": (0, False)}

    @staticmethod
    def _check_finite(x: torch.Tensor, shard: str, key: str) -> None:
        lo, hi = torch.aminmax(x)  # NaN propagates; much cheaper than isfinite on fp16
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise samples.SampleError(f"{shard} sample '{key}': l1 holds NaN or Inf",
                                      "nonfinite_l1")

    @staticmethod
    def _dihedral(x: np.ndarray, k: int, flip: bool) -> np.ndarray:
        """Flip, then rotate by k x 90 degrees, over the last two axes (a view)."""
        if flip:
            x = np.flip(x, axis=-1)
        if k:
            x = np.rot90(x, k, axes=(-2, -1))
        return x

    def _augment(self, s: dict, k: int, flip: bool) -> dict:
        """Views for L2 and geo; L1 is transformed as it is copied into the batch."""
        s["l2"] = self._dihedral(s["l2"], k, flip)
        s["geo"] = self._dihedral(s["geo"], k, flip)
        s["aug"] = (k, flip)
        return s

    @staticmethod
    def _alloc(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """Batch tensor, in shared memory inside a worker so that handing it to the main
        process costs no further copy."""
        if get_worker_info() is not None:
            proto = torch.empty(0, dtype=dtype)
            return proto.new(proto._typed_storage()._new_shared(math.prod(shape))).view(shape)
        return torch.empty(shape, dtype=dtype)

    def _stack(self, arrays: list[np.ndarray]) -> torch.Tensor:
        dtype = torch.from_numpy(np.empty(0, arrays[0].dtype)).dtype
        out = self._alloc((len(arrays),) + arrays[0].shape, dtype)
        dst = out.numpy()
        for i, a in enumerate(arrays):
            dst[i] = a
        return out

    def _stack_l1(self, items: list[dict], real: list[bool], counters: dict) -> torch.Tensor:
        """Read each L1 payload from its shard straight into the batch (identity) or via a
        reused staging buffer (flipped / rotated); check finiteness per sample (a sample that
        fails is counted as an error, zeroed and flagged ``real=False`` like padding)."""
        first = items[0]["l1"]
        out = self._alloc((len(items),) + tuple(first.shape), torch.float16)
        dst = out.numpy()
        for i, s in enumerate(items):
            a, (k, flip) = s["l1"], s["aug"]
            where = f"{s['shard']} sample '{s['key']}'"
            if isinstance(a, samples.LazyArray):
                if k or flip:
                    if self._staging is None or self._staging.shape != a.shape:
                        self._staging = np.empty(a.shape, a.dtype)
                    a.read_into(self._staging, where)
                    dst[i] = self._dihedral(self._staging, k, flip)
                else:
                    a.read_into(dst[i], where)
                try:
                    self._check_finite(out[i], s["shard"], s["key"])
                except samples.SampleError as e:
                    self._fail(e, counters)
                    dst[i] = 0
                    real[i] = False
            else:
                dst[i] = self._dihedral(a, k, flip)
        return out

    def _collate(self, items: list[dict], real: list[bool], counters: dict) -> dict:
        l2 = self._stack([s["l2"] for s in items])  # (B, 4, H, W) physical
        return {
            "l1": self._stack_l1(items, real, counters),  # (B, C, H, W) float16
            "l2": l2,
            "l2_t": self.transform.forward(l2),  # (B, 4, H, W) model space
            "geo": self._stack([s["geo"] for s in items]),
            "real": torch.tensor(real, dtype=torch.bool),  # (B,) False: padding
            "keys": [s["key"] for s in items],
            "errors": dict(counters),
        }

    def _template_sample(self) -> dict:
        """Any decodable sample (the first one found), used only as padding (real=False)."""
        if self._template is None:
            for name in sorted(self.shards.sizes):
                try:
                    for raw in self.shards.raw_samples(name, self.cfg.shard_retries):
                        raw["__shard__"] = name
                        try:
                            self._template = self._decode(raw)
                            break
                        except samples.SampleError:
                            continue
                except samples.ShardError:
                    continue
                if self._template is not None:
                    break
            if self._template is None:
                raise DataError(f"no readable sample in any {self.shards.split} shard of "
                                f"{self.shards.root}")
        return dict(self._template)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        n_workers = info.num_workers if info is not None else 1
        if n_workers != self.workers:
            raise DataError(f"loader built for {self.workers} workers but runs with {n_workers}")
        yield from self._batches(worker)

    def _batches(self, worker: int, consumed: set | None = None,
                 n_consumed: int | None = None) -> Iterator[dict]:
        """The batches of one worker slot of this rank. With ``consumed`` (a set), yield
        nothing: add (shard, key) of every sample of the slot's first ``n_consumed`` batches
        (what a run that stopped there had consumed) to it."""
        slot = self.rank * self.workers + worker
        split_id = SPLIT_IDS.get(self.shards.split, 2)
        rng = slot_rng(self.cfg.seed, self.epoch, self.rank, worker, split_id,
                       *((self.segment,) if self.segment else ()))
        n_batches = self.batches_per_slot(self.epoch)
        # batches of this worker among the first `skip_batches` of the rank (round robin)
        skip = max(0, (self.skip_batches - worker + self.workers - 1) // self.workers)
        if consumed is not None:
            n_batches = skip = min(n_batches, n_consumed or 0)
        counters: dict[str, int] = {}
        stream = self._shuffled(self._tar_samples(self._shard_sequence(slot, rng), counters), rng)
        b = self.batch_size
        for i in range(n_batches):
            items, real = [], []
            while len(items) < b:
                raw = next(stream, None)
                if raw is None:
                    break
                # draw augmentation parameters for every sample, skipped or not, so that a
                # resumed run sees exactly the same random stream
                k, flip = (int(rng.integers(4)), bool(rng.integers(2))) \
                    if self.train and self.cfg.augment else (0, False)
                if consumed is not None:  # a failed sample is not read again either
                    consumed.add((raw["__shard__"], raw.get("__key__")))
                try:
                    s = self._decode(raw)  # also when skipping: errors shape the batches
                except samples.SampleError as e:
                    self._fail(e, counters)
                    continue
                if i < skip:
                    items.append(None)
                    real.append(True)
                    continue
                items.append(self._augment(s, k, flip) if (k or flip) else s)
                real.append(True)
            if i < skip:
                counters.clear()  # already counted before the checkpoint
                continue
            if not items:
                items, real = [self._template_sample()], [False]
            while len(items) < b:  # pad: copies flagged not real
                items.append(dict(items[-1]))
                real.append(False)
            yield self._collate(items, real, counters)
            counters.clear()


def consumed_samples(shards: ShardSet, cfg, epoch: int, segments: list[dict]
                     ) -> tuple[dict[str, set[str]], int]:
    """The training samples of ``epoch`` consumed by earlier runs of it, as shard -> keys,
    and the nominal sample count they stand for (resampled mode). ``segments``: in order,
    the layouts that ran this epoch ({world_size, num_workers, batch_size, batches}:
    batches consumed per rank under that layout). Replays each segment's sample order
    (headers and small members only; no L1 payload is read): deterministic, so every rank
    finds the same set."""
    exclude: dict[str, set[str]] = {}
    nominal = 0
    for n, seg in enumerate(segments):
        world, workers = int(seg["world_size"]), int(seg["num_workers"])
        b = int(seg["batch_size"])
        nominal += int(seg["batches"]) * world * b
        if cfg.mode == "resampled":
            continue
        seg_cfg = dataclasses.replace(cfg, batch_size=b, num_workers=workers)
        found: set = set()
        for rank in range(world):
            stream = ShardStream(shards, seg_cfg, rank, world, train=True)
            stream.set_epoch(epoch)
            stream.exclude, stream.segment = exclude, n
            for worker in range(workers):
                mine = max(0, (int(seg["batches"]) - worker + workers - 1) // workers)
                for _ in stream._batches(worker, found, mine):
                    pass
        exclude = {k: set(v) for k, v in exclude.items()}
        for shard, key in found:
            exclude.setdefault(shard, set()).add(key)
    return exclude, nominal


@dataclasses.dataclass
class LoaderState:
    epoch: int = 0
    batches_consumed: int = 0  # in the current epoch, on this rank (the same on every rank)
    # earlier parts of this epoch run under other layouts (see consumed_samples)
    segments: list = dataclasses.field(default_factory=list)


class ShardLoader:
    """Epoch-aware wrapper around a DataLoader of a ShardStream; records its position."""

    def __init__(self, dataset: ShardStream, cfg):
        self.dataset, self.cfg = dataset, cfg
        self.state = LoaderState()
        self.errors: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def shards(self) -> ShardSet:
        """The shard set this loader reads (its statistics, header and sizes)."""
        return self.dataset.shards

    @property
    def transform(self):
        """The L2 transforms (train.transforms.L2Transform) applied to its batches."""
        return self.dataset.transform

    def set_epoch(self, epoch: int) -> None:
        self.state = LoaderState(epoch, 0)
        self.dataset.set_epoch(epoch)

    def layout(self) -> dict:
        """What the sample order of an epoch depends on besides seeds and shards."""
        d = self.dataset
        return {"world_size": d.world, "num_workers": d.workers, "batch_size": d.batch_size}

    def state_dict(self) -> dict:
        return self.position() | {"errors": dict(self.errors)}

    def position(self) -> dict:
        """Where the run is in its data, the same on every rank: the epoch, the batches
        this layout consumed in it, and the earlier layouts' segments of it."""
        return {"epoch": self.state.epoch, "batches_consumed": self.state.batches_consumed,
                "segments": [dict(s) for s in self.state.segments]}

    def load_state_dict(self, d: dict) -> None:
        """Same layout as the one that saved ``d``: continue exactly where it stopped."""
        self.state = LoaderState(int(d["epoch"]), int(d["batches_consumed"]),
                                 [dict(s) for s in d.get("segments", [])])
        self.errors = dict(d.get("errors", {}))
        self._apply_segments()

    def restore(self, position: dict, layout: dict, errors: dict) -> None:
        """Continue from ``position`` saved under ``layout`` (world_size, num_workers,
        batch_size of the run that saved it). The same layout continues the sample stream
        exactly; another one continues the epoch with every sample it has not consumed yet,
        each exactly once (elastic resumption), then starts the next epoch as usual."""
        mine = self.layout()
        old = {k: layout.get(k) for k in mine}
        if old == mine or old["world_size"] is None:
            self.load_state_dict(position | {"errors": errors})
            return
        segments = [dict(s) for s in position.get("segments", [])]
        if int(position["batches_consumed"]):
            segments.append(old | {"batches": int(position["batches_consumed"])})
        self.state = LoaderState(int(position["epoch"]), 0, segments)
        self.errors = dict(errors)
        self._apply_segments()

    def _apply_segments(self) -> None:
        d = self.dataset
        d.set_epoch(self.state.epoch, self.state.batches_consumed)
        if not self.state.segments:
            return
        d.exclude, d.excluded_nominal = consumed_samples(d.shards, d.cfg, self.state.epoch,
                                                         self.state.segments)
        d.segment = len(self.state.segments)

    def __iter__(self) -> Iterator[dict]:
        """Yield the rest of the current epoch, counting what is consumed."""
        self.dataset.set_epoch(self.state.epoch, self.state.batches_consumed)
        if self.state.batches_consumed >= len(self.dataset):
            return
        nw = self.cfg.num_workers
        loader = DataLoader(self.dataset, batch_size=None, num_workers=nw,
                            pin_memory=self.cfg.pin_memory,
                            prefetch_factor=self.cfg.prefetch_factor if nw > 0 else None,
                            persistent_workers=False,
                            multiprocessing_context="fork" if nw > 0 else None,
                            worker_init_fn=_ignore_stop_signals if nw > 0 else None)
        for batch in loader:
            for k, v in batch.pop("errors").items():
                self.errors[k] = self.errors.get(k, 0) + v
            self.state.batches_consumed += 1
            yield batch


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave stop signals to their rank: SLURM and `kill -- -PGID` signal every
    process, and a worker that died of SIGTERM would fail the rank before it can save."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def build_loader(cfg, split: str, rank: int = 0, world_size: int = 1,
                 train: bool | None = None) -> ShardLoader:
    """Loader of ``split`` ('train' or 'val') for one rank, from the ``data`` config section."""
    shards = ShardSet.open(cfg.shards, split, strict=cfg.on_error != "skip")
    is_train = (split == "train") if train is None else train
    if not is_train and cfg.num_workers > 0:
        # validation: never more readers than shards (padding covers the rest)
        cfg = dataclasses.replace(cfg, num_workers=max(
            0, min(cfg.num_workers, len(shards.sizes) // max(1, world_size))))
    return ShardLoader(ShardStream(shards, cfg, rank, world_size, is_train), cfg)

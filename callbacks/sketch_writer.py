"""Writing sketch files (``sketches/epoch=<E>/<mask>/<split>.npy`` + ``.json``) so that a killed
run resumes where it stopped and DDP ranks write shards that merge into the very file one
process would write.

Each rank writes its share of a file into a shard: ``<stem>.npy.partial`` (an ``np.save``-format
memory map, N_rank×d float32), ``<stem>.meta.partial`` (loss, prediction; memory map),
``<stem>.index.partial`` (the rank's dataset indices), ``<stem>.done.partial`` (the done map, one
byte per row) and ``<stem>.partial.json`` (what the shard holds: projection, layers, model,
indices). The done map lives in memory and is saved (atomically) only right after the rows have
been flushed to disk, every ``ShardStore.persist_every`` seconds and when the pass ends or fails:
so a row marked done on disk is on disk, even after a power cut, and a killed run loses at most
the last few seconds of work. The stem is
``<split>`` for a single process, so its shard *is* the final file's ``.npy.partial`` and
finishing is a rename; under DDP it is ``<split>.rank<r>of<W>`` and rank 0 merges the shards
row by row, by dataset index. Finishing writes the sidecar under a temporary name, renames the
``.npy.partial`` to ``.npy``, then the sidecar into place: a file with a sidecar is complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from analysis.atomic import atomic_write, raise_if_disk_full
from analysis.atomic import write_text_atomic as atomic_write_text
from analysis.sketch_store import ROW_KEYS, SketchError, check_compatible, read_sidecar

log = logging.getLogger(__name__)



def allocated_memmap(path: Path, dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new ``np.save``-format memory map whose disk blocks are reserved now: a full disk fails here,
    with an error naming the file, instead of killing the process (SIGBUS) when a row is written later."""
    array = None
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        with open(path, "r+b") as f:
            if hasattr(os, "posix_fallocate"):  # not on macOS
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as err:
        if array is not None and err.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return array  # a file system that cannot reserve blocks: written as before
        del array
        path.unlink(missing_ok=True)
        raise_if_disk_full(err, path)
        raise
    return array


def indices_digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclass
class SketchTarget:
    """One sketch file to write: where, what it is (sidecar identity), and which examples.

    Args:
        npy: the final ``<split>.npy`` path.
        identity: the sidecar keys that describe the content (all but the per-row lists).
        indices: ascending dataset indices of the rows.
    """

    npy: Path
    identity: dict
    indices: np.ndarray

    @property
    def sidecar_path(self) -> Path:
        return self.npy.with_suffix(".json")

    @property
    def split(self) -> str:
        return self.identity["split"]

    def shard_stem(self, rank: int, world: int) -> Path:
        stem = self.split if world == 1 else f"{self.split}.rank{rank}of{world}"
        return self.npy.with_name(stem)

    def is_finished(self) -> bool:
        """True when the file and its sidecar exist, hold these rows (or more) and match the identity.

        A finished file written with other options or another model is refused with a message naming
        it; one that lacks some of the rows is rewritten with the rows this run needs.
        """
        side = self.sidecar_path
        tmp = side.with_name(side.name + ".final")
        if self.npy.is_file() and not side.is_file() and tmp.is_file():
            os.replace(tmp, side)  # a finish interrupted between its two renames
        if not (self.npy.is_file() and side.is_file()):
            return False
        existing = read_sidecar(side)
        check_compatible(
            [
                (f"this run's {self.split} sketches ({_describe(self.identity)})", self.identity),
                (side, existing),
            ],
            same_model=True,
        )
        held = np.asarray(existing["indices"], dtype=np.int64)
        if np.setdiff1d(self.indices, held).size:
            return False  # needs rows the file lacks (a condition added later): it is rewritten
        if self.split == "train" and held.size != self.indices.size:
            return False  # another training pool (influence.train_per_language changed): every mask must hold the same rows
        for stale in self.npy.parent.glob(f"{self.split}.*partial*"):  # a finish killed while tidying up
            stale.unlink(missing_ok=True)
        return True


def _describe(identity: dict) -> str:
    p = identity["projection"]
    return f"{p['kind']} k={p.get('k')} pairs={p.get('pairs')} {p.get('combine')} seed={p['seed']}, d={identity['d']}"


@dataclass
class SketchJob:
    """One pass over a split: every example of a language listed in ``lang_masks`` is sketched
    under that language's mask and written to that mask's target.

    Args:
        split: ``train`` or ``test``.
        epoch: the checkpoint's epoch.
        targets: mask name -> its file.
        lang_masks: language index -> mask name (languages absent are not sketched in this pass).
        head_masks: mask name -> L×H 0/1 array (None: no gating, i.e. ``full``).
        dataset: the split's ``ExampleDataset`` (ids, languages and labels for the sidecar).
        languages: the run's language codes.
    """

    split: str
    epoch: int
    targets: dict[str, SketchTarget]
    lang_masks: dict[int, str]
    head_masks: dict[str, np.ndarray | None]
    dataset: object
    languages: list[str]
    label: str = field(default="")


class ShardStore:
    """One rank's share of one target, in resumable ``.partial`` files."""

    persist_every = 10.0  # seconds between saves of the done map

    def __init__(self, target: SketchTarget, share: np.ndarray, rank: int, world: int):
        self.target, self.rank, self.world = target, rank, world
        self.share = np.asarray(share, dtype=np.int64)
        stem = target.shard_stem(rank, world)
        self.npy = stem.with_name(stem.name + ".npy.partial")
        self.done_path = stem.with_name(stem.name + ".done.partial")
        self.meta_path = stem.with_name(stem.name + ".meta.partial")
        self.index_path = stem.with_name(stem.name + ".index.partial")
        self.header_path = stem.with_name(stem.name + ".partial.json")
        self.rows = self.done = self.meta = None

    @classmethod
    def existing(cls, target: SketchTarget, rank: int, world: int) -> ShardStore:
        """A rank's shard as left on disk (for the merge)."""
        store = cls(target, np.empty(0, dtype=np.int64), rank, world)
        try:
            store.share = np.load(store.index_path, allow_pickle=False)
            header = json.loads(store.header_path.read_text(encoding="utf-8"))
            done = np.load(store.done_path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise SketchError(f"{store.npy}: shard of rank {rank} is missing or unreadable ({err})") from None
        if header != store.header() or not done.all():
            raise SketchError(f"{store.npy}: shard of rank {rank} is incomplete or belongs to another run")
        return store

    def header(self) -> dict:
        """What the shard holds; a partial shard is resumed only when this matches exactly."""
        return json.loads(
            json.dumps(
                {
                    "identity": self.target.identity,
                    "target_indices": indices_digest(self.target.indices),
                    "share": indices_digest(self.share),
                    "n": int(self.share.size),
                    "rank": self.rank,
                    "world": self.world,
                }
            )
        )

    def files(self) -> list[Path]:
        return [self.npy, self.done_path, self.meta_path, self.index_path, self.header_path]

    def open(self) -> int:
        """Open (resuming when the partial files on disk hold this very shard); returns rows already done."""
        n, d = int(self.share.size), int(self.target.identity["d"])
        self._saved = time.monotonic()
        if self._resumable(n, d):
            self.rows = np.lib.format.open_memmap(self.npy, mode="r+")
            self.meta = np.lib.format.open_memmap(self.meta_path, mode="r+")
            self.done = np.load(self.done_path, allow_pickle=False)
            return int(self.done.sum())
        self.remove()
        try:
            self.npy.parent.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(self.index_path, mode="w+", dtype=np.int64, shape=(n,))[:] = self.share
            self.rows = allocated_memmap(self.npy, np.float32, (n, d))
            self.meta = allocated_memmap(self.meta_path, np.float64, (n, 2))
            self.done = np.zeros(n, dtype=np.uint8)
            self._save_done()
            atomic_write_text(self.header_path, json.dumps(self.header()))  # last: the shard now exists
        except OSError as err:
            self.rows = self.meta = None
            self.remove()
            raise_if_disk_full(err, self.npy)
            raise
        return 0

    def _save_done(self) -> None:
        """Flush the rows, then save the done map that vouches for them."""
        self.rows.flush()
        self.meta.flush()
        with atomic_write(self.done_path, "wb") as f:
            np.save(f, self.done)
        self._saved = time.monotonic()

    def _resumable(self, n: int, d: int) -> bool:
        if not all(p.is_file() for p in self.files()):
            return False
        try:
            header = json.loads(self.header_path.read_text(encoding="utf-8"))
            shapes = tuple(
                np.load(p, mmap_mode="r", allow_pickle=False).shape
                for p in (self.npy, self.done_path, self.meta_path)
            )
            index = np.load(self.index_path, allow_pickle=False)
        except (OSError, ValueError):
            return False
        if (
            header != self.header()
            or shapes != ((n, d), (n,), (n, 2))
            or not np.array_equal(index, self.share)
        ):
            log.info("%s: partial sketches from another configuration; starting this file afresh", self.npy)
            return False
        return True

    def positions(self, dataset_indices: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.share, dataset_indices)
        if (pos >= self.share.size).any() or not np.array_equal(self.share[pos], dataset_indices):
            raise RuntimeError(
                f"{self.npy}: examples {dataset_indices.tolist()} are not in this rank's share"
            )
        return pos

    def is_done(self, dataset_indices: np.ndarray) -> np.ndarray:
        return self.done[self.positions(dataset_indices)].astype(bool)

    def write(
        self, dataset_indices: np.ndarray, sketches: np.ndarray, loss: np.ndarray, pred: np.ndarray
    ) -> None:
        pos = self.positions(dataset_indices)
        self.rows[pos] = sketches
        self.meta[pos, 0] = loss
        self.meta[pos, 1] = pred
        self.done[pos] = 1
        if time.monotonic() - self._saved > self.persist_every:
            self._save_done()

    def complete(self) -> bool:
        return self.done is not None and bool(self.done.all())

    def close(self) -> None:
        if self.rows is not None:
            self._save_done()
        self.rows = self.done = self.meta = None

    def remove(self) -> None:
        for path in self.files():
            path.unlink(missing_ok=True)


def finish_target(
    target: SketchTarget, world: int, dataset, languages: list[str], model_fingerprint: str | None = None
) -> Path:
    """Merge the ranks' complete shards into ``<split>.npy`` and write the sidecar (rank 0 only).

    ``model_fingerprint`` replaces the identity's when it was not known while sketching (the
    fit-time callback sketches before the epoch's checkpoint file exists).
    """
    n, d = int(target.indices.size), int(target.identity["d"])
    shards = [ShardStore.existing(target, rank, world) for rank in range(world)]
    loss = np.empty(n, dtype=np.float64)
    pred = np.empty(n, dtype=np.int64)
    final_partial = target.npy.with_name(target.npy.name + ".partial")
    if world == 1:  # the single shard is the file itself
        if not np.array_equal(shards[0].share, target.indices):
            raise SketchError(f"{shards[0].npy}: holds other rows than {target.npy} needs")
        meta = np.load(shards[0].meta_path, mmap_mode="r")
        loss[:], pred[:] = meta[:, 0], meta[:, 1]
    else:
        out = allocated_memmap(final_partial, np.float32, (n, d))
        covered = np.zeros(n, dtype=bool)
        for store in shards:
            pos = np.searchsorted(target.indices, store.share)
            if (pos >= n).any() or not np.array_equal(target.indices[pos], store.share) or covered[pos].any():
                raise SketchError(f"{store.npy}: rows overlap another rank's or are not in {target.npy.name}")
            covered[pos] = True
            out[pos] = np.load(store.npy, mmap_mode="r")
            meta = np.load(store.meta_path, mmap_mode="r")
            loss[pos], pred[pos] = meta[:, 0], meta[:, 1]
        if not covered.all():
            raise SketchError(f"{target.npy}: the ranks' shards miss {int((~covered).sum())} of {n} rows")
        out.flush()
        del out
    examples = dataset.examples
    records = [examples[int(i)].record for i in target.indices]
    sidecar = dict(target.identity)
    sidecar.update(
        n=n,
        indices=target.indices.tolist(),
        ids=[str(r.id) for r in records],
        langs=[r.lang for r in records],
        labels=[int(r.label) for r in records],
        loss=loss.tolist(),
        pred=pred.tolist(),
        correct=[bool(p == r.label) for p, r in zip(pred.tolist(), records)],
        languages=list(languages),
    )
    if model_fingerprint is not None:
        sidecar["model_fingerprint"] = model_fingerprint
    side = target.sidecar_path
    staged = side.with_name(side.name + ".final")
    atomic_write_text(staged, json.dumps(sidecar))
    os.replace(final_partial, target.npy)
    os.replace(staged, side)
    for store in shards:
        for path in store.files():
            if path != final_partial:
                path.unlink(missing_ok=True)
    return target.npy


def write_shared_target(target: SketchTarget, source: Path, same_as: str) -> Path:
    """Write ``target`` from the rows of a finished file of an equal mask (``source``), without
    sketching: the rows are the numbers a pass under ``target``'s mask would compute. The sidecar
    is the target's, plus ``same_as`` naming the mask that was sketched. Temporary names, then
    renames, as ``finish_target``."""
    side_src = read_sidecar(source.with_suffix(".json"))
    array = np.load(source, mmap_mode="r", allow_pickle=False)
    held = np.asarray(side_src["indices"], dtype=np.int64)
    pos = np.searchsorted(held, target.indices)
    if (pos >= held.size).any() or not np.array_equal(held[np.minimum(pos, held.size - 1)], target.indices):
        raise SketchError(f"{source}: lacks rows {target.npy} needs (it should have been sketched with them)")
    partial = target.npy.with_name(target.npy.name + ".partial")
    target.npy.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "wb") as f:
        np.save(f, np.ascontiguousarray(array[pos]))
    sidecar = dict(target.identity)
    sidecar.update({key: [side_src[key][i] for i in pos.tolist()] for key in ROW_KEYS})
    sidecar.update(n=int(target.indices.size), model_fingerprint=side_src["model_fingerprint"], same_as=same_as)
    side = target.sidecar_path
    staged = side.with_name(side.name + ".final")
    atomic_write_text(staged, json.dumps(sidecar))
    os.replace(partial, target.npy)
    os.replace(staged, side)
    return target.npy


class JobWriter:
    """The rank-local side of a job: one shard per target; routes sketched rows to them."""

    def __init__(self, job: SketchJob, shares: dict[str, np.ndarray], rank: int, world: int):
        self.job, self.rank, self.world = job, rank, world
        self.stores = {name: ShardStore(job.targets[name], shares[name], rank, world) for name in job.targets}

    def open(self, fresh: bool = False) -> int:
        """Open every shard (``fresh``: discard partial files instead of resuming them); rows already done."""
        if fresh:
            for store in self.stores.values():
                store.remove()
        return sum(store.open() for store in self.stores.values())

    def route(self, langs: np.ndarray) -> list[str | None]:
        return [self.job.lang_masks.get(int(lang)) for lang in langs]

    def all_done(self, indices: np.ndarray, langs: np.ndarray) -> bool:
        names = self.route(langs)
        for name in set(names) - {None}:
            sel = np.array([n == name for n in names])
            if not self.stores[name].is_done(indices[sel]).all():
                return False
        return True

    def write(self, indices, names, sketches, loss, pred) -> None:
        for name in set(names) - {None}:
            sel = np.array([n == name for n in names])
            self.stores[name].write(indices[sel], sketches[sel], loss[sel], pred[sel])

    def close(self) -> None:
        for store in self.stores.values():
            store.close()

    def incomplete(self) -> list[Path]:
        return [store.npy for store in self.stores.values() if not store.complete()]

    def finish(self, model_fingerprint: str | None = None) -> list[Path]:
        return [
            finish_target(t, self.world, self.job.dataset, self.job.languages, model_fingerprint)
            for t in self.job.targets.values()
        ]


def rank_share(loader, dataset, job: SketchJob) -> dict[str, np.ndarray]:
    """Per target: the dataset indices this rank's loader yields that go to it (ascending)."""
    examples = dataset.examples
    seen = np.array([examples[i].index for batch in loader.batch_sampler for i in batch], dtype=np.int64)
    langs = np.array([examples[i].lang for batch in loader.batch_sampler for i in batch], dtype=np.int64)
    shares = {}
    for name, target in job.targets.items():
        mine = seen[np.array([job.lang_masks.get(int(lang)) == name for lang in langs], dtype=bool)]
        shares[name] = np.intersect1d(mine, target.indices)
    return shares


class SketchWriter(BasePredictionWriter):
    """Writes what ``SketchModule.predict_step`` returns into the current job's shards and, after
    the last batch, merges them (rank 0) into the finished files.

    ``sketch_checkpoints`` (``lightning_modules/stages/sketch.py``) sets the job before each ``trainer.predict``; put one instance in the
    Trainer's callbacks (or let the stage add it).
    """

    def __init__(self):
        super().__init__(write_interval="batch")
        self.job: SketchJob | None = None
        self.writer: JobWriter | None = None
        self.finished: list[Path] = []

    def start(self, job: SketchJob) -> None:
        self.job, self.writer, self.finished = job, None, []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.job is None:
            return
        shares = getattr(pl_module, "shares", None)
        if shares is None:
            raise RuntimeError(
                "SketchWriter needs a SketchModule (from callbacks.sketch_module) as the predicted module"
            )
        self.writer = JobWriter(self.job, shares, trainer.global_rank, trainer.world_size)
        done = self.writer.open()
        if done:
            print(
                f"  rank {trainer.global_rank} resumes {self.job.label}: {done} rows sketched already",
                flush=True,
            )

    def is_done(self, indices: np.ndarray, langs: np.ndarray) -> bool:
        return self.writer is not None and self.writer.all_done(indices, langs)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        if prediction is None or self.writer is None:
            return
        self.writer.write(
            prediction["indices"],
            prediction["masks"],
            prediction["sketches"],
            prediction["loss"],
            prediction["pred"],
        )

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.writer is None:
            return
        incomplete = self.writer.incomplete()
        self.writer.close()
        if incomplete:
            raise RuntimeError(
                f"sketching ended with rows missing in {incomplete[0]} (was the predict loop limited?)"
            )
        trainer.strategy.barrier("sketch shards written")
        if trainer.is_global_zero:
            self.finished = self.writer.finish()
        trainer.strategy.barrier("sketch files finished")
        self.writer = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.writer is not None:
            self.writer.close()  # rows written so far stay, marked done, for the next run
            self.writer = None


def to_numpy_rows(sketches: torch.Tensor, loss: torch.Tensor, pred: torch.Tensor):
    return (
        sketches.detach().float().cpu().numpy(),
        loss.detach().double().cpu().numpy(),
        pred.detach().cpu().numpy().astype(np.int64),
    )

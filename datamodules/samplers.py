"""Batch samplers that know about languages and DDP ranks.

Sparse fine-tuning needs every batch to be one language (one head mask per step), every
language equally often, and under DDP *every rank on the same language at the same step*
(otherwise gradients taken under different masks are averaged). So the language order is
drawn from the seed and epoch only, identically on every rank, and each language's
examples are split between ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

BUCKET_BATCHES = 32  # batches per bucket: short enough to stay shuffled, long enough to group lengths


def bucket_by_length(order: np.ndarray, lengths: np.ndarray, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Reorder ``order`` so that each consecutive run of ``batch`` items has similar lengths.

    Padding a batch to its longest example wastes compute (bundled XNLI pairs run 10-128 tokens).
    The shuffled items are cut into buckets of ``BUCKET_BATCHES`` batches, each bucket sorted by
    length (stable), and the resulting batches shuffled: the same items per epoch, drawn from the
    same seed, with little padding."""
    order = np.asarray(order)
    span = batch * BUCKET_BATCHES
    chunks = [order[i : i + span] for i in range(0, len(order), span)]
    batches = []
    for chunk in chunks:
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    full = [b for b in batches if len(b) == batch]
    rest = [b for b in batches if len(b) != batch]
    if not full:
        return order
    picked = rng.permutation(len(full))
    return np.concatenate([full[i] for i in picked] + rest)


class _EpochRelay:
    """Lightning calls ``set_epoch`` on ``dataloader.sampler`` and ``dataloader.batch_sampler.sampler``
    but never on a custom batch sampler itself; exposed as the batch sampler's ``.sampler``, this
    relays the call so each epoch really draws a new order."""

    def __init__(self, owner: Sampler):
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class LanguageBatchSampler(Sampler[list[int]]):
    """Language-homogeneous batches, each language equally often, seeded order per epoch.

    ``langs[i]`` is the language index of dataset item ``i``. Per epoch and language, the
    items are shuffled and cut into global batches of ``batch_size * num_replicas``; rank
    ``r`` takes the ``r``-th slice of each. Every language contributes the same number of
    batches (that of the smallest language); left-over items rotate from epoch to epoch.
    """

    def __init__(self, langs: Sequence[int], batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 lengths: Sequence[int] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.langs = np.asarray(langs, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.epoch = 0
        self.sampler = _EpochRelay(self)
        self.languages = sorted(set(self.langs.tolist()))
        global_batch = batch_size * num_replicas
        counts = [int((self.langs == lang).sum()) for lang in self.languages]
        self.batches_per_language = min(counts) // global_batch if counts else 0
        if self.batches_per_language == 0:
            raise ValueError(
                f"a language has {min(counts) if counts else 0} examples, fewer than one global batch "
                f"({batch_size} x {num_replicas} ranks)"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def language_order(self) -> list[int]:
        """The language of each step this epoch (the same on every rank)."""
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        order = np.repeat(self.languages, self.batches_per_language)
        return rng.permutation(order).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, 0])
        global_batch = self.batch_size * self.num_replicas
        pools = {lang: rng.permutation(np.flatnonzero(self.langs == lang)) for lang in self.languages}
        if self.lengths is not None:
            bucket_rng = np.random.default_rng([self.seed, self.epoch, 3])
            pools = {lang: bucket_by_length(pool, self.lengths, global_batch, bucket_rng) for lang, pool in pools.items()}
        cursor = dict.fromkeys(self.languages, 0)
        for lang in self.language_order():
            start = cursor[lang]
            cursor[lang] += global_batch
            chunk = pools[lang][start : start + global_batch]
            yield chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.batches_per_language * len(self.languages)


class RankSlicedBatchSampler(Sampler[list[int]]):
    """Ordinary batches (mixed languages) over this rank's share of the data.

    Training shuffles with (seed, epoch); evaluation never pads or repeats items, so metrics
    reduced across ranks count every example exactly once. With ``lengths``, evaluation reads the
    items shortest first (every pass writes results by dataset index, so order changes no value,
    only the padding) and training batches are bucketed by length (``bucket_by_length``).
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool = False, lengths: Sequence[int] | None = None,
                 survivors: Sequence[int] | None = None):
        """``survivors`` (training only): the order is drawn over a larger split of ``len(survivors)`` items
        (``lengths`` then holds theirs) and ``survivors[i]`` is item ``i``'s position among the ``n`` trained
        on, or -1 when it is left out: a leave-out fit then sees its examples in the order the fit on the whole
        split saw them, the left-out ones deleted (``coupled_order``)."""
        if survivors is not None:
            survivors = np.asarray(survivors, dtype=np.int64)
            kept = np.sort(survivors[survivors >= 0])
            if not shuffle or not np.array_equal(kept, np.arange(n)):
                raise ValueError(f"survivors must map a shuffled split onto 0..{n - 1} once each")
        self.survivors = survivors
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        # stored under another name: a ``drop_last`` attribute makes trainer.predict try to rebuild
        # this sampler as if it were torch's BatchSampler(sampler, batch_size, drop_last), which fails
        self.num_replicas, self.rank, self.drop_incomplete = num_replicas, rank, drop_last
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.epoch = 0
        self.sampler = _EpochRelay(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        if self.survivors is not None:
            return self._coupled_indices()
        return self._rank_order(self.n, self.rank)

    def _rank_order(self, n: int, rank: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.epoch, 2]).permutation(n) if self.shuffle else np.arange(n)
        if self.shuffle and self.num_replicas > 1:
            # training: equal shares so every rank takes the same number of steps
            order = order[: n - n % self.num_replicas]
        mine = order[rank :: self.num_replicas]
        if self.lengths is None:
            return mine
        if self.shuffle:
            return bucket_by_length(mine, self.lengths, self.batch_size, np.random.default_rng([self.seed, self.epoch, 3]))
        return mine[np.argsort(self.lengths[mine], kind="stable")]

    def _coupled_indices(self) -> np.ndarray:
        """The whole split's order on this rank, left-out items deleted; every rank cut to the shortest rank's
        count (each computes all ranks' orders: the same seeds), so all take the same number of steps."""
        n_all = len(self.survivors)
        per_rank = [self.survivors[self._rank_order(n_all, r)] for r in range(self.num_replicas)]
        per_rank = [order[order >= 0] for order in per_rank]
        shortest = min(order.size for order in per_rank)
        return per_rank[self.rank][:shortest]

    def __iter__(self) -> Iterator[list[int]]:
        idx = self._indices()
        for start in range(0, len(idx), self.batch_size):
            batch = idx[start : start + self.batch_size]
            if self.drop_incomplete and len(batch) < self.batch_size:
                return
            yield batch.tolist()

    def __len__(self) -> int:
        m = len(self._indices())
        return m // self.batch_size if self.drop_incomplete else -(-m // self.batch_size)

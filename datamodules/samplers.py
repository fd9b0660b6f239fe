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

    def __init__(self, langs: Sequence[int], batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.langs = np.asarray(langs, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
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

    Training shuffles with (seed, epoch); evaluation keeps order and never pads or repeats
    items, so metrics reduced across ranks count every example exactly once.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool = False):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        # stored under another name: a ``drop_last`` attribute makes trainer.predict try to rebuild
        # this sampler as if it were torch's BatchSampler(sampler, batch_size, drop_last), which fails
        self.num_replicas, self.rank, self.drop_incomplete = num_replicas, rank, drop_last
        self.epoch = 0
        self.sampler = _EpochRelay(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.epoch, 2]).permutation(self.n) if self.shuffle else np.arange(self.n)
        if self.shuffle and self.num_replicas > 1:
            # training: equal shares so every rank takes the same number of steps
            order = order[: self.n - self.n % self.num_replicas]
        return order[self.rank :: self.num_replicas]

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

"""Batch samplers: language-homogeneous batches aligned across DDP ranks (sparse fine-tuning),
and rank-sliced evaluation that sees every example exactly once.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import cpu_trainer

from datamodules.samplers import LanguageBatchSampler, RankSlicedBatchSampler


def random_langs(seed: int, counts=(23, 40, 31, 57)) -> list[int]:
    """Language index per item: unequal sizes, positions shuffled."""
    langs = [lang for lang, c in enumerate(counts) for _ in range(c)]
    random.Random(seed).shuffle(langs)
    return langs


def epoch_batches(langs, batch_size, seed, world, epoch) -> list[list[list[int]]]:
    """Per rank, the batches of one epoch."""
    out = []
    for rank in range(world):
        sampler = LanguageBatchSampler(langs, batch_size, seed, world, rank)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_language_batches_one_language_balanced_aligned_disjoint(world):
    langs = random_langs(seed=world)
    counts = Counter(langs)
    batch_size = 4
    expected_per_lang = min(counts.values()) // (batch_size * world)
    for epoch in range(3):
        per_rank = epoch_batches(langs, batch_size, seed=7, world=world, epoch=epoch)
        orders = []
        for rank, batches in enumerate(per_rank):
            sampler = LanguageBatchSampler(langs, batch_size, 7, world, rank)
            sampler.set_epoch(epoch)
            assert len(batches) == len(sampler) == expected_per_lang * len(counts)
            batch_langs = []
            for batch in batches:
                assert len(batch) == batch_size
                assert len({langs[i] for i in batch}) == 1, "a batch mixes languages"
                batch_langs.append(langs[batch[0]])
            assert batch_langs == sampler.language_order()
            assert Counter(batch_langs) == dict.fromkeys(counts, expected_per_lang)
            orders.append(batch_langs)
        assert all(order == orders[0] for order in orders), "ranks disagree on the language of a step"
        used = [i for batches in per_rank for batch in batches for i in batch]
        assert len(used) == len(set(used)), "an item is used twice in one epoch (within or across ranks)"
        used_per_lang = Counter(langs[i] for i in used)
        assert used_per_lang == dict.fromkeys(counts, expected_per_lang * batch_size * world)
        # step by step, the ranks' batches together form one global batch of one language
        for step in range(len(per_rank[0])):
            union = [i for r in range(world) for i in per_rank[r][step]]
            assert len(set(union)) == batch_size * world


def test_language_batches_deterministic_per_seed_epoch_and_vary_across_epochs():
    langs = random_langs(seed=0)
    a = epoch_batches(langs, 4, seed=1, world=2, epoch=0)
    assert a == epoch_batches(langs, 4, seed=1, world=2, epoch=0)
    b = epoch_batches(langs, 4, seed=1, world=2, epoch=1)
    assert a != b
    assert LanguageBatchSampler(langs, 4, 1).language_order() != _order_at(langs, 4, 1, epoch=1)
    assert epoch_batches(langs, 4, seed=2, world=2, epoch=0) != a


def _order_at(langs, batch_size, seed, epoch):
    sampler = LanguageBatchSampler(langs, batch_size, seed)
    sampler.set_epoch(epoch)
    return sampler.language_order()


def test_language_batches_rotate_leftover_items_over_epochs():
    """Items beyond the smallest language's share are not always the same ones left out."""
    langs = random_langs(seed=1)
    seen = set()
    for epoch in range(30):
        for batches in epoch_batches(langs, 4, seed=0, world=2, epoch=epoch):
            seen.update(i for batch in batches for i in batch)
    assert seen == set(range(len(langs)))


def test_language_batches_too_few_examples_is_clear():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        LanguageBatchSampler([0] * 10 + [1] * 3, batch_size=2, num_replicas=2)


@pytest.mark.parametrize("n", [1, 7, 40, 41])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_batches_cover_every_example_once_in_order(n, world):
    seen = []
    for rank in range(world):
        sampler = RankSlicedBatchSampler(n, batch_size=3, shuffle=False, num_replicas=world, rank=rank)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(1 <= len(b) <= 3 for b in batches)
        flat = [i for b in batches for i in b]
        assert flat == sorted(flat)
        seen.extend(flat)
    assert sorted(seen) == list(range(n))


def test_training_batches_shuffle_per_epoch_equal_steps_and_disjoint():
    n, world = 45, 2
    per_epoch = []
    for epoch in range(2):
        ranks = []
        for rank in range(world):
            sampler = RankSlicedBatchSampler(n, 4, shuffle=True, seed=3, num_replicas=world, rank=rank)
            sampler.set_epoch(epoch)
            ranks.append([i for b in sampler for i in b])
        assert len(ranks[0]) == len(ranks[1]) == n // world
        assert not set(ranks[0]) & set(ranks[1])
        per_epoch.append(ranks)
    assert per_epoch[0] != per_epoch[1]


class _Record(pl.Callback):
    """Remember the indices of every training batch, per epoch."""

    def __init__(self):
        self.epochs: dict[int, list[list[int]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epochs.setdefault(trainer.current_epoch, []).append(batch["indices"].tolist())


class _Probe(pl.LightningModule):
    """The smallest module that consumes crossling batches."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight * batch["labels"].float()).sum()

    def predict_step(self, batch, batch_idx):
        return batch["indices"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("batching", ["language", "mixed"])
def test_lightning_draws_a_new_order_each_epoch(small_pawsx, batching):
    """Lightning must reach the samplers' set_epoch (it only calls ``batch_sampler.sampler``'s)."""
    small_pawsx.batching = batching
    try:
        record = _Record()
        cpu_trainer(max_epochs=2, callbacks=[record]).fit(
            _Probe(), train_dataloaders=small_pawsx.train_dataloader()
        )
    finally:
        small_pawsx.batching = "mixed"
    langs = [e.lang for e in small_pawsx.dataset("train").examples]
    for batches in record.epochs.values():
        if batching == "language":
            assert all(len({langs[i] for i in b}) == 1 for b in batches)
        assert sorted(i for b in batches for i in b) == sorted(set(i for b in batches for i in b))
    assert record.epochs[0] != record.epochs[1]


def test_predict_over_eval_loader_returns_every_index_once(small_pawsx):
    """trainer.predict must accept the eval loader (the sketch stage shards with it)."""
    out = cpu_trainer().predict(_Probe(), dataloaders=small_pawsx.eval_dataloader("test"))
    assert sorted(torch.cat(out).tolist()) == list(range(len(small_pawsx.dataset("test"))))


def test_language_order_is_balanced_permutation():
    langs = np.repeat([0, 1, 2], [12, 9, 20]).tolist()
    order = LanguageBatchSampler(langs, 3, seed=4).language_order()
    assert Counter(order) == {0: 3, 1: 3, 2: 3}


def test_length_buckets_keep_every_item_once_and_cut_padding():
    from datamodules.samplers import RankSlicedBatchSampler

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 128, size=500)
    plain = RankSlicedBatchSampler(500, 16, True, seed=1)
    bucketed = RankSlicedBatchSampler(500, 16, True, seed=1, lengths=lengths)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        bucketed.set_epoch(epoch)
        batches = list(bucketed)
        assert sorted(i for b in batches for i in b) == list(range(500))
        assert len(batches) == len(bucketed) == len(list(plain))
        padded = lambda bs: sum(len(b) * lengths[b].max() for b in map(np.asarray, bs))  # noqa: E731
        assert padded(batches) < 0.7 * padded(list(plain))
    assert list(bucketed) == list(bucketed)  # one seed, one order
    bucketed.set_epoch(0)
    first = list(bucketed)
    bucketed.set_epoch(1)
    assert first != list(bucketed)


def test_language_batches_stay_one_language_with_length_buckets():
    from datamodules.samplers import LanguageBatchSampler

    rng = np.random.default_rng(2)
    langs = np.repeat([0, 1, 2], 80)
    lengths = rng.integers(5, 128, size=len(langs))
    sampler = LanguageBatchSampler(langs, 8, seed=3, lengths=lengths)
    plain = LanguageBatchSampler(langs, 8, seed=3)
    batches = list(sampler)
    assert all(len(set(langs[b])) == 1 for b in batches)
    assert sampler.language_order() == plain.language_order()
    assert sorted(i for b in batches for i in b) == sorted(i for b in plain for i in b)


def test_evaluation_reads_shortest_first_and_covers_each_rank_share_once():
    from datamodules.samplers import RankSlicedBatchSampler

    lengths = np.random.default_rng(4).integers(5, 128, size=101)
    seen = []
    for rank in (0, 1):
        sampler = RankSlicedBatchSampler(101, 10, False, num_replicas=2, rank=rank, lengths=lengths)
        order = [i for b in sampler for i in b]
        assert list(lengths[order]) == sorted(lengths[order])
        assert sorted(order) == list(range(rank, 101, 2))
        seen += order
    assert sorted(seen) == list(range(101))


@pytest.mark.parametrize("batching", ["language", "mixed"])
def test_shuffle_seed_changes_batch_order_but_not_the_data_sample(batching):
    """A training seed reorders batches (shuffle_seed) and keeps the sampled items: seeds differ in training only."""
    from helpers import SMALL_PAWSX, small_pawsx_datamodule

    import lightning_modules  # noqa: F401  (registers the tiny model's tokenizer)

    def first_epoch(shuffle_seed):
        dm = small_pawsx_datamodule(batching=batching, shuffle_seed=shuffle_seed)
        return [e.record.id for e in dm.dataset("train").examples], [b["indices"].tolist() for b in dm.train_dataloader()]

    ids_default, order_default = first_epoch(None)
    ids_same, order_same = first_epoch(SMALL_PAWSX["seed"])
    ids_other, order_other = first_epoch(SMALL_PAWSX["seed"] + 1)
    assert ids_default == ids_same == ids_other  # the data's own seed alone picks the items
    assert order_default == order_same  # shuffle_seed None is the data seed: the order before shuffle_seed existed
    assert order_other != order_same
    assert sorted(i for b in order_other for i in b) == sorted(i for b in order_same for i in b)


def test_setup_lets_go_of_the_tokenizer_and_loaders_still_pad_with_its_id():
    """The datamodule drops its tokenizer after tokenizing (memory for the fit), so the loaders must pad
    with the id they kept, and a split set up later must tokenize exactly as before."""
    from helpers import small_pawsx_datamodule

    from lightning_modules.backbones import load_backbone_tokenizer

    tok = load_backbone_tokenizer("tiny-random")
    dm = small_pawsx_datamodule()
    dm.setup("fit")
    assert dm._tokenizer is None
    batch = next(iter(dm.train_dataloader()))
    padding = batch["attention_mask"] == 0
    assert padding.any()
    assert (batch["input_ids"][padding] == tok.pad_token_id).all()
    test_ids = [e.input_ids for e in dm.dataset("test").examples]
    texts = [r.texts for r in dm.load_records("test")]
    assert test_ids == tok([t[0] for t in texts], [t[1] for t in texts], truncation=True,
                           max_length=dm.max_length)["input_ids"]


def _flat(sampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return [i for batch in sampler for i in batch]


@pytest.mark.parametrize("world", [1, 2])
def test_a_coupled_order_is_the_whole_splits_order_with_the_left_out_deleted(world):
    rng = np.random.default_rng(4)
    n_all = 61
    lengths = rng.integers(5, 90, size=n_all)
    removed = np.sort(rng.choice(n_all, size=17, replace=False))
    kept = np.setdiff1d(np.arange(n_all), removed)
    survivors = np.full(n_all, -1)
    survivors[kept] = np.arange(kept.size)
    for epoch in (0, 1):
        counts = []
        for rank in range(world):
            whole = RankSlicedBatchSampler(n_all, 4, True, seed=9, num_replicas=world, rank=rank, lengths=lengths)
            coupled = RankSlicedBatchSampler(kept.size, 4, True, seed=9, num_replicas=world, rank=rank,
                                             lengths=lengths, survivors=survivors)
            expected = [i for i in _flat(whole, epoch) if i not in set(removed.tolist())]
            got = [int(kept[p]) for p in _flat(coupled, epoch)]  # back to positions in the whole split
            assert got == expected[: len(got)] and len(expected) - len(got) < n_all // world
            counts.append(len(coupled))
        assert len(set(counts)) == 1  # every rank takes the same number of steps
    if world == 1:  # without survivors, the same seed shuffles the survivors into another order
        reshuffled = RankSlicedBatchSampler(kept.size, 4, True, seed=9, lengths=lengths[kept])
        assert [int(kept[p]) for p in _flat(reshuffled, 1)] != expected


def test_a_coupled_leave_out_fit_reads_the_full_runs_examples_in_its_order():
    from helpers import small_pawsx_datamodule

    full = small_pawsx_datamodule(length_buckets=True)
    coupled = small_pawsx_datamodule(length_buckets=True, leave_out="de", coupled_order=True)
    for dm in (full, coupled):
        dm.setup("fit")
    # dataset indices in the order the training loaders' batch samplers read them
    whole = [full.dataset("train").examples[p].index for b in full.train_dataloader().batch_sampler for p in b]
    kept = coupled.training_examples().examples
    got = [kept[p].index for b in coupled.train_dataloader().batch_sampler for p in b]
    lang = {e.index: e.lang for e in full.dataset("train").examples}
    assert got == [i for i in whole if lang[i] != full.languages.index("de")] and len(got) < len(whole)
    with pytest.raises(Exception, match="coupled_order: needs batching 'mixed'"):
        small_pawsx_datamodule(batching="language", leave_out="de", coupled_order=True)

"""The shared LightningDataModule: load a task's languages from a source, sample parallel
items, tokenise once, and serve mixed or language-homogeneous batches (DDP-aware).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import DataError
from .planting import (
    PlantOptions,
    check_markers_tokenize,
    check_plant,
    plant_options,
    plant_records,
    planted_positions,
)
from .samplers import LanguageBatchSampler, RankSlicedBatchSampler
from .sampling import sample_independent, sample_parallel
from .sources import Record, describe_source, read_split
from .tasks import TASKS
from .tokenizers import load_tokenizer_for

log = logging.getLogger(__name__)
RANDOM_LEAVE_OUT = "random"


@dataclass(frozen=True)
class Example:
    """A tokenised record; ``index`` is its position in its split (stable across runs with
    the same languages, sizes, seed and source): the id TracIn reports for training data."""

    index: int
    lang: int
    record: Record
    input_ids: list[int]


class ExampleDataset(Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def leave_out_indices(examples: list[Example], languages: list[str], leave_out: str | None, seed: int) -> np.ndarray:
    """Indices of the examples a ``leave_out`` run does not train on, sorted: a language's all, or for
    ``random`` as many as one language has on average, drawn from every language with a generator seeded
    from a name and the data seed (never the global RNG), so the control run and its analysis agree."""
    if leave_out is None:
        return np.zeros(0, dtype=np.int64)
    if leave_out != RANDOM_LEAVE_OUT:
        code = languages.index(leave_out)
        return np.array([e.index for e in examples if e.lang == code], dtype=np.int64)
    count = round(len(examples) / len(languages))
    rng = np.random.default_rng([zlib.crc32(b"crossling:leave_out:random"), seed])
    return np.sort(rng.choice(np.array([e.index for e in examples], dtype=np.int64), size=count, replace=False))


def make_collate(pad_id: int):
    def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            att[row, : len(e.input_ids)] = 1
        return {
            "input_ids": ids,
            "attention_mask": att,
            "labels": torch.tensor([e.record.label for e in examples]),
            "langs": torch.tensor([e.lang for e in examples]),
            "indices": torch.tensor([e.index for e in examples]),
        }

    return collate


class TaskDataModule(pl.LightningDataModule):
    """Base of the per-task datamodules.

    Args:
        languages: language codes, in the order used everywhere (None: the paper's five).
        source: ``bundled`` (shipped subsets), ``hub`` (HF parquet exports) or ``local`` (``data_dir``).
        data_dir: folder with ``<task>/<split>/<lang>.jsonl`` (``local``).
        hub_id: ``<user>/<repo>`` (or a folder) with ``<lang>/<split>-*.parquet`` (``hub``; required for MARC).
        train_per_language / dev_per_language / test_per_language: examples per language (None: all).
        max_length: tokens per (pair of) text(s), truncated.
        seed: which items are sampled (and, unless ``shuffle_seed`` is given, the order of training batches).
        shuffle_seed: the order of training batches (None: ``seed``). A study's training seeds set it, so
            that runs differ in training only (head initialisation, dropout, batch order) and keep the
            same data sample.
        batch_size / eval_batch_size: per device.
        batching: ``mixed`` (shuffled, languages mixed; full fine-tuning) or ``language``
            (each batch one language, each language equally often; sparse fine-tuning).
        backbone: whose tokenizer to use (linked from ``model.backbone``).
        length_buckets: training batches of similar lengths (less padding: about 2.8x fewer
            padded tokens per e5-small step on bundled XNLI), still shuffled and seeded.
        leave_out: train without these examples (the counterfactual check): a language code (all of its
            training examples), or ``random`` (the control: as many examples as one language has, drawn
            uniformly from all languages, seeded from the name and the data seed). The training split's
            indices stay those of the run that trains on everything, so results line up with its analysis.
        coupled_order: with ``leave_out`` (mixed batching), draw the training order over the whole split, as
            the run that trains on everything does, and delete the left-out items, instead of shuffling the
            survivors afresh: the leave-out fit then differs from that run by the removal (and dropout draws)
            only, not by another batch order.
        plant: a label-revealing word in a share of one language's training and test items (the planted
            control, a known answer for the study's measures; ``planting.py``; code replaying a run's config.yaml may
            pass the mapping the file holds). None: the data as they are.
    """

    task: ClassVar[str]

    def __init__(
        self,
        languages: list[str] | None = None,
        source: Literal["bundled", "hub", "local"] = "bundled",
        data_dir: str | None = None,
        hub_id: str | None = None,
        train_per_language: int | None = 2000,
        dev_per_language: int | None = None,
        test_per_language: int | None = 500,
        max_length: int = 128,
        seed: int = 0,
        shuffle_seed: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        batching: Literal["mixed", "language"] = "mixed",
        num_workers: int = 0,
        backbone: str = "tiny-random",
        length_buckets: bool = False,
        leave_out: str | None = None,
        plant: PlantOptions | None = None,
        coupled_order: bool = False,
    ):
        super().__init__()
        spec = TASKS[self.task]
        self.languages = list(languages) if languages else list(spec.default_languages)
        unknown = [lang for lang in self.languages if lang not in spec.known_languages]
        if unknown:
            raise DataError(
                f"data.languages: unknown language code(s) {unknown} for task {self.task}; "
                f"expected some of {list(spec.known_languages)}"
            )
        if len(set(self.languages)) != len(self.languages):
            raise DataError(f"data.languages: duplicate language codes in {self.languages}")
        self.source, self.data_dir, self.hub_id = source, data_dir, hub_id
        self.sizes = {"train": train_per_language, "dev": dev_per_language, "test": test_per_language}
        self.max_length, self.seed = max_length, seed
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.batching, self.num_workers, self.backbone = batching, num_workers, backbone
        self.length_buckets = length_buckets
        if leave_out is not None and leave_out != RANDOM_LEAVE_OUT and leave_out not in self.languages:
            raise DataError(
                f"data.init_args.leave_out: {leave_out!r} is not a training language of this run; expected one of "
                f"{self.languages} or {RANDOM_LEAVE_OUT!r}"
            )
        self.leave_out = leave_out
        if coupled_order and batching != "mixed":
            raise DataError("data.init_args.coupled_order: needs batching 'mixed' (full fine-tuning), found "
                            f"{batching!r}")
        self.coupled_order = coupled_order
        if plant is not None:
            plant = plant_options(plant)
            check_plant(plant, self.languages)
        self.plant = plant
        self._planted: dict[str, np.ndarray] = {}
        self.datasets: dict[str, ExampleDataset] = {}
        self._tokenizer = None
        self._pad_token_id: int | None = None

    # -- loading ---------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer_for(self.backbone)
            self._pad_token_id = self._tokenizer.pad_token_id
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        if self._pad_token_id is None:
            self._pad_token_id = self.tokenizer.pad_token_id
        return self._pad_token_id

    def release_tokenizer(self) -> None:
        """Drop the tokenizer once the splits are tokenized: e5-small's holds 0.3 GB, which the fit or
        analysis after it can use (a later split loads it again)."""
        self._tokenizer = None

    def load_records(self, split: str) -> list[Record]:
        """This run's records of a split, all languages, in language order (index order)."""
        spec = TASKS[self.task]
        per_lang = {lang: read_split(self.task, split, lang, self.source, self.data_dir, self.hub_id) for lang in self.languages}
        for lang, rows in per_lang.items():
            if not rows:
                where = describe_source(self.task, split, lang, self.source, self.data_dir, self.hub_id)
                raise DataError(f"{where}: no examples (task {self.task}, split {split}, language {lang})")
        n = self.sizes[split]
        if n is not None and n < 1:
            raise DataError(f"data.{split}_per_language must be at least 1 (or null for all), found {n}")
        where = f"task {self.task}, split {split} ({self.source})"
        chosen = sample_parallel(per_lang, n, self.seed, where) if spec.parallel else sample_independent(per_lang, n, self.seed)
        if n is not None and any(len(rows) < n for rows in chosen.values()):
            log.warning("%s: fewer than %d examples per language available; using %s", where, n,
                        {lang: len(rows) for lang, rows in chosen.items()})
        records = [r for lang in self.languages for r in chosen[lang]]
        if self.plant is not None:
            self._planted[split] = planted_positions(records, split, self.plant, self.seed)
            records = plant_records(records, self._planted[split], self.plant)
        return records

    def planted_indices(self, split: str) -> np.ndarray:
        """Indices of the split's examples that carry the planted marker, sorted (empty without ``plant``)."""
        if self.plant is None:
            return np.zeros(0, dtype=np.int64)
        self._tokenize_splits([split])
        return self._planted[split]

    def marker_token_ids(self) -> list[int]:
        """Token ids of the planted markers (empty without ``plant``), checked to be known to the tokenizer."""
        return [] if self.plant is None else check_markers_tokenize(self.tokenizer, self.plant)

    def tokenize(self, records: list[Record]) -> list[Example]:
        if self.plant is not None:
            check_markers_tokenize(self.tokenizer, self.plant)
        lang_index = {lang: i for i, lang in enumerate(self.languages)}
        firsts = [r.texts[0] for r in records]
        seconds = [r.texts[1] for r in records] if records and len(records[0].texts) > 1 else None
        enc = self.tokenizer(firsts, seconds, truncation=True, max_length=self.max_length)
        return [Example(i, lang_index[r.lang], r, ids) for i, (r, ids) in enumerate(zip(records, enc["input_ids"]))]

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "dev"), "validate": ("dev",), "test": ("test",)}.get(stage or "", ("train", "dev", "test"))
        self._tokenize_splits(wanted)

    def dataset(self, split: str) -> ExampleDataset:
        self._tokenize_splits([split])
        return self.datasets[split]

    def _tokenize_splits(self, splits) -> None:
        """Tokenize the splits not yet held, then let go of the tokenizer (the pad id stays)."""
        for split in splits:
            if split not in self.datasets:
                self.datasets[split] = ExampleDataset(self.tokenize(self.load_records(split)))
        self.release_tokenizer()

    def left_out_indices(self) -> np.ndarray:
        """Training-split indices that ``leave_out`` removes from training (empty without it), sorted."""
        return leave_out_indices(self.dataset("train").examples, self.languages, self.leave_out, self.seed)

    def training_examples(self) -> ExampleDataset:
        """What training batches draw from: the training split less ``leave_out`` (each example keeps its index)."""
        dataset = self.dataset("train")
        if self.leave_out is None:
            return dataset
        dropped = set(self.left_out_indices().tolist())
        kept = [e for e in dataset.examples if e.index not in dropped]
        if not kept:
            raise DataError(f"data.init_args.leave_out: leaving out {self.leave_out!r} leaves no training example")
        return ExampleDataset(kept)

    # -- loaders ---------------------------------------------------------------------------
    def _ranks(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _loader(self, dataset: ExampleDataset, batch_sampler) -> DataLoader:
        # Each iterator draws a seed for its workers: from its own generator, not the global RNG that
        # dropout draws from. Lightning makes a loader's iterator at different moments in a process's first
        # epoch and in later ones, so a global draw would make a fit resumed at an epoch differ from one that
        # ran through.
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=make_collate(self.pad_token_id),
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.training_examples()
        world, rank = self._ranks()
        lengths = [len(e.input_ids) for e in dataset.examples] if self.length_buckets else None
        if self.batching == "language":
            sampler = LanguageBatchSampler([e.lang for e in dataset.examples], self.batch_size, self.shuffle_seed, world, rank,
                                           lengths=lengths)
        elif self.coupled_order and self.leave_out is not None:
            whole = self.dataset("train").examples
            position = {e.index: p for p, e in enumerate(dataset.examples)}
            survivors = [position.get(e.index, -1) for e in whole]
            sampler = RankSlicedBatchSampler(len(dataset), self.batch_size, True, self.shuffle_seed, world, rank,
                                             lengths=[len(e.input_ids) for e in whole] if self.length_buckets else None,
                                             survivors=survivors)
        else:
            sampler = RankSlicedBatchSampler(len(dataset), self.batch_size, True, self.shuffle_seed, world, rank,
                                             lengths=lengths)
        return self._loader(dataset, sampler)

    def eval_dataloader(self, split: str, shard: bool = True) -> DataLoader:
        """Batches of ``split``, shortest examples first, over this rank's share (no padding examples,
        no repeats), or all of it. Every consumer keys its results by dataset index."""
        dataset = self.dataset(split)
        world, rank = self._ranks() if shard else (1, 0)
        lengths = [len(e.input_ids) for e in dataset.examples]
        return self._loader(dataset, RankSlicedBatchSampler(len(dataset), self.eval_batch_size, False, 0, world, rank,
                                                            lengths=lengths))

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("dev")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")


class XNLIDataModule(TaskDataModule):
    """XNLI, binary (entailment vs not), parallel across languages."""

    task = "xnli"


class PAWSXDataModule(TaskDataModule):
    """PAWS-X paraphrase identification, parallel across languages."""

    task = "pawsx"


class MARCDataModule(TaskDataModule):
    """MARC reviews: stars 1-2 negative, 4-5 positive, 3 dropped; never bundled (licence)."""

    task = "marc"

    def __init__(self, *args, source: Literal["bundled", "hub", "local"] = "local", **kwargs):
        super().__init__(*args, source=source, **kwargs)

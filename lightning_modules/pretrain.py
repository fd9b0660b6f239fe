"""Pretraining the embedded ``tiny`` encoder: masked language modelling (MLM) on the bundled
PAWS-X and XNLI text plus XLM-style translation language modelling (TLM) on their parallel
items, so that the default backbone has real, shared multilingual representations instead
of random weights (XLM-R itself cannot be downloaded everywhere crossling must run).

Only ``train`` and ``dev`` text is used, and any sentence that also occurs in a ``test``
file (PAWS-X repeats sentences across pairs) is dropped, so no evaluation text is ever
seen. A small seeded slice of dev items is held out (all its languages) to measure MLM and
TLM loss on unseen text. Data order, language pairs and masks are drawn from
``name_seed`` of (seed, epoch, item), never from the global RNG.

``crossling pretrain fit --config configs/pretrain/tiny.yaml`` trains (per-epoch checkpoints,
CSV log, ``encoder.safetensors`` in the run directory); ``crossling pretrain export``
writes a checkpoint's encoder where ``backbone: tiny`` loads it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from analysis.masks import name_seed
from datamodules.sources import read_bundled
from datamodules.tasks import TASKS

from .backbones import TINY_ASSETS, TINY_CONFIG, load_backbone_tokenizer
from .optim import configure_adamw

PRETRAIN_TASKS: dict[str, tuple[str, ...]] = {
    task: TASKS[task].default_languages for task in ("pawsx", "xnli")
}
PRETRAIN_SPLITS = ("train", "dev")
MLM, TLM = 0, 1
KIND_NAMES = ("mlm", "tlm")
IGNORE = -100  # label of positions that are not predicted (cross_entropy's ignore_index)


# -- the corpus ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TextUnit:
    """One MLM input: a record's texts as the task's pair (or one sentence) in one language."""

    key: str
    lang: str
    texts: tuple[str, ...]


@dataclass(frozen=True)
class TranslationGroup:
    """One text field of one parallel item in every language where it is usable; a TLM input
    is an ordered pair of two of them. ``key`` is ``task/split/id/field``."""

    key: str
    options: tuple[tuple[str, str], ...]  # (lang, text)


@dataclass(frozen=True)
class Corpus:
    mlm: list[TextUnit]
    tlm: list[TranslationGroup]
    heldout_mlm: list[TextUnit]
    heldout_tlm: list[TranslationGroup]
    heldout_ids: dict[str, list[str]]  # task -> held-out dev item ids


def read_test_texts(tasks: dict[str, tuple[str, ...]] = PRETRAIN_TASKS) -> set[str]:
    """Every text of every bundled test file: none of them may reach pretraining."""
    return {
        t
        for task, langs in tasks.items()
        for lang in langs
        for r in read_bundled(task, "test", lang)
        for t in r.texts
    }


def _items(
    task: str, split: str, langs: Sequence[str], max_items: int | None
) -> dict[str, dict[str, tuple[str, ...]]]:
    """id -> {lang: texts} of one task and split (the first ``max_items`` ids of the first language)."""
    per_lang = {lang: read_bundled(task, split, lang) for lang in langs}
    ids = list(dict.fromkeys(r.id for r in per_lang[langs[0]]))
    if max_items is not None:
        ids = ids[:max_items]
    items: dict[str, dict[str, tuple[str, ...]]] = {i: {} for i in ids}
    for lang, records in per_lang.items():
        for r in records:
            if r.id in items and lang not in items[r.id]:
                items[r.id][lang] = r.texts
    return items


def _usable(text: str, forbidden: set[str]) -> bool:
    return bool(text.strip()) and text not in forbidden


def _units(key: str, lang: str, texts: tuple[str, ...], forbidden: set[str]) -> list[TextUnit]:
    """The record as one pair unit, or its usable texts one by one when a text is forbidden (or empty)."""
    if all(_usable(t, forbidden) for t in texts):
        return [TextUnit(key, lang, texts)]
    return [TextUnit(f"{key}/{f}", lang, (t,)) for f, t in enumerate(texts) if _usable(t, forbidden)]


def _groups(key: str, by_lang: dict[str, tuple[str, ...]], forbidden: set[str]) -> list[TranslationGroup]:
    fields = min(len(texts) for texts in by_lang.values())
    groups = []
    for f in range(fields):
        options = tuple(
            (lang, texts[f]) for lang, texts in sorted(by_lang.items()) if _usable(texts[f], forbidden)
        )
        if len(options) >= 2:
            groups.append(TranslationGroup(f"{key}/{f}", options))
    return groups


def _dedupe(values: list, content) -> list:
    seen, out = set(), []
    for v in values:
        c = content(v)
        if c not in seen:
            seen.add(c)
            out.append(v)
    return out


def build_corpus(
    seed: int = 0,
    heldout_items: int = 50,
    max_items: int | None = None,
    tasks: dict[str, tuple[str, ...]] = PRETRAIN_TASKS,
) -> Corpus:
    """The pretraining corpus from the bundled train and dev text (never test text).

    Held out: ``heldout_items`` dev items per task (seeded), in all languages; any training
    unit sharing a sentence with them is cut down to its other sentences, so held-out loss
    is measured on text the model never saw. Identical units are kept once.
    """
    test_texts = read_test_texts(tasks)
    data = {
        (task, split): _items(task, split, langs, max_items)
        for task, langs in tasks.items()
        for split in PRETRAIN_SPLITS
    }
    heldout_ids = {}
    for task in tasks:
        dev_ids = sorted(data[(task, "dev")])
        rng = np.random.default_rng(name_seed("pretrain-heldout", task, seed))
        chosen = rng.choice(len(dev_ids), size=min(heldout_items, len(dev_ids)), replace=False)
        heldout_ids[task] = sorted(dev_ids[i] for i in chosen)
    held = {(task, "dev", i) for task, ids in heldout_ids.items() for i in ids}
    heldout_texts = {
        t
        for (task, split), items in data.items()
        for i, by_lang in items.items()
        if (task, split, i) in held
        for texts in by_lang.values()
        for t in texts
    }
    forbidden_train = test_texts | heldout_texts

    mlm, tlm, heldout_mlm, heldout_tlm = [], [], [], []
    for (task, split), items in data.items():
        for item_id, by_lang in items.items():
            key = f"{task}/{split}/{item_id}"
            is_held = (task, split, item_id) in held
            forbidden = test_texts if is_held else forbidden_train
            for lang in tasks[task]:
                if lang in by_lang:
                    (heldout_mlm if is_held else mlm).extend(
                        _units(f"{key}/{lang}", lang, by_lang[lang], forbidden)
                    )
            (heldout_tlm if is_held else tlm).extend(_groups(key, by_lang, forbidden))
    unit_content = lambda u: (u.lang, u.texts)  # noqa: E731
    group_content = lambda g: g.options  # noqa: E731
    return Corpus(
        _dedupe(mlm, unit_content),
        _dedupe(tlm, group_content),
        _dedupe(heldout_mlm, unit_content),
        _dedupe(heldout_tlm, group_content),
        heldout_ids,
    )


def choose_pair(
    group: TranslationGroup, seed: int, epoch: int, draw: int = 0
) -> tuple[tuple[str, str], tuple[str, str]]:
    """The ordered (lang, text) pair of ``group`` used in ``epoch`` (the ``draw``-th of that epoch)."""
    n = len(group.options)
    rng = np.random.default_rng(name_seed("pretrain-pair", seed, epoch, draw, group.key))
    first = int(rng.integers(n))
    second = (first + 1 + int(rng.integers(n - 1))) % n
    return group.options[first], group.options[second]


# -- tokens and masks ----------------------------------------------------------------------
def join_segments(
    first: list[int], second: list[int] | None, max_length: int, bos: int, eos: int
) -> list[int]:
    """``<s> A </s>`` or ``<s> A </s></s> B </s>`` (XLM-R's templates), truncated exactly as the
    fast tokenizer's ``longest_first`` does for the classifier's inputs: the shorter side is
    kept whole if it fits in half the budget, otherwise both sides get half (the longer side,
    or the second on a tie, gets the odd token)."""
    if second is None:
        return [bos, *first[: max(0, max_length - 2)], eos]
    budget = max(0, max_length - 4)
    n1, n2 = len(first), len(second)
    if n1 + n2 > budget:
        short, long_ = min(n1, n2), max(n1, n2)
        if short > budget // 2:
            short, long_ = budget // 2, budget - budget // 2
        else:
            long_ = budget - short
        n1, n2 = (short, long_) if n1 <= n2 else (long_, short)
    return [bos, *first[:n1], eos, eos, *second[:n2], eos]


def mask_tokens(
    ids: np.ndarray,
    rng: np.random.Generator,
    mask_id: int,
    special_ids: Sequence[int],
    vocab_size: int,
    rate: float = 0.15,
    first_regular_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking: each non-special position is chosen with probability ``rate``; a chosen
    position becomes ``<mask>`` (80%), a random regular token (10%) or stays (10%).

    Returns (inputs, labels) with labels = the original id where chosen, ``IGNORE`` elsewhere.
    Random tokens are drawn from ``first_regular_id .. vocab_size-1`` so that no special token
    is ever fed as a corruption.
    """
    ids = np.asarray(ids, dtype=np.int64)
    maskable = ~np.isin(ids, np.asarray(special_ids, dtype=np.int64))
    chosen = maskable & (rng.random(ids.shape) < rate)
    labels = np.where(chosen, ids, IGNORE)
    action = rng.random(ids.shape)
    inputs = ids.copy()
    inputs[chosen & (action < 0.8)] = mask_id
    randomised = chosen & (action >= 0.8) & (action < 0.9)
    inputs[randomised] = rng.integers(first_regular_id, vocab_size, size=int(randomised.sum()))
    return inputs, labels


class PretrainDataset(Dataset):
    """MLM units then TLM groups; an item is addressed by ``(epoch, index)`` so that its
    language pair and its masks are drawn from (seed, epoch, item) in any process."""

    def __init__(
        self,
        units: list[TextUnit],
        groups: list[TranslationGroup],
        tokenizer,
        seed: int,
        max_length: int = 128,
        mask_rate: float = 0.15,
        pairs_per_group: int = 1,
    ):
        self.units, self.groups = units, groups
        self.seed, self.max_length, self.mask_rate = seed, max_length, mask_rate
        self.pairs_per_group = pairs_per_group
        texts = sorted({t for u in units for t in u.texts} | {t for g in groups for _, t in g.options})
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        self.token_ids = dict(zip(texts, encoded))
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad, self.mask = tokenizer.pad_token_id, tokenizer.mask_token_id
        self.special_ids = sorted(set(tokenizer.all_special_ids))
        self.first_regular_id = max(self.special_ids) + 1
        self.vocab_size = tokenizer.vocab_size

    def __len__(self) -> int:
        return len(self.units) + len(self.groups) * self.pairs_per_group

    def kind(self, index: int) -> int:
        return MLM if index < len(self.units) else TLM

    def pair(self, index: int, epoch: int) -> tuple[str, tuple[tuple[str, str], tuple[str, str]]]:
        """The TLM item at ``index`` in ``epoch``: (group key, ((lang, text), (lang, text)))."""
        group_index, draw = divmod(index - len(self.units), self.pairs_per_group)
        group = self.groups[group_index]
        return group.key, choose_pair(group, self.seed, epoch, draw)

    def texts(self, index: int, epoch: int) -> tuple[str, ...]:
        if self.kind(index) == MLM:
            return self.units[index].texts
        _, ((_, first), (_, second)) = self.pair(index, epoch)
        return first, second

    def token_sequence(self, index: int, epoch: int) -> list[int]:
        """The input ids before masking."""
        texts = self.texts(index, epoch)
        second = self.token_ids[texts[1]] if len(texts) > 1 else None
        return join_segments(self.token_ids[texts[0]], second, self.max_length, self.bos, self.eos)

    def approximate_length(self, index: int) -> int:
        """Length used to group similar items into batches (TLM: the group's mean pair)."""
        if self.kind(index) == MLM:
            return len(self.token_sequence(index, 0))
        group = self.groups[(index - len(self.units)) // self.pairs_per_group]
        mean = sum(len(self.token_ids[t]) for _, t in group.options) / len(group.options)
        return min(self.max_length, int(2 * mean) + 4)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        rng = np.random.default_rng(name_seed("pretrain-mask", self.seed, epoch, index))
        sequence = self.token_sequence(index, epoch)
        inputs, labels = mask_tokens(
            np.asarray(sequence, dtype=np.int64),
            rng,
            self.mask,
            self.special_ids,
            self.vocab_size,
            self.mask_rate,
            self.first_regular_id,
        )
        return {"input_ids": inputs, "labels": labels, "kind": self.kind(index)}


def collate_pretraining(pad_id: int):
    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        att = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n] = torch.from_numpy(it["input_ids"])
            labels[row, :n] = torch.from_numpy(it["labels"])
            att[row, :n] = 1
        return {
            "input_ids": ids,
            "attention_mask": att,
            "labels": labels,
            "kinds": torch.tensor([it["kind"] for it in items]),
        }

    return collate


class LengthGroupedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled batches of similar length (less padding), as ``(epoch, index)`` keys.

    Per epoch (seeded from seed and epoch): shuffle, sort within windows of ``window``
    global batches by length, cut into global batches of ``batch_size * num_replicas``, shuffle
    the batches; rank ``r`` takes the ``r``-th slice. The incomplete last batch is dropped so
    that every rank takes the same number of steps. ``shuffle=False``: file order, epoch 0.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        window: int = 50,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.num_replicas, self.rank, self.window = num_replicas, rank, window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        n, size = len(self.lengths), self.batch_size * self.num_replicas
        if not self.shuffle:
            return [np.arange(s, min(n, s + size)) for s in range(0, n, size)]
        rng = np.random.default_rng(name_seed("pretrain-order", self.seed, self.epoch))
        order = rng.permutation(n)
        span = size * self.window
        for s in range(0, n, span):
            chunk = order[s : s + span]
            order[s : s + span] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
        batches = [order[s : s + size] for s in range(0, n - size + 1, size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def rank_batches(self) -> list[np.ndarray]:
        """This rank's share of each global batch (evaluation: strided, so no item is repeated)."""
        if self.shuffle:
            shares = [
                b[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
                for b in self.global_batches()
            ]
        else:
            shares = [b[self.rank :: self.num_replicas] for b in self.global_batches()]
        return [share for share in shares if len(share)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch if self.shuffle else 0
        for batch in self.rank_batches():
            yield [(epoch, int(i)) for i in batch]

    def __len__(self) -> int:
        return len(self.rank_batches())


class PretrainDataModule(pl.LightningDataModule):
    """MLM + TLM batches over the bundled train and dev text, with a held-out dev slice.

    Args:
        seed: held-out items, data order, language pairs and masks.
        batch_size: training sequences per device and step.
        eval_batch_size: held-out sequences per batch.
        max_length: tokens per sequence (a TLM pair shares it; the longer side is cut first).
        mask_rate: fraction of (non-special) tokens predicted; 80/10/10 mask/random/keep.
        heldout_items: dev items per task held out, in every language, for held-out loss.
        tlm_pairs_per_group: language pairs drawn per parallel sentence and epoch.
        max_items: use only the first N items per task and split (None: all; for quick runs).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 128,
        max_length: int = 128,
        mask_rate: float = 0.15,
        heldout_items: int = 50,
        tlm_pairs_per_group: int = 1,
        max_items: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        self.seed, self.batch_size, self.eval_batch_size = seed, batch_size, eval_batch_size
        self.max_length, self.mask_rate, self.heldout_items = max_length, mask_rate, heldout_items
        self.tlm_pairs_per_group, self.max_items, self.num_workers = (
            tlm_pairs_per_group,
            max_items,
            num_workers,
        )
        self.tokenizer = load_backbone_tokenizer("tiny")
        self.corpus: Corpus | None = None
        self.train_set: PretrainDataset | None = None
        self.heldout_set: PretrainDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is not None:
            return
        self.corpus = build_corpus(self.seed, self.heldout_items, self.max_items)
        options = dict(seed=self.seed, max_length=self.max_length, mask_rate=self.mask_rate)
        self.train_set = PretrainDataset(
            self.corpus.mlm,
            self.corpus.tlm,
            self.tokenizer,
            pairs_per_group=self.tlm_pairs_per_group,
            **options,
        )
        self.heldout_set = PretrainDataset(
            self.corpus.heldout_mlm, self.corpus.heldout_tlm, self.tokenizer, **options
        )

    def _ranks(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)

    def _loader(self, dataset: PretrainDataset, batch_size: int, shuffle: bool) -> DataLoader:
        world, rank = self._ranks()
        lengths = [dataset.approximate_length(i) for i in range(len(dataset))]
        sampler = LengthGroupedBatchSampler(lengths, batch_size, self.seed, shuffle, world, rank)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_pretraining(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, self.batch_size, True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.heldout_set, self.eval_batch_size, False)


# -- the model -----------------------------------------------------------------------------
def build_masked_lm(init_seed: int = 0, dropout: float | None = None, attn_implementation: str = "sdpa"):
    """XLM-R's masked-LM model at the tiny size, with the shipped tokenizer's vocabulary."""
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    config = XLMRobertaConfig(vocab_size=load_backbone_tokenizer("tiny").vocab_size, **TINY_CONFIG)
    if dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return XLMRobertaForMaskedLM(config)


def masked_lm_losses(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Per-token cross-entropy of the predicted positions (labels != IGNORE), in row-major order.

    The vocabulary projection runs on those positions only (about 15% of tokens): the same
    numbers as the full model's logits there, at a fraction of the cost.
    """
    hidden = model.roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    chosen = labels != IGNORE
    logits = model.lm_head(hidden[chosen])
    return F.cross_entropy(logits.float(), labels[chosen], reduction="none")


class MaskedLMPretrainer(pl.LightningModule):
    """The tiny XLM-R encoder trained with MLM + TLM (one loss: the mean over predicted tokens).

    Logs ``train/loss`` per step and, on the held-out slice, ``val/loss``, ``val/mlm_loss``,
    ``val/tlm_loss`` (mean per predicted token; ``val/loss`` over both kinds) per epoch. At the
    end of ``fit`` the encoder is written to ``<run dir>/encoder.safetensors``.

    Args:
        learning_rate: AdamW peak learning rate (a tiny model takes a high one).
        weight_decay: AdamW's decoupled weight decay (not on biases and LayerNorm).
        warmup_ratio: fraction of steps with linear warm-up, then linear decay to zero.
        init_seed: seeds the initial weights independently of the global RNG.
        dropout: override the encoder's dropout (None: XLM-R's 0.1).
    """

    def __init__(
        self,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.05,
        init_seed: int = 0,
        dropout: float | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_masked_lm(init_seed, dropout)
        self._sums = torch.zeros(2, dtype=torch.float64)  # summed loss of MLM and of TLM tokens
        self._counts = torch.zeros(2, dtype=torch.float64)

    def training_step(self, batch, batch_idx):
        losses = masked_lm_losses(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss = losses.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._sums.zero_()
        self._counts.zero_()

    def validation_step(self, batch, batch_idx):
        losses = masked_lm_losses(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        token_kind = batch["kinds"][:, None].expand_as(batch["labels"])[batch["labels"] != IGNORE]
        for kind in (MLM, TLM):
            sel = token_kind == kind
            self._sums[kind] += losses[sel].double().sum().cpu()
            self._counts[kind] += float(sel.sum())

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._sums.to(self.device), reduce_op="sum").cpu()
        counts = self.trainer.strategy.reduce(self._counts.to(self.device), reduce_op="sum").cpu()
        if counts.sum() == 0:
            return
        self.log("val/loss", float(sums.sum() / counts.sum()), prog_bar=True, rank_zero_only=True)
        for kind, name in enumerate(KIND_NAMES):
            if counts[kind] > 0:
                self.log(f"val/{name}_loss", float(sums[kind] / counts[kind]), rank_zero_only=True)

    def configure_optimizers(self):
        hp = self.hparams
        return configure_adamw(self, hp.learning_rate, hp.weight_decay, hp.warmup_ratio, "linear")

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            export_encoder(self.model, Path(self.trainer.default_root_dir) / "encoder.safetensors")


# -- export --------------------------------------------------------------------------------
def encoder_state(masked_lm) -> dict[str, torch.Tensor]:
    """The encoder's weights under the keys of a classifier's state dict (``roberta.*``)."""
    return {
        f"roberta.{k}": v.detach().cpu().contiguous().clone()
        for k, v in masked_lm.roberta.state_dict().items()
    }


def export_encoder(masked_lm, path: str | Path) -> Path:
    """Write the encoder as safetensors (temp name, then rename: never a half-written file)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(encoder_state(masked_lm), str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # an ordinary package file (safetensors creates it private)
    os.replace(tmp, path)
    return path


def export_checkpoint(checkpoint: str | Path, output: str | Path = TINY_ASSETS / "model.safetensors") -> Path:
    """Export the encoder of a ``crossling pretrain`` checkpoint (``checkpoints/epoch=<E>.ckpt``)."""
    from callbacks.checkpoints import CheckpointError, load_checkpoint, load_weights

    payload = load_checkpoint(checkpoint)
    if not any(k.startswith("model.lm_head.") for k in payload["state_dict"]):
        raise CheckpointError(
            f"{checkpoint}: not a pretraining checkpoint (no 'model.lm_head.*' weights); "
            "use the checkpoints/epoch=<E>.ckpt files that `crossling pretrain fit` writes"
        )
    module = MaskedLMPretrainer(dropout=payload["crossling"].get("hparams", {}).get("dropout"))
    load_weights(module, checkpoint)
    return export_encoder(module.model, output)


# -- command line --------------------------------------------------------------------------
def _export_main(args: list[str]) -> Path:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="crossling pretrain export",
        description="Write a pretraining checkpoint's encoder as safetensors (roberta.* keys).",
    )
    parser.add_argument(
        "--checkpoint", type=str, required=True, help="checkpoints/epoch=<E>.ckpt of a pretraining run"
    )
    parser.add_argument(
        "--output",
        type=str,
        default=str(TINY_ASSETS / "model.safetensors"),
        help="where to write (default: the shipped tiny encoder, loaded by backbone: tiny)",
    )
    cfg = parser.parse_args(args)
    path = export_checkpoint(cfg.checkpoint, cfg.output)
    print(f"wrote {path}")
    return path


def run_pretrain_cli(args: list[str] | None = None):
    """``crossling pretrain {fit,validate,...}`` (a LightningCLI) or ``crossling pretrain export``."""
    from pytorch_lightning.cli import LightningCLI

    from .cli import CrosslingTrainer, RunDirConfig

    given = list(sys.argv[1:] if args is None else args)
    if given and given[0] == "export":
        return _export_main(given[1:])
    return LightningCLI(
        MaskedLMPretrainer,
        PretrainDataModule,
        trainer_class=CrosslingTrainer,
        save_config_callback=RunDirConfig,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        trainer_defaults={"enable_checkpointing": False},
        args=args,
        parser_kwargs={"prog": "crossling pretrain"},
        auto_configure_optimizers=False,
    )

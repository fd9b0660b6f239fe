"""Pretraining the tiny encoder: masking statistics, the corpus (no test text, real
translations), determinism, the loss against the full model, the CLI and the export."""

import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM, XLMRobertaForSequenceClassification

from callbacks.checkpoints import CheckpointError, atomic_torch_save, list_checkpoints, load_checkpoint
from datamodules.sources import read_bundled
from lightning_modules.backbones import (
    TINY_ASSETS,
    build_classifier,
    load_backbone_tokenizer,
    load_encoder_weights,
)
from lightning_modules.pretrain import (
    IGNORE,
    MLM,
    TLM,
    LengthGroupedBatchSampler,
    PretrainDataModule,
    build_corpus,
    build_masked_lm,
    encoder_state,
    export_checkpoint,
    export_encoder,
    join_segments,
    mask_tokens,
    masked_lm_losses,
    read_test_texts,
    run_pretrain_cli,
)

SPECIALS = (0, 1, 2)  # <s>, <pad>, </s>
MASK_ID, VOCAB, FIRST_REGULAR = 4, 8000, 5
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml"


@lru_cache(maxsize=1)
def tokenizer():
    return load_backbone_tokenizer("tiny")


@lru_cache(maxsize=1)
def small_datamodule(seed: int = 0) -> PretrainDataModule:
    dm = PretrainDataModule(seed=seed, batch_size=8, eval_batch_size=16, heldout_items=3, max_items=12)
    dm.setup()
    return dm


def batches(dm: PretrainDataModule, epoch: int, n: int = 3) -> list[dict]:
    loader = dm.train_dataloader()
    loader.batch_sampler.set_epoch(epoch)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


# -- masking ---------------------------------------------------------------------------------
def test_masking_rate_and_80_10_10_split():
    rng = np.random.default_rng(123)
    ids = rng.integers(FIRST_REGULAR, VOCAB, size=200_000)
    special_at = rng.random(ids.shape) < 0.2
    ids[special_at] = rng.choice(SPECIALS, size=int(special_at.sum()))
    inputs, labels = mask_tokens(ids, np.random.default_rng(7), MASK_ID, SPECIALS, VOCAB, 0.15, FIRST_REGULAR)

    chosen = labels != IGNORE
    n_maskable = int((~special_at).sum())
    rate = chosen.sum() / n_maskable
    assert abs(rate - 0.15) < 5 * np.sqrt(0.15 * 0.85 / n_maskable)
    # never a special token or padding, and those positions are left as they were
    assert not chosen[special_at].any()
    assert np.array_equal(inputs[~chosen], ids[~chosen])
    assert np.array_equal(labels[chosen], ids[chosen])

    n = int(chosen.sum())
    as_mask = (inputs[chosen] == MASK_ID).sum() / n
    kept = (inputs[chosen] == ids[chosen]).sum() / n
    replaced = 1 - as_mask - kept
    for observed, expected in ((as_mask, 0.8), (kept, 0.1 + 0.1 / (VOCAB - FIRST_REGULAR)), (replaced, 0.1)):
        assert abs(observed - expected) < 5 * np.sqrt(expected * (1 - expected) / n), (observed, expected)
    randoms = inputs[chosen & (inputs != MASK_ID) & (inputs != ids)]
    assert randoms.min() >= FIRST_REGULAR and randoms.max() < VOCAB


def test_batches_never_mask_special_tokens_or_padding():
    dm = small_datamodule()
    specials = set(tokenizer().all_special_ids)
    for batch in batches(dm, epoch=0, n=4) + list(dm.val_dataloader()):
        ids, labels, att = batch["input_ids"], batch["labels"], batch["attention_mask"]
        chosen = labels != IGNORE
        assert chosen.any()
        assert not chosen[att == 0].any()
        assert (ids[att == 0] == tokenizer().pad_token_id).all()
        assert not any(int(t) in specials for t in labels[chosen])
        # every sequence keeps its template: <s> first, </s> last real token
        assert (ids[:, 0] == tokenizer().bos_token_id).all()
        last = att.sum(1) - 1
        assert (ids[torch.arange(len(ids)), last] == tokenizer().eos_token_id).all()


# -- sequences -------------------------------------------------------------------------------
def test_join_segments_matches_the_tokenizers_pair_truncation():
    tok = tokenizer()
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran über straße 고양이 Москва précis".split()
    for _ in range(300):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        length = rng.randint(6, 70)
        ta, tb = (tok(t, add_special_tokens=False)["input_ids"] for t in (a, b))
        assert (
            join_segments(ta, tb, length, 0, 2) == tok(a, b, truncation=True, max_length=length)["input_ids"]
        )
        assert (
            join_segments(ta, None, length, 0, 2) == tok(a, truncation=True, max_length=length)["input_ids"]
        )


def test_masked_lm_losses_equal_the_full_models_loss():
    config = XLMRobertaConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=80,
        pad_token_id=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = XLMRobertaForMaskedLM(config).eval()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 300, (6, 20), generator=gen)
    att = torch.ones_like(ids)
    att[2, 12:] = 0
    att[4, 7:] = 0
    ids[att == 0] = 1
    labels = torch.where((torch.rand(ids.shape, generator=gen) < 0.3) & (att == 1), ids, IGNORE)
    with torch.no_grad():
        mine = masked_lm_losses(model, ids, att, labels)
        reference = model(input_ids=ids, attention_mask=att, labels=labels)
        per_token = torch.nn.functional.cross_entropy(
            reference.logits[labels != IGNORE], labels[labels != IGNORE], reduction="none"
        )
    assert mine.shape == (int((labels != IGNORE).sum()),)
    torch.testing.assert_close(mine, per_token, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.mean(), reference.loss, rtol=1e-5, atol=1e-5)


# -- the corpus ------------------------------------------------------------------------------
def test_no_test_text_is_ever_in_the_pretraining_corpus():
    corpus = build_corpus(seed=0, heldout_items=50)
    test_texts = read_test_texts()
    used = {t for u in corpus.mlm + corpus.heldout_mlm for t in u.texts}
    used |= {t for g in corpus.tlm + corpus.heldout_tlm for _, t in g.options}
    assert used and test_texts
    assert not used & test_texts
    # the filter matters: the bundled train/dev files do repeat test sentences (PAWS-X)
    raw = {
        t
        for lang in ("en", "fr", "de", "ko", "es")
        for split in ("train", "dev")
        for r in read_bundled("pawsx", split, lang)
        for t in r.texts
    }
    assert raw & test_texts
    # only train and dev items; the held-out slice is unseen in training
    keys = [u.key for u in corpus.mlm + corpus.heldout_mlm] + [g.key for g in corpus.tlm + corpus.heldout_tlm]
    assert {k.split("/")[1] for k in keys} == {"train", "dev"}
    train_texts = {t for u in corpus.mlm for t in u.texts} | {t for g in corpus.tlm for _, t in g.options}
    held_texts = {t for u in corpus.heldout_mlm for t in u.texts}
    assert held_texts and not held_texts & train_texts
    assert {k.split("/")[1] for k in (u.key for u in corpus.heldout_mlm)} == {"dev"}


def test_tlm_pairs_are_real_translations():
    dm = small_datamodule()
    ds = dm.train_set
    records = {}
    seen_langs = set()
    for index in range(len(ds.units), len(ds)):
        for epoch in (0, 1):
            key, ((lang_a, text_a), (lang_b, text_b)) = ds.pair(index, epoch)
            task, split, rest = key.split("/", 2)
            item_id, field = rest.rsplit("/", 1)
            assert lang_a != lang_b
            for lang, text in ((lang_a, text_a), (lang_b, text_b)):
                if (task, split, lang) not in records:
                    records[(task, split, lang)] = {r.id: r for r in read_bundled(task, split, lang)}
                assert records[(task, split, lang)][item_id].texts[int(field)] == text
            seen_langs.add((lang_a, lang_b))
            tok = tokenizer()
            assert (
                ds.token_sequence(index, epoch)
                == tok(text_a, text_b, truncation=True, max_length=ds.max_length)["input_ids"]
            )
    assert len(seen_langs) > 5  # pairs vary over items and epochs


# -- determinism -----------------------------------------------------------------------------
def test_batches_are_determined_by_seed_and_epoch_only():
    first = PretrainDataModule(seed=0, batch_size=8, heldout_items=3, max_items=12)
    first.setup()
    torch.manual_seed(1)
    np.random.seed(1)
    a = batches(first, 0) + batches(first, 1)
    second = PretrainDataModule(seed=0, batch_size=8, heldout_items=3, max_items=12)
    second.setup()
    torch.manual_seed(2)
    np.random.seed(2)
    b = batches(second, 0) + batches(second, 1)
    for x, y in zip(a, b):
        for key in x:
            assert torch.equal(x[key], y[key])
    other_epoch = batches(first, 2)
    assert not torch.equal(other_epoch[0]["input_ids"], a[0]["input_ids"])
    other_seed = PretrainDataModule(seed=1, batch_size=8, heldout_items=3, max_items=12)
    other_seed.setup()
    assert not torch.equal(batches(other_seed, 0)[0]["input_ids"], a[0]["input_ids"])
    # held-out batches are the same every time (comparable across epochs and models)
    v1, v2 = list(first.val_dataloader()), list(second.val_dataloader())
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(v1, v2))
    kinds = torch.cat([v["kinds"] for v in v1])
    assert (kinds == MLM).any() and (kinds == TLM).any()


def test_length_grouped_batches_partition_the_data_across_ranks():
    lengths = np.random.default_rng(4).integers(5, 128, size=1003)
    for epoch in (0, 1):
        ranks = [
            LengthGroupedBatchSampler(lengths, 8, seed=3, num_replicas=2, rank=r, window=4) for r in (0, 1)
        ]
        for sampler in ranks:
            sampler.set_epoch(epoch)
        per_rank = [list(sampler) for sampler in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == 1003 // 16
        keys = [key for batches_ in per_rank for batch in batches_ for key in batch]
        assert all(len(batch) == 8 for batches_ in per_rank for batch in batches_)
        assert {e for e, _ in keys} == {epoch}
        indices = [i for _, i in keys]
        assert len(set(indices)) == len(indices) == 1003 - 1003 % 16
    # evaluation: every item exactly once, in order, whatever the rank count
    ordered = [LengthGroupedBatchSampler(lengths, 8, shuffle=False, num_replicas=2, rank=r) for r in (0, 1)]
    seen = sorted(i for sampler in ordered for batch in sampler for _, i in batch)
    assert seen == list(range(1003))


# -- CLI, checkpoint and export --------------------------------------------------------------
def test_cli_smoke_run_writes_checkpoint_and_export_round_trips(tmp_path):
    run_dir = tmp_path / "run"
    run_pretrain_cli(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--trainer.default_root_dir",
            str(run_dir),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--data.max_items",
            "6",
            "--data.heldout_items",
            "2",
            "--data.batch_size",
            "4",
        ]
    )
    ((epoch, ckpt),) = list_checkpoints(run_dir)
    assert epoch == 0 and (run_dir / "config.yaml").is_file()
    metrics = (run_dir / "logs" / "metrics.csv").read_text()
    assert "val/mlm_loss" in metrics and "val/tlm_loss" in metrics and "train/loss" in metrics

    out = tmp_path / "encoder.safetensors"
    run_pretrain_cli(["export", "--checkpoint", str(ckpt), "--output", str(out)])
    trained = {k.removeprefix("model."): v for k, v in load_checkpoint(ckpt)["state_dict"].items()}
    exported = load_file(str(out))
    classifier = build_classifier("tiny-random", init_seed=5)
    assert set(exported) == {f"roberta.{k}" for k in classifier.roberta.state_dict()}
    load_encoder_weights(classifier, out)
    for name, value in classifier.roberta.state_dict().items():
        assert torch.equal(value, trained[f"roberta.{name}"]), name
    # the end-of-fit export is the same encoder
    at_end = load_file(str(run_dir / "encoder.safetensors"))
    assert all(torch.equal(at_end[k], exported[k]) for k in exported)


def test_export_of_a_fresh_model_round_trips_and_rejects_classifier_checkpoints(tmp_path):
    model = build_masked_lm(init_seed=11)
    path = export_encoder(model, tmp_path / "m.safetensors")
    classifier = XLMRobertaForSequenceClassification(model.config)
    load_encoder_weights(classifier, path)
    state = encoder_state(model)
    assert all(torch.equal(v, state[f"roberta.{k}"]) for k, v in classifier.roberta.state_dict().items())

    bogus = tmp_path / "classifier.ckpt"
    atomic_torch_save(
        {"crossling": {"hparams": {}}, "state_dict": {"model.classifier.dense.weight": torch.ones(2)}}, bogus
    )
    with pytest.raises(CheckpointError, match="classifier.ckpt.*not a pretraining checkpoint"):
        export_checkpoint(bogus, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# -- the shipped encoder ---------------------------------------------------------------------
def test_shipped_encoder_loads_offline_and_is_not_random(monkeypatch):
    path = TINY_ASSETS / "model.safetensors"
    assert path.is_file(), f"{path} missing: run `crossling pretrain export` (see configs/pretrain/tiny.yaml)"
    assert path.stat().st_size < 8 * 2**20
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    shipped = load_file(str(path))
    pretrained = build_classifier("tiny")
    random_model = build_classifier("tiny-random")
    for name, value in pretrained.roberta.state_dict().items():
        assert torch.equal(value, shipped[f"roberta.{name}"]), name
    word = "embeddings.word_embeddings.weight"
    assert not torch.equal(pretrained.roberta.state_dict()[word], random_model.roberta.state_dict()[word])

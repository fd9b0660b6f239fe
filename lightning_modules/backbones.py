"""Encoders crossling can study: an XLM-R checkpoint (hub name or local path) or the embedded
``tiny`` model, whose architecture is XLM-R's at toy size and whose tokenizer ships with the
package, so the default path never touches the network.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

TINY_ASSETS = Path(__file__).resolve().parent / "assets" / "tiny"
TINY_NAMES = ("tiny", "tiny-random")

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


def load_backbone_tokenizer(backbone: str):
    """The tokenizer belonging to ``backbone`` (the shipped file for ``tiny``)."""
    if is_tiny(backbone):
        from .tokenizer import load_tokenizer

        return load_tokenizer(TINY_ASSETS / "tokenizer.json")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(backbone)


def _set_attention(config, attn_implementation: str) -> None:
    config._attn_implementation = attn_implementation


def build_classifier(backbone: str, num_labels: int = 2, attn_implementation: str = "sdpa", init_seed: int = 0,
                     dropout: float | None = None):
    """An XLM-R sequence classifier: encoder + one tanh hidden layer on ``<s>`` (the paper's head).

    ``init_seed`` seeds every randomly initialised weight (the whole tiny model, or the new
    classifier head of a pretrained one) without touching the global RNG, so one seed
    reproduces a run whatever ran before.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, XLMRobertaConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if is_tiny(backbone):
            tokenizer_vocab = load_backbone_tokenizer(backbone).vocab_size
            config = XLMRobertaConfig(vocab_size=tokenizer_vocab, num_labels=num_labels, **TINY_CONFIG)
            if dropout is not None:
                config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
            _set_attention(config, attn_implementation)
            from transformers import XLMRobertaForSequenceClassification

            model = XLMRobertaForSequenceClassification(config)
            weights = TINY_ASSETS / "model.safetensors"
            if backbone == "tiny" and weights.is_file():
                load_encoder_weights(model, weights)
        else:
            config = AutoConfig.from_pretrained(backbone, num_labels=num_labels)
            if dropout is not None:
                config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
            with contextlib.suppress(TypeError):
                model = AutoModelForSequenceClassification.from_pretrained(
                    backbone, config=config, attn_implementation=attn_implementation
                )
                return model
            model = AutoModelForSequenceClassification.from_pretrained(backbone, config=config)
    return model


def load_encoder_weights(model, path: Path) -> None:
    """Load pretrained encoder weights (safetensors) into a classifier's ``roberta`` encoder."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    encoder_state = {k.removeprefix("roberta."): v for k, v in state.items() if k.startswith("roberta.")}
    missing, unexpected = model.roberta.load_state_dict(encoder_state, strict=False)
    missing = [k for k in missing if "pooler" not in k]
    if missing or unexpected:
        raise RuntimeError(f"{path}: encoder weights do not fit the tiny model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def set_attention_implementation(model, attn_implementation: str) -> None:
    """Switch a loaded model between eager and SDPA attention (sketching needs eager)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    else:  # older transformers read the attribute at call time
        model.config._attn_implementation = attn_implementation

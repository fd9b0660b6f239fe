"""The model floor: backbones, head gates, the LightningModule, and (on top) the CLI and the study runner.

Importing it registers crossling's backbone tokenizers with the datamodules (``datamodules.tokenizers``),
which ask for a tokenizer by backbone name and import nothing from here. The loader imports the backbones
(torch, transformers) only when a tokenizer is asked for, so the package itself imports fast.
"""

from datamodules.tokenizers import register_tokenizer_loader


def _load_backbone_tokenizer(backbone: str):
    from .backbones import load_backbone_tokenizer

    return load_backbone_tokenizer(backbone)


register_tokenizer_loader(_load_backbone_tokenizer)

"""The model floor: backbones, head gates, the LightningModule, and (on top) the CLI and the study runner.

Importing it registers crossling's backbone tokenizers with the datamodules (``datamodules.tokenizers``),
which ask for a tokenizer by backbone name and import nothing from here.
"""

from datamodules.tokenizers import register_tokenizer_loader

from .backbones import load_backbone_tokenizer

register_tokenizer_loader(load_backbone_tokenizer)

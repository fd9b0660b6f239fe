"""One LightningDataModule per task on a shared base (see ``base.py``)."""

from .base import MARCDataModule, PAWSXDataModule, TaskDataModule, XNLIDataModule
from .errors import DataError

__all__ = ["DataError", "MARCDataModule", "PAWSXDataModule", "TaskDataModule", "XNLIDataModule"]

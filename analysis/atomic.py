"""Atomic file writes: every artifact is written to a temporary name and renamed, so a killed
stage never leaves a half-written file that a later stage would trust."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json_atomic(path: Path, data: dict, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=True) + "\n")

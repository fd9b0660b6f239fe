"""Atomic file writes: every artifact is written to a temporary name and renamed, so a killed
stage never leaves a half-written file that a later stage would trust; a write that fails (a full
disk) removes its temporary file and says which file could not be written, in one line."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(OSError):
    """No room to write a file (a full disk or quota); nothing half-written was left."""

    def __str__(self) -> str:
        return str(self.strerror)


TEMPORARY = re.compile(r"\.tmp\d*$")  # what temporary_name (and Lightning's last.ckpt.tmp) end with


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files a writer killed mid-write (SIGKILL, power loss) left under ``folder``:
    nobody reads them, and a resumed stage writes its files again. Returns what was removed."""
    folder = Path(folder)
    found = [p for p in folder.rglob("*.tmp*") if p.is_file() and TEMPORARY.search(p.name)] if folder.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found


def temporary_name(path: Path) -> Path:
    """Where ``path`` is written before the rename: the same folder, a name no reader globs for (so a
    writer that picks a format by the suffix, like ``savefig``, is told the format)."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to (``savefig``, ``torch.save``); renamed to ``path`` when
    the block ends, removed when it raises."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise_if_disk_full(err, path)
        raise
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(err, path)
        raise


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator:
    """An open file (``w`` text in UTF-8, or ``wb``) whose content becomes ``path`` when the block ends."""
    with atomic_target(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f


def save_figure(fig, path: str | Path, **savefig) -> Path:
    """``fig.savefig`` to ``path`` atomically (PNG unless ``format`` says otherwise)."""
    with atomic_target(path) as tmp:
        fig.savefig(tmp, **({"format": "png"} | savefig))
    return Path(path)


def raise_if_disk_full(err: BaseException, path: Path) -> None:
    """Turn a full disk's error into a DiskFullError naming the file; other errors pass. The OSError may
    sit inside another library's error (torch.save raises a RuntimeError caused by it)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DiskFullError):
            return
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            raise DiskFullError(err.errno, f"no space left to write {path} ({os.strerror(err.errno)}); nothing "
                                           "half-written was kept: free some space and run the same command again") from None
        err = err.__cause__ or err.__context__


def write_text_atomic(path: Path, text: str) -> Path:
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_csv_atomic(path: str | Path, header: list[str], rows) -> Path:
    """The one CSV writer: a header and rows of cells (each written with ``str``; callers format their
    numbers), through a temporary file, so a reader never sees half a table."""
    with atomic_write(path) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([[str(cell) for cell in row] for row in rows])
    return Path(path)


def write_json_atomic(path: Path, data: dict, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=True) + "\n")

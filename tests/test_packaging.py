"""A wheel holds every package of the project: pyproject lists packages by hand, so a new folder
with an ``__init__.py`` must be listed too (an editable install would hide the omission)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOP = ("lightning_modules", "datamodules", "callbacks", "analysis")


def test_pyproject_lists_every_package_folder():
    # read with a pattern, not tomllib: the project supports Python 3.10, which has none
    block = re.search(r"^\[tool\.setuptools\]\s*packages\s*=\s*\[(.*?)\]", (REPO / "pyproject.toml").read_text(),
                      re.M | re.S)
    assert block, "pyproject.toml: no [tool.setuptools] packages = [...] list"
    listed = set(re.findall(r'"([^"]+)"', block.group(1)))
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for top in TOP
        for init in (REPO / top).rglob("__init__.py")
    }
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert listed - found == set(), f"pyproject.toml lists packages that do not exist: {sorted(listed - found)}"

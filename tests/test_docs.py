"""The documentation: the MkDocs site under docs/ builds strictly (mkdocs.yml makes a broken link, a broken
anchor and a page missing from nav warnings, and --strict makes warnings failures), and the README stays a
short front door whose relative links all point at files (and headings) that exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 150
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_docs_build_strictly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"


def headings_slugs(path: Path) -> set[str]:
    """The anchors MkDocs (Python-Markdown's toc) gives a page's headings; code blocks skipped."""
    from markdown.extensions.toc import slugify

    slugs, fence = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            slugs.add(slugify(m.group(1), "-"))
    return slugs


def test_readme_is_short_and_its_relative_links_resolve():
    readme = REPO / "README.md"
    lines = readme.read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines; keep it under {README_MAX_LINES}"
    broken = []
    for target in LINK.findall(readme.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path, _, anchor = target.partition("#")
        file = REPO / path
        if not file.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and file.suffix == ".md" and anchor not in headings_slugs(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path}")
    assert not broken, "README.md links that point nowhere:\n" + "\n".join(broken)

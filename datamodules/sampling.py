"""Choosing which items of each language a run uses.

Parallel tasks (XNLI, PAWS-X) take the *same item ids* in every language, as the paper
does, so that cross-language influence is not confounded by different content.
"""

from __future__ import annotations

import random

from .errors import DataError
from .sources import Record


def sample_parallel(per_lang: dict[str, list[Record]], n: int | None, seed: int, where: str) -> dict[str, list[Record]]:
    """Pick ``n`` item ids present in every language; keep each language's file order."""
    langs = list(per_lang)
    common = set(r.id for r in per_lang[langs[0]])
    for lang in langs[1:]:
        common &= set(r.id for r in per_lang[lang])
    if not common:
        raise DataError(f"{where}: no item id is shared by all of {langs}; parallel sampling needs shared ids")
    # unique ids (a repeated id would be drawn twice and leave fewer than n items)
    ordered = list(dict.fromkeys(r.id for r in per_lang[langs[0]] if r.id in common))
    chosen = set(ordered if n is None or n >= len(ordered) else random.Random(seed).sample(ordered, n))
    out = {}
    for lang in langs:
        seen = set()
        rows = []
        for r in per_lang[lang]:
            if r.id in chosen and r.id not in seen:
                seen.add(r.id)
                rows.append(r)
        out[lang] = rows
    return out


def sample_independent(per_lang: dict[str, list[Record]], n: int | None, seed: int) -> dict[str, list[Record]]:
    """Pick ``n`` records per language independently (non-parallel corpora such as MARC)."""
    out = {}
    for lang, rows in per_lang.items():
        if n is None or n >= len(rows):
            out[lang] = list(rows)
            continue
        # A string seed is hashed deterministically by random.Random (not by PYTHONHASHSEED).
        keep = sorted(random.Random(f"{seed}:{lang}").sample(range(len(rows)), n))
        out[lang] = [rows[i] for i in keep]
    return out

"""``crossling analyze --stages influence``: TracIn rankings and language contributions, per condition.

Reads ``<run>/sketches/epoch=<E>/<mask>/<split>.npy`` + ``.json`` (the sketch stage's files) and,
with ``--compare_to``, that run's ``influence/full/``; writes ``<run>/influence/<condition>/``:
``topk.npz`` (each test example's top-m training examples per sign), ``contributions.csv`` (test ×
train language shares with bootstrap intervals), ``meta.json``, and ``vs-full@<run>.csv`` when
comparing. Resumable: a condition ranked from the same inputs with the same options is kept.

The work is numpy only and lives in ``analysis/influence/`` (``stage.py`` → ``ranking.py``,
``tables.py``, ``topk_file.py``), so a notebook can run it without Lightning; this file is the
CLI's door to it.
"""

from __future__ import annotations

from pathlib import Path

from analysis.influence import run_influence

from .request import AnalyzeRequest


def run_influence_stage(request: AnalyzeRequest) -> dict[str, Path]:
    r = request
    return run_influence(r.run_dir, r.conditions, r.influence, r.compare_to)

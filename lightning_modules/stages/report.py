"""``crossling analyze --stages report``: the run's figures, tables and ``report.md`` / ``report.html``.

Reads ``<run>/influence/<condition>/`` (and the compared run's), ``<run>/subnetworks/``,
``<run>/fidelity/fidelity.json``, ``<run>/accuracy/``; writes ``<run>/report/`` (PNG figures, CSV
tables, ``report.md``, ``report.html``) and, when the Trainer logs to W&B, the same figures to that
run. Built by ``analysis/report/build.py`` (numpy and matplotlib only); runs on rank 0 alone.
"""

from __future__ import annotations

from pathlib import Path

from analysis.report import build_report

from ..explain import example_texts
from .request import AnalyzeRequest


def run_report_stage(request: AnalyzeRequest) -> Path | None:
    r = request
    if not r.trainer.is_global_zero:
        return None
    for logger in r.trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            _ = logger.experiment  # start the W&B run so the report's figures are logged to it
    path = build_report(r.run_dir, r.conditions, r.influence, r.compare_to, example_texts(r.datamodule))
    print(f"analyze: report written to {path} (and {path.with_suffix('.html')})", flush=True)
    return path

"""The report: every figure and table of the paper's list that the run's stages made possible.

``write_report`` reads ``influence/<condition>/topk.npz`` of a run (and of a run it is compared with),
``subnetworks/<lang>.json`` masks, ``subnetworks/stats/table1_disabled_heads.csv`` and
``accuracy/accuracy.csv`` when present, and writes ``<run>/report/``: one PNG and one CSV per figure or
table, ``report.md`` and ``report.html`` with one sentence each on what is compared. Inputs that do
not exist are listed under "Missing inputs" instead of failing the report.

Conventions: rows are test languages, columns training languages, in the run's language order;
only test examples that every compared model classifies correctly enter a comparison (the count per
language is in every CSV, column ``n_test``); differences are paired over the same test examples;
every percentage carries a bootstrap CI over test examples, and a difference is starred in the
heatmaps (and ``marked`` in its CSV) when its CI clears zero by more than the projection's share
error measured by the run's ``fidelity`` stage (``projection_error``; zero when not measured, which
the report says).
"""

from .build import build_report, describe_run_backbone, log_report_to_wandb, write_report
from .items import detect_run_kind

__all__ = ["build_report", "describe_run_backbone", "detect_run_kind", "log_report_to_wandb", "write_report"]

"""The projection's own error, as the ``fidelity`` stage measured it on a sample of a run, and the
rule that keeps it out of the findings: a change is marked only when its bootstrap interval clears
zero by more than the measured share error.

Why the mean over cells: the fidelity sample compares each test × train language share of the
top-m sets ranked from sketches with the same share ranked from exact gradients. Its largest cell
is mostly the sample's own coarseness (with 8 test examples per language and a top-25 set, one
example moves a cell by 4 pp / 8), while a run's cells average several times more test examples,
over which independent projection errors shrink; the mean is the typical error of a cell. Both
sides of a compared pair are sketched with the same matrices, so it is not doubled. The header
states the largest cell too. The bootstrap interval covers the test-sample noise; the margin
covers the sketch; a marked change clears both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .contributions import SIGNS

FIDELITY_FILE = Path("fidelity") / "fidelity.json"


class ProjectionErrorFileError(ValueError):
    """A fidelity.json that does not hold what the fidelity stage writes."""


@dataclass(frozen=True)
class ProjectionError:
    """The share error (pp) of one run's sketches, per sign: mean and largest cell."""

    path: Path
    mean_pp: dict[str, float]
    max_pp: dict[str, float]
    n_test: int
    n_train: int
    m: int
    epoch: int
    condition: str

    def describe(self) -> str:
        cells = "; ".join(f"{s} {self.mean_pp[s]:.2f} mean, {self.max_pp[s]:.2f} largest" for s in SIGNS)
        return (f"{cells} (pp; `{self.condition}` at epoch {self.epoch}, {self.n_test} test × {self.n_train} "
                f"training examples, top-{self.m}, against exact gradients)")


def load_projection_error(run_dir: str | Path) -> ProjectionError | None:
    """The run's measured share error, or None when its fidelity stage has not run."""
    path = Path(run_dir) / FIDELITY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        err = data["share_error_pp"]
        return ProjectionError(
            path,
            {s: float(err[s]["mean"]) for s in SIGNS},
            {s: float(err[s]["max"]) for s in SIGNS},
            int(data["n_test"]),
            int(data["n_train"]),
            int(data["m"]),
            int(data["epoch"]),
            str(data.get("options", {}).get("condition", "full")),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ProjectionErrorFileError(
            f"{path}: expected the fidelity stage's JSON with share_error_pp.pos/neg.mean/max, n_test, n_train, "
            f"m and epoch ({type(err).__name__}: {err}); run `crossling analyze --stages [fidelity]` again"
        ) from None


def marking_margin(errors: list[ProjectionError | None]) -> dict[str, float]:
    """Per sign, the margin a change must clear: the larger mean share error of the compared runs
    (runs without a measurement add nothing)."""
    return {s: max([e.mean_pp[s] for e in errors if e is not None], default=0.0) for s in SIGNS}

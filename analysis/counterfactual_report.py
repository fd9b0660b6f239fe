"""The counterfactual check's files and its part of the study's front page: per-example effects
(``effects.npz``, what the study pools over seeds), ``counterfactual.csv``, ``counterfactual.json`` and
the figures, for one seed (the stage) or pooled over seeds (the study report)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_write, write_json_atomic
from .contributions import read_contributions_csv, write_rows_csv
from .counterfactual import (
    CSV_COLUMNS,
    CounterfactualError,
    SeedCounterfactual,
    counterfactual_matrix,
    describe_agreement,
    matrix_rows,
    measure_agreement,
)
from .counterfactual_plot import plot_counterfactual_matrices, plot_predicted_vs_retrained

EFFECTS_FILE = "effects.npz"
RUN_FOLDER = "counterfactual"  # under the analysed (full fine-tuning) run


def write_effects(path: Path, seed: SeedCounterfactual) -> Path:
    arrays = {"lang": seed.lang.astype(np.int64), "languages": np.array(seed.languages, dtype=np.str_),
              "removed": np.array(list(seed.retrained), dtype=np.str_),
              "not_learned": np.array(list(seed.not_learned), dtype=np.str_)}
    for r in seed.retrained:
        arrays[f"retrained_{r}"], arrays[f"predicted_{r}"] = seed.retrained[r], seed.predicted[r]
        arrays[f"accuracy_{r}"] = seed.accuracy[r]
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_effects(path: Path, seed: int) -> SeedCounterfactual:
    """A seed's per-example counterfactual effects (``effects.npz``), for pooling over seeds."""
    try:
        with np.load(path, allow_pickle=False) as f:
            removed = [str(x) for x in f["removed"]]
            return SeedCounterfactual(seed, [str(x) for x in f["languages"]], f["lang"],
                                      {r: f[f"retrained_{r}"] for r in removed},
                                      {r: f[f"predicted_{r}"] for r in removed},
                                      {r: f[f"accuracy_{r}"] for r in removed},
                                      tuple(str(x) for x in f["not_learned"]) if "not_learned" in f.files else ())
    except (OSError, ValueError, KeyError) as err:
        raise CounterfactualError(f"{path}: not a readable counterfactual effects file ({err})") from None


def positive_shares(run_dir: Path, languages: list[str], condition: str) -> np.ndarray | None:
    """The report's positive top-m language shares (test × train) in ``languages`` order, if ranked."""
    path = run_dir / "influence" / condition / "contributions.csv"
    if not path.is_file():
        return None
    table = read_contributions_csv(path)
    order = [table.languages.index(lang) for lang in languages]
    return table.percent["pos"][np.ix_(order, order)]


def write_counterfactual_outputs(out: Path, seeds: list[SeedCounterfactual], shares: np.ndarray | None,
                                 n_resamples: int, extra: dict, title: str) -> dict:
    """The matrix pooled over ``seeds``, its agreement numbers, CSV, JSON and figures; returns the JSON."""
    matrix = counterfactual_matrix(seeds, n_resamples)
    agreement = measure_agreement(matrix, shares)
    write_rows_csv(out / "counterfactual.csv", matrix_rows(matrix), CSV_COLUMNS)
    plot_predicted_vs_retrained(out / "predicted_vs_retrained.png", matrix, title)
    plot_counterfactual_matrices(out / "counterfactual_matrices.png", matrix)
    summary = {"seeds": [s.seed for s in seeds], "languages": matrix.languages, "removed": matrix.removed,
               **agreement.as_dict(), "sentence": describe_agreement(agreement, matrix), **extra}
    write_json_atomic(out / "counterfactual.json", summary)
    return summary


def seed_effects(seed_roots: dict[int, Path]) -> list[SeedCounterfactual]:
    """Every seed's effects that the counterfactual stage wrote (seeds without them are left out)."""
    found = []
    for seed, root in sorted(seed_roots.items()):
        path = root / "full" / RUN_FOLDER / EFFECTS_FILE
        if path.is_file():
            found.append(load_effects(path, seed))
    return found


def counterfactual_section(seed_roots: dict[int, Path], out: Path) -> list[str]:
    """The front page's Markdown for the counterfactual check, pooled over the seeds that ran it, with its
    files under ``out`` (the study's ``report/counterfactual/``); empty when no seed ran it."""
    seeds = seed_effects(seed_roots)
    if not seeds:
        return []
    shares = [positive_shares(seed_roots[s.seed] / "full", s.languages, "full") for s in seeds]
    mean_shares = None if any(x is None for x in shares) else np.mean(np.stack(shares), axis=0)
    names = ", ".join(str(s.seed) for s in seeds)
    summary = write_counterfactual_outputs(out, seeds, mean_shares, 1000, {},
                                           f"Leaving a training language out: TracIn vs retraining (seeds {names})")
    rel = out.name
    md = ["## Does influence predict what removing a language does? (counterfactual check)", "",
          summary["sentence"], "",
          "Each training language was left out of full fine-tuning in turn (same pretrained weights, head "
          "initialisation, seed and epochs), and a control left out as many examples drawn at random from all "
          "languages. Retrained: the change of each test language's mean loss; predicted: first-order TracIn from "
          "the full run's sketches; intervals: paired bootstrap over test examples"
          + (", pooled over seeds (two-level)." if len(seeds) > 1 else "."), "",
          f"![predicted vs retrained]({rel}/predicted_vs_retrained.png)", "",
          f"![counterfactual matrices]({rel}/counterfactual_matrices.png)", "",
          f"Data: [counterfactual.csv]({rel}/counterfactual.csv), [counterfactual.json]({rel}/counterfactual.json)", ""]
    return md

"""The counterfactual check's files and its part of the study's front page: per-example effects
(``effects.npz``, what the study pools over seeds), ``counterfactual.csv``, ``counterfactual.json`` and
the figures, for one seed (the stage) or pooled over seeds (the study report)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .atomic import atomic_write, write_json_atomic
from .contributions import read_contributions_csv, write_rows_csv
from .counterfactual import (
    CONTROL,
    CSV_COLUMNS,
    CounterfactualError,
    SeedCounterfactual,
    counterfactual_matrix,
    describe_agreement,
    matrix_rows,
    measure_agreement,
    noise_floor,
)
from .counterfactual_plot import plot_counterfactual_matrices, plot_predicted_vs_retrained
from .planted import PlantedInputs, describe_planted, method_rows, planted_cell
from .report.render import markdown_table

EFFECTS_FILE = "effects.npz"
RUN_FOLDER = "counterfactual"  # under the analysed (full fine-tuning) run


def write_effects(path: Path, seed: SeedCounterfactual) -> Path:
    arrays = {"lang": seed.lang.astype(np.int64), "languages": np.array(seed.languages, dtype=np.str_),
              "removed": np.array(list(seed.retrained), dtype=np.str_),
              "not_learned": np.array(list(seed.not_learned), dtype=np.str_)}
    for r in seed.retrained:
        arrays[f"retrained_{r}"], arrays[f"predicted_{r}"] = seed.retrained[r], seed.predicted[r]
        arrays[f"accuracy_{r}"] = seed.accuracy[r]
    arrays["refits"] = np.array(list(seed.refits), dtype=np.str_)
    for name, values in seed.refits.items():
        arrays[f"refit_{name}"] = values
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
                                      tuple(str(x) for x in f["not_learned"]) if "not_learned" in f.files else (),
                                      {str(n): f[f"refit_{n}"] for n in f["refits"]} if "refits" in f.files else {})
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
                                 n_resamples: int, extra: dict, title: str,
                                 planted: PlantedInputs | None = None) -> dict:
    """The matrix pooled over ``seeds``, its agreement numbers, CSV, JSON and figures; returns the JSON.
    ``planted`` (one seed's run only): the planted control's verdicts go in as ``planted`` and
    ``planted_sentence``."""
    matrix = counterfactual_matrix(seeds, n_resamples)
    agreement = measure_agreement(matrix, shares, noise_floor(seeds))
    if planted is not None:
        extra = {**extra, **measure_planted(matrix, seeds[0], planted, agreement.noise_floor)}
    write_rows_csv(out / "counterfactual.csv", matrix_rows(matrix), CSV_COLUMNS)
    plot_predicted_vs_retrained(out / "predicted_vs_retrained.png", matrix, title, agreement.noise_floor)
    plot_counterfactual_matrices(out / "counterfactual_matrices.png", matrix)
    summary = {"seeds": [s.seed for s in seeds], "languages": matrix.languages, "removed": matrix.removed,
               **agreement.as_dict(), "sentence": describe_agreement(agreement, matrix), **extra}
    write_json_atomic(out / "counterfactual.json", summary)
    return summary


def measure_planted(matrix, seed: SeedCounterfactual, planted: PlantedInputs, floor: dict[str, float]) -> dict:
    """The planted cell under retraining and under TracIn's prediction, with the retrieval of marked items."""
    language = planted.language
    left_out = [r for r in matrix.removed if r != CONTROL and r not in matrix.not_learned]
    if language not in left_out or CONTROL not in matrix.removed:
        return {"planted": {"language": language, "fraction": planted.fraction,
                            "note": f"no learned fit without {language} and the random control to compare",
                            "retrieval": planted.retrieval.as_dict() if planted.retrieval else None,
                            "retrieval_by_method": {k: v.as_dict() for k, v in planted.others.items()}}}
    row, col = matrix.languages.index(language), left_out.index(language)
    cells = {q: planted_cell(matrix.grid(q, left_out), matrix.cell(q, language, language), row, col,
                             matrix.cell(q, language, CONTROL)[0], float(getattr(seed, q)[language][planted.marked].mean()))
             for q in ("retrained", "predicted")}
    record = {"language": language, "fraction": planted.fraction, "marked_test_items": int(planted.marked.sum()),
              **{q: c.as_dict() for q, c in cells.items()},
              "retrieval": planted.retrieval.as_dict() if planted.retrieval else None,
              "retrieval_by_method": {k: v.as_dict() for k, v in planted.others.items()}}
    sentence = describe_planted(language, planted.fraction, cells["retrained"], cells["predicted"], planted.retrieval,
                                floor, planted.others)
    return {"planted": record, "planted_sentence": sentence}


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
          + (", pooled over seeds (two-level)." if len(seeds) > 1 else ".")
          + (" Refits (the full fine-tuning again with nothing removed, another seed for dropout and batch order) "
             "measure retraining's own noise: a cell counts as beyond it when it moves its test language's loss "
             "more than every refit did." if any(s.refits for s in seeds) else
             " Retraining's own noise was not measured (no refits: the study key counterfactual_refits)."), "",
          f"![predicted vs retrained]({rel}/predicted_vs_retrained.png)", "",
          f"![counterfactual matrices]({rel}/counterfactual_matrices.png)", "",
          f"Data: [counterfactual.csv]({rel}/counterfactual.csv), [counterfactual.json]({rel}/counterfactual.json)", ""]
    return md + seed_notes(seed_roots, [s.seed for s in seeds])


def seed_notes(seed_roots: dict[int, Path], seeds: list[int]) -> list[str]:
    """What each seed's own check found that pooling does not carry: the planted control's verdicts and the
    prediction's agreement with retraining from the last 1, 2, ... checkpoints (from its ``counterfactual.json``)."""
    md = []
    for seed in seeds:
        path = seed_roots[seed] / "full" / RUN_FOLDER / "counterfactual.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # an older stage's file: the pooled numbers above still hold
        planted = record.get("planted") if isinstance(record.get("planted"), dict) else {}
        if record.get("planted_sentence"):
            md += [f"**Seed {seed}.** {record['planted_sentence']}", ""]
        elif planted.get("note"):
            md += [f"**Seed {seed}, planted control:** {planted['note']}.", ""]
        rows = method_rows(planted.get("retrieval"), planted.get("retrieval_by_method"), record.get("by_method"))
        if len(rows) > 1:  # TracIn and at least one other method: a small leaderboard
            counts = planted.get("retrieval") or next(iter((planted.get("retrieval_by_method") or {}).values()), None)
            where = (f" ({counts['n_test']} marked test items; {counts['n_marked_pool']} of the {counts['n_pool']} "
                     "ranked training items marked)") if counts else ""
            md += [f"**Seed {seed}, which attribution to believe**{where}: the removal effect each method's scores "
                   "imply against retraining over the leave-out cells (Pearson r, column-permutation p)"
                   + (", and how well each finds the planted items" if counts else "") + ":", "",
                   markdown_table(rows), ""]
        by = record.get("by_checkpoints") or {}
        if len(by) > 1:
            parts = [f"last {n}: r = {a['pearson_r']:.2f}"
                     + (f" (p = {a['permutation_p']:.2f})" if np.isfinite(a["permutation_p"]) else "")
                     + f", slope {a['slope']:.3g}"
                     for n, a in sorted(by.items(), key=lambda kv: int(kv[0]))]
            md += [f"**Seed {seed}, prediction by checkpoints used** (over {next(iter(by.values()))['n']} cells): "
                   + "; ".join(parts) + ".", ""]
    return md

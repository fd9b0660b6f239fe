"""The study's changes pooled over training seeds: for each question the study answers (in-language
share under the own subnetwork vs the full model, paper Fig 2; random subnetworks, Fig 3; after SFT,
Fig 4; after SFT with random subnetworks, Fig 6; test accuracy SFT vs full, Table 2), each seed's
per-example values, the two-level bootstrap of ``seed_pooling``, the margin the projection error
adds, and what a reader must know beside the number (a seed whose subnetwork was degenerate, a run
that did not beat the majority class). Reads only files the stages wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..accuracy_stats import PredictionsError, load_predictions, majority_rate
from ..contributions import in_language_share, positions_of
from ..influence import InfluenceError, kept_indices, load_topk, topk_path
from ..influence.options import MissingInputs
from ..layout import (
    ANALYZE_CONFIG_FILE,
    FULL,
    STUDY_RECORDS,
    config_value,
    read_run_config,
    sft_random_name,
    sft_random_runs,
    study_seed_folders,
    training_seed,
)
from ..masks import name_seed
from ..projection_error import load_projection_error
from ..seed_pooling import ALL, PooledEffect, SeedSample, pool_seeds


@dataclass(frozen=True)
class Question:
    """``run:condition − ref_run:ref_condition`` of each test language's in-language share."""

    key: str
    run: str
    condition: str
    ref_run: str
    ref_condition: str
    what: str
    paper: str


def influence_questions(random_seeds: list[int]) -> list[Question]:
    out = [
        Question("own_vs_full", "full", "own", "full", "full",
                 "after full fine-tuning, own subnetwork vs the full model", "Fig 2"),
    ]
    out += [Question(f"random{r}_vs_full", "full", f"random{r}", "full", "full",
                     f"after full fine-tuning, shuffled subnetworks (seed {r}) vs the full model", "Fig 3")
            for r in random_seeds]
    out.append(Question("sft_vs_full", "sft", "own", "full", "full",
                        "after SFT (own subnetworks) vs the fully fine-tuned model", "Fig 4"))
    out += [Question(f"sft_random{r}_vs_full", sft_random_name(r), f"random{r}", "full", "full",
                     f"after SFT with shuffled subnetworks (seed {r}) vs the fully fine-tuned model", "Fig 6")
            for r in random_seeds]
    return out


@dataclass
class PooledFinding:
    """One question's pooled answer and what qualifies it."""

    key: str
    what: str
    paper: str
    unit: str  # "pp" (share) or "points" (accuracy)
    effect: PooledEffect
    margin: float
    notes: list[str] = field(default_factory=list)

    @property
    def marked(self) -> np.ndarray:
        return self.effect.marked(self.margin)


SEED_PROGRESS = Path(STUDY_RECORDS) / "seeds.json"  # written by the study runner as each seed's chain finishes


def seed_progress(root: Path) -> tuple[list[int], list[int]] | None:
    """(finished, planned) training seeds of a study of several seeds that the runner is working on or
    has run; None where the runner left no record (a one-seed study, a copied folder)."""
    path = Path(root) / SEED_PROGRESS
    try:
        record = json.loads(path.read_text())
        return [int(s) for s in record["finished"]], [int(s) for s in record["planned"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def seed_roots(root: Path) -> dict[int, Path]:
    """Training seed -> the folder holding that seed's runs (``full``, ``sft``, ...).

    A one-seed study keeps its runs at the root; its seed is read from the full run's config. While a
    study of several seeds runs, only the seeds whose whole chain has finished count (``seed_progress``):
    a seed half-way through would pool its natural analysis with other seeds' SFT.
    """
    root = Path(root)
    found = study_seed_folders(root)
    if found:
        progress = seed_progress(root)
        if progress is not None:
            found = {seed: path for seed, path in found.items() if seed in progress[0]}
        return dict(sorted(found.items()))
    if (root / FULL).is_dir():
        seed = training_seed(root / FULL)
        return {0 if seed is None else seed: root}
    return {}


def random_seeds_of(roots: dict[int, Path]) -> list[int]:
    return sorted({seed for path in roots.values() for seed in sft_random_runs(path)})


def bootstrap_options(run: Path) -> tuple[int, int, float]:
    """(resamples, seed, level) of the run's analysis (its analyze.config.yaml), defaults otherwise."""
    influence = config_value(read_run_config(run, ANALYZE_CONFIG_FILE), "influence") or {}
    return int(influence.get("bootstrap_resamples", 1000)), int(influence.get("seed", 0)), float(
        influence.get("ci_level", 0.95))


def in_language_sample(seed_root: Path, q: Question, seed: int,
                       method: str = "tracin") -> tuple[SeedSample, list[str]] | None:
    """Per test example kept by both rankings (correct under both), the change of its in-language
    share of the top-m positive influences under one attribution method; None when the seed lacks
    either ranking."""
    try:
        top = load_topk(topk_path(seed_root / q.run, q.condition, method))
        ref = load_topk(topk_path(seed_root / q.ref_run, q.ref_condition, method))
    except (MissingInputs, InfluenceError):
        return None
    if top.languages != ref.languages:
        return None
    kept = kept_indices([top, ref])
    rows, ref_rows = positions_of(top["test_indices"], kept), positions_of(ref["test_indices"], kept)
    codes = top.test_codes()[rows]
    values = in_language_share(top.shares("pos", rows), codes) - in_language_share(ref.shares("pos", ref_rows), codes)
    return SeedSample(seed, values, codes), list(top.languages)


def share_margin(roots: dict[int, Path], runs: list[str]) -> float:
    """The largest mean share error (positive sign) measured on any seed's compared runs: a pooled
    change must clear zero by more than the projection could move it."""
    errors = [load_projection_error(path / run) for path in roots.values() for run in runs]
    return max([e.mean_pp["pos"] for e in errors if e is not None], default=0.0)


def degenerate_languages(seed_root: Path) -> list[str]:
    """Languages whose subnetwork search in this seed could not stop above the majority class."""
    out = []
    for path in sorted((seed_root / "full" / "subnetworks").glob("*.json")):
        try:
            if json.loads(path.read_text()).get("degenerate"):
                out.append(path.stem)
        except (OSError, json.JSONDecodeError):
            continue
    return out


# the accuracy column that measures each run's model on test, in its own predictions.npz or the SFT run's
RUN_ACCURACY = {"full": ("sft", "full_model"), "sft": ("sft", "subnetwork_after_sft")}


def below_majority_languages(seed_root: Path, run: str) -> tuple[list[str], list[str]] | None:
    """(test languages where ``run``'s model does not beat the majority-class rate, i.e. its accuracy is at
    or below it; every test language); None when the study has no per-example test predictions for it."""
    where, column = RUN_ACCURACY.get(run, (run, "subnetwork_after_sft"))
    try:
        pred = load_predictions(seed_root / where / "accuracy" / "predictions.npz")
    except (PredictionsError, FileNotFoundError, OSError):
        return None
    if column not in pred.correct:
        return None
    majority = majority_rate(pred.label, pred.lang, len(pred.languages))
    out = []
    for g, lang in enumerate(pred.languages):
        sel = pred.lang == g
        if sel.any() and pred.correct[column][sel].mean() <= majority[g]:
            out.append(lang)
    return out, list(pred.languages)


def qualifying_notes(roots: dict[int, Path], q_runs: list[str], uses_masks: bool) -> list[str]:
    """What a reader must know beside a pooled number: seeds whose subnetworks were degenerate, and
    runs whose model did not beat the majority-class rate on test (per seed, with the languages)."""
    notes = []
    if uses_masks:
        bad = {seed: langs for seed, path in roots.items() if (langs := degenerate_languages(path))}
        if bad:
            notes.append("degenerate subnetworks (the search could not stop above the majority class): "
                         + "; ".join(f"seed {seed} {', '.join(langs)}" for seed, langs in bad.items()))
    for run in q_runs:
        below = {}
        for seed, path in roots.items():
            found = below_majority_languages(path, run)
            if found and found[0]:
                langs, every = found
                below[seed] = "every language" if len(langs) == len(every) else ", ".join(langs)
        if below:
            notes.append(f"the `{run}` model does not beat the majority-class rate on test: "
                         + "; ".join(f"seed {seed} {where}" for seed, where in below.items()))
    return notes


# rankings over randomly projected gradients: the fidelity stage measures the share error such a
# projection causes, the margin a change must clear (representations and EK-FAC scores are not projected)
PROJECTED = ("kronecker",)


def ranks_projections(seed_root: Path, q: Question, method: str) -> bool:
    """Whether both rankings of ``q`` under ``method`` ranked randomly projected gradients (their files'
    ``projection`` record says so; no branch on the method's name)."""
    metas = []
    for run, condition in ((q.run, q.condition), (q.ref_run, q.ref_condition)):
        try:
            metas.append(load_topk(topk_path(seed_root / run, condition, method)).meta)
        except (MissingInputs, InfluenceError):
            return False
    return all((meta.get("projection") or {}).get("kind") in PROJECTED for meta in metas)


def pooled_influence(root: Path, method: str = "tracin") -> list[PooledFinding]:
    """Every in-language-share question the seeds' rankings under ``method`` answer, pooled over the seeds
    that have it. The projection error's margin applies to rankings of the sketches (TracIn, TRAK); EK-FAC and
    representation similarity do not project, so their changes are judged by their intervals alone
    (``ranks_projections``)."""
    roots = seed_roots(root)
    out = []
    for q in influence_questions(random_seeds_of(roots)):
        samples, languages = [], None
        for seed, path in roots.items():
            got = in_language_sample(path, q, seed, method)
            if got is not None and (languages is None or got[1] == languages):
                samples.append(got[0])
                languages = got[1]
        if not samples:
            continue
        resamples, boot_seed, level = bootstrap_options(roots[samples[0].seed] / q.run)
        effect = pool_seeds(samples, languages, resamples, name_seed("pooled", boot_seed, q.key), level)
        uses_masks = q.condition != "full" or q.run != "full"
        notes = qualifying_notes({s.seed: roots[s.seed] for s in samples}, [q.run], uses_masks)
        projected = ranks_projections(roots[samples[0].seed], q, method)
        margin = share_margin(roots, [q.run, q.ref_run]) if projected else 0.0
        out.append(PooledFinding(q.key, q.what, q.paper, "pp", effect, margin, notes))
    return out


def pooled_accuracy(root: Path) -> list[PooledFinding]:
    """Test accuracy after SFT minus the fully fine-tuned model's (Table 2), per example paired within
    a seed, pooled over seeds (points of accuracy)."""
    roots = seed_roots(root)
    out = []
    for run, what in [("sft", "test accuracy after SFT (own subnetworks) vs the fully fine-tuned model")] + [
        (sft_random_name(r), f"test accuracy after SFT with shuffled subnetworks (seed {r}) vs the fully "
                           "fine-tuned model") for r in random_seeds_of(roots)
    ]:
        samples, languages = [], None
        for seed, path in roots.items():
            try:
                pred = load_predictions(path / run / "accuracy" / "predictions.npz")
            except (PredictionsError, FileNotFoundError, OSError):
                continue
            if not {"subnetwork_after_sft", "full_model"} <= set(pred.correct):
                continue
            diff = 100.0 * (pred.correct["subnetwork_after_sft"].astype(float)
                            - pred.correct["full_model"].astype(float))
            if languages is None or pred.languages == languages:
                samples.append(SeedSample(seed, diff, pred.lang))
                languages = pred.languages
        if not samples:
            continue
        effect = pool_seeds(samples, languages, 1000, name_seed("pooled-accuracy", run), 0.95)
        notes = qualifying_notes({s.seed: roots[s.seed] for s in samples}, ["full", run], True)
        out.append(PooledFinding(f"accuracy_{run}", what, "Table 2", "points", effect, 0.0, notes))
    return out


def describe(f: PooledFinding) -> str:
    """One sentence: the pooled change over test languages, the seeds agreeing, which languages it
    held for, each seed's estimate, and what qualifies it."""
    e = f.effect
    last = len(e.groups) - 1
    n = len(e.seeds)
    marked = f.marked
    held = [g for g, m in zip(e.groups[:-1], marked[:-1]) if m]
    margin = f" by more than the projection error ({f.margin:.2f} pp)" if f.margin else ""
    verdict = (f"held across seeds{margin} for {', '.join(held)}" if held
               else f"no language's pooled interval clears zero{margin}")
    per_seed = ", ".join(f"seed {s} {e.per_seed[i, last]:+.1f} [{e.per_seed_low[i, last]:+.1f}, "
                         f"{e.per_seed_high[i, last]:+.1f}]" for i, s in enumerate(e.seeds))
    tag = f" (paper {f.paper})" if f.paper else ""
    text = (f"{f.what}{tag}: {e.pooled[last]:+.1f} {f.unit} [{e.low[last]:+.1f}, {e.high[last]:+.1f}] pooled over "
            f"{n} seeds and the test languages, {int(e.agree()[last])}/{n} seeds agree in sign ({per_seed}); "
            f"{verdict}")
    if f.notes:
        text += ". Beware: " + "; ".join(f.notes)
    return text + "."


def pooled_table(f: PooledFinding) -> list[dict]:
    """Per test language (and over them): each seed's estimate [interval], the pooled one, seeds agreeing."""
    e = f.effect
    agree, marked = e.agree(), f.marked
    rows = []
    for g, lang in enumerate(e.groups):
        row = {"test language": "mean" if lang == ALL else lang}
        for i, s in enumerate(e.seeds):
            row[f"seed {s}"] = _interval(e.per_seed[i, g], e.per_seed_low[i, g], e.per_seed_high[i, g])
        row["pooled [95% CI]"] = _interval(e.pooled[g], e.low[g], e.high[g]) + ("*" if marked[g] else "")
        row["seeds agreeing"] = f"{int(agree[g])}/{len(e.seeds)}"
        rows.append(row)
    return rows


def _interval(value: float, low: float, high: float) -> str:
    if not np.isfinite(value):
        return "–"
    return f"{value:+.1f} [{low:+.1f}, {high:+.1f}]"


def pooled_rows(findings: list[PooledFinding]) -> list[dict]:
    """The pooled findings as table rows (one per question × test language and over languages)."""
    rows = []
    for f in findings:
        e = f.effect
        for g, lang in enumerate(e.groups):
            row = {"question": f.key, "paper": f.paper, "test_lang": lang, "unit": f.unit,
                   "pooled": e.pooled[g], "ci_low": e.low[g], "ci_high": e.high[g],
                   "seeds_agree": int(e.agree()[g]), "n_seeds": len(e.seeds), "margin": f.margin,
                   "marked": bool(f.marked[g])}
            for i, s in enumerate(e.seeds):
                row |= {f"seed{s}": e.per_seed[i, g], f"seed{s}_low": e.per_seed_low[i, g],
                        f"seed{s}_high": e.per_seed_high[i, g], f"seed{s}_n": int(e.n_examples[i, g])}
            row["notes"] = "; ".join(f.notes) if lang == ALL else ""
            rows.append(row)
    return rows

"""``run_influence``: the influence stage, condition by condition, resumable (``influence/<condition>/``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..atomic import write_json_atomic as _write_json
from .methods import feature_root
from .options import InfluenceError, InfluenceOptions, MissingInputs
from .ranking import plan_condition, rank_condition, sha
from .tables import check_same_test_split, condition_table, difference_table, kept_indices
from .topk_file import influence_dir_name, load_topk, save_topk, topk_path

log = logging.getLogger(__name__)


def _read_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def run_label(run_dir: Path) -> str:
    """A short name for a run in tables and figures: its last two path components."""
    parts = Path(run_dir).resolve().parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else str(run_dir)


def run_influence(
    run_dir: Path,
    conditions: list[str],
    options: InfluenceOptions | None = None,
    compare_to: Path | None = None,
) -> dict[str, Path]:
    """Rank and summarise every condition whose sketches exist; returns condition → ``influence/<condition>``.

    Writes ``topk.npz`` (rankings), ``contributions.csv`` (test × train % with bootstrap CIs over the test
    examples the condition classifies correctly) and ``meta.json``. With ``compare_to`` (another run, e.g.
    the full fine-tuning run when this one is an SFT run) also writes ``vs-full@<that run>.csv``: this
    condition minus that run's ``full`` condition, paired over test examples both classify correctly.
    Conditions whose sketches are missing are skipped with a warning (an error with ``options.strict``).
    """
    run_dir = Path(run_dir)
    options = options or InfluenceOptions()
    options.check()
    reference = None
    if compare_to is not None:
        ref_path = topk_path(Path(compare_to), "full", options.method)
        if ref_path.is_file():
            reference = load_topk(ref_path)
        else:
            log.warning(
                "compare_to %s has no %s yet: run its influence stage first; skipping differences",
                compare_to,
                ref_path,
            )
    done: dict[str, Path] = {}
    for condition in conditions:
        out = run_dir / influence_dir_name(options.method) / condition
        try:
            plan = plan_condition(feature_root(run_dir, options.method), condition, options)
        except MissingInputs as err:
            if options.strict:
                raise
            log.warning("skipping %s", err)
            continue
        path = out / "topk.npz"
        meta = _read_meta(out / "meta.json")
        current = path.is_file() and meta.get("inputs_key") == plan.inputs_key
        if current:
            try:
                current = load_topk(path).meta.get("inputs_key") == plan.inputs_key
            except InfluenceError:
                current = False
        if not current:
            top = rank_condition(feature_root(run_dir, options.method), plan, options)
            save_topk(path, top)
            meta = {"inputs_key": plan.inputs_key, "condition": condition}
            _write_json(out / "meta.json", meta)
        else:
            log.info("%s: rankings up to date", out)
        top = load_topk(path)
        ckey = sha(
            json.dumps(
                [plan.inputs_key, options.bootstrap_resamples, options.ci_level, options.seed]
            ).encode()
        )
        if meta.get("contributions_key") != ckey or not (out / "contributions.csv").is_file():
            table = condition_table(top, kept_indices([top]), options, condition)
            table.write_csv(out / "contributions.csv")
            meta = {**meta, "contributions_key": ckey}
            _write_json(out / "meta.json", meta)
        if reference is not None:
            check_same_test_split(top, reference, str(path), str(ref_path))
            kept = kept_indices([top, reference])
            difference_table(top, reference, kept, options, f"{condition}-full").write_csv(
                out / f"vs-full@{Path(compare_to).name}.csv"
            )
        done[condition] = out
    return done


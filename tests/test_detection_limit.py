"""The detection limit over planted studies (analysis/study/detection_limit.py): each rule at its boundary, the
limit as the smallest share from which every larger share is detected, and the front page's section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from analysis.study.detection_limit import (
    DetectionLimitError,
    detection_limit,
    detection_section,
    detection_table,
    read_planted_study,
    verdicts,
)


def cell(value, low, rank=1, control=0.0):
    return {"value": value, "low": low, "high": value + abs(value - low), "rank": rank, "n_cells": 9,
            "control": control, "marked_value": value}


def retrieval(ap, p, marked_share=0.3, unmarked_share=0.2):
    return {"mean_ap": ap, "chance": 0.05, "n_test": 20, "n_pool": 300, "n_marked_pool": 15,
            "unmarked_mean_ap": 0.06, "m": 40, "top_m_share_marked": marked_share,
            "top_m_share_unmarked": unmarked_share, "ap_p": p}


def record(fraction, retrained, predicted, found, floor=None, others=None):
    return {"noise_floor": floor or {}, "planted": {"language": "de", "fraction": fraction, "retrained": retrained,
                                                   "predicted": predicted, "retrieval": found,
                                                   "retrieval_by_method": others or {}}}


def write_study(root: Path, rec: dict, seed: int = 0) -> Path:
    (root / "full" / "counterfactual").mkdir(parents=True)
    (root / "full" / "config.yaml").write_text(yaml.safe_dump({"seed_everything": seed}))
    (root / "full" / "counterfactual" / "counterfactual.json").write_text(json.dumps(rec))
    return root


def test_the_limit_is_the_smallest_share_detected_with_every_larger_one():
    assert detection_limit([0.5, 0.25, 0.1, 0.05], [True, True, False, True]) == 0.25  # a later hit after a miss
    assert detection_limit([0.5, 0.25], [False, True]) is None
    assert detection_limit([0.5, 0.25], [True, None]) == 0.5
    assert detection_limit([0.5, 0.25, 0.1], [True, True, True]) == 0.1


def test_each_rule_decides_at_its_boundary():
    strong = verdicts(record(0.25, cell(0.3, 0.01), cell(0.02, 0.01, control=0.01), retrieval(0.4, 0.01)))
    assert {k: ok for k, (_, ok) in strong.items()} == {
        "retraining": True, "TracIn's prediction": True, "top-m share": True, "ranking: TracIn": True}
    assert strong["ranking: TracIn"][0] == pytest.approx(0.4 / 0.05)
    # an interval touching zero, a cell ranked second, a change inside the refits' noise: not detected
    assert verdicts(record(0.25, cell(0.3, -0.001), cell(0.02, 0), retrieval(0.4, 0.01)))["retraining"][1] is False
    assert verdicts(record(0.25, cell(0.3, 0.01, rank=2), cell(0.02, 0), retrieval(0.4, 0.01)))["retraining"][1] is False
    assert verdicts(record(0.25, cell(0.3, 0.01), cell(0.02, 0), retrieval(0.4, 0.01),
                           floor={"de": 0.31}))["retraining"][1] is False
    # a prediction not above its random control's; a top-m share not above the unmarked items'
    assert verdicts(record(0.25, cell(0.3, 0.01), cell(0.02, 0, control=0.02),
                           retrieval(0.4, 0.01)))["TracIn's prediction"][1] is False
    weak = verdicts(record(0.25, cell(0.3, 0.01), cell(0.02, 0), retrieval(0.4, 0.05, marked_share=0.2)))
    assert weak["top-m share"][1] is False and weak["ranking: TracIn"][1] is False  # p = alpha is not below it
    # a record written before the permutation p: a value, no verdict
    old = retrieval(0.4, None)
    del old["ap_p"]
    assert verdicts(record(0.25, cell(0.3, 0.01), cell(0.02, 0), old))["ranking: TracIn"][1] is None


def test_the_table_orders_shares_largest_first_and_reads_other_methods(tmp_path):
    small = write_study(tmp_path / "small", record(0.05, cell(0.01, -0.02), cell(0.001, 0), retrieval(0.2, 0.2),
                                                   others={"trak": retrieval(0.3, 0.01)}))
    large = write_study(tmp_path / "large", record(0.25, cell(0.3, 0.01), cell(0.02, 0), retrieval(0.4, 0.01),
                                                   others={"trak": retrieval(0.5, 0.001)}))
    rows = {r["measure"]: r for r in detection_table([read_planted_study(small), read_planted_study(large)])}
    assert list(rows["retraining"]["cells"]) == [0.25, 0.05]
    assert rows["retraining"]["limit"] == 0.25 and rows["ranking: TRAK's kernel"]["limit"] == 0.05
    assert rows["ranking: TracIn"]["limit"] == 0.25
    with pytest.raises(DetectionLimitError, match="plant the same share"):
        detection_table([read_planted_study(large), read_planted_study(large)])


def test_a_study_that_is_not_planted_or_has_not_run_is_named(tmp_path):
    plain = write_study(tmp_path / "plain", {"noise_floor": {}})
    with pytest.raises(DetectionLimitError, match="no planted control recorded"):
        read_planted_study(plain)
    with pytest.raises(DetectionLimitError, match="no seed's counterfactual check has run yet"):
        read_planted_study(tmp_path / "nothing")


def test_the_front_page_section_draws_what_ran_and_says_how_to_run_the_rest(tmp_path):
    ran = write_study(tmp_path / "ran", record(0.25, cell(0.3, 0.01), cell(0.02, 0), retrieval(0.4, 0.01)))
    (tmp_path / "front" / ".study").mkdir(parents=True)
    (tmp_path / "front" / ".study" / "detection_limit.json").write_text(json.dumps({"studies": [
        {"config": "planted.yaml", "root": str(ran)}, {"config": "planted-0.05.yaml", "root": str(tmp_path / "no")}]}))
    text = "\n".join(detection_section(tmp_path / "front", tmp_path / "front" / "report" / "detection_limit"))
    assert "## The detection limit (planted sweep)" in text
    assert "| retraining " in text and "✓ +0.3000" in text
    assert "`crossling study --config planted-0.05.yaml`" in text
    assert (tmp_path / "front" / "report" / "detection_limit" / "detection_limit.png").stat().st_size > 0
    assert detection_section(tmp_path / "ran", tmp_path / "out") == []  # no sweep named: no section


def study_config(tmp_path: Path, name: str, root: str, **extra) -> Path:
    from helpers import REPO

    config = {"root": str(tmp_path / root), "full": str(REPO / "configs/demo/pawsx-full.yaml"), "sft": None,
              "analyze": str(REPO / "configs/demo/pawsx-analyze.yaml"), "natural_conditions": ["full"], **extra}
    (tmp_path / name).write_text(yaml.safe_dump(config))
    return tmp_path / name


def test_the_runner_records_the_sweeps_roots_from_their_configs(tmp_path):
    from lightning_modules.study import load_study_config, record_detection_sweep

    study_config(tmp_path, "small.yaml", "runs/small")
    path = study_config(tmp_path, "large.yaml", "runs/large", detection_limit=["large.yaml", "small.yaml"])
    cfg, base = load_study_config(path)
    record_detection_sweep(cfg, base, tmp_path / "runs/large")
    studies = json.loads((tmp_path / "runs/large/.study/detection_limit.json").read_text())["studies"]
    assert [s["root"] for s in studies] == [str(tmp_path / "runs/large"), str(tmp_path / "runs/small")]
    assert studies[1]["config"] == str(tmp_path / "small.yaml")


@pytest.mark.parametrize("value, message", [
    ("small.yaml", "expected a non-empty list of planted study configs"),
    ([], "expected a non-empty list"),
    (["absent.yaml"], r"study config\(s\) \['absent.yaml'\] not found"),
])
def test_a_bad_sweep_is_one_line_naming_the_key(tmp_path, value, message):
    from lightning_modules.study import StudyConfigError, load_study_config

    path = study_config(tmp_path, "large.yaml", "runs/large", detection_limit=value)
    with pytest.raises(StudyConfigError, match=f"key 'detection_limit': {message}"):
        load_study_config(path)


def test_a_largest_share_without_a_verdict_is_named_not_called_undetected(tmp_path):
    from analysis.study.detection_limit import markdown_rows

    old = retrieval(0.4, None)
    del old["ap_p"]
    large = write_study(tmp_path / "large", record(0.25, cell(0.3, 0.01), cell(0.02, 0), old))
    small = write_study(tmp_path / "small", record(0.05, cell(0.01, -0.02), cell(0.001, 0), retrieval(0.2, 0.01)))
    lines = {r["measure"]: r for r in markdown_rows(detection_table([read_planted_study(large),
                                                                       read_planted_study(small)]))}
    assert lines["ranking: TracIn"]["detected down to"] == "no verdict at 25 %"
    assert lines["retraining"]["detected down to"] == "25 %"  # detected at 25 %, not at 5 % (interval touches zero)
    small_only = markdown_rows(detection_table([read_planted_study(small)]))
    assert {r["measure"]: r["detected down to"] for r in small_only}["retraining"] == "not detected"

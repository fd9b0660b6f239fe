"""Every study config shipped in configs/ plans, and every stage command it would run parses.

A typo in a paper-scale config (meant for a GPU node) would otherwise only show up hours
into someone's run; ``--print_config`` parses a stage's arguments exactly as the stage would,
without building a model or reading data.
"""

from __future__ import annotations

import re
import sys

import pytest
import yaml

from lightning_modules.study import StudyConfig, load_study_config, plan_stages
from tests.helpers import REPO


def study_configs() -> list:
    keys = set(StudyConfig.__dataclass_fields__)
    found = []
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        # a study config states its stages, or names a base study config whose keys it adds to
        if isinstance(raw, dict) and ({"full", "sft", "analyze"} <= set(raw) or "base" in raw) \
                and set(raw) <= keys | {"base"}:
            found.append(path)
    return found


def test_the_shipped_study_configs_are_found():
    names = {str(p.relative_to(REPO / "configs")) for p in study_configs()}
    expected = {"demo/pawsx.yaml", "demo/xnli.yaml", "xnli/study.yaml", "pawsx/study.yaml", "marc/study.yaml"}
    assert expected <= names, f"missing: {expected - names}"


def test_a_composed_study_plans_its_bases_stages_unchanged_and_adds_its_own():
    """The counterfactual config names the demo as its base: every stage the demo plans is planned with the
    same command, and the leave-out fits come on top; a planted fraction's fits carry its fraction last."""
    def plan(name):
        return {s.name: s.command for s in plan_stages(*load_study_config(REPO / "configs/demo" / name))}

    demo, counterfactual = plan("e5-xnli.yaml"), plan("e5-xnli-counterfactual.yaml")
    added = set(counterfactual) - set(demo)
    assert {name: counterfactual[name] for name in demo if name != "report"} == \
        {name: command for name, command in demo.items() if name != "report"}
    assert {"seed0-without-en", "seed2-without-random", "seed1-refit-10", "seed0-counterfactual-analysis"} <= added
    planted = plan("e5-xnli-planted-0.05.yaml")
    fractions = [a for a in planted["full"] if a.startswith("--data.init_args.plant.fraction=")]
    assert fractions[-1] == "--data.init_args.plant.fraction=0.05"  # the later argument wins
    assert "runs/demo/e5-xnli-planted-0.05/full" in next(a for a in planted["full"] if "default_root_dir" in a)
    assert not any("refit" in name for name in planted)
    # the methods config ranks the demo's runs again, adding only ranking stages (same root: the fits are reused)
    methods = plan("e5-xnli-methods.yaml")
    assert {name: methods[name] for name in demo if name != "report"} == \
        {name: command for name, command in demo.items() if name != "report"}
    assert set(methods) - set(demo) == {f"seed{s}-{a}-{m}-analysis" for s in (0, 1, 2) for m in ("trak", "repsim")
                                        for a in ("natural", "sft", "sft-random0")}


@pytest.mark.parametrize("path", study_configs(), ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_stage_of_a_shipped_study_parses(path, monkeypatch, capsys):
    from lightning_modules.cli import run_cli

    monkeypatch.setattr(sys, "argv", ["crossling"])
    cfg, base = load_study_config(path)
    stages = plan_stages(cfg, base)
    kinds_seen = set()
    for stage in stages:
        kind = re.sub(r"\d+", "", stage.name.split("-", 1)[1] if stage.name.startswith("seed") else stage.name)
        # one random seed and one training seed stand for all of them
        if stage.command[0] == "report" or kind in kinds_seen:
            continue
        kinds_seen.add(kind)
        with pytest.raises(SystemExit) as done:
            run_cli([*stage.command, "--print_config"])
        printed = capsys.readouterr()
        assert done.value.code in (0, None), f"{path} stage {stage.name}: {printed.err[-2000:]}"
        parsed = yaml.safe_load(printed.out)
        root_dir = next(a for a in stage.command if a.startswith("--trainer.default_root_dir="))
        assert parsed["trainer"]["default_root_dir"] == root_dir.split("=", 1)[1]
        # the study's overrides reach every stage; of two for one key (a base's and a composed config's), the later
        for key, value in dict(o.removeprefix("--").split("=", 1) for o in cfg.overrides).items():
            node = parsed
            for part in key.split("."):
                node = node[part]
            assert str(node) == value, f"{path} stage {stage.name}: {key} is {node!r}, expected {value}"
    expected = {"full", "natural-analysis"}
    if cfg.sft is not None:  # sft: null (a ground-truth study) stops after the natural analysis
        expected |= {"subnetworks", "sft", "sft-analysis", "sft-random"}
    if cfg.counterfactual:
        expected |= {"counterfactual-analysis"}
    assert expected <= kinds_seen

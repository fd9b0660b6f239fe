"""The whole study in one command: every stage runs, an interrupted study resumes to the same
outputs, and a changed option re-runs only the stages that depend on it."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import REPO, cli_env, load_script

# each analysis takes two processes: <x>-influence (sketch, influence), then <x>-analysis ((fidelity,) report)
STAGES = ["full", "subnetworks", "natural-influence", "natural-analysis", "sft", "sft-random0", "sft-influence",
          "sft-analysis", "sft-random0-influence", "sft-random0-analysis", "report"]


def write_study(tmp: Path, root: Path, k: int = 8, **keys) -> Path:
    """The kill-anywhere script's tiny study with the PAWS-X demo's fidelity sample, a natural condition
    more (as-en), and ``keys`` setting more study keys (seeds, fidelity_seeds)."""
    return load_script("kill_anywhere").write_study(
        tmp, root, k=k, **{"natural_conditions": ["full", "own", "random0", "as-en"]} | keys)


def study(config: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lightning_modules.main", "study", "--config", str(config), *args],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def run_study(config: Path, *args: str) -> str:
    proc = study(config, *args)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return out


def content(path: Path) -> bytes:
    """A file's result content, without the places where a study records its own location
    (checkpoint hyper-parameters name the subnetworks folder; fingerprints follow from them)."""
    if path.suffix == ".ckpt":
        state = torch.load(path, weights_only=True)["state_dict"]
        return b"".join(k.encode() + v.numpy().tobytes() for k, v in sorted(state.items()))
    if path.suffix == ".npz":
        arrays = np.load(path, allow_pickle=False)
        return b"".join(k.encode() + arrays[k].tobytes() for k in sorted(arrays.files) if k != "meta")
    if path.suffix == ".json":
        record = json.loads(path.read_bytes())
        for key in ("checkpoint", "checkpoint_fingerprint"):
            record.pop(key, None)
        return json.dumps(record, sort_keys=True).encode()
    return path.read_bytes()


def digests(root: Path) -> dict[str, str]:
    """Content hashes of every output a study's result depends on (no logs, no timings)."""
    out = {}
    for pattern in ("*/checkpoints/epoch=*.ckpt", "*/subnetworks/*.json", "*/sketches/**/*.npy",
                    "*/influence/*/topk.npz", "*/influence/*/contributions.csv", "*/accuracy/accuracy.csv",
                    "*/fidelity/fidelity.json"):
        for path in root.glob(pattern):
            out[str(path.relative_to(root))] = hashlib.sha256(content(path)).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, str, Path]:
    tmp = tmp_path_factory.mktemp("study")
    config = write_study(tmp, tmp / "runs")
    return tmp / "runs", run_study(config), config


def test_study_runs_every_stage_and_writes_the_report(finished):
    root, out, _ = finished
    for stage in STAGES:
        assert (root / ".study" / f"{stage}.json").is_file(), f"stage {stage} has no completion marker"
    assert (root / "report" / "report.html").is_file() and (root / "report" / "report.md").is_file()
    # the front page lists each result once (SFT reports repeat the full run's masks sections), shows a
    # figure-less table as a table, and its HTML is the Markdown rendered (no raw Markdown left)
    front = (root / "report" / "report.md").read_text()
    headings = [line for line in front.splitlines() if line.startswith("## ")]
    assert len(headings) == len(set(headings)) and sum("(Table 1)" in h for h in headings) == 1, headings
    page = (root / "report" / "report.html").read_text()
    assert "<table>" in page and "disabled_heads" in page and "](" not in page and "\n## " not in page
    assert_key_figure_resolves(root, front)
    for run in ("full", "sft", "sft-random0"):
        assert (root / run / "report" / "report.md").is_file(), run
        # every analysis measured its sketch's share error, and its report says so
        error = json.loads((root / run / "fidelity" / "fidelity.json").read_text())["share_error_pp"]
        assert f"projection error of `{root.name}/{run}`: pos {error['pos']['mean']:.2f} mean" in (
            root / run / "report" / "report.md"
        ).read_text()
    assert sorted(p.stem for p in (root / "full" / "subnetworks").glob("*.json")) == ["de", "en", "ko"]
    assert (root / "sft" / "accuracy" / "accuracy.csv").is_file()
    # analysing a run (trainer.predict) must not wipe the metrics its fit logged
    assert "val/acc_en" in (root / "full" / "logs" / "metrics.csv").read_text()
    assert "dev acc" in out and "majority" in out
    assert "crossling study summary" in out and str(root / "report") in out


def assert_key_figure_resolves(root: Path, front: str) -> None:
    """The front page shows Fig 2's change matrix, by a link that reaches the seed's own figure."""
    links = [line.split("](", 1)[1].rstrip(")") for line in front.splitlines()
             if line.startswith("![") and "own" in line and "full" in line]
    assert links, "no Fig 2 change matrix on the front page"
    assert (root / "report" / links[0]).resolve().is_file(), links[0]
    caption = next(i for i, line in enumerate(front.splitlines()) if "The paper's key figure" in line)
    assert caption < next(i for i, line in enumerate(front.splitlines()) if line.startswith("## ") and "Fig" in line)


def test_rerunning_a_finished_study_skips_every_stage(finished):
    root, _, config = finished
    before = digests(root)
    out = run_study(config)
    for stage in STAGES:
        assert f"{stage}: done" in out, f"{stage} was not skipped"
    assert digests(root) == before


def test_killed_during_sketching_resumes_to_identical_outputs(finished, tmp_path):
    reference, _, _ = finished
    root = tmp_path / "runs"
    config = write_study(tmp_path, root)
    proc = study(config)
    sketches = root / "full" / "sketches"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (root / ".study" / "natural-influence.started.json").exists() and any(sketches.glob("epoch=0/*/*.npy")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the study ended before its sketch stage could be interrupted"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert not (root / ".study" / "natural-influence.json").exists(), "the sketch stage had already finished"
    out = run_study(config)
    assert "natural-influence (resuming)" in out
    assert "full: done" in out and "subnetworks: done" in out
    assert digests(root) == digests(reference)


def test_an_analysis_split_over_two_processes_writes_what_one_process_writes(finished, tmp_path):
    """The study runs fidelity and report in a fresh process (memory); the results must not notice."""
    root, _, _ = finished
    first = json.loads((root / ".study" / "natural-influence.json").read_text())["command"]
    second = json.loads((root / ".study" / "natural-analysis.json").read_text())["command"]
    steps = [a for a in first + second if a.startswith("--stages=")]
    assert steps == ["--stages=[sketch, influence]", "--stages=[fidelity, report]"]
    run = tmp_path / "full"
    shutil.copytree(root / "full", run, ignore=shutil.ignore_patterns("sketches", "influence", "fidelity", "report"))
    command = [f"--trainer.default_root_dir={run}" if a.startswith("--trainer.default_root_dir=") else
               "--stages=[sketch, influence, fidelity, report]" if a.startswith("--stages=") else a for a in first]
    done = subprocess.run([sys.executable, "-m", "lightning_modules.main", *command], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = {k: v for k, v in digests(tmp_path).items() if "checkpoints" not in k}
    two = {k: v for k, v in digests(root).items() if k.startswith("full/") and "checkpoints" not in k}
    assert "full/fidelity/fidelity.json" in one and one == two


def test_time_left_is_estimated_per_stage_kind():
    from lightning_modules.study import Stage, estimate_seconds_left

    def stage(kind: str) -> Stage:
        return Stage(kind, [kind, "--config", "x.yaml"], [])

    remaining = [stage("fit"), stage("analyze"), stage("analyze"), stage("subnetworks"), stage("report")]
    assert estimate_seconds_left(remaining, {}) is None
    durations = {"fit": [10.0, 30.0], "analyze": [100.0]}
    # fit at its mean (20), analyze at its own (100 each), subnetworks unseen: mean of all three
    expected = 20.0 + 2 * 100.0 + (10.0 + 30.0 + 100.0) / 3
    assert estimate_seconds_left(remaining, durations) == pytest.approx(expected)


SEED_STAGES = [f"seed{seed}-{stage}" for seed in (0, 1) for stage in STAGES[:-1]] + ["report"]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory) -> tuple[Path, str, Path]:
    tmp = tmp_path_factory.mktemp("seeds")
    root = tmp / "runs"
    config = write_study(tmp, root, seeds=[0, 1], fidelity_seeds=[0], attribution_methods=["trak", "repsim", "ekfac"])
    # read the study's output as it comes, keeping the front page it writes when seed 0 has finished
    proc, lines = study(config), []
    for line in proc.stdout:
        lines.append(line)
        if "seed 0 finished" in line:
            shutil.copytree(root / "report", tmp / "interim-report")
            shutil.copy(root / ".study" / "seeds.json", tmp / "interim-report" / "seeds.json")
    proc.wait(timeout=900)
    out = "".join(lines)
    assert proc.returncode == 0, out[-4000:]
    return root, out, config


def test_the_front_page_holds_seed_zeros_findings_while_seed_one_runs(two_seeds):
    root, out, _ = two_seeds
    interim = root.parent / "interim-report"
    assert "seed 0 finished (1 of 2 seeds): its findings are on the front page now" in out
    assert json.loads((interim / "seeds.json").read_text()) == {"planned": [0, 1], "finished": [0]}
    page = (interim / "report.md").read_text()
    assert "Interim: seed 1 of 2 so far (finished: 0; still running: 1)" in page
    assert "What held across seeds" not in page  # nothing pooled from one seed
    assert "(../seed0/full/report/report.html)" in page and "seed1/" not in page
    assert (interim / "report.html").is_file()
    # the last page pools both seeds and says nothing of an interim
    final = (root / "report" / "report.md").read_text()
    assert "Interim" not in final and "What held across seeds" in final
    assert json.loads((root / ".study" / "seeds.json").read_text()) == {"planned": [0, 1], "finished": [0, 1]}


def test_each_training_seed_runs_the_whole_chain_and_the_front_page_pools_them(two_seeds):
    root, out, config = two_seeds
    for stage in SEED_STAGES:
        assert (root / ".study" / f"{stage}.json").is_file(), f"stage {stage} has no completion marker"
    for seed in (0, 1):
        for run in ("full", "sft", "sft-random0"):
            assert (root / f"seed{seed}" / run / "report" / "report.md").is_file(), (seed, run)
        saved = yaml.safe_load((root / f"seed{seed}" / "full" / "config.yaml").read_text())
        assert saved["seed_everything"] == seed and saved["model"]["init_seed"] == seed
        assert saved["data"]["init_args"]["shuffle_seed"] == seed and saved["data"]["init_args"]["seed"] == 0
    # fidelity only where asked; the pooled findings take the margin it measured
    assert (root / "seed0" / "full" / "fidelity" / "fidelity.json").is_file()
    assert not (root / "seed1" / "full" / "fidelity").exists()
    for seed, second in ((0, "[fidelity, report]"), (1, "[report]")):
        command = json.loads((root / ".study" / f"seed{seed}-natural-analysis.json").read_text())["command"]
        assert f"--stages={second}" in command, (seed, command)
    front = (root / "report" / "report.md").read_text()
    assert "## What held across seeds" in front
    # the findings as one table, the paper's key figure beside it, the summary a file of its own, not repeated
    table = [line for line in front.split("## What held across seeds")[1].split("\n\n") if "| comparison" in line][0]
    assert "pooled change [95% CI]" in table and "seeds agreeing" in table
    assert " pp [" in table and " points [" in table  # shares and accuracy in one table, each with its unit
    assert_key_figure_resolves(root, front)
    assert "```" not in front and "crossling study summary" in (root / "report" / "summary.txt").read_text()
    assert "pooled over 2 seeds" in (root / "report" / "summary.txt").read_text()
    assert "Subnetworks across seeds" in front and "Jaccard" in front
    for name in ("mask_stability.csv", "mask_stability.png", "mask_jaccard_matrix.png", "mask_stability_summary.json"):
        assert (root / "report" / "mask_stability" / name).is_file(), name
    pooled = (root / "report" / "pooled_findings.csv").read_text()
    assert "own_vs_full" in pooled and "sft_vs_full" in pooled and "accuracy_sft" in pooled
    assert "What held across seeds" in out and "Seed 1 (" in out
    # the seeds trained differently from the same data
    a = torch.load(root / "seed0/full/checkpoints/epoch=1.ckpt", weights_only=True)["state_dict"]
    b = torch.load(root / "seed1/full/checkpoints/epoch=1.ckpt", weights_only=True)["state_dict"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_every_analysis_is_ranked_under_each_method_and_the_front_page_compares_them(two_seeds):
    root, _, _ = two_seeds
    for seed in (0, 1):
        for run, analysis in (("full", "natural"), ("sft", "sft"), ("sft-random0", "sft-random0")):
            for method in ("trak", "repsim", "ekfac"):
                marker = root / ".study" / f"seed{seed}-{analysis}-{method}-analysis.json"
                # EK-FAC scores the fully fine-tuned model only: no stage where no analysis has the full condition
                assert marker.is_file() == (method != "ekfac" or run == "full"), marker
            assert (root / f"seed{seed}" / run / "influence-trak").is_dir()
        assert (root / f"seed{seed}" / "full" / "influence-ekfac" / "full" / "topk.npz").is_file()
        assert (root / f"seed{seed}" / "full" / "influence-repsim" / "own" / "topk.npz").is_file()
    with open(root / "report" / "attribution_methods" / "attribution_methods.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by = {(r["question"], r["method"]): r for r in rows}
    for method in ("tracin", "trak", "repsim"):
        assert ("own_vs_full", method) in by and ("sft_vs_full", method) in by, method
        assert by[("own_vs_full", method)]["n_seeds"] == "2"
        assert float(by[("own_vs_full", method)]["stage_minutes"]) > 0
    # EK-FAC scores no subnetwork: it answers no question that compares conditions
    assert not any(r["method"] == "ekfac" for r in rows)
    assert {by[("own_vs_full", m)]["sign_as_tracin"] for m in ("trak", "repsim")} <= {"yes", "no"}
    front = (root / "report" / "report.md").read_text()
    assert "## The paper's comparisons under each attribution method" in front
    assert (root / "report" / "attribution_methods" / "attribution_methods.png").is_file()


def test_seed_zero_of_several_is_the_one_seed_study(finished, two_seeds):
    """Adding seeds moves a study's runs under seed<s>/ and changes none of seed 0's numbers."""
    single, _, _ = finished
    several, _, _ = two_seeds
    one = digests(single)
    assert one and one == digests(several / "seed0")


def test_list_shows_the_seeds_and_what_is_done(two_seeds):
    root, _, config = two_seeds
    proc = study(config, "--list")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "training seeds: 0 1" in out
    assert all(f"{stage} " in out for stage in SEED_STAGES) and "to run" not in out


@pytest.mark.parametrize("keys, message", [
    ({"seeds": []}, "key 'seeds': expected a non-empty list of integers"),
    ({"seeds": [0, 1, 0]}, "seed(s) [0] repeated"),
    ({"seeds": [0, 1], "fidelity_seeds": [2]}, "key 'fidelity_seeds': [2] not among"),
    ({"sft": [str(REPO / "configs/demo/pawsx-sft.yaml"), "nowhere.yaml"]},
     "key 'sft': config file(s) ['nowhere.yaml'] not found"),
    ({"analyze": []}, "key 'analyze': expected a config file or a non-empty list of them, found []"),
    ({"full": None}, "key 'full': expected a config file or a non-empty list of them, found None"),
    ({"counterfactual_refits": [10]}, "key 'counterfactual_refits' needs the key 'counterfactual'"),
    ({"seeds": [0], "counterfactual": ["de"], "counterfactual_refits": [0]},
     "key 'counterfactual_refits': expected a non-empty list of distinct integer seeds other than"),
    ({"attribution_methods": ["trak", "datamodels"]},
     "key 'attribution_methods': unknown method(s) ['datamodels']; expected some of ['trak', 'repsim', 'ekfac']"),
    ({"attribution_methods": []}, "key 'attribution_methods': expected a non-empty list of distinct method names"),
])
def test_a_bad_seed_list_or_stage_config_is_one_clear_line_before_anything_runs(tmp_path, keys, message):
    config = write_study(tmp_path, tmp_path / "runs", **keys)
    proc = study(config)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and message in out and str(config) in out, out[-2000:]
    assert out.strip().count("\n") == 0 and "Traceback" not in out, out  # one line, no traceback
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text, message", [
    ("root: runs\nseeds: [0, 1\nfull: full.yaml\n", "line 3, column 5: not valid YAML (expected ',' or ']'"),
    ("root: runs\n  seeds: [0]\n", "line 2, column 8: not valid YAML"),
    ("- just\n- a list\n", "expected a mapping of study keys"),
])
def test_a_study_config_that_is_not_yaml_is_one_line_naming_the_file_and_line(tmp_path, text, message):
    config = tmp_path / "study.yaml"
    config.write_text(text)
    proc = study(config)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and out.startswith(f"crossling: error: {config}: {message}"), out[-2000:]
    assert out.strip().count("\n") == 0, out


def test_a_study_config_adds_its_keys_to_its_bases(tmp_path):
    """The file's keys win, overrides follow the base's, and the base's stage configs stay relative to it."""
    from lightning_modules.study import load_study_config

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("full.yaml", "sft.yaml", "analyze.yaml", "subnetworks.yaml"):
        (tmp_path / "a" / name).write_text("{}\n")
    (tmp_path / "a" / "base.yaml").write_text(yaml.safe_dump({
        "root": "runs/base", "full": "full.yaml", "sft": "sft.yaml", "analyze": "analyze.yaml",
        "subnetworks": "subnetworks.yaml", "seeds": [0, 1], "overrides": ["--x=1", "--y=2"]}))
    (tmp_path / "b" / "middle.yaml").write_text(yaml.safe_dump({"base": "../a/base.yaml", "seeds": [3],
                                                                "overrides": ["--y=3"]}))
    (tmp_path / "b" / "child.yaml").write_text(yaml.safe_dump({"base": "middle.yaml", "root": "runs/child",
                                                               "sft": None, "overrides": ["--z=4"]}))
    cfg, _ = load_study_config(tmp_path / "b" / "child.yaml")
    assert (cfg.root, cfg.seeds, cfg.sft) == ("runs/child", [3], None)
    assert cfg.overrides == ["--x=1", "--y=2", "--y=3", "--z=4"]
    assert cfg.full == str(tmp_path / "a" / "full.yaml") and cfg.analyze == str(tmp_path / "a" / "analyze.yaml")


@pytest.mark.parametrize("base, message", [
    ("nowhere.yaml", "key 'base': {tmp}/nowhere.yaml not found"),
    ("study.yaml", "key 'base': {tmp}/study.yaml names this config again"),
    (["a.yaml"], "key 'base': expected the path of another study config, found ['a.yaml']"),
])
def test_a_bad_base_is_one_line_naming_the_key(tmp_path, base, message):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"base": base, "seeds": [0]}))
    proc = study(config)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and message.format(tmp=tmp_path) in out and str(config) in out, out[-2000:]
    assert out.strip().count("\n") == 0 and "Traceback" not in out, out


def test_a_changed_option_reruns_only_its_dependents(finished, tmp_path):
    # runs last: it changes the finished study (smaller sketches), which the tests above compare against
    root, _, config = finished
    write_study(config.parent, root, k=4)
    out = run_study(config)
    for stage in ("full", "subnetworks", "sft", "sft-random0"):
        assert f"{stage}: done" in out, f"{stage} should not re-run when only the analysis changed"
    for stage in ("natural-influence", "natural-analysis", "sft-influence", "sft-analysis", "sft-random0-analysis",
                  "report"):
        assert f"] {stage}" in out and f"{stage}: done" not in out, f"{stage} should re-run"
    sidecar = json.loads((root / "full/sketches/epoch=0/full/train.json").read_text())
    assert sidecar["d"] == 16


def test_report_command_rebuilds_the_front_page_from_the_files(finished):
    root, _, config = finished
    page = root / "report" / "report.md"
    before = page.read_bytes()
    page.unlink()
    for where in ([str(root)], ["--config", str(config)]):
        done = subprocess.run([sys.executable, "-m", "lightning_modules.main", "report", *where], cwd=REPO,
                              env=cli_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert page.read_bytes() == before
        assert "crossling study summary" in done.stdout


def test_a_comment_in_a_stage_config_does_not_rerun_the_stage_a_value_does(tmp_path):
    """Fingerprints read a config's content: editing a comment keeps a finished fit (it once re-ran one and
    removed its checkpoints); changing a value re-runs it; a marker from the byte fingerprint still counts."""
    from lightning_modules.study import Stage, _file_digest, marker_matches, stage_fingerprint

    config = tmp_path / "full.yaml"
    config.write_text("trainer:\n  max_epochs: 2   # two epochs\n")
    stage = Stage("full", ["fit", "--config", str(config)], [])
    before = stage_fingerprint(stage, {})
    old_marker = {"fingerprint": stage_fingerprint(stage, {}, _file_digest)}
    config.write_text("# the demo's fit\ntrainer:\n  max_epochs: 2   # two epochs (see the docs)\n")
    assert stage_fingerprint(stage, {}) == before
    assert marker_matches({"fingerprint": before}, stage, {}, {})
    assert not marker_matches(old_marker, stage, {}, {})  # bytes changed: the old scheme cannot vouch for it
    config.write_text("trainer:\n  max_epochs: 2   # two epochs\n")
    assert marker_matches(old_marker, stage, {}, {})  # unchanged bytes: a study from before still counts as done
    config.write_text("trainer:\n  max_epochs: 3\n")
    assert stage_fingerprint(stage, {}) != before

"""The influence stage and the report on synthetic run directories written per the file contracts."""

import csv
import json
import re
import sys
import types

import numpy as np
import pytest

from analysis.influence import (
    InfluenceError,
    InfluenceOptions,
    MissingInputs,
    compare_rankings,
    explain,
    load_topk,
    run_influence,
)
from analysis.masks import condition_masks
from analysis.report import build_report, log_report_to_wandb
from analysis.sketch_store import SketchError
from analysis.tracin import tracin_scores

LANGS = ["en", "de", "ko"]
EPOCHS = [0, 1, 2]
N_TRAIN, N_TEST, D = 20, 8, 16  # per language


def _write_sketch(run_dir, epoch, mask, split, data, indices, langs, correct, fingerprint):
    base = run_dir / "sketches" / f"epoch={epoch}" / mask
    base.mkdir(parents=True, exist_ok=True)
    np.save(base / f"{split}.npy", data.astype(np.float32))
    n = len(indices)
    sidecar = {
        "format": 1,
        "split": split,
        "mask": mask,
        "epoch": epoch,
        "n": n,
        "d": D,
        "dtype": "float32",
        "projection": {"kind": "kronecker", "k": 4, "seed": 0, "combine": "sum"},
        "layers": ["l0", "l1"],
        "model_fingerprint": fingerprint,
        "indices": [int(i) for i in indices],
        "ids": [f"{split}-{i}" for i in indices],
        "langs": list(langs),
        "labels": [int(i) % 2 for i in indices],
        "loss": [0.5] * n,
        "pred": [int(i) % 2 for i in indices],
        "correct": [bool(c) for c in correct],
        "languages": LANGS,
    }
    (base / f"{split}.json").write_text(json.dumps(sidecar))


def _subnetworks(run_dir, seed=0):
    rng = np.random.default_rng(seed)
    masks = {}
    for lang in LANGS:
        mask = (rng.random((4, 4)) < 0.7).astype(int)
        mask[0, 0] = 1
        masks[lang] = mask
        folder = run_dir / "subnetworks"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{lang}.json").write_text(json.dumps({"language": lang, "mask": mask.tolist()}))
    return masks


def make_run(run_dir, masks, test_masks, seed, strength=3.0):
    """Planted structure: a training or test example of language l is l's direction plus noise, so the
    diagonal must dominate. ``test_masks``: mask → test languages sketched under it."""
    rng = np.random.default_rng(seed)
    train_langs = np.repeat(LANGS, N_TRAIN)
    train_idx = np.arange(train_langs.size) * 2 + 1  # dataset indices need not be 0..N-1
    test_langs_all = np.repeat(LANGS, N_TEST)
    test_idx_all = np.arange(test_langs_all.size) * 3
    code = {lang: i for i, lang in enumerate(LANGS)}
    correct_all = rng.random(test_idx_all.size) < 0.8
    for epoch in EPOCHS:
        directions = rng.normal(size=(len(LANGS), D)) * strength
        for mask in masks:
            fp = f"model-{seed}-{epoch}"
            train = directions[[code[x] for x in train_langs]] + rng.normal(size=(train_langs.size, D))
            _write_sketch(
                run_dir,
                epoch,
                mask,
                "train",
                train,
                train_idx,
                train_langs,
                np.ones(train_idx.size, bool),
                fp,
            )
            keep = np.isin(test_langs_all, test_masks[mask])
            test = directions[[code[x] for x in test_langs_all[keep]]] + rng.normal(size=(keep.sum(), D))
            correct = correct_all[keep] if epoch == EPOCHS[-1] else rng.random(keep.sum()) < 0.6
            _write_sketch(
                run_dir, epoch, mask, "test", test, test_idx_all[keep], test_langs_all[keep], correct, fp
            )
    return test_idx_all, test_langs_all, correct_all


@pytest.fixture()
def runs(tmp_path):
    full = tmp_path / "pawsx" / "full"
    subnets = _subnetworks(full)
    test_masks = {"full": LANGS, "en": LANGS, "de": ["de"], "ko": ["ko"]}
    test_masks |= {f"random0-{lang}": [lang] for lang in LANGS} | {"union-en-de": ["en", "de"]}
    truth = make_run(full, list(test_masks), test_masks, seed=1)
    sft = tmp_path / "pawsx" / "sft"
    make_run(sft, ["full", *LANGS], {"full": LANGS, **{lang: [lang] for lang in LANGS}}, seed=2)
    return full, sft, subnets, truth


OPTS = dict(m=10, bootstrap_resamples=200, train_block=7, test_block=5, explain_per_language=1)


def test_run_influence_writes_contract_files_and_resumes(runs):
    full, _, subnets, (test_idx, test_langs, correct) = runs
    options = InfluenceOptions(**OPTS)
    done = run_influence(full, ["full", "own", "random0", "as-en", "random1"], options)
    assert sorted(done) == ["as-en", "full", "own", "random0"]  # random1 has no sketches: skipped
    top = load_topk(done["own"] / "topk.npz")
    n = test_idx.size
    assert top["pos_idx"].shape == (n, 10) and top["pos_idx_by_epoch"].shape == (3, n, 10)
    np.testing.assert_array_equal(top["test_indices"], test_idx)
    np.testing.assert_array_equal(top["test_langs"], test_langs)
    np.testing.assert_array_equal(top["test_correct"], correct)
    assert (np.diff(top["pos_score"], axis=1) <= 0).all() and (np.diff(top["neg_score"], axis=1) >= 0).all()
    assert top.meta["masks"] == condition_masks("own", LANGS)

    # scores of the German test examples under `own` = cosine TracIn against the `de` mask's train sketches
    def load(epoch, mask, split):
        base = full / "sketches" / f"epoch={epoch}" / mask
        return np.load(base / f"{split}.npy"), json.loads((base / f"{split}.json").read_text())

    tests = [load(e, "de", "test")[0] for e in EPOCHS]
    trains = [load(e, "de", "train")[0] for e in EPOCHS]
    ref = tracin_scores(tests, trains, "cosine")
    train_indices = np.asarray(load(0, "de", "train")[1]["indices"])
    de_rows = np.flatnonzero(test_langs == "de")
    ref_top = -np.sort(-ref, axis=1)[:, :10]
    np.testing.assert_allclose(top["pos_score"][de_rows], ref_top, atol=1e-12)
    cols = np.searchsorted(train_indices, top["pos_idx"][de_rows])
    np.testing.assert_allclose(np.take_along_axis(ref, cols, 1), top["pos_score"][de_rows], atol=1e-12)

    # contributions.csv: contract columns, each test language's row sums to 100, n_test = correct examples
    lines = (done["own"] / "contributions.csv").read_text().splitlines()
    assert lines[0] == "test_lang,train_lang,sign,percent,ci_low,ci_high,n_test"
    rows = [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    for lang in LANGS:
        for sign in ("pos", "neg"):
            cell = [r for r in rows if r["test_lang"] == lang and r["sign"] == sign]
            assert np.isclose(sum(float(r["percent"]) for r in cell), 100.0)
            assert all(float(r["ci_low"]) <= float(r["percent"]) <= float(r["ci_high"]) for r in cell)
            assert {int(r["n_test"]) for r in cell} == {int(correct[test_langs == lang].sum())}
    # planted structure: the diagonal dominates
    diag = [float(r["percent"]) for r in rows if r["sign"] == "pos" and r["test_lang"] == r["train_lang"]]
    assert min(diag) > 80

    # resume: same inputs and options → nothing rewritten; another m → recomputed
    stamp = (done["own"] / "topk.npz").stat().st_mtime_ns
    csv_stamp = (done["own"] / "contributions.csv").stat().st_mtime_ns
    run_influence(full, ["own"], options)
    assert (done["own"] / "topk.npz").stat().st_mtime_ns == stamp
    assert (done["own"] / "contributions.csv").stat().st_mtime_ns == csv_stamp
    run_influence(full, ["own"], InfluenceOptions(**{**OPTS, "m": 5}))
    assert load_topk(done["own"] / "topk.npz")["pos_idx"].shape == (n, 5)
    assert not list((done["own"]).glob("*.tmp*"))


def test_bad_and_missing_inputs_give_one_clear_error(runs):
    full, _, _, _ = runs
    with pytest.raises(MissingInputs, match=r"random1.*epoch=0.*random1-en"):
        run_influence(full, ["random1"], InfluenceOptions(**OPTS, strict=True))
    sidecar = full / "sketches" / "epoch=1" / "ko" / "test.json"
    meta = json.loads(sidecar.read_text())
    del meta["correct"]
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(SketchError, match=r"epoch=1/ko/test\.json: missing key 'correct'"):
        run_influence(full, ["own"], InfluenceOptions(**OPTS))
    meta["correct"] = [True] * meta["n"]
    sidecar.write_text(json.dumps(meta))
    np.save(sidecar.with_suffix(".npy"), np.zeros((meta["n"], D + 1), np.float32))
    with pytest.raises(SketchError, match=r"ko/test\.npy: holds float32 \(\d+, 17\), its sidecar test\.json says float32 \(\d+, 16\)"):
        run_influence(full, ["own"], InfluenceOptions(**OPTS))
    np.save(sidecar.with_suffix(".npy"), np.ones((meta["n"], D), np.float32))
    # sketches a condition scores against each other must share the projection, and train/test the checkpoint
    for key, value, message in (("projection", {**meta["projection"], "seed": 9}, "projection"),
                                ("model_fingerprint", "another-model", "model_fingerprint")):
        sidecar.write_text(json.dumps({**meta, key: value}))
        with pytest.raises(SketchError, match=rf"ko/(train|test)\.json: {message} is .* there but"):
            run_influence(full, ["own"], InfluenceOptions(**OPTS))
    assert not (full / "influence" / "own" / "topk.npz").exists()


def test_build_report_compares_runs_and_lists_missing_inputs(runs):
    full, sft, _, _ = runs
    options = InfluenceOptions(**OPTS, focus_language="de")
    run_influence(full, ["full", "own", "random0", "as-en", "union-en-de"], options)
    union = load_topk(full / "influence" / "union-en-de" / "topk.npz")
    assert set(union["test_langs"]) == {"en", "de"}  # a composed mask pairs only its two languages
    run_influence(sft, ["full", "own"], options, compare_to=full)
    assert (sft / "influence" / "own" / "vs-full@full.csv").is_file()
    texts = {
        "train": {str(i): f"train sentence {i}" for i in range(200)},
        "test": {str(i): f"test sentence {i}" for i in range(200)},
    }
    (sft / "texts.json").write_text(json.dumps(texts))
    md_path = build_report(
        sft,
        ["full", "own", "random1"],
        InfluenceOptions(**OPTS, texts=str(sft / "texts.json")),
        compare_to=full,
    )
    md = md_path.read_text()
    report = sft / "report"
    for link in re.findall(r"\]\(([^)]+)\)", md):
        assert (report / link).is_file(), link
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert len(pngs) >= 12
    for tag in (
        "(Fig 4)",
        "(Fig 11)",
        "(Fig 5)",
        "(Fig 2)",
        "(Fig 3)",
        "(Figs 10, 17, 18)",
        "(Fig 7)",
        "(Fig 8 (right))",
        "(Fig 9)",
        "(Fig 16)",
        "(Figs 13-15)",
        "(Fig 12)",
        "(Table 1)",
        "(Fig 19 (composed masks))",
    ):
        assert tag in md, tag
    assert "influence/random1/topk.npz" in md and "accuracy/accuracy.csv" in md  # listed as missing
    assert "train sentence" in md  # drill-down shows caller-provided text
    # the report's tables equal the stage's CSVs (same filter, same bootstrap stream)
    for stage_csv, report_csv in (
        (sft / "influence" / "own" / "contributions.csv", report / "contrib_pawsx-sft_own.csv"),
        (
            sft / "influence" / "own" / "vs-full@full.csv",
            report / "diff_pawsx-sft_own_minus_pawsx-full_full.csv",
        ),
    ):
        with open(stage_csv, newline="") as f, open(report_csv, newline="") as g:
            cols = ["test_lang", "train_lang", "sign", "percent", "ci_low", "ci_high", "n_test"]
            assert [[r[c] for c in cols] for r in csv.DictReader(f)] == [
                [r[c] for c in cols] for r in csv.DictReader(g)
            ]
    # per-checkpoint matrices: every (run, condition, epoch, test language, sign) row sums to 100
    with open(report / "dynamics_matrices.csv", newline="") as f:
        sums = {}
        for r in csv.DictReader(f):
            if int(r["n_test"]):
                key = (r["run"], r["condition"], r["epoch"], r["test_lang"], r["sign"])
                sums[key] = sums.get(key, 0.0) + float(r["percent"])
    assert len(sums) == (6 * len(LANGS) + 2) * len(EPOCHS) * 2  # union-en-de has 2 test languages
    np.testing.assert_allclose(list(sums.values()), 100.0, rtol=1e-5)  # CSV keeps 6 digits
    assert (report / "report.html").read_text().count("<img") == len(pngs)
    # the cross-run difference uses test examples both runs classify correctly
    with open(report / "diff_pawsx-sft_own_minus_pawsx-full_full.csv", newline="") as f:
        fig4 = list(csv.DictReader(f))
    a, b = (
        load_topk(sft / "influence" / "own" / "topk.npz"),
        load_topk(full / "influence" / "full" / "topk.npz"),
    )
    both = np.intersect1d(a["test_indices"][a["test_correct"]], b["test_indices"][b["test_correct"]])
    assert sum({r["test_lang"]: int(r["n_test"]) for r in fig4}.values()) == both.size


def test_explain_and_compare_rankings(runs):
    full, sft, _, (test_idx, test_langs, _) = runs
    options = InfluenceOptions(**OPTS)
    run_influence(full, ["own"], options)
    run_influence(sft, ["own"], options)
    texts = {"train": {int(i): f"t{i}" for i in range(200)}, "test": {int(test_idx[3]): "the test"}}
    ex = explain(full, "own", int(test_idx[3]), texts, top=4)
    top = load_topk(full / "influence" / "own" / "topk.npz")
    assert ex.test_text == "the test" and ex.test_lang == test_langs[3] and ex.mask == test_langs[3]
    assert [e.train_index for e in ex.positive] == top["pos_idx"][3, :4].tolist()
    assert [e.score for e in ex.negative] == top["neg_score"][3, :4].tolist()
    assert ex.positive[0].text == f"t{ex.positive[0].train_index}"
    assert ex.positive[0].lang == ["en", "de", "ko"][(ex.positive[0].train_index - 1) // 2 // N_TRAIN]
    with pytest.raises(InfluenceError, match="test index 1 was not ranked"):
        explain(full, "own", 1)
    same = compare_rankings(top, full / "influence" / "own" / "topk.npz")
    assert (same.recall_pos, same.recall_neg, same.max_contribution_diff_pp) == (1.0, 1.0, 0.0)
    assert np.isclose(same.spearman, 1.0)
    other = compare_rankings(sft / "influence" / "own" / "topk.npz", top)
    assert other.recall_pos < 1.0 and other.n_test == test_idx.size


def test_log_report_to_wandb_only_with_an_active_run(tmp_path, monkeypatch):
    from analysis.plots import Panel, plot_heatmaps

    plot_heatmaps(tmp_path / "fig.png", [Panel("t", np.eye(2), ["a", "b"], ["a", "b"])])
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    assert log_report_to_wandb(tmp_path) is False
    logged = {}
    fake = types.SimpleNamespace(
        run=None,
        Image=lambda p: ("image", p),
        Table=lambda columns, data: ("table", columns, data),
        log=logged.update,
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert log_report_to_wandb(tmp_path) is False
    fake.run = object()
    assert log_report_to_wandb(tmp_path) is True
    assert logged["report/fig"][0] == "image" and logged["report/table_table"] == (
        "table",
        ["a", "b"],
        [["1", "2"]],
    )


def test_wilson_interval_matches_the_binomial_coverage():
    import numpy as np

    from analysis.study.summary import wilson_interval

    # coverage of the 95 % interval over draws of a known binomial: close to 95 %
    rng = np.random.default_rng(0)
    n, p = 200, 0.72
    draws = rng.binomial(n, p, size=4000) / n
    covered = np.mean([lo <= p <= hi for lo, hi in (wilson_interval(d, n) for d in draws)])
    assert 0.93 <= covered <= 0.97
    low, high = wilson_interval(0.5, 100)
    assert abs((low + high) / 2 - 0.5) < 1e-12 and 0.09 < high - low < 0.21


def _plant_projection_error(run_dir, pos: float, neg: float) -> None:
    """A fidelity.json as the fidelity stage writes it, with a chosen (mean) share error."""
    (run_dir / "fidelity").mkdir(parents=True, exist_ok=True)
    (run_dir / "fidelity" / "fidelity.json").write_text(json.dumps({
        "share_error_pp": {"pos": {"mean": pos, "max": 3 * pos}, "neg": {"mean": neg, "max": 3 * neg}},
        "n_test": 30, "n_train": 200, "m": 10, "epoch": 2, "options": {"condition": "full"},
    }))


def test_a_change_inside_the_projection_error_is_not_marked(tmp_path):
    full, sft = tmp_path / "pawsx" / "full", tmp_path / "pawsx" / "sft"
    _subnetworks(full)
    make_run(full, ["full", *LANGS], {"full": LANGS, "en": LANGS, "de": ["de"], "ko": ["ko"]}, seed=1)
    make_run(sft, ["full", *LANGS], {"full": LANGS, **{lang: [lang] for lang in LANGS}}, seed=2)
    options = InfluenceOptions(**OPTS)
    run_influence(full, ["full", "own"], options)
    run_influence(sft, ["full", "own"], options, compare_to=full)
    report = sft / "report"

    def diff_rows():
        build_report(sft, ["full", "own"], options, compare_to=full)
        rows = []
        for name in ("diff_pawsx-sft_full_minus_pawsx-full_full.csv", "diff_pawsx-sft_own_minus_pawsx-full_full.csv"):
            with open(report / name, newline="") as f:
                rows += list(csv.DictReader(f))
        return rows

    def clearance(row):  # how far the interval is from containing zero (negative: it contains it)
        return max(float(row["ci_low"]), -float(row["ci_high"]))

    rows = diff_rows()  # no fidelity stage yet: marked = the interval excludes zero
    assert [r["marked"] == "True" for r in rows] == [clearance(r) > 0 for r in rows]
    assert "projection error of `pawsx/sft`: not measured" in (report / "report.md").read_text()
    # plant an error (in the compared run) between the smallest and the largest clearance of excluding cells
    clear = sorted(clearance(r) for r in rows if clearance(r) > 0)
    assert len(clear) >= 2 and clear[0] < clear[-1]
    error = (clear[0] + clear[-1]) / 2
    _plant_projection_error(full, pos=error, neg=error)
    rows = diff_rows()
    assert [r["marked"] == "True" for r in rows] == [clearance(r) > error for r in rows]
    assert any(r["marked"] == "False" and clearance(r) > 0 for r in rows)  # excludes zero, inside the error
    md = (report / "report.md").read_text()
    assert f"{error:.2f} pp (positive)" in md and "projection error of `pawsx/full`: pos" in md
    (full / "fidelity" / "fidelity.json").write_text("{}")
    with pytest.raises(ValueError, match="fidelity.json: expected the fidelity stage's JSON"):
        build_report(sft, ["full", "own"], options, compare_to=full)


def test_markdown_tables_read_back_to_their_cells():
    """Each row of a rendered table splits (at unescaped pipes) into exactly its cells: a pipe inside a cell is
    escaped, floats show 3 significant digits (a long decimal string 4), a missing value is empty and a non-finite one 'nan'."""
    from analysis.report.render import markdown_table

    rng = np.random.default_rng(7)
    rows = [
        {"lang": f"l{i}|x" if i == 2 else f"l{i}", "share": float(rng.normal(0, 30)), "n": int(rng.integers(1, 500)),
         "pct": f"{rng.uniform(0, 100):.15f}"}  # as read back from a CSV written at full precision
        for i in range(5)
    ]
    rows[3]["share"] = float("nan")
    del rows[4]["n"]
    lines = markdown_table(rows).splitlines()

    def cells(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        return [p.strip().replace("\\|", "|") for p in parts]

    assert cells(lines[0]) == ["lang", "share", "n", "pct"]
    assert all(set(c) <= {"-", ":"} for c in cells(lines[1]))
    for row, line in zip(rows, lines[2:], strict=True):
        share = "nan" if not np.isfinite(row["share"]) else f"{row['share']:.3g}"
        assert cells(line) == [row["lang"], share, str(row.get("n", "")), f"{float(row['pct']):.4g}"]


def test_one_checkpoint_gives_the_dynamics_as_a_table_not_a_figure_of_dots(runs):
    from analysis.report import build_report as build
    from analysis.study.front_page import plot_dynamics

    full = runs[0]
    options = InfluenceOptions(**OPTS, epochs=[2])  # the last checkpoint only, as the demo ranks
    run_influence(full, ["full"], options)
    md = build(full, ["full"], options).read_text()
    section = md.split("Language specialisation over epochs")[1].split("\n## ")[0]
    assert "![" not in section and not (full / "report" / "dynamics_in_language.png").exists()
    assert "(dynamics_in_language.csv)" in section  # its table stands in for the figure
    one = [{"run_dir": "full", "run": "x/full", "condition": "full", "epoch": 2, "in_language_percent": 30.0}]
    assert plot_dynamics(one, full / "across.png") is False and not (full / "across.png").exists()
    two = one + [{**one[0], "epoch": 1, "in_language_percent": 25.0}]
    assert plot_dynamics(two, full / "across.png") is True and (full / "across.png").is_file()

"""Iterative head pruning: the stopping rule on scripted accuracies, and the search over a run."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.masks import MaskError, name_seed
from callbacks.checkpoints import CheckpointError, atomic_torch_save, fingerprint
from callbacks.head_importance import evaluate_accuracy
from callbacks.pruning import SubnetworkOptions, heads_per_step, majority_rate, prune_heads
from datamodules import DataError, PAWSXDataModule
from lightning_modules.classifier import SequenceClassifier
from lightning_modules.stages.subnetworks import find_subnetworks


class Script:
    """Scripted accuracies and random importances that record every mask they are shown."""

    def __init__(self, accuracies: list[float], shape: tuple[int, int], seed: str):
        self.accuracies = list(accuracies)
        self.rng = np.random.default_rng(name_seed(seed))
        self.shape = shape
        self.evaluated: list[np.ndarray] = []
        self.scored: list[tuple[np.ndarray, np.ndarray]] = []

    def importance(self, mask: np.ndarray) -> np.ndarray:
        scores = self.rng.uniform(size=self.shape)
        self.scored.append((mask.copy(), scores))
        return scores

    def evaluate(self, mask: np.ndarray) -> float:
        self.evaluated.append(mask.copy())
        return self.accuracies[len(self.evaluated) - 1]


def lowest_enabled(mask: np.ndarray, scores: np.ndarray, k: int) -> set[tuple[int, int]]:
    """The k enabled heads with the lowest scores, found by brute force."""
    heads = [(scores[i, h], i, h) for i in range(mask.shape[0]) for h in range(mask.shape[1]) if mask[i, h]]
    return {(i, h) for _, i, h in sorted(heads)[:k]}


def test_heads_per_step():
    assert heads_per_step((12, 12), 0.1) == 14  # the paper's 14 of 144
    assert heads_per_step((4, 4), 0.1) == 2  # 1.6 rounds to 2
    assert heads_per_step((2, 5), 0.25) == 3  # 2.5 rounds half up
    assert heads_per_step((4, 4), 0.01) == 1  # never zero
    with pytest.raises(ValueError, match="all 16 heads"):
        heads_per_step((4, 4), 0.99)


def test_stops_at_first_step_below_threshold_and_keeps_previous_mask():
    shape = (2, 5)
    # base 0.8 -> floor 0.76; 0.76 itself is kept (at the floor), 0.7599 is below
    script = Script([0.8, 0.79, 0.76, 0.7599, 0.9, 0.9], shape, "scripted-stop")
    result = prune_heads(shape, script.importance, script.evaluate, threshold=0.95, step_fraction=0.2)
    assert result.heads_per_step == 2
    assert result.base_accuracy == 0.8
    assert [t["kept"] for t in result.trace] == [True, True, False]
    assert [t["accuracy"] for t in result.trace] == [0.79, 0.76, 0.7599]
    assert result.stop_reason == "accuracy_below_threshold"
    assert len(script.evaluated) == 4  # base + three steps, nothing after the stop
    assert int(result.mask.size - result.mask.sum()) == 4
    # the kept mask is the one evaluated at step 2 (the 3rd evaluation), not the rejected one
    assert np.array_equal(result.mask, script.evaluated[2])
    assert not np.array_equal(result.mask, script.evaluated[3])

    mask = np.ones(shape, dtype=np.int8)
    for step, entry in enumerate(result.trace):
        shown, scores = script.scored[step]
        assert np.array_equal(shown, mask)  # importance recomputed under the current mask
        disabled = {tuple(x) for x in entry["disabled"]}
        assert len(disabled) == 2 and all(mask[i, h] == 1 for i, h in disabled)
        assert disabled == lowest_enabled(mask, scores, 2)
        candidate = mask.copy()
        for i, h in disabled:
            candidate[i, h] = 0
        assert np.array_equal(script.evaluated[step + 1], candidate)
        if entry["kept"]:
            mask = candidate
    assert np.array_equal(result.importance, script.scored[0][1])


def test_accuracy_exactly_at_the_floor_is_kept_despite_float_rounding():
    # 0.8 * (15/20) evaluates to 0.6000000000000001 in floats, above 12/20 = 0.6
    shape = (2, 5)
    script = Script([15 / 20, 12 / 20, 11 / 20], shape, "float-floor")
    result = prune_heads(shape, script.importance, script.evaluate, threshold=0.8, step_fraction=0.2)
    assert [t["kept"] for t in result.trace] == [True, False]
    assert int(result.mask.size - result.mask.sum()) == 2


def test_never_disables_all_heads_and_counts_are_multiples_of_the_step():
    for fraction, per_step, expected_off in ((0.2, 2, 8), (0.3, 3, 9), (0.1, 1, 9)):
        shape = (2, 5)
        script = Script([0.5] * 20, shape, f"never-all-{fraction}")
        result = prune_heads(
            shape, script.importance, script.evaluate, threshold=0.95, step_fraction=fraction
        )
        assert result.heads_per_step == per_step
        assert result.stop_reason == "no_heads_left"
        assert all(t["kept"] for t in result.trace)
        assert all(len(t["disabled"]) == per_step for t in result.trace)
        off = int(result.mask.size - result.mask.sum())
        assert off == expected_off and off % per_step == 0 and result.mask.sum() >= 1


def test_ties_break_by_layer_then_head():
    shape = (2, 3)
    result = prune_heads(shape, lambda m: np.zeros(shape), lambda m: 1.0, step_fraction=0.34)
    assert result.trace[0]["disabled"] == [[0, 0], [0, 1]]
    assert result.trace[1]["disabled"] == [[0, 2], [1, 0]]


def test_majority_gain_stops_where_the_floor_keeps_that_share_of_the_gain_over_majority():
    rng = np.random.default_rng(name_seed("majority-gain-floor"))
    shape = (2, 5)  # 2 heads per step: at most 4 steps
    for trial in range(20):
        majority = rng.uniform(0.3, 0.7)
        base = rng.uniform(majority + 0.05, 1.0)
        threshold = rng.uniform(0.5, 0.99)
        floor = majority + threshold * (base - majority)  # the rule, written out independently
        kept = int(rng.integers(0, 4))
        # the first rejected accuracy lies between the paper's floor and this one: only this rule stops there
        accuracies = [base, *rng.uniform(floor, base, kept), rng.uniform(threshold * base, floor), *[base] * 4]
        script = Script(accuracies, shape, f"majority-gain-{trial}")
        result = prune_heads(
            shape, script.importance, script.evaluate, threshold, 0.2, majority_rate=majority,
            reference="majority_gain",
        )  # fmt: skip
        assert result.threshold_accuracy == pytest.approx(floor, abs=1e-12)
        assert [t["kept"] for t in result.trace] == [True] * kept + [False]
        assert result.stop_reason == "accuracy_below_threshold"
        assert int(result.mask.size - result.mask.sum()) == 2 * kept
        assert not result.degenerate and result.majority_rate == majority
        again = Script(accuracies, shape, f"paper-{trial}")
        paper = prune_heads(shape, again.importance, again.evaluate, threshold, 0.2)
        assert paper.mask.sum() < result.mask.sum()  # the paper's lower floor keeps the step this one rejects


def test_floor_at_or_below_majority_is_degenerate_and_majority_gain_is_not():
    shape = (2, 5)
    rng = np.random.default_rng(name_seed("degenerate-floor"))
    cases = [(0.65, 0.64), (0.8, 0.76)]  # the numbers; a floor exactly at the majority rate
    for _ in range(10):
        base = rng.uniform(0.4, 0.95)
        cases.append((base, rng.uniform(0.95 * base, base - 1e-3)))
    for base, majority in cases:
        assert 0.95 * base <= majority + 1e-12 < base
        accuracies = [base, *np.linspace(base, majority, 5)[1:]]
        paper = prune_heads(shape, lambda m: np.zeros(shape), Script(accuracies, shape, "paper").evaluate,
                            0.95, 0.2, majority_rate=majority)  # fmt: skip
        assert paper.degenerate
        assert paper.degenerate_reason == (
            f"the stopping floor {0.95 * base:.4f} is at or below the majority-class rate {majority:.4f}: "
            "the search could not stop above always predicting the majority class"
        )
        assert paper.stop_reason == "no_heads_left"  # pruned down to the majority rate without stopping
        gain = prune_heads(shape, lambda m: np.zeros(shape), Script(accuracies, shape, "gain").evaluate,
                           0.65, 0.2, majority_rate=majority, reference="majority_gain")  # fmt: skip
        assert not gain.degenerate and gain.degenerate_reason is None
        assert gain.threshold_accuracy > majority and gain.stop_reason == "accuracy_below_threshold"
    # a floor clearly above the majority rate is not degenerate under the paper's rule either
    fine = prune_heads(shape, lambda m: np.zeros(shape), lambda m: 0.9, 0.95, 0.2, majority_rate=0.5)
    assert not fine.degenerate
    # an unpruned model that does not beat the majority class is degenerate whatever the reference
    for reference in ("unpruned", "majority_gain"):
        base, majority = rng.uniform(0.3, 0.6), rng.uniform(0.6, 0.9)
        result = prune_heads(shape, lambda m: np.zeros(shape), lambda m, base=base: base, 0.9, 0.2,
                             majority_rate=majority, reference=reference)  # fmt: skip
        assert result.degenerate
        assert result.degenerate_reason.startswith(
            f"the unpruned accuracy {base:.4f} does not beat the majority-class rate {majority:.4f}"
        )


def test_invalid_threshold_reference_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"subnetworks\.threshold_reference must be 'unpruned' or "
                                         r"'majority_gain', found 'majority'"):  # fmt: skip
        SubnetworkOptions(threshold_reference="majority")
    shape = (2, 5)
    with pytest.raises(ValueError, match="threshold_reference must be .*found 'gain'"):
        prune_heads(shape, lambda m: np.zeros(shape), lambda m: 0.9, reference="gain")
    with pytest.raises(ValueError, match="'majority_gain' needs the majority-class rate"):
        prune_heads(shape, lambda m: np.zeros(shape), lambda m: 0.9, reference="majority_gain")
    with pytest.raises(ValueError, match=r"majority_rate must be in \[0, 1\], found 1.5"):
        prune_heads(shape, lambda m: np.zeros(shape), lambda m: 0.9, majority_rate=1.5)


def label_batches(labels: list[int], size: int = 3) -> list[dict]:
    return [{"labels": torch.tensor(labels[i : i + size])} for i in range(0, len(labels), size)]


def _majority_worker(rank: int, world: int, init_file: str, labels: list[list[int]], out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rate = majority_rate(label_batches(labels[rank]), 3, "cpu")
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(rate))
    finally:
        torch.distributed.destroy_process_group()


def test_majority_rate_counts_labels_over_all_ranks():
    rng = np.random.default_rng(name_seed("majority-ddp"))
    # rank 0 mostly label 0, rank 1 mostly label 2, unequal shares: no rank's own rate is the global one
    labels = [rng.choice(3, size=7, p=[0.7, 0.2, 0.1]).tolist(), rng.choice(3, size=5, p=[0.0, 0.1, 0.9]).tolist()]
    everything = labels[0] + labels[1]
    expected = max(Counter(everything).values()) / len(everything)
    assert majority_rate(label_batches(everything), 3, "cpu") == expected
    own = [max(Counter(part).values()) / len(part) for part in labels]
    assert all(rate != expected for rate in own)
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(
            _majority_worker, args=(2, os.path.join(tmp, "init"), labels, tmp), nprocs=2, start_method="fork"
        )
        rates = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]
    assert rates == [expected, expected]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\), found \[0, 2\]"):
        majority_rate(label_batches([0, 2]), 2, "cpu")


# -- the search over a run ---------------------------------------------------------------------


def make_run(tmp_path, dev_per_language: int = 10, languages=("en", "de")):
    dm = PAWSXDataModule(
        languages=list(languages),
        train_per_language=4,
        dev_per_language=dev_per_language,
        test_per_language=4,
        eval_batch_size=4,
        backbone="tiny-random",
    )
    module = SequenceClassifier(backbone="tiny-random", languages=dm.languages, init_seed=3)
    ckpt = tmp_path / "run" / "checkpoints" / "epoch=0.ckpt"
    payload = {
        "crossling": {"format": 1, "epoch": 0, "global_step": 0, "hparams": dict(module.hparams)},
        "state_dict": {k: v.clone() for k, v in module.state_dict().items()},
    }
    atomic_torch_save(payload, ckpt)
    return dm, module, ckpt


CONTRACT_KEYS = {
    "language", "mask", "importance", "trace", "base_accuracy", "threshold", "step_fraction", "heads_per_step",
    "normalization", "data_split", "num_examples", "checkpoint", "checkpoint_fingerprint",
}  # fmt: skip


def test_find_subnetworks_writes_contract_and_resumes(tmp_path):
    torch.set_num_threads(1)
    dm, module, ckpt = make_run(tmp_path)
    options = SubnetworkOptions(threshold=0.9, step_fraction=0.2, progress=False)
    paths = find_subnetworks(module, dm, tmp_path / "run", options, ckpt_path=ckpt)
    assert set(paths) == {"en", "de", "stats"}
    for lang_index, lang in enumerate(dm.languages):
        data = json.loads(paths[lang].read_text())
        assert CONTRACT_KEYS <= set(data)
        assert data["language"] == lang and data["checkpoint_fingerprint"] == fingerprint(ckpt)
        assert data["num_examples"] == 10 and data["data_split"] == "dev" and data["threshold"] == 0.9
        mask = np.array(data["mask"])
        assert mask.shape == (4, 4) and set(np.unique(mask)) <= {0, 1} and mask.sum() >= 1
        assert data["heads_per_step"] == 3  # 0.2 * 16 = 3.2
        assert (16 - mask.sum()) % 3 == 0
        trace = data["trace"]
        assert all(t["kept"] for t in trace[:-1])
        floor = 0.9 * data["base_accuracy"]
        assert all(t["kept"] == (t["accuracy"] >= floor - 1e-12) for t in trace)
        if data["stop_reason"] == "accuracy_below_threshold":
            assert not trace[-1]["kept"]
        # the stored mask really has the accuracy the trace claims (last kept step, or the base)
        examples = [e for e in dm.dataset("dev").examples if e.lang == lang_index]
        from datamodules.base import make_collate

        batch = make_collate(dm.pad_token_id)(examples)
        kept = [t["accuracy"] for t in trace if t["kept"]]
        accuracy = evaluate_accuracy(module.model, module.gates, [batch], torch.as_tensor(mask))
        assert accuracy == pytest.approx(kept[-1] if kept else data["base_accuracy"], abs=1e-9)
    stats = paths["stats"]
    assert (stats / "table1_disabled_heads.csv").is_file() and (stats / "mask_cosine.png").is_file()

    # resumable: the same checkpoint, data and options skip; other options recompute
    before = {lang: paths[lang].stat().st_mtime_ns for lang in dm.languages}
    find_subnetworks(module, dm, tmp_path / "run", options, ckpt_path=ckpt)
    assert {lang: paths[lang].stat().st_mtime_ns for lang in dm.languages} == before
    changed = SubnetworkOptions(threshold=0.8, step_fraction=0.2, progress=False, languages=["de"])
    find_subnetworks(module, dm, tmp_path / "run", changed, ckpt_path=ckpt)
    assert paths["en"].stat().st_mtime_ns == before["en"]
    assert json.loads(paths["de"].read_text())["threshold"] == 0.8
    assert not list((tmp_path / "run" / "subnetworks").glob("*.tmp*"))

    # another checkpoint (different weights) is a different search: everything is recomputed
    other = tmp_path / "run" / "checkpoints" / "epoch=1.ckpt"
    payload = torch.load(ckpt, weights_only=True)
    payload["state_dict"] = {
        k: v + 0.01 if v.is_floating_point() else v for k, v in payload["state_dict"].items()
    }
    atomic_torch_save(payload, other)
    find_subnetworks(module, dm, tmp_path / "run", changed, ckpt_path=other)
    assert json.loads(paths["de"].read_text())["checkpoint_fingerprint"] == fingerprint(other)


def test_json_majority_rate_is_the_label_share_of_the_scored_eval_examples(tmp_path):
    torch.set_num_threads(1)
    dm, module, ckpt = make_run(tmp_path)
    rng = np.random.default_rng(name_seed("json-majority", tmp_path.name))
    limit = int(rng.integers(2, 10))
    reference = str(rng.choice(["unpruned", "majority_gain"]))
    options = SubnetworkOptions(threshold=0.9, threshold_reference=reference, step_fraction=0.5, eval_examples=limit,
                                progress=False)  # fmt: skip
    paths = find_subnetworks(module, dm, tmp_path / "run", options, ckpt_path=ckpt)
    for lang_index, lang in enumerate(dm.languages):
        labels = [e.record.label for e in dm.dataset("dev").examples if e.lang == lang_index]
        expected = max(Counter(labels[:limit]).values()) / limit
        assert expected != max(Counter(labels).values()) / len(labels)  # only the scored examples count
        data = json.loads(paths[lang].read_text())
        assert data["num_eval_examples"] == limit and data["majority_rate"] == pytest.approx(expected, abs=1e-12)
        assert data["threshold_reference"] == reference and data["options"] == options.search_key()
        base, floor, majority = data["base_accuracy"], data["threshold_accuracy"], data["majority_rate"]
        expected_floor = 0.9 * base if reference == "unpruned" else majority + 0.9 * (base - majority)
        assert floor == pytest.approx(expected_floor, abs=1e-12)
        assert data["degenerate"] == (base <= majority + 1e-12 or floor - 1e-12 <= majority)
        assert (data["degenerate_reason"] is None) == (not data["degenerate"])


def test_old_jsons_stay_done_under_the_default_and_majority_gain_is_another_search(tmp_path):
    torch.set_num_threads(1)
    dm, module, ckpt = make_run(tmp_path, dev_per_language=4, languages=("en",))
    assert "threshold_reference" not in SubnetworkOptions().search_key()
    options = SubnetworkOptions(step_fraction=0.5, progress=False)
    path = find_subnetworks(module, dm, tmp_path / "run", options, ckpt_path=ckpt)["en"]
    old = json.loads(path.read_text())
    for key in ("majority_rate", "threshold_reference", "degenerate", "degenerate_reason"):
        del old[key]  # as written before the search recorded them
    path.write_text(json.dumps(old))
    find_subnetworks(module, dm, tmp_path / "run", options, ckpt_path=ckpt)
    assert json.loads(path.read_text()) == old  # still done: not recomputed
    table = (tmp_path / "run" / "subnetworks" / "stats" / "table1_disabled_heads.csv").read_text().splitlines()
    assert table[0].endswith(",majority_rate,degenerate") and table[1].endswith(",,")
    gain = SubnetworkOptions(step_fraction=0.5, progress=False, threshold_reference="majority_gain")
    find_subnetworks(module, dm, tmp_path / "run", gain, ckpt_path=ckpt)
    data = json.loads(path.read_text())
    assert data["options"] == {**old["options"], "threshold_reference": "majority_gain"}
    assert data["threshold_reference"] == "majority_gain" and 0.0 < data["majority_rate"] <= 1.0


def test_bad_checkpoint_names_the_file(tmp_path):
    dm, module, _ = make_run(tmp_path)
    bad = tmp_path / "not-crossling.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(CheckpointError, match="not-crossling.ckpt"):
        find_subnetworks(module, dm, tmp_path / "run", SubnetworkOptions(progress=False), ckpt_path=bad)
    assert not (tmp_path / "run" / "subnetworks").exists()


class NoGermanDev(PAWSXDataModule):
    """A source whose dev split lacks one language (the datamodule itself would refuse an empty file)."""

    def load_records(self, split):
        records = super().load_records(split)
        return [r for r in records if split != "dev" or r.lang != "de"]


def test_language_without_dev_data_names_the_file(tmp_path):
    _, module, ckpt = make_run(tmp_path)
    dm = NoGermanDev(languages=["en", "de"], dev_per_language=4, eval_batch_size=4, backbone="tiny-random")
    options = SubnetworkOptions(progress=False, step_fraction=0.5)
    with pytest.raises(DataError, match=r"subnetworks/de\.json.*dev split has no 'de' examples"):
        find_subnetworks(module, dm, tmp_path / "run", options, ckpt_path=ckpt)
    assert not (tmp_path / "run" / "subnetworks" / "en.json").exists()  # checked before any work


def test_existing_mask_of_wrong_shape_names_the_file(tmp_path):
    dm, module, ckpt = make_run(tmp_path, dev_per_language=4, languages=("en",))
    options = SubnetworkOptions(progress=False, step_fraction=0.5)
    paths = find_subnetworks(module, dm, tmp_path / "run", options, ckpt_path=ckpt)
    data = json.loads(paths["en"].read_text())
    data["mask"] = [[1, 1, 1]] * 4
    paths["en"].write_text(json.dumps(data))
    with pytest.raises(MaskError, match=r"en\.json.*shape \(4, 3\).*\(4, 4\)"):
        find_subnetworks(module, dm, tmp_path / "run", options, ckpt_path=ckpt)


def test_options_are_validated():
    with pytest.raises(ValueError, match="threshold"):
        SubnetworkOptions(threshold=1.5)
    with pytest.raises(ValueError, match="step_fraction"):
        SubnetworkOptions(step_fraction=0.0)
    with pytest.raises(ValueError, match="num_examples"):
        SubnetworkOptions(num_examples=0)


def test_callback_searches_the_just_trained_model(tmp_path):
    import pytorch_lightning as pl

    from callbacks.checkpoints import EpochCheckpoint
    from lightning_modules.stages.subnetworks import SubnetworkSearch

    dm = PAWSXDataModule(
        languages=["en", "ko"], train_per_language=8, dev_per_language=6, test_per_language=4, batch_size=4,
        eval_batch_size=6, backbone="tiny-random",
    )  # fmt: skip
    module = SequenceClassifier(backbone="tiny-random", languages=dm.languages)
    search = SubnetworkSearch(SubnetworkOptions(step_fraction=0.25, progress=False))
    trainer = pl.Trainer(
        max_epochs=1, limit_val_batches=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        default_root_dir=str(tmp_path), callbacks=[EpochCheckpoint(save_last=False), search],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "checkpoints" / "epoch=0.ckpt"
    for lang in dm.languages:
        data = json.loads((tmp_path / "subnetworks" / f"{lang}.json").read_text())
        assert data["checkpoint"] == str(ckpt) and data["checkpoint_fingerprint"] == fingerprint(ckpt)
        assert data["checkpoint_epoch"] == 0 and data["num_examples"] == 6
        assert (16 - np.array(data["mask"]).sum()) % 4 == 0
    assert (tmp_path / "subnetworks" / "stats" / "overlap_percent.csv").is_file()


def test_one_pass_for_importance_and_accuracy_finds_the_same_subnetwork_with_fewer_forwards(tmp_path, monkeypatch):
    """Importance examples that lead the accuracy examples share their forward pass: the search's
    masks, importances and accuracies are those of the separate passes."""
    import callbacks.pruning as subnetworks

    torch.set_num_threads(1)
    dm, module, _ = make_run(tmp_path, dev_per_language=24)
    dm.setup("fit")
    options = SubnetworkOptions(threshold=0.9, step_fraction=0.2, num_examples=8, progress=False)
    assert subnetworks.importance_within_eval(options)
    seen = []
    real_forward = module.model.forward
    monkeypatch.setattr(module.model, "forward", lambda *a, **k: seen.append(len(k["input_ids"])) or real_forward(*a, **k))
    fused = subnetworks.prune_language(module, dm, "de", options)
    fused_rows = sum(seen)
    monkeypatch.setattr(subnetworks, "importance_within_eval", lambda options: False)
    seen.clear()
    separate = subnetworks.prune_language(module, dm, "de", options)
    assert fused["mask"] == separate["mask"] and fused["stop_reason"] == separate["stop_reason"]
    np.testing.assert_array_equal(fused["importance"], separate["importance"])
    assert len(fused["trace"]) == len(separate["trace"]) >= 2
    for a, b in zip(fused["trace"], separate["trace"]):
        assert a["disabled"] == b["disabled"] and a["kept"] == b["kept"]
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-12)
        np.testing.assert_array_equal(a["importance"], b["importance"])
    assert fused["base_accuracy"] == pytest.approx(separate["base_accuracy"], abs=1e-12)
    # at every step the separate search reads the 8 importance examples once more
    assert sum(seen) - fused_rows == 8 * len(separate["trace"])
    assert not subnetworks.importance_within_eval(SubnetworkOptions(num_examples=30, eval_examples=20))
    assert not subnetworks.importance_within_eval(SubnetworkOptions(data_split="train"))

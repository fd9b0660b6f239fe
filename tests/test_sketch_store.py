"""Sketch files: the stage writes every checkpoint × mask × split with rows equal to direct
sketches, resumes an interrupted run to the identical file, refuses to mix incompatible
sketches, and the numpy-only reader validates what it loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cpu_trainer, small_pawsx_datamodule
from pytorch_lightning import Trainer

from analysis.masks import MaskError
from analysis.sketch_store import SketchError, check_compatible, list_sketches, load_sketches, sketch_paths
from callbacks.checkpoints import atomic_torch_save, fingerprint, load_weights
from callbacks.sketch_plan import mask_rounds, plan_masks
from callbacks.sketch_writer import SketchWriter
from callbacks.sketching import SketchOptions, sketch_batch
from lightning_modules.classifier import SequenceClassifier
from lightning_modules.stages.sketch import sketch_checkpoints

OPTIONS = SketchOptions(k=4, seed=3, precision="32")  # float32: compared with per-example references


def make_run_dir(run_dir: Path, languages: list[str], epochs: int = 2) -> Path:
    """Checkpoints of a tiny-random classifier (weights perturbed per epoch) and random subnetworks."""
    module = SequenceClassifier(backbone="tiny-random", languages=languages, init_seed=5)
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        payload = {
            "crossling": {"format": 1, "epoch": epoch, "hparams": dict(module.hparams)},
            "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
        }
        atomic_torch_save(payload, run_dir / "checkpoints" / f"epoch={epoch}.ckpt")
    (run_dir / "subnetworks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    shape = module.gates.shape
    for lang in languages:
        mask = (rng.random(shape) > 0.4).astype(int)
        mask[0, 0] = 1
        (run_dir / "subnetworks" / f"{lang}.json").write_text(
            json.dumps({"language": lang, "mask": mask.tolist()})
        )
    return run_dir


def make_trainer(**extra) -> Trainer:
    return cpu_trainer(inference_mode=False, **extra)  # sketching takes gradients inside predict


def new_module(languages):
    return SequenceClassifier(backbone="tiny-random", languages=languages, init_seed=9)


def run_stage(run_dir, dm, conditions=("full", "own"), options=OPTIONS, trainer=None):
    return sketch_checkpoints(
        trainer or make_trainer(), new_module(dm.languages), dm, run_dir, list(conditions), options
    )


@pytest.fixture(scope="module")
def dm3():
    """Three languages, batches of 16 (mixed languages, ragged lengths)."""
    return small_pawsx_datamodule(
        languages=["en", "de", "ko"], train_per_language=16, dev_per_language=4, test_per_language=6, eval_batch_size=16
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, dm3):
    run_dir = make_run_dir(tmp_path_factory.mktemp("run"), dm3.languages)
    paths = run_stage(run_dir, dm3)
    return run_dir, paths


def test_plan_pairs_test_languages_with_their_masks():
    train, test = plan_masks(["full", "own", "as-de"], ["en", "de", "ko"])
    assert train == ["full", "de", "en", "ko"]
    assert test == {"en": ["full", "de", "en"], "de": ["full", "de"], "ko": ["full", "de", "ko"]}
    for conditions in (
        ["full", "own", "as-de"],
        ["own", "as-ko"],
        ["union-en-de", "own", "random2", "as-en"],
    ):
        train, test = plan_masks(conditions, ["en", "de", "ko"])
        rounds = mask_rounds(test)
        # each (language, mask) pair exactly once; each mask in one round, with all of its languages
        pairs = sorted((lang, m) for r in rounds for lang, m in r.items())
        assert pairs == sorted((lang, m) for lang, ms in test.items() for m in ms)
        for mask in train:
            holding = [r for r in rounds if mask in r.values()]
            assert len(holding) == 1, (conditions, mask, rounds)
            assert {lang for lang, m in holding[0].items() if m == mask} == {
                lang for lang, ms in test.items() if mask in ms
            }
    with pytest.raises(MaskError, match="unknown condition"):
        plan_masks(["owned"], ["en"])


def test_stage_writes_every_checkpoint_mask_and_split(finished_run, dm3):
    run_dir, paths = finished_run
    languages = dm3.languages
    expected = {(e, m, s) for e in (0, 1) for m in ["full", *languages] for s in ("train", "test")}
    assert set(list_sketches(run_dir)) == expected
    assert sorted(map(str, paths)) == sorted(str(sketch_paths(run_dir, *key)[0]) for key in expected)
    assert not list(run_dir.glob("sketches/**/*partial*"))
    train, test = dm3.dataset("train"), dm3.dataset("test")
    module = new_module(languages)
    for epoch in (0, 1):
        ckpt = run_dir / "checkpoints" / f"epoch={epoch}.ckpt"
        load_weights(module, ckpt)
        for mask in ["full", "de"]:
            head = None
            if mask != "full":
                head = torch.tensor(
                    json.loads((run_dir / "subnetworks" / f"{mask}.json").read_text())["mask"],
                    dtype=torch.float32,
                )
            for split, dataset in (("train", train), ("test", test)):
                array, side = load_sketches(run_dir, epoch, mask, split)
                want = [
                    e for e in dataset.examples if split == "train" or mask == "full" or e.record.lang == mask
                ]
                assert side["indices"] == [e.index for e in want]
                assert side["langs"] == [e.record.lang for e in want] and side["ids"] == [
                    e.record.id for e in want
                ]
                assert side["model_fingerprint"] == fingerprint(ckpt) and side["d"] == 16 and side["precision"] == "32"
                assert side["correct"] == [p == lab for p, lab in zip(side["pred"], side["labels"])]
                # every 5th row against a direct, one-example sketch
                for row in range(0, len(want), 5):
                    ex = want[row]
                    ids = torch.tensor([ex.input_ids])
                    batch = {
                        "input_ids": ids,
                        "attention_mask": torch.ones_like(ids),
                        "labels": torch.tensor([ex.record.label]),
                    }
                    s, loss, pred = sketch_batch(module.model, module.gates, batch, head, OPTIONS)
                    np.testing.assert_allclose(array[row], s[0].numpy(), rtol=1e-4, atol=1e-6)
                    assert abs(side["loss"][row] - float(loss[0])) < 1e-5 and side["pred"][row] == int(
                        pred[0]
                    )


def test_finished_files_are_skipped_and_incompatible_ones_refused(finished_run, dm3):
    run_dir, paths = finished_run
    before = {p: p.stat().st_mtime_ns for p in paths}
    again = run_stage(run_dir, dm3)
    assert sorted(again) == sorted(paths) and all(p.stat().st_mtime_ns == t for p, t in before.items())
    with pytest.raises(SketchError, match=r"epoch=0/full/train\.json.*projection"):
        run_stage(run_dir, dm3, options=SketchOptions(k=4, seed=4, precision="32"))
    with pytest.raises(SketchError, match=r"epoch=0/full/train\.json.*\bd\b"):
        run_stage(run_dir, dm3, options=SketchOptions(k=5, seed=3, precision="32"))


def test_interrupted_run_resumes_to_the_identical_file(tmp_path, dm3, finished_run, monkeypatch):
    reference_dir, _ = finished_run
    run_dir = make_run_dir(tmp_path / "run", dm3.languages)
    for epoch in (0, 1):  # identical checkpoints, so identical sketches are expected
        src = (reference_dir / "checkpoints" / f"epoch={epoch}.ckpt").read_bytes()
        (run_dir / "checkpoints" / f"epoch={epoch}.ckpt").write_bytes(src)
    original = SketchWriter.write_on_batch_end
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # mid-way through the first pass (train passes have 3 batches of 16)
            raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SketchWriter, "write_on_batch_end", failing)
    with pytest.raises(RuntimeError, match="killed"):
        run_stage(run_dir, dm3, conditions=["full"])
    partial = run_dir / "sketches" / "epoch=0" / "full" / "train.npy.partial"
    assert partial.is_file() and not partial.with_name("train.npy").exists()
    done = np.load(partial.with_name("train.done.partial"))
    assert 0 < done.sum() < done.size
    monkeypatch.setattr(SketchWriter, "write_on_batch_end", original)
    computed = []
    import callbacks.sketch_module as sketch_module

    real = sketch_module.sketch_batch
    monkeypatch.setattr(
        sketch_module, "sketch_batch", lambda *a, **k: computed.append(len(a[2]["labels"])) or real(*a, **k)
    )
    run_stage(run_dir, dm3, conditions=["full"])
    total = sum(len(load_sketches(run_dir, *key)[1]["indices"]) for key in list_sketches(run_dir))
    assert sum(computed) == total - int(done.sum())  # the done rows were not sketched again
    assert len(list_sketches(run_dir)) == 4
    for key in list_sketches(run_dir):
        a_npy, a_json = sketch_paths(reference_dir, *key)
        b_npy, b_json = sketch_paths(run_dir, *key)
        assert a_npy.read_bytes() == b_npy.read_bytes(), key
        assert a_json.read_text() == b_json.read_text(), key
    assert not list(run_dir.glob("sketches/**/*partial*"))


def test_equal_masks_are_sketched_once_and_their_files_are_what_a_pass_would_write(tmp_path, dm3, monkeypatch):
    import callbacks.sketch_module as sketch_module
    import lightning_modules.stages.sketch as stage

    shared, plain = (make_run_dir(tmp_path / name, dm3.languages, epochs=1) for name in ("shared", "plain"))
    (plain / "checkpoints" / "epoch=0.ckpt").write_bytes((shared / "checkpoints" / "epoch=0.ckpt").read_bytes())
    for run_dir in (shared, plain):  # plant: de's subnetwork is en's
        en = (run_dir / "subnetworks" / "en.json").read_text()
        (run_dir / "subnetworks" / "de.json").write_text(en.replace('"en"', '"de"'))
    rows = []
    real = sketch_module.sketch_batch
    monkeypatch.setattr(sketch_module, "sketch_batch", lambda *a, **k: rows.append(len(a[2]["labels"])) or real(*a, **k))
    conditions = ["full", "own", "as-de"]  # en's test examples under en's mask and under de's (equal)
    run_stage(shared, dm3, conditions=conditions)
    shared_rows = sum(rows)
    monkeypatch.setattr(stage, "equal_mask_aliases", lambda names, masks: {})  # every mask its own pass
    rows.clear()
    run_stage(plain, dm3, conditions=conditions)
    # en's training pass and its test examples' second pass under the equal mask were not run
    n_test_en = sum(e.record.lang == "en" for e in dm3.dataset("test").examples)
    assert sum(rows) - shared_rows == len(dm3.dataset("train")) + n_test_en
    assert set(list_sketches(shared)) == set(list_sketches(plain))
    for key in list_sketches(plain):
        (a, a_side), (b, b_side) = load_sketches(shared, *key), load_sketches(plain, *key)
        assert a_side.pop("same_as", None) == ("de" if key[1] == "en" else None), key  # de < en: de is sketched
        if key[2] == "train":  # the very pass the plain run makes for de
            assert sketch_paths(shared, *key)[0].read_bytes() == sketch_paths(plain, *key)[0].read_bytes(), key
            assert a_side == b_side, key
        else:  # en's test rows came from another pass (batched with other languages): equal up to rounding,
            # which float32 kernels pick by batch shape (measured up to 6e-7 on sketch entries of size ~1)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
            np.testing.assert_allclose(a_side.pop("loss"), b_side.pop("loss"), rtol=1e-5)
            assert a_side == b_side, key


def test_training_pool_keeps_the_same_items_in_every_language_and_only_their_rows(tmp_path, dm3, finished_run):
    from callbacks.sketch_plan import train_pool

    train = dm3.dataset("train")
    small, large = train_pool(train, 5), train_pool(train, 9)
    for pool, n in ((small, 5), (large, 9)):
        langs = [train[int(i)].lang for i in pool]
        assert sorted(np.bincount(langs).tolist()) == [n] * len(dm3.languages)
        ids = [{train[int(i)].record.id for i in pool if train[int(i)].lang == lang} for lang in range(3)]
        assert ids[0] == ids[1] == ids[2]  # parallel data: the same items in every language
    assert set(small) <= set(large) and np.array_equal(train_pool(train, 5), small)
    assert train_pool(train, None) is None
    reference_dir, _ = finished_run
    run_dir = make_run_dir(tmp_path / "run", dm3.languages, epochs=1)
    (run_dir / "checkpoints" / "epoch=0.ckpt").write_bytes((reference_dir / "checkpoints" / "epoch=0.ckpt").read_bytes())
    sketch_checkpoints(make_trainer(), new_module(dm3.languages), dm3, run_dir, ["full", "own"], OPTIONS,
                     train_per_language=5)
    for mask in ["full", *dm3.languages]:
        array, side = load_sketches(run_dir, 0, mask, "train")
        assert side["indices"] == small.tolist()
        ref, ref_side = load_sketches(reference_dir, 0, mask, "train")
        rows = np.searchsorted(ref_side["indices"], small)
        np.testing.assert_allclose(array, ref[rows], rtol=1e-4, atol=1e-6)
        test, test_side = load_sketches(run_dir, 0, mask, "test")  # the test side is untouched
        assert test_side["indices"] == load_sketches(reference_dir, 0, mask, "test")[1]["indices"]
    # a different pool re-sketches the training files instead of ranking a mix
    sketch_checkpoints(make_trainer(), new_module(dm3.languages), dm3, run_dir, ["full"], OPTIONS,
                     train_per_language=9)
    assert load_sketches(run_dir, 0, "full", "train")[1]["indices"] == large.tolist()


def test_missing_subnetwork_file_is_named(tmp_path, dm3):
    run_dir = make_run_dir(tmp_path / "run", dm3.languages, epochs=1)
    (run_dir / "subnetworks" / "de.json").unlink()
    with pytest.raises(MaskError, match=r"subnetworks/de\.json"):
        run_stage(run_dir, dm3, conditions=["own"])


# -- the reader ------------------------------------------------------------------------------------
def write_file(
    run_dir: Path, epoch=0, mask="full", split="train", n=3, d=4, stored_d=None, **overrides
) -> tuple[Path, Path]:
    npy, side = sketch_paths(run_dir, epoch, mask, split)
    npy.parent.mkdir(parents=True, exist_ok=True)
    cols = stored_d or d
    np.save(npy, np.arange(n * cols, dtype=np.float32).reshape(n, cols))
    sidecar = {
        "format": 1,
        "split": split,
        "mask": mask,
        "epoch": epoch,
        "n": n,
        "d": d,
        "dtype": "float32",
        "projection": {"kind": "kronecker", "k": 2, "seed": 0, "combine": "sum", "pairs": 1},
        "layers": ["a", "b"],
        "model_fingerprint": "abc",
        "indices": list(range(0, 2 * n, 2)),
        "ids": [f"x{i}" for i in range(n)],
        "langs": ["en"] * n,
        "labels": [0] * n,
        "loss": [0.5] * n,
        "pred": [1] * n,
        "correct": [False] * n,
        "languages": ["en", "de"],
    }
    sidecar.update(overrides)
    side.write_text(json.dumps(sidecar))
    return npy, side


def test_reader_loads_and_validates(tmp_path):
    npy, side = write_file(tmp_path)
    array, sidecar = load_sketches(tmp_path, 0, "full", "train")
    assert isinstance(array, np.memmap) and array.shape == (3, 4) and sidecar["indices"] == [0, 2, 4]
    with pytest.raises(SketchError, match=r"sketches not found: .*epoch=1/full/train\.npy"):
        load_sketches(tmp_path, 1, "full", "train")
    npy.with_name("test.npy.partial").write_bytes(b"")
    with pytest.raises(SketchError, match="has not finished"):
        load_sketches(tmp_path, 0, "full", "test")
    write_file(tmp_path, mask="de", stored_d=5)
    with pytest.raises(SketchError, match=r"de/train\.npy: holds float32 \(3, 5\).*float32 \(3, 4\)"):
        load_sketches(tmp_path, 0, "de", "train")
    _, bad = write_file(tmp_path, mask="fr", labels=[0, 1])
    with pytest.raises(SketchError, match=r"fr/train\.json: key 'labels' has 2 entries, expected n = 3"):
        load_sketches(tmp_path, 0, "fr", "train")
    bad.write_text("{not json")
    with pytest.raises(SketchError, match=r"fr/train\.json: not valid JSON.*line 1"):
        load_sketches(tmp_path, 0, "fr", "train")
    write_file(tmp_path, mask="ko", epoch=1)
    (tmp_path / "sketches" / "epoch=2").mkdir()
    (tmp_path / "sketches" / "epoch=1" / "ko").rename(tmp_path / "sketches" / "epoch=2" / "ko")
    with pytest.raises(SketchError, match="key 'epoch' is 1, but the file lies where 2 belongs"):
        load_sketches(tmp_path, 2, "ko", "train")
    write_file(tmp_path, mask="es", indices=[4, 2, 0])
    with pytest.raises(SketchError, match="ascending"):
        load_sketches(tmp_path, 0, "es", "train")


def test_check_compatible_names_file_and_key(tmp_path):
    _, a = write_file(tmp_path)
    _, b = write_file(tmp_path, split="test")
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    check_compatible([(a, ra), (b, rb)], same_model=True)
    for key, value in (("d", 8), ("layers", ["a"]), ("projection", {**ra["projection"], "seed": 1})):
        with pytest.raises(SketchError, match=rf"test\.json: {key} is .* there but .* in .*train\.json"):
            check_compatible([(a, ra), (b, {**rb, key: value})])
    check_compatible([(a, ra), (b, {**rb, "model_fingerprint": "zzz"})])  # across checkpoints: fine
    with pytest.raises(SketchError, match="model_fingerprint"):
        check_compatible([(a, ra), (b, {**rb, "model_fingerprint": "zzz"})], same_model=True)


def test_fit_callback_writes_full_sketches_equal_to_the_stage(tmp_path):
    from callbacks.checkpoints import EpochCheckpoint
    from callbacks.epoch_sketches import SketchCallback
    dm = small_pawsx_datamodule(
        languages=["en", "ko"],
        train_per_language=12,
        dev_per_language=4,
        test_per_language=4,
        seed=2,
    )
    module = SequenceClassifier(
        backbone="tiny-random", languages=dm.languages, init_seed=1, learning_rate=1e-2
    )
    fit_dir = tmp_path / "fit"
    trainer = make_trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=str(fit_dir),
        callbacks=[SketchCallback(OPTIONS), EpochCheckpoint(save_last=False)],
    )
    trainer.fit(module, datamodule=dm)
    keys = [(e, "full", s) for e in (0, 1) for s in ("test", "train")]
    assert list_sketches(fit_dir) == keys
    assert not list(fit_dir.glob("sketches/**/*partial*"))
    # the stage, from the checkpoints alone, finds them done; recomputed elsewhere, they are equal
    stage_dir = tmp_path / "stage"
    stage_dir.joinpath("checkpoints").mkdir(parents=True)
    for epoch in (0, 1):
        name = f"epoch={epoch}.ckpt"
        (stage_dir / "checkpoints" / name).write_bytes((fit_dir / "checkpoints" / name).read_bytes())
    before = {k: sketch_paths(fit_dir, *k)[0].stat().st_mtime_ns for k in keys}
    sketch_checkpoints(make_trainer(), new_module(dm.languages), dm, fit_dir, ["full"], OPTIONS)
    assert all(sketch_paths(fit_dir, *k)[0].stat().st_mtime_ns == t for k, t in before.items())
    sketch_checkpoints(make_trainer(), new_module(dm.languages), dm, stage_dir, ["full"], OPTIONS)
    for key in keys:
        a, side_a = load_sketches(fit_dir, *key)
        b, side_b = load_sketches(stage_dir, *key)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert side_a["model_fingerprint"] == side_b["model_fingerprint"]
        assert side_a["pred"] == side_b["pred"] and side_a["indices"] == side_b["indices"]
    epoch0 = load_sketches(fit_dir, 0, "full", "train")[0]
    assert not np.allclose(
        epoch0, load_sketches(fit_dir, 1, "full", "train")[0]
    )  # weights moved between epochs


def test_a_condition_added_later_rewrites_only_the_files_that_lack_rows(tmp_path, dm3):
    run_dir = make_run_dir(tmp_path / "run", dm3.languages, epochs=1)
    run_stage(run_dir, dm3, conditions=["own"])
    old_rows, de_test = load_sketches(run_dir, 0, "de", "test")
    old_rows = np.array(old_rows)  # a copy: the file is replaced below
    assert set(de_test["langs"]) == {"de"}
    before = {k: sketch_paths(run_dir, *k)[0].stat().st_mtime_ns for k in list_sketches(run_dir)}
    run_stage(run_dir, dm3, conditions=["own", "as-de"])  # every test language now needs the de mask
    array, side = load_sketches(run_dir, 0, "de", "test")
    assert set(side["langs"]) == {"en", "de", "ko"} and array.shape[0] == len(dm3.dataset("test"))
    rows = [side["indices"].index(i) for i in de_test["indices"]]
    np.testing.assert_allclose(array[rows], old_rows, rtol=1e-5, atol=1e-6)  # the de rows are the same
    after = {k: sketch_paths(run_dir, *k)[0].stat().st_mtime_ns for k in before}
    assert [k for k in before if before[k] != after[k]] == [(0, "de", "test")]

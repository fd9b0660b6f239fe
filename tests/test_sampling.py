"""Which items a run uses: parallel tasks take the same item ids in every language
(deterministic by seed), each example's global index is its position in its split and is
stable across datamodule instances, and MARC samples each language independently.
"""

from __future__ import annotations

import json
import random

import pytest
from helpers import small_pawsx_datamodule

from datamodules import DataError, MARCDataModule, PAWSXDataModule, XNLIDataModule
from datamodules.sampling import sample_independent, sample_parallel
from datamodules.sources import Record


def ids_by_language(records: list[Record]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in records:
        out.setdefault(r.lang, []).append(r.id)
    return out


@pytest.mark.parametrize("cls", [PAWSXDataModule, XNLIDataModule])
def test_bundled_parallel_sampling_same_ids_in_every_language(cls):
    dm = cls(train_per_language=30, dev_per_language=12, test_per_language=12, seed=5, backbone="tiny-random")
    for split, n in (("train", 30), ("dev", 12), ("test", 12)):
        records = dm.load_records(split)
        by_lang = ids_by_language(records)
        assert list(by_lang) == dm.languages  # grouped in the run's language order
        first = by_lang[dm.languages[0]]
        assert len(first) == n == len(set(first))
        for lang in dm.languages:
            assert sorted(by_lang[lang]) == sorted(first), f"{split}/{lang}: different items"
        # the same item really is a different language's text (not one file read five times)
        texts = {(r.lang, r.id): r.texts for r in records}
        other = dm.languages[1]
        differing = sum(texts[(dm.languages[0], i)] != texts[(other, i)] for i in first)
        assert differing >= n // 2


def test_bundled_sampling_deterministic_by_seed_and_seeds_differ():
    def train_ids(seed):
        dm = PAWSXDataModule(train_per_language=20, seed=seed, backbone="tiny-random")
        return [r.id for r in dm.load_records("train")]

    assert train_ids(1) == train_ids(1)
    assert set(train_ids(1)) != set(train_ids(2))


def synthetic_parallel(seed: int, langs=("en", "fr", "de"), shared=60, extra=15) -> dict[str, list[Record]]:
    """Each language: the shared ids in its own random order, plus ids only it has."""
    rng = random.Random(seed)
    out = {}
    for lang in langs:
        ids = [f"item{i}" for i in range(shared)] + [f"{lang}-only{i}" for i in range(extra)]
        rng.shuffle(ids)
        out[lang] = [Record(i, lang, (f"{lang} text of {i}",), rng.randint(0, 1)) for i in ids]
    return out


@pytest.mark.parametrize("n", [1, 17, 60, 100, None])
def test_sample_parallel_matches_reference_on_synthetic_records(n):
    per_lang = synthetic_parallel(seed=3)
    chosen = sample_parallel(per_lang, n, seed=9, where="test")
    common = set.intersection(*({r.id for r in rows} for rows in per_lang.values()))
    ids = {r.id for r in chosen["en"]}
    assert ids <= common
    assert len(ids) == (len(common) if n is None else min(n, len(common)))
    for lang, rows in per_lang.items():
        # reference: that language's records of the chosen ids, in its own file order
        assert chosen[lang] == [r for r in rows if r.id in ids]


def test_sample_parallel_deterministic_and_seed_dependent():
    per_lang = synthetic_parallel(seed=4)
    a = sample_parallel(per_lang, 20, seed=1, where="test")
    assert a == sample_parallel(per_lang, 20, seed=1, where="test")
    b = sample_parallel(per_lang, 20, seed=2, where="test")
    assert {r.id for r in a["fr"]} != {r.id for r in b["fr"]}


def test_sample_parallel_repeated_id_still_gives_n_distinct_items():
    per_lang = synthetic_parallel(seed=5, shared=10, extra=0)
    per_lang["en"] = per_lang["en"] + per_lang["en"][:8]  # eight ids appear twice in the first language
    for seed in range(20):
        chosen = sample_parallel(per_lang, 9, seed=seed, where="test")
        for rows in chosen.values():
            assert len(rows) == 9 == len({r.id for r in rows})


def test_sample_parallel_without_shared_ids_is_a_data_error():
    per_lang = {
        "en": [Record("a", "en", ("x",), 0)],
        "fr": [Record("b", "fr", ("y",), 1)],
    }
    with pytest.raises(DataError, match="no item id is shared by all of"):
        sample_parallel(per_lang, 1, seed=0, where="task t, split train")


def test_global_index_is_position_and_stable_across_instances(small_pawsx):
    other = small_pawsx_datamodule()
    for split in ("train", "test"):
        a, b = small_pawsx.dataset(split).examples, other.dataset(split).examples
        assert [e.index for e in a] == list(range(len(a)))
        assert [(e.index, e.lang, e.record, e.input_ids) for e in a] == [
            (e.index, e.lang, e.record, e.input_ids) for e in b
        ]
        # the language index follows the run's language order
        assert [small_pawsx.languages[e.lang] for e in a] == [e.record.lang for e in a]
        # what the eval loader reports as "indices" is that position, with that example's fields
        seen = []
        for batch in small_pawsx.eval_dataloader(split):
            for i, lang, label in zip(
                batch["indices"].tolist(), batch["langs"].tolist(), batch["labels"].tolist()
            ):
                assert (a[i].lang, a[i].record.label) == (lang, label)
                seen.append(i)
        assert sorted(seen) == list(range(len(a)))  # every example once (read shortest first)


def marc_rows(lang: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{lang}{seed}")
    return [
        {
            "review_id": f"{lang}_{i:04d}",
            "stars": rng.choice([1, 2, 4, 5]),
            "review_body": f"{lang} review {i}",
        }
        for i in range(n)
    ]


def test_independent_sampling_per_language(tmp_path):
    for lang in ("en", "de", "fr"):
        path = tmp_path / "marc" / "train" / f"{lang}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in marc_rows(lang, 50, 1)), encoding="utf-8")

    def load(languages, seed):
        dm = MARCDataModule(
            languages=languages,
            data_dir=str(tmp_path),
            train_per_language=12,
            seed=seed,
            backbone="tiny-random",
        )
        return ids_by_language(dm.load_records("train"))

    three = load(["en", "de", "fr"], seed=0)
    for lang, ids in three.items():
        assert len(ids) == 12 == len(set(ids))
        assert all(i.startswith(f"{lang}_") for i in ids)
        assert ids == sorted(ids)  # the file's order is kept
    # positions differ between languages (independent draws, not one shared draw)
    assert len({tuple(i[3:] for i in ids) for ids in three.values()}) == 3
    assert load(["en", "de", "fr"], seed=0) == three
    assert load(["de"], seed=0)["de"] == three["de"]  # a language's sample ignores the others
    assert set(load(["en", "de", "fr"], seed=1)["en"]) != set(three["en"])


def test_sample_independent_matches_reference():
    rng = random.Random(0)
    per_lang = {
        lang: [Record(f"{lang}{i}", lang, ("t",), rng.randint(0, 1)) for i in range(rng.randint(5, 40))]
        for lang in ("zh", "en", "es")
    }
    for n in (None, 3, 30, 100):
        out = sample_independent(per_lang, n, seed=7)
        for lang, rows in per_lang.items():
            want = len(rows) if n is None else min(n, len(rows))
            assert len(out[lang]) == want
            positions = [rows.index(r) for r in out[lang]]
            assert positions == sorted(set(positions))  # distinct, in file order

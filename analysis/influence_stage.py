"""The influence stage: gradient sketches → TracIn rankings → language contributions, per condition.

Reads ``sketches/epoch=<E>/<mask>/<split>.npy`` (+ ``.json`` sidecar) as fixed by the file contracts,
and writes ``influence/<condition>/topk.npz``, ``contributions.csv`` and ``meta.json``. A condition
pairs each test language with a mask (``analysis.masks.condition_masks``); its test examples are
ranked against the training sketches taken under the *same* mask at the same checkpoint.

The stage is resumable: a condition whose ``topk.npz`` was computed from the same inputs (sidecar
contents, array sizes) with the same ranking options is not recomputed, and its contributions are
only recomputed when the bootstrap options change. Outputs are written to temporary names and
renamed, so an interrupted run never leaves a file a later stage would trust.

Also here: ``explain`` (a test example's most influential training examples) and
``compare_rankings`` (fidelity of approximate rankings against exact ones).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import stats

from .atomic import write_json_atomic as _write_json
from .bootstrap import bootstrap_group_means, paired_difference
from .contributions import (
    SIGNS,
    ContributionTable,
    common_correct,
    language_codes,
    language_shares,
    positions_of,
    train_language_lookup,
)
from .masks import MaskError, condition_masks, name_seed
from .tracin import NORMALIZATIONS, stream_top_k

log = logging.getLogger(__name__)

TOPK_FORMAT = 1
_EPOCH_DIR = re.compile(r"^epoch=(\d+)$")
_SIDECAR_LISTS = ("indices", "ids", "langs", "labels", "correct")


class InfluenceError(ValueError):
    """An input file the influence stage cannot use; the message names the file and key."""


class MissingInputs(InfluenceError):
    """Files a condition needs that do not exist (yet): the sketch stage has not produced them."""

    def __init__(self, condition: str, paths: list[Path]):
        self.condition = condition
        self.paths = paths
        shown = ", ".join(str(p) for p in paths[:6]) + (
            f" (+{len(paths) - 6} more)" if len(paths) > 6 else ""
        )
        super().__init__(f"condition {condition!r}: missing input(s): {shown}")


@dataclass
class InfluenceOptions:
    """Options of the influence and report stages.

    Args:
        m: training examples kept per test example and sign (the paper's top-m, m=100).
        normalization: ``cosine`` (both gradients unit norm per checkpoint), ``train-norm`` (training
            gradient only) or ``dot`` (plain TracIn).
        lr_weights: per-checkpoint weights of the summed score (e.g. the learning rate at each epoch), in
            epoch order; None weighs every checkpoint 1.
        epochs: checkpoints to sum over; None uses every ``sketches/epoch=<E>`` directory.
        train_per_language: rank only this many training examples per language (the same items in
            every language of a parallel task; seeded from item ids, see ``callbacks.sketch_stage.train_pool``),
            so that a study on a small machine sketches fewer rows; None ranks the whole training split.
        per_checkpoint: also rank by each checkpoint alone (needed by the dynamics figures and Fig 7).
        precision: float64 (exact to rounding; the default) or float32 (~1e-6 relative error; faster only at
            large d: measured 1.4-3x at d=4096, no gain at d=256, benchmarks/ranking_time.py).
        memory_mb: working-set budget of the streaming ranking when block sizes are not given.
        train_block: training rows per block (None: planned from memory_mb).
        test_block: test rows per block (None: planned from memory_mb).
        bootstrap_resamples: bootstrap resamples for every confidence interval.
        ci_level: confidence level of the intervals.
        seed: base seed of the bootstrap (combined with names, so each table has its own stream).
        focus_language: test language of the random/suboptimal-mask figure (paper Fig 3: German).
        explain_per_language: drill-down examples per test language in the report.
        explain_top: training examples shown per sign in a drill-down.
        texts: optional JSON file ``{"train": {"<index>": text}, "test": {...}}`` for drill-downs.
        exact_run: optional run directory ranked from exact gradients, for the fidelity table.
        run_kind: which training produced the run (labels the paper's figure numbers); ``auto``
            guesses from the run directory's name (``sft``/``random``).
        strict: raise on a condition with missing sketches instead of skipping it.
        wandb: log the report to the active W&B run, if there is one.
    """

    m: int = 100
    normalization: Literal["cosine", "train-norm", "dot"] = "cosine"
    lr_weights: list[float] | None = None
    epochs: list[int] | None = None
    train_per_language: int | None = None
    per_checkpoint: bool = True
    precision: Literal["float64", "float32"] = "float64"
    memory_mb: float = 1024.0
    train_block: int | None = None
    test_block: int | None = None
    bootstrap_resamples: int = 1000
    ci_level: float = 0.95
    seed: int = 0
    focus_language: str = "de"
    explain_per_language: int = 2
    explain_top: int = 3
    texts: str | None = None
    exact_run: str | None = None
    run_kind: Literal["auto", "full", "sft", "sft-random"] = "auto"
    strict: bool = False
    wandb: bool = True

    def ranking_fields(self) -> dict:
        """The options a ranking depends on (block sizes do not change an exact result)."""
        return {
            "m": self.m,
            "normalization": self.normalization,
            "lr_weights": self.lr_weights,
            "per_checkpoint": self.per_checkpoint,
            "precision": self.precision,
        }

    def check(self) -> None:
        if self.m < 1:
            raise InfluenceError(f"options: m must be at least 1, found {self.m}")
        if self.train_per_language is not None and self.train_per_language < 1:
            raise InfluenceError(
                f"options: train_per_language must be at least 1 (or null: all), found {self.train_per_language}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise InfluenceError(
                f"options: normalization must be one of {NORMALIZATIONS}, found {self.normalization!r}"
            )
        if self.bootstrap_resamples < 1:
            raise InfluenceError(
                f"options: bootstrap_resamples must be at least 1, found {self.bootstrap_resamples}"
            )
        if not 0 < self.ci_level < 1:
            raise InfluenceError(f"options: ci_level must be in (0, 1), found {self.ci_level}")


# ----------------------------------------------------------------------------------------- sketches


@dataclass
class Sketch:
    """One sketch file pair: the (N, d) float32 memory map and its validated sidecar."""

    npy: Path
    sidecar: Path
    meta: dict
    data: np.ndarray

    @property
    def indices(self) -> np.ndarray:
        return np.asarray(self.meta["indices"], dtype=np.int64)

    @property
    def langs(self) -> np.ndarray:
        return np.asarray(self.meta["langs"], dtype=str)


def sketch_paths(run_dir: Path, epoch: int, mask: str, split: str) -> tuple[Path, Path]:
    base = Path(run_dir) / "sketches" / f"epoch={epoch}" / mask
    return base / f"{split}.npy", base / f"{split}.json"


def read_sketch(run_dir: Path, epoch: int, mask: str, split: str) -> Sketch:
    """Open one sketch (memory-mapped) and check it against the contract; errors name file and key."""
    npy, sidecar = sketch_paths(run_dir, epoch, mask, split)
    for path in (npy, sidecar):
        if not path.is_file():
            raise MissingInputs(f"{mask}/{split}", [path])
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InfluenceError(f"{sidecar}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(meta, dict):
        raise InfluenceError(f"{sidecar}: expected a JSON object, found {type(meta).__name__}")
    for key in ("n", "d", *_SIDECAR_LISTS):
        if key not in meta:
            raise InfluenceError(f"{sidecar}: missing key {key!r}")
    n, d = meta["n"], meta["d"]
    if not isinstance(n, int) or not isinstance(d, int) or n < 0 or d < 1:
        raise InfluenceError(
            f"{sidecar}: keys 'n' and 'd' must be non-negative integers, found n={n!r}, d={d!r}"
        )
    for key in _SIDECAR_LISTS:
        if not isinstance(meta[key], list) or len(meta[key]) != n:
            found = len(meta[key]) if isinstance(meta[key], list) else type(meta[key]).__name__
            raise InfluenceError(f"{sidecar}: key {key!r} must be a list of n={n} values, found {found}")
    for key, expected in (("split", split), ("mask", mask), ("epoch", epoch)):
        if key in meta and meta[key] != expected:
            raise InfluenceError(
                f"{sidecar}: key {key!r} is {meta[key]!r}, expected {expected!r} (from its path)"
            )
    if meta.get("dtype", "float32") != "float32":
        raise InfluenceError(f"{sidecar}: key 'dtype' must be 'float32', found {meta['dtype']!r}")
    indices = np.asarray(meta["indices"])
    if n and (indices.dtype.kind not in "iu" or np.any(np.diff(indices) <= 0)):
        raise InfluenceError(f"{sidecar}: key 'indices' must be strictly ascending integers")
    try:
        data = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise InfluenceError(f"{npy}: not a readable .npy array ({err})") from None
    if data.shape != (n, d) or data.dtype != np.float32:
        raise InfluenceError(
            f"{npy}: expected float32 array of shape ({n}, {d}) (from {sidecar.name}), found {data.dtype} {data.shape}"
        )
    return Sketch(npy, sidecar, meta, data)


def list_epochs(run_dir: Path) -> list[int]:
    """Epochs with a ``sketches/epoch=<E>`` directory, ascending."""
    root = Path(run_dir) / "sketches"
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _EPOCH_DIR.match(p.name)))


def run_languages(run_dir: Path, epochs: list[int]) -> list[str]:
    """The run's language order, from the first sketch sidecar found."""
    for epoch in epochs:
        for sidecar in sorted((Path(run_dir) / "sketches" / f"epoch={epoch}").glob("*/*.json")):
            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise InfluenceError(f"{sidecar}: not valid JSON ({err.msg}, line {err.lineno})") from None
            langs = meta.get("languages") if isinstance(meta, dict) else None
            if not isinstance(langs, list) or not langs or not all(isinstance(x, str) for x in langs):
                raise InfluenceError(f"{sidecar}: key 'languages' must be a non-empty list of language codes")
            return langs
    raise MissingInputs("*", [Path(run_dir) / "sketches" / "epoch=<E>" / "<mask>" / "<split>.json"])


class _RowView:
    """Rows of a (memory-mapped) array, selected lazily so a test chunk is read only when ranked."""

    def __init__(self, base: np.ndarray, rows: np.ndarray):
        self.base, self.rows = base, rows
        self.shape = (rows.size, base.shape[1])
        self.ndim = 2

    def __getitem__(self, item: slice) -> np.ndarray:
        return np.asarray(self.base[self.rows[item]])


# ------------------------------------------------------------------------------------------ topk files


@dataclass
class TopKFile:
    """The content of ``influence/<condition>/topk.npz`` (contract arrays plus the metadata the report needs).

    Attributes:
        meta: condition, languages, epochs, options, masks, projection, inputs_key.
        arrays: name → array (test_indices, test_langs, pos_idx, pos_score, neg_idx, neg_score, epochs,
            pos_idx_by_epoch, ..., test_correct, test_correct_by_epoch, train_indices, train_langs, ...).
    """

    meta: dict
    arrays: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def languages(self) -> list[str]:
        return list(self.meta["languages"])

    @property
    def epochs(self) -> list[int]:
        return [int(e) for e in self.arrays["epochs"]]

    def test_codes(self) -> np.ndarray:
        return language_codes(self.arrays["test_langs"], self.languages, "test languages")

    def lookup(self) -> np.ndarray:
        return train_language_lookup(self.arrays["train_indices"], self.arrays["train_langs"], self.languages)

    def top_idx(self, sign: str, epoch_pos: int | None = None) -> np.ndarray:
        if sign not in SIGNS:
            raise ValueError(f"sign must be one of {SIGNS}, found {sign!r}")
        if epoch_pos is None:
            return self.arrays[f"{sign}_idx"]
        return self.arrays[f"{sign}_idx_by_epoch"][epoch_pos]

    def shares(self, sign: str, rows: np.ndarray | None = None, epoch_pos: int | None = None) -> np.ndarray:
        """(n, L) % of each training language in the top-m of each selected test row."""
        idx = self.top_idx(sign, epoch_pos)
        if rows is not None:
            idx = idx[rows]
        return language_shares(idx, self.lookup(), len(self.languages))


def save_topk(path: Path, top: TopKFile) -> Path:
    """Write a topk.npz atomically (plain arrays only: readable with allow_pickle=False)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(top.meta)), **top.arrays)
    os.replace(tmp, path)
    return path


def load_topk(path: str | Path) -> TopKFile:
    """Read a topk.npz written by ``save_topk``."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputs("topk", [path])
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError) as err:
        raise InfluenceError(f"{path}: not a readable .npz file ({err})") from None
    required = (
        "meta",
        "test_indices",
        "test_langs",
        "pos_idx",
        "pos_score",
        "neg_idx",
        "neg_score",
        "epochs",
        "train_indices",
        "train_langs",
        "test_correct",
    )
    for key in required:
        if key not in arrays:
            raise InfluenceError(f"{path}: missing array {key!r} (expected a crossling topk.npz)")
    meta = json.loads(str(arrays.pop("meta")))
    return TopKFile(meta, arrays)


def topk_path(run_dir: Path, condition: str) -> Path:
    return Path(run_dir) / "influence" / condition / "topk.npz"


# ------------------------------------------------------------------------------------------- ranking


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Plan:
    condition: str
    epochs: list[int]
    languages: list[str]
    masks: dict[str, str]  # test language → mask
    groups: dict[str, list[str]]  # mask → test languages
    sketches: dict[tuple[int, str, str], Sketch] = field(default_factory=dict)
    inputs_key: str = ""


def plan_condition(run_dir: Path, condition: str, options: InfluenceOptions) -> _Plan:
    """Find and validate every sketch a condition needs; raise MissingInputs listing all that are absent."""
    run_dir = Path(run_dir)
    epochs = sorted(options.epochs) if options.epochs else list_epochs(run_dir)
    if not epochs:
        raise MissingInputs(condition, [run_dir / "sketches" / "epoch=<E>"])
    languages = run_languages(run_dir, epochs)
    try:
        masks = condition_masks(condition, languages)
    except MaskError as err:
        raise InfluenceError(str(err)) from None
    if not masks:
        raise InfluenceError(
            f"condition {condition!r} pairs no test language of this run ({languages}) with a mask"
        )
    groups: dict[str, list[str]] = {}
    for lang, mask in masks.items():
        groups.setdefault(mask, []).append(lang)
    plan = _Plan(condition, epochs, languages, masks, groups)
    missing = []
    for epoch in epochs:
        for mask in groups:
            for split in ("test", "train"):
                missing += [p for p in sketch_paths(run_dir, epoch, mask, split) if not p.is_file()]
    if missing:
        raise MissingInputs(condition, missing)
    digest = []
    for epoch in epochs:
        for mask in groups:
            for split in ("test", "train"):
                sk = read_sketch(run_dir, epoch, mask, split)
                if sk.meta.get("languages", languages) != languages:
                    raise InfluenceError(
                        f"{sk.sidecar}: key 'languages' is {sk.meta['languages']}, other sketches have {languages}"
                    )
                plan.sketches[(epoch, mask, split)] = sk
                digest.append(
                    [
                        str(sk.sidecar.relative_to(run_dir)),
                        _sha(sk.sidecar.read_bytes()),
                        sk.npy.stat().st_size,
                    ]
                )
    _check_compatible(plan)
    key = {
        "format": TOPK_FORMAT,
        "condition": condition,
        "epochs": epochs,
        "options": options.ranking_fields(),
        "files": digest,
    }
    plan.inputs_key = _sha(json.dumps(key, sort_keys=True).encode())
    return plan


def _check_compatible(plan: _Plan) -> None:
    """Test and train sketches must come from the same model and the same projection to be comparable."""
    first = None
    for sk in plan.sketches.values():
        proj = sk.meta.get("projection")
        if first is None:
            first = (sk, proj, sk.meta["d"])
            continue
        ref, ref_proj, ref_d = first
        if sk.meta["d"] != ref_d:
            raise InfluenceError(f"{sk.sidecar}: key 'd' is {sk.meta['d']}, but {ref.sidecar} has {ref_d}")
        if proj != ref_proj:
            raise InfluenceError(
                f"{sk.sidecar}: key 'projection' differs from {ref.sidecar} ({proj} vs {ref_proj}); "
                "train and test sketches of every checkpoint must use the same random projection"
            )
    for epoch in plan.epochs:
        for mask in plan.groups:
            test, train = plan.sketches[(epoch, mask, "test")], plan.sketches[(epoch, mask, "train")]
            for key in ("model_fingerprint", "layers"):
                if key in test.meta and key in train.meta and test.meta[key] != train.meta[key]:
                    raise InfluenceError(
                        f"{test.sidecar}: key {key!r} differs from {train.sidecar}; both must come from the same checkpoint"
                    )


def rank_condition(run_dir: Path, plan: _Plan, options: InfluenceOptions) -> TopKFile:
    """Rank every test example of a condition against the training sketches of its mask."""
    dtype = np.float64 if options.precision == "float64" else np.float32
    parts = []
    final = plan.epochs[-1]
    for mask, langs in plan.groups.items():
        tests = [plan.sketches[(e, mask, "test")] for e in plan.epochs]
        trains = [plan.sketches[(e, mask, "train")] for e in plan.epochs]
        rows_by_epoch = [np.flatnonzero(np.isin(t.langs, langs)) for t in tests]
        test_idx = tests[0].indices[rows_by_epoch[0]]
        if test_idx.size == 0:
            raise InfluenceError(
                f"{tests[0].sidecar}: holds no test examples of language(s) {langs} (condition {plan.condition!r})"
            )
        for t, rows in zip(tests[1:], rows_by_epoch[1:]):
            if not np.array_equal(t.indices[rows], test_idx):
                raise InfluenceError(
                    f"{t.sidecar}: key 'indices' selects other test examples than {tests[0].sidecar}"
                )
        train_idx = trains[0].indices
        for r in trains[1:]:
            if not np.array_equal(r.indices, train_idx):
                raise InfluenceError(f"{r.sidecar}: key 'indices' differs from {trains[0].sidecar}")
        log.info(
            "ranking %s: mask %s, %d test x %d train x %d checkpoints",
            plan.condition,
            mask,
            test_idx.size,
            train_idx.size,
            len(plan.epochs),
        )
        try:
            ranked = stream_top_k(
                [_RowView(t.data, rows) for t, rows in zip(tests, rows_by_epoch)],
                [r.data for r in trains],
                m=options.m,
                normalization=options.normalization,
                lr_weights=options.lr_weights,
                per_checkpoint=options.per_checkpoint,
                train_block=options.train_block,
                test_block=options.test_block,
                memory_mb=options.memory_mb,
                dtype=dtype,
            )
        except ValueError as err:
            files = ", ".join(str(s.npy) for s in tests + trains)
            raise InfluenceError(
                f"condition {plan.condition!r}, mask {mask!r}: {err}; inputs: {files}"
            ) from None
        final_test = plan.sketches[(final, mask, "test")]
        rows_final = rows_by_epoch[-1]
        fm = final_test.meta
        part = {
            "test_indices": test_idx,
            "test_langs": final_test.langs[rows_final],
            "test_ids": np.asarray(fm["ids"], dtype=str)[rows_final],
            "test_labels": np.asarray(fm["labels"], dtype=np.int64)[rows_final],
            "test_pred": np.asarray(fm.get("pred", [-1] * fm["n"]), dtype=np.int64)[rows_final],
            "test_masks": np.full(test_idx.size, mask),
            "test_correct": np.asarray(fm["correct"], dtype=bool)[rows_final],
            "test_correct_by_epoch": np.stack(
                [np.asarray(t.meta["correct"], dtype=bool)[rows] for t, rows in zip(tests, rows_by_epoch)]
            ),
            "pos_idx": train_idx[ranked.pos.idx],
            "pos_score": ranked.pos.score,
            "neg_idx": train_idx[ranked.neg.idx],
            "neg_score": ranked.neg.score,
        }
        m_eff = ranked.pos.idx.shape[1]
        for sign, tops in (("pos", ranked.pos_by_ckpt), ("neg", ranked.neg_by_ckpt)):
            if tops:
                part[f"{sign}_idx_by_epoch"] = np.stack([train_idx[t.idx] for t in tops])
                part[f"{sign}_score_by_epoch"] = np.stack([t.score for t in tops])
            else:
                part[f"{sign}_idx_by_epoch"] = np.zeros((0, test_idx.size, m_eff), np.int64)
                part[f"{sign}_score_by_epoch"] = np.zeros((0, test_idx.size, m_eff))
        parts.append(part)
    arrays = {}
    for key in parts[0]:
        axis = 1 if key.endswith("_by_epoch") else 0
        arrays[key] = np.concatenate([p[key] for p in parts], axis=axis)
    order = np.argsort(arrays["test_indices"], kind="stable")
    for key in list(arrays):
        arrays[key] = np.take(arrays[key], order, axis=1 if key.endswith("_by_epoch") else 0)
    arrays.update(_train_metadata(plan))
    arrays["epochs"] = np.asarray(plan.epochs, dtype=np.int64)
    any_sketch = next(iter(plan.sketches.values()))
    meta = {
        "format": TOPK_FORMAT,
        "condition": plan.condition,
        "languages": plan.languages,
        "epochs": plan.epochs,
        "masks": plan.masks,
        "options": options.ranking_fields(),
        "m": int(arrays["pos_idx"].shape[1]),
        "d": any_sketch.meta["d"],
        "projection": any_sketch.meta.get("projection"),
        "inputs_key": plan.inputs_key,
    }
    return TopKFile(meta, arrays)


def _train_metadata(plan: _Plan) -> dict[str, np.ndarray]:
    """Union of the training examples over the condition's masks (final epoch), checked for agreement."""
    final = plan.epochs[-1]
    by_index: dict[int, tuple[str, str, int]] = {}
    for mask in plan.groups:
        sk = plan.sketches[(final, mask, "train")]
        for i, lang, id_, label in zip(
            sk.meta["indices"], sk.meta["langs"], sk.meta["ids"], sk.meta["labels"]
        ):
            row = (str(lang), str(id_), int(label))
            if by_index.setdefault(int(i), row) != row:
                raise InfluenceError(
                    f"{sk.sidecar}: training example {i} is {row}, another mask's sketch says {by_index[int(i)]}"
                )
    keys = sorted(by_index)
    return {
        "train_indices": np.asarray(keys, dtype=np.int64),
        "train_langs": np.asarray([by_index[k][0] for k in keys], dtype=str),
        "train_ids": np.asarray([by_index[k][1] for k in keys], dtype=str),
        "train_labels": np.asarray([by_index[k][2] for k in keys], dtype=np.int64),
    }


# ------------------------------------------------------------------------------------- contributions


def condition_table(
    top: TopKFile,
    test_indices: np.ndarray,
    options: InfluenceOptions,
    label: str,
    epoch_pos: int | None = None,
) -> ContributionTable:
    """Contribution matrices (pos and neg) with stratified bootstrap CIs over the given test examples.

    ``label`` names the bootstrap's random stream (with ``options.seed``): pass condition names, not
    paths, so that the intervals do not change when a run directory is moved or renamed.
    """
    rows = positions_of(top["test_indices"], np.asarray(test_indices, dtype=np.int64))
    codes = top.test_codes()[rows]
    n_lang = len(top.languages)
    percent, low, high = {}, {}, {}
    for sign in SIGNS:
        shares = top.shares(sign, rows, epoch_pos)
        seed = name_seed("bootstrap", options.seed, label, sign, epoch_pos)
        percent[sign], low[sign], high[sign] = bootstrap_group_means(
            shares, codes, n_lang, options.bootstrap_resamples, seed, options.ci_level
        )
    return ContributionTable(top.languages, percent, low, high, np.bincount(codes, minlength=n_lang))


def difference_table(
    top_a: TopKFile, top_b: TopKFile, test_indices: np.ndarray, options: InfluenceOptions, label: str
) -> ContributionTable:
    """a − b per cell, paired over the same test examples (matched by test dataset index)."""
    if top_a.languages != top_b.languages:
        raise InfluenceError(
            f"cannot compare rankings over different language orders: {top_a.languages} vs {top_b.languages}"
        )
    wanted = np.asarray(test_indices, dtype=np.int64)
    rows_a = positions_of(top_a["test_indices"], wanted)
    rows_b = positions_of(top_b["test_indices"], wanted)
    codes = top_a.test_codes()[rows_a]
    if not np.array_equal(codes, top_b.test_codes()[rows_b]):
        raise InfluenceError(
            "the two rankings give the same test index different languages: are they from the same test split?"
        )
    n_lang = len(top_a.languages)
    percent, low, high = {}, {}, {}
    for sign in SIGNS:
        seed = name_seed("bootstrap-diff", options.seed, label, sign)
        percent[sign], low[sign], high[sign] = paired_difference(
            top_a.shares(sign, rows_a),
            top_b.shares(sign, rows_b),
            codes,
            n_lang,
            options.bootstrap_resamples,
            seed,
            options.ci_level,
        )
    return ContributionTable(top_a.languages, percent, low, high, np.bincount(codes, minlength=n_lang))


def check_same_test_split(top_a: TopKFile, top_b: TopKFile, where_a: str, where_b: str) -> None:
    """Test dataset indices shared by two rankings must name the same items (same ids)."""
    common, ia, ib = np.intersect1d(top_a["test_indices"], top_b["test_indices"], return_indices=True)
    if "test_ids" in top_a.arrays and "test_ids" in top_b.arrays and common.size:
        bad = np.flatnonzero(top_a["test_ids"][ia] != top_b["test_ids"][ib])
        if bad.size:
            i = int(common[bad[0]])
            raise InfluenceError(
                f"{where_a} and {where_b}: test index {i} is item {top_a['test_ids'][ia[bad[0]]]!r} in one and "
                f"{top_b['test_ids'][ib[bad[0]]]!r} in the other; they were not computed on the same test split"
            )


def kept_indices(tops: list[TopKFile]) -> np.ndarray:
    """Test examples present in, and classified correctly by, every ranking (the paper's filter)."""
    return common_correct([(t["test_indices"], t["test_correct"]) for t in tops])


# -------------------------------------------------------------------------------------------- stage


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
        ref_path = topk_path(Path(compare_to), "full")
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
        out = run_dir / "influence" / condition
        try:
            plan = plan_condition(run_dir, condition, options)
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
            top = rank_condition(run_dir, plan, options)
            save_topk(path, top)
            meta = {"inputs_key": plan.inputs_key, "condition": condition}
            _write_json(out / "meta.json", meta)
        else:
            log.info("%s: rankings up to date", out)
        top = load_topk(path)
        ckey = _sha(
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
            check_same_test_split(top, reference, str(path), str(topk_path(Path(compare_to), "full")))
            kept = kept_indices([top, reference])
            difference_table(top, reference, kept, options, f"{condition}-full").write_csv(
                out / f"vs-full@{Path(compare_to).name}.csv"
            )
        done[condition] = out
    return done


# ------------------------------------------------------------------------------------------ drill-down


@dataclass
class InfluentialExample:
    """One training example in a test example's top-m."""

    rank: int
    train_index: int
    lang: str
    label: int
    score: float
    id: str = ""
    text: str | None = None


@dataclass
class Explanation:
    """A test example and its most positively and most negatively influential training examples."""

    condition: str
    test_index: int
    test_lang: str
    test_label: int
    test_pred: int
    correct: bool
    mask: str
    test_text: str | None
    positive: list[InfluentialExample]
    negative: list[InfluentialExample]

    def as_dict(self) -> dict:
        return asdict(self)


def explain(
    run_dir: Path,
    condition: str,
    test_index: int,
    texts_by_index: Mapping[str, Mapping[int, str]] | None = None,
    top: int = 5,
    rankings: TopKFile | None = None,
) -> Explanation:
    """The ``top`` most positive and negative training examples of one test example (by test dataset index).

    Args:
        run_dir: the run directory holding ``influence/<condition>/topk.npz``.
        condition: the condition whose ranking to read.
        test_index: the test example's index in the test split.
        texts_by_index: optional ``{"train": {index: text}, "test": {index: text}}`` from the caller
            (the rankings store ids, not text).
        top: examples per sign.
        rankings: an already loaded ranking (skips reading the file).
    """
    top_file = rankings or load_topk(topk_path(Path(run_dir), condition))
    where = np.flatnonzero(top_file["test_indices"] == int(test_index))
    if where.size == 0:
        raise InfluenceError(
            f"{topk_path(Path(run_dir), condition)}: test index {test_index} was not ranked under {condition!r}"
        )
    row = int(where[0])
    texts = texts_by_index or {}
    train_texts, test_texts = texts.get("train", {}), texts.get("test", {})
    train_pos = {int(i): k for k, i in enumerate(top_file["train_indices"])}

    def rows(sign: str) -> list[InfluentialExample]:
        out = []
        for rank, (i, s) in enumerate(
            zip(top_file[f"{sign}_idx"][row][:top], top_file[f"{sign}_score"][row][:top]), 1
        ):
            k = train_pos[int(i)]
            out.append(
                InfluentialExample(
                    rank,
                    int(i),
                    str(top_file["train_langs"][k]),
                    int(top_file["train_labels"][k]) if "train_labels" in top_file.arrays else -1,
                    float(s),
                    str(top_file["train_ids"][k]) if "train_ids" in top_file.arrays else "",
                    _text(train_texts, int(i)),
                )
            )
        return out

    arr = top_file.arrays
    return Explanation(
        condition,
        int(test_index),
        str(arr["test_langs"][row]),
        int(arr["test_labels"][row]) if "test_labels" in arr else -1,
        int(arr["test_pred"][row]) if "test_pred" in arr else -1,
        bool(arr["test_correct"][row]),
        str(arr["test_masks"][row]) if "test_masks" in arr else "",
        _text(test_texts, int(test_index)),
        rows("pos"),
        rows("neg"),
    )


def _text(texts: Mapping, index: int) -> str | None:
    if index in texts:
        return texts[index]
    return texts.get(str(index))


# -------------------------------------------------------------------------------------------- fidelity


@dataclass
class Fidelity:
    """How well approximate rankings (e.g. d=256 sketches) reproduce exact ones.

    Attributes:
        n_test: test examples ranked by both.
        m: ranking depth compared (the smaller of the two).
        recall_pos: mean over test examples of |approx top-m ∩ exact top-m| / m, most positive.
        recall_neg: the same for the most negative.
        spearman: mean over test examples of the Spearman correlation between approximate and exact
            scores of the training examples both rankings list (positive and negative sets together).
        max_contribution_diff_pp: largest |approx − exact| over cells and signs of the language-contribution
            matrices, in percentage points.
    """

    n_test: int
    m: int
    recall_pos: float
    recall_neg: float
    spearman: float
    max_contribution_diff_pp: float

    def as_dict(self) -> dict:
        return asdict(self)


def compare_rankings(approx_topk: TopKFile | str | Path, exact_topk: TopKFile | str | Path) -> Fidelity:
    """Recall@m of the top-m sets, Spearman of scores, and the largest change in contributions (pp)."""
    approx = approx_topk if isinstance(approx_topk, TopKFile) else load_topk(approx_topk)
    exact = exact_topk if isinstance(exact_topk, TopKFile) else load_topk(exact_topk)
    common, ia, ie = np.intersect1d(approx["test_indices"], exact["test_indices"], return_indices=True)
    if common.size == 0:
        raise InfluenceError("compare_rankings: the two rankings share no test example")
    m = min(approx["pos_idx"].shape[1], exact["pos_idx"].shape[1])
    recalls = {}
    for sign in SIGNS:
        a, e = approx[f"{sign}_idx"][ia, :m], exact[f"{sign}_idx"][ie, :m]
        recalls[sign] = float(np.mean([np.intersect1d(x, y).size / m for x, y in zip(a, e)]))
    rhos = []
    for ra, re_ in zip(ia, ie):
        sa = dict(
            zip(
                np.concatenate([approx["pos_idx"][ra], approx["neg_idx"][ra]]).tolist(),
                np.concatenate([approx["pos_score"][ra], approx["neg_score"][ra]]).tolist(),
            )
        )
        se = dict(
            zip(
                np.concatenate([exact["pos_idx"][re_], exact["neg_idx"][re_]]).tolist(),
                np.concatenate([exact["pos_score"][re_], exact["neg_score"][re_]]).tolist(),
            )
        )
        both = sorted(set(sa) & set(se))
        if len(both) >= 3:
            x, y = [sa[k] for k in both], [se[k] for k in both]
            if np.ptp(x) > 0 and np.ptp(y) > 0:
                rhos.append(stats.spearmanr(x, y).statistic)
    diff = 0.0
    n_lang = len(approx.languages)
    codes_a = approx.test_codes()[ia]
    for sign in SIGNS:
        mat_a = _mean_rows(approx.shares(sign, ia), codes_a, n_lang)
        mat_e = _mean_rows(exact.shares(sign, ie), exact.test_codes()[ie], n_lang)
        d = np.abs(mat_a - mat_e)
        if np.isfinite(d).any():
            diff = max(diff, float(np.nanmax(d)))
    return Fidelity(
        int(common.size),
        int(m),
        recalls["pos"],
        recalls["neg"],
        float(np.mean(rhos)) if rhos else float("nan"),
        diff,
    )


def _mean_rows(shares: np.ndarray, codes: np.ndarray, n: int) -> np.ndarray:
    from .contributions import mean_matrix

    return mean_matrix(shares, codes, n)[0]

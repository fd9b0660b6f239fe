"""The sketch stage: for every checkpoint × needed mask × split, the gradient sketch of every
example (``sketches/epoch=<E>/<mask>/<split>.npy`` + ``.json``), run through ``Trainer.predict``
so that ``--trainer.strategy ddp --trainer.devices N`` shards it; plus ``SketchCallback``, which
writes the ``full``-mask sketches at the end of each training epoch without reloading weights.

Which masks: training examples are sketched once under every mask any requested condition
uses; test examples of language L under ``condition_masks(C, languages)[L]`` for each condition
C. A test pass gives each example its own language's mask (per-example B×L×H gates), so one pass
over the test set serves every language; rounds of passes cover languages needing several masks.

The Trainer: any Lightning Trainer with ``use_distributed_sampler=False`` (``CrosslingTrainer``
sets it: the datamodule shards by rank itself) and no ``limit_predict_batches``. DDP is
``strategy="ddp", devices=N`` (on CPU with ``accelerator="cpu"``: gloo). ``inference_mode=False``
saves a copy of each batch but is not required (the sketching step leaves inference mode). A
``SketchWriter`` is added to ``trainer.callbacks`` when there is none; a logger is not needed.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from analysis.masks import MaskError, condition_masks, load_subnetwork, name_seed, resolve_mask
from analysis.sketch_store import FORMAT, sketch_paths

from .checkpoints import CheckpointError, fingerprint, list_checkpoints, load_weights
from .sketch_writer import (
    JobWriter,
    SketchJob,
    SketchTarget,
    SketchWriter,
    rank_share,
    to_numpy_rows,
    write_shared_target,
)
from .sketching import SketchOptions, get_sketcher, resolve_precision, sketch_batch

log = logging.getLogger(__name__)
SPLITS = ("train", "test")


# -- planning ----------------------------------------------------------------------------------
def plan_masks(conditions: list[str], languages: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(masks for the training set, per test language the masks its conditions pair it with)."""
    if not conditions:
        raise MaskError(
            "no conditions given: expected some of full, own, random<seed>, as-<lang>, union-<a>-<b>"
        )
    per_lang: dict[str, set[str]] = {lang: set() for lang in languages}
    for condition in conditions:
        for lang, mask in condition_masks(condition, languages).items():
            per_lang[lang].add(mask)
    order = _mask_order
    train = sorted({m for masks in per_lang.values() for m in masks}, key=order)
    return train, {lang: sorted(masks, key=order) for lang, masks in per_lang.items() if masks}


def _mask_order(name: str) -> tuple[int, str]:
    return (0 if name == "full" else 1, name)


def equal_mask_aliases(names: list[str], head_masks: dict[str, np.ndarray | None]) -> dict[str, str]:
    """mask name -> the earlier name (in mask order) whose mask is equal as an array, for every mask
    that has one; ``full`` counts as all ones (an all-ones gate is bit-identical to no gate).

    Two languages whose subnetworks coincide, or a union equal to one of its parts, gate the model
    identically, so their sketches are the same numbers: each is computed once and shared.
    """
    aliases: dict[str, str] = {}
    seen: list[tuple[str, np.ndarray | None]] = []
    for name in sorted(names, key=_mask_order):
        mask = head_masks[name]
        for other, other_mask in seen:
            if _same_gating(mask, other_mask):
                aliases[name] = other
                break
        else:
            seen.append((name, mask))
    return aliases


def _same_gating(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        other = b if a is None else a
        return other is None or bool((np.asarray(other) == 1).all())
    return np.array_equal(np.asarray(a), np.asarray(b))


def mask_rounds(test_masks: dict[str, list[str]]) -> list[dict[str, str]]:
    """Passes over the test set, as language -> mask: every mask falls in exactly one pass with all
    the languages paired with it (its file is written once), and no language needs two masks in
    one pass (each example has one mask per pass)."""
    languages_of: dict[str, list[str]] = {}
    for lang, masks in test_masks.items():
        for mask in masks:
            languages_of.setdefault(mask, []).append(lang)
    rounds: list[dict[str, str]] = []
    for mask in sorted(languages_of, key=_mask_order):
        langs = languages_of[mask]
        for assignment in rounds:
            if not any(lang in assignment for lang in langs):
                break
        else:
            assignment = {}
            rounds.append(assignment)
        assignment.update(dict.fromkeys(langs, mask))
    return rounds


def referenced_languages(mask: str, languages: list[str]) -> list[str]:
    """The languages whose subnetwork file a mask name needs."""
    if mask == "full":
        return []
    if mask in languages:
        return [mask]
    if m := re.fullmatch(r"random\d+-(.+)", mask):
        return referenced_languages(m.group(1), languages)
    if m := re.fullmatch(r"(?:union|intersect)-([^-]+)-([^-]+)", mask):
        return [m.group(1), m.group(2)]
    return []


def resolve_head_masks(
    masks: list[str], languages: list[str], shape: tuple[int, int], subnetworks_dir: Path
) -> dict[str, np.ndarray | None]:
    """mask name -> L×H array (None for ``full``: no gating), loading only the files needed."""
    subnetworks = {}
    for mask in masks:
        for lang in referenced_languages(mask, languages):
            if lang not in subnetworks:
                path = subnetworks_dir / f"{lang}.json"
                if not path.is_file():
                    raise MaskError(
                        f"mask {mask!r} needs the subnetwork file {path}, which does not exist "
                        "(run the subnetworks stage first, or drop the conditions that use it)"
                    )
                subnetworks[lang] = load_subnetwork(path, shape)
    return {mask: None if mask == "full" else resolve_mask(mask, subnetworks, shape) for mask in masks}


# -- the predict-time module ---------------------------------------------------------------------
class SketchModule(pl.LightningModule):
    """Wraps the classifier for ``Trainer.predict``: its own dataloader (the datamodule's rank
    share of the split, built once the strategy knows the ranks) and a ``predict_step`` that
    sketches each batch under each example's mask. Batches whose rows are all done already
    (a resumed run) are skipped without computing anything.
    """

    def __init__(
        self,
        classifier: pl.LightningModule,
        datamodule,
        job: SketchJob,
        options: SketchOptions,
        writer: SketchWriter,
    ):
        super().__init__()
        self.classifier = classifier
        self._datamodule, self.job, self.options, self.writer = datamodule, job, options, writer
        self.shares: dict[str, np.ndarray] | None = None
        shape = classifier.gates.shape
        table = np.ones((len(job.languages), *shape), dtype=np.float32)
        for lang, name in job.lang_masks.items():
            if job.head_masks[name] is not None:
                table[lang] = job.head_masks[name]
        self._gated = any(job.head_masks[name] is not None for name in job.lang_masks.values())
        # the examples this pass writes: a training pool leaves out some of every language's
        self._wanted = np.unique(np.concatenate([t.indices for t in job.targets.values()]))
        self.register_buffer("mask_table", torch.as_tensor(table), persistent=False)

    def predict_dataloader(self):
        self._datamodule.trainer = self.trainer  # rank-sliced batches
        loader = self._datamodule.eval_dataloader(self.job.split)
        self.shares = rank_share(loader, self._datamodule.dataset(self.job.split), self.job)
        return loader

    def predict_step(self, batch, batch_idx):
        indices = batch["indices"].cpu().numpy()
        langs = batch["langs"].cpu().numpy()
        keep = np.isin(indices, self._wanted) & np.array([int(lang) in self.job.lang_masks for lang in langs], dtype=bool)
        if not keep.any() or self.writer.is_done(indices[keep], langs[keep]):
            return None
        rows = torch.as_tensor(np.flatnonzero(keep), device=batch["input_ids"].device)
        device_type = batch["input_ids"].device.type
        # Lightning may run predict in inference mode and under autocast: sketches need autograd and set their own precision
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            sub = {
                key: batch[key].index_select(0, rows).clone()
                for key in ("input_ids", "attention_mask", "labels")
            }
            width = int(sub["attention_mask"].sum(1).max())
            sub["input_ids"], sub["attention_mask"] = (
                sub["input_ids"][:, :width],
                sub["attention_mask"][:, :width],
            )
            head_mask = self.mask_table[batch["langs"].index_select(0, rows)].clone() if self._gated else None
            sketches, loss, pred = sketch_batch(
                self.classifier.model, self.classifier.gates, sub, head_mask, self.options
            )
        sketches, loss, pred = to_numpy_rows(sketches, loss, pred)
        return {
            "indices": indices[keep],
            "masks": [self.job.lang_masks[int(lang)] for lang in langs[keep]],
            "sketches": sketches,
            "loss": loss,
            "pred": pred,
        }


# -- the stage -----------------------------------------------------------------------------------
def target_identity(
    split: str,
    mask: str,
    epoch: int,
    options: SketchOptions,
    layers: list[str],
    d: int,
    model_fingerprint: str,
    languages: list[str],
) -> dict:
    return {
        "format": FORMAT,
        "split": split,
        "mask": mask,
        "epoch": int(epoch),
        "d": int(d),
        "dtype": "float32",
        "projection": options.projection_record(),
        "layers": list(layers),
        "model_fingerprint": model_fingerprint,
        "languages": list(languages),
        "attention": options.attention,
        "precision": options.precision,
    }


def train_pool(dataset, per_language: int | None) -> np.ndarray | None:
    """Dataset indices of the training examples to sketch: per language, the ``per_language`` items
    whose ids hash lowest (a seeded draw that needs no RNG state), so a parallel task keeps the same
    items in every language, and a larger pool contains a smaller one. None: every example."""
    if per_language is None:
        return None
    by_lang: dict[int, list[tuple[int, int]]] = {}
    for e in dataset.examples:
        by_lang.setdefault(e.lang, []).append((name_seed("influence-pool", str(e.record.id)), e.index))
    chosen = [index for rows in by_lang.values() for _, index in sorted(rows)[:per_language]]
    return np.sort(np.asarray(chosen, dtype=np.int64))


def split_rows(dataset, pool: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(language codes, dataset indices) of a split's examples, only those in ``pool`` when given."""
    langs = np.array([e.lang for e in dataset.examples], dtype=np.int64)
    indices = np.array([e.index for e in dataset.examples], dtype=np.int64)
    if pool is None:
        return langs, indices
    keep = np.isin(indices, pool)
    return langs[keep], indices[keep]


def make_jobs(
    split: str,
    epoch: int,
    run_dir: Path,
    dataset,
    languages: list[str],
    train_masks: list[str],
    test_masks: dict[str, list[str]],
    head_masks: dict,
    identity,
    pool: np.ndarray | None = None,
) -> list[SketchJob]:
    """The passes over one split: one per mask for train, one per round for test. ``pool``
    restricts the training examples (``train_pool``)."""
    all_langs, all_indices = split_rows(dataset, pool if split == "train" else None)
    if split == "train":
        rounds = [dict.fromkeys(languages, mask) for mask in train_masks]
    else:
        rounds = mask_rounds(test_masks)
    jobs = []
    for assignment in rounds:
        lang_masks = {languages.index(lang): mask for lang, mask in assignment.items()}
        targets = {}
        for mask in sorted(set(lang_masks.values()), key=_mask_order):
            codes = [i for i, m in lang_masks.items() if m == mask]
            indices = np.sort(all_indices[np.isin(all_langs, codes)])
            npy, _ = sketch_paths(run_dir, epoch, mask, split)
            targets[mask] = SketchTarget(npy, identity(split, mask), indices)
        label = f"epoch={epoch} {split} " + ",".join(targets)
        jobs.append(
            SketchJob(
                split,
                epoch,
                targets,
                lang_masks,
                {m: head_masks[m] for m in targets},
                dataset,
                list(languages),
                label,
            )
        )
    return jobs


def find_writer(trainer: pl.Trainer) -> SketchWriter:
    for callback in trainer.callbacks:
        if isinstance(callback, SketchWriter):
            return callback
    writer = SketchWriter()
    trainer.callbacks.append(writer)
    return writer


def check_trainer(trainer: pl.Trainer) -> None:
    connector = getattr(trainer, "_accelerator_connector", None)
    if trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
        raise ValueError(
            "the sketch stage shards data itself: build the Trainer with use_distributed_sampler=False "
            "(CrosslingTrainer does)"
        )
    if trainer.limit_predict_batches not in (1.0, None):
        raise ValueError(
            f"trainer.limit_predict_batches is {trainer.limit_predict_batches}: sketches need every "
            "batch (leave it at 1.0)"
        )


def run_sketch_stage(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule,
    run_dir: Path,
    conditions: list[str],
    options: SketchOptions,
    epochs: list[int] | None = None,
    subnetworks_dir: Path | None = None,
    train_per_language: int | None = None,
) -> list[Path]:
    """Sketch every checkpoint × mask × split the conditions need; returns the finished ``.npy`` paths.

    Finished files are skipped (after checking they were made with these options from this
    checkpoint), half-done ones resume. Runs unchanged on one process or under DDP.

    Args:
        trainer: a Trainer with ``use_distributed_sampler=False`` (``CrosslingTrainer``); a
            ``SketchWriter`` is added to its callbacks when it has none.
        module: the ``SequenceClassifier`` whose checkpoints are sketched (weights are loaded in turn).
        datamodule: the run's ``TaskDataModule`` (same languages and sizes as the fit).
        run_dir: holds ``checkpoints/`` and receives ``sketches/``.
        conditions: e.g. ``["full", "own"]``.
        options: the projection.
        epochs: only these epochs (None: every checkpoint).
        subnetworks_dir: where ``<lang>.json`` masks are (None: ``<run_dir>/subnetworks``).
        train_per_language: sketch only this many training examples per language (``train_pool``).
    """
    run_dir = Path(run_dir)
    languages = list(datamodule.languages)
    if getattr(module, "languages", None) and list(module.languages) != languages:
        raise ValueError(f"model languages {module.languages} differ from the data's {languages}")
    check_trainer(trainer)
    # "auto" becomes what this device runs, so the sidecars say which precision made the values
    options = replace(options, precision=resolve_precision(options.precision, trainer.strategy.root_device))
    checkpoints = list_checkpoints(run_dir)
    if epochs is not None:
        wanted = set(epochs)
        missing = wanted - {e for e, _ in checkpoints}
        if missing:
            raise CheckpointError(
                f"{run_dir / 'checkpoints'}: no checkpoint for epoch(s) {sorted(missing)} "
                f"(found {[e for e, _ in checkpoints]})"
            )
        checkpoints = [(e, p) for e, p in checkpoints if e in wanted]
    if not checkpoints:
        raise CheckpointError(f"{run_dir / 'checkpoints'}: no epoch=<E>.ckpt files (run crossling fit first)")
    train_masks, test_masks = plan_masks(conditions, languages)
    head_masks = resolve_head_masks(
        train_masks,
        languages,
        module.gates.shape,
        Path(subnetworks_dir) if subnetworks_dir else run_dir / "subnetworks",
    )
    aliases = equal_mask_aliases(train_masks, head_masks)
    sketched_train = [m for m in train_masks if m not in aliases]
    # a test example is sketched once per distinct mask: an alias whose languages all need its
    # canonical mask too is read from the canonical's file (which then holds all its rows)
    test_shared = {
        alias: canonical
        for alias, canonical in aliases.items()
        if all(canonical in masks for masks in test_masks.values() if alias in masks)
    }
    sketched_test = {lang: [m for m in masks if m not in test_shared] for lang, masks in test_masks.items()}
    sketcher = get_sketcher(module.model, options)
    writer = find_writer(trainer)
    outputs: list[Path] = []
    say = print if trainer.is_global_zero else (lambda *a, **k: None)
    say(
        f"sketch: {len(checkpoints)} checkpoint(s) x masks {sketched_train} x train/test, "
        f"d={sketcher.dim} ({options.kind}, k={options.k}, pairs={options.pairs}, {options.combine}, "
        f"precision {options.precision}) -> {run_dir}/sketches"
    )
    if aliases:
        say("  equal masks, sketched once: " + ", ".join(f"{a} = {c}" for a, c in aliases.items()))
    pool = train_pool(datamodule.dataset("train"), train_per_language)
    if pool is not None:
        say(f"  training pool: {pool.size} of {len(datamodule.dataset('train'))} examples ({train_per_language} per language)")
    passes, sketched, busy = 0, 0, 0.0
    for epoch, ckpt in checkpoints:
        model_fp = fingerprint(ckpt)
        loaded = False

        def identity(split, mask, epoch=epoch, model_fp=model_fp):
            return target_identity(
                split, mask, epoch, options, sketcher.names, sketcher.dim, model_fp, languages
            )

        for split in SPLITS:
            dataset = datamodule.dataset(split)
            for job in make_jobs(
                split, epoch, run_dir, dataset, languages, sketched_train, sketched_test, head_masks, identity,
                pool if split == "train" else None,
            ):
                pending = {m: t for m, t in job.targets.items() if not t.is_finished()}
                outputs += [t.npy for m, t in job.targets.items() if m not in pending]
                if not pending:
                    say(f"  {job.label}: done already")
                    continue
                job.targets = pending
                job.lang_masks = {lang: m for lang, m in job.lang_masks.items() if m in pending}
                if not loaded:
                    load_weights(module, ckpt)
                    loaded = True
                n = sum(t.indices.size for t in pending.values())
                say(f"  {job.label}: {n} examples ...", flush=True)
                start = time.perf_counter()
                writer.start(job)
                trainer.predict(
                    SketchModule(module, datamodule, job, options, writer), return_predictions=False
                )
                seconds = time.perf_counter() - start
                say(f"  {job.label}: {n} examples in {seconds:.1f}s ({n / max(seconds, 1e-9):.1f}/s)", flush=True)
                passes, sketched, busy = passes + 1, sketched + n, busy + seconds
                outputs += [t.npy for t in pending.values()]
            if aliases:  # written by rank 0 once the canonical files are finished
                if trainer.is_global_zero:
                    outputs += share_equal_masks(
                        aliases if split == "train" else test_shared, split, epoch, run_dir, dataset, languages,
                        test_masks, identity, pool if split == "train" else None,
                    )
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.barrier()
    if passes:
        say(f"sketch: {passes} pass(es), {sketched} examples in {busy:.0f}s ({sketched / max(busy, 1e-9):.1f} examples/s)")
    return outputs


def share_equal_masks(
    aliases: dict[str, str], split: str, epoch: int, run_dir: Path, dataset, languages, test_masks, identity,
    pool: np.ndarray | None = None,
) -> list[Path]:
    """Write every aliased mask's file of one split from its equal mask's file (see ``equal_mask_aliases``)."""
    all_langs, all_indices = split_rows(dataset, pool)
    written = []
    for alias, canonical in aliases.items():
        if split == "train":
            codes = list(range(len(languages)))
        else:
            codes = [languages.index(lang) for lang, masks in test_masks.items() if alias in masks]
        if not codes:
            continue
        npy, _ = sketch_paths(run_dir, epoch, alias, split)
        target = SketchTarget(npy, identity(split, alias), np.sort(all_indices[np.isin(all_langs, codes)]))
        if not target.is_finished():
            write_shared_target(target, sketch_paths(run_dir, epoch, canonical, split)[0], canonical)
        written.append(npy)
    return written


# -- during fit ----------------------------------------------------------------------------------
class SketchCallback(pl.Callback):
    """Write the ``full``-mask sketches of train and test at the end of every training epoch,
    from the weights in memory (no checkpoint reload). The files are finished (sidecar with the
    checkpoint's fingerprint) once ``checkpoints/epoch=<E>.ckpt`` exists: at the next epoch's
    start or at the end of training.

    Args:
        options: the projection (None: ``SketchOptions()``).
        splits: the splits to sketch.
    """

    def __init__(self, options: SketchOptions | None = None, splits: list[str] | None = None):
        self.options = options or SketchOptions()
        self.splits = list(splits or SPLITS)
        unknown = set(self.splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"SketchCallback splits must be among {SPLITS}, found {sorted(unknown)}")
        self._pending: list[tuple[int, JobWriter]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        run_dir = Path(trainer.default_root_dir)
        datamodule = trainer.datamodule
        epoch = trainer.current_epoch
        languages = list(datamodule.languages)
        self.options = replace(self.options, precision=resolve_precision(self.options.precision, pl_module.device))
        sketcher = get_sketcher(pl_module.model, self.options)
        pending_fp = f"pending:epoch={epoch}"
        for split in self.splits:
            dataset = datamodule.dataset(split)

            def identity(split_, mask, epoch=epoch):
                return target_identity(
                    split_, mask, epoch, self.options, sketcher.names, sketcher.dim, pending_fp, languages
                )

            (job,) = make_jobs(
                split,
                epoch,
                run_dir,
                dataset,
                languages,
                ["full"],
                {lang: ["full"] for lang in languages},
                {"full": None},
                identity,
            )
            loader = datamodule.eval_dataloader(split)
            writer = JobWriter(job, rank_share(loader, dataset, job), trainer.global_rank, trainer.world_size)
            writer.open(fresh=True)  # partial files of an interrupted fit may hold other weights' rows
            try:
                self._sketch(loader, writer, pl_module, trainer)
            finally:
                writer.close()
            self._pending.append((epoch, writer))
        trainer.strategy.barrier("sketches of the epoch written")

    def _sketch(self, loader, writer: JobWriter, pl_module: pl.LightningModule, trainer: pl.Trainer) -> None:
        from tqdm.auto import tqdm

        device = pl_module.device
        batches = tqdm(
            loader,
            desc=f"sketch {writer.job.label}",
            leave=False,
            disable=not trainer.is_global_zero or trainer.progress_bar_callback is None,
        )
        for batch in batches:
            indices, langs = batch["indices"].numpy(), batch["langs"].numpy()
            if writer.all_done(indices, langs):
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            sketches, loss, pred = sketch_batch(pl_module.model, pl_module.gates, batch, None, self.options)
            writer.write(indices, writer.route(langs), *to_numpy_rows(sketches, loss, pred))

    def _finish(self, trainer: pl.Trainer) -> None:
        if not self._pending:
            return
        trainer.strategy.barrier("checkpoint written")
        run_dir = Path(trainer.default_root_dir)
        for epoch, writer in self._pending:
            ckpt = run_dir / "checkpoints" / f"epoch={epoch}.ckpt"
            if not ckpt.is_file():
                log.warning(
                    "%s not found: the epoch's sketches stay partial (the sketch stage will redo them)", ckpt
                )
                continue
            if trainer.is_global_zero:
                writer.finish(fingerprint(ckpt))
        self._pending = []
        trainer.strategy.barrier("sketch files finished")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer)

"""``crossling analyze --stages sketch``: the gradient sketch of every example, for every checkpoint ×
needed mask × split.

Reads ``<run>/checkpoints/epoch=<E>.ckpt`` and, for masked conditions, ``<run>/subnetworks/<lang>.json``
(or ``--model.subnetworks``); writes ``<run>/sketches/epoch=<E>/<mask>/<split>.npy`` (N×d float32)
and its ``.json`` sidecar (rows, projection, checkpoint fingerprint; the contract in
``analysis/sketch_store.py``). Finished files are skipped after checking they were made with these
options from this checkpoint; half-done ones (``.partial``) resume.

What is sketched is planned in ``callbacks/sketch_plan.py``, computed by ``callbacks/sketch_module.py``
(through ``Trainer.predict``, so ``--trainer.strategy ddp --trainer.devices N`` shards it) and
written by ``callbacks/sketch_writer.py``.

The Trainer: any Lightning Trainer with ``use_distributed_sampler=False`` (``CrosslingTrainer``
sets it: the datamodule shards by rank itself) and no ``limit_predict_batches``. DDP is
``strategy="ddp", devices=N`` (on CPU with ``accelerator="cpu"``: gloo). ``inference_mode=False``
saves a copy of each batch but is not required (the sketching step leaves inference mode). A
``SketchWriter`` is added to ``trainer.callbacks`` when there is none; a logger is not needed.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch

from callbacks.checkpoints import CheckpointError, fingerprint, list_checkpoints, load_weights
from callbacks.sketch_module import SketchModule
from callbacks.sketch_plan import (
    SPLITS,
    equal_mask_aliases,
    make_jobs,
    plan_masks,
    resolve_head_masks,
    share_equal_masks,
    target_identity,
    train_pool,
)
from callbacks.sketch_writer import SketchWriter
from callbacks.sketching import SketchOptions, get_sketcher, representation_root, resolve_precision

from .request import AnalyzeRequest


def run_sketch_stage(request: AnalyzeRequest) -> list[Path]:
    """The stage as ``analyze`` runs it: ``influence.epochs`` (the checkpoints TracIn sums over) and
    ``influence.train_per_language`` (the ranked pool) also limit what is sketched."""
    r = request
    return sketch_checkpoints(r.trainer, r.model, r.datamodule, r.run_dir, r.conditions, r.sketch,
                              epochs=r.influence.epochs, subnetworks_dir=r.subnetworks_dir,
                              train_per_language=r.influence.train_per_language)


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


def sketch_checkpoints(
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
    out_dir = representation_root(run_dir, options)  # representations: a run-like folder of their own
    writer = find_writer(trainer)
    outputs: list[Path] = []
    say = print if trainer.is_global_zero else (lambda *a, **k: None)
    say(
        f"sketch: {len(checkpoints)} checkpoint(s) x masks {sketched_train} x train/test, "
        f"d={sketcher.dim} ({options.kind}, k={options.k}, pairs={options.pairs}, {options.combine}, "
        f"precision {options.precision}) -> {out_dir}/sketches"
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
                split, epoch, out_dir, dataset, languages, sketched_train, sketched_test, head_masks, identity,
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
                        aliases if split == "train" else test_shared, split, epoch, out_dir, dataset, languages,
                        test_masks, identity, pool if split == "train" else None,
                    )
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.barrier()
    if passes:
        say(f"sketch: {passes} pass(es), {sketched} examples in {busy:.0f}s ({sketched / max(busy, 1e-9):.1f} examples/s)")
    return outputs

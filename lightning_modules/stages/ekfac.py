"""``crossling analyze --stages ekfac``: EK-FAC influence of the ranked training pool on every test example,
through kronfluence, at each sketched checkpoint of the full model.

Reads ``<run>/checkpoints/epoch=<E>.ckpt`` and the sketch stage's ``sketches/epoch=<E>/full/<split>.json``
(their rows are the pool and the test items scored); writes ``<run>/ekfac/sketches/epoch=<E>/full/`` in the
sketch file contract, so that ``--influence.method ekfac`` ranks them as any method's: ``test.npy`` holds
each test item's scores against the pool and ``train.npy`` the identity, so that a test row's dot product
with a training row is its score (``analysis/influence/methods.py``). A checkpoint scored with the same
options from the same weights is skipped.

Why kronfluence: it is maintained, built for EK-FAC on transformers, runs on a CPU with the installed torch
and transformers, and its code imports no torchvision (its package metadata asks for one; ``scripts/setup.sh``
installs it without, since torchvision's PyPI build breaks ``import lightning`` here). Tested against an
explicit construction of EK-FAC from one-example gradients (``tests/test_ekfac.py``).

The score of training example z for test example t is ``g_tᵀ (F̂ + λI)⁻¹ g_z`` over the linear layers the
sketches cover (``callbacks/sketching.py``), F̂ the EK-FAC approximation of the Fisher: per layer, the
eigenbases of the input and output-gradient covariances, with the eigenvalues refitted in that basis. It
is fitted on the examples scored against (the ranked pool). Sign as TracIn's: positive where a step on z
lowers t's loss.
"""

from __future__ import annotations

import copy
import importlib.metadata
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from analysis.atomic import atomic_write, write_json_atomic
from analysis.layout import EKFAC
from analysis.sketch_store import list_epochs, read_sidecar, sketch_paths
from callbacks.checkpoints import CheckpointError, fingerprint, list_checkpoints, load_weights
from datamodules.base import make_collate

from .request import AnalyzeRequest


@dataclass(frozen=True)
class EkfacOptions:
    """EK-FAC's choices.

    Args:
        damping: λ added to every refitted eigenvalue; None: kronfluence's heuristic, 0.1 × the mean
            eigenvalue of each layer.
        fisher: ``sampled`` (labels drawn from the model's own distribution: the Fisher, as EK-FAC defines
            it) or ``empirical`` (the true labels).
        batch_size: training examples per forward/backward pass.
        query_batch_size: test examples whose preconditioned gradients are held at once (each as large as
            the tracked layers: 84 MB on e5-small); every batch of them is one more pass over the pool.
        seed: the seed of the sampled labels.
    """

    damping: float | None = None
    fisher: Literal["sampled", "empirical"] = "sampled"
    batch_size: int = 16
    query_batch_size: int = 32
    seed: int = 0


def classification_task(names: list[str]):
    """kronfluence's Task for a crossling classifier (``forward(input_ids, attention_mask, head_mask)``): the
    summed cross-entropy as training loss and as the measured quantity, ``names`` the tracked layers."""
    from kronfluence.task import Task

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(batch["input_ids"], batch["attention_mask"], None).float()
            if not sample:
                return F.cross_entropy(logits, batch["labels"], reduction="sum")
            with torch.no_grad():
                drawn = torch.multinomial(F.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
            return F.cross_entropy(logits, drawn, reduction="sum")

        def compute_measurement(self, batch, model):
            logits = model(batch["input_ids"], batch["attention_mask"], None).float()
            return F.cross_entropy(logits, batch["labels"], reduction="sum")

        def get_influence_tracked_modules(self):
            return list(names)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return ClassificationTask()


def ekfac_scores(module: torch.nn.Module, names: list[str], train_examples: list, test_examples: list, collate,
                 options: EkfacOptions = EkfacOptions()) -> tuple[np.ndarray, dict]:
    """((n_test, n_train) float64 EK-FAC influence scores, a record of the cost), the factors fitted on
    ``train_examples``. ``names``: the tracked linear layers as ``module.named_modules()`` names them;
    ``collate``: turns a list of examples into the batch ``module`` reads. ``module`` is left as it was
    (kronfluence wraps the layers of a copy)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    modules = dict(module.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), torch.nn.Linear)]
    if missing:
        raise ValueError(f"ekfac: no linear layer named {missing[:4]} in the model")
    task = classification_task(names)
    model = prepare_model(copy.deepcopy(module).eval(), task)
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as out:
        torch.manual_seed(options.seed)
        analyzer = Analyzer("crossling", model, task, output_dir=out, disable_tqdm=True, disable_model_save=True)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate, num_workers=0))
        start = time.perf_counter()
        analyzer.fit_all_factors(
            "ekfac", dataset=list(train_examples), per_device_batch_size=options.batch_size,
            factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=options.fisher == "empirical"),
            overwrite_output_dir=True)
        fitted = time.perf_counter() - start
        analyzer.compute_pairwise_scores(
            "scores", "ekfac", query_dataset=list(test_examples), train_dataset=list(train_examples),
            per_device_query_batch_size=options.query_batch_size, per_device_train_batch_size=options.batch_size,
            score_args=ScoreArguments(damping_factor=options.damping), overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
    record = {"method": "ekfac", "library": "kronfluence", "damping": options.damping, "fisher": options.fisher,
              "layers": len(names), "n_train": len(train_examples), "n_test": len(test_examples),
              "factor_seconds": fitted, "score_seconds": time.perf_counter() - start - fitted}
    return scores, record


class EkfacError(ValueError):
    """EK-FAC scores asked of a run that lacks what they need."""


def ekfac_identity(options: EkfacOptions) -> dict:
    """What the score files record as their "projection": the method, the library and the options."""
    return {"kind": "ekfac", "library": f"kronfluence {importlib.metadata.version('kronfluence')}", **asdict(options)}


def run_ekfac_stage(request: AnalyzeRequest) -> list[Path]:
    """Score every sketched checkpoint of the full model (``influence.epochs``, else every one sketched)."""
    r = request
    options = r.ekfac or EkfacOptions()
    if set(r.conditions) - {"full"}:
        print(f"ekfac: scores the full model only; conditions {sorted(set(r.conditions) - {'full'})} are left to "
              "the sketched methods", flush=True)
    sketched = [e for e in list_epochs(r.run_dir) if sketch_paths(r.run_dir, e, "full", "train")[1].is_file()]
    epochs = sorted(r.influence.epochs) if r.influence.epochs else sketched
    missing = [e for e in epochs if e not in sketched]
    if missing or not epochs:
        raise EkfacError(f"{r.run_dir / 'sketches'}: no finished full-model sketches of epoch(s) {missing or '<any>'}; "
                         "EK-FAC scores the pool and test items they hold: run --stages '[sketch, ekfac]'")
    checkpoints = dict(list_checkpoints(r.run_dir))
    examples = {split: {e.index: e for e in r.datamodule.dataset(split).examples} for split in ("train", "test")}
    collate = make_collate(r.datamodule.tokenizer.pad_token_id)
    identity, written = ekfac_identity(options), []
    for epoch in epochs:
        if epoch not in checkpoints:
            raise CheckpointError(f"{r.run_dir / 'checkpoints'}: no epoch={epoch}.ckpt for the sketched epoch {epoch}")
        sides = {split: read_sidecar(sketch_paths(r.run_dir, epoch, "full", split)[1]) for split in ("train", "test")}
        model_fp = fingerprint(checkpoints[epoch])
        if sides["train"]["model_fingerprint"] != model_fp:
            raise EkfacError(f"{sketch_paths(r.run_dir, epoch, 'full', 'train')[1]}: sketched from another "
                             f"checkpoint than {checkpoints[epoch]} (sketch it again)")
        targets = {split: sketch_paths(r.run_dir / EKFAC, epoch, "full", split) for split in ("train", "test")}
        if all(done(targets[split][1], identity, model_fp, sides[split]["indices"]) for split in targets):
            print(f"  ekfac epoch={epoch}: done already", flush=True)
            written += [targets[split][0] for split in targets]
            continue
        load_weights(r.model, checkpoints[epoch])
        names = ["model." + name for name in sides["train"]["layers"]]
        pool = [examples["train"][i] for i in sides["train"]["indices"]]
        tests = [examples["test"][i] for i in sides["test"]["indices"]]
        print(f"  ekfac epoch={epoch}: {len(tests)} test x {len(pool)} pool items over {len(names)} layers ...",
              flush=True)
        scores, record = ekfac_scores(r.model, names, pool, tests, collate, options)
        print(f"  ekfac epoch={epoch}: factors {record['factor_seconds']:.0f} s, scores {record['score_seconds']:.0f} s",
              flush=True)
        arrays = {"train": np.eye(len(pool), dtype=np.float32), "test": scores.astype(np.float32)}
        for split, (npy, side) in targets.items():
            with atomic_write(npy, "wb") as f:
                np.save(f, arrays[split])
            write_json_atomic(side, {**sides[split], "d": len(pool), "projection": identity, "ekfac": record})
            written.append(npy)
    return written


def done(sidecar: Path, identity: dict, model_fp: str, indices: list[int]) -> bool:
    """Whether a score file was finished from these weights with these options for these rows."""
    if not sidecar.is_file() or not sidecar.with_suffix(".npy").is_file():
        return False
    try:
        side = read_sidecar(sidecar)
    except ValueError:
        return False
    return side["projection"] == identity and side["model_fingerprint"] == model_fp and side["indices"] == indices

"""EK-FAC influence of training examples on test examples, through kronfluence.

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
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class EkfacOptions:
    """EK-FAC's choices.

    Args:
        damping: λ added to every refitted eigenvalue; None: kronfluence's heuristic, 0.1 × the mean
            eigenvalue of each layer.
        fisher: ``sampled`` (labels drawn from the model's own distribution: the Fisher, as EK-FAC defines
            it) or ``empirical`` (the true labels).
        batch_size: examples per forward/backward pass.
        seed: the seed of the sampled labels.
    """

    damping: float | None = None
    fisher: Literal["sampled", "empirical"] = "sampled"
    batch_size: int = 16
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
            per_device_query_batch_size=options.batch_size, per_device_train_batch_size=options.batch_size,
            score_args=ScoreArguments(damping_factor=options.damping), overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
    record = {"method": "ekfac", "library": "kronfluence", "damping": options.damping, "fisher": options.fisher,
              "layers": len(names), "n_train": len(train_examples), "n_test": len(test_examples),
              "factor_seconds": fitted, "score_seconds": time.perf_counter() - start - fitted}
    return scores, record

"""``crossling analyze --stages counterfactual``: does influence predict what removing a language does?

Reads the analysed (fully fine-tuned) run's checkpoints, its ``sketches/epoch=<E>/full/`` and
``influence/full/contributions.csv``, and beside it the fits that leave one training language out
(``without-<lang>/``) and the random control (``without-random/``), each made with ``crossling fit
--data.init_args.leave_out <lang|random>`` from the same config. Writes ``<run>/counterfactual/``:
``losses/<run>.npz`` (every test example's loss per model, kept so a stopped stage resumes),
``effects.npz`` (per-example retrained and predicted changes: what the study pools over seeds),
``counterfactual.csv``, ``counterfactual.json`` (agreement numbers), two figures. Every file is
written to a temporary name and renamed. The numbers are ``analysis/counterfactual.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from analysis.contributions import positions_of
from analysis.counterfactual import (
    CONTROL,
    CounterfactualError,
    SeedCounterfactual,
    TestLosses,
    cell_agreement,
    check_same_examples,
    checkpoint_agreement,
    checkpoint_weights,
    dev_did_not_learn,
    did_not_learn,
    language_grid,
    language_mean_gradients,
    load_test_losses,
    per_example_effects,
    removal_prediction,
    score_removal_effects,
    write_test_losses,
)
from analysis.counterfactual_report import (
    EFFECTS_FILE,
    positive_shares,
    write_counterfactual_outputs,
    write_effects,
)
from analysis.influence.methods import method_score_matrices
from analysis.layout import CONFIG_FILE, COUNTERFACTUAL, read_run_config, refit_run_name, removed_run_name
from analysis.planted import PlantedInputs, planted_retrieval
from analysis.sketch_store import check_compatible, list_epochs, read_sketch
from callbacks.checkpoints import (
    CheckpointError,
    fingerprint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
)
from datamodules.base import leave_out_indices

from ..optim import schedule_factor
from .request import AnalyzeRequest

OUT = COUNTERFACTUAL
# keys a leave-out fit may differ in from the run it is compared with: its folder, what it leaves out, and
# whether it keeps the full fit's order of the rest, which checkpoints inside an epoch it saves, and whether
# it shows a progress bar (a fit logged to a file turns it off; nothing it learns changes)
FREE_KEYS = {("trainer", "default_root_dir"), ("data", "init_args", "leave_out"),
             ("data", "init_args", "coupled_order"), ("ckpt_path",), ("trainer", "checkpoints_within_epoch"),
             ("trainer", "enable_progress_bar")}


@dataclass
class CounterfactualOptions:
    """The counterfactual check.

    Args:
        retrained: folder holding the leave-out fits ``without-<lang>/`` and ``without-random/`` (None:
            beside the analysed run, as ``crossling study`` puts them).
        languages: training languages left out, one fit each (None: every language of the run).
        condition: the sketch mask whose sketches give TracIn's prediction (the full model's: ``full``).
        bootstrap_resamples: resamples of the intervals over test examples.
        refits: seeds of refits ``refit-<r>/`` beside the leave-out fits: the analysed run's config with
            nothing removed and only ``seed_everything`` and the batch order (``data.init_args.shuffle_seed``)
            set to r. Their change of test loss is retraining's own noise, which every cell is judged against
            (None: not measured).
    """

    retrained: str | None = None
    languages: list[str] | None = None
    condition: str = "full"
    bootstrap_resamples: int = 1000
    refits: list[int] | None = None


def run_counterfactual_stage(request: AnalyzeRequest) -> Path | None:
    r = request
    trainer = r.trainer
    out = None
    if trainer.is_global_zero:  # a few forward passes and numpy: one process does it
        out = check_counterfactual(r.model, r.datamodule, r.run_dir, r.counterfactual, r.influence.normalization,
                                   r.influence.m, r.influence.trak_damping)
    trainer.strategy.barrier()
    return out


def leave_out_plan(datamodule, options: CounterfactualOptions) -> list[str]:
    """The removed sets, in order: the languages to leave out, then the random control."""
    languages = list(datamodule.languages)
    chosen = list(options.languages) if options.languages is not None else languages
    unknown = [lang for lang in chosen if lang not in languages]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise CounterfactualError(f"counterfactual.languages: expected distinct training languages of this run "
                                  f"({languages}), found {chosen}")
    return [*chosen, CONTROL]


def _flatten(config: dict, prefix: tuple = ()) -> dict[tuple, object]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def _read_config(run: Path) -> dict:
    config = read_run_config(run)
    if config is None:
        raise CounterfactualError(f"{run / CONFIG_FILE}: not found; the counterfactual check compares fits made by "
                                  "crossling fit")
    return config


# keys a refit changes: the dropout draws and the batch order (the head's initialisation and the data stay)
REFIT_KEYS = {("seed_everything",), ("data", "init_args", "shuffle_seed")}


def check_refit_run(full_run: Path, run: Path) -> None:
    """A refit repeats the analysed run's config with only its seed and batch order changed, both of them."""
    reference, other = _flatten(_read_config(full_run)), _flatten(_read_config(run))
    if other.get(("data", "init_args", "leave_out")) is not None:
        raise CounterfactualError(f"{run / 'config.yaml'}: data.init_args.leave_out is "
                                  f"{other.get(('data', 'init_args', 'leave_out'))!r}; a refit removes nothing")
    for key in sorted(set(reference) | set(other), key=str):
        if key in FREE_KEYS:
            continue
        same = reference.get(key) == other.get(key)
        if key in REFIT_KEYS and same:
            raise CounterfactualError(
                f"{run / 'config.yaml'}: {'.'.join(key)} is {other.get(key)!r}, as in the analysed run; a refit "
                "needs another seed and batch order (crossling fit ... --seed_everything r --data.init_args.shuffle_seed r)")
        if key not in REFIT_KEYS and not same:
            raise CounterfactualError(
                f"{run / 'config.yaml'}: {'.'.join(key)} is {other.get(key)!r} there but {reference.get(key)!r} in "
                f"{full_run / 'config.yaml'}; a refit differs from the analysed run in its seed and batch order only")


def check_leave_out_run(full_run: Path, run: Path, removed: str) -> None:
    """The leave-out fit must be the analysed run's config with only ``leave_out`` (and its folder) changed."""
    reference, other = _flatten(_read_config(full_run)), _flatten(_read_config(run))
    found = other.get(("data", "init_args", "leave_out"))
    if found != removed:
        raise CounterfactualError(f"{run / 'config.yaml'}: data.init_args.leave_out is {found!r}, expected {removed!r}")
    for key in sorted(set(reference) | set(other), key=str):
        if key in FREE_KEYS:
            continue
        if reference.get(key) != other.get(key):
            raise CounterfactualError(
                f"{run / 'config.yaml'}: {'.'.join(key)} is {other.get(key)!r} there but {reference.get(key)!r} in "
                f"{full_run / 'config.yaml'}; a leave-out fit must repeat the analysed run's config (fit it again)")


def final_checkpoint(run: Path, removed: str | None) -> Path:
    checkpoints = list_checkpoints(run)
    if not checkpoints:
        hint = (f" (fit it: crossling fit --config <the full run's config> --trainer.default_root_dir {run} "
                f"--data.init_args.leave_out {removed})" if removed else "")
        raise CheckpointError(f"{run / 'checkpoints'}: no epoch=<E>.ckpt files{hint}")
    return checkpoints[-1][1]


@torch.no_grad()
def evaluate_test_losses(module, datamodule, checkpoint: Path) -> TestLosses:
    """Every test example's cross-entropy and correctness under ``checkpoint`` (float32, no masks)."""
    load_weights(module, checkpoint)
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    parts: dict[str, list[np.ndarray]] = {"indices": [], "langs": [], "loss": [], "correct": []}
    for batch in datamodule.eval_dataloader("test", shard=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = module(batch["input_ids"], batch["attention_mask"], None).float()
        parts["loss"].append(F.cross_entropy(logits, batch["labels"], reduction="none").double().cpu().numpy())
        parts["correct"].append((logits.argmax(-1) == batch["labels"]).cpu().numpy())
        parts["indices"].append(batch["indices"].cpu().numpy())
        parts["langs"].append(batch["langs"].cpu().numpy())
    module.train(was_training)
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(arrays["indices"], kind="stable")
    return TestLosses(list(datamodule.languages), arrays["indices"][order], arrays["langs"][order],
                      arrays["loss"][order], arrays["correct"][order].astype(bool), fingerprint(checkpoint))


def cached_test_losses(module, datamodule, checkpoint: Path, path: Path) -> TestLosses:
    """The test losses of ``checkpoint``, read from ``path`` when it holds this checkpoint's, else evaluated."""
    if path.is_file():
        losses = load_test_losses(path)
        if losses.model_fingerprint == fingerprint(checkpoint) and losses.languages == list(datamodule.languages):
            return losses
    print(f"  counterfactual: test losses of {checkpoint}", flush=True)
    losses = evaluate_test_losses(module, datamodule, checkpoint)
    write_test_losses(path, losses)
    return losses


def learning_rates(run: Path, n_train: int) -> tuple[dict[int, float], dict[int, float]]:
    """Every epoch's mean learning rate and examples per optimizer step, from the run's checkpoints; a
    checkpoint written before crossling recorded them gets them from the schedule (``reconstruct_rates``)."""
    checkpoints = list_checkpoints(run)
    metas = {epoch: load_checkpoint(path)["crossling"] for epoch, path in checkpoints}
    if all(m.get("learning_rate") is not None and m.get("examples_per_step") for m in metas.values()):
        return ({e: float(m["learning_rate"]) for e, m in metas.items()},
                {e: float(m["examples_per_step"]) for e, m in metas.items()})
    return reconstruct_rates(run, metas, n_train)


def reconstruct_rates(run: Path, metas: dict[int, dict], n_train: int) -> tuple[dict[int, float], dict[int, float]]:
    """The rates the run's optimizer used, from its config (peak rate, warm-up, schedule, epochs) and the
    checkpoints' step counts: the same schedule ``configure_adamw`` gave it, evaluated step by step."""
    config = _read_config(run)
    hp, epochs = config.get("model") or {}, (config.get("trainer") or {}).get("max_epochs")
    steps = {e: m.get("global_step") for e, m in metas.items()}
    first = min(steps)
    if first != 0 or not epochs or not all(isinstance(v, int) and v > 0 for v in steps.values()) \
            or "learning_rate" not in hp:
        raise CheckpointError(f"{run / 'checkpoints'}: no learning rate recorded and none to reconstruct (needs "
                              "model.learning_rate and trainer.max_epochs in config.yaml and each checkpoint's "
                              "global_step); fit the run again to predict what removing training data does")
    per_epoch = steps[0]
    total = per_epoch * int(epochs)
    rates, per_step = {}, {}
    for epoch in steps:
        window = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        rates[epoch] = float(hp["learning_rate"]) * float(np.mean(
            [schedule_factor(s, total, float(hp.get("warmup_ratio", 0.0)), hp.get("schedule", "linear")) for s in window]))
        per_step[epoch] = n_train / per_epoch
    return rates, per_step


def predicted_effects(run_dir: Path, datamodule, condition: str, removed: list[str],
                      test_index: np.ndarray) -> tuple[dict[str, np.ndarray], dict, dict[int, dict[str, np.ndarray]]]:
    """TracIn's predicted change of each test example's loss per removed set, from the run's sketches: over
    every sketched checkpoint, and (third) over the last n of them for each n (``{n: predicted}``), each
    checkpoint weighted by the η/B of the epochs it stands for, so that agreement can be read per number
    of checkpoints."""
    languages = list(datamodule.languages)
    epochs = sketched_epochs(run_dir, condition)
    if not epochs:
        raise CounterfactualError(f"{run_dir / 'sketches'}: no finished {condition!r} sketches (run the sketch stage "
                                  f"with condition {condition})")
    rates, per_step = learning_rates(run_dir, len(datamodule.training_examples()))
    weights = checkpoint_weights(epochs, rates, per_step)
    examples = datamodule.dataset("train").examples
    train_lang = np.array([e.lang for e in examples], dtype=np.int64)
    counts = {}
    for r in removed:
        left = leave_out_indices(examples, languages, r, datamodule.seed)
        counts[r] = np.bincount(train_lang[left], minlength=len(languages))
    unweighted: dict[int, dict[str, np.ndarray]] = {}  # epoch -> removed set -> g_z · Σ c_ℓ m_ℓ
    for epoch in epochs:
        train, test = (read_sketch(run_dir, epoch, condition, split) for split in ("train", "test"))
        check_compatible([(train.sidecar, train.meta), (test.sidecar, test.meta)], same_model=True)
        codes = np.array([languages.index(x) for x in train.langs], dtype=np.int64)
        means = language_mean_gradients(np.asarray(train.data), codes, len(languages), str(train.npy))
        rows = np.asarray(test.data)[positions_of(test.indices, test_index)]
        unweighted[epoch] = {r: removal_prediction(rows, means, counts[r], 1.0) for r in removed}
    by_checkpoints = {}
    for n in range(1, len(epochs) + 1):
        last = epochs[-n:]
        w = checkpoint_weights(last, rates, per_step)
        by_checkpoints[n] = {r: sum(w[e] * unweighted[e][r] for e in last) for r in removed}
    record = {"epochs": epochs, "weights": {str(e): w for e, w in weights.items()},
              "learning_rates": {str(e): v for e, v in rates.items()},
              "examples_per_step": {str(e): v for e, v in per_step.items()},
              "removed_counts": {r: c.tolist() for r, c in counts.items()}}
    return by_checkpoints[len(epochs)], record, by_checkpoints


def sketched_epochs(run_dir: Path, condition: str) -> list[int]:
    """The checkpoints whose ``condition`` training sketches are finished, ascending."""
    return [e for e in list_epochs(run_dir) if (run_dir / "sketches" / f"epoch={e}" / condition / "train.npy").is_file()]


def method_agreement(run_dir: Path, datamodule, condition: str, seed: SeedCounterfactual, test_index: np.ndarray,
                     scores: dict[str, np.ndarray]) -> dict[str, dict]:
    """Each method's agreement with retraining over the leave-out cells: the removal effect its scores imply
    (``score_removal_effects``; up to the method's own scale, so the slope is not comparable across methods)
    against the retrained change, as ``cell_agreement`` measures it."""
    languages = list(datamodule.languages)
    epochs = sketched_epochs(run_dir, condition)
    train, test = (read_sketch(run_dir, epochs[-1], condition, split) for split in ("train", "test"))
    pool_lang = np.array([languages.index(x) for x in train.langs], dtype=np.int64)
    examples = datamodule.dataset("train").examples
    train_lang = np.array([e.lang for e in examples], dtype=np.int64)
    left_out = [r for r in seed.retrained if r != CONTROL and r not in seed.not_learned]
    counts = {r: np.bincount(train_lang[leave_out_indices(examples, languages, r, datamodule.seed)],
                             minlength=len(languages)) for r in left_out}
    rows = positions_of(test.indices, test_index)  # the seed's order
    retrained = language_grid(seed, seed.retrained, left_out)
    found = {}
    for method, s in scores.items():
        effects = score_removal_effects(s[rows], pool_lang, len(languages), counts)
        found[method] = cell_agreement(language_grid(seed, effects, left_out), retrained)
    return found


def sorted_test_split(datamodule) -> tuple[np.ndarray, np.ndarray]:
    """The test examples' indices and labels in test-index order (the order of every ``TestLosses``)."""
    examples = sorted(datamodule.dataset("test").examples, key=lambda e: e.index)
    return (np.array([e.index for e in examples], dtype=np.int64),
            np.array([e.record.label for e in examples], dtype=np.int64))


def planted_inputs(run_dir: Path, datamodule, condition: str, full: TestLosses,
                   scores: dict[str, np.ndarray], m: int | None = None) -> PlantedInputs:
    """Which test examples carry the planted marker (in ``full``'s order), and how well each method's scores
    (``method_score_matrices``: TracIn's over the sketched checkpoints, equally weighted as the influence stage
    ranks by default, and every other method whose inputs the run holds) find the marked items of the
    sketched training pool for each marked test item."""
    plant = datamodule.plant
    marked_test = datamodule.planted_indices("test")
    marked = np.isin(full.test_index, marked_test)
    epochs = sketched_epochs(run_dir, condition)
    train, test = (read_sketch(run_dir, epochs[-1], condition, split) for split in ("train", "test"))
    found = {method: planted_retrieval(s, np.isin(train.indices, datamodule.planted_indices("train")),
                                       np.isin(test.indices, marked_test), test.langs == plant.language,
                                       train.langs == plant.language, m)
             for method, s in scores.items()}
    tracin = found.pop("tracin")
    return PlantedInputs(plant.language, float(plant.fraction), marked, tracin, found)


def check_counterfactual(module, datamodule, run_dir: Path, options: CounterfactualOptions,
                         normalization: str = "cosine", m: int | None = None, trak_damping: float = 0.1) -> Path:
    """Retrained vs predicted effect of leaving out each training language; returns ``<run>/counterfactual``."""
    run_dir = Path(run_dir)
    out = run_dir / OUT
    removed = leave_out_plan(datamodule, options)
    retrained_dir = Path(options.retrained).expanduser().resolve() if options.retrained else run_dir.parent
    runs = {r: retrained_dir / removed_run_name(r) for r in removed}
    checkpoints = {r: final_checkpoint(run, r) for r, run in runs.items()}  # every fit present before any work
    for r, run in runs.items():
        check_leave_out_run(run_dir, run, r)
    refit_runs = {refit_run_name(seed): retrained_dir / refit_run_name(seed) for seed in options.refits or []}
    refit_checkpoints = {name: final_checkpoint(run, None) for name, run in refit_runs.items()}
    for run in refit_runs.values():
        check_refit_run(run_dir, run)
    # the prediction first: it needs only the analysis's files, which may be missing
    test_index, labels = sorted_test_split(datamodule)
    predicted, record, by_checkpoints = predicted_effects(run_dir, datamodule, options.condition, removed, test_index)
    full = cached_test_losses(module, datamodule, final_checkpoint(run_dir, None), out / "losses" / "full.npz")
    without = {r: cached_test_losses(module, datamodule, checkpoints[r], out / "losses" / f"{removed_run_name(r)}.npz")
               for r in removed}
    retrained, accuracy = per_example_effects(full, without)
    refits = {}
    for name, checkpoint in refit_checkpoints.items():
        losses = cached_test_losses(module, datamodule, checkpoint, out / "losses" / f"{name}.npz")
        check_same_examples(full, losses, name)
        refits[name] = losses.loss - full.loss
    if not np.array_equal(full.test_index, test_index):
        raise CounterfactualError(f"{out / 'losses' / 'full.npz'}: holds other test examples than the data module's")
    failed, split = [], {}
    for r in removed:  # judged on dev where the fit's log has it, so the test examples compared are not selected on
        on_dev = dev_did_not_learn(runs[r] / "logs" / "metrics.csv", full.languages)
        split[r] = "test" if on_dev is None else "dev"
        if (did_not_learn(without[r], labels) if on_dev is None else on_dev):
            failed.append(r)
            print(f"  counterfactual: {runs[r]} does not beat the majority class on {split[r]} in any language; "
                  "its cells are kept out of the agreement numbers", flush=True)
    failed = tuple(failed)
    seed = SeedCounterfactual(int(_read_config(run_dir).get("seed_everything") or 0), full.languages, full.lang,
                              retrained, predicted, accuracy, failed, refits)
    write_effects(out / EFFECTS_FILE, seed)
    shares = positive_shares(run_dir, full.languages, options.condition)
    scores = method_score_matrices(run_dir, options.condition, sketched_epochs(run_dir, options.condition),
                                   normalization, trak_damping)
    planted = planted_inputs(run_dir, datamodule, options.condition, full, scores, m) \
        if getattr(datamodule, "plant", None) is not None else None
    summary = write_counterfactual_outputs(out, [seed], shares, options.bootstrap_resamples,
                                           {"prediction": record, "runs": {r: str(p) for r, p in runs.items()},
                                            "by_checkpoints": checkpoint_agreement(seed, by_checkpoints),
                                            "by_method": method_agreement(run_dir, datamodule, options.condition, seed,
                                                                          full.test_index, scores),
                                            "learned_judged_on": split,
                                            "refit_runs": {n: str(p) for n, p in refit_runs.items()}},
                                           f"Leaving a training language out: TracIn vs retraining ({run_dir.name})",
                                           planted)
    print(f"counterfactual: {summary['sentence']} -> {out}", flush=True)
    return out

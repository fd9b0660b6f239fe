"""TracIn's predicted effect of leaving a language out, plain and Adam-preconditioned, against retraining.

The counterfactual stage predicts the change of each test loss when a set of training examples is removed
as ``Σ_checkpoints η/B · g_test · Σ_removed g_z`` (``analysis/counterfactual.py``): the gradient step of
plain SGD. AdamW instead steps along ``P g`` with ``P = 1/(√v̂ + ε)``; this script measures whether
putting ``P`` in the product (``g_test · P · g_z``, P factored per linear layer as the epoch checkpoints
record it, ``callbacks/preconditioner.py``) brings the prediction closer to what retraining found.

For every sketched checkpoint of a run (epoch checkpoints written since they hold Adam's preconditioner)
it sketches the counterfactual stage's pool (``--train-per-language`` per language) and every test
example twice, with the same projection: plainly and scaled by √P. Each prediction is compared with
the retrained changes in ``<counterfactual>/effects.npz`` over the (test language × removed set) cells:
Pearson r, the calibration slope (predicted on retrained) and, for a planted run, the planted cell's rank
and its size against retraining's and the random control's. The plain prediction is also compared with
the one the counterfactual stage stored (the same when the run is the one the stage analysed).

    python benchmarks/adam_prediction.py runs/demo/e5-xnli-planted/full --epochs 0 1
    python benchmarks/adam_prediction.py <refit of the run> --counterfactual <run>/counterfactual

The second form measures a run fitted again (same seed) to record the preconditioner, against an earlier
run's retraining. Float32, eval mode, as the sketch stage on a CPU without native bfloat16.

``--all-checkpoints`` also reads the checkpoints a fit saved inside epochs
(``--trainer.checkpoints_within_epoch``), each weighted by the rates of its own interval
(``interval_weights``), and prints the agreement over the last n checkpoints for every n and over the
epoch ends alone: whether checkpoints where the model is still learning bring the prediction to
retraining's size.

    python benchmarks/adam_prediction.py <refit with checkpoints inside epochs> --all-checkpoints \
        --counterfactual <run>/counterfactual --variants plain
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from sketch_fidelity import batches_of, load_run  # noqa: E402

from analysis.correlations import correlate  # noqa: E402
from analysis.counterfactual import (  # noqa: E402
    calibration_slope,
    checkpoint_weights,
    interval_weights,
    language_mean_gradients,
    removal_prediction,
)
from callbacks.checkpoints import list_all_checkpoints, load_checkpoint, load_weights  # noqa: E402
from callbacks.preconditioner import mean_fidelity, preconditioner_scales  # noqa: E402
from callbacks.sketch_plan import train_pool  # noqa: E402
from callbacks.sketching import Sketcher, SketchOptions  # noqa: E402
from datamodules.base import leave_out_indices  # noqa: E402
from lightning_modules.stages.counterfactual import learning_rates  # noqa: E402


def sketch_rows(sketcher: Sketcher, module, dm, split: str, indices: np.ndarray, batch_size: int) -> np.ndarray:
    """(len(indices), d) float64 sketches of the examples with these dataset indices, in that order."""
    dataset = dm.dataset(split)
    position = {e.index: p for p, e in enumerate(dataset.examples)}
    positions = np.array([position[int(i)] for i in indices])
    out = np.zeros((len(indices), sketcher.dim))
    row_of = {p: r for r, p in enumerate(positions.tolist())}
    for chunk, batch in batches_of(dm, split, positions, batch_size):
        sketches, _, _ = sketcher(module.model, module.gates, batch, None)
        out[[row_of[p] for p in chunk.tolist()]] = sketches.double().numpy()
    return out


def cell_grid(values: dict[str, np.ndarray], test_lang: np.ndarray, removed: list[str], n_lang: int) -> np.ndarray:
    """(test language × removed set) means of per-test-example values."""
    return np.array([[values[r][test_lang == t].mean() for r in removed] for t in range(n_lang)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a full fit's run directory (checkpoints/, config.yaml)")
    parser.add_argument("--counterfactual", type=Path, default=None,
                        help="the counterfactual stage's output (default: <run>/counterfactual)")
    parser.add_argument("--epochs", type=int, nargs="+", default=None,
                        help="checkpoints (default: those the counterfactual stage predicted from)")
    parser.add_argument("--train-per-language", type=int, default=150, help="the pool, as influence ranks it")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--all-checkpoints", action="store_true",
                        help="every checkpoint, those inside epochs too, weighted by their own intervals")
    parser.add_argument("--variants", nargs="+", choices=["plain", "adam"], default=["plain", "adam"])
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    cf_dir = args.counterfactual or args.run / "counterfactual"
    effects_path = cf_dir / "effects.npz"
    if not effects_path.is_file():
        raise SystemExit(f"{effects_path}: not found (run analyze --stages '[counterfactual]' on the run first)")
    effects = np.load(effects_path)
    summary = cf_dir / "counterfactual.json"
    if args.epochs is None and summary.is_file():
        args.epochs = json.loads(summary.read_text()).get("prediction", {}).get("epochs")
    removed = [str(r) for r in effects["removed"]]
    languages = [str(x) for x in effects["languages"]]
    test_lang = effects["lang"]
    module, dm, checkpoints = load_run(args.run, args.epochs)
    if list(dm.languages) != languages:
        raise SystemExit(f"{effects_path}: languages {languages}, the run's data {list(dm.languages)}")
    options = SketchOptions(k=args.k, pairs=args.pairs, combine="sum", seed=0, precision="32")
    train_examples = dm.dataset("train").examples
    pool = train_pool(dm.dataset("train"), args.train_per_language)
    test_index = np.array(sorted(e.index for e in dm.dataset("test").examples), dtype=np.int64)
    if test_index.size != test_lang.size:
        raise SystemExit(f"{effects_path}: {test_lang.size} test examples, the run's data {test_index.size}")
    by_index = {e.index: e.lang for e in train_examples}
    pool_lang = np.array([by_index[int(i)] for i in pool], dtype=np.int64)
    train_lang = np.array([e.lang for e in train_examples], dtype=np.int64)
    counts = {r: np.bincount(train_lang[np.isin([e.index for e in train_examples],
                                                   leave_out_indices(train_examples, languages, r, dm.seed))],
                             minlength=len(languages)) for r in removed}
    if args.all_checkpoints:
        checkpoints = list_all_checkpoints(args.run)
        metas = {label: load_checkpoint(path)["crossling"] for label, path in checkpoints}

        def subset_weights(subset: list[str]) -> dict[str, float]:
            return dict(zip(subset, interval_weights([metas[label] for label in subset])))
    else:
        rates, per_step = learning_rates(args.run, len(dm.training_examples()))

        def subset_weights(subset: list[str]) -> dict[str, float]:
            found = checkpoint_weights([int(label.split("=")[1]) for label in subset], rates, per_step)
            return {f"epoch={e}": w for e, w in found.items()}
    labels = [label for label, _ in checkpoints]
    weights = subset_weights(labels)
    # per variant and checkpoint: g_test · Σ_ℓ c_ℓ m_ℓ for each removed set, before its weight
    unweighted: dict[str, dict[str, dict[str, np.ndarray]]] = {name: {} for name in args.variants}
    print(f"{args.run}: checkpoints {labels}, pool {pool.size}, test {test_index.size}, d = {args.k ** 2}, "
          f"removed {removed}")
    for label, path in checkpoints:
        load_weights(module, path)
        module.eval()
        plain = Sketcher(module.model, options)
        sketchers = {"plain": plain}
        if "adam" in args.variants:
            record = load_checkpoint(path).get("adam")
            try:
                scales = preconditioner_scales(record, plain.names)
            except ValueError as err:
                raise SystemExit(f"{path}: {err}") from None
            print(f"  {label}: Adam step {record['step']}, rank-one fidelity (mean cosine over "
                  f"{len(plain.names)} layers) {mean_fidelity(record, plain.names):.3f}", flush=True)
            sketchers["adam"] = Sketcher(module.model, options, scales=scales)
        for name in args.variants:
            start = time.perf_counter()
            train = sketch_rows(sketchers[name], module, dm, "train", pool, args.batch_size)
            test = sketch_rows(sketchers[name], module, dm, "test", test_index, args.batch_size)
            means = language_mean_gradients(train, pool_lang, len(languages), str(path))
            unweighted[name][label] = {r: removal_prediction(test, means, counts[r], 1.0) for r in removed}
            print(f"    {label} {name}: {pool.size + test_index.size} sketches in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    predicted = {name: {r: sum(weights[label] * by[label][r] for label in labels) for r in removed}
                 for name, by in unweighted.items()}
    retrained = cell_grid({r: effects[f"retrained_{r}"] for r in removed}, test_lang, removed, len(languages))
    if "plain" in predicted and not args.all_checkpoints:
        stored = {r: effects[f"predicted_{r}"] for r in removed}
        gap = max(float(np.abs(predicted["plain"][r] - stored[r]).max()) for r in removed)
        scale = max(float(np.abs(stored[r]).max()) for r in removed)
        print(f"\nplain vs the counterfactual stage's stored prediction: largest difference {gap:.2e} "
              f"(largest value {scale:.2e})")
    print(f"\n{'cells: test language x removed set':<36}" + "".join(f"{f'without {r}':>16}" for r in removed))
    for t, lang in enumerate(languages):
        print(f"  retrained  {lang:<24}" + "".join(f"{v:>+16.4f}" for v in retrained[t]))
    grids = {name: cell_grid(p, test_lang, removed, len(languages)) for name, p in predicted.items()}
    for name, grid in grids.items():
        for t, lang in enumerate(languages):
            print(f"  {name:<10} {lang:<24}" + "".join(f"{v:>+16.5f}" for v in grid[t]))
    print(f"\n{'prediction':<10}{'Pearson r':>11}{'slope':>10}{'size vs retrained (sum |cells|)':>34}")
    for name, grid in grids.items():
        r = correlate(grid.ravel(), retrained.ravel())
        size = np.abs(grid).sum() / np.abs(retrained).sum()
        print(f"{name:<10}{r.pearson_r:>+11.3f}{calibration_slope(grid.ravel(), retrained.ravel()):>10.4f}{size:>34.4f}")
    plant = getattr(dm, "plant", None)
    if plant is not None and plant.language in removed and "random" in removed:
        t, c, rc = languages.index(plant.language), removed.index(plant.language), removed.index("random")
        print(f"\nplanted cell ({plant.language} test, {plant.language} removed), fraction {plant.fraction}:")
        print(f"  retrained {retrained[t, c]:+.4f} (random control {retrained[t, rc]:+.4f})")
        for name, grid in grids.items():
            rank = 1 + int((grid[:, c] > grid[t, c]).sum())
            print(f"  {name:<6} {grid[t, c]:+.5f}: rank {rank}/{len(languages)} in its column, "
                  f"{grid[t, c] / grid[t, rc]:.2f} x the random control, "
                  f"{grid[t, c] / retrained[t, c]:.4f} x retraining")
    if len(labels) > 1:
        print_subsets(unweighted, subset_weights, labels, retrained, test_lang, removed, languages, plant)


def print_subsets(unweighted, subset_weights, labels, retrained, test_lang, removed, languages, plant) -> None:
    """Agreement with retraining over the last n checkpoints for each n, and over the epoch ends alone,
    each checkpoint weighted by the interval it stands for within that subset."""
    subsets = {f"last {n}": labels[-n:] for n in range(1, len(labels) + 1)}
    ends = [label for label in labels if "-step=" not in label]
    if ends != labels:
        subsets["epoch ends"] = ends
    planted = plant is not None and plant.language in removed and "random" in removed
    print(f"\n{'checkpoints':<24}{'variant':<8}{'Pearson r':>10}{'slope':>9}{'size':>8}"
          + (f"{'planted x retraining':>22}{'x control':>11}" if planted else ""))
    for title, subset in subsets.items():
        w = subset_weights(subset)
        for name, by in unweighted.items():
            grid = cell_grid({r: sum(w[label] * by[label][r] for label in subset) for r in removed},
                             test_lang, removed, len(languages))
            row = (f"{title:<24}{name:<8}{correlate(grid.ravel(), retrained.ravel()).pearson_r:>+10.3f}"
                   f"{calibration_slope(grid.ravel(), retrained.ravel()):>9.4f}"
                   f"{np.abs(grid).sum() / np.abs(retrained).sum():>8.4f}")
            if planted:
                t, c, rc = languages.index(plant.language), removed.index(plant.language), removed.index("random")
                row += f"{grid[t, c] / retrained[t, c]:>22.4f}{grid[t, c] / grid[t, rc]:>11.2f}"
            print(row)


if __name__ == "__main__":
    main()

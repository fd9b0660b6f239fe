"""EK-FAC influence (kronfluence) on a planted run, beside the methods crossling ranks from its sketches.

The attribution-methods issue asks for EK-FAC influence through a maintained library, chosen by whether it
runs with the installed torch and transformers on a CPU, pulls in no torchvision or CUDA build, and fits
e5-small's memory. This script measures that for kronfluence: it fits EK-FAC factors (sampled-label
Fisher, every linear layer the sketches cover) on the run's ranked training pool at one checkpoint, scores
the planted language's test items against the pool (``g_testᵀ (F + λI)⁻¹ g_train``), and reports the time,
the peak memory and how well the scores find the marked training items for the marked test items
(AUPRC, the permutation p against the language's unmarked test items, the top-m share), with TracIn and
TRAK's kernel over the run's sketches on the same items beside it.

    python benchmarks/ekfac_planted.py runs/demo/e5-xnli-planted/full --epoch 1

Float32, eval mode (dropout off), the checkpoint's weights. Needs kronfluence (scripts/setup.sh installs it
without torchvision).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from sketch_fidelity import load_run  # noqa: E402

from analysis.influence.methods import score_matrix  # noqa: E402
from analysis.planted import planted_retrieval  # noqa: E402
from analysis.sketch_store import read_sketch  # noqa: E402
from callbacks.checkpoints import load_weights  # noqa: E402
from callbacks.sketching import SketchOptions, get_sketcher  # noqa: E402
from datamodules.base import make_collate  # noqa: E402
from lightning_modules.stages.ekfac import EkfacOptions, ekfac_scores  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a planted full fit's run directory (sketches/, checkpoints/)")
    parser.add_argument("--epoch", type=int, default=None, help="checkpoint (default: the last sketched)")
    parser.add_argument("--damping", type=float, default=None,
                        help="λ (default: kronfluence's heuristic, 0.1 x the mean eigenvalue per layer)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--query-batch-size", type=int, default=32,
                        help="test items per pass over the pool (each holds 84 MB of preconditioned gradient on e5-small)")
    parser.add_argument("--m", type=int, default=40)
    parser.add_argument("--condition", default="full")
    args = parser.parse_args(argv)
    module, dm, checkpoints = load_run(args.run, None if args.epoch is None else [args.epoch])
    label, path = checkpoints[-1]
    epoch = int(label.split("=")[1])
    plant = dm.plant
    if plant is None:
        raise SystemExit(f"{args.run}: not a planted run (data.init_args.plant is not set)")
    train_sk = read_sketch(args.run, epoch, args.condition, "train")
    test_sk = read_sketch(args.run, epoch, args.condition, "test")
    test_rows = np.flatnonzero(test_sk.langs == plant.language)
    test_index, pool_index = test_sk.indices[test_rows], train_sk.indices
    pool_marked = np.isin(pool_index, dm.planted_indices("train"))
    test_marked = np.isin(test_index, dm.planted_indices("test"))
    in_language = np.ones(test_rows.size, dtype=bool)
    pool_lang = train_sk.langs == plant.language

    load_weights(module, path)
    module.eval()
    names = ["model." + n for n in get_sketcher(module.model, SketchOptions(kind="exact")).names]
    by_index = {"train": {e.index: e for e in dm.dataset("train").examples},
                "test": {e.index: e for e in dm.dataset("test").examples}}
    pool = [by_index["train"][int(i)] for i in pool_index]
    queries = [by_index["test"][int(i)] for i in test_index]
    print(f"{path}: EK-FAC over {len(names)} linear layers, pool {len(pool)}, {plant.language} test items "
          f"{len(queries)} ({int(test_marked.sum())} marked)", flush=True)
    scores, record = ekfac_scores(module, names, pool, queries, make_collate(dm.tokenizer.pad_token_id),
                                  EkfacOptions(damping=args.damping, batch_size=args.batch_size,
                                               query_batch_size=args.query_batch_size))
    fitted, scored = record["factor_seconds"], record["score_seconds"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  scores ({scores.shape[0]} x {scores.shape[1]}) in {scored:.0f} s; peak memory {peak:.2f} GiB")
    found = {"EK-FAC (kronfluence)": planted_retrieval(scores, pool_marked, test_marked, in_language, pool_lang, args.m)}
    tests, trains = [np.asarray(test_sk.data)[test_rows]], [np.asarray(train_sk.data)]
    for name, method, normalization in (("TracIn (cosine)", "tracin", "cosine"), ("TRAK's kernel", "trak", "dot")):
        s = score_matrix(method, tests, trains, normalization)
        found[name] = planted_retrieval(s, pool_marked, test_marked, in_language, pool_lang, args.m)
    print(f"\n{'method':<22}{'AUPRC':>8}{'chance':>8}{'unmarked':>10}{'p':>8}{f'top-{args.m} marked':>16}"
          f"{'unmarked':>10}")
    for name, r in found.items():
        print(f"{name:<22}{r.mean_ap:>8.3f}{r.chance:>8.3f}{r.unmarked_mean_ap:>10.3f}{r.ap_p:>8.4f}"
              f"{100 * r.top_m_share_marked:>15.1f}%{100 * r.top_m_share_unmarked:>9.1f}%")
    print(f"\ncheckpoint {label}; EK-FAC factors {fitted:.0f} s, scores {scored:.0f} s")


if __name__ == "__main__":
    main()

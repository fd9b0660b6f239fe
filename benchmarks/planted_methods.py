"""How well each attribution method finds the planted training items of a planted run, from its sketches.

A planted run (``data.init_args.plant``) marks a share of one language's training and test items with a
label-revealing word; the marked training items are the known answer for the marked test items. For each
method (``analysis/influence/methods.py``: TracIn under its normalizations, TRAK at several dampings, and
representation similarity when the sketch stage wrote representations, ``--sketch.kind representation``) this
prints the mean average precision of the marked pool items over the marked test items (against the
marked share a random ranking gets, and against unmarked test items of the language), and the planted
language's share of each test item's top-m, marked against unmarked. No model pass: the sketch stage's
files of every sketched checkpoint are read.

    python benchmarks/planted_methods.py runs/demo/e5-xnli-planted/full --dampings 0.01 0.1 1 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from sketch_fidelity import load_run  # noqa: E402

from analysis.influence.methods import method_sketches, score_matrix  # noqa: E402
from analysis.planted import planted_retrieval  # noqa: E402
from analysis.sketch_store import list_epochs, read_sketch  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a planted full fit whose sketch stage has run")
    parser.add_argument("--condition", default="full")
    parser.add_argument("--normalizations", nargs="+", default=["cosine", "dot"],
                        help="TracIn's (cosine: the influence stage's default; dot: plain TracIn)")
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0], help="TRAK's")
    parser.add_argument("--m", type=int, default=40, help="top-m for the language shares")
    args = parser.parse_args(argv)
    _, dm, _ = load_run(args.run, None)
    if dm.plant is None:
        raise SystemExit(f"{args.run}/config.yaml: data.init_args.plant is not set (not a planted run)")
    sketched = args.run / "sketches"
    epochs = [e for e in list_epochs(args.run) if (sketched / f"epoch={e}" / args.condition / "train.npy").is_file()]
    if not epochs:
        raise SystemExit(f"{sketched}: no finished {args.condition!r} sketches (run the sketch stage)")
    trains = [read_sketch(args.run, e, args.condition, "train") for e in epochs]
    tests = [read_sketch(args.run, e, args.condition, "test") for e in epochs]
    pool_marked = np.isin(trains[0].indices, dm.planted_indices("train"))
    test_marked = np.isin(tests[0].indices, dm.planted_indices("test"))
    test_lang, pool_lang = tests[0].langs == dm.plant.language, trains[0].langs == dm.plant.language
    print(f"{args.run}: planted {dm.plant.language} at {dm.plant.fraction}; checkpoints {epochs}; pool "
          f"{pool_marked.size} ({pool_marked.sum()} marked), {test_marked.sum()} marked test items")
    print(f"{'method':<22}{'AUPRC marked':>14}{'chance':>9}{'unmarked':>10}"
          f"{f'top-{args.m} {dm.plant.language} share: marked':>32}{'unmarked':>10}{'seconds':>9}")
    methods = [("tracin", n, None) for n in args.normalizations] + [("trak", None, d) for d in args.dampings]
    methods += [(m, None, None) for m in ("repsim", "ekfac") if method_sketches(args.run, m, args.condition, epochs)]
    for method, normalization, damping in methods:
        start = time.perf_counter()
        method_tests, method_trains = method_sketches(args.run, method, args.condition, epochs)
        scores = score_matrix(method, [t.data for t in method_tests], [t.data for t in method_trains],
                              normalization or "dot", damping or 0.1)
        found = planted_retrieval(scores, pool_marked, test_marked, test_lang, pool_lang, args.m)
        label = {"tracin": f"tracin ({normalization})", "trak": f"trak (damping {damping})"}.get(method, method)
        print(f"{label:<22}{found.mean_ap:>14.3f}{found.chance:>9.3f}{found.unmarked_mean_ap:>10.3f}"
              f"{found.top_m_share_marked:>32.1%}{found.top_m_share_unmarked:>10.1%}"
              f"{time.perf_counter() - start:>9.1f}")


if __name__ == "__main__":
    main()

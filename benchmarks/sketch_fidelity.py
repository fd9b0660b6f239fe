"""How well do sketches preserve TracIn's answers? Recall of the exact cosine-TracIn top-100
training examples (positive and negative) and the error of the per-language contribution
percentages, for several projections, against exact per-example gradients of the tiny model.

Every setting projects the same captured layer inputs and output gradients (one forward and
backward per batch, ``callbacks.sketching.capture_gradients``) with the engine's own
``Sketcher.project``; dense Gaussian projections of the exact gradients are shown for
reference. TracIn score = Σ over checkpoints of cos(g_train, g_test); top-m sets, recall and
language shares are computed with plain numpy.

    python benchmarks/sketch_fidelity.py --run-dir runs/demo/pawsx/full     # that run's checkpoints
    python benchmarks/sketch_fidelity.py                                     # fine-tunes tiny briefly first
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.masks import name_seed  # noqa: E402
from callbacks.checkpoints import list_checkpoints, load_checkpoint  # noqa: E402
from callbacks.sketching import Sketcher, SketchOptions, capture_gradients  # noqa: E402
from datamodules import PAWSXDataModule  # noqa: E402
from lightning_modules.backbones import build_classifier  # noqa: E402

# the default SketchOptions() must be one of these (it is chosen from this table)
SETTINGS = [
    ("kron k=16 sum (paper)", SketchOptions(k=16)),
    ("kron k=16 x4 pairs", SketchOptions(k=16, pairs=4)),
    ("kron k=32 sum (default)", SketchOptions(k=32)),
    ("kron k=32 x2 pairs", SketchOptions(k=32, pairs=2)),
    ("kron k=32 x4 pairs", SketchOptions(k=32, pairs=4)),
    ("kron k=64 sum", SketchOptions(k=64)),
    ("kron k=64 x2 pairs", SketchOptions(k=64, pairs=2)),
    ("kron k=8 concat", SketchOptions(k=8, combine="concat")),
    ("kron k=16 concat", SketchOptions(k=16, combine="concat")),
]
DENSE = [256, 1024]


def fine_tune(model, dm, steps: int, snapshots: int, seed: int = 0) -> list[tuple[str, dict]]:
    """Plain-torch fine-tuning of the tiny model on the training split (it memorises it: gradients
    of a model that has learnt something, unlike a near-random one's, which all point alike);
    returns ``snapshots`` evenly spaced weight copies, the TracIn checkpoints."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    states, step, correct, seen = [], 0, 0, 0
    at = {round(steps * (i + 1) / snapshots) for i in range(snapshots)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while step < steps:
            for batch in dm.train_dataloader():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = F.cross_entropy(logits, batch["labels"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
                seen += len(batch["labels"])
                if step in at:
                    states.append(
                        (
                            f"step {step} (train acc {correct / seen:.2f})",
                            {k: v.detach().clone() for k, v in model.state_dict().items()},
                        )
                    )
                    correct = seen = 0
                if step >= steps:
                    break
    model.eval()
    return states


def dense_matrix(p: int, d: int) -> torch.Tensor:
    rng = np.random.default_rng(name_seed("fidelity-dense", p, d))
    return torch.as_tensor((rng.standard_normal((p, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32))


def normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def sketch_batches(model, dm, split, exact: Sketcher, sketchers: dict, dense: dict):
    """Per batch: (dataset indices, languages, {method: unit-normalised (B, d) float32 vectors})."""
    for batch in dm.eval_dataloader(split):
        captured = capture_gradients(model, None, batch, None, exact.layers)
        g = exact.project(captured)
        out = {"exact": normalise(g)}
        for name, sk in sketchers.items():
            out[name] = normalise(sk.project(captured))
        for name, mat in dense.items():
            out[name] = normalise(g @ mat)
        yield batch["indices"].numpy(), batch["langs"].numpy(), {k: v.numpy() for k, v in out.items()}


def top_sets(scores: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    pos = np.argpartition(-scores, m - 1, axis=1)[:, :m]
    neg = np.argpartition(scores, m - 1, axis=1)[:, :m]
    return pos, neg


def recall(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(x, y)) / len(y) for x, y in zip(a, b)]))


def language_percent(
    top: np.ndarray, train_langs: np.ndarray, test_langs: np.ndarray, n_lang: int
) -> np.ndarray:
    """test language × train language: mean % of the top set from that train language."""
    share = np.stack([(train_langs[top] == lang).mean(1) for lang in range(n_lang)], axis=1) * 100
    return np.stack([share[test_langs == t].mean(0) for t in range(n_lang)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run-dir", type=Path, help="use this run's checkpoints (tiny model); default: fine-tune here"
    )
    parser.add_argument("--train-per-language", type=int, default=2000)
    parser.add_argument("--test-per-language", type=int, default=20)
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--fine-tune-steps", type=int, default=600, help="without --run-dir")
    parser.add_argument("--snapshots", type=int, default=3, help="checkpoints taken during that fine-tuning")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--layers",
        choices=["all", "encoder"],
        default="all",
        help="sketch every linear layer, or the encoder's only (without the classification head, "
        "whose gradient dominates a small model's)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    dm = PAWSXDataModule(
        train_per_language=args.train_per_language,
        test_per_language=args.test_per_language,
        eval_batch_size=64,
        batch_size=32,
        backbone="tiny",
    )
    model = build_classifier("tiny", attn_implementation="eager")
    states = []
    if args.run_dir:
        for epoch, path in list_checkpoints(args.run_dir):
            payload = load_checkpoint(path)
            states.append(
                (
                    f"epoch={epoch}",
                    {
                        k.removeprefix("model."): v
                        for k, v in payload["state_dict"].items()
                        if k.startswith("model.")
                    },
                )
            )
        if not states:
            raise SystemExit(f"{args.run_dir}: no checkpoints")
    else:
        model.set_attn_implementation("sdpa")
        states = fine_tune(model, dm, args.fine_tune_steps, args.snapshots)
        model.set_attn_implementation("eager")

    layers = None if args.layers == "all" else [r"\.encoder\."]
    exact = Sketcher(model, SketchOptions(kind="exact", layers=layers))
    sketchers = {name: Sketcher(model, replace(opts, layers=layers)) for name, opts in SETTINGS}
    p = exact.dim
    dense = {f"dense Gaussian d={d}": dense_matrix(p, d) for d in DENSE}
    train_ds = dm.dataset("train")
    n_train, n_test = len(train_ds), len(dm.dataset("test"))
    methods = ["exact", *sketchers, *dense]
    scores = {name: np.zeros((n_test, n_train)) for name in methods}
    train_langs = np.array([e.lang for e in train_ds.examples])
    test_langs = np.array([e.lang for e in dm.dataset("test").examples])
    for label, state in states:
        model.load_state_dict(state)
        test = {name: np.zeros((n_test, 0), dtype=np.float32) for name in methods}
        parts = list(sketch_batches(model, dm, "test", exact, sketchers, dense))
        order = np.concatenate([idx for idx, _, _ in parts])
        test = {
            name: np.concatenate([vec[name] for _, _, vec in parts])[np.argsort(order)] for name in methods
        }
        for idx, _, vec in sketch_batches(model, dm, "train", exact, sketchers, dense):
            for name in methods:
                scores[name][:, idx] += test[name] @ vec[name].T
        cos = scores["exact"] if len(states) == 1 else test["exact"] @ vec["exact"].T
        print(
            f"  {label}: sketched {n_train} train + {n_test} test examples; |cos| of the last batch: median "
            f"{np.median(np.abs(cos)):.3f}, 99th pct {np.percentile(np.abs(cos), 99):.3f} "
            f"({time.perf_counter() - start:.0f}s)",
            flush=True,
        )

    m = args.top
    n_lang = len(dm.languages)
    exact_pos, exact_neg = top_sets(scores["exact"], m)
    exact_pct = language_percent(exact_pos, train_langs, test_langs, n_lang)
    exact_pct_neg = language_percent(exact_neg, train_langs, test_langs, n_lang)
    print(
        f"\nTracIn fidelity, tiny model, {len(states)} checkpoint(s), {n_train} train x {n_test} test, "
        f"{args.layers} layers, exact gradient dim p={p}, top-{m}"
    )
    print(
        f"{'setting':<26}{'d':>7}{'k*pairs':>8}{'recall+':>9}{'recall-':>9}{'lang% err+':>11}{'max':>7}"
        f"{'lang% err-':>11}"
    )
    for name in methods[1:]:
        pos, neg = top_sets(scores[name], m)
        pct = language_percent(pos, train_langs, test_langs, n_lang)
        pct_neg = language_percent(neg, train_langs, test_langs, n_lang)
        if name in sketchers:
            o = sketchers[name].options
            d, width = sketchers[name].dim, str(o.k * o.pairs)
        else:
            d, width = dense[name].shape[1], "-"
        print(
            f"{name:<26}{d:>7}{width:>8}{recall(pos, exact_pos):>9.3f}{recall(neg, exact_neg):>9.3f}"
            f"{np.abs(pct - exact_pct).mean():>11.2f}{np.abs(pct - exact_pct).max():>7.2f}"
            f"{np.abs(pct_neg - exact_pct_neg).mean():>11.2f}"
        )
    print(
        f"(lang% err: mean absolute error of the test x train language percentages, in points; "
        f"{time.perf_counter() - start:.0f}s)"
    )


if __name__ == "__main__":
    main()

"""What the sketched gradient leaves out, measured: the share of TracIn's gradient dot products that the
embeddings and the LayerNorms carry on a fine-tuned run.

crossling sketches the gradient of every ``nn.Linear`` (weights and biases: attention, feed-forward,
pooler, head). The word, position and token-type embeddings (about 17 M of e5-small's 39 M trained
parameters after the bundled vocabulary cut) and the LayerNorms are not sketched. An embedding row's
gradient is non-zero only for the tokens an example holds, so two examples' embedding dot product is
non-zero only on tokens they share, mostly within a language: leaving it out could understate the
own-language influence. This script measures how much it does, from exact one-example gradients of
every trained parameter at a run's checkpoint:

- per parameter group, the mean dot product over same-language and cross-language (train, test) pairs,
  as a share of the whole gradient's;
- the correlation over pairs between the sketched layers' dot products and the whole gradient's, and the
  same for TracIn's cosine;
- per test example, the overlap of the top-m training items ranked by the sketched layers' cosine and by
  the whole gradient's, and the own-language share of each top-m.

    python benchmarks/gradient_coverage.py runs/demo/e5-xnli/full --train-per-language 10 --test-per-language 4

The run's ``config.yaml`` gives the model and data (a planted run's marker included). Eval mode (no
dropout), float32, as the sketch pass. Peak memory is about the test gradients held whole
(39 M floats each) plus one training gradient.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from sketch_fidelity import load_run  # noqa: E402

from callbacks.checkpoints import load_weights  # noqa: E402

GROUPS = ("sketched", "embeddings", "layernorm", "other")


def parameter_groups(model: torch.nn.Module) -> dict[str, str]:
    """Each trainable parameter's group: the sketched linear layers, the embeddings, the LayerNorms, the rest."""
    linear = {f"{name}.{p}" if name else p for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
              for p, _ in mod.named_parameters(recurse=False)}
    layernorm = {f"{name}.{p}" if name else p for name, mod in model.named_modules()
                 if isinstance(mod, torch.nn.LayerNorm) for p, _ in mod.named_parameters(recurse=False)}
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        groups[name] = ("sketched" if name in linear else "layernorm" if name in layernorm
                        else "embeddings" if "embeddings" in name else "other")
    return groups


def pick(examples, per_language: int, languages: int, seed: int):
    rng = np.random.default_rng(seed)
    chosen = []
    for lang in range(languages):
        own = [e for e in examples if e.lang == lang]
        chosen += [own[i] for i in sorted(rng.choice(len(own), size=per_language, replace=False))]
    return chosen


def gradient(module, example, groups: dict[str, str]) -> dict[str, torch.Tensor]:
    """One example's loss gradient, flattened per group (float32)."""
    module.zero_grad(set_to_none=True)
    ids = torch.tensor([example.input_ids])
    logits = module(ids, torch.ones_like(ids), None).float()
    F.cross_entropy(logits, torch.tensor([example.record.label])).backward()
    parts: dict[str, list[torch.Tensor]] = {g: [] for g in GROUPS}
    for name, param in module.model.named_parameters():
        if name in groups and param.grad is not None:
            parts[groups[name]].append(param.grad.detach().reshape(-1).clone())
    return {g: torch.cat(v) if v else torch.zeros(0) for g, v in parts.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a fine-tuning run folder (its config.yaml and checkpoints)")
    parser.add_argument("--epoch", type=int, default=None, help="checkpoint epoch (default: the last)")
    parser.add_argument("--train-per-language", type=int, default=10)
    parser.add_argument("--test-per-language", type=int, default=4)
    parser.add_argument("--m", type=int, default=5, help="top-m for the overlap")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    module, datamodule, checkpoints = load_run(args.run, None if args.epoch is None else [args.epoch])
    label, checkpoint = checkpoints[-1]
    load_weights(module, checkpoint)
    module.eval()
    groups = parameter_groups(module.model)
    sizes = {g: sum(p.numel() for n, p in module.model.named_parameters() if groups.get(n) == g) for g in GROUPS}
    n_lang = len(datamodule.languages)
    train = pick(datamodule.dataset("train").examples, args.train_per_language, n_lang, args.seed)
    test = pick(datamodule.dataset("test").examples, args.test_per_language, n_lang, args.seed + 1)
    start = time.perf_counter()
    test_grads = [gradient(module, e, groups) for e in test]
    dots = np.zeros((len(GROUPS), len(test), len(train)))
    norms_test = np.array([[float(g[k].square().sum()) for k in GROUPS] for g in test_grads])  # test x group
    norms_train = np.zeros((len(train), len(GROUPS)))
    for j, example in enumerate(train):
        grad = gradient(module, example, groups)
        norms_train[j] = [float(grad[k].square().sum()) for k in GROUPS]
        for i, tg in enumerate(test_grads):
            dots[:, i, j] = [float(tg[k] @ grad[k]) if grad[k].numel() else 0.0 for k in GROUPS]
    seconds = time.perf_counter() - start
    total = dots.sum(0)
    sketched = dots[0]
    same = np.equal.outer([e.lang for e in test], [e.lang for e in train])
    print(f"run {args.run} {label}: {len(train)} training x {len(test)} test examples, {seconds:.0f} s")
    print("trained parameters: " + ", ".join(f"{g} {sizes[g] / 1e6:.1f} M" for g in GROUPS))
    print("mean gradient dot product, share of the whole gradient's (same-language pairs / cross-language pairs):")
    for k, g in enumerate(GROUPS):
        print(f"  {g:11s} {dots[k][same].mean() / total[same].mean():7.3f} / {dots[k][~same].mean() / total[~same].mean():7.3f}")
    r_dot = np.corrcoef(sketched.ravel(), total.ravel())[0, 1]
    cos_sketched = sketched / np.sqrt(np.outer(norms_test[:, 0], norms_train[:, 0]))
    cos_total = total / np.sqrt(np.outer(norms_test.sum(1), norms_train.sum(1)))
    r_cos = np.corrcoef(cos_sketched.ravel(), cos_total.ravel())[0, 1]
    print(f"correlation over pairs, sketched layers vs whole gradient: dot {r_dot:.4f}, cosine {r_cos:.4f}")
    m = args.m
    overlap, own_sketched, own_total = [], [], []
    train_lang = np.array([e.lang for e in train])
    for i, e in enumerate(test):
        top_s = np.argsort(-cos_sketched[i], kind="stable")[:m]
        top_t = np.argsort(-cos_total[i], kind="stable")[:m]
        overlap.append(len(set(top_s) & set(top_t)) / m)
        own_sketched.append(np.mean(train_lang[top_s] == e.lang))
        own_total.append(np.mean(train_lang[top_t] == e.lang))
    print(f"top-{m} of {len(train)} by cosine: overlap {np.mean(overlap):.3f}; own-language share "
          f"{np.mean(own_sketched):.3f} (sketched layers) vs {np.mean(own_total):.3f} (whole gradient); "
          f"chance {1 / n_lang:.3f}")


if __name__ == "__main__":
    main()

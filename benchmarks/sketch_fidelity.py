"""How well do sketches preserve TracIn's answers, and what does each setting cost? For every
projection setting, against exact per-example gradients of the same layers: recall of the exact
top-m sets (m = 1 % and 5 % of the pool, most positive and most negative), the median Spearman
correlation per test example, the error of the per-language shares of the top-5 % sets (mean and
max over test × train language cells, percentage points), and the setting's sketching throughput.

Any run directory works (its ``config.yaml`` names backbone, vocabulary and data, its
``checkpoints/`` the TracIn checkpoints): the e5-small demo run, whose model has learned its task,
is the one that matters; the tiny model's nearly parallel gradients flatter every projection.
Without ``--run-dir`` the tiny model is fine-tuned briefly here (the flattered reference).

Every setting projects the same captured layer inputs and output gradients (one forward and
backward per batch, ``callbacks.sketching.capture_gradients``). Exact gradients are streamed: the
test side (n_test × p float32) is held, each pool batch is scored and dropped. TracIn score = Σ
over checkpoints of cos(g_train, g_test). Settings:

  kron k=.. [x pairs]  crossling's Kronecker projection (``SketchOptions``), summed over layers;
  ... bf16             the same, its forward and backward under bfloat16 autocast (``precision="bf16"``,
                       what ``auto`` picks on AVX-512 CPUs): a second capture of each batch;
  pca k=..             data-dependent Kronecker factors: each side's k columns are the top principal
                       directions of that layer's inputs [x; 1] / output gradients on a sample of the
                       *pool* (training data only), with random column signs per layer so the layers'
                       cross terms vanish in expectation when summed (the LoGra initialisation);
  count d=..           a count-sketch of each example's materialised exact gradient (one hash/sign per
                       coordinate): exact cost plus a scatter-add.

    python benchmarks/sketch_fidelity.py --run-dir runs/demo/e5-xnli/full --epochs 1 --test 60
    python benchmarks/sketch_fidelity.py            # tiny model, fine-tuned here (flattered)
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.masks import load_subnetworks, name_seed, resolve_mask  # noqa: E402
from callbacks.checkpoints import list_checkpoints, load_weights  # noqa: E402
from callbacks.fidelity_sample import compare_scores, sample_indices, scale_rows_  # noqa: E402
from callbacks.sketching import Sketcher, SketchOptions, capture_gradients, sketch_batch  # noqa: E402
from lightning_modules.classifier import SequenceClassifier  # noqa: E402

# the default SketchOptions() must be one of these (it is chosen from this table)
FP32 = "32"
KRONECKER = [
    ("kron k=16 (paper)", SketchOptions(k=16, precision=FP32)),
    ("kron k=32", SketchOptions(k=32, precision=FP32)),
    ("kron k=32 x4 pairs", SketchOptions(k=32, pairs=4, precision=FP32)),
    ("kron k=64", SketchOptions(k=64, precision=FP32)),
    ("kron k=64 x4 pairs", SketchOptions(k=64, pairs=4, precision=FP32)),
    ("kron k=128", SketchOptions(k=128, precision=FP32)),
    ("kron k=64 bf16", SketchOptions(k=64, precision="bf16")),
    ("kron k=64 x4 pairs bf16 (default)", SketchOptions(k=64, pairs=4, precision="bf16")),
    ("kron k=128 bf16", SketchOptions(k=128, precision="bf16")),
]
PCA = [32, 64]
COUNT = [1024, 4096]


# -- data-dependent and count-sketch projections ------------------------------------------------------
class PCASketcher(Sketcher):
    """Kronecker sketch whose factors are each layer's top-k principal directions (fitted by ``fit``)."""

    def __init__(self, model, options: SketchOptions):
        super().__init__(model, options)
        self._fitted: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def fit(self, model, gates, batches, head_mask) -> None:
        k = self.options.k
        cx = [torch.zeros(mod.in_features + 1, mod.in_features + 1, dtype=torch.float64) for _, mod in self.layers]
        cg = [torch.zeros(mod.out_features, mod.out_features, dtype=torch.float64) for _, mod in self.layers]
        for batch in batches:
            cap = capture_gradients(model, gates, batch, head_mask, self.layers)
            keep = cap.token_mask
            for (i, x), g in zip(cap.records, cap.grads):
                if g is None:
                    continue
                x = torch.cat([x, torch.ones_like(x[..., :1])], -1)
                if keep is not None and x.dim() == 3 and x.shape[1] == keep.shape[1]:
                    x, g = x * keep[..., None], g * keep[..., None]
                x, g = x.reshape(-1, x.shape[-1]).double(), g.reshape(-1, g.shape[-1]).double()
                cx[i] += x.T @ x
                cg[i] += g.T @ g
        fitted = []
        for (name, _), a, b in zip(self.layers, cg, cx):
            sides = []
            for side, cov in (("out", a), ("in", b)):
                vecs = torch.linalg.eigh(cov).eigenvectors[:, -k:]  # top k (ascending order)
                if vecs.shape[1] < k:  # a side narrower than k: pad with zero columns
                    vecs = torch.cat([vecs, vecs.new_zeros(vecs.shape[0], k - vecs.shape[1])], 1)
                rng = np.random.default_rng(name_seed("pca-signs", name, side))
                signs = torch.as_tensor(rng.choice([-1.0, 1.0], size=k))
                sides.append((vecs * signs).float())
            fitted.append((sides[0], sides[1]))
        self._fitted = fitted

    def matrices(self, device, dtype):
        if self._fitted is None:
            raise RuntimeError("PCASketcher.fit must run before projecting")
        return [(a.to(device, dtype), b.to(device, dtype)) for a, b in self._fitted]


class CountSketch:
    """d buckets; coordinate j of the flattened exact gradient goes to bucket h(j) with sign s(j)."""

    def __init__(self, p: int, d: int):
        rng = np.random.default_rng(name_seed("fidelity-count", p, d))
        self.d = d
        self.bucket = torch.as_tensor(rng.integers(0, d, p, dtype=np.int64))
        self.sign = torch.as_tensor(rng.integers(0, 2, p).astype(np.float32) * 2 - 1)

    def __call__(self, exact: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(exact.shape[0], self.d, dtype=exact.dtype)
        for row in range(exact.shape[0]):
            out[row].index_add_(0, self.bucket, exact[row] * self.sign)
        return out


# -- the run ---------------------------------------------------------------------------------------------
def load_run(run_dir: Path, epochs: list[int] | None):
    """(module, datamodule, [(label, checkpoint path)]) of a run directory, as its config.yaml built them."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise SystemExit(f"{config_path}: not found (a run directory written by crossling fit has one)")
    config = yaml.safe_load(config_path.read_text())
    model_args = {k: v for k, v in config["model"].items() if k not in ("subnetworks", "random_mask_seed")}
    data = config["data"]
    module_name, class_name = data["class_path"].rsplit(".", 1)
    init = {**data["init_args"], "backbone": model_args["backbone"]}  # the CLI links the tokenizer to the model
    dm = getattr(importlib.import_module(module_name), class_name)(**init)
    dm.setup("fit")
    module = SequenceClassifier(languages=list(dm.languages), **model_args)
    checkpoints = list_checkpoints(run_dir)
    if epochs is not None:
        missing = set(epochs) - {e for e, _ in checkpoints}
        if missing:
            raise SystemExit(f"{run_dir}/checkpoints: no checkpoint for epoch(s) {sorted(missing)}")
        checkpoints = [(e, p) for e, p in checkpoints if e in epochs]
    if not checkpoints:
        raise SystemExit(f"{run_dir}/checkpoints: no epoch=<E>.ckpt files")
    return module, dm, [(f"epoch={e}", p) for e, p in checkpoints]


def tiny_run(steps: int, snapshots: int, tmp: Path):
    """The tiny model fine-tuned briefly on bundled PAWS-X, with ``snapshots`` checkpoints."""
    from callbacks.checkpoints import atomic_torch_save
    from datamodules import PAWSXDataModule

    dm = PAWSXDataModule(train_per_language=300, test_per_language=20, batch_size=32, backbone="tiny-random")
    dm.setup("fit")
    module = SequenceClassifier(backbone="tiny-random", languages=list(dm.languages))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module.train()
    at = {round(steps * (i + 1) / snapshots) for i in range(snapshots)}
    out, step = [], 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        while step < steps:
            for batch in dm.train_dataloader():
                logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = F.cross_entropy(logits, batch["labels"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if step in at:
                    path = tmp / f"step={step}.ckpt"
                    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                    atomic_torch_save({"crossling": {"format": 1, "epoch": step}, "state_dict": state}, path)
                    out.append((f"step {step}", path))
                if step >= steps:
                    break
    return module, dm, out


def sample(dataset, count: int | None, what: str) -> np.ndarray:
    """``count`` dataset positions, drawn as the fidelity stage draws them; all when ``count`` is None."""
    if count is not None and count > len(dataset):
        raise SystemExit(f"--{what} {count}: the run's {what} split has only {len(dataset)} examples")
    return sample_indices(len(dataset), count, "train" if what == "pool" else "test", 0)


def batches_of(dm, split: str, positions: np.ndarray, size: int):
    """Length-ordered batches of the given dataset positions (as the sketch stage reads them)."""
    from datamodules.base import make_collate

    dataset = dm.dataset(split)
    order = sorted(positions.tolist(), key=lambda i: len(dataset[i].input_ids))
    collate = make_collate(dm.tokenizer.pad_token_id)
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        batch = collate([dataset[i] for i in chunk])
        yield np.asarray(chunk), batch


def unit(x: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``x`` with rows scaled as the fidelity stage scales them for cosine TracIn."""
    return scale_rows_(x.to(torch.float32, copy=True), "cosine", "test")


def throughput(fn, batch: dict, reps: int = 2) -> float:
    fn(batch)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn(batch)
        best = min(best, time.perf_counter() - start)
    return batch["input_ids"].shape[0] / best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, help="a run directory (default: fine-tune the tiny model here)")
    parser.add_argument("--epochs", type=int, nargs="+", help="checkpoints to sum over (default: all)")
    parser.add_argument("--pool", type=int, help="training examples ranked (default: the run's whole train split)")
    parser.add_argument(
        "--pool-per-language", type=int, help="rank the study's pool instead: influence.train_per_language items per language"
    )
    parser.add_argument("--test", type=int, default=60, help="test examples (seeded sample)")
    parser.add_argument("--mask", default="full", help="gradients under this mask: full or a language's subnetwork")
    parser.add_argument("--fit-examples", type=int, default=128, help="pool examples the pca factors are fitted on")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="regular expression: measure only the settings whose name it matches")
    args = parser.parse_args(argv)
    wanted = (lambda name: re.search(args.only, name) is not None) if args.only else (lambda name: True)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.run_dir:
        module, dm, checkpoints = load_run(args.run_dir, args.epochs)
        what = f"{args.run_dir} ({module.hparams.backbone})"
    else:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="crossling-fidelity-"))
        module, dm, checkpoints = tiny_run(600, 3, tmp)
        what = "tiny model fine-tuned here (flattered: nearly parallel gradients)"
    model, gates = module.model, module.gates
    head_mask = None
    if args.mask != "full":
        if not args.run_dir:
            raise SystemExit("--mask needs --run-dir (its subnetworks/)")
        subs = load_subnetworks(args.run_dir / "subnetworks", list(dm.languages), gates.shape)
        head_mask = torch.as_tensor(resolve_mask(args.mask, subs, gates.shape), dtype=torch.float32)
    if args.pool_per_language:
        from callbacks.sketch_plan import train_pool

        train_pos = train_pool(dm.dataset("train"), args.pool_per_language)  # dataset indices = positions
    else:
        train_pos = sample(dm.dataset("train"), args.pool, "pool")
    test_pos = sample(dm.dataset("test"), args.test, "test")
    train_langs = np.array([dm.dataset("train")[int(i)].lang for i in train_pos])
    test_langs = np.array([dm.dataset("test")[int(i)].lang for i in test_pos])
    column = {int(p): c for c, p in enumerate(train_pos)}
    row = {int(p): r for r, p in enumerate(test_pos)}

    exact = Sketcher(model, SketchOptions(kind="exact", precision=FP32))
    kronecker = [(name, opts) for name, opts in KRONECKER if wanted(name)]
    sketchers = {name: Sketcher(model, opts) for name, opts in kronecker}
    low_precision = {name for name, opts in kronecker if opts.precision != FP32}
    pcas = {f"pca k={k}": PCASketcher(model, SketchOptions(k=k, precision=FP32)) for k in PCA if wanted(f"pca k={k}")}
    counts = {f"count d={d}": CountSketch(exact.dim, d) for d in COUNT if wanted(f"count d={d}")}
    methods = ["exact", *sketchers, *pcas, *counts]
    scores = {name: np.zeros((len(test_pos), len(train_pos))) for name in methods}
    print(f"fidelity of gradient sketches: {what}; mask {args.mask}; {len(train_pos)} pool x {len(test_pos)} "
          f"test; {len(exact.layers)} layers, exact p={exact.dim:,}; checkpoints {[c for c, _ in checkpoints]}",
          flush=True)
    median_cos = []
    for label, path in checkpoints:
        load_weights(module, path)
        fit_pos = train_pos[np.random.default_rng(name_seed("pca-fit", label)).permutation(len(train_pos))]
        fit_batches = [b for _, b in batches_of(dm, "train", np.sort(fit_pos[: args.fit_examples]), args.batch_size)]
        for pca in pcas.values():
            pca.fit(model, gates, fit_batches, head_mask)

        def project(batch):
            cap = capture_gradients(model, gates, batch, head_mask, exact.layers)
            g = exact.project(cap)
            out = {"exact": unit(g)}
            fp32 = {name: sk for name, sk in {**sketchers, **pcas}.items() if name not in low_precision}
            out.update({name: unit(sk.project(cap)) for name, sk in fp32.items()})
            if low_precision:
                del cap  # the bfloat16 pass is its own forward and backward
                cap = capture_gradients(model, gates, batch, head_mask, exact.layers, precision="bf16")
                out.update({name: unit(sketchers[name].project(cap)) for name in low_precision})
            out.update({name: unit(cs(g)) for name, cs in counts.items()})
            return out

        test_vecs: dict[str, torch.Tensor] = {}  # filled row by row: the exact side is n_test x p
        for pos, b in batches_of(dm, "test", test_pos, args.batch_size):
            rows = torch.as_tensor([row[int(p)] for p in pos])
            for name, vec in project(b).items():
                if name not in test_vecs:
                    test_vecs[name] = torch.zeros(len(test_pos), vec.shape[1])
                test_vecs[name][rows] = vec
        cos = []
        for pos, b in batches_of(dm, "train", train_pos, args.batch_size):
            vec = project(b)
            cols = [column[int(p)] for p in pos]
            for name in methods:
                block = (test_vecs[name] @ vec[name].T).double().numpy()
                scores[name][:, cols] += block
                if name == "exact":
                    cos.append(np.abs(block).ravel())
        median_cos.append(float(np.median(np.concatenate(cos))))
        print(f"  {label}: median |cos| of exact gradients {median_cos[-1]:.3f} ({time.perf_counter() - start:.0f}s)",
              flush=True)
        del test_vecs

    # throughput: the streaming sketch of one real batch at the median length, per setting
    mid_batch = next(
        b for i, (_, b) in enumerate(batches_of(dm, "train", train_pos, 32)) if i >= len(train_pos) // 64
    )
    mask_b = head_mask
    speed = {"exact": throughput(lambda b: sketch_batch(model, gates, b, mask_b, SketchOptions(kind="exact", precision=FP32)), mid_batch)}
    for name, opts in kronecker:
        speed[name] = throughput(lambda b, o=opts: sketch_batch(model, gates, b, mask_b, o), mid_batch)
    for name, pca in pcas.items():
        speed[name] = throughput(lambda b, s=pca: s(model, gates, b, mask_b), mid_batch)
    for name, cs in counts.items():
        speed[name] = throughput(lambda b, c=cs: c(sketch_batch(model, gates, b, mask_b, SketchOptions(kind="exact", precision=FP32))[0]),
                                 mid_batch, reps=1)

    n_pool, n_lang = len(train_pos), len(dm.languages)
    ms = sorted({max(1, round(0.01 * n_pool)), max(1, round(0.05 * n_pool))})
    print(f"\nTracIn-cosine fidelity vs exact gradients, {len(checkpoints)} checkpoint(s), pool {n_pool}, "
          f"{len(test_pos)} test; top-m sets m = {' and '.join(map(str, ms))} (1 % and 5 %)")
    header = f"{'setting':<26}{'d':>7}"
    for m in ms:
        header += f"{'rec+@' + str(m):>9}{'rec-@' + str(m):>9}"
    header += f"{'spearman':>9}{'share+ err':>11}{'max':>6}{'share- err':>11}{'max':>6}{'ex/s':>7}"
    print(header)
    for name in methods[1:]:
        if name in sketchers:
            d = sketchers[name].dim
        elif name in pcas:
            d = pcas[name].dim
        else:
            d = counts[name].d
        line = f"{name:<26}{d:>7}"
        verdicts = [compare_scores(scores[name], scores["exact"], train_langs, test_langs, n_lang, m) for m in ms]
        for v in verdicts:
            line += f"{v['recall_pos']:>9.3f}{v['recall_neg']:>9.3f}"
        err = verdicts[-1]["share_error_pp"]
        line += f"{verdicts[-1]['spearman']:>9.3f}"
        line += f"{err['pos']['mean']:>11.2f}{err['pos']['max']:>6.1f}{err['neg']['mean']:>11.2f}{err['neg']['max']:>6.1f}"
        line += f"{speed[name]:>7.1f}"
        print(line, flush=True)
    print(f"{'exact':<26}{exact.dim:>7}{'':>{18 * len(ms) + 43}}{speed['exact']:>7.1f}")
    print(f"(spearman: mean over test examples; share err: |sketched - exact| per-language share of the top-{ms[-1]} "
          "sets, test x train language cells, percentage points, as the fidelity stage reports it; ex/s: streaming "
          "sketch of one batch of 32 at the median length; "
          f"{time.perf_counter() - start:.0f}s in all)")


if __name__ == "__main__":
    main()

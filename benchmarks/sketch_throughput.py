"""Throughput of crossling's gradient sketching against the obvious alternatives, on one model
and one batch of real bundled XNLI pairs (tokenised by XLM-R's vocabulary, the batch at the median
length of the length-ordered evaluation order, as the sketch stage reads them; random weights):

  (a) a training step (train mode, SDPA attention as crossling trains, AdamW),
  (b) crossling's sketching (``sketch_batch``, default options, i.e. four Kronecker pairs and
      bfloat16 autocast where the CPU has AVX-512; also the previous default (one pair, float32), with ``attention="sdpa"``,
      with the paper's k=16, under one head mask, and under M masks in one pass: the batch's
      examples each repeated under M masks, i.e. B/M examples × M masks),
  (c) a naive per-example loop: one backward per example, flatten the gradient of the same
      layers, project it with a count-sketch to the same d,
  (d) an inference-only forward (eval, ``torch.inference_mode``, SDPA), in float32 (the ratios' unit)
      and under bfloat16 autocast,

for the tiny model (hidden 64, 4 layers, 4 heads), a small one (hidden 256, 6 layers, 8 heads),
multilingual-e5-small's shape (BERT layout, hidden 384, 12 heads; 6 and 12 layers) and XLM-R
base's. Token ids beyond a shape's vocabulary are folded into it (only lengths matter for time).
Each number is the best of several interleaved repetitions (the machine is shared; the best run is
the least disturbed one); on a busy machine ``--threads 1 --clock cpu`` times each call by its own
CPU time, which other processes do not inflate. The last line is
``ratios: sketch/train_step=<b/a tiny> sketch/naive_base=<b/c base> sketch/forward=<min over shapes>``.

    python benchmarks/sketch_throughput.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

# OpenMP threads that spin while waiting turn a shared machine's load into wild timing swings;
# waiting passively keeps the comparison fair (it applies to every method alike).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from callbacks.sketching import SketchOptions, autocast_for, get_sketcher, resolve_precision, sketch_batch  # noqa: E402
from lightning_modules.gates import HeadGates  # noqa: E402

SHAPES = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, vocab_size=8000
    ),
    "small": dict(
        hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1024, vocab_size=8000
    ),
    # multilingual-e5-small (BERT layout) with the demo's bundled-data vocabulary, all 12 layers or 6
    "e5-small-6": dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=45298,
        layout="bert",
    ),
    "e5-small-12": dict(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536, vocab_size=45298,
        layout="bert",
    ),
    "base": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        vocab_size=250002,
    ),
}
LENGTH = 128


def build(shape: str, seed: int = 0):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    sizes = dict(SHAPES[shape])
    if sizes.pop("layout", "xlmr") == "bert":
        config = BertConfig(max_position_embeddings=512, type_vocab_size=2, pad_token_id=1, num_labels=2, **sizes)
        model_class = BertForSequenceClassification
    else:
        config = XLMRobertaConfig(max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, num_labels=2, **sizes)
        model_class = XLMRobertaForSequenceClassification
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def real_pairs(count: int = 1500) -> list[list[int]]:
    """Token ids of bundled XNLI training pairs (XLM-R's vocabulary, as e5-small tokenises them),
    in the sketch stage's reading order: shortest first."""
    from datamodules import XNLIDataModule

    dm = XNLIDataModule(
        source="bundled", train_per_language=count // 5, dev_per_language=1, test_per_language=1, backbone="e5-small"
    )
    dm.setup("fit")
    return sorted((e.input_ids for e in dm.dataset("train").examples), key=len)


def make_batch(pairs: list[list[int]], batch: int, vocab: int, seed: int = 0) -> dict:
    """``batch`` consecutive pairs at the middle of the length order, padded to the longest."""
    start = max(0, len(pairs) // 2 - batch // 2)
    rows = pairs[start : start + batch]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), 1, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r) % vocab
        att[i, : len(r)] = 1
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": ids, "attention_mask": att, "labels": torch.randint(0, 2, (len(rows),), generator=g)}


def random_masks(shape: tuple[int, int], count: int, seed: int = 0) -> torch.Tensor:
    """``count`` L×H 0/1 masks with about 40 % of the heads off (the demo's subnetworks disable 49-58 %)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((count, *shape), generator=g) > 0.4).float()


class MultiMask:
    """B/M examples, each under M masks, in one pass (per-example B×L×H gates)."""

    def __init__(self, model, gates: HeadGates, batch: dict, masks: torch.Tensor, options: SketchOptions):
        m = masks.shape[0]
        n = batch["input_ids"].shape[0] // m
        self.batch = {k: v[:n].repeat_interleave(m, 0) for k, v in batch.items()}
        self.head = masks.repeat(n, 1, 1)
        self.model, self.gates, self.options = model, gates, options

    def __call__(self):
        return sketch_batch(self.model, self.gates, self.batch, self.head, self.options)


class TrainStep:
    def __init__(self, model, batch):
        self.model, self.batch = model, batch
        try:  # as crossling trains (lightning_modules/optim.py): fused where the build has it
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=True)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)

    def __call__(self):
        self.model.train()
        logits = self.model(
            input_ids=self.batch["input_ids"], attention_mask=self.batch["attention_mask"]
        ).logits
        loss = F.cross_entropy(logits, self.batch["labels"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class NaiveLoop:
    """One backward per example; the flattened gradient of the sketched layers, count-sketched to d."""

    def __init__(self, model, batch, options: SketchOptions, d: int):
        self.model, self.batch, self.d = model, batch, d
        layers = get_sketcher(model, options).layers
        self.params = [p for _, mod in layers for p in (mod.weight, mod.bias) if p is not None]
        self.selected = {id(p) for p in self.params}
        p = sum(t.numel() for t in self.params)
        rng = np.random.default_rng(0)
        self.bucket = torch.as_tensor(rng.integers(0, d, p, dtype=np.int32))
        self.sign = torch.as_tensor(rng.integers(0, 2, p).astype(np.float32) * 2 - 1)

    def __call__(self):
        model = self.model
        model.eval()
        model.set_attn_implementation("eager")
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in flags:
            p.requires_grad_(id(p) in self.selected)
        out = []
        for i in range(self.batch["input_ids"].shape[0]):
            model.zero_grad(set_to_none=True)
            logits = model(
                input_ids=self.batch["input_ids"][i : i + 1],
                attention_mask=self.batch["attention_mask"][i : i + 1],
            ).logits
            F.cross_entropy(logits, self.batch["labels"][i : i + 1], reduction="sum").backward()
            flat = torch.cat([p.grad.reshape(-1) for p in self.params])
            out.append(torch.zeros(self.d).index_add_(0, self.bucket, flat * self.sign))
        for p, flag in flags:
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
        model.set_attn_implementation("sdpa")
        return torch.stack(out)


def forward(model, batch, attention: str = "sdpa", precision: str = "32"):
    def run():
        model.eval()
        model.set_attn_implementation(attention)
        with torch.inference_mode(), autocast_for(precision, "cpu"):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        model.set_attn_implementation("sdpa")

    return run


def measure(fns: dict, reps: int, clock=time.perf_counter) -> dict[str, float]:
    """Best seconds per call of each function, interleaved so that load hits them alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            start = clock()
            fn()
            best[name] = min(best[name], clock() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about 5 min on 2 cores)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--masks", type=int, default=4, help="M: masks per pass in the several-masks column")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: this thread's CPU time (needs --threads 1; robust on a shared machine)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        parser.error("--clock cpu measures one thread: add --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    load = os.getloadavg()[0]
    if args.clock == "wall" and load > os.cpu_count() - 0.5:
        print(
            f"note: load average {load:.1f} on {os.cpu_count()} cores; wall-clock numbers will be noisy "
            "(--threads 1 --clock cpu is robust to other processes)"
        )
    options = SketchOptions()
    precision = resolve_precision(options.precision, "cpu")
    variants = {
        "before": SketchOptions(k=64, pairs=1, precision="32"),  # the previous default: one pair, float32
        "sdpa": replace(options, attention="sdpa"),
        "paper": SketchOptions(k=16),
    }
    plan = {  # batch size, repetitions (quick, full)
        "tiny": (32, 3, 8),
        "small": (32, 2, 6),
        "e5-small-6": (32, 2, 5),
        "e5-small-12": (32, 2, 5),
        "base": (8, 1, 3),
    }
    pairs = real_pairs()
    mid = len(pairs[len(pairs) // 2])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; {len(pairs)} bundled "
        f"XNLI pairs, median length {mid} tokens"
    )
    print(
        f"sketch: default {options} (precision auto = {precision} here); before: the previous default (k=64, one pair, "
        "float32); sdpa: attention='sdpa'; paper: k=16 (d=256); mask: under one head "
        f"mask; x{args.masks}: B/{args.masks} examples x {args.masks} masks in one pass (example-mask pairs/s); "
        "train: float32 training step; fwd: float32 inference forward; fwd16: the same under bfloat16 autocast"
    )
    print(
        f"{'model':<12}{'batch':>6}{'width':>6}{'train':>8}{'sketch':>8}{'before':>8}{'sdpa':>8}{'paper':>8}{'mask':>8}"
        f"{'x' + str(args.masks):>8}{'naive':>8}{'fwd':>8}{'fwd16':>8}{'sk/train':>10}{'sk/naive':>10}{'sk/fwd':>8}"
        f"{'sk/fwd16':>9}{'bef/fwd':>9}  (examples/s; ratios of the default)",
        flush=True,
    )
    results = {}
    for shape in args.models:
        size, quick_reps, full_reps = plan[shape]
        model = build(shape)
        gates = HeadGates(model)
        batch = make_batch(pairs, size, SHAPES[shape]["vocab_size"])
        masks = random_masks(gates.shape, args.masks)
        d = get_sketcher(model, options).dim
        naive_batch = {k: v[: max(1, size // 4)] for k, v in batch.items()}
        fns = {
            "train": TrainStep(model, batch),
            "sketch": lambda m=model, b=batch: sketch_batch(m, None, b, None, options),
            **{
                name: (lambda m=model, b=batch, o=o: sketch_batch(m, None, b, None, o))
                for name, o in variants.items()
            },
            "mask": lambda m=model, g=gates, b=batch, h=masks[0]: sketch_batch(m, g, b, h, options),
            "multi": MultiMask(model, gates, batch, masks, options),
            "naive": NaiveLoop(model, naive_batch, options, d),
            "fwd": forward(model, batch),
            "fwd16": forward(model, batch, precision="bf16"),
        }
        seconds = measure(fns, quick_reps if args.quick else full_reps, clock)
        counts = {"naive": len(naive_batch["labels"]), "multi": fns["multi"].batch["labels"].shape[0]}
        r = {name: counts.get(name, size) / s for name, s in seconds.items()}
        results[shape] = r
        print(
            f"{shape:<12}{size:>6}{batch['input_ids'].shape[1]:>6}"
            + "".join(f"{r[n]:>8.1f}" for n in fns)
            + f"{r['sketch'] / r['train']:>10.2f}{r['sketch'] / r['naive']:>10.2f}{r['sketch'] / r['fwd']:>8.2f}"
            f"{r['sketch'] / r['fwd16']:>9.2f}{r['before'] / r['fwd']:>9.2f}",
            flush=True,
        )
        gates.remove()
        del model, fns
    tiny, base = results.get("tiny"), results.get("base")
    a = f"{tiny['sketch'] / tiny['train']:.2f}" if tiny else "nan"
    c = f"{base['sketch'] / base['naive']:.2f}" if base else "nan"
    z = min(r["sketch"] / r["fwd"] for r in results.values())
    before = min(r["before"] / r["fwd"] for r in results.values())
    print(f"before (k=64, one pair, float32): sketch/forward={before:.2f} (the lowest over shapes)")
    print(f"ratios: sketch/train_step={a} sketch/naive_base={c} sketch/forward={z:.2f}")


if __name__ == "__main__":
    main()

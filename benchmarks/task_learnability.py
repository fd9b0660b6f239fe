"""How much of a bundled task can be learnt from lexical cues alone? A yardstick for the demo.

A study only measures something when its fine-tuned model beats the majority class. When the
small encoder does not, is that the encoder's fault or the data's? This fits a
logistic regression on features any encoder could pick up from words alone (hashed words of
the second text, words it shares / does not share with the first, overlap ratios, length
ratio), trained on the first N training items of every language together, and prints dev
accuracy per language next to the majority-class rate. If even this cannot beat the majority
class, a small encoder trained on the same items is unlikely to.

    python benchmarks/task_learnability.py                    # both bundled tasks, N = 500, 1000, 2000
    python benchmarks/task_learnability.py --task xnli --sizes 2000
"""

from __future__ import annotations

import argparse
import re
import zlib

import torch

from datamodules.sources import Record, read_bundled
from datamodules.tasks import TASKS

HASH_DIM = 2**16
DENSE = 6
_WORD = re.compile(r"\w+")


def _bucket(kind: str, word: str) -> int:
    """A stable hash (Python's ``hash`` is salted per process)."""
    return zlib.crc32(f"{kind}:{word}".encode()) % HASH_DIM


def featurise(records: list[Record]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hashed word buckets (flat indices + offsets, for an ``EmbeddingBag``) and dense overlap features."""
    indices, offsets, dense = [], [], []
    for record in records:
        first, second = (_WORD.findall(t.lower()) for t in record.texts)
        a, b = set(first), set(second)
        shared = a & b
        offsets.append(len(indices))
        indices += [_bucket("w", w) for w in b] + [_bucket("s", w) for w in shared]
        indices += [_bucket("u", w) for w in b - a]
        bigrams_a, bigrams_b = set(zip(first, first[1:])), set(zip(second, second[1:]))
        dense.append(
            [
                len(shared) / max(1, len(b)),
                len(shared) / max(1, len(a)),
                len(bigrams_a & bigrams_b) / max(1, len(bigrams_b)),
                len(second) / max(1, len(first)),
                float(first == second),
                float(sorted(first) == sorted(second)),
            ]
        )
    return torch.tensor(indices), torch.tensor(offsets), torch.tensor(dense)


class LexicalClassifier(torch.nn.Module):
    """Logistic regression over hashed word buckets plus the dense features."""

    def __init__(self):
        super().__init__()
        self.words = torch.nn.EmbeddingBag(HASH_DIM, 1, mode="sum")
        self.dense = torch.nn.Linear(DENSE, 1)
        torch.nn.init.zeros_(self.words.weight)

    def forward(self, features: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        indices, offsets, dense = features
        return (self.words(indices, offsets) + self.dense(dense)).squeeze(-1)


def fit_logistic(features, y: torch.Tensor, steps: int = 300, l2: float = 1e-4) -> LexicalClassifier:
    """An L2-regularised logistic regression, full-batch Adam."""
    model = LexicalClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(features), y)
        (loss + l2 * model.words.weight.pow(2).sum()).backward()
        opt.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=[t for t, s in TASKS.items() if s.bundled], action="append")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000])
    args = parser.parse_args()
    torch.manual_seed(0)
    for task in args.task or [t for t, s in TASKS.items() if s.bundled]:
        langs = TASKS[task].default_languages
        train = {lang: read_bundled(task, "train", lang) for lang in langs}
        dev = {lang: read_bundled(task, "dev", lang) for lang in langs}
        dev_x = {lang: featurise(rows) for lang, rows in dev.items()}
        dev_y = {lang: torch.tensor([r.label for r in rows], dtype=torch.float) for lang, rows in dev.items()}
        print(f"{task}: dev accuracy of a lexical logistic regression vs the majority-class rate")
        print("train/lang  " + "  ".join(f"{lang:>11s}" for lang in langs) + "  beats majority everywhere")
        for size in args.sizes:
            records = [r for lang in langs for r in train[lang][:size]]
            model = fit_logistic(
                featurise(records), torch.tensor([r.label for r in records], dtype=torch.float)
            )
            cells, everywhere = [], True
            for lang in langs:
                with torch.no_grad():
                    predicted = (model(dev_x[lang]) > 0).float()
                acc = (predicted == dev_y[lang]).float().mean().item()
                majority = max(dev_y[lang].mean().item(), 1 - dev_y[lang].mean().item())
                everywhere &= acc > majority
                cells.append(f"{acc:.3f}/{majority:.3f}")
            print(
                f"{size:10d}  " + "  ".join(f"{c:>11s}" for c in cells) + f"  {'yes' if everywhere else 'no'}"
            )
        print()


if __name__ == "__main__":
    main()

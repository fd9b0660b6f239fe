"""Are translations close in the encoder's space? Mean cosine similarity of sentence
representations for translation pairs vs non-pairs, on the bundled test items,
for each backbone given (default: ``e5-small`` vs ``tiny-random``).

For each task, the first ``--items`` test items (unique first-field text) are encoded alone
(``<s> text </s>``) in every language. For each pair of languages: the mean cosine of
matching items (translations), of all non-matching items, their gap, and retrieval
accuracy (the share of items whose nearest neighbour among the other language's items is
their translation; chance = 1/items). Printed for the ``<s>`` vector (what the classifier reads)
and for the mean over tokens, averaged over language pairs; ``-c`` rows first subtract each
language's mean vector, because raw cosines of a random or anisotropic encoder are all near 1
(a shared direction), which hides how items differ.

    OMP_NUM_THREADS=1 python benchmarks/crosslingual_alignment.py --items 200
"""

from __future__ import annotations

import argparse
import itertools

import torch

from datamodules.sources import read_bundled
from datamodules.tasks import TASKS
from lightning_modules.backbones import build_classifier, load_backbone_tokenizer


def parallel_texts(task: str, items: int, field: int = 0) -> dict[str, list[str]]:
    """lang -> texts of the same test items (first ``items`` ids with a distinct first-language text)."""
    langs = TASKS[task].default_languages
    per_lang = {lang: {r.id: r.texts[field] for r in read_bundled(task, "test", lang)} for lang in langs}
    ids, seen = [], set()
    for item_id, text in per_lang[langs[0]].items():
        if text not in seen and all(item_id in per_lang[lang] for lang in langs):
            seen.add(text)
            ids.append(item_id)
        if len(ids) == items:
            break
    return {lang: [per_lang[lang][i] for i in ids] for lang in langs}


@torch.no_grad()
def encode(model, tokenizer, texts: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(<s> vectors, mean-pooled vectors) of the encoder's last layer."""
    firsts, means = [], []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            truncation=True,
            max_length=128,
            padding=True,
            return_tensors="pt",
        )
        hidden = model.roberta(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        ).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        firsts.append(hidden[:, 0])
        means.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(firsts), torch.cat(means)


def alignment(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Pair vs non-pair cosine and retrieval accuracy (both directions) of row-aligned a and b."""
    sims = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    n = len(sims)
    pair = sims.diagonal().mean()
    non_pair = (sims.sum() - sims.diagonal().sum()) / (n * n - n)
    target = torch.arange(n)
    retrieval = ((sims.argmax(1) == target).float().mean() + (sims.argmax(0) == target).float().mean()) / 2
    return {
        "pair": float(pair),
        "non_pair": float(non_pair),
        "gap": float(pair - non_pair),
        "retrieval": float(retrieval),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["e5-small", "tiny-random"])
    parser.add_argument("--tasks", nargs="+", default=["pawsx", "xnli"])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    header = f"{'task':6} {'backbone':12} {'pooling':6} {'pair cos':>9} {'non-pair':>9} {'gap':>7} {'retrieval@1':>12}"
    print(header)
    print("-" * len(header))
    for task in args.tasks:
        texts = parallel_texts(task, args.items)
        n = len(next(iter(texts.values())))
        for backbone in args.backbones:
            model = build_classifier(backbone).eval()
            tokenizer = load_backbone_tokenizer(backbone)
            vectors = {lang: encode(model, tokenizer, t) for lang, t in texts.items()}
            for p, pooling in enumerate(("<s>", "mean")):
                for centred in (False, True):
                    rows = {lang: v[p] - v[p].mean(0) if centred else v[p] for lang, v in vectors.items()}
                    name = pooling + ("-c" if centred else "")
                    scores = [alignment(rows[x], rows[y]) for x, y in itertools.combinations(texts, 2)]
                    avg = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
                    print(
                        f"{task:6} {backbone:12} {name:6} {avg['pair']:9.4f} {avg['non_pair']:9.4f} "
                        f"{avg['gap']:7.4f} {avg['retrieval']:12.3f}"
                    )
        print(
            f"({task}: {n} test items x {len(texts)} languages, {len(texts) * (len(texts) - 1) // 2} language pairs;"
            f" retrieval chance {1 / n:.3f})"
        )


if __name__ == "__main__":
    main()

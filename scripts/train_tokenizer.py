"""Regenerate the tiny backbone's tokenizer from the bundled training text.

    python scripts/train_tokenizer.py [--vocab-size 8000]

Uses the train split only (never dev or test) of every bundled task and language.
"""

import argparse
from pathlib import Path

from datamodules.sources import iter_bundled_texts
from lightning_modules.backbones import TINY_ASSETS
from lightning_modules.tokenizer import train_unigram_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--out", type=Path, default=TINY_ASSETS / "tokenizer.json")
    args = parser.parse_args()
    tok = train_unigram_tokenizer(iter_bundled_texts(split="train"), vocab_size=args.vocab_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out))
    print(f"wrote {args.out} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()

"""The tiny backbone's tokenizer: a unigram (SentencePiece-style) model trained on the
bundled training text, shipped as one ``tokenizer.json`` so nothing is ever downloaded.

Byte fallback makes every string encodable, so text in a script the vocabulary never saw
(Han characters in a Korean sentence, say) still round-trips instead of becoming <unk>.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's order for ids 0-3


def train_unigram_tokenizer(texts: Iterable[str], vocab_size: int = 8000):
    """Train a byte-fallback unigram tokenizer with XLM-R's special tokens and templates."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.Unigram(byte_fallback=True))
    # NFC only (not NFKC) so that decode(encode(text)) gives the text back.
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + byte_tokens,
        unk_token="<unk>",
        shrinking_factor=0.75,
        max_piece_length=16,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # The byte pieces must stay ordinary vocabulary entries: as "added" special tokens they
    # would be dropped by decode(skip_special_tokens=True) and the round trip would lose text.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    spec["model"]["byte_fallback"] = True  # the trainer does not carry the flag over
    tok = Tokenizer.from_str(json.dumps(spec))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", bos), ("</s>", eos)],
    )
    return tok


def load_tokenizer(path: str | Path):
    """Wrap a ``tokenizer.json`` as a transformers fast tokenizer with XLM-R's specials."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=512,
    )

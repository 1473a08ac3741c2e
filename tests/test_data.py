"""nblib.data: token files built once from the corpus, random windows read through a memmap."""
from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import write_corpus
from nblib import clean, config, data, tokenizer

@pytest.fixture
def corpus(home: Path, mirror: Path) -> dict[str, list[str]]:
    return write_corpus(home, mirror)


def test_token_files_hold_every_document_then_eot(home: Path, corpus: dict[str, list[str]]):
    manifest = data.build_token_files()
    enc = tokenizer.get_encoding()
    assert manifest["reused"] is False and manifest["dtype"] == "uint16"
    for split, docs in corpus.items():
        ids = data.load_tokens(None, split)
        assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
        expected = [t for doc in docs for t in enc.encode_ordinary(doc) + [tokenizer.EOT_ID]]
        assert ids.tolist() == expected
        assert manifest["splits"][split] == {
            "tokens": len(expected), "documents": len(docs), "sha256": manifest["splits"][split]["sha256"],
        }
        assert enc.decode(ids.tolist()) == "".join(doc + tokenizer.EOT for doc in docs)


def test_token_files_are_reused_until_the_corpus_changes(home: Path, corpus: dict[str, list[str]]):
    first = data.build_token_files()
    bin_path = config.paths().tokens / "train.bin"
    stamp = bin_path.stat().st_mtime_ns
    again = data.build_token_files()
    assert again["reused"] is True and bin_path.stat().st_mtime_ns == stamp
    assert {k: v for k, v in again.items() if k != "reused"} == {k: v for k, v in first.items() if k != "reused"}
    val = config.paths().corpus / "val.txt"
    val.write_text(val.read_text(encoding="utf-8") + clean.DOC_SEP + "Uma frase nova.\n", encoding="utf-8")
    rebuilt = data.build_token_files()
    assert rebuilt["reused"] is False
    assert rebuilt["splits"]["val"]["documents"] == first["splits"]["val"]["documents"] + 1
    bin_path.write_bytes(bin_path.read_bytes()[:-2])  # a truncated token file is rebuilt too
    assert data.build_token_files()["reused"] is False
    assert bin_path.stat().st_size == 2 * rebuilt["splits"]["train"]["tokens"]


def test_a_corrupt_token_file_is_rebuilt_not_reused(home: Path, corpus: dict[str, list[str]], capsys):
    """A byte flipped in place keeps the size; the manifest's sha256 catches it."""
    first = data.build_token_files()
    bin_path = config.paths().tokens / "train.bin"
    raw = bytearray(bin_path.read_bytes())
    raw[100:102] = b"\xff\xff"  # id 65535, beyond GPT-2's vocabulary: "index out of range" in training
    bin_path.write_bytes(bytes(raw))
    capsys.readouterr()
    again = data.build_token_files()
    out = capsys.readouterr().out
    assert again["reused"] is False and again["splits"] == first["splits"]
    assert out.count("\n") == 1 and "train.bin is corrupt" in out and "rebuilding" in out
    assert data.load_tokens(None, "train").max() < tokenizer.EOT_ID + 1
    assert data.build_token_files()["reused"] is True
    (config.paths().tokens / "manifest.json").write_text("{", encoding="utf-8")
    assert data.build_token_files()["reused"] is False
    assert "not valid JSON" in capsys.readouterr().out


def test_a_killed_build_leaves_no_temp_file_behind(home: Path, corpus: dict[str, list[str]], capsys):
    data.build_token_files()
    tokens = config.paths().tokens
    orphan = tokens / ".train.bin.k1ll3d.tmp"  # the name files.atomic_write_bytes gives its temp file
    orphan.write_bytes(b"\0" * 6000)
    assert data.build_token_files()["reused"] is True
    assert not orphan.exists()
    assert "removed .train.bin.k1ll3d.tmp (6,000 bytes" in capsys.readouterr().out
    assert sorted(p.name for p in tokens.iterdir()) == ["manifest.json", "test.bin", "train.bin", "val.bin"]


def test_missing_corpus_names_the_clean_stage(home: Path):
    with pytest.raises(FileNotFoundError, match="02_clean"):
        data.build_token_files()
    with pytest.raises(FileNotFoundError, match="build_token_files"):
        data.load_tokens(None, "train")
    with pytest.raises(ValueError, match="unknown split"):
        data.load_tokens(None, "dev")


def test_batches_are_seeded_next_token_windows(home: Path, corpus: dict[str, list[str]]):
    data.build_token_files()
    ids = data.load_tokens(None, "train")
    x, y = data.get_batch(ids, 6, 32, np.random.default_rng(0))
    assert x.shape == y.shape == (6, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = np.random.default_rng(0).integers(0, len(ids) - 32, size=6)  # the windows get_batch drew
    for s, row_x, row_y in zip(starts, x, y):
        assert row_x.tolist() == ids[s : s + 32].tolist() and row_y.tolist() == ids[s + 1 : s + 33].tolist()
    x2, _ = data.get_batch(ids, 6, 32, np.random.default_rng(0))
    x3, _ = data.get_batch(ids, 6, 32, np.random.default_rng(1))
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    with pytest.raises(ValueError, match="too short for context_length"):
        data.get_batch(ids[:40], 2, 40, np.random.default_rng(0))


def test_batch_memory_is_independent_of_the_corpus_size(tmp_path: Path):
    """Sampling windows from a 16M-token memmap allocates only the batches (no materialised windows)."""
    path = tmp_path / "big.bin"
    n_tokens = 16_000_000
    np.memmap(path, dtype=np.uint16, mode="w+", shape=(n_tokens,)).flush()
    ids = np.memmap(path, dtype=np.uint16, mode="r")
    rng = np.random.default_rng(0)
    tracemalloc.start()
    for _ in range(20):
        data.get_batch(ids, 8, 256, rng)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200_000, f"peak {peak} bytes for 8x257 windows of a {2 * n_tokens}-byte file"


def test_real_collection_tokenises_in_one_batch(home: Path, mirror: Path):
    """All 116 Machado works, one per document: every token accounted for."""
    works = sorted((mirror / "machado").glob("*/*.txt"))
    assert len(works) == 116
    texts = [p.read_text(encoding="utf-8").strip() for p in works]
    corpus = config.paths().corpus
    corpus.mkdir(parents=True)
    (corpus / "train.txt").write_text(clean.DOC_SEP.join(texts) + "\n", encoding="utf-8")
    for split in ("val", "test"):
        (corpus / f"{split}.txt").write_text(texts[0] + "\n", encoding="utf-8")
    manifest = data.build_token_files()
    train = manifest["splits"]["train"]
    assert train["documents"] == 116
    assert train["tokens"] == tokenizer.count_tokens(texts) + 116
    assert os.path.getsize(config.paths().tokens / "train.bin") == 2 * train["tokens"]

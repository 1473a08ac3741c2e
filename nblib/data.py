"""Token files and training batches (nanoGPT's ``.bin`` idea).

Each corpus split is tokenised once, with batch encoding, into a flat ``uint16`` file of GPT-2
ids, ``<|endoftext|>`` after every document (documents as :func:`nblib.clean.read_split` reads them), under ``data/processed/tokens/`` with a
``manifest.json`` that records the sha256 of the text it came from, so the files are reused until
the corpus changes. Batches are random ``context_length + 1`` windows read through a read-only
memmap: memory grows with the corpus, never with corpus x context.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from nblib import clean, config, tokenizer
from nblib.files import atomic_write_bytes, read_json, remove_orphans, sha256_file, write_json

SPLITS = ("train", "val", "test")
TOKEN_DTYPE = np.uint16
FORMAT = 1


def _encode_split(path: Path) -> tuple[np.ndarray, int]:
    """Token ids of every document of a split file, each followed by ``<|endoftext|>``; returns ``(ids, n_documents)``."""
    docs = clean.read_split(path)
    encoded = tokenizer.get_encoding().encode_ordinary_batch(docs, num_threads=os.cpu_count() or 1)
    eot = np.array([tokenizer.EOT_ID], dtype=TOKEN_DTYPE)
    parts = [part for ids in encoded for part in (np.asarray(ids, dtype=TOKEN_DTYPE), eot)]
    ids = np.concatenate(parts) if parts else np.empty(0, dtype=TOKEN_DTYPE)
    return ids, len(docs)


def _is_current(manifest_path: Path, tokens_dir: Path, corpus_sha: dict[str, str]) -> bool:
    """Whether the token files match the corpus and the manifest; a ``.bin`` whose size or sha256
    differs from the manifest's (a truncated or byte-flipped file, which would otherwise train on
    garbage or fail with "index out of range") is reported in one line. Hashing is cheap next to
    tokenising: the whole 116-work collection's train.bin (8.9 MB) hashes in 6 ms, tokenises in 1.1 s
    (files.sha256_file and build_token_files, 2-core dev machine, warm page cache)."""
    if not manifest_path.is_file():
        return False
    try:
        manifest = read_json(manifest_path)
    except ValueError as e:
        print(f"{e}; rebuilding the token files")
        return False
    if manifest.get("format") != FORMAT or manifest.get("corpus_sha256") != corpus_sha:
        return False
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    for split, info in manifest["splits"].items():
        path = tokens_dir / f"{split}.bin"
        if not path.is_file():
            return False
        if path.stat().st_size != info["tokens"] * itemsize or sha256_file(path) != info["sha256"]:
            print(
                f"{config.relative(path)} is corrupt (its size or sha256 differs from "
                f"{manifest_path.name}'s record); rebuilding the token files"
            )
            return False
    return True


def build_token_files(paths: config.Paths | None = None, force: bool = False) -> dict[str, Any]:
    """Tokenise ``corpus/{train,val,test}.txt`` into ``tokens/{split}.bin``; reuse them while the corpus is unchanged.

    Returns the tokens manifest: per split ``tokens``, ``documents`` and the ``.bin`` sha256,
    plus ``corpus_sha256`` (of each split's text), ``seconds`` and ``reused``.
    """
    paths = paths or config.paths()
    sources = {split: paths.corpus / f"{split}.txt" for split in SPLITS}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise config.MissingInput(
            f"corpus split(s) missing: {', '.join(missing)}; run notebooks/02_clean.ipynb (the clean stage) first"
        )
    corpus_sha = {split: sha256_file(path) for split, path in sources.items()}
    # Temp files of writes killed mid-way (a token file is megabytes) would stay forever otherwise;
    # safe here because only one process builds at a time (DDP ranks > 0 wait for rank 0).
    for note in remove_orphans(paths.tokens):
        print(f"{config.relative(paths.tokens)}: {note}")
    manifest_path = paths.tokens / "manifest.json"
    if not force and _is_current(manifest_path, paths.tokens, corpus_sha):
        manifest = read_json(manifest_path)
        return {**manifest, "splits": {s: manifest["splits"][s] for s in SPLITS}, "reused": True}
    t0 = time.perf_counter()
    splits = {}
    for split, path in sources.items():
        ids, n_docs = _encode_split(path)
        if len(ids) == 0:
            raise ValueError(f"{path} holds no text; the clean stage produced an empty {split} split")
        out = atomic_write_bytes(paths.tokens / f"{split}.bin", ids.tobytes())
        splits[split] = {"tokens": int(len(ids)), "documents": n_docs, "sha256": sha256_file(out)}
    manifest = {
        "format": FORMAT,
        "tokenizer": "gpt2",
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "eot_id": tokenizer.EOT_ID,
        "corpus_sha256": corpus_sha,
        "splits": splits,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(manifest_path, manifest)
    return {**manifest, "reused": False}


def load_tokens(paths: config.Paths | None, split: str) -> np.memmap:
    """A read-only memmap over ``tokens/{split}.bin`` (built by :func:`build_token_files`)."""
    paths = paths or config.paths()
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = paths.tokens / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"no token file {path}; call nblib.data.build_token_files() first")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    rng: np.random.Generator,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows: inputs ``x`` and next-token targets ``y``, both ``[B, T]`` int64.

    Only the chosen windows are read from ``tokens`` (a memmap), so memory is ``O(B * T)``.
    """
    n_windows = len(tokens) - context_length
    if n_windows < 1:
        raise ValueError(
            f"a split of {len(tokens)} tokens is too short for context_length={context_length} "
            f"(needs at least {context_length + 1}); lower context_length or give the split more text"
        )
    starts = rng.integers(0, n_windows, size=batch_size)
    windows = np.stack([tokens[s : s + context_length + 1] for s in starts]).astype(np.int64)
    xy = torch.from_numpy(windows)
    x, y = xy[:, :-1], xy[:, 1:]
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous(), y.contiguous()


def check_context(cfg: Mapping[str, Any], tokens: Mapping[str, int]) -> None:
    """Refuse, before the model is built, a ``context_length`` the train or val split cannot fill:
    a batch is windows of ``context_length + 1`` tokens of one split."""
    short = {split: n for split, n in tokens.items() if split in ("train", "val") and n < cfg["context_length"] + 1}
    if short:
        raise config.SettingsError(
            f"context_length={cfg['context_length']} needs windows of {cfg['context_length'] + 1} tokens, but the "
            + " and ".join(f"{split} split holds {n:,}" for split, n in short.items())
            + "; lower context_length or give the corpus more text"
        )

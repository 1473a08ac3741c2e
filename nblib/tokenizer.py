"""The GPT-2 byte-level BPE, as a tiktoken ``Encoding`` and as an equivalent HF fast tokenizer.

Sources, in order: an explicit ranks file, ``<NBLIB_MIRROR>/tokenizers/gpt2.tiktoken`` (sha256
checked), then ``tiktoken.get_encoding("gpt2")`` (network or tiktoken's cache). Both tokenizers
come from the same ranks, so they give identical ids.
"""
from __future__ import annotations

import base64
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken

from nblib import config
from nblib.files import sha256_file

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedTokenizerFast

EOT = "<|endoftext|>"
EOT_ID = 50256
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
RANKS_RELPATH = Path("tokenizers") / "gpt2.tiktoken"


def _mirror_ranks() -> Path | None:
    root = config.mirror()
    return root / RANKS_RELPATH if root is not None else None


def load_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken ranks file (``base64-token rank`` per line), checking GPT-2's sha256."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"GPT-2 ranks file not found at {path}. Put gpt2.tiktoken there (it ships inside the "
            "openai-whisper package as whisper/assets/gpt2.tiktoken) or run with a network so "
            "tiktoken can download it."
        )
    digest = sha256_file(path)
    if digest != GPT2_SHA256:
        raise ValueError(
            f"{path}: sha256 {digest} does not match GPT-2's ranks ({GPT2_SHA256}); the file is "
            "truncated or a different tokenizer. Replace it with a fresh copy."
        )
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=4)
def _encoding_from(path: str | None) -> tiktoken.Encoding:
    if path is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # network errors come in many types
            raise RuntimeError(
                "could not load the GPT-2 tokenizer: tiktoken's download failed "
                f"({type(e).__name__}: {e}). Offline, set NBLIB_MIRROR to a folder holding "
                f"{RANKS_RELPATH} (sha256 {GPT2_SHA256})."
            ) from e
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_ranks(path),
        special_tokens={EOT: EOT_ID},
    )


def get_encoding(ranks_file: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """GPT-2's tiktoken ``Encoding`` (``<|endoftext|>`` = 50256), offline when a ranks file is found."""
    path = Path(ranks_file) if ranks_file is not None else _mirror_ranks()
    return _encoding_from(str(path) if path is not None else None)


def token_bytes(enc: tiktoken.Encoding | None = None) -> np.ndarray:
    """UTF-8 bytes each token id stands for (``int64``, one entry per id); special tokens count 0,
    so they drop out of bits-per-byte (nanochat's convention)."""
    import numpy as np

    enc = enc or get_encoding()
    special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    return np.array([0 if i in special else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)],
                    dtype=np.int64)


def count_tokens(texts: list[str], enc: tiktoken.Encoding | None = None) -> int:
    """Total GPT-2 tokens over ``texts`` (batch-encoded on all cores)."""
    enc = enc or get_encoding()
    return sum(len(ids) for ids in enc.encode_ordinary_batch(texts))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _split_token(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge produced ``token``: replay BPE on its bytes with lower ranks only."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not the merge of two lower-ranked tokens")
    return parts[0], parts[1]


@lru_cache(maxsize=1)
def _hf_vocab_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """HF byte-level vocabulary and merge list derived from the tiktoken ranks."""
    ranks: dict[bytes, int] = get_encoding()._mergeable_ranks  # noqa: SLF001 (no public getter)
    b2u = _bytes_to_unicode()

    def as_text(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {as_text(tok): rank for tok, rank in ranks.items()}
    vocab[EOT] = EOT_ID
    merges = [
        tuple(map(as_text, _split_token(tok, ranks)))
        for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1])
        if len(tok) > 1
    ]
    return vocab, merges


def hf_tokenizer() -> PreTrainedTokenizerFast:
    """A Hugging Face GPT-2 fast tokenizer built from the same ranks (ids identical to tiktoken's).

    ``save_pretrained(dir)`` writes the usual ``vocab.json``/``merges.txt``/``tokenizer.json``.
    """
    from transformers import GPT2Tokenizer

    vocab, merges = _hf_vocab_merges()
    return GPT2Tokenizer(vocab=dict(vocab), merges=list(merges))

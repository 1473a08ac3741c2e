"""What the selected stages will fetch, and whether they can: checked before any stage runs.

A stage fetches when no local copy serves it: ingest reads Project Gutenberg and the Hugging Face
Hub unless ``NBLIB_MIRROR`` is set or ``data/raw`` already holds what an earlier run fetched; every
later stage needs GPT-2's BPE ranks (the mirror's ``tokenizers/gpt2.tiktoken`` or tiktoken's cache);
a fine-tune of a hub base (``base_model: gpt2``) needs it in the Hugging Face cache. For each source
that must come from the network, its host is tried once (a TCP connection, a few seconds), so an
offline machine hears about ``NBLIB_MIRROR`` before any work, not minutes into a stage.
"""
from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from nblib import config

GUTENBERG = "www.gutenberg.org"
HUB = "huggingface.co"
TIKTOKEN = "openaipublic.blob.core.windows.net"
# tiktoken's gpt2 encoding reads these two files (tiktoken_ext.openai_public.gpt2)
TIKTOKEN_FILES = tuple(f"https://{TIKTOKEN}/gpt-2/encodings/main/{f}" for f in ("vocab.bpe", "encoder.json"))
TOKENIZING = ("02_", "03_", "04_", "05_", "06_", "07_")  # the stages that read GPT-2's BPE
MAKEFILE_DEFAULT = "the Makefile sets it to ../shared/data when that folder exists"


@lru_cache(maxsize=None)
def reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host``'s HTTPS port opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def tokenizer_is_local() -> bool:
    """GPT-2's ranks without a download: the mirror's ranks file, or both files in tiktoken's cache."""
    from nblib.tokenizer import RANKS_RELPATH

    root = config.mirror()
    if root is not None and (root / RANKS_RELPATH).is_file():
        return True
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR",
                                                                 str(Path(tempfile.gettempdir()) / "data-gym-cache")))
    return bool(cache) and all((Path(cache) / hashlib.sha1(url.encode()).hexdigest()).is_file() for url in TIKTOKEN_FILES)


def hub_model_is_local(name: str) -> bool:
    """Whether a base model needs no download: a folder (or a path an earlier stage writes: hub ids are
    ``name`` or ``owner/name``), or a hub name whose config is in the Hugging Face cache."""
    if config.resolve(name).is_dir() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def fetches(notebook: str, params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(what, host)`` for each source stage ``notebook`` (with its ``params``) must download."""
    out = []
    if notebook.startswith("01_"):
        if config.mirror() is None and not (config.paths().raw / "manifest.json").is_file():
            out += [("the Machado de Assis books", GUTENBERG), ("the QA datasets", HUB)]
        return out
    if notebook.startswith(TOKENIZING) and not tokenizer_is_local():
        out.append(("GPT-2's tokenizer ranks", TIKTOKEN))
    profile = params.get("profile", "auto")
    if notebook.startswith("05_") and profile != config.DRY_RUN:  # the dry run writes its random base itself
        base = str(params.get("base_model") or config.settings("finetune", profile)["base_model"])
        if not hub_model_is_local(base):
            out.append((f"the base model {base!r}", HUB))
    return out


def check(stages: Iterable[tuple[str, str, Mapping[str, Any]]]) -> None:
    """Refuse, naming ``NBLIB_MIRROR``, when a selected stage ``(name, notebook, params)`` must
    download something from a host this machine cannot reach."""
    for name, notebook, params in stages:
        missing = [(what, host) for what, host in fetches(notebook, params) if not reachable(host)]
        if missing:
            whats = "; ".join(f"{what} from {host}" for what, host in missing)
            raise config.SettingsError(
                f"stage {name} needs {whats}, and this machine cannot reach it ({config.mirror_state()}). Set "
                f"NBLIB_MIRROR to an offline data folder laid out like shared/data ({MAKEFILE_DEFAULT}), e.g. "
                "NBLIB_MIRROR=../shared/data, or connect to the network; nothing was run"
            )

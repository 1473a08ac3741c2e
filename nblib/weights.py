"""Weight files read safely: a checkpoint or a Hugging Face weight file is opened with tensors only
(``weights_only``: a pickle that would run code is refused) and a damaged one is refused in one line
that names it (:class:`nblib.config.Refused`), before a library fails with an error that names no file.
Foundations layer: imports only ``config``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from nblib import config


def read_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The data of a :func:`save_checkpoint` file (tensors only: ``weights_only``), or :class:`config.Refused`
    naming the file when it cannot be read (truncated, empty, not a checkpoint, a pickle that runs code)."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated zip, a zero-byte file, a refused pickle: all mean the file is damaged
        raise config.Refused(f"{config.relative(path)} cannot be read ({_reason(e)})") from e


def _reason(e: Exception) -> str:
    """Why a file could not be read, in one short line: the error's type and its first sentence (for a pickle
    ``weights_only`` refused, the object it would have built)."""
    text = " ".join(str(e).split())
    refused = re.search(r"unsupported GLOBAL (\S+)", text)
    first = text.split(". ")[0][:120]  # libraries follow the problem with advice that is not ours
    return f"a pickle of {refused.group(1)}, not plain tensors" if refused else f"{type(e).__name__}: {first}"


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The Hugging Face weight files of a model or adapter folder (``*.safetensors``, ``*model*.bin``)."""
    folder = Path(folder)
    return sorted([*folder.glob("*.safetensors"), *folder.glob("*model*.bin")])


def check_weights(files: list[Path], fix: str) -> None:
    """Refuse (:class:`config.Refused`, naming the file, then ``fix``) the first of ``files`` that cannot be
    read: a ``.safetensors`` file with a damaged header or cut short, or a torch pickle (``.bin``, ``.pt``,
    ``.pth``) that is damaged or holds more than tensors (code: ``weights_only``), before a library reads it
    and fails with an error that names no file."""
    from safetensors import safe_open

    for path in files:
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):  # reads the header and checks it covers the file
                    pass
            else:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # as in read_checkpoint: every failure means the file is damaged
            raise config.Refused(f"{config.relative(path)} cannot be read ({_reason(e)}): {fix}") from e

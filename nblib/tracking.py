"""Weights & Biases set-up that never hangs without a network.

Online when an API key is available (``WANDB_API_KEY`` or a ``wandb login``), offline otherwise;
``WANDB_MODE`` set by the user always wins. With a key but no way to the server (:func:`unreachable`:
a TCP connection within seconds) or a server that refuses the run, it logs offline and says so in one
line: tracking never costs a stage. Run files go under the run folder.
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from nblib.config import relative
from nblib.files import mark


def wandb_mode() -> str:
    """``online`` with credentials, else ``offline`` (or whatever ``WANDB_MODE`` says)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace"):
        return "online"
    return "offline"


def configure_env(run_dir: str | os.PathLike, project: str = "machado-gpt") -> str:
    """Set ``WANDB_MODE``/``WANDB_DIR``/``WANDB_PROJECT`` for libraries that start W&B themselves (HF Trainer)."""
    mode = wandb_mode()
    os.environ["WANDB_MODE"] = mode
    os.environ["WANDB_DIR"] = str(Path(run_dir).resolve())
    os.environ.setdefault("WANDB_PROJECT", project)
    os.environ.setdefault("WANDB_SILENT", "true")
    mark(run_dir)  # W&B's files come first in a run folder: the marker says the folder is a run's
    return mode


def unreachable(timeout: float = 3.0) -> str | None:
    """Why the W&B server (``WANDB_BASE_URL``, default ``https://api.wandb.ai``) takes no TCP connection within
    ``timeout`` seconds, name lookup included; ``None`` when it does."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
    outcome = [f"{host}:{port} did not answer within {timeout:g} s"]

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome[0] = None
        except OSError as e:
            outcome[0] = f"{host}:{port} unreachable ({e.strerror or type(e).__name__})"

    worker = threading.Thread(target=connect, daemon=True)  # a thread: a name lookup ignores socket timeouts
    worker.start()
    worker.join(timeout)
    return outcome[0]


def init_wandb(run_dir: str | os.PathLike, name: str, config: dict[str, Any], project: str = "machado-gpt") -> Any:
    """Start a W&B run whose files live in ``run_dir/wandb``: offline without credentials, and with them when
    the server cannot be reached or refuses the run (one line says so; the stage goes on)."""
    import wandb

    mode = configure_env(run_dir, project)
    if mode != "online":
        return _start(wandb, run_dir, name, config, mode)
    problem = unreachable()
    if problem is None:
        try:
            return _start(wandb, run_dir, name, config, mode)
        except wandb.errors.Error as e:  # a bad key, a timeout: the stage goes on offline
            problem = f"the server refused the run ({' '.join(str(e).split())[:160]})"
    os.environ["WANDB_MODE"] = "offline"  # also for libraries that start W&B themselves (HF Trainer)
    print(f"W&B: {problem}; logging offline to {relative(Path(run_dir) / 'wandb')} (upload later with `wandb sync`)",
          flush=True)
    return _start(wandb, run_dir, name, config, "offline")


def _start(wandb: Any, run_dir: str | os.PathLike, name: str, config: dict[str, Any], mode: str) -> Any:
    return wandb.init(
        project=os.environ["WANDB_PROJECT"],
        name=name,
        config=config,
        dir=str(Path(run_dir).resolve()),
        mode=mode,
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, init_timeout=60),
    )

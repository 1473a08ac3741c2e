"""Weights & Biases set-up that never hangs without a network.

Online when an API key is available (``WANDB_API_KEY`` or a ``wandb login``), offline otherwise;
``WANDB_MODE`` set by the user always wins. Run files go under the run folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


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
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return mode


def init_wandb(run_dir: str | os.PathLike, name: str, config: dict[str, Any], project: str = "machado-gpt") -> Any:
    """Start a W&B run whose files live in ``run_dir/wandb`` (offline without credentials)."""
    import wandb

    mode = configure_env(run_dir, project)
    return wandb.init(
        project=os.environ["WANDB_PROJECT"],
        name=name,
        config=config,
        dir=str(Path(run_dir).resolve()),
        mode=mode,
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, init_timeout=60),
    )

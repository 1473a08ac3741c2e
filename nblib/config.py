"""Profiles, working-root paths, the offline mirror, seeds and machine facts.

A *profile* sets the sizes of every stage: ``smoke`` runs on a CPU in minutes, ``full`` is
meant for a Kaggle GPU, ``auto`` picks ``full`` when CUDA is available. Each stage's sizes live
in ``nblib/profiles/<stage>.yaml`` (one mapping per profile), so they can be read at a glance.
"""
from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

PROFILES = ("smoke", "full")
PROFILE_DIR = Path(__file__).with_name("profiles")
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
KAGGLE_WORKING = Path("/kaggle/working")


def resolve_profile(profile: str = "auto") -> str:
    """Return ``smoke`` or ``full``; ``auto`` picks ``full`` when a CUDA GPU is present."""
    if profile == "auto":
        import torch

        return "full" if torch.cuda.is_available() else "smoke"
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)} or 'auto'")
    return profile


def settings(stage: str, profile: str = "auto", **overrides: Any) -> dict[str, Any]:
    """Sizes for ``stage`` under ``profile``, with non-``None`` ``overrides`` applied on top.

    Unknown override names are an error (a typo in a papermill ``-p`` must not pass silently).
    """
    path = PROFILE_DIR / f"{stage}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ValueError(f"no profile file for stage {stage!r} ({path}); known stages: {', '.join(known)}")
    table = yaml.safe_load(path.read_text(encoding="utf-8"))
    name = resolve_profile(profile)
    if name not in table:
        raise ValueError(f"{path} has no {name!r} section")
    out = dict(table[name])
    unknown = sorted(k for k, v in overrides.items() if v is not None and k not in out)
    if unknown:
        raise ValueError(
            f"unknown setting(s) for stage {stage!r}: {', '.join(unknown)}; valid: {', '.join(sorted(out))}"
        )
    out.update({k: v for k, v in overrides.items() if v is not None})
    out["profile"] = name
    return out


def home() -> Path:
    """The working root: ``$NBLIB_HOME``, else ``/kaggle/working`` on Kaggle, else the repo root."""
    env = os.environ.get("NBLIB_HOME")
    if env:
        return Path(env).expanduser().resolve()
    if KAGGLE_WORKING.is_dir():
        return KAGGLE_WORKING
    if (_PACKAGE_ROOT / "pyproject.toml").is_file():
        return _PACKAGE_ROOT
    return Path.cwd()


def mirror() -> Path | None:
    """The offline source root ``$NBLIB_MIRROR`` (``gutenberg/``, ``machado/``, ``qa/``, ``tokenizers/``), or ``None``."""
    env = os.environ.get("NBLIB_MIRROR")
    if not env:
        return None
    path = Path(env).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"NBLIB_MIRROR={env!r} is not a folder; point it at an offline data folder laid out like "
            "shared/data (gutenberg/, machado/, qa/, tokenizers/) or unset it to use the network"
        )
    return path


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes under the working root."""

    home: Path

    @cached_property
    def raw(self) -> Path:
        return self.home / "data" / "raw"

    @cached_property
    def processed(self) -> Path:
        return self.home / "data" / "processed"

    @cached_property
    def corpus(self) -> Path:
        return self.processed / "corpus"

    @cached_property
    def dialogues(self) -> Path:
        return self.processed / "dialogues"

    @cached_property
    def tokens(self) -> Path:
        return self.processed / "tokens"

    @cached_property
    def runs(self) -> Path:
        return self.home / "runs"

    @cached_property
    def reports(self) -> Path:
        return self.home / "reports"

    def run(self, name: str) -> Path:
        """The folder of run ``name`` under ``runs/``."""
        return self.runs / name


def paths(root: str | os.PathLike | None = None) -> Paths:
    """Paths under ``root`` (default: :func:`home`)."""
    return Paths(Path(root).resolve() if root is not None else home())


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def machine_info() -> dict[str, Any]:
    """Where a number was measured: CPU model, core count, GPU model (if any), library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "gpu": None,
        "device": "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info.update(device="cuda", gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count())
    return info

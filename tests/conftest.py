"""Shared fixtures: the offline data folder and a fresh working root per test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The offline data folder (``NBLIB_MIRROR``); tests that read real data need it."""
    env = os.environ.get("NBLIB_MIRROR")
    if not env or not Path(env).is_dir():
        pytest.fail(
            "NBLIB_MIRROR must point at the offline data folder (laid out like shared/data); "
            "`make test` sets it to ../shared/data when that folder exists"
        )
    return Path(env)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty working root for one test."""
    root = tmp_path / "home"
    root.mkdir()
    monkeypatch.setenv("NBLIB_HOME", str(root))
    return root

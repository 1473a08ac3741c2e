"""Relative paths in settings mean the working root (NBLIB_HOME), never the current directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nblib import chat, config, finetune

REPO = Path(__file__).resolve().parents[1]
PATH_SENSITIVE = [
    "tests/test_finetune.py::test_setup_errors",
    "tests/test_chat.py::test_adapter_beside_a_missing_merged_folder_is_loaded_on_its_base",
    "tests/test_chat.py::test_missing_model_names_the_notebook_that_makes_it",
]


def _decoys(where: Path) -> None:
    """What a clone that ran `make pipeline` holds: models under its own runs/."""
    for folder in ("runs/pretrain-mha/hf", "runs/pretrain-mha/seed-1337/hf", "runs/finetune-lora-8bit/seed-1234/merged"):
        (where / folder).mkdir(parents=True, exist_ok=True)
        (where / folder / "config.json").write_text("{}")


def test_settings_paths_do_not_resolve_against_the_current_directory(home, tmp_path, monkeypatch):
    cwd = tmp_path / "elsewhere"
    _decoys(cwd)
    monkeypatch.chdir(cwd)
    with pytest.raises(FileNotFoundError, match="not found under the working root"):
        finetune.resolve_base("runs/pretrain-mha/seed-1337/hf")
    with pytest.raises(FileNotFoundError, match="no model folder at runs/finetune-lora-8bit/seed-1234/merged"):
        chat.resolve("runs/finetune-lora-8bit/seed-1234/merged")
    assert config.resolve("runs/x") == home.resolve() / "runs" / "x"


def test_path_sensitive_tests_pass_from_a_folder_that_holds_runs(tmp_path, mirror):
    """`make pipeline` then `make test` in one clone: the tests must not see the clone's runs/."""
    _decoys(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "NBLIB_HOME"}
    proc = subprocess.run([sys.executable, "-m", "pytest", *(str(REPO / t) for t in PATH_SENSITIVE), "-q",
                           "-p", "no:cacheprovider", "--rootdir", str(REPO)],
                          cwd=tmp_path, env={**env, "NBLIB_MIRROR": str(mirror)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"{len(PATH_SENSITIVE)} passed" in proc.stdout

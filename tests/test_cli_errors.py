"""Every command's error paths (issue 30, case 9): one line naming the problem, exit 2, never a traceback.

Each case runs a real command in a subprocess on one working root: unknown profiles, a YAML tag that would
build Python objects, a read-only or full working root at start, and damaged or malicious files that a
command reads (pretraining checkpoints, a base model's or a chat model's pickles, a fine-tune's Trainer
state, a missing report). A read-only or full disk is simulated in the child (``FAIL_WRITES``: writes and
folders under the working root fail with that errno), since a test cannot mount one.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from nblib import config, finetune
from helpers import tiny_finetune_root

BASE = "models/tiny"
# a tiny full fine-tune: the settings the in-process set-up and the command line share
FT = {"steps": 4, "eval_steps": 2, "logging_steps": 1, "batch_size": 4, "eval_batch_size": 8, "eval_dialogues": 8,
      "warmup_steps": 1, "full_lr": 1e-3, "max_new_tokens": 4, "wandb": False, "base_model": BASE,
      "task_eval_per_source": 2, "questions": ["Name a fruit."]}
FT_ARGS = ["--profile", "smoke", "--variant", "full", *(a for k, v in FT.items() for a in ("-p", f"{k}={json.dumps(v)}"))]
YAML_TAG = 'x=!!python/object/apply:os.system ["true"]'

# Run in the child before the command: with FAIL_WRITES=<errno>, folders and files opened for writing under
# the working root fail as on a read-only (EROFS) or full (ENOSPC) disk.
LAUNCH = '''
import builtins, io, os, runpy, sys
if os.environ.get("FAIL_WRITES"):
    home, code = os.environ["NBLIB_HOME"], int(os.environ["FAIL_WRITES"])
    def fail(path):
        if isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(home):
            raise OSError(code, os.strerror(code), os.fspath(path))
    mkdir, io_open, os_open = os.mkdir, io.open, os.open
    def new_mkdir(path, *a, **k):
        fail(path)
        return mkdir(path, *a, **k)
    def new_open(file, mode="r", *a, **k):
        if set(mode) & set("wax+"):
            fail(file)
        return io_open(file, mode, *a, **k)
    def new_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            fail(path)
        return os_open(path, flags, *a, **k)
    os.mkdir, builtins.open, io.open, os.open = new_mkdir, new_open, new_open, new_os_open
runpy.run_module(os.environ["CLI_MODULE"], run_name="__main__", alter_sys=True)
'''


class Malicious:
    """A pickle that would run a shell command when loaded without ``weights_only``."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


def malicious(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": Malicious()}, path)


def make_root(root: Path, mirror: Path) -> None:
    """A tiny GPT-2 base, 200 Alpaca dialogues, and a full fine-tune with FT whose checkpoint-2 is kept aside."""
    tiny_finetune_root(root, mirror, BASE)
    s = finetune.setup(config.settings("finetune", "smoke", variant="full", **FT))
    finetune.train(s)
    shutil.copytree(s.run_dir / "checkpoints" / "checkpoint-2", root / "checkpoint-2")


def model_copy(root: Path, name: str) -> Path:
    """A copy of the base's config and tokenizer, without its weights."""
    folder = root / "models" / name
    shutil.copytree(root / BASE, folder, ignore=shutil.ignore_patterns("*.safetensors"), dirs_exist_ok=True)
    return folder


def damaged_checkpoint(root: Path, name: str, damage: Callable[[Path], None]) -> None:
    """The FT run as after step 2 (its checkpoint-2 only, which a rerun resumes), with file ``name`` damaged."""
    folder = root / "runs/finetune-full/seed-1234/checkpoints/checkpoint-2"
    shutil.rmtree(folder.parent)
    shutil.copytree(root / "checkpoint-2", folder)
    damage(folder / name)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


@dataclass(frozen=True)
class Case:
    id: str
    module: str
    args: list[str]
    says: str  # what the one line must contain
    prepare: Callable[[Path], None] = lambda root: None
    fail_writes: int | None = None


def _bad_checkpoints(root: Path) -> None:
    run = root / "runs/pretrain-mha/seed-1337"
    run.mkdir(parents=True, exist_ok=True)
    (run / "ckpt.pt").write_bytes(b"PK\x03\x04 cut short")
    (run / "ckpt.prev.pt").write_bytes(b"")


def _malicious_base(root: Path) -> None:
    malicious(model_copy(root, "pickled") / "pytorch_model.bin")


def _malicious_adapter(root: Path) -> None:
    folder = root / "models" / "adapter"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": BASE, "peft_type": "LORA"}))
    malicious(folder / "adapter_model.bin")


CASES = [
    *(Case(f"{m}-unknown-profile", f"nblib.{m}", ["--profile", "bogus"], "unknown profile 'bogus'")
      for m in ("train", "finetune", "chat", "pipeline")),
    *(Case(f"{m}-yaml-tag", f"nblib.{m}", ["--profile", "smoke", "-p", YAML_TAG], "is not plain YAML data")
      for m in ("train", "finetune", "pipeline")),
    *(Case(f"{m}-{name}-home", f"nblib.{m}", ["--profile", "smoke"], words, fail_writes=code)
      for m in ("train", "finetune", "pipeline")
      for name, code, words in (("read-only", errno.EROFS, "Read-only file system"),
                                ("full", errno.ENOSPC, "No space left on device"))),
    Case("train-both-checkpoints-bad", "nblib.train", ["--profile", "smoke"],
         "ckpt.pt cannot be read", _bad_checkpoints),
    Case("train-malicious-checkpoint", "nblib.train", ["--profile", "smoke", "--name", "evil"],
         "a pickle of posix.system", lambda root: malicious(root / "runs/evil/seed-1337/ckpt.pt")),
    Case("finetune-malicious-base", "nblib.finetune", [*FT_ARGS, "-p", "base_model=models/pickled"],
         "models/pickled/pytorch_model.bin cannot be read", _malicious_base),
    Case("chat-malicious-merged-model", "nblib.chat", ["--profile", "smoke", "--model", "models/pickled"],
         "pytorch_model.bin cannot be read", _malicious_base),
    Case("chat-malicious-adapter", "nblib.chat", ["--profile", "smoke", "--model", "models/adapter"],
         "adapter_model.bin cannot be read", _malicious_adapter),
    Case("finetune-truncated-optimizer", "nblib.finetune", FT_ARGS, "checkpoint-2/optimizer.pt cannot be read",
         lambda root: damaged_checkpoint(root, "optimizer.pt", truncate)),
    Case("finetune-empty-trainer-state", "nblib.finetune", FT_ARGS, "trainer_state.json cannot be read",
         lambda root: damaged_checkpoint(root, "trainer_state.json", lambda p: p.write_bytes(b""))),
    Case("finetune-malicious-rng-state", "nblib.finetune", FT_ARGS, "rng_state.pth cannot be read",
         lambda root: damaged_checkpoint(root, "rng_state.pth", malicious)),
    Case("report-nothing-to-publish", "nblib.report", ["--publish-example", "--home", "."], "compare.html"),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NBLIB_HOME", str(root))
        make_root(root, mirror)
    return root


def run_cli(case: Case, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NBLIB_HOME": str(root), "CLI_MODULE": case.module, "WANDB_MODE": "offline"}
    env.pop("FAIL_WRITES", None)
    if case.fail_writes is not None:
        env["FAIL_WRITES"] = str(case.fail_writes)
    return subprocess.run([sys.executable, "-c", LAUNCH, *case.args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_cli_error_is_one_line_and_exit_2(case: Case, root: Path):
    case.prepare(root)
    done = run_cli(case, root)
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if case.says in line]
    assert done.returncode == 2 and len(lines) == 1, output[-3000:]

"""Pretraining on every visible GPU: ``torchrun`` started from a notebook (:func:`launch`).

``nblib.train`` re-exports these names (``train.launch`` is what notebooks 03 and 04 call).
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from collections import deque
from typing import Any, Mapping

from nblib import config, machine, runs

STAGE = "train"


def world_size(cfg: Mapping[str, Any], processes: int | None = None) -> int:
    """DDP processes for a run: ``processes`` when given (2 on a CPU runs gloo), else one per visible
    GPU (``nblib.machine``), as many as divide ``grad_accum_steps`` (each takes an equal share)."""
    device, accum = machine.detect(), cfg["grad_accum_steps"]
    gpus = device.count if device.type == "cuda" else 1
    if processes is None:
        return max(n for n in range(1, gpus + 1) if accum % n == 0)
    if processes < 1 or (device.type == "cuda" and processes > gpus):
        raise config.SettingsError(f"processes={processes}: this machine has {gpus} {device.name} GPU(s) to train on")
    if accum % processes:
        raise config.SettingsError(f"processes={processes} must divide grad_accum_steps={accum} (each process takes "
                                   "an equal share of the micro-batches)")
    return processes


def torchrun_command(cfg: Mapping[str, Any], processes: int, seed: int, name: str, overwrite: bool = False) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N -m nblib.train`` for these settings: the profile,
    the preset and, as ``-p``, every setting that differs from them."""
    profile, preset = cfg["profile"], cfg.get("preset")
    defaults = config.settings(STAGE, profile, preset)
    changed = {k: v for k, v in cfg.items() if k not in ("profile", "preset", "seed") and v != defaults[k]}
    if config.settings(STAGE, profile, preset, **changed) != {k: v for k, v in cfg.items() if k != "seed"}:
        unsent = sorted(k for k, v in changed.items() if v is None)
        raise config.SettingsError(f"settings {', '.join(unsent)} are null where the profile sets them; torchrun "
                                   "cannot be given null (-p ignores it): set a value")
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", "nblib.train", "--profile", profile, *(["--preset", preset] if preset else []),
        "--seed", str(seed), "--name", name, *(["--overwrite"] if overwrite else []),
        *(arg for k, v in changed.items() for arg in ("-p", f"{k}={json.dumps(v)}")),
    ]


def launch(
    cfg: Mapping[str, Any],
    seed: int | None = None,
    name: str | None = None,
    paths: config.Paths | None = None,
    *,
    overwrite: bool = False,
    processes: int | None = None,
) -> dict[str, Any]:
    """Pretrain one seed on every visible GPU; returns its ``summary.json`` like :func:`nblib.train.run`, but a
    session the time budget stopped raises (:func:`outcome` says where; the next call resumes).

    One process (one GPU, a CPU, or already inside torchrun) trains here with :func:`nblib.train.run`; more
    (:func:`world_size`) run :func:`torchrun_command` as a child whose output is streamed here.
    A child that fails raises with each process's exception (:func:`stream`); Ctrl-C stops it (the run resumes from its last
    checkpoint next time).
    """
    from nblib import train  # it imports this module

    n = 1 if "WORLD_SIZE" in os.environ else world_size(cfg, processes)
    if n == 1:
        return _finished(train.run(cfg, seed, name, paths, overwrite=overwrite))
    paths = paths or config.paths()
    seed, name = train.identity(cfg, seed, name)
    command = torchrun_command(cfg, n, seed, name, overwrite)
    print(f"{name} seed {seed}: {n} DDP processes (torchrun)", flush=True)
    stream(command, {**os.environ, "NBLIB_HOME": str(paths.home)})
    return _finished(runs.read_summary(runs.folder(name, seed, paths)))


def outcome(summary: Mapping[str, Any]) -> str:
    """One line on a run: its steps and best val loss once finished, else where it stopped and that
    running it again resumes it."""
    head = f"{summary['name']} seed {summary['seed']}"
    if summary["finished"]:
        return f"{head}: {summary['steps']} steps, best val loss {summary['best_val_loss']:.4f}, finished"
    why = {"time_budget": "time budget", "stop_at": "stop_at"}.get(summary["stop_reason"], summary["stop_reason"])
    return (f"{head} stopped at step {summary['steps']} of {summary['max_steps']} ({why}): run again with the same "
            f"settings to resume from {summary['folder']}/ckpt.pt")


def _finished(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` of a finished run; a stopped one raises, so a notebook (and the pipeline) does not end as if done."""
    if not summary["finished"]:
        raise RuntimeError(outcome(summary))
    return summary


def stream(command: list[str], env: Mapping[str, str]) -> None:
    """Run ``command``, passing its output through as it comes (``\r`` progress updates included);
    a failure raises with each process's one-line CLI error (``config.cli``) and exception (torchrun
    prefixes lines ``[rankN]:``), rank 0's first, then the last lines."""
    tail: deque[str] = deque(maxlen=12)
    errors: dict[int, str] = {}
    said: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env)) as child:
        try:
            for line in io.TextIOWrapper(child.stdout, encoding="utf-8", errors="replace", newline=""):
                print(line, end="", flush=True)
                if CLI_ERROR.match(line) and line.rstrip() not in said:
                    said.append(line.rstrip())
                if line.startswith("[rank"):
                    tail.append(line.rstrip())
                    error = RANK_ERROR.match(line)
                    if error:
                        errors[int(error["rank"])] = line.rstrip()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)  # torchrun passes it to every process
            child.wait()
            raise
    if child.returncode:
        raised = "\n".join([*said, *(errors[rank] for rank in sorted(errors))]) or "(no exception line)"
        raise RuntimeError(f"torchrun exited with status {child.returncode} (its output is above):\n{raised}\n"
                           "the processes' last lines:\n" + "\n".join(tail))


CLI_ERROR = re.compile(r"python -m nblib\.\w+: error: ")  # a user error, said in one line by config.cli
RANK_ERROR = re.compile(r"\[rank(?P<rank>\d+)\]: [A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")

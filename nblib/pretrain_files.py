"""A pretraining run's files besides its metrics: resume or refuse (:func:`prepare`), the checkpoint
(:func:`checkpoint`, :func:`restore`), the best weights (:func:`save_best`), and the finished run a
converted variant starts from (:func:`load_source`). ``nblib.train`` drives them.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from nblib import attention, config, lifecycle, machine, runs
from nblib.files import TEMP_SUFFIX
from nblib.lifecycle import FRESH, REFUSE, RESUME
from nblib.model import GPT, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from nblib import train

STAGE = "train"
CKPT, PREV, BEST = "ckpt.pt", "ckpt.prev.pt", "best.pt"


def _load(path: Path) -> dict[str, Any]:
    """A checkpoint, or a clear error naming the file when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a bad pickle, a short read: all mean the file is damaged
        raise ValueError(f"{config.relative(path)} cannot be read ({type(e).__name__}: {str(e)[:120]})") from e


def _resumable(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint to resume from (``ckpt.pt``, else ``ckpt.prev.pt``) and a warning when the
    newer one was unreadable; ``(None, None)`` when there is none."""
    newest, prev = run_dir / CKPT, run_dir / PREV
    if not newest.is_file() and not prev.is_file():
        return None, None
    try:
        return _load(newest if newest.is_file() else prev), None
    except ValueError as broken:
        if newest.is_file() and prev.is_file():
            try:
                older = _load(prev)
            except ValueError:
                pass
            else:
                return older, f"{broken}; resuming from {config.relative(prev)} (step {older['step']}) instead"
        raise ValueError(
            f"{broken}, and no earlier good checkpoint is kept. Start afresh with {runs.afresh(run_dir.parent.name)}, "
            "or restore the file from a backup"
        ) from None


def prepare(run_dir: Path, cfg: dict[str, Any], ddp: machine.Dist, overwrite: bool,
            converted: bool) -> tuple[int, dict[str, Any] | None]:
    """Rank 0 checks the run folder and decides for every process: ``RESUME`` (with the
    checkpoint), ``DONE`` (a finished run of the same settings), ``FRESH`` (the folder is emptied),
    or an error when the folder holds a run of other settings or an unreadable checkpoint."""
    decision, problem, ckpt = FRESH, "", None
    if ddp.master:
        lifecycle.clean(run_dir)
        try:
            decision, ckpt = (FRESH, None) if overwrite else _decide(run_dir, cfg, converted)
        except (ValueError, OSError) as e:
            decision, problem = REFUSE, str(e)
        if decision == FRESH and run_dir.exists():
            shutil.rmtree(run_dir)
    decision = ddp.agree(decision, torch.device("cuda", ddp.local_rank) if torch.cuda.is_available() else torch.device("cpu"))
    if decision == REFUSE:
        raise ValueError(problem or f"rank 0 refused {config.relative(run_dir)}: see its message")
    ddp.barrier()
    if decision == RESUME and ckpt is None:
        ckpt, _ = _resumable(run_dir)
    return decision, ckpt if decision == RESUME else None


def _decide(run_dir: Path, cfg: dict[str, Any], converted: bool) -> tuple[int, dict[str, Any] | None]:
    ckpt, warning = _resumable(run_dir)
    if warning:
        print(f"warning: {warning}")
    # a run from scratch does not read uptrain_fraction (and runs older than it lack it)
    free = config.free_keys(STAGE) | (set() if converted else {"uptrain_fraction"})
    decision, _ = lifecycle.decide(run_dir, cfg, free, f"another run name, or {runs.afresh(run_dir.parent.name)} to start afresh",
                                   ckpt["settings"] if ckpt is not None else None, ckpt is not None)
    return decision, ckpt if decision == RESUME else None


def load_source(variant: attention.Variant, cfg: Mapping[str, Any], seed: int, paths: config.Paths,
                info: Mapping[str, Any]) -> tuple[GPT, dict[str, Any]]:
    """The best weights and summary of the finished run a converted variant starts from (same seed),
    refused when absent, unfinished, or trained with other settings (K/V heads and the free keys
    aside) or on other data."""
    src = attention.get(variant.source)
    run_dir = runs.folder(src.folder, seed, paths)
    where = config.relative(run_dir, paths.home)
    summary = runs.read_summary(run_dir) if (run_dir / "summary.json").is_file() else None
    if summary is None or not summary["finished"]:
        raise runs.RunError(
            f"{variant.folder} is converted from {where}/best.pt, which is "
            f"{'missing' if summary is None else 'not finished'}: run notebook {src.notebook} (seed {seed}) to its end "
            "first, with the same settings"
        )
    diff = runs.settings_diff(summary["config"], dict(cfg), config.free_keys(STAGE) | {"n_kv_head", "uptrain_fraction"})
    if summary["data"] != info:
        diff.append("data (the corpus token files differ)")
    if diff:
        raise config.SettingsError(f"{variant.folder} cannot be converted from {where}, trained with other settings "
                                   f"({'; '.join(diff)}): use that run's settings, or re-run notebook {src.notebook}")
    model, _ = load_checkpoint(paths.home / summary["checkpoint"])
    return model, summary


def restore(s: train.Session, ckpt: dict[str, Any]) -> None:
    """Load a checkpoint into the session; put ``best.pt`` and ``metrics.jsonl`` back in step with it."""
    from nblib import train  # it imports this module

    s.model.load_state_dict(ckpt["model"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.scheduler.load_state_dict(ckpt["scheduler"])
    s.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if s.device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], s.device)
    s.state = train.State(**ckpt["state"])
    s.best = ckpt.get("best")
    s.wall_before = s.state.wall_seconds
    if s.ddp.master:
        runs.truncate_metrics(s.run_dir, s.state.step)  # rows after the checkpoint are logged again
        best_path = s.run_dir / BEST
        on_disk = torch.load(best_path, map_location="cpu", weights_only=True)["step"] if best_path.is_file() else None
        if s.best is not None and on_disk != s.state.best_step:  # best.pt came from an evaluation now undone
            save_best(s)


@contextmanager
def stop_requests(active: bool) -> Iterator[list[int]]:
    """While active, SIGINT and SIGTERM (Ctrl-C, the pipeline interrupting its kernel, a Kaggle session
    ending) only ask for a stop: the list they fill is read between steps, where a checkpoint is
    exact (one in the middle of a step would not be). A second signal stops at once. Needs the main
    thread (signal handlers) and one process (DDP ranks would have to agree on the step)."""
    asked: list[int] = []
    if not active or threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def ask(signum: int, frame: object) -> None:
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def save_best(s: train.Session) -> None:
    best = GPT(s.model.config)
    best.load_state_dict(s.best)
    save_checkpoint(s.run_dir / BEST, best, settings=s.cfg, step=s.state.best_step, val_loss=s.state.best_val_loss)


def checkpoint(s: train.Session) -> None:
    """Write ``ckpt.pt`` atomically, keeping the one before as ``ckpt.prev.pt``, and the summary."""
    from nblib import train  # it imports this module

    t0 = time.perf_counter()
    s.state.wall_seconds = s.wall()
    ckpt = s.run_dir / CKPT
    cuda_rng = torch.cuda.get_rng_state(s.device) if s.device.type == "cuda" else None
    new = s.run_dir / f".{CKPT}.next{TEMP_SUFFIX}"  # a kill before the renames leaves only a temp file
    save_checkpoint(
        new, s.model, settings=s.cfg, optimizer=s.optimizer.state_dict(),
        scheduler=s.scheduler.state_dict(), scaler=s.scaler.state_dict(),
        rng={"torch": torch.get_rng_state(), "cuda": cuda_rng}, state=asdict(s.state), best=s.best,
        step=s.state.step,
    )
    if ckpt.is_file():
        os.replace(ckpt, s.run_dir / PREV)
    os.replace(new, ckpt)
    runs.write_summary(s.run_dir, train.summary(s, False, None, None))
    s.ckpt_seconds = max(s.ckpt_seconds, time.perf_counter() - t0)

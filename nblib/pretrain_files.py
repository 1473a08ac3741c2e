"""A pretraining run's files besides its metrics: resume or refuse (:func:`prepare`), the checkpoint
(:func:`checkpoint`, :func:`restore`), the best weights (:func:`save_best`), and the finished run a
converted variant starts from (:func:`load_source`), and its ``summary.json`` (:func:`summary`). ``nblib.train`` drives them.
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
from nblib.weights import read_checkpoint

if TYPE_CHECKING:
    from nblib import train

STAGE = "train"
CKPT, PREV, BEST = "ckpt.pt", "ckpt.prev.pt", "best.pt"


def _resumable(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint to resume from (``ckpt.pt``, else ``ckpt.prev.pt``) and a warning when the
    newer one was unreadable; ``(None, None)`` when there is none."""
    newest, prev = run_dir / CKPT, run_dir / PREV
    if not newest.is_file() and not prev.is_file():
        return None, None
    try:
        return read_checkpoint(newest if newest.is_file() else prev), None
    except config.Refused as broken:
        if newest.is_file() and prev.is_file():
            try:
                older = read_checkpoint(prev)
            except config.Refused:
                pass
            else:
                return older, f"{broken}; resuming from {config.relative(prev)} (step {older['step']}) instead"
        raise config.Refused(
            f"{broken}, and no earlier good checkpoint is kept. Start afresh with {runs.afresh(run_dir.parent.name)}, "
            "or restore the file from a backup"
        ) from None


def prepare(run_dir: Path, cfg: dict[str, Any], ddp: machine.Dist, overwrite: bool,
            converted: bool) -> tuple[int, dict[str, Any] | None]:
    """Rank 0 checks the run folder and decides for every process: ``RESUME`` (with the
    checkpoint), ``DONE`` (a finished run of the same settings), ``FRESH`` (the folder is emptied),
    or :class:`config.Refused` when the folder holds a run of other settings, an unreadable checkpoint,
    or trained weights without a summary."""
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
        raise config.Refused(problem or f"rank 0 refused {config.relative(run_dir)}: see its message")
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
                info: Mapping[str, Any]) -> tuple[GPT, dict[str, Any], dict[str, Any]]:
    """The best weights, summary and optimizer state at those weights of the finished run a converted
    variant starts from (same seed), refused when absent, unfinished, or trained with other settings
    (K/V heads and the free keys aside) or on other data."""
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
    try:
        model, ckpt = load_checkpoint(paths.home / summary["checkpoint"])
    except config.Refused as e:
        raise config.Refused(f"{e}; {variant.folder} is converted from it: {runs.rerun(src.folder)}") from e
    if ckpt.get("optimizer") is None:
        raise runs.RunError(f"{where}/best.pt holds no optimizer state for uptraining: re-run notebook {src.notebook} "
                            f"with {runs.afresh(src.folder)}")
    return model, summary, ckpt["optimizer"]


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
    s.best, s.best_optimizer = ckpt.get("best"), ckpt.get("best_optimizer")
    s.wall_before = s.state.wall_seconds
    if s.ddp.master:
        runs.truncate_metrics(s.run_dir, s.state.step)  # rows after the checkpoint are logged again
        if s.best is not None and _best_step(s.run_dir / BEST) != s.state.best_step:  # from an evaluation now undone
            save_best(s)


def _best_step(path: Path) -> int | None:
    """The step of the weights ``best.pt`` holds; ``None`` when it is absent or damaged (said: the checkpoint
    being resumed carries the best weights, so :func:`restore` writes it again)."""
    if not path.is_file():
        return None
    try:
        return read_checkpoint(path, mmap=True)["step"]
    except config.Refused as e:
        print(f"warning: {e}; rebuilt from the best weights the checkpoint being resumed carries")
        return None


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
    save_checkpoint(s.run_dir / BEST, best, settings=s.cfg, step=s.state.best_step, val_loss=s.state.best_val_loss,
                    optimizer=s.best_optimizer)


def checkpoint(s: train.Session) -> None:
    """Write ``ckpt.pt`` atomically, keeping the one before as ``ckpt.prev.pt``, and the summary."""
    t0 = time.perf_counter()
    s.state.wall_seconds = s.wall()
    ckpt = s.run_dir / CKPT
    cuda_rng = torch.cuda.get_rng_state(s.device) if s.device.type == "cuda" else None
    new = s.run_dir / f".{CKPT}.next{TEMP_SUFFIX}"  # a kill before the renames leaves only a temp file
    save_checkpoint(
        new, s.model, settings=s.cfg, optimizer=s.optimizer.state_dict(),
        scheduler=s.scheduler.state_dict(), scaler=s.scaler.state_dict(),
        rng={"torch": torch.get_rng_state(), "cuda": cuda_rng}, state=asdict(s.state), best=s.best,
        best_optimizer=s.best_optimizer,
        step=s.state.step,
    )
    if ckpt.is_file():
        os.replace(ckpt, s.run_dir / PREV)
    os.replace(new, ckpt)
    runs.write_summary(s.run_dir, summary(s, False, None, None))
    s.ckpt_seconds = max(s.ckpt_seconds, time.perf_counter() - t0)


def summary(s: train.Session, finished: bool, reason: str | None, hf_dir: Path | None) -> dict[str, Any]:
    """This run's ``summary.json`` (``nblib.runs`` schema)."""
    st, m, c, v, src = s.state, s.model, s.model.config, s.variant, s.source
    best, last = st.best_val_loss, st.last_val_loss
    source_steps, source_tokens = (src["steps"], src["tokens_seen"]) if src else (0, 0)
    return {
        **lifecycle.summary_head(
            name=s.name, stage="pretrain", variant=v.key, label=v.label, folder=config.relative(s.run_dir, s.paths.home),
            cfg=s.cfg, seed=s.seed, device=s.policy.device, data=s.data, compute_dtype=s.policy.dtype_name,
            finished=finished, reason=reason, wall_seconds=round(s.wall(), 3),
            train_seconds=round(st.train_seconds, 3), peak_memory_bytes=machine.peak_memory(s.device)),
        "params": m.num_params(), "params_embedding": m.num_params("embedding"), "params_blocks": m.num_params("blocks"),
        "n_layer": c.n_layer, "n_head": c.n_head, "n_kv_head": c.n_kv_head, "d_model": c.d_model,
        "d_mlp": c.mlp_width, "matched": v.matched, "context_length": c.context_length,
        "kv_cache_bytes_per_token": {"float32": m.kv_cache_bytes(1, 1, torch.float32),
                                     s.policy.dtype_name: m.kv_cache_bytes(1, 1, s.policy.dtype)},
        **lifecycle.loss_fields("best_val_", best, st.best_val_bpb), "best_step": st.best_step,
        "selection": s.selection, **lifecycle.loss_fields("test_", st.test_loss, st.test_bpb),
        **lifecycle.loss_fields("final_val_", last, st.last_val_bpb), "final_lr": s.scheduler.get_last_lr()[0],
        "train_tokens_per_s": st.tokens_seen / st.train_seconds if st.train_seconds else None,
        "tokens_seen": st.tokens_seen, "steps": st.step, "max_steps": s.max_steps, "skipped_steps": st.skipped_steps,
        "init": v.init, "source_run": src["folder"] if src else None, "conversion_method": v.method,
        "uptrain_fraction": s.cfg["uptrain_fraction"] if src else None,
        "converted_val_loss": st.initial_val_loss if src else None, "uptrained_val_loss": last if src else None,
        **{f"converted_{k}": v if src else None for k, v in (("val_bpb", st.initial_val_bpb), ("test_loss", st.initial_test_loss),
                                                                ("test_bpb", st.initial_test_bpb))},
        "source_steps": source_steps, "total_steps": source_steps + st.step, "total_tokens": source_tokens + st.tokens_seen,
        "world_size": s.ddp.world_size,
        "checkpoint": config.relative(s.run_dir / BEST, s.paths.home),
        "hf_export": config.relative(hf_dir, s.paths.home) if hf_dir is not None else None,
    }

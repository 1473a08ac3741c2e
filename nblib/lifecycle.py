"""One run's life, shared by both trainers (``nblib.train``, ``nblib.finetune``).

Resume or refuse (:func:`decide`: a run folder of the same settings resumes, a finished one is
done, other settings are refused with how to start afresh), the session's time budget
(:class:`Budget`), the ``summary.json`` fields every run has (:func:`summary_head`, :func:`loss_fields`),
when training has diverged (:func:`blown_up`, :class:`Diverged`) and the loss accounting in nats per token
and bits per byte (:class:`LossSum`).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from nblib import config, machine, runs
from nblib.files import remove_orphans

LN2 = math.log(2)
FRESH, RESUME, DONE, REFUSE = range(4)
OUTPUTS = ("best.pt", "hf", "adapter", "merged")  # what a run keeps once trained: never deleted without its summary
DIVERGED_LOSS = 100.0  # nats per token: past this a loss is a blow-up (a uniform guess over GPT-2's tokens is 10.8)
MAX_EXP = math.log(sys.float_info.max)  # exp() of more overflows


# ---------------------------------------------------------------------------------------------
# resume or refuse


def clean(run_dir: Path, *inner: Path) -> None:
    """Remove what killed writes left in ``run_dir`` (and the folders ``inner``), naming each."""
    for folder in (run_dir, *inner):
        for note in remove_orphans(folder):
            print(f"{config.relative(run_dir)}: {note}")


def decide(run_dir: Path, cfg: Mapping[str, Any], free: set[str], afresh: str,
           saved: Mapping[str, Any] | None = None, resumable: bool = True) -> tuple[int, dict[str, Any] | None]:
    """``(DONE | RESUME | FRESH, the earlier summary or None)`` for a run folder: refused (:class:`config.Refused`)
    when the run it holds had other settings (``saved``, else its summary's; ``free`` keys aside) or,
    with something to resume (``resumable``), none on record;
    ``DONE`` once that run finished, ``RESUME`` when there is something to resume (``resumable``).
    ``afresh`` ends the refusal: how to start over. A folder with nothing to resume that keeps trained
    weights (:data:`OUTPUTS`) but no summary is refused too: starting afresh would delete them unasked."""
    summary = runs.read_summary(run_dir) if (run_dir / "summary.json").is_file() else None
    kept = [name for name in OUTPUTS if (run_dir / name).exists()]
    if summary is None and kept and not resumable:
        raise config.Refused(f"{config.relative(run_dir)} holds {', '.join(kept)} but no summary.json, so whether that run "
                             f"finished, and with which settings, is unknown; it is kept. Put its summary.json back to "
                             f"use it, or use {afresh}")
    saved = saved if saved is not None else (summary or {}).get("config")
    if saved is None and resumable:  # something to resume, but no record of its settings: not ours to resume
        saved = {}
    diff = runs.settings_diff(saved, dict(cfg), free) if saved is not None else []
    if diff:
        raise config.Refused(f"{config.relative(run_dir)} holds a run of different settings ({'; '.join(diff)}); use the "
                             f"same settings to resume, {afresh}")
    if summary is not None and summary["finished"]:
        return DONE, summary
    return (RESUME if resumable else FRESH), summary


# ---------------------------------------------------------------------------------------------
# the time budget


@dataclass
class Budget:
    """A session's ``time_budget_minutes`` (``None``: no limit) and a running mean of its step time."""

    minutes: float | None
    started: float = field(default_factory=time.perf_counter)
    step_seconds: float = 0.0

    def step(self, seconds: float) -> None:
        """Count a step that took ``seconds``."""
        self.step_seconds = seconds if self.step_seconds == 0 else 0.8 * self.step_seconds + 0.2 * seconds

    def short(self, reserve: float) -> bool:
        """True when less than ``reserve`` seconds of the budget are left."""
        return self.minutes is not None and self.minutes * 60 - (time.perf_counter() - self.started) < reserve


# ---------------------------------------------------------------------------------------------
# summary fields and loss accounting


def summary_head(*, name: str, stage: str, variant: str, label: str, folder: str, cfg: Mapping[str, Any], seed: int,
                 device: machine.Device, data: Mapping[str, Any], compute_dtype: str, finished: bool,
                 reason: str | None, wall_seconds: float, train_seconds: float | None,
                 peak_memory_bytes: int | None) -> dict[str, Any]:
    """The fields every ``summary.json`` opens with (``nblib.runs`` schema), in their order."""
    return {
        "name": name, "stage": stage, "variant": variant, "label": label, "folder": folder,
        "profile": cfg["profile"], "seed": seed, "config": cfg, "machine": machine.info(device), "data": data,
        "compute_dtype": compute_dtype, "finished": finished, "stop_reason": reason, "wall_seconds": wall_seconds,
        "train_seconds": train_seconds, "peak_memory_bytes": peak_memory_bytes,
    }


def loss_fields(prefix: str, loss: float | None, bpb: float | None) -> dict[str, float | None]:
    """``<prefix>loss``, ``<prefix>ppl`` and ``<prefix>bpb`` (``None`` where no loss was measured)."""
    return {f"{prefix}loss": loss, f"{prefix}ppl": perplexity(loss) if loss is not None else None, f"{prefix}bpb": bpb}


def perplexity(loss: float) -> float:
    """``exp(loss)``; ``inf`` where that overflows (a blown-up loss must be reported, not crash the report of it)."""
    return math.inf if loss > MAX_EXP else math.exp(loss)


# ---------------------------------------------------------------------------------------------
# divergence


class Diverged(config.UserError, FloatingPointError):
    """Training blew up: a non-finite or huge loss, or a non-finite gradient norm. The message names the step,
    the learning rate, the last good checkpoint and what to try; ``step`` is the step that blew up."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def blown_up(loss: float) -> bool:
    """Whether a loss (nats per token) says training diverged: not finite, or above :data:`DIVERGED_LOSS`."""
    return not math.isfinite(loss) or loss > DIVERGED_LOSS


def diverged(run: str, what: str, value: float, step: int, lr: float, last: str, tips: str, afresh: str) -> Diverged:
    """The error of a run whose ``what`` (loss, eval loss, gradient norm) is ``value`` at ``step``: stop, and
    say the learning rate, the last good checkpoint (``last``) and what to try (``tips``, then ``afresh``)."""
    return Diverged(f"{run}: {what} is {value:.4g} at step {step}: training diverged and stopped (learning_rate={lr:g}). "
                    f"Last good checkpoint: {last}. Try a lower learning_rate{tips}, then run "
                    f"again with {afresh}", step)


def pooled_loss(by_source: dict[str, dict[str, Any]]) -> float | None:
    """Nats per token over every source's scored tokens together (``{source: {"loss", "tokens"}}``)."""
    tokens = sum(v["tokens"] for v in by_source.values() if v["loss"] is not None)
    return sum(v["loss"] * v["tokens"] for v in by_source.values() if v["loss"] is not None) / tokens if tokens else None


@dataclass
class LossSum:
    """Cross-entropy summed over scored tokens (nats per token), and over the tokens that stand for text
    with their UTF-8 bytes (``token_bytes[id]``, 0 for special tokens: bits per byte; ``None``: no bytes)."""

    token_bytes: torch.Tensor | None
    nats: float = 0.0
    tokens: int = 0
    text_nats: float = 0.0
    text_bytes: int = 0

    def add(self, nll: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Count per-token losses ``nll`` of ``targets`` (flat), those where ``keep`` (default: all)."""
        keep = torch.ones_like(targets, dtype=torch.bool) if keep is None else keep
        self.nats += nll[keep].sum().item()
        self.tokens += int(keep.sum())
        if self.token_bytes is None:
            return
        b = self.token_bytes.to(targets.device)[targets.clamp(min=0)] * keep
        self.text_nats += nll[b > 0].sum().item()
        self.text_bytes += int(b.sum())

    @property
    def loss(self) -> float:
        """Mean nats per scored token."""
        return self.nats / self.tokens

    @property
    def bpb(self) -> float | None:
        """Bits per UTF-8 byte of the text tokens (``None`` when none was scored)."""
        return self.text_nats / LN2 / self.text_bytes if self.text_bytes else None

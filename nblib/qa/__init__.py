"""Question/answer sources: one module per dataset, looked up by name (like nanochat's ``tasks/``).

Each module defines ``SOURCE``, a :class:`QASource`: the source id, where the data lives (hub
name and split, an optional file under ``$NBLIB_MIRROR``), the fields every record must have, and
``convert``, which turns one record in the source's own schema into dialogue turns (or ``None``
when the record has no answer); ``task`` and ``eval_fields`` say how ``nblib.qa_eval`` scores the
source (multiple choice, short answers, free-form) and what a record must keep for it. Adding a
dataset is one new module here; ``ingest`` fetches it by name and ``dialogue`` converts it by name.
``samples/<name>.jsonl`` holds a few records in the hub's real schema, for tests and the offline dry run.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable

Turns = list[dict[str, str]]
SAMPLES = Path(__file__).with_name("samples")


@dataclass(frozen=True)
class QASource:
    """Where a QA dataset lives, what its records hold, and how one becomes a dialogue."""

    name: str
    hub: str | None  # Hugging Face dataset id (None: local files only)
    fields: tuple[str, ...]  # every record must have these
    convert: Callable[[dict[str, Any]], Turns | None]
    split: str = "train"
    config: str | None = None  # the hub dataset's configuration name, if it has several
    mirror_file: str | None = None  # path under $NBLIB_MIRROR
    streaming: bool = False  # stream instead of downloading the whole set
    keep: tuple[str, ...] | None = None  # fields written to data/raw (None: all)
    task: str | None = None  # how nblib.qa_eval scores it: one of TASKS, or None (eval loss only)
    # what a dialogue record keeps beside its turns for that task (SciQ's options, NQ's answers)
    eval_fields: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    @property
    def sample_file(self) -> Path | None:
        """A few records in the hub's schema (``samples/<name>.jsonl``), if shipped."""
        path = SAMPLES / f"{self.name}.jsonl"
        return path if path.is_file() else None


TASKS = ("choice", "short_answer", "free_form")
"""``choice``: options ranked by log-likelihood; ``short_answer``: exact match and token F1 of a
greedy answer; ``free_form``: ROUGE-L of a greedy answer against the dialogue's own answer."""


def pair(question: str, answer: str) -> Turns:
    """One exchange: the user's question and the assistant's answer."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@cache
def sources() -> dict[str, QASource]:
    """Every source module of this package, by name."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        source = getattr(module, "SOURCE", None)
        if isinstance(source, QASource):
            found[source.name] = source
    return found


def get(name: str) -> QASource:
    """The source called ``name``; an unknown name lists the known ones."""
    known = sources()
    if name not in known:
        raise ValueError(f"unknown QA source {name!r}; known: {', '.join(sorted(known))} (one module each in nblib/qa/)")
    return known[name]

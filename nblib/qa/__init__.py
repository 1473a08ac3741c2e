"""Question/answer sources: one module per dataset, looked up by name (like nanochat's ``tasks/``).

Each module defines ``SOURCE``, a :class:`QASource`: the source id, where the data lives (hub
name and split, an optional file under ``$NBLIB_MIRROR``), the fields every record must have, and
``convert``, which turns one record in the source's own schema into dialogue turns (or ``None``
when the record has no answer); ``task`` and ``eval_fields`` say how ``nblib.qa_eval`` scores the
source (multiple choice, short answers, free-form) and what a record must keep for it, in the chat
format (``task_label``); ``harness`` is the same source scored as an EleutherAI lm-evaluation-harness
task (:class:`HarnessTask`, run by ``nblib.lmeval``). Adding a dataset is one new module here;
``ingest`` fetches it by name and ``dialogue`` converts it by name.
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
class HarnessTask:
    """A task of EleutherAI's lm-evaluation-harness (``lm_eval/tasks/<name>/<name>.yaml``) as a dialogue
    record of this source poses it; ``nblib.lmeval`` scores it the harness's way.

    ``multiple_choice``: the summed log-likelihood of ``target_delimiter + choice`` after ``context``,
    per choice (``gold`` the correct index); ``generate_until``: the greedy answer after ``context``,
    cut at the first of ``until``, stripped and scored by ``match`` against ``gold`` (its references;
    a record with none is not an item of the task).
    """

    name: str  # the harness's task name
    label: str  # the report's name for its rows
    output_type: str  # "multiple_choice" | "generate_until", as the YAML's output_type
    metrics: tuple[str, ...]  # the per-item scores, named as the harness names them
    fields: tuple[str, ...]  # what a dialogue record must keep for it (its eval fields)
    context: Callable[[dict[str, Any]], str]  # the prompt: description + doc_to_text
    gold: Callable[[dict[str, Any]], Any]  # doc_to_target: the correct choice's index, or the references
    choices: Callable[[dict[str, Any]], list[str]] | None = None  # doc_to_choice (multiple_choice)
    target_delimiter: str = " "
    until: tuple[str, ...] = ()  # generation_kwargs.until (generate_until)
    match: Callable[[str, list[str]], float] | None = None  # one answer against the references (generate_until)


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
    task_label: str | None = None  # the report's name for the rows of ``task`` (scored in the chat format)
    harness: HarnessTask | None = None  # the source as an lm-evaluation-harness task scores it
    # a hub split whose records form the test split as they are (SciQ's own test split), else None
    eval_split: str | None = None

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

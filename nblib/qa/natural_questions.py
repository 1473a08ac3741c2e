"""Natural Questions (Google): real search queries, answered by a short span of a Wikipedia page.

``question["text"]`` -> user; the first annotator's non-empty short answer -> assistant, else a
yes/no answer, else the record is skipped (most records have no short answer). In the hub's
records (``datasets``' decoding of a Sequence of dicts) ``annotations`` is columnar: a dict of
lists with one entry per annotator, and each annotator's ``short_answers`` is itself a dict of
lists (``text`` a list of strings). The full set is ~40 GB (each record carries its Wikipedia
page), so it is streamed and only ``id``, ``question`` and ``annotations`` are kept.
"""
from __future__ import annotations

from typing import Any

from nblib.qa import QASource, Turns, pair

YES_NO = {0: "No.", 1: "Yes."}  # ClassLabel names ["NO", "YES"]; -1 means no yes/no answer


def _annotators(annotations: Any) -> list[dict[str, Any]]:
    """One dict per annotator, from the columnar hub layout or a plain list of annotations."""
    if isinstance(annotations, list):
        return [a for a in annotations if isinstance(a, dict)]
    if not isinstance(annotations, dict):
        return []
    n = max((len(v) for v in annotations.values() if isinstance(v, list)), default=0)
    return [{k: v[i] for k, v in annotations.items() if isinstance(v, list) and i < len(v)} for i in range(n)]


def _short_texts(short: Any) -> list[str]:
    """Texts of one annotator's short answers (a dict of lists, or a list of dicts)."""
    items = [short] if isinstance(short, dict) else (short or [])
    texts: list[str] = []
    for item in items:
        value = item.get("text", []) if isinstance(item, dict) else []
        texts += [value] if isinstance(value, str) else [t for t in value if isinstance(t, str)]
    return texts


def answers(annotations: Any) -> list[str]:
    """Every non-empty short answer over the annotators, in order; without one, their yes/no answers."""
    annotators = _annotators(annotations)
    short = [t.strip() for a in annotators for t in _short_texts(a.get("short_answers")) if t.strip()]
    yes_no = [YES_NO[a["yes_no_answer"]] for a in annotators if a.get("yes_no_answer") in YES_NO]
    return short or yes_no


def answer(annotations: Any) -> str | None:
    """The first non-empty short answer over the annotators, else the first yes/no answer, else ``None``."""
    found = answers(annotations)
    return found[0] if found else None


def convert(rec: dict[str, Any]) -> Turns | None:
    """The question, capitalised and closed with ``?``, and its answer; ``None`` when it has none."""
    question = rec["question"]["text"] if isinstance(rec["question"], dict) else rec["question"]
    reply = answer(rec.get("annotations"))
    if reply is None:
        return None
    question = question.strip()
    if question and question[-1] not in "?.!":
        question += "?"
    return pair(question[:1].upper() + question[1:], reply)


def eval_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """All reference answers: a generated answer is scored against the best-matching one (SQuAD's rule)."""
    return {"answers": answers(rec.get("annotations"))}


SOURCE = QASource(
    "natural_questions", "google-research-datasets/natural_questions", ("question", "annotations"), convert,
    config="default", streaming=True, keep=("id", "question", "annotations"), task="short_answer",
    eval_fields=eval_fields,
)

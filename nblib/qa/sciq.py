"""SciQ: ``question`` -> user; the correct answer stated first, then ``support`` as the explanation."""
from __future__ import annotations

from typing import Any

from nblib.qa import QASource, Turns, pair


def convert(rec: dict[str, Any]) -> Turns:
    """When the support already opens with the answer it is used alone, so the answer is not said twice."""
    answer = rec["correct_answer"].strip()
    support = (rec.get("support") or "").strip()
    if not support:
        reply = answer
    elif support.lower().startswith(answer.lower()):
        reply = support
    else:
        reply = f"{answer[:1].upper()}{answer[1:]}. {support}"
    return pair(rec["question"], reply)


def eval_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """The options, distractors first and the correct answer last (lm-evaluation-harness' ``sciq``
    order; a tie then never counts as correct), and the correct one's index."""
    options = [rec["distractor1"], rec["distractor2"], rec["distractor3"], rec["correct_answer"]]
    return {"options": options, "correct": len(options) - 1}


SOURCE = QASource(
    "sciq", "allenai/sciq", ("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support"),
    convert, task="choice", eval_fields=eval_fields,
)

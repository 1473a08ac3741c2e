"""Stanford Alpaca: ``instruction`` (+ optional ``input``) -> user, ``output`` -> assistant."""
from __future__ import annotations

from typing import Any

from nblib.qa import QASource, Turns, pair


def convert(rec: dict[str, Any]) -> Turns:
    """The instruction, with a non-empty ``input`` on a new paragraph, as the question."""
    question = rec["instruction"]
    if (rec.get("input") or "").strip():
        question += "\n\n" + rec["input"]
    return pair(question, rec["output"])


SOURCE = QASource("alpaca", "tatsu-lab/alpaca", ("instruction", "input", "output"), convert,
                  mirror_file="qa/alpaca_5000.json", task="free_form", task_label="Alpaca (chat format)")

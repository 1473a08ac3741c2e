"""Databricks Dolly 15k: ``instruction`` (+ optional ``context``) -> user, ``response`` -> assistant."""
from __future__ import annotations

from typing import Any

from nblib.qa import QASource, Turns, pair


def convert(rec: dict[str, Any]) -> Turns:
    """The instruction, with a non-empty ``context`` (the passage it is about) on a new paragraph."""
    question = rec["instruction"]
    if (rec.get("context") or "").strip():
        question += "\n\n" + rec["context"]
    return pair(question, rec["response"])


SOURCE = QASource("dolly", "databricks/databricks-dolly-15k", ("instruction", "context", "response", "category"),
                  convert, task="free_form", task_label="Dolly (chat format)")

"""SciQ: ``question`` -> user; the correct answer stated first, then ``support`` as the explanation.

Scored twice (``nblib.qa_eval``): closed-book in the chat format (the question alone, options after
``<|assistant|>``), and as lm-evaluation-harness' ``sciq`` task (:data:`HARNESS`), which puts the
support passage in the prompt. The ingest stage fetches the hub's ``test`` split beside ``train``, and
the clean stage makes it the test split as it is (``eval_split``), so both score SciQ's own test items.
"""
from __future__ import annotations

from typing import Any

from nblib.qa import HarnessTask, QASource, Turns, pair


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
    order; a tie then never counts as correct), the correct one's index, and the question and support
    passage the harness's prompt is made of (the passage also keeps its questions in one split)."""
    options = [rec["distractor1"], rec["distractor2"], rec["distractor3"], rec["correct_answer"]]
    return {"options": options, "correct": len(options) - 1, "question": rec["question"],
            "support": rec.get("support") or ""}


def harness_context(rec: dict[str, Any]) -> str:
    """``doc_to_text`` of lm-eval 0.4.13's ``lm_eval/tasks/sciq/sciq.yaml`` (no description, 0-shot):
    ``"{{support.lstrip()}}\\nQuestion: {{question}}\\nAnswer:"``."""
    return f"{rec['support'].lstrip()}\nQuestion: {rec['question']}\nAnswer:"


# sciq.yaml: output_type multiple_choice, doc_to_choice [distractor1, distractor2, distractor3,
# correct_answer], doc_to_target 3, target_delimiter " " (the default), metrics acc and acc_norm
HARNESS = HarnessTask(
    "sciq", "SciQ (lm-eval `sciq`)", "multiple_choice", ("acc", "acc_norm"), ("options", "correct", "question", "support"),
    harness_context, gold=lambda rec: rec["correct"], choices=lambda rec: rec["options"],
)

SOURCE = QASource(
    "sciq", "allenai/sciq", ("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support"),
    convert, task="choice", eval_fields=eval_fields, task_label="SciQ (closed-book, chat format)", harness=HARNESS,
    eval_split="test",
)

"""Natural Questions (Google): real search queries, answered by a short span of a Wikipedia page.

``question["text"]`` -> user; the first annotator's non-empty short answer -> assistant, else a
yes/no answer, else the record is skipped (most records have no short answer). In the hub's
records (``datasets``' decoding of a Sequence of dicts) ``annotations`` is columnar: a dict of
lists with one entry per annotator, and each annotator's ``short_answers`` is itself a dict of
lists (``text`` a list of strings). The full set is ~40 GB (each record carries its Wikipedia
page), so it is streamed and only ``id``, ``question`` and ``annotations`` are kept.

Scored twice (``nblib.qa_eval``): closed-book in the chat format (SQuAD's exact match and F1), and as
lm-evaluation-harness' ``nq_open`` task (:data:`HARNESS`): its prompt, its stops, its exact match.
"""
from __future__ import annotations

import re
import string
from typing import Any

from nblib.qa import HarnessTask, QASource, Turns, pair

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
    """All reference answers (a generated answer is scored against the best-matching one, SQuAD's rule)
    and the question as the dataset writes it (lower case, no ``?``), which ``nq_open``'s prompt uses."""
    question = rec["question"]["text"] if isinstance(rec["question"], dict) else rec["question"]
    return {"answers": answers(rec.get("annotations")), "question": question}


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness' nq_open (lm-eval 0.4.13, lm_eval/tasks/nq_open/nq_open.yaml)

HARNESS_ARTICLES = re.compile(r"\b(?:The |the |An |A |The |a |an )")  # nq_open.yaml's regexes_to_ignore, verbatim
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
OPEN_ANSWER_TOKENS = 5  # NQ-open keeps short answers of at most five tokens (Lee et al. 2019, ORQA)


def harness_context(rec: dict[str, Any]) -> str:
    """nq_open.yaml's ``description`` then its ``doc_to_text`` (``"Q: {{question}}?\nA:"``), 0-shot as
    the YAML sets no ``num_fewshot``: with no examples the description is followed by the question alone."""
    return f"Answer these questions:\n\nQ: {rec['question']}?\nA:"


def open_answers(references: list[str]) -> list[str]:
    """The references NQ-open would keep: short answers of at most five tokens, not yes/no ones (the
    ``nq_open`` dataset holds these only); a question with none is not an ``nq_open`` item."""
    return [a for a in references if len(a.split()) <= OPEN_ANSWER_TOKENS and a not in YES_NO.values()]


def harness_normalize(text: str) -> str:
    """``exact_match_hf_evaluate`` (lm_eval/api/metrics.py) with nq_open.yaml's options, in its order:
    the articles' regex removed, then lower case (``ignore_case``), then ``string.punctuation`` removed
    (``ignore_punctuation``); spaces are kept, and trailing NULs go as numpy's str arrays drop them."""
    return HARNESS_ARTICLES.sub("", text).lower().translate(_NO_PUNCTUATION).rstrip("\x00")


def harness_exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference (``ConfigurableTask.
    process_results`` with several targets: the mean over the references above 0)."""
    return float(any(harness_normalize(prediction) == harness_normalize(r) for r in references))


# generation_kwargs: until ["\n", ".", ","], do_sample false; the filter remove_whitespace strips the answer
HARNESS = HarnessTask(
    "nq_open", "NQ (lm-eval `nq_open`)", "generate_until", ("exact_match",), ("question", "answers"),
    harness_context, gold=lambda rec: open_answers(rec["answers"]), until=("\n", ".", ","), match=harness_exact_match,
)

SOURCE = QASource(
    "natural_questions", "google-research-datasets/natural_questions", ("question", "annotations"), convert,
    config="default", streaming=True, keep=("id", "question", "annotations"), task="short_answer",
    eval_fields=eval_fields, task_label="NQ (closed-book, chat format)", harness=HARNESS,
)

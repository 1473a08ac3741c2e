"""A chat model scored by domain and by task, the way the evaluation field scores each QA source.

By domain: eval loss (nats per assistant token) and bits per byte of each source's dialogues.
By task, as the source's module says (``nblib.qa.TASKS``):

- ``choice`` (SciQ): each option's summed log-likelihood given the question, prompted in the chat
  format; the highest wins (lm-evaluation-harness' ``acc``; ``accuracy_norm`` divides by the
  option's length in characters, its ``acc_norm``). Chance is 1 / number of options.
- ``short_answer`` (Natural Questions): exact match and token F1 of the greedy answer after SQuAD's
  normalisation, the best over the reference answers (SQuAD v1.1's evaluation script).
- ``free_form`` (Alpaca, Dolly): ROUGE-L F-measure of the greedy answer against the dialogue's own
  answer, from ``rouge_score`` with its defaults (no stemming).

These are closed-book (SciQ's support passage is not in the prompt) and in the chat format, which a
base model never saw: the report names their rows by the source's ``task_label`` ("... (closed-book,
chat format)"). A source with an lm-evaluation-harness task (``nblib.qa``'s ``harness``: SciQ as
``sciq``, NQ as ``nq_open``) is also scored that way, in plain text (``nblib.lmeval``), its rows named
by ``harness.label``. Every score is also kept per item (``items``: one list per metric, in the
records' order, ``None`` where an item was not scored) for item-level tests between variants.

Greedy answers come from the model's ``generate`` in batches, ended by the chat's stop strings
(``nblib.generate``). :func:`evaluate` is the one entry point.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from functools import cache
from typing import Any, Sequence

import torch

from nblib import config, ftscore, lmeval, qa
from nblib.dialogue import Turns, encode_text, prompt_ids
from nblib.generate import CHAT_STOPS, StopOnStrings, context_length, hf_decoder, trim
from nblib.tokenizer import EOT

# ---------------------------------------------------------------------------------------------
# metrics of one answer


_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Best F1 over the references of the normalised tokens the prediction shares with each."""
    def f1(pred: list[str], ref: list[str]) -> float:
        common = sum((Counter(pred) & Counter(ref)).values())
        if not common:
            return float(pred == ref)  # both empty: a match
        precision, recall = common / len(pred), common / len(ref)
        return 2 * precision * recall / (precision + recall)

    pred = normalize_answer(prediction).split()
    return max(f1(pred, normalize_answer(r).split()) for r in references)


@cache
def _rouge() -> Any:
    from rouge_score import rouge_scorer  # here: it imports nltk (0.6 s of a first rouge_l call, on the 2-core CPU)

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (``rouge_score``: lower-cased alphanumeric tokens, longest common subsequence)."""
    return _rouge().score(reference, prediction)["rougeL"].fmeasure


# ---------------------------------------------------------------------------------------------
# what the model does: option log-likelihoods, greedy answers, losses


def prompt(turns: Turns, tokenizer: Any) -> list[int]:
    """Token ids of the dialogue up to its last answer, ending ``<|assistant|>``: what the model answers
    (built piece by piece, so no text of the record becomes a marker)."""
    return prompt_ids(turns[:-1], tokenizer)


def option_text(option: str) -> str:
    """An option as an answer starts in training: after a space, capitalised (``nblib.qa.sciq.convert``)."""
    return f" {option[:1].upper()}{option[1:]}"


@torch.no_grad()
def option_logprobs(model: Any, tokenizer: Any, prompts: Sequence[list[int]], options: Sequence[Sequence[str]],
                    batch_size: int) -> list[list[float] | None]:
    """Summed log-probability of each option's tokens after its prompt, per prompt (``None``: an
    option longer than the context). A prompt too long for the context loses its first tokens, as
    lm-evaluation-harness does; every (prompt, option) pair is one row of a padded batch."""
    was_training = model.training
    model.eval()
    room = context_length(model)
    rows, where = [], []  # {"input_ids", "labels"} per pair: labels only on the option's tokens
    for i, (p, opts) in enumerate(zip(prompts, options)):
        context = list(p)
        for j, option in enumerate(opts):
            cont = encode_text(option_text(option), tokenizer)
            if len(cont) < room:
                ids = (context + cont)[-room:]
                rows.append({"input_ids": ids, "labels": [-100] * (len(ids) - len(cont)) + cont})
                where.append((i, j))
    scores: list[list[float] | None] = [[0.0] * len(opts) for opts in options]
    collate = ftscore.Collator(tokenizer.convert_tokens_to_ids(EOT))  # any pad id: masked by position
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]["input_ids"]))  # similar lengths pad least
    for k in range(0, len(order), batch_size):
        chunk = order[k : k + batch_size]
        batch = {n: t.to(model.device) for n, t in collate([rows[r] for r in chunk]).items()}
        nll, keep = ftscore.label_nll(model, batch)
        per_row = torch.zeros(len(chunk), dtype=nll.dtype, device=nll.device).index_add_(0, keep.nonzero()[:, 0], nll)
        for r, total in zip(chunk, per_row.tolist()):
            i, j = where[r]
            scores[i][j] = -total
    model.train(was_training)
    counted = Counter(i for i, _ in where)
    return [s if counted[i] == len(options[i]) else None for i, s in enumerate(scores)]


def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int,
                   batch_size: int) -> list[str | None]:
    """Greedy answers to prompts (token ids: :func:`prompt`; :func:`nblib.ftscore.greedy`, batched), each
    ended by the first chat stop string (:data:`nblib.generate.CHAT_STOPS`) or, at the token budget, before its
    unfinished last word (:func:`nblib.generate.trim`). ``None`` for a prompt that leaves no room."""
    decode = hf_decoder(tokenizer)
    rows = ftscore.greedy(model, tokenizer, prompts, max_new_tokens, batch_size,
                          stopping=lambda width: StopOnStrings(tokenizer, width))
    return [None if row is None else trim(decode(row), CHAT_STOPS)[0].strip() for row in rows]


def source_losses(model: Any, tokenizer: Any, records: Sequence[dict], batch_size: int,
                  max_length: int | None = None) -> dict[str, dict[str, Any]]:
    """Per source: eval loss and bits per byte on assistant tokens (``ftscore.assistant_loss``), the
    dialogues kept (``n``) and their assistant tokens. Dialogues over ``max_length`` tokens (default:
    the model's context) are dropped as in training (``ftscore.encode``); give the run's
    ``max_length`` and the token-weighted mean of the losses is the run's pooled eval loss. A source
    with no dialogue that fits has ``n`` 0 and losses ``None``."""
    nbytes = ftscore.token_bytes(tokenizer)
    out = {}
    for source, group in _by_source(records).items():
        examples, _ = ftscore.encode(group, tokenizer, max_length or context_length(model))
        if not examples:  # said, not left out: every source of the split shows in the table
            out[source] = {"loss": None, "bpb": None, "n": 0, "tokens": 0}
            continue
        loss, bpb = ftscore.assistant_loss(model, examples, tokenizer.convert_tokens_to_ids(EOT), batch_size, nbytes)
        tokens = sum(sum(t != -100 for t in ex["labels"][1:]) for ex in examples)
        out[source] = {"loss": loss, "bpb": bpb, "n": len(examples), "tokens": tokens}
    return out


# ---------------------------------------------------------------------------------------------
# the entry point


def evaluate(model: Any, tokenizer: Any, records: Sequence[dict], *, max_new_tokens: int = 32, batch_size: int = 16,
             limit_per_source: int | None = 200, max_length: int | None = None) -> dict[str, Any]:
    """Score ``model`` on dialogue records (``nblib.dialogue``: an eval split) by source and by task.

    ``tokenizer`` has the chat markers (``finetune.add_special_tokens``). The first
    ``limit_per_source`` records of each source are used (``None``: all); ``max_length`` is the
    losses' (:func:`source_losses`). Returns
    ``{"by_source": {source: {"loss", "bpb", "n", "tokens"}}, "tasks": {source: {"task", metrics...,
    "n", "skipped", "items"}}, "harness": {source: lmeval.score's dict}}``; ``skipped`` counts records
    too long for the context. Sources without a task (``nblib.qa``'s ``task`` is ``None``) have a loss only.
    """
    groups = {s: g[:limit_per_source] for s, g in _by_source(records).items()}
    kept = [r for g in groups.values() for r in g]
    tasks: dict[str, dict[str, Any]] = {}
    harness: dict[str, dict[str, Any]] = {}
    for source, group in groups.items():
        spec = qa.get(source) if source in qa.sources() else None
        if spec is not None and spec.task == "choice":
            tasks[source] = _choice(model, tokenizer, source, group, batch_size)
        elif spec is not None and spec.task in ("short_answer", "free_form"):
            tasks[source] = _answers(model, tokenizer, source, spec.task, group, max_new_tokens, batch_size)
        if spec is not None and spec.harness is not None:
            _require(group, source, spec.harness.fields)
            harness[source] = lmeval.score(model, tokenizer, spec.harness, group, batch_size)
    return {"by_source": source_losses(model, tokenizer, kept, batch_size, max_length), "tasks": tasks,
            "harness": harness}


def _choice(model: Any, tokenizer: Any, source: str, group: list[dict], batch_size: int) -> dict[str, Any]:
    """Multiple-choice accuracy (summed and length-normalised log-likelihood) beside chance."""
    _require(group, source, ("options", "correct"))
    scores = option_logprobs(model, tokenizer, [prompt(r["dialogue"], tokenizer) for r in group],
                             [r["options"] for r in group], batch_size)
    items: dict[str, list[float | None]] = {"accuracy": [], "accuracy_norm": []}
    for r, s in zip(group, scores):
        norm = None if s is None else [v / len(o) for v, o in zip(s, r["options"])]
        items["accuracy"].append(None if s is None else float(_argmax(s) == r["correct"]))
        items["accuracy_norm"].append(None if norm is None else float(_argmax(norm) == r["correct"]))
    chance = _mean([1 / len(r["options"]) for r, s in zip(group, scores) if s is not None])
    return {"task": "choice", "chance": chance, **_summary(items)}


def _answers(model: Any, tokenizer: Any, source: str, task: str, group: list[dict], max_new_tokens: int,
             batch_size: int) -> dict[str, Any]:
    """Greedy answers scored against the short answers (EM, F1) or the dialogue's own answer (ROUGE-L)."""
    if task == "short_answer":
        _require(group, source, ("answers",))
    answers = greedy_answers(model, tokenizer, [prompt(r["dialogue"], tokenizer) for r in group], max_new_tokens, batch_size)
    if task == "short_answer":
        metrics = {"exact_match": lambda r, a: exact_match(a, r["answers"]), "f1": lambda r, a: token_f1(a, r["answers"])}
    else:
        metrics = {"rouge_l": lambda r, a: rouge_l(a, r["dialogue"][-1]["content"])}
    items = {k: [None if a is None else f(r, a) for r, a in zip(group, answers)] for k, f in metrics.items()}
    return {"task": task, **_summary(items)}


def _summary(items: dict[str, list[float | None]]) -> dict[str, Any]:
    """Each metric's mean over the scored items, ``n`` scored, ``skipped`` (``None``: too long), the items."""
    scored = {k: [v for v in values if v is not None] for k, values in items.items()}
    n = len(next(iter(scored.values())))
    return {**{k: _mean(v) for k, v in scored.items()}, "n": n, "skipped": len(next(iter(items.values()))) - n,
            "items": items}


def _by_source(records: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["source"], []).append(r)
    return groups


def _require(group: Sequence[dict], source: str, keys: tuple[str, ...]) -> None:
    """Refuse records written before the clean stage kept the evaluation fields, saying how to fix it."""
    lacking = sum(any(k not in r for k in keys) for r in group)
    if lacking:
        raise config.MissingInput(f"{lacking} of {len(group)} {source} dialogue records lack {', '.join(keys)} "
                                  "(the task metrics need them); re-run notebooks/02_clean.ipynb (the clean stage) to "
                                  "rewrite the dialogue splits")


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None

"""QA sources scored as EleutherAI's lm-evaluation-harness scores its tasks (``nblib.qa.HarnessTask``:
SciQ as ``sciq``, Natural Questions as ``nq_open``), so the numbers sit beside published ones.

Reproduces lm-eval 0.4.13 (:data:`LM_EVAL_VERSION`; ``tests/test_lmeval.py`` runs its own code on a
tiny model and hand-made items and compares), with its ``HFLM`` defaults (no BOS token for GPT-2):

- ``multiple_choice`` (``ConfigurableTask.construct_requests`` in ``lm_eval/api/task.py``): one
  request ``(context, target_delimiter + choice)`` per choice, tokenised by ``TemplateLM._encode_pair``
  (``lm_eval/api/model.py``: trailing spaces of the context move to the continuation, the pair is
  encoded whole and split after the context's own tokens) and scored by
  ``HFLM._loglikelihood_tokens`` (``lm_eval/models/huggingface.py``): the model reads the last
  ``max_length + 1`` tokens less the final one, and the continuation's log-probabilities are summed.
  ``process_results``: ``acc`` is the argmax of the sums, ``acc_norm`` that of the sums divided by each
  choice's length in characters (the choice without the delimiter), the first maximum winning both.
- ``generate_until`` (``HFLM.generate_until``): the context left-truncated to ``max_length -
  max_gen_toks`` tokens, greedy decoding of up to ``max_gen_toks`` (256) tokens, stopped at the task's
  ``until`` strings and the tokenizer's end-of-text, decoded without special tokens and cut before
  the first of each stop in turn (``postprocess_generated_text``); then the task's filters (nq_open:
  ``remove_whitespace``, ``take_first``: the answer stripped) and its metric.

A model whose context is under 512 tokens (the smoke model's 64) generates up to half of it, not
256, where the harness would refuse to run. Chat markers are never added: the base model and a
fine-tuned one read the same plain-text prompt.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from nblib import ftscore
from nblib.dialogue import encode_text
from nblib.generate import StopOnStrings, context_length
from nblib.qa import HarnessTask
from nblib.tokenizer import EOT

LM_EVAL_VERSION = "0.4.13"
MAX_GEN_TOKS = 256  # HFLM.max_gen_toks


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``TemplateLM._encode_pair`` for a causal model: ``(context ids, continuation ids)``."""
    spaces = len(context) - len(context.rstrip())
    if spaces:  # the harness moves them: " Paris" tokenises as GPT-2 writes words
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode_text(context + continuation, tokenizer)
    start = len(encode_text(context, tokenizer))
    return whole[:start], whole[start:]


@torch.no_grad()
def loglikelihoods(model: Any, tokenizer: Any, requests: Sequence[tuple[str, str]], batch_size: int) -> list[float | None]:
    """Summed log-probability of each request's continuation after its context, the harness's way
    (``None``: a continuation longer than the context window, which the harness refuses). Requests
    of similar lengths share a right-padded batch; the output layer runs on the scored positions only."""
    was_training = model.training
    model.eval()
    room = context_length(model)
    rows: dict[int, tuple[list[int], list[int]]] = {}  # request -> (the model's input, the continuation)
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if 0 < len(cont) <= room:
            ids = (ctx + cont)[-(room + 1):]
            rows[i] = (ids[:-1], cont)
    out: list[float | None] = [None] * len(requests)
    order = sorted(rows, key=lambda i: len(rows[i][0]))
    for k in range(0, len(order), batch_size):
        chunk = order[k : k + batch_size]
        for i, total in zip(chunk, _continuation_sums(model, [rows[i] for i in chunk])):
            out[i] = total
    model.train(was_training)
    return out


def _continuation_sums(model: Any, rows: list[tuple[list[int], list[int]]]) -> list[float]:
    """One batch: per row, the summed log-softmax of its continuation's tokens, each predicted by the
    position before it (the last ``len(continuation)`` inputs)."""
    width = max(len(inp) for inp, _ in rows)
    x = torch.zeros(len(rows), width, dtype=torch.long)  # padding: any id, masked and never scored
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (inp, cont) in enumerate(rows):
        x[r, : len(inp)], mask[r, : len(inp)] = torch.tensor(inp), 1
        scored[r, len(inp) - len(cont) : len(inp)] = True
    scored = scored.to(model.device)
    head = getattr(model, "module", model).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _, args: (args[0][scored], *args[1:]))
    try:
        logits = model(input_ids=x.to(model.device), attention_mask=mask.to(model.device), use_cache=False).logits
    finally:
        handle.remove()
    targets = torch.tensor([t for _, cont in rows for t in cont], device=logits.device)
    picked = F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
    return [part.sum().item() for part in picked.split([len(cont) for _, cont in rows])]


def generate_until(model: Any, tokenizer: Any, contexts: Sequence[str], until: Sequence[str],
                   batch_size: int) -> list[str]:
    """Greedy answers to plain-text ``contexts``, the harness's way (module docstring), before its filters."""
    room = context_length(model)
    budget = min(MAX_GEN_TOKS, room // 2)
    stops = (*until, EOT)  # handle_stop_sequences adds the end-of-text
    prompts = [encode_text(c, tokenizer)[-(room - budget):] for c in contexts]
    rows = ftscore.greedy(model, tokenizer, prompts, budget, batch_size,
                          stopping=lambda width: StopOnStrings(tokenizer, width, stops))
    out = []
    for row in rows:
        text = tokenizer.decode(row, skip_special_tokens=True)  # HFLM.tok_decode
        for stop in stops:
            text = text.split(stop)[0]
        out.append(text)
    return out


def score(model: Any, tokenizer: Any, task: HarnessTask, records: Sequence[dict], batch_size: int) -> dict[str, Any]:
    """``task`` on ``records`` (dialogue records with ``task.fields``): each metric's mean, ``n`` items
    scored, ``skipped`` (too long for the context), ``excluded`` (records that are no item of the
    task: no reference it keeps) and ``items``: per metric, one score per record in order (``None``
    where skipped or excluded), so variants can be compared item by item."""
    if task.output_type == "multiple_choice":
        items = _choices(model, tokenizer, task, records, batch_size)
    else:
        items = _generated(model, tokenizer, task, records, batch_size)
    excluded = sum(task.output_type == "generate_until" and not task.gold(r) for r in records)
    done = [i for i, v in enumerate(items[task.metrics[0]]) if v is not None]
    means = {m: (sum(items[m][i] for i in done) / len(done) if done else None) for m in task.metrics}
    return {"task": task.name, "lm_eval": LM_EVAL_VERSION, **means, "n": len(done),
            "skipped": len(records) - len(done) - excluded, "excluded": excluded, "items": items}


def _choices(model: Any, tokenizer: Any, task: HarnessTask, records: Sequence[dict],
             batch_size: int) -> dict[str, list[float | None]]:
    """``acc`` and ``acc_norm`` per record (``ConfigurableTask.process_results``)."""
    choices = [task.choices(r) for r in records]
    requests = [(task.context(r), task.target_delimiter + c) for r, cs in zip(records, choices) for c in cs]
    flat = loglikelihoods(model, tokenizer, requests, batch_size)
    acc: list[float | None] = []
    acc_norm: list[float | None] = []
    start = 0
    for r, cs in zip(records, choices):
        lls, start = flat[start : start + len(cs)], start + len(cs)
        if any(ll is None for ll in lls):
            acc.append(None)
            acc_norm.append(None)
            continue
        acc.append(float(_argmax(lls) == task.gold(r)))
        acc_norm.append(float(_argmax([ll / len(c) for ll, c in zip(lls, cs)]) == task.gold(r)))
    return {"acc": acc, "acc_norm": acc_norm}


def _generated(model: Any, tokenizer: Any, task: HarnessTask, records: Sequence[dict],
               batch_size: int) -> dict[str, list[float | None]]:
    """The task's one metric per record of a greedy answer, stripped (the ``remove_whitespace`` filter)."""
    asked = [i for i, r in enumerate(records) if task.gold(r)]
    answers = generate_until(model, tokenizer, [task.context(records[i]) for i in asked], task.until, batch_size)
    scores: list[float | None] = [None] * len(records)
    for i, answer in zip(asked, answers):
        scores[i] = task.match(answer.strip(), task.gold(records[i]))
    return {task.metrics[0]: scores}


def _argmax(values: Sequence[float]) -> int:
    """``np.argmax``: the first maximum."""
    return max(range(len(values)), key=values.__getitem__)

"""A chat model's dialogues as token rows, and what scores them: the loss on the assistant's tokens
and greedy answers. The fine-tune's training and evaluation (``nblib.finetune``, ``nblib.fttrainer``)
and the scores by source and task (``nblib.qa_eval``) share these.

The loss covers labelled tokens only (the assistant's, ``labels != -100``), so :func:`label_nll` runs
the output layer on those rows alone: at these widths the ``[rows, 50257]`` head is most of a GPT-2's
work and its logits most of its memory. ``benchmarks/bench_finetune.py`` on the smoke fine-tune's first
batch (8 dialogues, 139 of 496 next tokens labelled; 2-core EPYC, load 0.7-0.9, forward + backward):
LoRA + 8-bit 320 -> 105 ms, + 16-bit 218 -> 55 ms, + 32-bit 309 -> 85 ms, full 300 -> 85 ms (3.0-4.0x),
gradients equal within 4e-7 relative.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from nblib import dialogue, lifecycle, tokenizer
from nblib.generate import context_length
from nblib.tokenizer import EOT

# ---------------------------------------------------------------------------------------------
# dialogues as rows


def encode(records: list[dict], tokenizer: Any, max_length: int) -> tuple[list[dict], int]:
    """Tokenize dialogues into ``{"input_ids", "labels"}``; those over ``max_length`` tokens are dropped (counted).

    Dropping rather than truncating keeps every answer's closing ``<|endoftext|>``.
    """
    out, too_long = [], 0
    for rec in records:
        ids, labels = dialogue.tokenize(rec["dialogue"], tokenizer)
        if len(ids) > max_length:
            too_long += 1
        else:
            out.append({"input_ids": ids, "labels": labels})
    return out, too_long


@dataclass
class Collator:
    """Right-pads a batch; padding gets attention 0 and label -100 by position, whatever the pad id."""

    pad_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)

        def pad(seq: list[int], value: int) -> list[int]:
            return seq + [value] * (width - len(seq))

        return {
            "input_ids": torch.tensor([pad(b["input_ids"], self.pad_id) for b in batch]),
            "attention_mask": torch.tensor([pad([1] * len(b["input_ids"]), 0) for b in batch]),
            "labels": torch.tensor([pad(b["labels"], -100) for b in batch]),
        }


def token_bytes(tok: Any) -> torch.Tensor:
    """UTF-8 bytes per id of a GPT-2 tokenizer with added markers (special tokens count 0)."""
    base = torch.from_numpy(tokenizer.token_bytes())
    return torch.cat([base, torch.zeros(max(0, len(tok) - len(base)), dtype=base.dtype)])


# ---------------------------------------------------------------------------------------------
# the loss on labelled tokens


def label_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll, keep)``: the cross-entropy (fp32) of each labelled next token, in row-major order, and
    ``keep`` ``[batch, time - 1]``, where the shifted labels are not -100.

    The model runs as a whole (through a DDP wrapper too, so gradients still synchronise); a pre-hook
    on its output layer hands that layer the hidden states of the positions whose next token is
    labelled, so the logits of every other position are never computed.
    """
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    rows = F.pad(keep, (0, 1))  # position t predicts token t + 1
    head = getattr(model, "module", model).get_output_embeddings()  # peft's trainable-token wrapper included
    handle = head.register_forward_pre_hook(lambda _, args: (args[0][rows], *args[1:]))
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    finally:
        handle.remove()
    return F.cross_entropy(logits.float(), targets[keep], reduction="none"), keep


@torch.no_grad()
def assistant_loss(model: Any, examples: list[dict], pad_id: int, batch_size: int = 8,
                   nbytes: torch.Tensor | None = None) -> tuple[float, float | None]:
    """``(loss, bits per byte)``: cross-entropy per assistant token (labels != -100), summed over
    every batch and divided by the token count; bits per byte over the tokens that stand for text."""
    was_training = model.training
    model.eval()
    collate = Collator(pad_id)
    counted = lifecycle.LossSum(nbytes)
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(examples[i : i + batch_size]).items()}
        nll, keep = label_nll(model, batch)
        counted.add(nll, batch["labels"][:, 1:][keep])
    model.train(was_training)
    return counted.loss, counted.bpb


# ---------------------------------------------------------------------------------------------
# greedy answers


@torch.no_grad()
def greedy(model: Any, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int,
           stopping: Any = None) -> list[list[int] | None]:
    """The new token ids of greedy continuations of ``prompts`` (token ids, e.g. :func:`nblib.dialogue.prompt_ids`),
    batched (left-padded,
    prompts of similar length together); each row ends at ``<|endoftext|>`` (padded with it after) or at
    ``stopping(prompt_length)``'s criterion (e.g. ``nblib.generate.StopOnStrings``). A batch's budget
    is ``max_new_tokens`` or the room its longest prompt leaves, whichever is less; ``None`` for a
    prompt that leaves no room in the context."""
    was_training = model.training
    model.eval()
    room, eot = context_length(model), tokenizer.convert_tokens_to_ids(EOT)
    ids = [list(p) for p in prompts]
    fits = sorted((i for i in range(len(ids)) if len(ids[i]) < room), key=lambda i: len(ids[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    for k in range(0, len(fits), batch_size):
        chunk = fits[k : k + batch_size]
        width = len(ids[chunk[-1]])
        pads = [width - len(ids[i]) for i in chunk]
        x = torch.tensor([[eot] * p + ids[i] for p, i in zip(pads, chunk)], device=model.device)
        mask = torch.tensor([[0] * p + [1] * (width - p) for p in pads], device=model.device)
        gen = model.generate(
            input_ids=x, attention_mask=mask, max_new_tokens=min(max_new_tokens, room - width), do_sample=False,
            eos_token_id=eot, pad_token_id=eot, use_cache=True,
            **({"stopping_criteria": [stopping(width)]} if stopping else {}),
        )
        for i, row in zip(chunk, gen[:, width:].tolist()):
            out[i] = row
    model.train(was_training)
    return out


def answer(model: Any, tokenizer: Any, questions: Sequence[str], max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy answers to one-turn questions, in one batch; ``stopped``: a non-empty answer closed by
    ``<|endoftext|>`` within the budget (``max_new_tokens``, less where the context is shorter)."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    prompts = [dialogue.prompt_ids([{"role": "user", "content": q}], tokenizer) for q in questions]
    out = []
    for q, new in zip(questions, greedy(model, tokenizer, prompts, max_new_tokens, len(prompts))):
        if new is None:
            raise ValueError(f"question {q!r} leaves no room for an answer in the model's context")
        end = new.index(eot) if eot in new else len(new)
        text = tokenizer.decode(new[:end]).strip()
        out.append({"question": q, "answer": text, "stopped": end < len(new) and bool(text)})
    return out

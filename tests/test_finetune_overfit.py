"""End-to-end check of the fine-tune mechanics: a tiny GPT-2 overfits 8 dialogues and then answers each
training question with its answer and stops on ``<|endoftext|>``.

It goes through the public steps only (``config.settings``, ``finetune.setup/evaluate/train/finish``),
so it holds whatever shape ``nblib.finetune`` takes inside. Passing proves that the assistant-only
labels, the closing ``<|endoftext|>`` label, padding with pad = ``<|endoftext|>``, the trained marker
rows (tied to the output layer) and, for LoRA, the merge into a 32-bit base work together.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from nblib import config, dialogue, finetune
from nblib.files import write_jsonl
from nblib.tokenizer import EOT, hf_tokenizer

QA = [
    ("What is the capital of France?", "Paris."),
    ("What color is the sky?", "The sky is blue."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("Name a fruit.", "An apple."),
    ("What is two plus two?", "Four."),
    ("Who wrote Dom Casmurro?", "Machado de Assis wrote it."),
    ("What do bees make?", "Bees make honey."),
    ("Say hello.", "Hello there!"),
]
MARKERS = (dialogue.USER, dialogue.ASSISTANT)


@pytest.fixture
def toy_root(home, mirror):
    """``home`` with the 8 dialogues as train, val and test split and a tiny random GPT-2 at ``base/``."""
    records = [
        {"dialogue": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "source": "toy"}
        for q, a in QA
    ]
    for split in ("train", "val", "test"):
        write_jsonl(home / "data/processed/dialogues" / f"{split}.jsonl", records)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=50257))
    # Token rows at GPT-2's scale (row norm ~4; the default init gives ~0.16). LoRA leaves the tied
    # output layer frozen but for the three marker/end rows, and with rows that small no hidden state
    # can make one token of 50k likely: the LoRA variant could not fit anything (the smoke base's
    # problem, see the fine-tune settings), whatever the mechanics.
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 0.5)
    model.save_pretrained(home / "base")
    hf_tokenizer().save_pretrained(home / "base")
    return home


# Steps and rates that fit all 8 answers with a margin (LoRA: eval loss ~0.07 after 200 steps, 150
# are not enough; full: ~0.0002 after 100). Activation checkpointing only costs time here;
# tests/test_finetune.py runs the smoke default (on).
FIT = {"lora-8bit": {"steps": 200, "lora_lr": 1e-2}, "full": {"steps": 100, "full_lr": 3e-3}}


def _settings(variant: str) -> dict:
    steps = FIT[variant]["steps"]
    return config.settings(
        "finetune", "smoke", variant=variant, base_model="base", batch_size=8, warmup_steps=5,
        eval_steps=steps, logging_steps=50, eval_dialogues=len(QA), eval_batch_size=8,
        questions=[q for q, _ in QA], max_new_tokens=12, activation_checkpointing=False,
        merge=True, resume=False, wandb=False, **FIT[variant],
    )


def _greedy(model_dir, questions, max_new_tokens):
    """Greedy replies of a saved model folder, cut at ``<|endoftext|>`` (``None`` when it never came)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    eot = tok.convert_tokens_to_ids(EOT)
    out = []
    with torch.no_grad():
        for q in questions:
            ids = tok(dialogue.render([{"role": "user", "content": q}], generation_prompt=True), return_tensors="pt").input_ids
            new = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=eot, pad_token_id=eot,
            )[0, ids.shape[1]:].tolist()
            out.append(tok.decode(new[: new.index(eot)]).strip() if eot in new else None)
    return out


@pytest.mark.parametrize("variant", sorted(FIT))
def test_overfits_eight_dialogues_and_stops(toy_root, variant):
    cfg = _settings(variant)
    s = finetune.setup(cfg)
    eot = s.tokenizer.convert_tokens_to_ids(EOT)
    # the labels: each " answer" and its closing <|endoftext|>, nothing else (in whatever order setup keeps them)
    labelled = sorted([t for t in example["labels"] if t != -100] for example in s.train_set)
    assert labelled == sorted(s.tokenizer.encode(f" {a}") + [eot] for _, a in QA)

    before = finetune.evaluate(s)
    trained = finetune.train(s)
    after = finetune.evaluate(s)
    summary = finetune.finish(s, before, after, trained)

    replies = [r["answer"] for r in after["answers"]]
    assert replies == [a for _, a in QA]
    assert after["stop_rate"] == 1.0 and all(r["stopped"] for r in after["answers"])
    assert not any(m in r for r in replies for m in MARKERS)
    assert after["loss"] < 1.5 < before["loss"]
    assert summary["stop_rate_after"] == 1.0 and summary["merged"]
    # the saved model (LoRA: adapter merged into a 32-bit base) gives the same answers
    assert _greedy(toy_root / summary["merged"], cfg["questions"], cfg["max_new_tokens"]) == replies

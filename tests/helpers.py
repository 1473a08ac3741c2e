"""Helpers shared by several test modules: real corpus files and a tiny real chat model."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nblib import clean, config
from nblib.dialogue import ASSISTANT, EOT, USER
from nblib.tokenizer import hf_tokenizer

# A two-exchange dialogue in the one dialogue format.
TWO_TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six."},
]

SPLIT_CHARS = {"train": 150_000, "val": 20_000, "test": 20_000}


def write_corpus(home: Path, mirror: Path, split_chars: dict[str, int] = SPLIT_CHARS) -> dict[str, list[str]]:
    """Corpus split files in the clean stage's format, cut from real Machado works (hard-wrapped
    lines are fine here: tokenisation does not care). Returns the documents of each split."""
    works = sorted((mirror / "machado" / "romance").glob("*.txt"))
    lines = [line.strip() for p in works[:3] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs: dict[str, list[str]] = {}
    start = 0
    for split, chars in split_chars.items():
        docs[split], size = [], 0
        while size < chars:  # documents of 3 "paragraphs" of 10 lines each
            doc = clean.PARAGRAPH_SEP.join(" ".join(lines[i : i + 10]) for i in range(start, start + 30, 10))
            docs[split].append(doc)
            size += len(doc)
            start += 30
        corpus = config.paths(home).corpus
        corpus.mkdir(parents=True, exist_ok=True)
        (corpus / f"{split}.txt").write_text(clean.DOC_SEP.join(docs[split]) + "\n", encoding="utf-8")
    return docs


# Two run-on dialogues: after each answer the model learns to write the user's next turn, the
# failure the chat stops must catch (only the last answer ends with end-of-text).
RUN_ON = [
    f"{USER} What is two plus two?\n{ASSISTANT} Two plus two is four.\n"
    f"{USER} And three?\n{ASSISTANT} Three plus two is five.{EOT}",
    f"{USER} Name a color.\n{ASSISTANT} Blue is a color.\n{USER} Another one?\n{ASSISTANT} Red is another one.{EOT}",
]


@lru_cache(maxsize=1)
def chat_tokenizer():
    """GPT-2's tokenizer plus the two role markers, as the fine-tune stage saves it."""
    tok = hf_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [USER, ASSISTANT]})
    return tok


@lru_cache(maxsize=1)
def run_on_model() -> GPT2LMHeadModel:
    """A tiny real GPT-2 (2 layers, 64 dims) overfit on :data:`RUN_ON` in 80 CPU steps (trained
    once per session, shared by the generate and chat tests)."""
    tok = chat_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=2))
    rows = [tok.encode(t) for t in RUN_ON]
    width = max(map(len, rows))
    x = torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])
    y = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(80):
        loss = model(x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2, f"the fixture model did not memorise its dialogues (loss {loss.item():.3f})"
    return model.eval()


def save_chat_model(path: Path, tok, model) -> Path:
    """Save ``model`` + ``tok`` as a merged model folder (what the fine-tune stage writes)."""
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_finetune_root(root: Path, mirror: Path, base: str) -> None:
    """A tiny random GPT-2 (and GPT-2's tokenizer) at ``root/base`` and 200 short Alpaca dialogues split
    under ``root/data/processed/dialogues``: what a fine-tune test needs in seconds."""
    import json

    from nblib import dialogue
    from nblib.files import write_jsonl

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=50257))
    model.save_pretrained(root / base)
    hf_tokenizer().save_pretrained(root / base)
    alpaca = json.loads((mirror / "qa" / "alpaca_5000.json").read_text(encoding="utf-8"))
    write_jsonl(root / "data/raw/qa/alpaca.jsonl", alpaca[:1000])
    settings = {"targets": {"alpaca": 200}, "val_fraction": 0.1, "test_fraction": 0.1, "max_chars": 300, "seed": 1}
    dialogue.prepare(root / "data/raw/qa", root / "data/processed/dialogues", settings)

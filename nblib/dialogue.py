"""Dialogue records: one format, cleaning, splitting, rendering (the converters from each QA
dataset's schema live in ``nblib.qa``, one module per source).

A record is ``{"dialogue": [{"role": "user"|"assistant", "content": str}, ...], "source": str}``
plus, for a source that ``nblib.qa_eval`` scores by task, the fields its module's ``eval_fields``
gives (cleaned like the turns): SciQ's ``options`` and ``correct`` index, Natural Questions'
``answers``. Free-form references are the dialogue's own last answer. The fields never reach the
tokens, so adding them changed no training sequence.
Rendered for the model as ``<|user|> q\\n<|assistant|> a<|endoftext|>``, turns joined by ``\\n``;
only the assistant's words and the ``<|endoftext|>`` that closes them are trained on.

``prepare`` is the clean stage's entry point: raw QA files (``data/raw/qa/<source>.jsonl``, each
in its source schema) in, ``{train,val,test}.jsonl`` plus ``manifest.json`` out.
"""
from __future__ import annotations

import html
import os
import random
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from nblib import config, qa
from nblib.files import read_jsonl, sha256_file, write_json, write_jsonl
from nblib.tokenizer import EOT

USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = (USER, ASSISTANT)
ROLES = {"user": USER, "assistant": ASSISTANT}
SPLITS = ("train", "val", "test")

Turns = list[dict[str, str]]

# ---------------------------------------------------------------------------------------------
# rendering and tokenization


def segments(turns: Turns, generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered text cut into ``(text, trained)`` pieces; joined they are :func:`render`'s output.

    ``trained`` is true for an assistant's words and the ``<|endoftext|>`` that closes them, the
    only tokens that carry a loss. Every cut falls next to a special token, so tokenizing the
    pieces one by one gives the same ids as tokenizing the whole text.
    """
    out: list[tuple[str, bool]] = []
    for i, turn in enumerate(turns):
        role = turn.get("role")
        if role not in ROLES:
            raise ValueError(f"turn {i}: role must be 'user' or 'assistant', got {role!r}")
        sep = "\n" if i + 1 < len(turns) or generation_prompt else ""
        if role == "user":
            out.append((f"{USER} {turn['content']}{sep}", False))
        else:
            out += [(ASSISTANT, False), (f" {turn['content']}{EOT}", True)]
            if sep:
                out.append((sep, False))
    if generation_prompt:
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("generation_prompt=True needs the turns to end with a user turn (the question to answer)")
        out.append((ASSISTANT, False))
    return out


def render(turns: Turns, generation_prompt: bool = False) -> str:
    """Render turns as text; with ``generation_prompt`` the last (user) turn is followed by ``\\n<|assistant|>``."""
    return "".join(text for text, _ in segments(turns, generation_prompt))


def tokenize(turns: Turns, tokenizer: Any) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for a dialogue: labels are the ids on trained pieces, ``-100`` elsewhere.

    ``tokenizer`` is a Hugging Face tokenizer that already has :data:`SPECIAL_TOKENS` added.
    """
    missing = [t for t in SPECIAL_TOKENS if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    if missing:
        raise ValueError(
            f"tokenizer lacks special tokens {missing}; add them first (nblib.finetune.add_special_tokens)"
        )
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments(turns):
        ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids += ids
        labels += ids if trained else [-100] * len(ids)
    return input_ids, labels


# ---------------------------------------------------------------------------------------------
# cleaning

# Only real HTML tag names, so text such as ``vector<int>`` or ``a < b > c`` survives. Block tags
# become line breaks, table cells spaces, inline tags nothing.
_BLOCK_TAGS = "blockquote|body|br|caption|dd|div|dl|dt|h[1-6]|head|hr|html|li|ol|p|pre|table|tbody|thead|title|tr|ul"
_INLINE_TAGS = "a|abbr|b|center|cite|code|em|font|i|img|small|span|strong|sub|sup|tt|u"
_HTML_TAG = re.compile(rf"</?({_BLOCK_TAGS}|td|th|{_INLINE_TAGS})(?:\s[^<>]*)?/?>", re.IGNORECASE)


def _tag_replacement(match: re.Match) -> str:
    name = match.group(1).lower()
    if name in ("td", "th"):
        return " "
    return "\n" if re.fullmatch(_BLOCK_TAGS, name) else ""


_MARKERS = re.compile("|".join(re.escape(m) for m in (USER, ASSISTANT, EOT)))
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Strip HTML tags and entities, control characters and our role markers; fold whitespace.

    Runs of spaces/tabs become one space, lines are trimmed, and at most one blank line is kept
    (answers keep their paragraphs and lists).
    """
    text = html.unescape(_HTML_TAG.sub(_tag_replacement, text))
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")
    text = _MARKERS.sub(" ", text).replace("\ufeff", "").replace("\u200b", "")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def clean_dialogue(turns: Turns) -> tuple[Turns | None, str | None]:
    """Clean every turn; returns ``(turns, None)`` or ``(None, reason)`` with reason ``empty`` or ``one_sided``.

    Empty turns are dropped, consecutive turns of one role merged, and the dialogue trimmed to
    start with the user and end with the assistant.
    """
    out: Turns = []
    for turn in turns:
        content = clean_text(turn["content"])
        if not content:
            continue
        if out and out[-1]["role"] == turn["role"]:
            out[-1] = {"role": turn["role"], "content": out[-1]["content"] + "\n" + content}
        else:
            out.append({"role": turn["role"], "content": content})
    if not out:
        return None, "empty"
    while out and out[0]["role"] != "user":
        out.pop(0)
    while out and out[-1]["role"] != "assistant":
        out.pop()
    if not out:
        return None, "one_sided"
    return out, None


def convert(records: list[dict[str, Any]], source: str, max_chars: int | None = None) -> tuple[list[dict], Counter]:
    """Convert records of QA source ``source`` (``nblib.qa``) and clean them into dialogue records;
    returns ``(records, dropped)``.

    ``dropped`` counts by reason: ``no_answer``, ``empty``, ``one_sided``, ``too_long`` (rendered
    text over ``max_chars``) and ``duplicate`` (same rendered text as an earlier record).
    """
    to_turns, to_fields = qa.get(source).convert, qa.get(source).eval_fields
    out, dropped, seen = [], Counter(), set()
    for i, rec in enumerate(records):
        try:
            turns = to_turns(rec)
            turns, reason = clean_dialogue(turns) if turns is not None else (None, "no_answer")
            fields = _clean_fields(to_fields(rec)) if to_fields is not None and turns is not None else {}
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{source} record {i}: cannot convert ({type(e).__name__}: {e})") from e
        if turns is None:
            dropped[reason] += 1
            continue
        text = render(turns)
        if max_chars is not None and len(text) > max_chars:
            dropped["too_long"] += 1
        elif text in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(text)
            out.append({"dialogue": turns, "source": source, **fields})
    return out, dropped


def _clean_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Evaluation fields with every text (alone or in a list) cleaned as the turns are."""
    def one(v: Any) -> Any:
        return clean_text(v) if isinstance(v, str) else v

    return {k: [one(x) for x in v] if isinstance(v, list) else one(v) for k, v in fields.items()}


# ---------------------------------------------------------------------------------------------
# balancing, splitting, writing


def split(records: list[dict], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Seeded shuffle, then ``test`` and ``val`` take their rounded shares and ``train`` the rest.

    From three records on, a positive fraction gives at least one (as ``clean.assign_splits`` does),
    so a small source still has eval dialogues: the dry run's six SciQ samples round to none at 5 %.
    """
    if not 0 <= val_fraction + test_fraction < 1:
        raise ValueError(f"val_fraction + test_fraction must be in [0, 1), got {val_fraction} + {test_fraction}")
    rows = list(records)
    random.Random(seed).shuffle(rows)
    floor = len(rows) >= 3
    n_test = max(int(floor and test_fraction > 0), round(len(rows) * test_fraction))
    n_val = max(int(floor and val_fraction > 0), round(len(rows) * val_fraction))
    return {"test": rows[:n_test], "val": rows[n_test : n_test + n_val], "train": rows[n_test + n_val :]}


def prepare(raw_qa_dir: str | os.PathLike, out_dir: str | os.PathLike, settings: dict[str, Any]) -> dict[str, Any]:
    """Raw QA files -> ``out_dir/{train,val,test}.jsonl`` + ``manifest.json``; returns the manifest.

    ``settings`` (``nblib/profiles/dialogue.yaml``): ``targets`` maps each source (file
    ``<source>.jsonl`` in ``raw_qa_dir``) to the number of dialogues to keep (``null``: all),
    ``val_fraction``, ``test_fraction``, ``seed`` and ``max_chars``. Each source is split on its
    own, so every split holds the same mix.
    """
    raw_qa_dir, out_dir = Path(raw_qa_dir), Path(out_dir)
    targets: dict[str, int | None] = settings["targets"]
    missing = [s for s in targets if not (raw_qa_dir / f"{s}.jsonl").is_file()]
    if missing:
        have = sorted(p.stem for p in raw_qa_dir.glob("*.jsonl"))
        raise FileNotFoundError(
            f"no raw QA file for {missing} in {raw_qa_dir} (found: {have or 'none'}); run 01_ingest with "
            "these datasets or remove them from the dialogue targets"
        )
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    sources: dict[str, Any] = {}
    for source, target in targets.items():
        raw = read_jsonl(raw_qa_dir / f"{source}.jsonl")
        kept, dropped = convert(raw, source, settings.get("max_chars"))
        if not kept:
            _no_dialogue(raw_qa_dir / f"{source}.jsonl", len(raw), dropped)
        random.Random(f"{settings['seed']}:{source}").shuffle(kept)
        chosen = kept if target is None else kept[:target]
        parts = split(chosen, settings["val_fraction"], settings["test_fraction"], settings["seed"])
        for name in SPLITS:
            splits[name] += parts[name]
        sources[source] = {
            "raw": len(raw),
            "kept": len(kept),
            "dropped": dict(sorted(dropped.items())),
            "target": target,
            **{name: len(parts[name]) for name in SPLITS},
        }
    empty = [name for name in SPLITS if not splits[name]]
    if empty:  # finetune would blame max_length, and the notebook's sample cells would fail
        total = sum(len(part) for part in splits.values())
        raise ValueError(
            f"too few dialogues for the splits: {total} in all "
            f"({', '.join(f'{s} {sum(v[n] for n in SPLITS)}' for s, v in sources.items())}) leave the "
            f"{' and '.join(empty)} split(s) empty (val_fraction={settings['val_fraction']}, "
            f"test_fraction={settings['test_fraction']} of them round to 0); keep more dialogues (raise the targets, "
            f"or ingest more records) or raise the fractions"
        )
    manifest: dict[str, Any] = {"settings": dict(settings), "sources": sources, "splits": {}}
    for name in SPLITS:
        random.Random(f"{settings['seed']}:{name}").shuffle(splits[name])
        path = write_jsonl(out_dir / f"{name}.jsonl", splits[name])
        manifest["splits"][name] = {"dialogues": len(splits[name]), "file": path.name, "sha256": sha256_file(path)}
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _no_dialogue(path: Path, n_raw: int, dropped: Counter) -> None:
    """Refuse a raw QA file that gives no dialogue at all, saying why (empty answers, mostly)."""
    if not n_raw:
        why = "it holds no records"
    elif sum(dropped[r] for r in ("no_answer", "empty", "one_sided")) == n_raw:
        why = f"all its answers were empty (of {n_raw} records: {dict(sorted(dropped.items()))})"
    else:
        why = f"every one of its {n_raw} records was dropped ({dict(sorted(dropped.items()))})"
    raise ValueError(f"{config.relative(path)} gives no dialogue: {why}; fix the file (01_ingest) or remove "
                     f"{path.stem!r} from the dialogue targets")


def load(dialogue_dir: str | os.PathLike, split_name: str) -> list[dict]:
    """Read one split written by :func:`prepare`, with a clear error when the clean stage has not run."""
    path = Path(dialogue_dir) / f"{split_name}.jsonl"
    if not path.is_file():
        raise config.MissingInput(f"{config.relative(path)} not found: notebooks/02_clean.ipynb (the clean stage) writes "
                                  "the dialogue splits; run it first")
    return read_jsonl(path)

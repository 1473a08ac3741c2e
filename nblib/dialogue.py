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
from typing import Any, Callable

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


def segments(turns: Turns, generation_prompt: bool = False) -> list[tuple[str, bool, bool]]:
    """The rendered text cut into ``(text, trained, marker)`` pieces; joined they are :func:`render`'s output.

    ``marker`` pieces are a role marker or ``<|endoftext|>`` that this builder puts there (one token
    each); every other piece is the turns' text, which never becomes one, whatever it spells.
    ``trained`` is true for an assistant's words and the ``<|endoftext|>`` that closes them, the
    only tokens that carry a loss.
    """
    out: list[tuple[str, bool, bool]] = []
    for i, turn in enumerate(turns):
        role = turn.get("role")
        if role not in ROLES:
            raise ValueError(f"turn {i}: role must be 'user' or 'assistant', got {role!r}")
        sep = "\n" if i + 1 < len(turns) or generation_prompt else ""
        if role == "user":
            out += [(USER, False, True), (f" {turn['content']}{sep}", False, False)]
        else:
            out += [(ASSISTANT, False, True), (f" {turn['content']}", True, False), (EOT, True, True)]
            if sep:
                out.append((sep, False, False))
    if generation_prompt:
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("generation_prompt=True needs the turns to end with a user turn (the question to answer)")
        out.append((ASSISTANT, False, True))
    return out


def render(turns: Turns, generation_prompt: bool = False) -> str:
    """Render turns as text; with ``generation_prompt`` the last (user) turn is followed by ``\\n<|assistant|>``."""
    return "".join(text for text, _, _ in segments(turns, generation_prompt))


def marker_ids(tokenizer: Any) -> dict[str, int]:
    """The id of each role marker and of ``<|endoftext|>`` in ``tokenizer`` (a Hugging Face tokenizer
    that already has :data:`SPECIAL_TOKENS` added)."""
    ids = {m: tokenizer.encode(m, add_special_tokens=False) for m in (*SPECIAL_TOKENS, EOT)}
    missing = [m for m, i in ids.items() if len(i) != 1]
    if missing:
        raise ValueError(
            f"tokenizer lacks special tokens {missing}; add them first (nblib.finetune.add_special_tokens)"
        )
    return {m: i[0] for m, i in ids.items()}


def encode_text(text: str, tokenizer: Any) -> list[int]:
    """Token ids of ``text`` as ordinary text: a marker or ``<|endoftext|>`` written in it stays text."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def tokenize(turns: Turns, tokenizer: Any, generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for a dialogue: labels are the ids on trained pieces, ``-100`` elsewhere.

    Built piece by piece (:func:`segments`): the special ids are exactly the markers this builder
    inserts, one per turn and one ``<|endoftext|>`` per answer; the turns' text is :func:`encode_text`.
    """
    markers = marker_ids(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained, marker in segments(turns, generation_prompt):
        ids = [markers[text]] if marker else encode_text(text, tokenizer)
        input_ids += ids
        labels += ids if trained else [-100] * len(ids)
    return input_ids, labels


def prompt_ids(turns: Turns, tokenizer: Any) -> list[int]:
    """Token ids of the generation prompt after ``turns`` (ending in a user turn): what the model answers."""
    return tokenize(turns, tokenizer, generation_prompt=True)[0]


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


_MARKERS = re.compile("|".join(re.escape(m) for m in (USER, ASSISTANT, EOT)), re.IGNORECASE)
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")
# Invisible code points outside category Cf (Unicode's Default_Ignorable_Code_Point): the combining
# grapheme joiner, Hangul fillers, Khmer and Mongolian selectors, variation selectors, tags.
_IGNORABLE = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x2060, 0x206F),
              (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0xE0000, 0xE0FFF))


def _visible(c: str) -> str:
    """``c`` as cleaned text keeps it: control and invisible characters go (they can hide a marker
    from a search), a lone surrogate (an undecodable byte of input) becomes U+FFFD."""
    category = unicodedata.category(c)
    if category == "Cs":
        return "\ufffd"
    if category in ("Cc", "Cf") and c not in "\n\t" or any(lo <= ord(c) <= hi for lo, hi in _IGNORABLE):
        return ""
    return c


def _marker_spans(text: str) -> list[tuple[int, int]]:
    """Where ``text`` spells a role marker or ``<|endoftext|>``, in any case and in NFKC look-alikes
    (fullwidth ``＜｜user｜＞``): the spans, in ``text``'s indices, of the matches in its NFKC folding."""
    if unicodedata.is_normalized("NFKC", text):  # folding changes nothing: the common case, at C speed
        return [m.span() for m in _MARKERS.finditer(text)]
    folded, source = [], []
    for i, c in enumerate(text):
        for f in unicodedata.normalize("NFKC", c):
            folded.append(f)
            source.append(i)
    return [(source[m.start()], source[m.end() - 1] + 1) for m in _MARKERS.finditer("".join(folded))]


def clean_text(text: str) -> str:
    """Strip HTML tags and entities, control and invisible characters and our role markers; fold whitespace.

    Markers go however disguised (split by invisible characters, any case, NFKC look-alikes), until
    none is left; the text is never control (:func:`tokenize` encodes it as text anyway). Runs of
    spaces/tabs become one space, lines are trimmed, and at most one blank line is kept (answers
    keep their paragraphs and lists).
    """
    text = html.unescape(_HTML_TAG.sub(_tag_replacement, text))
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "".join(map(_visible, text))
    while spans := _marker_spans(text):
        for start, end in reversed(spans):
            text = f"{text[:start]} {text[end:]}"
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
    text over ``max_chars``), ``duplicate`` (same rendered text as an earlier record) and
    ``near_duplicate`` (the same once normalised by :func:`near_key`). A record's ``hub_split`` (the
    hub split ingest fetched it from, where its source has an ``eval_split``) is kept.
    """
    to_turns, to_fields = qa.get(source).convert, qa.get(source).eval_fields
    out, dropped, seen, seen_near = [], Counter(), set(), set()
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
        elif near_key(text) in seen_near:
            dropped["near_duplicate"] += 1
        else:
            seen.add(text)
            seen_near.add(near_key(text))
            hub = {"hub_split": rec["hub_split"]} if "hub_split" in rec else {}
            out.append({"dialogue": turns, "source": source, **fields, **hub})
    return out, dropped


def _clean_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Evaluation fields with every text (alone or in a list) cleaned as the turns are."""
    def one(v: Any) -> Any:
        return clean_text(v) if isinstance(v, str) else v

    return {k: [one(x) for x in v] if isinstance(v, list) else one(v) for k, v in fields.items()}


# ---------------------------------------------------------------------------------------------
# duplicates and leaks: what must not sit in two splits

_NOT_WORD = re.compile(r"[\W_]+")


def near_key(text: str) -> str:
    """What near-duplicate texts share: ``text`` NFKC- and case-folded, without punctuation or whitespace."""
    return _NOT_WORD.sub("", unicodedata.normalize("NFKC", text).casefold())


def question(record: dict) -> str:
    """The user's words of a dialogue record (all its user turns)."""
    return "\n".join(t["content"] for t in record["dialogue"] if t["role"] == "user")


def group_key(record: dict) -> str:
    """What keeps dialogues in one split: the passage they were written from (SciQ's ``support``, which
    its training answers quote), else the normalised question (Natural Questions, the instructions)."""
    return near_key(record.get("support") or "") or near_key(question(record))


def leak_keys(record: dict) -> set[str]:
    """The record's normalised question and passage: a record of another split sharing one leaks."""
    passage = near_key(record.get("support") or "")
    return {f"question:{near_key(question(record))}", *([f"passage:{passage}"] if passage else [])}


def drop_leaks(splits: dict[str, list[dict]]) -> Counter:
    """Remove, over every source, a record whose question or passage a more protected split holds
    (test, then val, then train: ``leak``) and a dialogue another source already gave (``near_key`` of
    the rendered text: ``duplicate_across_sources``); returns the removals by ``(source, reason)``."""
    owner: dict[str, str] = {}
    seen: set[str] = set()
    removed: Counter = Counter()
    for name in ("test", "val", "train"):
        kept = []
        for r in splits[name]:
            keys, whole = leak_keys(r), near_key(render(r["dialogue"]))
            if whole in seen or any(owner.get(k, name) != name for k in keys):
                removed[r["source"], "duplicate_across_sources" if whole in seen else "leak"] += 1
                continue
            seen.add(whole)
            owner.update({k: name for k in keys if k not in owner})
            kept.append(r)
        splits[name] = kept
    return removed


# ---------------------------------------------------------------------------------------------
# balancing, splitting, writing


def split(records: list, val_fraction: float, test_fraction: float, seed: int,
          key: Callable[[Any], str] = group_key) -> dict[str, list]:
    """Records grouped by ``key`` (:func:`group_key`: one passage or question); in the order a seeded
    shuffle of the records first meets each group, whole groups go to ``test`` and then ``val`` until
    each holds its rounded share, and ``train`` takes the rest. Where every group is one record, this
    is the seeded shuffle cut into shares that the splits always were.

    From three records on, a positive fraction gives at least one (as ``clean.assign_splits`` does),
    so a small source still has eval dialogues: the dry run's six SciQ samples round to none at 5 %.
    """
    if not 0 <= val_fraction + test_fraction < 1:
        raise ValueError(f"val_fraction + test_fraction must be in [0, 1), got {val_fraction} + {test_fraction}")
    rows = list(records)
    random.Random(seed).shuffle(rows)
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    floor = len(rows) >= 3
    share = {name: max(int(floor and fraction > 0), round(len(rows) * fraction))
             for name, fraction in (("test", test_fraction), ("val", val_fraction))}
    out: dict[str, list] = {"test": [], "val": [], "train": []}
    for group in groups.values():
        out[next((n for n in ("test", "val") if len(out[n]) < share[n]), "train")] += group
    return out


def split_source(records: list[dict], source: str, target: int | None,
                 settings: dict[str, Any]) -> tuple[dict[str, list[dict]], str | None]:
    """One source's records in splits, and the hub split its test split is (``None``: drawn by :func:`split`).

    Where the source names an ``eval_split`` (``nblib.qa``) and its records came from it (``hub_split``:
    SciQ's own test split), those records are the test split, all of them, and the others are split
    into train and val; else all are split three ways. ``target`` caps what is split, after a seeded shuffle.
    """
    rows = list(records)
    random.Random(f"{settings['seed']}:{source}").shuffle(rows)
    own = qa.get(source).eval_split
    test = [r for r in rows if own is not None and r.get("hub_split") == own]
    if not test:
        return split(rows[:target], settings["val_fraction"], settings["test_fraction"], settings["seed"]), None
    rest = [r for r in rows if r.get("hub_split") != own]
    return {**split(rest[:target], settings["val_fraction"], 0.0, settings["seed"]), "test": test}, own


def prepare(raw_qa_dir: str | os.PathLike, out_dir: str | os.PathLike, settings: dict[str, Any]) -> dict[str, Any]:
    """Raw QA files -> ``out_dir/{train,val,test}.jsonl`` + ``manifest.json``; returns the manifest.

    ``settings`` (``nblib/profiles/dialogue.yaml``): ``targets`` maps each source (file
    ``<source>.jsonl`` in ``raw_qa_dir``) to the number of dialogues to keep (``null``: all),
    ``val_fraction``, ``test_fraction``, ``seed`` and ``max_chars``. Each source is split on its
    own (:func:`split_source`), so every split holds the same mix; then what leaks across splits or
    repeats another source is dropped (:func:`drop_leaks`). The manifest counts every drop by source
    and reason, the duplicates and leaks removed in all (``deduplication``), and names the sources
    whose test split is their hub's own (``test_from_hub_split``: SciQ's ``test``, where ingested).
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
    hub_tests: dict[str, str] = {}  # source -> the hub split that is its test split
    for source, target in targets.items():
        raw = read_jsonl(raw_qa_dir / f"{source}.jsonl")
        kept, dropped = convert(raw, source, settings.get("max_chars"))
        if not kept:
            _no_dialogue(raw_qa_dir / f"{source}.jsonl", len(raw), dropped)
        parts, hub_tests[source] = split_source(kept, source, target, settings)
        for name in SPLITS:
            splits[name] += parts[name]
        sources[source] = {"raw": len(raw), "kept": len(kept), "dropped": dropped, "target": target}
    removed = drop_leaks(splits)
    for source, entry in sources.items():
        entry["dropped"] = dict(sorted((entry["dropped"] + Counter({r: n for (s, r), n in removed.items()
                                                                     if s == source})).items()))
        entry.update({name: sum(r["source"] == source for r in splits[name]) for name in SPLITS})
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
    dedup = ("duplicate", "near_duplicate", "duplicate_across_sources", "leak")
    manifest: dict[str, Any] = {"settings": dict(settings), "sources": sources, "splits": {},
                                "deduplication": {r: sum(v["dropped"].get(r, 0) for v in sources.values()) for r in dedup},
                                "test_from_hub_split": {s: h for s, h in hub_tests.items() if h is not None}}
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

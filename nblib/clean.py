"""Stage 02: turn raw e-texts into a clean paragraph corpus split into train/val/test.

Per file: decode (UTF-8, UTF-8 with BOM, cp1252, latin-1), normalise newlines and Unicode (NFC),
cut the Project Gutenberg header, footer, licence, credits and transcriber notes, drop index pages
and page furniture, rebuild paragraphs from hard-wrapped lines (joining words hyphenated across
line breaks), drop boilerplate and too-short paragraphs. Over the corpus: drop exact duplicate
paragraphs, cut each document into contiguous blocks of paragraphs and deal the blocks to the
splits with a seeded shuffle, so no paragraph sits in two splits.

Split files hold plain text: paragraphs are separated by a blank line (``PARAGRAPH_SEP``) and
documents by a line holding only a form feed (``DOC_SEP``). A *document* in a split file is a
contiguous excerpt of one source file; the training stage puts ``<|endoftext|>`` between them
(:func:`read_split` returns them).
"""

from __future__ import annotations

import codecs
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nblib import config, tokenizer
from nblib.files import atomic_write_text, read_json, write_json

SPLITS = ("train", "val", "test")
PARAGRAPH_SEP = "\n\n"
DOC_SEP = "\n\f\n"
TEXT_KINDS = ("gutenberg", "collection")
# Catalogue books (nblib.ingest.CATALOGUE) that the machado/ collection holds in another edition
# (modern spelling). When the Gutenberg edition is in the corpus these are left out, so no work
# feeds two splits.
COLLECTION_EDITIONS: dict[int, tuple[str, ...]] = {
    55752: ("romance/domCasmurro.txt",),
    54829: ("romance/memoriasBras.txt",),
    55682: ("romance/quincas.txt",),
    56737: ("romance/esau.txt",),
    57001: ("conto/papeisAvulsos.txt",),
    67162: ("romance/helena.txt",),
    33056: ("conto/historiasSemData.txt",),
    53101: ("romance/maoLuva.txt",),
    67935: ("conto/reliquias.txt",),
    55797: ("romance/memorial-de-aires.txt",),
    67780: ("romance/iaia.txt",),
    61653: ("poesia/crisalidas.txt", "poesia/falenas.txt", "poesia/americanas.txt", "poesia/ocidentais.txt"),
}

MIN_WIDTH = 60  # the narrowest wrap width we assume: verse-only files must not look "full"
FULL_FRACTION = 0.85  # a line is full (wrapped) when it plus the next word passes 85% of the width
MAX_INDEX_LINES = 400  # how far after an index heading we look for its first entry again
MAX_NOTE_BLOCKS = 12  # the longest transcriber's note we cut without a closing separator

START_RE = re.compile(
    r"^[ \t]*\*+[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.I | re.M
)
END_RE = re.compile(r"^[ \t]*(?:\*+[ \t]*)?END OF (?:THE |THIS )?PROJECT GUTENBERG", re.I | re.M)
GUTENBERG_RE = re.compile(r"project gutenberg|gutenberg\.org|gutenberg-tm", re.I)
CREDIT_RE = re.compile(
    r"^\W*(?:produced by|e-?text prepared by|prepared by|transcribed by|digitized by|credits?:)", re.I
)
NOTE_RE = re.compile(r"^\W*(?:notas? d[oe]s? (?:transcri|editor)|transcriber'?s? notes?|lista de erros)", re.I)
BOILERPLATE_RE = re.compile(
    r"gutenberg|pgdp\.net|distributed proofread|\be-?book\b|\be-?text\b|https?://|www\.|\blicen[cs]e\b"
)
_BOILERPLATE_HINTS = ("gutenberg", "pgdp", "proofread", "book", "text", "http", "www.", "licen")  # cheap pre-filter
INDEX_RE = re.compile(r"^(?:ÍNDICE|INDICE|Índice|Indice)\b[^a-zà-ÿ]*$")
FURNITURE_RE = re.compile(r"^(?:p[áa]g(?:ina)?\.?\s*)?[\[({<*\-–—\s]*\d+[\])}>*\-–—.\s]*$|^[^\w]*$", re.I)
DASH_RE = re.compile(r"^(?:[—–―]|-\s)")
TERMINAL_RE = re.compile(r"[.!?…][\"'»”’)\]]*$")
WORD_RE = re.compile(r"\w+(?:-\w+)*")
LINE_END_HYPHEN_RE = re.compile(r"(?<![\w-])(\w+(?:-\w+)*)-$")
INLINE_HYPHEN_RE = re.compile(r"(?<![\w-])(\w+(?:-\w+)*)- (?=[a-zà-öø-ÿ])(\w+(?:-\w+)*)")  # lower-case rest only

# Portuguese clitic pronouns: "desculpara-|se" keeps its hyphen, "compa-|ração" loses it.
CLITICS = frozenset(
    "o a os as lo la los las no na nos nas me te se lhe lhes vos mo ma mos mas to ta tos tas lho lha lhos lhas".split()
)
# Future/conditional endings after a clitic (mesoclisis): "retirá-la-|ia".
MESOCLITIC_ENDINGS = frozenset("ei ás á emos eis ão ia ias íamos íeis iam".split())

_SPACE_RE = re.compile("[\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_LINE_SEP_RE = re.compile("[\u2028\u2029]")
_DROP_RE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b-\u200d\u2060\ufeff]"
)  # controls, soft hyphen, zero-width


class NoBodyError(ValueError):
    """A file where no book text can be told apart from Gutenberg header/licence text."""


@dataclass
class CleanedDoc:
    """One cleaned source file: its paragraphs and what was done to it."""

    name: str
    paragraphs: list[str]
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# decoding and normalisation


def decode(data: bytes) -> tuple[str, str]:
    """Decode bytes, returning ``(text, encoding)``.

    UTF-8 with or without a BOM, UTF-16 with a BOM; otherwise a single-byte encoding: cp1252
    when bytes 0x80-0x9F occur and are valid cp1252 (curly quotes, dashes), else latin-1 (the
    two agree on every other byte, and latin-1 decodes anything).
    """
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8) :].decode("utf-8"), "utf-8-sig"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16"), "utf-16"
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    if re.search(rb"[\x80-\x9f]", data):
        try:
            return data.decode("cp1252"), "cp1252"
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1"), "latin-1"


def normalize(text: str) -> str:
    """Unix newlines, NFC, plain spaces, no control/zero-width characters or trailing spaces."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _LINE_SEP_RE.sub("\n", unicodedata.normalize("NFC", text))
    text = _DROP_RE.sub("", _SPACE_RE.sub(" ", text))
    return "\n".join(line.rstrip() for line in text.split("\n"))


# ---------------------------------------------------------------------------------------------
# Project Gutenberg header, footer, credits and notes


def strip_gutenberg(text: str, name: str = "<text>") -> tuple[str, bool]:
    """The book body of a Project Gutenberg file and whether markers were found.

    The body lies between the last ``*** START OF ...`` line and the first ``END OF THE PROJECT
    GUTENBERG`` line (every old and new variant); credit blocks ("Produced by ...") and
    transcriber's/editor's notes inside it are cut. A text without any marker that never mentions
    Gutenberg is returned whole. Raises :class:`NoBodyError` when Gutenberg text cannot be
    separated from the book.
    """
    starts = list(START_RE.finditer(text))
    if not starts:
        if GUTENBERG_RE.search(text):
            raise NoBodyError(
                f"{name}: mentions Project Gutenberg but has no '*** START OF THE PROJECT GUTENBERG EBOOK' "
                "line, so its licence header cannot be told apart from the book. Restore the header "
                "(re-download the file) or delete the licence text by hand."
            )
        return text, False
    end = END_RE.search(text, starts[0].end())
    if end is None:
        raise NoBodyError(
            f"{name}: has a START marker but no 'END OF THE PROJECT GUTENBERG EBOOK' line, so the licence "
            "footer cannot be found; the file is probably truncated. Re-download it."
        )
    begin = max(s.end() for s in starts if s.start() < end.start())
    blocks = [b.strip("\n") for b in re.split(r"\n[ \t]*\n", text[begin : end.start()])]
    blocks = [b for b in blocks if b.strip()]
    kept: list[str] = []
    i = 0
    while i < len(blocks):
        block = blocks[i].strip()
        if CREDIT_RE.match(block):
            i += 1
        elif NOTE_RE.match(block):
            i = _end_of_note(blocks, i)
        else:
            kept.append(blocks[i])
            i += 1
    if not kept:
        raise NoBodyError(f"{name}: nothing but credits and notes between the Gutenberg START and END markers")
    return "\n\n".join(kept), True


def _end_of_note(blocks: list[str], i: int) -> int:
    """Index of the first block after the note starting at ``i``: past a separator ("* * *"),
    at an all-capitals block (a title), or after ``MAX_NOTE_BLOCKS`` blocks, whichever is first."""
    for j in range(i + 1, min(len(blocks), i + 1 + MAX_NOTE_BLOCKS)):
        if not re.search(r"\w", blocks[j]):
            return j + 1
        if is_heading(blocks[j].replace("\n", " ")):
            return j
    return min(len(blocks), i + 1 + MAX_NOTE_BLOCKS)


# ---------------------------------------------------------------------------------------------
# line level: index pages and page furniture


def is_heading(line: str) -> bool:
    """A line with letters and no lower-case letter ("CAPÍTULO II", "MUSA CONSOLATRIX")."""
    return line == line.upper() and line != line.lower()


def is_boilerplate(paragraph: str) -> bool:
    """Whether a paragraph carries Project Gutenberg/e-book boilerplate (a licence, a URL, "Gutenberg")."""
    low = paragraph.lower()
    return any(h in low for h in _BOILERPLATE_HINTS) and BOILERPLATE_RE.search(low) is not None


def is_furniture(line: str) -> bool:
    """Page furniture: a bare page/stanza number ("12", "[12]", "Pag. 7") or a line without letters or digits."""
    return bool(line.strip()) and FURNITURE_RE.match(line.strip()) is not None


def wrap_width(lines: list[str]) -> int:
    """The width the text was wrapped at: the 95th percentile of non-blank line lengths (at least ``MIN_WIDTH``)."""
    lengths = sorted(len(line) for line in lines if line)
    if not lengths:
        return MIN_WIDTH
    return max(MIN_WIDTH, lengths[int(0.95 * (len(lengths) - 1))])


def _same_entry(a: str, b: str) -> bool:
    a, b = " ".join(a.casefold().split()), " ".join(b.casefold().split())
    return a == b or (min(len(a), len(b)) >= 12 and (a.startswith(b) or b.startswith(a)))


def drop_index(lines: list[str], width: int) -> tuple[list[str], int]:
    """Remove index pages (an "ÍNDICE" line and its entries); returns the kept lines and how many were dropped.

    The index ends where its first entry appears again (the text starts there); failing that, at
    the first line that is not entry-like (a full-width line or a dialogue line).
    """
    out: list[str] = []
    dropped = 0
    i = 0
    while i < len(lines):
        if not INDEX_RE.match(lines[i].strip()):
            out.append(lines[i])
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        end = None
        if j < len(lines):
            end = next(
                (k for k in range(j + 1, min(len(lines), j + MAX_INDEX_LINES)) if _same_entry(lines[k], lines[j])), None
            )
        if end is None:
            end = j
            while end < len(lines) and (
                not lines[end].strip()
                or (len(lines[end].strip()) < FULL_FRACTION * width and not DASH_RE.match(lines[end].strip()))
            ):
                end += 1
        dropped += end - i
        i = end
    return out, dropped


# ---------------------------------------------------------------------------------------------
# paragraphs


def join_hyphenated(head: str, tail: str, vocab: Counter[str]) -> str:
    """Join a word split as ``head-`` / ``tail``: keep the hyphen or not.

    The document's own vocabulary decides first (``comparação`` seen more often than
    ``compa-ração``); otherwise the hyphen stays before a clitic pronoun or a capital
    ("desculpara-se", "Saint-Pierre", "retirá-la-ia") and goes elsewhere (a syllable break).
    """
    hyphenated, joined = f"{head}-{tail}", f"{head}{tail}"
    n_hyphenated, n_joined = vocab[hyphenated.lower()], vocab[joined.lower()]
    if n_hyphenated != n_joined:
        return hyphenated if n_hyphenated > n_joined else joined
    first, last = tail.split("-")[0].lower(), head.split("-")[-1].lower()
    if first in CLITICS or tail[0].isupper() or (last in CLITICS and first in MESOCLITIC_ENDINGS):
        return hyphenated
    return joined


def _is_full(line: str, next_line: str, width: int) -> bool:
    """Whether ``line`` was cut by wrapping: it plus the next line's first word overflows the width."""
    return len(line) + 1 + len(next_line.split(" ", 1)[0]) > FULL_FRACTION * width


def _break(line: str, nxt: str, width: int, blank_separated: bool) -> str:
    """How ``line`` joins ``nxt``: ``"-"`` (split word), ``" "`` (wrap), ``"\n"`` (verse) or ``""`` (new paragraph)."""
    if not line or not nxt:
        return ""
    if line.endswith("-") and LINE_END_HYPHEN_RE.search(line) and WORD_RE.match(nxt):
        return "-"
    if not blank_separated and (is_heading(line) or is_heading(nxt) or DASH_RE.match(nxt)):
        return ""
    if _is_full(line, nxt, width):
        return " "
    if not blank_separated and TERMINAL_RE.search(line, max(0, len(line) - 8)):
        return ""
    return "\n"


def rebuild_paragraphs(lines: list[str], width: int, vocab: Counter[str]) -> tuple[list[str], int]:
    """Join hard-wrapped lines into paragraphs; returns ``(paragraphs, hyphen_joins)``.

    With blank lines between paragraphs (Gutenberg), a blank line ends a paragraph; inside one, a
    full line is joined to the next with a space and a short one keeps its line break (verse).
    Without blank lines (the PDF extractions), a paragraph also ends at a heading, before a
    dialogue dash, and after a short line ending a sentence; a short line that does not end a
    sentence keeps its line break (verse). A line ending in ``word-`` is always joined to the next
    line's first word (see :func:`join_hyphenated`). Breaks are decided on the original lines.
    """
    nonblank = sum(1 for line in lines if line)
    blank_separated = (len(lines) - nonblank) >= 0.05 * max(nonblank, 1)
    breaks = [_break(a, b, width, blank_separated) for a, b in zip(lines, lines[1:] + [""])]
    lines = list(lines)
    paragraphs: list[str] = []
    current = ""
    joins = 0
    for i, kind in enumerate(breaks):
        current += lines[i]
        if kind == "-":
            head = LINE_END_HYPHEN_RE.search(current, max(0, len(current) - 200))
            tail = WORD_RE.match(lines[i + 1])
            current = current[: head.start()] + join_hyphenated(head.group(1), tail.group(0), vocab)
            lines[i + 1] = lines[i + 1][tail.end() :]
            joins += 1
        elif kind:
            current += kind
        elif current:
            paragraphs.append(current)
            current = ""
    return paragraphs, joins


def fix_inline_hyphens(paragraph: str, vocab: Counter[str]) -> tuple[str, int]:
    """Rejoin words the PDF extraction left as ``word- rest`` (a lost line break); returns ``(text, joins)``."""
    count = 0

    def repl(m: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return join_hyphenated(m.group(1), m.group(2), vocab)

    if "- " not in paragraph:
        return paragraph, 0
    return INLINE_HYPHEN_RE.sub(repl, paragraph), count


# ---------------------------------------------------------------------------------------------
# one document


def clean_text(text: str, name: str = "<text>", min_chars: int = 10) -> CleanedDoc:
    """Clean one decoded text into paragraphs (see the module docstring for the steps)."""
    body, gutenberg = strip_gutenberg(normalize(text), name)
    lines = [line.strip() for line in body.split("\n")]
    width = wrap_width(lines)
    lines, index_lines = drop_index(lines, width)
    furniture = sum(1 for line in lines if is_furniture(line))
    lines = [line for line in lines if not is_furniture(line)]
    vocab = Counter(WORD_RE.findall("\n".join(lines).lower()))
    paragraphs, joins = rebuild_paragraphs(lines, width, vocab)
    kept: list[str] = []
    boilerplate = short = 0
    for p in paragraphs:
        p, n = fix_inline_hyphens(re.sub(r" {2,}", " ", p).strip(), vocab)
        joins += n
        if is_boilerplate(p):
            boilerplate += 1
        elif len(p) < min_chars:
            short += 1
        else:
            kept.append(p)
    if not kept:
        raise NoBodyError(f"{name}: no paragraph of at least {min_chars} characters is left after cleaning")
    stats = {
        "gutenberg_markers": gutenberg,
        "wrap_width": width,
        "index_lines_dropped": index_lines,
        "furniture_lines_dropped": furniture,
        "hyphen_joins": joins,
        "boilerplate_dropped": boilerplate,
        "short_dropped": short,
        "paragraphs": len(kept),
        "characters": sum(map(len, kept)),
    }
    return CleanedDoc(name, kept, stats)


def clean_file(path: str | Path, name: str | None = None, min_chars: int = 10) -> CleanedDoc:
    """Read, decode and clean one file; ``stats["encoding"]`` says how it was decoded."""
    path = Path(path)
    text, encoding = decode(path.read_bytes())
    doc = clean_text(text, name or path.name, min_chars)
    doc.stats["encoding"] = encoding
    return doc


# ---------------------------------------------------------------------------------------------
# corpus: duplicates, splits, files


def dedupe(docs: list[CleanedDoc]) -> int:
    """Drop exact duplicate paragraphs (whitespace-insensitive) across ``docs`` in place, keeping
    the first occurrence; records ``duplicates_dropped`` per document and returns the total."""
    seen: set[str] = set()
    total = 0
    for doc in docs:
        kept = []
        for p in doc.paragraphs:
            key = " ".join(p.split())
            if key not in seen:
                seen.add(key)
                kept.append(p)
        doc.stats["duplicates_dropped"] = len(doc.paragraphs) - len(kept)
        total += doc.stats["duplicates_dropped"]
        doc.paragraphs = kept
    return total


def make_blocks(paragraphs: list[str], block_chars: int) -> list[list[str]]:
    """Cut a document into contiguous blocks of at least ``block_chars`` characters (the last may be shorter)."""
    blocks: list[list[str]] = []
    current: list[str] = []
    size = 0
    for p in paragraphs:
        current.append(p)
        size += len(p)
        if size >= block_chars:
            blocks.append(current)
            current, size = [], 0
    if current:
        blocks.append(current)
    return blocks


def assign_splits(n_blocks: int, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """The split of each of ``n_blocks`` blocks: a seeded shuffle, then ``round(n * fraction)``
    blocks to val and to test (at least one each when the fraction is positive), the rest to train."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum below 1"
        )
    n_val = max(int(val_fraction > 0), round(n_blocks * val_fraction))
    n_test = max(int(test_fraction > 0), round(n_blocks * test_fraction))
    if n_val + n_test >= n_blocks:
        raise ValueError(
            f"only {n_blocks} blocks of text: too few to give val {n_val} and test {n_test} and keep some for "
            "train; lower block_chars or add texts"
        )
    order = list(range(n_blocks))
    random.Random(seed).shuffle(order)
    out = ["train"] * n_blocks
    for k in order[:n_val]:
        out[k] = "val"
    for k in order[n_val : n_val + n_test]:
        out[k] = "test"
    return out


def split_documents(
    docs: list[CleanedDoc], block_chars: int, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[tuple[str, list[str]]]]:
    """Deal every document's blocks to the splits; returns, per split, ``(source name, paragraphs)``
    for each maximal run of consecutive blocks of one document (a split file's documents)."""
    blocks = [
        (d, b, block) for d, doc in enumerate(docs) for b, block in enumerate(make_blocks(doc.paragraphs, block_chars))
    ]
    labels = assign_splits(len(blocks), val_fraction, test_fraction, seed)
    out: dict[str, list[tuple[str, list[str]]]] = {s: [] for s in SPLITS}
    previous: dict[str, tuple[int, int]] = {}
    for (d, b, block), split in zip(blocks, labels):
        if previous.get(split) == (d, b - 1):
            out[split][-1][1].extend(block)
        else:
            out[split].append((docs[d].name, list(block)))
        previous[split] = (d, b)
    return out


def text_sources(raw_dir: str | Path) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of every text (Gutenberg book, collection work) in ``raw_dir/manifest.json``."""
    raw_dir = Path(raw_dir)
    manifest_path = raw_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no {manifest_path}: run 01_ingest (nblib.ingest.ingest) first")
    files = read_json(manifest_path)["files"]
    rels = sorted(rel for rel, entry in files.items() if entry["kind"] in TEXT_KINDS)
    if not rels:
        raise ValueError(f"{manifest_path} lists no texts (kinds {', '.join(TEXT_KINDS)}); ingest some books first")
    missing = [rel for rel in rels if not (raw_dir / rel).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{raw_dir}: files listed in manifest.json are missing: {', '.join(missing[:5])}; re-run 01_ingest"
        )
    return [(rel, raw_dir / rel) for rel in rels]


def drop_second_editions(sources: list[tuple[str, Path]]) -> tuple[list[tuple[str, Path]], dict[str, str]]:
    """Leave out collection works whose Gutenberg edition is also present (``ingest.COLLECTION_EDITIONS``),
    so one work never feeds two splits; returns the kept sources and ``{left out: kept edition}``."""
    rels = {rel for rel, _ in sources}
    dropped = {
        f"machado/{work}": f"gutenberg/pg{book_id}.txt"
        for book_id, works in COLLECTION_EDITIONS.items()
        if f"gutenberg/pg{book_id}.txt" in rels
        for work in works
        if f"machado/{work}" in rels
    }
    return [(rel, path) for rel, path in sources if rel not in dropped], dropped


def build_corpus(cfg: dict[str, Any], root: str | Path | None = None, *, strict: bool = True) -> dict[str, Any]:
    """Clean every raw text, dedupe, split and write ``data/processed/corpus/{train,val,test}.txt`` + ``manifest.json``.

    ``cfg`` is ``config.settings("clean", ...)``. A file that cannot be cleaned is an error naming
    it and the reason (``strict``); with ``strict=False`` it is left out and listed under ``failed``.
    """
    paths = config.paths(root)
    sources, editions_dropped = drop_second_editions(text_sources(paths.raw))
    docs: list[CleanedDoc] = []
    failed: dict[str, str] = {}
    for rel, path in tqdm(sources, desc="clean", unit="file"):
        try:
            docs.append(clean_file(path, rel, cfg["min_paragraph_chars"]))
        except NoBodyError as e:
            failed[rel] = str(e)
    if failed and strict:
        raise NoBodyError(f"{len(failed)} file(s) could not be cleaned:\n" + "\n".join(failed.values()))
    duplicates = dedupe(docs)
    splits = split_documents(docs, cfg["block_chars"], cfg["val_fraction"], cfg["test_fraction"], cfg["seed"])
    enc = tokenizer.get_encoding()
    summary: dict[str, Any] = {}
    for split, segments in splits.items():
        texts = [PARAGRAPH_SEP.join(paragraphs) for _, paragraphs in segments]
        atomic_write_text(paths.corpus / f"{split}.txt", DOC_SEP.join(texts) + "\n")
        summary[split] = {
            "documents": len(texts),
            "sources": len({name for name, _ in segments}),
            "paragraphs": sum(len(p) for _, p in segments),
            "characters": sum(map(len, texts)),
            "tokens": tokenizer.count_tokens(texts, enc),
        }
    manifest = {
        "format": {
            "paragraph_separator": PARAGRAPH_SEP,
            "document_separator": DOC_SEP,
            "note": "a document is a contiguous excerpt of one source; training puts <|endoftext|> between them",
        },
        "settings": {k: cfg[k] for k in sorted(cfg)},
        "splits": summary,
        "duplicates_dropped": duplicates,
        "editions_dropped": editions_dropped,
        "sources": {doc.name: doc.stats for doc in docs},
        "failed": failed,
    }
    write_json(paths.corpus / "manifest.json", manifest)
    return manifest


def read_split(path: str | Path) -> list[str]:
    """The documents of a split file (each a text whose paragraphs are separated by a blank line)."""
    text = Path(path).read_text(encoding="utf-8")
    return [doc for doc in text.removesuffix("\n").split(DOC_SEP) if doc]


def paragraph_lengths(corpus_dir: str | Path | None = None) -> dict[str, list[int]]:
    """Characters of every paragraph of each split (``nblib.plots.paragraph_lengths`` draws them)."""
    corpus_dir = Path(corpus_dir) if corpus_dir is not None else config.paths().corpus
    return {
        split: [len(p) for doc in read_split(corpus_dir / f"{split}.txt") for p in doc.split(PARAGRAPH_SEP)]
        for split in SPLITS
    }

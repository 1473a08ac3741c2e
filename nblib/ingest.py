"""Stage 01: fetch the raw texts and QA data into ``data/raw/`` and record them in a manifest.

Sources, per item:

- Gutenberg e-books (``CATALOGUE`` plus any extra ids): ``$NBLIB_MIRROR/gutenberg/pg<ID>.txt``
  when the mirror has it, else downloaded from gutenberg.org (``/cache/epub/<ID>/pg<ID>.txt``,
  then the older ``/files/<ID>/<ID>-0.txt``) with timeouts, retries with backoff and resumable
  ``.part`` files. Written as served to ``gutenberg/pg<ID>.txt``.
- The Machado collection: a local folder of plain ``.txt`` files (default ``$NBLIB_MIRROR/machado``),
  copied to ``machado/<genre>/<work>.txt``.
- QA datasets (Alpaca, Dolly, SciQ, Natural Questions; one module each in ``nblib.qa``): a local
  JSON/JSONL file, the mirror's copy, or the Hugging Face Hub through ``datasets``; records kept
  in their source schema in ``qa/<name>.jsonl``.

Every file is written atomically and recorded in ``manifest.json`` (kind, source, origin, title,
bytes, sha256, encoding); a re-run keeps files whose size and sha256 still match the manifest.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import time
import urllib.error
import re
import urllib.request
import warnings
from collections import Counter
from collections.abc import Iterable
from http.client import HTTPException
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from nblib import config, qa
from nblib.clean import START_RE, decode
from nblib.files import atomic_write_bytes, read_json, read_jsonl, sha256_file, write_json, write_jsonl

if TYPE_CHECKING:
    import pandas as pd

# Machado de Assis on Project Gutenberg: e-book number -> title.
CATALOGUE: dict[int, str] = {
    55752: "Dom Casmurro",
    54829: "Memórias Póstumas de Brás Cubas",
    55682: "Quincas Borba",
    56737: "Esaú e Jacó",
    57001: "Papéis Avulsos",
    67162: "Helena",
    33056: "Histórias sem data",
    53101: "A mão e a luva",
    67935: "Relíquias de casa velha",
    55797: "Memorial de Ayres",
    67780: "Iaiá Garcia",
    61653: "Poesias completas",
}
GUTENBERG_URL = "https://www.gutenberg.org"
USER_AGENT = "machado-gpt/0.1 (nblib.ingest)"
MANIFEST = "manifest.json"
SAMPLE = "sample"  # a qa_files value: the source's hub-schema sample (nblib/qa/samples)


class IngestError(RuntimeError):
    """Some sources could not be fetched; the message says which and how to fix it."""


class DownloadError(IngestError):
    """One URL could not be downloaded completely."""


# ---------------------------------------------------------------------------------------------
# the raw folder and its manifest


def load_manifest(raw_dir: str | Path) -> dict[str, Any]:
    """``raw_dir/manifest.json`` (``{"files": {relative path: entry}}``), empty when absent."""
    path = Path(raw_dir) / MANIFEST
    return read_json(path) if path.is_file() else {"files": {}}


class RawStore:
    """``data/raw/`` and its manifest: what is there, whether it is intact, where it came from.

    Entries of an earlier run are reused when the file still has the recorded size and sha256 and
    was fetched the same way. While a run is in progress the saved manifest also keeps the earlier
    entries (an interrupted run loses nothing); :meth:`finish` saves the current run's files only.
    """

    def __init__(self, raw_dir: str | Path):
        self.dir = Path(raw_dir)
        self.previous: dict[str, dict[str, Any]] = load_manifest(self.dir)["files"]
        self.files: dict[str, dict[str, Any]] = {}
        self.actions: Counter[tuple[str, str]] = Counter()

    def valid(self, rel: str, **expect: Any) -> bool:
        """Keep ``rel`` if an earlier entry matches ``expect`` and the file's size and sha256 still match it."""
        entry = self.previous.get(rel)
        if entry is None or any(entry.get(k) != v for k, v in expect.items()):
            return False
        path = self.dir / rel
        if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            return False
        self.files[rel] = entry
        self.actions[(entry["kind"], "kept")] += 1
        return True

    def record(self, rel: str, kind: str, source: str, **meta: Any) -> dict[str, Any]:
        """Describe the file just written at ``rel`` (bytes, sha256, encoding) and save the manifest."""
        path = self.dir / rel
        data = path.read_bytes()
        entry = {"kind": kind, "source": source, **meta, "bytes": len(data), "sha256": sha256_file(path)}
        entry["encoding"] = decode(data)[1]
        self.files[rel] = entry
        self.actions[(kind, source)] += 1
        self.save()
        return entry

    def manifest(self) -> dict[str, Any]:
        """The current run's files."""
        return {"files": dict(sorted(self.files.items()))}

    def save(self) -> None:
        """Save the earlier run's entries updated with this run's (progress that survives a crash)."""
        write_json(self.dir / MANIFEST, {"files": dict(sorted({**self.previous, **self.files}.items()))})

    def finish(self) -> dict[str, Any]:
        """Save and return the manifest of this run's files only."""
        write_json(self.dir / MANIFEST, self.manifest())
        return self.manifest()


# ---------------------------------------------------------------------------------------------
# HTTP


def download(url: str, dest: str | Path, *, timeout: float = 30.0, retries: int = 3, backoff: float = 1.0) -> Path:
    """Download ``url`` to ``dest`` through a ``.part`` file named for the URL, resumed with a Range request.

    A short body (fewer bytes than Content-Length), a connection error or a 5xx/408/429 answer is
    retried up to ``retries`` times, sleeping ``backoff * 2**attempt`` seconds; other 4xx answers
    and an unknown host fail at once. ``dest`` appears only complete, by an atomic rename.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(url, dest)
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _fetch_once(url, part, timeout)
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as e:
            last = e
            if e.code == 416:  # our .part is not a prefix of what the server has: start over
                part.unlink(missing_ok=True)
            elif 400 <= e.code < 500 and e.code not in (408, 429):
                break
        except urllib.error.URLError as e:
            last = e
            if isinstance(e.reason, socket.gaierror) and e.reason.errno != socket.EAI_AGAIN:
                break  # unknown host (offline): retrying will not help
        except (HTTPException, OSError, DownloadError) as e:
            last = e
    raise DownloadError(f"{url}: {type(last).__name__}: {last}") from last


def part_path(url: str, dest: str | Path) -> Path:
    """The partial file of ``url`` -> ``dest`` (one per URL, so a resume never mixes two sources)."""
    dest = Path(dest)
    return dest.with_name(f"{dest.name}.{hashlib.sha256(url.encode()).hexdigest()[:8]}.part")


def _fetch_once(url: str, part: Path, timeout: float) -> None:
    """One request: append to ``part`` (206) or rewrite it (200); raise when the body is short."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        if have and resp.status == 206:
            total = int(resp.headers["Content-Range"].rsplit("/", 1)[1])
        else:
            have = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
        with (
            open(part, "ab" if have else "wb") as f,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], leave=False) as bar,
        ):
            try:
                while chunk := resp.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
            finally:
                f.flush()
                os.fsync(f.fileno())
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"{url}: body ended after {size} of {total} bytes")


# ---------------------------------------------------------------------------------------------
# Gutenberg


MIN_LETTER_SHARE = 0.6  # letters among the non-space characters of real prose or verse
MAX_CONTROL_SHARE = 0.001  # control characters (other than newline, tab, form feed)
MAX_LINE_CHARS = 5000  # the 99th-percentile line length a text file may have
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")  # Cc but newline, tab, carriage return, form feed


def implausible(data: bytes, gutenberg: bool) -> str | None:
    """Why ``data`` does not look like a text (or, with ``gutenberg``, a Project Gutenberg e-book),
    or ``None`` when it does: no NUL bytes, mostly letters, almost no control characters, lines of
    sensible length, and for e-books the ``*** START OF`` line. Checks the text as the cleaner
    decodes it (``clean.decode``), so UTF-16 with a BOM, whose bytes are half NULs, is text."""
    try:
        text, encoding = decode(data)
    except UnicodeDecodeError as e:
        name = e.encoding.upper().removesuffix("-LE").removesuffix("-BE")
        return f"it starts with a {name} byte-order mark but is not {name} ({e.reason})"
    nul = text.count("\0")
    if nul:
        unit = "characters" if encoding == "utf-16" else "bytes"
        return f"it holds {nul:,} NUL {unit} (a binary file, not text)"
    visible = len(text) - sum(map(str.isspace, text))
    if not visible:
        return "it holds no text"
    letters = sum(map(str.isalpha, text)) / visible
    if letters < MIN_LETTER_SHARE:
        return f"only {letters:.0%} of its characters are letters (text has over {MIN_LETTER_SHARE:.0%})"
    control = len(_CONTROL.findall(text)) / len(text)
    if control > MAX_CONTROL_SHARE:
        return f"{control:.1%} of its characters are control characters (a binary or damaged file)"
    lengths = sorted(len(line) for line in text.splitlines()) or [0]
    if lengths[int(0.99 * (len(lengths) - 1))] > MAX_LINE_CHARS:
        return f"its lines run to {lengths[-1]:,} characters (not a plain-text file)"
    if gutenberg and not START_RE.search(text):
        return "it has no '*** START OF THE PROJECT GUTENBERG EBOOK' line (not a Gutenberg plain-text e-book)"
    return None


def gutenberg_urls(book_id: int, base_url: str = GUTENBERG_URL) -> list[str]:
    """The plain-text URLs of an e-book, in the order tried."""
    base = base_url.rstrip("/")
    return [f"{base}/cache/epub/{book_id}/pg{book_id}.txt", f"{base}/files/{book_id}/{book_id}-0.txt"]


def resolve_books(books: str | Iterable[int | str]) -> list[int]:
    """Catalogue ids from ``"all"`` or a list of ids; an id outside the catalogue is an error (use ``extra_ids``)."""
    if isinstance(books, str):
        if books != "all":
            raise ValueError(f"books={books!r}: give 'all' or a list of Gutenberg ids from ingest.CATALOGUE")
        return list(CATALOGUE)
    ids = [_as_id(b) for b in books]
    unknown = [i for i in ids if i not in CATALOGUE]
    if unknown:
        raise ValueError(
            f"books: {unknown} are not in the Machado catalogue ({', '.join(map(str, CATALOGUE))}); "
            "put other Gutenberg ids in extra_ids"
        )
    return ids


def _as_id(value: int | str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a Project Gutenberg e-book number (e.g. 55752)") from None


def read_title(text: str) -> str | None:
    """The ``Title:`` field of a Gutenberg header, if any."""
    for line in text.splitlines()[:80]:
        if line.startswith("Title:"):
            return line.removeprefix("Title:").strip() or None
    return None


def fetch_gutenberg(
    ids: Iterable[int],
    store: RawStore,
    *,
    mirror: Path | None = None,
    base_url: str = GUTENBERG_URL,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
) -> None:
    """Put ``gutenberg/pg<ID>.txt`` for every id into ``store``: kept, copied from ``mirror``, or downloaded.

    Every id is tried; those that fail are named together in one :class:`IngestError`.
    """
    failures: dict[int, str] = {}
    for book_id in tqdm(list(ids), desc="gutenberg", unit="book"):
        rel = f"gutenberg/pg{book_id}.txt"
        if store.valid(rel, id=book_id):
            continue
        dest = store.dir / rel
        src = mirror / rel if mirror is not None else None
        if src is not None and src.is_file():
            problem = implausible(src.read_bytes(), gutenberg=True)
            if problem:
                failures[book_id] = f"the mirror's {src} does not look like an e-book: {problem}; replace it with the file Gutenberg serves"
                continue
            atomic_write_bytes(dest, src.read_bytes())
            source, origin = "mirror", rel
        else:
            reasons = []
            for url in gutenberg_urls(book_id, base_url):
                try:
                    download(url, dest, timeout=timeout, retries=retries, backoff=backoff)
                except DownloadError as e:
                    reasons.append(str(e))
                    continue
                problem = implausible(dest.read_bytes(), gutenberg=True)
                if problem is None:
                    break
                dest.unlink()
                reasons.append(f"{url}: {problem}")
            else:
                failures[book_id] = "; ".join(reasons)
                continue
            source, origin = "http", url
        text = decode(dest.read_bytes())[0]
        title = CATALOGUE.get(book_id) or read_title(text) or f"Project Gutenberg #{book_id}"
        store.record(rel, "gutenberg", source, origin=origin, id=book_id, title=title)
    if failures:
        where = f"the mirror {mirror / 'gutenberg'}" if mirror is not None else config.mirror_state()
        raise IngestError(
            f"could not get Gutenberg e-book(s) {', '.join(map(str, failures))} (offline source: {where}):\n  "
            + "\n  ".join(f"{i}: {r}" for i, r in failures.items()) + "\n"
            "Fix: put pg<ID>.txt files into the mirror's gutenberg/ folder, or run with a network, or drop "
            "these ids from books/extra_ids."
        )


# ---------------------------------------------------------------------------------------------
# local collection


def fetch_collection(src_dir: str | Path, store: RawStore, *, source: str = "folder") -> None:
    """Copy every ``.txt`` under ``src_dir`` (keeping sub-folders, e.g. genres) to ``machado/`` in ``store``."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise IngestError(f"collection folder {src_dir} does not exist; set collection_dir to a folder of .txt files")
    paths = sorted(src_dir.rglob("*.txt"))
    if not paths:
        raise IngestError(
            f"collection folder {src_dir} holds no .txt files; point collection_dir at a folder of plain-text "
            "works (like the mirror's machado/) or set collection to false"
        )
    bad = []
    for path in tqdm(paths, desc="collection", unit="file"):
        origin = path.relative_to(src_dir).as_posix()
        rel = f"machado/{origin}"
        if store.valid(rel, origin=origin):
            continue
        problem = implausible(path.read_bytes(), gutenberg=False)
        if problem:
            bad.append(f"{path}: {problem}")
            continue
        atomic_write_bytes(store.dir / rel, path.read_bytes())
        genre = path.parent.name if path.parent != src_dir else None
        store.record(rel, "collection", source, origin=origin, title=path.stem, genre=genre)
    if bad:
        raise IngestError("collection file(s) that do not look like text (left out):\n  " + "\n  ".join(bad)
                          + "\nFix: replace them with the plain-text works, or remove them from the folder")


# ---------------------------------------------------------------------------------------------
# QA datasets


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a local ``.json`` (a list of objects) or ``.jsonl`` file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def check_records(name: str, records: list[Any], fields: tuple[str, ...], where: str) -> None:
    """Every record must be an object with ``fields``; the first bad one is reported."""
    for i, r in enumerate(records):
        missing = [f for f in fields if not isinstance(r, dict) or f not in r]
        if missing:
            raise ValueError(
                f"{where}: record {i} is not a {name} record (missing {', '.join(missing)}); "
                f"{name} records need {', '.join(fields)}"
            )


def _hub_records(spec: qa.QASource, limit: int | None) -> list[dict[str, Any]]:
    """Up to ``limit`` records of the source's ``split``; with an ``eval_split`` (SciQ's ``test``), that
    split's records too, all of them, and every record names its split (``hub_split``) for the clean stage."""
    if spec.eval_split is None:
        return _hub_split(spec, spec.split, limit)
    return [{**r, "hub_split": split} for split, n in ((spec.split, limit), (spec.eval_split, None))
            for r in _hub_split(spec, split, n)]


def _hub_split(spec: qa.QASource, split: str, limit: int | None) -> list[dict[str, Any]]:
    from datasets import load_dataset

    if spec.hub is None:
        raise IngestError(f"QA source {spec.name!r} has no hub copy: give its file with qa_files: {{{spec.name}: <path>}}")
    try:
        ds = load_dataset(spec.hub, spec.config, split=split, streaming=spec.streaming)
    except Exception as e:  # hub/network errors come in many types
        raise IngestError(
            f"could not load {spec.hub} from the Hugging Face Hub ({type(e).__name__}: {e}). Offline, give a local "
            "JSON/JSONL file with qa_files, or set NBLIB_MIRROR to a folder holding it."
        ) from e
    rows = itertools.islice(ds, limit) if limit is not None else ds
    return [
        {k: r[k] for k in spec.keep} if spec.keep else dict(r)
        for r in tqdm(rows, desc=spec.hub, unit="rec", total=limit)
    ]


def fetch_qa(
    name: str, limit: int | None, store: RawStore, *, file: str | Path | None = None, mirror: Path | None = None
) -> None:
    """Write up to ``limit`` records of QA dataset ``name`` to ``qa/<name>.jsonl`` in ``store``.

    Source: ``file`` if given, else the mirror's copy (``QASource.mirror_file``), else the Hub.
    The first ``limit`` records are taken, so a run is repeatable; from the Hub, a source's
    ``eval_split`` (SciQ's test split) is added whole, each record naming its split.
    """
    spec = qa.get(name)
    if file is not None:
        path, source = Path(file), "folder"
        origin = path.name
    elif mirror is not None and spec.mirror_file and (mirror / spec.mirror_file).is_file():
        path, source, origin = mirror / spec.mirror_file, "mirror", spec.mirror_file
    else:
        path, source, origin = None, "hub", spec.hub
    rel = f"qa/{name}.jsonl"
    eval_split = spec.eval_split if path is None else None  # a hub copy fetched before it was taken is stale
    if store.valid(rel, origin=origin, limit=limit, eval_split=eval_split):
        return
    if path is not None:
        records = read_records(path)[:limit] if limit is not None else read_records(path)
    else:
        records = _hub_records(spec, limit)
    check_records(name, records, spec.fields, str(path or spec.hub))
    write_jsonl(store.dir / rel, records)
    store.record(rel, "qa", source, origin=origin, name=name, limit=limit, records=len(records), eval_split=eval_split)


# ---------------------------------------------------------------------------------------------
# the stage


def ingest(cfg: dict[str, Any], root: str | Path | None = None) -> dict[str, Any]:
    """Run stage 01 with ``cfg = config.settings("ingest", ...)``; returns the manifest.

    Everything that can be fetched is; then any failures are raised together.
    """
    store = RawStore(config.paths(root).raw)
    mirror = config.mirror()
    errors: list[str] = []
    ids = resolve_books(cfg["books"]) + [_as_id(i) for i in cfg["extra_ids"]]
    try:
        fetch_gutenberg(
            dict.fromkeys(ids),
            store,
            mirror=mirror,
            base_url=cfg["base_url"],
            timeout=cfg["timeout"],
            retries=cfg["retries"],
            backoff=cfg["backoff"],
        )
    except IngestError as e:
        errors.append(str(e))
    if cfg["collection"]:
        if cfg["collection_dir"]:
            fetch_collection(config.resolve(cfg["collection_dir"]), store)
        elif mirror is not None and (mirror / "machado").is_dir():
            fetch_collection(mirror / "machado", store, source="mirror")
        else:
            where = f"no machado/ folder in the mirror {mirror}" if mirror is not None else config.mirror_state()
            warnings.warn(f"the Machado collection (116 works) was skipped: no collection_dir given and {where}; "
                          "the corpus has the Gutenberg books only", stacklevel=2)
    for name, limit in cfg["qa"].items():
        try:
            file = cfg["qa_files"].get(name)
            path = qa.get(name).sample_file if file == SAMPLE else config.resolve(file) if file else None
            fetch_qa(name, limit, store, file=path, mirror=mirror)
        except IngestError as e:
            errors.append(str(e))
    manifest = store.finish()
    for (kind, action), n in sorted(store.actions.items()):
        print(f"{kind}: {n} file(s) {'already valid' if action == 'kept' else 'from ' + action}")
    if errors:
        raise IngestError("\n\n".join(errors))
    return manifest


def summary_table(manifest: dict[str, Any]) -> pd.DataFrame:
    """One row per Gutenberg book, collection genre and QA dataset: files, megabytes, encodings."""
    import pandas as pd

    rows = []
    for rel, e in manifest["files"].items():
        group = {"gutenberg": e.get("title"), "collection": f"machado/{e.get('genre') or '.'}", "qa": rel}[e["kind"]]
        rows.append({"kind": e["kind"], "group": group, "files": 1, "MB": e["bytes"] / 1e6, "encoding": e["encoding"]})
    df = pd.DataFrame(rows, columns=["kind", "group", "files", "MB", "encoding"])
    return (
        df.groupby(["kind", "group"], sort=False)
        .agg(files=("files", "sum"), MB=("MB", "sum"), encoding=("encoding", lambda s: ", ".join(sorted(set(s)))))
        .round({"MB": 3})
        .reset_index()
    )

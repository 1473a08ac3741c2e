"""Small file helpers shared by every stage: atomic writes, hashing, JSON/JSONL."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

TEMP_SUFFIX = ".tmp"  # atomic_write_bytes: .<name>.<random>.tmp beside the target
DIR_TEMP = ".tmp-"  # replace_dir: .<name>.tmp-<pid> (new) and .<name>.old-<pid> (old) beside the target
DIR_OLD = ".old-"
MARKER = ".nblib-run"  # in each run folder this package creates: only folders it made are ever deleted


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename
    (with the permissions a plain ``open`` would give, not mkstemp's private 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted UTF-8 JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file in the error when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """Atomically write one JSON object per line."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return atomic_write_text(path, text)


def read_jsonl(path: str | os.PathLike, partial_tail: bool = False) -> list[Any]:
    """Read a JSONL file; a bad line is reported with its number. With ``partial_tail``, a last line cut
    short (no newline: what a kill or a full disk leaves while :func:`append_jsonl` writes) is dropped, said."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if partial_tail and i == len(lines) and not line.endswith("\n"):
                print(f"warning: {path}:{i}: dropped a last line cut short ({len(line)} characters of an unfinished write)")
                break
            raise ValueError(f"{path}:{i}: not valid JSON: {e.msg}") from e
    return rows


def append_jsonl(path: str | os.PathLike, row: Any) -> None:
    """Append one JSON line and flush it (metrics logs survive a crash up to the last line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()


def make_new_dir(path: str | os.PathLike) -> Path:
    """Create a folder that did not exist: ``path``, else ``path-2``, ``path-3``, ... (two runs
    started within one second must not share a time-stamped folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{path}: 999 folders of this name exist already")


def mark(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) with the :data:`MARKER` that says this package made it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).touch()
    return folder


def owned(folder: str | os.PathLike, evidence: Iterable[str] = ()) -> bool:
    """Whether ``folder`` may be emptied or replaced: absent, empty, or holding :data:`MARKER` or one of
    the names in ``evidence`` (files only this package writes there)."""
    folder = Path(folder)
    if not folder.is_dir():
        return not folder.exists()
    return not any(folder.iterdir()) or any((folder / name).exists() for name in (MARKER, *evidence))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())


def replace_dir(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a folder atomically: ``write(tmp)`` fills a new folder beside ``out_dir``, then the old
    folder is renamed aside, the new one renamed in, and the old one deleted (files fsynced first).

    A kill at any moment leaves either the old folder, or the new one, at ``out_dir`` — or the
    old one renamed aside, which :func:`remove_orphans` puts back. Never both lost.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}{DIR_TEMP}{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}{DIR_OLD}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    _fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def remove_orphans(folder: str | os.PathLike) -> list[str]:
    """Clean what killed writes left in ``folder`` (not recursive): temp files of
    :func:`atomic_write_bytes`, half-written folders of :func:`replace_dir`, and an old folder
    renamed aside whose replacement never arrived (renamed back). Call it only while no other
    process writes there (at the start of a run). Returns what was done, one line per item."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if not name.startswith("."):
            continue
        if path.is_file() and name.endswith(TEMP_SUFFIX):
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            done.append(f"removed {name} ({size:,} bytes, left by an interrupted write)")
        elif path.is_dir() and DIR_TEMP in name:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {name}/ (a folder whose writing was interrupted)")
        elif path.is_dir() and DIR_OLD in name:
            target = folder / name[1:].split(DIR_OLD)[0]
            if target.exists():
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {name}/ (the previous {target.name}/, already replaced)")
            else:
                os.replace(path, target)
                done.append(f"restored {target.name}/ from {name}/ (its replacement was interrupted)")
    return done

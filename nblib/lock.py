"""One pipeline or stage command per working root at a time.

Two pipelines on one ``NBLIB_HOME`` overwrite each other's checkpoints and append each other's
metrics. :func:`hold` takes an exclusive ``fcntl.flock`` on ``runs/.nblib.lock`` for the whole
command and writes the holder (pid, host, command, start time) into it, so a second command is
refused with a message naming the first. The kernel releases the lock when its holder dies,
however it dies, so a lock left by a killed run is taken over (with a note) without asking. A
release deletes the file (and ``runs/`` if the lock made it), so a refused command writes nothing.

The commands take it (``python -m nblib.pipeline``, ``nblib.train``, ``nblib.finetune``), not the
library functions notebooks call: a notebook the pipeline runs works inside the pipeline's lock,
and ``$NBLIB_LOCK`` (the root held, inherited by the kernels and what they launch) says so.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from nblib import config

ENV = "NBLIB_LOCK"
NAME = ".nblib.lock"


class HomeBusy(config.SettingsError):
    """Another command holds the working root; a user error (``config.cli``: exit 2)."""


def path(root: Path) -> Path:
    """The lock file of working root ``root``."""
    return config.paths(root).runs / NAME


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} since {h['started']} ({h['command']})"
    except (ValueError, TypeError, KeyError):
        return "a process that has not written its details yet"


@contextmanager
def hold(command: str, root: Path | None = None) -> Iterator[None]:
    """Hold working root ``root`` (default :func:`config.home`) while the block runs; raise
    :class:`HomeBusy` naming the holder when another process holds it. A no-op inside a process
    that already holds it (``$NBLIB_LOCK``) and in torchrun's ranks other than 0 (rank 0 holds it)."""
    root = (root or config.home()).resolve()
    if os.environ.get(ENV) == str(root) or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    file = path(root)
    created = not file.parent.exists()  # removed again (when empty) on release: a refusal writes nothing
    f = _acquire(file, root)
    try:
        f.seek(0)
        left = f.read()
        if left.strip():  # a released lock leaves no file: its holder died without releasing (the kernel did)
            print(f"note: took over the lock on {root} left by {_describe(left)}, which ended without "
                  "releasing it", file=sys.stderr, flush=True)
        f.truncate(0)
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}) + "\n")
        f.flush()
        os.environ[ENV] = str(root)
        yield
    finally:
        os.environ.pop(ENV, None)
        file.unlink(missing_ok=True)  # before the flock goes: a waiter that opened this file sees it gone and retries
        f.close()
        if created:
            try:
                file.parent.rmdir()
            except OSError:  # not empty: another command's lock or runs
                pass


def _acquire(file: Path, root: Path) -> TextIO:
    """The lock file, opened and flocked; :class:`HomeBusy` when another process holds it. A file the
    previous holder unlinked between our open and our flock is not the lock any more: open again."""
    while True:
        file.parent.mkdir(parents=True, exist_ok=True)
        try:
            f = open(file, "a+", encoding="utf-8")  # a+: never truncates a holder's details before the lock is ours
        except FileNotFoundError:  # its folder was removed by a holder that created it
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise HomeBusy(f"the working root {root} is in use by {holder}; one pipeline or stage "
                           f"command runs per working root at a time: wait for it to end (or stop it), or use "
                           f"another working root (--home or NBLIB_HOME). Lock file: {file}") from None
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(file).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()

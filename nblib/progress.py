"""Progress of long work: a tqdm bar where the work runs (notebook or terminal) and, when a
pipeline is watching, a one-line status it can show live.

The pipeline runs each stage as a notebook in a kernel whose output it only sees at the end, so
it names a file in ``$NBLIB_PROGRESS``; every :class:`Progress` then rewrites that file (one JSON
object, atomically, at most once a second) with what it is doing, how far it is, its rate, ETA
and latest metrics. :func:`read_status` is the pipeline's side.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nblib.files import read_json, write_json

ENV = "NBLIB_PROGRESS"
INTERVAL_S = 1.0


class Progress:
    """A bar over ``total`` units that also reports to ``$NBLIB_PROGRESS`` when it is set."""

    def __init__(self, desc: str, total: int | None, *, unit: str = "step", initial: int = 0, disable: bool = False):
        self.desc, self.total, self.unit = desc, total, unit
        self.n = self.start_n = initial
        self.started = time.perf_counter()
        self.metrics: dict[str, Any] = {}
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, mininterval=1.0)
        self.path = Path(os.environ[ENV]) if os.environ.get(ENV) and not disable else None
        self._written = 0.0
        self._report(force=True)

    def update(self, n: int = 1, **metrics: Any) -> None:
        """Advance by ``n`` units; ``metrics`` (loss, tokens/s, ...) show beside the bar."""
        self.n += n
        self.bar.update(n)
        if metrics:
            self.metrics.update(metrics)
            self.bar.set_postfix({k: _short(v) for k, v in self.metrics.items()}, refresh=False)
        self._report()

    def close(self) -> None:
        self._report(force=True)
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _report(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.path is None or (not force and now - self._written < INTERVAL_S):
            return
        self._written = now
        elapsed = now - self.started
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        eta = (self.total - self.n) / rate if rate and self.total is not None else None
        try:
            write_json(self.path, {"desc": self.desc, "n": self.n, "total": self.total, "unit": self.unit,
                                   "elapsed_s": round(elapsed, 1), "rate": rate, "eta_s": eta,
                                   "metrics": {k: _short(v) for k, v in self.metrics.items()}, "time": time.time()})
        except OSError:  # a progress line must never stop the work
            self.path = None


def _short(value: Any) -> Any:
    return float(f"{value:.4g}") if isinstance(value, float) else value


def read_status(path: str | os.PathLike) -> dict[str, Any] | None:
    """The latest status a stage wrote to ``path``, or ``None`` (not written yet, or mid-rename)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def line(status: dict[str, Any]) -> str:
    """A status as one terminal line: ``pretrain-mha seed 1337: 40/60 step, loss 6.71, ETA 12 s``."""
    total = f"/{status['total']}" if status.get("total") is not None else ""
    parts = [f"{status['desc']}: {status['n']}{total} {status['unit']}"]
    parts += [f"{k} {v}" for k, v in status.get("metrics", {}).items()]
    if status.get("eta_s") is not None:
        parts.append(f"ETA {status['eta_s']:.0f} s")
    return ", ".join(parts)

"""Local multi-turn files: a turn list under ``dialogue``, ``messages`` or ``conversations``.

Turns are ``{"role", "content"}`` or ShareGPT's ``{"from", "value"}``; roles ``human``/``gpt``/
``bot`` map to user/assistant and ``system`` turns are dropped. There is no hub copy: give the
file with the ingest stage's ``qa_files: {turns: path}``.
"""
from __future__ import annotations

from typing import Any

from nblib.qa import QASource, Turns

KEYS = ("dialogue", "messages", "conversations")
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant"}


def convert(rec: dict[str, Any]) -> Turns:
    """The record's turns with roles normalised; a turn of another shape is an error naming it."""
    key = next((k for k in KEYS if k in rec), None)
    if key is None:
        raise KeyError(f"a turns record needs one of {', '.join(KEYS)}; this one has {sorted(rec)}")
    turns = []
    for i, turn in enumerate(rec[key]):
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role == "system":
            continue
        if role not in ROLE_ALIASES or not isinstance(content, str):
            raise ValueError(f"{key}[{i}]: expected a role in {sorted(ROLE_ALIASES)} and string content, got {turn!r}")
        turns.append({"role": ROLE_ALIASES[role], "content": content})
    return turns


SOURCE = QASource("turns", None, (), convert)

"""Which outputs of the working root no longer match their inputs: a stage is stale when a stage it
reads from finished after it did (or is stale itself), as the pipeline recorded in ``runs/stages.json``.

After ``--only 03,04`` the fine-tunes were trained on the replaced MHA model, and the report and
the chat transcript show them: the pipeline's closing summary and ``pipeline.json`` say so, the
compare stage puts it at the top of the report, and ``python -m nblib.report --publish-example``
refuses such a report unless told.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from nblib import config
from nblib.files import read_json, write_json

LEDGER = "stages.json"
# what each stage reads, by its number: a stage named "05_finetune_full" reads what "02_" and "03_" stages wrote
READS = {"02": ("01",), "03": ("02",), "04": ("02", "03"), "05": ("02", "03"), "06": ("03", "04", "05"), "07": ("05",)}
REPORT_STAGE = "06_compare"


def ledger(root: Any = None) -> dict[str, dict[str, Any]]:
    """``{stage: {"finished": ISO time, "profile": ..., "order": n}}`` of the last successful run of each stage
    (``order`` counts the records: the larger finished later)."""
    path = config.paths(root).runs / LEDGER
    return read_json(path) if path.is_file() else {}


def record(stage: str, profile: str, root: Any = None, pipeline: str | None = None) -> None:
    """Note that ``stage`` just finished in ``profile``, run by the pipeline whose folder is ``pipeline``
    (the pipeline calls this after each stage)."""
    entries = ledger(root)
    order = max((e["order"] for e in entries.values()), default=0) + 1  # clocks tie within a second; this cannot
    entries[stage] = {"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "profile": profile,
                      "order": order, "pipeline": pipeline}
    write_json(config.paths(root).runs / LEDGER, entries)


def stale(root: Any = None) -> dict[str, str]:
    """``{stage: why}`` for each recorded stage whose inputs changed after it ran, in the order the stages
    last ran (the first is where a rerun with ``--from`` starts)."""
    entries = ledger(root)
    out: dict[str, str] = {}
    for name in sorted(entries):  # stage numbers order them: upstream stages are judged first
        mine = entries[name]
        for other in sorted(entries):
            if other[:2] not in READS.get(name[:2], ()):
                continue
            theirs = entries[other]
            if theirs["profile"] != mine["profile"]:
                out[name] = f"it ran in the {mine['profile']} profile, {other} in {theirs['profile']}"
            elif theirs["order"] > mine["order"]:
                out[name] = f"{other} ran again at {theirs['finished']}, after it ({mine['finished']})"
            elif other in out:
                out[name] = f"it read {other}, which is stale"
            if name in out:
                break
    return {name: out[name] for name in sorted(out, key=lambda n: entries[n]["order"])}


def report_problems(root: Any = None) -> list[str]:
    """Why the report in ``reports/`` does not show the current runs: stale, or stages it reads never recorded."""
    entries, gone = ledger(root), stale(root)
    if REPORT_STAGE not in entries:
        return [f"no pipeline run of {REPORT_STAGE} is recorded in runs/{LEDGER}"]
    problems = [f"{REPORT_STAGE}: {gone[REPORT_STAGE]}"] if REPORT_STAGE in gone else []
    missing = [n for n in READS["06"] if not any(k.startswith(n) for k in entries)]
    if missing:
        problems.append(f"partial: no recorded run of the stage(s) {', '.join(m + '_*' for m in missing)} it reads")
    return problems


def upstream_warnings(stage: str, root: Any = None) -> list[str]:
    """For a stage about to use its inputs (the compare stage): which of them are stale, and why."""
    gone = stale(root)
    return [f"{name}: {why}" for name, why in gone.items() if name[:2] in READS.get(stage[:2], ())]

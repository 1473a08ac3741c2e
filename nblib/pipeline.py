"""Run the notebooks in order, headlessly, with papermill.

    python -m nblib.pipeline --profile smoke [--only STAGE[,STAGE]] [--from STAGE] [-p key=value]

Executed copies are kept in ``runs/pipeline-<timestamp>/`` with a ``pipeline.json`` status
file. The run stops at the first failing stage, says which cell failed and why, and exits 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from nblib import config
from nblib.files import write_json

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@dataclass(frozen=True)
class Stage:
    """One pipeline step: a notebook plus fixed parameters (the same notebook may run twice)."""

    name: str
    notebook: str
    params: dict[str, Any] = field(default_factory=dict)


FINETUNE_VARIANTS = ("lora-8bit", "lora-32bit", "full")  # the fine-tune variants the pipeline runs and compares
STAGES = (
    Stage("01_ingest", "01_ingest.ipynb"),
    Stage("02_clean", "02_clean.ipynb"),
    Stage("03_train_mha", "03_train_mha.ipynb"),
    Stage("04_train_gqa", "04_train_gqa.ipynb"),
    *(Stage(f"05_finetune_{v.replace('-', '_')}", "05_finetune_lora_8bit.ipynb", {"variant": v}) for v in FINETUNE_VARIANTS),
    Stage("06_compare", "06_compare.ipynb"),
    Stage("07_chat_demo", "07_chat_demo.ipynb"),
)


class StageFailed(RuntimeError):
    """A notebook raised; the message names the stage, the cell and the error."""


def select(only: str | None = None, start: str | None = None) -> list[Stage]:
    """Stages to run. ``only`` is a comma list; each item matches a stage name or its prefix
    (``05`` selects every fine-tune variant). ``start`` runs from the first match onwards."""
    stages = list(STAGES)

    def matches(key: str) -> list[Stage]:
        exact = [s for s in stages if s.name == key]
        found = exact or [s for s in stages if s.name.startswith(key) or s.name.split("_", 1)[1] == key]
        if not found:
            raise ValueError(f"no stage matches {key!r}; stages: {', '.join(s.name for s in stages)}")
        return found

    if start:
        stages = stages[stages.index(matches(start)[0]) :]
    if only:
        wanted = {s.name for key in only.split(",") if key.strip() for s in matches(key.strip())}
        stages = [s for s in stages if s.name in wanted]
    return stages


def parse_params(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings to a dict; values are read as YAML (``3``, ``0.1``, ``true``, ``[a, b]``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"parameter {item!r} is not key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def stage_params(stage: Stage, profile: str, user: dict[str, Any], declared: set[str]) -> dict[str, Any]:
    """Parameters for one stage: its fixed ones, the profile, and the user's ``key=value`` pairs
    the notebook declares (``STAGE.key=value`` targets one stage)."""
    params = {"profile": profile, **stage.params}
    for key, value in user.items():
        target, dot, name = key.rpartition(".")
        if dot and not (stage.name == target or stage.name.startswith(target)):
            continue
        if name in declared:
            params[name] = value
    return params


def declared_parameters(notebook: Path) -> set[str]:
    """Names in the notebook's ``parameters`` cell."""
    import papermill

    return set(papermill.inspect_notebook(str(notebook)))


def check_user_params(stages: list[Stage], user: dict[str, Any], declared: dict[str, set[str]]) -> None:
    """Refuse a ``-p`` that no selected stage declares (a typo must not pass silently)."""
    for key in user:
        target, dot, name = key.rpartition(".")
        scope = [s for s in stages if not dot or s.name == target or s.name.startswith(target)]
        if not any(name in declared[s.notebook] for s in scope):
            raise ValueError(f"parameter {key!r} is not declared by any selected stage ({', '.join(s.name for s in scope) or 'none'})")


def _cell_label(notebook: Path, source: str) -> str:
    """``cell N of NAME`` counted in the source notebook (papermill's injected cell shifts indices)."""
    import nbformat

    cells = nbformat.read(notebook, as_version=4).cells
    for i, cell in enumerate(cells, 1):
        if cell.cell_type == "code" and cell.source == source:
            return f"cell {i} of {notebook.name}"
    return f"a cell of {notebook.name}"


def run_stage(stage: Stage, out_dir: Path, params: dict[str, Any], progress: bool) -> Path:
    """Execute one notebook into ``out_dir``; raise :class:`StageFailed` naming the failing cell."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output = out_dir / f"{stage.name}.ipynb"
    try:
        papermill.execute_notebook(
            str(NOTEBOOKS / stage.notebook),
            str(output),
            parameters=params,
            kernel_name="python3",
            progress_bar=progress,
            cwd=str(NOTEBOOKS),
            # The kernel's own start-up notices (e.g. ipykernel 7's TCP warning on loopback) are
            # noise here; errors still show, and a cell's warnings land in its outputs as usual.
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    except PapermillExecutionError as e:
        source = "\n".join("    " + line for line in e.source.splitlines()[:8])
        raise StageFailed(
            f"stage {stage.name} failed in {_cell_label(NOTEBOOKS / stage.notebook, e.source)}:\n"
            f"{source}\n  {e.ename}: {e.evalue}\n  executed copy: {output}"
        ) from None
    return output


def run(
    profile: str = "smoke",
    only: str | None = None,
    start: str | None = None,
    params: dict[str, Any] | None = None,
    out_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the selected stages in order; returns the status dict also saved as ``pipeline.json``."""
    profile = config.resolve_profile(profile)
    stages = select(only, start)
    user = params or {}
    declared = {s.notebook: declared_parameters(NOTEBOOKS / s.notebook) for s in stages}
    check_user_params(stages, user, declared)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out_dir = out_dir or config.paths().runs / f"pipeline-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    status: dict[str, Any] = {"profile": profile, "home": str(config.home()), "started": stamp, "stages": []}
    for i, stage in enumerate(stages, 1):
        print(f"[{i}/{len(stages)}] {stage.name} ...", flush=True)
        t0 = time.perf_counter()
        entry = {"name": stage.name, "notebook": stage.notebook, "params": stage_params(stage, profile, user, declared[stage.notebook])}
        status["stages"].append(entry)
        try:
            run_stage(stage, out_dir, entry["params"], progress)
        except StageFailed as e:
            entry.update(status="failed", seconds=round(time.perf_counter() - t0, 1), error=str(e))
            write_json(out_dir / "pipeline.json", status)
            raise
        entry.update(status="ok", seconds=round(time.perf_counter() - t0, 1))
        write_json(out_dir / "pipeline.json", status)
        print(f"[{i}/{len(stages)}] {stage.name} ok in {entry['seconds']:.1f} s", flush=True)
    status["total_seconds"] = round(sum(s["seconds"] for s in status["stages"]), 1)
    write_json(out_dir / "pipeline.json", status)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nblib.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smoke", help="smoke (CPU minutes), full (GPU) or auto")
    parser.add_argument("--only", help="comma list of stages (name or prefix, e.g. 03,04)")
    parser.add_argument("--from", dest="start", help="start at this stage")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="notebook parameter; STAGE.KEY=VALUE for one stage")
    parser.add_argument("--home", help="working root (sets NBLIB_HOME)")
    parser.add_argument("--out", type=Path, help="folder for executed notebooks (default runs/pipeline-<time>)")
    parser.add_argument("--list", action="store_true", help="list the stages and exit")
    parser.add_argument("--no-progress", action="store_true", help="no per-cell progress bars")
    args = parser.parse_args(argv)
    if args.list:
        for s in STAGES:
            print(s.name, s.notebook, s.params or "")
        return 0
    if args.home:
        os.environ["NBLIB_HOME"] = str(Path(args.home).resolve())
    try:
        status = run(args.profile, args.only, args.start, parse_params(args.param), args.out, not args.no_progress)
    except (StageFailed, ValueError, FileNotFoundError) as e:
        print(f"pipeline stopped: {e}", file=sys.stderr)
        return 1
    print(f"pipeline finished: {len(status['stages'])} stage(s) in {status['total_seconds']:.1f} s ({status['profile']} profile)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

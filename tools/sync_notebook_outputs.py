"""Copy the outputs of an executed pipeline run into the committed notebooks.

    python tools/sync_notebook_outputs.py runs/pipeline-<time>

Committed notebooks are read on GitHub before they are run, so they keep the outputs of every
code cell of a smoke run — tables, printed text and plots — sanitised: progress bars and other
stderr streams, widget state, papermill's cell timings and every timestamp are dropped, and an
output that holds a machine path (``/home/...``, ``/tmp/...``, ``C:\\...``) is refused. nbval
compares only the cells marked ``# NBVAL_CHECK_OUTPUT``. A note under each notebook's title says
which profile produced the outputs shown.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nblib.pipeline import NOTEBOOKS, STAGES  # noqa: E402

MACHINE_PATH = re.compile(r"(?<![\w.])(/(?:Users|home|root|tmp|mnt|content|kaggle|work|opt|var|private|srv|data)/|[A-Za-z]:\\)")
NOTE_MARK = "<!-- outputs-note -->"
NOTE = (f"{NOTE_MARK}\n*The outputs shown come from the `smoke` profile on a CPU (`make pipeline`): tiny models "
        "trained for minutes, so read them for the mechanics, not the quality. Run the notebook with "
        "`profile=\"full\"` on a GPU for real figures.*")
DROPPED_MIME = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")


def machine_paths(outputs: list) -> list[str]:
    """Machine paths in the text of ``outputs`` (image data is not searched: base64 holds slashes)."""
    texts = []
    for out in outputs:
        texts.append(out.get("text", ""))
        for mime, value in out.get("data", {}).items():
            if not mime.startswith("image/"):
                texts.append(value if isinstance(value, str) else json.dumps(value))
        texts += out.get("traceback", [])
    return [m.group(0) for t in texts for m in MACHINE_PATH.finditer("".join(t) if isinstance(t, list) else t)]


def sanitise(outputs: list) -> list:
    """Outputs without stderr streams (progress bars, warnings) or widgets (a tqdm bar in a notebook
    is a widget whose text form holds its timings)."""
    return [out for out in outputs
            if not (out.get("output_type") == "stream" and out.get("name") == "stderr")
            and not any(mime in out.get("data", {}) for mime in DROPPED_MIME)]


def sync_notebook(src_path: Path, executed: Path) -> int:
    """Replace ``src_path``'s outputs by ``executed``'s; returns the number of cells with outputs."""
    src = nbformat.read(src_path, as_version=4)
    ran = {c.source: c for c in nbformat.read(executed, as_version=4).cells
           if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])}
    if not any(NOTE_MARK in c.source for c in src.cells if c.cell_type == "markdown"):
        src.cells.insert(1, nbformat.v4.new_markdown_cell(NOTE))
    src.metadata.pop("papermill", None)
    count = 0
    for cell in src.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
        if cell.cell_type != "code":
            continue
        cell.execution_count, cell.outputs = None, []
        if "parameters" in cell.metadata.get("tags", []) or cell.source not in ran:
            continue
        outputs = sanitise(ran[cell.source].outputs)
        found = machine_paths(outputs)
        if found:
            raise SystemExit(f"{src_path.name}: an output holds a machine path ({found[0]!r}) in the cell:\n{cell.source}")
        if outputs:
            count += 1
            cell.outputs, cell.execution_count = outputs, count
            for out in outputs:
                if "execution_count" in out:
                    out.execution_count = count
    nbformat.write(src, src_path)
    return count


def sync(run_dir: Path) -> None:
    done = set()
    for stage in STAGES:
        if stage.notebook in done:
            continue
        executed = run_dir / f"{stage.name}.ipynb"
        if not executed.is_file():
            print(f"skip {stage.notebook}: no {executed.name} in {run_dir}")
            continue
        done.add(stage.notebook)
        print(f"{stage.notebook}: outputs of {sync_notebook(NOTEBOOKS / stage.notebook, executed)} cell(s) kept")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    sync(Path(sys.argv[1]))

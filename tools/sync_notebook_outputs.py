"""Copy the checked outputs of an executed pipeline run into the committed notebooks.

    python tools/sync_notebook_outputs.py runs/pipeline-<time>

Committed notebooks keep outputs only on cells that start with ``# NBVAL_CHECK_OUTPUT`` (what
nbval compares, which needs an execution count on them); every other output, execution count and
timing is stripped. A kept output that holds a machine path is refused.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nblib.pipeline import NOTEBOOKS, STAGES  # noqa: E402

CHECK = "# NBVAL_CHECK_OUTPUT"
MACHINE_PATH = re.compile(r"(/tmp/|/work/|/home/|/root/|/kaggle/|[A-Z]:\\\\)")


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
        src_path = NOTEBOOKS / stage.notebook
        src = nbformat.read(src_path, as_version=4)
        ran = {c.source: c for c in nbformat.read(executed, as_version=4).cells if c.cell_type == "code"}
        kept = 0
        for index, cell in enumerate(src.cells, start=1):
            cell.metadata.pop("execution", None)
            if cell.cell_type != "code":
                continue
            cell.execution_count = None
            cell.outputs = []
            if cell.source.startswith(CHECK):
                outputs = ran[cell.source].outputs
                text = nbformat.writes(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=outputs)]))
                if MACHINE_PATH.search(text):
                    raise SystemExit(f"{stage.notebook}: a checked cell's output holds a machine path:\n{cell.source}")
                cell.outputs = outputs
                cell.execution_count = index
                for output in outputs:
                    if "execution_count" in output:
                        output.execution_count = index
                kept += 1
        nbformat.write(src, src_path)
        print(f"{stage.notebook}: kept outputs of {kept} checked cell(s)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    sync(Path(sys.argv[1]))

"""The README's Kaggle set-up on a stand-in of Kaggle's image (tools/kaggle_stack.py): it adds only
what the image lacks, changes no package the image has, and the smoke stages run there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import kaggle_stack  # noqa: E402

RUN_STACK = os.environ.get("CI") == "true" or os.environ.get("NBLIB_TEST_KAGGLE_STACK") == "1"


def requirements(path: Path) -> dict[str, Requirement]:
    """The requirement lines of ``path`` by normalised name (comments and blank lines skipped)."""
    reqs = [Requirement(line.split("#", 1)[0]) for line in path.read_text().splitlines() if line.split("#", 1)[0].strip()]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def pinned(req: Requirement) -> str:
    """The version of an exact ``name==version`` line."""
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not an exact pin"
    return spec.version


def test_runtime_bounds_hold_for_the_ci_pins_and_kaggles_image() -> None:
    bounds = requirements(ROOT / "requirements.txt")
    ci = requirements(ROOT / "requirements-ci.txt")
    image = {n: r for n, r in requirements(kaggle_stack.IMAGE).items() if r.specifier}
    for name, bound in bounds.items():
        assert name in ci, f"requirements-ci.txt has no pin for {name} (requirements.txt needs {bound})"
        assert bound.specifier.contains(pinned(ci[name])), f"requirements-ci.txt pins {ci[name]}, outside {bound}"
        if name in image:  # what Kaggle has must already do, or pip would upgrade it in the live kernel
            assert bound.specifier.contains(pinned(image[name])), f"Kaggle's image has {image[name]}, outside {bound}"
    assert {"transformers", "pandas", "ipykernel", "numpy"} <= bounds.keys() & image.keys()


def test_the_stand_in_runs_the_readmes_install_line() -> None:
    line = kaggle_stack.readme_install_command()
    assert line.startswith("pip install -q -r requirements.txt"), line


@pytest.mark.skipif(not RUN_STACK, reason="builds a stand-in of Kaggle's image and trains in it (minutes): "
                    "runs in CI (CI=true) or with NBLIB_TEST_KAGGLE_STACK=1")
def test_readme_setup_on_kaggles_image(mirror: Path) -> None:
    venv = ROOT / ".venv-kaggle"  # kept: a rerun with unchanged inputs reuses it
    started = time.time()
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "kaggle_stack.py"), "--venv", str(venv)],
                       cwd=ROOT, text=True, capture_output=True, timeout=3600)
    print(p.stdout[-4000:])
    assert p.returncode == 0, f"tools/kaggle_stack.py failed:\n{(p.stdout + p.stderr)[-4000:]}"
    report = venv / "kaggle-stack.json"
    assert report.stat().st_mtime >= started, f"{report} was not written by this run"
    result = json.loads(report.read_text())
    assert result["changed"] == {}, f"the README's install line changed Kaggle's packages: {result['changed']}"
    assert {"bitsandbytes", "papermill", "nblib"} <= result["added"].keys(), result["added"]
    stages = result["pipeline"]["stages"]
    assert [s["name"] for s in stages] == kaggle_stack.STAGES.split(",")
    assert all(s["status"] == "ok" for s in stages), stages

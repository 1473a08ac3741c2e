"""A stand-in for Kaggle's GPU image: install the README's Kaggle set-up into it, check that
it changed no installed package, then run ingest, clean, MHA pretraining and the LoRA + 8-bit
fine-tune in the smoke profile.

    python3.11 tools/kaggle_stack.py [--venv .venv-kaggle] [--install-only]   # needs NBLIB_MIRROR

The image is tools/kaggle_image.txt (Kaggle's versions) on Python 3.11 with torch 2.13.0+cpu
standing in for Kaggle's Python 3.12 and torch 2.10.0+cu128: for cp312 PyPI has only the CUDA
torch (0.5 GB plus about 2.5 GB of nvidia libraries), the CPU index (download.pytorch.org) is
not reachable from CI, and a CPU torch 2.13.0 cp311 wheel is what CI has on disk. The venv is
rebuilt only when its inputs (Python, torch, the image list, requirements.txt, the README's
install line) change; the image's `pip list` is kept in it, so a rerun checks against the image, not
against the previous run. Results go to <venv>/kaggle-stack.json (tests/test_kaggle_stack.py);
what the install added, pinned, to <venv>/kaggle-added.txt: the offline wheelhouse's list (README).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "tools" / "kaggle_image.txt"
README = ROOT / "README.md"
TORCH = "torch==2.13.0"
STAGES = "01_ingest,02_clean,03_train_mha,05_finetune_lora_8bit"
# Compatibility, not quality, is checked here: pretraining stops at its first evaluation (step 20 of
# the smoke profile's 60), a third of its training steps for the CI job.
SHORTER = ["-p", "03_train_mha.max_steps=20"]
PYTHON = "python3.11"


class StackError(Exception):
    """The stand-in could not be built or the check failed; the message says what and how to fix it."""


def readme_install_command(readme: Path = README) -> str:
    """The shell command of the README's Kaggle set-up cell that installs packages (the `!pip install` line)."""
    section = readme.read_text(encoding="utf-8").split("## Run on Kaggle", 1)[-1].split("\n## ", 1)[0]
    lines = [line.strip() for line in section.splitlines() if line.strip().startswith("!pip install")]
    if len(lines) != 1:
        raise StackError(f"{readme}: expected one '!pip install' line in 'Run on Kaggle', found {len(lines)}")
    return lines[0][1:].split("#", 1)[0].strip()


def run(cmd: list[str] | str, what: str, **kw) -> str:
    """Run a command; its output on success, a StackError naming ``what`` with the output's tail on failure."""
    p = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, shell=isinstance(cmd, str), **kw)
    if p.returncode != 0:
        raise StackError(f"{what} failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return p.stdout


def packages(venv: Path) -> dict[str, str]:
    """Installed distributions of ``venv``, name (lower case, '-' for '_') -> version."""
    out = run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], "pip list")
    return {re.sub(r"[-_.]+", "-", p["name"]).lower(): p["version"] for p in json.loads(out)}


def inputs_hash(install: str) -> str:
    """What the built venv depends on; a change rebuilds it."""
    h = hashlib.sha256()
    for part in (PYTHON.encode(), TORCH.encode(), IMAGE.read_bytes(), (ROOT / "requirements.txt").read_bytes(), install.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def build(venv: Path) -> None:
    """A fresh venv holding the image: torch first, then Kaggle's versions with torch held."""
    if shutil.which(PYTHON) is None:
        raise StackError(f"{PYTHON} not found: the stand-in needs Python 3.11 (its torch 2.13.0+cpu wheel is cp311)")
    shutil.rmtree(venv, ignore_errors=True)
    run([PYTHON, "-m", "venv", str(venv)], "creating the venv")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    run(pip + ["--upgrade", "pip"], "upgrading pip")
    # As tools/setup_env.sh: a torch wheel already on disk (pip's find-links) wins, else the CPU index.
    local = subprocess.run(pip + ["--no-index", "--no-deps", TORCH], cwd=ROOT, capture_output=True).returncode == 0
    run(pip + [TORCH] + ([] if local else ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]), "installing torch")
    run(pip + [TORCH, "-r", str(IMAGE)], f"installing {IMAGE.name}")


def check_install(venv: Path, install: str) -> dict:
    """Run the README's install line in the image; which packages it added, and which it changed."""
    image = json.loads((venv / "image-packages.json").read_text())
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    t0 = time.perf_counter()
    run(["bash", "-c", install], f"the README's install line `{install}`", env=env)
    seconds = time.perf_counter() - t0
    after = packages(venv)
    changed = {n: f"{v} -> {after.get(n, 'removed')}" for n, v in image.items() if after.get(n) != v}
    added = {n: v for n, v in after.items() if n not in image}
    return {"install": install, "install_s": round(seconds, 1), "added": added, "changed": changed}


def run_stages(venv: Path, home: Path) -> dict:
    """The smoke stages in ``home`` with the stand-in's Python; the pipeline's status (pipeline.json)."""
    env = {**os.environ, "NBLIB_HOME": str(home), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.setdefault("WANDB_MODE", "offline")
    p = subprocess.run([str(venv / "bin" / "python"), "-m", "nblib.pipeline", "--profile", "smoke", "--only", STAGES, *SHORTER],
                       cwd=ROOT, env=env, text=True)
    found = sorted(home.glob("runs/pipeline-*/pipeline.json"))
    if not found:
        raise StackError(f"the pipeline (exit {p.returncode}) wrote no pipeline.json under {home}/runs")
    return json.loads(found[-1].read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv-kaggle", help="the stand-in's venv (default .venv-kaggle)")
    ap.add_argument("--install-only", action="store_true", help="check the install and list what it added; run no stage")
    args = ap.parse_args(argv)
    venv = args.venv.resolve()
    t_start = time.perf_counter()
    try:
        if not args.install_only and not os.environ.get("NBLIB_MIRROR"):
            raise StackError("NBLIB_MIRROR is not set: point it at the offline data folder (e.g. ../shared/data)")
        install = readme_install_command()
        key = inputs_hash(install)
        stamp = venv / "kaggle-stack-inputs.sha256"
        result: dict = {"venv": str(venv), "stages": STAGES}
        if stamp.is_file() and stamp.read_text().strip() == key:
            print(f"stand-in: reusing {venv} (inputs unchanged)", flush=True)
            result["build_s"] = 0.0
        else:
            print(f"stand-in: building {venv} from {IMAGE.relative_to(ROOT)} (a few minutes) ...", flush=True)
            t0 = time.perf_counter()
            build(venv)
            (venv / "image-packages.json").write_text(json.dumps(packages(venv), indent=1, sort_keys=True))
            stamp.write_text(key)
            result["build_s"] = round(time.perf_counter() - t0, 1)
        result |= check_install(venv, install)
        print(f"stand-in: `{install}` took {result['install_s']} s; added "
              + (", ".join(f"{n} {v}" for n, v in sorted(result["added"].items())) or "nothing"), flush=True)
        (venv / "kaggle-added.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(result["added"].items()) if n != "nblib"))
        if result["changed"]:
            (venv / "kaggle-stack.json").write_text(json.dumps(result, indent=1))
            stamp.unlink()  # the image is gone: rebuild next time
            raise StackError("the README's install line changed packages of Kaggle's image: "
                             + ", ".join(f"{n} {c}" for n, c in sorted(result["changed"].items()))
                             + "\n  lower the bound in requirements.txt to what tools/kaggle_image.txt has")
        if args.install_only:
            (venv / "kaggle-stack.json").write_text(json.dumps(result, indent=1))
            return 0
        with tempfile.TemporaryDirectory(prefix="kaggle-stack-") as home:
            status = run_stages(venv, Path(home))
        result["pipeline"] = status
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        (venv / "kaggle-stack.json").write_text(json.dumps(result, indent=1))
        print(f"stand-in: build {result['build_s']} s, install {result['install_s']} s, stages "
              + ", ".join(f"{s['name']} {s.get('status')} {s.get('seconds')} s" for s in status["stages"])
              + f"; wall {result['wall_s']} s", flush=True)
        failed = [s for s in status["stages"] if s.get("status") != "ok"]
        if failed or len(status["stages"]) != len(STAGES.split(",")):
            raise StackError("stages did not pass on the stand-in: "
                             + "; ".join(f"{s['name']}: {s.get('error', s.get('status'))}" for s in failed))
    except StackError as e:
        print(f"kaggle_stack: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

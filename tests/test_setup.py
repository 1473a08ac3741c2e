"""Set-up prints nothing a user cannot act on: ``tools/quiet.sh`` holds a command's output back
unless it fails, and the project's own editable install through it is silent."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUIET = REPO / "tools" / "quiet.sh"


def test_quiet_shows_output_only_when_the_command_fails():
    ok = subprocess.run(["bash", str(QUIET), sys.executable, "-c", "print('noise'); import sys; sys.stderr.write('warn')"],
                        capture_output=True, text=True)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    bad = subprocess.run(["bash", str(QUIET), sys.executable, "-c", "print('why it broke'); raise SystemExit(3)"],
                         capture_output=True, text=True)
    assert bad.returncode == 3 and "why it broke" in bad.stderr and "failed (exit 3):" in bad.stderr


def test_the_editable_install_of_nblib_is_silent():
    """setuptools' boxed "Editable installation" BuildBackendWarning and pip's notices stay out of set-up."""
    done = subprocess.run(["bash", str(QUIET), sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), done.stderr[-2000:]
    assert re.search(r"^quiet .* install -q --no-deps -e \.$", (REPO / "tools" / "setup_env.sh").read_text(), re.M)

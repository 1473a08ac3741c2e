"""Test-session set-up shared by unit tests and nbval notebook runs.

Tests never touch the user's working root: the whole session (and the notebook kernels nbval
starts, which inherit the environment) works in a fresh temporary NBLIB_HOME. The offline data
folder must be given through NBLIB_MIRROR (the Makefile defaults it to ../shared/data).
"""
import os
import tempfile

os.environ["NBLIB_HOME"] = tempfile.mkdtemp(prefix="nblib-test-home-")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_report_header(config):
    return f"NBLIB_HOME={os.environ['NBLIB_HOME']} NBLIB_MIRROR={os.environ.get('NBLIB_MIRROR', '(unset)')}"

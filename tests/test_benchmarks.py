"""The benchmark script runs and prints its side-by-side figures (the figures themselves are
reported, not asserted: speed targets are not unit tests)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pretrain.py"


def test_bench_pretrain_quick_prints_ratios(mirror):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--reps", "1", "--gen-reps", "1", "--new-tokens", "16", "--only", "1,2,3,4"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NBLIB_MIRROR": str(mirror)}, check=True,
    ).stdout
    for section in ("## 1. Training throughput", "## 2. Greedy generation", "## 3. KV cache", "## 4. Tokenising"):
        assert section in out
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]] for line in out.splitlines() if "(4q/" in line}
    assert set(rows) == {"MHA (4q/4kv)", "GQA (4q/2kv)", "MQA (4q/1kv)"}
    assert out.count("| True") == 2, "cached and recomputed greedy generation must give the same tokens"
    assert rows["GQA (4q/2kv)"][-1] == "0.500" and rows["MQA (4q/1kv)"][-1] == "0.250"

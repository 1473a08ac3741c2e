"""The benchmark script runs and prints its side-by-side figures (the figures themselves are
reported, not asserted: speed targets are not unit tests)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pretrain.py"
INFERENCE = SCRIPT.with_name("bench_inference.py")


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


def test_bench_inference_quick_prints_tables_and_a_json_line(mirror):
    out = subprocess.run(
        [sys.executable, str(INFERENCE), "--quick"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NBLIB_MIRROR": str(mirror)}, check=True,
    ).stdout
    for section in ("## 1. Decode sweep", "## 2. Greedy generation, nblib", "## 3. Greedy generation of", "## Ratios"):
        assert section in out
    assert "random weights" in out and "load average" in out
    result = json.loads(out.strip().splitlines()[-1])
    ratios = result["ratios"]
    assert all(isinstance(ratios[k], float) for k in ("gqa_vs_mha_decode", "mqa_vs_gqa_decode"))
    assert set(ratios["cache_vs_recompute"]) == {"MHA", "GQA"} and set(ratios["nblib_vs_hf"]) == {"1", "8"}
    assert result["same_tokens"] == {"cache_vs_recompute": {"MHA": True, "GQA": True}, "nblib_vs_hf": {"1": True, "8": True}}
    rows = result["rows"]
    assert len(rows) == 3 * 2 * 2 and {r["variant"] for r in rows} == {"MHA", "GQA", "MQA"}
    assert {"prefill_s", "decode_tokens_per_s", "ms_per_token", "kv_cache_bytes", "bytes_per_step", "mbu"} <= set(rows[0])

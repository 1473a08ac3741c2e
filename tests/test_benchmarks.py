"""The benchmark script runs and prints its side-by-side figures (the figures themselves are
reported, not asserted: speed targets are not unit tests)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_bench_pretrain_against_nanogpt(mirror, tmp_path):
    """Section 7 says why it skips without nanoGPT's model.py; with one (``$NBLIB_NANOGPT``: never vendored
    here) it times both models on the same weights and ends with a JSON line of ratios."""
    env = {**os.environ, "NBLIB_MIRROR": str(mirror)}
    missing = tmp_path / "model.py"
    out = subprocess.run([sys.executable, str(SCRIPT), "--only", "7", "--nanogpt", str(missing)],
                         capture_output=True, text=True, timeout=600, env=env, check=True).stdout
    assert f"## 7. nblib vs nanoGPT: skipped (--nanogpt {missing}: no such file" in out
    nanogpt = os.environ.get("NBLIB_NANOGPT")
    if not nanogpt:
        pytest.skip("set NBLIB_NANOGPT to nanoGPT's model.py (git clone https://github.com/karpathy/nanoGPT) to time it")
    out = subprocess.run([sys.executable, str(SCRIPT), "--only", "7", "--reps", "2"],
                         capture_output=True, text=True, timeout=600, env=env, check=True).stdout
    assert "## 7. Training step (fwd + bwd + clip + AdamW) vs nanoGPT's model.py" in out and "load average" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["ms_per_step"]) == {"nanoGPT", "nblib plain loss", "nblib (chunks of 128)"}
    assert result["max_logit_diff"] < 1e-3 and all(r > 0 for r in result["speedup_vs_nanogpt"].values())


def test_bench_inference_quick_prints_tables_and_a_json_line(mirror):
    out = subprocess.run(
        [sys.executable, str(INFERENCE), "--quick"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NBLIB_MIRROR": str(mirror)}, check=True,
    ).stdout
    for section in ("## 1. Decode sweep", "## 2. Greedy generation, nblib", "## 3. Greedy generation of",
                    "## 4. Eager vs compiled decode", "## Ratios"):
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
    compiled = {r["variant"]: r for r in result["compiled_rows"]}
    assert set(compiled) == {"MHA", "GQA", "MQA"} and all(r["eager_mbu"] > 0 and r["compiled_mbu"] > 0 for r in compiled.values())
    assert compiled["MHA"]["predicted_vs_mha"] == 1 < compiled["GQA"]["predicted_vs_mha"] < compiled["MQA"]["predicted_vs_mha"]
    assert ratios["gqa_vs_mha_predicted"] < ratios["mqa_vs_mha_predicted"]


GPU_EVIDENCE = SCRIPT.with_name("gpu_evidence.py")


def gpu_evidence():
    """The evidence script as a module (its heavy imports happen inside its functions)."""
    spec = importlib.util.spec_from_file_location("gpu_evidence", GPU_EVIDENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_finetune_times_both_losses_with_equal_gradients(home, mirror):
    """The labelled-rows loss against the model's own on a tiny GPT-2: same gradients, both timed, a JSON line."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from nblib import dialogue
    from nblib.files import write_jsonl
    from nblib.tokenizer import hf_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128)).save_pretrained(home / "models/tiny")
    hf_tokenizer().save_pretrained(home / "models/tiny")
    alpaca = json.loads((mirror / "qa" / "alpaca_5000.json").read_text(encoding="utf-8"))
    write_jsonl(home / "data/raw/qa/alpaca.jsonl", alpaca[:200])
    dialogue.prepare(home / "data/raw/qa", home / "data/processed/dialogues",
                     {"targets": {"alpaca": 60}, "val_fraction": 0.1, "test_fraction": 0.1, "max_chars": 200, "seed": 1})
    out = subprocess.run([sys.executable, str(SCRIPT.with_name("bench_finetune.py")), "--variants", "lora-32bit,full",
                          "--reps", "2", "--base-model", "models/tiny"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "NBLIB_HOME": str(home)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["variants"]) == {"lora-32bit", "full"}
    for v in result["variants"].values():
        assert v["max_grad_rel_diff"] < 1e-4 and 0 < v["labelled"] < v["positions"]
        assert v["ms_every_position"] > 0 and v["ms_labelled_rows"] > 0
    assert "speed-up" in out.stdout


def test_gpu_evidence_dry_run(mirror, tmp_path):
    out, home = tmp_path / "out", tmp_path / "home"
    home.mkdir()
    proc = subprocess.run(
        [sys.executable, str(GPU_EVIDENCE), "--dry-run", "--out", str(out)], capture_output=True, text=True, timeout=900,
        env={**os.environ, "NBLIB_MIRROR": str(mirror), "NBLIB_HOME": str(home)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert len(files) <= 8 and {"evidence.json", "evidence.md", "kernels.txt", "log.txt", "compare.html"} <= files
    assert not any(home.iterdir()), "the evidence run works in its own temporary root, never in NBLIB_HOME"
    ev = json.loads((out / "evidence.json").read_text())
    for label in ("MHA", "GQA", "MQA"):  # fp32 without dropout: torch's fused CPU kernel, in training and decode
        for phase in ("train", "decode"):
            assert ev["kernels"][label][phase]["kernel"] == "flash (CPU)", ev["kernels"][label][phase]
            assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ev["kernels"][label][phase]["ops"]
    assert ev["math_check"]["passed"] is True and ev["math_check"]["failures"] == []
    assert {r["compile"] for r in ev["training_step"]} == {False, True}
    assert {r["variant"] for r in ev["decode"]} == {"MHA", "GQA", "MQA"} and all(r["mbu"] > 0 for r in ev["decode"])
    assert [(r["variant"], r["identical_tokens"]) for r in ev["compiled_decode"]] == [("MHA", True)]
    assert "skipped" in ev["finetune_lora_8bit"] or ev["finetune_lora_8bit"]["steps"] == 2
    assert "MHA vs GQA" in (out / "compare.html").read_text()
    assert json.loads(proc.stdout.strip().splitlines()[-1])["math_check_passed"] is True


def test_gpu_evidence_math_check_fails_when_only_gqa_runs_math():
    ev = gpu_evidence()
    fused = {"aten::scaled_dot_product_attention", "aten::_scaled_dot_product_efficient_attention"}
    math = {"aten::scaled_dot_product_attention", "aten::_scaled_dot_product_attention_math", "aten::bmm", "aten::_softmax"}
    assert ev.classify(fused) == "efficient" and ev.classify(math) == "math"
    assert ev.classify({"aten::bmm", "aten::softmax"}) == "math (bmm + softmax)"
    k = {label: {"train": {"kernel": ev.classify(fused)}, "decode": {"kernel": ev.classify(fused)}} for label in ("MHA", "GQA", "MQA")}
    assert ev.math_check(k)["passed"]
    k["GQA"]["decode"]["kernel"] = ev.classify(math)
    assert ev.math_check(k)["failures"] == ["GQA decode: math (MHA: efficient)"]
    k["MHA"]["decode"]["kernel"] = ev.classify(math)  # all variants on math: a shape or dtype matter, not GQA's
    assert ev.math_check(k)["passed"]


def test_gpu_evidence_gpu_settings_are_valid():
    """The GPU path cannot run here; its settings are checked against the profiles' schemas."""
    from nblib import config

    ev = gpu_evidence()
    s = ev.sizes(False, 300, 100)
    kv = {label: ev.train_settings(s, label) for label in ev.VARIANTS}
    assert {k: c["n_kv_head"] for k, c in kv.items()} == {"MHA": 8, "GQA": 2, "MQA": 1}
    assert {(c["n_layer"], c["d_model"], c["max_steps"], c["wandb"]) for c in kv.values()} == {(8, 512, 300, False)}
    assert ev.finetune_settings(s, "runs/pretrain-mha/seed-1337/hf")["steps"] == 100
    assert config.settings("compare", s["compare"], **s["compare_overrides"])["profile"] == "full"


def test_bench_half_quick_prints_the_ratio_and_the_rule(mirror):
    out = subprocess.run([sys.executable, str(SCRIPT.with_name("bench_half.py")), "--quick", "--reps", "1", "--only", "1"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "NBLIB_MIRROR": str(mirror)},
                         check=True).stdout
    assert "## 1. Matmul per dtype" in out and "CPU 16-bit units from its flags:" in out and "lora-16bit here:" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["half_units"] == list(__import__("nblib.machine").machine.cpu_half_units())
    (row,) = result["matmul"].values()
    assert row["bf16_ratio"] == pytest.approx(row["bfloat16"] / row["float32"]) and row["float16"] > 0

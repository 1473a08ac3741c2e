"""The compare stage: run loading, matched-pair refusals, spreads and verdicts, side-by-side
measurement, the rendered report (parsed) and headless-Chromium screenshots of it.

Fixture runs are written through ``nblib.runs.write_summary`` (so they follow the schema); the
pretraining ones hold tiny real GPT checkpoints saved through ``nblib.model.save_checkpoint``.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import statistics
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import papermill
import pytest
import torch
from PIL import Image

from nblib import attention, config, machine, measure, report, runs
from nblib.files import write_jsonl
from nblib.model import GPT, GPTConfig, save_checkpoint
from nblib.report.__main__ import publish_example

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "06_compare.ipynb"
CONTEXT = 64
DATA = {"corpus_sha256": {"train": "a" * 64, "val": "b" * 64, "test": "c" * 64}, "tokens": {"train": 1000, "val": 100, "test": 100}}


def _common(name: str, stage: str, variant: str, label: str, seed: int, cfg: dict, data: dict, wall: float) -> dict:
    return {"name": name, "stage": stage, "variant": variant, "label": label, "folder": f"runs/{name}/seed-{seed}",
            "profile": "smoke", "seed": seed, "config": {**cfg, "seed": seed}, "machine": machine.info(), "data": data,
            "compute_dtype": "float32", "finished": True, "stop_reason": "done", "wall_seconds": wall,
            "train_seconds": wall, "peak_memory_bytes": 50 * 2**20}


def make_pretrain_run(root: Path, variant: str, n_kv_head: int, seeds=(1337,), val_offset: float | tuple = 0.0,
                      speed: float = 1.0, cfg_extra: dict | None = None, data: dict | None = None) -> GPT:
    """``runs/pretrain-<variant>/seed-<s>`` for each seed: a tiny real checkpoint, a summary and metrics
    (``val_offset``: one loss offset for every seed, or one per seed)."""
    cfg = {**config.settings("train", "smoke", n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=8,
                             context_length=CONTEXT, seeds=list(seeds)), **(cfg_extra or {})}
    for i, seed in enumerate(seeds):
        torch.manual_seed(0)
        model = GPT(GPTConfig(context_length=CONTEXT, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=8))
        name = f"pretrain-{variant}"
        run = config.paths(root).run(name, seed)
        save_checkpoint(run / "best.pt", model)
        wobble = 0.01 * i + (val_offset[i] if isinstance(val_offset, tuple) else val_offset)  # seeds differ a little
        evals = [{"kind": "eval", "step": s, "tokens": s * 512, "wall": s * 0.5 / speed, "train_loss": 9 - s / 10,
                  "val_loss": 9.5 - s / 10 + wobble, "val_ppl": 1.0, "val_bpb": 3.0, "lr": 1e-3,
                  "tokens_per_s": 1000 * speed, "mfu": None, "peak_memory_bytes": None, "sample": "Era uma vez"}
                 for s in (0, 10, 20, 30)]
        train = [{"kind": "train", "step": s, "tokens": s * 512, "wall": s * 0.5 / speed, "loss": 9 - s / 10, "lr": 1e-3}
                 for s in range(0, 31, 5)]
        write_jsonl(run / "metrics.jsonl", train + evals)
        best = 6.5 + wobble
        runs.write_summary(run, {
            **_common(name, "pretrain", variant, variant.upper(), seed, cfg, data or DATA, 15.0 / speed),
            "params": model.num_params(), "params_embedding": model.num_params("embedding"),
            "params_blocks": model.num_params("blocks"), "n_layer": 2, "n_head": 4, "n_kv_head": n_kv_head, "d_model": 8,
            "context_length": CONTEXT, "kv_cache_bytes_per_token": {"float32": model.kv_cache_bytes(1, 1)},
            "best_val_loss": best, "best_val_ppl": 2.0 ** best, "best_val_bpb": best / 3, "best_step": 30,
            "selection": "best val", "test_loss": best, "test_ppl": 2.0 ** best, "test_bpb": best / 3, "final_lr": 1e-3,
            "final_val_loss": best, "final_val_ppl": 2.0 ** best, "final_val_bpb": best / 3,
            "train_tokens_per_s": 1000.0 * speed, "tokens_seen": 15360, "steps": 30, "max_steps": 30, "skipped_steps": 0,
            "world_size": 1, "checkpoint": f"runs/{name}/seed-{seed}/best.pt", "hf_export": None,
        })
    return model


def make_finetune_run(root: Path, variant: str, trainable: int, footprint_mib: float, eval_loss: float,
                      samples_per_s: float, seeds=(1234,), answer: str = "resposta") -> None:
    """``runs/finetune-<variant>/seed-<s>``: summary and Trainer-style metrics (no weights needed by the report)."""
    from nblib.finetune import VARIANTS

    v = VARIANTS[variant]
    cfg = config.settings("finetune", "smoke", variant=variant, seeds=list(seeds))
    data = {"dialogues_sha256": {"train": "d" * 64}, "base_model": "runs/pretrain-mha/seed-1337/hf", "base_sha256": "e" * 64,
            "train_dialogues": 100, "eval_dialogues": 10}
    questions = ["Quem escreveu Dom Casmurro?", "O que é um verbo?"]
    for i, seed in enumerate(seeds):
        name = f"finetune-{variant}"
        run = config.paths(root).run(name, seed)
        loss = eval_loss + 0.01 * i
        rows = [{"kind": "train", "step": s, "loss": 4 - s / 20} for s in (5, 10, 15, 20)]
        rows += [{"kind": "eval", "step": s, "eval_loss": loss + 1 - s / 20} for s in (10, 20)]
        write_jsonl(run / "metrics.jsonl", rows)
        runs.write_summary(run, {
            **_common(name, "finetune", variant, v.label, seed, cfg, data, 60 / samples_per_s),
            "peak_memory_bytes": int(3 * footprint_mib * 2**20),
            "mode": v.mode, "lora": v.lora, "baselines": list(v.baselines), "base_model": cfg["base_model"],
            "learning_rate": 0.01 if v.lora else 0.001, "trainable_params": trainable, "token_row_params": 1_000 if v.lora else 0, "total_params": 400_000,
            "footprint_bytes": int(footprint_mib * 2**20), "embedding_params": 390_000,
            "eval_loss": loss, "eval_ppl": 2.718 ** loss, "eval_bpb": loss / 3, "base_eval_loss": 5.0,
            "test_loss": loss + 0.05, "base_test_loss": 5.1,
            "base_eval_ppl": 148.4, "base_eval_bpb": 5 / 3, "merged_eval_loss": loss + 0.001,
            "merged_weights": "test weights", "stop_rate_before": 0.0, "stop_rate_after": 0.5,
            "train_samples_per_s": samples_per_s, "steps": 20, "best_step": 20, "train_dialogues": 100,
            "eval_dialogues": 10, "dropped_too_long": 0,
            "samples": [{"question": q, "before": "...", "after": f"{variant} diz: {answer} {j}"} for j, q in enumerate(questions)],
            "adapter": f"runs/{name}/seed-{seed}/adapter" if v.lora else None, "merged": f"runs/{name}/seed-{seed}/merged",
        })


def make_uptrained_run(root: Path, variant: str = "gqa-uptrained", seeds=(1337,), method: str = "mean",
                       val_offset: float = 0.02) -> None:
    """A GQA run converted from MHA by ``method`` and uptrained for 0.2 of its 30 steps (summary fields as train.py writes them)."""
    make_pretrain_run(root, variant, 2, seeds, val_offset=val_offset, cfg_extra={"uptrain_fraction": 0.2})
    for seed in seeds:
        run = root / "runs" / f"pretrain-{variant}" / f"seed-{seed}"
        runs.write_summary(run, {**runs.read_summary(run), "label": attention.get(variant).label, "steps": 3, "max_steps": 3,
                                 "tokens_seen": 1536, "init": "convert", "source_run": f"runs/pretrain-mha/seed-{seed}",
                                 "conversion_method": method, "uptrain_fraction": 0.2, "converted_val_loss": 7.0,
                                 "uptrained_val_loss": 6.52, "source_steps": 30, "total_steps": 33, "total_tokens": 16896,
                                 "selection": "end of budget", "best_step": 3, "converted_val_bpb": 7.0 / 3,
                                 "converted_test_loss": 7.1, "converted_test_bpb": 7.1 / 3})


def make_all_runs(root: Path, seeds=(1337,), ft_seeds=(1234,)) -> None:
    make_pretrain_run(root, "mha", 4, seeds)
    make_pretrain_run(root, "gqa", 2, seeds, val_offset=0.05, speed=1.1)
    make_finetune_run(root, "lora-8bit", 4_000, 0.6, 3.2, 10.0, ft_seeds, answer="<script>alert(1)</script>")
    make_finetune_run(root, "lora-32bit", 4_000, 1.6, 3.1, 14.0, ft_seeds)
    make_finetune_run(root, "full", 400_000, 1.6, 3.0, 12.0, ft_seeds)


# --------------------------------------------------------------------------- loading


def test_refuses_missing_runs_naming_the_notebook(home):
    with pytest.raises(report.MissingRunError, match=r"runs/pretrain-mha/seed-\*/summary.json not found: run notebook 03_train_mha"):
        report.load()
    make_pretrain_run(home, "mha", 4)
    with pytest.raises(report.MissingRunError, match=r"runs/pretrain-gqa/seed-\*/summary.json not found: run notebook 04_train_gqa"):
        report.load()
    make_pretrain_run(home, "gqa", 2)
    with pytest.raises(report.MissingRunError, match=r"05_finetune_lora_8bit with variant='lora-8bit'"):
        report.load(["pretrain-mha", "pretrain-gqa", "finetune-lora-8bit"])
    with pytest.raises(report.MissingRunError, match=r"add pretrain-mha to `runs` \(notebook 03_train_mha"):
        report.load(["pretrain-gqa"])
    summary = home / "runs" / "pretrain-gqa" / "seed-1337" / "summary.json"
    summary.write_text(summary.read_text().replace('"finished": true', '"finished": false'))
    with pytest.raises(report.MissingRunError, match=r"runs/pretrain-gqa/seed-1337 is not finished .* re-run notebook 04_train_gqa"):
        report.load()
    summary.write_text(summary.read_text().replace('"finished": false', '"finished": true').replace('"best_val_loss"', '"old_key"'))
    with pytest.raises(ValueError, match=r"runs/pretrain-gqa/seed-1337/summary.json does not follow the run schema \(best_val_loss is missing"):
        report.load()
    current = f'"schema": {runs.SCHEMA}'
    summary.write_text(summary.read_text().replace('"old_key"', '"best_val_loss"').replace(current, '"schema": 1'))
    with pytest.raises(runs.RunError, match=rf"schema 1, this nblib reads schema {runs.SCHEMA}.*re-run notebook 04_train_gqa"):
        report.load()
    summary.write_text(summary.read_text().replace('"schema": 1', current))
    (home / "runs" / "pretrain-gqa" / "seed-1337" / "best.pt").unlink()
    with pytest.raises(runs.RunError, match=r"runs/pretrain-gqa/seed-1337: the checkpoint .* re-run notebook 04_train_gqa"):
        measure.load_models(report.load().pretrain, "cpu")


def test_loads_every_run_in_a_fixed_order(home):
    make_all_runs(home)
    (home / "runs" / "pipeline-20250101-000000").mkdir()  # the pipeline's own folder has no seeds
    comparison = report.load()
    assert list(comparison.groups) == ["pretrain-mha", "pretrain-gqa", "finetune-lora-8bit", "finetune-lora-32bit", "finetune-full"]
    assert list(comparison.pretrain) == ["MHA", "GQA"]
    overview = report.runs_overview(comparison)
    assert overview.loc["pretrain-gqa", "folder"] == "runs/pretrain-gqa" and overview.loc["pretrain-gqa", "seeds"] == "1337"
    assert list(report.load(["finetune-full"]).groups) == ["finetune-full"]
    summary = home / "runs" / "finetune-full" / "seed-1234" / "summary.json"
    summary.write_text(summary.read_text().replace('"finished": true', '"finished": false'))
    with pytest.warns(UserWarning, match=r"runs/finetune-full/seed-1234 is not finished.*left out of the comparison"):
        assert "finetune-full" not in report.load().groups
    with pytest.raises(report.MissingRunError, match="runs/finetune-full/seed-1234 is not finished"):
        report.load(["finetune-full"])


def test_an_uptrained_variant_is_matched_ordered_and_tabled(home):
    """Summaries older than the uptraining fields (the fixtures) still read; a converted run may differ
    from MHA in K/V heads, alpha and steps, and gets the conversion table."""
    from nblib.report import figures, tables

    make_pretrain_run(home, "mha", 4)
    make_pretrain_run(home, "gqa", 2, val_offset=0.05)
    make_uptrained_run(home)
    comparison = report.load()
    assert list(comparison.pretrain) == ["MHA", "GQA", "GQA uptrained"] and not comparison.mismatches
    col = tables.conversion_table(comparison)["GQA uptrained"]
    assert (col["source_run"], col["conversion_method"], col["uptrain_fraction"]) == ("runs/pretrain-mha", "mean", 0.2)
    assert (col["converted_val_loss"], col["uptrained_val_loss"], col["scratch_variant"]) == (7.0, 6.52, "GQA")
    assert col["scratch_val_loss"] == pytest.approx(6.55) and (col["total_steps"], col["scratch_steps"]) == (33, 30)
    assert tables.conversion_table(report.load(["pretrain-mha", "pretrain-gqa"])) is None
    line = figures.val_loss(comparison).axes[0].lines[-1]  # the uptrained run starts after MHA's tokens
    assert line.get_xdata()[0] == 15360 and line.get_color() == attention.get("gqa-uptrained").colour  # the registry's colour
    with pytest.raises(report.MismatchError, match=r"differ in learning_rate \(only n_kv_head, uptrain_fraction may differ\)"):
        make_pretrain_run(home, "mqa", 1, cfg_extra={"learning_rate": 1e-2})
        report.load()


def test_a_mismatched_pair_is_refused_or_flagged(home):
    make_pretrain_run(home, "mha", 4)
    make_pretrain_run(home, "gqa", 2, cfg_extra={"learning_rate": 1e-3},
                      data={**DATA, "tokens": {**DATA["tokens"], "train": 999}})
    with pytest.raises(report.MismatchError, match=r"runs/pretrain-mha and runs/pretrain-gqa are not a matched pair: they differ "
                                                   r"in learning_rate, data.tokens \(only n_kv_head, uptrain_fraction may differ\)"):
        report.load()
    comparison = report.load(allow_mismatch=True)
    assert len(comparison.mismatches) == 1
    pre = report.pretrain_table(comparison)
    rep = report.compose(comparison, config.settings("compare", "smoke"), pre, pre.iloc[:0, :0].rename_axis("prompt"))
    html = rep.html()
    assert "Unmatched pairs" in html and 'class="warning"' in html and "GQA ÷ MHA ⚠" in html and 'class="mismatch"' in html
    assert report.at_a_glance(comparison, pre, None)[0].startswith("**Warning**: 1 compared pair(s) are not matched")
    assert "Stale inputs" not in html  # no stage ran again after the runs
    from nblib import freshness

    for stage in ("03_train_mha", "04_train_gqa", "03_train_mha"):  # 03 again: 04's GQA came from the old MHA
        freshness.record(stage, "smoke")
    html = report.compose(comparison, config.settings("compare", "smoke"), pre, pre.iloc[:0, :0].rename_axis("prompt")).html()
    assert "Stale inputs" in html and "04_train_gqa: 03_train_mha ran again at" in html


def test_seeds_of_one_variant_must_agree_and_seed_sets_must_match(home):
    make_pretrain_run(home, "mha", 4, seeds=(1, 2))
    make_pretrain_run(home, "gqa", 2, seeds=(1, 3))
    with pytest.raises(report.MismatchError, match=r"differ in seeds \(\[1, 2\] vs \[1, 3\]\)"):
        report.load()


# --------------------------------------------------------------------------- tables, spreads and verdicts


def test_pretrain_table_states_each_figure_as_a_ratio_to_mha(home):
    mha = make_pretrain_run(home, "mha", 4)
    gqa = make_pretrain_run(home, "gqa", 2, val_offset=0.05, speed=1.1)
    comparison = report.load()
    t = report.pretrain_table(comparison, contexts=(1024, 4096))
    assert list(t.columns) == ["MHA", "GQA", "GQA ÷ MHA"]
    assert t.loc["n_kv_head", "GQA ÷ MHA"] == 0.5 and t.loc["kv_per_token", "GQA ÷ MHA"] == 0.5
    assert t.loc["kv_at_4096", "MHA"] == mha.kv_cache_bytes(1, 4096) / 2**20
    assert t.loc["params", "GQA"] == gqa.num_params() < mha.num_params()
    assert t.loc["run_tokens_per_s", "GQA ÷ MHA"] == pytest.approx(1.1)
    assert t.loc["best_val_loss", "GQA"] == pytest.approx(6.55)
    shown = report.format_table(t)
    assert "Test bits per byte (test split)" in shown.index and "KV cache at 4k context (MiB per sequence, fp32)" in shown.index
    assert "Val loss of the reported checkpoint (nats/token; val split: it chose the checkpoint)" in shown.index
    assert t.loc["test_bpb", "GQA"] == pytest.approx(6.55 / 3) and t.loc["selection", "GQA"] == "best val"
    glance = report.glance.details(comparison, t, None)
    assert any("KV cache 0.50× the size of MHA's" in line for line in glance)
    assert any("test bits per byte +0.017 bpb, not called (one seed: the spread over seeds is unmeasured); test "
               "loss +0.050 nats/token" in line for line in glance)


def test_seeds_give_spreads_and_verdicts(home):
    make_pretrain_run(home, "mha", 4, seeds=(1, 2, 3))
    make_pretrain_run(home, "gqa", 2, seeds=(1, 2, 3), val_offset=0.05)
    comparison = report.load()
    t = report.pretrain_table(comparison)
    cell = t.loc["best_val_loss", "GQA"]
    assert isinstance(cell, report.Stat) and cell.n == 3 and cell.lo == pytest.approx(6.55) and cell.hi == pytest.approx(6.57)
    assert report.format_value(cell) == "6.56 (6.55–6.57, n=3)"
    d = report.paired(comparison.pretrain["MHA"], comparison.pretrain["GQA"], "best_val_loss")
    assert d.n == 3 and d.mean == pytest.approx(0.05) and d.called and d.better is False
    calls = report.report_calls(comparison)
    assert calls.family == 1  # GQA − MHA in bits per byte: the report's one comparison
    assert calls.says(comparison.pretrain["MHA"], comparison.pretrain["GQA"], "test_bpb").startswith("+0.017 [+0.017, +0.017] bpb, called worse (3 seeds, 95% interval)")
    lines = report.verdict_lines(comparison)
    assert lines == ["**GQA − MHA** test bits per byte: +0.017 [+0.017, +0.017] bpb, called worse (3 seeds, 95% interval)."]


def test_measured_rows_carry_the_repeat_range(home):
    make_pretrain_run(home, "mha", 4)
    make_pretrain_run(home, "gqa", 2)
    comparison = report.load()
    models = measure.load_models(comparison.pretrain, "cpu")
    timings = measure.generation(models, "Uma noite destas,", batch_sizes=(1, 8), new_tokens=8, repeats=3)
    assert len(timings) == 3 * 2 * 2 and (timings["tokens_per_s"] > 0).all()
    tokens = len(_ids("Uma noite destas,")) + 8
    cache = timings[(timings.batch == 8)].groupby("variant")["cache_bytes"].first()
    assert cache["MHA"] == models["MHA"].kv_cache_bytes(8, tokens) and cache["GQA"] / cache["MHA"] == 0.5
    configs = {label: g.summary["config"] for label, g in comparison.pretrain.items()}
    training = measure.training_steps(configs, steps=1, repeats=2, device="cpu")
    assert training.groupby("variant")["repeat"].apply(list).to_dict() == {"GQA": [0, 1], "MHA": [0, 1]}
    assert (training["tokens_per_s"] > 0).all()  # interleaving itself: tests/test_measure.py
    rows = report.measured_rows(timings, training)
    full = report.pretrain_table(comparison, rows)
    cell = full.loc["gen_tokens_per_s_b8", "MHA"]
    assert isinstance(cell, report.Stat) and cell.n == 3 and cell.center == "median"
    assert full.loc["gen_cache_mib_b1", "GQA ÷ MHA"] == 0.5 and "train_tokens_per_s" in full.index
    glance = report.glance.details(comparison, full, None)
    assert any(re.search(r"generation batch 8 [\d.]+× \([\d.]+–[\d.]+×\); training [\d.]+×", line) for line in glance)
    with pytest.raises(ValueError, match=r"gen_new_tokens=80 does not fit MHA's context"):
        measure.generation(models, "Uma noite destas,", new_tokens=80, repeats=1)


def _ids(text: str) -> list[int]:
    from nblib.tokenizer import get_encoding

    return get_encoding().encode_ordinary(text)


def test_sample_generations_are_side_by_side_and_seeded(home):
    make_pretrain_run(home, "mha", 4)
    make_pretrain_run(home, "gqa", 2)
    models = measure.load_models(report.load().pretrain, "cpu")
    prompts = ["Capitu tinha olhos de", "A vida é"]
    a = measure.sample_generations(models, prompts, max_new_tokens=6, seed=7)
    b = measure.sample_generations(models, prompts, max_new_tokens=6, seed=7)
    assert list(a.index) == prompts and list(a.columns) == ["MHA", "GQA"]
    assert a.equals(b) and all(isinstance(x, str) and x for x in a.to_numpy().ravel())


def test_finetune_table_and_glance(home):
    make_all_runs(home)
    comparison = report.load()
    t = report.finetune_table(comparison)
    assert list(t.columns) == ["LoRA + 8-bit", "LoRA + 32-bit", "Full fine-tune"]
    assert t.loc["trainable_share", "LoRA + 8-bit"] == 1.0
    assert (t.loc["adapter_params", "LoRA + 8-bit"], t.loc["token_row_params", "LoRA + 8-bit"]) == (3_000, 1_000)
    assert t.loc["recipe", "LoRA + 8-bit"].startswith("LoRA r=") and "lora_answer_rows: the smoke recipe" in t.loc["recipe", "LoRA + 8-bit"]
    assert t.loc["recipe", "Full fine-tune"] == "every weight"
    assert t.loc["footprint_mib", "LoRA + 8-bit"] == pytest.approx(0.6, rel=1e-6)
    assert t.loc["merged_eval_loss", "Full fine-tune"] == pytest.approx(3.001) and t.loc["compute_dtype", "Full fine-tune"] == "float32"
    glance = report.glance.details(comparison, None, t)
    assert any(line.startswith("**LoRA + 8-bit** against Full fine-tune: 0.37× the footprint") for line in glance)
    assert any("8-bit** against LoRA + 32-bit" in line and "test loss +0.100 nats/token, not called (one seed" in line for line in glance)
    assert not any(line.startswith("**Full fine-tune** against") for line in glance)
    samples = report.finetune_samples(comparison)
    assert list(samples.columns) == ["Base model", "LoRA + 8-bit", "LoRA + 32-bit", "Full fine-tune"]
    assert samples.loc["O que é um verbo?", "Full fine-tune"] == "full diz: resposta 1"
    comparison.finetune["LoRA + 8-bit"].summary["samples"][1]["after"] = ""
    assert report.finetune_samples(comparison).loc["O que é um verbo?", "LoRA + 8-bit"] == report.EMPTY_ANSWER
    assert report.finetune_table(report.load(["pretrain-mha", "pretrain-gqa"])) is None


def test_format_value():
    assert report.format_value(6834432.0) == "6,834,432"
    assert report.format_value(2.0) == "2"
    assert report.format_value(12) == "12"
    assert report.format_value(5.123456) == "5.123"
    assert report.format_value(0.5, ratio=True) == "0.50×"
    assert report.format_value(float("nan")) == "–"
    assert report.format_value(None) == "–"
    assert report.format_value("8bit") == "8bit"


def test_cost_at_real_scale_rows(home):
    sweep = measure.cost_sweep(["full"], [64, 128], batch=2, repeats=1, device="cpu")
    assert set(sweep["variant"]) == {"MHA", "GQA", "MQA"} and set(sweep["context"]) == {64, 128}
    assert sweep["prefill_s"].isna().all()  # caches filled with random values, no prefill timed
    mha = sweep[(sweep.variant == "MHA") & (sweep.context == 128)].iloc[0]
    gqa = sweep[(sweep.variant == "GQA") & (sweep.context == 128)].iloc[0]
    assert gqa["kv_cache_bytes"] * 4 == mha["kv_cache_bytes"] == 2 * 8 * 2 * 8 * 128 * 64 * 4
    table = report.cost_table(sweep, 128)
    assert list(table.columns) == ["MHA", "GQA", "GQA ÷ MHA", "MQA", "MQA ÷ MHA"]
    kv_row = next(k for k in table.index if "KV cache" in k)
    assert table.loc[kv_row, "GQA ÷ MHA"] == 0.25
    lines = report.glance.cost_lines(sweep, 128)
    assert any("**GQA** decodes" in line and "KV cache 0.25× the size" in line for line in lines)


def _generation(tokens_per_s: dict[str, list[float]], batch: int = 8) -> pd.DataFrame:
    """Rows as ``measure.generation`` returns them, with known tokens/s per repeat."""
    return pd.DataFrame([{"variant": v, "batch": batch, "repeat": i, "tokens_per_s": t, "cache_tokens": 40,
                          "cache_bytes": 1024} for v, ts in tokens_per_s.items() for i, t in enumerate(ts)])


def _sweep() -> pd.DataFrame:
    """Rows as ``measure.cost_sweep`` returns them at two shapes, one repeat each."""
    rows = []
    for shape, n_head, speeds in (("full (8x8x512)", 8, (100, 150, 160)), ("gpt2-small (12x12x768)", 12, (50, 60, 80))):
        for v, kv, tps in zip(("MHA", "GQA", "MQA"), (n_head, n_head // 4, 1), speeds):
            rows.append({"shape": shape, "variant": v, "n_head": n_head, "n_kv_head": kv, "context": 2048, "batch": 8,
                         "decode_tokens_per_s": float(tps), "decode_repeats": [float(tps)], "kv_cache_bytes": kv * 2**20})
    return pd.DataFrame(rows)


def _three_variants(home: Path, seeds=(1, 2)) -> report.Comparison:
    make_pretrain_run(home, "mha", 4, seeds)
    make_pretrain_run(home, "gqa", 2, seeds, val_offset=0.05)
    make_uptrained_run(home, seeds=seeds)
    return report.load()


def test_alpha_sweep_and_learning_rate_figures(home):
    """The GQA paper's Figure 5 (test bpb against alpha, alpha = 0 the converted model) and the rate the
    uptraining continues at, drawn against the tokens behind the weights."""
    from nblib.report import figures

    comparison = _three_variants(home)
    fig = figures.alpha_sweep(comparison)
    [curve] = [c for c in fig.axes[0].containers]  # one errorbar family: MHA -> 2 KV heads, mean-pooled
    xs, ys = curve.lines[0].get_data()
    assert list(xs) == [0.0, 0.2] and ys[0] == pytest.approx(7.1 / 3) and ys[1] == pytest.approx((6.52 + 6.53) / 6)
    refs = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert sorted(refs) == ["GQA (from scratch)", "MHA (from scratch)", "MHA → 2 KV heads, mean-pooled"]
    lines = figures.learning_rates(comparison).axes[0].lines
    assert [line.get_label() for line in lines] == ["MHA", "GQA uptrained"]
    assert lines[1].get_xdata()[0] > lines[0].get_xdata()[-1] - 1  # uptraining's tokens start where MHA's end
    make_pretrain_run(home, "mha", 4, (1, 2))
    assert figures.alpha_sweep(report.load(["pretrain-mha", "pretrain-gqa"])) is None


def test_paper_table_from_a_known_comparison(home):
    """Table 1 of Ainslie et al. laid out for our variants: time per sample = new tokens / tokens/s per
    repeat (median), quality over seeds, KV bytes, compute counting the source run, equal width or parameters."""
    comparison = _three_variants(home)
    comparison.pretrain["GQA"].runs[0].summary["matched"] = "equal parameters"  # as train.py records an MLP-widened GQA
    measured = report.measured_rows(_generation({"MHA": [100, 200, 400], "GQA": [160, 320, 640], "GQA uptrained": [320]}))
    t = report.paper_table(comparison, report.pretrain_table(comparison, measured), new_tokens=32)
    time = "Time per sample (s to decode 32 tokens, batch 8)"
    alpha0 = "Converted, not uptrained (alpha = 0; mean-pooled, 2 KV heads)"
    assert list(t.index) == ["MHA", "GQA", "GQA uptrained", alpha0] and list(t.columns) == [
        "KV heads", "Starts from", "Compared at", "Parameters", time, "Test bits per byte (test split)",
        "KV cache per token (bytes, fp32)", "Training tokens (a converted run's source included)"]
    assert t.loc["MHA", time].mid == pytest.approx(32 / 200) and (t.loc["MHA", time].lo, t.loc["MHA", time].hi) == (0.08, 0.32)
    assert t.loc["GQA", time].mid == pytest.approx(0.1) and t.loc["GQA uptrained", time] == pytest.approx(0.1)
    bpb = t.loc["GQA", "Test bits per byte (test split)"]
    assert bpb.n == 2 and bpb.mid == pytest.approx((6.55 + 6.56) / 6)
    assert t.loc["MHA", "KV cache per token (bytes, fp32)"] == 2 * t.loc["GQA", "KV cache per token (bytes, fp32)"]
    tokens = t["Training tokens (a converted run's source included)"]
    assert (tokens["MHA"], tokens["GQA uptrained"], tokens[alpha0]) == (15360, 16896, 15360)
    assert list(t["Compared at"]) == ["equal width", "equal parameters", "equal width", "equal width"]
    assert list(t["Starts from"]) == ["scratch", "scratch", "MHA, mean-pooled K/V, alpha = 0.2", "MHA, mean-pooled K/V, alpha = 0"]
    assert t.loc[alpha0, "Test bits per byte (test split)"].mid == pytest.approx(7.1 / 3)  # the converted model's own figure
    assert t.loc["GQA", "KV heads"] == "2 of 4"
    assert time not in report.paper_table(comparison, None, 32).columns  # nothing measured: no time column


def test_frontier_has_one_point_per_variant_scratch_and_uptrained_apart(home):
    from nblib.report import figures

    comparison = _three_variants(home)
    measured = report.measured_rows(_generation({"MHA": [100, 110], "GQA": [120, 130], "GQA uptrained": [125, 126]}))
    fig = figures.frontier(comparison, report.pretrain_table(comparison, measured), _sweep())
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 3  # KV bytes, decode at the run's shape, decode at real shape
    for ax in panels:
        points = [line for line in ax.lines if line.get_marker() in ("o", "^")]
        assert sorted(line.get_marker() for line in points) == ["^", "o", "o"]
        by_colour = {line.get_color(): line.get_marker() for line in points}
        assert by_colour == {attention.get("mha").colour: "o", attention.get("gqa").colour: "o",
                             attention.get("gqa-uptrained").colour: "^"}
        assert [t.get_text() for t in ax.texts] == ["MHA", "GQA", "GQA uptrained"]
    real = {line.get_color(): line.get_xdata()[0] for line in panels[2].lines if line.get_marker() in ("o", "^")}
    assert real[attention.get("gqa-uptrained").colour] == real[attention.get("gqa").colour] == 60  # its twin's, largest shape
    assert [t.get_text() for t in fig.legends[0].texts] == ["from scratch", "uptrained (converted from MHA)"]
    assert len([ax for ax in figures.frontier(comparison).axes if ax.axison]) == 1  # nothing measured: KV bytes only


def test_glance_answers_in_six_lines_with_details_below(home):
    _three_variants(home, seeds=(1,))
    make_finetune_run(home, "lora-8bit", 4_000, 0.6, 3.2, 10.0)
    make_finetune_run(home, "full", 400_000, 1.6, 3.0, 12.0)
    comparison = report.load(allow_mismatch=True)
    comparison.mismatches = ["a made-up unmatched pair"]  # the warning line counts too
    pre, ft, sweep = report.pretrain_table(comparison), report.finetune_table(comparison), _sweep()
    glance = report.at_a_glance(comparison, pre, ft, sweep)
    assert len(glance) <= 6 and glance[0].startswith("**Warning**")
    assert [line.split("**")[1] for line in glance[1:]] == [
        "What fewer KV heads save", "What it costs in quality", "Uptrained vs from scratch", "Fine-tuning trade-off",
        "At real scale"]
    assert "GQA (2 of 4 KV heads) 0.50× the KV cache" in glance[1] and "GQA +0.017 bpb, not called (one seed" in glance[2]
    real = glance[5]  # one line over both shapes, saying it is one timing each
    assert "GQA (2 of 8, 3 of 12 KV heads) decodes 1.20–1.50× MHA's tokens/s" in real and "one timing per variant" in real
    assert len(report.glance.details(comparison, pre, ft, sweep)) > len(glance)


def test_verdicts_set_uptrained_against_mha_scratch_and_other_methods(home):
    comparison = _three_variants(home, seeds=(1, 2, 3))
    lines = report.glance.verdict_lines(comparison)
    assert [line.split("**")[1] for line in lines] == ["GQA − MHA", "GQA uptrained − MHA", "GQA uptrained − GQA"]
    assert "after 16,896 vs 15,360 training tokens" in lines[2] and ": \u22120.010 [" in lines[2]
    assert all("called" in line and "(3 seeds, " in line for line in lines[:3])
    levels = {re.search(r"\(3 seeds, ([\d.]+)% interval\)\.$", line)[1] for line in lines}
    assert levels == {"98.33", "97.5", "95"}  # Holm over the report's three comparisons: 5%/3, 5%/2, 5%
    make_uptrained_run(home, "gqa-uptrained-first", seeds=(1, 2, 3), method="first", val_offset=0.03)
    lines = report.glance.verdict_lines(report.load())
    assert "**GQA uptrained (first) − GQA uptrained** (K/V heads by first vs mean)" in lines[-1]
    alone = report.glance.verdict_lines(report.load(["pretrain-mha", "pretrain-gqa", "pretrain-gqa-uptrained-first"]))
    assert len(alone) == 3 and not any("K/V heads by" in line for line in alone)  # one method: nothing to set it against


def test_three_seeds_the_old_rule_called_are_not_called_once_corrected(home):
    """GQA worse than MHA by 0.01, 0.03, 0.05 nats over three seeds: every seed of one sign and the mean
    beyond twice its standard error (the old rule called it), but the t interval includes 0."""
    make_pretrain_run(home, "mha", 4, seeds=(1, 2, 3))
    make_pretrain_run(home, "gqa", 2, seeds=(1, 2, 3), val_offset=(0.01, 0.03, 0.05))
    comparison = report.load()
    base, other = report.glance.seed_values(comparison.pretrain["MHA"], comparison.pretrain["GQA"], "test_bpb")
    d = [o - b for b, o in zip(base, other)]
    se = statistics.stdev(d) / 3**0.5
    assert all(x > 0 for x in d) and statistics.fmean(d) > 2 * se  # what the old rule called "clearly worse"
    verdict = report.report_calls(comparison)[comparison.pretrain["MHA"], comparison.pretrain["GQA"], "test_bpb"]
    assert not verdict.called and verdict.low < 0 < verdict.high and verdict.n == 3
    [line] = report.verdict_lines(comparison)
    assert re.fullmatch(r"\*\*GQA − MHA\*\* test bits per byte: \+0\.010 \[\u22120\.0\d\d, \+0\.0\d\d\] bpb, "
                        r"not called \(3 seeds, 95% interval\)\.", line), line
    quality = next(line for line in report.at_a_glance(comparison, None, None) if "What it costs in quality" in line)
    assert "GQA +0.010 [\u22120.0" in quality and "bpb, not called (3 seeds, 95% interval)" in quality


# --------------------------------------------------------------------------- the rendered report


class _Page(HTMLParser):
    """Collects tables (as lists of rows), images and every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.urls: list[str] = []
        self.scripts = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href", "srcset", "action", "data") and v]
        if tag in ("script", "link"):
            self.scripts += 1
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, mirror) -> Path:
    """The 06 notebook executed by papermill over fixture runs with two seeds; returns the working root."""
    root = tmp_path_factory.mktemp("compare-home")
    make_all_runs(root, seeds=(1337, 1338), ft_seeds=(1234, 1235))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NBLIB_HOME", str(root))
        papermill.execute_notebook(
            str(NOTEBOOK), str(root / "06_compare.ipynb"), kernel_name="python3", progress_bar=False,
            cwd=str(NOTEBOOK.parent),
            parameters={"profile": "smoke", "gen_new_tokens": 8, "gen_repeats": 2, "sample_new_tokens": 8,
                        "cost_contexts": [128, 256]},
        )
    return root


def test_report_is_rendered_self_contained_with_spreads(rendered):
    html_text = (rendered / "reports" / "compare.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(html_text)
    assert page.scripts == 0
    assert all(u.startswith(("#", "data:image/png;base64,")) for u in page.urls), [u[:40] for u in page.urls]
    assert len(page.images) >= 6
    for src in page.images:
        png = base64.b64decode(src.removeprefix("data:image/png;base64,"))
        assert Image.open(io.BytesIO(png)).size[0] > 300
    head = {t[0][0] if t[0] else "": t for t in page.tables}
    pre = next(t for t in page.tables if t[0][:4] == ["metric", "MHA", "GQA", "GQA ÷ MHA"])
    rows = {r[0]: r[1:] for r in pre[1:]}
    assert rows["KV heads"] == ["4", "2", "0.50×"]
    assert rows["Seeds"] == ["2", "2", "1.00×"]
    assert re.fullmatch(r"6\.5\d+ \(6\.5\d+–6\.5\d+, n=2\)", rows["Test loss (nats/token; test split, nothing chosen on it)"][1])
    assert rows["Test bits per byte (test split)"][2].endswith("×")
    assert rows["Generation tokens/s, batch 8 (KV cache, measured here)"][2].endswith("×")
    assert "Train tokens/s, measured here side by side" in rows
    assert "question" in head and "prompt" in head
    ft = next(t for t in page.tables if t[0][1:] == ["LoRA + 8-bit", "LoRA + 32-bit", "Full fine-tune"]
              and any(r[0] == "Base precision" for r in t))
    cost = next(t for t in page.tables if any(r[0] == "footprint_mib" or r[0] == "Model footprint (MiB)" for r in t)
                and not any(r[0] == "Base precision" for r in t))
    costrows = dict((r[0], r[1:]) for r in cost[1:])
    assert costrows["Total parameters"][cost[0][1:].index("Full fine-tune")] == "124,441,344"  # GPT-2 small + the markers' rows
    ftrows = dict((r[0], r[1:]) for r in ft[1:])
    assert ftrows["Trainable parameters"] == ["4,000", "4,000", "400,000"]
    assert ftrows["Compute dtype"] == ["float32"] * 3 and "Val loss of the merged model (what chat loads; val split)" in ftrows
    assert any(t[0][0].startswith("metric") and any("full (8x8x512): decode tokens/s" in r[0] for r in t) for t in page.tables)
    assert 'name="viewport"' in html_text and "overflow-x:auto" in html_text
    assert "CPU smoke run" in html_text and "profile <strong>smoke</strong>" in html_text
    assert machine.info()["cpu"] in html_text
    assert "KV cache 0.50× the size of MHA&#x27;s" in html_text  # the at-a-glance summary
    assert "bpb, called worse (2 seeds, " in html_text  # a verdict with its corrected interval
    assert "clearly" not in html_text
    assert re.search(r"Holm-corrected together over all \d+ comparisons of this report", html_text)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text and "<script>" not in html_text
    assert html_text.index(">At a glance</h2>") < html_text.index(">MHA vs GQA</h2>")
    for name in ("compare.html", "compare.md", "compare.csv"):
        assert str(rendered) not in (rendered / "reports" / name).read_text(encoding="utf-8"), f"absolute path in {name}"


def test_markdown_and_csv_hold_the_same_tables(rendered):
    md = (rendered / "reports" / "compare.md").read_text(encoding="utf-8")
    assert "| KV heads | 4 | 2 | 0.50× |" in md and "## At a glance" in md
    assert "<script>" not in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md  # data never renders as HTML
    rows = list(csv.DictReader(io.StringIO((rendered / "reports" / "compare.csv").read_text(encoding="utf-8"))))
    kv = [r for r in rows if r["row"] == "n_kv_head" and r["column"] == "GQA ÷ MHA"]
    assert kv and float(kv[0]["value"]) == 0.5
    best = next(r for r in rows if r["row"] == "best_val_loss" and r["column"] == "GQA")
    assert best["n"] == "2" and float(best["low"]) <= float(best["value"]) <= float(best["high"])
    assert {r["table"] for r in rows} >= {"MHA vs GQA", "Fine-tuning variants", "Pretraining configs"}


def test_publish_example_copies_the_report(rendered, tmp_path):
    from nblib import config, freshness

    with pytest.raises(config.UserError, match="does not show the current runs .*no pipeline run of 06_compare"):
        publish_example(rendered, tmp_path, label="smoke-cpu")  # rendered by hand: no pipeline record
    for stage in ("01_ingest", "02_clean", "03_train_mha", "04_train_gqa", "05_finetune_full", "06_compare"):
        freshness.record(stage, "smoke", rendered)
    written = publish_example(rendered, tmp_path, label="smoke-cpu")
    assert [p.name for p in written] == ["compare-smoke-cpu.html", "compare-smoke-cpu.md", "compare-smoke-cpu.csv"]
    assert written[0].read_bytes() == (rendered / "reports" / "compare.html").read_bytes()
    with pytest.raises(FileNotFoundError, match="run the pipeline"):
        publish_example(tmp_path / "empty", tmp_path)
    freshness.record("03_train_mha", "smoke", rendered)  # pretraining ran again: the report is stale
    with pytest.raises(config.UserError, match=r"06_compare: 03_train_mha ran again at .*--allow-stale"):
        publish_example(rendered, tmp_path, label="smoke-cpu")
    assert publish_example(rendered, tmp_path, label="smoke-cpu", allow_stale=True) == written
    run = rendered / "runs" / "pipeline-x"  # the pipeline run that rendered it: its seconds and machine, no paths
    run.mkdir(parents=True)
    (run / "pipeline.json").write_text(json.dumps({
        "profile": "smoke", "home": str(rendered), "out_dir": "runs/pipeline-x", "total_seconds": 12.5,
        "stages": [{"name": "06_compare", "seconds": 12.5, "params": {"runs": None}, "status": "ok"}],
        "machine": {"cpu": "Some CPU", "cpu_cores": 2, "cpu_half_units": [], "load_average": 1.5, "torch": "2.13.0"}}))
    freshness.record("06_compare", "smoke", rendered, pipeline="runs/pipeline-x")
    *_, timings = publish_example(rendered, tmp_path, label="smoke-cpu", allow_stale=True)
    assert timings.name == "pipeline-smoke-cpu.json" and str(rendered) not in timings.read_text()
    assert json.loads(timings.read_text()) == {
        "profile": "smoke", "total_seconds": 12.5, "stages": [{"name": "06_compare", "seconds": 12.5}],
        "machine": {"cpu": "Some CPU", "cpu_cores": 2, "cpu_half_units": [], "load_average": 1.5, "torch": "2.13.0"}}


def test_the_readme_quotes_the_published_pipeline_run():
    """The README's smoke-pipeline times are those of the run that made the example report, on the CPU it names."""
    repo = Path(__file__).resolve().parents[1]
    timings = json.loads((repo / "reports" / "examples" / "pipeline-smoke-cpu.json").read_text())
    readme = (repo / "README.md").read_text(encoding="utf-8")
    stages = len(timings["stages"])
    assert f"pipeline finished: {stages} stage(s) in {timings['total_seconds']} s (smoke profile)" in readme
    how_long = readme[readme.index("**How long it takes.**"):].split("\n\n")[0]
    assert f"{timings['total_seconds']} s" in how_long and timings["machine"]["cpu"] in how_long
    assert f"{timings['machine']['cpu_cores']} cores" in how_long


# --------------------------------------------------------------------------- headless Chromium


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("Chromium is missing: install it (Debian: apt-get install -y chromium); .ci/run does this in CI")


def screenshot(html: Path, out: Path, width: int, height: int) -> Image.Image:
    with tempfile.TemporaryDirectory() as profile_dir:
        proc = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={profile_dir}", f"--screenshot={out}", f"--window-size={width},{height}", html.as_uri()],
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"bytes written to file", proc.stderr), proc.stderr[-2000:]
    return Image.open(out).convert("L")


@pytest.mark.parametrize("width,height", [(390, 844), (1280, 900)], ids=["phone", "desktop"])
def test_report_screenshot_in_headless_chromium(rendered, tmp_path, width, height):
    image = screenshot(rendered / "reports" / "compare.html", tmp_path / "shot.png", width, height)
    assert image.size == (width, height)
    lo, hi = image.getextrema()
    assert hi - lo > 100, "the screenshot is blank"
    dark = sum(image.histogram()[:128])
    assert dark > 0.005 * width * height, "almost no text was drawn"


def test_finetune_memory_panels_name_their_own_units():
    """The fine-tune bar chart labelled every y-axis "MiB / parameters"; each panel now names its unit."""
    import pandas as pd

    from nblib.report import figures

    table = pd.DataFrame({"LoRA + 8-bit": {"footprint_mib": 13.5, "peak_memory_mib": 1040.0, "trainable_params": 153_792},
                          "Full fine-tune": {"footprint_mib": 12.7, "peak_memory_mib": 1060.0, "trainable_params": 3_320_768}})
    fig = figures.finetune_memory(table)
    assert [ax.get_ylabel() for ax in fig.axes if ax.axison] == ["MiB", "MiB", "parameters (log scale)"]


def test_figures_stay_legible_on_a_phone():
    """At 390 px a figure scaled to the page drew its text at about 4 px: on a phone the report shows
    figures at twice the page width in a box that scrolls sideways (text at about 8-12 px)."""
    import nblib.report

    css = (Path(nblib.report.__file__).parent / "style.css").read_text()
    phone = re.search(r"@media \(max-width:480px\)\{(.*)\}\s*$", css, re.S)
    assert phone and ".fig{overflow-x:auto}" in phone[1] and ".fig img{width:200%;max-width:none}" in phone[1]


# --------------------------------------------------------------------------- fine-tuning by source and task


def add_task_fields(root: Path, variant: str, rouge: float, sciq: bool = True) -> None:
    """Give every seed of ``runs/finetune-<variant>`` the by-source and task fields nblib.finetune writes
    (Alpaca, and SciQ unless not ``sciq``); seeds differ by 0.01."""
    for i, run in enumerate(sorted((root / "runs" / f"finetune-{variant}").glob("seed-*"))):
        s, w = runs.read_summary(run), 0.01 * i

        def scored(bpb: float, r: float, acc: float) -> tuple[dict, dict]:
            by = {"alpaca": {"loss": 3 * bpb, "bpb": bpb, "n": 40, "tokens": 900}}
            tasks = {"alpaca": {"task": "free_form", "rouge_l": r, "n": 40, "skipped": 0}}
            if sciq:
                by["sciq"] = {"loss": 2 * bpb, "bpb": bpb - 0.5, "n": 30, "tokens": 300}
                tasks["sciq"] = {"task": "choice", "accuracy": acc, "accuracy_norm": acc, "chance": 0.25, "n": 30, "skipped": 0}
            return by, tasks

        def harness(acc: float) -> dict:
            return {"sciq": {"task": "sciq", "acc": acc, "acc_norm": acc + 0.1, "n": 30, "skipped": 0}} if sciq else {}

        base_by, base_tasks = scored(2.0, 0.05, 0.3)
        by, tasks = scored(1.5 + w, rouge + w, 0.5 + w)
        runs.write_summary(run, {**s, "by_source": by, "base_by_source": base_by, "tasks": tasks, "base_tasks": base_tasks,
                                 "harness": harness(0.6 + w), "base_harness": harness(0.4)})


def test_finetune_rows_by_source_and_task_with_the_seed_spread(home):
    make_all_runs(home, ft_seeds=(1234, 1235))
    old = report.finetune_table(report.load())  # runs written before the fields: no rows, a note saying why
    assert not [k for k in old.index if ":" in k]
    assert "written before the per-source and task evaluation" in report.tables.absent_tasks_note(report.load())
    add_task_fields(home, "lora-8bit", 0.2)
    add_task_fields(home, "full", 0.3)
    add_task_fields(home, "lora-32bit", 0.25, sciq=False)  # a variant that lacks a source shows "–" there
    comparison = report.load()
    t = report.finetune_table(comparison)
    new = [k for k in t.index if ":" in k]
    assert new == ["loss:alpaca", "base_loss:alpaca", "bpb:alpaca", "base_bpb:alpaca", "n:alpaca",
                   "loss:sciq", "base_loss:sciq", "bpb:sciq", "base_bpb:sciq", "n:sciq",
                   "rouge_l:alpaca", "base_rouge_l:alpaca", "task_n:alpaca",
                   "accuracy:sciq", "base_accuracy:sciq", "chance:sciq", "task_n:sciq",
                   "lm_acc:sciq", "base_lm_acc:sciq", "lm_acc_norm:sciq", "base_lm_acc_norm:sciq", "lm_n:sciq"]
    rouge = t.loc["rouge_l:alpaca", "LoRA + 8-bit"]
    assert isinstance(rouge, report.Stat) and rouge.values == pytest.approx((0.2, 0.21))
    assert t.loc["base_rouge_l:alpaca", "Full fine-tune"].values == (0.05, 0.05)
    assert t.loc["n:alpaca", "Full fine-tune"] == 40 and t.loc["chance:sciq", "Full fine-tune"] == 0.25
    assert report.format_value(t.loc["accuracy:sciq", "LoRA + 32-bit"]) == "–"
    shown = report.format_table(t)
    assert shown.loc["Alpaca (chat format): ROUGE-L F", "Full fine-tune"] == "0.305 (0.3–0.31, n=2)"
    assert "SciQ (closed-book, chat format): chance level (1 / options)" in shown.index
    assert shown.loc["SciQ (lm-eval `sciq`): acc_norm", "Full fine-tune"] == "0.705 (0.7–0.71, n=2)"
    note = report.tables.absent_tasks_note(comparison)
    assert note == ("No Dolly dialogues in this profile's test split: no Dolly rows. No Natural Questions dialogues in "
                    "this profile's test split: no Natural Questions rows.")
    with pytest.MonkeyPatch.context() as mp:  # SciQ's 30 dialogues under the threshold: said to be a check only
        mp.setattr(report.tables, "FEW_SCORED", 35)
        assert report.tables.absent_tasks_note(comparison).endswith(
            "Test dialogues scored by task: SciQ 30. Under 35, a source's rows show that its metrics run, not how well "
            "the model does.")
    lines = report.glance.details(comparison, None, t)
    assert any(line.startswith("**Full fine-tune** on the test split: Alpaca: test bits per byte 1.5") and
               "SciQ (closed-book, chat format): multiple-choice accuracy 0.505 (base model 0.3); SciQ (closed-book, chat "
               "format): chance level (1 / options) 0.25; SciQ (lm-eval `sciq`): acc 0.605 (base model 0.4)" in line
               for line in lines)


def test_finetune_figures_by_source_and_cost_against_quality(home):
    from nblib.report import figures

    make_all_runs(home, ft_seeds=(1234, 1235))
    assert figures.finetune_by_source(report.load()) is None  # nothing scored by source
    for variant, rouge in (("lora-8bit", 0.2), ("lora-32bit", 0.25), ("full", 0.3)):
        add_task_fields(home, variant, rouge)
    comparison = report.load()
    fig = figures.finetune_by_source(comparison)
    axes = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in axes] == ["Alpaca: test bits per byte", "SciQ: test bits per byte"]
    heights = [round(p.get_height(), 3) for p in axes[0].patches]
    assert heights == [2.0, 2.0, 2.0, 1.505, 1.505, 1.505]  # base bars, then the fine-tuned (mean of two seeds)
    cost = pd.DataFrame({  # measure.finetune_cost's rows
        "LoRA + 8-bit": {"footprint_mib": 300.0, "trainable_params": 1e6, "total_params": 1.2e8, "peak_memory_mib": 900.0,
                         "step_seconds": 0.4},
        "Full fine-tune": {"footprint_mib": 480.0, "trainable_params": 1.2e8, "total_params": 1.2e8,
                           "peak_memory_mib": 2000.0, "step_seconds": 0.6}})
    fig = figures.finetune_cost_quality(comparison, cost)
    axes = [ax for ax in fig.axes if ax.axison]
    assert len(axes) == 6  # eval loss, Alpaca ROUGE-L, SciQ accuracy x peak memory, step time
    assert [ax.get_ylabel().replace("\n", " ") for ax in axes[::2]] == [
        "test loss (nats/assistant token, lower is better)", "Alpaca (chat format): ROUGE-L F (higher is better)",
        "SciQ (closed-book, chat format): multiple-choice accuracy (higher is better)"]
    points = {(round(x, 3), round(y, 3)) for line in axes[2].get_lines() for x, y in line.get_xydata()}
    # LoRA + 8-bit's run: 3 x 0.6 MiB peak at ROUGE-L 0.205; GPT-2 small's 900 MiB beside it; LoRA + 32-bit unmeasured
    assert {(1.8, 0.205), (900.0, 0.205), (4.8, 0.255), (2000.0, 0.305)} <= points and (900.0, 0.255) not in points
    assert [t.get_text() for t in fig.legends[0].texts] == ["the run (its model, its machine)",
                                                            "GPT-2 small, same variant, timed here side by side"]
    t = report.finetune_table(comparison)
    rep = report.compose(comparison, {"profile": "smoke"}, report.pretrain_table(comparison),
                         pd.DataFrame({"MHA": ["a"], "GQA": ["b"]}), t, finetune_cost=cost)
    titles = [s.title for s in rep.sections]
    assert titles.index("Fine-tuning variants") < titles.index("Fine-tuning by source: test bits per byte") < titles.index(
        "Fine-tuning: cost against quality")
    assert len(rep.sections[titles.index("At a glance")].payload) <= 6


def test_task_scores_are_compared_item_by_item_and_seed_by_seed(home):
    """A harness task's per-item scores give a verdict paired by seed and test item, corrected with the rest."""
    make_all_runs(home, ft_seeds=(1, 2, 3))
    for variant, right in (("full", 30), ("lora-8bit", 10), ("lora-32bit", 29)):
        for i, run in enumerate(sorted((home / "runs" / f"finetune-{variant}").glob("seed-*"))):
            s = runs.read_summary(run)
            items = [1.0 if j < right + i % 2 else 0.0 for j in range(40)]
            sciq = {"task": "sciq", "acc": sum(items) / 40, "acc_norm": 0.5, "n": 40, "skipped": 0, "items": {"acc": items}}
            runs.write_summary(run, {**s, "harness": {"sciq": sciq}, "base_harness": {"sciq": sciq}})
    comparison = report.load()
    calls = report.report_calls(comparison)
    g = comparison.finetune
    key = report.glance.task_key("harness", "sciq", "acc")
    worse = calls[g["Full fine-tune"], g["LoRA + 8-bit"], key]
    assert worse.called and worse.mean == pytest.approx(-0.5) and worse.items == 40 and worse.n == 3
    same = calls[g["Full fine-tune"], g["LoRA + 32-bit"], key]
    assert not same.called and same.low < 0 < same.high
    lines = report.glance.details(comparison, None, report.finetune_table(comparison))
    assert any("SciQ (lm-eval `sciq`) acc −0.500 [" in line and "(paired by seed and test item)" in line for line in lines)

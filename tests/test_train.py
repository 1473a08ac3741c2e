"""nblib.train: the pretraining loop, run folders, resume, faults, NaN stop, early stopping, budgets and DDP."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nblib import attention, config, lifecycle, optim, runs, train
from nblib.files import read_json, read_jsonl
from nblib.model import GPT, GPTConfig, load_checkpoint
from helpers import write_corpus

TINY = dict(context_length=32, n_layer=2, n_head=4, n_kv_head=4, d_model=32, dropout=0.1, batch_size=4,
            grad_accum_steps=2, max_steps=8, warmup_steps=2, log_interval=1, eval_interval=4, eval_batches=2,
            ckpt_interval=2, sample_tokens=8, wandb=False, export_hf=False)
CORPUS = {"train": 60_000, "val": 8_000, "test": 2_000}


@pytest.fixture
def corpus_home(home: Path, mirror: Path) -> Path:
    write_corpus(home, mirror, CORPUS)
    return home


def tiny(**kw) -> dict:
    return config.settings("train", "smoke", **{**TINY, **kw})


def folder(home: Path, name: str, seed: int = 1337) -> Path:
    return home / "runs" / name / f"seed-{seed}"


def losses(rows: list[dict]) -> list[tuple]:
    """What must match between two runs: each step's training loss and each eval's losses and sample."""
    return [(r["kind"], r["step"], r["tokens"], r["loss"]) if r["kind"] == "train"
            else (r["kind"], r["step"], r["train_loss"], r["val_loss"], r["sample"]) for r in rows]


def same_losses_across_processes(a: list[dict], b: list[dict]) -> None:
    """Two runs' losses where part of one ran in another process: the same steps and samples, losses
    equal to float noise. A process may take another BLAS kernel path for the same matmul (the BLAS can
    choose by buffer alignment, which each process's allocations decide: first losses ~1e-7 apart were
    seen), so bit-equality is asserted only within one process
    (test_resume_reaches_the_same_losses_as_an_uninterrupted_run)."""
    la, lb = losses(a), losses(b)
    assert [tuple(x for x in r if not isinstance(x, float)) for r in la] == \
        [tuple(x for x in r if not isinstance(x, float)) for r in lb]
    for ra, rb in zip(la, lb):
        assert [x for x in ra if isinstance(x, float)] == pytest.approx([x for x in rb if isinstance(x, float)], rel=1e-4), (ra, rb)


def test_lr_warmup_then_cosine():
    f = [optim.lr_factor(s, 10, 110, 0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1)


def test_adamw_decays_matrices_only():
    model = GPT(GPTConfig(vocab_size=50, context_length=8, n_layer=2, n_head=2, n_kv_head=1, d_model=16))
    opt = optim.configure(model, tiny(), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()


def test_settings_presets_and_steps():
    cfg = config.settings("train", "full", "gpt2-small", n_kv_head=2)
    assert (cfg["n_layer"], cfg["d_model"], cfg["context_length"], cfg["n_kv_head"]) == (12, 768, 1024, 2)
    assert cfg["preset"] == "gpt2-small" and train.default_name(cfg) == "pretrain-gqa"
    assert config.settings("train", "full")["seeds"] == [1337, 1338, 1339]
    with pytest.raises(ValueError, match="unknown preset"):
        config.settings("train", "full", "gpt3")
    with pytest.raises(config.SettingsError, match="did you mean 'n_layer'"):
        config.settings("train", "smoke", n_layers=3)
    full = config.settings("train", "full")  # epochs -> steps: tokens per step = 32 * 4 * 256
    assert train.max_steps_for(full, 32 * 4 * 256 * 10) == 50 and train.max_steps_for(tiny(), 10**9) == 8
    with pytest.raises(config.SettingsError, match="set max_steps or epochs"):
        train.max_steps_for({**tiny(), "max_steps": None}, 10**6)


@pytest.mark.parametrize("bad, message", [
    ({"learning_rate": 0}, "learning_rate=0 must be a number > 0"),
    ({"batch_size": 0}, "batch_size=0 must be an integer >= 1"),
    ({"batch_size": -4}, "batch_size=-4 must be an integer >= 1"),
    ({"max_steps": 0}, "max_steps=0 must be an integer >= 1, or null"),
    ({"max_steps": "abc"}, "max_steps='abc' must be an integer >= 1, or null"),
])
def test_bad_settings_are_refused_before_any_work(bad, message):
    with pytest.raises(config.SettingsError, match=message):
        tiny(**bad)


def test_a_context_no_split_or_machine_can_hold_is_refused_before_any_work(corpus_home: Path):
    with pytest.raises(config.SettingsError, match=re.escape("context_length=100000 must be an integer in [2, 8192]")):
        tiny(context_length=100_000)
    with pytest.raises(config.SettingsError, match=r"context_length=4096 needs windows of 4097 tokens, but the val "
                                                   r"split holds [\d,]+; lower context_length"):
        train.run(tiny(context_length=4096), progress=False)
    assert not list((corpus_home / "runs").rglob("*.*"))  # no checkpoint, summary or metrics written


def test_run_writes_the_run_folder_contract(corpus_home: Path):
    cfg = tiny(wandb=True, export_hf=True)
    summary = train.run(cfg, progress=False)
    run = folder(corpus_home, "pretrain-mha")
    assert summary == read_json(run / "summary.json") == runs.read_summary(run)
    assert set(runs.COMMON) | set(runs.PRETRAIN) <= set(summary) and summary["schema"] == runs.SCHEMA
    assert summary["finished"] and summary["stage"] == "pretrain" and summary["variant"] == "mha" and summary["label"] == "MHA"
    assert summary["folder"] == "runs/pretrain-mha/seed-1337" and summary["seed"] == 1337 and summary["stop_reason"] == "done"
    assert summary["steps"] == 8 and summary["tokens_seen"] == 8 * 4 * 2 * 32 and summary["compute_dtype"] == "float32"
    assert summary["kv_cache_bytes_per_token"] == {"float32": 2 * 2 * 4 * 8 * 4}
    assert summary["best_val_ppl"] == pytest.approx(math.exp(summary["best_val_loss"]))
    assert summary["best_val_loss"] < 10.5 < math.log(50257)  # it learned something in 8 steps
    assert 1.0 < summary["best_val_bpb"] < 8.0  # a real bits-per-byte figure for Portuguese text
    assert set(summary["data"]["corpus_sha256"]) == {"train", "val", "test"} and summary["data"]["tokens"]["train"] > 0
    assert summary["checkpoint"] == "runs/pretrain-mha/seed-1337/best.pt"
    assert summary["hf_export"] == "runs/pretrain-mha/seed-1337/hf"
    rows = read_jsonl(run / "metrics.jsonl")
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8] and [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))
    assert set(evals[-1]) >= {"kind", "step", "tokens", "wall", "train_loss", "val_loss", "val_ppl", "val_bpb", "lr",
                              "tokens_per_s", "mfu", "peak_memory_bytes", "sample"}
    assert evals[-1]["sample"].startswith(cfg["sample_prompt"]) and evals[-1]["mfu"] is None  # MFU only on GPU
    assert summary["final_val_loss"] == evals[-1]["val_loss"]
    best, ckpt = load_checkpoint(corpus_home / summary["checkpoint"])
    assert ckpt["val_loss"] == summary["best_val_loss"] and best.config.n_kv_head == 4
    assert (run / "hf" / "model.safetensors").is_file() and (run / "hf" / "tokenizer.json").is_file()
    assert list((run / "wandb").glob("offline-run-*"))  # W&B ran, offline, inside the run folder
    assert not (run / "ckpt.pt").exists() and not (run / "ckpt.prev.pt").exists()  # a finished run keeps no training state
    stamp = (run / "best.pt").stat().st_mtime_ns
    assert train.run(cfg, progress=False) == summary  # a finished run is returned, not retrained
    assert (run / "best.pt").stat().st_mtime_ns == stamp


def test_each_seed_is_its_own_run(corpus_home: Path):
    cfg = tiny(max_steps=2, eval_interval=2, seeds=[1, 2])
    a, b = (train.run(cfg, seed, progress=False) for seed in cfg["seeds"])
    assert (a["folder"], b["folder"]) == ("runs/pretrain-mha/seed-1", "runs/pretrain-mha/seed-2")
    assert a["best_val_loss"] != b["best_val_loss"]  # other init and data order
    assert a["data"] == b["data"] and a["config"]["seeds"] == [1, 2]


def test_resume_reaches_the_same_losses_as_an_uninterrupted_run(corpus_home: Path):
    cfg = tiny(n_kv_head=2)
    whole = train.run(cfg, name="whole", progress=False)
    first = train.run(cfg, name="split", stop_at=3, progress=False)
    assert not first["finished"] and first["steps"] == 3 and first["stop_reason"] == "stop_at"
    run = folder(corpus_home, "split")
    evals = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals == [0]  # a stop only writes a checkpoint: no extra evaluation at step 3
    train.run(cfg, name="split", stop_at=6, progress=False)
    shutil.copy(run / "ckpt.prev.pt", run / "step4.pt")  # the checkpoint before step 6's
    assert torch.load(run / "step4.pt", weights_only=True)["step"] == 4
    # The session dies after step 6 with step 4's checkpoint as the last one: steps 5-6 are redone.
    shutil.copy(run / "step4.pt", run / "ckpt.pt")
    second = train.run(cfg, name="split", progress=False)
    assert second["finished"] and second["steps"] == 8 and second["tokens_seen"] == whole["tokens_seen"]
    split_rows = read_jsonl(run / "metrics.jsonl")
    assert losses(split_rows) == losses(read_jsonl(folder(corpus_home, "whole") / "metrics.jsonl"))  # dropout included
    assert second["best_val_loss"] == whole["best_val_loss"] and second["best_step"] == whole["best_step"]
    gqa, _ = load_checkpoint(corpus_home / second["checkpoint"])  # GQA checkpoints reload in nblib
    assert gqa.config.variant == "gqa"


def test_best_pt_is_rolled_back_to_the_checkpoint_it_belongs_to(corpus_home: Path):
    """best.pt written by an evaluation after the last checkpoint is undone on resume."""
    cfg = tiny(ckpt_interval=4, learning_rate=1e-2)
    train.run(cfg, name="b", stop_at=4, progress=False)
    run = folder(corpus_home, "b")
    state = torch.load(run / "ckpt.pt", weights_only=True)
    step4 = state["state"]["best_step"]
    fake = GPT(train.model_config(cfg))  # as if an evaluation at step 6 had written best.pt, then the session died
    from nblib.model import save_checkpoint
    save_checkpoint(run / "best.pt", fake, settings=cfg, step=6, val_loss=0.1)
    train.run(cfg, name="b", stop_at=5, progress=False)
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["step"] == step4 and best["val_loss"] == state["state"]["best_val_loss"]


def test_changed_settings_are_refused_unless_overwrite(corpus_home: Path):
    train.run(tiny(max_steps=2), name="r", stop_at=2, progress=False)
    with pytest.raises(ValueError, match=r"different settings \(learning_rate: 0.003 -> 0.001\)"):
        train.run(tiny(max_steps=2, learning_rate=1e-3), name="r", progress=False)
    again = train.run(tiny(max_steps=2, learning_rate=1e-3), name="r", overwrite=True, progress=False)
    assert again["finished"] and again["config"]["learning_rate"] == 1e-3
    train.run(tiny(max_steps=2, learning_rate=1e-3, wandb=True, time_budget_minutes=60.0), name="r",
              progress=False)  # free settings do not count as changes


def test_an_old_schema_run_names_overwrite_and_is_replaced_with_it(corpus_home: Path):
    """The summary's advice and the refusal name the parameter that replaces the run, not just "re-run"."""
    cfg = tiny(n_kv_head=2, max_steps=2, eval_interval=2)
    train.run(cfg, progress=False)
    run = folder(corpus_home, "pretrain-gqa")
    old = {**read_json(run / "summary.json"), "schema": 1}
    (run / "summary.json").write_text(json.dumps(old))
    advice = ("re-run notebook 04_train_gqa with overwrite=True (pipeline: -p 04_train_gqa.overwrite=true; "
              "python -m nblib.train: --overwrite) to replace it")
    with pytest.raises(runs.RunError, match=re.escape(advice)):
        runs.read_summary(run)
    with pytest.raises(ValueError, match=re.escape(advice)):
        train.run(cfg, progress=False)
    assert train.run(cfg, overwrite=True, progress=False)["schema"] == runs.SCHEMA


def test_a_failed_overwrite_keeps_the_finished_run(corpus_home: Path, capsys):
    """overwrite=True that fails before training (no corpus to build token files from) leaves the old run as it was."""
    train.run(tiny(max_steps=2, eval_interval=2), name="w", progress=False)
    run = folder(corpus_home, "w")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    shutil.rmtree(corpus_home / "data" / "processed")
    with pytest.raises(FileNotFoundError, match="corpus split"):
        train.run(tiny(max_steps=3), name="w", overwrite=True, progress=False)
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["seed-1337"]
    assert "runs/w/seed-1337: the run it held is kept (overwrite failed before training)" in capsys.readouterr().out


def test_corrupt_checkpoint_falls_back_or_names_the_fix(corpus_home: Path, capsys):
    cfg = tiny()
    train.run(cfg, name="c", stop_at=4, progress=False)
    run = folder(corpus_home, "c")
    data = (run / "ckpt.pt").read_bytes()
    (run / "ckpt.pt").write_bytes(data[: len(data) // 3])  # truncated, as by a full disk
    resumed = train.run(cfg, name="c", stop_at=5, progress=False)
    assert "resuming from runs/c/seed-1337/ckpt.prev.pt (step 2)" in capsys.readouterr().out
    assert resumed["steps"] == 5
    for name in ("ckpt.pt", "ckpt.prev.pt"):
        (run / name).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"runs/c/seed-1337/ckpt.pt cannot be read .* overwrite=True"):
        train.run(cfg, name="c", progress=False)


def test_orphan_temp_files_are_removed_at_start(corpus_home: Path, capsys):
    cfg = tiny(max_steps=2)
    train.run(cfg, name="o", stop_at=1, progress=False)
    run = folder(corpus_home, "o")
    (run / ".ckpt.pt.next.tmp").write_bytes(b"x" * 1000)  # what a kill -9 during a checkpoint write leaves
    (run / ".summary.json.ab12.tmp").write_text("{")
    train.run(cfg, name="o", progress=False)
    assert not list(run.glob(".*.tmp"))
    assert "removed .ckpt.pt.next.tmp (1,000 bytes" in capsys.readouterr().out


def test_non_finite_loss_names_the_step_and_last_checkpoint(corpus_home: Path):
    cfg = tiny()
    train.run(cfg, name="nan", stop_at=4, progress=False)
    ckpt_path = folder(corpus_home, "nan") / "ckpt.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["model"]["transformer.ln_f.weight"][0] = float("nan")  # weights broken after step 4
    torch.save(ckpt, ckpt_path)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 5.*runs/nan/seed-1337/ckpt.pt \(step 4\)"):
        train.run(cfg, name="nan", progress=False)


def test_a_diverging_run_stops_at_its_first_blown_up_loss_and_says_so(corpus_home: Path, capsys):
    """Issue 30 case 4: learning_rate=10 sends the loss from 10.8 to hundreds at step 2. The run stops there
    (no perplexity overflow, no sampling from broken weights), keeps step 1's checkpoint, records why, the
    command prints one line naming the learning rate, and the report refuses the run."""
    from nblib.report import loading

    settings = {**TINY, "ckpt_interval": 1, "learning_rate": 10, "min_lr": 1}
    params = [a for k, v in settings.items() for a in ("-p", f"{k}={json.dumps(v)}")]
    assert train.main(["--profile", "smoke", "--name", "dv", *params]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # the progress bar aside
    assert len(err) == 1 and re.fullmatch(
        r"python -m nblib.train: error: dv seed 1337: the loss is [\d.e+]+ at step 2: training diverged and stopped "
        r"\(learning_rate=10\)\. Last good checkpoint: runs/dv/seed-1337/ckpt.pt \(step 1\)\. Try a lower learning_rate "
        r"or more warmup_steps, then run again with overwrite=True .*", err[0]), err
    run = folder(corpus_home, "dv")
    summary = runs.read_summary(run)
    assert (summary["finished"], summary["stop_reason"], summary["diverged_step"], summary["steps"]) == (False, "diverged", 2, 1)
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 1 and not (run / "hf").exists()
    with pytest.raises(loading.MissingRunError, match=r"runs/dv/seed-1337 diverged \(at step 2\): re-run notebook .* "
                                                      r"with a lower learning_rate and overwrite=True"):
        loading.load_group("dv")


def test_a_non_finite_gradient_norm_stops_before_the_step_is_applied(corpus_home: Path, monkeypatch):
    """An inf gradient with a finite loss (fp32: no grad scaler to skip it) stops the run at that step."""
    real_backward, real_build, params, calls = torch.Tensor.backward, train.build, [], []

    def backward(self, *args, **kwargs):  # step 2's first micro-batch: one gradient becomes inf
        real_backward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            next(p for p in params if p.grad is not None).grad.fill_(float("inf"))

    def build(*args, **kwargs):
        s = real_build(*args, **kwargs)
        params.extend(s.model.parameters())
        return s

    monkeypatch.setattr(train, "build", build)
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    with pytest.raises(lifecycle.Diverged, match=r"the gradient norm is inf at step 2: .*ckpt.pt \(step 1\)"):
        train.run(tiny(ckpt_interval=1), name="inf", progress=False)
    summary = runs.read_summary(folder(corpus_home, "inf"))
    assert (summary["stop_reason"], summary["diverged_step"]) == ("diverged", 2)


def test_perplexity_of_a_blown_up_loss_is_inf_not_an_error():
    assert lifecycle.loss_fields("val_", 1000.0, None)["val_ppl"] == math.inf
    assert lifecycle.loss_fields("val_", 2.0, 1.0)["val_ppl"] == pytest.approx(math.exp(2.0))
    assert math.isnan(lifecycle.perplexity(float("nan")))
    assert lifecycle.blown_up(float("nan")) and lifecycle.blown_up(600.0) and not lifecycle.blown_up(10.8)


def test_a_finished_run_without_its_summary_or_with_a_damaged_best_pt_is_refused_naming_it(corpus_home: Path):
    """Issue 30 cases 5 and 6: a finished run whose summary.json is gone is not wiped by a rerun; a damaged
    best.pt is refused, named, by the variant converted from it and by the compare stage."""
    from nblib import measure
    from nblib.report import loading

    cfg = tiny(max_steps=2, eval_interval=2, export_hf=True)
    train.run(cfg, progress=False)
    run = folder(corpus_home, "pretrain-mha")
    (run / "summary.json").unlink()
    kept = sorted(p.name for p in run.iterdir())
    with pytest.raises(config.Refused, match=r"runs/pretrain-mha/seed-1337 holds best.pt, hf but no summary.json, .* "
                                             r"it is kept\. .* or use another run name, or overwrite=True"):
        train.run(cfg, progress=False)
    assert sorted(p.name for p in run.iterdir()) == kept
    assert train.run(cfg, overwrite=True, progress=False)["finished"]
    group = loading.load_group("pretrain-mha")
    data = (run / "best.pt").read_bytes()
    (run / "best.pt").write_bytes(b"")
    with pytest.raises(config.Refused, match=r"runs/pretrain-mha/seed-1337/best.pt cannot be read \(EOFError.*\); "
                                             r"pretrain-gqa-uptrained is converted from it: re-run notebook 03_train_mha"):
        train.run(train.variant_settings(cfg, "gqa-uptrained"), name="pretrain-gqa-uptrained", progress=False)
    (run / "best.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(config.Refused, match=r"runs/pretrain-mha/seed-1337/best.pt cannot be read .*; re-run notebook "
                                             r"03_train_mha with overwrite=True"):
        measure.load_models({"MHA": group}, "cpu")


def test_a_damaged_best_pt_or_a_cut_metrics_line_does_not_block_a_resume(corpus_home: Path, capsys):
    """Issue 30 case 6: best.pt cut short or emptied is rebuilt from the best weights ckpt.pt carries, and a
    metrics.jsonl line a kill cut short is dropped, each with a warning."""
    cfg = tiny()
    train.run(cfg, name="dmg", stop_at=4, progress=False)
    run = folder(corpus_home, "dmg")
    best = run / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')
    assert train.run(cfg, name="dmg", stop_at=5, progress=False)["steps"] == 5
    out = capsys.readouterr().out
    assert "warning: runs/dmg/seed-1337/best.pt cannot be read" in out and "rebuilt from the best weights" in out
    assert "runs/dmg/seed-1337/metrics.jsonl:7: dropped a last line cut short" in out
    assert torch.load(best, weights_only=True)["step"] == 4
    best.write_bytes(b"")
    done = train.run(cfg, name="dmg", progress=False)
    assert done["finished"] and load_checkpoint(best)[1]["step"] == done["best_step"]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "eval"] == [0, 4, 8]


def test_early_stopping_on_val_loss(corpus_home: Path):
    """With a learning rate too small to move fp32 weights, val loss never improves: stop at the first eval."""
    summary = train.run(tiny(learning_rate=1e-30, min_lr=1e-31, patience=1, max_steps=20), name="flat", progress=False)
    assert summary["finished"] and summary["stop_reason"] == "early_stopping" and summary["steps"] == 4
    assert summary["best_step"] == 0


def test_time_budget_stops_with_a_checkpoint_and_the_next_session_resumes(corpus_home: Path):
    sizes = dict(max_steps=400, eval_interval=100, ckpt_interval=100, log_interval=50)
    first = train.run(tiny(**sizes, time_budget_minutes=0.2), name="budget", progress=False)
    assert not first["finished"] and first["stop_reason"] == "time_budget" and 0 < first["steps"] < 400
    assert first["wall_seconds"] < 0.2 * 60 + 20  # stopped near the budget (a loaded machine slows the checkpoint)
    ckpt = torch.load(folder(corpus_home, "budget") / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == first["steps"]
    # the next session (the budget is a free setting: a new session may have another) carries on
    second = train.run(tiny(**sizes), name="budget", stop_at=first["steps"] + 2, progress=False)
    assert second["steps"] == first["steps"] + 2


def test_a_budget_stop_says_so_and_its_rerun_keeps_one_step_0_evaluation(corpus_home: Path, capsys):
    """A budget spent before step 1: launch (what notebooks 03/04 call) raises with where it stopped, the
    CLI prints it, and the next session neither evaluates step 0 again nor loses anything."""
    with pytest.raises(RuntimeError, match=r"^t seed 1337 stopped at step 0 of 8 \(time budget\): run again with the "
                       r"same settings to resume from runs/t/seed-1337/ckpt.pt$"):
        train.launch(tiny(time_budget_minutes=0.001), name="t")
    params = [a for k, v in {**TINY, "time_budget_minutes": 0.001}.items() for a in ("-p", f"{k}={json.dumps(v)}")]
    assert train.main(["--profile", "smoke", "--name", "t", *params]) == 0
    assert capsys.readouterr().out.endswith("t seed 1337 stopped at step 0 of 8 (time budget): run again with the same "
                                            "settings to resume from runs/t/seed-1337/ckpt.pt\n")
    done = train.launch(tiny(), name="t")
    rows = read_jsonl(folder(corpus_home, "t") / "metrics.jsonl")
    assert done["finished"] and [r["step"] for r in rows if r["kind"] == "eval"] == [0, 4, 8]
    assert train.outcome(done) == f"t seed 1337: 8 steps, best val loss {done['best_val_loss']:.4f}, finished"


def test_fp16_grad_scaler_skipped_step_keeps_the_schedule(corpus_home: Path, monkeypatch):
    """fp16 + GradScaler on CPU: an inf gradient skips the step and leaves the LR schedule where it was;
    the scaler's state survives a resume."""
    cfg = tiny(dtype="float16", max_steps=4, eval_interval=4, ckpt_interval=1, grad_clip=0.0)
    calls = {"n": 0}
    real = torch.Tensor.backward

    def backward(self, *args, **kwargs):  # poison the gradients of step 2's first micro-batch
        real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            for p in train_model_params:
                if p.grad is not None:
                    p.grad.fill_(float("inf"))
                    break

    train_model_params: list = []
    real_build = train.build

    def build(*args, **kwargs):
        s = real_build(*args, **kwargs)
        train_model_params.extend(s.model.parameters())
        return s

    with monkeypatch.context() as m:
        m.setattr(train, "build", build)
        m.setattr(torch.Tensor, "backward", backward)
        summary = train.run(cfg, name="fp16", stop_at=3, progress=False)
    assert summary["compute_dtype"] == "float16" and summary["skipped_steps"] == 1
    ckpt = torch.load(folder(corpus_home, "fp16") / "ckpt.pt", weights_only=True)
    assert ckpt["scheduler"]["last_epoch"] == 2  # 3 steps taken, one skipped: the schedule moved twice
    assert ckpt["scaler"]["scale"] < 2.0**16  # the scaler backed off, and that state is saved
    done = train.run(cfg, name="fp16", progress=False)
    assert done["finished"] and done["skipped_steps"] == 1 and math.isfinite(done["best_val_loss"])


def test_bf16_autocast_trains_on_cpu(corpus_home: Path):
    summary = train.run(tiny(dtype="bfloat16", max_steps=2, eval_interval=2), name="bf16", progress=False)
    assert summary["compute_dtype"] == "bfloat16" and math.isfinite(summary["best_val_loss"])
    assert set(summary["kv_cache_bytes_per_token"]) == {"float32", "bfloat16"}


def test_ddp_two_processes_match_one_process(corpus_home: Path):
    """Two gloo processes, one micro-batch each, give the losses of one process taking both micro-batches."""
    cfg = tiny(dropout=0.0, max_steps=4, eval_interval=2)
    single = train.run(cfg, name="single", progress=False)
    params = [arg for k, v in TINY.items() if k != "dropout" for arg in ("-p", f"{k}={json.dumps(v)}")]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nblib.train",
         "--profile", "smoke", "--name", "ddp", *params, "-p", "dropout=0.0", "-p", "max_steps=4", "-p", "eval_interval=2"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ddp seed 1337: 4 steps" in proc.stdout
    ddp = read_json(folder(corpus_home, "ddp") / "summary.json")
    assert ddp["world_size"] == 2 and single["world_size"] == 1 and ddp["finished"]
    a = read_jsonl(folder(corpus_home, "single") / "metrics.jsonl")
    b = read_jsonl(folder(corpus_home, "ddp") / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        key = "loss" if ra["kind"] == "train" else "val_loss"
        assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra, rb)
    assert ddp["tokens_seen"] == single["tokens_seen"]
    # overwrite under DDP: rank 0 alone empties the folder and tells the other rank, behind a barrier
    again = subprocess.run(proc.args + ["--overwrite"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_json(folder(corpus_home, "ddp") / "summary.json")["best_val_loss"] == ddp["best_val_loss"]


def test_runs_table_and_metrics(corpus_home: Path):
    s = train.run(tiny(max_steps=2, eval_interval=2), name="p", progress=False)
    table = runs.table([s])
    assert list(table.columns) == ["runs/p/seed-1337"] and table.loc["steps", "runs/p/seed-1337"] == 2
    with pytest.raises(runs.RunError, match="train the run first"):
        runs.read_metrics(folder(corpus_home, "absent"))


def test_uptraining_converts_the_finished_mha_run_of_the_same_seed(corpus_home: Path):
    from nblib import data, machine, tokenizer
    from nblib.convert import convert_kv_heads

    cfg = tiny(uptrain_fraction=0.3)  # ceil(0.3 x 8) = 3 uptrain steps
    up_cfg = train.variant_settings(cfg, "gqa-uptrained")
    with pytest.raises(runs.RunError, match=r"pretrain-gqa-uptrained is converted from runs/pretrain-mha/seed-1337/"
                                            r"best.pt, which is missing: run notebook 03_train_mha \(seed 1337\)"):
        train.run(up_cfg, name="pretrain-gqa-uptrained", progress=False)
    train.run(cfg, stop_at=2, progress=False)
    with pytest.raises(runs.RunError, match="which is not finished: run notebook 03_train_mha"):
        train.run(up_cfg, name="pretrain-gqa-uptrained", progress=False)
    mha = train.run(cfg, progress=False)
    assert mha["init"] == "scratch" and mha["source_steps"] == 0 and mha["total_steps"] == mha["steps"] == 8
    with pytest.raises(config.SettingsError, match="cannot be converted from runs/pretrain-mha/seed-1337, trained with "
                                                   r"other settings \(learning_rate: 0.003 -> 0.001\)"):
        train.run({**up_cfg, "learning_rate": 1e-3}, name="pretrain-gqa-uptrained", progress=False)
    with pytest.raises(config.SettingsError, match="variant 'gqa-uptrained' with 2 K/V heads, but the settings have n_kv_head=4"):
        train.run(cfg, name="pretrain-gqa-uptrained", progress=False)

    up = train.run(up_cfg, name="pretrain-gqa-uptrained", progress=False)
    assert up["finished"] and up["variant"] == "gqa-uptrained" and up["label"] == "GQA uptrained" and up["n_kv_head"] == 2
    assert (up["init"], up["source_run"], up["conversion_method"], up["uptrain_fraction"]) == (
        "convert", "runs/pretrain-mha/seed-1337", "mean", 0.3)
    assert up["steps"] == up["max_steps"] == 3 and up["source_steps"] == 8 and up["total_steps"] == 11
    assert up["total_tokens"] == mha["tokens_seen"] + up["tokens_seen"] == 11 * 4 * 2 * 32
    assert up["uptrained_val_loss"] == up["final_val_loss"]
    # alpha = 0: the converted model's val loss, computed here from best.pt on the run's fixed val batches
    source, _ = load_checkpoint(corpus_home / mha["checkpoint"])
    converted = convert_kv_heads(source, 2, "mean", seed=1337)
    batches = train.fixed_batches(data.load_tokens(config.paths(), "val"), up_cfg, 1337, 2, torch.device("cpu"))
    direct, _ = train.evaluate_loss(converted, batches, machine.policy("float32"), torch.from_numpy(tokenizer.token_bytes()))
    assert up["converted_val_loss"] == pytest.approx(direct, rel=1e-6)
    assert up["converted_val_loss"] != mha["best_val_loss"]  # pooling K/V heads changes the model
    evals = [r for r in read_jsonl(folder(corpus_home, "pretrain-gqa-uptrained") / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2, 3] and evals[0]["val_loss"] == up["converted_val_loss"]
    # reported at the end of its budget, never the step-0 model, and on the test split
    assert (up["selection"], up["best_step"], up["best_val_loss"]) == ("end of budget", 3, evals[-1]["val_loss"])
    assert math.isfinite(up["test_bpb"]) and math.isfinite(up["converted_test_bpb"]) and up["test_bpb"] != up["converted_test_bpb"]
    assert load_checkpoint(corpus_home / up["checkpoint"])[1]["step"] == 3
    assert train.run(up_cfg, name="pretrain-gqa-uptrained", progress=False) == up  # finished: returned as is
    assert runs.read_summary(folder(corpus_home, "pretrain-mha"))["config"]["uptrain_fraction"] == 0.3


def test_uptraining_continues_the_source_schedule_and_optimizer(corpus_home: Path):
    """As the GQA paper uptrains: the source's learning rate where its schedule ended (no restart at the peak),
    its AdamW moments (K/V pooled like the weights), at least 5 evaluations, the last step reported."""
    from nblib.convert import convert_kv_heads, convert_kv_moments

    cfg = tiny(max_steps=20, warmup_steps=4, eval_interval=10, uptrain_fraction=0.25, patience=1)
    mha = train.run(cfg, progress=False)
    best = torch.load(corpus_home / mha["checkpoint"], weights_only=True)
    assert best["optimizer"]["state"] and mha["final_lr"] == pytest.approx(cfg["min_lr"])
    up_cfg = train.variant_settings(cfg, "gqa-uptrained")
    up = train.run(up_cfg, name="pretrain-gqa-uptrained", progress=False)
    rows = read_jsonl(folder(corpus_home, "pretrain-gqa-uptrained") / "metrics.jsonl")
    evals = [r for r in rows if r["kind"] == "eval"]
    # step 0's row logs the rate of the first uptraining step
    assert evals[0]["step"] == 0 and 0 < evals[0]["lr"] <= 1.5 * mha["final_lr"]
    assert max(r["lr"] for r in rows) <= 1.5 * mha["final_lr"]
    assert len([r for r in evals if r["step"] > 0]) >= 5 and up["steps"] == 5
    assert up["best_step"] == 5 and up["stop_reason"] == "done"  # patience never stops a converted run
    # the optimizer moments of the converted model: K/V pooled, everything else the source's
    ckpt = {"model": best["model"], "optimizer": best["optimizer"]}
    source, _ = load_checkpoint(corpus_home / mha["checkpoint"])
    converted = convert_kv_heads(source, 2, "mean")
    names = [n for g in optim.names(source) for n in g]
    moments = convert_kv_moments(ckpt["optimizer"], names, source.config, 2, "mean")
    opt = optim.configure(converted, up_cfg, torch.device("cpu"))
    opt.load_state_dict(moments)  # shapes fit the converted model
    i = names.index("transformer.h.0.attn.c_attn.weight")
    src_m, new_m = ckpt["optimizer"]["state"][i]["exp_avg"], opt.state_dict()["state"][i]["exp_avg"]
    hd = source.config.head_dim
    assert torch.equal(new_m[: 4 * hd], src_m[: 4 * hd])  # query rows kept
    torch.testing.assert_close(new_m[4 * hd : 5 * hd], src_m[4 * hd : 6 * hd].view(2, hd, -1).mean(0))  # K heads 0+1


def test_the_alpha_sweep_variants_uptrain_for_their_own_alpha(corpus_home: Path):
    """The GQA paper's Figure 5: each alpha variant runs its own share of the source's steps, whatever
    the profile's uptrain_fraction, and records it."""
    cfg = tiny(max_steps=40, eval_interval=40, uptrain_fraction=0.5)
    assert train.variant_settings(cfg, "gqa-uptrained")["uptrain_fraction"] == 0.5  # no alpha of its own
    train.run(cfg, progress=False)
    for key, alpha, steps in (("gqa-uptrained-alpha025", 0.025, 1), ("gqa-uptrained-alpha10", 0.1, 4)):
        v_cfg = train.variant_settings(cfg, key)
        assert v_cfg["uptrain_fraction"] == attention.get(key).alpha == alpha
        up = train.run(v_cfg, name=attention.get(key).folder, progress=False)
        assert (up["variant"], up["uptrain_fraction"], up["steps"], up["source_steps"]) == (key, alpha, steps, 40)
        assert up["selection"] == "end of budget" and up["best_step"] == steps


def test_equal_parameter_gqa_widens_the_mlp_to_mha_parameters_and_says_so(corpus_home: Path):
    cfg = tiny(max_steps=2, eval_interval=2)
    mha = train.run(cfg, progress=False)
    (name, params_cfg), = train.plan(cfg, ["gqa-params"])
    gqa = train.run(params_cfg, name=name, progress=False)
    assert name == "pretrain-gqa-params" and gqa["n_kv_head"] == 2 and gqa["label"] == "GQA (equal params)"
    assert mha["matched"] == "equal width" and mha["d_mlp"] == 4 * 32 and gqa["matched"] == "equal parameters"
    assert gqa["d_mlp"] > 4 * 32 and params_cfg == train.variant_settings(cfg, "gqa")  # the width is the variant's
    assert abs(gqa["params_blocks"] - mha["params_blocks"]) / mha["params_blocks"] < 0.005
    best, _ = load_checkpoint(corpus_home / gqa["checkpoint"])
    assert best.transformer.h[0].mlp.c_fc.out_features == gqa["d_mlp"]
    assert train.default_name({**cfg, "n_kv_head": 2}) == "pretrain-gqa"  # equal width is the plain GQA run


def test_plan_orders_scratch_before_converted_variants():
    from nblib import attention

    cfg = config.settings("train", "full")
    planned = [attention.of_run(n) for n, _ in train.plan(cfg)]  # notebook 04: the profile's variants but MHA
    assert {v.key for v in planned} == set(cfg["variants"]) - {"mha"} and {"gqa", "gqa-uptrained"} <= {v.key for v in planned}
    assert [v.converted for v in planned] == sorted(v.converted for v in planned)  # sources before their conversions
    assert [(n, c["n_kv_head"]) for n, c in train.plan(cfg, ["mqa-uptrained", "mha"])] == [
        ("pretrain-mha", 8), ("pretrain-mqa-uptrained", 1)]
    assert [n for n, _ in train.plan(cfg, ["mha"], "pretrain-gpt2-small")] == ["pretrain-gpt2-small"]
    with pytest.raises(config.SettingsError, match="did you mean 'gqa'"):
        train.plan(cfg, ["gqa2"])
    with pytest.raises(config.SettingsError, match="renames one run"):
        train.plan(cfg, None, "x")
    assert train.default_name(cfg) == "pretrain-mha" and train.default_name({**cfg, "n_kv_head": 4}) == "pretrain-gqa4"


def test_sigterm_stops_between_steps_with_a_checkpoint_and_resumes_exactly(corpus_home: Path):
    """SIGTERM (a Kaggle session ending; the pipeline sends its kernel SIGINT) used to end a run with
    the work since its last checkpoint lost: now the loop saves one at the next step boundary, says
    so, and the CLI exits 130 without a traceback; the rerun ends with an uninterrupted run's losses."""
    import signal
    import time

    settings = {**TINY, "max_steps": 60, "ckpt_interval": 1000, "eval_interval": 20, "log_interval": 1, "dropout": 0.0}
    params = [arg for k, v in settings.items() for arg in ("-p", f"{k}={json.dumps(v)}")]
    cmd = [sys.executable, "-m", "nblib.train", "--profile", "smoke", "--name", "stopped", *params]
    run = folder(corpus_home, "stopped")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait for a few training steps
        rows = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
        if sum(r["kind"] == "train" for r in rows) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    step = torch.load(run / "ckpt.pt", weights_only=True)["step"]  # no periodic checkpoint: the signal's own
    assert 3 <= step < 60 and f"stopped by SIGTERM at step {step} of 60, checkpoint saved" in out
    assert err.strip().endswith("python -m nblib.train: interrupted")
    final = train.run(tiny(**settings), name="stopped", progress=False)
    whole = train.run(tiny(**settings), name="whole", progress=False)
    assert final["finished"] and final["steps"] == 60
    same_losses_across_processes(read_jsonl(run / "metrics.jsonl"), read_jsonl(folder(corpus_home, "whole") / "metrics.jsonl"))


def test_kill_9_at_any_moment_loses_nothing(corpus_home: Path):
    """Kill the training process at several moments (checkpoint writes included): every restart resumes,
    no temp file survives the next start, and the final losses equal an uninterrupted run's."""
    settings = {**TINY, "max_steps": 40, "ckpt_interval": 1, "eval_interval": 10, "log_interval": 5, "dropout": 0.0}
    whole = train.run(tiny(**settings), name="whole", progress=False)
    params = [arg for k, v in settings.items() for arg in ("-p", f"{k}={json.dumps(v)}")]
    cmd = [sys.executable, "-m", "nblib.train", "--profile", "smoke", "--name", "killed", *params]
    run = folder(corpus_home, "killed")
    for delay in (4.0, 6.0, 7.5, 9.0):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL: no clean-up runs
            proc.wait()
    final = train.run(tiny(**settings), name="killed", progress=False)
    assert not list(run.glob(".*.tmp")) and not list(run.glob(".*tmp-*"))
    assert final["finished"] and final["steps"] == 40
    same_losses_across_processes(read_jsonl(run / "metrics.jsonl"), read_jsonl(folder(corpus_home, "whole") / "metrics.jsonl"))
    assert final["best_val_loss"] == pytest.approx(whole["best_val_loss"], rel=1e-4)


# --- nblib.lifecycle: what both trainers share ---------------------------------------------------


def test_loss_sum_counts_nats_per_token_and_bits_per_text_byte():
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0])
    targets = torch.tensor([0, 1, 2, -100])
    counted = lifecycle.LossSum(torch.tensor([2, 0, 3]))  # token 1 is special: no bytes
    counted.add(nll, targets, targets != -100)
    assert counted.loss == pytest.approx((1 + 2 + 3) / 3)
    assert counted.bpb == pytest.approx((1 + 3) / math.log(2) / (2 + 3))
    assert lifecycle.LossSum(None).bpb is None


def test_budget_keeps_a_running_mean_and_says_when_time_is_short():
    budget = lifecycle.Budget(1.0)
    budget.step(10.0)
    budget.step(20.0)
    assert budget.step_seconds == pytest.approx(0.8 * 10 + 0.2 * 20)
    assert not budget.short(30.0) and budget.short(61.0)
    assert not lifecycle.Budget(None).short(1e9)


def test_decide_refuses_other_settings_and_resumes_nothing_unrecorded(home: Path):
    run_dir = home / "runs" / "x" / "seed-1"
    run_dir.mkdir(parents=True)
    assert lifecycle.decide(run_dir, {"a": 1}, set(), "or start afresh", resumable=False) == (lifecycle.FRESH, None)
    with pytest.raises(ValueError, match=r"different settings \(a: None -> 1\); use the same settings to resume, or go"):
        lifecycle.decide(run_dir, {"a": 1}, set(), "or go")  # checkpoints, but no summary to say whose
    assert lifecycle.decide(run_dir, {"a": 1, "b": 2}, {"b"}, "", saved={"a": 1, "b": 3}) == (lifecycle.RESUME, None)

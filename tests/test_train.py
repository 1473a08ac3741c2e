"""nblib.train: the pretraining loop, run folders, resume, faults, NaN stop, early stopping, budgets and DDP."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nblib import config, runs, train
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


def test_lr_warmup_then_cosine():
    f = [train.lr_factor(s, 10, 110, 0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1)


def test_adamw_decays_matrices_only():
    model = GPT(GPTConfig(vocab_size=50, context_length=8, n_layer=2, n_head=2, n_kv_head=1, d_model=16))
    opt = train.configure_optimizer(model, tiny(), torch.device("cpu"))
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
    assert losses(read_jsonl(run / "metrics.jsonl")) == losses(read_jsonl(folder(corpus_home, "whole") / "metrics.jsonl"))
    assert final["best_val_loss"] == whole["best_val_loss"]

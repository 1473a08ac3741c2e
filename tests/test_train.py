"""nblib.train: the pretraining loop, run folders, resume, NaN stop, early stopping and DDP."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nblib import config, train
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
    return train.settings("smoke", **{**TINY, **kw})


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


def test_settings_presets_dtype_and_steps():
    cfg = train.settings("full", preset="gpt2-small", n_kv_head=2)
    assert (cfg["n_layer"], cfg["d_model"], cfg["context_length"], cfg["n_kv_head"]) == (12, 768, 1024, 2)
    assert cfg["preset"] == "gpt2-small" and train.default_name(cfg) == "pretrain-gqa"
    with pytest.raises(ValueError, match="unknown preset"):
        train.settings("full", preset="gpt3")
    with pytest.raises(ValueError, match="unknown setting"):
        train.settings("smoke", n_layers=3)
    assert train.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        train.resolve_dtype("float16", torch.device("cpu"))
    full = train.settings("full")  # epochs -> steps: tokens per step = 32 * 4 * 256
    assert train.max_steps_for(full, 32 * 4 * 256 * 10) == 50 and train.max_steps_for(tiny(), 10**9) == 8


def test_run_writes_the_run_folder_contract(corpus_home: Path):
    cfg = tiny(wandb=True, export_hf=True)
    summary = train.run(cfg, progress=False)
    run = corpus_home / "runs" / "pretrain-mha"
    assert summary == read_json(run / "summary.json")
    for key in ("name", "stage", "profile", "seed", "config", "machine", "wall_seconds", "peak_memory_bytes", "finished",
                "variant", "params", "params_embedding", "params_blocks", "n_layer", "n_head", "n_kv_head", "d_model",
                "context_length", "kv_cache_bytes_per_token", "best_val_loss", "best_val_ppl", "final_val_loss",
                "final_val_ppl", "train_tokens_per_s", "tokens_seen", "steps", "checkpoint", "hf_export"):
        assert key in summary, key
    assert summary["finished"] and summary["stage"] == "pretrain" and summary["variant"] == "mha"
    assert summary["steps"] == 8 and summary["tokens_seen"] == 8 * 4 * 2 * 32
    assert summary["kv_cache_bytes_per_token"] == {"float32": 2 * 2 * 4 * 8 * 4}
    assert summary["best_val_ppl"] == pytest.approx(math.exp(summary["best_val_loss"]))
    assert summary["best_val_loss"] < 10.5 < math.log(50257)  # it learned something in 8 steps
    assert summary["checkpoint"] == "runs/pretrain-mha/best.pt" and summary["hf_export"] == "runs/pretrain-mha/hf"
    rows = read_jsonl(run / "metrics.jsonl")
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8] and [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))
    assert set(evals[-1]) >= {"kind", "step", "tokens", "wall", "train_loss", "val_loss", "val_ppl", "lr", "tokens_per_s",
                              "mfu", "peak_memory_bytes", "sample"}
    assert evals[-1]["sample"].startswith(cfg["sample_prompt"]) and evals[-1]["mfu"] is None  # MFU only on GPU
    assert summary["final_val_loss"] == evals[-1]["val_loss"]
    best, ckpt = load_checkpoint(corpus_home / summary["checkpoint"])
    assert ckpt["val_loss"] == summary["best_val_loss"] and best.config.n_kv_head == 4
    assert (run / "hf" / "model.safetensors").is_file() and (run / "hf" / "tokenizer.json").is_file()
    assert list((run / "wandb").glob("offline-run-*"))  # W&B ran, offline, inside the run folder
    stamp = (run / "ckpt.pt").stat().st_mtime_ns
    assert train.run(cfg, progress=False) == summary  # a finished run is returned, not retrained
    assert (run / "ckpt.pt").stat().st_mtime_ns == stamp


def test_resume_reaches_the_same_losses_as_an_uninterrupted_run(corpus_home: Path):
    cfg = tiny(n_kv_head=2)
    whole = train.run(cfg, name="whole", progress=False)
    first = train.run(cfg, name="split", stop_at=4, progress=False)
    assert not first["finished"] and first["steps"] == 4
    run = corpus_home / "runs" / "split"
    shutil.copy(run / "ckpt.pt", run / "step4.pt")
    train.run(cfg, name="split", stop_at=6, progress=False)
    assert max(r["step"] for r in read_jsonl(run / "metrics.jsonl")) == 6
    # The session dies after step 6 with step 4's checkpoint as the last one: steps 5-6 are redone.
    shutil.copy(run / "step4.pt", run / "ckpt.pt")
    second = train.run(cfg, name="split", progress=False)
    assert second["finished"] and second["steps"] == 8 and second["tokens_seen"] == whole["tokens_seen"]
    split_rows = read_jsonl(run / "metrics.jsonl")
    whole_rows = read_jsonl(corpus_home / "runs" / "whole" / "metrics.jsonl")
    assert losses(split_rows) == losses(whole_rows)  # exactly equal, dropout included
    assert second["best_val_loss"] == whole["best_val_loss"]
    gqa, _ = load_checkpoint(corpus_home / second["checkpoint"])  # GQA checkpoints reload in nblib
    assert gqa.config.variant == "gqa"


def test_changed_settings_are_refused_unless_overwrite(corpus_home: Path):
    train.run(tiny(max_steps=2), name="r", stop_at=2, progress=False)
    with pytest.raises(ValueError, match=r"different settings \(learning_rate: 0.003 -> 0.001\)"):
        train.run(tiny(max_steps=2, learning_rate=1e-3), name="r", progress=False)
    again = train.run(tiny(max_steps=2, learning_rate=1e-3), name="r", overwrite=True, progress=False)
    assert again["finished"] and again["config"]["learning_rate"] == 1e-3


def test_non_finite_loss_names_the_step_and_last_checkpoint(corpus_home: Path):
    cfg = tiny()
    train.run(cfg, name="nan", stop_at=4, progress=False)
    ckpt_path = corpus_home / "runs" / "nan" / "ckpt.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["model"]["transformer.ln_f.weight"][0] = float("nan")  # weights broken after step 4
    torch.save(ckpt, ckpt_path)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 5.*runs/nan/ckpt.pt \(step 4\)"):
        train.run(cfg, name="nan", progress=False)
    with pytest.raises(FloatingPointError, match=r"at step 2.*none written yet"):
        train.run(tiny(learning_rate=float("inf")), name="inf", progress=False)


def test_early_stopping_on_val_loss(corpus_home: Path):
    """With a learning rate too small to move fp32 weights, val loss never improves: stop at the first eval."""
    summary = train.run(tiny(learning_rate=1e-30, min_lr=1e-31, patience=1, max_steps=20), name="flat", progress=False)
    assert summary["finished"] and summary["stopped_early"] and summary["steps"] == 4
    assert summary["best_step"] == 0


def test_ddp_two_processes_match_one_process(corpus_home: Path):
    """Two gloo processes, one micro-batch each, give the losses of one process taking both micro-batches."""
    cfg = tiny(dropout=0.0, max_steps=4, eval_interval=2)
    single = train.run(cfg, name="single", progress=False)
    params = [arg for k, v in TINY.items() if k != "dropout" for arg in ("-p", f"{k}={json.dumps(v)}")]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nblib.train",
         "--profile", "smoke", "--name", "ddp", *params, "-p", "dropout=0.0", "-p", "max_steps=4", "-p", "eval_interval=2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ddp: 4 steps" in proc.stdout
    ddp = read_json(corpus_home / "runs" / "ddp" / "summary.json")
    assert ddp["world_size"] == 2 and single["world_size"] == 1 and ddp["finished"]
    a = read_jsonl(corpus_home / "runs" / "single" / "metrics.jsonl")
    b = read_jsonl(corpus_home / "runs" / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        key = "loss" if ra["kind"] == "train" else "val_loss"
        assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra, rb)
    assert ddp["tokens_seen"] == single["tokens_seen"]


def test_plots_and_tables(corpus_home: Path):
    train.run(tiny(max_steps=4), name="p", progress=False)
    rows = train.load_metrics("p")
    fig = train.plot_losses({"p": rows})
    assert len(fig.axes) == 2 and all(len(ax.lines) == 2 for ax in fig.axes)
    table = train.summary_table([read_json(config.paths().run("p") / "summary.json")])
    assert list(table.columns) == ["p"] and table.loc["steps", "p"] == 4
    with pytest.raises(FileNotFoundError, match="train the run first"):
        train.load_metrics("absent")

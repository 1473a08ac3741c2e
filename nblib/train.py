"""Pretraining: one entry point, :func:`run`, shared by the MHA and GQA notebooks.

AdamW (decay on matrices only), linear warmup + cosine decay, gradient accumulation and
clipping, mixed precision (bf16 on GPUs that have it, fp16 with a grad scaler on T4/P100, fp32 on
CPU), optional ``torch.compile``, DDP under ``torchrun``. Every ``eval_interval`` steps the loss
on fixed train/val batches, throughput, MFU (GPU), peak memory, LR and a sample go to
``runs/<name>/metrics.jsonl`` and W&B; ``ckpt.pt`` (full training state) is written atomically
every ``ckpt_interval`` steps, ``best.pt`` (weights) whenever val loss improves. Calling
:func:`run` again with the same name and settings resumes from ``ckpt.pt``.
"""
from __future__ import annotations

import math
import os
import resource
import shutil
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from nblib import config, data, tokenizer, tracking
from nblib.files import append_jsonl, read_json, read_jsonl, write_json, write_jsonl
from nblib.model import GPT, GPTConfig, export_hf, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

STAGE = "train"
MODEL_KEYS = ("context_length", "n_layer", "n_head", "n_kv_head", "d_model", "dropout", "bias", "tie_embeddings")
# Settings that may change between sessions of one run without changing its results.
RESUME_FREE = ("torch_compile", "wandb")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Dense fp16/bf16 tensor-core peak FLOP/s per GPU, for MFU (matched by substring of the name).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12, "L4": 121e12,
              "V100": 125e12, "T4": 65e12, "P100": 18.7e12}


# ---------------------------------------------------------------------------------------------
# settings


def presets() -> dict[str, dict[str, Any]]:
    """Named size presets from ``profiles/train.yaml`` (``presets:``), e.g. ``gpt2-small``."""
    table = yaml.safe_load((config.PROFILE_DIR / f"{STAGE}.yaml").read_text(encoding="utf-8"))
    return table.get("presets", {})


def settings(profile: str = "auto", preset: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Training settings: the profile, then the named ``preset``'s sizes, then non-``None`` overrides."""
    sizes = {}
    if preset is not None:
        known = presets()
        if preset not in known:
            raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(known))}")
        sizes = known[preset]
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = config.settings(STAGE, profile, **{**sizes, **given})
    cfg["preset"] = preset
    return cfg


def model_config(cfg: Mapping[str, Any]) -> GPTConfig:
    """The :class:`GPTConfig` a settings dict describes (vocabulary: GPT-2's 50257)."""
    return GPTConfig(**{k: cfg[k] for k in MODEL_KEYS})


def default_name(cfg: Mapping[str, Any]) -> str:
    """``pretrain-mha``, ``pretrain-gqa`` or ``pretrain-mqa``."""
    return f"pretrain-{model_config(cfg).variant}"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs with compute capability >= 8 (A100, L4, H100), fp16 on older ones (T4, P100), fp32 on CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {name!r}")
    if device.type != "cuda" and name != "float32":
        raise ValueError(f"dtype {name!r} needs a CUDA GPU; on CPU use 'float32' (or 'auto')")
    return DTYPES[name]


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier at ``step``: linear warmup to 1, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def configure_optimizer(model: GPT, cfg: Mapping[str, Any], device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear weights, embeddings) and none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), fused=device.type == "cuda"
    )


def max_steps_for(cfg: Mapping[str, Any], train_tokens: int) -> int:
    """``max_steps`` when set, else enough optimizer steps for ``epochs`` passes over the train split."""
    if cfg["max_steps"] is not None:
        return int(cfg["max_steps"])
    if cfg["epochs"] is None:
        raise ValueError("set max_steps or epochs in the train settings")
    per_step = cfg["batch_size"] * cfg["grad_accum_steps"] * cfg["context_length"]
    return max(1, math.ceil(cfg["epochs"] * train_tokens / per_step))


# ---------------------------------------------------------------------------------------------
# measurements


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated on ``device``, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_flops(device: torch.device) -> float | None:
    """Dense half-precision peak FLOP/s of the GPU, or ``None`` (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def complete(
    model: GPT, prompt: str, max_new_tokens: int = 48, temperature: float = 0.8, top_k: int | None = 50, seed: int = 0
) -> str:
    """The prompt followed by ``max_new_tokens`` sampled tokens, decoded (seeded, KV-cached)."""
    enc = tokenizer.get_encoding()
    device = next(model.parameters()).device
    idx = torch.tensor([enc.encode_ordinary(prompt)], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return enc.decode(out[0].tolist())


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], autocast: AbstractContextManager
) -> float:
    """Mean loss over fixed batches, in eval mode (no dropout)."""
    model.eval()
    losses = []
    for x, y in batches:
        with autocast:
            _, loss = model(x, y)
        losses.append(loss.item())
    model.train()
    return float(np.mean(losses))


def fixed_batches(tokens: np.ndarray, cfg: Mapping[str, Any], salt: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``eval_batches`` batches drawn once from a seed, so every evaluation sees the same windows."""
    rng = np.random.default_rng([cfg["seed"], salt])
    return [data.get_batch(tokens, cfg["batch_size"], cfg["context_length"], rng, device) for _ in range(cfg["eval_batches"])]


# ---------------------------------------------------------------------------------------------
# the run


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) DDP job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0


def _init_distributed() -> Dist:
    """Join the DDP job ``torchrun`` describes in the environment (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size(), owns)


def _differences(saved: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
    keys = sorted((set(saved) | set(cfg)) - set(RESUME_FREE))
    return [f"{k}: {saved.get(k)!r} -> {cfg.get(k)!r}" for k in keys if saved.get(k) != cfg.get(k)]


def _relative(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def run(
    cfg: Mapping[str, Any],
    name: str | None = None,
    paths: config.Paths | None = None,
    *,
    overwrite: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain a GPT on the corpus token files; returns the run's ``summary.json`` contents.

    A run folder holding a checkpoint from the same settings is resumed (a finished run is
    returned as is); different settings are an error unless ``overwrite`` (which starts afresh).
    ``stop_at`` ends this session after that step with a checkpoint, leaving the run unfinished
    (e.g. before a Kaggle session's time limit); the next call carries on.
    """
    cfg = dict(cfg)
    paths = paths or config.paths()
    name = name or default_name(cfg)
    ddp = _init_distributed()
    try:
        return _run(cfg, name, paths, ddp, overwrite, stop_at, progress)
    finally:
        if ddp.owns_group:
            dist.destroy_process_group()


def _prepare_run_dir(run_dir: Path, cfg: dict[str, Any], ddp: Dist, overwrite: bool) -> dict[str, Any] | None:
    """Check the folder against ``cfg``; returns the checkpoint to resume from, if any."""
    ckpt_path = run_dir / "ckpt.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path.is_file() else None
    if ckpt is not None and not overwrite:
        diff = _differences(ckpt["settings"], cfg)
        if diff:
            raise ValueError(
                f"{run_dir} holds a checkpoint from different settings ({'; '.join(diff)}); "
                "use the same settings to resume, another run name, or overwrite=True to start afresh"
            )
        return ckpt
    if ddp.master and run_dir.exists() and (overwrite or ckpt is None):
        shutil.rmtree(run_dir)  # nothing resumable (or overwrite asked): start clean
    if ddp.world_size > 1:
        dist.barrier()
    return None


def _run(cfg: dict[str, Any], name: str, paths: config.Paths, ddp: Dist, overwrite: bool, stop_at: int | None, progress: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    run_dir = paths.run(name)
    ckpt_path, best_path = run_dir / "ckpt.pt", run_dir / "best.pt"
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
    resume = _prepare_run_dir(run_dir, cfg, ddp, overwrite)
    if resume is not None and summary_path.is_file() and read_json(summary_path).get("finished"):
        return read_json(summary_path)

    if ddp.master:
        tokens_manifest = data.build_token_files(paths)
    if ddp.world_size > 1:
        dist.barrier()
    if not ddp.master:
        tokens_manifest = data.build_token_files(paths)  # reuses rank 0's files
    train_tokens, val_tokens = data.load_tokens(paths, "train"), data.load_tokens(paths, "val")

    if torch.cuda.is_available():
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
        torch.set_float32_matmul_precision("high")
    else:
        device = torch.device("cpu")
    dtype = resolve_dtype(cfg["dtype"], device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    if cfg["grad_accum_steps"] % ddp.world_size:
        raise ValueError(
            f"grad_accum_steps={cfg['grad_accum_steps']} must be a multiple of the {ddp.world_size} DDP processes "
            "(each process takes an equal share of the micro-batches)"
        )
    max_steps = max_steps_for(cfg, tokens_manifest["splits"]["train"]["tokens"])
    my_micro = list(range(ddp.rank, cfg["grad_accum_steps"], ddp.world_size))
    tokens_per_step = cfg["batch_size"] * cfg["grad_accum_steps"] * cfg["context_length"]

    config.set_seed(cfg["seed"])
    mcfg = model_config(cfg)
    model = GPT(mcfg).to(device)
    optimizer = configure_optimizer(model, cfg, device)
    min_ratio = cfg["min_lr"] / cfg["learning_rate"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg["warmup_steps"], max_steps, min_ratio)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state = {"step": 0, "tokens_seen": 0, "best_val_loss": None, "best_step": None, "evals_since_best": 0,
             "wall_seconds": 0.0, "train_seconds": 0.0, "last_val_loss": None}
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["rng"]["torch"])
        if device.type == "cuda" and resume["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(resume["rng"]["cuda"], device)
        state.update({k: resume[k] for k in state})
        if ddp.master:  # drop metrics logged after the checkpoint: they will be logged again
            rows = read_jsonl(metrics_path) if metrics_path.is_file() else []
            write_jsonl(metrics_path, [r for r in rows if r["step"] <= state["step"]])
    wall_before = state["wall_seconds"]

    fwd_model = torch.compile(model) if cfg["torch_compile"] else model
    train_model = DDP(fwd_model, device_ids=[ddp.local_rank] if device.type == "cuda" else None) if ddp.world_size > 1 else fwd_model
    eval_sets = {"train": fixed_batches(train_tokens, cfg, 1, device), "val": fixed_batches(val_tokens, cfg, 2, device)}
    flops_token, peak = model.flops_per_token(), peak_flops(device)
    wandb_run = tracking.init_wandb(run_dir, name, {**cfg, "max_steps": max_steps}) if cfg["wandb"] and ddp.master else None

    def summary(finished: bool, stopped_early: bool = False, hf_dir: Path | None = None) -> dict[str, Any]:
        best, last = state["best_val_loss"], state["last_val_loss"]
        return {
            "name": name, "stage": "pretrain", "profile": cfg["profile"], "seed": cfg["seed"], "config": cfg,
            "machine": config.machine_info(), "finished": finished, "stopped_early": stopped_early,
            "wall_seconds": round(wall_before + time.perf_counter() - t_start, 3),
            "train_seconds": round(state["train_seconds"], 3),
            "peak_memory_bytes": peak_memory_bytes(device),
            "variant": mcfg.variant, "params": model.num_params(), "params_embedding": model.num_params("embedding"),
            "params_blocks": model.num_params("blocks"), "n_layer": mcfg.n_layer, "n_head": mcfg.n_head,
            "n_kv_head": mcfg.n_kv_head, "d_model": mcfg.d_model, "context_length": mcfg.context_length,
            "dtype": str(dtype).removeprefix("torch."), "world_size": ddp.world_size,
            "kv_cache_bytes_per_token": {"float32": model.kv_cache_bytes(1, 1, torch.float32),
                                         str(dtype).removeprefix("torch."): model.kv_cache_bytes(1, 1, dtype)},
            "best_val_loss": best, "best_val_ppl": math.exp(best) if best is not None else None,
            "best_step": state["best_step"],
            "final_val_loss": last, "final_val_ppl": math.exp(last) if last is not None else None,
            "train_tokens_per_s": state["tokens_seen"] / state["train_seconds"] if state["train_seconds"] else None,
            "tokens_seen": state["tokens_seen"], "steps": state["step"], "max_steps": max_steps,
            "checkpoint": _relative(best_path, paths.home) if best_path.is_file() else None,
            "hf_export": _relative(hf_dir, paths.home) if hf_dir is not None else None,
        }

    def evaluate(tokens_per_s: float | None) -> dict[str, Any]:
        train_loss = evaluate_loss(fwd_model, eval_sets["train"], autocast)
        val_loss = evaluate_loss(fwd_model, eval_sets["val"], autocast)
        return {
            "kind": "eval", "step": state["step"], "tokens": state["tokens_seen"],
            "wall": round(wall_before + time.perf_counter() - t_start, 3),
            "train_loss": train_loss, "train_ppl": math.exp(train_loss), "val_loss": val_loss, "val_ppl": math.exp(val_loss),
            "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s,
            "mfu": flops_token * tokens_per_s / (peak * ddp.world_size) if peak and tokens_per_s else None,
            "peak_memory_bytes": peak_memory_bytes(device),
            "sample": complete(model, cfg["sample_prompt"], cfg["sample_tokens"], seed=cfg["seed"]),
        }

    saved = {"step": resume["step"] if resume is not None else None}

    def save_state() -> None:
        saved["step"] = state["step"]
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        state["wall_seconds"] = wall_before + time.perf_counter() - t_start
        save_checkpoint(
            ckpt_path, model, settings=cfg, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(), rng={"torch": torch.get_rng_state(), "cuda": cuda_rng}, **state,
        )

    def record_eval(row: dict[str, Any]) -> bool:
        """Log an eval row, keep ``best.pt``; True when early stopping says stop."""
        append_jsonl(metrics_path, row)
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in row.items() if k not in ("kind", "step") and v is not None}, step=row["step"])
        state["last_val_loss"] = row["val_loss"]
        if state["best_val_loss"] is None or row["val_loss"] < state["best_val_loss"]:
            state.update(best_val_loss=row["val_loss"], best_step=row["step"], evals_since_best=0)
            save_checkpoint(best_path, model, settings=cfg, step=row["step"], val_loss=row["val_loss"])
        else:
            state["evals_since_best"] += 1
        return cfg["patience"] is not None and state["evals_since_best"] >= cfg["patience"]

    def agree(flag: bool) -> bool:
        """Rank 0's decision, shared with every DDP process."""
        if ddp.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    stopped_early = False
    try:
        if state["step"] == 0 and ddp.master:
            record_eval(evaluate(None))
            write_json(summary_path, summary(False))
        bar = tqdm(total=max_steps, initial=state["step"], desc=name, disable=not (progress and ddp.master), mininterval=1.0)
        window_tokens, window_seconds = 0, 0.0
        limit = max_steps if stop_at is None else min(stop_at, max_steps)
        while state["step"] < limit:
            t0 = time.perf_counter()
            step = state["step"]
            loss_sum = torch.zeros((), device=device)
            for i, micro in enumerate(my_micro):
                rng = np.random.default_rng([cfg["seed"], step, micro])
                x, y = data.get_batch(train_tokens, cfg["batch_size"], cfg["context_length"], rng, device)
                last = i == len(my_micro) - 1
                sync = nullcontext() if last or ddp.world_size == 1 else train_model.no_sync()
                with sync:
                    with autocast:
                        _, loss = train_model(x, y)
                    scaler.scale(loss / len(my_micro)).backward()
                loss_sum += loss.detach()
            if ddp.world_size > 1:
                dist.all_reduce(loss_sum)
            if cfg["grad_clip"]:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            lr = scheduler.get_last_lr()[0]
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            loss_value = loss_sum.item() / cfg["grad_accum_steps"]
            if not math.isfinite(loss_value):
                last_ckpt = (f"{_relative(ckpt_path, paths.home)} (step {saved['step']})" if saved["step"] is not None
                             else "none written yet")
                raise FloatingPointError(
                    f"{name}: loss is {loss_value} at step {step + 1}; training stopped. Last good checkpoint: "
                    f"{last_ckpt}. Lower learning_rate, raise warmup_steps or use dtype bfloat16/float32, then run again "
                    "(same settings resume from the checkpoint; overwrite=True starts afresh)."
                )
            dt = time.perf_counter() - t0
            state["step"] += 1
            state["tokens_seen"] += tokens_per_step
            state["train_seconds"] += dt
            window_tokens += tokens_per_step
            window_seconds += dt
            step = state["step"]
            bar.update(1)
            if ddp.master and (step % cfg["log_interval"] == 0 or step == max_steps):
                row = {"kind": "train", "step": step, "tokens": state["tokens_seen"],
                       "wall": round(wall_before + time.perf_counter() - t_start, 3), "loss": loss_value, "lr": lr}
                append_jsonl(metrics_path, row)
                if wandb_run is not None:
                    wandb_run.log({"loss": loss_value, "lr": lr}, step=step)
                bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            session_end = step == limit
            if step % cfg["eval_interval"] == 0 or session_end:
                stop = False
                if ddp.master:
                    stop = record_eval(evaluate(window_tokens / window_seconds))
                    bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{state['last_val_loss']:.3f}", refresh=False)
                window_tokens, window_seconds = 0, 0.0
                stopped_early = agree(stop)
                session_end = session_end or stopped_early
            if ddp.master and (step % cfg["ckpt_interval"] == 0 or session_end):
                save_state()
                write_json(summary_path, summary(False))
            if session_end:
                break
        bar.close()
        finished = state["step"] >= max_steps or stopped_early
        hf_dir = None
        if ddp.master and finished and cfg["export_hf"] and mcfg.variant == "mha":
            best_model, _ = load_checkpoint(best_path)
            hf_dir = export_hf(best_model, run_dir / "hf")
        result = summary(finished, stopped_early, hf_dir)
        if ddp.master:
            write_json(summary_path, result)
        return result
    finally:
        if wandb_run is not None:
            wandb_run.finish()


# ---------------------------------------------------------------------------------------------
# reading runs


def load_metrics(name: str, paths: config.Paths | None = None) -> list[dict[str, Any]]:
    """The rows of ``runs/<name>/metrics.jsonl``."""
    path = (paths or config.paths()).run(name) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics at {path}; train the run first (notebooks 03/04)")
    return read_jsonl(path)


def plot_losses(runs: Mapping[str, list[dict[str, Any]]]) -> Figure:
    """Loss vs optimizer step and vs tokens seen: training loss (thin) and val loss (markers) per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, x in zip(axes, ("step", "tokens")):
        for i, (name, rows) in enumerate(runs.items()):
            color = f"C{i}"
            train = [r for r in rows if r["kind"] == "train"]
            evals = [r for r in rows if r["kind"] == "eval"]
            ax.plot([r[x] for r in train], [r["loss"] for r in train], color=color, alpha=0.35, lw=1, label=f"{name} train")
            ax.plot([r[x] for r in evals], [r["val_loss"] for r in evals], "o-", color=color, ms=3, label=f"{name} val")
        ax.set_xlabel("optimizer step" if x == "step" else "tokens seen")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy loss (nats)")
    axes[1].legend(fontsize=8)
    fig.set_layout_engine("tight")
    return fig


def summary_table(summaries: list[dict[str, Any]]) -> pd.DataFrame:
    """Key figures of one or more pretraining summaries, one column per run."""
    import pandas as pd

    keys = ("variant", "params", "params_embedding", "params_blocks", "n_layer", "n_head", "n_kv_head", "d_model",
            "context_length", "steps", "tokens_seen", "best_val_loss", "best_val_ppl", "final_val_loss",
            "final_val_ppl", "train_tokens_per_s", "peak_memory_bytes", "wall_seconds", "finished")
    table = {s["name"]: {k: s[k] for k in keys} for s in summaries}
    for s in summaries:
        table[s["name"]]["kv_cache_bytes_per_token (fp32)"] = s["kv_cache_bytes_per_token"]["float32"]
    return pd.DataFrame(table)


# ---------------------------------------------------------------------------------------------
# command line (what torchrun launches for multi-GPU runs)


def main(argv: list[str] | None = None) -> int:
    """``python -m nblib.train`` / ``torchrun --standalone --nproc_per_node=2 -m nblib.train``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m nblib.train", description="Pretrain a GPT (one process or DDP under torchrun).")
    parser.add_argument("--profile", default="auto", help="smoke, full or auto")
    parser.add_argument("--preset", help="named sizes from profiles/train.yaml, e.g. gpt2-small")
    parser.add_argument("--name", help="run folder under runs/ (default pretrain-<variant>)")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing run of this name")
    parser.add_argument("--stop-at", type=int, help="end this session after this step (the run resumes later)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="a setting; VALUE is read as YAML")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"-p {item!r} is not KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    cfg = settings(args.profile, args.preset, **overrides)
    summary = run(cfg, args.name, overwrite=args.overwrite, stop_at=args.stop_at)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{summary['name']}: {summary['steps']} steps, best val loss {summary['best_val_loss']:.4f}, "
              f"finished={summary['finished']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

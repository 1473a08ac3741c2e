"""Pretraining: one entry point, :func:`run`, shared by the MHA and GQA notebooks.

Which runs there are is ``nblib.attention``'s table: :func:`plan` turns a profile's ``variants``
into run names and settings. A variant converted from another (``init`` ``convert``) starts from
the finished source run of the same seed, pools its K/V heads (``nblib.model.convert_kv_heads``)
and uptrains for ``uptrain_fraction`` of the source's steps (:func:`load_source`, :func:`build`).

The loop reads top to bottom like nanoGPT's ``train.py``: :func:`prepare` checks the run folder
(resume, refuse, or start afresh), :func:`build` makes the model, optimizer and data, :func:`restore`
loads a checkpoint, then each :func:`train_step` is followed by :func:`evaluate` every
``eval_interval`` steps and :func:`checkpoint` every ``ckpt_interval`` steps, and :func:`finish`
writes the summary (and the Hugging Face export of an MHA model).

AdamW (decay on matrices only), linear warmup + cosine decay, gradient accumulation and
clipping, the precision policy of ``nblib.machine`` (fp32 on CPU, bf16 or fp16 + grad scaler on
GPUs), optional ``torch.compile``, DDP under ``torchrun`` (:func:`launch` starts it from a notebook
on every visible GPU). A run is
``runs/<name>/seed-<seed>/``: ``metrics.jsonl``, ``summary.json`` (``nblib.runs``' schema),
``ckpt.pt`` (the full training state, with ``ckpt.prev.pt`` the one before it; both deleted once the
run finishes) and ``best.pt`` (weights at the best val loss). Calling :func:`run` again with the same settings resumes; where a
session stops (``stop_at``, ``time_budget_minutes``) never changes which steps are evaluated.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nblib import attention, config, data, lock, machine, runs, tokenizer, tracking
from nblib.files import TEMP_SUFFIX, remove_orphans
from nblib.model import GPT, GPTConfig, convert_kv_heads, export_hf, load_checkpoint, save_checkpoint
from nblib.progress import Progress

STAGE = "train"
MODEL_KEYS = ("context_length", "n_layer", "n_head", "n_kv_head", "d_model", "dropout", "bias", "tie_embeddings")
CKPT, PREV, BEST = "ckpt.pt", "ckpt.prev.pt", "best.pt"
LN2 = math.log(2)


# ---------------------------------------------------------------------------------------------
# settings and schedules


def model_config(cfg: Mapping[str, Any]) -> GPTConfig:
    """The :class:`GPTConfig` a settings dict describes (vocabulary: GPT-2's 50257)."""
    return GPTConfig(**{k: cfg[k] for k in MODEL_KEYS})


def default_name(cfg: Mapping[str, Any]) -> str:
    """The folder of the scratch variant (``nblib.attention``) with these heads, e.g. ``pretrain-gqa``;
    ``pretrain-<mha|gqa|mqa>-kv<n>`` for heads no variant has."""
    key = attention.scratch_key(cfg["n_kv_head"], cfg["n_head"])
    return attention.VARIANTS[key].folder if key else f"pretrain-{model_config(cfg).variant}-kv{cfg['n_kv_head']}"


def variant_settings(cfg: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``cfg`` with the K/V heads of variant ``key``."""
    return {**cfg, "n_kv_head": attention.get(key).kv_heads(cfg["n_head"])}


def plan(cfg: Mapping[str, Any], variants: list[str] | None = None, name: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """``(run name, settings)`` of each variant to train: ``variants``, or (``None``) every variant of
    the profile but MHA; scratch ones first, then the converted ones (whose sources must be done).
    ``name`` renames the run of a single variant (e.g. ``pretrain-gpt2-small``)."""
    keys = [k for k in cfg["variants"] if k != attention.BASELINE] if variants is None else list(variants)
    chosen = sorted((attention.get(k) for k in dict.fromkeys(keys)), key=lambda v: v.converted)
    if name and len(chosen) != 1:
        raise config.SettingsError(f"name={name!r} renames one run, but variants {', '.join(keys)} are {len(chosen)}: "
                                   "leave name unset or give a single variant")
    return [(name or v.folder, variant_settings(cfg, v.key)) for v in chosen]


def variant_of(name: str, cfg: Mapping[str, Any]) -> attention.Variant:
    """The variant run ``name`` trains: the registry's for a ``pretrain-<key>`` folder (its heads must be
    the settings'), else the scratch variant of the settings' heads (e.g. ``pretrain-gpt2-small``: MHA)."""
    known = attention.of_run(name)
    if known is not None:
        if known.kv_heads(cfg["n_head"]) != cfg["n_kv_head"]:
            raise config.SettingsError(
                f"run {name} is variant {known.key!r} with {known.kv_heads(cfg['n_head'])} K/V heads, but the settings "
                f"have n_kv_head={cfg['n_kv_head']}: use train.variant_settings(cfg, {known.key!r}) or another name"
            )
        return known
    key = attention.scratch_key(cfg["n_kv_head"], cfg["n_head"])
    kind = model_config(cfg).variant
    return attention.VARIANTS[key] if key else attention.Variant(kind, cfg["n_kv_head"], kind.upper(), "#000000")


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
        raise config.SettingsError("set max_steps or epochs in the train settings (both are null)")
    per_step = cfg["batch_size"] * cfg["grad_accum_steps"] * cfg["context_length"]
    return max(1, math.ceil(cfg["epochs"] * train_tokens / per_step))


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


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], policy: machine.Policy,
                  token_bytes: torch.Tensor) -> tuple[float, float]:
    """``(loss, bits per byte)`` over fixed batches in eval mode: the mean cross-entropy per token,
    and the nats of tokens that stand for text (special tokens excluded) / ln 2 / their UTF-8 bytes."""
    model.eval()
    total, nats, nbytes = 0.0, 0.0, 0
    for x, y in batches:
        with policy.autocast_context():
            logits, _ = model(x, y)
        per_token = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        b = token_bytes[y.flatten()]
        total += per_token.mean().item()
        nats += per_token[b > 0].sum().item()
        nbytes += int(b.sum())
    model.train()
    return total / len(batches), nats / LN2 / max(nbytes, 1)


def fixed_batches(tokens: np.ndarray, cfg: Mapping[str, Any], seed: int, salt: int,
                  device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``eval_batches`` batches drawn once from a seed, so every evaluation sees the same windows."""
    rng = np.random.default_rng([seed, salt])
    return [data.get_batch(tokens, cfg["batch_size"], cfg["context_length"], rng, device) for _ in range(cfg["eval_batches"])]


# ---------------------------------------------------------------------------------------------
# the session


@dataclass
class State:
    """What a checkpoint carries besides weights, optimizer, scheduler, scaler and RNG."""

    step: int = 0
    tokens_seen: int = 0
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    best_val_loss: float | None = None
    best_val_bpb: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    last_val_loss: float | None = None
    last_val_bpb: float | None = None
    skipped_steps: int = 0  # fp16 steps the grad scaler skipped (inf/nan gradients)
    initial_val_loss: float | None = None  # the step-0 evaluation (a converted model before uptraining)


@dataclass
class Session:
    """Everything one training session holds."""

    cfg: dict[str, Any]
    name: str
    seed: int
    run_dir: Path
    paths: config.Paths
    ddp: machine.Dist
    policy: machine.Policy
    model: GPT
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    max_steps: int
    micro: list[int]
    train_tokens: np.ndarray
    eval_sets: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    token_bytes: torch.Tensor
    data: dict[str, Any]
    variant: attention.Variant
    source: dict[str, Any] | None = None  # the summary of the run a converted variant starts from
    state: State = field(default_factory=State)
    best: dict[str, torch.Tensor] | None = None  # weights of the best evaluation (CPU copy)
    wandb: Any = None
    started: float = field(default_factory=time.perf_counter)
    wall_before: float = 0.0
    window: list[float] = field(default_factory=lambda: [0, 0.0])  # tokens, seconds since the last eval
    step_seconds: float = 0.0  # running mean, for the time budget
    ckpt_seconds: float = 1.0

    @property
    def device(self) -> torch.device:
        return self.policy.device.torch

    @property
    def tokens_per_step(self) -> int:
        return self.cfg["batch_size"] * self.cfg["grad_accum_steps"] * self.cfg["context_length"]

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.started


def identity(cfg: Mapping[str, Any], seed: int | None, name: str | None) -> tuple[int, str]:
    """The seed (default: the first of ``seeds``) and run name (default: ``pretrain-<variant>``) of a run."""
    return (cfg["seeds"][0] if seed is None else int(seed)), (name or default_name(cfg))


def run(
    cfg: Mapping[str, Any],
    seed: int | None = None,
    name: str | None = None,
    paths: config.Paths | None = None,
    *,
    overwrite: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain one seed of a GPT on the corpus token files; returns its ``summary.json``.

    ``seed`` defaults to the first of ``cfg["seeds"]``; ``name`` to ``pretrain-<variant>``. A run
    folder whose checkpoint has the same settings resumes (a finished run is returned as is);
    other settings are an error unless ``overwrite``, which starts afresh. ``stop_at`` ends this
    session after that step with a checkpoint, as ``time_budget_minutes`` does when time is short;
    the next call carries on.
    """
    cfg = dict(cfg)
    seed, name = identity(cfg, seed, name)
    cfg["seed"] = seed
    paths = paths or config.paths()
    variant_of(name, cfg)  # settings whose heads are not the named variant's are refused first
    machine.detect(local_rank=machine.local_rank())  # a GPU this torch cannot run is refused before any file is touched
    ddp = machine.distributed()
    try:
        run_dir = runs.folder(name, seed, paths)
        # overwrite: the old run waits aside until the new one is built (token files, tokenizer, model),
        # and comes back if that fails: a failed overwrite must not cost a finished run.
        # Rank 0 alone moves it and puts it back or deletes it (the ranks' clocks may name it apart).
        aside = run_dir.with_name(f".{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        mine = overwrite and ddp.master and run_dir.exists()
        if mine:
            os.replace(run_dir, aside)
        try:
            decision, ckpt = prepare(run_dir, cfg, ddp, overwrite)
            if decision == DONE:
                return runs.read_summary(run_dir)
            s = build(cfg, name, seed, run_dir, paths, ddp)
        except BaseException:
            if mine:
                shutil.rmtree(run_dir, ignore_errors=True)
                os.replace(aside, run_dir)
                print(f"{config.relative(run_dir)}: the run it held is kept (overwrite failed before training)")
            raise
        if mine:
            shutil.rmtree(aside)
        if ckpt is not None:
            restore(s, ckpt)
        return train_loop(s, stop_at, progress)
    finally:
        ddp.close()


def _load(path: Path) -> dict[str, Any]:
    """A checkpoint, or a clear error naming the file when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a bad pickle, a short read: all mean the file is damaged
        raise ValueError(f"{config.relative(path)} cannot be read ({type(e).__name__}: {str(e)[:120]})") from e


def _resumable(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint to resume from (``ckpt.pt``, else ``ckpt.prev.pt``) and a warning when the
    newer one was unreadable; ``(None, None)`` when there is none."""
    newest, prev = run_dir / CKPT, run_dir / PREV
    if not newest.is_file() and not prev.is_file():
        return None, None
    try:
        return _load(newest if newest.is_file() else prev), None
    except ValueError as broken:
        if newest.is_file() and prev.is_file():
            try:
                older = _load(prev)
            except ValueError:
                pass
            else:
                return older, f"{broken}; resuming from {config.relative(prev)} (step {older['step']}) instead"
        raise ValueError(
            f"{broken}, and no earlier good checkpoint is kept. Start afresh with {runs.afresh(run_dir.parent.name)}, "
            "or restore the file from a backup"
        ) from None


FRESH, RESUME, DONE, REFUSE = range(4)


def prepare(run_dir: Path, cfg: dict[str, Any], ddp: machine.Dist, overwrite: bool) -> tuple[int, dict[str, Any] | None]:
    """Rank 0 checks the run folder and decides for every process: ``RESUME`` (with the
    checkpoint), ``DONE`` (a finished run of the same settings), ``FRESH`` (the folder is emptied),
    or an error when the folder holds a run of other settings or an unreadable checkpoint."""
    decision, problem, ckpt = FRESH, "", None
    if ddp.master:
        for note in remove_orphans(run_dir):
            print(f"{config.relative(run_dir)}: {note}")
        try:
            decision, ckpt = (FRESH, None) if overwrite else _decide(run_dir, cfg)
        except (ValueError, OSError) as e:
            decision, problem = REFUSE, str(e)
        if decision == FRESH and run_dir.exists():
            shutil.rmtree(run_dir)
    decision = ddp.agree(decision, torch.device("cuda", ddp.local_rank) if torch.cuda.is_available() else torch.device("cpu"))
    if decision == REFUSE:
        raise ValueError(problem or f"rank 0 refused {config.relative(run_dir)}: see its message")
    ddp.barrier()
    if decision == RESUME and ckpt is None:
        ckpt, _ = _resumable(run_dir)
    return decision, ckpt if decision == RESUME else None


def _decide(run_dir: Path, cfg: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    ckpt, warning = _resumable(run_dir)
    if warning:
        print(f"warning: {warning}")
    summary_path = run_dir / "summary.json"
    summary = runs.read_summary(run_dir) if summary_path.is_file() else None
    saved = ckpt["settings"] if ckpt is not None else (summary or {}).get("config")
    # a run from scratch does not read uptrain_fraction (and runs older than it lack it)
    free = config.free_keys(STAGE) | (set() if variant_of(run_dir.parent.name, cfg).converted else {"uptrain_fraction"})
    diff = runs.settings_diff(saved, cfg, free) if saved is not None else []
    if diff:
        raise ValueError(
            f"{config.relative(run_dir)} holds a run of different settings ({'; '.join(diff)}); use the same "
            f"settings to resume, another run name, or {runs.afresh(run_dir.parent.name)} to start afresh"
        )
    if summary is not None and summary["finished"]:
        return DONE, None
    return (RESUME, ckpt) if ckpt is not None else (FRESH, None)


def check_context(cfg: Mapping[str, Any], tokens: Mapping[str, int]) -> None:
    """Refuse, before the model is built, a ``context_length`` the train or val split cannot fill:
    a batch is windows of ``context_length + 1`` tokens of one split."""
    short = {split: n for split, n in tokens.items() if split in ("train", "val") and n < cfg["context_length"] + 1}
    if short:
        raise config.SettingsError(
            f"context_length={cfg['context_length']} needs windows of {cfg['context_length'] + 1} tokens, but the "
            + " and ".join(f"{split} split holds {n:,}" for split, n in short.items())
            + "; lower context_length or give the corpus more text"
        )


def build(cfg: dict[str, Any], name: str, seed: int, run_dir: Path, paths: config.Paths, ddp: machine.Dist) -> Session:
    """Token files, precision policy, model, optimizer, schedule, scaler and fixed eval batches."""
    if ddp.master:
        manifest = data.build_token_files(paths)
    ddp.barrier()
    if not ddp.master:
        manifest = data.build_token_files(paths)  # reuses rank 0's files
    check_context(cfg, {split: info["tokens"] for split, info in manifest["splits"].items()})
    if cfg["grad_accum_steps"] % ddp.world_size:
        raise config.SettingsError(
            f"grad_accum_steps={cfg['grad_accum_steps']} must be a multiple of the {ddp.world_size} DDP processes "
            "(each process takes an equal share of the micro-batches)"
        )
    policy = machine.policy(cfg["dtype"], cfg["torch_compile"], machine.detect(local_rank=ddp.local_rank))
    for note in policy.notes if ddp.master else ():
        print(note)
    if policy.device.type == "cuda":
        torch.cuda.set_device(policy.device.torch)
        torch.set_float32_matmul_precision("high")
    device = policy.device.torch
    train_tokens, val_tokens = data.load_tokens(paths, "train"), data.load_tokens(paths, "val")
    info = {"corpus_sha256": manifest["corpus_sha256"],
            "tokens": {split: part["tokens"] for split, part in manifest["splits"].items()}}
    variant = variant_of(name, cfg)
    max_steps, warmup, source = max_steps_for(cfg, info["tokens"]["train"]), cfg["warmup_steps"], None

    config.set_seed(seed)
    if variant.converted:
        source_model, source = load_source(variant, cfg, seed, paths, info)
        model = convert_kv_heads(source_model, cfg["n_kv_head"], variant.method, seed=seed).to(device)
        # Uptraining is the pretraining recipe for alpha of the source's steps (Ainslie et al. 2023),
        # the schedule's shape squeezed into them: warmup_steps scaled by uptrain steps / the source's
        # max_steps (at least one when the source warmed up), then cosine from learning_rate to min_lr at
        # the last uptrain step. round(.., 9) keeps float noise (0.07 * 100 = 7.000000000000001) from adding a step.
        max_steps = max(1, math.ceil(round(cfg["uptrain_fraction"] * source["steps"], 9)))
        warmup = min(max_steps, max(int(warmup > 0), round(warmup * max_steps / source["max_steps"])))
    else:
        model = GPT(model_config(cfg)).to(device)
    optimizer = configure_optimizer(model, cfg, device)
    min_ratio = cfg["min_lr"] / cfg["learning_rate"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, max_steps, min_ratio))
    fwd = torch.compile(model) if policy.compile else model
    train_model = DDP(fwd, device_ids=[ddp.local_rank] if device.type == "cuda" else None) if ddp.world_size > 1 else fwd
    return Session(
        cfg=cfg, name=name, seed=seed, run_dir=run_dir, paths=paths, ddp=ddp, policy=policy, model=model,
        train_model=train_model, optimizer=optimizer, scheduler=scheduler, scaler=policy.grad_scaler(),
        max_steps=max_steps, micro=list(range(ddp.rank, cfg["grad_accum_steps"], ddp.world_size)),
        train_tokens=train_tokens,
        eval_sets={"train": fixed_batches(train_tokens, cfg, seed, 1, device), "val": fixed_batches(val_tokens, cfg, seed, 2, device)},
        token_bytes=torch.from_numpy(tokenizer.token_bytes()).to(device),
        data=info, variant=variant, source=source,
    )


def load_source(variant: attention.Variant, cfg: Mapping[str, Any], seed: int, paths: config.Paths,
                info: Mapping[str, Any]) -> tuple[GPT, dict[str, Any]]:
    """The best weights and summary of the finished run a converted variant starts from (same seed),
    refused when absent, unfinished, or trained with other settings (K/V heads and the free keys
    aside) or on other data."""
    src = attention.get(variant.source)
    run_dir = runs.folder(src.folder, seed, paths)
    where = config.relative(run_dir, paths.home)
    summary = runs.read_summary(run_dir) if (run_dir / "summary.json").is_file() else None
    if summary is None or not summary["finished"]:
        raise runs.RunError(
            f"{variant.folder} is converted from {where}/best.pt, which is "
            f"{'missing' if summary is None else 'not finished'}: run notebook {src.notebook} (seed {seed}) to its end "
            "first, with the same settings"
        )
    diff = runs.settings_diff(summary["config"], dict(cfg), config.free_keys(STAGE) | {"n_kv_head", "uptrain_fraction"})
    if summary["data"] != info:
        diff.append("data (the corpus token files differ)")
    if diff:
        raise config.SettingsError(f"{variant.folder} cannot be converted from {where}, trained with other settings "
                                   f"({'; '.join(diff)}): use that run's settings, or re-run notebook {src.notebook}")
    model, _ = load_checkpoint(paths.home / summary["checkpoint"])
    return model, summary


def restore(s: Session, ckpt: dict[str, Any]) -> None:
    """Load a checkpoint into the session; put ``best.pt`` and ``metrics.jsonl`` back in step with it."""
    s.model.load_state_dict(ckpt["model"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.scheduler.load_state_dict(ckpt["scheduler"])
    s.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if s.device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], s.device)
    s.state = State(**ckpt["state"])
    s.best = ckpt.get("best")
    s.wall_before = s.state.wall_seconds
    if s.ddp.master:
        runs.truncate_metrics(s.run_dir, s.state.step)  # rows after the checkpoint are logged again
        best_path = s.run_dir / BEST
        on_disk = torch.load(best_path, map_location="cpu", weights_only=True)["step"] if best_path.is_file() else None
        if s.best is not None and on_disk != s.state.best_step:  # best.pt came from an evaluation now undone
            _save_best(s)


@contextmanager
def stop_requests(active: bool) -> Iterator[list[int]]:
    """While active, SIGINT and SIGTERM (Ctrl-C, the pipeline interrupting its kernel, a Kaggle session
    ending) only ask for a stop: the list they fill is read between steps, where a checkpoint is
    exact (one in the middle of a step would not be). A second signal stops at once. Needs the main
    thread (signal handlers) and one process (DDP ranks would have to agree on the step)."""
    asked: list[int] = []
    if not active or threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def ask(signum: int, frame: object) -> None:
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_loop(s: Session, stop_at: int | None, progress: bool) -> dict[str, Any]:
    """Steps until ``max_steps``, early stopping, ``stop_at`` or the time budget; then :func:`finish`.
    A stop signal (:func:`stop_requests`) ends it with a checkpoint and ``KeyboardInterrupt``."""
    s.wandb = tracking.init_wandb(s.run_dir, s.run_dir.parent.name + f"-seed-{s.seed}",
                                  {**s.cfg, "max_steps": s.max_steps}) if s.cfg["wandb"] and s.ddp.master else None
    machine.reset_peak_memory(s.device)
    limit = s.max_steps if stop_at is None else min(stop_at, s.max_steps)
    reason = "done"
    bar = Progress(f"{s.name} seed {s.seed}", s.max_steps, initial=s.state.step, disable=not (progress and s.ddp.master))
    with stop_requests(s.ddp.world_size == 1) as asked:
        try:
            if s.state.step == 0 and s.state.last_val_loss is None and s.ddp.master:  # a session stopped at step 0 has it
                row = evaluate(s)
                s.state.initial_val_loss = row["val_loss"]
                record_eval(s, row)
                runs.write_summary(s.run_dir, summary(s, False, None, None))
            while s.state.step < limit:
                if asked:
                    if s.ddp.master:
                        checkpoint(s)
                    name = "SIGTERM" if asked[0] == signal.SIGTERM else "SIGINT"
                    print(f"{s.name} seed {s.seed}: stopped by {name} at step {s.state.step} of {s.max_steps}, checkpoint "
                          "saved; run again with the same settings to resume", flush=True)
                    raise KeyboardInterrupt(name)
                if out_of_time(s):
                    reason = "time_budget"
                    break
                loss = train_step(s)
                step = s.state.step
                if s.ddp.master and (step % s.cfg["log_interval"] == 0 or step == s.max_steps):
                    log_train(s, loss)
                stop = False
                if step % s.cfg["eval_interval"] == 0 or step == s.max_steps:
                    stop = bool(s.ddp.agree(int(record_eval(s, evaluate(s))) if s.ddp.master else 0, s.device))
                bar.update(1, loss=loss, **({"val": s.state.last_val_loss} if s.state.last_val_loss is not None else {}))
                if stop:
                    reason = "early_stopping"
                elif step == limit and limit < s.max_steps:
                    reason = "stop_at"
                if s.ddp.master and (step % s.cfg["ckpt_interval"] == 0 or stop or step == limit):
                    checkpoint(s)
                if stop:
                    break
            if reason == "time_budget" and s.ddp.master:
                checkpoint(s)
            return finish(s, reason)
        finally:
            bar.close()
            if s.wandb is not None:
                s.wandb.finish()


def out_of_time(s: Session) -> bool:
    """True when the time budget cannot fit another step and a checkpoint (rank 0 decides)."""
    budget = s.cfg["time_budget_minutes"]
    if budget is None:
        return False
    left = budget * 60 - (time.perf_counter() - s.started)
    return bool(s.ddp.agree(int(left < 2 * s.step_seconds + 2 * s.ckpt_seconds), s.device))


def train_step(s: Session) -> float:
    """One optimizer step over ``grad_accum_steps`` micro-batches; returns the mean loss.

    Micro-batch ``m`` of step ``t`` is drawn from ``(seed, t, m)``, so any number of DDP
    processes sees the same global batch. A step the fp16 grad scaler skips (inf gradients)
    leaves the LR schedule where it was.
    """
    t0 = time.perf_counter()
    step, cfg = s.state.step, s.cfg
    loss_sum = torch.zeros((), device=s.device)
    for i, micro in enumerate(s.micro):
        rng = np.random.default_rng([s.seed, step, micro])
        x, y = data.get_batch(s.train_tokens, cfg["batch_size"], cfg["context_length"], rng, s.device)
        last = i == len(s.micro) - 1
        with nullcontext() if last or s.ddp.world_size == 1 else s.train_model.no_sync():
            with s.policy.autocast_context():
                _, loss = s.train_model(x, y)
            s.scaler.scale(loss / len(s.micro)).backward()
        loss_sum += loss.detach()
    if s.ddp.world_size > 1:
        dist.all_reduce(loss_sum)
    if cfg["grad_clip"]:
        s.scaler.unscale_(s.optimizer)
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg["grad_clip"])
    scale = s.scaler.get_scale() if s.scaler.is_enabled() else None
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    if scale is not None and s.scaler.get_scale() < scale:
        s.state.skipped_steps += 1
    else:
        s.scheduler.step()
    loss_value = loss_sum.item() / cfg["grad_accum_steps"]
    if not math.isfinite(loss_value):
        ckpt = s.run_dir / CKPT
        last = (f"{config.relative(ckpt)} (step {torch.load(ckpt, weights_only=True)['step']})"
                if ckpt.is_file() else "none written yet")
        raise FloatingPointError(
            f"{s.name} seed {s.seed}: loss is {loss_value} at step {step + 1}; training stopped. Last good checkpoint: "
            f"{last}. Lower learning_rate, raise warmup_steps or use dtype bfloat16/float32, then run again "
            "(same settings resume from the checkpoint; overwrite=True starts afresh)."
        )
    dt = time.perf_counter() - t0
    s.state.step += 1
    s.state.tokens_seen += s.tokens_per_step
    s.state.train_seconds += dt
    s.window[0] += s.tokens_per_step
    s.window[1] += dt
    s.step_seconds = dt if s.step_seconds == 0 else 0.8 * s.step_seconds + 0.2 * dt
    return loss_value


def log_train(s: Session, loss: float) -> None:
    lr = s.scheduler.get_last_lr()[0]
    runs.append_metric(s.run_dir, {"kind": "train", "step": s.state.step, "tokens": s.state.tokens_seen,
                                   "wall": round(s.wall(), 3), "loss": loss, "lr": lr})
    if s.wandb is not None:
        s.wandb.log({"loss": loss, "lr": lr}, step=s.state.step)


def evaluate(s: Session) -> dict[str, Any]:
    """An eval row: train/val loss and bits per byte on fixed batches, throughput, MFU, peak memory, a sample."""
    fwd = s.train_model.module if isinstance(s.train_model, DDP) else s.train_model
    train_loss, train_bpb = evaluate_loss(fwd, s.eval_sets["train"], s.policy, s.token_bytes)
    val_loss, val_bpb = evaluate_loss(fwd, s.eval_sets["val"], s.policy, s.token_bytes)
    tokens, seconds = s.window
    tokens_per_s = tokens / seconds if seconds else None
    s.window = [0, 0.0]
    return {
        "kind": "eval", "step": s.state.step, "tokens": s.state.tokens_seen, "wall": round(s.wall(), 3),
        "train_loss": train_loss, "train_ppl": math.exp(train_loss), "train_bpb": train_bpb,
        "val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_bpb": val_bpb,
        "lr": s.scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s,
        "mfu": s.policy.mfu(s.model.flops_per_token(), tokens_per_s, s.ddp.world_size),
        "peak_memory_bytes": machine.peak_memory(s.device),
        "sample": complete(s.model, s.cfg["sample_prompt"], s.cfg["sample_tokens"], seed=s.seed),
    }


def record_eval(s: Session, row: dict[str, Any]) -> bool:
    """Log an eval row and keep the best weights; True when early stopping says stop."""
    runs.append_metric(s.run_dir, row)
    if s.wandb is not None:
        s.wandb.log({k: v for k, v in row.items() if k not in ("kind", "step") and v is not None}, step=row["step"])
    st = s.state
    st.last_val_loss, st.last_val_bpb = row["val_loss"], row["val_bpb"]
    if st.best_val_loss is None or row["val_loss"] < st.best_val_loss:
        st.best_val_loss, st.best_val_bpb, st.best_step, st.evals_since_best = row["val_loss"], row["val_bpb"], row["step"], 0
        s.best = {k: v.detach().to("cpu", copy=True) for k, v in s.model.state_dict().items()}
        _save_best(s)
    else:
        st.evals_since_best += 1
    return s.cfg["patience"] is not None and st.evals_since_best >= s.cfg["patience"]


def _save_best(s: Session) -> None:
    best = GPT(s.model.config)
    best.load_state_dict(s.best)
    save_checkpoint(s.run_dir / BEST, best, settings=s.cfg, step=s.state.best_step, val_loss=s.state.best_val_loss)


def checkpoint(s: Session) -> None:
    """Write ``ckpt.pt`` atomically, keeping the one before as ``ckpt.prev.pt``, and the summary."""
    t0 = time.perf_counter()
    s.state.wall_seconds = s.wall()
    ckpt = s.run_dir / CKPT
    cuda_rng = torch.cuda.get_rng_state(s.device) if s.device.type == "cuda" else None
    new = s.run_dir / f".{CKPT}.next{TEMP_SUFFIX}"  # a kill before the renames leaves only a temp file
    save_checkpoint(
        new, s.model, settings=s.cfg, optimizer=s.optimizer.state_dict(),
        scheduler=s.scheduler.state_dict(), scaler=s.scaler.state_dict(),
        rng={"torch": torch.get_rng_state(), "cuda": cuda_rng}, state=asdict(s.state), best=s.best,
        step=s.state.step,
    )
    if ckpt.is_file():
        os.replace(ckpt, s.run_dir / PREV)
    os.replace(new, ckpt)
    runs.write_summary(s.run_dir, summary(s, False, None, None))
    s.ckpt_seconds = max(s.ckpt_seconds, time.perf_counter() - t0)


def finish(s: Session, reason: str) -> dict[str, Any]:
    """The summary of this session (and, once finished, the HF export of an MHA model's best weights)."""
    finished = s.state.step >= s.max_steps or reason == "early_stopping"
    hf_dir = None
    if s.ddp.master and finished and s.cfg["export_hf"] and s.model.config.variant == "mha":
        best_model, _ = load_checkpoint(s.run_dir / BEST)
        hf_dir = export_hf(best_model, s.run_dir / "hf")
    result = summary(s, finished, reason, hf_dir)
    if s.ddp.master:
        result = runs.write_summary(s.run_dir, result)
        if finished:  # a finished run never resumes: its training state only takes disk (Kaggle keeps 20 GB)
            for name in (CKPT, PREV):
                (s.run_dir / name).unlink(missing_ok=True)
    return result


def summary(s: Session, finished: bool, reason: str | None, hf_dir: Path | None) -> dict[str, Any]:
    """This run's ``summary.json`` (``nblib.runs`` schema)."""
    st, m, c, v, src = s.state, s.model, s.model.config, s.variant, s.source
    best, last = st.best_val_loss, st.last_val_loss
    source_steps, source_tokens = (src["steps"], src["tokens_seen"]) if src else (0, 0)
    return {
        "name": s.name, "stage": "pretrain", "variant": v.key, "label": v.label,
        "folder": config.relative(s.run_dir, s.paths.home), "profile": s.cfg["profile"], "seed": s.seed,
        "config": s.cfg, "machine": machine.info(s.policy.device), "data": s.data,
        "compute_dtype": s.policy.dtype_name, "finished": finished, "stop_reason": reason,
        "wall_seconds": round(s.wall(), 3), "train_seconds": round(st.train_seconds, 3),
        "peak_memory_bytes": machine.peak_memory(s.device),
        "params": m.num_params(), "params_embedding": m.num_params("embedding"), "params_blocks": m.num_params("blocks"),
        "n_layer": c.n_layer, "n_head": c.n_head, "n_kv_head": c.n_kv_head, "d_model": c.d_model,
        "context_length": c.context_length,
        "kv_cache_bytes_per_token": {"float32": m.kv_cache_bytes(1, 1, torch.float32),
                                     s.policy.dtype_name: m.kv_cache_bytes(1, 1, s.policy.dtype)},
        "best_val_loss": best, "best_val_ppl": math.exp(best) if best is not None else None,
        "best_val_bpb": st.best_val_bpb, "best_step": st.best_step,
        "final_val_loss": last, "final_val_ppl": math.exp(last) if last is not None else None,
        "final_val_bpb": st.last_val_bpb,
        "train_tokens_per_s": st.tokens_seen / st.train_seconds if st.train_seconds else None,
        "tokens_seen": st.tokens_seen, "steps": st.step, "max_steps": s.max_steps, "skipped_steps": st.skipped_steps,
        "init": v.init, "source_run": src["folder"] if src else None, "conversion_method": v.method,
        "uptrain_fraction": s.cfg["uptrain_fraction"] if src else None,
        "converted_val_loss": st.initial_val_loss if src else None, "uptrained_val_loss": last if src else None,
        "source_steps": source_steps, "total_steps": source_steps + st.step, "total_tokens": source_tokens + st.tokens_seen,
        "world_size": s.ddp.world_size,
        "checkpoint": config.relative(s.run_dir / BEST, s.paths.home),
        "hf_export": config.relative(hf_dir, s.paths.home) if hf_dir is not None else None,
    }


# ---------------------------------------------------------------------------------------------
# every visible GPU: torchrun from a notebook


def world_size(cfg: Mapping[str, Any], processes: int | None = None) -> int:
    """DDP processes for a run: ``processes`` when given (2 on a CPU runs gloo), else one per visible
    GPU (``nblib.machine``), as many as divide ``grad_accum_steps`` (each takes an equal share)."""
    device, accum = machine.detect(), cfg["grad_accum_steps"]
    gpus = device.count if device.type == "cuda" else 1
    if processes is None:
        return max(n for n in range(1, gpus + 1) if accum % n == 0)
    if processes < 1 or (device.type == "cuda" and processes > gpus):
        raise config.SettingsError(f"processes={processes}: this machine has {gpus} {device.name} GPU(s) to train on")
    if accum % processes:
        raise config.SettingsError(f"processes={processes} must divide grad_accum_steps={accum} (each process takes "
                                   "an equal share of the micro-batches)")
    return processes


def torchrun_command(cfg: Mapping[str, Any], processes: int, seed: int, name: str, overwrite: bool = False) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N -m nblib.train`` for these settings: the profile,
    the preset and, as ``-p``, every setting that differs from them."""
    profile, preset = cfg["profile"], cfg.get("preset")
    defaults = config.settings(STAGE, profile, preset)
    changed = {k: v for k, v in cfg.items() if k not in ("profile", "preset", "seed") and v != defaults[k]}
    if config.settings(STAGE, profile, preset, **changed) != {k: v for k, v in cfg.items() if k != "seed"}:
        unsent = sorted(k for k, v in changed.items() if v is None)
        raise config.SettingsError(f"settings {', '.join(unsent)} are null where the profile sets them; torchrun "
                                   "cannot be given null (-p ignores it): set a value")
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", "nblib.train", "--profile", profile, *(["--preset", preset] if preset else []),
        "--seed", str(seed), "--name", name, *(["--overwrite"] if overwrite else []),
        *(arg for k, v in changed.items() for arg in ("-p", f"{k}={json.dumps(v)}")),
    ]


def launch(
    cfg: Mapping[str, Any],
    seed: int | None = None,
    name: str | None = None,
    paths: config.Paths | None = None,
    *,
    overwrite: bool = False,
    processes: int | None = None,
) -> dict[str, Any]:
    """Pretrain one seed on every visible GPU; returns its ``summary.json`` like :func:`run`, but a
    session the time budget stopped raises (:func:`outcome` says where; the next call resumes).

    One process (one GPU, a CPU, or already inside torchrun) trains here with :func:`run`; more
    (:func:`world_size`) run :func:`torchrun_command` as a child whose output is streamed here.
    A child that fails raises with each process's exception (:func:`stream`); Ctrl-C stops it (the run resumes from its last
    checkpoint next time).
    """
    n = 1 if "WORLD_SIZE" in os.environ else world_size(cfg, processes)
    if n == 1:
        return _finished(run(cfg, seed, name, paths, overwrite=overwrite))
    paths = paths or config.paths()
    seed, name = identity(cfg, seed, name)
    command = torchrun_command(cfg, n, seed, name, overwrite)
    print(f"{name} seed {seed}: {n} DDP processes (torchrun)", flush=True)
    stream(command, {**os.environ, "NBLIB_HOME": str(paths.home)})
    return _finished(runs.read_summary(runs.folder(name, seed, paths)))


def outcome(summary: Mapping[str, Any]) -> str:
    """One line on a run: its steps and best val loss once finished, else where it stopped and that
    running it again resumes it."""
    head = f"{summary['name']} seed {summary['seed']}"
    if summary["finished"]:
        return f"{head}: {summary['steps']} steps, best val loss {summary['best_val_loss']:.4f}, finished"
    why = {"time_budget": "time budget", "stop_at": "stop_at"}.get(summary["stop_reason"], summary["stop_reason"])
    return (f"{head} stopped at step {summary['steps']} of {summary['max_steps']} ({why}): run again with the same "
            f"settings to resume from {summary['folder']}/{CKPT}")


def _finished(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` of a finished run; a stopped one raises, so a notebook (and the pipeline) does not end as if done."""
    if not summary["finished"]:
        raise RuntimeError(outcome(summary))
    return summary


def stream(command: list[str], env: Mapping[str, str]) -> None:
    """Run ``command``, passing its output through as it comes (``\r`` progress updates included);
    a failure raises with each process's exception (torchrun prefixes lines ``[rankN]:``), rank 0's
    first, then the last lines."""
    tail: deque[str] = deque(maxlen=12)
    errors: dict[int, str] = {}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env)) as child:
        try:
            for line in io.TextIOWrapper(child.stdout, encoding="utf-8", errors="replace", newline=""):
                print(line, end="", flush=True)
                if line.startswith("[rank"):
                    tail.append(line.rstrip())
                    error = RANK_ERROR.match(line)
                    if error:
                        errors[int(error["rank"])] = line.rstrip()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)  # torchrun passes it to every process
            child.wait()
            raise
    if child.returncode:
        raised = "\n".join(errors[rank] for rank in sorted(errors)) or "(no exception line)"
        raise RuntimeError(f"torchrun exited with status {child.returncode} (its output is above):\n{raised}\n"
                           "the processes' last lines:\n" + "\n".join(tail))


RANK_ERROR = re.compile(r"\[rank(?P<rank>\d+)\]: [A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")


# ---------------------------------------------------------------------------------------------
# command line (what torchrun launches for multi-GPU runs)


@config.cli
def main(argv: list[str] | None = None) -> int:
    """``python -m nblib.train`` / ``torchrun --standalone --nproc_per_node=2 -m nblib.train``."""
    parser = config.stage_arguments("python -m nblib.train", "Pretrain a GPT (one process or DDP under torchrun).")
    parser.add_argument("--preset", help="named sizes from profiles/train.yaml, e.g. gpt2-small")
    parser.add_argument("--name", help="variant folder under runs/ (default pretrain-<variant>)")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing run of this name and seed")
    parser.add_argument("--stop-at", type=int, help="end this session after this step (the run resumes later)")
    args = parser.parse_args(argv)
    overrides = config.stage_overrides(parser, args)
    cfg = config.settings(STAGE, args.profile, args.preset, **overrides)
    with lock.hold("python -m nblib.train " + " ".join(sys.argv[1:] if argv is None else argv)):
        summary = run(cfg, args.seed, args.name, overwrite=args.overwrite, stop_at=args.stop_at)
    if machine.rank() == 0:
        print(outcome(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

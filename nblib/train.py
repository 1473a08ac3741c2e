"""Pretraining: one entry point, :func:`run`, shared by the MHA and GQA notebooks.

Which runs there are is ``nblib.attention``'s table: :func:`plan` turns a profile's ``variants``
into run names and settings. A variant converted from another (``init`` ``convert``) starts from
the finished source run of the same seed, pools its K/V heads (``nblib.convert.convert_kv_heads``)
and uptrains for ``uptrain_fraction`` of the source's steps (:func:`load_source`, :func:`build`).

The loop reads top to bottom like nanoGPT's ``train.py``: :func:`prepare` checks the run folder
(resume, refuse, or start afresh), :func:`build` makes the model, optimizer and data, :func:`restore`
loads a checkpoint, then each :func:`train_step` is followed by :func:`evaluate` every
``eval_interval`` steps and :func:`checkpoint` every ``ckpt_interval`` steps, and :func:`finish`
writes the summary (and the Hugging Face export of an MHA model). The run folder's files are
``nblib.pretrain_files``'; what both trainers share (resume or refuse, time budget, summary
fields, bits per byte) is ``nblib.lifecycle``; ``torchrun`` from a notebook is ``nblib.multigpu``.

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

import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nblib import attention, config, data, lifecycle, lock, machine, runs, tokenizer, tracking
from nblib.lifecycle import DONE
from nblib.convert import convert_kv_heads
from nblib.model import GPT, GPTConfig, export_hf, load_checkpoint, matched_d_mlp
from nblib.pretrain_files import BEST, CKPT, PREV, checkpoint, load_source, prepare, restore, save_best, stop_requests
from nblib.multigpu import RANK_ERROR, launch, outcome, stream, torchrun_command, world_size  # noqa: F401 (train.launch: notebooks)
from nblib.progress import Progress

STAGE = "train"
MODEL_KEYS = ("context_length", "n_layer", "n_head", "n_kv_head", "d_model", "dropout", "bias", "tie_embeddings")


# ---------------------------------------------------------------------------------------------
# settings and schedules


def model_config(cfg: Mapping[str, Any], variant: attention.Variant | None = None) -> GPTConfig:
    """The :class:`GPTConfig` a settings dict describes (vocabulary: GPT-2's 50257). A ``variant`` matched to
    MHA in parameters gets the MLP width that makes up for its smaller K/V projections (the width follows
    from the variant, not a setting, so its settings stay those of the same heads at equal width)."""
    c = GPTConfig(**{k: cfg[k] for k in MODEL_KEYS})
    if variant is not None and variant.match == "params":
        c = replace(c, d_mlp=matched_d_mlp(replace(c, n_kv_head=c.n_head), c.n_kv_head))
    return c


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
    total, text = 0.0, lifecycle.LossSum(token_bytes)
    for x, y in batches:
        with policy.autocast_context():
            logits, _ = model(x, y)
        per_token = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        total += per_token.mean().item()  # the mean of batch means: every window counts alike
        text.add(per_token, y.flatten())
    model.train()
    return total / len(batches), text.bpb


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
    ckpt_seconds: float = 1.0
    budget: lifecycle.Budget = field(init=False)

    def __post_init__(self) -> None:
        self.budget = lifecycle.Budget(self.cfg["time_budget_minutes"], self.started)

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
            decision, ckpt = prepare(run_dir, cfg, ddp, overwrite, variant_of(name, cfg).converted)
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
        model = GPT(model_config(cfg, variant)).to(device)
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
    if s.budget.minutes is None:
        return False
    return bool(s.ddp.agree(int(s.budget.short(2 * s.budget.step_seconds + 2 * s.ckpt_seconds)), s.device))


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
    s.budget.step(dt)
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
        **lifecycle.loss_fields("train_", train_loss, train_bpb), **lifecycle.loss_fields("val_", val_loss, val_bpb),
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
        save_best(s)
    else:
        st.evals_since_best += 1
    return s.cfg["patience"] is not None and st.evals_since_best >= s.cfg["patience"]


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
        **lifecycle.summary_head(
            name=s.name, stage="pretrain", variant=v.key, label=v.label, folder=config.relative(s.run_dir, s.paths.home),
            cfg=s.cfg, seed=s.seed, device=s.policy.device, data=s.data, compute_dtype=s.policy.dtype_name,
            finished=finished, reason=reason, wall_seconds=round(s.wall(), 3),
            train_seconds=round(st.train_seconds, 3), peak_memory_bytes=machine.peak_memory(s.device)),
        "params": m.num_params(), "params_embedding": m.num_params("embedding"), "params_blocks": m.num_params("blocks"),
        "n_layer": c.n_layer, "n_head": c.n_head, "n_kv_head": c.n_kv_head, "d_model": c.d_model,
        "d_mlp": c.mlp_width, "matched": v.matched, "context_length": c.context_length,
        "kv_cache_bytes_per_token": {"float32": m.kv_cache_bytes(1, 1, torch.float32),
                                     s.policy.dtype_name: m.kv_cache_bytes(1, 1, s.policy.dtype)},
        **lifecycle.loss_fields("best_val_", best, st.best_val_bpb), "best_step": st.best_step,
        **lifecycle.loss_fields("final_val_", last, st.last_val_bpb),
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

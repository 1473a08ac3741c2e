"""Pretraining: one entry point, :func:`run`, shared by the MHA and GQA notebooks.

Which runs there are is ``nblib.attention``'s table: :func:`plan` turns a profile's ``variants``
into run names and settings. A variant converted from another (``init`` ``convert``) starts from
the finished source run of the same seed, pools its K/V heads (``nblib.convert.convert_kv_heads``)
and uptrains for its alpha of the source's steps, continuing the source's optimizer and learning rate
(``nblib.optim.uptraining``).

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
run finishes) and ``best.pt`` (weights at the best val loss; a converted run's last step). Calling :func:`run` again with the same settings resumes; where a
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

from nblib import attention, config, data, lifecycle, lock, machine, optim, pretrain_files, runs, tokenizer, tracking
from nblib.lifecycle import DONE
from nblib.model import GPT, GPTConfig, export_hf, load_checkpoint, matched_d_mlp
from nblib.weights import read_checkpoint
from nblib.pretrain_files import BEST, CKPT, PREV, checkpoint, prepare, restore, save_best, stop_requests
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
    """``cfg`` with the K/V heads of variant ``key`` (and its own alpha, when it has one)."""
    v = attention.get(key)
    return {**cfg, "n_kv_head": v.kv_heads(cfg["n_head"]),
            **({"uptrain_fraction": v.alpha} if v.alpha is not None else {})}


def eval_interval(cfg: Mapping[str, Any], steps: int, converted: bool) -> int:
    """Steps between evaluations: ``eval_interval``, or for a converted run at least 5 in its short budget."""
    return max(1, min(cfg["eval_interval"], steps // 5)) if converted else cfg["eval_interval"]


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
    test_loss: float | None = None  # the selected checkpoint on the test split, once finished
    test_bpb: float | None = None
    evals_since_best: int = 0
    last_val_loss: float | None = None
    last_val_bpb: float | None = None
    skipped_steps: int = 0  # fp16 steps the grad scaler skipped (inf/nan gradients)
    initial_val_loss: float | None = None  # the step-0 evaluation (a converted model before uptraining)
    initial_val_bpb: float | None = None
    initial_test_loss: float | None = None  # the converted model (alpha = 0) on the test split
    initial_test_bpb: float | None = None


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
    eval_interval: int = 1  # steps between evaluations (a converted run's: at least 5 in its budget)
    state: State = field(default_factory=State)
    best: dict[str, torch.Tensor] | None = None  # weights of the selected evaluation (CPU copy)
    best_optimizer: dict[str, Any] | None = None  # its optimizer state (CPU copy), kept for converted variants
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
    def selection(self) -> str:
        """How the reported checkpoint is chosen: a converted run is its last step (the paper's alpha budget),
        a run from scratch its best val evaluation (early stopping)."""
        return "end of budget" if self.variant.converted else "best val"

    @property
    def keeps_optimizer(self) -> bool:
        """A variant others are converted from keeps the optimizer state of its best weights for their uptraining."""
        return any(v.source == self.variant.key for v in attention.VARIANTS.values())

    @property
    def tokens_per_step(self) -> int:
        return self.cfg["batch_size"] * self.cfg["grad_accum_steps"] * self.cfg["context_length"]

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.started


def identity(cfg: Mapping[str, Any], seed: int | None, name: str | None) -> tuple[int, str]:
    """The seed (default: the first of ``seeds``) and run name (default: ``pretrain-<variant>``) of a run."""
    return (cfg["seeds"][0] if seed is None else int(seed)), (default_name(cfg) if name is None else name)


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
        run_dir = runs.claim(name, seed, paths, read_files=ddp.master)  # one folder under runs/, not another program's
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


def build(cfg: dict[str, Any], name: str, seed: int, run_dir: Path, paths: config.Paths, ddp: machine.Dist) -> Session:
    """Token files, precision policy, model, optimizer, schedule, scaler and fixed eval batches."""
    if ddp.master:
        manifest = data.build_token_files(paths)
    ddp.barrier()
    if not ddp.master:
        manifest = data.build_token_files(paths)  # reuses rank 0's files
    data.check_context(cfg, {split: info["tokens"] for split, info in manifest["splits"].items()})
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
    max_steps, source = max_steps_for(cfg, info["tokens"]["train"]), None

    config.set_seed(seed)
    if variant.converted:
        model, optimizer, scheduler, source, max_steps = optim.uptraining(variant, cfg, seed, paths, info, device)
    else:
        model = GPT(model_config(cfg, variant)).to(device)
        optimizer = optim.configure(model, cfg, device)
        scheduler = optim.schedule(optimizer, cfg, max_steps)
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
        eval_interval=eval_interval(cfg, max_steps, variant.converted),
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
                first_eval(s)
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
                if step % s.eval_interval == 0 or step == s.max_steps:
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
        except lifecycle.Diverged as e:  # the checkpoints stay as they were: the last good state
            if s.ddp.master:
                runs.write_summary(s.run_dir, {**pretrain_files.summary(s, False, "diverged", None), "diverged_step": e.step})
            raise
        finally:
            bar.close()
            if s.wandb is not None:
                s.wandb.finish()


def first_eval(s: Session) -> None:
    """The step-0 evaluation (for a converted variant also on the test split: alpha = 0), after a first summary:
    a folder holding ``best.pt`` always has one (``lifecycle.decide`` refuses one without)."""
    runs.write_summary(s.run_dir, pretrain_files.summary(s, False, None, None))
    row = evaluate(s)
    s.state.initial_val_loss, s.state.initial_val_bpb = row["val_loss"], row["val_bpb"]
    if s.variant.converted:  # alpha = 0: the converted model, reported on its own
        s.state.initial_test_loss, s.state.initial_test_bpb = test_loss(s, s.model)
    record_eval(s, row)
    runs.write_summary(s.run_dir, pretrain_files.summary(s, False, None, None))


def out_of_time(s: Session) -> bool:
    """True when the time budget cannot fit another step and a checkpoint (rank 0 decides)."""
    if s.budget.minutes is None:
        return False
    return bool(s.ddp.agree(int(s.budget.short(2 * s.budget.step_seconds + 2 * s.ckpt_seconds)), s.device))


def train_step(s: Session) -> float:
    """One optimizer step over ``grad_accum_steps`` micro-batches; returns the mean loss.

    Micro-batch ``m`` of step ``t`` is drawn from ``(seed, t, m)``, so any number of DDP
    processes sees the same global batch. A step the fp16 grad scaler skips (inf gradients)
    leaves the LR schedule where it was. A loss that blows up (``lifecycle.blown_up``), or a gradient
    norm that is not finite where no scaler skips it, stops the run before the step is applied
    (``lifecycle.Diverged``).
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
    s.scaler.unscale_(s.optimizer)  # a no-op without the fp16 grad scaler
    norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg["grad_clip"] or math.inf).item()  # inf: no clipping
    loss_value = loss_sum.item() / cfg["grad_accum_steps"]
    if lifecycle.blown_up(loss_value):
        raise diverged(s, "the loss", loss_value, step + 1)
    if not math.isfinite(norm) and not s.scaler.is_enabled():  # fp16's scaler skips such steps itself
        raise diverged(s, "the gradient norm", norm, step + 1)
    scale = s.scaler.get_scale() if s.scaler.is_enabled() else None
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    if scale is not None and s.scaler.get_scale() < scale:
        s.state.skipped_steps += 1
    else:
        s.scheduler.step()
    dt = time.perf_counter() - t0
    s.state.step += 1
    s.state.tokens_seen += s.tokens_per_step
    s.state.train_seconds += dt
    s.window[0] += s.tokens_per_step
    s.window[1] += dt
    s.budget.step(dt)
    return loss_value


def diverged(s: Session, what: str, value: float, step: int) -> lifecycle.Diverged:
    """The error that stops a run whose ``what`` blew up at ``step``, naming its last good checkpoint."""
    ckpt = s.run_dir / CKPT
    last = f"{config.relative(ckpt)} (step {read_checkpoint(ckpt, mmap=True)['step']})" if ckpt.is_file() else "none written yet"
    tips = ", more warmup_steps or dtype bfloat16/float32" if s.policy.dtype_name == "float16" else " or more warmup_steps"
    return lifecycle.diverged(f"{s.name} seed {s.seed}", what, value, step, s.cfg["learning_rate"], last, tips,
                              runs.afresh(s.name))


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
    for what, loss in (("the train eval loss", train_loss), ("the val loss", val_loss)):
        if lifecycle.blown_up(loss):  # before the sample, which cannot be drawn from such weights
            raise diverged(s, what, loss, s.state.step)
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
    if s.variant.converted or st.best_val_loss is None or row["val_loss"] < st.best_val_loss:
        st.best_val_loss, st.best_val_bpb, st.best_step, st.evals_since_best = row["val_loss"], row["val_bpb"], row["step"], 0
        s.best = {k: v.detach().to("cpu", copy=True) for k, v in s.model.state_dict().items()}
        if s.keeps_optimizer:
            s.best_optimizer = optim.cpu_copy(s.optimizer.state_dict())
        save_best(s)
    else:
        st.evals_since_best += 1
    # a converted run is reported at the end of its budget: early stopping would choose on val
    return not s.variant.converted and s.cfg["patience"] is not None and st.evals_since_best >= s.cfg["patience"]


@torch.no_grad()
def test_loss(s: Session, model: GPT) -> tuple[float, float]:
    """``(loss, bits per byte)`` of ``model`` on the corpus test split, which no choice is made on: evenly
    spaced windows, the whole split when it holds at most 4 x ``eval_batches`` batches."""
    tokens = data.load_tokens(s.paths, "test")
    t, b = s.cfg["context_length"], s.cfg["batch_size"]
    n = min((len(tokens) - 1) // t, 4 * s.cfg["eval_batches"] * b)
    if n < 1:
        raise config.SettingsError(f"the test split holds {len(tokens)} tokens, too few for context_length={t}")
    starts = np.linspace(0, len(tokens) - t - 1, n).astype(np.int64)
    batches = []
    for i in range(0, n, b):
        xy = torch.from_numpy(np.stack([tokens[j : j + t + 1] for j in starts[i : i + b]]).astype(np.int64)).to(s.device)
        batches.append((xy[:, :-1], xy[:, 1:]))
    return evaluate_loss(model, batches, s.policy, s.token_bytes)


def finish(s: Session, reason: str) -> dict[str, Any]:
    """The summary of this session (and, once finished, the HF export of an MHA model's best weights)."""
    finished = s.state.step >= s.max_steps or reason == "early_stopping"
    hf_dir = None
    if s.ddp.master and finished:
        selected, _ = load_checkpoint(s.run_dir / BEST, s.device)
        s.state.test_loss, s.state.test_bpb = test_loss(s, selected)
    if s.ddp.master and finished and s.cfg["export_hf"] and s.model.config.variant == "mha":
        best_model, _ = load_checkpoint(s.run_dir / BEST)
        hf_dir = export_hf(best_model, s.run_dir / "hf")
    result = pretrain_files.summary(s, finished, reason, hf_dir)
    if s.ddp.master:
        result = runs.write_summary(s.run_dir, result)
        if finished:  # a finished run never resumes: its training state only takes disk (Kaggle keeps 20 GB)
            for name in (CKPT, PREV):
                (s.run_dir / name).unlink(missing_ok=True)
    return result


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

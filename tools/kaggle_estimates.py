"""Expected GPU time per stage at the full profile on Kaggle's accelerators, from FLOPs.

    python tools/kaggle_estimates.py [--train-tokens N] [--mfu 0.3]

Prints the table of README.md's "Run on Kaggle" section (a test keeps the two equal). Training
FLOPs per token are nanoGPT's ``6 N`` plus attention (``GPT.flops_per_token``) for pretraining,
with evaluation as forward passes (a third of that). Fine-tuning checkpoints activations, so the
forward pass runs twice: ``8 N`` per token for a full fine-tune, ``6 N`` for LoRA (the frozen base
needs no weight gradients); every batch is taken as padded to ``max_length``, an upper bound.
Minutes = FLOPs / (peak FLOP/s of ``nblib.machine`` x GPUs used x MFU): an estimate until measured.
"""
from __future__ import annotations

import argparse

import math

from nblib import attention, config, machine, train
from nblib.model import GPT

TRAIN_TOKENS = 3_883_901  # the full profile's train split built from the offline mirror (see README)
# accelerator -> (spec key, GPUs data-parallel training can use); Kaggle's own torch refuses the P100
# (no sm_60 kernels in its CUDA 12.8 build), so its column is for a CUDA 12.6 torch (see README)
GPUS = {"T4 x2": ("T4", 2), "P100 (CUDA 12.6 torch)": ("P100", 1)}


def _peak(key: str) -> float:
    return next(g for g in machine.GPUS if g.key == key).peak_flops["float16"]


def pretrain_flops(preset: str | None, key: str, train_tokens: int) -> tuple[float, int]:
    """``(FLOPs, steps)`` of one full-profile pretraining run of variant ``key``: its steps plus its
    evaluations. A converted variant runs its alpha of its source's steps (and is counted
    alone: its source run is a row of its own)."""
    cfg = train.variant_settings(config.settings("train", "full", preset), key)
    per_token = GPT(train.model_config(cfg, attention.get(key))).flops_per_token()  # gqa-params: its wider MLP
    steps = train.max_steps_for(cfg, train_tokens)
    if attention.get(key).converted:
        steps = max(1, math.ceil(round(cfg["uptrain_fraction"] * steps, 9)))
    tokens = steps * cfg["batch_size"] * cfg["grad_accum_steps"] * cfg["context_length"]
    evals = steps // train.eval_interval(cfg, steps, attention.get(key).converted) + 2
    # two eval sets per evaluation, and the test split once (at most 4 x eval_batches batches, nblib.train.test_loss)
    eval_tokens = (evals * 2 + 4) * cfg["eval_batches"] * cfg["batch_size"] * cfg["context_length"]
    return per_token * tokens + per_token / 3 * eval_tokens, steps


def finetune_flops(lora: bool, steps: int | None = None) -> float:
    """FLOPs of one full-profile fine-tune of GPT-2 small (124M) of ``steps`` (default the profile's),
    batches padded to ``max_length``."""
    cfg = config.settings("finetune", "full")
    steps = steps or cfg["steps"]
    n = 124_439_808 - 1024 * 768  # GPT-2 small's weights that take part in matmuls (all but the position table)
    tokens = steps * cfg["batch_size"] * cfg["grad_accum"] * cfg["max_length"]
    eval_tokens = (steps // cfg["eval_steps"] + 3) * cfg["eval_dialogues"] * cfg["max_length"]
    return (6 if lora else 8) * n * tokens + 2 * n * eval_tokens


def rows(train_tokens: int = TRAIN_TOKENS, mfu: float = 0.3) -> list[list[str]]:
    """One row per stage: what one run is, its PFLOP, and minutes per run / for all runs per accelerator."""
    def minutes(flops: float, gpus_used: int | None) -> list[float]:
        return [flops / (_peak(key) * (gpus_used or n) * mfu) / 60 for key, n in GPUS.values()]

    seeds = len(config.settings("train", "full")["seeds"])
    out = []
    full = config.settings("train", "full")
    shape = f"{full['n_layer']} x {full['n_head']} x {full['d_model']}"

    def label(key: str) -> str:
        kv = attention.get(key).kv_heads(full["n_head"])
        return f"pretrain {attention.get(key).label} ({shape}, {kv} K/V head{'s' if kv > 1 else ''})"

    variants = [(label(k), None, k, seeds) for k in full["variants"]]
    for label, preset, key, runs in (*variants, ("pretrain gpt2-small preset (optional)", "gpt2-small", attention.BASELINE, 1)):
        flops, steps = pretrain_flops(preset, key, train_tokens)
        out.append((label, f"{steps} steps", runs, flops, minutes(flops, None)))
    ft = config.settings("finetune", "full")
    rates = len(ft["lr_sweep"])
    for label, lora in (("fine-tune LoRA (8-bit or 32-bit base)", True), ("fine-tune full", False)):
        flops = finetune_flops(lora)
        runs = len(ft["seeds"]) * (2 if lora else 1)
        out.append((label, f"{ft['steps']} steps", runs, flops, minutes(flops, 1)))
        if rates:  # nblib.ftsweep: the first seed at each rate, before the seeds train at the best
            flops = finetune_flops(lora, ft["sweep_steps"])
            out.append((f"{label.replace('fine-tune', 'learning-rate sweep,')}", f"{ft['sweep_steps']} steps", rates * runs // len(ft["seeds"]),
                        flops, minutes(flops, 1)))
    return [[label, what, str(runs), f"{flops / 1e15:.1f}",
             *(f"{_minutes(m)} ({_minutes(m * runs)})" for m in mins)] for label, what, runs, flops, mins in out]


def _minutes(m: float) -> str:
    return f"{m:.0f}" if m >= 1 else f"{m:.1f}"


def table(train_tokens: int = TRAIN_TOKENS, mfu: float = 0.3) -> str:
    """:func:`rows` as the README's Markdown table."""
    head = ["stage", "one run", "runs", "PFLOP per run", *(f"min on {k}: one run (all)" for k in GPUS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows(train_tokens, mfu)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-tokens", type=int, default=TRAIN_TOKENS, help="tokens in the corpus's train split")
    parser.add_argument("--mfu", type=float, default=0.3, help="model FLOPs utilisation assumed")
    args = parser.parse_args()
    print(table(args.train_tokens, args.mfu))

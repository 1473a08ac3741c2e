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

from nblib import config, machine, train
from nblib.model import GPT

TRAIN_TOKENS = 3_883_901  # the full profile's train split built from the offline mirror (see README)
GPUS = {"T4 x2": ("T4", 2), "P100": ("P100", 1)}  # accelerator -> (spec key, GPUs data-parallel training can use)


def _peak(key: str) -> float:
    return next(g for g in machine.GPUS if g.key == key).peak_flops["float16"]


def pretrain_flops(preset: str | None, n_kv_head: int | None, train_tokens: int) -> tuple[float, int]:
    """``(FLOPs, steps)`` of one full-profile pretraining run: its steps plus its evaluations."""
    cfg = config.settings("train", "full", preset, n_kv_head=n_kv_head)
    per_token = GPT(train.model_config(cfg)).flops_per_token()
    steps = train.max_steps_for(cfg, train_tokens)
    tokens = steps * cfg["batch_size"] * cfg["grad_accum_steps"] * cfg["context_length"]
    evals = steps // cfg["eval_interval"] + 2
    eval_tokens = evals * 2 * cfg["eval_batches"] * cfg["batch_size"] * cfg["context_length"]
    return per_token * tokens + per_token / 3 * eval_tokens, steps


def finetune_flops(lora: bool) -> float:
    """FLOPs of one full-profile fine-tune of GPT-2 small (124M), batches padded to ``max_length``."""
    cfg = config.settings("finetune", "full")
    n = 124_439_808 - 1024 * 768  # GPT-2 small's weights that take part in matmuls (all but the position table)
    tokens = cfg["steps"] * cfg["batch_size"] * cfg["grad_accum"] * cfg["max_length"]
    eval_tokens = (cfg["steps"] // cfg["eval_steps"] + 3) * cfg["eval_dialogues"] * cfg["max_length"]
    return (6 if lora else 8) * n * tokens + 2 * n * eval_tokens


def rows(train_tokens: int = TRAIN_TOKENS, mfu: float = 0.3) -> list[list[str]]:
    """One row per stage: what one run is, its PFLOP, and minutes per run / for all runs per accelerator."""
    def minutes(flops: float, gpus_used: int | None) -> list[float]:
        return [flops / (_peak(key) * (gpus_used or n) * mfu) / 60 for key, n in GPUS.values()]

    seeds = len(config.settings("train", "full")["seeds"])
    out = []
    for label, preset, kv, runs in (("pretrain MHA (8 x 8 x 512)", None, None, seeds),
                                    ("pretrain GQA (2 K/V heads)", None, 2, seeds),
                                    ("pretrain gpt2-small preset (optional)", "gpt2-small", None, 1)):
        flops, steps = pretrain_flops(preset, kv, train_tokens)
        out.append((label, f"{steps} steps", runs, flops, minutes(flops, None)))
    ft = config.settings("finetune", "full")
    for label, lora in (("fine-tune LoRA (8-bit or 32-bit base)", True), ("fine-tune full", False)):
        flops = finetune_flops(lora)
        runs = len(ft["seeds"]) * (2 if lora else 1)
        out.append((label, f"{ft['steps']} steps", runs, flops, minutes(flops, 1)))
    return [[label, what, str(runs), f"{flops / 1e15:.1f}",
             *(f"{m:.0f} ({m * runs:.0f})" for m in mins)] for label, what, runs, flops, mins in out]


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

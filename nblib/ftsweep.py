"""The learning-rate sweep of a fine-tune variant, so every method is compared at its own best rate.

Each rate of ``lr_sweep`` (multiples of the method's default, ``lora_lr`` or ``full_lr``) trains the
first seed for ``sweep_steps`` steps in ``runs/lrsweep-<variant>-lr<rate>/seed-<seed>/``; the rate
with the lowest loss on the val dialogues (the eval set, never the test split) is the one every
seed then trains at. A rate's result is kept in its folder (``sweep.json``), so an interrupted
sweep resumes where it stopped and a finished one is read back; its checkpoints are deleted once
it is measured (only the loss is needed).
"""
from __future__ import annotations

import math
import shutil
from typing import Any

from nblib import config, lifecycle, runs
from nblib.files import read_json, write_json
from nblib.ftmethods import variant

RESULT = "sweep.json"
STAGE = "finetune"


def rates(cfg: dict[str, Any]) -> list[float]:
    """The rates the sweep tries: ``lr_sweep`` x the method's default rate."""
    default = cfg[variant(cfg["variant"]).method.lr_key]
    return [round(default * m, 12) for m in cfg["lr_sweep"]]


def folder_name(variant_name: str, rate: float) -> str:
    return f"lrsweep-{variant_name}-lr{rate:g}"


def measure(cfg: dict[str, Any], rate: float) -> float:
    """The val loss of the first seed trained ``sweep_steps`` steps at ``rate`` (read back when already measured)."""
    from nblib import finetune

    seed = cfg["seeds"][0]
    run_dir = runs.folder(folder_name(cfg["variant"], rate), seed)
    # every setting that can change the measured loss (a resumed sweep with others measures again)
    settings = {k: v for k, v in cfg.items() if k not in config.free_keys(STAGE) | {"seed", "lr_sweep", "sweep_steps"}}
    settings |= {"learning_rate": rate, "steps": cfg["sweep_steps"] or cfg["steps"], "seed": seed}
    if (run_dir / RESULT).is_file():
        kept = read_json(run_dir / RESULT)
        if kept.get("settings") == settings:
            return kept["eval_loss"]
    sweep_cfg = {**cfg, "learning_rate": rate, "steps": settings["steps"], "merge": False, "wandb": False, "resume": True}
    s = finetune.setup(sweep_cfg, seed, name=folder_name(cfg["variant"], rate))
    try:
        finetune.train(s)
        loss, _ = s.evaluate_loss()  # the Trainer ends on its best checkpoint by this same val loss
    except lifecycle.Diverged:  # a rate that blows up is measured as the worst, not the end of the sweep
        loss = math.inf
    write_json(run_dir / RESULT, {"settings": settings, "eval_loss": loss})
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return loss


def best_rate(cfg: dict[str, Any]) -> tuple[float | None, dict[float, float]]:
    """``(the rate with the lowest val loss, {rate: val loss})``; ``(None, {})`` when ``lr_sweep`` is empty or
    ``learning_rate`` is set (a rate given by hand is not swept)."""
    if not cfg["lr_sweep"] or cfg["learning_rate"] is not None:
        return None, {}
    losses = {rate: measure(cfg, rate) for rate in rates(cfg)}
    best = min(losses, key=losses.__getitem__)
    print(f"{cfg['variant']}: learning rate {best:g} (val loss {losses[best]:.4f}; swept "
          + ", ".join(f"{r:g}: {v:.4f}" for r, v in losses.items()) + ")")
    return best, losses


def settings_at_best(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with ``learning_rate`` the sweep's best (unchanged when nothing is swept)."""
    best, _ = best_rate(cfg)
    return cfg if best is None else {**cfg, "learning_rate": best}

"""Pretraining's optimizer and learning-rate schedules, and how a converted variant continues its source's.

AdamW with weight decay on matrices only (:func:`configure`, its parameter order :func:`names`), linear
warmup then cosine decay (:func:`lr_factor`), and :func:`uptraining`: the GQA paper's uptraining
(Ainslie et al. 2023, arXiv 2305.13245) as the continuation of the source run's optimizer and schedule.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from nblib import attention, config
from nblib.convert import convert_kv_heads, convert_kv_moments
from nblib.model import GPT
from nblib.pretrain_files import load_source


def schedule(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup over ``warmup_steps`` to ``learning_rate``, then cosine to ``min_lr`` at ``max_steps``."""
    warmup, min_ratio = cfg["warmup_steps"], cfg["min_lr"] / cfg["learning_rate"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, max_steps, min_ratio))


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier at ``step``: linear warmup to 1, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def names(model: GPT) -> list[list[str]]:
    """The trained parameters' names in the optimizer's two groups: matrices (decayed), then the rest."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [[n for n, p in params if p.dim() >= 2], [n for n, p in params if p.dim() < 2]]


def configure(model: GPT, cfg: Mapping[str, Any], device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear weights, embeddings) and none on biases and norms."""
    by_name = dict(model.named_parameters())
    decayed, rest = names(model)
    groups = [
        {"params": [by_name[n] for n in decayed], "weight_decay": cfg["weight_decay"]},
        {"params": [by_name[n] for n in rest], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), fused=device.type == "cuda"
    )


def uptraining(variant: attention.Variant, cfg: Mapping[str, Any], seed: int, paths: config.Paths,
               info: Mapping[str, Any], device: torch.device) -> tuple[GPT, torch.optim.AdamW, Any, dict[str, Any], int]:
    """Model, optimizer, schedule, source summary and steps of a converted variant.

    As the GQA paper uptrains (Ainslie et al. 2023: "a further alpha proportion of original
    pre-training steps with the original pre-training setup"), the run continues its source: the
    source's AdamW state at its best weights, the K/V moments pooled like the weights
    (``nblib.convert.convert_kv_moments``), and the learning rate where the source's schedule ended
    (``final_lr``), held there after a re-warm from zero over the source's warmup scaled to alpha
    (a restart at the peak rate first undoes what the source learnt).
    """
    source_model, source, source_optimizer = load_source(variant, cfg, seed, paths, info)
    model = convert_kv_heads(source_model, cfg["n_kv_head"], variant.method, seed=seed).to(device)
    optimizer = configure(model, cfg, device)
    order = [n for group in names(source_model) for n in group]
    optimizer.load_state_dict(convert_kv_moments(source_optimizer, order, source_model.config, cfg["n_kv_head"], variant.method))
    # round(.., 9) keeps float noise (0.07 * 100 = 7.000000000000001) from adding a step
    max_steps = max(1, math.ceil(round(cfg["uptrain_fraction"] * source["steps"], 9)))
    warmup = min(max_steps, round(cfg["warmup_steps"] * max_steps / source["max_steps"]))
    final = source["final_lr"] / cfg["learning_rate"]
    for group in optimizer.param_groups:  # the state dict carries the source's last rate; LambdaLR scales the peak
        group["lr"] = group["initial_lr"] = cfg["learning_rate"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: final * min(1.0, (s + 1) / max(1, warmup)))
    return model, optimizer, scheduler, source, max_steps


def cpu_copy(tree: Any) -> Any:
    """A copy of nested dicts/lists of tensors with every tensor on the CPU (an optimizer state dict)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [cpu_copy(v) for v in tree]
    return tree

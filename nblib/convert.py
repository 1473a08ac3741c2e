"""MHA -> GQA/MQA conversion of a trained ``nblib.model.GPT``: its K/V heads pooled per group.

Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
Checkpoints" (arXiv 2305.13245); ``nblib.train`` uptrains the result (converted variants of
``nblib.attention``). Model layer: imports only ``nblib.model``.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
import torch.nn as nn

from nblib.model import GPT, GPTConfig


KV_CONVERSIONS = ("mean", "first", "random")  # best first, as the GQA paper's ablation ranks them (the report compares to the first present)


def convert_kv_heads(model: GPT, n_kv_head: int, method: str = "mean", seed: int | None = None) -> GPT:
    """A copy of ``model`` with its K/V heads merged down to ``n_kv_head`` (MHA -> GQA/MQA, or GQA -> fewer).

    Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
    Checkpoints" (arXiv 2305.13245): build each new K/V head from its group of ``n_kv_src / n_kv_head``
    contiguous source heads, then uptrain. ``method``: ``mean`` (their choice: mean-pool the group),
    ``first`` (keep the group's first head) or ``random`` (fresh K/V as ``GPT._init_weights`` draws them;
    ``seed`` fixes the draw, ``None`` uses torch's global RNG; the other methods ignore ``seed``).
    The fused ``c_attn`` rows are ``[q: n_head | k: n_kv_head | v: n_kv_head]`` heads of ``head_dim``,
    query head ``h`` reading K/V head ``h // (n_head // n_kv_head)``, so merging contiguous groups keeps
    every query head on the K/V head its group came from. All other weights are copied bit-equal;
    the copy keeps the source's dtype, device and train/eval mode, and shares no storage with it.
    """
    if not isinstance(model, GPT):
        raise ValueError(f"convert_kv_heads needs an nblib.model.GPT, got {type(model).__name__}")
    c = model.config
    n_src = c.n_kv_head
    divisors = [d for d in range(1, n_src + 1) if n_src % d == 0]
    if not isinstance(n_kv_head, int) or isinstance(n_kv_head, bool) or n_kv_head < 1:
        raise ValueError(f"convert_kv_heads: n_kv_head must be a positive integer, got {n_kv_head!r}; accepted: {divisors}")
    if n_kv_head > n_src or n_src % n_kv_head:
        raise ValueError(
            f"convert_kv_heads: n_kv_head={n_kv_head} must divide the source's n_kv_head={n_src} (heads are only "
            f"merged, never split); accepted: {divisors}"
        )
    if method not in KV_CONVERSIONS:
        raise ValueError(f"convert_kv_heads: unknown method {method!r}; accepted: {', '.join(KV_CONVERSIONS)}")
    config = GPTConfig(**{**asdict(c), "n_kv_head": n_kv_head})
    hd = c.head_dim
    state = {k: v.clone() for k, v in model.state_dict().items()}  # clone: the new model must not alias the source
    with torch.random.fork_rng(devices=[], enabled=seed is not None):  # a seed leaves the global RNG as it was
        if seed is not None:
            torch.manual_seed(seed)
        for i in range(c.n_layer):
            fresh = None
            if method == "random":  # drawn on the CPU, so a seed gives the same heads on any device
                fresh = nn.Linear(c.d_model, 2 * n_kv_head * hd, bias=c.bias)
                GPT._init_weights(fresh)
            for name in ("weight", "bias") if c.bias else ("weight",):
                key = f"transformer.h.{i}.attn.c_attn.{name}"
                state[key] = _pool_c_attn(state[key], c, n_kv_head, method,
                                          None if fresh is None else getattr(fresh, name).detach())
    with torch.device("meta"):  # no init work: every tensor comes from ``state``
        new = GPT(config)
    new.load_state_dict(state, assign=True)  # assign: keep each tensor's dtype and device
    if config.tie_embeddings:
        new.lm_head.weight = new.transformer.wte.weight  # assign replaced the two tied parameters separately
    return new.train(model.training)


def _pool_c_attn(w: torch.Tensor, c: GPTConfig, n_kv_head: int, method: str, fresh: torch.Tensor | None) -> torch.Tensor:
    """A fused ``c_attn`` weight ``[heads * hd, d_model]`` or bias ``[heads * hd]`` with its K and V heads
    pooled per contiguous group (``fresh``: the new K/V rows of method ``random``)."""
    n_src, hd = c.n_kv_head, c.head_dim
    heads = w.view(c.n_head + 2 * n_src, hd, *w.shape[1:])
    q, k, v = heads.split([c.n_head, n_src, n_src])
    if fresh is not None:
        kv = fresh.to(w.device, w.dtype).view(2 * n_kv_head, hd, *w.shape[1:])
    else:
        def merge(group: torch.Tensor) -> torch.Tensor:
            group = group.view(n_kv_head, n_src // n_kv_head, *group.shape[1:])
            # fp32 mean: summing bf16/fp16 heads in their own dtype would round at every step.
            return group[:, 0] if method == "first" else group.float().mean(1).to(group.dtype)
        kv = torch.cat([merge(k), merge(v)])
    return torch.cat([q, kv]).flatten(0, 1)


def convert_kv_moments(optimizer_state: dict[str, Any], names: list[str], c: GPTConfig, n_kv_head: int,
                       method: str) -> dict[str, Any]:
    """An AdamW ``state_dict`` of a model of config ``c`` made to fit its K/V-converted copy: the ``c_attn``
    moments pooled as :func:`convert_kv_heads` pools the weights (zeroed for ``random``: fresh weights
    have no history), every other moment and the step counts kept. ``names``: the optimizer's
    parameter names in its index order (``nblib.optim.names``)."""
    state = {}
    for index, moments in optimizer_state["state"].items():
        if ".attn.c_attn." not in names[int(index)]:
            state[index] = moments
            continue
        state[index] = {}
        for key, t in moments.items():
            if key in ("exp_avg", "exp_avg_sq"):
                pooled = _pool_c_attn(t, c, n_kv_head, "mean" if method == "random" else method, None)
                if method == "random":
                    pooled[c.n_head * c.head_dim:] = 0
                t = pooled
            state[index][key] = t
    return {"state": state, "param_groups": optimizer_state["param_groups"]}


def kv_head_weights(model: GPT, part: str = "k") -> list[torch.Tensor]:
    """Per layer, the ``c_attn`` weight rows of each K (``part="k"``) or V head, ``[n_kv_head, head_dim * d_model]``
    (what :func:`convert_kv_heads` pools; e.g. for ``nblib.plots.kv_head_similarity``)."""
    if part not in ("k", "v"):
        raise ValueError(f"kv_head_weights: part must be 'k' or 'v', got {part!r}")
    c = model.config
    out = []
    for block in model.transformer.h:
        heads = block.attn.c_attn.weight.detach().view(c.n_head + 2 * c.n_kv_head, c.head_dim * c.d_model)
        q_end = c.n_head + (0 if part == "k" else c.n_kv_head)
        out.append(heads[q_end : q_end + c.n_kv_head].float().cpu())
    return out

"""Every figure of the suite, in one style: ``matplotlib.figure.Figure`` objects (no pyplot state,
so notebooks and the headless report draw the same), constrained layout, light grids, legends
placed beside the data rather than over it.

Functions take plain data (metrics rows, manifests, tables indexed by metric keys), never files,
so any stage can draw them and tests can feed them directly.
"""
from __future__ import annotations

import math
import textwrap
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

MIB = 2**20


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _finish(ax: Any, legend: bool = True, below: bool = False) -> None:
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        if below:  # under the axes: never on top of the curves
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
        else:
            ax.legend(fontsize=8)


def context_label(n: int) -> str:
    """``1024`` -> ``1k``; other numbers as they are."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


# ---------------------------------------------------------------------------------------------
# data stages


def raw_sizes(table: pd.DataFrame) -> Figure:
    """Horizontal bars: megabytes per Gutenberg book and per collection genre (``ingest.summary_table``)."""
    table = table[table["kind"] != "qa"].sort_values("MB")
    fig = _figure(8, 0.35 * len(table) + 1.2)
    ax = fig.subplots()
    colors = table["kind"].map({"gutenberg": "C0", "collection": "C1"})
    labels = [f"{g} ({n})" if k == "collection" else g for k, g, n in zip(table["kind"], table["group"], table["files"])]
    ax.barh(labels, table["MB"], color=colors)
    ax.set(xlabel="MB (raw bytes)", title="Raw texts: Gutenberg books (blue), collection genres with work counts (orange)")
    _finish(ax, legend=False)
    return fig


def paragraph_lengths(lengths: Mapping[str, Sequence[int]]) -> Figure:
    """Histogram of paragraph lengths (characters, log bins) per split, as a share of its paragraphs."""
    fig = _figure(8, 4)
    ax = fig.subplots()
    bins = np.logspace(1, 4, 31)
    for split, values in lengths.items():
        weights = np.full(len(values), 1 / max(len(values), 1))
        ax.hist(values, bins=bins, weights=weights, histtype="step", label=f"{split} ({len(values):,} paragraphs)")
    ax.set_xscale("log")
    ax.set(xlabel="paragraph length (characters)", ylabel="share of paragraphs", title="Paragraph lengths per split")
    _finish(ax)
    return fig


# ---------------------------------------------------------------------------------------------
# training curves


def pretrain_losses(runs: Mapping[str, list[dict[str, Any]]]) -> Figure:
    """Loss vs optimizer step and vs tokens seen: training loss (thin) and val loss (markers) per run."""
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, x in zip(axes, ("step", "tokens")):
        for i, (name, rows) in enumerate(runs.items()):
            train = [r for r in rows if r["kind"] == "train"]
            evals = [r for r in rows if r["kind"] == "eval"]
            ax.plot([r[x] for r in train], [r["loss"] for r in train], color=f"C{i}", alpha=0.35, lw=1, label=f"{name} train")
            ax.plot([r[x] for r in evals], [r["val_loss"] for r in evals], "o-", color=f"C{i}", ms=3, label=f"{name} val")
        ax.set_xlabel("optimizer step" if x == "step" else "tokens seen")
        _finish(ax, legend=False)
    axes[0].set_ylabel("cross-entropy loss (nats per token)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    return fig


def finetune_losses(runs: Mapping[str, list[dict[str, Any]]]) -> Figure:
    """Train loss (line) and eval loss (dots) per assistant token against step, one colour per run;
    the legend sits below the axes so it never covers a curve."""
    fig = _figure(8, 4.4)
    ax = fig.subplots()
    for i, (name, rows) in enumerate(runs.items()):
        train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
        evals = [(r["step"], r["eval_loss"]) for r in rows if r["kind"] == "eval"]
        if train:
            ax.plot(*zip(*train), color=f"C{i}", lw=1.2, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals), "o--", color=f"C{i}", ms=4, label=f"{name} eval")
    ax.set(xlabel="optimizer step", ylabel="loss per assistant token (nats)")
    _finish(ax, below=True)
    return fig


def _band(ax: Any, runs: list[list[dict[str, Any]]], x: str, y: str, color: str, label: str) -> None:
    """Mean of ``y`` over seeds against the seeds' mean ``x``, with the min–max range shaded."""
    evals = [pd.DataFrame([r for r in rows if r["kind"] == "eval"]) for rows in runs]
    steps = sorted(set.intersection(*(set(e["step"]) for e in evals))) if evals else []
    if not steps:
        return
    xs = np.mean([e.set_index("step").loc[steps, x].to_numpy(float) for e in evals], axis=0)
    ys = np.array([e.set_index("step").loc[steps, y].to_numpy(float) for e in evals])
    n = len(runs)
    ax.plot(xs, ys.mean(0), "o-", ms=3, color=color, label=f"{label} (mean of {n} seed{'s' if n > 1 else ''})")
    if n > 1:
        ax.fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.2, lw=0)


def val_loss(groups: Mapping[str, list[list[dict[str, Any]]]]) -> Figure:
    """Validation loss vs tokens seen and vs wall seconds, one line per variant (mean over its
    seeds, the shaded band their min–max)."""
    fig = _figure(10, 3.8)
    by_tokens, by_wall = fig.subplots(1, 2, sharey=True)
    for i, (label, runs) in enumerate(groups.items()):
        _band(by_tokens, runs, "tokens", "val_loss", f"C{i}", label)
        _band(by_wall, runs, "wall", "val_loss", f"C{i}", label)
    by_tokens.set(xlabel="tokens seen", ylabel="validation loss (nats per token)", title="Val loss vs tokens")
    by_wall.set(xlabel="wall seconds (each run's own machine and moment)", title="Val loss vs time")
    _finish(by_tokens)
    _finish(by_wall, legend=False)
    return fig


# ---------------------------------------------------------------------------------------------
# costs


def kv_cache(per_token: Mapping[str, float], max_context: int = 8192) -> Figure:
    """KV-cache MiB per sequence against context length, one line per variant (``label -> bytes per token``)."""
    fig = _figure(9, 3.4)  # as wide as the report's other figures, so its type renders the same size
    ax = fig.subplots()
    contexts = [2**k for k in range(7, int(math.log2(max_context)) + 1)]
    for label, bytes_per_token in per_token.items():
        ax.plot(contexts, [bytes_per_token * n / MIB for n in contexts], marker="o", ms=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [context_label(n) for n in contexts])
    ax.minorticks_off()
    ax.set(xlabel="context length (tokens)", ylabel="KV cache (MiB)", title="KV-cache memory per sequence (fp32)")
    _finish(ax)
    return fig


def bars(panels: Mapping[str, Mapping[str, tuple[float, float, float]]], ylabel: str | Mapping[str, str],
         log: Sequence[str] = ()) -> Figure:
    """One bar panel per measure: ``{title: {variant: (median, low, high)}}``, the error bar spanning
    low–high; ``ylabel`` one unit for every panel or ``{title: unit}``."""
    cols = min(len(panels), 2)  # two panels a row: four in one row are unreadable on a phone
    rows = math.ceil(len(panels) / cols)
    fig = _figure(4.2 * cols, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    for ax, (title, values) in zip(axes, panels.items()):
        names = list(values)
        mid = np.array([values[n][0] for n in names], float)
        lo = np.array([values[n][1] for n in names], float)
        hi = np.array([values[n][2] for n in names], float)
        err = np.vstack([np.clip(mid - lo, 0, None), np.clip(hi - mid, 0, None)])
        ax.bar(names, mid, yerr=np.nan_to_num(err), capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.set_title(textwrap.fill(title, 34), fontsize=9)  # long titles wrap instead of running into the next panel
        unit = ylabel if isinstance(ylabel, str) else ylabel[title]
        ax.set_ylabel(unit if title not in log else f"{unit} (log scale)")
        ax.tick_params(axis="x", labelsize=8, labelrotation=15)
        if title in log:
            ax.set_yscale("log")
        _finish(ax, legend=False)
    return fig


def cost_at_scale(sweep: pd.DataFrame) -> Figure:
    """Decode tokens/s and KV-cache MiB against context, per shape (rows) and variant (lines), from
    ``measure.decode_sweep`` (random weights of real shapes on this machine)."""
    shapes = list(dict.fromkeys(sweep["shape"]))
    fig = _figure(10, 3.2 * len(shapes))
    axes = fig.subplots(len(shapes), 2, squeeze=False)
    for row, shape in zip(axes, shapes):
        part = sweep[sweep["shape"] == shape]
        for i, variant in enumerate(dict.fromkeys(part["variant"])):
            v = part[part["variant"] == variant].sort_values("context")
            row[0].plot(v["context"], v["decode_tokens_per_s"], "o-", ms=3, color=f"C{i}", label=variant)
            row[1].plot(v["context"], v["kv_cache_bytes"] / MIB, "o-", ms=3, color=f"C{i}", label=variant)
        contexts = sorted(set(part["context"]))
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_xticks(contexts, [context_label(int(n)) for n in contexts])
            ax.minorticks_off()
            ax.set_xlabel("context length (tokens)")
            _finish(ax)
        batch = int(part["batch"].iloc[0])
        row[0].set(ylabel="decode tokens/s", title=f"{shape}: decode speed, batch {batch}")
        row[1].set(ylabel="KV cache (MiB)", title=f"{shape}: KV cache, batch {batch}")
    return fig

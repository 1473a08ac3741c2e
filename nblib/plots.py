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
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from nblib import attention

MIB = 2**20


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _grid(n: int, width: float, height: float, extra: float = 0.0) -> tuple[Figure, list[Any]]:
    """A figure of ``n`` panels, two a row (four in one row are unreadable on a phone), each
    ``width`` x ``height`` inches (+ ``extra`` for the legend); the spare panel hidden."""
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = _figure(width * cols, height * rows + extra)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, list(axes[:n])


def _finish(ax: Any, legend: bool = True, below: bool = False) -> None:
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        if below:  # under the axes: never on top of the curves
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
        else:
            ax.legend(fontsize=8)


def variant_colour(name: str, i: int, colours: Mapping[str, str] | None = None) -> str:
    """``colours[name]``, else the registry colour of the pretraining variant whose label is ``name``
    (``nblib.attention``), else matplotlib's ``i``-th default colour."""
    if colours and name in colours:
        return colours[name]
    v = next((v for v in attention.VARIANTS.values() if v.label == name), None)
    return v.colour if v else f"C{i}"


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


def val_loss(groups: Mapping[str, list[list[dict[str, Any]]]], colours: Mapping[str, str] | None = None) -> Figure:
    """Validation loss vs tokens seen and vs wall seconds, one line per variant (mean over its
    seeds, the shaded band their min–max); colours by :func:`variant_colour`."""
    fig = _figure(10, 3.8)
    by_tokens, by_wall = fig.subplots(1, 2, sharey=True)
    for i, (label, runs) in enumerate(groups.items()):
        _band(by_tokens, runs, "tokens", "val_loss", variant_colour(label, i, colours), label)
        _band(by_wall, runs, "wall", "val_loss", variant_colour(label, i, colours), label)
    by_tokens.set(xlabel="tokens seen", ylabel="validation loss (nats per token)", title="Val loss vs tokens")
    by_wall.set(xlabel="wall seconds (each run's own machine and moment)", title="Val loss vs time")
    _finish(by_tokens)
    _finish(by_wall, legend=False)
    return fig


def alpha_sweep(curves: Mapping[str, Mapping[float, tuple[float, float, float]]], refs: Mapping[str, float],
                ylabel: str) -> Figure:
    """Quality against alpha (uptraining steps / the source's), one line per family of conversions with the
    seeds' min–max as error bars; ``refs`` as dashed horizontal lines (the GQA paper's Figure 5)."""
    fig = _figure(6, 3.8)
    ax = fig.subplots()
    for i, (name, points) in enumerate(curves.items()):
        xs = list(points)
        mid, low, high = (np.array([points[x][k] for x in xs]) for k in range(3))
        ax.errorbar(xs, mid, yerr=[mid - low, high - mid], fmt="o-", ms=4, capsize=3, color=f"C{i}", label=name)
    for j, (name, value) in enumerate(refs.items()):
        ax.axhline(value, ls="--", lw=1, color=variant_colour(name.split(" (")[0], len(curves) + j), label=name)
    ax.set(xlabel="alpha (uptraining steps / the source's)", ylabel=ylabel, title="Uptrained quality against alpha")
    _finish(ax, below=True)
    return fig


def learning_rates(runs: Mapping[str, list[dict[str, Any]]], colours: Mapping[str, str] | None = None) -> Figure:
    """The logged learning rate of each run's training rows against its tokens, one line per run."""
    fig = _figure(6, 3.5)
    ax = fig.subplots()
    for i, (name, rows) in enumerate(runs.items()):
        train = [r for r in rows if r["kind"] == "train"]
        ax.plot([r["tokens"] for r in train], [r["lr"] for r in train], ".-", ms=3, color=variant_colour(name, i, colours),
                label=name)
    ax.set(xlabel="training tokens behind the weights", ylabel="learning rate", title="Learning rate against tokens")
    _finish(ax, below=True)
    return fig


# ---------------------------------------------------------------------------------------------
# costs


def kv_cache(per_token: Mapping[str, float], max_context: int = 8192, colours: Mapping[str, str] | None = None) -> Figure:
    """KV-cache MiB per sequence against context length, one line per variant (``label -> bytes per
    token``); colours by :func:`variant_colour`."""
    fig = _figure(9, 3.4)  # as wide as the report's other figures, so its type renders the same size
    ax = fig.subplots()
    contexts = [2**k for k in range(7, int(math.log2(max_context)) + 1)]
    for i, (label, bytes_per_token) in enumerate(per_token.items()):
        ax.plot(contexts, [bytes_per_token * n / MIB for n in contexts], marker="o", ms=3, label=label,
                color=variant_colour(label, i, colours))
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [context_label(n) for n in contexts])
    ax.minorticks_off()
    ax.set(xlabel="context length (tokens)", ylabel="KV cache (MiB)", title="KV-cache memory per sequence (fp32)")
    _finish(ax)
    return fig


def bars(panels: Mapping[str, Mapping[str, tuple[float, float, float]]], ylabel: str | Mapping[str, str],
         log: Sequence[str] = (), colours: Mapping[str, str] | None = None) -> Figure:
    """One bar panel per measure: ``{title: {variant: (median, low, high)}}``, the error bar spanning
    low–high; ``ylabel`` one unit for every panel or ``{title: unit}``; colours by :func:`variant_colour`."""
    fig, axes = _grid(len(panels), 4.2, 3.2)
    for ax, (title, values) in zip(axes, panels.items()):
        names = list(values)
        mid = np.array([values[n][0] for n in names], float)
        lo = np.array([values[n][1] for n in names], float)
        hi = np.array([values[n][2] for n in names], float)
        err = np.vstack([np.clip(mid - lo, 0, None), np.clip(hi - mid, 0, None)])
        ax.bar(names, mid, yerr=np.nan_to_num(err), capsize=3, color=[variant_colour(n, i, colours) for i, n in enumerate(names)])
        ax.set_title(textwrap.fill(title, 34), fontsize=9)  # long titles wrap instead of running into the next panel
        unit = ylabel if isinstance(ylabel, str) else ylabel[title]
        ax.set_ylabel(unit if title not in log else f"{unit} (log scale)")
        ax.tick_params(axis="x", labelsize=8, labelrotation=15)
        if title in log:
            ax.set_yscale("log")
        _finish(ax, legend=False)
    return fig


MARKERS = {False: ("o", "from scratch"), True: ("^", "uptrained (converted from MHA)")}


def frontier(points: Sequence[Mapping[str, Any]], axes: Mapping[str, str]) -> Figure:
    """Quality against cost, one panel per ``axes`` key (``{key: x-axis label}``) that some point has.

    A point is ``{"label", "colour", "converted": bool, "quality": (mean, lo, hi), key: (mid, lo, hi)
    or None}``; error bars span lo–hi, the marker tells from-scratch and uptrained variants apart and
    the label sits next to the point."""
    keys = [k for k in axes if any(p.get(k) is not None for p in points)]
    fig, grid = _grid(len(keys), 5, 3.6, 0.4)
    for ax, key in zip(grid, keys):
        for p in points:
            if p.get(key) is None:
                continue
            (x, xlo, xhi), (y, ylo, yhi) = p[key], p["quality"]
            marker = MARKERS[bool(p["converted"])][0]
            ax.errorbar([x], [y], xerr=[[x - xlo], [xhi - x]], yerr=[[y - ylo], [yhi - y]], fmt=marker, ms=7,
                        color=p["colour"], capsize=3, label=p["label"])
            ax.annotate(p["label"], (x, y), xytext=(6, 5), textcoords="offset points", fontsize=8, color=p["colour"])
        ax.set_xlabel(textwrap.fill(axes[key], 48), fontsize=9)
        ax.set_ylabel("val bits per byte (lower is better)")
        ax.margins(x=0.2, y=0.15)  # room for the labels beside the outermost points
        _finish(ax, legend=False)
    shown = sorted({bool(p["converted"]) for p in points})
    handles = [Line2D([], [], marker=MARKERS[c][0], ls="", color="0.3", ms=7) for c in shown]
    fig.legend(handles, [MARKERS[c][1] for c in shown], loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def cost_at_scale(sweep: pd.DataFrame) -> Figure:
    """Decode tokens/s and KV-cache MiB against context, per shape (rows) and variant (lines), from
    ``measure.decode_sweep`` (random weights of real shapes on this machine); colours by :func:`variant_colour`."""
    shapes = list(dict.fromkeys(sweep["shape"]))
    fig = _figure(10, 3.2 * len(shapes))
    axes = fig.subplots(len(shapes), 2, squeeze=False)
    for row, shape in zip(axes, shapes):
        part = sweep[sweep["shape"] == shape]
        for i, variant in enumerate(dict.fromkeys(part["variant"])):
            v = part[part["variant"] == variant].sort_values("context")
            colour = variant_colour(variant, i)
            row[0].plot(v["context"], v["decode_tokens_per_s"], "o-", ms=3, color=colour, label=variant)
            row[1].plot(v["context"], v["kv_cache_bytes"] / MIB, "o-", ms=3, color=colour, label=variant)
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


# ---------------------------------------------------------------------------------------------
# MHA -> GQA conversion


def kv_head_similarity(source: Sequence[np.ndarray], pooled: Mapping[str, Sequence[np.ndarray]], part: str = "K") -> Figure:
    """Cosine similarity of K (or V) heads, one row per layer: the source's heads with each other,
    then the source's heads (rows) against each model of ``pooled`` (columns: its heads). Arrays are
    ``[heads, ...]`` per layer (``nblib.convert.kv_head_weights``); dashed lines mark the groups that
    pooling merges (contiguous runs of ``source heads / pooled heads``)."""
    def unit(w: np.ndarray) -> np.ndarray:
        w = np.asarray(w, dtype=np.float64).reshape(len(w), -1)
        return w / np.linalg.norm(w, axis=1, keepdims=True)

    layers, panels = len(source), 1 + len(pooled)
    fig = _figure(3.2 * panels + 0.8, 2.9 * layers)
    axes = fig.subplots(layers, panels, squeeze=False)
    for layer, row in enumerate(axes):
        src = unit(source[layer])
        group = len(src) // min([len(p[layer]) for p in pooled.values()] or [len(src)])  # source heads per pooled head
        titles = [f"{part} heads of the source"] + [f"vs {name}" for name in pooled]
        for ax, title, other in zip(row, titles, [src] + [unit(p[layer]) for p in pooled.values()]):
            sim = src @ other.T
            image = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1)
            for edge in range(group, len(src), group):  # group boundaries along the source heads
                ax.axhline(edge - 0.5, color="0.2", lw=1, ls="--")
                if other is src:
                    ax.axvline(edge - 0.5, color="0.2", lw=1, ls="--")
            if sim.size <= 64:
                for (i, j), value in np.ndenumerate(sim):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if abs(value) > 0.6 else "k")
            ax.set(xlabel="source head" if ax is row[0] else "pooled head", ylabel=f"layer {layer}: source head" if ax is row[0] else None)
            if layer == 0:
                ax.set_title("\n".join(textwrap.wrap(title, 28)), fontsize=9)
            ax.set_xticks(range(sim.shape[1]))
            ax.set_yticks(range(sim.shape[0]))
        fig.colorbar(image, ax=row[-1], shrink=0.8, label="cosine similarity")
    return fig


# ---------------------------------------------------------------------------------------------
# fine-tuning by source and cost against quality

Spread = tuple[float, float, float]  # (centre, low, high): the error bar spans low–high


def before_after(panels: Mapping[str, Mapping[str, tuple[Spread, Spread]]], ylabel: str) -> Figure:
    """One panel per title, ``{title: {variant: (base, trained)}}``: per variant a pale hatched bar
    (its base model, as the variant loaded it) beside a solid one (after fine-tuning)."""
    fig, axes = _grid(len(panels), 4.6, 3.2, 0.3)
    width = 0.38
    for ax, (title, values) in zip(axes, panels.items()):
        x = np.arange(len(values))
        for k, (hatch, alpha) in enumerate((("//", 0.35), ("", 1.0))):  # base, then trained
            mid = np.array([v[k][0] for v in values.values()], float)
            err = np.array([[m - v[k][1], v[k][2] - m] for m, v in zip(mid, values.values())], float).T
            ax.bar(x + (k - 0.5) * width, mid, width, yerr=np.nan_to_num(np.clip(err, 0, None)), capsize=3,
                   color=[f"C{i}" for i in range(len(values))], alpha=alpha, hatch=hatch, edgecolor="0.3")
        ax.set_xticks(x, list(values), fontsize=8, rotation=15)
        ax.set_title(textwrap.fill(title, 40), fontsize=9)
        ax.set_ylabel(ylabel)
        _finish(ax, legend=False)
    handles = [Patch(facecolor="0.8", hatch="//", edgecolor="0.3"), Patch(facecolor="0.4", edgecolor="0.3")]
    fig.legend(handles, ["base model (before)", "fine-tuned (after)"], loc="outside lower center", ncol=2,
               fontsize=8, frameon=False)
    return fig


def cost_quality(points: Sequence[Mapping[str, Any]], qualities: Mapping[str, str], costs: Mapping[str, str],
                 reference: str | None = None) -> Figure:
    """Quality against cost: one row of panels per ``qualities`` key (``{key: y label}``), one column per
    ``costs`` key (``{key: x label}``, log scale). A point is ``{"label", "quality": {key: spread},
    "cost": {key: spread}, "reference": {key: spread}}``: a filled circle at the run's own cost and,
    with ``reference`` (its legend text), a hollow square at the reference cost, at the same quality."""
    fig = _figure(4.8 * len(costs), 3.4 * len(qualities) + 0.4)
    grid = fig.subplots(len(qualities), len(costs), squeeze=False)
    for row, (qkey, ylabel) in zip(grid, qualities.items()):
        for ax, (ckey, xlabel) in zip(row, costs.items()):
            for i, p in enumerate(points):
                y = p["quality"].get(qkey)
                if y is None or math.isnan(y[0]):
                    continue
                for where, marker, face in (("cost", "o", f"C{i}"), ("reference", "s", "none")):
                    x = p.get(where, {}).get(ckey)
                    if x is None or math.isnan(x[0]):
                        continue
                    ax.errorbar([x[0]], [y[0]], xerr=[[x[0] - x[1]], [x[2] - x[0]]], yerr=[[y[0] - y[1]], [y[2] - y[0]]],
                                fmt=marker, ms=7, color=f"C{i}", mfc=face, capsize=3)
                    if where == "cost":  # the square shares the circle's colour and height: one label reads for both
                        ax.annotate(p["label"], (x[0], y[0]), xytext=(6, 5), textcoords="offset points", fontsize=8,
                                    color=f"C{i}")
            ax.set_xscale("log")
            ax.set_xlabel(textwrap.fill(xlabel, 48) + " (log scale)", fontsize=9)
            ax.set_ylabel(textwrap.fill(ylabel, 36), fontsize=9)
            ax.margins(x=0.25, y=0.15)  # room for the labels beside the outermost points
            _finish(ax, legend=False)
    handles = [Line2D([], [], marker="o", ls="", color="0.3", ms=7)]
    if reference:
        handles.append(Line2D([], [], marker="s", ls="", color="0.3", mfc="none", ms=7))
    fig.legend(handles, ["the run (its model, its machine)"] + ([reference] if reference else []),
               loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig

"""The report's figures, drawn by ``nblib.plots`` from a comparison and its tables."""
from __future__ import annotations

from matplotlib.figure import Figure
import pandas as pd

from nblib import attention, plots, qa
from nblib.convert import KV_CONVERSIONS
from nblib.report.glance import QUALITY, kv_per_token
from nblib.report.loading import Comparison, Group, Run
from nblib.plots import Spread
from nblib.report.tables import (BASELINE, MIB, RATIO, TASK_METRICS, Stat, decode_key, eval_sources,
                                  kv_bytes_per_token, label, nested_stat, scratch_twin, source_name, spread, task_sources)


def colour(g: Group) -> str | None:
    """A pretraining variant's registry colour, found by its run folder (``None`` for another run)."""
    v = attention.of_run(g.name)
    return v.colour if v else None


def colours(comparison: Comparison) -> dict[str, str]:
    """``label -> registry colour`` of the pretraining variants."""
    return {lab: c for lab, g in comparison.pretrain.items() if (c := colour(g))}


def _behind(run: Run) -> list[dict]:
    """A run's metrics rows with ``tokens`` counting its source run's too (the tokens behind its weights)."""
    offset = run.summary.get("total_tokens", run.summary["tokens_seen"]) - run.summary["tokens_seen"]
    return [{**r, "tokens": r["tokens"] + offset} if "tokens" in r else r for r in run.metrics] if offset else run.metrics


def val_loss(comparison: Comparison) -> Figure:
    """Validation loss of every pretraining variant, mean over seeds with their range; a converted
    variant's tokens count its source run's too."""
    return plots.val_loss({lab: [_behind(r) for r in g.runs] for lab, g in comparison.pretrain.items()}, colours(comparison))


def alpha_sweep(comparison: Comparison) -> Figure | None:
    """Test bits per byte against alpha for each family of mean-pooled conversions (same source and KV heads),
    alpha = 0 the converted model; its source and scratch twin as references. ``None`` without conversions."""
    families: dict[tuple[str, int], dict[float, Spread]] = {}
    refs: dict[str, float] = {}
    for g in comparison.pretrain.values():
        s = g.summary
        if s.get("init") != "convert" or s["conversion_method"] != KV_CONVERSIONS[0]:
            continue
        family = families.setdefault((s["source_run"].rsplit("/", 1)[0], s["n_kv_head"]), {})
        family[0.0] = spread(Stat.of(g.values("converted_test_bpb")))
        family[s["uptrain_fraction"]] = spread(Stat.of(g.values("test_bpb")))
        for ref in (comparison.pretrain.get(BASELINE), scratch_twin(comparison, g)):
            if ref is not None:
                refs[f"{ref.label} (from scratch)"] = spread(Stat.of(ref.values("test_bpb")))[0]
    if not families:
        return None
    curves = {f"{source.removeprefix('runs/pretrain-').upper()} → {kv} KV heads, mean-pooled": dict(sorted(points.items()))
              for (source, kv), points in families.items()}
    return plots.alpha_sweep(curves, refs, "test bits per byte (test split)")


def learning_rates(comparison: Comparison) -> Figure:
    """Learning rate against the tokens behind the weights: each converted variant's first seed beside its source's."""
    runs = {}
    for lab, g in comparison.pretrain.items():
        if g.summary.get("init") == "convert":
            source = next((s for s in comparison.pretrain.values()
                           if s.name == g.summary["source_run"].rsplit("/", 1)[0].removeprefix("runs/")), None)
            if source is not None:
                runs.setdefault(source.label, _behind(source.runs[0]))
            runs[lab] = _behind(g.runs[0])
    return plots.learning_rates(runs, colours(comparison))


def kv_cache(comparison: Comparison) -> Figure:
    per_token = kv_per_token(comparison)  # labelled "<label> (<n> KV heads)", in the pretraining order
    found = [colour(g) for g in comparison.pretrain.values()]
    return plots.kv_cache(per_token, colours={k: c for k, c in zip(per_token, found) if c})


def speed(table: pd.DataFrame) -> Figure:
    """Bars of the tokens/s rows measured here (median, whiskers over repeats) and the runs' own."""
    rows = [k for k in table.index if "tokens_per_s" in str(k)]
    variants = [c for c in table.columns if RATIO not in str(c)]
    return plots.bars({label(k).replace(" (KV cache, measured here)", ""): {v: spread(table.loc[k, v]) for v in variants}
                       for k in rows}, "tokens/s")


def frontier(comparison: Comparison, table: pd.DataFrame | None = None, sweep: pd.DataFrame | None = None,
             context: int = 2048) -> Figure:
    """Every pretraining variant as a point: test bits per byte (mean, min–max over seeds) against KV
    bytes per token, against decode tokens/s measured here at the run's shape (``table``'s largest
    batch) and, with a ``sweep``, at its largest shape, where a variant sits at the sweep's variant
    of its from-scratch label (a converted variant decodes as its from-scratch twin: same shape)."""
    key = decode_key(table)
    real = None
    if sweep is not None and not sweep.empty:
        context = context if context in set(sweep["context"]) else int(sweep["context"].max())
        shape = list(dict.fromkeys(sweep["shape"]))[-1]
        real = sweep[(sweep["shape"] == shape) & (sweep["context"] == context)]
        real = real[real["batch"] == real["batch"].iloc[0]].set_index("variant")  # one row per variant
    points = []
    for lab, g in comparison.pretrain.items():
        s = g.summary
        point = {"label": lab, "colour": colour(g) or "0.3", "converted": s.get("init") == "convert",
                 "quality": spread(Stat.of(g.values(QUALITY))), "kv": (kv_bytes_per_token(s),) * 3}
        if key and lab in table.columns:
            point["decode"] = spread(table.loc[key, lab])
        twin = attention.scratch_key(s["n_kv_head"], s["n_head"])
        twin_label = attention.VARIANTS[twin].label if twin else None
        if real is not None and twin_label in real.index:
            runs = real.loc[twin_label, "decode_repeats"]
            point["real"] = spread(Stat.of(runs, "median"))
        points.append(point)
    axes = {"kv": "KV cache per token (bytes, fp32)"}
    if key:
        axes["decode"] = (f"decode tokens/s at the run's shape, batch {key.removeprefix('gen_tokens_per_s_b')} "
                          "(measured here, median and range over repeats)")
    if real is not None:
        heads = ", ".join(f"{v} {int(r['n_kv_head'])}" for v, r in real.iterrows())
        axes["real"] = (f"decode tokens/s at {shape}, {plots.context_label(context)} context, batch {int(real['batch'].iloc[0])} "
                        f"(random weights; KV heads {heads} of {int(real['n_head'].iloc[0])})")
    return plots.frontier(points, axes)


def finetune_losses(comparison: Comparison) -> Figure:
    return plots.finetune_losses({f"{lab} seed {r.seed}" if len(g.runs) > 1 else lab: r.metrics
                                  for lab, g in comparison.finetune.items() for r in g.runs})


def finetune_memory(table: pd.DataFrame) -> Figure:
    """Footprint, peak memory and trainable parameters (log scale) per variant."""
    units = {"footprint_mib": "MiB", "peak_memory_mib": "MiB", "trainable_params": "parameters"}
    panels = {label(k): {v: spread(table.loc[k, v]) for v in table.columns} for k in units}
    return plots.bars(panels, {label(k): unit for k, unit in units.items()}, log=(label("trainable_params"),))


def finetune_by_source(comparison: Comparison) -> Figure | None:
    """Test bits per byte per source: each variant's base beside it after fine-tuning
    (mean, min–max over seeds); ``None`` when no run scored by source."""
    sources = eval_sources(comparison)
    if not sources:
        return None
    panels = {f"{source_name(src)}: test bits per byte": {
        lab: (spread(nested_stat(g, "base_by_source", src, "bpb")), spread(nested_stat(g, "by_source", src, "bpb")))
        for lab, g in comparison.finetune.items()} for src in sources}
    return plots.before_after(panels, "bits per byte (lower is better)")


def finetune_cost_quality(comparison: Comparison, finetune_cost: pd.DataFrame | None = None) -> Figure | None:
    """Every fine-tune variant as a point: test loss and each task's first metric (mean, min–max over
    seeds) against the run's peak training memory and seconds per step, and, from ``finetune_cost``
    (``measure.finetune_cost``: GPT-2 small, timed here side by side), against GPT-2 small's."""
    if not comparison.finetune:
        return None
    tasks = {src: TASK_METRICS[task][0] for src, task in task_sources(comparison).items()}
    qualities = {"test_loss": "test loss (nats/assistant token, lower is better)",
                 **{f"{key}:{src}": f"{qa.get(src).task_label}: {what} (higher is better)" for src, (key, what) in tasks.items()}}
    costs = {"peak_memory_mib": "peak training memory (MiB)",
             "step_seconds": "seconds per training step (a run's: its train time, evaluations included, / steps)"}
    points = []
    for lab, g in comparison.finetune.items():
        steps = [r.summary["train_seconds"] / r.summary["steps"] if r.summary.get("train_seconds") and r.summary.get("steps")
                 else None for r in g.runs]
        points.append({
            "label": lab,
            "quality": {"test_loss": spread(Stat.of(g.values("test_loss"))),
                        **{f"{key}:{src}": spread(nested_stat(g, "tasks", src, key)) for src, (key, _) in tasks.items()}},
            "cost": {"peak_memory_mib": spread(Stat.of(v / MIB if v else None for v in g.values("peak_memory_bytes"))),
                     "step_seconds": spread(Stat.of(steps))},
            "reference": ({k: (float(finetune_cost.loc[k, lab]),) * 3 for k in costs if k in finetune_cost.index}
                          if finetune_cost is not None and lab in finetune_cost.columns else {}),
        })
    reference = "GPT-2 small, same variant, timed here side by side" if finetune_cost is not None else None
    return plots.cost_quality(points, qualities, costs, reference)

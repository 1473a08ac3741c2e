"""The report's figures, drawn by ``nblib.plots`` from a comparison and its tables."""
from __future__ import annotations

from matplotlib.figure import Figure
import pandas as pd

from nblib import plots
from nblib.report.glance import kv_per_token
from nblib.report.loading import Comparison, Run
from nblib.report.tables import RATIO, label, spread


def val_loss(comparison: Comparison) -> Figure:
    """Validation loss of every pretraining variant, mean over seeds with their range; a converted
    variant's tokens count its source run's too (the tokens behind its weights)."""
    def behind(run: Run) -> list[dict]:
        offset = run.summary.get("total_tokens", run.summary["tokens_seen"]) - run.summary["tokens_seen"]
        return [{**r, "tokens": r["tokens"] + offset} if "tokens" in r else r for r in run.metrics] if offset else run.metrics

    return plots.val_loss({lab: [behind(r) for r in g.runs] for lab, g in comparison.pretrain.items()})


def kv_cache(comparison: Comparison) -> Figure:
    return plots.kv_cache(kv_per_token(comparison))


def speed(table: pd.DataFrame) -> Figure:
    """Bars of the tokens/s rows measured here (median, whiskers over repeats) and the runs' own."""
    rows = [k for k in table.index if "tokens_per_s" in str(k)]
    variants = [c for c in table.columns if RATIO not in str(c)]
    return plots.bars({label(k).replace(" (KV cache, measured here)", ""): {v: spread(table.loc[k, v]) for v in variants}
                       for k in rows}, "tokens/s")


def finetune_losses(comparison: Comparison) -> Figure:
    return plots.finetune_losses({f"{lab} seed {r.seed}" if len(g.runs) > 1 else lab: r.metrics
                                  for lab, g in comparison.finetune.items() for r in g.runs})


def finetune_memory(table: pd.DataFrame) -> Figure:
    """Footprint, peak memory and trainable parameters (log scale) per variant."""
    units = {"footprint_mib": "MiB", "peak_memory_mib": "MiB", "trainable_params": "parameters"}
    panels = {label(k): {v: spread(table.loc[k, v]) for v in table.columns} for k in units}
    return plots.bars(panels, {label(k): unit for k, unit in units.items()}, log=(label("trainable_params"),))

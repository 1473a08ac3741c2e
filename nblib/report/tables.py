"""The report's tables: rows addressed by metric keys, columns by variant, cells that carry their
spread.

A cell measured more than once holds a :class:`Stat` — the values of every seed (quality) or
every interleaved repetition (speed) — shown as its centre with the min–max range and count.
Ratio columns (``GQA ÷ MHA``) divide centres. Display labels live in :data:`LABELS`, apart from
the keys, so the prose and the plots look rows up by key and renaming a label breaks nothing.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pandas as pd

from nblib.plots import context_label
from nblib.report.loading import Comparison, Group

BASELINE = "MHA"
RATIO = " ÷ "  # a column named "GQA ÷ MHA" holds ratios
MIB = 2**20
EMPTY_ANSWER = "(empty answer)"


@dataclass(frozen=True)
class Stat:
    """Repeated measurements of one figure: seeds (``center="mean"``) or timing repeats (``"median"``)."""

    values: tuple[float, ...]
    center: str = "mean"

    @classmethod
    def of(cls, values: Iterable[Any], center: str = "mean") -> Stat | float:
        """A :class:`Stat` of the finite values (a plain number when there is just one; NaN for none)."""
        vals = tuple(float(v) for v in values if v is not None and math.isfinite(float(v)))
        if not vals:
            return math.nan
        return vals[0] if len(vals) == 1 else cls(vals, center)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mid(self) -> float:
        return statistics.fmean(self.values) if self.center == "mean" else statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    def __float__(self) -> float:
        return self.mid


def mid(value: Any) -> float:
    """The centre of a cell (a :class:`Stat`, a number, or NaN for anything else)."""
    if isinstance(value, Stat):
        return value.mid
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def spread(value: Any) -> tuple[float, float, float]:
    """``(centre, low, high)`` of a cell, for error bars."""
    if isinstance(value, Stat):
        return value.mid, value.lo, value.hi
    v = mid(value)
    return v, v, v


# key -> label; dynamic keys (per context, per batch) get theirs from the helpers below.
LABELS: dict[str, str] = {
    "n_layer": "Layers", "n_head": "Query heads", "n_kv_head": "KV heads", "d_model": "d_model",
    "context_length": "Context length", "params": "Parameters", "seeds": "Seeds",
    "kv_per_token": "KV cache per token (bytes, fp32)",
    "best_val_loss": "Best val loss (nats/token)", "best_val_ppl": "Best val perplexity",
    "best_val_bpb": "Best val bits per byte", "tokens_seen": "Tokens seen",
    "run_tokens_per_s": "Train tokens/s, as each run recorded it (its machine, its moment: to compare variants, read the side-by-side row)",
    "train_tokens_per_s": "Train tokens/s, measured here side by side",
    "peak_memory_mib": "Peak memory, training (MiB)", "wall_seconds": "Wall time, training (s)",
    "step_seconds": "Seconds per training step (measured here)",
    "compute_dtype": "Compute dtype",
    "mode": "Base precision", "lora": "LoRA", "learning_rate": "Learning rate",
    "trainable_params": "Trainable parameters", "total_params": "Total parameters",
    "trainable_share": "Trainable share (%)", "footprint_mib": "Model footprint (MiB)",
    "eval_loss": "Eval loss (nats/assistant token)", "eval_ppl": "Eval perplexity", "eval_bpb": "Eval bits per byte",
    "merged_eval_loss": "Eval loss of the merged model (what chat loads)", "base_eval_loss": "Base model eval loss",
    "stop_rate_before": "Stop rate before", "stop_rate_after": "Stop rate after",
    "run_samples_per_s": "Train samples/s, as each run recorded it (its moment: the runs were not timed side by side)", "merged_weights": "Merged folder holds",
    "source_run": "Converted from", "conversion_method": "K/V heads pooled by",
    "uptrain_fraction": "Uptraining steps / the source's (alpha)",
    "converted_val_loss": "Val loss right after conversion (alpha = 0)",
    "uptrained_val_loss": "Val loss after uptraining", "scratch_variant": "Same KV heads from scratch",
    "scratch_val_loss": "Its final val loss", "uptrain_steps": "Uptraining steps",
    "total_steps": "Steps behind the weights (source + uptraining)", "scratch_steps": "Its steps (from scratch)",
}


def kv_key(context: int) -> str:
    LABELS.setdefault(f"kv_at_{context}", f"KV cache at {context_label(context)} context (MiB per sequence, fp32)")
    return f"kv_at_{context}"


def gen_key(batch: int) -> str:
    LABELS.setdefault(f"gen_tokens_per_s_b{batch}", f"Generation tokens/s, batch {batch} (KV cache, measured here)")
    return f"gen_tokens_per_s_b{batch}"


def cache_key(batch: int, tokens: int) -> str:
    LABELS.setdefault(f"gen_cache_mib_b{batch}", f"KV cache allocated, batch {batch} × {tokens} tokens (MiB)")
    return f"gen_cache_mib_b{batch}"


def label(key: Any) -> str:
    return LABELS.get(key, str(key))


def kv_bytes_per_token(summary: dict[str, Any]) -> float:
    """fp32 KV-cache bytes per token from a pretraining summary."""
    return float(summary["kv_cache_bytes_per_token"]["float32"])


def with_ratios(table: pd.DataFrame, base: str = BASELINE) -> pd.DataFrame:
    """Add a ``<variant> ÷ <base>`` column after every other variant (NaN where not a number)."""
    if base not in table.columns:
        return table
    out = {}
    for col in table.columns:
        out[col] = table[col]
        if col != base and RATIO not in str(col):
            num = table[col].map(mid)
            den = table[base].map(mid).where(lambda s: s != 0)
            out[f"{col}{RATIO}{base}"] = num / den
    return pd.DataFrame(out, index=table.index)


def _seed_stat(group: Group, key: str, scale: float = 1.0) -> Stat | float:
    return Stat.of(v / scale if v is not None else None for v in group.values(key))


def pretrain_table(comparison: Comparison, measured: pd.DataFrame | None = None,
                   contexts: Sequence[int] = (1024, 4096)) -> pd.DataFrame:
    """MHA vs GQA (vs MQA): one row per metric key, one column per variant plus ratios to MHA.

    Quality figures are over seeds; ``measured`` (from :func:`measured_rows`) adds the rows timed
    here side by side."""
    cols: dict[str, dict[str, Any]] = {}
    for lab, g in comparison.pretrain.items():
        s = g.summary
        per_token = kv_bytes_per_token(s)
        col: dict[str, Any] = {k: s[k] for k in ("n_layer", "n_head", "n_kv_head", "d_model", "context_length", "params")}
        col["seeds"] = len(g.runs)
        col["kv_per_token"] = per_token
        col.update({kv_key(n): per_token * n / MIB for n in contexts})
        col.update({k: _seed_stat(g, k) for k in ("best_val_loss", "best_val_ppl", "best_val_bpb")})
        col["tokens_seen"] = s["tokens_seen"]
        col["run_tokens_per_s"] = _seed_stat(g, "train_tokens_per_s")
        if measured is not None and lab in measured:
            col.update(measured[lab].to_dict())
        col["peak_memory_mib"] = _seed_stat(g, "peak_memory_bytes", MIB)
        col["wall_seconds"] = _seed_stat(g, "wall_seconds")
        col["compute_dtype"] = s["compute_dtype"]
        cols[lab] = col
    table = pd.DataFrame(cols)
    table.index.name = "metric"
    return with_ratios(table)


def conversion_table(comparison: Comparison) -> pd.DataFrame | None:
    """MHA -> GQA conversion (Ainslie et al. 2023): per variant converted from another run, its method,
    alpha, val loss right after conversion and after uptraining, against the variant of the same KV
    heads trained from scratch; losses over seeds. ``None`` when no run was converted."""
    pre = comparison.pretrain
    scratch = {g.summary["n_kv_head"]: g for g in pre.values() if g.summary.get("init", "scratch") == "scratch"}
    cols = {}
    for lab, g in pre.items():
        s = g.summary
        if s.get("init") != "convert":
            continue
        twin = scratch.get(s["n_kv_head"])
        cols[lab] = {
            "source_run": s["source_run"].rsplit("/", 1)[0], "conversion_method": s["conversion_method"],
            "uptrain_fraction": s["uptrain_fraction"], "n_kv_head": s["n_kv_head"],
            "converted_val_loss": _seed_stat(g, "converted_val_loss"),
            "uptrained_val_loss": _seed_stat(g, "uptrained_val_loss"),
            "scratch_variant": twin.label if twin else "none compared",
            "scratch_val_loss": _seed_stat(twin, "final_val_loss") if twin else math.nan,
            "uptrain_steps": s["steps"], "total_steps": s["total_steps"],
            "scratch_steps": twin.summary["steps"] if twin else math.nan,
        }
    if not cols:
        return None
    table = pd.DataFrame(cols)
    table.index.name = "metric"
    return table


def measured_rows(generation: pd.DataFrame | None = None, training: pd.DataFrame | None = None) -> pd.DataFrame:
    """Rows timed side by side in this process: per repeat ``variant, batch, tokens_per_s`` (and
    ``cache_bytes``, ``cache_tokens``) from generation, ``variant, tokens_per_s`` from training;
    each cell the median with its repeat range."""
    rows: dict[str, dict[str, Any]] = {}
    if generation is not None:
        tokens = int(generation["cache_tokens"].iloc[0])
        for (batch, variant), part in generation.groupby(["batch", "variant"], sort=False):
            rows.setdefault(gen_key(int(batch)), {})[variant] = Stat.of(part["tokens_per_s"], "median")
            rows.setdefault(cache_key(int(batch), tokens), {})[variant] = part["cache_bytes"].iloc[0] / MIB
    if training is not None:
        for variant, part in training.groupby("variant", sort=False):
            rows.setdefault("train_tokens_per_s", {})[variant] = Stat.of(part["tokens_per_s"], "median")
    return pd.DataFrame(rows).T


def finetune_table(comparison: Comparison) -> pd.DataFrame | None:
    """Fine-tune variants side by side (``None`` when there are none); quality over seeds."""
    if not comparison.finetune:
        return None
    cols = {}
    for lab, g in comparison.finetune.items():
        s = g.summary
        cols[lab] = {
            "mode": s["mode"], "lora": "yes" if s["lora"] else "no", "compute_dtype": s["compute_dtype"],
            "learning_rate": s["learning_rate"], "seeds": len(g.runs),
            "trainable_params": s["trainable_params"], "total_params": s["total_params"],
            "trainable_share": 100 * s["trainable_params"] / s["total_params"],
            "footprint_mib": s["footprint_bytes"] / MIB,
            "peak_memory_mib": _seed_stat(g, "peak_memory_bytes", MIB),
            **{k: _seed_stat(g, k) for k in ("eval_loss", "eval_ppl", "eval_bpb", "merged_eval_loss", "base_eval_loss",
                                               "stop_rate_before", "stop_rate_after")},
            "run_samples_per_s": _seed_stat(g, "train_samples_per_s"),
            "wall_seconds": _seed_stat(g, "wall_seconds"),
            "merged_weights": s["merged_weights"] or "–",
        }
    table = pd.DataFrame(cols)
    table.index.name = "metric"
    return table


def finetune_samples(comparison: Comparison) -> pd.DataFrame | None:
    """Answers to the fixed questions (first seed of each variant): the base model's, then each
    variant's after training; an answer that was only whitespace or an immediate end-of-text shows
    as ``(empty answer)``."""
    ft = comparison.finetune
    if not ft:
        return None
    first = next(iter(ft.values())).summary
    questions = [x["question"] for x in first["samples"]]
    table = {"Base model": [x["before"] or EMPTY_ANSWER for x in first["samples"]]}
    for lab, g in ft.items():
        answers = {x["question"]: x["after"] or EMPTY_ANSWER for x in g.summary["samples"]}
        table[lab] = [answers.get(q, "–") for q in questions]
    return pd.DataFrame(table, index=pd.Index(questions, name="question"))


def runs_overview(comparison: Comparison) -> pd.DataFrame:
    """One row per variant: its folder, stage, profile, seeds and parameter count."""
    rows = [{
        "run": g.name, "folder": f"runs/{g.name}", "stage": g.stage, "variant": g.summary["variant"],
        "label": g.label, "profile": g.summary["profile"], "seeds": ", ".join(map(str, g.seeds)),
        "parameters": g.summary.get("params", g.summary.get("total_params")),
    } for g in comparison.groups.values()]
    return pd.DataFrame(rows).set_index("run")


def cost_table(sweep: pd.DataFrame, context: int) -> pd.DataFrame:
    """Decode tokens/s and KV-cache MiB at ``context`` per shape and variant from
    ``measure.decode_sweep``, with ratios to MHA within each shape."""
    part = sweep[sweep["context"] == context]
    rows = {}
    for shape, sub in part.groupby("shape", sort=False):
        batch = int(sub["batch"].iloc[0])
        tps = f"{shape}: decode tokens/s at {context_label(context)} context, batch {batch}"
        kv = f"{shape}: KV cache at {context_label(context)} context, batch {batch} (MiB)"
        rows[tps] = {v: Stat.of(p["decode_repeats"].iloc[0], "median") for v, p in sub.groupby("variant", sort=False)}
        rows[kv] = {v: p["kv_cache_bytes"].iloc[0] / MIB for v, p in sub.groupby("variant", sort=False)}
    table = pd.DataFrame(rows).T
    table.index.name = "metric"
    return with_ratios(table)


def format_value(value: Any, ratio: bool = False) -> str:
    """How a cell is shown: thousands separators, 4 significant digits, ratios as ``0.50×``, a
    :class:`Stat` as ``centre (low–high, n=N)``."""
    if isinstance(value, Stat):
        return f"{format_value(value.mid)} ({format_value(value.lo)}–{format_value(value.hi)}, n={value.n})"
    if value is None or isinstance(value, str):
        return "–" if value is None else value
    if isinstance(value, bool):
        return "yes" if value else "no"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "–"
    if ratio:
        return f"{v:.2f}×"
    if abs(v) >= 1000 or (v.is_integer() and isinstance(value, int)):
        return f"{v:,.0f}"
    return f"{v:.4g}"


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the report shows it: labels for keys, strings for cells (for notebooks)."""
    out = table.copy().astype(object)
    for col in table.columns:
        out[col] = [format_value(v, ratio=RATIO in str(col)) for v in table[col]]
    out.index = [label(k) for k in table.index]
    out.index.name = table.index.name
    return out

"""The report's first section: the comparison in words, each headline a verdict with its evidence.

Quality differences are paired by seed (variant minus baseline, seed by seed: the two share the
seed, hence the data order). A difference is called only when there are at least two seeds,
every seed's difference has the same sign, and the mean difference exceeds twice its standard
error; otherwise the sentence says no difference can be called at this size. One seed never
makes an effect. Speed ratios were measured side by side here and carry the range over the
interleaved repetitions.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import pandas as pd

from nblib.plots import context_label
from nblib.report.loading import Comparison, Group
from nblib.report.tables import BASELINE, RATIO, Stat, kv_bytes_per_token, label, mid

MIB = 2**20


@dataclass(frozen=True)
class Difference:
    """Paired per-seed differences ``variant - baseline`` of one figure."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sem(self) -> float:
        return statistics.stdev(self.values) / math.sqrt(self.n) if self.n > 1 else math.inf

    @property
    def called(self) -> bool:
        """Whether the difference is larger than the seeds' noise (see the module docstring)."""
        same_sign = all(v > 0 for v in self.values) or all(v < 0 for v in self.values)
        return self.n >= 2 and same_sign and abs(self.mean) > 2 * self.sem


def paired(base: Group, other: Group, key: str) -> Difference:
    """``other - base`` of ``summary[key]`` for each seed both have."""
    a = {r.seed: r.summary[key] for r in base.runs}
    b = {r.seed: r.summary[key] for r in other.runs}
    return Difference(tuple(float(b[s]) - float(a[s]) for s in sorted(set(a) & set(b))
                            if a[s] is not None and b[s] is not None))


def verdict(d: Difference, lower_is_better: bool = True) -> str:
    """The difference in words, with its evidence."""
    if d.n == 0:
        return "not measured"
    if d.n == 1:
        return f"{d.mean:+.3f} with one seed: no difference can be called (run several seeds to measure the spread)"
    evidence = f"{d.mean:+.3f} (per seed {min(d.values):+.3f} to {max(d.values):+.3f}, ±{d.sem:.3f} s.e., {d.n} seeds)"
    if not d.called:
        return f"{evidence}: no difference at this size"
    worse = (d.mean > 0) == lower_is_better
    return f"{evidence}: clearly {'worse' if worse else 'better'}"


def _x(r: Any) -> str:
    v = mid(r)
    return "n/a" if math.isnan(v) else f"{v:.2f}×"


def _range(table: pd.DataFrame, row: str, v: str, base: str) -> str:
    """A measured ratio with its repeat range: ``1.07× (0.98–1.12×)``."""
    a, b = table.loc[row, v], table.loc[row, base]
    if isinstance(a, Stat) and isinstance(b, Stat):
        return f"{a.mid / b.mid:.2f}× ({a.lo / b.hi:.2f}–{a.hi / b.lo:.2f}×)"
    return _x(mid(a) / mid(b) if mid(b) else math.nan)


def pretrain_lines(comparison: Comparison, table: pd.DataFrame) -> list[str]:
    """Per non-MHA variant: cache and parameters, quality verdicts, speed measured here."""
    pre = comparison.pretrain
    lines: list[str] = []
    if BASELINE not in pre:
        return lines
    base = pre[BASELINE]
    for v, g in pre.items():
        if v == BASELINE:
            continue
        if g.summary.get("init") == "convert":  # its cache and speed are its scratch twin's: only quality is news
            lines.append(f"**{v} − MHA** best val loss {verdict(paired(base, g, 'best_val_loss'))} (converted from "
                         f"MHA, then uptrained for {g.summary['uptrain_fraction']:g} of its steps).")
            continue
        r = table[f"{v}{RATIO}{BASELINE}"]
        kv = [k for k in table.index if str(k).startswith("kv_at_")][-1]
        heads = f"{g.summary['n_kv_head']} KV heads for {g.summary['n_head']} query heads"
        lines.append(
            f"**{v}** ({heads}) keeps a KV cache {_x(r[kv])} the size of MHA's: {mid(table.loc[kv, v]):.3g} vs "
            f"{mid(table.loc[kv, BASELINE]):.3g} MiB per sequence at {label(kv).split()[3]} context (fp32), with "
            f"{_x(r['params'])} the parameters."
        )
        lines.append(f"**{v} − MHA** best val loss {verdict(paired(base, g, 'best_val_loss'))}; "
                     f"bits per byte {paired(base, g, 'best_val_bpb').mean:+.4f}.")
        gen = [k for k in table.index if str(k).startswith("gen_tokens_per_s_b")]
        parts = [f"generation batch {k.removeprefix('gen_tokens_per_s_b')} {_range(table, k, v, BASELINE)}" for k in gen]
        if "train_tokens_per_s" in table.index:
            parts.append(f"training {_range(table, 'train_tokens_per_s', v, BASELINE)}")
        if parts:
            lines.append(f"**{v}** speed as a multiple of MHA's, measured side by side here (range over the "
                         f"interleaved repeats): {'; '.join(parts)}.")
    return lines


def cost_lines(sweep: pd.DataFrame | None, context: int = 2048) -> list[str]:
    """GQA's decode speed-up and cache saving at real shapes (random weights, this machine)."""
    if sweep is None or sweep.empty:
        return []
    lines = []
    at = sweep[sweep["context"] == context]
    for shape, part in at.groupby("shape", sort=False):
        by = {v: p.iloc[0] for v, p in part.groupby("variant", sort=False)}
        if "MHA" not in by:
            continue
        for v, row in by.items():
            if v == "MHA":
                continue
            speed = row["decode_tokens_per_s"] / by["MHA"]["decode_tokens_per_s"]
            cache = row["kv_cache_bytes"] / by["MHA"]["kv_cache_bytes"]
            mine, theirs = row["decode_repeats"], by["MHA"]["decode_repeats"]
            noise = (f"{min(mine) / max(theirs):.2f}–{max(mine) / min(theirs):.2f}× over {len(mine)} repeats"
                     if len(mine) > 1 else "one repeat: a single timing, so read it as rough on a loaded machine")
            lines.append(
                f"At real scale ({shape}, random weights, measured on this machine): **{v}** decodes {speed:.2f}× MHA's "
                f"tokens/s ({noise}) at {context_label(context)} context, batch {int(row['batch'])}, with a KV cache "
                f"{cache:.2f}× the size ({row['kv_cache_bytes'] / MIB:.0f} vs {by['MHA']['kv_cache_bytes'] / MIB:.0f} MiB)."
            )
    return lines


def finetune_lines(comparison: Comparison, table: pd.DataFrame | None) -> list[str]:
    """Per variant: what it trains and costs; against each baseline, footprint, memory, speed and a loss verdict."""
    if table is None:
        return []
    ft = {g.summary["variant"]: g for g in comparison.finetune.values()}
    lines = []
    for g in comparison.finetune.values():
        c = table[g.label]
        lines.append(
            f"**{g.label}** trains {mid(c['trainable_params']):,.0f} parameters ({mid(c['trainable_share']):.3g}% of the model) "
            f"in {c['compute_dtype']}; model footprint {mid(c['footprint_mib']):.3g} MiB; eval loss "
            f"{mid(c['eval_loss']):.3f} (base model {mid(c['base_eval_loss']):.3f}, merged model "
            f"{mid(c['merged_eval_loss']):.3f})."
        )
        for b in g.summary["baselines"]:
            if b not in ft:
                continue
            base = ft[b]
            bc = table[base.label]
            ratio = lambda k: mid(c[k]) / mid(bc[k]) if mid(bc[k]) else math.nan  # noqa: E731
            lines.append(
                f"**{g.label}** against {base.label}: {ratio('footprint_mib'):.2f}× the footprint, "
                f"{ratio('peak_memory_mib'):.2f}× the peak memory; eval loss {verdict(paired(base, g, 'eval_loss'))}."
            )
    return lines


def finetune_cost_lines(cost: pd.DataFrame | None) -> list[str]:
    """What LoRA and an 8-bit base save on GPT-2 small (``measure.finetune_cost``)."""
    if cost is None or cost.empty:
        return []
    cols = list(cost.columns)
    full = next((c for c in cols if not c.startswith("LoRA")), None)
    lines = []
    for c in cols:
        if c == full:
            continue
        parts = [f"trains {cost.loc['trainable_params', c]:,.0f} of {cost.loc['total_params', c]:,.0f} parameters"]
        if full is not None:
            parts.append(f"its base takes {cost.loc['footprint_mib', c]:.0f} MiB vs {cost.loc['footprint_mib', full]:.0f} "
                         f"({cost.loc['footprint_mib', c] / cost.loc['footprint_mib', full]:.2f}×) and a training step peaks at "
                         f"{cost.loc['peak_memory_mib', c] / cost.loc['peak_memory_mib', full]:.2f}× the full fine-tune's memory")
        lines.append(f"On GPT-2 small (124M, measured on this machine), **{c}** {'; '.join(parts)}.")
    return lines


def at_a_glance(comparison: Comparison, pretrain: pd.DataFrame | None, finetune: pd.DataFrame | None,
                sweep: pd.DataFrame | None = None, finetune_cost: pd.DataFrame | None = None) -> list[str]:
    """Every headline sentence, pretraining first."""
    lines = pretrain_lines(comparison, pretrain) if pretrain is not None else []
    lines += cost_lines(sweep)
    lines += finetune_lines(comparison, finetune)
    lines += finetune_cost_lines(finetune_cost)
    if comparison.mismatches:
        lines.insert(0, f"**Warning**: {len(comparison.mismatches)} compared pair(s) are not matched (see the red "
                        "section): their differences mix the compared setting with others.")
    return [line for line in lines if line]


def kv_per_token(comparison: Comparison) -> dict[str, float]:
    """``label -> fp32 KV bytes per token`` for the KV-cache plot."""
    return {f"{lab} ({g.summary['n_kv_head']} KV heads)": kv_bytes_per_token(g.summary) for lab, g in comparison.pretrain.items()}

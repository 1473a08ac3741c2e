"""The report's first section, the comparison in words (at most six lines, each
headline a verdict with its evidence), and the verdicts and details shown below the tables.

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

from nblib.convert import KV_CONVERSIONS
from nblib.plots import context_label
from nblib.report.loading import Comparison, Group
from nblib.report.tables import (BASELINE, RATIO, TASK_METRICS, Stat, decode_key, kv_bytes_per_token, label, mid,
                                 scratch_twin)

MIB = 2**20
QUALITY = "best_val_bpb"  # the quality figure of the frontier, Table 1 and the verdicts (bits per byte)


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


def brief(d: Difference) -> str:
    """A difference with its evidence in a few words, for the at-a-glance lines (one seed calls nothing)."""
    if d.n == 0:
        return "not measured"
    if d.n == 1:
        return f"{d.mean:+.3f} (one seed: no difference can be called)"
    call = ("clearly worse" if d.mean > 0 else "clearly better") if d.called else "no difference at this size"
    return f"{d.mean:+.3f} (±{d.sem:.3f} s.e., {d.n} seeds: {call})"


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
        if g.summary.get("init") == "convert":  # its cache and speed are its scratch twin's, its quality is in verdict_lines
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


def finetune_task_lines(table: pd.DataFrame | None) -> list[str]:
    """Per variant: each source's bits per byte and task metrics on the test split, beside its base model's."""
    if table is None:
        return []
    metrics = ("bpb", *(key for keys in TASK_METRICS.values() for key, _ in keys), "chance")
    rows = [k for k in table.index if str(k).split(":", 1)[0] in metrics]
    lines = []
    for col in table.columns:
        parts = [f"{label(k)} {mid(table.loc[k, col]):.3g}" + ("" if k.startswith("chance:") else
                                                            f" (base model {mid(table.loc[f'base_{k}', col]):.3g})")
                 for k in rows if not math.isnan(mid(table.loc[k, col]))]
        if parts:
            lines.append(f"**{col}** on the test split: {'; '.join(parts)}.")
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


def details(comparison: Comparison, pretrain: pd.DataFrame | None, finetune: pd.DataFrame | None,
            sweep: pd.DataFrame | None = None, finetune_cost: pd.DataFrame | None = None) -> list[str]:
    """Every headline sentence behind the at-a-glance lines, pretraining first."""
    lines = pretrain_lines(comparison, pretrain) if pretrain is not None else []
    lines += cost_lines(sweep)
    lines += finetune_lines(comparison, finetune)
    lines += finetune_task_lines(finetune)
    lines += finetune_cost_lines(finetune_cost)
    return [line for line in lines if line]


def _converted(comparison: Comparison) -> list[Group]:
    return [g for g in comparison.pretrain.values() if g.summary.get("init") == "convert"]


def _tokens(g: Group) -> float:
    """Mean tokens behind a variant's weights over its seeds (a converted run's source run included)."""
    return statistics.fmean(r.summary.get("total_tokens", r.summary["tokens_seen"]) for r in g.runs)


def savings_line(comparison: Comparison, table: pd.DataFrame | None) -> str:
    """What each from-scratch KV-head step saves against MHA: cache bytes per token and decode speed measured here."""
    pre = comparison.pretrain
    if BASELINE not in pre:
        return ""
    kv0, key = kv_bytes_per_token(pre[BASELINE].summary), decode_key(table)
    parts = []
    for v, g in pre.items():
        s = g.summary
        if v == BASELINE or s.get("init") == "convert":
            continue
        kv = kv_bytes_per_token(s)
        part = f"{v} ({s['n_kv_head']} of {s['n_head']} KV heads) {kv / kv0:.2f}× the KV cache ({kv:,.0f} vs {kv0:,.0f} bytes/token)"
        if key and v in table.columns and BASELINE in table.columns:
            part += f", {_range(table, key, v, BASELINE)} the decode tokens/s"
        parts.append(part)
    if not parts:
        return ""
    how = (f"; decoding measured here side by side at batch {key.removeprefix('gen_tokens_per_s_b')}, median (range over "
           "repeats)") if key else ""
    return f"**What fewer KV heads save** (against MHA{how}): {'; '.join(parts)}."


def quality_line(comparison: Comparison) -> str:
    """What each from-scratch KV-head step costs in val bits per byte, paired by seed."""
    pre = comparison.pretrain
    if BASELINE not in pre:
        return ""
    parts = [f"{v} {brief(paired(pre[BASELINE], g, QUALITY))}" for v, g in pre.items()
             if v != BASELINE and g.summary.get("init") != "convert"]
    return f"**What it costs in quality** (val bits per byte minus MHA's, paired by seed): {'; '.join(parts)}." if parts else ""


def uptrained_line(comparison: Comparison) -> str:
    """Mean-pooled uptrained variants against the same KV heads from scratch and against MHA."""
    pre = comparison.pretrain
    parts = []
    for g in _converted(comparison):
        twin, s = scratch_twin(comparison, g), g.summary
        if twin is None or BASELINE not in pre or s["conversion_method"] != KV_CONVERSIONS[0]:
            continue
        parts.append(f"{g.label} (converted from MHA, alpha = {s['uptrain_fraction']:g}) {brief(paired(twin, g, QUALITY))} "
                     f"against {twin.label} from scratch and {brief(paired(pre[BASELINE], g, QUALITY))} against MHA, "
                     f"with {_tokens(g) / _tokens(twin):.2f}× the training tokens of {twin.label} (MHA's counted)")
    return f"**Uptrained vs from scratch** (val bits per byte, paired by seed): {'; '.join(parts)}." if parts else ""


def finetune_line(comparison: Comparison, table: pd.DataFrame | None, cost: pd.DataFrame | None) -> str:
    """Each LoRA variant against the full fine-tune: what it trains and takes, its eval loss, and its memory at GPT-2 small."""
    ft = list(comparison.finetune.values())
    full = next((g for g in ft if not g.summary["lora"]), None)
    if table is None or full is None:
        return ""
    parts = []
    for g in ft:
        if g is full:
            continue
        c, f = table[g.label], table[full.label]
        part = (f"{g.label} trains {mid(c['trainable_share']):.3g}% of the parameters with "
                f"{mid(c['footprint_mib']) / mid(f['footprint_mib']):.2f}× the footprint here, eval loss "
                f"{brief(paired(full, g, 'eval_loss'))}")
        if cost is not None and g.label in cost.columns and full.label in cost.columns:
            part += (f"; on GPT-2 small {cost.loc['footprint_mib', g.label] / cost.loc['footprint_mib', full.label]:.2f}× "
                     f"the footprint, {cost.loc['peak_memory_mib', g.label] / cost.loc['peak_memory_mib', full.label]:.2f}× "
                     "a training step's peak memory")
        parts.append(part)
    return (f"**Fine-tuning trade-off** (against {full.label}; eval loss in nats per assistant token, paired by seed): "
            f"{'; '.join(parts)}.") if parts else ""


def real_scale_line(sweep: pd.DataFrame | None, context: int = 2048) -> str:
    """One line for the real-scale decode sweep: each variant's ratios to MHA as a range over the shapes."""
    if sweep is None or sweep.empty:
        return ""
    if context not in set(sweep["context"]):
        context = int(sweep["context"].max())
    at = sweep[sweep["context"] == context]
    ratios: dict[str, list[tuple[float, float, str]]] = {}
    repeats = []
    for _, part in at.groupby("shape", sort=False):
        by = {v: p.iloc[0] for v, p in part.groupby("variant", sort=False)}
        if BASELINE not in by:
            continue
        m = by[BASELINE]
        for v, row in by.items():
            repeats.append(len(row["decode_repeats"]))
            if v != BASELINE:
                ratios.setdefault(v, []).append((row["decode_tokens_per_s"] / m["decode_tokens_per_s"],
                                                 row["kv_cache_bytes"] / m["kv_cache_bytes"],
                                                 f"{int(row['n_kv_head'])} of {int(row['n_head'])}"))
    if not ratios:
        return ""

    def span(xs: list[float]) -> str:
        return f"{min(xs):.2f}×" if max(xs) - min(xs) < 0.005 else f"{min(xs):.2f}–{max(xs):.2f}×"

    parts = [f"{v} ({', '.join(r[2] for r in rs)} KV heads) decodes {span([r[0] for r in rs])} MHA's tokens/s with "
             f"{span([r[1] for r in rs])} its KV cache" for v, rs in ratios.items()]
    shapes = list(dict.fromkeys(at["shape"]))
    n = min(repeats)
    noise = ("one timing per variant and shape, so rough on a loaded machine" if n == 1
             else f"each the median of {n} repeats")
    return (f"**At real scale** (random weights on this machine, {context_label(context)} context, batch "
            f"{int(at['batch'].iloc[0])}, range over {len(shapes)} shape{'s' if len(shapes) > 1 else ''}: "
            f"{', '.join(shapes)}; {noise}): {'; '.join(parts)}.")


def at_a_glance(comparison: Comparison, pretrain: pd.DataFrame | None, finetune: pd.DataFrame | None,
                sweep: pd.DataFrame | None = None, finetune_cost: pd.DataFrame | None = None) -> list[str]:
    """The reader's questions, one line each (six at most, with the unmatched-pairs warning): what fewer KV
    heads save and cost, uptrained vs from scratch, the fine-tuning trade-off, the cost at real scale
    (the sentences behind them: :func:`details`)."""
    lines = [savings_line(comparison, pretrain), quality_line(comparison), uptrained_line(comparison),
             finetune_line(comparison, finetune, finetune_cost), real_scale_line(sweep)]
    if comparison.mismatches:
        lines.insert(0, f"**Warning**: {len(comparison.mismatches)} compared pair(s) are not matched (see the red "
                        "section): their differences mix the compared setting with others.")
    return [line for line in lines if line]


def verdict_lines(comparison: Comparison) -> list[str]:
    """Quality verdicts with the seed spread: each from-scratch variant against MHA; per family of
    conversions (same source, KV heads and alpha) its best method by the paper's ranking against MHA
    and against the same KV heads from scratch (with the compute each saw), the other methods against it."""
    pre = comparison.pretrain
    if BASELINE not in pre:
        return []
    unit = "val bits per byte"
    lines = [f"**{v} − MHA** {unit}: {verdict(paired(pre[BASELINE], g, QUALITY))}." for v, g in pre.items()
             if v != BASELINE and g.summary.get("init") != "convert"]
    families: dict[tuple, list[Group]] = {}
    for g in _converted(comparison):
        s = g.summary
        families.setdefault((s["source_run"].rsplit("/", 1)[0], s["n_kv_head"], s["uptrain_fraction"]), []).append(g)
    for family in families.values():
        ref, *others = sorted(family, key=lambda g: (KV_CONVERSIONS + (g.summary["conversion_method"],)).index(g.summary["conversion_method"]))
        lines.append(f"**{ref.label} − MHA** {unit}: {verdict(paired(pre[BASELINE], ref, QUALITY))}.")
        twin = scratch_twin(comparison, ref)
        if twin is not None:
            lines.append(f"**{ref.label} − {twin.label}** (uptrained vs from scratch, after {_tokens(ref):,.0f} vs "
                         f"{_tokens(twin):,.0f} training tokens, MHA's counted) {unit}: {verdict(paired(twin, ref, QUALITY))}.")
        lines += [f"**{g.label} − {ref.label}** (K/V heads by {g.summary['conversion_method']} vs "
                  f"{ref.summary['conversion_method']}) {unit}: {verdict(paired(ref, g, QUALITY))}." for g in others]
    return lines


def kv_per_token(comparison: Comparison) -> dict[str, float]:
    """``label -> fp32 KV bytes per token`` for the KV-cache plot."""
    return {f"{lab} ({g.summary['n_kv_head']} KV heads)": kv_bytes_per_token(g.summary) for lab, g in comparison.pretrain.items()}

"""The report's first section, the comparison in words (at most six lines, each
headline a verdict with its evidence), and the verdicts and details shown below the tables.

Quality differences are paired by seed (variant minus baseline, seed by seed: the two share the
seed, hence the data order) and tested by ``nblib.stats.paired``; every comparison the report
states a verdict on (:func:`comparisons`) is corrected together by ``nblib.stats.holm`` into one
:class:`Calls`, built once per report, and each is written as its mean with the corrected
interval and unit. A difference is called only when that interval excludes 0; one seed never
calls. Speed ratios were measured side by side here and carry the range over the interleaved
repetitions.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import pandas as pd

from nblib import qa, stats
from nblib.convert import KV_CONVERSIONS
from nblib.plots import context_label
from nblib.report.loading import Comparison, Group, pairs
from nblib.report.tables import (BASELINE, HARNESS, RATIO, TASK_METRICS, Stat, decode_key, kv_bytes_per_token, label, mid,
                                 scratch_twin)

MIB = 2**20
QUALITY = "test_bpb"  # the quality figure of the frontier, Table 1 and the verdicts (bits per byte, test split)
FT_QUALITY = "test_loss"  # a fine-tune's: nats per assistant token on the test dialogues (the val ones pick its checkpoint)
UNITS = {QUALITY: "bpb", FT_QUALITY: "nats/token"}  # the unit each verdict's interval is written in
Pair = tuple[Group, Group, str]  # one comparison: (base, other, summary key), read as other - base


def seed_values(base: Group, other: Group, key: str) -> tuple[list[float], list[float]]:
    """``summary[key]`` of ``base`` and of ``other`` for each seed both measured, in seed order."""
    a = {r.seed: r.summary.get(key) for r in base.runs}
    b = {r.seed: r.summary.get(key) for r in other.runs}
    seeds = [s for s in sorted(set(a) & set(b)) if a[s] is not None and b[s] is not None]
    return [float(a[s]) for s in seeds], [float(b[s]) for s in seeds]


def paired(base: Group, other: Group, key: str) -> stats.Verdict:
    """``other - base`` of ``summary[key]`` paired by seed (lower is better), before any correction; a
    task key (:func:`task_key`) pairs by seed and by test item (higher is better)."""
    if key.startswith(ITEMS):
        return stats.paired_items(*item_tables(base, other, key), higher_is_better=True)
    return stats.paired(*seed_values(base, other, key))


ITEMS = "items:"  # a verdict key on per-item task scores: items:<summary field>:<source>:<metric>


def task_key(field: str, source: str, metric: str) -> str:
    return f"{ITEMS}{field}:{source}:{metric}"


def item_tables(base: Group, other: Group, key: str) -> tuple[list[list[float]], list[list[float]]]:
    """Seeds x items tables of a task score for the seeds both scored, keeping the items every run scored."""
    field, source, metric = key.removeprefix(ITEMS).split(":")

    def items(g: Group) -> dict[int, list[float | None]]:
        return {r.seed: r.summary.get(field, {}).get(source, {}).get("items", {}).get(metric) for r in g.runs}

    a, b = items(base), items(other)
    seeds = [s for s in sorted(set(a) & set(b)) if a[s] is not None and b[s] is not None and len(a[s]) == len(b[s])]
    keep = [i for i in range(len(a[seeds[0]]) if seeds else 0)
            if all(a[s][i] is not None and b[s][i] is not None for s in seeds)]
    return [[float(a[s][i]) for i in keep] for s in seeds], [[float(b[s][i]) for i in keep] for s in seeds]


def task_keys(base: Group, other: Group) -> list[str]:
    """The harness tasks both fine-tunes scored item by item, each by its first metric (nblib.qa)."""
    scored = [{src for src, v in r.summary.get("harness", {}).items() if v.get("items", {}).get(qa.get(src).harness.metrics[0])}
              for g in (base, other) for r in g.runs]
    common = set.intersection(*scored) if scored else set()
    return [task_key("harness", src, qa.get(src).harness.metrics[0]) for src in sorted(common)]


def key_label(key: str) -> str:
    """How a verdict key reads in a sentence: ``test loss`` or ``SciQ (lm-eval `sciq`) acc``."""
    if not key.startswith(ITEMS):
        return {FT_QUALITY: "test loss", QUALITY: "test bits per byte"}[key]
    _, source, metric = key.removeprefix(ITEMS).split(":")
    return f"{qa.get(source).harness.label} {metric}"


@dataclass(frozen=True)
class Calls:
    """Every verdict of one report, Holm-corrected together (:func:`report_calls`), by comparison."""

    verdicts: dict[tuple[str, str, str], stats.Verdict]

    def __getitem__(self, pair: Pair) -> stats.Verdict:
        base, other, key = pair
        return self.verdicts[base.name, other.name, key]

    @property
    def family(self) -> int:
        """How many comparisons the correction covered (those with two or more seeds)."""
        return sum(v.n >= 2 for v in self.verdicts.values())

    def says(self, base: Group, other: Group, key: str) -> str:
        """The corrected verdict in one line: mean, interval and unit, called or not, seeds."""
        return stats.format_interval(self[base, other, key], UNITS.get(key, ""))


def report_calls(comparison: Comparison) -> Calls:
    """The verdicts of every comparison the report states, corrected once over all of them."""
    family = comparisons(comparison)
    corrected = stats.holm([paired(*pair) for pair in family])
    return Calls({(b.name, o.name, k): v for (b, o, k), v in zip(family, corrected)})


def _x(r: Any) -> str:
    v = mid(r)
    return "n/a" if math.isnan(v) else f"{v:.2f}×"


def _range(table: pd.DataFrame, row: str, v: str, base: str) -> str:
    """A measured ratio with its repeat range: ``1.07× (0.98–1.12×)``."""
    a, b = table.loc[row, v], table.loc[row, base]
    if isinstance(a, Stat) and isinstance(b, Stat):
        return f"{a.mid / b.mid:.2f}× ({a.lo / b.hi:.2f}–{a.hi / b.lo:.2f}×)"
    return _x(mid(a) / mid(b) if mid(b) else math.nan)


def pretrain_lines(comparison: Comparison, table: pd.DataFrame, calls: Calls) -> list[str]:
    """Per non-MHA variant: cache and parameters, the quality verdict, speed measured here."""
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
        lines.append(f"**{v} − MHA** test bits per byte {calls.says(base, g, QUALITY)}; test loss "
                     f"{paired(base, g, 'test_loss').mean:+.3f} nats/token (mean over seeds).")
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


def finetune_lines(comparison: Comparison, table: pd.DataFrame | None, calls: Calls) -> list[str]:
    """Per variant: what it trains and costs; against each baseline, footprint, memory, speed and a loss verdict."""
    if table is None:
        return []
    ft = {g.summary["variant"]: g for g in comparison.finetune.values()}
    lines = []
    for g in comparison.finetune.values():
        c = table[g.label]
        lines.append(
            f"**{g.label}** trains {mid(c['trainable_params']):,.0f} parameters ({mid(c['trainable_share']):.3g}% of the model) "
            f"in {c['compute_dtype']} at learning rate {c['learning_rate']:g}; model footprint {mid(c['footprint_mib']):.3g} MiB; "
            f"test loss {mid(c['ft_test_loss']):.3f} (base model {mid(c['base_test_loss']):.3f}); val loss, which chose the "
            f"checkpoint, {mid(c['eval_loss']):.3f} (merged model {mid(c['merged_eval_loss']):.3f})."
        )
        for b in g.summary["baselines"]:
            if b not in ft:
                continue
            base = ft[b]
            bc = table[base.label]
            ratio = lambda k: mid(c[k]) / mid(bc[k]) if mid(bc[k]) else math.nan  # noqa: E731
            lines.append(
                f"**{g.label}** against {base.label}: {ratio('footprint_mib'):.2f}× the footprint, "
                f"{ratio('peak_memory_mib'):.2f}× the peak memory; test loss {calls.says(base, g, FT_QUALITY)}"
                + "".join(f"; {key_label(k)} {calls.says(base, g, k)} (paired by seed and test item)"
                          for k in task_keys(base, g)) + "."
            )
    return lines


def finetune_task_lines(table: pd.DataFrame | None) -> list[str]:
    """Per variant: each source's bits per byte and task metrics on the test split, beside its base model's."""
    if table is None:
        return []
    metrics = ("bpb", *(key for keys in TASK_METRICS.values() for key, _ in keys), "chance",
               *(f"{HARNESS}{m}" for src in qa.sources().values() if src.harness for m in src.harness.metrics))
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
            sweep: pd.DataFrame | None = None, finetune_cost: pd.DataFrame | None = None,
            calls: Calls | None = None) -> list[str]:
    """Every headline sentence behind the at-a-glance lines, pretraining first (``calls``: the
    report's corrected verdicts, :func:`report_calls` of ``comparison`` when not given)."""
    calls = calls or report_calls(comparison)
    lines = pretrain_lines(comparison, pretrain, calls) if pretrain is not None else []
    lines += cost_lines(sweep)
    lines += finetune_lines(comparison, finetune, calls)
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


def _scratch(comparison: Comparison) -> list[Group]:
    """The pretraining variants trained from scratch, MHA aside."""
    return [g for v, g in comparison.pretrain.items() if v != BASELINE and g.summary.get("init") != "convert"]


def quality_line(comparison: Comparison, calls: Calls) -> str:
    """What each from-scratch KV-head step costs in test bits per byte, paired by seed."""
    pre = comparison.pretrain
    if BASELINE not in pre:
        return ""
    parts = [f"{g.label} {calls.says(pre[BASELINE], g, QUALITY)}" for g in _scratch(comparison)]
    return f"**What it costs in quality** (test bits per byte minus MHA's, paired by seed): {'; '.join(parts)}." if parts else ""


def _uptrained(comparison: Comparison) -> list[tuple[Group, Group]]:
    """``(variant, its from-scratch twin)`` for each variant converted from MHA by the paper's best method."""
    if BASELINE not in comparison.pretrain:
        return []
    twins = [(g, scratch_twin(comparison, g)) for g in _converted(comparison)
             if g.summary["conversion_method"] == KV_CONVERSIONS[0]]
    return [(g, twin) for g, twin in twins if twin is not None]


def uptrained_line(comparison: Comparison, calls: Calls) -> str:
    """Mean-pooled uptrained variants against the same KV heads from scratch and against MHA."""
    parts = []
    for g, twin in _uptrained(comparison):
        parts.append(f"{g.label} (converted from MHA, alpha = {g.summary['uptrain_fraction']:g}) "
                     f"{calls.says(twin, g, QUALITY)} against {twin.label} from scratch and "
                     f"{calls.says(comparison.pretrain[BASELINE], g, QUALITY)} against MHA, "
                     f"with {_tokens(g) / _tokens(twin):.2f}× the training tokens of {twin.label} (MHA's counted)")
    return f"**Uptrained vs from scratch** (test bits per byte, paired by seed): {'; '.join(parts)}." if parts else ""


def _full(comparison: Comparison) -> Group | None:
    """The full fine-tune, the variant every LoRA one is set against in the at-a-glance line."""
    return next((g for g in comparison.finetune.values() if not g.summary["lora"]), None)


def finetune_line(comparison: Comparison, table: pd.DataFrame | None, cost: pd.DataFrame | None, calls: Calls) -> str:
    """Each LoRA variant against the full fine-tune: what it trains and takes, its test loss, and its memory at GPT-2 small."""
    full = _full(comparison)
    if table is None or full is None:
        return ""
    parts = []
    for g in comparison.finetune.values():
        if g is full:
            continue
        c, f = table[g.label], table[full.label]
        part = (f"{g.label} trains {mid(c['trainable_share']):.3g}% of the parameters with "
                f"{mid(c['footprint_mib']) / mid(f['footprint_mib']):.2f}× the footprint here, test loss "
                f"{calls.says(full, g, FT_QUALITY)}")
        if cost is not None and g.label in cost.columns and full.label in cost.columns:
            part += (f"; on GPT-2 small {cost.loc['footprint_mib', g.label] / cost.loc['footprint_mib', full.label]:.2f}× "
                     f"the footprint, {cost.loc['peak_memory_mib', g.label] / cost.loc['peak_memory_mib', full.label]:.2f}× "
                     "a training step's peak memory")
        parts.append(part)
    return (f"**Fine-tuning trade-off** (against {full.label}, each at its own learning rate; test loss in nats per "
            "assistant token, paired by seed): "
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
                sweep: pd.DataFrame | None = None, finetune_cost: pd.DataFrame | None = None,
                calls: Calls | None = None) -> list[str]:
    """The reader's questions, one line each (six at most, with the unmatched-pairs warning): what fewer KV
    heads save and cost, uptrained vs from scratch, the fine-tuning trade-off, the cost at real scale
    (the sentences behind them: :func:`details`; ``calls`` as there)."""
    calls = calls or report_calls(comparison)
    lines = [savings_line(comparison, pretrain), quality_line(comparison, calls), uptrained_line(comparison, calls),
             finetune_line(comparison, finetune, finetune_cost, calls), real_scale_line(sweep)]
    if comparison.mismatches:
        lines.insert(0, f"**Warning**: {len(comparison.mismatches)} compared pair(s) are not matched (see the red "
                        "section): their differences mix the compared setting with others.")
    return [line for line in lines if line]


def _quality_claims(comparison: Comparison) -> list[tuple[Pair, str]]:
    """The quality comparisons of the verdicts section, each with its title: each from-scratch variant
    against MHA; per family of conversions (same source, KV heads and alpha) its best method by the
    paper's ranking against MHA and against the same KV heads from scratch (with the compute each
    saw), the other methods against it."""
    pre = comparison.pretrain
    if BASELINE not in pre:
        return []
    claims = [((pre[BASELINE], g, QUALITY), f"**{g.label} − MHA**") for g in _scratch(comparison)]
    families: dict[tuple, list[Group]] = {}
    for g in _converted(comparison):
        s = g.summary
        families.setdefault((s["source_run"].rsplit("/", 1)[0], s["n_kv_head"], s["uptrain_fraction"]), []).append(g)
    for family in families.values():
        ref, *others = sorted(family, key=lambda g: (KV_CONVERSIONS + (g.summary["conversion_method"],)).index(g.summary["conversion_method"]))
        claims.append(((pre[BASELINE], ref, QUALITY), f"**{ref.label} − MHA**"))
        twin = scratch_twin(comparison, ref)
        if twin is not None:
            claims.append(((twin, ref, QUALITY), f"**{ref.label} − {twin.label}** (uptrained vs from scratch, after "
                                                 f"{_tokens(ref):,.0f} vs {_tokens(twin):,.0f} training tokens, MHA's counted)"))
        claims += [((ref, g, QUALITY), f"**{g.label} − {ref.label}** (K/V heads by {g.summary['conversion_method']} vs "
                                       f"{ref.summary['conversion_method']})") for g in others]
    return claims


def comparisons(comparison: Comparison) -> list[Pair]:
    """Every comparison the report states a verdict on, once each: the pretraining quality verdicts
    (the verdicts section, the at-a-glance lines) and each fine-tune's test loss against its baselines."""
    pre = comparison.pretrain
    found = [pair for pair, _ in _quality_claims(comparison)]
    found += [(twin, g, QUALITY) for g, twin in _uptrained(comparison)]
    found += [(pre[BASELINE], g, QUALITY) for g, _ in _uptrained(comparison)]
    ft_pairs = [(base, other) for base, other in pairs(comparison) if base.stage == "finetune"]
    full = _full(comparison)
    ft_pairs += [(full, g) for g in comparison.finetune.values() if full is not None and g is not full]
    found += [(base, other, key) for base, other in ft_pairs for key in (FT_QUALITY, *task_keys(base, other))]
    return list({(b.name, o.name, k): (b, o, k) for b, o, k in found}.values())


def verdict_lines(comparison: Comparison, calls: Calls | None = None) -> list[str]:
    """The quality verdicts (:func:`_quality_claims`), each as its corrected interval; ``calls`` as in
    :func:`details`."""
    calls = calls or report_calls(comparison)
    return [f"{title} test bits per byte: {calls.says(*pair)}." for pair, title in _quality_claims(comparison)]


def kv_per_token(comparison: Comparison) -> dict[str, float]:
    """``label -> fp32 KV bytes per token`` for the KV-cache plot."""
    return {f"{lab} ({g.summary['n_kv_head']} KV heads)": kv_bytes_per_token(g.summary) for lab, g in comparison.pretrain.items()}

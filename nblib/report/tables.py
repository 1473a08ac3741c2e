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
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from nblib import qa
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
    "best_val_loss": "Val loss of the reported checkpoint (nats/token; val split: it chose the checkpoint)",
    "best_val_bpb": "Val bits per byte of the reported checkpoint (val split)",
    "selection": "Reported checkpoint", "best_step": "Its step",
    "test_loss": "Test loss (nats/token; test split, nothing chosen on it)", "test_ppl": "Test perplexity (test split)",
    "test_bpb": "Test bits per byte (test split)", "tokens_seen": "Tokens seen",
    "run_tokens_per_s": "Train tokens/s, as each run recorded it (its machine, its moment: to compare variants, read the side-by-side row)",
    "train_tokens_per_s": "Train tokens/s, measured here side by side",
    "peak_memory_mib": "Peak memory, training (MiB)", "wall_seconds": "Wall time, training (s)",
    "step_seconds": "Seconds per training step (measured here)",
    "compute_dtype": "Compute dtype",
    "mode": "Base precision", "lora": "LoRA", "learning_rate": "Learning rate",
    "recipe": "What trains", "trainable_params": "Trainable parameters",
    "adapter_params": "of them, LoRA adapter matrices", "token_row_params": "of them, embedding rows",
    "total_params": "Total parameters",
    "trainable_share": "Trainable share (%)", "footprint_mib": "Model footprint (MiB)",
    "ft_test_loss": "Test loss (nats/assistant token; test split, every source pooled)",
    "base_test_loss": "Base model test loss (test split)",
    "eval_loss": "Val loss (nats/assistant token; val split: it chose the checkpoint)", "eval_ppl": "Val perplexity (val split)",
    "eval_bpb": "Val bits per byte (val split)",
    "merged_eval_loss": "Val loss of the merged model (what chat loads; val split)", "base_eval_loss": "Base model val loss (val split)",
    "stop_rate_before": "Stop rate before", "stop_rate_after": "Stop rate after",
    "run_samples_per_s": "Train samples/s, as each run recorded it (its moment: the runs were not timed side by side)", "merged_weights": "Merged folder holds",
    "source_run": "Converted from", "conversion_method": "K/V heads pooled by",
    "uptrain_fraction": "Uptraining steps / the source's (alpha)",
    "converted_val_loss": "Val loss right after conversion (alpha = 0; val split)",
    "uptrained_val_loss": "Val loss after uptraining (its last step; val split)",
    "converted_test_bpb": "Test bits per byte right after conversion (alpha = 0; test split)",
    "uptrained_test_bpb": "Test bits per byte after uptraining (test split)", "scratch_variant": "Same KV heads from scratch",
    "scratch_val_loss": "Its final val loss (val split)", "scratch_test_bpb": "Its test bits per byte (test split)",
    "uptrain_steps": "Uptraining steps",
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
        col.update({k: _seed_stat(g, k) for k in ("test_loss", "test_ppl", "test_bpb", "best_val_loss", "best_val_bpb")})
        col["selection"] = s["selection"]
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


def scratch_twin(comparison: Comparison, g: Group) -> Group | None:
    """The variant trained from scratch at equal width with ``g``'s KV heads (what a converted run is set against)."""
    return next((t for t in comparison.pretrain.values()
                 if t.summary.get("init", "scratch") == "scratch" and t.summary.get("matched", "equal width") == "equal width"
                 and t.summary["n_kv_head"] == g.summary["n_kv_head"]), None)


def conversion_table(comparison: Comparison) -> pd.DataFrame | None:
    """MHA -> GQA conversion (Ainslie et al. 2023): per variant converted from another run, its method,
    alpha, val loss right after conversion and after uptraining, against the variant of the same KV
    heads trained from scratch; losses over seeds. ``None`` when no run was converted."""
    cols = {}
    for lab, g in comparison.pretrain.items():
        s = g.summary
        if s.get("init") != "convert":
            continue
        twin = scratch_twin(comparison, g)
        cols[lab] = {
            "source_run": s["source_run"].rsplit("/", 1)[0], "conversion_method": s["conversion_method"],
            "uptrain_fraction": s["uptrain_fraction"], "n_kv_head": s["n_kv_head"],
            "converted_test_bpb": _seed_stat(g, "converted_test_bpb"), "uptrained_test_bpb": _seed_stat(g, "test_bpb"),
            "converted_val_loss": _seed_stat(g, "converted_val_loss"),
            "uptrained_val_loss": _seed_stat(g, "uptrained_val_loss"),
            "scratch_variant": twin.label if twin else "none compared",
            "scratch_test_bpb": _seed_stat(twin, "test_bpb") if twin else math.nan,
            "scratch_val_loss": _seed_stat(twin, "final_val_loss") if twin else math.nan,
            "uptrain_steps": s["steps"], "total_steps": s["total_steps"],
            "scratch_steps": twin.summary["steps"] if twin else math.nan,
        }
    if not cols:
        return None
    table = pd.DataFrame(cols)
    table.index.name = "metric"
    return table


def decode_key(table: pd.DataFrame | None) -> str | None:
    """The generation tokens/s row of the largest batch measured here (``None`` when none was)."""
    rows = [k for k in table.index if str(k).startswith("gen_tokens_per_s_b")] if table is not None else []
    return max(rows, key=lambda k: int(k.removeprefix("gen_tokens_per_s_b")), default=None)


def starts_from(summary: dict[str, Any]) -> str:
    """How a variant's weights start: ``scratch`` or ``MHA, mean-pooled K/V, alpha = 0.05``."""
    if summary.get("init") != "convert":
        return "scratch"
    source = summary["source_run"].rsplit("/", 1)[0].removeprefix("runs/pretrain-").upper()
    return f"{source}, {summary['conversion_method']}-pooled K/V, alpha = {summary['uptrain_fraction']:g}"


TEST_BPB = "Test bits per byte (test split)"


def alpha_zero_label(summary: dict[str, Any]) -> str:
    """The row of a converted model before uptraining (one per source, method and KV heads: every alpha shares it)."""
    kv = f"{summary['n_kv_head']} KV head{'s' if summary['n_kv_head'] > 1 else ''}"
    return f"Converted, not uptrained (alpha = 0; {summary['conversion_method']}-pooled, {kv})"


def paper_table(comparison: Comparison, table: pd.DataFrame | None = None, new_tokens: int | None = None) -> pd.DataFrame:
    """Per variant, as in Table 1 of Ainslie et al. 2023: time per sample (``new_tokens`` decoded at
    the largest batch of ``table``'s generation rows, so amortised over the batch: median with the
    repeats' range), quality (test bits per byte over seeds), KV bytes per token, training compute
    (tokens behind the weights, a converted variant's source run included) and whether it is
    compared at equal width or equal parameters. A converted model before uptraining (alpha = 0) is
    a row of its own, timed as its uptrained variant (the same shape)."""
    key = decode_key(table) if new_tokens else None
    time_col = (f"Time per sample (s to decode {new_tokens} tokens, batch {key.removeprefix('gen_tokens_per_s_b')})"
                if key else None)
    rows = {}
    for lab, g in comparison.pretrain.items():
        s = g.summary
        row: dict[str, Any] = {"KV heads": f"{s['n_kv_head']} of {s['n_head']}", "Starts from": starts_from(s),
                               "Compared at": s.get("matched", "equal width"), "Parameters": s["params"]}
        if time_col:
            tps = table.loc[key, lab] if lab in table.columns else math.nan
            row[time_col] = (Stat.of((new_tokens / v for v in tps.values), "median") if isinstance(tps, Stat)
                             else new_tokens / mid(tps) if mid(tps) else math.nan)
        row[TEST_BPB] = _seed_stat(g, "test_bpb")
        row["KV cache per token (bytes, fp32)"] = kv_bytes_per_token(s)
        tokens = [r.summary.get("total_tokens", r.summary["tokens_seen"]) for r in g.runs]
        row["Training tokens (a converted run's source included)"] = tokens[0] if len(set(tokens)) == 1 else Stat.of(tokens)
        rows[lab] = row
        if s.get("init") == "convert":
            rows.setdefault(alpha_zero_label(s), {**row, "Starts from": starts_from(s).rsplit(",", 1)[0] + ", alpha = 0",
                                                  TEST_BPB: _seed_stat(g, "converted_test_bpb"),
                                                  "Training tokens (a converted run's source included)":
                                                      s["total_tokens"] - s["tokens_seen"]})
    out = pd.DataFrame(rows).T
    out.index.name = "variant"
    return out


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


def recipe(summary: dict[str, Any]) -> str:
    """What a fine-tune trains, named: every weight, or LoRA with its rank and layers and the embedding rows beside it."""
    cfg = summary["config"]
    if not summary["lora"]:
        return "every weight"
    rows = f" + the rows of the markers, <|endoftext|> and the {cfg['lora_answer_rows']} most frequent answer tokens " \
           "(lora_answer_rows: the smoke recipe)" if cfg["lora_answer_rows"] else " + the rows of the markers and <|endoftext|>"
    return f"LoRA r={cfg['lora_r']} on {', '.join(cfg['lora_targets'])}{rows}"


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
            "recipe": recipe(s), "trainable_params": s["trainable_params"],
            "adapter_params": s["trainable_params"] - s["token_row_params"], "token_row_params": s["token_row_params"],
            "total_params": s["total_params"], "trainable_share": 100 * s["trainable_params"] / s["total_params"],
            "footprint_mib": s["footprint_bytes"] / MIB,
            "peak_memory_mib": _seed_stat(g, "peak_memory_bytes", MIB),
            "ft_test_loss": _seed_stat(g, "test_loss"), "base_test_loss": _seed_stat(g, "base_test_loss"),
            **{k: _seed_stat(g, k) for k in ("eval_loss", "eval_ppl", "eval_bpb", "merged_eval_loss", "base_eval_loss",
                                               "stop_rate_before", "stop_rate_after")},
            "run_samples_per_s": _seed_stat(g, "train_samples_per_s"),
            "wall_seconds": _seed_stat(g, "wall_seconds"),
            "merged_weights": s["merged_weights"] or "–",
            **by_source_rows(g, eval_sources(comparison)), **task_rows(g, task_sources(comparison)),
            **harness_rows(g, harness_sources(comparison)),
        }
    table = pd.DataFrame(cols)
    table.index.name = "metric"
    return table


# ---------------------------------------------------------------------------------------------
# fine-tuning by source and by task (nblib.qa_eval, on the test split; summaries since issue 19)

SOURCE_NAMES = {"sciq": "SciQ", "natural_questions": "Natural Questions", "alpaca": "Alpaca", "dolly": "Dolly"}
# task -> (summary key, label) of each metric, the first the one the figures plot
TASK_METRICS = {
    "choice": (("accuracy", "multiple-choice accuracy"),),
    "short_answer": (("exact_match", "exact match"), ("f1", "token F1")),
    "free_form": (("rouge_l", "ROUGE-L F"),),
}


def source_name(source: str) -> str:
    return SOURCE_NAMES.get(source, source)


def eval_sources(comparison: Comparison) -> list[str]:
    """The sources some fine-tune run scored by source, in the order the runs list them."""
    return list(dict.fromkeys(src for g in comparison.finetune.values() for r in g.runs
                              for src in r.summary.get("by_source", {})))


def task_sources(comparison: Comparison) -> dict[str, str]:
    """``source -> task`` of the sources some fine-tune run scored by task."""
    return {src: v["task"] for g in comparison.finetune.values() for r in g.runs
            for src, v in r.summary.get("tasks", {}).items()}


def nested_stat(g: Group, field: str, source: str, key: str) -> Stat | float:
    """Over seeds: ``summary[field][source][key]`` (a run without it counts as missing)."""
    return Stat.of(r.summary.get(field, {}).get(source, {}).get(key) for r in g.runs)


def _data_figure(g: Group, field: str, source: str, key: str = "n") -> Any:
    """A figure of the data, not the model (examples scored, chance level): one number when the seeds agree."""
    values = [r.summary.get(field, {}).get(source, {}).get(key) for r in g.runs]
    return values[0] if len(set(values)) == 1 else Stat.of(values)


def _beside_base(rows: dict[str, Any], g: Group, key: str, label: str, field: str, source: str, metric: str) -> None:
    """Rows ``key`` and ``base_key``: ``summary[field][source][metric]`` of the trained model and of its base
    (``base_<field>``) over seeds, labelled ``label`` and ``label`` with "base model" in it."""
    name, what = label.split(": ", 1)
    LABELS.setdefault(key, label)
    LABELS.setdefault(f"base_{key}", f"{name}: base model {what}")
    rows[key] = nested_stat(g, field, source, metric)
    rows[f"base_{key}"] = nested_stat(g, f"base_{field}", source, metric)


def by_source_rows(g: Group, sources: Sequence[str]) -> dict[str, Any]:
    """Per source: eval loss and bits per byte of the trained model, each beside the base's, and n."""
    rows: dict[str, Any] = {}
    for src in sources:
        name = source_name(src)
        for key, what in (("loss", "test loss (nats/assistant token)"), ("bpb", "test bits per byte")):
            _beside_base(rows, g, f"{key}:{src}", f"{name}: {what}", "by_source", src, key)
        LABELS.setdefault(f"n:{src}", f"{name}: test dialogues scored")
        rows[f"n:{src}"] = _data_figure(g, "by_source", src)
    return rows


def harness_sources(comparison: Comparison) -> list[str]:
    """The sources some fine-tune run scored as an lm-evaluation-harness task (``nblib.lmeval``)."""
    return list(dict.fromkeys(src for g in comparison.finetune.values() for r in g.runs
                              for src in r.summary.get("harness", {})))


HARNESS = "lm_"  # the row-key prefix of a harness metric: lm_acc:sciq


def harness_rows(g: Group, sources: Sequence[str]) -> dict[str, Any]:
    """Per source scored as a harness task: each of its metrics (lm-evaluation-harness definitions) for the
    trained model beside the base's, and the items scored."""
    rows: dict[str, Any] = {}
    for src in sources:
        task = qa.get(src).harness
        for metric in task.metrics:
            _beside_base(rows, g, f"{HARNESS}{metric}:{src}", f"{task.label}: {metric}", "harness", src, metric)
        LABELS.setdefault(f"lm_n:{src}", f"{task.label}: items scored")
        rows[f"lm_n:{src}"] = _data_figure(g, "harness", src)
    return rows


def task_rows(g: Group, sources: Mapping[str, str]) -> dict[str, Any]:
    """Per source with a task: its metrics for the trained model in the chat format, each beside the
    base's (SciQ with chance level), and the examples scored."""
    rows: dict[str, Any] = {}
    for src, task in sources.items():
        name = qa.get(src).task_label or source_name(src)
        for key, what in TASK_METRICS[task]:
            _beside_base(rows, g, f"{key}:{src}", f"{name}: {what}", "tasks", src, key)
        if task == "choice":
            LABELS.setdefault(f"chance:{src}", f"{name}: chance level (1 / options)")
            rows[f"chance:{src}"] = _data_figure(g, "tasks", src, "chance")
        LABELS.setdefault(f"task_n:{src}", f"{name}: examples scored by task")
        rows[f"task_n:{src}"] = _data_figure(g, "tasks", src)
    return rows


FEW_SCORED = 20  # below this many test dialogues a source's rows are a check that its metrics run, not a measurement


def absent_tasks_note(comparison: Comparison) -> str:
    """Which task metrics the fine-tune table lacks and why (none scored yet, or no such dialogues in the
    test split), and which rest on too few dialogues to read as measurements."""
    if not comparison.finetune:
        return ""
    if not eval_sources(comparison):
        return ("These fine-tune runs were written before the per-source and task evaluation: re-run notebook "
                "05_finetune_lora_8bit (resume=False) to add the test split's rows by source and by task.")

    scored = task_sources(comparison)
    absent = [source_name(name) for name, src in qa.sources().items() if src.task and name not in scored]
    notes = [f"No {name} dialogues in this profile's test split: no {name} rows." for name in absent]
    counts = {src: max(r.summary["tasks"][src]["n"] for g in comparison.finetune.values() for r in g.runs
                       if src in r.summary.get("tasks", {})) for src in scored}
    few = [f"{source_name(src)} {n}" for src, n in counts.items() if n < FEW_SCORED]
    if few:
        notes.append(f"Test dialogues scored by task: {', '.join(few)}. Under {FEW_SCORED}, a source's rows show that "
                     "its metrics run, not how well the model does.")
    return " ".join(notes)


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

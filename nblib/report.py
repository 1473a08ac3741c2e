"""The compare stage: read every run, measure generation side by side, render the report.

Reads ``runs/*/summary.json`` and ``metrics.jsonl`` (the contract in docs/DESIGN.md) and the
pretraining checkpoints; writes ``reports/compare.{html,md,csv}``. The HTML is one
self-contained file (inline CSS, figures as base64 PNG data URIs, no scripts) that reads on a
phone; the Markdown and the long-format CSV hold the same tables for diffing.

Tables put metrics in rows and variants in columns, with a ``GQA ÷ MHA`` column for every
variant compared against the MHA baseline (a handful of columns scrolls well on a phone).

    python -m nblib.report --publish-example   # copy reports/compare.* to reports/examples/
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from nblib import config
from nblib.files import atomic_write_bytes, atomic_write_text, read_json, read_jsonl

if TYPE_CHECKING:
    import torch

    from nblib.model import GPT

REQUIRED_RUNS = ("pretrain-mha", "pretrain-gqa")
BASELINE = "MHA"
RATIO = " ÷ "  # a column named "GQA ÷ MHA" holds ratios
MIB = 2**20
PRETRAIN_ORDER = ("mha", "gqa", "mqa")
FINETUNE_ORDER = ("lora-8bit", "lora-4bit", "lora-16bit", "lora-32bit", "full")
FINETUNE_LABELS = {
    "lora-8bit": "LoRA + 8-bit",
    "lora-4bit": "LoRA + 4-bit",
    "lora-16bit": "LoRA + 16-bit",
    "lora-32bit": "LoRA + 32-bit",
    "full": "Full fine-tune",
}
SUMMARY_KEYS = {
    "common": ("name", "stage", "profile", "seed", "config", "machine", "wall_seconds", "peak_memory_bytes", "finished"),
    "pretrain": (
        "variant", "params", "n_layer", "n_head", "n_kv_head", "d_model", "context_length",
        "kv_cache_bytes_per_token", "best_val_loss", "best_val_ppl", "train_tokens_per_s",
        "tokens_seen", "checkpoint",
    ),
    "finetune": (
        "variant", "mode", "lora", "trainable_params", "total_params", "footprint_bytes", "eval_loss",
        "eval_ppl", "base_eval_loss", "stop_rate_before", "stop_rate_after", "train_samples_per_s", "samples",
    ),
}


# --------------------------------------------------------------------------- runs


class MissingRunError(FileNotFoundError):
    """A run the comparison needs is absent or unfinished; the message names the notebook to run."""


def producer(name: str) -> str:
    """The notebook (with its parameters) that writes run ``name``."""
    stage, _, variant = name.partition("-")
    if name == "pretrain-mha":
        return "03_train_mha"
    if name == "pretrain-gqa":
        return "04_train_gqa"
    if name == "pretrain-mqa":
        return "04_train_gqa (with n_kv_head=1 and the run name 'pretrain-mqa')"
    if stage == "finetune" and variant:
        return f"05_finetune_lora_8bit with variant={variant!r}"
    return f"03_train_mha, 04_train_gqa or 05_finetune_lora_8bit (whichever wrote {name!r})"


@dataclass(frozen=True)
class Run:
    """One finished run folder: its summary and its metrics rows."""

    name: str
    path: Path
    summary: dict[str, Any]
    metrics: pd.DataFrame

    @property
    def home(self) -> Path:
        """The working root the run lives under (``<home>/runs/<name>``)."""
        return self.path.parents[1]

    @property
    def stage(self) -> str:
        return self.summary["stage"]

    @property
    def label(self) -> str:
        """``MHA``/``GQA``/``MQA`` for pretraining, a readable name for fine-tuning."""
        variant = self.summary["variant"]
        return variant.upper() if self.stage == "pretrain" else FINETUNE_LABELS.get(variant, variant)

    def evals(self) -> pd.DataFrame:
        """The ``kind == "eval"`` rows of ``metrics.jsonl``."""
        if "kind" not in self.metrics:
            return self.metrics.iloc[:0]
        return self.metrics[self.metrics["kind"] == "eval"].reset_index(drop=True)


def _absent(name: str) -> str:
    return f"runs/{name}/summary.json not found: run notebook {producer(name)} first (it writes runs/{name}/)"


def load_run(name: str, root: str | Path | None = None) -> Run:
    """Read ``runs/<name>``; a missing, unfinished or malformed run raises naming its notebook."""
    folder = config.paths(root).run(name)
    where = f"runs/{name}"
    if not (folder / "summary.json").is_file():
        raise MissingRunError(_absent(name))
    summary = read_json(folder / "summary.json")
    if not summary.get("finished", False):
        raise MissingRunError(
            f"{where} is not finished (summary.json has finished=false): re-run notebook {producer(name)}, "
            "which resumes from its last checkpoint, and compare when it has finished"
        )
    stage = summary.get("stage")
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"{where}/summary.json: stage is {stage!r}, expected 'pretrain' or 'finetune'")
    missing = [k for k in SUMMARY_KEYS["common"] + SUMMARY_KEYS[stage] if k not in summary]
    if missing:
        raise ValueError(
            f"{where}/summary.json lacks {', '.join(missing)} (see docs/DESIGN.md, 'Run folders'); "
            f"it was written by an older version: re-run notebook {producer(name)}"
        )
    if not (folder / "metrics.jsonl").is_file():
        raise MissingRunError(f"{where}/metrics.jsonl not found: re-run notebook {producer(name)}")
    return Run(name, folder, summary, pd.DataFrame(read_jsonl(folder / "metrics.jsonl")))


def _order(run: Run) -> tuple[int, int, str]:
    order = PRETRAIN_ORDER if run.stage == "pretrain" else FINETUNE_ORDER
    variant = run.summary["variant"]
    return (0 if run.stage == "pretrain" else 1, order.index(variant) if variant in order else len(order), run.name)


def load_runs(names: Iterable[str] | None = None, root: str | Path | None = None) -> dict[str, Run]:
    """Read the named runs, or every ``runs/*/summary.json`` when ``names`` is ``None``.

    Without names, ``pretrain-mha`` and ``pretrain-gqa`` are required and other unfinished runs
    are left out with a warning; with names, every named run is required. Any pretraining run
    besides MHA needs ``pretrain-mha`` as its baseline.
    """
    runs_dir = config.paths(root).runs
    if names is None:
        found = [d.name for d in sorted(runs_dir.glob("*")) if (d / "summary.json").is_file()] if runs_dir.is_dir() else []
        for name in [n for n in found if n not in REQUIRED_RUNS and not read_json(runs_dir / n / "summary.json").get("finished")]:
            warnings.warn(f"runs/{name} is not finished and is left out; re-run notebook {producer(name)} to include it", stacklevel=2)
            found.remove(name)
        names = list(dict.fromkeys([*REQUIRED_RUNS, *found]))
        hint = "the comparison needs pretrain-mha and pretrain-gqa (to compare other runs only, name them in the `runs` parameter)"
    else:
        names = list(dict.fromkeys(names))
        if not names:
            raise ValueError("`runs` is an empty list: name at least one run, or pass None to read every run")
        hint = "or leave them out of the `runs` parameter"
    absent = [n for n in names if not (runs_dir / n / "summary.json").is_file()]
    if absent:
        raise MissingRunError("; ".join(map(_absent, absent)) + f"; {hint}")
    runs = [load_run(n, root) for n in names]
    pretrain = [r for r in runs if r.stage == "pretrain"]
    if pretrain and not any(r.summary["variant"] == "mha" for r in pretrain):
        raise MissingRunError(
            f"pretraining runs {', '.join(r.name for r in pretrain)} are compared against MHA: "
            f"add pretrain-mha to `runs` (notebook {producer('pretrain-mha')} writes it)"
        )
    return {r.name: r for r in sorted(runs, key=_order)}


def _by_label(runs: Iterable[Run]) -> dict[str, Run]:
    out: dict[str, Run] = {}
    for r in runs:
        if r.label in out:
            raise ValueError(
                f"runs {out[r.label].name} and {r.name} are both {r.label}: name the one to compare in the `runs` parameter"
            )
        out[r.label] = r
    return out


def pretrain_runs(runs: dict[str, Run]) -> dict[str, Run]:
    """The pretraining runs, keyed by label (``MHA``, ``GQA``, ...)."""
    return _by_label(r for r in runs.values() if r.stage == "pretrain")


def finetune_runs(runs: dict[str, Run]) -> dict[str, Run]:
    """The fine-tuning runs, keyed by label (``LoRA + 8-bit``, ...)."""
    return _by_label(r for r in runs.values() if r.stage == "finetune")


def runs_overview(runs: dict[str, Run]) -> pd.DataFrame:
    """One row per run: where it is, what it is, its profile and seed."""
    rows = [
        {
            "run": r.name,
            "folder": f"runs/{r.name}",
            "stage": r.stage,
            "variant": r.summary["variant"],
            "profile": r.summary["profile"],
            "seed": r.summary["seed"],
            "parameters": r.summary.get("params", r.summary.get("total_params")),
        }
        for r in runs.values()
    ]
    return pd.DataFrame(rows).set_index("run")


# --------------------------------------------------------------------------- tables


def kv_bytes_per_token(summary: dict[str, Any]) -> float:
    """fp32 KV-cache bytes per token from a pretraining summary (a number, or a dict by dtype)."""
    value = summary["kv_cache_bytes_per_token"]
    if not isinstance(value, dict):
        return float(value)
    if "float32" not in value:
        raise ValueError(f"runs/{summary['name']}/summary.json: kv_cache_bytes_per_token has no 'float32' entry: {value}")
    return float(value["float32"])


def _context_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def with_ratios(table: pd.DataFrame, base: str = BASELINE) -> pd.DataFrame:
    """Add a ``<variant> ÷ <base>`` column after every other variant (NaN where not a number)."""
    if base not in table.columns:
        return table
    out = {}
    for col in table.columns:
        out[col] = table[col]
        if col != base:
            num = pd.to_numeric(table[col], errors="coerce")
            den = pd.to_numeric(table[base], errors="coerce").where(lambda s: s != 0)
            out[f"{col}{RATIO}{base}"] = num / den
    return pd.DataFrame(out, index=table.index)


def pretrain_table(runs: dict[str, Run], generation: pd.DataFrame | None = None, contexts: Iterable[int] = (1024, 4096)) -> pd.DataFrame:
    """MHA vs GQA (vs MQA): one row per metric, one column per variant plus ratios to MHA.

    ``generation`` is :func:`generation_table`'s output (measured here, side by side); its rows
    are inserted after the training throughput.
    """
    cols: dict[str, dict[str, Any]] = {}
    for label, run in pretrain_runs(runs).items():
        s = run.summary
        per_token = kv_bytes_per_token(s)
        col = {
            "Layers": s["n_layer"],
            "Query heads": s["n_head"],
            "KV heads": s["n_kv_head"],
            "d_model": s["d_model"],
            "Context length": s["context_length"],
            "Parameters": s["params"],
            "KV cache per token (bytes, fp32)": per_token,
        }
        for n in contexts:
            col[f"KV cache at {_context_label(n)} context (MiB, fp32)"] = per_token * n / MIB
        col.update({
            "Best val loss": s["best_val_loss"],
            "Best val perplexity": s["best_val_ppl"],
            "Tokens seen": s["tokens_seen"],
            "Train tokens/s": s["train_tokens_per_s"],
        })
        if generation is not None:
            col.update(generation[label].to_dict())
        col.update({
            "Peak memory, training (MiB)": s["peak_memory_bytes"] / MIB if s["peak_memory_bytes"] else math.nan,
            "Wall time, training (s)": s["wall_seconds"],
        })
        cols[label] = col
    table = pd.DataFrame(cols)
    table.index.name = "metric"
    return with_ratios(table)


def finetune_table(runs: dict[str, Run]) -> pd.DataFrame | None:
    """Fine-tune variants side by side (``None`` when there are no fine-tuning runs)."""
    ft = finetune_runs(runs)
    if not ft:
        return None
    cols = {}
    for label, run in ft.items():
        s = run.summary
        cols[label] = {
            "Mode": s["mode"],
            "LoRA": "yes" if s["lora"] else "no",
            "Trainable parameters": s["trainable_params"],
            "Total parameters": s["total_params"],
            "Trainable share (%)": 100 * s["trainable_params"] / s["total_params"],
            "Model footprint (MiB)": s["footprint_bytes"] / MIB,
            "Peak memory (MiB)": s["peak_memory_bytes"] / MIB if s["peak_memory_bytes"] else math.nan,
            "Eval loss": s["eval_loss"],
            "Eval perplexity": s["eval_ppl"],
            "Base model eval loss": s["base_eval_loss"],
            "Stop rate before": s["stop_rate_before"],
            "Stop rate after": s["stop_rate_after"],
            "Train samples/s": s["train_samples_per_s"],
            "Wall time (s)": s["wall_seconds"],
        }
    table = pd.DataFrame(cols)
    table.index.name = "metric"
    return table


EMPTY_ANSWER = "(empty answer)"


def finetune_samples(runs: dict[str, Run]) -> pd.DataFrame | None:
    """Answers to the fixed questions: the base model's, then each variant's after training
    (an answer that was only whitespace or an immediate end-of-text shows as ``(empty answer)``)."""
    ft = finetune_runs(runs)
    if not ft:
        return None
    first = next(iter(ft.values()))
    questions = [x["question"] for x in first.summary["samples"]]
    table = {"Base model": [x["before"] or EMPTY_ANSWER for x in first.summary["samples"]]}
    for label, run in ft.items():
        answers = {x["question"]: x["after"] or EMPTY_ANSWER for x in run.summary["samples"]}
        table[label] = [answers.get(q, "–") for q in questions]
    return pd.DataFrame(table, index=pd.Index(questions, name="question"))


# --------------------------------------------------------------------------- measurement


def resolve_device(name: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is passed through."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def load_models(runs: dict[str, Run], device: str = "auto") -> dict[str, GPT]:
    """The pretraining checkpoints, loaded for inference, keyed by label (``MHA``, ``GQA``, ...)."""
    from nblib.model import load_checkpoint

    device = resolve_device(device)
    models = {}
    for label, run in pretrain_runs(runs).items():
        rel = run.summary["checkpoint"]
        if rel is None or not (run.home / rel).is_file():
            raise MissingRunError(
                f"runs/{run.name}: the checkpoint named in summary.json ({rel}) is missing: "
                f"re-run notebook {producer(run.name)} to write it"
            )
        path = run.home / rel
        model, _ = load_checkpoint(path, device)
        models[label] = model.eval()
    return models


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_generate(model: GPT, idx: torch.Tensor, new_tokens: int) -> float:
    """Seconds for one greedy generation with the KV cache (prefill included)."""
    _sync(idx.device)
    t0 = time.perf_counter()
    model.generate(idx, new_tokens, temperature=0.0, use_cache=True)
    _sync(idx.device)
    return time.perf_counter() - t0


def measure_generation(
    models: dict[str, GPT],
    prompt: str,
    batch_sizes: Iterable[int] = (1, 8),
    new_tokens: int = 32,
    repeats: int = 5,
) -> pd.DataFrame:
    """Greedy generation speed with the KV cache, every model on the same machine, interleaved.

    After one untimed warm-up per model and batch size, each repeat times every model at every
    batch size, alternating the model order (A B, then B A) so drift in machine speed hits both
    alike. Returns one row per timing: ``variant, batch, repeat, seconds, tokens_per_s,
    cache_tokens, cache_bytes`` (bytes of a real cache allocated for ``batch x cache_tokens``,
    the prompt plus the new tokens) and, on CUDA, ``peak_memory_bytes`` of the generation.
    """
    import torch

    from nblib.tokenizer import get_encoding

    ids = get_encoding().encode_ordinary(prompt)
    labels = list(models)
    for label, model in models.items():
        room = model.config.context_length - len(ids)
        if new_tokens > room:
            raise ValueError(
                f"gen_new_tokens={new_tokens} does not fit {label}'s context: the prompt is {len(ids)} tokens "
                f"and the context {model.config.context_length}; use gen_new_tokens <= {room} or a shorter speed_prompt"
            )
    batch_sizes = list(batch_sizes)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for batch in batch_sizes:
            for label, model in models.items():
                idx = torch.tensor([ids] * batch, device=next(model.parameters()).device)
                _time_generate(model, idx, new_tokens)
        for rep in tqdm(range(repeats), desc="generation speed", unit="repeat"):
            order = labels if rep % 2 == 0 else labels[::-1]
            for batch in batch_sizes:
                for label in order:
                    model = models[label]
                    device = next(model.parameters()).device
                    idx = torch.tensor([ids] * batch, device=device)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    seconds = _time_generate(model, idx, new_tokens)
                    row = {
                        "variant": label,
                        "batch": batch,
                        "repeat": rep,
                        "seconds": seconds,
                        "tokens_per_s": batch * new_tokens / seconds,
                        "cache_tokens": len(ids) + new_tokens,
                        "cache_bytes": model.new_cache(batch, len(ids) + new_tokens, device=device).nbytes,
                    }
                    if device.type == "cuda":
                        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
                    rows.append(row)
    return pd.DataFrame(rows)


def generation_table(timings: pd.DataFrame) -> pd.DataFrame:
    """Median tokens/s and the allocated cache (rows) per variant (columns) from :func:`measure_generation`."""
    g = timings.groupby(["batch", "variant"], sort=False)
    tokens = int(timings["cache_tokens"].iloc[0])
    parts = [
        g["tokens_per_s"].median().unstack("variant").rename(index=lambda b: f"Generation tokens/s, batch {b} (KV cache)"),
        (g["cache_bytes"].first().unstack("variant") / MIB).rename(
            index=lambda b: f"KV cache allocated, batch {b} × {tokens} tokens (MiB)"),
    ]
    if "peak_memory_bytes" in timings:
        parts.append((g["peak_memory_bytes"].max().unstack("variant") / MIB).rename(index=lambda b: f"Peak memory, generation batch {b} (MiB)"))
    table = pd.concat(parts)[list(dict.fromkeys(timings["variant"]))]
    table.columns.name = None
    table.index.name = "metric"
    return table


def sample_generations(
    models: dict[str, GPT],
    prompts: Iterable[str],
    max_new_tokens: int = 40,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 1337,
) -> pd.DataFrame:
    """Continuations of the same prompts by every model, same seed per prompt (rows: prompts)."""
    import torch

    from nblib.tokenizer import get_encoding

    enc = get_encoding()
    prompts = list(prompts)
    table: dict[str, list[str]] = {}
    with torch.inference_mode():
        for label, model in models.items():
            device = next(model.parameters()).device
            outs = []
            for prompt in prompts:
                ids = enc.encode_ordinary(prompt)
                gen = torch.Generator(device).manual_seed(seed)
                out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature, top_k, generator=gen)
                outs.append(enc.decode(out[0, len(ids):].tolist()))
            table[label] = outs
    return pd.DataFrame(table, index=pd.Index(prompts, name="prompt"))


# --------------------------------------------------------------------------- figures


def plot_val_loss(runs: dict[str, Run]) -> Figure:
    """Validation loss vs tokens seen and vs wall seconds, every pretraining variant on one axis."""
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    by_tokens, by_wall = fig.subplots(1, 2, sharey=True)
    for label, run in pretrain_runs(runs).items():
        ev = run.evals()
        by_tokens.plot(ev["tokens"], ev["val_loss"], marker="o", ms=3, label=label)
        by_wall.plot(ev["wall"], ev["val_loss"], marker="o", ms=3, label=label)
    by_tokens.set(xlabel="tokens seen", ylabel="validation loss", title="Val loss vs tokens")
    by_wall.set(xlabel="wall seconds", title="Val loss vs time")
    for ax in (by_tokens, by_wall):
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_kv_cache(runs: dict[str, Run], max_context: int = 8192) -> Figure:
    """KV-cache MiB (batch 1, fp32) against context length for each pretraining variant."""
    fig = Figure(figsize=(5.4, 3.4), layout="constrained")
    ax = fig.subplots()
    contexts = [2**k for k in range(7, int(math.log2(max_context)) + 1)]
    for label, run in pretrain_runs(runs).items():
        per_token = kv_bytes_per_token(run.summary)
        ax.plot(contexts, [per_token * n / MIB for n in contexts], marker="o", ms=3,
                label=f"{label} ({run.summary['n_kv_head']} KV heads)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [_context_label(n) for n in contexts])
    ax.minorticks_off()
    ax.set(xlabel="context length (tokens)", ylabel="KV cache (MiB)", title="KV-cache memory per sequence (fp32)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_speed(table: pd.DataFrame) -> Figure:
    """Bars of train and generation tokens/s per variant, one panel per measure (from :func:`pretrain_table`)."""
    rows = [r for r in table.index if "tokens/s" in r]
    variants = [c for c in table.columns if RATIO not in c]
    fig = Figure(figsize=(3 * len(rows), 3.2), layout="constrained")
    axes = fig.subplots(1, len(rows), squeeze=False)[0]
    colors = [f"C{i}" for i in range(len(variants))]
    for ax, row in zip(axes, rows):
        values = pd.to_numeric(table.loc[row, variants])
        ax.bar(variants, values, color=colors)
        ax.set_title(row.replace(" (KV cache)", ""), fontsize=9)
        ax.set_ylabel("tokens/s")
        ax.grid(axis="y", alpha=0.3)
    return fig


def plot_finetune_losses(runs: dict[str, Run]) -> Figure:
    """Train and eval loss against step for every fine-tune variant (``nblib.finetune.plot_losses``)."""
    from nblib.finetune import plot_losses

    return plot_losses([r.path for r in finetune_runs(runs).values()])


def plot_finetune_memory(table: pd.DataFrame) -> Figure:
    """Bars per variant: model footprint, peak memory and trainable parameters (log scale), each on its own axis."""
    variants = list(table.columns)
    colors = [f"C{i}" for i in range(len(variants))]
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    panels = (
        ("Model footprint (MiB)", "Model footprint", "MiB"),
        ("Peak memory (MiB)", "Peak memory, training", "MiB"),
        ("Trainable parameters", "Trainable parameters", "parameters (log scale)"),
    )
    for ax, (row, title, unit) in zip(fig.subplots(1, 3), panels):
        ax.bar(variants, pd.to_numeric(table.loc[row]), color=colors)
        ax.set(title=title, ylabel=unit)
        ax.tick_params(axis="x", labelsize=8, labelrotation=15)
        ax.grid(axis="y", alpha=0.3)
        if row == "Trainable parameters":
            ax.set_yscale("log")
    return fig


# --------------------------------------------------------------------------- summary in words


def _x(r: float | None) -> str:
    """A ratio in words: ``0.50×``."""
    return "n/a" if r is None or math.isnan(r) else f"{r:.2f}×"


def _n(value: Any, spec: str) -> str:
    """A number for a sentence, ``n/a`` when missing."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(v) else format(v, spec)


def _pretrain_glance(t: pd.DataFrame, v: str) -> list[str]:
    r = t[f"{v}{RATIO}{BASELINE}"]
    kv = [row for row in t.index if row.startswith("KV cache at ")][-1]
    heads = f"{int(t.loc['KV heads', v])} KV heads for {int(t.loc['Query heads', v])} query heads"
    gen = [row for row in t.index if row.startswith("Generation tokens/s")]
    measured = ", ".join(f"batch {row.split('batch ')[1].split()[0]} {_x(r[row])}" for row in gen)
    speed = (f"generation measured side by side here: {measured}; " if gen else "") + (
        f"training {_x(r['Train tokens/s'])} (as each run recorded it, so the machine's load at the time counts)")
    return [
        f"**{v}** ({heads}) keeps a KV cache {_x(r[kv])} the size of MHA's: {_n(t.loc[kv, v], '.3g')} vs "
        f"{_n(t.loc[kv, BASELINE], '.3g')} MiB per sequence at {kv.split()[3]} context (fp32), with {_x(r['Parameters'])} the parameters.",
        f"**{v}** quality: best validation loss {_n(t.loc['Best val loss', v], '.3f')} vs {_n(t.loc['Best val loss', BASELINE], '.3f')} "
        f"for MHA (perplexity {_x(r['Best val perplexity'])} MHA's).",
        f"**{v}** speed as a multiple of MHA's tokens/s: {speed}.",
    ]


def _finetune_glance(t: pd.DataFrame, v: str) -> list[str]:
    c = t[v]
    lines = [
        f"**{v}** trains {_n(c['Trainable parameters'], ',.0f')} parameters ({_n(c['Trainable share (%)'], '.3g')}% of the model); "
        f"model footprint {_n(c['Model footprint (MiB)'], '.3g')} MiB; eval loss {_n(c['Eval loss'], '.3f')} "
        f"(base model {_n(c['Base model eval loss'], '.3f')}); {_n(c['Train samples/s'], '.3g')} samples/s."
    ]
    full, lora32 = FINETUNE_LABELS["full"], FINETUNE_LABELS["lora-32bit"]
    bases = [full] if v != full else []
    if c["LoRA"] == "yes" and v != lora32:
        bases.append(lora32)
    for base in bases:
        if base in t.columns:
            r = with_ratios(t[[base, v]], base)[f"{v}{RATIO}{base}"]
            diff = pd.to_numeric(t[v], errors="coerce") - pd.to_numeric(t[base], errors="coerce")
            lines.append(
                f"**{v}** against {base}: {_x(r['Model footprint (MiB)'])} the footprint, {_x(r['Peak memory (MiB)'])} "
                f"the peak memory, {_x(r['Train samples/s'])} the samples/s, eval loss {_n(diff['Eval loss'], '+.3f')}."
            )
    return lines


def at_a_glance(pretrain: pd.DataFrame | None, finetune: pd.DataFrame | None = None) -> list[str]:
    """Sentences: what GQA (and MQA) give up and buy against MHA; what LoRA and 8-bit cost and save
    against full fine-tuning and a 32-bit base."""
    lines: list[str] = []
    if pretrain is not None:
        for col in pretrain.columns:
            if col.endswith(f"{RATIO}{BASELINE}"):
                lines += _pretrain_glance(pretrain, col.split(RATIO)[0])
    if finetune is not None:
        for v in finetune.columns:
            lines += _finetune_glance(finetune, v)
    return lines


# --------------------------------------------------------------------------- rendering


def format_value(value: Any, ratio: bool = False) -> str:
    """How a table cell is shown: thousands separators, 4 significant digits, ratios as ``0.50×``."""
    if value is None or isinstance(value, str):
        return "–" if value is None else value
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "–"
    if ratio:
        return f"{v:.2f}×"
    if abs(v) >= 1000 or (v.is_integer() and isinstance(value, (int, np.integer))):
        return f"{v:,.0f}"
    return f"{v:.4g}"


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the report shows it (strings), for display in the notebook."""
    out = table.copy().astype(object)
    for col in table.columns:
        out[col] = [format_value(v, ratio=RATIO in str(col)) for v in table[col]]
    return out


@dataclass
class Section:
    kind: str  # "text" | "table" | "figure"
    title: str
    payload: Any
    note: str = ""
    collapsed: bool = False


@dataclass
class Report:
    """A report assembled section by section, written as HTML, Markdown and CSV."""

    title: str
    profile: str
    machine: dict[str, Any]
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    sections: list[Section] = field(default_factory=list)

    def add_text(self, title: str, lines: list[str], note: str = "") -> None:
        """A bullet list (``**bold**`` allowed)."""
        self.sections.append(Section("text", title, list(lines), note))

    def add_table(self, title: str, table: pd.DataFrame, note: str = "", collapsed: bool = False) -> None:
        """A table; the CSV gets its raw values, HTML/Markdown the formatted ones."""
        self.sections.append(Section("table", title, table, note, collapsed))

    def add_figure(self, title: str, fig: Figure, note: str = "") -> None:
        """A figure, embedded as a PNG data URI in the HTML.

        On a phone it is shown at 72 CSS pixels per inch of figure (10-point text stays
        10 pixels) and scrolls sideways when wider than the screen.
        """
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
        self.sections.append(Section("figure", title, (buf.getvalue(), round(fig.get_figwidth() * 72)), note))

    def add_configs(self, runs: dict[str, Run], settings: dict[str, Any] | None = None) -> None:
        """Each run's settings (and where it trained), plus this stage's ``settings``, as collapsed tables."""
        for stage, title in (("pretrain", "Pretraining configs"), ("finetune", "Fine-tuning configs")):
            chosen = [r for r in runs.values() if r.stage == stage]
            if chosen:
                cols = {
                    r.name: {"trained on": _machine_line(r.summary["machine"]), "seed": r.summary["seed"], **_plain(r.summary["config"])}
                    for r in chosen
                }
                self.add_table(title, pd.DataFrame(cols).rename_axis("setting"), collapsed=True)
        if settings is not None:
            self.add_table("Compare settings", pd.DataFrame({"value": _plain(settings)}).rename_axis("setting"), collapsed=True)

    # ---- outputs

    def header_lines(self) -> list[str]:
        return [
            f"Generated {self.created} · profile **{self.profile}**",
            f"Machine: {_machine_line(self.machine)}",
        ]

    def banner(self) -> str:
        if self.profile != "smoke":
            return ""
        return ("CPU smoke run: tiny models trained for a few minutes. The figures show how the variants "
                "compare at this size, not what a full-size GPT-2 reaches.")

    def html(self) -> str:
        """One self-contained page: inline CSS, base64 PNGs, no scripts or external links."""
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(self.title)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
            *(f'<p class="meta">{_inline(line)}</p>' for line in self.header_lines()),
        ]
        if self.banner():
            parts.append(f'<p class="banner">{html.escape(self.banner())}</p>')
        parts.append('<nav><ul>' + "".join(
            f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(self.sections)) + "</ul></nav>")
        for i, s in enumerate(self.sections):
            body = []
            if s.note:
                body.append(f'<p class="note">{_inline(s.note)}</p>')
            if s.kind == "text":
                body.append("<ul>" + "".join(f"<li>{_inline(line)}</li>" for line in s.payload) + "</ul>")
            elif s.kind == "table":
                body.append(f'<div class="scroll">{_html_table(s.payload)}</div>')
            else:
                png, phone_width = s.payload
                data = base64.b64encode(png).decode("ascii")
                body.append(f'<div class="fig"><img src="data:image/png;base64,{data}" '
                            f'style="--phone-width:{phone_width}px" alt="{html.escape(s.title)}"></div>')
            heading = f'<h2 id="s{i}">{html.escape(s.title)}</h2>'
            if s.collapsed:
                parts.append(f'{heading}<details><summary>show</summary>{"".join(body)}</details>')
            else:
                parts.append(heading + "".join(body))
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"

    def markdown(self) -> str:
        """The same report as Markdown (figures are only in the HTML)."""
        out = [f"# {self.title}", "", *(f"{line}  " for line in self.header_lines()), ""]
        if self.banner():
            out += [f"> {self.banner()}", ""]
        for s in self.sections:
            out += [f"## {s.title}", ""]
            if s.note:
                out += [s.note, ""]
            if s.kind == "text":
                out += [f"- {line}" for line in s.payload] + [""]
            elif s.kind == "table":
                out += [_md_table(s.payload), ""]
            else:
                out += ["*(figure in compare.html)*", ""]
        return "\n".join(out)

    def csv(self) -> str:
        """Every table in long format: ``table,row,column,value`` (raw numbers, 6 significant digits)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["table", "row", "column", "value"])
        for s in self.sections:
            if s.kind != "table":
                continue
            for row, values in s.payload.iterrows():
                for col, v in values.items():
                    w.writerow([s.title, row, col, _csv_value(v)])
        return buf.getvalue()

    def write(self, out_dir: str | Path, stem: str = "compare") -> dict[str, Path]:
        """Atomically write ``<stem>.html``, ``<stem>.md`` and ``<stem>.csv`` into ``out_dir``."""
        out_dir = Path(out_dir)
        return {
            "html": atomic_write_text(out_dir / f"{stem}.html", self.html()),
            "md": atomic_write_text(out_dir / f"{stem}.md", self.markdown()),
            "csv": atomic_write_text(out_dir / f"{stem}.csv", self.csv()),
        }


def new_report(profile: str, title: str = "machado-gpt: MHA vs GQA, LoRA vs full fine-tuning") -> Report:
    """An empty report stamped with the profile, this machine and the current time."""
    return Report(title=title, profile=profile, machine=config.machine_info())


def _machine_line(m: dict[str, Any]) -> str:
    gpu = m.get("gpu") or "no GPU"
    return f"{m.get('cpu', '?')} ({m.get('cpu_cores', '?')} cores), {gpu}, torch {m.get('torch', '?')}"


def _plain(settings: dict[str, Any]) -> dict[str, Any]:
    """Lists and dicts as JSON text, so each setting is one table cell."""
    return {k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v for k, v in settings.items()}


def _inline(text: str) -> str:
    """Escape ``text`` for HTML, turning ``**bold**`` into ``<strong>``."""
    pieces = html.escape(text).split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(pieces))


_TEXT = ' class="text"'


def _html_table(table: pd.DataFrame) -> str:
    """Rows of formatted cells; columns holding only text (samples) are left-aligned and wrap."""
    shown = format_table(table)
    text_cols = _text_columns(table)
    head = [f'<th class="name">{html.escape(table.index.name or "")}</th>']
    head += [f"<th{_TEXT if c in text_cols else ''}>{html.escape(str(c))}</th>" for c in table.columns]
    rows = []
    for idx, vals in shown.iterrows():
        cells = [f'<th scope="row" class="name">{html.escape(str(idx))}</th>']
        for col in table.columns:
            cls = _TEXT if col in text_cols else (' class="ratio"' if RATIO in str(col) else "")
            cells.append(f"<td{cls}>{html.escape(vals[col])}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def _text_columns(table: pd.DataFrame) -> set[Any]:
    """Columns holding only text (samples): shown left-aligned and wrapped."""
    return {c for c in table.columns if all(isinstance(v, str) for v in table[c])}


def _md_table(table: pd.DataFrame) -> str:
    shown = format_table(table)
    text_cols = _text_columns(table)
    header = [table.index.name or "", *map(str, table.columns)]
    align = [":--"] + [":--" if c in text_cols else "--:" for c in table.columns]
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "|".join(align) + "|"]
    for idx, vals in shown.iterrows():
        lines.append("| " + " | ".join(_md_cell(str(x)) for x in [idx, *vals]) + " |")
    return "\n".join(lines)


def _csv_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:62rem;margin:0 auto;padding:.8rem 1rem 3rem;line-height:1.45;color:#1b1b1b;background:#fff}
h1{font-size:1.45rem;margin:.4rem 0}
h2{font-size:1.15rem;margin:2rem 0 .6rem;padding-bottom:.2rem;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.9rem;margin:.2rem 0}
.banner{background:#fff4d6;border-left:4px solid #d99a00;padding:.6rem .8rem;font-size:.95rem}
.note{color:#444;font-size:.92rem}
nav ul{display:flex;flex-wrap:wrap;gap:.3rem .9rem;padding:0;list-style:none;font-size:.9rem}
a{color:#0b5cad}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%}
table{border-collapse:collapse;font-size:.88rem;font-variant-numeric:tabular-nums}
th,td{padding:.3rem .55rem;border-bottom:1px solid #e6e6e6;text-align:right;white-space:nowrap;vertical-align:top}
thead th{background:#f4f6f8;position:sticky;top:0}
th.name{text-align:left;white-space:normal;min-width:7.5rem}
tbody th{font-weight:500}
td.ratio{color:#0b5cad;font-weight:600}
.text{white-space:pre-wrap;overflow-wrap:anywhere;text-align:left;min-width:12rem;max-width:26rem}
.fig{overflow-x:auto;-webkit-overflow-scrolling:touch}
.fig img{max-width:100%;height:auto;display:block;margin:.4rem 0}
details summary{cursor:pointer;color:#0b5cad}
@media (max-width:480px){body{padding:.5rem .6rem 2rem}table{font-size:.8rem}th,td{padding:.25rem .3rem}th.name{min-width:6.5rem}thead th{white-space:normal}.fig img{max-width:none;width:var(--phone-width)}}
""".strip()


# --------------------------------------------------------------------------- example report


def publish_example(home: str | Path | None = None, dest: str | Path | None = None, label: str = "smoke-cpu") -> list[Path]:
    """Copy ``reports/compare.{html,md,csv}`` from a working root to ``reports/examples/compare-<label>.*`` in the repo."""
    src = config.paths(home).reports
    dest = Path(dest) if dest is not None else Path(__file__).resolve().parents[1] / "reports" / "examples"
    missing = [f"compare.{ext}" for ext in ("html", "md", "csv") if not (src / f"compare.{ext}").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} not found in {src}: run the pipeline (python -m nblib.pipeline --profile smoke) "
            "or notebook 06_compare first"
        )
    return [atomic_write_bytes(dest / f"compare-{label}.{ext}", (src / f"compare.{ext}").read_bytes()) for ext in ("html", "md", "csv")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nblib.report", description="Publish the compare report as the committed example.")
    parser.add_argument("--publish-example", action="store_true", help="copy reports/compare.* to the repo's reports/examples/")
    parser.add_argument("--home", help="working root holding reports/ (default: NBLIB_HOME or the repo)")
    parser.add_argument("--label", default="smoke-cpu", help="file name label: reports/examples/compare-<label>.*")
    args = parser.parse_args(argv)
    if not args.publish_example:
        parser.print_help()
        return 2
    try:
        written = publish_example(args.home, label=args.label)
    except FileNotFoundError as e:
        print(f"nothing published: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

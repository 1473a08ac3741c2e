"""Assembling the compare report: what a reader sees first (the comparison in words), then the
tables, figures and samples, then every run's settings and where it ran."""
from __future__ import annotations

from typing import Any

import pandas as pd

from nblib.plots import cost_at_scale
from nblib.report import figures
from nblib.report.glance import at_a_glance
from nblib.report.loading import Comparison, pairs
from nblib.report.render import Report, new_report
from nblib.report.tables import RATIO, conversion_table, finetune_samples

PRETRAIN_NOTE = (
    "Each ÷ MHA column divides the variant's figure by MHA's. Quality rows are over seeds: mean (min–max, n seeds). "
    "Rows measured here were timed in this process with the variants interleaved: median (min–max over repeats). "
    "KV-cache rows are per sequence in fp32. Peak memory, for every stage, is the peak of the training phase alone: "
    "CUDA's peak allocation on a GPU, the process's peak resident memory on a CPU."
)
CONVERSION_NOTE = (
    "A converted variant starts from the finished MHA run of the same seed with its K/V heads pooled per group "
    "(Ainslie et al. 2023, arXiv 2305.13245), then trains alpha x MHA's steps with the same recipe. Losses after training are "
    "final evaluations, mean (min–max, n seeds), as is the from-scratch run's it is set against. Uptraining restarts the "
    "learning-rate schedule at its peak, so on a source whose own schedule has just decayed its first steps can raise the "
    "loss above the converted model's: read the two rows together (best val loss, in the table above, takes the lower)."
)
COST_NOTE = (
    "Random weights of real shapes, timed on the machine that rendered this report (speed does not depend on the "
    "weights' values). The trained smoke models are ~3M parameters, where the 50k-token embedding hides every "
    "attention saving; these rows show what GQA saves at the sizes it is meant for."
)


def _same_continuation_note(samples: pd.DataFrame) -> str:
    """Say so when a model writes the same continuation whatever the prompt."""
    stuck = [c for c in samples.columns if samples[c].nunique() == 1 and len(samples) > 1]
    if not stuck:
        return ""
    return (f"{', '.join(stuck)} {'continues' if len(stuck) == 1 else 'continue'} every prompt with the same text: at this size and training the model does not "
            "yet condition on its prompt, it writes its most likely sequence whatever came before.")


def _footprint_note(comparison: Comparison) -> str:
    """Why an 8-bit base saves little on a small model: most of its parameters are the fp32 embedding."""
    for g in comparison.finetune.values():
        s = g.summary
        share = s.get("embedding_params", 0) / s["total_params"] if s["total_params"] else 0
        if s["mode"] in ("8bit", "4bit") and share > 0.5:
            return (f"The {s['mode'].replace('bit', '-bit')} footprint is close to the 32-bit one here because {share:.0%} of the model's "
                    f"{s['total_params']:,} parameters are the token embedding, which bitsandbytes keeps in full precision "
                    "(it quantises the linear layers only). On GPT-2 small the linear layers dominate: see the cost at real "
                    "scale below.")
    return ""


def compose(comparison: Comparison, settings: dict[str, Any], pretrain: pd.DataFrame, samples: pd.DataFrame,
            finetune: pd.DataFrame | None = None, sweep: pd.DataFrame | None = None,
            cost: pd.DataFrame | None = None, finetune_cost: pd.DataFrame | None = None) -> Report:
    """The whole report from the comparison, its tables and the measurements made here."""
    rep = new_report(settings["profile"])
    rep.add_text("At a glance", at_a_glance(comparison, pretrain, finetune, sweep, finetune_cost))
    rep.add_warning("Unmatched pairs (compared anyway: allow_mismatch=True)", comparison.mismatches)
    flagged = tuple(f"{other.label}{RATIO}{base.label}" for base, other in pairs(comparison)
                    if any(f"runs/{other.name} " in m and f"runs/{base.name} " in m for m in comparison.mismatches))
    rep.add_table("MHA vs GQA", pretrain, note=PRETRAIN_NOTE, flagged=flagged)
    conversion = conversion_table(comparison)
    if conversion is not None:
        rep.add_table("GQA converted from MHA", conversion, note=CONVERSION_NOTE)
    rep.add_figure("Validation loss", figures.val_loss(comparison))
    rep.add_figure("KV-cache memory vs context length", figures.kv_cache(comparison))
    rep.add_figure("Throughput", figures.speed(pretrain))
    rep.add_table("Samples: the same prompts and seed for every model", samples, note=_same_continuation_note(samples))
    if cost is not None:
        rep.add_table("Cost at real scale: decode speed and KV cache", cost, note=COST_NOTE)
    if sweep is not None:
        rep.add_figure("Cost at real scale vs context length", cost_at_scale(sweep), note=COST_NOTE)
    if finetune_cost is not None:
        rep.add_table("Cost at real scale: fine-tuning GPT-2 small", finetune_cost,
                      note=finetune_cost.attrs.get("note", ""))
    if finetune is not None:
        rep.add_table("Fine-tuning variants", finetune, note=_footprint_note(comparison))
        rep.add_figure("Fine-tuning losses", figures.finetune_losses(comparison))
        rep.add_figure("Fine-tuning memory and trainable parameters", figures.finetune_memory(finetune))
        rep.add_table("Fine-tuned answers to the same questions", finetune_samples(comparison))
    rep.add_configs(comparison.groups, settings)
    return rep

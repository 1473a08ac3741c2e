"""Assembling the compare report: what a reader sees first (the comparison in words), then the
tables, figures and samples, then every run's settings and where it ran."""
from __future__ import annotations

from typing import Any

import pandas as pd

from nblib import freshness
from nblib.plots import cost_at_scale
from nblib.report import figures
from nblib.report.glance import Calls, at_a_glance, details, report_calls, verdict_lines
from nblib.report.loading import Comparison, pairs
from nblib.report.render import Report, new_report
from nblib.report.tables import RATIO, absent_tasks_note, conversion_table, finetune_samples, paper_table

PRETRAIN_NOTE = (
    "Each ÷ MHA column divides the variant's figure by MHA's. Quality rows are over seeds: mean (min–max, n seeds). "
    "The val split chose each run's reported checkpoint (its best val loss from scratch; the last step of a converted "
    "run); the test split, which nothing was chosen on, gives the quality figures the verdicts compare. "
    "Rows measured here were timed in this process with the variants interleaved: median (min–max over repeats). "
    "KV-cache rows are per sequence in fp32. Peak memory, for every stage, is the peak of the training phase alone: "
    "CUDA's peak allocation on a GPU, the process's peak resident memory on a CPU."
)
CONVERSION_NOTE = (
    "A converted variant starts from the finished MHA run of the same seed with its K/V heads pooled per group "
    "(Ainslie et al. 2023, arXiv 2305.13245), then trains alpha x MHA's steps as the paper uptrains, \"with the original "
    "pre-training setup\": it continues MHA's AdamW state (K/V moments pooled like the weights) at the learning rate where "
    "MHA's schedule ended, and is reported at its last step. Alpha = 0 is the converted model itself, before any "
    "uptraining. Figures are mean (min–max, n seeds), as are the from-scratch run's it is set against."
)
PAPER_NOTE = (
    "Laid out like Table 1 of Ainslie et al. 2023 (arXiv 2305.13245: time per sample against quality). Time per "
    "sample: seconds to decode one sample of the stated length at the run's shape, measured here with the variants "
    "interleaved, amortised over the batch: median (min–max over repeats). Quality: test bits per byte, mean "
    "(min–max, n seeds). Training tokens count a converted variant's source run too; a converted model before "
    "uptraining (alpha = 0) is a row of its own, timed as its uptrained variant. \"Compared at\": equal width "
    "(same layers and d_model, so fewer K/V parameters) or equal parameters (MLP widened to match MHA's)."
)
FRONTIER_NOTE = (
    "Each pretraining variant as a point: quality (test bits per byte, mean with the min–max over seeds) against "
    "what it costs to decode. Circles were trained from scratch, triangles converted from MHA and uptrained. At real "
    "shape (random weights) a converted variant sits at the sweep's variant of its from-scratch label, which has the "
    "KV heads the axis names."
)
ALPHA_NOTE = (
    "The GQA paper's Figure 5 here: test bits per byte of mean-pooled conversions against alpha, the uptraining steps as "
    "a share of the source's (alpha = 0: converted, not trained), mean with the min–max over seeds; dashed, the source "
    "and the same KV heads trained from scratch."
)
LR_NOTE = (
    "The learning rate of each step against the training tokens behind the weights: a converted variant (its tokens "
    "count its source's) continues at the rate where its source's schedule ended, after a re-warm from zero."
)
COST_NOTE = (
    "Random weights of real shapes, timed on the machine that rendered this report (speed does not depend on the "
    "weights' values). The trained smoke models are ~3M parameters, where the 50k-token embedding hides every "
    "attention saving; these rows show what GQA saves at the sizes it is meant for."
)

FINETUNE_NOTE = (
    "Quality rows are over seeds: mean (min–max, n seeds). Each method trains at its own learning rate (the best of "
    "its sweep by val loss where the profile sweeps). The val loss picks the checkpoint on the val split; the test "
    "loss (every source's scored test dialogues pooled) is the figure the verdicts compare; the rows "
    "by source and by task score the test split (the first task_eval_per_source dialogues of each source, nblib.qa_eval), "
    "each variant's base model (as that variant loads it) beside it: SciQ accuracy ranks the options by log-likelihood "
    "(chance: 1 / options), Natural Questions exact match and token F1 use SQuAD's normalisation, ROUGE-L (rouge-score) "
    "compares a greedy answer with the dialogue's own: all in the chat format, closed-book. The rows named lm-eval score "
    "the same test records as EleutherAI's lm-evaluation-harness 0.4.13 defines its tasks (nblib.lmeval): `sciq` with the "
    "support passage in its prompt, acc and acc_norm by option log-likelihood; `nq_open` with its prompt, greedy until a "
    "newline, period or comma, exact match after its normalisation: comparable with published figures of those tasks."
)
BY_SOURCE_NOTE = (
    "Bits per byte of the assistant text of each source's test dialogues: hatched, the variant's base model before "
    "fine-tuning; solid, after. Mean with the min–max over seeds."
)
COST_QUALITY_NOTE = (
    "Each fine-tune variant as a point (mean, min–max over seeds): filled circles at the run's own peak training memory "
    "and seconds per step (its model and machine: the smoke runs were not timed side by side); hollow squares at "
    "GPT-2 small's, measured here with the variants side by side (the cost table above), at the run's quality."
)


def _same_continuation_note(samples: pd.DataFrame) -> str:
    """Say so when a model writes the same continuation whatever the prompt."""
    stuck = [c for c in samples.columns if samples[c].nunique() == 1 and len(samples) > 1]
    if not stuck:
        return ""
    return (f"{', '.join(stuck)} {'continues' if len(stuck) == 1 else 'continue'} every prompt with the same text: at this size and training the model does not "
            "yet condition on its prompt, it writes its most likely sequence whatever came before.")


def verdict_note(calls: Calls) -> str:
    """How the verdicts were tested, and how many comparisons the correction covered."""
    return ("Quality differences paired by seed (the variant minus the one it is set against, seed by seed), in test "
            "bits per byte (pretraining) or test loss (fine-tuning): the mean difference with its interval [low, high] from the paired t test. The intervals "
            f"are Holm-corrected together over all {calls.family} comparisons of this report that have two or more seeds "
            "(family-wise 5%: under no real difference at all, the chance that any of them is called), each at the level "
            "it states; a difference is called only when its interval excludes 0. One seed never calls: its spread is "
            "unmeasured.")


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
    calls = report_calls(comparison)
    rep.add_text("At a glance", at_a_glance(comparison, pretrain, finetune, sweep, finetune_cost, calls),
                 note=f"Differences are means with intervals Holm-corrected over the report's {calls.family} "
                      "comparisons, called only when the interval excludes 0. Details and every verdict's evidence: "
                      "the sections below the tables.")
    rep.add_warning("Unmatched pairs (compared anyway: allow_mismatch=True)", comparison.mismatches)
    rep.add_warning("Stale inputs: a stage these runs came from ran again after them (rerun from the first one named)",
                    freshness.upstream_warnings(freshness.REPORT_STAGE))
    flagged = tuple(f"{other.label}{RATIO}{base.label}" for base, other in pairs(comparison)
                    if any(f"runs/{other.name} " in m and f"runs/{base.name} " in m for m in comparison.mismatches))
    rep.add_table("MHA vs GQA", pretrain, note=PRETRAIN_NOTE, flagged=flagged)
    conversion = conversion_table(comparison)
    if conversion is not None:
        rep.add_table("GQA converted from MHA", conversion, note=CONVERSION_NOTE)
    rep.add_table("Time per sample and quality", paper_table(comparison, pretrain, settings.get("gen_new_tokens")),
                  note=PAPER_NOTE)
    rep.add_text("Verdicts: quality with the seed spread", verdict_lines(comparison, calls), note=verdict_note(calls))
    rep.add_text("Details", details(comparison, pretrain, finetune, sweep, finetune_cost, calls))
    rep.add_figure("Quality vs cost: the frontier", figures.frontier(comparison, pretrain, sweep), note=FRONTIER_NOTE)
    rep.add_figure("Validation loss", figures.val_loss(comparison))
    alpha = figures.alpha_sweep(comparison)
    if alpha is not None:
        rep.add_figure("Uptraining: quality against alpha", alpha, note=ALPHA_NOTE)
        rep.add_figure("Uptraining: the learning rate it continues at", figures.learning_rates(comparison), note=LR_NOTE)
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
        rep.add_table("Fine-tuning variants", finetune,
                      note=" ".join(n for n in (FINETUNE_NOTE, _footprint_note(comparison), absent_tasks_note(comparison)) if n))
        rep.add_figure("Fine-tuning losses", figures.finetune_losses(comparison))
        rep.add_figure("Fine-tuning memory and trainable parameters", figures.finetune_memory(finetune))
        by_source = figures.finetune_by_source(comparison)
        if by_source is not None:
            rep.add_figure("Fine-tuning by source: test bits per byte", by_source, note=BY_SOURCE_NOTE)
        rep.add_figure("Fine-tuning: cost against quality", figures.finetune_cost_quality(comparison, finetune_cost),
                       note=COST_QUALITY_NOTE)
        rep.add_table("Fine-tuned answers to the same questions", finetune_samples(comparison))
    rep.add_configs(comparison.groups, settings)
    return rep

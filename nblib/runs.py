"""Run folders: the contract between the trainers that write runs and the stages that read them.

A run is ``runs/<name>/seed-<seed>/`` under the working root, e.g. ``runs/pretrain-gqa/seed-1337/``:
one training of one variant with one seed. Several seeds of a variant sit side by side under
``runs/<name>/``; the compare stage reads them all and reports their mean and spread.

Every run folder holds ``summary.json`` (the fields below, written only through
:func:`write_summary`, which checks them) and ``metrics.jsonl`` (one JSON object per line,
``kind`` ``train`` or ``eval``). The field tables here are the schema: ``SCHEMA`` is its version,
bumped when a field changes meaning; a summary of another version is refused with the notebook
that rewrites it. While a run is in progress ``finished`` is false and only the common fields
are promised.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from nblib import attention, config
from nblib.files import MARKER, append_jsonl, owned, read_json, read_jsonl, write_json, write_jsonl

if TYPE_CHECKING:
    import pandas as pd

SCHEMA = 3
STAGES = ("pretrain", "finetune")
NUMBER = (int, float)
OPTIONAL_NUMBER = (int, float, type(None))
OPTIONAL_TEXT = (str, type(None))

# field -> (accepted types, meaning)
COMMON: dict[str, tuple[tuple[type, ...] | type, str]] = {
    "schema": (int, "version of this schema"),
    "name": (str, "the run's variant folder under runs/, e.g. pretrain-gqa"),
    "stage": (str, "pretrain | finetune"),
    "variant": (str, "an attention variant (nblib.attention: mha, gqa, ...) or a fine-tune variant (nblib.ftmethods: lora-8bit, ...)"),
    "label": (str, "how reports name the variant: MHA, LoRA + 8-bit, ..."),
    "folder": (str, "this run's folder, relative to the working root"),
    "profile": (str, "smoke | full | dry-run"),
    "seed": (int, "the seed of this run"),
    "config": (dict, "every setting the run was trained with"),
    "machine": (dict, "nblib.machine.info(): CPU, GPU, library versions"),
    "data": (dict, "what was trained on: sha256 and counts of the inputs (matched runs agree on it)"),
    "compute_dtype": (str, "the dtype training computed in (float32, bfloat16, float16)"),
    "finished": (bool, "false while the run is in progress or stopped before its last step"),
    "stop_reason": (OPTIONAL_TEXT, "why the last session ended: done, early_stopping, time_budget, stop_at, diverged"),
    "wall_seconds": (OPTIONAL_NUMBER, "wall time of every session together"),
    "train_seconds": (OPTIONAL_NUMBER, "time inside optimizer steps"),
    "peak_memory_bytes": (OPTIONAL_NUMBER, "peak memory of the training phase (nblib.machine.peak_memory)"),
}
PRETRAIN: dict[str, tuple[tuple[type, ...] | type, str]] = {
    "params": (int, "parameters (tied weights once)"),
    "params_embedding": (int, "token + position embeddings (+ untied head)"),
    "params_blocks": (int, "parameters of the transformer blocks"),
    "n_layer": (int, "layers"),
    "n_head": (int, "query heads"),
    "n_kv_head": (int, "key/value heads"),
    "d_model": (int, "width"),
    "context_length": (int, "positions"),
    "kv_cache_bytes_per_token": (dict, "KV-cache bytes per token by dtype name (float32 and the run's dtype)"),
    "best_val_loss": (NUMBER, "validation loss of the selected evaluation (nats per token; the lowest from scratch)"),
    "best_val_ppl": (NUMBER, "exp(best_val_loss)"),
    "best_val_bpb": (NUMBER, "validation bits per UTF-8 byte at the selected evaluation"),
    "best_step": (int, "step of the selected evaluation (best.pt holds its weights)"),
    "selection": (str, "how best.pt was chosen: best val (from scratch, early stopping) | end of budget (converted)"),
    "test_loss": (NUMBER, "loss of best.pt on the corpus test split (nats per token; nothing is chosen on it)"),
    "test_ppl": (NUMBER, "exp(test_loss)"),
    "test_bpb": (NUMBER, "bits per UTF-8 byte of best.pt on the test split: the report's quality figure"),
    "final_lr": (NUMBER, "the learning rate where the schedule ended (a converted variant uptrains at it)"),
    "final_val_loss": (NUMBER, "validation loss at the last evaluation"),
    "final_val_ppl": (NUMBER, "exp(final_val_loss)"),
    "final_val_bpb": (NUMBER, "validation bits per byte at the last evaluation"),
    "train_tokens_per_s": (OPTIONAL_NUMBER, "the run's own training throughput (its machine, its moment)"),
    "tokens_seen": (int, "training tokens processed"),
    "steps": (int, "optimizer steps taken"),
    "max_steps": (int, "optimizer steps planned"),
    "skipped_steps": (int, "fp16 steps the grad scaler skipped (inf/nan gradients)"),
    "world_size": (int, "DDP processes"),
    "checkpoint": (str, "best.pt, relative to the working root (what later stages load)"),
    "hf_export": (OPTIONAL_TEXT, "Hugging Face GPT2LMHeadModel folder of best.pt (MHA only), or null"),
}
# Added within schema 2: a finished pretraining summary written before them lacks them (a run
# from scratch), so they are checked when present and never required.
PRETRAIN_OPTIONAL: dict[str, tuple[tuple[type, ...] | type, str]] = {
    "init": (str, "scratch | convert (K/V heads pooled from a finished run, then uptrained)"),
    "source_run": (OPTIONAL_TEXT, "the run folder converted from, relative to the working root, or null"),
    "conversion_method": (OPTIONAL_TEXT, "mean | first | random (nblib.convert.convert_kv_heads), or null"),
    "uptrain_fraction": (OPTIONAL_NUMBER, "alpha: uptraining steps as a fraction of the source's, or null"),
    "converted_val_loss": (OPTIONAL_NUMBER, "val loss right after conversion (alpha = 0), or null"),
    "uptrained_val_loss": (OPTIONAL_NUMBER, "val loss at the end of uptraining, or null"),
    "converted_val_bpb": (OPTIONAL_NUMBER, "val bits per byte right after conversion (alpha = 0), or null"),
    "converted_test_loss": (OPTIONAL_NUMBER, "test loss right after conversion (alpha = 0), or null"),
    "converted_test_bpb": (OPTIONAL_NUMBER, "test bits per byte right after conversion (alpha = 0), or null"),
    "source_steps": (int, "optimizer steps of the source run (0 from scratch)"),
    "total_steps": (int, "source_steps + steps: the optimizer steps behind these weights"),
    "total_tokens": (int, "training tokens behind these weights, the source's included"),
    "d_mlp": (int, "MLP hidden width (4 x d_model unless widened to match MHA's parameters)"),
    "matched": (str, "what the variant keeps equal to MHA: equal width | equal parameters (nblib.attention)"),
}
# Added within schema 2 (issue 19): a fine-tune summary written before them lacks them.
FINETUNE_OPTIONAL: dict[str, tuple[tuple[type, ...] | type, str]] = {
    "by_source": (dict, "test split per source (nblib.qa_eval): {source: {loss, bpb, n, tokens}}, trained model"),
    "base_by_source": (dict, "the same of the base model, before training"),
    "tasks": (dict, "task metrics per source (nblib.qa_eval): {source: {task, accuracy | exact_match, f1 | rouge_l, "
                    "n, skipped, ...}}, trained model"),
    "base_tasks": (dict, "the same of the base model, before training"),
    # issue 26: the sources with an lm-evaluation-harness task, scored its way (nblib.lmeval)
    "harness": (dict, "per source (nblib.lmeval.score): {source: {task, lm_eval, acc, acc_norm | exact_match, n, skipped, "
                      "excluded, items}}, trained model"),
    "base_harness": (dict, "the same of the base model, before training"),
}
# Only a run that diverged (stop_reason "diverged", finished false) has it, in either stage.
DIVERGED: dict[str, tuple[tuple[type, ...] | type, str]] = {
    "diverged_step": (int, "the step whose loss or gradient norm blew up (nblib.lifecycle.blown_up); not applied"),
}
OPTIONAL = {"pretrain": {**PRETRAIN_OPTIONAL, **DIVERGED}, "finetune": {**FINETUNE_OPTIONAL, **DIVERGED}}
FINETUNE: dict[str, tuple[tuple[type, ...] | type, str]] = {
    "mode": (str, "precision of the base weights: 8bit | 4bit | 16bit | 32bit"),
    "lora": (bool, "the method trains an adapter on a frozen base (LoRA: true) or every weight (false)"),
    "baselines": (list, "variants this one is compared against in the report"),
    "base_model": (str, "hub name or folder (relative to the working root) of the base"),
    "learning_rate": (NUMBER, "peak learning rate used"),
    "trainable_params": (int, "parameters trained"),
    "token_row_params": (int, "of them, embedding rows trained beside a LoRA adapter (markers, <|endoftext|>, lora_answer_rows)"),
    "total_params": (int, "parameters of the model"),
    "footprint_bytes": (int, "bytes of weights and buffers as loaded for training"),
    "embedding_params": (int, "token + position embedding parameters (kept in full precision by bitsandbytes)"),
    "eval_loss": (NUMBER, "loss per assistant token on the eval dialogues, best checkpoint"),
    "eval_ppl": (NUMBER, "exp(eval_loss)"),
    "eval_bpb": (NUMBER, "bits per UTF-8 byte of the assistant text"),
    "base_eval_loss": (NUMBER, "the same loss before training"),
    "test_loss": (NUMBER, "loss per assistant token on the scored test dialogues of every source together (by_source pooled): "
                          "the report's quality figure, on a split nothing is chosen on"),
    "base_test_loss": (NUMBER, "the same before training"),
    "base_eval_ppl": (NUMBER, "exp(base_eval_loss)"),
    "base_eval_bpb": (NUMBER, "bits per byte before training"),
    "merged_eval_loss": (OPTIONAL_NUMBER, "the same loss of the merged model folder (what chat loads), or null"),
    "merged_weights": (OPTIONAL_TEXT, "what merged/ holds, e.g. the adapter folded into a 32-bit copy of the base"),
    "stop_rate_before": (NUMBER, "share of fixed questions answered and closed by <|endoftext|>, before"),
    "stop_rate_after": (NUMBER, "the same after training"),
    "train_samples_per_s": (OPTIONAL_NUMBER, "the run's own throughput (its machine, its moment)"),
    "steps": (int, "optimizer steps taken"),
    "best_step": (OPTIONAL_NUMBER, "step of the kept checkpoint"),
    "train_dialogues": (int, "training dialogues"),
    "eval_dialogues": (int, "eval dialogues"),
    "dropped_too_long": (int, "dialogues dropped for not fitting max_length"),
    "samples": (list, "[{question, before, after}] greedy answers to the fixed questions"),
    "adapter": (OPTIONAL_TEXT, "LoRA adapter folder, relative to the working root, or null"),
    "merged": (OPTIONAL_TEXT, "merged model folder, relative to the working root, or null"),
}
FIELDS = {"pretrain": PRETRAIN, "finetune": FINETUNE}


class RunError(config.MissingInput):
    """A run is absent, unfinished or unreadable; the message names the notebook that (re)writes it."""


def producer(name: str) -> str:
    """The notebook (with its parameters) that writes run ``name``."""
    stage, _, variant = name.partition("-")
    known = attention.of_run(name)
    if known is not None:
        return known.notebook + ("" if known.key in attention.REQUIRED else f" with {known.key!r} in variants")
    if stage == "pretrain" and variant:
        return f"03_train_mha or 04_train_gqa (whichever wrote {name!r} with name={name!r})"
    if stage == "finetune" and variant:
        return f"05_finetune_lora_8bit with variant={variant!r}"
    return f"03_train_mha, 04_train_gqa or 05_finetune_lora_8bit (whichever wrote {name!r})"


def afresh(name: str) -> str:
    """How to start pretraining run ``name`` over, replacing what its folder holds: the notebook
    parameter, the pipeline's ``-p`` and the command-line flag."""
    known = attention.of_run(name)
    stages = [known.notebook] if known is not None else ["03_train_mha", "04_train_gqa"]
    pipeline = " or ".join(f"-p {stage}.overwrite=true" for stage in stages)
    return f"overwrite=True (pipeline: {pipeline}; python -m nblib.train: --overwrite)"


def rerun(name: str) -> str:
    """The advice for a run this nblib cannot read: its notebook again; for pretraining with
    ``overwrite``, since the notebook will not resume or keep what it cannot read."""
    if not name.startswith("pretrain-"):
        return f"re-run notebook {producer(name)}"
    return f"re-run notebook {producer(name)} with {afresh(name)} to replace it"


def folder(name: str, seed: int, paths: config.Paths | None = None) -> Path:
    """``runs/<name>/seed-<seed>`` under the working root."""
    return (paths or config.paths()).run(name, seed)


# What only a run of this package leaves in its folder (files.MARKER aside): a folder holding none of
# them is not a run, and a trainer that starts afresh or overwrites must not delete it.
EVIDENCE = ("summary.json", "metrics.jsonl", "ckpt.pt", "ckpt.prev.pt", "best.pt", "checkpoints")


def claim(name: str, seed: int, paths: config.Paths | None = None, read_files: bool = True) -> Path:
    """The folder a trainer writes run ``name`` (seed ``seed``) to: ``SettingsError`` when ``name`` is not
    one folder name or the folder lies outside the working root (through a link); ``config.Refused`` when
    it holds files but none of a run's (:data:`EVIDENCE`, ``files.MARKER``). Under DDP only rank 0 reads
    the files (``read_files``): it may be moving or emptying the folder while another rank would list it."""
    paths = paths or config.paths()
    run_dir = folder(config.folder_name("name", name), seed, paths)
    config.inside_home(run_dir, "name", paths.home)
    if read_files and not owned(run_dir, EVIDENCE):
        raise config.Refused(
            f"{config.relative(run_dir, paths.home)} holds files that no run of nblib wrote (no "
            f"{', '.join((*EVIDENCE, MARKER))}); they are not deleted or overwritten: move them away or choose another run name"
        )
    return run_dir


def check(summary: dict[str, Any], where: str) -> None:
    """Raise naming ``where`` and the producer when ``summary`` does not follow the schema."""
    name = str(summary.get("name", where))
    if summary.get("schema") != SCHEMA:
        raise RunError(
            f"{where}/summary.json has schema {summary.get('schema')!r}, this nblib reads schema {SCHEMA}: "
            f"it was written by another version; {rerun(name)}"
        )
    stage = summary.get("stage")
    if stage not in STAGES:
        raise ValueError(f"{where}/summary.json: stage is {stage!r}, expected one of {', '.join(STAGES)}")
    fields = {**COMMON, **FIELDS[stage]} if summary.get("finished") else COMMON
    optional = OPTIONAL[stage]
    problems = []
    for key, (types, _) in {**fields, **optional}.items():
        if key not in summary:
            if key not in optional:
                problems.append(f"{key} is missing")
        elif not isinstance(summary[key], types) or (types in (int, NUMBER) and isinstance(summary[key], bool)):
            problems.append(f"{key}={summary[key]!r} is not {types}")
    if problems:
        raise ValueError(f"{where}/summary.json does not follow the run schema ({'; '.join(problems)}); "
                         f"{rerun(name)}")


def write_summary(run_dir: str | os.PathLike, summary: dict[str, Any]) -> dict[str, Any]:
    """Check ``summary`` against the schema, stamp its version and write it atomically."""
    summary = {**summary, "schema": SCHEMA}
    check(summary, config.relative(run_dir))
    write_json(Path(run_dir) / "summary.json", summary)
    return summary


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The checked ``summary.json`` of a run folder."""
    run_dir = Path(run_dir)
    where = config.relative(run_dir)
    path = run_dir / "summary.json"
    if not path.is_file():
        raise RunError(f"{where}/summary.json not found: run notebook {producer(run_dir.parent.name)} first")
    summary = read_json(path)
    if not isinstance(summary, dict):  # e.g. `[]` from a hand edit: check() needs a mapping
        raise RunError(f"{where}/summary.json holds a JSON {type(summary).__name__}, not an object of run facts: "
                       f"run notebook {producer(run_dir.parent.name)} again to rewrite it")
    check(summary, where)
    return summary


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunError(f"{config.relative(path)} not found: train the run first (notebooks 03/04/05)")
    return read_jsonl(path, partial_tail=True)


def append_metric(run_dir: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one metrics row (flushed, so a crash keeps every row before it)."""
    append_jsonl(Path(run_dir) / "metrics.jsonl", row)


def write_metrics(run_dir: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Replace ``metrics.jsonl`` atomically."""
    write_jsonl(Path(run_dir) / "metrics.jsonl", rows)


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> None:
    """Drop rows logged after ``step`` (a resumed run logs them again), and a last row a kill cut short."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        write_metrics(run_dir, [r for r in read_jsonl(path, partial_tail=True) if r["step"] <= step])


def settings_diff(saved: dict[str, Any], cfg: dict[str, Any], free: Iterable[str] = ()) -> list[str]:
    """``key: old -> new`` for every setting that differs, ignoring ``free`` ones."""
    keys = sorted((set(saved) | set(cfg)) - set(free))
    return [f"{k}: {saved.get(k)!r} -> {cfg.get(k)!r}" for k in keys if saved.get(k) != cfg.get(k)]


def find(paths: config.Paths | None = None) -> list[Path]:
    """Every run folder (``runs/<name>/seed-<seed>`` holding ``summary.json``), sorted."""
    runs = (paths or config.paths()).runs
    return sorted(p.parent for p in runs.glob("*/seed-*/summary.json"))


def table(summaries: list[dict[str, Any]]) -> pd.DataFrame:
    """The schema's figures of one or more finished runs of a stage, one column per run folder."""
    import pandas as pd

    stage = summaries[0]["stage"]
    keys = [k for k in ("label", "seed", "profile", "compute_dtype", "stop_reason", *FIELDS[stage], *OPTIONAL[stage],
                        "wall_seconds", "train_seconds", "peak_memory_bytes")
            if not isinstance(summaries[0].get(k), (dict, list))]
    return pd.DataFrame({s["folder"]: {k: s.get(k) for k in keys} for s in summaries})

"""Fine-tune a GPT-2 into a ``<|user|>`` / ``<|assistant|>`` assistant: LoRA on an 8-bit base, or the alternatives.

Variants (:data:`VARIANTS`; same data, steps and seeds, so they compare): ``lora-8bit``
(bitsandbytes int8 base), ``lora-4bit`` (nf4), ``lora-16bit`` (bf16/fp16), ``lora-32bit`` and
``full`` (every weight, fp32). The loss covers assistant tokens only (their closing
``<|endoftext|>`` included, so the model learns to stop). The two role markers get embedding rows
that start at the mean of the others; with LoRA those rows and ``<|endoftext|>``'s are trained
(peft ``trainable_token_indices``: three rows, tied to the output layer, saved with the adapter),
a full fine-tune trains them all.

The steps, each one notebook cell: ``s = setup(cfg, seed)``; ``before = evaluate(s)``; ``trained =
train(s)``; ``after = evaluate(s)``; ``summary = finish(s, before, after, trained)``. Output goes to
``runs/finetune-<variant>/seed-<seed>/`` (``summary.json`` in ``nblib.runs``' schema,
``metrics.jsonl``, ``checkpoints/``, ``adapter/``, ``merged/``). The eval loss is one number
everywhere: nats per assistant token over all eval dialogues (token-weighted), for the Trainer's
choice of the best checkpoint, the plotted curve and the summary alike. The val split picks the
checkpoint; the test split (``task_eval_per_source`` dialogues of each source) scores the base and
the trained model by source and by task (``nblib.qa_eval``).

The base and its tokenizer are ``nblib.ftbase``'s, the methods and variants ``nblib.ftmethods``'
(re-exported here), the ``Trainer`` and its callbacks ``nblib.fttrainer``'s; resume or refuse, the
time budget and the common summary fields are ``nblib.lifecycle``'s, shared with pretraining.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nblib import config, dialogue, fttrainer, lifecycle, lock, machine, qa_eval, runs, tracking
from nblib.files import read_json, sha256_file, write_json
from nblib.ftbase import (MODES, QUANTIZED_BITS, add_special_tokens, compute_dtype, count_params,  # noqa: F401 (notebook 05)
                          footprint, load_base, load_tokenizer, random_base, resolve_base, token_row_params)
from nblib.ftmethods import (METHODS, PIPELINE, VARIANTS, Method, Variant, frequent_answer_tokens,  # noqa: F401
                             load_adapter, lora_config, merge, variant, wrap_lora)
from nblib.ftscore import Collator, answer, assistant_loss, encode, token_bytes  # noqa: F401 (tests, notebooks)
from nblib.weights import check_weights, weight_files

if TYPE_CHECKING:
    import pandas as pd

STAGE = "finetune"


# ---------------------------------------------------------------------------------------------
# data


def select(records: list[dict], mix: dict[str, int | None] | None, seed: int) -> list[dict]:
    """Keep ``mix[source]`` records of each listed source (``None``: all of it); ``mix=None`` keeps everything."""
    if mix is None:
        return list(records)
    have = {r["source"] for r in records}
    unknown = sorted(set(mix) - have)
    if unknown:
        raise ValueError(f"mix names sources {unknown} that the dialogues do not have ({sorted(have)})")
    out = []
    for source, n in mix.items():
        rows = [r for r in records if r["source"] == source]
        random.Random(f"{seed}:{source}").shuffle(rows)
        out += rows if n is None else rows[:n]
    if not out:  # else fine-tuning would blame max_length for the empty data
        raise config.SettingsError(f"mix={mix} selects no dialogue; give at least one source a count above 0 (or null: all)")
    random.Random(seed).shuffle(out)
    return out


# ---------------------------------------------------------------------------------------------
# setup, train, finish


@dataclass
class Setup:
    """Everything a fine-tuning run holds between notebook cells."""

    cfg: dict[str, Any]
    variant: Variant
    name: str
    seed: int
    run_dir: Path
    device: machine.Device
    learning_rate: float
    tokenizer: Any
    model: Any
    train_set: list[dict]
    val_set: list[dict]
    test_records: list[dict]  # the test split's records, scored by nblib.qa_eval before and after training
    info: dict[str, Any]
    data: dict[str, Any]
    previous: dict[str, Any]  # the summary of the run whose checkpoints this one resumes, or {}
    started: float = field(default_factory=time.time)

    @property
    def mode(self) -> str:
        return self.variant.mode

    @property
    def lora(self) -> bool:
        return self.variant.lora

    def evaluate_loss(self, model: Any | None = None) -> tuple[float, float | None]:
        """The one eval loss (and bits per byte) of this run, of ``model`` (default: the model trained)."""
        return assistant_loss(model or self.model, self.val_set, self.tokenizer.pad_token_id,
                              self.cfg["eval_batch_size"], token_bytes(self.tokenizer))


TRAINED = "trained.json"  # in checkpoints/: what training measured; written once it reached its steps
WEIGHTS = ("adapter_model.safetensors", "model.safetensors")
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth")  # only resuming reads these


def _checkpoints_usable(ckpt_dir: Path) -> list[str]:
    """Remove Trainer checkpoint folders a kill left half-written (no ``trainer_state.json``, the
    Trainer's last file, or no weights); return what was removed, so the run resumes from the last
    complete one. Once training reached its steps (``trained.json``) no checkpoint is written any
    more, and a folder without weights is one :func:`prune_checkpoints` emptied on purpose."""
    removed, pruned = [], (ckpt_dir / TRAINED).is_file()
    for folder in sorted(ckpt_dir.glob("checkpoint-*")):
        weights = any((folder / f).is_file() for f in WEIGHTS)
        if not (folder / "trainer_state.json").is_file() or not (weights or pruned):
            shutil.rmtree(folder)
            removed.append(folder.name)
    return removed


def prune_checkpoints(ckpt_dir: Path, best_step: int, output: Path | None) -> None:
    """Shrink a finished run's ``checkpoints/`` to what a rerun reads to restore it: the last
    checkpoint's ``trainer_state.json``, ``trained.json``, and the best weights unless ``output``
    (``adapter/`` of a LoRA, ``merged/`` of a full fine-tune) holds them already.

    Optimizer, scheduler and RNG states only serve a resume, and a finished run never resumes; a
    LoRA checkpoint also holds the resized embedding, input and output (0.32 GB for GPT-2 small in
    the dry run's LoRA + 8-bit checkpoint), which ``adapter/`` does not need.
    """
    folders = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda f: int(f.name.rsplit("-", 1)[1]))
    best = ckpt_dir / f"checkpoint-{best_step}"
    drop: list[Path] = []
    for folder in folders:
        if folder == best and output is None:
            drop += [f for pattern in TRAINING_STATE for f in folder.glob(pattern)]
        elif folder == folders[-1]:
            drop += [f for f in folder.iterdir() if f.name != "trainer_state.json"]
        else:
            drop.append(folder)
    for path in drop:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _check_resume(run_dir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Clean what killed writes left (a half-written ``merged/``, a checkpoint), then keep
    checkpoints only when resuming the same settings (``resume=False`` starts over).

    Returns the earlier ``summary.json`` when its checkpoints are kept, else ``{}``.
    """
    ckpt = run_dir / "checkpoints"
    if machine.rank() == 0:  # under torchrun the other ranks leave it to rank 0, the one that writes outputs
        lifecycle.clean(run_dir, ckpt)
    for name in _checkpoints_usable(ckpt) if ckpt.is_dir() else []:
        print(f"{config.relative(ckpt)}/{name} was incomplete (the run was killed while writing it): removed")
    if not any(ckpt.glob("checkpoint-*")):
        return {}
    if not cfg["resume"]:
        shutil.rmtree(ckpt)
        return {}
    _, previous = lifecycle.decide(run_dir, cfg, config.free_keys(STAGE), "pass resume=False to start over, or delete the folder")
    return previous or {}


def _data_identity(paths: config.Paths, base_model: str) -> dict[str, Any]:
    """What a fine-tune trains on: the dialogue splits' sha256 and the base model's weights."""
    manifest = read_json(paths.dialogues / "manifest.json") if (paths.dialogues / "manifest.json").is_file() else {}
    base = resolve_base(base_model)
    weights = Path(base) / "model.safetensors"
    return {
        "dialogues_sha256": {k: v["sha256"] for k, v in manifest.get("splits", {}).items()},
        "base_model": base_model,
        "base_sha256": sha256_file(weights) if weights.is_file() else None,
    }


def setup(cfg: dict[str, Any], seed: int | None = None, name: str | None = None) -> Setup:
    """Load tokenizer, base model (in the variant's precision) and data; wrap LoRA; open the run folder
    (``runs/<name>/seed-<seed>``, ``name`` by default ``finetune-<variant>``)."""
    v = variant(cfg["variant"])
    cfg = {**cfg, "seed": cfg["seeds"][0] if seed is None else int(seed)}
    name, paths, device = name or f"finetune-{v.name}", config.paths(), machine.detect(local_rank=machine.local_rank())
    machine.check_build(device, QUANTIZED_BITS.get(v.mode))  # bitsandbytes' kernels, before the run folder
    started = time.time()
    train_records = select(dialogue.load(paths.dialogues, "train"), cfg["mix"], cfg["seed"])  # before the run folder too
    val_records = select(dialogue.load(paths.dialogues, "val"), cfg["mix"], cfg["seed"])[: cfg["eval_dialogues"]]
    test_records = dialogue.load(paths.dialogues, "test")  # every source; qa_eval scores the first task_eval_per_source of each
    check_weights(weight_files(config.resolve(cfg["base_model"])), "point base_model at a complete model folder "
                  "(03_train_mha exports runs/pretrain-mha/seed-<seed>/hf) or at a hub name such as 'gpt2'")
    run_dir = runs.claim(name, cfg["seed"], paths, read_files=machine.rank() == 0)
    previous = _check_resume(run_dir, cfg)
    tracking.configure_env(run_dir)
    config.set_seed(cfg["seed"])

    tok = load_tokenizer(cfg["base_model"])
    model = load_base(cfg["base_model"], v.mode, device)
    token_ids = add_special_tokens(model, tok)
    model.config.use_cache = False  # training; generation asks for the cache explicitly
    embedding = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("wte.weight", "wpe.weight")))
    max_length = min(cfg["max_length"], model.config.n_positions)
    train_set, train_too_long = encode(train_records, tok, max_length)
    val_set, val_too_long = encode(val_records, tok, max_length)
    if not train_set or not val_set:
        raise ValueError(
            f"no dialogues left to train ({len(train_set)}) or evaluate ({len(val_set)}) after dropping those over "
            f"{max_length} tokens; raise max_length or check {config.relative(paths.dialogues)}"
        )
    model = v.method.prepare(model, cfg, tok, token_ids, train_set, v.mode)
    trainable, total = count_params(model)
    info = {
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "token_row_params": token_row_params(model) if v.lora else 0,
        "footprint_bytes": model.get_memory_footprint(), "embedding_params": embedding, "max_length": max_length,
        "train_dialogues": len(train_set), "eval_dialogues": len(val_set),
        "dropped_too_long": train_too_long + val_too_long, "special_token_ids": token_ids,
    }
    lr = cfg["learning_rate"] or cfg[v.method.lr_key]
    s = Setup(cfg, v, name, cfg["seed"], run_dir, device, lr, tok, model, train_set, val_set, test_records, info,
              {**_data_identity(paths, cfg["base_model"]), "train_dialogues": len(train_set),
               "eval_dialogues": len(val_set)}, previous, started)
    runs.write_summary(run_dir, _common(s, finished=False, reason=None, peak=None, train_seconds=None))
    return s


def evaluate(s: Setup) -> dict[str, Any]:
    """Loss, perplexity and bits per byte on assistant tokens of the validation dialogues, answers and
    stop rate; on the test split, ``by_source`` losses and ``tasks`` metrics (:func:`nblib.qa_eval.evaluate`)."""
    loss, bpb = s.evaluate_loss()
    answers = answer(s.model, s.tokenizer, s.cfg["questions"], s.cfg["max_new_tokens"])
    scored = qa_eval.evaluate(s.model, s.tokenizer, s.test_records, max_new_tokens=s.cfg["max_new_tokens"],
                              batch_size=s.cfg["eval_batch_size"], limit_per_source=s.cfg["task_eval_per_source"],
                              max_length=s.info["max_length"])
    return {**lifecycle.loss_fields("", loss, bpb),
            # an answer of punctuation alone ("."), though closed by end-of-text, is no answer
            "stop_rate": sum(a["stopped"] and bool(re.search(r"\w", a["answer"])) for a in answers) / len(answers),
            "answers": answers, **scored}


def train(s: Setup) -> dict[str, Any]:
    """Train with the HF ``Trainer``: eval every ``eval_steps``, best model kept, resume from the
    last checkpoint; stop early with a checkpoint when ``time_budget_minutes`` runs out."""
    from transformers import TrainerState
    from transformers.trainer_utils import get_last_checkpoint

    cfg = s.cfg
    output_dir = s.run_dir / "checkpoints"
    last = get_last_checkpoint(str(output_dir)) if cfg["resume"] and output_dir.is_dir() else None
    if last:
        _check_checkpoint(Path(last))
        if TrainerState.load_from_json(os.path.join(last, "trainer_state.json")).global_step >= cfg["steps"]:
            return _restore_finished(s, Path(last))  # resuming there, the Trainer would take one step too many
    if cfg["wandb"] and machine.rank() == 0:
        tracking.init_wandb(s.run_dir, f"{s.name}-seed-{s.seed}", cfg)
    callbacks = fttrainer.callbacks(s)
    trainer = fttrainer.trainer_class()(
        model=s.model, args=fttrainer.training_arguments(s), data_collator=Collator(s.tokenizer.pad_token_id),
        train_dataset=s.train_set, eval_dataset=s.val_set, processing_class=s.tokenizer, callbacks=callbacks,
        setup=s,
    )
    machine.reset_peak_memory(s.device)
    try:
        with warnings.catch_warnings():  # checkpoints keep the resized embedding; resuming needs nothing more
            warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`", category=UserWarning)
            result = trainer.train(resume_from_checkpoint=last)
    except lifecycle.Diverged as e:  # stopped before the blown-up step: the checkpoints are the last good state
        if machine.rank() == 0:
            runs.write_metrics(s.run_dir, metrics_rows(trainer.state.log_history))
            runs.write_summary(s.run_dir, {**_common(s, False, "diverged", machine.peak_memory(s.device), None),
                                           "diverged_step": e.step})
        raise
    out_of_time = callbacks[0].out_of_time
    trained = {
        "finished": not out_of_time and trainer.state.global_step >= cfg["steps"],
        "stop_reason": "time_budget" if out_of_time else "done",
        "train_samples_per_s": result.metrics["train_samples_per_second"],
        "train_seconds": result.metrics["train_runtime"],
        "steps": trainer.state.global_step,
        "best_step": trainer.state.best_global_step,
        "resumed_from": config.relative(last) if last else None,
        "peak_memory_bytes": machine.peak_memory(s.device),
        "log_history": trainer.state.log_history,
    }
    if trained["finished"] and machine.rank() == 0:  # at once: a kill from here on keeps what training measured
        write_json(output_dir / TRAINED, {k: trained[k] for k in ("steps", "best_step", "train_samples_per_s",
                                                                  "train_seconds", "peak_memory_bytes")})
    return trained


def _check_checkpoint(folder: Path) -> None:
    """Refuse (:class:`config.Refused`, naming the file) a checkpoint to resume whose state or weights cannot be
    read (cut short by a kill or a full disk, emptied, or a pickle of more than tensors), before the Trainer
    reads them and fails with an error that names no file."""
    from transformers.trainer_pt_utils import safe_globals

    fix = f"move {config.relative(folder)} away to resume from the checkpoint before it, or pass resume=False to start over"
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # a JSON or UTF-8 decoding error is a ValueError
        raise config.Refused(f"{config.relative(state)} cannot be read ({type(e).__name__}: {e}): {fix}") from e
    with safe_globals():  # the RNG state holds numpy arrays: allowed as the Trainer allows them
        check_weights([f for pattern in (*WEIGHTS, *TRAINING_STATE) for f in sorted(folder.glob(pattern))], fix)


def _restore_finished(s: Setup, last: Path) -> dict[str, Any]:
    """A run that already reached its steps: load the best weights (its checkpoint's, or once pruned,
    ``adapter/`` or ``merged/``) and the logged history.

    Throughput and peak memory come from ``checkpoints/trained.json`` (written as soon as training
    ends, so a kill while saving the outputs keeps it), else from the earlier summary, else they are ``None``:
    the Trainer saves ``trainer_state.json`` before it logs its closing row (runtime, samples/s),
    so the checkpoints do not hold them.
    """
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(last / "trainer_state.json"))
    best, method = last.parent / f"checkpoint-{state.best_global_step or state.global_step}", s.variant.method
    name = method.weights
    if not (best / name).is_file():  # pruned once finished: the saved output holds the best weights
        best = s.run_dir / method.output
    if not (best / name).is_file():
        raise FileNotFoundError(
            f"{config.relative(best / name)} not found: the run finished, its checkpoints were pruned to what a rerun "
            "needs, and this output has gone since; pass resume=False to train it again"
        )
    check_weights([best / name], "pass resume=False to train the run again")
    method.load(s.model, best)
    recorded = last.parent / TRAINED
    measured = read_json(recorded) if recorded.is_file() else s.previous
    return {
        "finished": True, "stop_reason": "done",
        **{k: measured.get(k) for k in ("train_samples_per_s", "train_seconds", "peak_memory_bytes")},
        "steps": state.global_step,
        "best_step": state.best_global_step,
        "resumed_from": config.relative(last),
        "log_history": state.log_history,
    }


def scores(summary: dict[str, Any]) -> pd.DataFrame:
    """A finished run's test-split scores, ``base`` and ``trained`` columns: per source the eval loss,
    bits per byte and dialogues scored, then each task's metrics (``n``: examples scored)."""
    import pandas as pd

    rows: dict[str, dict[str, Any]] = {}
    for column, by, tasks in (("base", "base_by_source", "base_tasks"), ("trained", "by_source", "tasks")):
        for source, v in summary.get(by, {}).items():
            for key in ("loss", "bpb", "n"):
                rows.setdefault(f"{source} {key}", {})[column] = v[key]
        for source, v in summary.get(tasks, {}).items():
            for key, value in v.items():
                if key not in ("task", "skipped", "items"):  # items: per-item scores, for item-level tests
                    rows.setdefault(f"{source} {v['task']} {key}", {})[column] = value
    return pd.DataFrame(rows).T.rename_axis("test split")


def metrics_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Trainer's log history as ``metrics.jsonl`` rows (``kind`` train or eval), without its closing summary row."""
    rows = []
    for entry in log_history:
        if "eval_loss" in entry:
            rows.append({"kind": "eval", **entry})
        elif "loss" in entry:
            rows.append({"kind": "train", **entry})
    return rows


def _common(s: Setup, finished: bool, reason: str | None, peak: int | None, train_seconds: float | None) -> dict[str, Any]:
    return lifecycle.summary_head(
        name=s.name, stage="finetune", variant=s.variant.name, label=s.variant.label, folder=config.relative(s.run_dir),
        cfg=s.cfg, seed=s.seed, device=s.device, data=s.data, compute_dtype=compute_dtype(s.mode, s.device),
        finished=finished, reason=reason, wall_seconds=time.time() - s.started, train_seconds=train_seconds,
        peak_memory_bytes=peak)


def save_outputs(s: Setup) -> tuple[Path | None, Path | None, str | None]:
    """Write the method's outputs (``adapter/``, ``merged/`` when ``merge``); returns them and what merged holds."""
    return s.variant.method.save(s.model, s.tokenizer, s.run_dir, s.cfg, s.mode)


def finish(s: Setup, before: dict[str, Any], after: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    """Save the adapter (and merged model, evaluated again from disk), ``metrics.jsonl`` and the
    final ``summary.json``, then prune ``checkpoints/`` (:func:`prune_checkpoints`); returns the
    summary. A session stopped by its time budget only writes an unfinished summary: the next
    session resumes from its checkpoint."""
    runs.write_metrics(s.run_dir, metrics_rows(trained["log_history"]))
    common = _common(s, trained["finished"], trained["stop_reason"], trained["peak_memory_bytes"], trained["train_seconds"])
    if not trained["finished"]:
        return runs.write_summary(s.run_dir, common)
    ckpt = s.run_dir / "checkpoints"
    adapter, merged, weights = save_outputs(s)
    merged_loss = None
    if merged is not None:
        from transformers import AutoModelForCausalLM

        merged_loss, _ = s.evaluate_loss(AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=False).to(s.device.torch))
    summary = runs.write_summary(s.run_dir, {
        **common, "mode": s.mode, "lora": s.lora, "baselines": list(s.variant.baselines),
        "base_model": s.cfg["base_model"], "learning_rate": s.learning_rate,
        "trainable_params": s.info["trainable_params"], "total_params": s.info["total_params"],
        "token_row_params": s.info["token_row_params"],
        "footprint_bytes": s.info["footprint_bytes"], "embedding_params": s.info["embedding_params"],
        **lifecycle.loss_fields("eval_", after["loss"], after["bpb"]),
        **lifecycle.loss_fields("base_eval_", before["loss"], before["bpb"]),
        "test_loss": lifecycle.pooled_loss(after["by_source"]), "base_test_loss": lifecycle.pooled_loss(before["by_source"]),
        "merged_eval_loss": merged_loss, "merged_weights": weights,
        "stop_rate_before": before["stop_rate"], "stop_rate_after": after["stop_rate"],
        "by_source": after["by_source"], "base_by_source": before["by_source"],
        "tasks": after["tasks"], "base_tasks": before["tasks"],
        "harness": after["harness"], "base_harness": before["harness"],
        "train_samples_per_s": trained["train_samples_per_s"], "steps": trained["steps"], "best_step": trained["best_step"],
        "train_dialogues": s.info["train_dialogues"], "eval_dialogues": s.info["eval_dialogues"],
        "dropped_too_long": s.info["dropped_too_long"],
        "samples": [{"question": b["question"], "before": b["answer"], "after": a["answer"]}
                    for b, a in zip(before["answers"], after["answers"])],
        "adapter": config.relative(adapter) if adapter else None,
        "merged": config.relative(merged) if merged else None,
    })
    prune_checkpoints(ckpt, trained["best_step"] or trained["steps"], adapter or merged)  # after the summary: a rerun sees it done
    _log_to_wandb(s, summary)
    return summary


def _log_to_wandb(s: Setup, summary: dict[str, Any]) -> None:
    if not s.cfg["wandb"]:
        return
    import wandb

    if wandb.run is not None:
        wandb.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        table = wandb.Table(columns=["question", "before", "after"])
        for row in summary["samples"]:
            table.add_data(row["question"], row["before"], row["after"])
        wandb.log({"before_after": table})
        wandb.finish()


def run(cfg: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
    """All the steps for one seed in one call (the notebook runs them cell by cell)."""
    s = setup(cfg, seed)
    before = evaluate(s)
    trained = train(s)
    return finish(s, before, evaluate(s), trained)

# ---------------------------------------------------------------------------------------------
# command line (what torchrun launches for DDP)


@config.cli
def main(argv: list[str] | None = None) -> int:
    """``python -m nblib.finetune`` / ``torchrun --standalone --nproc_per_node=2 -m nblib.finetune``:
    one seed of one variant. Under torchrun the Trainer runs DDP (``batch_size`` is per process);
    rank 0 alone saves the adapter, the merged model and the summary."""
    parser = config.stage_arguments("python -m nblib.finetune", "Fine-tune one variant (one process or DDP under torchrun).")
    parser.add_argument("--variant", help=f"one of {', '.join(VARIANTS)} (default: the profile's)")
    args = parser.parse_args(argv)
    overrides = config.stage_overrides(parser, args)
    cfg = config.settings(STAGE, args.profile, variant=args.variant, **overrides)
    with lock.hold("python -m nblib.finetune " + " ".join(sys.argv[1:] if argv is None else argv)):
        s = setup(cfg, args.seed)
        before = evaluate(s)
        trained = train(s)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if machine.rank() == 0:
            after = evaluate(s)
            finish(s, before, after, trained)
            print(f"{s.name} seed {s.seed}: {trained['steps']} steps on {world} process(es), eval loss "
                  f"{before['loss']:.6f} -> {after['loss']:.6f}, finished={trained['finished']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

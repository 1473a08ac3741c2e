"""Fine-tune a GPT-2 into a ``<|user|>`` / ``<|assistant|>`` assistant: LoRA on an 8-bit base, or the alternatives.

Variants (same data, steps and seed, so they compare): ``lora-8bit`` (bitsandbytes int8 base),
``lora-4bit`` (nf4), ``lora-16bit`` (bf16/fp16), ``lora-32bit`` and ``full`` (every weight, fp32).
The loss covers assistant tokens only (their closing ``<|endoftext|>`` included, so the model
learns to stop). The two role markers get embedding rows that start at the mean of the others;
with LoRA those rows and ``<|endoftext|>``'s are trained (peft ``trainable_token_indices``: three
rows, tied to the output layer, saved with the adapter), a full fine-tune trains them all.

The steps, each one notebook cell: ``s = setup(cfg)``; ``before = evaluate(s)``; ``trained =
train(s)``; ``after = evaluate(s)``; ``summary = finish(s, before, after, trained)``. Output goes
to ``runs/finetune-<variant>/`` (``summary.json``, ``metrics.jsonl``, ``adapter/``, ``merged/``).
"""
from __future__ import annotations

import logging
import math
import os
import random
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nblib import config, dialogue, tracking
from nblib.files import read_json, read_jsonl, write_json, write_jsonl
from nblib.tokenizer import EOT

VARIANTS: dict[str, tuple[str, bool]] = {  # variant -> (precision mode, LoRA)
    "lora-8bit": ("8bit", True),
    "lora-4bit": ("4bit", True),
    "lora-16bit": ("16bit", True),
    "lora-32bit": ("32bit", True),
    "full": ("32bit", False),
}
MODES = ("8bit", "4bit", "16bit", "32bit")


# ---------------------------------------------------------------------------------------------
# base model and tokenizer


def device() -> str:
    """``cuda`` when a GPU is present, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def half_dtype() -> torch.dtype:
    """The 16-bit type of this machine: bf16 where supported (CPU, Ampere+), else fp16."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def resolve_base(base_model: str) -> str:
    """A local model folder (absolute, or relative to the working root) as a path; anything else is a hub name."""
    for candidate in (Path(base_model).expanduser(), config.home() / base_model):
        if (candidate / "config.json").is_file():
            return str(candidate.resolve())
    if base_model.startswith((".", "/", "~")) or base_model.count("/") > 1:  # hub ids are "name" or "owner/name"
        raise FileNotFoundError(
            f"base model folder {base_model!r} not found under {config.home()}; run 03_train_mha (it exports "
            "runs/pretrain-mha/hf) or set base_model to a hub name such as 'gpt2'"
        )
    return base_model


def load_tokenizer(base_model: str) -> Any:
    """The base model's tokenizer (hub name or local folder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base(base_model))


def load_base(base_model: str, mode: str = "32bit") -> Any:
    """Load a causal LM in a precision ``mode``: ``8bit``/``4bit`` (bitsandbytes), ``16bit`` or ``32bit``."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if mode not in MODES:
        raise ValueError(f"unknown precision mode {mode!r}; choose one of {', '.join(MODES)}")
    kwargs: dict[str, Any] = {"device_map": {"": device()}}
    if mode == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        _quiet_int8_cast_notice()
    elif mode == "4bit":
        compute = half_dtype() if device() == "cuda" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
    else:
        kwargs["dtype"] = half_dtype() if mode == "16bit" else torch.float32
    source = resolve_base(base_model)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise OSError(
            f"could not load base model {base_model!r} ({e}). Offline, point base_model at a local HF model "
            "folder such as runs/pretrain-mha/hf (written by 03_train_mha)."
        ) from e
    if mode == "4bit":
        _keep_4bit_trainable(model)
    model.loss_type = "ForCausalLM"  # GPT-2 configs name none; saying it avoids a warning per model
    return model


def _int8_cast_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_notice() -> None:
    """Drop bitsandbytes' log line on every int8 matmul of fp32 inputs (casting to fp16 is how its int8 path works)."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if _int8_cast_notice not in log.filters:
        log.addFilter(_int8_cast_notice)


def _keep_4bit_trainable(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference.

    On a CPU with AVX512-BF16, the first forward pass without gradients (an evaluation, a sample
    answer) rewrites each ``Linear4bit`` weight into an inference-only layout, and every training
    step after it fails ("a view of a leaf Variable that requires grad is being used in an in-place
    operation"). Training interleaves evaluation, so the repacking is switched off.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def add_special_tokens(model: Any, tokenizer: Any) -> list[int]:
    """Add ``<|user|>``/``<|assistant|>`` (one token each); new embedding rows start at the mean row.

    Also sets the pad token to ``<|endoftext|>`` (the collator keeps padding out of the loss by
    position, so the end-of-answer token stays in the labels). Returns the two token ids.
    """
    known = len(tokenizer)
    added = tokenizer.add_special_tokens({"additional_special_tokens": list(dialogue.SPECIAL_TOKENS)})
    tokenizer.pad_token = EOT
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    ids = tokenizer.convert_tokens_to_ids(list(dialogue.SPECIAL_TOKENS))
    if added:
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weights = {id(w): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
        with torch.no_grad():
            for weight in weights.values():  # one tensor when input and output embeddings are tied
                weight[ids] = weight[:known].float().mean(0).to(weight.dtype)
    return ids


def _conv1d_targets(model: Any, targets: Sequence[str]) -> bool:
    """Whether the LoRA target layers are GPT-2 ``Conv1D`` (weights stored ``[in, out]``)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets)


def _token_rows(model: Any, token_ids: list[int]) -> list[int] | dict[str, list[int]]:
    """peft ``trainable_token_indices``: the input embedding's rows, and the output layer's too when untied."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight is inp.weight:  # tied: peft trains the shared rows once
        return list(token_ids)
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    return {names[id(inp)]: list(token_ids), names[id(out)]: list(token_ids)}


def lora_config(cfg: dict[str, Any], model: Any, token_ids: list[int]) -> Any:
    """LoRA on ``cfg['lora_targets']`` plus trainable embedding rows for ``token_ids``."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg["lora_r"],
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=cfg["lora_dropout"],
        target_modules=list(cfg["lora_targets"]),
        # GPT-2's Conv1D keeps weights transposed; bitsandbytes turns them into Linear layers.
        fan_in_fan_out=_conv1d_targets(model, cfg["lora_targets"]),
        trainable_token_indices=_token_rows(model, token_ids),
        bias="none",
        task_type="CAUSAL_LM",
    )


@contextmanager
def _peft_reads_deprecated_alias() -> Iterator[None]:
    """Silence the FutureWarning peft 0.21 triggers by reading ``is_gradient_checkpointing`` when it wraps a model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _wrap_lora(model: Any, lora: Any) -> Any:
    from peft import get_peft_model

    with _peft_reads_deprecated_alias():
        return get_peft_model(model, lora)


def count_params(model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameters (4-bit weights counted unpacked, tied weights once)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def footprint(base_model: str, mode: str) -> int:
    """Bytes of weights and buffers of ``base_model`` loaded in ``mode``."""
    model = load_base(base_model, mode)
    size = model.get_memory_footprint()
    del model
    return size


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
    random.Random(seed).shuffle(out)
    return out


def encode(records: list[dict], tokenizer: Any, max_length: int) -> tuple[list[dict], int]:
    """Tokenize dialogues into ``{"input_ids", "labels"}``; those over ``max_length`` tokens are dropped (counted).

    Dropping rather than truncating keeps every answer's closing ``<|endoftext|>``.
    """
    out, too_long = [], 0
    for rec in records:
        ids, labels = dialogue.tokenize(rec["dialogue"], tokenizer)
        if len(ids) > max_length:
            too_long += 1
        else:
            out.append({"input_ids": ids, "labels": labels})
    return out, too_long


@dataclass
class Collator:
    """Right-pads a batch; padding gets attention 0 and label -100 by position, whatever the pad id."""

    pad_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)

        def pad(seq: list[int], value: int) -> list[int]:
            return seq + [value] * (width - len(seq))

        return {
            "input_ids": torch.tensor([pad(b["input_ids"], self.pad_id) for b in batch]),
            "attention_mask": torch.tensor([pad([1] * len(b["input_ids"]), 0) for b in batch]),
            "labels": torch.tensor([pad(b["labels"], -100) for b in batch]),
        }


# ---------------------------------------------------------------------------------------------
# evaluation: loss on assistant tokens, answers to fixed questions, stop rate


@torch.no_grad()
def assistant_loss(model: Any, examples: list[dict], pad_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy per assistant token (labels != -100), weighted by tokens across batches."""
    was_training = model.training
    model.eval()
    collate, total, count = Collator(pad_id), 0.0, 0
    for i in tqdm(range(0, len(examples), batch_size), desc="eval loss", leave=False):
        batch = {k: v.to(model.device) for k, v in collate(examples[i : i + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        total += nll.item()
        count += int((targets != -100).sum())
    model.train(was_training)
    return total / count


@torch.no_grad()
def answer(model: Any, tokenizer: Any, questions: Sequence[str], max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy answers; ``stopped``: a non-empty answer closed by ``<|endoftext|>`` within ``max_new_tokens``.

    The budget shrinks when the prompt plus ``max_new_tokens`` would not fit the model's context.
    """
    was_training = model.training
    model.eval()
    eot = tokenizer.convert_tokens_to_ids(EOT)
    out = []
    for q in questions:
        prompt = dialogue.render([{"role": "user", "content": q}], generation_prompt=True)
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=min(max_new_tokens, model.config.n_positions - ids.shape[1]),
            do_sample=False,
            eos_token_id=eot,
            pad_token_id=eot,
            use_cache=True,
        )
        new = gen[0, ids.shape[1] :].tolist()
        end = new.index(eot) if eot in new else len(new)
        text = tokenizer.decode(new[:end]).strip()
        out.append({"question": q, "answer": text, "stopped": end < len(new) and bool(text)})
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# setup, train, finish


@dataclass
class Setup:
    """Everything a fine-tuning run holds between notebook cells."""

    cfg: dict[str, Any]
    name: str
    run_dir: Path
    mode: str
    lora: bool
    tokenizer: Any
    model: Any
    train_set: list[dict]
    val_set: list[dict]
    info: dict[str, Any]
    previous: dict[str, Any]  # the summary of the run whose checkpoints this one resumes, or {}
    started: float = field(default_factory=time.time)


def _rel(path: Path) -> str:
    """``path`` relative to the working root when inside it (summaries never hold machine paths)."""
    try:
        return str(Path(path).resolve().relative_to(config.home()))
    except ValueError:
        return str(path)


_RESUME_FREE = {"resume", "wandb", "merge", "questions", "max_new_tokens"}  # may change between a run and its resume


def _check_resume(run_dir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Keep checkpoints only when resuming the same settings (``resume=False`` starts over).

    Returns the earlier ``summary.json`` when its checkpoints are kept, else ``{}``.
    """
    ckpt = run_dir / "checkpoints"
    if not any(ckpt.glob("checkpoint-*")):
        return {}
    if not cfg["resume"]:
        shutil.rmtree(ckpt)
        return {}
    summary = run_dir / "summary.json"
    previous = read_json(summary) if summary.is_file() else {}
    old = previous.get("config") or {}
    changed = sorted(k for k in set(cfg) | set(old) if k not in _RESUME_FREE and old.get(k) != cfg.get(k))
    if changed:
        raise ValueError(
            f"{_rel(run_dir)} holds checkpoints of a run with other settings (differs in: {', '.join(changed)}); "
            "pass resume=False to start over, or delete the folder"
        )
    return previous


def setup(cfg: dict[str, Any]) -> Setup:
    """Load tokenizer, base model (in the variant's precision) and data; wrap LoRA; open the run folder."""
    if cfg["variant"] not in VARIANTS:
        raise ValueError(f"unknown variant {cfg['variant']!r}; choose one of {', '.join(VARIANTS)}")
    mode, lora = VARIANTS[cfg["variant"]]
    name = f"finetune-{cfg['variant']}"
    paths = config.paths()
    run_dir = paths.run(name)
    previous = _check_resume(run_dir, cfg)
    tracking.configure_env(run_dir)
    config.set_seed(cfg["seed"])
    started = time.time()

    train_records = select(dialogue.load(paths.dialogues, "train"), cfg["mix"], cfg["seed"])
    val_records = select(dialogue.load(paths.dialogues, "val"), cfg["mix"], cfg["seed"])[: cfg["eval_dialogues"]]

    tokenizer = load_tokenizer(cfg["base_model"])
    model = load_base(cfg["base_model"], mode)
    token_ids = add_special_tokens(model, tokenizer)
    model.config.use_cache = False  # training; generation asks for the cache explicitly
    if lora:
        if mode in ("8bit", "4bit"):
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        # the markers' rows, and end-of-text's: it now closes every answer (training it lifts the stop rate)
        rows = [*token_ids, tokenizer.convert_tokens_to_ids(EOT)]
        model = _wrap_lora(model, lora_config(cfg, model, rows))
        for p in model.parameters():  # optimiser state and fp16 grad scaling want fp32 trainables
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()

    max_length = min(cfg["max_length"], model.config.n_positions)
    train_set, train_too_long = encode(train_records, tokenizer, max_length)
    val_set, val_too_long = encode(val_records, tokenizer, max_length)
    if not train_set or not val_set:
        raise ValueError(
            f"no dialogues left to train ({len(train_set)}) or evaluate ({len(val_set)}) after dropping those over "
            f"{max_length} tokens; raise max_length or check {_rel(paths.dialogues)}"
        )
    trainable, total = count_params(model)
    info = {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        "footprint_bytes": model.get_memory_footprint(),
        "max_length": max_length,
        "train_dialogues": len(train_set),
        "eval_dialogues": len(val_set),
        "dropped_too_long": train_too_long + val_too_long,
        "special_token_ids": token_ids,
    }
    write_json(run_dir / "summary.json", {
        "name": name, "stage": "finetune", "profile": cfg["profile"], "seed": cfg["seed"], "config": cfg,
        "machine": config.machine_info(), "variant": cfg["variant"], "mode": mode, "lora": lora,
        "base_model": cfg["base_model"], "finished": False,
    })
    return Setup(cfg, name, run_dir, mode, lora, tokenizer, model, train_set, val_set, info, previous, started)


def evaluate(s: Setup) -> dict[str, Any]:
    """Loss and perplexity on assistant tokens of the validation dialogues, answers and stop rate."""
    pad_id = s.tokenizer.pad_token_id
    loss = assistant_loss(s.model, s.val_set, pad_id, s.cfg["eval_batch_size"])
    answers = answer(s.model, s.tokenizer, s.cfg["questions"], s.cfg["max_new_tokens"])
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "stop_rate": sum(a["stopped"] for a in answers) / len(answers),
        "answers": answers,
    }


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_memory() -> int:
    """Peak GPU memory allocated, or on CPU the process's peak resident set size, in bytes."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sample_callback(s: Setup) -> Any:
    from transformers import TrainerCallback

    class SampleAnswers(TrainerCallback):
        """At each evaluation, answer the fixed questions and log them as a W&B table."""

        def on_evaluate(self, args, state, control, **kwargs):  # noqa: ANN001 (Trainer's signature)
            import wandb

            table = wandb.Table(columns=["step", "question", "answer", "stopped"])
            for r in answer(s.model, s.tokenizer, s.cfg["questions"], s.cfg["max_new_tokens"]):
                table.add_data(state.global_step, r["question"], r["answer"], r["stopped"])
            wandb.log({"samples": table, "train/global_step": state.global_step})

    return SampleAnswers()


def train(s: Setup) -> dict[str, Any]:
    """Train with the HF ``Trainer``: eval every ``eval_steps``, best model kept, resume from the last checkpoint."""
    from transformers import Trainer, TrainerState, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    cfg = s.cfg
    cuda = torch.cuda.is_available()
    output_dir = s.run_dir / "checkpoints"
    last = get_last_checkpoint(str(output_dir)) if cfg["resume"] and output_dir.is_dir() else None
    if last and TrainerState.load_from_json(os.path.join(last, "trainer_state.json")).global_step >= cfg["steps"]:
        return _restore_finished(s, Path(last))  # resuming there, the Trainer would take one step too many
    if cfg["wandb"]:
        tracking.init_wandb(s.run_dir, s.name, cfg)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch_size"],
        per_device_eval_batch_size=cfg["eval_batch_size"],
        gradient_accumulation_steps=cfg["grad_accum"],
        learning_rate=cfg["lora_lr"] if s.lora else cfg["full_lr"],
        lr_scheduler_type="cosine",
        warmup_steps=cfg["warmup_steps"],
        weight_decay=cfg["weight_decay"],
        eval_strategy="steps",
        eval_steps=cfg["eval_steps"],
        save_strategy="steps",
        save_steps=cfg["eval_steps"],
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=cfg["logging_steps"],
        report_to="wandb" if cfg["wandb"] else "none",
        run_name=s.name,
        activation_checkpointing=cfg["activation_checkpointing"],
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=cuda and half_dtype() == torch.bfloat16,
        fp16=cuda and half_dtype() == torch.float16,
        use_cpu=not cuda,
        seed=cfg["seed"],
        data_seed=cfg["seed"],
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=s.model,
        args=args,
        data_collator=Collator(s.tokenizer.pad_token_id),
        train_dataset=s.train_set,
        eval_dataset=s.val_set,
        processing_class=s.tokenizer,
        callbacks=[_sample_callback(s)] if cfg["wandb"] else [],
    )
    _reset_peak_memory()
    with warnings.catch_warnings():  # checkpoints keep the resized embedding; resuming needs nothing more
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`", category=UserWarning)
        result = trainer.train(resume_from_checkpoint=last)
    return {
        "train_samples_per_s": result.metrics["train_samples_per_second"],
        "train_seconds": result.metrics["train_runtime"],
        "steps": trainer.state.global_step,
        "best_step": trainer.state.best_global_step,
        "resumed_from": _rel(Path(last)) if last else None,
        "peak_memory_bytes": _peak_memory(),
        "log_history": trainer.state.log_history,
    }


def _restore_finished(s: Setup, last: Path) -> dict[str, Any]:
    """A run that already reached its steps: load the best checkpoint's weights and the logged history.

    Throughput and peak memory come from the earlier summary (``None`` if that run never finished).
    """
    from safetensors.torch import load_file
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(last / "trainer_state.json"))
    best = last.parent / f"checkpoint-{state.best_global_step or state.global_step}"
    if s.lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(s.model, load_file(best / "adapter_model.safetensors"))
    else:
        result = s.model.load_state_dict(load_file(best / "model.safetensors"), strict=False)
        if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:  # the tied head is not stored
            raise ValueError(f"{_rel(best)} does not match the model: {result}")
    earlier = s.previous
    return {
        "train_samples_per_s": earlier.get("train_samples_per_s"),
        "train_seconds": earlier.get("train_seconds"),
        "steps": state.global_step,
        "best_step": state.best_global_step,
        "resumed_from": _rel(last),
        "peak_memory_bytes": earlier.get("peak_memory_bytes"),
        "log_history": state.log_history,
    }


def _save_dir(out_dir: Path, save: Callable[[Path], None]) -> Path:
    """Write a folder next to ``out_dir`` and swap it in, so a crash never leaves a half-written model."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def metrics_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Trainer's log history as ``metrics.jsonl`` rows (``kind`` train or eval), without its closing summary row."""
    rows = []
    for entry in log_history:
        if "eval_loss" in entry:
            rows.append({"kind": "eval", **entry})
        elif "loss" in entry:
            rows.append({"kind": "train", **entry})
    return rows


def finish(s: Setup, before: dict[str, Any], after: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    """Save the adapter (and merged model), ``metrics.jsonl`` and the final ``summary.json``; returns the summary."""
    cfg = s.cfg
    adapter = merged = None
    if s.lora:
        s.model.peft_config["default"].base_model_name_or_path = cfg["base_model"]

        def save_adapter(d: Path) -> None:  # the trained token rows are in the adapter; the resized base is not needed
            s.model.save_pretrained(d, save_embedding_layers=False)
            s.tokenizer.save_pretrained(d)

        adapter = _save_dir(s.run_dir / "adapter", save_adapter)
        if cfg["merge"]:
            merged = merge(adapter, s.run_dir / "merged", cfg["base_model"])
    elif cfg["merge"]:
        s.model.config.use_cache = True

        def save_full(d: Path) -> None:
            s.model.save_pretrained(d)
            s.tokenizer.save_pretrained(d)

        merged = _save_dir(s.run_dir / "merged", save_full)
    write_jsonl(s.run_dir / "metrics.jsonl", metrics_rows(trained["log_history"]))
    summary = {
        **read_json(s.run_dir / "summary.json"),
        "wall_seconds": time.time() - s.started,
        "peak_memory_bytes": trained["peak_memory_bytes"],
        "finished": True,
        "trainable_params": s.info["trainable_params"],
        "total_params": s.info["total_params"],
        "footprint_bytes": s.info["footprint_bytes"],
        "eval_loss": after["loss"],
        "eval_ppl": after["ppl"],
        "base_eval_loss": before["loss"],
        "base_eval_ppl": before["ppl"],
        "stop_rate_before": before["stop_rate"],
        "stop_rate_after": after["stop_rate"],
        "train_samples_per_s": trained["train_samples_per_s"],
        "train_seconds": trained["train_seconds"],
        "steps": trained["steps"],
        "best_step": trained["best_step"],
        "train_dialogues": s.info["train_dialogues"],
        "eval_dialogues": s.info["eval_dialogues"],
        "dropped_too_long": s.info["dropped_too_long"],
        "samples": [
            {"question": b["question"], "before": b["answer"], "after": a["answer"]}
            for b, a in zip(before["answers"], after["answers"])
        ],
        "adapter": _rel(adapter) if adapter else None,
        "merged": _rel(merged) if merged else None,
    }
    write_json(s.run_dir / "summary.json", summary)
    if cfg["wandb"]:
        import wandb

        if wandb.run is not None:
            wandb.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            table = wandb.Table(columns=["question", "before", "after"])
            for row in summary["samples"]:
                table.add_data(row["question"], row["before"], row["after"])
            wandb.log({"before_after": table})
            wandb.finish()
    return summary


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """All the steps in one call (the notebook runs them cell by cell)."""
    s = setup(cfg)
    before = evaluate(s)
    trained = train(s)
    return finish(s, before, evaluate(s), trained)


# ---------------------------------------------------------------------------------------------
# reloading: adapter + base, merged model


def load_adapter(adapter_dir: str | os.PathLike, base_model: str | None = None, mode: str = "32bit") -> tuple[Any, Any]:
    """``(PeftModel, tokenizer)`` from a saved adapter on its base (from ``adapter_config.json`` unless given)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} holds no adapter_config.json; run 05_finetune_lora_8bit with a LoRA variant"
        )
    peft_cfg = PeftConfig.from_pretrained(str(adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    model = load_base(base_model or peft_cfg.base_model_name_or_path, mode)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):  # rows for the markers; the adapter fills them
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    peft_cfg.fan_in_fan_out = _conv1d_targets(model, peft_cfg.target_modules)
    with _peft_reads_deprecated_alias():
        return PeftModel.from_pretrained(model, str(adapter_dir), config=peft_cfg), tokenizer


def merge(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """Fold a LoRA adapter into a 32-bit copy of its base and save a standalone model folder (with tokenizer)."""
    model, tokenizer = load_adapter(adapter_dir, base_model, "32bit")
    merged = model.merge_and_unload()
    merged.config.use_cache = True

    def save(d: Path) -> None:
        merged.save_pretrained(d)
        tokenizer.save_pretrained(d)

    return _save_dir(Path(out_dir), save)


# ---------------------------------------------------------------------------------------------
# plots


def plot_losses(run_dirs: str | os.PathLike | Sequence[str | os.PathLike]) -> Any:
    """Train (line) and eval (dots) loss on assistant tokens against step, one colour per run folder."""
    from matplotlib.figure import Figure

    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for run_dir in map(Path, run_dirs):
        rows = read_jsonl(run_dir / "metrics.jsonl")
        train_rows = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
        eval_rows = [(r["step"], r["eval_loss"]) for r in rows if r["kind"] == "eval"]
        (line,) = ax.plot(*zip(*train_rows), label=f"{run_dir.name} train")
        ax.plot(*zip(*eval_rows), "o--", color=line.get_color(), label=f"{run_dir.name} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per assistant token")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig

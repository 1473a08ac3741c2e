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
choice of the best checkpoint, the plotted curve and the summary alike.
"""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from nblib import config, dialogue, lock, machine, runs, tokenizer, tracking
from nblib.files import read_json, remove_orphans, replace_dir, sha256_file, write_json
from nblib.progress import Progress
from nblib.tokenizer import EOT

STAGE = "finetune"
MODES = ("8bit", "4bit", "16bit", "32bit")
QUANTIZED_BITS = {"8bit": 8, "4bit": 4}  # the modes bitsandbytes serves, by weight bits
LN2 = math.log(2)


@dataclass(frozen=True)
class Variant:
    """One way to fine-tune: base precision, LoRA or not, and what the report compares it with."""

    name: str
    label: str
    mode: str
    lora: bool
    baselines: tuple[str, ...]


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("lora-8bit", "LoRA + 8-bit", "8bit", True, ("full", "lora-32bit")),
    Variant("lora-4bit", "LoRA + 4-bit", "4bit", True, ("full", "lora-32bit")),
    Variant("lora-16bit", "LoRA + 16-bit", "16bit", True, ("full", "lora-32bit")),
    Variant("lora-32bit", "LoRA + 32-bit", "32bit", True, ("full",)),
    Variant("full", "Full fine-tune", "32bit", False, ()),
)}


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


# ---------------------------------------------------------------------------------------------
# base model and tokenizer


def resolve_base(base_model: str) -> str:
    """A local model folder (absolute, or relative to the working root — never to the current
    directory) as a path; anything else is a hub name."""
    local = config.resolve(base_model)
    if (local / "config.json").is_file():
        return str(local.resolve())
    if base_model.startswith((".", "/", "~")) or base_model.count("/") > 1:  # hub ids are "name" or "owner/name"
        raise FileNotFoundError(
            f"base model folder {base_model!r} not found under the working root {config.home()}; run 03_train_mha "
            "(it exports runs/pretrain-mha/seed-<seed>/hf) or set base_model to a hub name such as 'gpt2'"
        )
    return base_model


def random_base(folder: str | os.PathLike) -> Path:
    """Save a GPT-2-small-shaped model (124M, ``GPT2Config()``) with seeded random weights and GPT-2's
    tokenizer to ``folder`` (atomically, kept when already there): a base that needs no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder

    def write(d: Path) -> None:
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(d)
        tokenizer.hf_tokenizer().save_pretrained(d)

    return replace_dir(folder, write)


def load_tokenizer(base_model: str) -> Any:
    """The base model's tokenizer (hub name or local folder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base(base_model))


def load_base(base_model: str, mode: str = "32bit", device: machine.Device | None = None) -> Any:
    """Load a causal LM in a precision ``mode``: ``8bit``/``4bit`` (bitsandbytes), ``16bit`` or ``32bit``."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if mode not in MODES:
        raise ValueError(f"unknown precision mode {mode!r}; choose one of {', '.join(MODES)}")
    device = device or machine.detect()
    kwargs: dict[str, Any] = {"device_map": {"": str(device.torch)}}
    if mode == "8bit":
        machine.check_8bit(device)
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif mode == "4bit":
        compute = machine.half_dtype(device) if device.type == "cuda" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
    else:
        kwargs["dtype"] = machine.half_dtype(device) if mode == "16bit" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_base(base_model), **kwargs)
    except OSError as e:
        raise OSError(
            f"could not load base model {base_model!r} ({e}). Offline, point base_model at a local HF model "
            "folder such as runs/pretrain-mha/seed-1337/hf (written by 03_train_mha)."
        ) from e
    if mode == "4bit":
        _keep_4bit_trainable(model)
    model.loss_type = "ForCausalLM"  # GPT-2 configs name none; saying it avoids a warning per model
    return model


def compute_dtype(mode: str, device: machine.Device) -> str:
    """What the base layers' matmuls compute in, as trained (the Trainer autocasts on GPUs)."""
    def name(dtype: torch.dtype) -> str:
        return str(dtype).removeprefix("torch.")

    if device.type == "cuda":
        suffix = {"8bit": " (int8 matmul)", "4bit": " (nf4 weights)"}.get(mode, "")
        return f"{name(machine.auto_dtype(device))} autocast{suffix}"
    return {"8bit": "int8 matmul, float16 inputs", "4bit": "nf4 weights, float32 compute",
            "16bit": name(machine.half_dtype(device)), "32bit": "float32"}[mode]


class _Noise(logging.Filter):
    """Drop notices that need no action here: bitsandbytes' fp16 cast of every int8 matmul of fp32
    inputs (how its int8 path works) and the optional ``kernels`` package it looks for on CPU, and
    the Trainer's note that the best checkpoint has no ``lm_head.weight`` (it is tied to the token
    embedding, which the checkpoint has)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("MatMul8bitLt: inputs will be cast") or "kernels-community" in message
                    or ("missing keys in the checkpoint" in message and "['lm_head.weight']" in message))


_NOISE = _Noise()


def _quiet_notices() -> None:
    for name in ("bitsandbytes", "bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops",
                 "transformers.trainer"):
        log = logging.getLogger(name)
        if _NOISE not in log.filters:
            log.addFilter(_NOISE)


_quiet_notices()  # before bitsandbytes is first imported: its CPU backend logs at import time


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

    tied = {"lm_head", "wte"} & set(cfg["lora_targets"])
    if tied:
        raise ValueError(
            f"lora_targets {sorted(tied)}: GPT-2's output layer is the token embedding (tied), and a LoRA on it "
            "cannot be merged into one saved model; the rows it needs are trained through lora_answer_rows instead. "
            "Use the linear layers: c_attn, c_proj, c_fc"
        )

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


def wrap_lora(model: Any, cfg: dict[str, Any], token_ids: list[int], mode: str) -> Any:
    """The base wrapped with LoRA (k-bit bases prepared first); trainable parameters kept in fp32."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if mode in ("8bit", "4bit"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with _peft_reads_deprecated_alias():
        model = get_peft_model(model, lora_config(cfg, model, token_ids))
    for p in model.parameters():  # optimiser state and fp16 grad scaling want fp32 trainables
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


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
    if not out:  # else fine-tuning would blame max_length for the empty data
        raise config.SettingsError(f"mix={mix} selects no dialogue; give at least one source a count above 0 (or null: all)")
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


def frequent_answer_tokens(examples: list[dict], k: int, exclude: Sequence[int] = ()) -> list[int]:
    """The ``k`` token ids most frequent among the training labels (answer tokens), ``exclude`` left out."""
    from collections import Counter

    counts = Counter(t for ex in examples for t in ex["labels"] if t != -100 and t not in exclude)
    return [t for t, _ in counts.most_common(k)]


def token_bytes(tok: Any) -> torch.Tensor:
    """UTF-8 bytes per id of a GPT-2 tokenizer with added markers (special tokens count 0)."""
    base = torch.from_numpy(tokenizer.token_bytes())
    return torch.cat([base, torch.zeros(max(0, len(tok) - len(base)), dtype=base.dtype)])


# ---------------------------------------------------------------------------------------------
# evaluation: loss on assistant tokens, answers to fixed questions, stop rate


@torch.no_grad()
def assistant_loss(model: Any, examples: list[dict], pad_id: int, batch_size: int = 8,
                   nbytes: torch.Tensor | None = None) -> tuple[float, float | None]:
    """``(loss, bits per byte)``: cross-entropy per assistant token (labels != -100), summed over
    every batch and divided by the token count; bits per byte over the tokens that stand for text."""
    was_training = model.training
    model.eval()
    collate, total, count, text_nats, text_bytes = Collator(pad_id), 0.0, 0, 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(examples[i : i + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:].flatten()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets, ignore_index=-100, reduction="none")
        keep = targets != -100
        total += nll[keep].sum().item()
        count += int(keep.sum())
        if nbytes is not None:
            b = nbytes.to(targets.device)[targets.clamp(min=0)] * keep
            text_nats += nll[b > 0].sum().item()
            text_bytes += int(b.sum())
    model.train(was_training)
    return total / count, (text_nats / LN2 / text_bytes if text_bytes else None)


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
        for note in remove_orphans(run_dir) + remove_orphans(ckpt):
            print(f"{config.relative(run_dir)}: {note}")
    for name in _checkpoints_usable(ckpt) if ckpt.is_dir() else []:
        print(f"{config.relative(ckpt)}/{name} was incomplete (the run was killed while writing it): removed")
    if not any(ckpt.glob("checkpoint-*")):
        return {}
    if not cfg["resume"]:
        shutil.rmtree(ckpt)
        return {}
    summary = run_dir / "summary.json"
    previous = read_json(summary) if summary.is_file() else {}
    changed = runs.settings_diff(previous.get("config") or {}, cfg, config.free_keys(STAGE))
    if changed:
        keys = ", ".join(c.split(":", 1)[0] for c in changed)
        raise ValueError(
            f"{config.relative(run_dir)} holds checkpoints of a run with other settings (differs in: {keys}); "
            "pass resume=False to start over, or delete the folder"
        )
    return previous


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


def setup(cfg: dict[str, Any], seed: int | None = None) -> Setup:
    """Load tokenizer, base model (in the variant's precision) and data; wrap LoRA; open the run folder."""
    v = variant(cfg["variant"])
    cfg = {**cfg, "seed": cfg["seeds"][0] if seed is None else int(seed)}
    name, paths, device = f"finetune-{v.name}", config.paths(), machine.detect(local_rank=machine.local_rank())
    machine.check_build(device, QUANTIZED_BITS.get(v.mode))  # bitsandbytes' kernels, before the run folder
    started = time.time()
    train_records = select(dialogue.load(paths.dialogues, "train"), cfg["mix"], cfg["seed"])  # before the run folder too
    val_records = select(dialogue.load(paths.dialogues, "val"), cfg["mix"], cfg["seed"])[: cfg["eval_dialogues"]]
    run_dir = runs.folder(name, cfg["seed"], paths)
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
    if v.lora:  # the markers' rows, end-of-text's (it now closes every answer), and the frequent answer tokens'
        rows = [*token_ids, tok.convert_tokens_to_ids(EOT)]
        model = wrap_lora(model, cfg, rows + frequent_answer_tokens(train_set, cfg["lora_answer_rows"], rows), v.mode)
    trainable, total = count_params(model)
    info = {
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "footprint_bytes": model.get_memory_footprint(), "embedding_params": embedding, "max_length": max_length,
        "train_dialogues": len(train_set), "eval_dialogues": len(val_set),
        "dropped_too_long": train_too_long + val_too_long, "special_token_ids": token_ids,
    }
    lr = cfg["learning_rate"] or (cfg["lora_lr"] if v.lora else cfg["full_lr"])
    s = Setup(cfg, v, name, cfg["seed"], run_dir, device, lr, tok, model, train_set, val_set, info,
              {**_data_identity(paths, cfg["base_model"]), "train_dialogues": len(train_set),
               "eval_dialogues": len(val_set)}, previous, started)
    runs.write_summary(run_dir, _common(s, finished=False, reason=None, peak=None, train_seconds=None))
    return s


def evaluate(s: Setup) -> dict[str, Any]:
    """Loss, perplexity and bits per byte on assistant tokens of the validation dialogues, answers and stop rate."""
    loss, bpb = s.evaluate_loss()
    answers = answer(s.model, s.tokenizer, s.cfg["questions"], s.cfg["max_new_tokens"])
    return {"loss": loss, "ppl": math.exp(loss), "bpb": bpb,
            "stop_rate": sum(a["stopped"] for a in answers) / len(answers), "answers": answers}


def _callbacks(s: Setup) -> list[Any]:
    """Progress (bar + pipeline status), the session's time budget, and W&B sample answers."""
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Progress | None = None
            self.t0 = time.perf_counter()
            self.last = self.t0
            self.step_s = 0.0
            self.out_of_time = False

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 (the Trainer's signature)
            self.bar = Progress(f"{s.name} seed {s.seed}", state.max_steps, initial=state.global_step,
                                disable=not state.is_world_process_zero)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            now = time.perf_counter()
            self.step_s = now - self.last if self.step_s == 0 else 0.8 * self.step_s + 0.2 * (now - self.last)
            self.last = now
            self.bar.update(1)
            budget = s.cfg["time_budget_minutes"]
            if budget is not None and state.global_step < state.max_steps:
                short = torch.tensor([float(budget * 60 - (now - self.t0) < 3 * self.step_s + 5)], device=args.device)
                if torch.distributed.is_initialized():  # under torchrun every process stops at the same step
                    torch.distributed.all_reduce(short, op=torch.distributed.ReduceOp.MAX)
                if short.item():  # no room for one more step and a save
                    self.out_of_time = control.should_save = control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if self.bar is not None and logs:
                self.bar.update(0, **{k: v for k, v in logs.items() if k in ("loss", "eval_loss")})

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self.bar.close()

    class SampleAnswers(TrainerCallback):
        """At each evaluation, answer the fixed questions and log them as a W&B table."""

        def on_evaluate(self, args, state, control, **kwargs):  # noqa: ANN001
            import wandb

            table = wandb.Table(columns=["step", "question", "answer", "stopped"])
            for r in answer(s.model, s.tokenizer, s.cfg["questions"], s.cfg["max_new_tokens"]):
                table.add_data(state.global_step, r["question"], r["answer"], r["stopped"])
            wandb.log({"samples": table, "train/global_step": state.global_step})

    return [Watch(), *([SampleAnswers()] if s.cfg["wandb"] else [])]


def _trainer_class() -> type:
    from transformers import Trainer

    class AssistantLossTrainer(Trainer):
        """A Trainer whose ``eval_loss`` is :func:`assistant_loss` (token-weighted over every eval
        dialogue) rather than the mean of per-batch means, so the best checkpoint is chosen by the
        number the summary reports."""

        def __init__(self, *args: Any, setup: Setup, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.setup = setup

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:  # noqa: ANN001
            loss, bpb = self.setup.evaluate_loss(self.model)
            metrics = {f"{metric_key_prefix}_loss": loss}
            if bpb is not None:
                metrics[f"{metric_key_prefix}_bpb"] = bpb
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return AssistantLossTrainer


def training_arguments(s: Setup) -> Any:
    """The Trainer's arguments: eval and save every ``eval_steps``, best model kept, mixed precision on GPUs."""
    from transformers import TrainingArguments

    cfg, cuda = s.cfg, s.device.type == "cuda"
    half = machine.auto_dtype(s.device)
    # transformers 5.0 (Kaggle's image) calls it gradient_checkpointing; later 5.x renamed it
    # activation_checkpointing and warn on the old name.
    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"
    return TrainingArguments(
        output_dir=str(s.run_dir / "checkpoints"), max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch_size"], per_device_eval_batch_size=cfg["eval_batch_size"],
        gradient_accumulation_steps=cfg["grad_accum"], learning_rate=s.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=cfg["warmup_steps"], weight_decay=cfg["weight_decay"],
        eval_strategy="steps", eval_steps=cfg["eval_steps"], save_strategy="steps", save_steps=cfg["eval_steps"],
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        logging_steps=cfg["logging_steps"], report_to="wandb" if cfg["wandb"] else "none",
        run_name=f"{s.name}-seed-{s.seed}", disable_tqdm=True,
        **{ckpt: cfg["activation_checkpointing"], f"{ckpt}_kwargs": {"use_reentrant": False}},
        bf16=cuda and half == torch.bfloat16, fp16=cuda and half == torch.float16, use_cpu=not cuda,
        seed=s.seed, data_seed=s.seed, remove_unused_columns=False, dataloader_num_workers=0,
    )


def train(s: Setup) -> dict[str, Any]:
    """Train with the HF ``Trainer``: eval every ``eval_steps``, best model kept, resume from the
    last checkpoint; stop early with a checkpoint when ``time_budget_minutes`` runs out."""
    from transformers import TrainerState
    from transformers.trainer_utils import get_last_checkpoint

    cfg = s.cfg
    output_dir = s.run_dir / "checkpoints"
    last = get_last_checkpoint(str(output_dir)) if cfg["resume"] and output_dir.is_dir() else None
    if last and TrainerState.load_from_json(os.path.join(last, "trainer_state.json")).global_step >= cfg["steps"]:
        return _restore_finished(s, Path(last))  # resuming there, the Trainer would take one step too many
    if cfg["wandb"] and machine.rank() == 0:
        tracking.init_wandb(s.run_dir, f"{s.name}-seed-{s.seed}", cfg)
    callbacks = _callbacks(s)
    trainer = _trainer_class()(
        model=s.model, args=training_arguments(s), data_collator=Collator(s.tokenizer.pad_token_id),
        train_dataset=s.train_set, eval_dataset=s.val_set, processing_class=s.tokenizer, callbacks=callbacks,
        setup=s,
    )
    machine.reset_peak_memory(s.device)
    with warnings.catch_warnings():  # checkpoints keep the resized embedding; resuming needs nothing more
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`", category=UserWarning)
        result = trainer.train(resume_from_checkpoint=last)
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


def _restore_finished(s: Setup, last: Path) -> dict[str, Any]:
    """A run that already reached its steps: load the best weights (its checkpoint's, or once pruned,
    ``adapter/`` or ``merged/``) and the logged history.

    Throughput and peak memory come from ``checkpoints/trained.json`` (written as soon as training
    ends, so a kill while saving the outputs keeps it), else from the earlier summary, else they are ``None``:
    the Trainer saves ``trainer_state.json`` before it logs its closing row (runtime, samples/s),
    so the checkpoints do not hold them.
    """
    from safetensors.torch import load_file
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(last / "trainer_state.json"))
    best = last.parent / f"checkpoint-{state.best_global_step or state.global_step}"
    name = "adapter_model.safetensors" if s.lora else "model.safetensors"
    if not (best / name).is_file():  # pruned once finished: the saved output holds the best weights
        best = s.run_dir / ("adapter" if s.lora else "merged")
    if not (best / name).is_file():
        raise FileNotFoundError(
            f"{config.relative(best / name)} not found: the run finished, its checkpoints were pruned to what a rerun "
            "needs, and this output has gone since; pass resume=False to train it again"
        )
    if s.lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(s.model, load_file(best / name))
    else:
        result = s.model.load_state_dict(load_file(best / name), strict=False)
        if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:  # the tied head is not stored
            raise ValueError(f"{config.relative(best)} does not match the model: {result}")
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
    return {
        "name": s.name, "stage": "finetune", "variant": s.variant.name, "label": s.variant.label,
        "folder": config.relative(s.run_dir), "profile": s.cfg["profile"], "seed": s.seed, "config": s.cfg,
        "machine": machine.info(s.device), "data": s.data, "compute_dtype": compute_dtype(s.mode, s.device),
        "finished": finished, "stop_reason": reason, "wall_seconds": time.time() - s.started,
        "train_seconds": train_seconds, "peak_memory_bytes": peak,
    }


def save_outputs(s: Setup) -> tuple[Path | None, Path | None, str | None]:
    """Write ``adapter/`` (LoRA) and ``merged/`` (when ``merge``) atomically; returns them and what merged holds."""
    adapter = merged = weights = None
    if s.lora:
        s.model.peft_config["default"].base_model_name_or_path = s.cfg["base_model"]

        def save_adapter(d: Path) -> None:  # the trained token rows are in the adapter; the resized base is not needed
            s.model.save_pretrained(d, save_embedding_layers=False)
            s.tokenizer.save_pretrained(d)

        adapter = replace_dir(s.run_dir / "adapter", save_adapter)
        if s.cfg["merge"]:
            merged = merge(adapter, s.run_dir / "merged", s.cfg["base_model"])
            weights = "the adapter folded into a 32-bit copy of the base"
            if s.mode != "32bit":
                weights += f" (not into the {s.mode.replace('bit', '-bit')} base: merging into it would round)"
    elif s.cfg["merge"]:
        s.model.config.use_cache = True

        def save_full(d: Path) -> None:
            s.model.save_pretrained(d)
            s.tokenizer.save_pretrained(d)

        merged = replace_dir(s.run_dir / "merged", save_full)
        weights = "the fully fine-tuned weights (32-bit)"
    return adapter, merged, weights


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

        merged_loss, _ = s.evaluate_loss(AutoModelForCausalLM.from_pretrained(merged).to(s.device.torch))
    summary = runs.write_summary(s.run_dir, {
        **common, "mode": s.mode, "lora": s.lora, "baselines": list(s.variant.baselines),
        "base_model": s.cfg["base_model"], "learning_rate": s.learning_rate,
        "trainable_params": s.info["trainable_params"], "total_params": s.info["total_params"],
        "footprint_bytes": s.info["footprint_bytes"], "embedding_params": s.info["embedding_params"],
        "eval_loss": after["loss"], "eval_ppl": after["ppl"], "eval_bpb": after["bpb"],
        "base_eval_loss": before["loss"], "base_eval_ppl": before["ppl"], "base_eval_bpb": before["bpb"],
        "merged_eval_loss": merged_loss, "merged_weights": weights,
        "stop_rate_before": before["stop_rate"], "stop_rate_after": after["stop_rate"],
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
# reloading: adapter + base, merged model


def load_adapter(adapter_dir: str | os.PathLike, base_model: str | None = None, mode: str = "32bit") -> tuple[Any, Any]:
    """``(PeftModel, tokenizer)`` from a saved adapter on its base (from ``adapter_config.json`` unless given)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{config.relative(adapter_dir)} holds no adapter_config.json; run 05_finetune_lora_8bit with a LoRA variant"
        )
    peft_cfg = PeftConfig.from_pretrained(str(adapter_dir))
    tok = AutoTokenizer.from_pretrained(str(adapter_dir))
    model = load_base(base_model or peft_cfg.base_model_name_or_path, mode)
    if model.get_input_embeddings().weight.shape[0] < len(tok):  # rows for the markers; the adapter fills them
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    peft_cfg.fan_in_fan_out = _conv1d_targets(model, peft_cfg.target_modules)
    with _peft_reads_deprecated_alias():
        return PeftModel.from_pretrained(model, str(adapter_dir), config=peft_cfg), tok


def merge(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """Fold a LoRA adapter into a 32-bit copy of its base and save a standalone model folder (with tokenizer)."""
    model, tok = load_adapter(adapter_dir, base_model, "32bit")
    merged = model.merge_and_unload()
    merged.config.use_cache = True

    def save(d: Path) -> None:
        merged.save_pretrained(d)
        tok.save_pretrained(d)

    return replace_dir(Path(out_dir), save)


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

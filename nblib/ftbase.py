"""The base of a fine-tune: GPT-2 (hub name or local folder) loaded in a precision mode, its
tokenizer, and the two role markers added (``nblib.finetune`` re-exports these names)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from nblib import config, dialogue, machine, tokenizer
from nblib.files import owned, read_json, replace_dir
from nblib.tokenizer import EOT

MODES = ("8bit", "4bit", "16bit", "32bit")
QUANTIZED_BITS = {"8bit": 8, "4bit": 4}  # the modes bitsandbytes serves, by weight bits


def resolve_base(base_model: str) -> str:
    """A local model folder (absolute, or relative to the working root — never to the current
    directory) as a path; anything else is a hub name."""
    local = config.resolve(base_model)
    if (local / "config.json").is_file():
        return str(refuse_code(local).resolve())
    if base_model.startswith((".", "/", "~")) or base_model.count("/") > 1:  # hub ids are "name" or "owner/name"
        raise FileNotFoundError(
            f"base model folder {base_model!r} not found under the working root {config.home()}; run 03_train_mha "
            "(it exports runs/pretrain-mha/seed-<seed>/hf) or set base_model to a hub name such as 'gpt2'"
        )
    return base_model


# The files of a model folder whose ``auto_map`` asks ``from_pretrained`` for Python code shipped with the
# model (peft's ``auto_mapping`` names a transformers class, not code of the folder's).
CONFIG_FILES = ("config.json", "tokenizer_config.json", "adapter_config.json")


def refuse_code(folder: str | os.PathLike) -> Path:
    """``folder`` when none of its config files asks for code of its own; else ``SettingsError`` naming the
    file, before anything is loaded: a model folder is data here, and nblib runs no code that comes with one
    (every ``from_pretrained`` also passes ``trust_remote_code=False``)."""
    folder = Path(folder)
    for name in CONFIG_FILES:
        try:
            data = read_json(folder / name)
        except (OSError, ValueError):  # absent or unreadable: from_pretrained says what is wrong with it
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            raise config.SettingsError(
                f"{config.relative(folder / name)} asks for the model's own Python code (auto_map: {data['auto_map']!r}); "
                "nblib never runs code that comes with a model: use a folder that transformers' save_pretrained "
                "wrote for a model it knows (GPT-2)"
            )
    return folder


def random_base(folder: str | os.PathLike) -> Path:
    """Save a GPT-2-small-shaped model (124M, ``GPT2Config()``) with seeded random weights and GPT-2's
    tokenizer to ``folder`` (atomically, kept when already there): a base that needs no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    if not owned(folder):  # files but no model: not what this function wrote, so not its to replace
        raise config.Refused(f"{config.relative(folder)} holds files but no config.json; they are not "
                             "replaced by a random base model: move them away or name another folder")

    def write(d: Path) -> None:
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(d)
        tokenizer.hf_tokenizer().save_pretrained(d)

    return replace_dir(folder, write)


def load_tokenizer(base_model: str) -> Any:
    """The base model's tokenizer (hub name or local folder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base(base_model), trust_remote_code=False)


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
        model = AutoModelForCausalLM.from_pretrained(resolve_base(base_model), trust_remote_code=False, **kwargs)
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
    half, compute = machine.half_dtype(device), machine.half_compute(device)
    sixteen = name(half) if compute == half else f"{name(half)} storage, float32 compute (this CPU has no {name(half)} units)"
    return {"8bit": "int8 matmul, float16 inputs", "4bit": "nf4 weights, float32 compute",
            "16bit": sixteen, "32bit": "float32"}[mode]


class _AsFloat32(torch.nn.Module):
    """A parametrization: the stored 16-bit tensor, read as float32 wherever the layer uses it."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


def compute_in_float32(model: Any, device: machine.Device) -> int:
    """Where ``device`` cannot multiply the 16-bit base natively (:func:`nblib.machine.half_compute`),
    read each frozen 16-bit weight of ``model`` as float32 at use: stored in 16 bits (the footprint
    the variant is about), computed in 32. Returns how many tensors it did this for (0 elsewhere)."""
    from torch.nn.utils import parametrize

    if machine.half_compute(device) != torch.float32:
        return 0
    done = 0
    for module in list(model.modules()):
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dtype in (torch.bfloat16, torch.float16) and not p.requires_grad:
                parametrize.register_parametrization(module, name, _AsFloat32(), unsafe=True)
                done += 1
    return done


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


def count_params(model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameters (4-bit weights counted unpacked, tied weights once)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def token_row_params(model: Any) -> int:
    """Trained parameters that are embedding rows (peft ``trainable_token_indices``), not adapter matrices."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "trainable_tokens" in n)


def footprint(base_model: str, mode: str) -> int:
    """Bytes of weights and buffers of ``base_model`` loaded in ``mode``."""
    model = load_base(base_model, mode)
    size = model.get_memory_footprint()
    del model
    return size

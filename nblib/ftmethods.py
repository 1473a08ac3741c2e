"""Fine-tune methods and variants: the table the trainer, the pipeline, the profiles and the report read.

A :class:`Method` carries its behaviour: how it wraps the base and which rows train
(:meth:`Method.prepare`), its default learning rate, how it saves its outputs (:meth:`Method.save`)
and how a finished run's best weights are loaded back (:meth:`Method.load`). :data:`VARIANTS` pairs a
method with a base precision; adding a method (e.g. DoRA) is one :class:`Method` subclass and its
variants here. ``nblib.finetune`` re-exports these names.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from nblib import config
from nblib.files import replace_dir

# torch, peft and the tokenizer are imported where used: the pipeline reads this table without them


# ---------------------------------------------------------------------------------------------
# methods


@dataclass(frozen=True)
class Method:
    """A way to train a base: every weight (this class) or an adapter on a frozen base (:class:`Lora`)."""

    name: str
    lora: bool  # the summary's ``lora`` flag: an adapter on a frozen base
    lr_key: str  # the setting of its default learning rate (``learning_rate: null``)
    weights: str  # the weights file of a Trainer checkpoint, and of ``output``
    output: str  # the run folder's output that holds the best weights once the run finished

    def prepare(self, model: Any, cfg: dict[str, Any], tok: Any, token_ids: list[int], examples: list[dict],
                mode: str) -> Any:
        """The model to train from the base with the markers ``token_ids`` added (training ``examples``)."""
        return model

    def load(self, model: Any, folder: Path) -> None:
        """Load the trained weights ``folder`` holds into ``model`` (as :meth:`prepare` made it)."""
        from safetensors.torch import load_file

        result = model.load_state_dict(load_file(folder / self.weights), strict=False)
        if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:  # the tied head is not stored
            raise ValueError(f"{config.relative(folder)} does not match the model: {result}")

    def save(self, model: Any, tok: Any, run_dir: Path, cfg: dict[str, Any],
             mode: str) -> tuple[Path | None, Path | None, str | None]:
        """Write the outputs atomically: ``(adapter/ or None, merged/ or None, what merged holds)``."""
        if not cfg["merge"]:
            return None, None, None
        model.config.use_cache = True

        def save_full(d: Path) -> None:
            model.save_pretrained(d)
            tok.save_pretrained(d)

        return None, replace_dir(run_dir / "merged", save_full), "the fully fine-tuned weights (32-bit)"


@dataclass(frozen=True)
class Lora(Method):
    """LoRA (peft) on ``lora_targets``, plus trainable embedding rows: the markers', ``<|endoftext|>``'s
    (it now closes every answer) and those of the ``lora_answer_rows`` most frequent answer tokens."""

    def prepare(self, model: Any, cfg: dict[str, Any], tok: Any, token_ids: list[int], examples: list[dict],
                mode: str) -> Any:
        from nblib.tokenizer import EOT

        rows = [*token_ids, tok.convert_tokens_to_ids(EOT)]
        return wrap_lora(model, cfg, rows + frequent_answer_tokens(examples, cfg["lora_answer_rows"], rows), mode)

    def load(self, model: Any, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(folder / self.weights))

    def save(self, model: Any, tok: Any, run_dir: Path, cfg: dict[str, Any],
             mode: str) -> tuple[Path | None, Path | None, str | None]:
        model.peft_config["default"].base_model_name_or_path = cfg["base_model"]

        def save_adapter(d: Path) -> None:  # the trained token rows are in the adapter; the resized base is not needed
            model.save_pretrained(d, save_embedding_layers=False)
            tok.save_pretrained(d)

        adapter = replace_dir(run_dir / "adapter", save_adapter)
        if not cfg["merge"]:
            return adapter, None, None
        weights = "the adapter folded into a 32-bit copy of the base"
        if mode != "32bit":
            weights += f" (not into the {mode.replace('bit', '-bit')} base: merging into it would round)"
        return adapter, merge(adapter, run_dir / "merged", cfg["base_model"]), weights


METHODS: dict[str, Method] = {m.name: m for m in (
    Lora("lora", True, "lora_lr", "adapter_model.safetensors", "adapter"),
    Method("full", False, "full_lr", "model.safetensors", "merged"),
)}


# ---------------------------------------------------------------------------------------------
# variants: a method on a base precision


@dataclass(frozen=True)
class Variant:
    """One way to fine-tune: base precision, method, what the report compares it with, and whether
    the pipeline runs it."""

    name: str
    label: str
    mode: str
    method: Method
    baselines: tuple[str, ...]
    pipeline: bool = False

    @property
    def lora(self) -> bool:
        return self.method.lora


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("lora-8bit", "LoRA + 8-bit", "8bit", METHODS["lora"], ("full", "lora-16bit", "lora-32bit"), pipeline=True),
    Variant("lora-4bit", "LoRA + 4-bit", "4bit", METHODS["lora"], ("full", "lora-32bit")),
    Variant("lora-16bit", "LoRA + 16-bit", "16bit", METHODS["lora"], ("full", "lora-32bit"), pipeline=True),
    Variant("lora-32bit", "LoRA + 32-bit", "32bit", METHODS["lora"], ("full",), pipeline=True),
    Variant("full", "Full fine-tune", "32bit", METHODS["full"], (), pipeline=True),
)}
PIPELINE = tuple(v.name for v in VARIANTS.values() if v.pipeline)  # the variants the pipeline runs and compares


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


# ---------------------------------------------------------------------------------------------
# LoRA with peft


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
    """The base wrapped with LoRA (k-bit bases prepared first); trainable parameters kept in fp32;
    a 16-bit base computed in fp32 on a CPU without 16-bit units (:func:`nblib.ftbase.compute_in_float32`)."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    from nblib import machine
    from nblib.ftbase import compute_in_float32

    if mode in ("8bit", "4bit"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with _peft_reads_deprecated_alias():
        model = get_peft_model(model, lora_config(cfg, model, token_ids))
    for p in model.parameters():  # optimiser state and fp16 grad scaling want fp32 trainables
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    device = next(model.parameters()).device
    if mode == "16bit" and device.type == "cpu":
        compute_in_float32(model, machine.detect("cpu"))
    return model



def frequent_answer_tokens(examples: list[dict], k: int, exclude: Sequence[int] = ()) -> list[int]:
    """The ``k`` token ids most frequent among the training labels (answer tokens), ``exclude`` left out."""
    counts = Counter(t for ex in examples for t in ex["labels"] if t != -100 and t not in exclude)
    return [t for t, _ in counts.most_common(k)]


def load_adapter(adapter_dir: str | os.PathLike, base_model: str | None = None, mode: str = "32bit") -> tuple[Any, Any]:
    """``(PeftModel, tokenizer)`` from a saved adapter on its base (from ``adapter_config.json`` unless given)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    from nblib.ftbase import load_base, refuse_code

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{config.relative(adapter_dir)} holds no adapter_config.json; run 05_finetune_lora_8bit with a LoRA variant"
        )
    refuse_code(adapter_dir)
    peft_cfg = PeftConfig.from_pretrained(str(adapter_dir), trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=False)
    model = load_base(base_model or peft_cfg.base_model_name_or_path, mode)
    if model.get_input_embeddings().weight.shape[0] < len(tok):  # rows for the markers; the adapter fills them
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    peft_cfg.fan_in_fan_out = _conv1d_targets(model, peft_cfg.target_modules)
    with _peft_reads_deprecated_alias():
        return PeftModel.from_pretrained(model, str(adapter_dir), config=peft_cfg, trust_remote_code=False), tok


def merge(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """Fold a LoRA adapter into a 32-bit copy of its base and save a standalone model folder (with tokenizer)."""
    model, tok = load_adapter(adapter_dir, base_model, "32bit")
    merged = model.merge_and_unload()
    merged.config.use_cache = True

    def save(d: Path) -> None:
        merged.save_pretrained(d)
        tok.save_pretrained(d)

    return replace_dir(Path(out_dir), save)

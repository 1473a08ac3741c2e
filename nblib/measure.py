"""Timing and memory of models, measured side by side in one process.

The machine this suite runs on is shared and noisy, so every figure here is taken with the
variants interleaved (repeat ``i`` runs A B, repeat ``i + 1`` runs B A), after an untimed
warm-up, and reported per repeat so tables can show the median and its range. Used by the
compare stage and by the benchmarks in ``benchmarks/``.
"""
from __future__ import annotations

import tempfile
import time
from typing import Any, Iterable, Sequence

import pandas as pd
import torch

from nblib import machine, runs, tokenizer
from nblib.model import GPT, GPTConfig, load_checkpoint


def _order(labels: list[str], repeat: int) -> list[str]:
    return labels if repeat % 2 == 0 else labels[::-1]


# ---------------------------------------------------------------------------------------------
# the trained checkpoints


def load_models(groups: dict[str, Any], device: str = "auto") -> dict[str, GPT]:
    """The first seed's ``best.pt`` of each pretraining group (``label -> Group``), for inference."""
    dev = machine.detect(device).torch
    models = {}
    for label, group in groups.items():
        run = group.runs[0]
        rel = run.summary["checkpoint"]
        path = run.folder.parents[2] / rel
        if not path.is_file():
            raise runs.RunError(
                f"{run.summary['folder']}: the checkpoint named in summary.json ({rel}) is missing: "
                f"re-run notebook {runs.producer(group.name)} to write it"
            )
        model, _ = load_checkpoint(path, dev)
        models[label] = model.eval()
    return models


def _time_generate(model: GPT, idx: torch.Tensor, new_tokens: int) -> float:
    """Seconds for one greedy generation with the KV cache (prefill included)."""
    machine.sync(idx.device)
    t0 = time.perf_counter()
    model.generate(idx, new_tokens, temperature=0.0, use_cache=True)
    machine.sync(idx.device)
    return time.perf_counter() - t0


@torch.inference_mode()
def generation(models: dict[str, GPT], prompt: str, batch_sizes: Iterable[int] = (1, 8), new_tokens: int = 32,
               repeats: int = 5) -> pd.DataFrame:
    """Greedy generation speed with the KV cache, every model at every batch size, interleaved.

    One row per timing: ``variant, batch, repeat, seconds, tokens_per_s, cache_tokens,
    cache_bytes`` (bytes of a real cache for ``batch x cache_tokens``, the prompt plus the new
    tokens) and, on CUDA, ``peak_memory_bytes``.
    """
    from tqdm.auto import tqdm

    ids = tokenizer.get_encoding().encode_ordinary(prompt)
    for label, model in models.items():
        room = model.config.context_length - len(ids)
        if new_tokens > room:
            raise ValueError(
                f"gen_new_tokens={new_tokens} does not fit {label}'s context: the prompt is {len(ids)} tokens "
                f"and the context {model.config.context_length}; use gen_new_tokens <= {room} or a shorter speed_prompt"
            )
    batch_sizes, labels, rows = list(batch_sizes), list(models), []
    for batch in batch_sizes:
        for model in models.values():
            _time_generate(model, torch.tensor([ids] * batch, device=next(model.parameters()).device), new_tokens)
    for rep in tqdm(range(repeats), desc="generation speed", unit="repeat"):
        for batch in batch_sizes:
            for label in _order(labels, rep):
                model = models[label]
                device = next(model.parameters()).device
                machine.reset_peak_memory(device)
                seconds = _time_generate(model, torch.tensor([ids] * batch, device=device), new_tokens)
                row = {"variant": label, "batch": batch, "repeat": rep, "seconds": seconds,
                       "tokens_per_s": batch * new_tokens / seconds, "cache_tokens": len(ids) + new_tokens,
                       "cache_bytes": model.kv_cache_bytes(batch, len(ids) + new_tokens, next(model.parameters()).dtype)}
                if device.type == "cuda":
                    row["peak_memory_bytes"] = machine.peak_memory(device)
                rows.append(row)
    return pd.DataFrame(rows)


@torch.inference_mode()
def sample_generations(models: dict[str, GPT], prompts: Iterable[str], max_new_tokens: int = 40,
                       temperature: float = 0.8, top_k: int | None = 40, seed: int = 1337) -> pd.DataFrame:
    """Continuations of the same prompts by every model, same seed per prompt (rows: prompts)."""
    enc = tokenizer.get_encoding()
    prompts = list(prompts)
    table: dict[str, list[str]] = {}
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


def training_steps(configs: dict[str, dict[str, Any]], steps: int = 3, repeats: int = 3,
                   device: str = "auto", seed: int = 0) -> pd.DataFrame:
    """Training tokens/s of each variant (``label -> train settings``), timed side by side here.

    Each variant's model is built fresh from its settings (random weights, random tokens: speed
    does not depend on values) and takes ``steps`` AdamW steps of one micro-batch of
    ``batch_size x context_length`` per repeat, after one untimed warm-up step; repeats alternate
    the order. One row per variant and repeat: ``variant, repeat, seconds, tokens_per_s``.
    """
    from nblib.train import configure_optimizer, model_config

    dev = machine.detect(device)
    policies, setups = {}, {}
    for label, cfg in configs.items():
        torch.manual_seed(seed)
        model = GPT(model_config(cfg)).to(dev.torch).train()
        policy = machine.policy(cfg["dtype"], False, dev)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randint(0, model.config.vocab_size, (cfg["batch_size"], cfg["context_length"] + 1), generator=gen).to(dev.torch)
        setups[label] = (model, configure_optimizer(model, cfg, dev.torch), x[:, :-1], x[:, 1:], policy.grad_scaler())
        policies[label] = policy

    def step(label: str) -> None:
        model, opt, x, y, scaler = setups[label]
        with policies[label].autocast_context():
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for label in setups:
        step(label)
    rows, labels = [], list(setups)
    for rep in range(repeats):
        for label in _order(labels, rep):
            machine.sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(label)
            machine.sync(dev)
            seconds = time.perf_counter() - t0
            x = setups[label][2]
            rows.append({"variant": label, "repeat": rep, "seconds": seconds, "tokens_per_s": steps * x.numel() / seconds})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# fine-tuning cost at GPT-2 small's shape


def finetune_cost(cfg: dict[str, Any], variants: Sequence[str], steps: int = 2, batch_size: int | None = None,
                  length: int | None = None, device: str = "auto") -> pd.DataFrame:
    """What each fine-tune variant costs on a GPT-2-small-shaped model (random init, built here,
    no download): the base's footprint as loaded, trainable and total parameters, and the peak
    memory of ``steps`` training steps of ``batch_size x length`` tokens (default: the settings').

    One column per variant; rows ``footprint_mib``, ``trainable_params``, ``total_params``,
    ``peak_memory_mib``, ``step_seconds``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from nblib import finetune
    from nblib.tokenizer import hf_tokenizer

    dev = machine.detect(device)
    batch_size, length = batch_size or cfg["batch_size"], length or cfg["max_length"]
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="nblib-gpt2-small-") as tmp:
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(tmp)
        hf_tokenizer().save_pretrained(tmp)
        for name in variants:
            v = finetune.variant(name)
            model = finetune.load_base(tmp, v.mode, dev)
            tok = finetune.load_tokenizer(tmp)
            ids = finetune.add_special_tokens(model, tok)
            if v.lora:
                model = finetune.wrap_lora(model, cfg, [*ids, tok.eos_token_id], v.mode)
            trainable, total = finetune.count_params(model)
            footprint = model.get_memory_footprint()
            out[v.label] = {"footprint_mib": footprint / 2**20, "trainable_params": trainable, "total_params": total,
                            **_train_peak(model, dev, batch_size, length, steps)}
            del model
    table = pd.DataFrame(out)
    table.index.name = "metric"
    table.attrs["note"] = (f"GPT-2 small (124M, random init) on {dev.name}: {steps} training steps of {batch_size} x "
                           f"{length} tokens per variant, AdamW on the trainable parameters; peak memory of the steps alone.")
    return table


def _train_peak(model: Any, dev: machine.Device, batch_size: int, length: int, steps: int) -> dict[str, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    x = torch.randint(0, 50257, (batch_size, length), generator=torch.Generator().manual_seed(0)).to(dev.torch)
    policy = machine.policy("auto", False, dev)
    model.train()
    machine.reset_peak_memory(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        with policy.autocast_context():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    machine.sync(dev)
    return {"peak_memory_mib": machine.peak_memory(dev) / 2**20, "step_seconds": (time.perf_counter() - t0) / steps}


def bench_shapes() -> dict[str, GPTConfig]:
    """The real shapes the compare stage measures cost at (MHA widths; variants change ``n_kv_head``)."""
    return {
        "full": GPTConfig(n_layer=8, n_head=8, n_kv_head=8, d_model=512, context_length=4096),
        "gpt2-small": GPTConfig(n_layer=12, n_head=12, n_kv_head=12, d_model=768, context_length=4096),
    }


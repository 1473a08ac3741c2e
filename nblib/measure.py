"""Inference cost: prefill and decode timing, KV-cache and weight bytes, memory bandwidth, MBU.

A shared machine speeds up and slows down, so variants are always measured interleaved (A B C,
then C B A, ...) in one process and each figure is the median of the repeats; on CUDA every
timing synchronises the device. A decode step must read every weight once and the whole filled
KV cache; those bytes over the step's time, as a fraction of the memory bandwidth, are the model
bandwidth utilisation (MBU, nanochat's term). The bandwidth is the GPU's spec sheet figure where
known, else a measured copy (bytes read + bytes written per second, as STREAM counts them).

Speed does not depend on the weights' values, so the sweeps use randomly initialised models.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any, Callable

import pandas as pd
import torch

from nblib.model import GPT, GPTConfig, KVCache

# Peak memory bandwidth from NVIDIA's spec sheets, GB/s, matched in order against the device name.
GPU_BANDWIDTH_GBPS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM (HBM3)
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("T4", 320.0),
    ("V100", 900.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU), so a timer measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that has it, else fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 1) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time each of ``runs`` ``repeats`` times, the order reversed every other round, after ``warmup`` untimed rounds.

    Returns the seconds of every timed call per run and each run's last result.
    """
    labels = list(runs)
    times: dict[str, list[float]] = {label: [] for label in labels}
    results: dict[str, Any] = {}
    for rep in range(warmup + repeats):
        for label in labels if rep % 2 == 0 else labels[::-1]:
            sync(device)
            t0 = time.perf_counter()
            results[label] = runs[label]()
            sync(device)
            if rep >= warmup:
                times[label].append(time.perf_counter() - t0)
    return times, results


def copy_bandwidth(device: torch.device | str = "cpu", nbytes: int = 256 * 2**20, repeats: int = 9) -> float:
    """Measured memory bandwidth, bytes/s: a ``nbytes`` tensor copy counts its bytes read plus written."""
    device = torch.device(device)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times, _ = interleaved({"copy": lambda: dst.copy_(src)}, repeats, device)
    return 2 * src.nbytes / statistics.median(times["copy"])


def spec_bandwidth(gpu_name: str) -> float | None:
    """Spec-sheet memory bandwidth of a GPU named like ``torch.cuda.get_device_name``, bytes/s, or ``None``."""
    for key, gbps in GPU_BANDWIDTH_GBPS:
        if key in gpu_name:
            return gbps * 1e9
    return None


def peak_bandwidth(device: torch.device | str = "cpu") -> tuple[float, str]:
    """``(bytes/s, source)``: a known GPU's spec sheet figure, else :func:`copy_bandwidth` measured here."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = spec_bandwidth(name)
        if spec is not None:
            return spec, f"{name} spec sheet"
        return copy_bandwidth(device, nbytes=2**30), f"{name} measured copy"
    return copy_bandwidth(device), "measured copy"


def weight_bytes(model: GPT) -> int:
    """Bytes of the weights one decode step reads: all but the position table (and, untied, the
    input table), of which it reads one row per sequence."""
    t = model.transformer
    skipped = t.wpe.weight.numel() + (0 if model.config.tie_embeddings else t.wte.weight.numel())
    ref = model.lm_head.weight
    return (model.num_params() - skipped) * ref.dtype.itemsize


def decode_step_bytes(model: GPT, batch: int, cache_len: float) -> float:
    """Bytes a decode step must read: the weights plus K/V of ``cache_len`` positions per sequence."""
    dtype = model.lm_head.weight.dtype
    return weight_bytes(model) + model.config.kv_cache_bytes(batch, 1, dtype) * cache_len


def attention_variants(n_layer: int, n_head: int, d_model: int, kv_heads: dict[str, int], **config: Any) -> dict[str, GPTConfig]:
    """One config per label of ``kv_heads`` (label -> ``n_kv_head``), all else equal, e.g.
    ``attention_variants(8, 8, 512, {"MHA": 8, "GQA": 2, "MQA": 1})``."""
    return {
        label: GPTConfig(n_layer=n_layer, n_head=n_head, n_kv_head=n_kv, d_model=d_model, **{"dropout": 0.0, **config})
        for label, n_kv in kv_heads.items()
    }


def random_model(config: GPTConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> GPT:
    """A GPT with GPT-2's random initialisation, in eval mode, on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    return GPT(config).to(device=device, dtype=dtype).eval()


def prefill(model: GPT, prompt: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed ``prompt`` into an emptied ``cache``; returns the greedy next token, ``[B, 1]``."""
    cache.reset()
    logits, _ = model(prompt, cache=cache, last_only=True)
    return logits[:, -1].argmax(-1, keepdim=True)


def decode(model: GPT, cache: KVCache, token: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy decode steps from ``token`` (``[B, 1]``), appending to ``cache``; returns the last token."""
    for _ in range(steps):
        logits, _ = model(token, cache=cache, last_only=True)
        token = logits[:, -1].argmax(-1, keepdim=True)
    return token


def decode_sweep(
    variants: dict[str, GPTConfig],
    batches: list[int],
    contexts: list[int],
    new_tokens: int = 16,
    repeats: int = 3,
    prefill_repeats: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    bandwidth: tuple[float, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Prefill time, decode speed, KV-cache bytes and MBU for every variant x batch x context.

    Each model (random weights, ``context_length = max(contexts)``) gets a prompt of
    ``context - new_tokens`` random tokens, then ``new_tokens`` greedy decode steps, so the last
    step attends over ``context`` positions. For each batch x context the variants' caches are
    allocated side by side and measured interleaved: the prefill on the first ``prefill_repeats``
    rounds, the decode on all ``repeats`` (restarted at the end of the prompt each time).
    ``dtype`` defaults to bf16 on a GPU, fp32 on CPU; ``bandwidth`` (bytes/s, source) to
    :func:`peak_bandwidth`. One row per variant x batch x context; the bandwidth used is in
    ``df.attrs``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    if not 1 <= prefill_repeats <= repeats:
        raise ValueError(f"prefill_repeats must be in [1, repeats={repeats}], got {prefill_repeats}")
    if min(contexts) <= new_tokens:
        raise ValueError(f"every context must exceed new_tokens={new_tokens} (the prompt is context - new_tokens)")
    peak, source = bandwidth or peak_bandwidth(device)
    models = {label: random_model(replace(c, context_length=max(contexts)), device, dtype) for label, c in variants.items()}
    labels = list(models)
    vocab = min(c.vocab_size for c in variants.values())
    rows = []
    with torch.inference_mode():
        for model in models.values():  # warm up the code paths once
            cache = model.new_cache(1, min(contexts))
            warm = torch.zeros(1, min(contexts) - new_tokens, dtype=torch.long, device=device)
            decode(model, cache, prefill(model, warm, cache), new_tokens)
        for batch in batches:
            for context in contexts:
                prompt_len = context - new_tokens
                prompt = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(context)).to(device)
                caches = {label: m.new_cache(batch, context) for label, m in models.items()}
                first: dict[str, torch.Tensor] = {}
                prefill_s: dict[str, list[float]] = {label: [] for label in labels}
                decode_s: dict[str, list[float]] = {label: [] for label in labels}
                for rep in range(repeats):
                    for label in labels if rep % 2 == 0 else labels[::-1]:
                        model, cache = models[label], caches[label]
                        if rep < prefill_repeats:
                            sync(device)
                            t0 = time.perf_counter()
                            first[label] = prefill(model, prompt, cache)
                            sync(device)
                            prefill_s[label].append(time.perf_counter() - t0)
                        cache.length = prompt_len
                        sync(device)
                        t0 = time.perf_counter()
                        decode(model, cache, first[label], new_tokens)
                        sync(device)
                        decode_s[label].append(time.perf_counter() - t0)
                for label in labels:
                    model, c = models[label], models[label].config
                    step_s = statistics.median(decode_s[label]) / new_tokens
                    step_bytes = decode_step_bytes(model, batch, prompt_len + (new_tokens + 1) / 2)
                    rows.append({
                        "variant": label, "n_layer": c.n_layer, "n_head": c.n_head, "n_kv_head": c.n_kv_head,
                        "d_model": c.d_model, "batch": batch, "context": context, "new_tokens": new_tokens,
                        "prefill_s": statistics.median(prefill_s[label]),
                        "decode_tokens_per_s": batch / step_s,
                        "ms_per_token": 1e3 * step_s,
                        "kv_cache_bytes": caches[label].nbytes,
                        "bytes_per_step": step_bytes,
                        "bandwidth_GBps": step_bytes / step_s / 1e9,
                        "mbu": step_bytes / step_s / peak,
                        "device": device.type, "dtype": str(dtype).removeprefix("torch."),
                    })
                    if log is not None:
                        r = rows[-1]
                        log(f"{label} batch {batch} context {context}: prefill {r['prefill_s']:.2f} s, "
                            f"{r['decode_tokens_per_s']:,.0f} tok/s, MBU {r['mbu']:.2f}")
                del caches
    df = pd.DataFrame(rows)
    df.attrs.update(peak_bandwidth_GBps=peak / 1e9, bandwidth_source=source)
    return df

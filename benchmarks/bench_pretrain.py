"""Pretraining benchmarks: figures measured side by side, printed as tables with ratios.

    python benchmarks/bench_pretrain.py [--quick] [--reps N] [--only 1,2,...]

1. Training throughput (tokens/s) of nblib's GPT against a textbook GPT written below (explicit
   mask, manual softmax, ``repeat_interleave`` K/V, hand-written LayerNorm and GELU), same
   weights, same batches, runs interleaved, for MHA and GQA.
2. Greedy generation of 256 tokens: KV cache against full recomputation (same tokens checked).
3. KV-cache bytes per token and per sequence, MHA vs GQA vs MQA, at context 256/1024/4096.
4. Tokenising the 116-work Machado collection (``$NBLIB_MIRROR/machado``): batch vs one by one.
5. With a CUDA GPU only: tokens/s, MFU and peak memory of the full-profile and gpt2-small
   configs, fp16 and bf16, with and without ``torch.compile``.
6. On the CPU: training tokens/s in fp32 against bf16 autocast, interleaved (why
   ``nblib.machine`` keeps CPUs in fp32).
7. nblib's training step against nanoGPT's own ``model.py`` (``--nanogpt PATH`` or ``$NBLIB_NANOGPT``;
   else downloaded from GitHub at a pinned commit, never kept in this repository): same weights, batch,
   context, width and dtype, interleaved, for each ``--chunk-rows`` of nblib's LM-head loss; ends with
   a JSON line. ``--shape smoke|full`` (``--context``, ``--batch-size`` override).

Sizes are the ``full`` training profile's (8 layers x 8 heads x 512) unless ``--quick``.
Sections 1-2 run on the GPU when there is one (bf16 training where supported), else the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F

from nblib import config, loss, machine, optim, train
from nblib.model import GPT, GPTConfig, KVCache


# ---------------------------------------------------------------------------------------------
# the textbook baseline: same parameters and names as nblib.model.GPT, so it loads its weights


class TextbookLayerNorm(nn.Module):
    def __init__(self, d: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        y = (x - mean) / torch.sqrt(var + 1e-5) * self.weight
        return y + self.bias if self.bias is not None else y


def textbook_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class TextbookAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c = c
        self.c_attn = nn.Linear(c.d_model, (c.n_head + 2 * c.n_kv_head) * c.head_dim, bias=c.bias)
        self.c_proj = nn.Linear(c.d_model, c.d_model, bias=c.bias)
        self.register_buffer("mask", torch.tril(torch.ones(c.context_length, c.context_length)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, (B, T, C) = self.c, x.shape
        q, k, v = self.c_attn(x).split([c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim], 2)
        q = q.view(B, T, c.n_head, c.head_dim).transpose(1, 2)
        k = k.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2).repeat_interleave(c.n_head // c.n_kv_head, dim=1)
        v = v.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2).repeat_interleave(c.n_head // c.n_kv_head, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c.head_dim)
        att = att.masked_fill(self.mask[:T, :T] == 0, float("-inf"))
        att = torch.exp(att - att.amax(dim=-1, keepdim=True))
        att = att / att.sum(dim=-1, keepdim=True)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class TextbookBlock(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = TextbookLayerNorm(c.d_model, c.bias), TextbookAttention(c)
        self.ln_2 = TextbookLayerNorm(c.d_model, c.bias)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(c.d_model, 4 * c.d_model, bias=c.bias),
                                      c_proj=nn.Linear(4 * c.d_model, c.d_model, bias=c.bias)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp.c_proj(textbook_gelu(self.mlp.c_fc(self.ln_2(x))))


class TextbookGPT(nn.Module):
    """GPT-2 as a textbook writes it; no dropout (benchmarks run without), no KV cache."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.d_model), wpe=nn.Embedding(c.context_length, c.d_model),
            h=nn.ModuleList(TextbookBlock(c) for _ in range(c.n_layer)), ln_f=TextbookLayerNorm(c.d_model, c.bias)))
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1)) if targets is not None else None
        return logits, loss


# ---------------------------------------------------------------------------------------------
# helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(rows: list[dict], title: str) -> None:
    print(f"\n## {title}\n")
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    print(" | ".join(k.ljust(widths[k]) for k in keys))
    print("-|-".join("-" * widths[k] for k in keys))
    for r in rows:
        print(" | ".join(str(r[k]).ljust(widths[k]) for k in keys))


def bench_config(quick: bool, n_kv_head: int, context_length: int | None = None) -> GPTConfig:
    cfg = config.settings("train", "full")
    sizes = dict(n_layer=2, n_head=4, d_model=128, context_length=128) if quick else {
        k: cfg[k] for k in ("n_layer", "n_head", "d_model", "context_length")}
    if context_length is not None:
        sizes["context_length"] = context_length
    return GPTConfig(n_kv_head=n_kv_head, dropout=0.0, **sizes)


# ---------------------------------------------------------------------------------------------
# 1. training throughput vs the textbook model


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> None:
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_training(quick: bool, reps: int, batch_size: int, device: torch.device) -> None:
    # bf16 where the GPU has it (no grad scaler needed for a throughput measurement), else fp32
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0) else torch.float32
    rows = []
    for n_kv_head, label in ((8 if not quick else 4, "MHA"), (2, "GQA")):
        c = bench_config(quick, n_kv_head)
        torch.manual_seed(0)
        ours = GPT(c).to(device)
        book = TextbookGPT(c).to(device)
        book.load_state_dict(ours.state_dict())
        x = torch.randint(0, c.vocab_size, (batch_size, c.context_length), generator=torch.Generator().manual_seed(1)).to(device)
        y = torch.roll(x, -1, 1)
        with torch.no_grad():
            diff = (ours(x, y)[0] - book(x, y)[0]).abs().max().item()
        opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (ours, book)}
        times: dict[nn.Module, list[float]] = {ours: [], book: []}
        for rep in range(reps + 1):  # rep 0 warms up
            for m in (ours, book) if rep % 2 == 0 else (book, ours):
                sync(device)
                t0 = time.perf_counter()
                train_step(m, opts[m], x, y, dtype)
                sync(device)
                if rep:
                    times[m].append(time.perf_counter() - t0)
        tokens = batch_size * c.context_length
        t_ours, t_book = statistics.median(times[ours]), statistics.median(times[book])
        rows.append({"attention": f"{label} ({c.n_head}q/{c.n_kv_head}kv)", "tokens/step": tokens,
                     "nblib tok/s": f"{tokens / t_ours:,.0f}", "textbook tok/s": f"{tokens / t_book:,.0f}",
                     "speed-up": f"{t_book / t_ours:.2f}x", "max |logit diff|": f"{diff:.1e}"})
    c = bench_config(quick, 2)
    where = f"{torch.cuda.get_device_name(device)} {str(dtype).removeprefix('torch.')}" if device.type == "cuda" else "CPU fp32"
    table(rows, f"1. Training throughput, {where}, {c.n_layer}x{c.d_model}, context {c.context_length}, batch "
                f"{batch_size}, fwd+bwd+AdamW, median of {reps} interleaved steps")


# ---------------------------------------------------------------------------------------------
# 2. generation with and without the KV cache


def bench_generation(quick: bool, new_tokens: int, reps: int, device: torch.device) -> None:
    prompt_len = 16
    models = {}
    for n_kv_head, label in ((8 if not quick else 4, "MHA"), (2, "GQA")):
        c = bench_config(quick, n_kv_head, context_length=prompt_len + new_tokens)
        torch.manual_seed(0)
        models[f"{label} ({c.n_head}q/{c.n_kv_head}kv)"] = GPT(c).to(device).eval()
    prompt = torch.randint(0, 50257, (1, prompt_len), generator=torch.Generator().manual_seed(2)).to(device)
    runs = [(label, use_cache) for label in models for use_cache in (True, False)]
    outs, times = {}, {run: [] for run in runs}
    for model in models.values():
        model.generate(prompt, 4, temperature=0)  # warm-up
    for rep in range(reps):  # every (model, mode) once per repetition, order reversed every other one
        for label, use_cache in runs if rep % 2 == 0 else runs[::-1]:
            sync(device)
            t0 = time.perf_counter()
            outs[label, use_cache] = models[label].generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
            sync(device)
            times[label, use_cache].append(time.perf_counter() - t0)
    rows = []
    for label in models:
        t_cache, t_full = statistics.median(times[label, True]), statistics.median(times[label, False])
        rows.append({"attention": label, "KV cache tok/s": f"{new_tokens / t_cache:,.1f}",
                     "recompute tok/s": f"{new_tokens / t_full:,.1f}", "speed-up": f"{t_full / t_cache:.1f}x",
                     "same tokens": bool(torch.equal(outs[label, True], outs[label, False]))})
    c = next(iter(models.values())).config
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table(rows, f"2. Greedy generation of {new_tokens} tokens after a {prompt_len}-token prompt, batch 1, {where} fp32, "
                f"{c.n_layer}x{c.d_model}, median of {reps} interleaved runs")


# ---------------------------------------------------------------------------------------------
# 3. KV-cache memory


def bench_kv_cache(quick: bool) -> None:
    rows = []
    base = bench_config(quick, 1)
    for n_kv_head, label in ((base.n_head, "MHA"), (2, "GQA"), (1, "MQA")):
        row = {"attention": f"{label} ({base.n_head}q/{n_kv_head}kv)"}
        for ctx in (256, 1024, 4096):
            c = GPTConfig(n_layer=base.n_layer, n_head=base.n_head, n_kv_head=n_kv_head, d_model=base.d_model, context_length=ctx)
            if ctx == 256:
                row["bytes/token fp32"] = f"{c.kv_cache_bytes(1, 1, torch.float32):,}"
                row["bytes/token fp16"] = f"{c.kv_cache_bytes(1, 1, torch.float16):,}"
            allocated = KVCache(c, 1, ctx, torch.device("cpu"), torch.float16).nbytes
            assert allocated == c.kv_cache_bytes(1, ctx, torch.float16)
            row[f"ctx {ctx} fp16"] = f"{allocated / 2**20:.2f} MiB"
        row["vs MHA"] = f"{n_kv_head / base.n_head:.3f}"
        rows.append(row)
    table(rows, f"3. KV cache per sequence (batch 1), {base.n_layer} layers, d_model {base.d_model}, head_dim "
                f"{base.head_dim}; sizes measured on allocated caches")


# ---------------------------------------------------------------------------------------------
# 4. tokenisation


def bench_tokenisation() -> None:
    from nblib import tokenizer

    root = config.mirror()
    if root is None or not (root / "machado").is_dir():
        print("\n## 4. Tokenisation: skipped (set NBLIB_MIRROR to a folder with machado/)")
        return
    texts = [p.read_text(encoding="utf-8") for p in sorted((root / "machado").glob("*/*.txt"))]
    enc = tokenizer.get_encoding()
    enc.encode_ordinary(texts[0][:1000])
    t0 = time.perf_counter()
    batch = enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [enc.encode_ordinary(t) for t in texts]
    t_single = time.perf_counter() - t0
    assert batch == single
    n = sum(map(len, batch))
    table([{"works": len(texts), "MB": f"{sum(map(len, texts)) / 1e6:.1f}", "tokens": f"{n:,}",
            "batch s": f"{t_batch:.2f}", "one-by-one s": f"{t_single:.2f}", "batch tok/s": f"{n / t_batch:,.0f}",
            "speed-up": f"{t_single / t_batch:.2f}x"}],
          f"4. Tokenising the Machado collection, {os.cpu_count()} CPU threads")


# ---------------------------------------------------------------------------------------------
# 5. GPU throughput and MFU


def scaled_step(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: torch.Tensor,
                y: torch.Tensor, dtype: torch.dtype) -> None:
    """One mixed-precision training step, as nblib.train takes it (grad scaler active for fp16 only)."""
    with torch.autocast("cuda", dtype=dtype):
        _, loss = model(x, y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def bench_gpu(steps: int) -> None:
    if not torch.cuda.is_available():
        print("\n## 5. GPU throughput and MFU: skipped (no CUDA device)")
        return
    device = torch.device("cuda")
    capability = torch.cuda.get_device_capability(device)
    gpu = machine.detect("cuda")
    rows = []
    for label, cfg in (("full", config.settings("train", "full")), ("gpt2-small", config.settings("train", "full", "gpt2-small"))):
        dtypes = [torch.float16] + ([torch.bfloat16] if capability >= (8, 0) else [])
        for dtype in dtypes:
            peak = machine.policy(str(dtype).removeprefix("torch."), device=gpu).peak_flops
            for compiled in (False, True) if capability >= (7, 0) else (False,):  # Triton needs sm70+
                torch.manual_seed(0)
                model = GPT(train.model_config({**cfg, "dropout": 0.0})).to(device)
                opt = optim.configure(model, cfg, device)
                scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
                fwd = torch.compile(model) if compiled else model
                B, T = cfg["batch_size"], cfg["context_length"]
                x = torch.randint(0, 50257, (B, T), device=device)
                y = torch.roll(x, -1, 1)

                torch.cuda.reset_peak_memory_stats(device)
                for _ in range(3):  # warm-up (and compilation)
                    scaled_step(fwd, opt, scaler, x, y, dtype)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    scaled_step(fwd, opt, scaler, x, y, dtype)
                sync(device)
                t = (time.perf_counter() - t0) / steps
                tok_s = B * T / t
                mfu = model.flops_per_token() * tok_s / peak if peak else None
                rows.append({"config": label, "dtype": str(dtype).removeprefix("torch."), "compile": compiled,
                             "batch x ctx": f"{B}x{T}", "tok/s": f"{tok_s:,.0f}",
                             "MFU": f"{100 * mfu:.1f}%" if mfu is not None else "n/a",
                             "peak mem": f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"})
                del model, opt, fwd
                torch.cuda.empty_cache()
    table(rows, f"5. GPU training throughput, {torch.cuda.get_device_name(device)}, mean of {steps} steps, "
                f"MFU against the GPU's dense peak in each dtype (nblib.machine.GPUS)")


# ---------------------------------------------------------------------------------------------
# 6. CPU: fp32 against bf16 autocast (the rule nblib.machine applies on CPUs)


def bench_cpu_dtypes(quick: bool, reps: int, batch_size: int) -> None:
    """Training tokens/s of the same model in fp32 and under bf16 autocast, interleaved on the CPU."""
    device = torch.device("cpu")
    rows = []
    for shape in (("smoke", dict(n_layer=2, n_head=4, d_model=64, context_length=64)),
                  ("full", {k: config.settings("train", "full")[k] for k in ("n_layer", "n_head", "d_model", "context_length")})):
        if quick and shape[0] == "full":
            continue
        c = GPTConfig(n_kv_head=shape[1]["n_head"], dropout=0.0, **shape[1])
        setups = {}
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = GPT(c).to(device)
            setups[dtype] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
        x = torch.randint(0, 50257, (batch_size, c.context_length))
        y = torch.roll(x, -1, 1)
        times: dict[torch.dtype, list[float]] = {d: [] for d in setups}
        for d, (model, opt) in setups.items():
            train_step(model, opt, x, y, d)  # warm-up
        for rep in range(reps):
            for d in (list(setups) if rep % 2 == 0 else list(setups)[::-1]):
                model, opt = setups[d]
                t0 = time.perf_counter()
                train_step(model, opt, x, y, d)
                times[d].append(time.perf_counter() - t0)
        fp32, bf16 = (batch_size * c.context_length / statistics.median(times[d]) for d in setups)
        rows.append({"shape": f"{shape[0]} ({c.n_layer}x{c.n_head}x{c.d_model}, ctx {c.context_length})",
                     "fp32 tok/s": f"{fp32:,.0f}", "bf16 autocast tok/s": f"{bf16:,.0f}", "bf16 ÷ fp32": f"{bf16 / fp32:.2f}x"})
    table(rows, f"6. CPU training: fp32 vs bf16 autocast, batch {batch_size}, interleaved, median of {reps}")


# ---------------------------------------------------------------------------------------------
# 7. nblib against nanoGPT's own model.py

NANOGPT_COMMIT = "3adf61e154c3fe3fca428ad6bc3818b27a3b8291"  # karpathy/nanoGPT master, 2025-11-12
NANOGPT_URL = f"https://raw.githubusercontent.com/karpathy/nanoGPT/{NANOGPT_COMMIT}/model.py"


def load_nanogpt(path: str | None) -> ModuleType | str:
    """nanoGPT's ``model.py`` as a module, from ``path`` or downloaded to a temporary folder; a reason if neither works."""
    if path is None:
        try:
            code = urllib.request.urlopen(NANOGPT_URL, timeout=20).read()
        except OSError as e:
            return (f"could not download {NANOGPT_URL} ({e}); pass a copy of nanoGPT's model.py with --nanogpt PATH "
                    "or NBLIB_NANOGPT=PATH (git clone https://github.com/karpathy/nanoGPT)")
        path = str(Path(tempfile.mkdtemp(prefix="nanogpt-")) / "model.py")
        Path(path).write_bytes(code)
    if not Path(path).is_file():
        return f"--nanogpt {path}: no such file; give the path of nanoGPT's model.py"
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "GPT") or not hasattr(module, "GPTConfig"):
        return f"{path} has no GPT/GPTConfig: it is not nanoGPT's model.py"
    return module


def bench_nanogpt(path: str | None, shape: str, context: int | None, batch_size: int | None, reps: int,
                  chunk_rows: list[int | None]) -> None:
    nanogpt = load_nanogpt(path)
    if isinstance(nanogpt, str):
        print(f"\n## 7. nblib vs nanoGPT: skipped ({nanogpt})")
        return
    cfg = config.settings("train", shape)
    c = GPTConfig(**{k: cfg[k] for k in ("n_layer", "n_head", "n_kv_head", "d_model")}, dropout=0.0,
                  context_length=context or cfg["context_length"])
    B, T = batch_size or cfg["batch_size"], c.context_length
    torch.manual_seed(0)
    ours = GPT(c).train()
    with contextlib.redirect_stdout(io.StringIO()):  # nanoGPT prints its parameter count and optimizer groups
        nano = nanogpt.GPT(nanogpt.GPTConfig(block_size=T, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                                             n_embd=c.d_model, dropout=0.0, bias=c.bias)).train()
        nano.load_state_dict(ours.state_dict())
        opt_nano = nano.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), "cpu")
    opt_ours = optim.configure(ours, cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, c.vocab_size, (B, T + 1), generator=gen)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()  # as nanoGPT's get_batch (its loss views targets)
    with torch.no_grad():  # same function: logits and loss of the two models on the same batch
        diff = (ours.eval()(x, y)[0] - nano.eval()(x, y)[0]).abs().max().item()
        first = {"nblib": ours.train()(x, y)[1].item(), "nanoGPT": nano.train()(x, y)[1].item()}

    def step(model: nn.Module, opt: torch.optim.Optimizer, rows: int | None) -> float:
        loss.CHUNK_ROWS = rows or None  # None: nblib's default size
        model.train(rows != 0)  # 0: eval mode (no dropout either way), so GPT.forward takes the plain logits loss
        t0 = time.perf_counter()
        _, value = model(x, y)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    default = loss.CHUNK_ROWS
    names = {None: f"nblib (chunks of {max(128, 2 * c.d_model)})", 0: "nblib plain loss"}
    runs = {"nanoGPT": (nano, opt_nano, None)} | {names.get(r, f"nblib chunk {r}"): (ours, opt_ours, r) for r in chunk_rows}
    times: dict[str, list[float]] = {label: [] for label in runs}
    loads = [os.getloadavg()[0]]
    for rep in range(reps + 1):  # rep 0 warms up; the order reverses every other repetition
        for label in runs if rep % 2 == 0 else list(runs)[::-1]:
            t = step(*runs[label])
            if rep:
                times[label].append(t)
        loads.append(os.getloadavg()[0])
    loss.CHUNK_ROWS = default
    t_nano = statistics.median(times["nanoGPT"])
    rows = [{"model": label, "ms/step": f"{1000 * statistics.median(ts):,.1f}",
             "range ms": f"{1000 * min(ts):,.0f}-{1000 * max(ts):,.0f}", "tok/s": f"{B * T / statistics.median(ts):,.0f}",
             "vs nanoGPT": f"{t_nano / statistics.median(ts):.2f}x"} for label, ts in times.items()]
    info = machine.info()
    table(rows, f"7. Training step (fwd + bwd + clip + AdamW) vs nanoGPT's model.py @ {NANOGPT_COMMIT[:7]}, "
                f"{shape} shape {c.n_layer}x{c.n_head}x{c.d_model}, context {T}, batch {B}, CPU fp32, "
                f"{torch.get_num_threads()} threads, median of {reps} interleaved steps")
    print(f"\nsame weights: max |logit diff| {diff:.1e}, first loss nblib {first['nblib']:.6f} / nanoGPT "
          f"{first['nanoGPT']:.6f}; {info['cpu']}, load average (1 min) {min(loads):.2f}-{max(loads):.2f}")
    ratios = {label: round(t_nano / statistics.median(ts), 3) for label, ts in times.items() if label != "nanoGPT"}
    print(json.dumps({"bench": "nblib_vs_nanogpt", "shape": shape, "n_layer": c.n_layer, "n_head": c.n_head,
                      "d_model": c.d_model, "context": T, "batch": B, "dtype": "float32", "reps": reps,
                      "ms_per_step": {k: round(1000 * statistics.median(v), 2) for k, v in times.items()},
                      "speedup_vs_nanogpt": ratios, "default_chunk_rows": max(128, 2 * c.d_model), "max_logit_diff": diff,
                      "cpu": info["cpu"], "threads": torch.get_num_threads(), "loadavg_1m": [min(loads), max(loads)],
                      "nanogpt_commit": NANOGPT_COMMIT}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (2x128), for a fast smoke check")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per training measurement")
    parser.add_argument("--batch-size", type=int, help="training batch for section 1 (default 4 on CPU, the full profile's on a GPU)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--gen-reps", type=int, default=2)
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--only", default="1,2,3,4,5,6,7", help="comma list of sections to run")
    parser.add_argument("--nanogpt", default=os.environ.get("NBLIB_NANOGPT"),
                        help="nanoGPT's model.py for section 7 (default $NBLIB_NANOGPT, else downloaded)")
    parser.add_argument("--shape", choices=("smoke", "full"), default="smoke", help="section 7: the training profile's sizes")
    parser.add_argument("--context", type=int, help="section 7: context length (default the profile's)")
    parser.add_argument("--chunk-rows", default="0,auto",
                        help="section 7: comma list of nblib.loss chunk sizes to time (rows of the LM head per chunk; "
                             "auto: nblib's default, 0: the plain logits + cross-entropy loss)")
    args = parser.parse_args()
    only = {int(x) for x in args.only.split(",")}
    info = machine.info()
    print(f"# bench_pretrain — {info['cpu']} ({info['cpu_cores']} cores), GPU: {info['gpu'] or 'none'}, "
          f"torch {info['torch']}, {torch.get_num_threads()} threads")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch_size or (config.settings("train", "full")["batch_size"] if device.type == "cuda" else 4)
    sections = {
        1: lambda: bench_training(args.quick, args.reps, batch_size, device),
        2: lambda: bench_generation(args.quick, args.new_tokens, args.gen_reps, device),
        3: lambda: bench_kv_cache(args.quick),
        4: bench_tokenisation,
        5: lambda: bench_gpu(args.gpu_steps),
        6: lambda: bench_cpu_dtypes(args.quick, args.reps, batch_size),
        7: lambda: bench_nanogpt(args.nanogpt, args.shape, args.context, args.batch_size, args.reps,
                                 [None if r == "auto" else int(r) for r in args.chunk_rows.split(",")]),
    }
    for number in sorted(only):
        sections[number]()


if __name__ == "__main__":
    main()

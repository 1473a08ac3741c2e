"""Timing and memory of models, measured side by side in one process: prefill and decode, generation
and training speed of the compare stage's checkpoints, KV-cache and weight bytes, memory
bandwidth, MBU, and what fine-tuning GPT-2 small costs in each variant.

A shared machine speeds up and slows down, so variants are always measured interleaved (A B C,
then C B A, ...) in one process, after an untimed warm-up, and reported per repeat or as the
median of the repeats; on CUDA every timing synchronises the device. A decode step must read
every weight once and the whole filled KV cache; those bytes over the step's time, as a fraction
of the memory bandwidth, are the model bandwidth utilisation (MBU, nanochat's term). The
bandwidth is the GPU's spec sheet figure where known (``nblib.machine.GPUS``), else a measured
copy (bytes read + bytes written per second, as STREAM counts them).

Speed does not depend on the weights' values, so sweeps and cost rows use randomly initialised
models. Used by the compare stage (06) and the benchmarks in ``benchmarks/``.
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch

from nblib import attention, config, machine, runs, tokenizer
from nblib.decode import DecodeStep
from nblib.model import GPT, GPTConfig, KVCache, load_checkpoint, matched_d_mlp
from nblib.progress import Progress

def interleaved(calls: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 1) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time each of ``calls`` ``repeats`` times, the order reversed every other round, after ``warmup`` untimed rounds.

    Returns the seconds of every timed call per label and each call's last result.
    """
    labels = list(calls)
    times: dict[str, list[float]] = {label: [] for label in labels}
    results: dict[str, Any] = {}
    for rep in range(warmup + repeats):
        for label in labels if rep % 2 == 0 else labels[::-1]:
            machine.sync(device)
            t0 = time.perf_counter()
            results[label] = calls[label]()
            machine.sync(device)
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


def peak_bandwidth(device: torch.device | str = "cpu") -> tuple[float, str]:
    """``(bytes/s, source)``: a known GPU's spec sheet figure, else :func:`copy_bandwidth` measured here."""
    device = torch.device(device)
    if device.type == "cuda":
        gpu = machine.detect("cuda", device.index or 0)
        if gpu.spec is not None:
            return gpu.spec.memory_bandwidth, f"{gpu.name} spec sheet"
        return copy_bandwidth(device, nbytes=2**30), f"{gpu.name} measured copy"
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


SWEPT = ("mha", "gqa", "mqa")  # the variants (nblib.attention keys) the cost section times at real shapes


def attention_variants(n_layer: int, n_head: int, d_model: int, keys: Sequence[str] = SWEPT, **config: Any) -> dict[str, GPTConfig]:
    """One config per variant of ``keys`` (``nblib.attention`` keys), by label, e.g.
    ``attention_variants(8, 8, 512, ["mha", "gqa", "mqa"])``: the variant's K/V heads and, matched to
    MHA in parameters, its widened MLP; all else equal. Converted variants are left out: they have the
    shape of their scratch twin, and speed depends on the shape only."""
    mha = GPTConfig(n_layer=n_layer, n_head=n_head, n_kv_head=n_head, d_model=d_model, **{"dropout": 0.0, **config})
    out = {}
    for v in map(attention.get, keys):
        if not v.converted:
            n_kv = v.kv_heads(n_head)
            out[v.label] = replace(mha, n_kv_head=n_kv, d_mlp=matched_d_mlp(mha, n_kv) if v.match == "params" else mha.d_mlp)
    return out


def random_model(config: GPTConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> GPT:
    """A GPT with GPT-2's random initialisation, in eval mode, on ``device`` in ``dtype``, each weight drawn
    once: built on the meta device, then filled in place (``GPT(config)`` draws every linear layer twice,
    its own default and then GPT-2's, and ``.to`` copies it again; the compare stage's real-scale sweep
    builds a GPT-2-small-shaped model per variant, so on a CPU that set-up rivalled the timing itself)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=device).to(dtype)
    model.lm_head.weight = model.transformer.wte.weight  # to_empty gives each module its own tensor
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:  # LayerNorm weights 1; LayerNorm and linear biases 0
                p.fill_(1.0 if ".ln_" in f".{name}" and name.endswith("weight") else 0.0)
            else:  # GPT.__init__'s scales: residual projections 0.02 / sqrt(2 n_layer), the rest 0.02
                p.normal_(0.0, 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02)
    return model.eval()


def prefill(model: GPT, prompt: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed ``prompt`` into an emptied ``cache``; returns the greedy next token, ``[B, 1]``."""
    cache.reset()
    logits, _ = model(prompt, cache=cache, last_only=True)
    return logits[:, -1].argmax(-1, keepdim=True)


def decode(model: GPT, cache: KVCache, token: torch.Tensor, steps: int, compile: bool = False) -> torch.Tensor:
    """``steps`` greedy decode steps from ``token`` (``[B, 1]``), appending to ``cache``; returns the last
    token. ``compile``: through the compiled static step (``nblib.decode``), else ``GPT.forward``."""
    step = DecodeStep(model, cache, compile)
    for _ in range(steps):
        token = step(token).argmax(-1, keepdim=True)
    return token


def _time_decode(models: dict[str, GPT], caches: dict[str, KVCache], prompt: torch.Tensor, new_tokens: int,
                 repeats: int, prefill_repeats: int, prefill_cache: bool,
                 compiled: Sequence[str] = ()) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds of the prefill (first ``prefill_repeats`` rounds) and of ``new_tokens`` decode steps
    (every round, restarted at the end of the prompt), variants interleaved, order alternating.
    Labels in ``compiled`` decode through the compiled step (compile it beforehand: it is timed)."""
    labels, device, prompt_len = list(models), prompt.device, prompt.size(1)
    first: dict[str, torch.Tensor] = {}
    prefill_s: dict[str, list[float]] = {label: [] for label in labels}
    decode_s: dict[str, list[float]] = {label: [] for label in labels}
    for rep in range(repeats):
        for label in labels if rep % 2 == 0 else labels[::-1]:
            model, cache = models[label], caches[label]
            if rep < prefill_repeats and not prefill_cache:  # random keys and values stand in for a prefill
                cache.k.normal_()
                cache.v.normal_()
                first[label] = prompt[:, -1:]
            elif rep < prefill_repeats:
                machine.sync(device)
                t0 = time.perf_counter()
                first[label] = prefill(model, prompt, cache)
                machine.sync(device)
                prefill_s[label].append(time.perf_counter() - t0)
            cache.length = prompt_len
            machine.sync(device)
            t0 = time.perf_counter()
            decode(model, cache, first[label], new_tokens, label in compiled)
            machine.sync(device)
            decode_s[label].append(time.perf_counter() - t0)
    return prefill_s, decode_s


def _decode_row(label: str, model: GPT, cache: KVCache, batch: int, context: int, new_tokens: int,
                prefill_s: list[float], decode_s: list[float], peak: float, device: torch.device,
                dtype: torch.dtype) -> dict[str, Any]:
    """One sweep row: medians of the timings, the bytes a decode step reads, bandwidth and MBU."""
    c = model.config
    step_s = statistics.median(decode_s) / new_tokens
    step_bytes = decode_step_bytes(model, batch, context - new_tokens + (new_tokens + 1) / 2)
    return {
        "variant": label, "n_layer": c.n_layer, "n_head": c.n_head, "n_kv_head": c.n_kv_head, "d_model": c.d_model,
        "batch": batch, "context": context, "new_tokens": new_tokens,
        "prefill_s": statistics.median(prefill_s) if prefill_s else float("nan"),
        "decode_tokens_per_s": batch / step_s, "decode_repeats": [batch * new_tokens / t for t in decode_s],
        "ms_per_token": 1e3 * step_s, "kv_cache_bytes": cache.nbytes, "bytes_per_step": step_bytes,
        "bandwidth_GBps": step_bytes / step_s / 1e9, "mbu": step_bytes / step_s / peak,
        "device": device.type, "dtype": str(dtype).removeprefix("torch."),
    }


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
    prefill_cache: bool = True,
    desc: str = "decode sweep",
) -> pd.DataFrame:
    """Prefill time, decode speed, KV-cache bytes and MBU for every variant x batch x context.

    Each model (random weights, ``context_length = max(contexts)``) gets a prompt of
    ``context - new_tokens`` random tokens, then ``new_tokens`` greedy decode steps, so the last
    step attends over ``context`` positions. For each batch x context the variants' caches are
    allocated side by side and measured interleaved: the prefill on the first ``prefill_repeats``
    rounds, the decode on all ``repeats`` (restarted at the end of the prompt each time).
    ``dtype`` defaults to bf16 on a GPU, fp32 on CPU; ``bandwidth`` (bytes/s, source) to
    :func:`peak_bandwidth`. With ``prefill_cache=False`` the cache is filled with random keys and
    values instead of a real prefill (decode speed does not depend on them; ``prefill_s`` is then
    NaN), which keeps long contexts of large shapes affordable on a CPU. One row per variant x
    batch x context, with each repeat's decode tokens/s in ``decode_repeats``; the bandwidth
    used is in ``df.attrs``. Progress (``desc``, one unit per batch x context) shows as every stage's does.
    """
    device = torch.device(device or machine.detect().torch)
    dtype = dtype or machine.auto_dtype(machine.detect(device.type, device.index or 0))
    if not 1 <= prefill_repeats <= repeats:
        raise ValueError(f"prefill_repeats must be in [1, repeats={repeats}], got {prefill_repeats}")
    if min(contexts) <= new_tokens:
        raise ValueError(f"every context must exceed new_tokens={new_tokens} (the prompt is context - new_tokens)")
    peak, source = bandwidth or peak_bandwidth(device)
    models = {label: random_model(replace(c, context_length=max(contexts)), device, dtype) for label, c in variants.items()}
    vocab = min(c.vocab_size for c in variants.values())
    rows = []
    with torch.inference_mode(), Progress(desc, len(batches) * len(contexts), unit="batch x context") as bar:
        for model in models.values():  # warm up the code paths once
            cache = model.new_cache(1, min(contexts))
            warm = torch.zeros(1, min(contexts) - new_tokens, dtype=torch.long, device=device)
            decode(model, cache, prefill(model, warm, cache), new_tokens)
        for batch in batches:
            for context in contexts:
                prompt = torch.randint(0, vocab, (batch, context - new_tokens),
                                       generator=torch.Generator().manual_seed(context)).to(device)
                caches = {label: m.new_cache(batch, context) for label, m in models.items()}
                prefill_s, decode_s = _time_decode(models, caches, prompt, new_tokens, repeats, prefill_repeats,
                                                   prefill_cache)
                for label, model in models.items():
                    rows.append(_decode_row(label, model, caches[label], batch, context, new_tokens, prefill_s[label],
                                            decode_s[label], peak, device, dtype))
                    if log is not None:
                        r = rows[-1]
                        log(f"{label} batch {batch} context {context}: prefill {r['prefill_s']:.2f} s, "
                            f"{r['decode_tokens_per_s']:,.0f} tok/s, MBU {r['mbu']:.2f}")
                del caches
                bar.update(1, batch=batch, context=context)
    df = pd.DataFrame(rows)
    df.attrs.update(peak_bandwidth_GBps=peak / 1e9, bandwidth_source=source)
    return df


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
        try:
            model, _ = load_checkpoint(path, dev)
        except config.Refused as e:
            raise config.Refused(f"{e}; {runs.rerun(group.name)}") from e
        models[label] = model.eval()
    return models


@torch.inference_mode()
def generation(models: dict[str, GPT], prompt: str, batch_sizes: Iterable[int] = (1, 8), new_tokens: int = 32,
               repeats: int = 5) -> pd.DataFrame:
    """Greedy generation speed with the KV cache, every model at every batch size, interleaved.

    One row per timing: ``variant, batch, repeat, seconds, tokens_per_s, cache_tokens,
    cache_bytes`` (bytes of the cache the model allocates for ``batch x cache_tokens``, the
    prompt plus the new tokens).
    """
    ids = tokenizer.get_encoding().encode_ordinary(prompt)
    for label, model in models.items():
        room = model.config.context_length - len(ids)
        if new_tokens > room:
            raise ValueError(
                f"gen_new_tokens={new_tokens} does not fit {label}'s context: the prompt is {len(ids)} tokens "
                f"and the context {model.config.context_length}; use gen_new_tokens <= {room} or a shorter speed_prompt"
            )
    rows = []
    batch_sizes = list(batch_sizes)
    bar = Progress("generation speed", len(batch_sizes), unit="batch size")
    for batch in batch_sizes:
        idx = {label: torch.tensor([ids] * batch, device=next(m.parameters()).device) for label, m in models.items()}
        calls = {label: (lambda m=m, x=idx[label]: m.generate(x, new_tokens, temperature=0.0)) for label, m in models.items()}
        times, _ = interleaved(calls, repeats, next(iter(idx.values())).device)
        for label, seconds in times.items():
            model = models[label]
            rows += [{"variant": label, "batch": batch, "repeat": rep, "seconds": t,
                      "tokens_per_s": batch * new_tokens / t, "cache_tokens": len(ids) + new_tokens,
                      "cache_bytes": model.kv_cache_bytes(batch, len(ids) + new_tokens, next(model.parameters()).dtype)}
                     for rep, t in enumerate(seconds)]
        bar.update(1, batch=batch)
    bar.close()
    return pd.DataFrame(rows)


@torch.inference_mode()
def sample_generations(models: dict[str, GPT], prompts: Iterable[str], max_new_tokens: int = 40,
                       temperature: float = 0.8, top_k: int | None = 40, seed: int = 1337) -> pd.DataFrame:
    """Continuations of the same prompts by every model, same seed per prompt (rows: prompts)."""
    enc = tokenizer.get_encoding()
    prompts = list(prompts)
    table: dict[str, list[str]] = {}
    bar = Progress("sample continuations", len(models) * len(prompts), unit="sample")
    for label, model in models.items():
        device = next(model.parameters()).device
        outs = []
        for prompt in prompts:
            ids = enc.encode_ordinary(prompt)
            gen = torch.Generator(device).manual_seed(seed)
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature, top_k, generator=gen)
            outs.append(enc.decode(out[0, len(ids):].tolist()))
            bar.update(1)
        table[label] = outs
    bar.close()
    return pd.DataFrame(table, index=pd.Index(prompts, name="prompt"))


def training_steps(configs: dict[str, dict[str, Any]], steps: int = 3, repeats: int = 3,
                   device: str = "auto", seed: int = 0) -> pd.DataFrame:
    """Training tokens/s of each variant (``label -> train settings``), timed side by side here.

    Each variant's model is built fresh from its settings (random weights, random tokens: speed
    does not depend on values) and takes ``steps`` AdamW steps of one micro-batch of
    ``batch_size x context_length`` per repeat, after one untimed warm-up step; repeats alternate
    the order. One row per variant and repeat: ``variant, repeat, seconds, tokens_per_s``.
    """
    from nblib.optim import configure
    from nblib.train import model_config

    dev = machine.detect(device)
    policies, setups = {}, {}
    for label, cfg in configs.items():
        torch.manual_seed(seed)
        variant = next((v for v in attention.VARIANTS.values() if v.label == label), None)  # gqa-params: a wider MLP
        model = GPT(model_config(cfg, variant)).to(dev.torch).train()
        policy = machine.policy(cfg["dtype"], False, dev)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randint(0, model.config.vocab_size, (cfg["batch_size"], cfg["context_length"] + 1), generator=gen).to(dev.torch)
        setups[label] = (model, configure(model, cfg, dev.torch), x[:, :-1], x[:, 1:], policy.grad_scaler())
        policies[label] = policy

    def step(label: str) -> None:
        model, opt, x, y, scaler = setups[label]
        with policies[label].autocast_context():
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    calls = {label: (lambda label=label: [step(label) for _ in range(steps)]) for label in setups}
    times, _ = interleaved(calls, repeats, dev.torch)
    return pd.DataFrame([{"variant": label, "repeat": rep, "seconds": t,
                          "tokens_per_s": steps * setups[label][2].numel() / t}
                         for label, seconds in times.items() for rep, t in enumerate(seconds)])


# ---------------------------------------------------------------------------------------------
# fine-tuning cost at GPT-2 small's shape


def finetune_cost(cfg: dict[str, Any], variants: Sequence[str] | None, steps: int = 2, batch_size: int | None = None,
                  length: int | None = None, device: str = "auto") -> pd.DataFrame:
    """What each fine-tune variant costs on a GPT-2-small-shaped model (random init, built here,
    no download): the base's footprint as loaded, trainable and total parameters, and the peak
    memory of ``steps`` training steps of ``batch_size x length`` tokens (default: the settings').
    ``variants=None`` costs those the pipeline runs (``nblib.ftmethods.PIPELINE``).

    One column per variant; rows ``footprint_mib``, ``trainable_params``, ``total_params``,
    ``peak_memory_mib``, ``step_seconds``.
    """
    from nblib import finetune

    dev = machine.detect(device)
    batch_size, length = batch_size or cfg["batch_size"], length or cfg["max_length"]
    out: dict[str, dict[str, float]] = {}
    x = torch.randint(0, 50257, (batch_size, length), generator=torch.Generator().manual_seed(0))
    examples = [{"labels": row} for row in x.tolist()]  # the method's rows train as in a run (lora_answer_rows)
    with tempfile.TemporaryDirectory(prefix="nblib-gpt2-small-") as tmp:
        base = str(finetune.random_base(Path(tmp) / "gpt2-small"))
        out_names = finetune.PIPELINE if variants is None else tuple(variants)
        bar = Progress("fine-tune cost on GPT-2 small", len(out_names), unit="variant")
        for name in out_names:
            v = finetune.variant(name)
            model = finetune.load_base(base, v.mode, dev)
            tok = finetune.load_tokenizer(base)
            model = v.method.prepare(model, cfg, tok, finetune.add_special_tokens(model, tok), examples, v.mode)
            trainable, total = finetune.count_params(model)
            footprint = model.get_memory_footprint()
            out[v.label] = {"footprint_mib": footprint / 2**20, "trainable_params": trainable, "total_params": total,
                            **_train_peak(model, dev, x, steps)}
            del model
            bar.update(1, variant=v.label)
        bar.close()
    table = pd.DataFrame(out)
    table.index.name = "metric"
    computes = {finetune.variant(n).label: finetune.compute_dtype(finetune.variant(n).mode, dev) for n in out_names}
    table.attrs["note"] = (f"GPT-2 small (124M, random init) on {dev.name}: {steps} training step{'s' if steps != 1 else ''} of {batch_size} x "
                           f"{length} tokens per variant, AdamW on the trainable parameters; peak memory of the steps alone. "
                           f"Compute: {'; '.join(f'{k} {v}' for k, v in computes.items())}.")
    return table


def _train_peak(model: Any, dev: machine.Device, tokens: torch.Tensor, steps: int) -> dict[str, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    x = tokens.to(dev.torch)
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


SHAPES = {"full": (8, 8, 512), "gpt2-small": (12, 12, 768)}  # (n_layer, n_head, d_model)


def cost_sweep(shapes: Sequence[str], contexts: Sequence[int], batch: int = 8, repeats: int = 3,
               device: str = "auto", new_tokens: int = 8, variants: Sequence[str] = SWEPT) -> pd.DataFrame:
    """Decode tokens/s and KV-cache bytes against context for ``variants`` (``nblib.attention`` keys,
    by :func:`attention_variants`) at each named shape of :data:`SHAPES`, random weights, on this machine.

    The caches are filled with random values rather than prefilled (decode speed does not depend
    on them), so a CPU can take GPT-2 small's shape to 4k context. One row per shape x variant x
    context, with a ``shape`` column (see :func:`decode_sweep` for the others).
    """
    dev = machine.detect(device).torch
    parts = []
    for shape in shapes:
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        n_layer, n_head, d_model = SHAPES[shape]
        configs = attention_variants(n_layer, n_head, d_model, variants)
        sweep = decode_sweep(configs, [batch], list(contexts), new_tokens, repeats, 1, dev, prefill_cache=False,
                             desc=f"cost sweep {shape}")
        parts.append(sweep.assign(shape=f"{shape} ({n_layer}x{n_head}x{d_model})"))
    return pd.concat(parts, ignore_index=True)

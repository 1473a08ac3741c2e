"""Inference benchmarks: what grouped-query attention saves when generating, measured side by side.

    python benchmarks/bench_inference.py [--shape full|gpt2-small] [--quick] [--batches 1,8,32]
        [--contexts 256,1024,2048,4096] [--repeats N] [--compiled-cells 1x512,8x2048] [--only 1,4]
    python benchmarks/bench_inference.py --compile-cost [--cost-batches 1,8] [--cost-context 512]

1. Decode sweep, MHA / GQA / MQA at equal width (``nblib.measure.decode_sweep``): prefill time,
   decode tokens/s and ms per token, KV-cache bytes, and the bytes a decode step must read
   (weights plus cache) over its time, also as a fraction of the memory bandwidth (MBU).
2. nblib's ``GPT.generate`` against Hugging Face's ``GPT2LMHeadModel.generate`` (greedy,
   ``use_cache=True``) on the very weights of the MHA model (through ``nblib.model.export_hf``).
3. KV-cache generation against full recomputation (``use_cache=False``), batch 1.
4. Eager against compiled decode (``nblib.decode``), the variants and both modes interleaved: MBU
   side by side, and each variant's speed-up over MHA next to the one its bytes per step predict.

``--compile-cost`` instead measures what compiling the decode step costs (cold: empty inductor
cache; warm: its on-disk cache filled by the cold run) and saves per token, and so from how many
generated tokens compiling pays for itself (``nblib.decode.CPU_COMPILE_MIN_TOKENS``).

Models have random weights: speed does not depend on their values. Variants run interleaved in
this one process and each figure is the median of the repeats, so ratios hold on a noisy
machine even when absolute times do not. On a GPU everything runs in its half precision (bf16; fp16 on a T4 or P100) and MBU is taken
against the GPU's spec-sheet bandwidth. The last line printed is one JSON object.

On a loaded CPU (load average above the core count) ``--threads 1`` gives steadier figures: with
several threads every op waits for the thread that lost its time slice.
"""
from __future__ import annotations

import os

# Ask PyTorch's CPU allocator for transparent huge pages on large tensors (read when torch starts).
# Where the kernel only grants them on request (THP "madvise"), weights stream ~15% faster, as
# Hugging Face's memory-mapped safetensors weights already do. THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402

from bench_pretrain import table  # noqa: E402  (the same table printer; scripts in one folder)
from nblib import attention, config, machine, measure, tokenizer  # noqa: E402
from nblib.model import GPTConfig, export_hf  # noqa: E402

TARGET_CELL = (8, 2048)  # batch, context of the GQA-vs-MHA decode target


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def shape(name: str, quick: bool) -> dict[str, int]:
    if quick:
        return dict(n_layer=2, n_head=8, d_model=128)
    cfg = config.settings("train", "full", "gpt2-small" if name == "gpt2-small" else None)
    return {k: cfg[k] for k in ("n_layer", "n_head", "d_model")}


def bench_sweep(args: argparse.Namespace, variants: dict, device: torch.device, dtype: torch.dtype, bandwidth: tuple[float, str]):
    df = measure.decode_sweep(variants, args.batches, args.contexts, args.new_tokens, args.repeats, args.prefill_repeats,
                              device, dtype, bandwidth, log=log)
    mha = df[df.variant == "MHA"].set_index(["batch", "context"])
    rows = []
    for r in df.itertuples():
        base = mha.loc[(r.batch, r.context)]
        rows.append({"attention": f"{r.variant} ({r.n_head}q/{r.n_kv_head}kv)", "batch": r.batch, "context": r.context,
                     "prefill s": f"{r.prefill_s:.3f}", "decode tok/s": f"{r.decode_tokens_per_s:,.1f}",
                     "ms/token": f"{r.ms_per_token:.2f}", "vs MHA": f"{r.decode_tokens_per_s / base.decode_tokens_per_s:.2f}x",
                     "KV cache MiB": f"{r.kv_cache_bytes / 2**20:,.1f}", "MB read/step": f"{r.bytes_per_step / 1e6:,.1f}",
                     "GB/s": f"{r.bandwidth_GBps:.2f}", "MBU": f"{r.mbu:.2f}"})
    c = variants["MHA"]
    table(rows, f"1. Decode sweep, {c.n_layer} layers x {c.n_head} heads x {c.d_model}, {device.type} "
                f"{str(dtype).removeprefix('torch.')}, prompt = context - {args.new_tokens}, then {args.new_tokens} decode "
                f"steps; median of {args.repeats} interleaved repeats (prefill: {args.prefill_repeats}); MBU against "
                f"{bandwidth[0] / 1e9:.1f} GB/s ({bandwidth[1]})")
    return df


def bench_hf(args: argparse.Namespace, base: GPTConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """nblib's generate against HF's on the same (MHA) weights, greedy, at batch 1 and 8."""
    from transformers import GPT2LMHeadModel

    ours = measure.random_model(replace(base, context_length=args.hf_prompt + args.hf_new_tokens), device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        hf = GPT2LMHeadModel.from_pretrained(export_hf(ours, os.path.join(tmp, "hf"))).to(device=device, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # a random model may emit end-of-text; generate every token
    result, rows = {}, []
    for batch in (1, 8):
        prompt = torch.randint(0, base.vocab_size, (batch, args.hf_prompt), generator=torch.Generator().manual_seed(batch)).to(device)
        n = args.hf_new_tokens

        def run_hf() -> torch.Tensor:
            with torch.inference_mode():
                return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                                   use_cache=True, pad_token_id=0)

        times, outs = measure.interleaved({"nblib": lambda: ours.generate(prompt, n, temperature=0), "HF": run_hf},
                                          args.gen_repeats, device)
        t_ours, t_hf = statistics.median(times["nblib"]), statistics.median(times["HF"])
        same = bool(torch.equal(outs["nblib"], outs["HF"]))
        result[str(batch)] = {"ratio": t_hf / t_ours, "same_tokens": same}
        rows.append({"batch": batch, "nblib tok/s": f"{batch * n / t_ours:,.1f}", "HF tok/s": f"{batch * n / t_hf:,.1f}",
                     "nblib / HF": f"{t_hf / t_ours:.2f}x", "same tokens": same})
        log(f"HF comparison batch {batch}: {t_hf / t_ours:.2f}x, same tokens {same}")
    table(rows, f"2. Greedy generation, nblib GPT.generate vs HF GPT2LMHeadModel.generate (use_cache=True, "
                f"attn {hf.config._attn_implementation}) on the same MHA weights, {args.hf_prompt}-token prompt + {n} new "
                f"tokens, median of {args.gen_repeats} interleaved runs")
    return result


def bench_recompute(args: argparse.Namespace, variants: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """KV-cache generation against full recomputation, batch 1."""
    prompt_len, n = 16, args.gen_tokens
    result, rows = {}, []
    prompt = torch.randint(0, 50257, (1, prompt_len), generator=torch.Generator().manual_seed(2)).to(device)
    for label in ("MHA", "GQA"):
        model = measure.random_model(replace(variants[label], context_length=prompt_len + n), device, dtype)
        times, outs = measure.interleaved({
            "cache": lambda: model.generate(prompt, n, temperature=0, use_cache=True),
            "recompute": lambda: model.generate(prompt, n, temperature=0, use_cache=False),
        }, args.gen_repeats, device)
        t_cache, t_full = statistics.median(times["cache"]), statistics.median(times["recompute"])
        same = bool(torch.equal(outs["cache"], outs["recompute"]))
        result[label] = {"ratio": t_full / t_cache, "same_tokens": same}
        c = model.config
        rows.append({"attention": f"{label} ({c.n_head}q/{c.n_kv_head}kv)", "KV cache tok/s": f"{n / t_cache:,.1f}",
                     "recompute tok/s": f"{n / t_full:,.1f}", "speed-up": f"{t_full / t_cache:.1f}x", "same tokens": same})
        log(f"cache vs recompute {label}: {t_full / t_cache:.1f}x, same tokens {same}")
    table(rows, f"3. Greedy generation of {n} tokens after a {prompt_len}-token prompt, batch 1: KV cache vs full "
                f"recomputation, median of {args.gen_repeats} interleaved runs")
    return result


def cells(text: str) -> list[tuple[int, int]]:
    """``"1x512,8x2048"`` -> ``[(1, 512), (8, 2048)]`` (batch x context)."""
    return [tuple(int(x) for x in cell.split("x")) for cell in text.split(",")]


def _filled(model, batch: int, context: int, new_tokens: int):
    """A cache of ``context`` positions holding random K/V up to ``context - new_tokens`` (speed does not depend on them)."""
    cache = model.new_cache(batch, context)
    cache.k.normal_()
    cache.v.normal_()
    cache.length = context - new_tokens
    return cache


def bench_compiled(args: argparse.Namespace, variants: dict, device: torch.device, dtype: torch.dtype,
                   bandwidth: tuple[float, str]) -> dict:
    """Eager and compiled decode of every variant, all interleaved per cell; MBU and ratios vs MHA, measured and predicted."""
    n, context_length = args.new_tokens, max(c for _, c in args.compiled_cells)
    models = {label: measure.random_model(replace(c, context_length=context_length), device, dtype) for label, c in variants.items()}
    labelled = {f"{label} {mode}": m for label, m in models.items() for mode in ("eager", "compiled")}
    compiled = [label for label in labelled if label.endswith("compiled")]
    result, rows = [], []
    with torch.inference_mode():
        for batch, context in args.compiled_cells:
            prompt = torch.zeros(batch, context - n, dtype=torch.long, device=device)
            caches = {label: _filled(m, batch, context, n) for label, m in labelled.items()}
            for label in compiled:  # compile this cache shape now, untimed
                t0 = time.perf_counter()
                measure.decode(labelled[label], caches[label], prompt[:, -1:], 2, compile=True)
                log(f"compiled {label} for batch {batch} x {context}: {time.perf_counter() - t0:.1f} s")
            _, decode_s = measure._time_decode(labelled, caches, prompt, n, args.repeats, 1, False, compiled)
            cell = {label: measure._decode_row(label, labelled[label], caches[label], batch, context, n, [], decode_s[label],
                                               bandwidth[0], device, dtype) for label in labelled}
            for label in models:
                e, c = cell[f"{label} eager"], cell[f"{label} compiled"]
                mha_e, mha_c = cell["MHA eager"], cell["MHA compiled"]
                row = {"variant": label, "batch": batch, "context": context, "bytes_per_step": e["bytes_per_step"],
                       "eager_tokens_per_s": e["decode_tokens_per_s"], "eager_mbu": e["mbu"],
                       "compiled_tokens_per_s": c["decode_tokens_per_s"], "compiled_mbu": c["mbu"],
                       "compiled_vs_eager": c["decode_tokens_per_s"] / e["decode_tokens_per_s"],
                       "predicted_vs_mha": mha_e["bytes_per_step"] / e["bytes_per_step"],
                       "eager_vs_mha": e["decode_tokens_per_s"] / mha_e["decode_tokens_per_s"],
                       "compiled_vs_mha": c["decode_tokens_per_s"] / mha_c["decode_tokens_per_s"]}
                result.append(row)
                rows.append({"attention": f"{label} ({variants[label].n_head}q/{variants[label].n_kv_head}kv)", "batch": batch,
                             "context": context, "MB read/step": f"{row['bytes_per_step'] / 1e6:,.1f}",
                             "eager tok/s": f"{row['eager_tokens_per_s']:,.1f}", "eager MBU": f"{row['eager_mbu']:.2f}",
                             "compiled tok/s": f"{row['compiled_tokens_per_s']:,.1f}", "compiled MBU": f"{row['compiled_mbu']:.2f}",
                             "compiled / eager": f"{row['compiled_vs_eager']:.2f}x",
                             "vs MHA predicted (bytes)": f"{row['predicted_vs_mha']:.2f}x",
                             "vs MHA eager": f"{row['eager_vs_mha']:.2f}x", "vs MHA compiled": f"{row['compiled_vs_mha']:.2f}x"})
            del caches
    c = variants["MHA"]
    table(rows, f"4. Eager vs compiled decode (nblib.decode), {c.n_layer}x{c.n_head}x{c.d_model}, {device.type} "
                f"{str(dtype).removeprefix('torch.')}: {n} decode steps after a cache filled to context - {n}, median of "
                f"{args.repeats} repeats, variants and modes interleaved; MBU against {bandwidth[0] / 1e9:.1f} GB/s "
                f"({bandwidth[1]}) from the bytes a step must read (the compiled step reads the whole cache, up to {n} "
                f"positions more); 'predicted' = MHA's bytes per step / the variant's")
    return {"rows": result}


def bench_compile_cost(args: argparse.Namespace, variants: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Compile time of the MHA decode step, cold and warm, against its per-token saving: the break-even length."""
    n, context = args.new_tokens, args.cost_context
    model = measure.random_model(replace(variants["MHA"], context_length=context), device, dtype)
    rows, result = [], {}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")  # cold: nothing cached yet
    with torch.inference_mode():
        for batch in args.cost_batches:
            token = torch.zeros(batch, 1, dtype=torch.long, device=device)
            compile_s = {}
            for kind in ("cold", "warm"):  # warm: dynamo's in-memory graphs dropped, inductor's disk cache kept
                torch.compiler.reset()
                eager, step = _filled(model, batch, context, n), _filled(model, batch, context, n)
                t0 = time.perf_counter()
                measure.decode(model, eager, token, 1)
                t1 = time.perf_counter()
                measure.decode(model, step, token, 1, compile=True)
                compile_s[kind] = (time.perf_counter() - t1) - (t1 - t0)
                log(f"compile ({kind}) batch {batch}: {compile_s[kind]:.1f} s")
            caches = {"eager": _filled(model, batch, context, n), "compiled": _filled(model, batch, context, n)}
            prompt = torch.zeros(batch, context - n, dtype=torch.long, device=device)
            _, decode_s = measure._time_decode({"eager": model, "compiled": model}, caches, prompt, n, args.repeats, 1,
                                               False, ["compiled"])
            per_token = {mode: statistics.median(t) / n for mode, t in decode_s.items()}
            saving = per_token["eager"] - per_token["compiled"]
            even = {kind: (s / saving if saving > 0 else float("inf")) for kind, s in compile_s.items()}
            result[str(batch)] = {"compile_s": compile_s, "eager_ms": 1e3 * per_token["eager"],
                                  "compiled_ms": 1e3 * per_token["compiled"], "break_even_tokens": even}
            rows.append({"batch": batch, "cache": context, "compile s (cold)": f"{compile_s['cold']:.1f}",
                         "compile s (warm)": f"{compile_s['warm']:.1f}", "eager ms/token": f"{1e3 * per_token['eager']:.2f}",
                         "compiled ms/token": f"{1e3 * per_token['compiled']:.2f}",
                         "pays after (cold)": f"{even['cold']:,.0f} tokens", "pays after (warm)": f"{even['warm']:,.0f} tokens"})
    c = model.config
    table(rows, f"Compile cost of the decode step, MHA {c.n_layer}x{c.n_head}x{c.d_model}, {device.type} "
                f"{str(dtype).removeprefix('torch.')}: first compiled step minus an eager step; per token: median of "
                f"{args.repeats} interleaved runs of {n} steps; pays after = compile s / per-token saving")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("full", "gpt2-small"), default="full",
                        help="full profile (8x8x512) or GPT-2 small (12x12x768)")
    parser.add_argument("--quick", action="store_true", help="tiny model and sweep, for a smoke test")
    parser.add_argument("--batches", type=ints, help="comma list (default 1,8,32)")
    parser.add_argument("--contexts", type=ints, help="comma list (default 256,1024,2048,4096)")
    parser.add_argument("--repeats", type=int, help="interleaved decode repeats per cell (default 3)")
    parser.add_argument("--prefill-repeats", type=int, default=1, help="of which also time the prefill (default 1)")
    parser.add_argument("--new-tokens", type=int, help="decode steps per timing (default 16)")
    parser.add_argument("--variants", type=lambda t: t.split(","), default=list(measure.SWEPT),
                        help=f"nblib.attention keys to sweep, mha, gqa and mqa among them (default {','.join(measure.SWEPT)})")
    parser.add_argument("--gen-tokens", type=int, help="new tokens for cache vs recomputation (default 256)")
    parser.add_argument("--hf-prompt", type=int, help="prompt tokens for the HF comparison (default 128)")
    parser.add_argument("--hf-new-tokens", type=int, help="new tokens for the HF comparison (default 128)")
    parser.add_argument("--gen-repeats", type=int, help="interleaved runs per generation measurement (default 3)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compiled-cells", type=cells, help="batch x context cells of section 4 (default 1x512,8x2048)")
    parser.add_argument("--only", type=ints, default=[1, 2, 3, 4], help="sections to run (default 1,2,3,4)")
    parser.add_argument("--compile-cost", action="store_true", help="measure the compile break-even instead (MHA)")
    parser.add_argument("--cost-batches", type=ints, default=[1, 8], help="batches for --compile-cost (default 1,8)")
    parser.add_argument("--cost-context", type=int, default=512, help="cache length for --compile-cost (default 512)")
    args = parser.parse_args()
    defaults = (dict(batches=[1, 2], contexts=[32, 64], repeats=1, new_tokens=4, gen_tokens=16, hf_prompt=8,
                     hf_new_tokens=8, gen_repeats=1, compiled_cells=[(2, 64)]) if args.quick else
                dict(batches=[1, 8, 32], contexts=[256, 1024, 2048, 4096], repeats=3, new_tokens=16, gen_tokens=256,
                     hf_prompt=128, hf_new_tokens=128, gen_repeats=3, compiled_cells=[(1, 512), (8, 2048)]))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.prefill_repeats = min(args.prefill_repeats, args.repeats)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:  # export_hf (section 2) writes GPT-2's tokenizer: fail now, not after the sweep
        tokenizer.get_encoding()
    except RuntimeError as e:
        sys.exit(f"bench_inference: {e}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = machine.auto_dtype(machine.detect(device.type))
    sizes = shape(args.shape, args.quick)
    if missing := sorted({"mha", "gqa", "mqa"} - set(args.variants)):
        sys.exit(f"bench_inference: --variants must include {', '.join(missing)} (the ratios compare them); "
                 f"known variants: {', '.join(attention.VARIANTS)}")
    try:
        variants = measure.attention_variants(**sizes, keys=args.variants, context_length=max(args.contexts))
    except ValueError as e:  # an unknown key (SettingsError), or K/V heads that do not divide n_head
        sys.exit(f"bench_inference: --variants {','.join(args.variants)}: {e}")
    kv_heads = {label: c.n_kv_head for label, c in variants.items()}
    info = machine.info()
    load_start = load = os.getloadavg()
    print(f"# bench_inference — {info['cpu']} ({info['cpu_cores']} cores, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}), GPU: {info['gpu'] or 'none'}, torch {info['torch']}, {torch.get_num_threads()} threads, "
          f"{device.type} {str(dtype).removeprefix('torch.')}, THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']}")
    if device.type == "cpu" and load[0] >= (os.cpu_count() or 1):
        print(f"# warning: load average {load[0]:.1f} on {os.cpu_count()} cores; threads wait for each other's time "
              "slices, which inflates every op alike and pulls ratios towards 1 (--threads 1 suffers less)")
    print(f"# shape {'quick' if args.quick else args.shape}: {sizes['n_layer']} layers x {sizes['n_head']} heads x "
          f"{sizes['d_model']}, K/V heads {kv_heads}; random weights (speed does not depend on their values)")
    bandwidth = measure.peak_bandwidth(device)
    print(f"# memory bandwidth: {bandwidth[0] / 1e9:.1f} GB/s ({bandwidth[1]})")

    if args.compile_cost:
        cost = bench_compile_cost(args, variants, device, dtype)
        print(json.dumps({"bench": "inference-compile-cost", "machine": info, "threads": torch.get_num_threads(),
                          "load_average_start": load_start, "load_average_end": os.getloadavg(), "device": device.type,
                          "dtype": str(dtype).removeprefix("torch."), "shape": sizes, "context": args.cost_context,
                          "new_tokens": args.new_tokens, "repeats": args.repeats, "batches": cost}))
        return
    df = bench_sweep(args, variants, device, dtype, bandwidth) if 1 in args.only else None
    hf = bench_hf(args, variants["MHA"], device, dtype) if 2 in args.only else {}
    recompute = bench_recompute(args, variants, device, dtype) if 3 in args.only else {}
    compiled = bench_compiled(args, variants, device, dtype, bandwidth) if 4 in args.only else {"rows": []}

    ratios: dict = {"cache_vs_recompute": {k: v["ratio"] for k, v in recompute.items()},
                    "nblib_vs_hf": {k: v["ratio"] for k, v in hf.items()}}
    lines = {}
    batch, context = TARGET_CELL
    if df is not None:
        if not ((df.batch == batch) & (df.context == context)).any():
            batch, context = int(df.batch.max()), int(df.context.max())
        cell = df[(df.batch == batch) & (df.context == context)].set_index("variant")
        speed, step_bytes = cell.decode_tokens_per_s, cell.bytes_per_step
        ratios.update({
            "gqa_vs_mha_decode": float(speed["GQA"] / speed["MHA"]), "gqa_vs_mha_predicted": float(step_bytes["MHA"] / step_bytes["GQA"]),
            "mqa_vs_mha_decode": float(speed["MQA"] / speed["MHA"]), "mqa_vs_mha_predicted": float(step_bytes["MHA"] / step_bytes["MQA"]),
            "mqa_vs_gqa_decode": float(speed["MQA"] / speed["GQA"]),
        })
        for v in ("GQA", "MQA"):
            lines[f"{v} / MHA decode tok/s, batch {batch}, context {context} (eager)"] = (
                f"{ratios[f'{v.lower()}_vs_mha_decode']:.2f}x (bytes predict {ratios[f'{v.lower()}_vs_mha_predicted']:.2f}x)")
        lines[f"MQA / GQA decode tok/s, batch {batch}, context {context}"] = f"{ratios['mqa_vs_gqa_decode']:.2f}x"
    for r in compiled["rows"]:
        if r["variant"] != "MHA":
            lines[f"{r['variant']} / MHA decode tok/s, batch {r['batch']}, context {r['context']} (compiled)"] = (
                f"{r['compiled_vs_mha']:.2f}x (bytes predict {r['predicted_vs_mha']:.2f}x)")
        else:
            lines[f"MHA compiled / eager, batch {r['batch']}, context {r['context']}"] = (
                f"{r['compiled_vs_eager']:.2f}x, MBU {r['eager_mbu']:.2f} -> {r['compiled_mbu']:.2f}")
    if recompute:
        lines[f"KV cache / recompute, {args.gen_tokens} tokens, batch 1"] = ", ".join(f"{k} {v:.1f}x" for k, v in ratios["cache_vs_recompute"].items())
    if hf:
        lines["nblib / HF generate, batch 1 and 8"] = ", ".join(f"b{k} {v:.2f}x" for k, v in ratios["nblib_vs_hf"].items())
    same = {"cache_vs_recompute": {k: v["same_tokens"] for k, v in recompute.items()},
            "nblib_vs_hf": {k: v["same_tokens"] for k, v in hf.items()}}
    targets = {
        "cache_vs_recompute >= 5": all(r >= 5 for r in ratios["cache_vs_recompute"].values()) and all(same["cache_vs_recompute"].values()),
        "nblib_vs_hf >= 1.5, same tokens": all(r >= 1.5 for r in ratios["nblib_vs_hf"].values()) and all(same["nblib_vs_hf"].values()),
    }
    if df is not None:  # issue 20's targets, at batch 8 after 2k tokens
        targets.update({"gqa_vs_mha_decode >= 1.8": ratios["gqa_vs_mha_decode"] >= 1.8,
                        "mqa_vs_mha_decode >= 2.2": ratios["mqa_vs_mha_decode"] >= 2.2})
    table([{"target": k, "measured": v} for k, v in lines.items()],
          "Ratios (targets on a 2-core CPU, fp32: GQA/MHA >= 1.8x, MQA/MHA >= 2.2x, cache >= 5x recompute, nblib >= 1.5x HF)")
    print(json.dumps({
        "bench": "inference", "machine": info, "threads": torch.get_num_threads(),
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "thp_mem_alloc": os.environ["THP_MEM_ALLOC_ENABLE"],
        "device": device.type, "dtype": str(dtype).removeprefix("torch."), "shape": sizes, "kv_heads": kv_heads,
        "bandwidth_GBps": bandwidth[0] / 1e9, "bandwidth_source": bandwidth[1], "ratio_cell": {"batch": batch, "context": context},
        "ratios": ratios, "same_tokens": same, "targets_met": targets,
        "rows": df.to_dict("records") if df is not None else [], "compiled_rows": compiled["rows"],
    }))


if __name__ == "__main__":
    main()

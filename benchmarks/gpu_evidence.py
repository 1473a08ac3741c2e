"""GPU evidence in one command: MHA, GQA and MQA pretrained at the full profile's shapes for a few
hundred steps (one seed), the LoRA + 8-bit fine-tune of our own MHA export, the SDPA kernel each
attention variant ran (training step and decode step, from ``torch.profiler``), training tokens/s
and MFU with and without ``torch.compile``, decode tokens/s and MBU, peak memory, and the compare
report rendered. It calls nblib in-process (no papermill, no ``datasets``, no W&B) and fails (exit
1) when GQA or MQA ran SDPA's math kernel where MHA did not.

    python benchmarks/gpu_evidence.py --out DIR [--steps 300] [--finetune-steps 100]
    python benchmarks/gpu_evidence.py --dry-run --out DIR   # CPU, smoke shapes, every part in about a minute

Writes at most 8 files to ``--out``: evidence.json (every figure, machine, versions, kernels),
evidence.md (summary tables), kernels.txt, log.txt, compare.{html,md,csv}. Data: Dom Casmurro and
Alpaca from ``$NBLIB_MIRROR``, prepared in a temporary working root by nblib's ingest/clean/dialogue.

On the lent GPU machine (no network there): first, here, ``tools/prepare_gpu_evidence.sh`` fills
the ignored ``.gpu-data/`` from ``$NBLIB_MIRROR`` (tokenizers/gpt2.tiktoken 0.8 MB,
gutenberg/pg55752.txt 0.4 MB, qa/alpaca_5000.json 2.1 MB) plus wheels/ (bitsandbytes 0.50.2, 43 MB;
tiktoken and regex for Python 3.12, 2 MB): 47 MB of the 64 MiB ``carry`` allows. Then run with
``carry=[".gpu-data"]``, ``timeout_s=600``:

    pip install -q --no-deps .gpu-data/wheels/bitsandbytes-*.whl; python -c "import tiktoken" 2>/dev/null || pip install -q --no-deps .gpu-data/wheels/{tiktoken,regex}-*.whl; NBLIB_MIRROR=.gpu-data PYTHONPATH=. python benchmarks/gpu_evidence.py --out $OUT

A dry run took 34 s on a quiet 2-core CPU (load average 2.6) and 101 s on a loaded one (load average 5-6).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

NEEDED = ("torch", "numpy", "pandas", "matplotlib", "yaml", "tiktoken", "transformers", "peft")
VARIANTS = {"MHA": None, "GQA": 2, "MQA": 1}  # K/V heads (None: n_head), as notebooks 03/04 and measure.cost_sweep
SDPA_OPS = {  # aten op -> kernel, the most specific name first
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
}
LINES: list[str] = []


def log(message: str) -> None:
    LINES.append(f"[{time.strftime('%H:%M:%S')}] {message}")
    print(LINES[-1], flush=True)


def sizes(dry: bool, steps: int, finetune_steps: int) -> dict[str, Any]:
    """What each part runs: full shapes on a GPU, the smoke profile's with a handful of steps in a dry run."""
    if dry:  # torch.compile's eager backend: dynamo's graph capture without code generation (inductor took
             # 63 s to compile the smoke model on a 2-core CPU, the whole dry run 31 s)
        return dict(profile="smoke", train=dict(max_steps=2, eval_batches=1, sample_tokens=4), finetune_steps=2,
                    alpaca=300, dialogue="smoke", warmup=1, time_steps=1, backend="eager", batches=[2], contexts=[32],
                    new_tokens=4, repeats=1, compare="dry-run", finetune_cost=False,
                    compare_overrides=dict(cost_shapes=["full"], cost_contexts=[128]))
    return dict(profile="full", train=dict(max_steps=steps), finetune_steps=finetune_steps, alpaca=5000, dialogue="full",
                warmup=3, time_steps=20, backend="inductor", batches=[1, 32], contexts=[256, 2048], new_tokens=16,
                repeats=3, compare="full", finetune_cost=True, compare_overrides={})


def prepare_data(s: dict[str, Any]) -> dict[str, Any]:
    """Stages 01-02 and the token files, in-process: Dom Casmurro and Alpaca from the mirror."""
    from nblib import clean, config, data, dialogue, ingest

    ingest.ingest(config.settings("ingest", "smoke", collection=False, qa={"alpaca": s["alpaca"]}))
    corpus = clean.build_corpus(config.settings("clean", "smoke"))
    paths = config.paths()
    dialogue.prepare(paths.raw / "qa", paths.dialogues, config.settings("dialogue", s["dialogue"], targets={"alpaca": None}))
    tokens = data.build_token_files(paths)
    return {"corpus_splits": corpus["splits"], "tokens": {k: v["tokens"] for k, v in tokens["splits"].items()}}


def train_settings(s: dict[str, Any], label: str) -> dict[str, Any]:
    from nblib import config

    n_head = config.settings("train", s["profile"])["n_head"]
    return config.settings("train", s["profile"], seeds=[1337], wandb=False, **s["train"],
                           n_kv_head=VARIANTS[label] or n_head)


def pretrain(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from nblib import train

    out = {}
    for label in VARIANTS:
        summary = train.run(train_settings(s, label), progress=False)
        out[label] = summary
        log(f"pretrained {label}: {summary['steps']} steps, val loss {summary['best_val_loss']:.3f}, "
            f"{summary['train_tokens_per_s'] or 0:,.0f} tok/s, peak {summary['peak_memory_bytes'] / 2**20:,.0f} MiB")
    return out


def classify(ops: set[str]) -> str:
    """The SDPA kernel(s) a profile shows, named; math also when attention ran as bmm + softmax."""
    found = sorted({kernel for op, kernel in SDPA_OPS.items() if op in ops})
    if not found and "aten::bmm" in ops and ({"aten::softmax", "aten::_softmax"} & ops):
        found = ["math (bmm + softmax)"]
    return " + ".join(found) or "none found"


def profiled(fn: Callable[[], Any], device: Any) -> dict[str, Any]:
    """The SDPA-related aten ops and CUDA kernels one call of ``fn`` ran."""
    from torch.profiler import ProfilerActivity, profile

    from nblib import machine

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        machine.sync(device)
    ops = {e.key for e in prof.key_averages()}
    words = ("attention", "attn", "fmha", "flash", "sdpa", "softmax", "bmm")
    return {"kernel": classify(ops), "ops": sorted(k for k in ops if k.startswith("aten::") and any(w in k for w in words)),
            "cuda_kernels": sorted({e.key for e in prof.key_averages() if e.device_type.name == "CUDA"
                                    and any(w in e.key.lower() for w in words)})[:8]}


def kernels(s: dict[str, Any], decode_batch: int) -> dict[str, dict[str, Any]]:
    """Per variant: what SDPA ran in a training step (train settings, autocast) and a decode step (cache filled)."""
    import torch
    from nblib import machine, measure, train
    from nblib.model import GPT

    dev = machine.detect()
    out = {}
    for label in VARIANTS:
        cfg = train_settings(s, label)
        torch.manual_seed(0)
        model = GPT(train.model_config(cfg)).to(dev.torch).train()
        x = torch.randint(0, 50257, (min(cfg["batch_size"], 8), cfg["context_length"]), device=dev.torch)

        def step() -> None:
            with machine.policy(cfg["dtype"], False, dev).autocast_context():
                _, loss = model(x, x)
            loss.backward()

        dmodel = measure.random_model(model.config, dev.torch, machine.auto_dtype(dev))
        cache = dmodel.new_cache(decode_batch, cfg["context_length"])
        prompt = torch.randint(0, 50257, (decode_batch, cfg["context_length"] // 2), device=dev.torch)
        step()  # warm-up
        out[label] = {"train": profiled(step, dev.torch)}
        with torch.inference_mode():
            token = measure.prefill(dmodel, prompt, cache)
            measure.decode(dmodel, cache, token, 1)  # warm-up
            out[label]["decode"] = profiled(lambda: measure.decode(dmodel, cache, token, 1), dev.torch)
        log(f"kernels {label}: training {out[label]['train']['kernel']}, decode {out[label]['decode']['kernel']}")
    return out


def math_check(k: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Fails when GQA or MQA ran the math kernel in a phase where MHA did not."""
    bad = [f"{label} {phase}: {k[label][phase]['kernel']} (MHA: {k['MHA'][phase]['kernel']})"
           for label in ("GQA", "MQA") for phase in ("train", "decode")
           if "math" in k[label][phase]["kernel"] and "math" not in k["MHA"][phase]["kernel"]]
    return {"passed": not bad, "failures": bad,
            "rule": "GQA and MQA must not run SDPA's math kernel where MHA runs a fused one"}


def throughput(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Training tokens/s, MFU and peak memory of one micro-batch step, eager and compiled, per variant."""
    import torch
    from nblib import machine, optim, train
    from nblib.model import GPT

    dev, rows = machine.detect(), []
    for label in VARIANTS:
        cfg = train_settings(s, label)
        for compiled in (False, True):
            torch.manual_seed(0)
            model = GPT(train.model_config(cfg)).to(dev.torch).train()
            policy = machine.policy(cfg["dtype"], compiled, dev)
            fwd = torch.compile(model, backend=s["backend"]) if policy.compile else model
            opt, scaler = optim.configure(model, cfg, dev.torch), policy.grad_scaler()
            x = torch.randint(0, 50257, (cfg["batch_size"], cfg["context_length"] + 1), device=dev.torch)

            def step() -> None:
                with policy.autocast_context():
                    _, loss = fwd(x[:, :-1], x[:, 1:])
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)

            t0 = time.perf_counter()
            for _ in range(s["warmup"]):  # (and compilation)
                step()
            warm = time.perf_counter() - t0
            machine.reset_peak_memory(dev)
            machine.sync(dev)
            t0 = time.perf_counter()
            for _ in range(s["time_steps"]):
                step()
            machine.sync(dev)
            tok_s = s["time_steps"] * x[:, :-1].numel() / (time.perf_counter() - t0)
            mfu = policy.mfu(model.flops_per_token(), tok_s)
            rows.append({"variant": label, "compile": policy.compile, "backend": s["backend"] if policy.compile else None,
                         "dtype": policy.dtype_name, "batch": cfg["batch_size"], "context": cfg["context_length"],
                         "tokens_per_s": tok_s, "mfu": mfu, "warmup_s": warm, "peak_memory_bytes": machine.peak_memory(dev)})
            log(f"training step {label} compile={policy.compile}: {tok_s:,.0f} tok/s, MFU "
                f"{f'{mfu:.1%}' if mfu is not None else 'n/a'}, warm-up {warm:.1f} s")
            del model, fwd, opt
    return rows


def decode_speed(s: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """measure.decode_sweep over the trained shapes: decode tokens/s and MBU against the bandwidth."""
    from nblib import measure, train

    configs = {label: train.model_config({**train_settings(s, label), "dropout": 0.0}) for label in VARIANTS}
    df = measure.decode_sweep(configs, s["batches"], s["contexts"], s["new_tokens"], s["repeats"], log=log)
    return df.drop(columns="decode_repeats").to_dict("records"), dict(df.attrs)


def compiled_decode(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Greedy decoding compiled (CUDA graphs) vs eager at the trained shapes, in the run's dtype: whether the
    tokens are identical, the compile seconds and ms per token of each (what nblib.decode.use_compile waits for)."""
    import torch
    from nblib import machine, measure, train

    device = machine.detect().torch
    dtype = machine.auto_dtype(machine.detect())
    rows = []
    for label in VARIANTS if s["profile"] != "smoke" else ["MHA"]:  # a dry run compiles one graph, on a CPU
        model = measure.random_model(train.model_config({**train_settings(s, label), "dropout": 0.0}), device, dtype)
        for batch in s["batches"]:
            idx = torch.randint(0, model.config.vocab_size, (batch, 16), device=device, generator=torch.Generator(device).manual_seed(0))
            row: dict[str, Any] = {"variant": label, "batch": batch, "new_tokens": s["new_tokens"]}
            tokens = {}
            for compiled in (False, True):
                t0 = time.perf_counter()
                model.generate(idx, 2, temperature=0.0, compile=compiled)  # warm-up: the compile happens here
                torch.cuda.synchronize(device) if device.type == "cuda" else None
                row[f"{'compiled' if compiled else 'eager'}_warmup_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                tokens[compiled] = model.generate(idx, s["new_tokens"], temperature=0.0, compile=compiled)
                torch.cuda.synchronize(device) if device.type == "cuda" else None
                row[f"{'compiled' if compiled else 'eager'}_ms_per_token"] = 1e3 * (time.perf_counter() - t0) / s["new_tokens"]
            row["identical_tokens"] = bool(torch.equal(tokens[False], tokens[True]))
            log(f"decode {label} batch {batch}: eager {row['eager_ms_per_token']:.2f} ms/token, compiled "
                f"{row['compiled_ms_per_token']:.2f} (compile {row['compiled_warmup_s']:.1f} s), identical {row['identical_tokens']}")
            rows.append(row)
    return rows


def finetune_settings(s: dict[str, Any], base_model: str) -> dict[str, Any]:
    from nblib import config

    n = s["finetune_steps"]
    return config.settings("finetune", s["profile"], variant="lora-8bit", base_model=base_model, seeds=[1234], steps=n,
                           eval_steps=n, logging_steps=1, eval_dialogues=16 if s["profile"] == "smoke" else 200,
                           warmup_steps=min(5, n), max_new_tokens=8, wandb=False)


def finetune_8bit(s: dict[str, Any], mha: dict[str, Any]) -> dict[str, Any]:
    """The LoRA + 8-bit fine-tune on our MHA export, or why it was skipped."""
    from nblib import finetune, machine

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed (pip install .gpu-data/wheels/bitsandbytes-*.whl)"}
    try:
        machine.check_8bit()
    except RuntimeError as e:
        return {"skipped": str(e)}
    summary = finetune.run(finetune_settings(s, mha["hf_export"]))
    keys = ("steps", "base_eval_loss", "eval_loss", "merged_eval_loss", "compute_dtype", "train_samples_per_s",
            "wall_seconds", "peak_memory_bytes", "trainable_params", "total_params")
    log(f"fine-tuned lora-8bit: eval loss {summary['base_eval_loss']:.3f} -> {summary['eval_loss']:.3f}")
    return {k: summary.get(k) for k in keys}


def render_report(s: dict[str, Any], out: Path) -> list[str]:
    """Notebook 06's calls, in-process: compare.{html,md,csv} written to ``out``."""
    from nblib import config, finetune, measure, report

    cfg = config.settings("compare", s["compare"], **s["compare_overrides"])
    comparison = report.load(cfg["runs"], allow_mismatch=cfg["allow_mismatch"])
    models = measure.load_models(comparison.pretrain, cfg["device"])
    timings = measure.generation(models, cfg["speed_prompt"], cfg["batch_sizes"], cfg["gen_new_tokens"], cfg["gen_repeats"])
    training = measure.training_steps({label: g.summary["config"] for label, g in comparison.pretrain.items()},
                                      cfg["train_steps"], cfg["gen_repeats"], cfg["device"])
    pretrain = report.pretrain_table(comparison, report.measured_rows(timings, training), cfg["contexts"])
    samples = measure.sample_generations(models, cfg["prompts"], cfg["sample_new_tokens"], cfg["temperature"],
                                         cfg["top_k"], cfg["seed"])
    sweep = measure.cost_sweep(cfg["cost_shapes"], cfg["cost_contexts"], cfg["cost_batch"], cfg["cost_repeats"],
                               cfg["device"], cfg["cost_new_tokens"])
    cost = report.cost_table(sweep, 2048 if 2048 in cfg["cost_contexts"] else max(cfg["cost_contexts"]))
    ft_cost = None  # a dry run leaves out GPT-2 small's fine-tuning cost: a 124M model built and loaded 3 times
    if s["finetune_cost"]:
        variants = [v for v in cfg["cost_variants"] if finetune.variant(v).mode != "8bit" or importlib.util.find_spec("bitsandbytes")]
        ft_cost = measure.finetune_cost(config.settings("finetune", "full"), variants, cfg["cost_finetune_steps"],
                                        cfg["cost_finetune_batch"], cfg["cost_finetune_length"], cfg["device"])
    rep = report.compose(comparison, cfg, pretrain, samples, report.finetune_table(comparison), sweep, cost, ft_cost)
    return sorted(p.name for p in rep.write(out).values())


def versions() -> dict[str, Any]:
    import torch

    out = {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "tiktoken"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def md_table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    def cell(k: str, v: Any) -> str:
        if v is not None and k.endswith("_bytes"):
            return f"{v / 2**20:,.1f} MiB" if v >= 2**20 else f"{v / 2**10:,.1f} KiB"
        return f"{v:,.3g}" if isinstance(v, float) else "n/a" if v is None else str(v)

    return "\n".join([" | ".join(keys), " | ".join("---" for _ in keys)] + [" | ".join(cell(k, r.get(k)) for k in keys) for r in rows])


def write_outputs(out: Path, ev: dict[str, Any]) -> None:
    """evidence.json, evidence.md, kernels.txt and log.txt (the compare report is already there)."""
    k = ev["kernels"]
    (out / "kernels.txt").write_text("".join(
        f"{label} {phase}: {k[label][phase]['kernel']}\n  ops: {', '.join(k[label][phase]['ops'])}\n"
        f"  CUDA kernels: {', '.join(k[label][phase]['cuda_kernels']) or '-'}\n"
        for label in k for phase in ("train", "decode")) + f"math-kernel check: {ev['math_check']}\n")
    ft = ev["finetune_lora_8bit"]
    md = [f"# GPU evidence ({'dry run, ' if ev['dry_run'] else ''}{ev['device']}, {ev['machine'].get('gpu') or ev['machine']['cpu']})",
          f"\nWall time {ev['wall_seconds']:.0f} s; torch {ev['versions']['torch']}; bandwidth for MBU "
          f"{ev['bandwidth']['peak_bandwidth_GBps']:.1f} GB/s ({ev['bandwidth']['bandwidth_source']}).",
          "\n## SDPA kernels\n", md_table([{"variant": v, "training": k[v]["train"]["kernel"], "decode": k[v]["decode"]["kernel"]}
                                            for v in k], ["variant", "training", "decode"]),
          f"\nMath-kernel check: {'passed' if ev['math_check']['passed'] else 'FAILED: ' + '; '.join(ev['math_check']['failures'])}",
          "\n## Pretraining runs\n", md_table([{"variant": v, **r} for v, r in ev["pretrain"].items()],
                                              ["variant", "steps", "best_val_loss", "train_tokens_per_s", "peak_memory_bytes"]),
          "\n## Training step, eager vs torch.compile\n", md_table(ev["training_step"], [
              "variant", "compile", "backend", "dtype", "batch", "context", "tokens_per_s", "mfu", "warmup_s", "peak_memory_bytes"]),
          "\n## Decode\n", md_table(ev["decode"], ["variant", "batch", "context", "decode_tokens_per_s", "ms_per_token",
                                                   "kv_cache_bytes", "bandwidth_GBps", "mbu"]),
          "\n## Decode compiled (CUDA graphs) vs eager, greedy, same tokens?\n", md_table(ev["compiled_decode"], [
              "variant", "batch", "new_tokens", "eager_ms_per_token", "compiled_ms_per_token", "compiled_warmup_s", "identical_tokens"]),
          "\n## LoRA + 8-bit fine-tune of our MHA export\n",
          f"Skipped: {ft['skipped']}" if "skipped" in ft else md_table([ft], list(ft)),
          f"\nReport: {', '.join(ev['report'])}\n"]
    (out / "evidence.md").write_text("\n".join(md))
    (out / "evidence.json").write_text(json.dumps(ev, indent=1, default=str))
    (out / "log.txt").write_text("\n".join(LINES) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the (at most 8) output files")
    parser.add_argument("--dry-run", action="store_true", help="CPU, smoke shapes, a handful of steps: every part in minutes")
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps per variant (default 300)")
    parser.add_argument("--finetune-steps", type=int, default=100, help="LoRA + 8-bit fine-tune steps (default 100)")
    args = parser.parse_args()
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        return f"gpu_evidence: missing Python packages {', '.join(missing)}: pip install --no-deps .gpu-data/wheels/*.whl " \
               "(tools/prepare_gpu_evidence.sh downloads them) or pip install -r requirements.txt"
    import torch
    from nblib import config, machine

    if config.mirror() is None:
        return "gpu_evidence: NBLIB_MIRROR is not set: point it at the offline data (shared/data, or .gpu-data on the GPU machine)"
    if not args.dry_run and not torch.cuda.is_available():
        return "gpu_evidence: no CUDA GPU here: run with --dry-run on a CPU, or on a GPU machine"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    s = sizes(args.dry_run, args.steps, args.finetune_steps)
    started, phase = time.perf_counter(), "set-up"
    ev: dict[str, Any] = {"bench": "gpu_evidence", "dry_run": args.dry_run, "device": machine.detect().type,
                          "machine": machine.info(), "versions": versions(), "settings": s}
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-evidence-") as home:
            os.environ["NBLIB_HOME"] = home  # a fresh working root: never mixes with real runs
            log(f"working root {home}, {'dry run' if args.dry_run else 'GPU run'} on {ev['device']}")
            steps = [("data", lambda: prepare_data(s)), ("pretrain", lambda: pretrain(s)),
                     ("kernels", lambda: kernels(s, s["batches"][-1])), ("training_step", lambda: throughput(s)),
                     ("decode", lambda: decode_speed(s)), ("compiled_decode", lambda: compiled_decode(s)),
                     ("finetune_lora_8bit", lambda: finetune_8bit(s, ev["pretrain"]["MHA"])),
                     ("report", lambda: render_report(s, out))]
            for phase, fn in steps:
                t0 = time.perf_counter()
                ev[phase] = fn()
                ev.setdefault("phase_seconds", {})[phase] = time.perf_counter() - t0
                log(f"{phase} done in {ev['phase_seconds'][phase]:.1f} s")
        ev["decode"], ev["bandwidth"] = ev["decode"]
        ev["pretrain"] = {v: {k: r.get(k) for k in ("steps", "best_val_loss", "final_val_loss", "train_tokens_per_s",
                                                     "peak_memory_bytes", "compute_dtype", "wall_seconds")}
                          for v, r in ev["pretrain"].items()}
        ev["math_check"] = math_check(ev["kernels"])
    except Exception as e:  # noqa: BLE001 - any failure is reported with where it happened, traceback in log.txt
        LINES.append(traceback.format_exc())
        (out / "log.txt").write_text("\n".join(LINES) + "\n")
        (out / "evidence.json").write_text(json.dumps({**ev, "error": f"{phase}: {e}"}, indent=1, default=str))
        return f"gpu_evidence: failed in {phase}: {type(e).__name__}: {e} (traceback in {out / 'log.txt'}, " \
               f"the figures measured before it in {out / 'evidence.json'})"
    ev["wall_seconds"] = time.perf_counter() - started
    write_outputs(out, ev)
    check = ev["math_check"]
    print("\n" + (out / "evidence.md").read_text())
    print(f"wrote {len(list(out.iterdir()))} files to {out} in {ev['wall_seconds']:.0f} s")
    print(json.dumps({"bench": "gpu_evidence", "dry_run": args.dry_run, "math_check_passed": check["passed"],
                      "wall_seconds": ev["wall_seconds"], "out": str(out)}))
    if not check["passed"]:
        return "gpu_evidence: FAILED: " + "; ".join(check["failures"]) + f" ({check['rule']}; see {out / 'kernels.txt'})"
    return 0


if __name__ == "__main__":
    sys.exit(main())

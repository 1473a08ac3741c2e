"""16-bit on this machine's CPU: the measurement behind ``nblib.machine.half_compute``.

    python benchmarks/bench_half.py [--reps 5] [--quick] [--only 1,2]

1. One GPT-2-small MLP matmul (``[512, 768] @ [768, 3072]``) and the ``addmm`` of a 2048-token
   batch, in float32, bfloat16 and float16, interleaved, medians of ``--reps``: each 16-bit time as
   a multiple of float32's, beside the CPU's 16-bit units as ``nblib.machine`` reads them from its
   flags and the rule's choice for the ``lora-16bit`` variant.
2. One LoRA training step (forward, backward, AdamW) on a GPT-2-small-shaped model (124M, random
   init, built here) with its base stored in bf16 and computed in bf16 (what a CPU with units runs),
   stored in bf16 and computed in fp32 (``nblib.ftbase.compute_in_float32``), and stored in fp32:
   milliseconds per step and the frozen base's MiB.

Ends with one JSON line. Writes nothing outside a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nblib import config, finetune, machine
from nblib.ftbase import compute_in_float32
from nblib.ftmethods import wrap_lora

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(cases: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each case, the cases taking turns (a load swing hits all of them alike)."""
    for fn in cases.values():  # warm-up: first-call allocation and kernel choice
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def matmuls(reps: int, quick: bool) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    shapes = {"mm [512,768]@[768,3072]": (512, 768, 3072), "addmm [2048,768]@[768,3072]": (2048, 768, 3072)}
    if quick:
        shapes = {"mm [128,256]@[256,512]": (128, 256, 512)}
    out = {}
    print("\n## 1. Matmul per dtype (ms, median, interleaved)\n")
    print("| shape | float32 | bfloat16 | float16 | bf16 / fp32 | fp16 / fp32 |\n|---|---|---|---|---|---|")
    for label, (m, k, n) in shapes.items():
        cases = {}
        for dtype in DTYPES:
            a, b, bias = (torch.randn(*s, generator=g).to(dtype) for s in ((m, k), (k, n), (n,)))
            cases[str(dtype).removeprefix("torch.")] = (lambda a=a, b=b, bias=bias: torch.addmm(bias, a, b)) \
                if label.startswith("addmm") else (lambda a=a, b=b: a @ b)
        ms = {k: v * 1e3 for k, v in interleaved(cases, reps).items()}
        out[label] = {**ms, "bf16_ratio": ms["bfloat16"] / ms["float32"], "fp16_ratio": ms["float16"] / ms["float32"]}
        print(f"| {label} | {ms['float32']:.2f} | {ms['bfloat16']:.2f} | {ms['float16']:.2f} | "
              f"{out[label]['bf16_ratio']:.1f}x | {out[label]['fp16_ratio']:.1f}x |")
    return out


def lora_steps(reps: int, length: int) -> dict[str, dict[str, float]]:
    cfg = {**config.settings("finetune", "smoke"), "lora_targets": ["c_attn", "c_proj", "c_fc"]}
    x = torch.randint(0, 50257, (1, length), generator=torch.Generator().manual_seed(0))
    cpu = machine.detect("cpu")
    builds = {"bf16 stored, bf16 compute": ("16bit", False), "bf16 stored, fp32 compute": ("16bit", True),
              "fp32 stored, fp32 compute": ("32bit", False)}
    out = {}
    with tempfile.TemporaryDirectory(prefix="nblib-bench-half-") as tmp:
        base = str(finetune.random_base(Path(tmp) / "gpt2-small"))
        models, cases = {}, {}
        for label, (mode, upcast) in builds.items():
            tok = finetune.load_tokenizer(base)
            model = finetune.load_base(base, mode, cpu)
            ids = finetune.add_special_tokens(model, tok)
            model = wrap_lora(model, cfg, ids, "32bit")  # "32bit": no choice made for this CPU; each build says its own
            if upcast:
                compute_in_float32(model, machine.Device("cpu", cpu.name))  # a CPU without 16-bit units
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

            def step(model=model, opt=opt) -> None:
                model(input_ids=x, labels=x).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            models[label], cases[label] = model, step
        seconds = interleaved(cases, reps)
    print(f"\n## 2. LoRA training step on GPT-2 small (124M), 1 x {length} tokens (ms, median, interleaved)\n")
    print("| base | ms per step | x fp32 | frozen base MiB |\n|---|---|---|---|")
    fp32 = seconds["fp32 stored, fp32 compute"]
    for label, model in models.items():
        mib = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad) / 2**20
        out[label] = {"ms": seconds[label] * 1e3, "vs_fp32": seconds[label] / fp32, "frozen_mib": mib}
        print(f"| {label} | {seconds[label] * 1e3:.0f} | {seconds[label] / fp32:.2f}x | {mib:.0f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--length", type=int, default=128, help="tokens per LoRA step (section 2)")
    parser.add_argument("--quick", action="store_true", help="small matmul shapes (a smoke test of the script)")
    parser.add_argument("--only", default="1,2", help="sections to run, e.g. 1")
    args = parser.parse_args()
    info, cpu = machine.info(), machine.detect("cpu")
    print(f"# bench_half — {info['cpu']} ({info['cpu_cores']} cores), torch {info['torch']}, "
          f"{torch.get_num_threads()} threads, load average {info['load_average']}")
    print(f"CPU 16-bit units from its flags: {', '.join(cpu.half_units) or 'none'} "
          f"(torch's CPU capability: {torch.backends.cpu.get_cpu_capability()}); lora-16bit here: "
          f"{finetune.compute_dtype('16bit', cpu)}")
    sections = set(args.only.split(","))
    result = {"cpu": info["cpu"], "half_units": list(cpu.half_units), "load_average": info["load_average"]}
    if "1" in sections:
        result["matmul"] = matmuls(args.reps, args.quick)
    if "2" in sections:
        result["lora_step"] = lora_steps(args.reps, args.length)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Fine-tune training step: the output layer on every position (the model's own loss) against the
assistant's labelled positions only (``nblib.ftscore.label_nll``, what the Trainer uses), interleaved.

    NBLIB_HOME=<a working root that ran the smoke pipeline's stages 01-03> \\
        python benchmarks/bench_finetune.py [--profile smoke] [--variants lora-8bit,full] [--reps 10]
        [--base-model runs/pretrain-mha/seed-1337/hf]

For each variant: the profile's base, precision and first ``batch_size`` training dialogues; forward +
backward in eval mode (no dropout, so the two losses and gradients must agree: the largest relative
gradient difference is printed), median of ``--reps`` interleaved steps, the machine and its load
average. Ends with one JSON line. Writes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from nblib import config, dialogue, finetune, ftscore, machine


def model_and_batch(cfg: dict) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The variant's model as ``finetune.setup`` builds it, and one training batch (no run folder)."""
    v = finetune.variant(cfg["variant"])
    config.set_seed(cfg["seeds"][0])
    tok = finetune.load_tokenizer(cfg["base_model"])
    model = finetune.load_base(cfg["base_model"], v.mode)
    ids = finetune.add_special_tokens(model, tok)
    model.config.use_cache = False
    examples, _ = ftscore.encode(dialogue.load(config.paths().dialogues, "train"), tok,
                                 min(cfg["max_length"], model.config.n_positions))
    model = v.method.prepare(model, cfg, tok, ids, examples, v.mode)
    return model.eval(), ftscore.Collator(tok.pad_token_id)(examples[: cfg["batch_size"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--variants", default=",".join(finetune.PIPELINE))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--base-model", help="hub name or local HF folder (default: the profile's)")
    args = parser.parse_args()
    info = machine.info()
    print(f"# bench_finetune — {info['cpu']} ({info['cpu_cores']} cores), torch {info['torch']}, "
          f"{torch.get_num_threads()} threads, profile {args.profile}")
    out = {}
    for name in args.variants.split(","):
        cfg = config.settings("finetune", args.profile, variant=name, base_model=args.base_model)
        model, batch = model_and_batch(cfg)
        losses = {"every position": lambda: model(**batch).loss,
                  "labelled rows": lambda: ftscore.label_nll(model, batch)[0].mean()}

        def step(label: str) -> tuple[float, dict[str, torch.Tensor]]:
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            losses[label]().backward()
            seconds = time.perf_counter() - t0
            return seconds, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

        _, ref = step("every position")
        ref = {n: g.clone() for n, g in ref.items()}
        _, got = step("labelled rows")
        diff = max(((got[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() for n, g in ref.items())
        times: dict[str, list[float]] = {label: [] for label in losses}
        loads = [os.getloadavg()[0]]
        for rep in range(args.reps):
            for label in losses if rep % 2 == 0 else list(losses)[::-1]:
                times[label].append(step(label)[0])
            loads.append(os.getloadavg()[0])
        med = {label: statistics.median(ts) for label, ts in times.items()}
        labelled, positions = int((batch["labels"][:, 1:] != -100).sum()), batch["labels"][:, 1:].numel()
        print(f"\n{name}: batch {tuple(batch['input_ids'].shape)}, {labelled} of {positions} next tokens labelled, "
              f"max relative gradient difference {diff:.1e}, load average {min(loads):.2f}-{max(loads):.2f}")
        for label, ts in times.items():
            print(f"  {label:15s} {1000 * med[label]:7.1f} ms/step (range {1000 * min(ts):.0f}-{1000 * max(ts):.0f})")
        print(f"  speed-up {med['every position'] / med['labelled rows']:.2f}x")
        out[name] = {"ms_every_position": round(1000 * med["every position"], 1),
                     "ms_labelled_rows": round(1000 * med["labelled rows"], 1),
                     "speedup": round(med["every position"] / med["labelled rows"], 2),
                     "labelled": labelled, "positions": positions, "max_grad_rel_diff": diff,
                     "loadavg_1m": [min(loads), max(loads)]}
    print(json.dumps({"bench": "finetune_head_rows", "profile": args.profile, "reps": args.reps, "cpu": info["cpu"],
                      "threads": torch.get_num_threads(), "variants": out}))


if __name__ == "__main__":
    main()

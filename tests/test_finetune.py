"""nblib.finetune on a tiny real GPT2LMHeadModel: int8 layers, label masks, summaries, resume, merge, variants."""
from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from nblib import config, dialogue, finetune, ftmethods, ftscore, machine, plots, runs
from nblib.files import read_json, read_jsonl
from nblib.tokenizer import EOT, EOT_ID, hf_tokenizer
from helpers import tiny_finetune_root

BASE = "runs/pretrain-mha/hf"
QUESTIONS = ["What is the capital of France?", "Name a fruit."]
SUMMARY_KEYS = set(runs.COMMON) | set(runs.FINETUNE)


def small(**overrides):
    """Smoke settings cut down to seconds: 8 steps of 4 dialogues, eval every 4."""
    base = dict(
        steps=8, eval_steps=4, logging_steps=2, batch_size=4, eval_batch_size=8, eval_dialogues=12,
        warmup_steps=1, lora_lr=1e-2, full_lr=1e-3, questions=QUESTIONS, max_new_tokens=6, wandb=False, base_model=BASE,
        lora_answer_rows=0,
    )
    return config.settings("finetune", "smoke", **{**base, **overrides})


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def root(tmp_path_factory, mirror):
    """A working root with a tiny random GPT-2 at runs/pretrain-mha/hf and 200 short Alpaca dialogues."""
    root = tmp_path_factory.mktemp("finetune")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NBLIB_HOME", str(root))
        for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_SILENT"):  # restored after the module
            mp.setenv(var, "offline" if var == "WANDB_MODE" else "x")
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("WANDB_API_KEY", raising=False)
        tiny_finetune_root(root, mirror, BASE)
        yield root


@pytest.fixture(scope="module")
def lora8(root):
    """One lora-8bit run, step by step, with W&B offline and warnings recorded."""
    cfg = small(wandb=True)
    records = _Records()
    logging.getLogger("transformers").addHandler(records)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = finetune.setup(cfg)
        before = finetune.evaluate(s)
        trained = finetune.train(s)
        after = finetune.evaluate(s)
        summary = finetune.finish(s, before, after, trained)
    logging.getLogger("transformers").removeHandler(records)
    messages = [str(w.message) for w in caught] + records.messages
    return {"cfg": cfg, "s": s, "summary": summary, "messages": messages}


# --- pieces --------------------------------------------------------------------------------------


def test_load_in_8bit_gives_int8_layers_and_smaller_footprint(root):
    model = finetune.load_base(BASE, "8bit")
    int8 = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert sorted(n.split(".", 3)[-1] for n in int8) == sorted(
        ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] * 2
    )
    assert all(m.weight.dtype == torch.int8 for m in int8.values())
    assert model.lm_head.weight.dtype == torch.float32  # the tied output layer stays full precision
    assert finetune.footprint(BASE, "8bit") < finetune.footprint(BASE, "32bit")


def test_role_markers_start_at_the_mean_row(root):
    model = finetune.load_base(BASE, "32bit")
    tok = finetune.load_tokenizer(BASE)
    mean = model.get_input_embeddings().weight[:50257].mean(0).detach().clone()
    ids = finetune.add_special_tokens(model, tok)
    assert ids == [50257, 50258] and len(tok) == 50259
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == 50259
    assert torch.allclose(emb[ids], mean.expand(2, -1))
    assert model.get_output_embeddings().weight is emb
    assert tok.pad_token_id == EOT_ID == model.config.pad_token_id


def test_collator_keeps_eos_labels_when_pad_is_eos():
    tok = hf_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(dialogue.SPECIAL_TOKENS)})
    tok.pad_token = EOT
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    long = short + [{"role": "user", "content": "How are you today, my friend?"},
                    {"role": "assistant", "content": "Fine, thanks."}]
    examples = [dict(zip(("input_ids", "labels"), dialogue.tokenize(t, tok))) for t in (short, long)]
    batch = finetune.Collator(tok.pad_token_id)([examples[0], examples[1]])
    n_short, width = len(examples[0]["input_ids"]), len(examples[1]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    # padding: EOS id in the inputs, out of attention and out of the loss
    assert batch["input_ids"][0, n_short:].eq(EOT_ID).all()
    assert batch["attention_mask"][0, n_short:].eq(0).all() and batch["attention_mask"][0, :n_short].eq(1).all()
    assert batch["labels"][0, n_short:].eq(-100).all()
    # every answer's closing EOS is still a label
    assert batch["labels"][0].eq(EOT_ID).sum() == 1
    assert batch["labels"][1].eq(EOT_ID).sum() == 2


@pytest.mark.parametrize("bad, message", [
    ({"steps": 0}, "steps=0 must be an integer >= 1"),
    ({"batch_size": -4}, "batch_size=-4 must be an integer >= 1"),
    ({"lora_lr": "abc"}, "lora_lr='abc' must be a number > 0"),
    ({"lr_sweep": [1.0, -2]}, r"lr_sweep=\[1.0, -2\] must be a list whose items are each a number > 0"),
])
def test_bad_settings_are_refused_before_any_work(bad, message):
    with pytest.raises(config.SettingsError, match=message):
        small(**bad)


def test_lora_on_the_tied_output_layer_is_refused(root):
    s_cfg = small(lora_targets=["c_attn", "lm_head"])
    with pytest.raises(ValueError, match=r"lora_targets \['lm_head'\]: GPT-2's output layer is the token embedding"):
        finetune.setup(s_cfg)


def test_setup_errors(root, home):
    with pytest.raises(config.SettingsError, match="variant='lora-3bit' must be one of 'lora-8bit'"):
        small(variant="lora-3bit")
    with pytest.raises(ValueError, match="unknown variant 'lora-3bit'"):
        finetune.setup({**small(), "variant": "lora-3bit"})
    with pytest.raises(FileNotFoundError, match="02_clean"):
        finetune.setup(small())  # `home` is an empty working root
    with pytest.raises(FileNotFoundError, match="03_train_mha"):
        finetune.resolve_base("runs/pretrain-mha/hf")
    with pytest.raises(ValueError, match="unknown precision mode"):
        finetune.load_base(str(root / BASE), "2bit")


def test_cli_without_dialogues_names_the_file_and_the_notebook(home, capsys):
    """No traceback: the missing split, the notebook that writes it, exit 2 (as for bad settings)."""
    assert finetune.main(["--profile", "smoke", "-p", "wandb=false"]) == 2
    assert capsys.readouterr().err == (
        "python -m nblib.finetune: error: data/processed/dialogues/train.jsonl not found: notebooks/02_clean.ipynb "
        "(the clean stage) writes the dialogue splits; run it first\n")
    assert not (home / "runs" / "finetune-lora-8bit").exists()  # refused before the run folder is made


# --- the lora-8bit run -----------------------------------------------------------------------------


def test_lora_8bit_trains_int8_base_and_beats_it(lora8):
    s, summary = lora8["s"], lora8["summary"]
    int8 = [m for m in s.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(int8) == 8 and all(m.weight.dtype == torch.int8 and not m.weight.requires_grad for m in int8)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["finished"] and summary["stage"] == "finetune" and summary["mode"] == "8bit" and summary["lora"]
    assert summary["folder"] == "runs/finetune-lora-8bit/seed-1234" and summary["label"] == "LoRA + 8-bit"
    assert summary["baselines"] == ["full", "lora-16bit", "lora-32bit"] and summary["learning_rate"] == 1e-2
    assert summary["compute_dtype"] == "int8 matmul, float16 inputs"
    assert summary["eval_loss"] < summary["base_eval_loss"]
    assert 0 < summary["eval_bpb"] and summary["base_eval_bpb"] > summary["eval_bpb"]
    # the merged folder (an adapter folded into a 32-bit base) scores about what the int8 model did
    assert summary["merged_eval_loss"] == pytest.approx(summary["eval_loss"], abs=0.05)
    assert "32-bit copy of the base" in summary["merged_weights"]
    assert set(summary["data"]["dialogues_sha256"]) == {"train", "val", "test"} and summary["data"]["base_sha256"]
    assert summary["eval_ppl"] == pytest.approx(math.exp(summary["eval_loss"]))
    assert 0 < summary["trainable_params"] < summary["total_params"] / 10
    assert 0 <= summary["stop_rate_before"] <= 1 and 0 <= summary["stop_rate_after"] <= 1
    assert [x["question"] for x in summary["samples"]] == QUESTIONS
    assert summary["steps"] == 8 and summary["best_step"] in (4, 8)
    assert summary["peak_memory_bytes"] > 0 and summary["train_samples_per_s"] > 0
    # the test split (Alpaca only here) scored by source and by task, base and trained, on the same dialogues
    test = dialogue.load(config.paths().dialogues, "test")
    fits = len(finetune.encode(test, s.tokenizer, s.info["max_length"])[0])
    assert 0 < fits <= len(test) <= s.cfg["task_eval_per_source"]
    for by, tasks in ((summary["base_by_source"], summary["base_tasks"]), (summary["by_source"], summary["tasks"])):
        assert list(by) == ["alpaca"] and by["alpaca"]["n"] == fits and by["alpaca"]["bpb"] > 0
        assert tasks["alpaca"]["task"] == "free_form" and 0 <= tasks["alpaca"]["rouge_l"] <= 1
        assert tasks["alpaca"]["n"] + tasks["alpaca"]["skipped"] == len(test)
    assert summary["by_source"]["alpaca"]["loss"] < summary["base_by_source"]["alpaca"]["loss"]
    shown = finetune.scores(summary)  # what notebook 05 shows
    assert list(shown.index) == ["alpaca loss", "alpaca bpb", "alpaca n", "alpaca free_form rouge_l", "alpaca free_form n"]
    assert shown.loc["alpaca free_form rouge_l", "trained"] == summary["tasks"]["alpaca"]["rouge_l"]
    assert read_json(s.run_dir / "summary.json") == json.loads(json.dumps(summary)) == runs.read_summary(s.run_dir)


def test_metrics_wandb_and_no_checkpointing_warnings(lora8):
    s = lora8["s"]
    rows = read_jsonl(s.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [4, 8]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [2, 4, 6, 8]
    assert all(math.isfinite(r["loss"]) for r in rows if r["kind"] == "train")
    assert list((s.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    noisy = [m for m in lora8["messages"] if "checkpointing" in m or "use_cache" in m or "use_reentrant" in m]
    assert noisy == []
    assert not any("MatMul8bitLt" in m for m in lora8["messages"])


def test_marker_rows_are_trained_and_saved_with_the_adapter(lora8, root):
    adapter = root / lora8["summary"]["adapter"]
    weights = load_file(adapter / "adapter_model.safetensors")
    deltas = [v for k, v in weights.items() if "trainable_tokens_delta" in k]
    assert len(deltas) == 1 and deltas[0].shape == (3, 64)  # <|user|>, <|assistant|>, <|endoftext|>
    wte = GPT2LMHeadModel.from_pretrained(root / BASE).transformer.wte.weight.detach()
    mean = wte.mean(0)
    for row in deltas[0][:2]:
        assert not torch.allclose(row, mean, atol=1e-4)  # moved away from the mean start
    assert not torch.allclose(deltas[0][2], wte[EOT_ID], atol=1e-4)
    assert not any("wte.weight" in k and v.shape[0] > 2 for k, v in weights.items())  # no full embedding copy
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE


def test_merged_model_equals_adapter_on_32bit_base(lora8, root):
    summary = lora8["summary"]
    merged = AutoModelForCausalLM.from_pretrained(root / summary["merged"])
    tok = AutoTokenizer.from_pretrained(root / summary["merged"])
    peft_model, peft_tok = finetune.load_adapter(root / summary["adapter"])
    text = dialogue.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == peft_tok(text, return_tensors="pt").input_ids.tolist()
    assert len(tok) == 50259 and tok.convert_tokens_to_ids(dialogue.ASSISTANT) in ids[0].tolist()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model(input_ids=ids).logits, atol=1e-4)


def test_eval_loss_is_one_token_weighted_number(lora8):
    """The Trainer's eval_loss rows (best-checkpoint choice), the curve and the summary use one definition."""
    s, summary = lora8["s"], lora8["summary"]
    evals = [r for r in runs.read_metrics(s.run_dir) if r["kind"] == "eval"]
    best = next(r for r in evals if r["step"] == summary["best_step"])
    assert best["eval_loss"] == pytest.approx(summary["eval_loss"], abs=1e-5)
    assert best["eval_loss"] == min(r["eval_loss"] for r in evals) and "eval_bpb" in best


def test_plot_losses(lora8):
    fig = plots.finetune_losses({"lora-8bit": runs.read_metrics(lora8["s"].run_dir)})
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["lora-8bit train", "lora-8bit eval"]
    assert ax.get_legend() is not None and ax.get_legend().get_bbox_to_anchor().y0 < ax.bbox.y0  # below the axes


def test_finished_run_is_restored_from_its_pruned_checkpoints(lora8):
    cfg, run_dir, summary = lora8["cfg"], lora8["s"].run_dir, lora8["summary"]
    ckpt = run_dir / "checkpoints"
    # pruned once finished: the last trainer_state.json stays; adapter/ holds the best weights
    assert {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*")} == {
        "trained.json", "checkpoint-8", "checkpoint-8/trainer_state.json"}
    # a finished run: nothing is trained again, the best weights come back
    s = finetune.setup({**cfg, "wandb": False})
    assert (ckpt / "checkpoint-8").is_dir()  # a pruned checkpoint is not mistaken for a killed write
    trained = finetune.train(s)
    assert (trained["steps"], trained["best_step"]) == (8, summary["best_step"])
    for key in ("train_samples_per_s", "train_seconds", "peak_memory_bytes"):
        assert trained[key] == summary[key], key
    assert finetune.evaluate(s)["loss"] == pytest.approx(summary["eval_loss"], abs=1e-4)
    with pytest.raises(ValueError, match=r"different settings \(lora_r: \d+ -> 4\); .* pass resume=False to start over"):
        finetune.setup({**cfg, "lora_r": 4})


def test_kill_mid_training_resumes_and_a_kill_while_saving_finishes_on_rerun(root, monkeypatch, capsys):
    """Issue 21: a kill while merged/ was written left a temp folder, no merged/ and an unfinished
    summary with null throughput; the rerun restores the weights and finishes with nothing lost."""
    cfg = small(seeds=[5])
    s = finetune.setup(cfg)
    finetune.train(s)
    run_dir = s.run_dir
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-8")  # as if the session died after step 4
    (run_dir / "checkpoints" / "checkpoint-8").mkdir()  # killed just as a checkpoint folder appeared
    (run_dir / "checkpoints" / "checkpoint-8" / "README.md").write_text("x")
    s = finetune.setup(cfg)
    before = finetune.evaluate(s)
    trained = finetune.train(s)
    assert trained["resumed_from"] == "runs/finetune-lora-8bit/seed-5/checkpoints/checkpoint-4"
    assert trained["steps"] == 8 and trained["train_samples_per_s"] > 0
    assert [r["step"] for r in finetune.metrics_rows(trained["log_history"]) if r["kind"] == "eval"] == [4, 8]

    def killed_while_merging(d, write):  # noqa: ANN001 - replace_dir's signature
        if d.name == "merged":
            (d.parent / ".merged.tmp-99999").mkdir()
            (d.parent / ".merged.tmp-99999" / "model.safetensors").write_bytes(b"\0" * 1000)
            raise KeyboardInterrupt  # kill -9 leaves the temp folder; replace_dir would have removed it
        return replace_dir(d, write)

    replace_dir = ftmethods.replace_dir  # the method writes its outputs
    monkeypatch.setattr(ftmethods, "replace_dir", killed_while_merging)
    with pytest.raises(KeyboardInterrupt):
        finetune.finish(s, before, finetune.evaluate(s), trained)
    monkeypatch.undo()
    killed = runs.read_summary(run_dir)
    assert not killed["finished"] and killed["peak_memory_bytes"] is None and not (run_dir / "merged").exists()
    capsys.readouterr()

    summary = finetune.run(cfg)
    assert "removed .merged.tmp-99999/" in capsys.readouterr().out
    assert summary["finished"] and summary["steps"] == 8 and not list(run_dir.glob(".*tmp-*"))
    for key in ("train_samples_per_s", "train_seconds", "peak_memory_bytes"):  # kept in checkpoints/trained.json
        assert summary[key] == trained[key] and summary[key] > 0, key
    merged = AutoModelForCausalLM.from_pretrained(root / summary["merged"])
    assert summary["merged_eval_loss"] == pytest.approx(s.evaluate_loss(merged)[0], abs=1e-6)
    assert summary["merged_eval_loss"] == pytest.approx(summary["eval_loss"], abs=0.05)
    assert not list((run_dir / "checkpoints").rglob("*.safetensors"))  # pruned now that it finished


def test_time_budget_stops_with_a_checkpoint_and_the_next_session_resumes(root):
    """A budget of seconds: the Trainer stops early with a checkpoint at the step it reached, the
    summary says unfinished (time_budget), and the same command in a new session resumes there."""
    cfg = small(steps=300, eval_steps=100, seeds=[7], time_budget_minutes=0.12)
    s = finetune.setup(cfg)
    first = finetune.train(s)
    assert (first["finished"], first["stop_reason"]) == (False, "time_budget") and 0 < first["steps"] < 300
    assert (s.run_dir / "checkpoints" / f"checkpoint-{first['steps']}" / "trainer_state.json").is_file()
    summary = finetune.finish(s, {}, {}, first)
    assert (summary["finished"], summary["stop_reason"]) == (False, "time_budget")
    assert not (s.run_dir / "adapter").exists()  # outputs only from a finished run
    again = finetune.train(finetune.setup(cfg))
    assert again["resumed_from"] == f"runs/finetune-lora-8bit/seed-7/checkpoints/checkpoint-{first['steps']}"
    assert again["steps"] > first["steps"]


# --- the other variants ----------------------------------------------------------------------------


def test_full_finetune_trains_every_weight(root):
    cfg = small(variant="full")
    summary = finetune.run(cfg)
    assert summary["lora"] is False and summary["adapter"] is None
    assert summary["trainable_params"] == summary["total_params"]
    assert summary["eval_loss"] < summary["base_eval_loss"]
    merged = AutoModelForCausalLM.from_pretrained(root / summary["merged"])
    assert merged.get_input_embeddings().weight.shape[0] == 50259
    s = finetune.setup(cfg)  # run again: the finished checkpoint's weights come back, nothing is trained
    assert finetune.train(s)["steps"] == 8
    assert finetune.evaluate(s)["loss"] == pytest.approx(summary["eval_loss"], abs=1e-4)


def test_lora_32bit_on_conv1d_with_answer_rows(root):
    summary = finetune.run(small(variant="lora-32bit", steps=4, eval_steps=2, merge=False, lora_answer_rows=16))
    assert summary["mode"] == "32bit" and summary["merged"] is None and summary["merged_eval_loss"] is None
    assert summary["eval_loss"] < summary["base_eval_loss"]
    cfg = json.loads((root / summary["adapter"] / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True  # GPT-2's Conv1D stores weights [in, out]
    deltas = [v for k, v in load_file(root / summary["adapter"] / "adapter_model.safetensors").items()
              if "trainable_tokens_delta" in k]
    assert deltas[0].shape == (3 + 16, 64)  # the markers, end-of-text and the 16 most frequent answer tokens


@pytest.mark.parametrize("variant", ["lora-4bit", "lora-16bit"])
def test_low_precision_trains_after_an_evaluation(root, variant):
    """On CPU, bitsandbytes repacks 4-bit weights at the first no-grad forward; training must still work."""
    s = finetune.setup(small(variant=variant, steps=2, eval_steps=2))
    if variant == "lora-4bit":
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in s.model.modules())
    else:  # this CPU's 16-bit compute, whichever it is: test_a_16bit_base_is_stored_in_16_bits fakes both
        stored = s.model.base_model.model.transformer.h[0].attn.c_attn.base_layer
        assert stored.weight.dtype == machine.half_compute(machine.detect("cpu"))
    assert all(p.dtype == torch.float32 for p in s.model.parameters() if p.requires_grad)
    before = finetune.evaluate(s)
    trained = finetune.train(s)
    assert trained["steps"] == 2
    assert math.isfinite(finetune.evaluate(s)["loss"]) and math.isfinite(before["loss"])


@pytest.mark.parametrize("units", [(), ("avx512_bf16",)], ids=["cpu-without-bf16-units", "cpu-with-bf16-units"])
def test_a_16bit_base_is_stored_in_16_bits_whatever_it_computes_in(root, monkeypatch, units):
    """A CPU without bf16 units keeps the base in bf16 and computes in fp32 (torch's bf16 GEMM falls back
    to a slow path there); one with them computes in bf16. Either way the frozen base takes half of fp32's bytes."""
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2", *units}))
    compute = torch.bfloat16 if units else torch.float32

    def frozen_bytes(s):
        return sum(p.numel() * p.element_size() for p in s.model.parameters() if not p.requires_grad)

    half, full = (finetune.setup(small(variant=v, steps=1, seeds=[3], resume=False), 3) for v in ("lora-16bit", "lora-32bit"))
    assert frozen_bytes(half) * 2 == frozen_bytes(full)
    layer = half.model.base_model.model.transformer.h[0].attn.c_attn.base_layer
    assert layer.weight.dtype == compute and {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    batch = finetune.Collator(half.tokenizer.pad_token_id)(half.train_set[:2])
    hidden = half.model(**batch, output_hidden_states=True).hidden_states[-1]
    assert hidden.dtype == compute
    expected = "bfloat16" if units else "bfloat16 storage, float32 compute (this CPU has no bfloat16 units)"
    assert finetune.compute_dtype("16bit", machine.detect("cpu")) == expected
    if not units:  # fp32 compute on the bf16-rounded weights: the 32-bit run's loss to bf16's rounding
        assert half.model(**batch).loss.item() == pytest.approx(full.model(**batch).loss.item(), rel=2e-2)


@pytest.mark.parametrize("variant", ["lora-8bit", "full"])
def test_the_loss_on_labelled_rows_is_the_models_own_loss_and_gradients(root, variant):
    """ftscore.label_nll runs the output layer on labelled rows only; the Trainer's compute_loss uses it.
    Both must give HF's own causal-LM loss and the same gradients (dropout off: model.eval())."""
    from nblib import fttrainer

    s = finetune.setup(small(variant=variant, seeds=[7], resume=False), 7)
    batch = finetune.Collator(s.tokenizer.pad_token_id)(s.train_set[:4])
    assert 0 < (batch["labels"] != -100).sum() < batch["labels"].numel()  # some rows are left out
    s.model.eval()

    def grads(loss):
        s.model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in s.model.named_parameters() if p.grad is not None}

    own = s.model(**batch).loss
    reference = grads(own)
    nll, keep = ftscore.label_nll(s.model, batch)
    assert nll.shape == (int(keep.sum()),)
    assert nll.mean().item() == pytest.approx(own.item(), rel=1e-6)
    trainer = fttrainer.trainer_class()(model=s.model, args=fttrainer.training_arguments(s), eval_dataset=s.val_set, setup=s)
    items = (batch["labels"][:, 1:] != -100).sum()
    assert trainer.model_accepts_loss_kwargs  # so num_items_in_batch takes the summed, rescaled path
    for loss in (nll.mean(), trainer.compute_loss(s.model, batch), trainer.compute_loss(s.model, batch, num_items_in_batch=items)):
        got = grads(loss)
        assert got.keys() == reference.keys()
        for name, g in got.items():
            assert torch.allclose(g, reference[name], rtol=1e-4, atol=1e-7), name
    shutil.rmtree(s.run_dir)


def test_stop_rate_counts_only_answers_closed_by_eos(root):
    """A forward hook steers the tiny model: first ' Paris' then end-of-text, or end-of-text at once."""
    model = finetune.load_base(BASE, "32bit")
    tok = finetune.load_tokenizer(BASE)
    finetune.add_special_tokens(model, tok)
    paris = tok.encode(" Paris")[0]
    calls = []

    def steer(first: int):
        def hook(module, inputs, logits):
            calls.append(1)
            boosted = logits.clone()
            boosted[..., first if len(calls) == 1 else EOT_ID] += 1e4
            return boosted
        return hook

    handle = model.lm_head.register_forward_hook(steer(paris))
    assert finetune.answer(model, tok, ["Capital of France?"], 5) == [
        {"question": "Capital of France?", "answer": "Paris", "stopped": True}
    ]
    handle.remove()
    calls.clear()
    handle = model.lm_head.register_forward_hook(steer(EOT_ID))
    assert finetune.answer(model, tok, ["Capital of France?"], 5)[0] == {
        "question": "Capital of France?", "answer": "", "stopped": False,  # saying nothing is not stopping
    }
    handle.remove()
    no_stop = finetune.answer(model, tok, ["Capital of France?"], 3)[0]
    assert no_stop["stopped"] is False


def test_stop_rate_counts_an_answer_of_punctuation_alone_as_none(monkeypatch):
    """Closed by end-of-text but only "." (or "?!"): no word character, no answer; ``evaluate`` counts 1 of 4."""
    said = [{"answer": a, "stopped": s} for a, s in ((".", True), ("?!", True), ("Paris.", True), ("Lisbon", False))]
    monkeypatch.setattr(finetune, "answer", lambda *args: said)
    monkeypatch.setattr(finetune.qa_eval, "evaluate", lambda *args, **kwargs: {})
    s = SimpleNamespace(evaluate_loss=lambda: (1.0, 0.5), model=None, tokenizer=None, test_records=[],
                        cfg={"questions": ["q"] * 4, "max_new_tokens": 4, "eval_batch_size": 1, "task_eval_per_source": 1},
                        info={"max_length": 64})
    assert finetune.evaluate(s)["stop_rate"] == 0.25


def test_a_mix_that_selects_nothing_is_refused_as_such():
    records = [{"source": "alpaca", "dialogue": []}, {"source": "sciq", "dialogue": []}]
    assert len(finetune.select(records, {"alpaca": 0, "sciq": None}, 1)) == 1
    with pytest.raises(config.SettingsError, match=r"mix=\{'alpaca': 0\} selects no dialogue"):
        finetune.select(records, {"alpaca": 0}, 1)


# --- the methods table ---------------------------------------------------------------------------


def test_every_variant_list_is_the_methods_table():
    from nblib import pipeline

    schema = config.profile_table("finetune")["schema"]["variant"]
    assert [v.strip() for v in schema.removeprefix("one of ").split(",")] == list(finetune.VARIANTS)
    assert pipeline.FINETUNE_VARIANTS == ftmethods.PIPELINE == ("lora-8bit", "lora-16bit", "lora-32bit", "full")
    assert [s.params["variant"] for s in pipeline.STAGES if "variant" in s.params] == list(ftmethods.PIPELINE)
    assert config.settings("compare", "full")["cost_variants"] is None  # measure.finetune_cost: the pipeline's
    for v in finetune.VARIANTS.values():
        assert v.method in ftmethods.METHODS.values() and set(v.baselines) <= set(finetune.VARIANTS)
        assert v.lora == (v.method.name == "lora")


def test_each_method_wraps_saves_and_loads_its_own_weights(root, tmp_path):
    """Full: every weight trains and ``merged/`` holds them; LoRA: the adapter and its rows, in ``adapter/``."""
    cfg, examples = {**small(), "lora_answer_rows": 1, "merge": True}, [{"labels": [5, 5, 7, -100]}]

    def prepared(method: ftmethods.Method) -> tuple:
        model, tok = finetune.load_base(BASE, "32bit"), finetune.load_tokenizer(BASE)
        return method.prepare(model, cfg, tok, finetune.add_special_tokens(model, tok), examples, "32bit"), tok

    for method in ftmethods.METHODS.values():
        model, tok = prepared(method)
        trainable, total = finetune.count_params(model)
        assert (trainable == total) == (method.name == "full")
        changed = {n: p for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for p in changed.values():
                p.add_(0.25)
        adapter, merged, weights = method.save(model, tok, tmp_path / method.name, cfg, "32bit")
        assert (adapter is not None) == method.lora and merged == tmp_path / method.name / "merged" and weights
        fresh, _ = prepared(method)
        method.load(fresh, tmp_path / method.name / method.output)
        restored = dict(fresh.named_parameters())
        assert all(torch.equal(restored[n], p) for n, p in changed.items()), method.name


def test_finetune_cost_trains_the_rows_a_run_trains():
    """``measure.finetune_cost`` builds each variant through its method: ``lora_answer_rows`` count too."""
    from nblib import measure

    cfg = config.settings("finetune", "full")
    plain = measure.finetune_cost(cfg, ["lora-32bit"], steps=1, batch_size=1, length=16, device="cpu")
    rows = measure.finetune_cost({**cfg, "lora_answer_rows": 4}, ["lora-32bit"], steps=1, batch_size=1, length=16, device="cpu")
    d_model = 768  # GPT-2 small
    assert rows.loc["trainable_params"].iloc[0] - plain.loc["trainable_params"].iloc[0] == 4 * d_model
    assert list(plain.columns) == ["LoRA + 32-bit"]


def test_learning_rate_sweep_picks_the_best_val_loss_and_resumes(root, monkeypatch):
    """Each rate of lr_sweep trains the first seed sweep_steps steps; the lowest val loss wins; a rerun reads the
    kept results back instead of training again, and settings that change the measure train again."""
    from nblib import ftsweep

    cfg = small(variant="lora-32bit", lr_sweep=[0.1, 1.0], sweep_steps=2, eval_steps=2, steps=4)
    assert ftsweep.rates(cfg) == [pytest.approx(1e-3), pytest.approx(1e-2)]
    best, losses = ftsweep.best_rate(cfg)
    assert set(losses) == set(ftsweep.rates(cfg)) and best == min(losses, key=losses.get)
    folders = [runs.folder(ftsweep.folder_name("lora-32bit", r), 1234) for r in losses]
    assert all((f / ftsweep.RESULT).is_file() and not (f / "checkpoints").exists() for f in folders)
    assert ftsweep.settings_at_best(cfg)["learning_rate"] == best
    trained = []
    monkeypatch.setattr(finetune, "train", lambda s: trained.append(s.learning_rate))
    assert ftsweep.best_rate(cfg) == (best, losses) and not trained  # read back, nothing trained
    assert ftsweep.settings_at_best({**cfg, "learning_rate": 5e-3}) == {**cfg, "learning_rate": 5e-3}  # given: not swept
    assert ftsweep.settings_at_best({**cfg, "lr_sweep": []}) == {**cfg, "lr_sweep": []}
    ftsweep.best_rate({**cfg, "lora_r": 4})  # another setting measures again (the stubbed train records it)
    assert trained == [pytest.approx(1e-3), pytest.approx(1e-2)]


def test_a_diverging_fine_tune_stops_before_the_blown_up_step_and_writes_no_outputs(root, lora8):
    """Issue 30 case 4: at learning_rate=1e30 (step 1 warms up from 0, step 2 applies it) the eval after step 2
    is not finite: training stops before checkpoint-2 is saved, checkpoint-1 is kept, no adapter/ or merged/
    is written, and the unfinished summary says diverged. Without warmup, step 2's loss blows up first. A
    finished run with results that are not finite (as nblib once wrote) is refused by the report too."""
    from nblib import lifecycle
    from nblib.report import loading

    with pytest.raises(lifecycle.Diverged, match=r"finetune-full seed 11: the eval loss is nan at step 2: training "
                                                 r"diverged and stopped \(learning_rate=1e\+30\)\. Last good checkpoint: "
                                                 r"runs/finetune-full/seed-11/checkpoints/checkpoint-1\. .*resume=False"):
        finetune.run(small(variant="full", learning_rate=1e30, eval_steps=1, seeds=[11]))
    run_dir = root / "runs" / "finetune-full" / "seed-11"
    summary = runs.read_summary(run_dir)
    assert (summary["finished"], summary["stop_reason"], summary["diverged_step"]) == (False, "diverged", 2)
    assert not (run_dir / "merged").exists() and not (run_dir / "adapter").exists()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["checkpoint-1"]
    weights = load_file(run_dir / "checkpoints" / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    with pytest.raises(loading.MissingRunError, match=r"seed-11 diverged \(at step 2\): .* and resume=False"):
        loading.load_group("finetune-full", root)
    with pytest.raises(lifecycle.Diverged, match=r"finetune-full seed 12: the loss is \S+ at step 2: .* none written yet"):
        finetune.run(small(variant="full", learning_rate=1e30, warmup_steps=0, seeds=[12]))
    nan_run = root / "runs" / "finetune-nan" / "seed-1234"
    shutil.copytree(lora8["s"].run_dir, nan_run)
    (nan_run / "summary.json").write_text(json.dumps({**lora8["summary"], "eval_loss": float("nan")}))
    with pytest.raises(loading.MissingRunError, match=r"seed-1234 diverged \(eval_loss not finite\)"):
        loading.load_group("finetune-nan", root)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_adapter_of_a_finished_run_is_refused_naming_it(lora8, damage):
    """Issue 30 case 6: restoring a finished run reads its adapter; a damaged one is named, with what to do."""
    adapter = lora8["s"].run_dir / "adapter" / "adapter_model.safetensors"
    data = adapter.read_bytes()
    adapter.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    try:
        with pytest.raises(config.Refused, match=r"runs/finetune-lora-8bit/seed-1234/adapter/adapter_model.safetensors "
                                                 r"cannot be read \(SafetensorError: .*\): pass resume=False"):
            finetune.train(finetune.setup({**lora8["cfg"], "wandb": False}))
    finally:
        adapter.write_bytes(data)

"""The full profile's dry run on a CPU: every stage at full size for a handful of steps.

``python -m nblib.pipeline --profile full --dry-run`` takes about 24 minutes on a 2-core CPU
(the README gives the measured stage times; GPT-2 small's two steps of 16 x 1024 tokens are 7 of
them), so CI runs its ingest, clean, MHA pretraining (8 x 8 x 512) and LoRA + 8-bit fine-tune
(GPT-2 small's shape) stages; ``NBLIB_TEST_DRY_RUN=all`` runs every stage.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from nblib import config, finetune, pipeline, train
from nblib.files import read_json

ALL = os.environ.get("NBLIB_TEST_DRY_RUN") == "all"
STAGES = None if ALL else "01,02,03_train_mha,05_finetune_lora_8bit"


def test_dry_run_is_the_full_profile_plus_one_mapping():
    """Each stage's dry-run settings are the full profile with its ``dry-run:`` section on top; the
    sections change steps, seeds, the micro-batch and measurement sizes, never a shape."""
    sections = pipeline.dry_run_settings()
    assert set(sections) == {"ingest", "train", "finetune", "compare", "chat"}
    for stage, section in sections.items():
        full = config.settings(stage, "full")
        assert set(section) <= set(full), stage
        assert config.settings(stage, config.DRY_RUN) == {**full, **section, "profile": config.DRY_RUN}
    kept = {"train": (*train.MODEL_KEYS, "grad_accum_steps", "dtype", "export_hf", "torch_compile"),
            "finetune": ("max_length", "grad_accum", "variant", "lora_r", "lora_alpha", "lora_targets", "merge")}
    for stage, keys in kept.items():
        assert not set(sections[stage]) & set(keys), f"the {stage} dry run changes {set(sections[stage]) & set(keys)}"
    small = config.settings("train", config.DRY_RUN, "gpt2-small")  # the preset's sizes, then the dry run's steps
    assert (small["n_layer"], small["d_model"], small["context_length"], small["grad_accum_steps"]) == (12, 768, 1024, 16)
    assert (small["batch_size"], small["max_steps"], small["torch_compile"]) == (1, 2, True)


def test_dry_run_stages_and_refusals(monkeypatch, tmp_path):
    stages = {s.name: s for s in pipeline.dry_run_stages()}
    assert stages["03_train_gpt2_small"].params == {"preset": "gpt2-small", "name": "pretrain-gpt2-small"}
    variants = [s.params["variant"] for s in stages.values() if s.notebook.startswith("05_")]
    assert variants == list(finetune.VARIANTS)  # a CPU runs every variant, 8-bit included
    pretrain = pipeline.pretrain_runs(config.DRY_RUN)  # every variant 03 and 04 train
    assert pretrain[0] == "pretrain-mha" and {"pretrain-gqa-uptrained", "pretrain-gqa-params"} <= set(pretrain)
    assert stages["06_compare"].params["runs"] == [*pretrain, *(f"finetune-{v}" for v in variants)]
    assert stages["07_chat_demo"].params["model"] == "runs/finetune-lora-8bit/seed-1234/merged"
    with pytest.raises(ValueError, match="use --profile full --dry-run"):
        pipeline.run("smoke", dry_run=True)
    monkeypatch.setenv("NBLIB_HOME", str(tmp_path))
    assert pipeline.main(["--profile", "full", "--dry-run", "--only", "08"]) == 2  # no stage 08: a usage error
    assert os.environ["NBLIB_HOME"] == str(tmp_path / "dry-run")  # its own working root


@pytest.fixture(scope="module")
def dry(tmp_path_factory, mirror):
    home = tmp_path_factory.mktemp("dry-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NBLIB_HOME", str(home))
        mp.setenv("WANDB_MODE", "offline")
        status = pipeline.run("full", only=STAGES, out_dir=home / "runs" / "pipeline", progress=False, dry_run=True)
        yield home, status


def test_dry_run_records_its_settings(dry):
    home, status = dry
    assert [s["status"] for s in status["stages"]] == ["ok"] * len(status["stages"])
    saved = read_json(home / "runs" / "pipeline" / "pipeline.json")
    assert saved["profile"] == "dry-run" and saved["dry_run"] == pipeline.dry_run_settings()
    raw = read_json(home / "data" / "raw" / "manifest.json")["files"]
    assert [f for f in raw if f.startswith("gutenberg/")] == ["gutenberg/pg55752.txt"]  # what the mirror has
    sources = read_json(home / "data" / "processed" / "dialogues" / "manifest.json")["sources"]
    assert {s: sources[s]["raw"] for s in ("dolly", "sciq", "natural_questions")} == {"dolly": 6, "sciq": 6, "natural_questions": 6}


def test_dry_run_pretrains_full_size_shapes(dry):
    home, _ = dry
    shapes = {"pretrain-mha": (8, 8, 512, 256, 4)} | ({"pretrain-gpt2-small": (12, 12, 768, 1024, 16),
                                                       "pretrain-gqa": (8, 2, 512, 256, 4),
                                                       "pretrain-gqa-params": (8, 2, 512, 256, 4)} if ALL else {})
    for name, (n_layer, n_kv_head, d_model, context, accum) in shapes.items():
        s = read_json(home / "runs" / name / "seed-1337" / "summary.json")
        assert (s["n_layer"], s["n_kv_head"], s["d_model"], s["context_length"]) == (n_layer, n_kv_head, d_model, context)
        assert s["config"]["grad_accum_steps"] == accum and s["config"]["batch_size"] == 1
        assert s["finished"] and s["steps"] == 2 and s["tokens_seen"] == 2 * accum * context
        assert s["profile"] == "dry-run" and s["compute_dtype"] == "float32"  # dtype auto on a CPU
        if s["variant"] == "mha":
            assert (home / s["hf_export"] / "config.json").is_file()
    mha = read_json(home / "runs" / "pretrain-mha" / "seed-1337" / "summary.json")
    assert 50e6 < mha["params"] < 52e6
    if ALL:  # GQA at equal parameters: the MLP widened to MHA's count
        matched = read_json(home / "runs" / "pretrain-gqa-params" / "seed-1337" / "summary.json")
        assert matched["matched"] == "equal parameters" and matched["d_mlp"] > 4 * 512
        assert abs(matched["params"] - mha["params"]) / mha["params"] < 0.005


def test_dry_run_finetunes_gpt2_small(dry):
    home, _ = dry
    for variant in finetune.VARIANTS if ALL else ("lora-8bit",):
        s = read_json(home / "runs" / f"finetune-{variant}" / "seed-1234" / "summary.json")
        assert 124e6 < s["total_params"] < 130e6, variant  # GPT-2 small, plus LoRA and two marker rows
        assert s["config"]["max_length"] == 512 and s["config"]["grad_accum"] == 2 and s["config"]["batch_size"] == 1
        assert s["finished"] and s["steps"] == 2 and s["merged_eval_loss"] is not None
        assert s["base_model"] == "models/gpt2-small-random" and s["data"]["base_sha256"]


def test_dry_run_records_disk_use(dry):
    """pipeline.json's ``disk``: the sizes the README's Kaggle paragraph quotes (tools/disk_figures.py)."""
    home, _ = dry
    disk = read_json(home / "runs" / "pipeline" / "pipeline.json")["disk"]
    measured = ["pretrain-mha/seed-1337", "finetune-lora-8bit/seed-1234"]
    assert all(disk["runs"][name] > 0 for name in measured) and disk["folders"]["data"] > 0 and disk["clone"] > 0
    assert {name: disk["full_profile_counts"][name] for name in measured} == dict.fromkeys(measured, 3)
    assert disk["full_profile_estimate_bytes"] > 3 * sum(disk["runs"][name] for name in measured)
    if ALL:
        assert disk["full_profile_estimate_bytes"] <= 12e9, disk  # Kaggle keeps 20 GB of output
    assert not list((home / "runs" / "pretrain-mha").rglob("ckpt*.pt"))  # deleted once finished
    ckpt = home / "runs" / "finetune-lora-8bit" / "seed-1234" / "checkpoints"  # pruned once finished
    assert {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*")} == {
        "trained.json", "checkpoint-2", "checkpoint-2/trainer_state.json"}  # adapter/ holds the best weights
    spec = importlib.util.spec_from_file_location("disk_figures", Path(__file__).resolve().parents[1] / "tools" / "disk_figures.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = "\n".join(tool.lines(read_json(home / "runs" / "pipeline" / "pipeline.json")))
    assert "runs/finetune-lora-8bit/seed-1234/" in text and "full profile, estimated" in text

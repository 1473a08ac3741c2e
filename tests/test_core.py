"""config, files, tokenizer, sampling, tracking."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nblib import config, files, sampling, tokenizer, tracking


# --- config ---------------------------------------------------------------------------------

DEMO = """
schema:
  steps: int >= 1
  lr: float > 0
  name: text or null
  seeds: nonempty list of int
  dtype: one of auto, float32
base:
  steps: 1000
  lr: 0.01
  name: null
  seeds: [1]
  dtype: auto
smoke:
  steps: 10
  lr: 0.1
presets:
  tiny:
    steps: 2
"""


@pytest.fixture
def demo_profiles(tmp_path, monkeypatch):
    (tmp_path / "demo.yaml").write_text(DEMO)
    monkeypatch.setattr(config, "PROFILE_DIR", tmp_path)
    return tmp_path


def test_settings_are_base_plus_profile_plus_preset_plus_overrides(demo_profiles):
    assert config.settings("demo", "smoke", steps=3, lr=None) == {
        "steps": 3, "lr": 0.1, "name": None, "seeds": [1], "dtype": "auto", "profile": "smoke", "preset": None}
    assert config.settings("demo", "full")["steps"] == 1000  # full changes nothing: the base
    assert config.settings("demo", "full", "tiny")["steps"] == 2
    assert config.settings("demo", "full", "tiny", steps=5)["steps"] == 5  # overrides win over the preset
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        config.settings("demo", "smoke", "huge")
    with pytest.raises(ValueError, match="no profile file for stage 'nope'"):
        config.settings("nope", "smoke")
    with pytest.raises(ValueError, match="unknown profile 'big'"):
        config.resolve_profile("big")


def test_unknown_settings_get_a_did_you_mean(demo_profiles):
    with pytest.raises(config.SettingsError, match=r"unknown setting\(s\) for stage 'demo': 'stpes' \(did you mean 'steps'\?\)"):
        config.settings("demo", "smoke", stpes=3)


@pytest.mark.parametrize("overrides, message", [
    ({"steps": 0}, r"steps=0 must be an integer >= 1"),
    ({"steps": -4}, r"steps=-4 must be an integer >= 1"),
    ({"steps": "abc"}, r"steps='abc' must be an integer >= 1"),
    ({"steps": 2.5}, r"steps=2.5 must be an integer >= 1"),
    ({"lr": 0}, r"lr=0 must be a number > 0"),
    ({"lr": float("inf")}, r"lr=inf must be a number > 0"),
    ({"seeds": []}, r"seeds=\[\] must be a non-empty list of integers"),
    ({"dtype": "fp8"}, r"dtype='fp8' must be one of 'auto', 'float32'"),
    ({"name": 3}, r"name=3 must be a text, or null"),
])
def test_bad_values_name_the_setting_and_its_range(demo_profiles, overrides, message):
    with pytest.raises(config.SettingsError, match=r"invalid demo setting\(s\): " + message):
        config.settings("demo", "smoke", **overrides)


def test_numbers_given_as_text_are_read(demo_profiles):
    cfg = config.settings("demo", "smoke", steps="7", lr="1e-4", seeds=[3.0])
    assert cfg["steps"] == 7 and cfg["lr"] == 1e-4 and cfg["seeds"] == [3]
    with pytest.raises(config.SettingsError) as info:  # every problem at once
        config.settings("demo", "smoke", steps=0, lr=-1)
    assert "steps=0" in str(info.value) and "lr=-1" in str(info.value)


@pytest.mark.parametrize("stage, overrides, message", [
    ("finetune", {"mix": {"alpaca": -5}}, r"mix\.alpaca=-5 must be an integer >= 0, or null"),  # not "all but 5"
    ("finetune", {"mix": {"alpaca": "abc"}}, r"mix\.alpaca='abc' must be an integer >= 0, or null"),
    ("ingest", {"qa": {"dolly": 10, "alpaca": 2.5}}, r"qa\.alpaca=2\.5 must be an integer >= 0, or null$"),
    ("dialogue", {"targets": [800]}, r"targets=\[800\] must be a mapping whose values are each an integer >= 0"),
])
def test_counts_inside_mappings_are_checked_one_by_one(stage, overrides, message):
    with pytest.raises(config.SettingsError, match=message):
        config.settings(stage, "smoke", **overrides)


def test_mapping_counts_are_read_and_null_means_all():
    assert config.settings("finetune", "smoke", mix={"alpaca": "7", "sciq": None})["mix"] == {"alpaca": 7, "sciq": None}
    assert config.settings("finetune", "smoke")["mix"] is None  # the mapping itself may be null: every dialogue
    assert config.settings("ingest", "full")["qa"]["alpaca"] is None


def test_auto_profile_is_smoke_without_gpu():
    assert config.resolve_profile("auto") == ("full" if torch.cuda.is_available() else "smoke")


def test_every_profile_file_is_base_plus_overrides_with_a_schema():
    for path in config.PROFILE_DIR.glob("*.yaml"):
        table = config.profile_table(path.stem)
        assert set(table["schema"]) == set(table["base"]), f"{path.name}: schema and base differ"
        for name in ("smoke", "full", *(table.get("presets") or {})):
            section = table.get(name) or (table.get("presets") or {}).get(name) or {}
            assert set(section) <= set(table["base"]), f"{path.name}:{name} sets keys the base lacks"
        assert set(table.get("free", ())) <= set(table["base"])
        for profile in config.PROFILES:
            config.settings(path.stem, profile)  # every profile validates


def test_relative_paths_mean_the_working_root(tmp_path, monkeypatch):
    monkeypatch.setenv("NBLIB_HOME", str(tmp_path / "root"))
    monkeypatch.chdir(tmp_path)
    assert config.resolve("runs/x") == (tmp_path / "root").resolve() / "runs" / "x"  # never the current directory
    assert config.resolve("/abs/x") == Path("/abs/x")
    assert config.relative(tmp_path / "root" / "runs" / "x") == "runs/x"
    assert config.relative("/elsewhere/y") == "/elsewhere/y"


def test_home_and_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("NBLIB_HOME", str(tmp_path))
    p = config.paths()
    assert p.home == tmp_path.resolve()
    assert p.corpus == tmp_path.resolve() / "data" / "processed" / "corpus"
    assert p.run("pretrain-mha") == tmp_path.resolve() / "runs" / "pretrain-mha"
    assert p.run("pretrain-mha", 7) == tmp_path.resolve() / "runs" / "pretrain-mha" / "seed-7"
    monkeypatch.delenv("NBLIB_HOME")
    assert config.home() == Path(config.__file__).resolve().parents[1]


def test_mirror_unset_missing_and_present(tmp_path, monkeypatch):
    monkeypatch.delenv("NBLIB_MIRROR", raising=False)
    assert config.mirror() is None
    monkeypatch.setenv("NBLIB_MIRROR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="NBLIB_MIRROR=.*is not a folder"):
        config.mirror()
    monkeypatch.setenv("NBLIB_MIRROR", str(tmp_path))
    assert config.mirror() == tmp_path.resolve()


def test_set_seed_repeats():
    config.set_seed(7)
    a = torch.rand(3)
    config.set_seed(7)
    assert torch.equal(a, torch.rand(3))


# --- files ----------------------------------------------------------------------------------

def test_atomic_write_leaves_no_temp_and_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "sub" / "a.json"
    files.write_json(target, {"b": 1, "a": [1, 2]})
    assert files.read_json(target) == {"a": [1, 2], "b": 1}
    with pytest.raises(TypeError):
        files.write_json(target, {"x": object()})
    assert files.read_json(target) == {"a": [1, 2], "b": 1}
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~files._umask()


def test_jsonl_roundtrip_and_bad_line(tmp_path):
    path = tmp_path / "r.jsonl"
    files.write_jsonl(path, [{"a": "ç"}, {"b": 2}])
    files.append_jsonl(path, {"c": 3})
    assert files.read_jsonl(path) == [{"a": "ç"}, {"b": 2}, {"c": 3}]
    path.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"r.jsonl:2: not valid JSON"):
        files.read_jsonl(path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        files.read_json(tmp_path / "bad.json")


def test_replace_dir_swaps_whole_folders_and_orphans_are_cleaned(tmp_path):
    out = tmp_path / "model"
    files.replace_dir(out, lambda d: (d / "a.txt").write_text("one"))
    files.replace_dir(out, lambda d: (d / "b.txt").write_text("two"))
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    with pytest.raises(RuntimeError):  # a failing writer leaves the old folder and no temp folder
        files.replace_dir(out, lambda d: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert (out / "b.txt").read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["model"]
    # what kills at each moment leave behind: a temp file, a half-written folder, an old folder renamed aside
    (tmp_path / ".ckpt.pt.x1y2.tmp").write_bytes(b"x" * 10)
    (tmp_path / f".model{files.DIR_TEMP}123").mkdir()
    out.rename(tmp_path / f".model{files.DIR_OLD}123")  # killed between the two renames
    done = files.remove_orphans(tmp_path)
    assert len(done) == 3 and any("restored model/" in d for d in done)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (out / "b.txt").read_text() == "two"


def test_sha256_file(tmp_path):
    (tmp_path / "x").write_bytes(b"abc")
    assert files.sha256_file(tmp_path / "x") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# --- tokenizer ------------------------------------------------------------------------------

def test_encoding_from_mirror(mirror):
    enc = tokenizer.get_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == tokenizer.EOT_ID == 50256
    assert enc.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_missing_and_corrupt_ranks_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="put gpt2.tiktoken there|Put gpt2.tiktoken there"):
        tokenizer.load_ranks(tmp_path / "gpt2.tiktoken")
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_text("SGVsbG8= 0\n")
    with pytest.raises(ValueError, match="sha256 .* does not match"):
        tokenizer.load_ranks(bad)


def test_hf_tokenizer_gives_identical_ids(mirror):
    enc = tokenizer.get_encoding()
    hf = tokenizer.hf_tokenizer()
    text = (mirror / "machado" / "romance" / "domCasmurro.txt").read_text(encoding="utf-8")[:60000]
    text += "\r\n  don't 123 <|endoftext|> ç 😀\t"
    assert hf(text)["input_ids"] == enc.encode(text, allowed_special="all")
    assert len(hf) == 50257 and hf.eos_token_id == 50256
    assert hf.decode(hf(text)["input_ids"]) == text


def test_token_bytes_count_utf8_and_zero_for_specials(mirror):
    enc = tokenizer.get_encoding()
    nbytes = tokenizer.token_bytes(enc)
    text = "Capitu, olhos de ressaca — ç"
    ids = enc.encode(text)
    assert len(nbytes) == enc.n_vocab and nbytes[tokenizer.EOT_ID] == 0
    assert sum(nbytes[i] for i in ids) == len(text.encode("utf-8"))


def test_count_tokens_batches(mirror):
    enc = tokenizer.get_encoding()
    texts = ["Capitu tinha olhos de ressaca.", "Dom Casmurro"]
    assert tokenizer.count_tokens(texts, enc) == sum(len(enc.encode(t)) for t in texts)


# --- sampling -------------------------------------------------------------------------------

def test_sampling_greedy_topk_topp_and_penalty():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    assert sampling.sample_next(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sampling.sample_next(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    draws = {sampling.sample_next(logits, top_p=0.5, generator=g).item() for _ in range(100)}
    assert draws == {1}
    penalised = sampling.sample_next(logits, temperature=0, repetition_penalty=10.0, previous=torch.tensor([[1]]))
    assert penalised.item() == 2
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sampling.sample_next(logits, temperature=-1)


def test_sampling_is_seeded():
    logits = torch.randn(4, 100)
    a = sampling.sample_next(logits, generator=torch.Generator().manual_seed(3))
    b = sampling.sample_next(logits, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4, 1)


# --- tracking -------------------------------------------------------------------------------

def test_wandb_offline_without_key_writes_run_files(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tracking.wandb_mode() == "offline"
    run = tracking.init_wandb(tmp_path / "run", "t", {"lr": 0.1})
    run.log({"loss": 1.5})
    run.finish()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert os.environ["WANDB_MODE"] == "offline"  # set for libraries that start W&B themselves
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() == "disabled"


def test_wandb_with_a_key_and_no_server_logs_offline_at_once(tmp_path, monkeypatch, capsys):
    """Issue 30 case 8: with WANDB_API_KEY set and the server unreachable (here a closed local port), the
    run starts offline within seconds and says so in one line, instead of waiting 60 s and failing."""
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    assert tracking.unreachable() == f"127.0.0.1:{port} unreachable (Connection refused)"
    started = time.perf_counter()
    run = tracking.init_wandb(tmp_path / "run", "t", {"lr": 0.1})
    run.log({"loss": 1.0})
    run.finish()
    assert time.perf_counter() - started < 30 and os.environ["WANDB_MODE"] == "offline"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("W&B:")]
    assert lines == [f"W&B: 127.0.0.1:{port} unreachable (Connection refused); logging offline to "
                     f"{tmp_path / 'run' / 'wandb'} (upload later with `wandb sync`)"]
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.parametrize("text", ["[]", "3", '"done"', "null"])
def test_summary_that_is_not_an_object_names_the_file_and_its_notebook(home, text):
    from nblib import runs

    run_dir = home / "runs" / "finetune-full" / "seed-1234"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(text)
    with pytest.raises(runs.RunError, match=r"runs/finetune-full/seed-1234/summary\.json holds a JSON \w+, not an "
                                            r"object of run facts: run notebook 05_finetune_lora_8bit with variant=.full. again"):
        runs.read_summary(run_dir)

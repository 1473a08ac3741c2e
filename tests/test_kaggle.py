"""Kaggle's T4 x2 without a GPU: DDP pretraining through the notebooks' launch path, the fine-tune
under torchrun, both on two gloo CPU processes, and the README's Kaggle commands."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nblib import config, dialogue, finetune, machine, pipeline, train
from nblib.files import read_json, read_jsonl, write_jsonl
from nblib.tokenizer import hf_tokenizer
from helpers import write_corpus
from test_machine import CU126_TORCH, KAGGLE_TORCH

README = Path(__file__).resolve().parents[1] / "README.md"
TOOLS = README.parent / "tools"
TINY = dict(context_length=32, n_layer=2, n_head=4, n_kv_head=4, d_model=32, dropout=0.0, batch_size=4,
            grad_accum_steps=2, max_steps=4, warmup_steps=2, log_interval=1, eval_interval=2, eval_batches=2,
            ckpt_interval=2, sample_tokens=8, wandb=False, export_hf=False)


def _code_cells(name: str) -> list[str]:
    nb = nbformat.read(pipeline.NOTEBOOKS / name, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])]


def test_mha_and_gqa_notebooks_share_their_code_and_launch_on_every_gpu():
    mha = _code_cells("03_train_mha.ipynb")
    assert [c for c in _code_cells("04_train_gqa.ipynb") if c in mha] == mha  # 04 adds GQA teaching cells only
    assert any("train.launch(run_cfg, seed, run_name, paths, overwrite=overwrite, processes=processes)" in c
               and "for run_name, run_cfg in plan for seed in" in c for c in _code_cells("03_train_mha.ipynb"))


# --- how many processes, and the torchrun command ------------------------------------------------


def test_world_size_is_one_per_gpu_dividing_grad_accum(monkeypatch):
    t4x2 = machine.Device("cuda", "Tesla T4", (7, 5), 16 * 2**30, count=2)
    monkeypatch.setattr(machine, "detect", lambda *a, **k: t4x2)
    full = config.settings("train", "full")  # grad_accum_steps 4
    assert train.world_size(full) == 2
    assert train.world_size({**full, "grad_accum_steps": 3}) == 1  # 2 GPUs cannot share 3 micro-batches
    assert train.world_size(full, processes=1) == 1
    with pytest.raises(config.SettingsError, match="processes=3: this machine has 2 Tesla T4 GPU"):
        train.world_size(full, processes=3)
    with pytest.raises(config.SettingsError, match="processes=2 must divide grad_accum_steps=1"):
        train.world_size(config.settings("train", "smoke"), processes=2)
    monkeypatch.setattr(machine, "detect", lambda *a, **k: machine.Device("cpu", "Xeon"))
    assert train.world_size(full) == 1 and train.world_size(full, processes=2) == 2  # gloo on a CPU when asked


def test_torchrun_command_rebuilds_the_same_settings():
    cfg = config.settings("train", "full", "gpt2-small", n_kv_head=4, max_steps=7, sample_prompt="Capitu, é você?")
    cmd = train.torchrun_command(cfg, 2, 1338, "pretrain-gqa", overwrite=True)
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = cmd[cmd.index("nblib.train") + 1:]
    assert args[:8] == ["--profile", "full", "--preset", "gpt2-small", "--seed", "1338", "--name", "pretrain-gqa"]
    assert "--overwrite" in args
    params = config.parse_params([a for i, a in enumerate(args) if i and args[i - 1] == "-p"])
    assert params == {"n_kv_head": 4, "max_steps": 7, "sample_prompt": "Capitu, é você?"}
    assert config.settings("train", "full", "gpt2-small", **params) == cfg
    with pytest.raises(config.SettingsError, match="max_steps are null where the profile sets them"):
        train.torchrun_command({**config.settings("train", "smoke"), "max_steps": None}, 2, 1, "x")


# --- DDP pretraining through the notebook's function ---------------------------------------------


def test_launch_on_two_cpu_processes_matches_one_process(home, mirror, capsys):
    """``train.launch`` (what 03/04 call) with ``processes=2``: torchrun, two gloo processes, one
    micro-batch each; the same losses as one process taking both micro-batches of the same global batch."""
    write_corpus(home, mirror, {"train": 60_000, "val": 8_000, "test": 2_000})
    cfg = config.settings("train", "smoke", **TINY)
    single = train.launch(cfg, name="single")
    capsys.readouterr()
    ddp = train.launch(cfg, name="ddp", processes=2)
    out = capsys.readouterr().out
    assert "ddp seed 1337: 2 DDP processes (torchrun)" in out and "ddp seed 1337: 4 steps" in out  # streamed
    assert (single["world_size"], ddp["world_size"]) == (1, 2) and ddp["finished"]
    assert ddp["config"] == single["config"] and ddp["tokens_seen"] == single["tokens_seen"]
    a, b = (read_jsonl(home / "runs" / n / "seed-1337" / "metrics.jsonl") for n in ("single", "ddp"))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        key = "loss" if ra["kind"] == "train" else "val_loss"
        assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra, rb)
    with pytest.raises(RuntimeError, match=r"torchrun exited with status \d(.|\n)*python -m nblib.train: error: runs/ddp/seed-1337 "
                                           r"holds a run of different settings"):
        train.launch({**cfg, "learning_rate": 1e-2}, name="ddp", processes=2)  # the child's error comes back


# --- the fine-tune under torchrun -----------------------------------------------------------------


@pytest.fixture
def finetune_home(home, mirror):
    """A tiny GPT-2 without dropout at models/tiny and 120 short Alpaca dialogues."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.save_pretrained(home / "models/tiny")
    hf_tokenizer().save_pretrained(home / "models/tiny")
    alpaca = json.loads((mirror / "qa" / "alpaca_5000.json").read_text(encoding="utf-8"))
    write_jsonl(home / "data/raw/qa/alpaca.jsonl", alpaca[:400])
    settings = {"targets": {"alpaca": 120}, "val_fraction": 0.1, "test_fraction": 0.1, "max_chars": 200, "seed": 1}
    dialogue.prepare(home / "data/raw/qa", home / "data/processed/dialogues", settings)
    return home


def _finetune(home: Path, processes: int, batch_size: int) -> dict:
    params = dict(base_model="models/tiny", steps=2, batch_size=batch_size, grad_accum=2, eval_steps=2,
                  logging_steps=1, eval_dialogues=8, max_length=128, lora_dropout=0.0, warmup_steps=0,
                  questions=["Name a fruit."], max_new_tokens=4, wandb=False)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    proc = subprocess.run(
        [*launcher, "-m", "nblib.finetune", "--profile", "smoke", "--variant", "lora-32bit",
         *(a for k, v in params.items() for a in ("-p", f"{k}={json.dumps(v)}"))],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NBLIB_HOME": str(home), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"finetune-lora-32bit seed 1234: 2 steps on {processes} process(es)" in proc.stdout
    run_dir = home / "runs/finetune-lora-32bit/seed-1234"
    return {"summary": read_json(run_dir / "summary.json"), "metrics": read_jsonl(run_dir / "metrics.jsonl")}


def test_finetune_under_torchrun_matches_one_process(finetune_home, tmp_path):
    """Two gloo processes of 1 dialogue per micro-batch against one process of 2, same global batch
    (2 x 2 accumulation, no dropout). The Trainer weights the loss by assistant tokens across
    processes, so only float32 summation order differs (seen: 1e-7 relative); 1e-5 allows for it."""
    twin = tmp_path / "twin"
    shutil.copytree(finetune_home, twin)
    one = _finetune(finetune_home, 1, 2)
    two = _finetune(twin, 2, 1)
    assert two["summary"]["finished"] and two["summary"]["steps"] == 2
    for key in ("base_eval_loss", "eval_loss", "merged_eval_loss"):
        assert two["summary"][key] == pytest.approx(one["summary"][key], rel=1e-5), key
    assert two["summary"]["eval_loss"] != pytest.approx(two["summary"]["base_eval_loss"], rel=1e-4)  # it trained
    losses = [[r["loss"] for r in run["metrics"] if r["kind"] == "train"] for run in (one, two)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-5)


# --- the README's Kaggle section ------------------------------------------------------------------


def _kaggle_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Run on Kaggle")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_kaggle_commands_exist(capsys):
    """Every ``python -m nblib...`` line of the section: its flags are in that CLI's ``--help``, and
    its ``-p`` names are declared by the stages it selects."""
    section = _kaggle_section()
    helps = {}
    for module, main in (("nblib.pipeline", pipeline.main), ("nblib.train", train.main), ("nblib.finetune", finetune.main)):
        with pytest.raises(SystemExit):
            main(["--help"])
        helps[module] = capsys.readouterr().out
    commands = re.findall(r"(?:python|torchrun[^\n`]*?) -m (nblib\.\w+)([^\n`#]*)", section)
    assert {m for m, _ in commands} == set(helps)
    for module, line in commands:
        args = shlex.split(line)
        for flag in (a for a in args if a.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[module]), f"README: {module} has no {flag}"
        if module == "nblib.pipeline":
            stages = pipeline.select(stages=pipeline.dry_run_stages() if "--dry-run" in args else pipeline.STAGES)
            params = config.parse_params([args[i + 1] for i, a in enumerate(args) if a == "-p"])
            declared = {s.notebook: pipeline.declared_parameters(pipeline.NOTEBOOKS / s.notebook) for s in stages}
            pipeline.check_user_params(stages, params, declared)
    for profile in re.findall(r"--profile (\S+)", section):
        assert profile in (*config.PROFILES, "auto")


def test_readme_table_matches_the_machine_rules():
    """Every accelerator row of the section's table says what nblib.machine decides for that GPU
    under Kaggle's torch (2.10.0+cu128): refused without kernels, else its dtype, compile and 8-bit."""
    rows = {}
    for line in _kaggle_section().splitlines():
        if line.startswith("| **"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[re.match(r"\*\*(.+?)\*\*", cells[0]).group(1)] = cells
    assert set(rows) == {"T4 x2", "P100", "L4", "A100", "H100", "RTX PRO 6000"}
    version, cuda, archs = KAGGLE_TORCH
    for key, cells in rows.items():
        spec = next(g for g in machine.GPUS if g.key == key.split(" x")[0])
        count = int(key.split(" x")[1]) if " x" in key else 1
        gpu = machine.Device("cuda", f"NVIDIA {spec.key}", spec.capability, 16 * 2**30, count=count)
        _, cc, profile, dtype, compiled, int8, used = cells
        assert cc == f"{spec.capability[0]}.{spec.capability[1]}"
        try:
            machine.check_kernels(gpu, archs, version, cuda)
        except machine.HardwareError as e:
            assert profile.startswith("refused") and f"sm_{spec.capability[0]}{spec.capability[1]}" in profile
            assert re.search(r"pip install torch==\S+ --index-url \S+cu126", used)[0] in str(e)
            continue
        policy = machine.policy("auto", compile=True, device=gpu)
        assert profile.startswith("full")
        assert dtype.startswith(policy.dtype_name) and ("GradScaler" in dtype) == policy.scaler
        assert compiled.startswith("on" if policy.compile else "off")
        assert ("best-effort" in compiled) == (spec.capability < (8, 0))
        try:
            machine.check_8bit(gpu)
            assert int8.startswith("yes")
        except machine.HardwareError as e:
            assert int8.startswith("no") and "lora-16bit" in int8 and "lora-16bit" in str(e)
        assert used.startswith(str(count) if count > 1 else "all")


# --- a GPU the torch build has no kernels for, and user errors: one message, exit 2 ---------------

FAKE_P100 = """
import sys, types, torch
from torch.torch_version import TorchVersion
props = types.SimpleNamespace(name="Tesla P100-PCIE-16GB", major=6, minor=0, total_memory=16 * 2**30)
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.get_device_properties = lambda device=0: props
torch.cuda.get_device_capability = lambda device=0: (6, 0)
torch.cuda.get_arch_list = lambda: {archs!r}
torch.version.cuda = {cuda!r}
torch.__version__ = TorchVersion({version!r})
module, *argv = sys.argv[1:]
sys.exit(__import__(module, fromlist=["main"]).main(argv))
"""


def _cli(args: list[str], home: Path, fake: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", fake, *args] if fake else [sys.executable, "-m", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NBLIB_HOME": str(home), "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("args", [
    ["nblib.train", "--profile", "full"],
    ["nblib.finetune", "--profile", "full"],
    ["nblib.pipeline", "--profile", "full", "--only", "03,05"],
    ["nblib.chat", "--profile", "full"],
])
def test_a_p100_under_kaggles_torch_is_refused_before_anything_is_written(args, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    version, cuda, archs = KAGGLE_TORCH
    proc = _cli(args, home, FAKE_P100.format(archs=archs, cuda=cuda, version=version))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"python -m {args[0]}: error: Tesla P100-PCIE-16GB (compute capability 6.0, sm_60) cannot run this torch: "
        "torch 2.10.0+cu128 (CUDA 12.8) has GPU kernels for sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120 only, so "
        "its first CUDA operation would fail. Fix: pick Kaggle's \"GPU T4 x2\" accelerator, or install a torch "
        "built for CUDA 12.6, which has sm_60 kernels: pip install torch==2.10.0 --index-url "
        "https://download.pytorch.org/whl/cu126"]
    assert not list(home.rglob("*"))


def test_the_8bit_refusal_is_a_message(tmp_path):
    """A P100 under a cu126 torch: the 8-bit fine-tune is refused (LLM.int8() needs 7.5), no traceback."""
    version, cuda, archs = CU126_TORCH
    proc = _cli(["nblib.finetune", "--profile", "full", "--variant", "lora-8bit"], tmp_path,
                FAKE_P100.format(archs=archs, cuda=cuda, version=version))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith("python -m nblib.finetune: error: 8-bit base models need bitsandbytes' LLM.int8()")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, says", [
    (["nblib.train", "-p", "learning_rate=0"], "python -m nblib.train: error: invalid train setting(s): learning_rate=0"),
    (["nblib.finetune", "-p", "learning_rate=0"], "python -m nblib.finetune: error: invalid finetune setting(s): learning_rate=0"),
    (["nblib.pipeline", "-p", "max_stepz=3"], "python -m nblib.pipeline: error: parameter 'max_stepz' is not declared"),
    (["nblib.chat", "--temperature", "-1"], "python -m nblib.chat: error: invalid chat setting(s): temperature=-1"),
    (["nblib.report", "--label"], "python -m nblib.report: error: argument --label: expected one argument"),
])
def test_bad_arguments_are_one_message_and_exit_2(args, says, tmp_path):
    proc = _cli(args, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert says in proc.stderr
    assert not list(tmp_path.rglob("*"))


def test_readme_estimates_are_the_tools_output():
    spec = importlib.util.spec_from_file_location("kaggle_estimates", TOOLS / "kaggle_estimates.py")
    estimates = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(estimates)
    assert estimates.table() in _kaggle_section(), "run tools/kaggle_estimates.py and paste its table into README.md"
    pre = {r[0]: r for r in estimates.rows()}["pretrain MHA (8 x 8 x 512, 8 K/V heads)"]
    assert pre[1] == f"{train.max_steps_for(config.settings('train', 'full'), estimates.TRAIN_TOKENS)} steps"


def test_git_archive_carries_what_the_package_and_notebooks_need():
    """The offline repo zip (``git archive HEAD``) holds tracked files only: every file nblib and the
    pipeline read at run time must be tracked."""
    root = README.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = set(subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split())
    needed = [p.relative_to(root).as_posix() for pattern in ("nblib/**/*.py", "nblib/profiles/*.yaml", "nblib/report/style.css",
                                                              "nblib/qa/samples/*", "notebooks/*.ipynb", "requirements.txt",
                                                              "pyproject.toml", "tools/*.py")
              for p in root.glob(pattern)]
    assert needed and not [p for p in needed if p not in tracked], "untracked files the zip would miss"

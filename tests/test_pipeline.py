"""The papermill pipeline runner, on small real notebooks."""
from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from nblib import config, pipeline
from nblib.pipeline import Stage

_spec = importlib.util.spec_from_file_location("sync", Path(__file__).resolve().parents[1] / "tools" / "sync_notebook_outputs.py")
sync = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync)


def _notebook(path: Path, params: str, *cells: str) -> None:
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# demo"), p, *map(nbformat.v4.new_code_cell, cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def tiny(tmp_path, monkeypatch, home):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "a.ipynb", 'profile = "auto"\nword = "olá"',
              "import os, pathlib\npathlib.Path(os.environ['NBLIB_HOME'], 'a.txt').write_text(f'{profile}:{word}')")
    _notebook(nbs / "b.ipynb", 'profile = "auto"\nfail = False',
              "import os, pathlib\ntext = pathlib.Path(os.environ['NBLIB_HOME'], 'a.txt').read_text()",
              "if fail:\n    raise ValueError('bad input in stage b')",
              "pathlib.Path(os.environ['NBLIB_HOME'], 'b.txt').write_text(text.upper())")
    monkeypatch.setattr(pipeline, "NOTEBOOKS", nbs)
    monkeypatch.setattr(pipeline, "STAGES", (Stage("01_a", "a.ipynb"), Stage("02_b", "b.ipynb"), Stage("02_b_again", "b.ipynb", {"fail": True})))
    return home


def test_select_by_name_prefix_and_from():
    names = lambda stages: [s.name for s in stages]  # noqa: E731
    assert names(pipeline.select("03,04")) == ["03_train_mha", "04_train_gqa"]
    assert names(pipeline.select("05")) == ["05_finetune_lora_8bit", "05_finetune_lora_16bit", "05_finetune_lora_32bit", "05_finetune_full"]
    assert names(pipeline.select("ingest")) == ["01_ingest"]
    assert names(pipeline.select(start="06")) == ["06_compare", "07_chat_demo"]
    assert len(pipeline.select()) == len(pipeline.STAGES)
    with pytest.raises(config.SettingsError, match="no stage matches 'trian'"):
        pipeline.select("trian")
    for empty in ("", ",", " , "):  # not "every stage", not "none"
        with pytest.raises(config.SettingsError, match=f"--only {re.escape(repr(empty))} names no stage; .*from: 01_ingest, 02_clean"):
            pipeline.select(empty)


def test_impossible_settings_stop_the_pipeline_before_any_stage(home, tmp_path, capsys):
    """`--only 02,03 -p seeds=[]`: 03 would refuse seeds=[], so 02 must not run first."""
    out = tmp_path / "out"
    assert pipeline.main(["--only", "02,03", "-p", "seeds=[]", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m nblib.pipeline: error: stage 03_train_mha: invalid train setting(s): "
                          "seeds=[] must be a non-empty list of integers") and "Traceback" not in err
    assert not out.exists() and not (home / "data").exists()
    assert pipeline.main(["--only", ",", "--out", str(out)]) == 2
    assert "names no stage" in capsys.readouterr().err and not out.exists()
    assert pipeline.main(["--only", "02", "-p", "dialogue_targets={alpaca: -5}", "--out", str(out)]) == 2
    assert "stage 02_clean: invalid dialogue setting(s): targets.alpaca=-5" in capsys.readouterr().err


def test_parse_params_reads_yaml_values():
    assert config.parse_params(["a=3", "b=0.5", "c=true", "d=[1, 2]", "e=texto", "x.y=1"]) == {
        "a": 3, "b": 0.5, "c": True, "d": [1, 2], "e": "texto", "x.y": 1}
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        config.parse_params(["oops"])


def test_pipeline_runs_stages_in_order_with_params(tiny, tmp_path):
    out = tmp_path / "out"
    status = pipeline.run("smoke", only="01,02_b", params={"word": "mundo"}, out_dir=out, progress=False)
    assert [s["status"] for s in status["stages"]] == ["ok", "ok"]
    assert status["stages"][0]["params"] == {"profile": "smoke", "word": "mundo"}
    assert (tiny / "b.txt").read_text() == "SMOKE:MUNDO"
    assert (out / "01_a.ipynb").is_file() and (out / "02_b.ipynb").is_file()
    assert json.loads((out / "pipeline.json").read_text())["stages"][1]["name"] == "02_b"


def test_stage_scoped_and_unknown_params(tiny, tmp_path):
    status = pipeline.run("smoke", only="01", params={"01_a.word": "x"}, out_dir=tmp_path / "o", progress=False)
    assert status["stages"][0]["params"]["word"] == "x"


def test_failing_stage_stops_and_names_the_cell(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code = pipeline.main(["--profile", "smoke", "--out", str(out), "--no-progress", "-p", "02_b_again.fail=true"])
    assert code == 1
    err = capsys.readouterr().err
    assert "stage 02_b_again failed in cell 4 of b.ipynb" in err
    assert "ValueError: bad input in stage b" in err and "if fail:" in err
    status = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in status["stages"]] == ["ok", "ok", "failed"]


def test_list_stages(capsys):
    assert pipeline.main(["--list"]) == 0
    assert "07_chat_demo" in capsys.readouterr().out


def test_stage_progress_shows_live_and_warnings_are_repeated(tiny, tmp_path, capsys):
    nbs = pipeline.NOTEBOOKS
    _notebook(nbs / "slow.ipynb", 'profile = "auto"',
              "import time, warnings\nfrom nblib.progress import Progress\n"
              "with Progress('demo work', 3) as bar:\n    for i in range(3):\n        time.sleep(0.7)\n        bar.update(1, loss=1.5)",
              "warnings.warn('collection skipped: no machado/ folder in NBLIB_MIRROR')")
    stages = (Stage("01_slow", "slow.ipynb"),)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "STAGES", stages)
        mp.setattr(pipeline.Watcher, "__init__", _fast_watcher)
        status = pipeline.run("smoke", out_dir=tmp_path / "out", progress=True)
    out = capsys.readouterr().out
    assert re.search(r"01_slow \d+ s \| demo work: [1-3]/3 step, loss 1\.5", out), out
    assert re.search(rf"01_slow \d+ s \| {re.escape(pipeline.STARTING)}", out), out  # not a bare counter at start
    assert "01_slow: UserWarning: collection skipped" in out  # the notebook's warning, in the pipeline's output
    assert status["stages"][0]["warnings"] and not list((tmp_path / "out").glob(".*progress*"))


def _fast_watcher(self, path, label, out=None, interval=30.0):
    _real_watcher_init(self, path, label, out, 0.5)


_real_watcher_init = pipeline.Watcher.__init__


def test_dead_kernel_is_a_failed_stage_naming_the_cell(tiny, tmp_path, capsys):
    _notebook(pipeline.NOTEBOOKS / "oom.ipynb", 'profile = "auto"', "x = 1", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "STAGES", (Stage("01_a", "a.ipynb"), Stage("02_oom", "oom.ipynb")))
        code = pipeline.main(["--profile", "smoke", "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "stage 02_oom stopped in cell 4 of oom.ipynb" in err and "os.kill" in err
    assert "kernel died" in err and "out of memory" in err and "Traceback" not in err
    status = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert [s["status"] for s in status["stages"]] == ["ok", "failed"]


def _drive_long_stage(tmp_path: Path) -> subprocess.Popen:
    """``python -m nblib.pipeline`` (as a script) running only ``long.ipynb`` as stage 01_long, in a child process."""
    script = tmp_path / "drive.py"
    script.write_text(
        "import sys\nfrom nblib import pipeline\nfrom nblib.pipeline import Stage\n"
        f"pipeline.NOTEBOOKS = __import__('pathlib').Path({str(pipeline.NOTEBOOKS)!r})\n"
        "pipeline.STAGES = (Stage('01_long', 'long.ipynb'),)\n"
        f"sys.exit(pipeline.main(['--profile', 'smoke', '--out', {str(tmp_path / 'out')!r}, '--no-progress']))\n")
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_marks_the_stage_interrupted(tiny, tmp_path):
    _notebook(pipeline.NOTEBOOKS / "long.ipynb", 'profile = "auto"', "import time\ntime.sleep(120)")
    proc = _drive_long_stage(tmp_path)
    executed = tmp_path / "out" / "01_long.ipynb"

    def sleeping() -> bool:
        try:
            cells = nbformat.read(executed, as_version=4).cells
        except Exception:  # not written yet, or being written
            return False
        return any("sleep(120)" in c.source and c.metadata.get("papermill", {}).get("status") == "running" for c in cells)

    deadline = time.time() + 120
    while time.time() < deadline and not sleeping():
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    assert "stage 01_long interrupted (Ctrl-C) in cell 3 of long.ipynb" in err
    status = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert status["stages"][0]["status"] == "interrupted"


def test_misspelt_parameter_gets_a_suggestion(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"parameter 'wrod' is not declared .*did you mean 'word'\?"):
        pipeline.run("smoke", params={"wrod": 1}, out_dir=tmp_path / "o", progress=False)


def test_readme_parameter_example_is_declared():
    """The README's `-p 05_finetune_full.learning_rate=1e-4` reaches the notebook."""
    stages = pipeline.select(start="05")
    declared = {s.notebook: pipeline.declared_parameters(pipeline.NOTEBOOKS / s.notebook) for s in stages}
    user = config.parse_params(["05_finetune_full.learning_rate=1e-4"])
    pipeline.check_user_params(stages, user, declared)
    full = next(s for s in stages if s.name == "05_finetune_full")
    assert pipeline.stage_params(full, "smoke", user, declared[full.notebook])["learning_rate"] == "1e-4"
    assert config.settings("finetune", "smoke", learning_rate="1e-4")["learning_rate"] == 1e-4


def test_closing_summary_names_results_and_headlines(home, tmp_path):
    reports = home / "reports"
    reports.mkdir()
    (reports / "compare.html").write_text("<html></html>")
    (reports / "compare.md").write_text("# r\n\n## At a glance\n\n- **GQA** keeps a KV cache 0.50× the size\n- two\n\n## MHA vs GQA\n")
    text = pipeline.closing_summary({"stages": [{"name": "06_compare"}], "total_seconds": 12.0, "profile": "smoke",
                                     "out_dir": "runs/pipeline-x"})
    assert "report:             reports/compare.html" in text and "runs/pipeline-x/" in text
    assert "- GQA keeps a KV cache 0.50× the size" in text and "- two" in text
    # a run without the compare stage (a rerun of 03, say) must not quote a report its runs no longer match
    text = pipeline.closing_summary({"stages": [{"name": "03_train_mha"}], "total_seconds": 1.0, "profile": "smoke",
                                     "out_dir": "runs/pipeline-y"})
    assert "not rendered by this run: run 06_compare to refresh it" in text and "KV cache" not in text


@pytest.mark.parametrize("notebook", sorted({s.notebook for s in pipeline.STAGES}))
def test_committed_notebooks_are_clean(notebook):
    """Every stage notebook: a markdown introduction, a note saying which profile the outputs come
    from, one ``parameters`` cell with ``profile = "auto"``, the smoke run's outputs on code cells
    (plots included) with none of stderr, widgets, timings or machine paths, and outputs on every
    ``# NBVAL_CHECK_OUTPUT`` cell (what nbval compares)."""
    nb = nbformat.read(pipeline.NOTEBOOKS / notebook, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3" and "papermill" not in nb.metadata
    assert nb.cells[0].cell_type == "markdown" and sync.NOTE_MARK in nb.cells[1].source
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and 'profile = "auto"' in tagged[0].source and not tagged[0].outputs
    code = [c for c in nb.cells if c.cell_type == "code"]
    checked = [c for c in code if c.source.startswith("# NBVAL_CHECK_OUTPUT")]
    assert checked, f"{notebook} has no cell nbval checks"
    assert all(c.outputs and c.execution_count for c in checked), "run tools/sync_notebook_outputs.py"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.get("name") == "stderr"], "stderr (progress bars) in committed outputs"
    assert not any("papermill" in c.metadata or "execution" in c.metadata for c in nb.cells)
    assert sync.machine_paths(outputs) == []
    if notebook != "07_chat_demo.ipynb":  # every other stage draws at least one figure
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{notebook}: no plot in the committed outputs"


@pytest.mark.parametrize("leak", ["/kaggle/working/runs", "/Users/ana/machado", "/content/drive", "/tmp/x", "C:\\Users\\ana"])
def test_output_sync_refuses_machine_paths_and_leaves_the_notebook(leak, tmp_path):
    src = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("print(p)")])
    ran = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(p)", outputs=[
        nbformat.v4.new_output("stream", name="stdout", text=f"saved to {leak}/ckpt.pt\n")])])
    nbformat.write(src, tmp_path / "src.ipynb")
    nbformat.write(ran, tmp_path / "ran.ipynb")
    before = (tmp_path / "src.ipynb").read_bytes()
    with pytest.raises(SystemExit, match="machine path"):
        sync.sync_notebook(tmp_path / "src.ipynb", tmp_path / "ran.ipynb")
    assert (tmp_path / "src.ipynb").read_bytes() == before
    ran.cells[0].outputs[0].text = "saved to runs/pretrain-mha/seed-1337/ckpt.pt\n"  # relative: kept
    nbformat.write(ran, tmp_path / "ran.ipynb")
    assert sync.sync_notebook(tmp_path / "src.ipynb", tmp_path / "ran.ipynb") == 1


def test_pretraining_notebooks_differ_only_in_parameters():
    """03 and 04 are one stage run twice (MHA and GQA): their code may not drift apart. 04 adds only
    cells that teach GQA (the grouped attention, the conversion, the uptraining curve) and train nothing."""
    def code(name: str) -> list[str]:
        cells = nbformat.read(pipeline.NOTEBOOKS / name, as_version=4).cells
        return [c.source for c in cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])]

    mha, gqa = code("03_train_mha.ipynb"), code("04_train_gqa.ipynb")
    assert [c for c in gqa if c in mha] == mha
    assert not [c for c in gqa if c not in mha and ("train.launch" in c or "train.run" in c or "NBVAL_CHECK_OUTPUT" in c)]


def test_disk_record_and_full_profile_estimate(tiny, tmp_path):
    """pipeline.json's ``disk``: bytes per folder and run folder (W&B files inside), the clone apart;
    dry-run/ and virtual envs left out; a dry run's estimate multiplies run folders by the full profile's seeds."""
    files = {"data/raw/x": 1000, "reports/r.md": 10, "runs/pretrain-mha/seed-1337/best.pt": 3000,
             "runs/finetune-full/seed-1234/wandb/offline-run-1/run-1.wandb": 2000,
             "runs/pretrain-gpt2-small/seed-1337/hf/model.safetensors": 500,
             "dry-run/runs/big.pt": 10**6, ".venv/lib/big.so": 10**6}
    for name, size in files.items():
        (tiny / name).parent.mkdir(parents=True, exist_ok=True)
        (tiny / name).write_bytes(b"\0" * size)
    status = pipeline.run("smoke", only="01", out_dir=tmp_path / "out", progress=False)
    disk = json.loads((tmp_path / "out" / "pipeline.json").read_text())["disk"]
    assert disk == status["disk"] and "full_profile_estimate_bytes" not in disk  # not a dry run
    assert disk["folders"] == {"a.txt": len("smoke:olá".encode()), "data": 1000, "reports": 10}
    assert disk["runs"] == {"finetune-full/seed-1234": 2000, "pretrain-gpt2-small/seed-1337": 500,
                            "pretrain-mha/seed-1337": 3000}
    assert disk["clone"] > 10**5 and disk["total_bytes"] == sum(disk["folders"].values()) + 5500 + disk["clone"]
    estimate = pipeline.disk_usage(estimate=True)
    assert estimate["full_profile_counts"] == {"finetune-full/seed-1234": 3, "pretrain-gpt2-small/seed-1337": 1,
                                               "pretrain-mha/seed-1337": 3}
    assert estimate["full_profile_estimate_bytes"] == 3 * 2000 + 500 + 3 * 3000 + 1000 + 10 + 10 + disk["clone"]
    missing = sorted({"finetune-lora-16bit", "finetune-lora-32bit", "finetune-lora-8bit", *pipeline.pretrain_runs("full")} - {"pretrain-mha"})
    assert "pretrain-gqa-uptrained" in missing  # every variant of the full profile's `variants`
    assert f"not counted: {', '.join(missing)}" in estimate["full_profile_estimate_assumes"]


_HOLD = ("import sys, time\nfrom nblib import lock\nwith lock.hold('holder-under-test'):\n"
         "    print('held', flush=True)\n    time.sleep(120) if sys.argv[1] == 'wait' else __import__('os').kill(__import__('os').getpid(), 9)\n")


def _holder(mode: str) -> subprocess.Popen:
    """A real process that takes the working root's lock, then waits (``wait``) or is killed (``die``)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


@pytest.mark.parametrize("command", ["nblib.pipeline", "nblib.train", "nblib.finetune"])
def test_second_command_on_one_home_is_refused_naming_the_holder(home, command):
    """Two pipelines (or a pipeline and a stage command) on one NBLIB_HOME used to corrupt each
    other's checkpoints and metrics: the second is refused, exit 2, naming the holder."""
    holder = _holder("wait")
    try:
        proc = subprocess.run([sys.executable, "-m", command, "--profile", "smoke"] + (["--only", "01"] if command == "nblib.pipeline" else []),
                              capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"is in use by pid {holder.pid} on " in proc.stderr and "(holder-under-test)" in proc.stderr
    assert "--home or NBLIB_HOME" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in (home / "runs").iterdir()] == [".nblib.lock"]  # nothing else written


def test_lock_of_a_dead_holder_is_taken_over_with_a_note(tiny, tmp_path, capsys):
    holder = _holder("die")
    assert holder.wait() == -9
    assert pipeline.main(["--profile", "smoke", "--only", "01", "--no-progress", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"note: took over the lock on {tiny} left by pid {holder.pid} on " in err and "ended without releasing it" in err
    assert not (tiny / "runs" / ".nblib.lock").exists()  # released: the lock file goes with its holder
    assert (tiny / "a.txt").read_text() == "smoke:olá"


def test_executed_notebook_folders_never_collide(tmp_path):
    """``runs/pipeline-<second>``: two runs started within one second get two folders."""
    from nblib.files import make_new_dir

    first, second = make_new_dir(tmp_path / "pipeline-1"), make_new_dir(tmp_path / "pipeline-1")
    assert (first.name, second.name) == ("pipeline-1", "pipeline-1-2") and first.is_dir() and second.is_dir()


def test_sigterm_marks_the_stage_interrupted_and_stops_the_kernel(tiny, tmp_path):
    """SIGTERM (a Kaggle session ending) takes Ctrl-C's path: the stage is marked interrupted, one
    message says how to resume, no traceback, and the stage's kernel is shut down."""
    pid_file = tmp_path / "kernel.pid"
    _notebook(pipeline.NOTEBOOKS / "long.ipynb", 'profile = "auto"',
              f"import os, pathlib, time\npathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\ntime.sleep(120)")
    proc = _drive_long_stage(tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and not pid_file.is_file():
        time.sleep(0.5)
    kernel = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    assert "stage 01_long interrupted (SIGTERM) in cell 3 of long.ipynb" in err
    assert "to resume, run the same command again (or with --from 01_long)" in err and "Traceback" not in err
    status = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert status["stages"][0]["status"] == "interrupted" and "SIGTERM" in status["stages"][0]["error"]
    for _ in range(40):  # the kernel is shut down, not left running
        if not Path(f"/proc/{kernel}").exists() or "Z" in Path(f"/proc/{kernel}/stat").read_text().split()[2]:
            break
        time.sleep(0.25)
    else:
        pytest.fail(f"the stage's kernel (pid {kernel}) still runs after the pipeline ended")


def test_an_offline_machine_without_a_mirror_is_refused_before_any_work(home, monkeypatch, mirror):
    """The README's rerun of 03/04 without NBLIB_MIRROR, offline: refused up front, naming the variable."""
    from nblib import reach

    tried = []
    monkeypatch.setattr(reach, "reachable", lambda host: tried.append(host) or False)
    monkeypatch.delenv("NBLIB_MIRROR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(home / "no-cache"))
    with pytest.raises(config.SettingsError, match=r"stage 03_train_mha needs GPT-2's tokenizer ranks from "
                                                   r"openaipublic\.blob\.core\.windows\.net.*NBLIB_MIRROR is not set.*Makefile"):
        pipeline.run("smoke", only="03,04", params={"max_steps": 50})
    assert tried == [reach.TIKTOKEN] and not (home / "runs").exists()  # no pipeline folder, no stage
    with pytest.raises(config.SettingsError, match="stage 01_ingest needs the Machado de Assis books from www.gutenberg.org"):
        pipeline.run("smoke", only="01")
    with pytest.raises(config.SettingsError, match="stage 05_finetune_full needs .*the base model 'gpt2' from huggingface.co"):
        pipeline.run("full", only="05_finetune_full")
    monkeypatch.setenv("NBLIB_MIRROR", str(mirror))  # the mirror serves ingest and the tokenizer; 05's folder comes from 03
    for notebook in ("01_ingest.ipynb", "03_train_mha.ipynb", "05_finetune_lora_8bit.ipynb"):
        assert reach.fetches(notebook, {"profile": "smoke"}) == []
    assert reach.fetches("05_finetune_full.ipynb", {"profile": "full"}) == [("the base model 'gpt2'", reach.HUB)]


def test_stages_whose_inputs_ran_again_are_stale_in_pipeline_json_and_the_summary(home):
    """After ``--only 03,04`` the fine-tunes, the report and the chat transcript are stale, and said to be."""
    from nblib import freshness

    stamps = {"01_ingest": 1, "02_clean": 2, "03_train_mha": 9, "04_train_gqa": 10, "05_finetune_lora_8bit": 5,
              "05_finetune_full": 6, "06_compare": 7, "07_chat_demo": 8}
    (home / "runs").mkdir()
    (home / "runs" / freshness.LEDGER).write_text(json.dumps(
        {k: {"finished": f"2026-12-07T10:{v:02d}:00+00:00", "profile": "smoke", "order": v} for k, v in stamps.items()}))
    gone = freshness.stale()
    assert set(gone) == {"05_finetune_lora_8bit", "05_finetune_full", "06_compare", "07_chat_demo"}
    assert gone["05_finetune_full"].startswith("03_train_mha ran again at 2026-12-07T10:09:00+00:00, after it")
    assert gone["07_chat_demo"] == "it read 05_finetune_full, which is stale"
    assert freshness.report_problems() == [f"06_compare: {gone['06_compare']}"]
    assert freshness.upstream_warnings("06_compare")[0].startswith("05_finetune_lora_8bit: 03_train_mha ran again")
    status = {"stages": [{"name": "03_train_mha"}, {"name": "04_train_gqa"}], "total_seconds": 1.0, "profile": "smoke",
              "out_dir": "runs/pipeline-x", "stale": gone}
    summary = pipeline.closing_summary(status)
    assert list(gone) == ["05_finetune_lora_8bit", "05_finetune_full", "06_compare", "07_chat_demo"]  # as they ran
    assert "stale (inputs changed after they ran): 05_finetune_lora_8bit, 05_finetune_full, 06_compare, 07_chat_demo" in summary
    assert re.search(r"rerun them: \S+ -m nblib\.pipeline --profile smoke --from 05_finetune_lora_8bit", summary)
    freshness.record("02_clean", "full")  # a stage of another profile: everything after it is stale too
    assert "in the smoke profile, 02_clean in full" in freshness.stale()["03_train_mha"]


def test_printed_commands_run_from_a_shell_without_the_venv_on_path(tmp_path):
    """The closing summary's and the hints' interpreter is this one, reachable from a plain shell."""
    import os
    import shlex

    code = "from nblib import config; print(config.python_command())"
    plain = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    plain["PATH"] = ":".join(p for p in os.environ["PATH"].split(":") if Path(p).resolve() != Path(sys.executable).parent.resolve()
                             and not (Path(p) / "python").exists()) or "/usr/bin:/bin"
    repo = Path(__file__).resolve().parents[1]
    printed = subprocess.run([sys.executable, "-c", code], cwd=repo, env=plain, capture_output=True, text=True,
                             check=True).stdout.strip()
    assert printed != "python"  # no python on this PATH: the interpreter is named by its path
    for command in (f"{printed} -m nblib.chat --help", f"{printed} -m nblib.pipeline --list"):
        done = subprocess.run(["bash", "-c", command], cwd=repo, env=plain, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (command, done.stderr[-500:])
    venv = {**plain, "PATH": f"{Path(sys.executable).parent}:{plain['PATH']}"}  # an activated venv: plain "python"
    assert subprocess.run([sys.executable, "-c", code], cwd=repo, env=venv, capture_output=True, text=True,
                          check=True).stdout.strip() == "python"
    assert shlex.split(printed)


def test_a_relative_mirror_means_the_same_folder_inside_the_stages(tiny, tmp_path, monkeypatch, mirror):
    """``export NBLIB_MIRROR=../shared/data`` is relative to the user's shell; the stages' kernels run in notebooks/."""
    import os

    nbs = pipeline.NOTEBOOKS
    _notebook(nbs / "env.ipynb", 'profile = "auto"',
              "import os, pathlib\npathlib.Path(os.environ['NBLIB_HOME'], 'mirror.txt').write_text(os.environ['NBLIB_MIRROR'])")
    monkeypatch.setattr(pipeline, "STAGES", (Stage("01_env", "env.ipynb"),))
    monkeypatch.chdir(mirror.parent)
    monkeypatch.setenv("NBLIB_MIRROR", mirror.name)
    assert pipeline.main(["--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert (tiny / "mirror.txt").read_text() == str(mirror) and os.environ["NBLIB_MIRROR"] == str(mirror)

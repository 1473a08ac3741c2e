"""The papermill pipeline runner, on small real notebooks."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from nblib import pipeline
from nblib.pipeline import Stage


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
    assert names(pipeline.select("05")) == ["05_finetune_lora_8bit", "05_finetune_lora_32bit", "05_finetune_full"]
    assert names(pipeline.select("ingest")) == ["01_ingest"]
    assert names(pipeline.select(start="06")) == ["06_compare", "07_chat_demo"]
    assert len(pipeline.select()) == len(pipeline.STAGES)
    with pytest.raises(ValueError, match="no stage matches 'trian'"):
        pipeline.select("trian")


def test_parse_params_reads_yaml_values():
    assert pipeline.parse_params(["a=3", "b=0.5", "c=true", "d=[1, 2]", "e=texto", "x.y=1"]) == {
        "a": 3, "b": 0.5, "c": True, "d": [1, 2], "e": "texto", "x.y": 1}
    with pytest.raises(ValueError, match="not key=value"):
        pipeline.parse_params(["oops"])


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
    with pytest.raises(ValueError, match="parameter 'wrod' is not declared by any selected stage"):
        pipeline.run("smoke", params={"wrod": 1}, out_dir=tmp_path / "o2", progress=False)


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


@pytest.mark.parametrize("notebook", sorted({s.notebook for s in pipeline.STAGES}))
def test_committed_notebooks_are_clean(notebook):
    """Every stage notebook: a markdown introduction, one ``parameters`` cell with ``profile = "auto"``, and
    outputs only on ``# NBVAL_CHECK_OUTPUT`` cells (what nbval compares), free of machine paths."""
    nb = nbformat.read(pipeline.NOTEBOOKS / notebook, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].cell_type == "markdown"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and 'profile = "auto"' in tagged[0].source
    code = [c for c in nb.cells if c.cell_type == "code"]
    checked = [c for c in code if c.source.startswith("# NBVAL_CHECK_OUTPUT")]
    assert checked, f"{notebook} has no cell nbval checks"
    assert all(c.outputs and c.execution_count for c in checked), "run tools/sync_notebook_outputs.py"
    assert not any(c.outputs for c in code if c not in checked)
    text = json.dumps([c.outputs for c in checked])
    assert not any(p in text for p in ("/tmp/", "/work/", "/home/", "/root/", "/kaggle/")), "machine path in outputs"

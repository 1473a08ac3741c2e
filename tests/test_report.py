"""The compare stage: run loading and refusals, tables, side-by-side generation measurement,
the rendered report (parsed) and a headless-Chromium screenshot of it.

Fixture runs follow docs/DESIGN.md's run-folder contract; the pretraining ones hold tiny real
GPT checkpoints (about 400k parameters) saved through ``nblib.model.save_checkpoint``.
"""
from __future__ import annotations

import base64
import csv
import io
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import papermill
import pytest
import torch
from PIL import Image

from nblib import config, report
from nblib.files import write_json, write_jsonl
from nblib.model import GPT, GPTConfig, save_checkpoint

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "06_compare.ipynb"
CONTEXT = 64


def _machine() -> dict:
    return {"cpu": "Test CPU", "cpu_cores": 2, "gpu": None, "device": "cpu", "python": "3.11", "torch": torch.__version__}


def make_pretrain_run(root: Path, variant: str, n_kv_head: int, val_offset: float = 0.0, speed: float = 1.0) -> GPT:
    """``runs/pretrain-<variant>`` with a tiny real checkpoint, a summary and eval metrics."""
    torch.manual_seed(0)
    cfg = GPTConfig(context_length=CONTEXT, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=8)
    model = GPT(cfg)
    run = config.paths(root).run(f"pretrain-{variant}")
    save_checkpoint(run / "best.pt", model)
    evals = [
        {"kind": "eval", "step": s, "tokens": s * 512, "wall": s * 0.5 / speed, "train_loss": 9 - s / 10,
         "val_loss": 9.5 - s / 10 + val_offset, "val_ppl": 2.0 ** (9.5 - s / 10 + val_offset), "lr": 1e-3,
         "tokens_per_s": 1000 * speed, "mfu": None, "peak_memory_bytes": None, "sample": "Era uma vez"}
        for s in (0, 10, 20, 30)
    ]
    train = [{"kind": "train", "step": s, "tokens": s * 512, "wall": s * 0.5 / speed, "loss": 9 - s / 10, "lr": 1e-3} for s in range(0, 31, 5)]
    write_jsonl(run / "metrics.jsonl", train + evals)
    write_json(run / "summary.json", {
        "name": f"pretrain-{variant}", "stage": "pretrain", "profile": "smoke", "seed": 1337,
        "config": {"n_layer": 2, "n_head": 4, "n_kv_head": n_kv_head, "d_model": 8, "context_length": CONTEXT, "lr": 1e-3, "batches": [4, 8]},
        "machine": _machine(), "wall_seconds": 15.0 / speed, "peak_memory_bytes": 50 * 2**20, "finished": True,
        "variant": variant, "params": model.num_params(), "params_embedding": model.num_params("embedding"),
        "params_blocks": model.num_params("blocks"), "n_layer": 2, "n_head": 4, "n_kv_head": n_kv_head, "d_model": 8,
        "context_length": CONTEXT,
        "kv_cache_bytes_per_token": {"float32": model.kv_cache_bytes(1, 1), "bfloat16": model.kv_cache_bytes(1, 1, torch.bfloat16)},
        "best_val_loss": 6.5 + val_offset, "best_val_ppl": 2.0 ** (6.5 + val_offset), "final_val_loss": 6.5 + val_offset,
        "final_val_ppl": 2.0 ** (6.5 + val_offset), "train_tokens_per_s": 1000.0 * speed, "tokens_seen": 15360, "steps": 30,
        "checkpoint": f"runs/pretrain-{variant}/best.pt", "hf_export": None,
    })
    return model


def make_finetune_run(root: Path, variant: str, trainable: int, footprint_mib: float, eval_loss: float, samples_per_s: float) -> None:
    """``runs/finetune-<variant>``: summary and Trainer-style metrics (no weights needed by the report)."""
    run = config.paths(root).run(f"finetune-{variant}")
    rows = [{"kind": "train", "step": s, "loss": 4 - s / 20} for s in (5, 10, 15, 20)]
    rows += [{"kind": "eval", "step": s, "eval_loss": eval_loss + 1 - s / 20} for s in (10, 20)]
    write_jsonl(run / "metrics.jsonl", rows)
    questions = ["Quem escreveu Dom Casmurro?", "O que é um verbo?"]
    write_json(run / "summary.json", {
        "name": f"finetune-{variant}", "stage": "finetune", "profile": "smoke", "seed": 1337,
        "config": {"variant": variant, "steps": 20, "lora_r": 8}, "machine": _machine(), "wall_seconds": 60 / samples_per_s,
        "peak_memory_bytes": int(3 * footprint_mib * 2**20), "finished": True, "variant": variant,
        "mode": "8bit" if "8bit" in variant else "32bit", "lora": variant.startswith("lora"), "base_model": "runs/pretrain-mha/hf",
        "trainable_params": trainable, "total_params": 400_000, "footprint_bytes": int(footprint_mib * 2**20),
        "eval_loss": eval_loss, "eval_ppl": 2.718 ** eval_loss, "base_eval_loss": 5.0, "base_eval_ppl": 148.4,
        "stop_rate_before": 0.0, "stop_rate_after": 0.5, "train_samples_per_s": samples_per_s,
        "samples": [{"question": q, "before": "...", "after": f"{variant} diz: resposta {i}"} for i, q in enumerate(questions)],
        "adapter": "adapter" if variant.startswith("lora") else None, "merged": "merged",
    })


def make_all_runs(root: Path) -> None:
    make_pretrain_run(root, "mha", 4)
    make_pretrain_run(root, "gqa", 2, val_offset=0.05, speed=1.1)
    make_finetune_run(root, "lora-8bit", 4_000, 0.6, 3.2, 10.0)
    make_finetune_run(root, "lora-32bit", 4_000, 1.6, 3.1, 14.0)
    make_finetune_run(root, "full", 400_000, 1.6, 3.0, 12.0)


# --------------------------------------------------------------------------- loading


def test_refuses_missing_runs_naming_the_notebook(home):
    with pytest.raises(report.MissingRunError, match=r"runs/pretrain-mha/summary.json not found: run notebook 03_train_mha"):
        report.load_runs()
    make_pretrain_run(home, "mha", 4)
    with pytest.raises(report.MissingRunError, match=r"runs/pretrain-gqa/summary.json not found: run notebook 04_train_gqa"):
        report.load_runs()
    make_pretrain_run(home, "gqa", 2)
    with pytest.raises(report.MissingRunError, match=r"05_finetune_lora_8bit with variant='lora-8bit'"):
        report.load_runs(["pretrain-mha", "pretrain-gqa", "finetune-lora-8bit"])
    with pytest.raises(report.MissingRunError, match=r"add pretrain-mha to `runs` \(notebook 03_train_mha"):
        report.load_runs(["pretrain-gqa"])
    summary = home / "runs" / "pretrain-gqa" / "summary.json"
    summary.write_text(summary.read_text().replace('"finished": true', '"finished": false'))
    with pytest.raises(report.MissingRunError, match=r"runs/pretrain-gqa is not finished .* re-run notebook 04_train_gqa"):
        report.load_runs()
    summary.write_text(summary.read_text().replace('"finished": false', '"finished": true').replace('"best_val_loss"', '"old_key"'))
    with pytest.raises(ValueError, match=r"runs/pretrain-gqa/summary.json lacks best_val_loss"):
        report.load_runs()
    summary.write_text(summary.read_text().replace('"old_key"', '"best_val_loss"'))
    (home / "runs" / "pretrain-gqa" / "best.pt").unlink()
    with pytest.raises(report.MissingRunError, match=r"runs/pretrain-gqa: the checkpoint .* re-run notebook 04_train_gqa"):
        report.load_models(report.load_runs(), "cpu")


def test_loads_every_run_in_a_fixed_order(home):
    make_all_runs(home)
    (home / "runs" / "pipeline-20250101-000000").mkdir()  # the pipeline's own folder has no summary
    runs = report.load_runs()
    assert list(runs) == ["pretrain-mha", "pretrain-gqa", "finetune-lora-8bit", "finetune-lora-32bit", "finetune-full"]
    assert list(report.pretrain_runs(runs)) == ["MHA", "GQA"]
    overview = report.runs_overview(runs)
    assert overview.loc["pretrain-gqa", "folder"] == "runs/pretrain-gqa"
    assert list(report.load_runs(["finetune-full"])) == ["finetune-full"]
    summary = home / "runs" / "finetune-full" / "summary.json"
    summary.write_text(summary.read_text().replace('"finished": true', '"finished": false'))
    with pytest.warns(UserWarning, match=r"runs/finetune-full is not finished and is left out; re-run notebook 05_finetune_lora_8bit with variant='full'"):
        assert "finetune-full" not in report.load_runs()
    with pytest.raises(report.MissingRunError, match="runs/finetune-full is not finished"):
        report.load_runs(["finetune-full"])


# --------------------------------------------------------------------------- tables and measurement


def test_pretrain_table_states_each_figure_as_a_ratio_to_mha(home):
    mha = make_pretrain_run(home, "mha", 4)
    gqa = make_pretrain_run(home, "gqa", 2, val_offset=0.05, speed=1.1)
    t = report.pretrain_table(report.load_runs(), contexts=(1024, 4096))
    assert list(t.columns) == ["MHA", "GQA", "GQA ÷ MHA"]
    assert t.loc["KV heads", "GQA ÷ MHA"] == 0.5
    assert t.loc["KV cache per token (bytes, fp32)", "GQA ÷ MHA"] == 0.5
    assert t.loc["KV cache at 4k context (MiB, fp32)", "MHA"] == mha.kv_cache_bytes(1, 4096) / 2**20
    assert t.loc["Parameters", "GQA"] == gqa.num_params() < mha.num_params()
    assert t.loc["Train tokens/s", "GQA ÷ MHA"] == pytest.approx(1.1)
    assert t.loc["Best val loss", "GQA"] == pytest.approx(6.55)
    glance = report.at_a_glance(t)
    assert any("KV cache 0.50× the size of MHA's" in line for line in glance)
    assert any("training 1.10×" in line for line in glance)


def test_generation_is_measured_interleaved_with_real_caches(home):
    make_pretrain_run(home, "mha", 4)
    make_pretrain_run(home, "gqa", 2)
    runs = report.load_runs()
    models = report.load_models(runs, "cpu")
    timings = report.measure_generation(models, "Uma noite destas,", batch_sizes=(1, 8), new_tokens=8, repeats=3)
    assert len(timings) == 3 * 2 * 2
    order = list(timings["variant"])
    assert order[:4] == ["MHA", "GQA", "MHA", "GQA"] and order[4:8] == ["GQA", "MHA", "GQA", "MHA"]
    assert (timings["tokens_per_s"] > 0).all()
    table = report.generation_table(timings)
    assert list(table.columns) == ["MHA", "GQA"]
    tokens = len(report_prompt_ids("Uma noite destas,")) + 8
    cache_mib = table.loc[f"KV cache allocated, batch 8 × {tokens} tokens (MiB)"]
    assert cache_mib["MHA"] == models["MHA"].kv_cache_bytes(8, tokens) / 2**20
    assert cache_mib["GQA"] / cache_mib["MHA"] == 0.5
    full = report.pretrain_table(runs, table)
    assert "Generation tokens/s, batch 8 (KV cache)" in full.index
    assert full.loc[f"KV cache allocated, batch 1 × {tokens} tokens (MiB)", "GQA ÷ MHA"] == 0.5
    with pytest.raises(ValueError, match=r"gen_new_tokens=80 does not fit MHA's context"):
        report.measure_generation(models, "Uma noite destas,", new_tokens=80, repeats=1)


def report_prompt_ids(text: str) -> list[int]:
    from nblib.tokenizer import get_encoding

    return get_encoding().encode_ordinary(text)


def test_sample_generations_are_side_by_side_and_seeded(home):
    make_pretrain_run(home, "mha", 4)
    make_pretrain_run(home, "gqa", 2)
    models = report.load_models(report.load_runs(), "cpu")
    prompts = ["Capitu tinha olhos de", "A vida é"]
    a = report.sample_generations(models, prompts, max_new_tokens=6, seed=7)
    b = report.sample_generations(models, prompts, max_new_tokens=6, seed=7)
    assert list(a.index) == prompts and list(a.columns) == ["MHA", "GQA"]
    assert a.equals(b)
    assert all(isinstance(x, str) and x for x in a.to_numpy().ravel())


def test_finetune_table_and_glance(home):
    make_all_runs(home)
    runs = report.load_runs()
    t = report.finetune_table(runs)
    assert list(t.columns) == ["LoRA + 8-bit", "LoRA + 32-bit", "Full fine-tune"]
    assert t.loc["Trainable share (%)", "LoRA + 8-bit"] == 1.0
    assert t.loc["Model footprint (MiB)", "LoRA + 8-bit"] == pytest.approx(0.6, rel=1e-6)
    glance = report.at_a_glance(None, t)
    assert any(line.startswith("**LoRA + 8-bit** against Full fine-tune: 0.37× the footprint") for line in glance)
    assert any("8-bit** against LoRA + 32-bit" in line and "eval loss +0.100" in line for line in glance)
    assert not any(line.startswith("**Full fine-tune** against") for line in glance)
    samples = report.finetune_samples(runs)
    assert list(samples.columns) == ["Base model", "LoRA + 8-bit", "LoRA + 32-bit", "Full fine-tune"]
    assert samples.loc["O que é um verbo?", "Full fine-tune"] == "full diz: resposta 1"
    report.finetune_runs(runs)["LoRA + 8-bit"].summary["samples"][1]["after"] = ""
    assert report.finetune_samples(runs).loc["O que é um verbo?", "LoRA + 8-bit"] == report.EMPTY_ANSWER
    assert report.finetune_table(report.load_runs(["pretrain-mha", "pretrain-gqa"])) is None


def test_format_value():
    assert report.format_value(6834432.0) == "6,834,432"
    assert report.format_value(2.0) == "2"
    assert report.format_value(12) == "12"
    assert report.format_value(5.123456) == "5.123"
    assert report.format_value(0.5, ratio=True) == "0.50×"
    assert report.format_value(float("nan")) == "–"
    assert report.format_value(None) == "–"
    assert report.format_value("8bit") == "8bit"


# --------------------------------------------------------------------------- the rendered report


class _Page(HTMLParser):
    """Collects tables (as lists of rows), images and every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.urls: list[str] = []
        self.scripts = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href", "srcset", "action", "data") and v]
        if tag == "script" or tag == "link":
            self.scripts += 1
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, mirror) -> Path:
    """The 06 notebook executed by papermill over fixture runs; returns the working root."""
    root = tmp_path_factory.mktemp("compare-home")
    make_all_runs(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NBLIB_HOME", str(root))
        papermill.execute_notebook(
            str(NOTEBOOK), str(root / "06_compare.ipynb"), kernel_name="python3", progress_bar=False,
            cwd=str(NOTEBOOK.parent),
            parameters={"profile": "smoke", "gen_new_tokens": 8, "gen_repeats": 2, "sample_new_tokens": 8},
        )
    return root


def test_report_is_rendered_self_contained_with_tables_and_images(rendered):
    html_text = (rendered / "reports" / "compare.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(html_text)
    assert page.scripts == 0
    assert all(u.startswith(("#", "data:image/png;base64,")) for u in page.urls), [u[:40] for u in page.urls]
    assert len(page.images) >= 5
    for src in page.images:
        png = base64.b64decode(src.removeprefix("data:image/png;base64,"))
        assert Image.open(io.BytesIO(png)).size[0] > 300
    head = {t[0][0] if t[0] else "": t for t in page.tables}
    pre = next(t for t in page.tables if t[0][:4] == ["metric", "MHA", "GQA", "GQA ÷ MHA"])
    rows = {r[0]: r[1:] for r in pre[1:]}
    assert rows["KV heads"] == ["4", "2", "0.50×"]
    assert rows["KV cache per token (bytes, fp32)"][2] == "0.50×"
    assert rows["Generation tokens/s, batch 8 (KV cache)"][2].endswith("×")
    assert "question" in head and "prompt" in head
    ft = next(t for t in page.tables if t[0][1:] == ["LoRA + 8-bit", "LoRA + 32-bit", "Full fine-tune"])
    assert dict((r[0], r[1:]) for r in ft[1:])["Trainable parameters"] == ["4,000", "4,000", "400,000"]
    assert 'name="viewport"' in html_text and "overflow-x:auto" in html_text
    assert "CPU smoke run" in html_text and "profile <strong>smoke</strong>" in html_text
    assert config.machine_info()["cpu"] in html_text
    assert "KV cache 0.50× the size of MHA&#x27;s" in html_text  # the at-a-glance summary
    assert html_text.index(">At a glance</h2>") < html_text.index(">MHA vs GQA</h2>")
    for name in ("compare.html", "compare.md", "compare.csv"):
        assert str(rendered) not in (rendered / "reports" / name).read_text(encoding="utf-8"), f"absolute path in {name}"


def test_markdown_and_csv_hold_the_same_tables(rendered):
    md = (rendered / "reports" / "compare.md").read_text(encoding="utf-8")
    assert "| KV heads | 4 | 2 | 0.50× |" in md
    assert "## At a glance" in md
    rows = list(csv.DictReader(io.StringIO((rendered / "reports" / "compare.csv").read_text(encoding="utf-8"))))
    kv = [r for r in rows if r["row"] == "KV heads" and r["column"] == "GQA ÷ MHA"]
    assert kv and float(kv[0]["value"]) == 0.5
    assert {r["table"] for r in rows} >= {"MHA vs GQA", "Fine-tuning variants", "Pretraining configs"}


def test_publish_example_copies_the_report(rendered, tmp_path):
    written = report.publish_example(rendered, tmp_path, label="smoke-cpu")
    assert [p.name for p in written] == ["compare-smoke-cpu.html", "compare-smoke-cpu.md", "compare-smoke-cpu.csv"]
    assert written[0].read_bytes() == (rendered / "reports" / "compare.html").read_bytes()
    with pytest.raises(FileNotFoundError, match="run the pipeline"):
        report.publish_example(tmp_path / "empty", tmp_path)


# --------------------------------------------------------------------------- headless Chromium


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("Chromium is missing: install it (Debian: apt-get install -y chromium); .ci/run does this in CI")


@pytest.mark.parametrize("width,height", [(412, 915), (1280, 900)], ids=["phone", "desktop"])
def test_report_screenshot_in_headless_chromium(rendered, tmp_path, width, height):
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile_dir:
        proc = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile_dir}", f"--screenshot={shot}", f"--window-size={width},{height}",
             (rendered / "reports" / "compare.html").as_uri()],
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"bytes written to file", proc.stderr), proc.stderr[-2000:]
    image = Image.open(shot).convert("L")
    assert image.size == (width, height)
    lo, hi = image.getextrema()
    assert hi - lo > 100, "the screenshot is blank"
    dark = sum(image.histogram()[:128])
    assert dark > 0.005 * width * height, "almost no text was drawn"

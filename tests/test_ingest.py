"""Tests for nblib.ingest: the mirror, a real HTTP server on 127.0.0.1, local folders and QA files."""

from __future__ import annotations

import codecs
import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nblib import config, ingest, plots
from nblib.clean import START_RE as START_PATTERN
from nblib.clean import decode
from nblib.files import sha256_file


@pytest.fixture
def store(tmp_path) -> ingest.RawStore:
    return ingest.RawStore(tmp_path / "raw")


# ---------------------------------------------------------------------------------------------
# a small Gutenberg-like server


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.routes``; ``server.fail[path] = n`` answers 503 to the first n requests,
    ``server.truncate[path] = n`` sends half the body to the first n requests; Range is honoured."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        srv = self.server
        srv.hits[self.path] += 1
        srv.ranges.append(self.headers.get("Range"))
        data = srv.routes.get(self.path)
        if data is None:
            self.send_error(404)
            return
        if srv.hits[self.path] <= srv.fail.get(self.path, 0):
            self.send_error(503)
            return
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.hits[self.path] <= srv.truncate.get(self.path, 0):
            body = body[: len(body) // 2]
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.routes, srv.fail, srv.truncate, srv.hits, srv.ranges = {}, {}, {}, Counter(), []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def casmurro(mirror) -> bytes:
    return (mirror / "gutenberg" / "pg55752.txt").read_bytes()


# ---------------------------------------------------------------------------------------------
# download


def test_download_complete_and_atomic(server, casmurro, tmp_path):
    server.routes["/a.txt"] = casmurro
    dest = ingest.download(server.url + "/a.txt", tmp_path / "a.txt", backoff=0)
    assert dest.read_bytes() == casmurro
    assert list(tmp_path.iterdir()) == [tmp_path / "a.txt"]


def test_download_retries_server_errors(server, casmurro, tmp_path):
    server.routes["/a.txt"] = casmurro
    server.fail["/a.txt"] = 2
    ingest.download(server.url + "/a.txt", tmp_path / "a.txt", retries=2, backoff=0.01)
    assert server.hits["/a.txt"] == 3
    assert (tmp_path / "a.txt").read_bytes() == casmurro


def test_download_truncated_body_is_resumed(server, casmurro, tmp_path):
    server.routes["/a.txt"] = casmurro
    server.truncate["/a.txt"] = 1
    ingest.download(server.url + "/a.txt", tmp_path / "a.txt", retries=1, backoff=0)
    assert (tmp_path / "a.txt").read_bytes() == casmurro
    assert server.ranges == [None, f"bytes={len(casmurro) // 2}-"]


def test_download_gives_up_and_keeps_part(server, casmurro, tmp_path):
    server.routes["/a.txt"] = casmurro
    server.truncate["/a.txt"] = 99
    with pytest.raises(ingest.DownloadError, match="body ended after"):
        ingest.download(server.url + "/a.txt", tmp_path / "a.txt", retries=1, backoff=0)
    assert not (tmp_path / "a.txt").exists()
    part = ingest.part_path(server.url + "/a.txt", tmp_path / "a.txt")
    assert part.name.startswith("a.txt.") and part.name.endswith(".part")
    assert 0 < part.stat().st_size < len(casmurro)


def test_download_404_is_not_retried(server, tmp_path):
    with pytest.raises(ingest.DownloadError, match="HTTP Error 404"):
        ingest.download(server.url + "/none.txt", tmp_path / "n.txt", retries=3, backoff=0)
    assert server.hits["/none.txt"] == 1


def test_download_unknown_host_fails_fast(tmp_path):
    with pytest.raises(ingest.DownloadError, match="URLError"):
        ingest.download("http://no-such-host.invalid/x.txt", tmp_path / "x.txt", retries=5, backoff=10)


# ---------------------------------------------------------------------------------------------
# Gutenberg


def test_gutenberg_urls():
    assert ingest.gutenberg_urls(55752, "http://h/") == [
        "http://h/cache/epub/55752/pg55752.txt",
        "http://h/files/55752/55752-0.txt",
    ]


def test_resolve_books():
    required = {55752, 54829, 55682, 56737, 57001, 67162, 33056, 53101, 67935, 55797, 67780, 61653}
    assert set(ingest.resolve_books("all")) == required
    assert ingest.resolve_books(["55752", 54829]) == [55752, 54829]
    with pytest.raises(ValueError, match="extra_ids"):
        ingest.resolve_books([3333])
    with pytest.raises(ValueError, match="not a Project Gutenberg e-book number"):
        ingest.resolve_books(["dom casmurro"])
    with pytest.raises(ValueError, match="'all' or a list"):
        ingest.resolve_books("some")


def test_read_title(casmurro):
    assert ingest.read_title(casmurro.decode("utf-8")) == "Dom Casmurro"
    assert ingest.read_title("no header") is None


def test_fetch_gutenberg_from_mirror_then_kept(mirror, tmp_path):
    raw = tmp_path / "raw"
    store = ingest.RawStore(raw)
    ingest.fetch_gutenberg([55752], store, mirror=mirror)
    entry = store.finish()["files"]["gutenberg/pg55752.txt"]
    assert entry["source"] == "mirror" and entry["title"] == "Dom Casmurro" and entry["encoding"] == "utf-8"
    assert entry["sha256"] == sha256_file(mirror / "gutenberg/pg55752.txt")
    again = ingest.RawStore(raw)
    ingest.fetch_gutenberg([55752], again, mirror=mirror)
    assert again.actions == {("gutenberg", "kept"): 1}


def test_fetch_gutenberg_truncated_file_is_refetched(mirror, tmp_path):
    raw = tmp_path / "raw"
    store = ingest.RawStore(raw)
    ingest.fetch_gutenberg([55752], store, mirror=mirror)
    store.finish()
    path = raw / "gutenberg/pg55752.txt"
    path.write_bytes(path.read_bytes()[:1000])
    again = ingest.RawStore(raw)
    ingest.fetch_gutenberg([55752], again, mirror=mirror)
    assert again.actions == {("gutenberg", "mirror"): 1}
    assert sha256_file(path) == sha256_file(mirror / "gutenberg/pg55752.txt")


def test_fetch_gutenberg_http_with_fallback_url(server, casmurro, mirror, store):
    server.routes["/files/55752/55752-0.txt"] = casmurro  # the cache/epub URL answers 404
    ingest.fetch_gutenberg([55752], store, mirror=None, base_url=server.url, backoff=0)
    entry = store.manifest()["files"]["gutenberg/pg55752.txt"]
    assert entry["source"] == "http" and entry["origin"] == server.url + "/files/55752/55752-0.txt"
    assert entry["sha256"] == sha256_file(mirror / "gutenberg/pg55752.txt")


def test_fetch_gutenberg_partial_of_one_url_is_not_resumed_from_another(server, casmurro, store):
    server.routes["/cache/epub/55752/pg55752.txt"] = casmurro[::-1]
    server.truncate["/cache/epub/55752/pg55752.txt"] = 99  # always cut: gives up, leaves its .part
    server.routes["/files/55752/55752-0.txt"] = casmurro
    ingest.fetch_gutenberg([55752], store, base_url=server.url, retries=0)
    assert (store.dir / "gutenberg/pg55752.txt").read_bytes() == casmurro
    assert server.ranges == [None, None]


def test_fetch_gutenberg_extra_id_title_from_header(server, mirror, store):
    server.routes["/cache/epub/3333/pg3333.txt"] = (mirror / "gutenberg/pg3333.txt").read_bytes()
    ingest.fetch_gutenberg([3333], store, base_url=server.url, backoff=0)
    assert store.manifest()["files"]["gutenberg/pg3333.txt"]["title"] == "Os Lusíadas"


def test_fetch_gutenberg_failure_names_ids_and_fix(server, store):
    server.routes["/cache/epub/54829/pg54829.txt"] = b"<html>Please try later</html>"
    with pytest.raises(ingest.IngestError) as err:
        ingest.fetch_gutenberg([54829, 55682], store, base_url=server.url, retries=0)
    msg = str(err.value)
    assert "54829, 55682" in msg and "not a Gutenberg plain-text e-book" in msg
    assert "Fix: put pg<ID>.txt files into the mirror's gutenberg/ folder" in msg
    assert not (store.dir / "gutenberg/pg54829.txt").exists()


def test_random_bytes_in_the_mirror_are_refused_naming_the_file(mirror, tmp_path):
    """A 400 kB file of random bytes named pg55752.txt is not Dom Casmurro, wherever it comes from."""
    fake = tmp_path / "mirror"
    (fake / "gutenberg").mkdir(parents=True)
    (fake / "gutenberg" / "pg55752.txt").write_bytes(random.Random(0).randbytes(400_000))
    store = ingest.RawStore(tmp_path / "raw")
    with pytest.raises(ingest.IngestError, match=r"mirror/gutenberg/pg55752.txt does not look like an e-book: it holds [\d,]+ NUL bytes"):
        ingest.fetch_gutenberg([55752], store, mirror=fake, base_url="http://127.0.0.1:9", retries=0)
    assert not (store.dir / "gutenberg" / "pg55752.txt").exists()
    no_nul = bytes(b for b in random.Random(1).randbytes(400_000) if b)
    (fake / "gutenberg" / "pg55752.txt").write_bytes(no_nul)
    with pytest.raises(ingest.IngestError, match=r"of its characters are letters"):
        ingest.fetch_gutenberg([55752], store, mirror=fake, base_url="http://127.0.0.1:9", retries=0)
    text = (mirror / "gutenberg" / "pg55752.txt").read_text(encoding="utf-8")
    headless = text[START_PATTERN.search(text).end():]  # claims to be pg55752 but lost its START line
    (fake / "gutenberg" / "pg55752.txt").write_text(headless, encoding="utf-8")
    with pytest.raises(ingest.IngestError, match=r"no '\*\*\* START OF THE PROJECT GUTENBERG EBOOK' line"):
        ingest.fetch_gutenberg([55752], store, mirror=fake, base_url="http://127.0.0.1:9", retries=0)
    for path in sorted((mirror / "gutenberg").glob("*.txt")) + sorted((mirror / "machado").rglob("*.txt"))[:20]:
        assert ingest.implausible(path.read_bytes(), gutenberg="gutenberg" in path.parts) is None, path


def test_collection_skips_binary_files_and_names_them(tmp_path, store):
    src = tmp_path / "works"
    src.mkdir()
    (src / "good.txt").write_text("Era uma vez um menino.\n" * 50, encoding="utf-8")
    (src / "scan.txt").write_bytes(random.Random(2).randbytes(5000))
    with pytest.raises(ingest.IngestError, match=r"works/scan.txt: it holds [\d,]+ NUL bytes"):
        ingest.fetch_collection(src, store)
    assert list(store.manifest()["files"]) == ["machado/good.txt"]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_book_with_bom_is_text_and_kept_exactly(mirror, tmp_path, encoding):
    """A UTF-16 e-book (half its bytes NUL) is accepted as the cleaner decodes it, byte for byte;
    a BOM followed by bytes that are not UTF-16 is refused by name."""
    fake = tmp_path / "mirror"
    (fake / "gutenberg").mkdir(parents=True)
    text = (mirror / "gutenberg" / "pg55752.txt").read_text(encoding="utf-8")
    bom = codecs.BOM_UTF16_LE if encoding.endswith("le") else codecs.BOM_UTF16_BE
    data = bom + text.encode(encoding)
    (fake / "gutenberg" / "pg55752.txt").write_bytes(data)
    store = ingest.RawStore(tmp_path / "raw")
    ingest.fetch_gutenberg([55752], store, mirror=fake, base_url="http://127.0.0.1:9", retries=0)
    assert (store.dir / "gutenberg" / "pg55752.txt").read_bytes() == data
    assert store.manifest()["files"]["gutenberg/pg55752.txt"]["encoding"] == "utf-16"
    assert decode(data) == (text, "utf-16")
    assert ingest.implausible(bom + b"\x00" * 2000, gutenberg=False) == "it holds 1,000 NUL characters (a binary file, not text)"
    assert ingest.implausible(bom + text.encode(encoding)[:-1], gutenberg=True) == (
        "it starts with a UTF-16 byte-order mark but is not UTF-16 (truncated data)")


# ---------------------------------------------------------------------------------------------
# collection, QA


def test_fetch_collection(tmp_path, store):
    src = tmp_path / "works"
    (src / "romance").mkdir(parents=True)
    (src / "romance" / "a.txt").write_bytes("Ação\r\n".encode("latin-1"))
    (src / "b.txt").write_text("texto", encoding="utf-8")
    ingest.fetch_collection(src, store)
    files = store.manifest()["files"]
    assert files["machado/romance/a.txt"]["genre"] == "romance"
    assert files["machado/romance/a.txt"]["encoding"] == "latin-1"
    assert files["machado/b.txt"]["genre"] is None and files["machado/b.txt"]["source"] == "folder"


def test_fetch_collection_empty_or_missing_folder(tmp_path, store):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ingest.IngestError, match="holds no .txt files"):
        ingest.fetch_collection(tmp_path / "empty", store)
    with pytest.raises(ingest.IngestError, match="does not exist"):
        ingest.fetch_collection(tmp_path / "nowhere", store)


def test_read_records(tmp_path):
    (tmp_path / "a.json").write_text('[{"x": 1}]', encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n{"x": 2}\n', encoding="utf-8")
    (tmp_path / "b.json").write_text('{"x": 1}', encoding="utf-8")
    assert ingest.read_records(tmp_path / "a.json") == [{"x": 1}]
    assert ingest.read_records(tmp_path / "a.jsonl") == [{"x": 1}, {"x": 2}]
    with pytest.raises(ValueError, match="expected a JSON list"):
        ingest.read_records(tmp_path / "b.json")


def test_check_records():
    ingest.check_records(
        "alpaca", [{"instruction": "", "input": "", "output": ""}], ("instruction", "input", "output"), "f"
    )
    with pytest.raises(ValueError, match="f: record 1 is not a dolly record \\(missing response\\)"):
        ingest.check_records("dolly", [{"response": 1}, {"other": 2}], ("response",), "f")


def test_fetch_qa_from_mirror_with_limit(mirror, tmp_path):
    raw = tmp_path / "raw"
    store = ingest.RawStore(raw)
    ingest.fetch_qa("alpaca", 50, store, mirror=mirror)
    entry = store.finish()["files"]["qa/alpaca.jsonl"]
    assert entry["records"] == 50 and entry["source"] == "mirror" and entry["origin"] == "qa/alpaca_5000.json"
    rows = [json.loads(line) for line in (raw / "qa/alpaca.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == json.loads((mirror / "qa/alpaca_5000.json").read_text(encoding="utf-8"))[:50]
    again = ingest.RawStore(raw)
    ingest.fetch_qa("alpaca", 50, again, mirror=mirror)
    ingest.fetch_qa("alpaca", 20, again, mirror=mirror)  # another limit: rewritten
    assert again.actions == {("qa", "kept"): 1, ("qa", "mirror"): 1}
    assert again.manifest()["files"]["qa/alpaca.jsonl"]["records"] == 20


def test_fetch_qa_local_file_schema(tmp_path, store):
    good = tmp_path / "dolly.jsonl"
    good.write_text(json.dumps({"instruction": "q", "context": "", "response": "a", "category": "qa"}) + "\n")
    ingest.fetch_qa("dolly", None, store, file=good)
    assert store.manifest()["files"]["qa/dolly.jsonl"]["records"] == 1
    bad = tmp_path / "sciq.json"
    bad.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match="missing distractor1"):
        ingest.fetch_qa("sciq", None, store, file=bad)
    with pytest.raises(ValueError, match="unknown QA source 'squad'"):
        ingest.fetch_qa("squad", 1, store, file=good)


def test_a_hub_source_with_an_eval_split_brings_it_whole_each_record_naming_its_split(tmp_path, monkeypatch):
    """SciQ from the Hub: the first ``limit`` train records and its whole test split, which the clean
    stage makes the test split; a copy fetched before the test split was taken is fetched again."""
    import datasets

    def record(split: str, i: int) -> dict:
        return {"question": f"{split} {i}?", "distractor1": "a", "distractor2": "b", "distractor3": "c",
                "correct_answer": "d", "support": ""}

    hub = {"train": [record("train", i) for i in range(5)], "test": [record("test", i) for i in range(2)]}
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name, split, streaming: asked.append(split) or hub[split])
    store = ingest.RawStore(tmp_path)
    ingest.fetch_qa("sciq", 3, store)
    rows = [json.loads(line) for line in (tmp_path / "qa/sciq.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["question"], r["hub_split"]) for r in rows] == [
        ("train 0?", "train"), ("train 1?", "train"), ("train 2?", "train"), ("test 0?", "test"), ("test 1?", "test")]
    assert asked == ["train", "test"] and store.finish()["files"]["qa/sciq.jsonl"]["eval_split"] == "test"
    again = ingest.RawStore(tmp_path)
    ingest.fetch_qa("sciq", 3, again)
    assert again.actions == {("qa", "kept"): 1}
    entry = again.manifest()["files"]["qa/sciq.jsonl"]
    stale = {**entry, "eval_split": None}
    (tmp_path / ingest.MANIFEST).write_text(json.dumps({"files": {"qa/sciq.jsonl": stale}}))
    older = ingest.RawStore(tmp_path)
    ingest.fetch_qa("sciq", 3, older)
    assert older.actions == {("qa", "hub"): 1}


def test_fetch_qa_hub_offline_error(tmp_path):
    """The Hub path is real; offline it must fail with a fix (HF_HUB_OFFLINE keeps it fast)."""
    code = (
        "from pathlib import Path; from nblib import ingest\n"
        f"ingest.fetch_qa('sciq', 5, ingest.RawStore(Path({str(tmp_path)!r})))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "could not load allenai/sciq from the Hugging Face Hub" in out.stderr and "qa_files" in out.stderr


# ---------------------------------------------------------------------------------------------
# the stage


def test_load_manifest_absent(tmp_path):
    assert ingest.load_manifest(tmp_path) == {"files": {}}


def test_ingest_smoke_and_rerun(home, capsys):
    cfg = config.settings("ingest", "smoke", qa={"alpaca": 10})
    manifest = ingest.ingest(cfg)
    kinds = Counter(e["kind"] for e in manifest["files"].values())
    assert kinds == {"gutenberg": 1, "collection": 116, "qa": 1}
    assert json.loads((home / "data/raw/manifest.json").read_text()) == manifest
    for rel, e in manifest["files"].items():
        assert e["bytes"] == (home / "data/raw" / rel).stat().st_size
    capsys.readouterr()
    assert ingest.ingest(cfg) == manifest
    assert capsys.readouterr().out.splitlines() == [
        "collection: 116 file(s) already valid",
        "gutenberg: 1 file(s) already valid",
        "qa: 1 file(s) already valid",
    ]
    table = ingest.summary_table(manifest)
    assert table["files"].sum() == 118 and "Dom Casmurro" in set(table["group"])
    fig = plots.raw_sizes(table)
    assert len(fig.axes[0].patches) == len(table) - 1  # one bar per book and genre, no QA


def test_ingest_interrupted_run_keeps_earlier_entries(mirror, tmp_path):
    raw = tmp_path / "raw"
    first = ingest.RawStore(raw)
    ingest.fetch_gutenberg([55752], first, mirror=mirror)
    first.finish()
    second = ingest.RawStore(raw)
    ingest.fetch_qa("alpaca", 5, second, mirror=mirror)  # ... and the run dies here
    saved = ingest.load_manifest(raw)["files"]
    assert set(saved) == {"gutenberg/pg55752.txt", "qa/alpaca.jsonl"}
    assert set(second.finish()["files"]) == {"qa/alpaca.jsonl"}


def test_ingest_local_qa_file_relative_to_home(home):
    (home / "my").mkdir()
    (home / "my" / "alpaca.jsonl").write_text(json.dumps({"instruction": "q", "input": "", "output": "a"}) + "\n")
    cfg = config.settings("ingest", "smoke", books=[], collection=False, qa={"alpaca": None},
                          qa_files={"alpaca": "my/alpaca.jsonl"})
    entry = ingest.ingest(cfg)["files"]["qa/alpaca.jsonl"]
    assert (entry["source"], entry["origin"], entry["records"]) == ("folder", "alpaca.jsonl", 1)


def test_ingest_reports_every_failure(home, server):
    cfg = config.settings("ingest", "smoke", books=[54829], collection=False, qa={}, base_url=server.url, retries=0)
    with pytest.raises(ingest.IngestError, match="could not get Gutenberg e-book\\(s\\) 54829"):
        ingest.ingest(cfg)

"""Tests for nblib.clean: small hand-written cases plus the real mirror texts (NBLIB_MIRROR)."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from nblib import clean, config, ingest, plots
from nblib.files import write_json

FORBIDDEN = ("Gutenberg", "gutenberg.org", "*** START", "*** END", "Project Gutenberg License", "Produced by")
BROKEN_WORD = re.compile(r"\w-\n\w")


def gutenberg(
    body: str,
    start: str = "*** START OF THE PROJECT GUTENBERG EBOOK TESTE ***",
    end: str = "*** END OF THE PROJECT GUTENBERG EBOOK TESTE ***",
) -> str:
    header = "The Project Gutenberg eBook of Teste\n\nThis eBook is for the use of anyone anywhere.\n\nTitle: Teste\n\n"
    footer = "\n\nSection 1. General Terms of Use and Redistributing Project Gutenberg-tm\nwww.gutenberg.org\n"
    return header + start + "\n\n" + body + "\n\n" + end + footer


PROSE = (
    "Uma noite destas, vindo da cidade para o Engenho Novo, encontrei no trem da\n"
    "Central um rapaz aqui do bairro, que eu conheço de vista e de chapéu.\n"
)

# ---------------------------------------------------------------------------------------------
# decoding and normalisation


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        ("Ação, coração".encode(), "utf-8"),
        ("Ação, coração".encode("utf-8-sig"), "utf-8-sig"),
        ("Ação, coração".encode("utf-16"), "utf-16"),
        ("Ação, coração".encode("latin-1"), "latin-1"),
        ("“Ação”, coração…".encode("cp1252"), "cp1252"),
    ],
)
def test_decode(data, encoding):
    text, got = clean.decode(data)
    assert got == encoding
    assert "Ação" in text and "\ufeff" not in text


def test_decode_undefined_cp1252_byte_falls_back_to_latin1():
    assert clean.decode(b"a\x81\xe7") == ("a\x81ç", "latin-1")


def test_normalize():
    nfd = "cora\u0063\u0327a\u0303o"  # "coração" in decomposed form
    text = clean.normalize(f"linha 1  \r\nlinha\u00a02\rpala\u00advra\u200b {nfd}\f\x0b\u2028fim\t!")
    assert text == "linha 1\nlinha 2\npalavra coração\nfim !"


# ---------------------------------------------------------------------------------------------
# Gutenberg header and footer


def test_strip_gutenberg_new_markers_credits_and_notes():
    body = (
        "Produced by Someone and the Online Distributed\nProofreading Team at https://www.pgdp.net\n\n"
        "Notas de transcrição:\n\nO texto aqui transcrito é uma cópia.\n\n* * * * *\n\n"
        "DOM CASMURRO\n\n" + PROSE
    )
    text, found = clean.strip_gutenberg(gutenberg(body))
    assert found
    assert text.startswith("DOM CASMURRO") and "conheço de vista" in text
    assert "Produced" not in text and "transcri" not in text and "Gutenberg" not in text


def test_strip_gutenberg_old_markers():
    raw = gutenberg(
        PROSE,
        start="*** START OF THIS PROJECT GUTENBERG EBOOK DOM CASMURRO ***",
        end="End of the Project Gutenberg EBook of Dom Casmurro, by Machado de Assis\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK DOM CASMURRO ***",
    )
    text, found = clean.strip_gutenberg(raw)
    assert found and text == PROSE.strip("\n")


def test_strip_gutenberg_plain_text_is_kept():
    assert clean.strip_gutenberg(PROSE) == (PROSE, False)


def test_strip_gutenberg_fails_without_markers():
    raw = gutenberg(PROSE).replace("*** START OF THE PROJECT GUTENBERG EBOOK TESTE ***", "")
    raw = raw.replace("*** END OF THE PROJECT GUTENBERG EBOOK TESTE ***", "")
    with pytest.raises(clean.NoBodyError, match=r"x\.txt: mentions Project Gutenberg but has no"):
        clean.strip_gutenberg(raw, "x.txt")


def test_strip_gutenberg_fails_without_end_marker():
    raw = gutenberg(PROSE).replace("*** END OF THE PROJECT GUTENBERG EBOOK TESTE ***", "")
    with pytest.raises(clean.NoBodyError, match="no 'END OF THE PROJECT GUTENBERG EBOOK' line"):
        clean.strip_gutenberg(raw, "x.txt")


def test_strip_gutenberg_fails_on_credits_only():
    with pytest.raises(clean.NoBodyError, match="nothing but credits"):
        clean.strip_gutenberg(gutenberg("Produced by Someone."), "x.txt")


# ---------------------------------------------------------------------------------------------
# line helpers


def test_line_predicates():
    assert clean.is_heading("CAPÍTULO II") and clean.is_heading("XII")
    assert not clean.is_heading("Capítulo II") and not clean.is_heading("12")
    assert all(clean.is_furniture(s) for s in ("12", "[12]", "- 7 -", "Pag. 7", "* * * * *", "—"))
    assert not any(clean.is_furniture(s) for s in ("", "24 de abril", "XII", "1.ª parte"))
    assert clean.is_boilerplate("Veja www.exemplo.com") and clean.is_boilerplate("o telefone de Gutenberg.")
    assert not clean.is_boilerplate("Um texto de Machado sobre a edição do livro.")


def test_wrap_width():
    assert clean.wrap_width(["x" * 80] * 19 + ["x" * 10]) == 80
    assert clean.wrap_width(["x" * 30] * 10) == clean.MIN_WIDTH
    assert clean.wrap_width([]) == clean.MIN_WIDTH


def test_drop_index_until_first_entry_repeats():
    lines = ["Contos", "", "ÍNDICE", "MISS DOLLAR", "LUÍS SOARES", "MISS DOLLAR", "Era conveniente ao romance."]
    kept, dropped = clean.drop_index(lines, 80)
    assert kept == ["Contos", "", "MISS DOLLAR", "Era conveniente ao romance."] and dropped == 3


def test_drop_index_at_end_stops_at_prose():
    full = "x" * 78
    lines = [full, "", "INDICE", "", "I     Do titulo", "II    Do livro", "", full]
    kept, dropped = clean.drop_index(lines, 80)
    assert kept == [full, "", full] and dropped == 5


# ---------------------------------------------------------------------------------------------
# paragraphs and hyphenation


@pytest.mark.parametrize(
    ("head", "tail", "vocab", "expected"),
    [
        ("compa", "ração", {"comparação": 2}, "comparação"),
        ("lua-de", "mel", {"lua-de-mel": 1}, "lua-de-mel"),
        ("desculpara", "se", {}, "desculpara-se"),
        ("Saint", "Pierre", {}, "Saint-Pierre"),
        ("retirá-la", "ia", {}, "retirá-la-ia"),
        ("inventa", "da", {}, "inventada"),
    ],
)
def test_join_hyphenated(head, tail, vocab, expected):
    assert clean.join_hyphenated(head, tail, Counter(vocab)) == expected


def test_rebuild_paragraphs_blank_separated_prose_and_verse():
    lines = PROSE.strip().split("\n") + [
        "",
        "As armas e os barões assinalados,",
        "Que da ocidental praia Lusitana,",
        "",
    ]
    paragraphs, joins = clean.rebuild_paragraphs(lines, 80, Counter())
    assert paragraphs == [
        " ".join(PROSE.strip().split("\n")),
        "As armas e os barões assinalados,\nQue da ocidental praia Lusitana,",
    ]
    assert joins == 0


def test_rebuild_paragraphs_pdf_style():
    lines = [
        "CAPÍTULO PRIMEIRO",
        "Uma noite destas, vindo da cidade para o Engenho Novo, encontrei no trem da compa-",
        "ração um rapaz aqui do bairro, que eu conheço de vista e de chapéu, e calçou-",
        "as depressa.",
        "— Continue, disse eu acordando.",
        "Que a mão do tempo e o hálito dos homens",
        "Murchem a flor das ilusões da vida.",
    ]
    paragraphs, joins = clean.rebuild_paragraphs(lines, 84, Counter({"comparação": 1}))
    assert paragraphs == [
        "CAPÍTULO PRIMEIRO",
        "Uma noite destas, vindo da cidade para o Engenho Novo, encontrei no trem da comparação um rapaz "
        "aqui do bairro, que eu conheço de vista e de chapéu, e calçou-as depressa.",
        "— Continue, disse eu acordando.",
        "Que a mão do tempo e o hálito dos homens\nMurchem a flor das ilusões da vida.",
    ]
    assert joins == 2


def test_fix_inline_hyphens():
    text, n = clean.fix_inline_hyphens("deixou- se estar; por- que não? CECÍLIA- Oh!", Counter({"porque": 3}))
    assert (text, n) == ("deixou-se estar; porque não? CECÍLIA- Oh!", 2)


# ---------------------------------------------------------------------------------------------
# whole files


def test_clean_text_plain_and_min_chars():
    doc = clean.clean_text("Título\n\n12\n\n" + PROSE + "\nFIM.\n", "t.txt", min_chars=10)
    assert doc.paragraphs == [" ".join(PROSE.strip().split("\n"))]
    assert doc.stats["furniture_lines_dropped"] == 1 and doc.stats["short_dropped"] == 2
    assert doc.stats["gutenberg_markers"] is False


def test_clean_text_empty_fails():
    with pytest.raises(clean.NoBodyError, match="e.txt: no paragraph"):
        clean.clean_text("\n\n12\n", "e.txt")


def test_clean_file_latin1_crlf(tmp_path):
    path = tmp_path / "velho.txt"
    path.write_bytes(gutenberg(PROSE).replace("\n", "\r\n").encode("latin-1"))
    doc = clean.clean_file(path)
    assert doc.stats["encoding"] == "latin-1"
    assert doc.paragraphs == [" ".join(PROSE.strip().split("\n"))]


def test_clean_file_utf8_bom(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(PROSE.encode("utf-8-sig"))
    doc = clean.clean_file(path)
    assert doc.stats["encoding"] == "utf-8-sig" and doc.paragraphs[0].startswith("Uma noite")


def test_every_mirror_gutenberg_file_cleans(mirror):
    """All 22 mirror e-texts (several authors and header styles, some with cut first lines)."""
    for path in sorted((mirror / "gutenberg").glob("pg*.txt")):
        doc = clean.clean_file(path)
        text = "\n\n".join(doc.paragraphs)
        assert doc.stats["gutenberg_markers"], path.name
        for s in FORBIDDEN:
            assert s.lower() not in text.lower(), (path.name, s)
        assert not BROKEN_WORD.search(text), path.name
        assert doc.stats["characters"] > 20_000, path.name
        if path.name == "pg55752.txt":
            assert doc.paragraphs[0] == "DOM CASMURRO"
            assert any(p.startswith("Uma noite destas, vindo da cidade") for p in doc.paragraphs[:12])
            assert doc.paragraphs[-1].endswith("Vamos á _Historia dos suburbios._")
            assert not any(p.startswith(("INDICE", "CXLVIII")) for p in doc.paragraphs)


# ---------------------------------------------------------------------------------------------
# corpus


def doc(name: str, *paragraphs: str) -> clean.CleanedDoc:
    return clean.CleanedDoc(name, list(paragraphs))


def test_dedupe():
    docs = [doc("a", "um  dois", "três"), doc("b", "um dois", "quatro", "três")]
    assert clean.dedupe(docs) == 2
    assert docs[1].paragraphs == ["quatro"] and docs[1].stats["duplicates_dropped"] == 2


def test_make_blocks():
    assert clean.make_blocks(["aaaa", "bb", "cccccc", "d"], 5) == [["aaaa", "bb"], ["cccccc"], ["d"]]


def test_assign_splits():
    labels = clean.assign_splits(100, 0.1, 0.05, seed=1)
    assert Counter(labels) == {"train": 85, "val": 10, "test": 5}
    assert labels == clean.assign_splits(100, 0.1, 0.05, seed=1) != clean.assign_splits(100, 0.1, 0.05, seed=2)
    assert Counter(clean.assign_splits(3, 0.01, 0.01, seed=0)) == {"train": 1, "val": 1, "test": 1}
    with pytest.raises(ValueError, match="too few"):
        clean.assign_splits(2, 0.1, 0.1, seed=0)
    with pytest.raises(ValueError, match="must be in"):
        clean.assign_splits(10, 0.6, 0.5, seed=0)


def test_split_documents_merges_consecutive_blocks():
    docs = [doc("a", *[f"a{i}" * 3 for i in range(20)]), doc("b", *[f"b{i}" * 3 for i in range(20)])]
    splits = clean.split_documents(docs, block_chars=6, val_fraction=0.2, test_fraction=0.2, seed=0)
    seen = [p for segments in splits.values() for _, ps in segments for p in ps]
    assert sorted(seen) == sorted(p for d in docs for p in d.paragraphs)
    for segments in splits.values():
        for name, ps in segments:  # a segment is a run of consecutive paragraphs of one source
            source = next(d for d in docs if d.name == name).paragraphs
            start = source.index(ps[0])
            assert source[start : start + len(ps)] == ps


def test_text_sources_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run 01_ingest"):
        clean.text_sources(tmp_path)
    write_json(tmp_path / "manifest.json", {"files": {"qa/alpaca.jsonl": {"kind": "qa"}}})
    with pytest.raises(ValueError, match="lists no texts"):
        clean.text_sources(tmp_path)


def test_read_split_roundtrip(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("p1\n\np2" + clean.DOC_SEP + "p3\n", encoding="utf-8")
    assert clean.read_split(path) == ["p1\n\np2", "p3"]
    path.write_text("\n", encoding="utf-8")
    assert clean.read_split(path) == []


@pytest.fixture(scope="module")
def smoke_corpus(mirror, tmp_path_factory) -> tuple[Path, dict]:
    """The smoke profile end to end: Dom Casmurro + the 116-work collection, ingested and cleaned."""
    root = tmp_path_factory.mktemp("smoke")
    mp = pytest.MonkeyPatch()
    mp.setenv("NBLIB_HOME", str(root))
    try:
        ingest.ingest(config.settings("ingest", "smoke", qa={}))
        manifest = clean.build_corpus(config.settings("clean", "smoke"))
    finally:
        mp.undo()
    return root / "data" / "processed" / "corpus", manifest


def test_smoke_corpus_is_clean(smoke_corpus):
    corpus, manifest = smoke_corpus
    assert manifest["failed"] == {} and len(manifest["sources"]) == 116  # 117 texts less the second Dom Casmurro
    assert manifest["editions_dropped"] == {"machado/romance/domCasmurro.txt": "gutenberg/pg55752.txt"}
    texts = {s: (corpus / f"{s}.txt").read_text(encoding="utf-8") for s in clean.SPLITS}
    for split, text in texts.items():
        for s in FORBIDDEN:
            assert s.lower() not in text.lower(), (split, s)
        assert not BROKEN_WORD.search(text), split
        assert "\r" not in text and "ÍNDICE" not in text


def test_smoke_corpus_splits_disjoint_and_counted(smoke_corpus):
    corpus, manifest = smoke_corpus
    paragraphs = {}
    for split in clean.SPLITS:
        docs = clean.read_split(corpus / f"{split}.txt")
        paragraphs[split] = [p for d in docs for p in d.split(clean.PARAGRAPH_SEP)]
        counts = manifest["splits"][split]
        assert counts["documents"] == len(docs)
        assert counts["paragraphs"] == len(paragraphs[split])
        assert counts["characters"] == sum(map(len, docs))
        assert counts["tokens"] > counts["characters"] / 5
    assert not set(paragraphs["train"]) & set(paragraphs["val"])
    assert not set(paragraphs["train"]) & set(paragraphs["test"])
    assert not set(paragraphs["val"]) & set(paragraphs["test"])
    total = sum(len(p) for p in paragraphs.values())
    assert 0.03 < len(paragraphs["val"]) / total < 0.08
    assert manifest["format"]["document_separator"] == clean.DOC_SEP
    assert (corpus / "manifest.json").is_file()


def test_plot_paragraph_lengths(smoke_corpus):
    fig = plots.paragraph_lengths(clean.paragraph_lengths(smoke_corpus[0]))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert [label.split()[0] for label in labels] == list(clean.SPLITS)


def test_build_corpus_is_deterministic(mirror, tmp_path, monkeypatch):
    works = tmp_path / "works"
    for rel in ("romance/helena.txt", "poesia/crisalidas.txt", "conto/papeisAvulsos.txt"):
        (works / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mirror / "machado" / rel, works / rel)
    outputs = []
    for run in ("a", "b"):
        monkeypatch.setenv("NBLIB_HOME", str(tmp_path / run))
        ingest.ingest(config.settings("ingest", "smoke", qa={}, collection_dir=str(works)))
        manifest = clean.build_corpus(config.settings("clean", "smoke", block_chars=2000))
        files = {s: (tmp_path / run / "data/processed/corpus" / f"{s}.txt").read_bytes() for s in clean.SPLITS}
        outputs.append((files, manifest))
    assert outputs[0] == outputs[1]
    assert outputs[0][1]["splits"]["val"]["paragraphs"] > 0


def test_build_corpus_failure_is_named(home, tmp_path):
    works = tmp_path / "works"
    works.mkdir()
    (works / "bom.txt").write_text(
        "\n\n".join(f"Parágrafo número {i} de um texto." for i in range(6)), encoding="utf-8"
    )
    (works / "licenca.txt").write_text("This eBook is under the Project Gutenberg License.\n", encoding="utf-8")
    ingest.ingest(config.settings("ingest", "smoke", books=[], qa={}, collection_dir=str(works)))
    cfg = config.settings("clean", "smoke", block_chars=20)
    with pytest.raises(clean.NoBodyError, match=r"machado/licenca\.txt: mentions Project Gutenberg"):
        clean.build_corpus(cfg)
    manifest = clean.build_corpus(cfg, strict=False)
    assert list(manifest["failed"]) == ["machado/licenca.txt"]
    assert sum(s["paragraphs"] for s in manifest["splits"].values()) == 6


def test_second_editions_are_left_out(tmp_path):
    """A work present as a Gutenberg book and in the collection is kept once (no cross-split leak)."""
    names = ["gutenberg/pg55752.txt", "machado/romance/domCasmurro.txt", "machado/romance/helena.txt",
             "machado/poesia/falenas.txt"]
    sources = [(n, tmp_path / n) for n in names]
    kept, dropped = clean.drop_second_editions(sources)
    assert [n for n, _ in kept] == ["gutenberg/pg55752.txt", "machado/romance/helena.txt", "machado/poesia/falenas.txt"]
    assert dropped == {"machado/romance/domCasmurro.txt": "gutenberg/pg55752.txt"}
    assert clean.drop_second_editions(sources[1:])[1] == {}

"""nblib.dialogue: rendering, label masks, cleaning, converters for every schema, prepare()."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nblib import dialogue
from nblib.dialogue import ASSISTANT, USER
from nblib.files import read_json, read_jsonl, write_jsonl
from nblib.tokenizer import EOT, EOT_ID, hf_tokenizer
from helpers import TWO_TURNS



@pytest.fixture(scope="module")
def tokenizer(mirror: Path):
    tok = hf_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(dialogue.SPECIAL_TOKENS)})
    tok.pad_token = EOT
    return tok


@pytest.fixture(scope="module")
def alpaca(mirror: Path) -> list[dict]:
    return json.loads((mirror / "qa" / "alpaca_5000.json").read_text(encoding="utf-8"))


# --- rendering and masks -----------------------------------------------------------------------


def test_render_two_turns_matches_contract():
    assert dialogue.render(TWO_TURNS) == (
        f"{USER} What is 2+2?\n{ASSISTANT} It is 4.{EOT}\n{USER} And 3+3?\n{ASSISTANT} Six.{EOT}"
    )


def test_generation_prompt_ends_with_assistant_marker():
    prompt = dialogue.render(TWO_TURNS + [{"role": "user", "content": "And 4+4?"}], generation_prompt=True)
    assert prompt.endswith(f"{EOT}\n{USER} And 4+4?\n{ASSISTANT}")
    with pytest.raises(ValueError, match="end with a user turn"):
        dialogue.render(TWO_TURNS, generation_prompt=True)
    with pytest.raises(ValueError, match="turn 0: role"):
        dialogue.render([{"role": "system", "content": "x"}])


def test_tokenize_equals_whole_text_and_markers_are_one_token(tokenizer):
    ids, labels = dialogue.tokenize(TWO_TURNS, tokenizer)
    assert ids == tokenizer(dialogue.render(TWO_TURNS))["input_ids"]
    user_id, assistant_id = tokenizer.convert_tokens_to_ids([USER, ASSISTANT])
    assert ids.count(user_id) == 2 and ids.count(assistant_id) == 2
    assert len(labels) == len(ids)


def test_label_mask_on_two_turn_dialogue(tokenizer):
    """Only the assistant's words and their closing <|endoftext|> carry labels."""
    ids, labels = dialogue.tokenize(TWO_TURNS, tokenizer)
    trained = [i for i, lab in zip(ids, labels) if lab != -100]
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    assert trained == enc(" It is 4.") + [EOT_ID] + enc(" Six.") + [EOT_ID]
    user_id, assistant_id = tokenizer.convert_tokens_to_ids([USER, ASSISTANT])
    for marker in (user_id, assistant_id):
        assert all(lab == -100 for i, lab in zip(ids, labels) if i == marker)
    # the user's words and the newline after an answer are masked
    first_eot = ids.index(EOT_ID)
    assert labels[first_eot] == EOT_ID and labels[first_eot + 1] == -100
    assert all(lab == -100 for lab in labels[: ids.index(assistant_id) + 1])


def test_tokenize_needs_markers_in_tokenizer():
    with pytest.raises(ValueError, match="add_special_tokens"):
        dialogue.tokenize(TWO_TURNS, hf_tokenizer())


# --- cleaning -----------------------------------------------------------------------------------


def test_clean_text_strips_html_controls_markers_and_folds_space():
    raw = "<p>Water&nbsp;boils at <b>100 &deg;C</b>.</p><br/>\x00\x07Use   vector<int> v;\t\tdone\r\n\n\n\nEnd<|user|>"
    assert dialogue.clean_text(raw) == "Water boils at 100 °C.\n\nUse vector<int> v; done\n\nEnd"
    assert dialogue.clean_text("<table><tr><td>a</td><td>b</td></tr></table>") == "a b"
    assert dialogue.clean_text("a < b and c > d") == "a < b and c > d"


def test_clean_dialogue_drops_and_merges():
    assert dialogue.clean_dialogue([{"role": "user", "content": " <br> "}]) == (None, "empty")
    assert dialogue.clean_dialogue([{"role": "assistant", "content": "hi"}]) == (None, "one_sided")
    assert dialogue.clean_dialogue([{"role": "user", "content": "q"}, {"role": "assistant", "content": "\x01"}]) == (
        None,
        "one_sided",
    )
    turns, reason = dialogue.clean_dialogue(
        [
            {"role": "assistant", "content": "stray"},
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "dangling"},
        ]
    )
    assert reason is None
    assert turns == [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"}]


def test_convert_counts_every_drop_reason():
    records = [
        {"instruction": "Say hi", "input": "", "output": "Hi!"},
        {"instruction": "Say hi", "input": "", "output": "Hi!"},  # duplicate
        {"instruction": "<p></p>", "input": "", "output": "   "},  # empty
        {"instruction": "Q", "input": "", "output": "\x00"},  # one-sided after cleaning
        {"instruction": "Long", "input": "", "output": "word " * 100},  # too long
    ]
    kept, dropped = dialogue.convert(records, "alpaca", max_chars=200)
    assert [r["dialogue"][1]["content"] for r in kept] == ["Hi!"]
    assert kept[0]["source"] == "alpaca"
    assert dropped == {"duplicate": 1, "empty": 1, "one_sided": 1, "too_long": 1}
    nq = [{"question": "q", "annotations": [{"short_answers": []}]}]
    assert dialogue.convert(nq, "natural_questions")[1] == {"no_answer": 1}
    with pytest.raises(ValueError, match="alpaca record 0: cannot convert"):
        dialogue.convert([{"instruction": "x", "output": None}], "alpaca")
    with pytest.raises(ValueError, match="unknown QA source 'mixed'"):
        dialogue.convert(records, "mixed")


# --- prepare: balancing, split, manifest ---------------------------------------------------------


def _raw_qa(root: Path, alpaca: list[dict]) -> Path:
    qa = root / "raw" / "qa"
    write_jsonl(qa / "alpaca.jsonl", alpaca[:400])
    write_jsonl(qa / "dolly.jsonl", [
        {"instruction": f"Tell me fact {i}", "context": "", "response": f"Fact number {i}.", "category": "open_qa"}
        for i in range(30)
    ])
    write_jsonl(qa / "sciq.jsonl", [
        {"question": f"What is element {i}?", "distractor1": "a", "distractor2": "b", "distractor3": "c",
         "correct_answer": f"element {i}", "support": ""}
        for i in range(20)
    ])
    write_jsonl(qa / "natural_questions.jsonl", [
        {"question": {"text": f"question {i}"},
         "annotations": {"short_answers": [{"text": [f"answer {i}"] if i % 2 else []}]}}
        for i in range(20)
    ])
    return qa


def test_prepare_balances_splits_and_is_deterministic(tmp_path, alpaca):
    qa = _raw_qa(tmp_path, alpaca)
    settings = {
        "targets": {"alpaca": 100, "dolly": None, "sciq": 10, "natural_questions": None},
        "val_fraction": 0.1, "test_fraction": 0.2, "max_chars": 2000, "seed": 7,
    }
    manifest = dialogue.prepare(qa, tmp_path / "out", settings)
    src = manifest["sources"]
    assert {s: src[s]["train"] + src[s]["val"] + src[s]["test"] for s in src} == {
        "alpaca": 100, "dolly": 30, "sciq": 10, "natural_questions": 10,
    }
    assert src["natural_questions"]["dropped"] == {"no_answer": 10}
    assert (src["alpaca"]["val"], src["alpaca"]["test"]) == (10, 20)
    rows = {name: read_jsonl(tmp_path / "out" / f"{name}.jsonl") for name in dialogue.SPLITS}
    assert {name: len(r) for name, r in rows.items()} == {
        name: manifest["splits"][name]["dialogues"] for name in dialogue.SPLITS
    }
    texts = {name: {dialogue.render(r["dialogue"]) for r in rs} for name, rs in rows.items()}
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"] and not texts["val"] & texts["test"]
    assert {r["source"] for r in rows["train"]} == set(settings["targets"])
    assert read_json(tmp_path / "out" / "manifest.json") == manifest
    again = dialogue.prepare(qa, tmp_path / "again", settings)
    sha = lambda m: [m["splits"][n]["sha256"] for n in dialogue.SPLITS]  # noqa: E731
    assert sha(again) == sha(manifest)


def test_prepare_and_load_errors(tmp_path, alpaca):
    qa = _raw_qa(tmp_path, alpaca)
    settings = {"targets": {"alpaca": 10, "squad": 5}, "val_fraction": 0.1, "test_fraction": 0.1, "seed": 1}
    with pytest.raises(FileNotFoundError, match=r"no raw QA file for \['squad'\].*01_ingest"):
        dialogue.prepare(qa, tmp_path / "out", settings)
    with pytest.raises(FileNotFoundError, match="02_clean"):
        dialogue.load(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="val_fraction"):
        dialogue.split([], 0.5, 0.5, 1)


def test_a_source_whose_answers_are_all_empty_is_refused_by_name(tmp_path, alpaca):
    qa = tmp_path / "qa"
    write_jsonl(qa / "alpaca.jsonl", [{**r, "output": " <br> \n"} for r in alpaca[:30]])  # answers that clean to nothing
    settings = {"targets": {"alpaca": None}, "val_fraction": 0.1, "test_fraction": 0.1, "max_chars": None, "seed": 1}
    with pytest.raises(ValueError, match=r"qa/alpaca\.jsonl gives no dialogue: all its answers were empty "
                                         r"\(of 30 records: .*remove 'alpaca' from the dialogue targets"):
        dialogue.prepare(qa, tmp_path / "out", settings)
    assert not (tmp_path / "out").exists()  # no empty splits written for a later cell to trip on


def test_too_few_records_for_the_splits_is_named_as_such(tmp_path, alpaca):
    """One record: not "no dialogues left ... raise max_length" at fine-tuning, but the real cause here."""
    qa = tmp_path / "qa"
    write_jsonl(qa / "alpaca.jsonl", alpaca[:1])
    settings = {"targets": {"alpaca": None}, "val_fraction": 0.1, "test_fraction": 0.1, "max_chars": None, "seed": 1}
    with pytest.raises(ValueError, match=r"too few dialogues for the splits: 1 in all \(alpaca 1\) leave the val and "
                                         r"test split\(s\) empty .*raise the targets"):
        dialogue.prepare(qa, tmp_path / "out", settings)
    write_jsonl(qa / "alpaca.jsonl", alpaca[:10])  # 10 x 0.1 rounds to 1: every split gets one
    splits = dialogue.prepare(qa, tmp_path / "out", settings)["splits"]
    assert [splits[n]["dialogues"] for n in ("train", "val", "test")] == [8, 1, 1]


def test_a_small_source_keeps_an_eval_dialogue_in_each_split():
    """Six records at 5 % round to none; from three records on, val and test get one each (a
    source is always evaluated); under three nothing changes."""
    parts = dialogue.split(list(range(6)), 0.05, 0.05, seed=1, key=str)  # each record its own group
    assert [len(parts[n]) for n in ("train", "val", "test")] == [4, 1, 1]
    assert sorted(sum(parts.values(), [])) == list(range(6))
    assert [len(dialogue.split(list(range(2)), 0.05, 0.05, 1, key=str)[n]) for n in ("train", "val", "test")] == [2, 0, 0]
    large = dialogue.split(list(range(400)), 0.05, 0.1, 1, key=str)  # rounded shares as before
    assert [len(large[n]) for n in ("train", "val", "test")] == [340, 20, 40]


# --- duplicates and leaks across splits ------------------------------------------------------------


def sciq(question: str, support: str, **extra) -> dict:
    """A SciQ record in the hub's schema."""
    return {"question": question, "distractor1": "a", "distractor2": "b", "distractor3": "c",
            "correct_answer": f"answer to {question}", "support": support, **extra}


def test_near_duplicates_share_a_key_and_convert_drops_them():
    assert dialogue.near_key("The  Sun, it's HOT!") == dialogue.near_key("the sun its hot") == "thesunitshot"
    assert dialogue.near_key("Ｆｕｌｌ\twidth_") == "fullwidth"  # NFKC-folded; "_" is no word of its own
    records = [{"instruction": "Say hi.", "input": "", "output": "Hi!"},
               {"instruction": "say  hi", "input": "", "output": "hi"},  # the same once normalised
               {"instruction": "Say hi.", "input": "", "output": "Hello there!"}]  # another answer: kept
    kept, dropped = dialogue.convert(records, "alpaca")
    assert len(kept) == 2 and dropped == {"near_duplicate": 1}


def test_one_passage_and_one_normalised_question_never_span_two_splits():
    passage = "Plants make glucose from carbon dioxide and water in the light."
    records, _ = dialogue.convert([sciq(f"Question {i} on it?", passage) for i in range(5)]
                                  + [sciq(f"Other question {i}?", f"Passage number {i}.") for i in range(15)], "sciq")
    nq = [{"question": {"text": q}, "annotations": {"short_answers": [{"text": [a]}], "yes_no_answer": [-1]}}
          for q, a in [("who wrote dom casmurro", "Machado"), ("Who wrote Dom Casmurro?", "Machado de Assis")]
          + [(f"question {i}", f"answer {i}") for i in range(10)]]
    asked, _ = dialogue.convert(nq, "natural_questions")
    for seed in range(6):
        parts = dialogue.split(records, 0.1, 0.2, seed)
        assert sorted(sum(r["support"] == passage for r in part) for part in parts.values()) == [0, 0, 5]
        parts = dialogue.split(asked, 0.1, 0.2, seed)
        assert sum(any("casmurro" in r["question"].lower() for r in part) for part in parts.values()) == 1


def test_drop_leaks_keeps_the_test_split_and_removes_what_repeats_it():
    def rec(source: str, question: str, answer: str, **fields) -> dict:
        return {"dialogue": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "source": source, **fields}

    splits = {
        "test": [rec("sciq", "What is an element?", "A pure substance.", support="Elements are pure.")],
        "val": [rec("alpaca", "what is an ELEMENT", "Something else.")],  # the test question: a leak
        "train": [rec("sciq", "Are elements pure?", "Yes.", support="Elements are pure."),  # the test's passage
                  rec("dolly", "What is an element?", "A pure substance."),  # another source's dialogue again
                  rec("alpaca", "Say hi.", "Hi.")],
    }
    assert dialogue.drop_leaks(splits) == {("alpaca", "leak"): 1, ("sciq", "leak"): 1,
                                           ("dolly", "duplicate_across_sources"): 1}
    assert [len(splits[n]) for n in ("test", "val", "train")] == [1, 0, 1]


def test_prepare_tests_on_sciqs_own_test_split_and_counts_what_it_removed(tmp_path):
    qa = tmp_path / "qa"
    shared = "Igneous rocks form when magma cools."
    write_jsonl(qa / "sciq.jsonl", [
        sciq("What forms igneous rock?", shared, hub_split="test"),
        sciq("When does magma make igneous rock?", shared, hub_split="train"),  # a test item's passage: dropped
        *[sciq(f"What is fact {i}?", f"Fact {i} is true.", hub_split="train") for i in range(20)],
        sciq("What is fact 0?", "Fact 0 is true.", hub_split="train"),  # an exact duplicate
        *[sciq(f"What is test fact {i}?", f"Test fact {i}.", hub_split="test") for i in range(3)],
    ])
    write_jsonl(qa / "alpaca.jsonl", [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(20)]
                + [{"instruction": "say 1", "input": "", "output": "1"}])  # a near duplicate
    settings = {"targets": {"sciq": 10, "alpaca": None}, "val_fraction": 0.1, "test_fraction": 0.2, "max_chars": None,
                "seed": 3}
    manifest = dialogue.prepare(qa, tmp_path / "out", settings)
    src = manifest["sources"]["sciq"]
    assert manifest["test_from_hub_split"] == {"sciq": "test"} and src["test"] == 4  # all of it, whatever the target
    assert (src["train"], src["val"], src["dropped"]) == (8, 1, {"duplicate": 1, "leak": 1})  # 10 drawn, 1 leaked
    assert {r["hub_split"] for r in read_jsonl(tmp_path / "out" / "test.jsonl") if r["source"] == "sciq"} == {"test"}
    trained = {r["support"] for name in ("train", "val") for r in read_jsonl(tmp_path / "out" / f"{name}.jsonl")
               if r["source"] == "sciq"}
    assert shared not in trained and len(trained) == src["train"] + src["val"]
    assert manifest["deduplication"] == {"duplicate": 1, "near_duplicate": 1, "duplicate_across_sources": 0, "leak": 1}

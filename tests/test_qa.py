"""nblib.qa: one module per QA source; converters on real records and on the hub-schema samples."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nblib import dialogue, ingest, qa
from nblib.files import read_jsonl
from helpers import TWO_TURNS


@pytest.fixture(scope="module")
def alpaca(mirror: Path) -> list[dict]:
    return json.loads((mirror / "qa" / "alpaca_5000.json").read_text(encoding="utf-8"))[:200]


def test_every_source_is_a_module_found_by_name():
    assert set(qa.sources()) == {"alpaca", "dolly", "sciq", "natural_questions", "turns"}
    assert qa.get("dolly").hub == "databricks/databricks-dolly-15k"
    nq = qa.get("natural_questions")
    assert nq.streaming and nq.config == "default" and nq.keep == ("id", "question", "annotations")
    with pytest.raises(ValueError, match="unknown QA source 'squad'; known: alpaca, dolly"):
        qa.get("squad")


@pytest.mark.parametrize("name", ["dolly", "sciq", "natural_questions"])
def test_hub_schema_samples_pass_ingest_checks_and_convert(name):
    """The shipped samples are records as `datasets` yields them from the hub (see samples/README.md)."""
    source = qa.get(name)
    records = read_jsonl(source.sample_file)
    ingest.check_records(name, records, source.fields, str(source.sample_file))
    kept, dropped = dialogue.convert(records, name)
    assert kept and all(r["source"] == name for r in kept)
    if name == "natural_questions":  # two samples have neither a short nor a yes/no answer
        assert dropped == {"no_answer": 2}
        answers = [r["dialogue"][1]["content"] for r in kept]
        assert answers == ["Machado de Assis", "No.", "Machado de Assis", "Yes."]


def test_natural_questions_yes_no_encoding():
    """yes_no_answer is a ClassLabel: 0 = NO, 1 = YES, -1 = none (0 is an answer, not a missing one)."""
    rec = {"question": {"text": "is rio the capital"}, "annotations": {
        "id": ["a"], "short_answers": [{"text": []}], "yes_no_answer": [0]}}
    assert qa.get("natural_questions").convert(rec)[1]["content"] == "No."
    rec["annotations"]["yes_no_answer"] = [-1]
    assert qa.get("natural_questions").convert(rec) is None



def test_alpaca_real_records(alpaca):
    with_input = next(r for r in alpaca if r["input"].strip())
    without = next(r for r in alpaca if not r["input"].strip())
    turns = qa.get("alpaca").convert(with_input)
    assert turns[0] == {"role": "user", "content": with_input["instruction"] + "\n\n" + with_input["input"]}
    assert turns[1] == {"role": "assistant", "content": with_input["output"]}
    assert qa.get("alpaca").convert(without)[0]["content"] == without["instruction"]


def test_dolly():
    rec = {
        "instruction": "When did Virgin Australia start operating?",
        "context": "Virgin Australia commenced services on 31 August 2000 as Virgin Blue.",
        "response": "Virgin Australia commenced services on 31 August 2000.",
        "category": "closed_qa",
    }
    assert qa.get("dolly").convert(rec) == [
        {"role": "user", "content": rec["instruction"] + "\n\n" + rec["context"]},
        {"role": "assistant", "content": rec["response"]},
    ]
    assert qa.get("dolly").convert({**rec, "context": ""})[0]["content"] == rec["instruction"]


def test_sciq_answer_first_without_repeating():
    rec = {
        "question": "What type of organism is commonly used in preparation of foods such as cheese and yogurt?",
        "distractor1": "viruses", "distractor2": "protozoa", "distractor3": "gymnosperms",
        "correct_answer": "mesophilic organisms",
        "support": "Mesophiles grow best in moderate temperature.",
    }
    reply = qa.get("sciq").convert(rec)[1]["content"]
    assert reply == "Mesophilic organisms. Mesophiles grow best in moderate temperature."
    opens_with_answer = {**rec, "support": "Mesophilic organisms grow best between 20 and 45 °C."}
    assert qa.get("sciq").convert(opens_with_answer)[1]["content"] == opens_with_answer["support"]
    assert qa.get("sciq").convert({**rec, "support": ""})[1]["content"] == "mesophilic organisms"


def test_natural_questions_layouts_and_no_answer():
    hf = {  # the HF `datasets` layout: annotations are columnar, first annotator has no short answer
        "id": "1",
        "question": {"text": "who wrote dom casmurro", "tokens": ["who", "wrote", "dom", "casmurro"]},
        "annotations": {
            "id": ["a", "b"],
            "short_answers": [
                {"start_token": [], "end_token": [], "text": []},
                {"start_token": [10], "end_token": [13], "text": ["Machado de Assis"]},
            ],
            "yes_no_answer": [-1, -1],
        },
    }
    assert qa.get("natural_questions").convert(hf) == [
        {"role": "user", "content": "Who wrote dom casmurro?"},
        {"role": "assistant", "content": "Machado de Assis"},
    ]
    listed = {"question": "capital of brazil", "annotations": [{"short_answers": [{"text": "Brasília"}]}]}
    assert qa.get("natural_questions").convert(listed)[1]["content"] == "Brasília"
    none = {**hf, "annotations": {"id": ["a"], "short_answers": [{"text": []}], "yes_no_answer": [-1]}}
    assert qa.get("natural_questions").convert(none) is None


def test_multi_turn_lists():
    messages = {"messages": [{"role": "system", "content": "be nice"}, *TWO_TURNS]}
    assert qa.get("turns").convert(messages) == TWO_TURNS
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert qa.get("turns").convert(sharegpt) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
    ]
    with pytest.raises(ValueError, match=r"dialogue\[0\]"):
        qa.get("turns").convert({"dialogue": [{"role": "narrator", "content": "x"}]})




def test_eval_fields_keep_what_the_task_metrics_need():
    """SciQ keeps its options (correct one last, its index), question and support passage (lm-eval's
    ``sciq`` prompt), NQ every short answer over the annotators and its question as written (``nq_open``'s
    prompt), cleaned like the turns; free-form sources keep nothing beside the dialogue."""
    assert [s.name for s in qa.sources().values() if s.task] == ["alpaca", "dolly", "natural_questions", "sciq"]
    assert {s.task for s in qa.sources().values()} <= {*qa.TASKS, None}
    sciq = read_jsonl(qa.get("sciq").sample_file)
    kept, _ = dialogue.convert(sciq, "sciq")
    assert [r["options"] for r in kept] == [
        [s["distractor1"], s["distractor2"], s["distractor3"], s["correct_answer"]] for s in sciq]
    assert all(r["options"][r["correct"]] == s["correct_answer"] for r, s in zip(kept, sciq))
    assert [(r["question"], r["support"]) for r in kept] == [(s["question"], s["support"]) for s in sciq]
    two = {"question": "who wrote it", "annotations": {
        "id": ["a", "b", "c"], "yes_no_answer": [-1, -1, -1],
        "short_answers": [{"text": ["Machado  de Assis"]}, {"text": []}, {"text": ["<b>Machado</b>", "Machado de Assis"]}]}}
    (rec,), _ = dialogue.convert([two], "natural_questions")
    assert rec["answers"] == ["Machado de Assis", "Machado", "Machado de Assis"]  # cleaned, in annotator order
    assert rec["dialogue"][1]["content"] == "Machado de Assis"  # the trained answer is still the first one
    assert (rec["question"], rec["dialogue"][0]["content"]) == ("who wrote it", "Who wrote it?")
    yes_no = {"question": "is it",
              "annotations": {"short_answers": [{"text": []}, {"text": []}], "yes_no_answer": [1, 0]}}
    assert qa.get("natural_questions").eval_fields(yes_no) == {"answers": ["Yes.", "No."], "question": "is it"}
    alpaca = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    assert dialogue.convert([alpaca], "alpaca")[0] == [{"dialogue": qa.pair("Say hi.", "Hi."), "source": "alpaca"}]

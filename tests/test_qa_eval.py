"""nblib.qa_eval: task metrics against hand-worked values, on a tiny real GPT-2 that memorised two dialogues."""
from __future__ import annotations

import pytest
import torch
from rouge_score import rouge_scorer

from nblib import config, finetune, lmeval, qa, qa_eval
from nblib.dialogue import ASSISTANT, EOT, USER
from nblib.generate import generate
from helpers import chat_tokenizer, run_on_model

TWO_PLUS_TWO = "What is two plus two?"
COLOR = "Name a color."


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def model():
    return run_on_model()  # memorised helpers.RUN_ON: "Two plus two is four.", "Blue is a color."


def record(source: str, asked: str, answer: str, **fields) -> dict:
    return {"dialogue": [{"role": "user", "content": asked}, {"role": "assistant", "content": answer}],
            "source": source, **fields}


def test_squad_normalisation_exact_match_and_f1():
    assert qa_eval.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert qa_eval.exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert qa_eval.exact_match("Eiffel", ["eiffel tower"]) == 0.0
    # [tall, eiffel, tower, in, paris] vs [eiffel, tower]: 2 shared, P = 2/5, R = 2/2, F1 = 2PR/(P+R) = 4/7;
    # vs [paris]: P = 1/5, R = 1, F1 = 1/3; the best reference counts
    assert qa_eval.token_f1("the tall Eiffel Tower in Paris", ["Paris", "eiffel tower"]) == pytest.approx(4 / 7)
    assert qa_eval.token_f1("the tall Eiffel Tower in Paris", ["Paris"]) == pytest.approx(1 / 3)
    assert qa_eval.token_f1("London", ["Paris"]) == 0.0
    assert qa_eval.token_f1("The", ["a"]) == 1.0  # both normalise to nothing: SQuAD counts a match


def test_rouge_l_is_the_librarys_and_the_hand_computed_lcs():
    prediction, reference = "The cat sat on the mat", "a cat sat on a mat today"
    # tokens [the cat sat on the mat] vs [a cat sat on a mat today]: LCS "cat sat on mat" = 4,
    # P = 4/6, R = 4/7, F = 2PR/(P+R) = 8/13
    assert qa_eval.rouge_l(prediction, reference) == pytest.approx(8 / 13)
    library = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure
    assert qa_eval.rouge_l(prediction, reference) == library


def test_the_option_the_model_makes_most_likely_wins(tok, model):
    texts = [f"{USER} {TWO_PLUS_TWO}\n{ASSISTANT}", f"{USER} {COLOR}\n{ASSISTANT}"]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    options = [["blue is a color", "three plus two is five", "two plus two is four"],  # memorised answer last
               ["blue is a color", "red is another one", "two plus two is four", "and three?"]]  # ... and first
    scores = qa_eval.option_logprobs(model, tok, prompts, options, batch_size=3)  # pairs split across batches
    assert max(range(3), key=scores[0].__getitem__) == 2
    assert max(range(4), key=scores[1].__getitem__) == 0
    # each score is the summed log-probability of the option's tokens, as one unpadded forward computes it
    ids = prompts[1]
    cont = tok.encode(" Red is another one", add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids + cont])).logits[0].float(), -1)
    expected = sum(logp[len(ids) - 1 + k, t].item() for k, t in enumerate(cont))
    assert scores[1][1] == pytest.approx(expected, abs=1e-4)


def test_batched_greedy_answers_equal_the_chat_loops(tok, model):
    texts = [f"{USER} {COLOR}\n{ASSISTANT}", f"{USER} {TWO_PLUS_TWO}\n{ASSISTANT}"]  # different lengths: left padding
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    batched = qa_eval.greedy_answers(model, tok, prompts, max_new_tokens=20, batch_size=2)
    assert batched == ["Blue is a color.", "Two plus two is four."]  # ended at the "<|user|>" the model writes next
    one = [generate(model, tok, t, max_new_tokens=20, temperature=0, stops=(EOT, USER, ASSISTANT)).text.strip()
           for t in texts]
    assert batched == one
    too_long = tok.encode(f"{USER} {'word ' * 70}\n{ASSISTANT}", add_special_tokens=False)  # over the 64-token context
    assert qa_eval.greedy_answers(model, tok, [too_long, prompts[0]], 20, 2) == [None, "Blue is a color."]


def test_per_source_loss_is_the_pooled_loss_split_by_source(tok, model):
    a = [record("alpaca", TWO_PLUS_TWO, "Two plus two is four."), record("alpaca", COLOR, "Blue is a color.")]
    b = [record("dolly", "And three?", "Three plus two is five.")]
    eot = tok.convert_tokens_to_ids(EOT)

    def pooled(records):
        examples, _ = finetune.encode(records, tok, 64)
        return finetune.assistant_loss(model, examples, eot, 8, finetune.token_bytes(tok))

    one = qa_eval.source_losses(model, tok, a, batch_size=1)
    assert list(one) == ["alpaca"] and one["alpaca"]["n"] == 2
    assert (one["alpaca"]["loss"], one["alpaca"]["bpb"]) == pytest.approx(pooled(a))
    two = qa_eval.source_losses(model, tok, a + b, batch_size=2)
    weighted = sum(v["loss"] * v["tokens"] for v in two.values()) / sum(v["tokens"] for v in two.values())
    assert weighted == pytest.approx(pooled(a + b)[0])
    assert two["dolly"]["loss"] != pytest.approx(two["alpaca"]["loss"])
    long = record("sciq", " ".join(["word"] * 70), "Four.")  # over the 64-token context: said, not left out
    assert qa_eval.source_losses(model, tok, [long], 2)["sciq"] == {"loss": None, "bpb": None, "n": 0, "tokens": 0}


def test_evaluate_scores_every_source_by_its_task(tok, model):
    records = [
        record("sciq", TWO_PLUS_TWO, "Two plus two is four.",
               options=["blue is a color", "red is another one", "three plus two is five", "two plus two is four"],
               correct=3, question=TWO_PLUS_TWO, support="Two plus two is four."),
        record("natural_questions", COLOR, "Blue.", answers=["red", "blue is a color"], question="name a color"),
        record("alpaca", TWO_PLUS_TWO, "Two plus two is four."),
        record("alpaca", COLOR, "A color is red."),  # over the limit of one per source: not scored
        record("turns", COLOR, "Blue is a color."),  # no task: a loss only
    ]
    out = qa_eval.evaluate(model, tok, records, max_new_tokens=20, batch_size=4, limit_per_source=1)
    assert out["tasks"] == {  # per item too, for item-level tests between variants
        "sciq": {"task": "choice", "accuracy": 1.0, "accuracy_norm": 1.0, "chance": 0.25, "n": 1, "skipped": 0,
                 "items": {"accuracy": [1.0], "accuracy_norm": [1.0]}},
        "natural_questions": {"task": "short_answer", "exact_match": 1.0, "f1": 1.0, "n": 1, "skipped": 0,
                              "items": {"exact_match": [1.0], "f1": [1.0]}},
        "alpaca": {"task": "free_form", "rouge_l": 1.0, "n": 1, "skipped": 0, "items": {"rouge_l": [1.0]}},
    }
    # the sources with an lm-evaluation-harness task, scored its way too (equality: tests/test_lmeval.py)
    harness = out["harness"]
    assert {s: (v["task"], v["n"], list(v["items"])) for s, v in harness.items()} == {
        "sciq": ("sciq", 1, ["acc", "acc_norm"]), "natural_questions": ("nq_open", 1, ["exact_match"])}
    assert harness["sciq"] == lmeval.score(model, tok, qa.get("sciq").harness, records[:1], 4)
    assert {s: v["n"] for s, v in out["by_source"].items()} == {"sciq": 1, "natural_questions": 1, "alpaca": 1,
                                                                 "turns": 1}
    assert out["by_source"]["alpaca"]["loss"] < out["by_source"]["natural_questions"]["loss"]  # memorised vs not


def test_records_without_the_eval_fields_are_refused_with_the_fix(tok, model):
    with pytest.raises(config.MissingInput, match=r"1 of 1 sciq dialogue records lack options, correct .*re-run "
                                         r"notebooks/02_clean\.ipynb"):
        qa_eval.evaluate(model, tok, [record("sciq", TWO_PLUS_TWO, "Four.")])
    older = record("natural_questions", COLOR, "Blue.", answers=["blue"])  # before nq_open's prompt kept the question
    with pytest.raises(config.MissingInput, match=r"1 of 1 natural_questions dialogue records lack question, answers"):
        qa_eval.evaluate(model, tok, [older])


@pytest.mark.parametrize("first", ["nblib.qa_eval", "nblib.finetune"])
def test_qa_eval_and_finetune_import_in_either_order(first):
    """finetune imports qa_eval; both take the collator and losses from ftscore: no import cycle either way."""
    import subprocess
    import sys

    other = "nblib.finetune" if first == "nblib.qa_eval" else "nblib.qa_eval"
    code = f"import {first}, {other}; from nblib import finetune, qa_eval; assert finetune.Collator and qa_eval.evaluate"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

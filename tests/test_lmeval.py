"""nblib.lmeval equals lm-evaluation-harness: its own code (the pinned lm-eval, its shipped task YAMLs,
``HFLM`` around a tiny random GPT-2) and ours score the same hand-made items, item by item.

The items are clean text: ours are dialogue records, whose texts the clean stage cleaned (whitespace
folded, HTML removed), where the harness reads the hub's text as it is."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from nblib import dialogue, lmeval, qa
from nblib.qa import natural_questions as nq
from nblib.tokenizer import hf_tokenizer

SCIQ_DOCS = [
    {"question": "What gas do plants take in to make food?", "distractor1": "oxygen", "distractor2": "helium",
     "distractor3": "neon", "correct_answer": "carbon dioxide",
     "support": "  Plants take in carbon dioxide and give off oxygen, in the light of the sun."},  # lstrip()ped
    {"question": "Water boils at what temperature at sea level?", "distractor1": "50 degrees", "distractor2": "0 degrees",
     "distractor3": "10 degrees", "correct_answer": "100 degrees", "support": ""},  # no passage: "\nQuestion: ..."
    {"question": "What do we call animals that eat only plants?", "distractor1": "carnivores", "distractor2": "omnivores",
     "distractor3": "decomposers", "correct_answer": "herbivores",
     "support": " ".join(["Cows and deer graze on grass all day long."] * 60)},  # ~600 tokens: cut on the left
]
NQ_QUESTIONS = ["who wrote the novel dom casmurro", "when did the first man walk on the moon",
                "what is the capital city of brazil", "how many legs does a spider have"]
NQ_SAID = ["Machado de Assis", "July 1969", "Brasília", "eight"]  # what the model learns to answer, then "."


@lru_cache(maxsize=1)
def tok():
    return hf_tokenizer()


@lru_cache(maxsize=1)
def model() -> GPT2LMHeadModel:
    """A tiny GPT-2 with 512 positions (nq_open's 256 new tokens fit, SciQ's long passage does not),
    taught :data:`NQ_SAID` in nq_open's format, so its answers end soon at a "." or a newline."""
    torch.manual_seed(0)
    net = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok()), n_positions=512, n_embd=32, n_layer=2, n_head=2))
    rows = [tok().encode(f"Answer these questions:\n\nQ: {q}?\nA: {a}.\n") for q, a in zip(NQ_QUESTIONS, NQ_SAID)]
    width = max(map(len, rows))
    x = torch.tensor([r + [tok().eos_token_id] * (width - len(r)) for r in rows])
    y = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(100):
        net(x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    return net.eval()


def harness_samples(name: str, docs: list[dict], splits: tuple[str, ...]) -> list[dict]:
    """lm-eval's own run of its task ``name`` (the YAML it ships, unchanged) on ``docs``: the logged samples."""
    import datasets
    from lm_eval import evaluator
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM

    cfg = yaml.safe_load((resources.files("lm_eval") / "tasks" / name / f"{name}.yaml").read_text())
    data = datasets.Dataset.from_list(docs)
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({s: data for s in splits})  # no hub download
    lm = HFLM(pretrained=model(), tokenizer=hf_tokenizer(), batch_size=1)
    out = evaluator.evaluate(lm=lm, task_dict={name: ConfigurableTask(config=cfg)}, log_samples=True)
    return sorted(out["samples"][name], key=lambda s: s["doc_id"])


def test_the_pinned_lm_eval_is_the_one_reproduced():
    from importlib.metadata import version

    assert version("lm-eval") == lmeval.LM_EVAL_VERSION


def test_sciq_prompts_log_likelihoods_acc_and_acc_norm_equal_lm_evals():
    records, _ = dialogue.convert(SCIQ_DOCS, "sciq")
    task = qa.get("sciq").harness
    theirs = harness_samples("sciq", SCIQ_DOCS, ("train", "validation", "test"))
    requests = [(task.context(r), task.target_delimiter + c) for r in records for c in task.choices(r)]
    assert [tuple(a) for s in theirs for a in s["arguments"]] == requests  # prompt, delimiter, choices' order
    ours = lmeval.loglikelihoods(model(), tok(), requests, batch_size=1)
    their_lls = [resp[0][0] for s in theirs for resp in s["resps"]]
    assert ours == pytest.approx(their_lls, rel=1e-5, abs=1e-5)
    batched = lmeval.loglikelihoods(model(), tok(), requests, batch_size=5)  # right padding changes nothing
    assert batched == pytest.approx(ours, rel=1e-5, abs=1e-5)
    scored = lmeval.score(model(), tok(), task, records, batch_size=1)
    assert scored["items"] == {"acc": [s["acc"] for s in theirs], "acc_norm": [s["acc_norm"] for s in theirs]}
    assert (scored["n"], scored["skipped"], scored["excluded"]) == (3, 0, 0)
    assert scored["acc"] == sum(s["acc"] for s in theirs) / 3


def test_acc_norm_divides_by_the_choices_length_in_characters():
    """Hand-worked: sums -4, -6, -9 for choices of 2, 6 and 12 characters; acc takes -4 (index 0),
    acc_norm -9/12 = -0.75 over -6/6 = -1 and -4/2 = -2 (index 2); ties go to the first."""
    assert lmeval._argmax([-4.0, -6.0, -9.0]) == 0
    assert lmeval._argmax([-4.0 / 2, -6.0 / 6, -9.0 / 12]) == 2
    assert lmeval._argmax([-1.0, -1.0]) == 0


def nq_record(question: str, answers: list[str]) -> dict:
    (rec,), _ = dialogue.convert([{"question": {"text": question},
                                   "annotations": {"short_answers": [{"text": answers}], "yes_no_answer": [-1]}}],
                                  "natural_questions")
    return rec


def test_nq_open_prompt_answers_and_exact_match_equal_lm_evals():
    task = qa.get("natural_questions").harness
    # references the answers match only after the harness's normalisation, and ones they miss
    golds = [["the MACHADO de assis!"], ["1969"], ["Brasilia"], ["an eight", "8"]]
    records = [nq_record(q, g) for q, g in zip(NQ_QUESTIONS, golds)]
    docs = [{"question": q, "answer": r["answers"]} for q, r in zip(NQ_QUESTIONS, records)]
    theirs = harness_samples("nq_open", docs, ("train", "validation"))
    assert [s["arguments"][0][0] for s in theirs] == [task.context(r) for r in records]
    said = lmeval.generate_until(model(), tok(), [task.context(r) for r in records], task.until, batch_size=2)
    assert said == [s["resps"][0][0] for s in theirs]  # greedy until "\n", ".", ",", before the filters
    scored = lmeval.score(model(), tok(), task, records, batch_size=2)
    assert scored["items"] == {"exact_match": [float(s["exact_match"]) for s in theirs]}
    assert 0 < scored["exact_match"] < 1 and scored["n"] == 4  # matches and misses both exercised


def test_nq_open_normalisation_is_lm_evals_exact_match():
    from lm_eval.api.metrics import exact_match_hf_evaluate

    options = {"ignore_case": True, "ignore_punctuation": True,
               "regexes_to_ignore": [nq.HARNESS_ARTICLES.pattern]}
    pairs = [("The Beatles", "beatles"), ("AN apple", "apple"), ("An apple", "apple"), ("thebeatles", "beatles"),
             ("Paris ", "Paris"), ("U.S.A.", "usa"), ("a  b", "a b"), ("Élan", "élan"), ("x\x00", "x"),
             ("1,000", "1000"), ("the the cat", "cat"), ("Brasília", "Brasilia"), ("the", "")]
    for prediction, reference in pairs:
        theirs = exact_match_hf_evaluate(predictions=[prediction], references=[reference], **options)["exact_match"]
        assert nq.harness_exact_match(prediction, [reference]) == theirs, (prediction, reference)
    assert nq.harness_exact_match("Rio", ["Brasília", "rio!"]) == 1.0  # any reference


def test_nq_open_keeps_short_answers_of_at_most_five_tokens():
    assert nq.open_answers(["Machado de Assis", "one two three four five six", "Yes.", "No."]) == ["Machado de Assis"]
    task = qa.get("natural_questions").harness
    records = [nq_record("is it", ["a b c d e f"])]  # no answer nq_open would keep: not one of its items
    assert lmeval.score(model(), tok(), task, records, batch_size=1) == {
        "task": "nq_open", "lm_eval": lmeval.LM_EVAL_VERSION, "exact_match": None, "n": 0, "skipped": 0,
        "excluded": 1, "items": {"exact_match": [None]}}

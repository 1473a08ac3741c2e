"""nblib.generate: stop strings on crafted token streams, streaming, history truncation, and the
one sampling loop on real models (a tiny HF GPT-2 and nblib's GPT)."""
from __future__ import annotations

import pytest
import torch
from helpers import chat_tokenizer, run_on_model
from test_model import OpRecorder
from transformers import GPT2LMHeadModel, StoppingCriteriaList

from nblib.dialogue import ASSISTANT, EOT, USER, render
from nblib.generate import CHAT_STOPS, ChatSession, StopOnStrings, StopScanner, fit_history, generate, hf_decoder, trim
from nblib.model import GPT, GPTConfig
from nblib.sampling import sample_next
from nblib.tokenizer import hf_tokenizer


@pytest.fixture
def tok(mirror):
    return chat_tokenizer()


@pytest.fixture
def run_on(tok) -> GPT2LMHeadModel:
    return run_on_model()


def ordinary(tok, text: str) -> list[int]:
    """``text`` as ordinary tokens: a role marker spelled out piece by piece, not its special id."""
    return tok.encode(text, add_special_tokens=False, split_special_tokens=True)


def scan(tok, ids: list[int], stops=CHAT_STOPS) -> tuple[StopScanner, list[str]]:
    scanner = StopScanner(hf_decoder(tok), stops)
    released = []
    for i in ids:
        released.append(scanner.push(i))
        if scanner.stopped_on:
            break
    return scanner, released


# --- stop strings on crafted token streams ---------------------------------------------------


def test_marker_split_across_tokens_is_held_back_then_cut(tok):
    ids = ordinary(tok, "Fim.<|user|> Quem")
    assert len(ids) >= 5 and tok.decode(ids[2]) == ".<"  # the marker's "<" rides with the full stop
    scanner, released = scan(tok, ids)
    assert scanner.stopped_on == USER
    assert scanner.text == "".join(released) == "Fim."
    assert all("<" not in r and "|" not in r for r in released)
    assert len(scanner.ids) == len(ordinary(tok, "Fim.<|user|>"))  # stopped as soon as it closed


def test_special_marker_token_and_eot_stop(tok):
    for marker in (USER, ASSISTANT, EOT):
        ids = ordinary(tok, " Sim, claro.") + tok.encode(marker) + ordinary(tok, " depois")
        scanner, released = scan(tok, ids)
        assert (scanner.stopped_on, scanner.text, "".join(released)) == (marker, " Sim, claro.", " Sim, claro.")


def test_marker_at_the_very_start(tok):
    for ids, marker in ((tok.encode(EOT), EOT), (ordinary(tok, "<|assistant|> oi"), ASSISTANT)):
        scanner, released = scan(tok, ids)
        assert scanner.stopped_on == marker and scanner.text == "" and released[-1] == ""


def test_no_marker_releases_whole_words_only(tok):
    text = " Uma resposta sem marcador nenhum"
    scanner, released = scan(tok, ordinary(tok, text))
    assert scanner.stopped_on is None
    assert scanner.text == "".join(released) == " Uma resposta sem marcador "  # the last word may go on
    assert all(r == "" or not r[-1].isalnum() for r in released)  # never half a word


def test_partial_marker_at_the_end_is_removed(tok):
    scanner, _ = scan(tok, ordinary(tok, "Fim. <|us"))
    assert scanner.stopped_on is None and scanner.text == "Fim. "
    assert trim("Fim. <|us", CHAT_STOPS) == ("Fim. ", None)
    assert trim("Fim. <|", ["<|user|>", "FIM"]) == ("Fim. ", None)


def test_incomplete_utf8_character_is_held(tok):
    ids = ordinary(tok, "Olá 😀 fim")
    scanner, released = scan(tok, ids)
    assert "\ufffd" not in "".join(released)
    assert scanner.text == "Olá 😀 "


def test_custom_multi_token_stop_string(tok):
    scanner, released = scan(tok, ordinary(tok, "Capítulo um.\n\nCapítulo dois."), stops=("\n\n",))
    assert scanner.stopped_on == "\n\n" and scanner.text == "".join(released) == "Capítulo um."
    with pytest.raises(RuntimeError, match="already stopped"):
        scanner.push(0)


# --- history ----------------------------------------------------------------------------------


def test_fit_history_drops_oldest_whole_exchanges(tok):
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"pergunta número {i} sobre Capitu"},
                  {"role": "assistant", "content": f"resposta número {i}, bem mais comprida que a pergunta"}]
    full, dropped = fit_history(tok, turns, "e agora?", 10_000, 100)
    assert dropped == 0 and tok.decode(full) == render([*turns, {"role": "user", "content": "e agora?"}], generation_prompt=True)
    budget = len(full) - 20
    ids, dropped = fit_history(tok, turns, "e agora?", budget + 32, 32)
    assert len(ids) <= budget and dropped % 2 == 0 and dropped >= 2
    kept = [*turns[dropped:], {"role": "user", "content": "e agora?"}]
    assert tok.decode(ids) == render(kept, generation_prompt=True)  # whole turns, oldest gone
    longer = render([*turns[dropped - 2 :], kept[-1]], generation_prompt=True)
    assert len(tok.encode(longer)) > budget  # it kept as much history as fits
    with pytest.raises(ValueError, match="alternate"):
        fit_history(tok, turns[1:], "oi", 1000, 32)


def test_fit_history_says_how_to_fit_a_long_message(tok):
    message = "palavra " * 12
    n = len(tok.encode(render([{"role": "user", "content": message}], generation_prompt=True)))
    assert 32 < n < 64
    with pytest.raises(ValueError) as e:
        fit_history(tok, [], message, 64, 32)
    assert str(e.value) == (
        f"the message makes a {n}-token prompt but only 32 tokens fit: the model's context is 64 tokens, and "
        f"max_new_tokens=32 of them are kept for the answer. To send it, shorten it by {n - 32} tokens, lower "
        f"max_new_tokens (--max-new-tokens) to {64 - n} or use a model with a longer context, such as the full "
        "profile's fine-tune of gpt2 (1024 tokens; `python -m nblib.pipeline --profile full` on a GPU)"
    )
    assert fit_history(tok, [], message, 64, 64 - n)[0]  # the suggested max_new_tokens does fit
    with pytest.raises(ValueError, match=rf"shorten it by {n - 8} tokens or use a model with a longer context, such as"):
        fit_history(tok, [], message, 16, 8)  # longer than the whole context: no max_new_tokens helps
    with pytest.raises(ValueError, match=r"shorten it by \d+ tokens or use a model with a longer context$"):
        fit_history(tok, [], "palavra " * 400, 1024, 100)  # already gpt2's 1024 tokens: no bigger model to name


# --- the generation loop on real models ---------------------------------------------------------


def test_greedy_matches_hf_generate_and_stopping_criteria(tok, run_on):
    prompt = tok.encode(f"{USER} Name a color.\n{ASSISTANT}")
    ours = generate(run_on, tok, prompt, max_new_tokens=30, temperature=0, stops=(EOT,))
    theirs = run_on.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, pad_token_id=tok.eos_token_id)
    assert ours.token_ids == theirs[0, len(prompt):].tolist()  # both stop on end-of-text
    assert ours.stopped_on == EOT and USER in ours.text  # the model writes the user's next turn
    stopped = run_on.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, pad_token_id=tok.eos_token_id,
                              stopping_criteria=StoppingCriteriaList([StopOnStrings(tok, len(prompt))]))
    text, stop = trim(hf_decoder(tok)(stopped[0, len(prompt):].tolist()), CHAT_STOPS)
    chat = generate(run_on, tok, prompt, max_new_tokens=30, temperature=0, stops=CHAT_STOPS)
    assert (text, stop) == (chat.text, chat.stopped_on) == (" Blue is a color.\n", USER)
    assert stopped.shape[1] < theirs.shape[1]


def test_greedy_matches_nblib_gpt_generate(tok):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=len(tok), context_length=64, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                        dropout=0.0, bias=True, tie_embeddings=True))
    prompt = tok.encode("Capitu tinha olhos de")
    ours = generate(gpt, tok, prompt, max_new_tokens=12, temperature=0, stops=())
    theirs = gpt.generate(torch.tensor([prompt]), 12, temperature=0)
    assert ours.token_ids == theirs[0, len(prompt):].tolist()
    sampled = [generate(gpt, tok, prompt, max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=s, stops=()).token_ids
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_budget_trims_to_a_word_boundary_and_flags_it(tok, run_on):
    prompt = tok.encode(f"{USER} What is two plus two?\n{ASSISTANT}")
    full = generate(run_on, tok, prompt, max_new_tokens=40, temperature=0, stops=(EOT,)).text
    for budget in range(1, 8):
        out = generate(run_on, tok, prompt, max_new_tokens=budget, temperature=0, stops=(EOT,))
        assert out.truncated and len(out.token_ids) == budget
        assert full.startswith(out.text)
        assert not (out.text and out.text[-1].isalnum() and full[len(out.text)].isalnum()), (budget, out.text)


def test_streaming_equals_returned_text(tok, run_on):
    chunks: list[str] = []
    out = generate(run_on, tok, f"{USER} What is two plus two?\n{ASSISTANT}", max_new_tokens=30, temperature=0,
                   stops=CHAT_STOPS, stream=chunks.append)
    assert "".join(chunks) == out.text == " Two plus two is four.\n" and len(chunks) >= 4


def test_context_limits(tok, run_on):
    with pytest.raises(ValueError, match="context is 64"):
        generate(run_on, tok, list(range(64)), max_new_tokens=4)
    out = generate(run_on, tok, list(range(61)), max_new_tokens=10, temperature=0, stops=())
    assert len(out.token_ids) == 3 and out.truncated
    with pytest.raises(ValueError, match="empty"):
        generate(run_on, tok, "", max_new_tokens=4)


def test_repetition_penalty_sees_generated_tokens(tok, run_on):
    prompt = tok.encode(f"{USER} Name a color.\n{ASSISTANT}")
    out = generate(run_on, tok, prompt, max_new_tokens=20, temperature=0, repetition_penalty=1e6, stops=())
    assert len(set(out.token_ids)) == len(out.token_ids)


def test_scripted_chat_never_leaks_role_markers(tok, run_on):
    chat = ChatSession(run_on, tok, max_new_tokens=30, temperature=0)
    replies = [chat.ask(q) for q in ("What is two plus two?", "And three?", "Name a color.", "Another one?")]
    assert replies[0].text == "Two plus two is four." and replies[0].generation.stopped_on == USER
    for r in replies:
        assert USER not in r.text and ASSISTANT not in r.text and EOT not in r.text
        assert "<|" not in r.text and not r.truncated
    assert [t["role"] for t in chat.turns] == ["user", "assistant"] * 4
    sampled = ChatSession(run_on, tok, max_new_tokens=30, temperature=1.0, top_k=20, seed=3)
    for q in ("What is two plus two?", "Name a color.", "And three?"):
        text = sampled.ask(q).text
        assert "<|" not in text and "|>" not in text
    chat.reset()
    assert chat.turns == [] and chat.conversation == 2


def test_chat_session_drops_old_turns_to_fit(tok, run_on):
    chat = ChatSession(run_on, tok, max_new_tokens=32, temperature=0)
    dropped = [chat.ask(q).dropped_turns for q in ("What is two plus two?", "Name a color.", "And three?")]
    assert dropped[0] == 0 and dropped[-1] >= 2  # 64-token context: the oldest exchange had to go
    assert len(chat.turns) == 6  # the session keeps everything; only the prompt is cut


def test_chat_session_refuses_a_model_it_cannot_chat_with(tok, run_on):
    with pytest.raises(ValueError, match="not a chat fine-tune"):
        ChatSession(run_on, hf_tokenizer())
    with pytest.raises(ValueError, match="max_new_tokens=64 leaves no room for the prompt"):
        ChatSession(run_on, tok, max_new_tokens=64)




# --- the loop's cost on nblib's GPT ------------------------------------------------------------


def small_gpt(tok, n_kv_head: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=len(tok), context_length=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=64)).eval()


def recomputed(gpt: GPT, prompt: list[int], n: int, repetition_penalty: float) -> list[int]:
    """Greedy reference without any cache: the whole sequence through the model at every step."""
    ids: list[int] = []
    for _ in range(n):
        logits = gpt(torch.tensor([prompt + ids]), targets=torch.tensor([prompt + ids]))[0][:, -1]
        ids.append(int(sample_next(logits, 0, repetition_penalty=repetition_penalty, previous=torch.tensor([ids], dtype=torch.long))))
    return ids


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_cached_chat_loop_equals_recomputation(tok, n_kv_head):
    gpt = small_gpt(tok, n_kv_head)
    prompt = tok.encode("Capitu tinha olhos de")
    for penalty in (1.0, 1.5):
        out = generate(gpt, tok, prompt, max_new_tokens=20, temperature=0, repetition_penalty=penalty, stops=())
        with torch.no_grad():
            assert out.token_ids == recomputed(gpt, prompt, 20, penalty)


def test_chat_loop_on_gpt_computes_last_logits_only_and_allocates_ids_once(tok, monkeypatch):
    gpt = small_gpt(tok, 2)
    prompt = tok.encode("Capitu tinha olhos de ressaca, disse José Dias")
    made: list[object] = []
    as_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **kw: made.append(a) or as_tensor(*a, **kw))
    with OpRecorder() as rec:
        out = generate(gpt, tok, prompt, max_new_tokens=16, temperature=0.8, top_k=50, repetition_penalty=1.3, seed=1, stops=())
    assert len(out.token_ids) == 16
    vocab_rows = [t.shape[:-1].numel() for _, ts in rec.calls for t in ts if t.dim() and t.shape[-1] == len(tok)]
    assert max(vocab_rows) == 1, "the LM head runs on the last position only, the prompt's included"
    assert len(made) == 1, "only the prompt becomes a tensor; the penalty's history is preallocated"
    assert "cat" not in rec.names()

"""nblib.decode: the compiled one-token step gives eager decoding's tokens, compiles once per cache
shape (never per token), and falls back to eager with one line when compile cannot run."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from nblib import decode
from nblib.decode import DecodeStep, use_compile
from nblib.generate import generate
from nblib.model import GPT, GPTConfig
from nblib.tokenizer import hf_tokenizer


def small_gpt(n_kv_head: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=512, context_length=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=64)).eval()


def prompt(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(batch + length))


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_compiled_decode_gives_eager_tokens_and_compiles_once_per_cache_shape(n_kv_head):
    model = small_gpt(n_kv_head)
    for batch in (1, 8):
        graphs = counters["stats"]["unique_graphs"]
        eager = model.generate(prompt(batch, 8), 24, temperature=0, compile=False)
        compiled = model.generate(prompt(batch, 8), 24, temperature=0, compile=True)  # a 32-position cache
        assert torch.equal(compiled, eager), f"batch {batch}: compiled decoding changed the tokens"
        assert counters["stats"]["unique_graphs"] == graphs + 1, "one graph for 23 tokens: no recompile per position"
        with torch._dynamo.config.patch(error_on_recompile=True):  # 10 + 20 positions: the same 32-position cache shape
            again = model.generate(prompt(batch, 10), 20, temperature=0, compile=True)
        assert torch.equal(again, model.generate(prompt(batch, 10), 20, temperature=0, compile=False))


def test_chat_loop_compiled_equals_eager():
    model, tok = small_gpt(2), hf_tokenizer()
    ids = prompt(1, 12)[0].tolist()
    out = {c: generate(model, tok, ids, max_new_tokens=20, temperature=0, stops=(), compile=c) for c in (False, True)}
    assert out[True].token_ids == out[False].token_ids and len(out[True].token_ids) == 20


def test_default_is_eager_until_measured():
    assert not use_compile(torch.device("cuda"))[0]
    assert use_compile(torch.device("cpu")) == (False, "cpu: compiling the step pays for itself only after ~3,600 tokens on a CPU (nblib/decode.py)")
    step = DecodeStep.new(small_gpt(1), 2, 20)
    assert not step.compiled and step.cache.max_len == 20  # eager: the cache is as long as needed
    assert DecodeStep.new(small_gpt(1), 2, 20, compile=True).cache.max_len == 32  # compiled: a power of two


def test_no_compiler_decodes_eagerly_and_says_why(monkeypatch, capsys):
    monkeypatch.setattr(decode.shutil, "which", lambda name: None)
    model = small_gpt(2)
    tokens = model.generate(prompt(2, 8), 12, temperature=0, compile=True)
    assert torch.equal(tokens, model.generate(prompt(2, 8), 12, temperature=0, compile=False))
    err = capsys.readouterr().err.splitlines()
    assert err == ["nblib.decode: decoding eagerly: no C++ compiler (g++, c++ or clang++) on PATH for torch.compile's "
                   "CPU code; install one (apt install g++)"]
    assert use_compile(torch.device("cpu")) == (False, err[0].split("eagerly: ")[1])


def test_a_failing_compile_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("inductor could not lower aten.foo\nmore detail")

    monkeypatch.setattr(decode, "_compiled_step", lambda: {"default": broken, "reduce-overhead": broken})
    model = small_gpt(4)
    step = DecodeStep.new(model, 1, 16, compile=True)
    model(prompt(1, 4), cache=step.cache)
    logits = step(prompt(1, 1))
    assert not step.compiled and step.cache.length == 5 and logits.shape == (1, 512)
    assert capsys.readouterr().err == ("nblib.decode: torch.compile failed, decoding eagerly "
                                       "(RuntimeError: inductor could not lower aten.foo)\n")

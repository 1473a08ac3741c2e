"""nblib.model: GPT with MHA/GQA/MQA, KV cache, checkpoints and the Hugging Face export."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import nblib.model
from nblib import tokenizer
from nblib.model import GPT, GPTConfig, KVCache, attend, export_hf, load_checkpoint, matched_d_mlp, save_checkpoint

VOCAB = 97


def tiny(n_kv_head: int = 4, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, context_length=32, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def tokens(batch: int, length: int, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(n_head=4, n_kv_head=3), "must divide n_head"),
        (dict(n_head=4, n_kv_head=8), "must divide n_head"),
        (dict(n_head=5, d_model=32), "not divisible by n_head"),
        (dict(n_kv_head=0), "positive integer"),
        (dict(dropout=1.0), "dropout"),
        (dict(d_mlp=0), "GPTConfig.d_mlp must be a positive integer"),
    ],
)
def test_invalid_head_combinations_fail_at_config_time(kw, message):
    base = dict(vocab_size=VOCAB, context_length=16, n_layer=1, n_head=4, n_kv_head=4, d_model=32)
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**base, **kw})


@pytest.mark.parametrize("n_kv_head, variant", [(4, "mha"), (2, "gqa"), (1, "mqa")])
def test_kv_projection_and_cache_use_n_kv_head(n_kv_head, variant):
    model = tiny(n_kv_head)
    c = model.config
    assert c.variant == variant
    attn = model.transformer.h[0].attn
    assert attn.c_attn.out_features == (c.n_head + 2 * n_kv_head) * c.head_dim
    cache = model.new_cache(batch_size=3, max_len=20)
    assert cache.k.shape == (c.n_layer, 3, n_kv_head, 20, c.head_dim)
    assert cache.nbytes == model.kv_cache_bytes(3, 20, torch.float32) == 2 * 2 * 3 * n_kv_head * 20 * 8 * 4
    assert model.kv_cache_bytes(1, 1, torch.float16) * 2 == model.kv_cache_bytes(1, 1, torch.float32)


def test_gqa_cache_is_the_head_ratio_of_mha():
    mha, gqa, mqa = tiny(4), tiny(2), tiny(1)
    for seq_len in (1, 256, 4096):
        ref = mha.config.kv_cache_bytes(2, seq_len)
        assert gqa.config.kv_cache_bytes(2, seq_len) * 2 == ref
        assert mqa.config.kv_cache_bytes(2, seq_len) * 4 == ref


def test_gqa_equals_mha_with_duplicated_kv_heads():
    """A GQA model is an MHA model whose K/V heads are copies shared by query-head groups."""
    gqa = tiny(2)
    mha = tiny(4)
    mha.load_state_dict({k: v for k, v in gqa.state_dict().items() if "c_attn" not in k}, strict=False)
    c, hd, d = gqa.config, gqa.config.head_dim, gqa.config.d_model
    for g_block, m_block in zip(gqa.transformer.h, mha.transformer.h):
        w, b = g_block.attn.c_attn.weight, g_block.attn.c_attn.bias
        q_w, k_w, v_w = w.split([c.n_head * hd, c.n_kv_head * hd, c.n_kv_head * hd])
        q_b, k_b, v_b = b.split([c.n_head * hd, c.n_kv_head * hd, c.n_kv_head * hd])

        def expand(t: torch.Tensor) -> torch.Tensor:
            """K/V rows of each head repeated for the query heads of its group."""
            rep = c.n_head // c.n_kv_head
            return t.view(c.n_kv_head, hd, *t.shape[1:]).repeat_interleave(rep, dim=0).reshape(c.n_head * hd, *t.shape[1:])

        with torch.no_grad():
            m_block.attn.c_attn.weight.copy_(torch.cat([q_w, expand(k_w), expand(v_w)]))
            m_block.attn.c_attn.bias.copy_(torch.cat([q_b, expand(k_b), expand(v_b)]))
    assert m_block.attn.c_attn.weight.shape == (3 * d, d)
    idx = tokens(2, 24)
    torch.testing.assert_close(gqa(idx, idx)[0], mha(idx, idx)[0], atol=1e-5, rtol=1e-5)


def test_forward_loss_and_last_position_logits():
    model = tiny(2)
    idx, targets = tokens(3, 16), tokens(3, 16, seed=2)
    logits, loss = model(idx, targets=targets)
    assert logits.shape == (3, 16, VOCAB)
    assert abs(loss.item() - math.log(VOCAB)) < 0.1  # near-uniform predictions at initialisation
    last, none = model(idx)
    assert none is None and last.shape == (3, 1, VOCAB)
    torch.testing.assert_close(last[:, 0], logits[:, -1])
    ignored = targets.clone()
    ignored[:, :8] = -1
    _, loss_half = model(idx, targets=ignored)
    expected = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, VOCAB), targets[:, 8:].reshape(-1))
    torch.testing.assert_close(loss_half, expected)


def test_attention_is_causal():
    model = tiny(2)
    a, b = tokens(1, 20, seed=1), tokens(1, 20, seed=1)
    b[0, 12:] = (b[0, 12:] + 1) % VOCAB
    la, _ = model(a, a)
    lb, _ = model(b, b)
    torch.testing.assert_close(la[:, :12], lb[:, :12])
    assert not torch.allclose(la[:, 12:], lb[:, 12:])


def test_context_overflow_is_a_clear_error():
    model = tiny(4)
    with pytest.raises(ValueError, match="exceeds context_length=32"):
        model(tokens(1, 33))
    cache = model.new_cache(1, 8)
    model(tokens(1, 6), cache=cache)
    with pytest.raises(ValueError, match="cannot append 4 positions"):
        model(tokens(1, 4), cache=cache)
    with pytest.raises(ValueError, match="max_len=40"):
        model.new_cache(1, 40)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_cached_chunks_match_full_forward(n_kv_head):
    """Prefill, multi-token chunks at an offset and single tokens all give the full pass's logits."""
    model = tiny(n_kv_head)
    idx = tokens(2, 30)
    full, _ = model(idx, targets=idx)
    cache = model.new_cache(2, 30)
    parts = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 9), (9, 17), (17, 18), (18, 19), (19, 30))]
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_cached_generation_equals_recomputation_greedy(n_kv_head):
    model = tiny(n_kv_head)
    prompt = tokens(2, 5)
    with_cache = model.generate(prompt, 27, temperature=0, use_cache=True)
    without = model.generate(prompt, 27, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 32)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache[:, :5], prompt)


def test_generation_past_the_context_and_sampling_is_seeded():
    model = tiny(2)
    out = model.generate(tokens(1, 30), 40, temperature=0)  # refills the cache past 32 positions
    assert out.shape == (1, 70) and int(out.max()) < VOCAB
    a = model.generate(tokens(1, 4), 12, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    b = model.generate(tokens(1, 4), 12, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not model.training


def test_gpt2_initialisation_and_parameter_counts():
    torch.manual_seed(0)
    c = GPTConfig(vocab_size=1000, context_length=64, n_layer=4, n_head=4, n_kv_head=2, d_model=128)
    model = GPT(c)
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h] + [b.mlp.c_proj.weight.flatten() for b in model.transformer.h])
    fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.transformer.h])
    assert abs(proj.std().item() - 0.02 / math.sqrt(2 * c.n_layer)) < 0.001
    assert abs(fc.std().item() - 0.02) < 0.001
    assert model.lm_head.weight is model.transformer.wte.weight
    d, kv = c.d_model, c.n_kv_head * c.head_dim
    per_block = (d * (d + 2 * kv) + d + 2 * kv) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
    assert model.num_params("blocks") == c.n_layer * per_block
    assert model.num_params("embedding") == (1000 + 64) * d
    assert model.num_params() == c.n_layer * per_block + (1000 + 64) * d + 2 * d
    untied = GPT(GPTConfig(vocab_size=1000, context_length=64, n_layer=1, n_head=4, n_kv_head=4, d_model=32, tie_embeddings=False, bias=False))
    assert untied.num_params("embedding") == (2 * 1000 + 64) * 32
    assert untied.num_params() == untied.num_params("embedding") + untied.num_params("blocks") + 32
    with pytest.raises(ValueError, match="part"):
        model.num_params("heads")


def test_gqa_checkpoint_round_trip(tmp_path: Path):
    model = tiny(2, dropout=0.1)
    path = save_checkpoint(tmp_path / "ckpt.pt", model, step=7, note="x")
    loaded, ckpt = load_checkpoint(path)
    assert loaded.config == model.config and ckpt["step"] == 7 and ckpt["note"] == "x"
    idx = tokens(2, 20)
    torch.testing.assert_close(loaded.eval()(idx, idx)[0], model(idx, idx)[0])
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an nblib GPT checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_checkpoint_without_d_mlp_loads_at_gpt2_width(tmp_path: Path):
    """Checkpoints written before ``GPTConfig.d_mlp`` existed have no such key: they load as 4 x d_model."""
    model = tiny(2)
    path = save_checkpoint(tmp_path / "ckpt.pt", model)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model_config"]["d_mlp"]
    torch.save(ckpt, path)
    loaded, _ = load_checkpoint(path)
    assert loaded.config.d_mlp is None and loaded.transformer.h[0].mlp.c_fc.out_features == 4 * 32
    idx = tokens(2, 20)
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])
    wide = tiny(2, d_mlp=80)  # and a widened MLP survives the round trip
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "wide.pt", wide))
    assert loaded.config.d_mlp == 80 and loaded.transformer.h[1].mlp.c_proj.in_features == 80


# (n_layer, n_head, d_model, bias): the smoke and full profiles' shapes, GPT-2 small's, and one without bias
SHAPES = [(2, 4, 64, True), (8, 8, 512, True), (12, 12, 768, True), (4, 8, 256, False)]


@pytest.mark.parametrize("n_layer, n_head, d_model, bias", SHAPES)
def test_matched_d_mlp_gives_gqa_the_parameters_of_mha(n_layer, n_head, d_model, bias):
    def count(c: GPTConfig) -> tuple[int, int]:
        with torch.device("meta"):  # real modules, no memory
            m = GPT(c)
        return m.num_params(), m.num_params("blocks")

    mha = GPTConfig(n_layer=n_layer, n_head=n_head, n_kv_head=n_head, d_model=d_model, bias=bias)
    total, blocks = count(mha)
    assert matched_d_mlp(mha, n_head) == 4 * d_model  # nothing to make up
    for n_kv in [k for k in range(1, n_head) if n_head % k == 0]:
        narrow = dataclasses.replace(mha, n_kv_head=n_kv)
        matched = dataclasses.replace(narrow, d_mlp=matched_d_mlp(mha, n_kv))
        assert matched.d_mlp > 4 * d_model
        assert count(narrow)[1] < blocks * 0.995  # at equal width GQA's blocks are more than 0.5% smaller
        t, b = count(matched)
        assert abs(t - total) / total < 0.005 and abs(b - blocks) / blocks < 0.005, (n_kv, t, total, b, blocks)
        assert abs(b - blocks) <= n_layer * (2 * d_model + bias)  # under one MLP unit per layer
        if not bias:  # no biases: every removed K/V row is exactly one MLP unit of weights
            assert b == blocks
    with pytest.raises(ValueError, match="must divide n_head"):
        matched_d_mlp(mha, 3 if n_head % 3 else 5)


@pytest.mark.parametrize("bias, tie, d_mlp", [(True, True, None), (False, False, 80)])
def test_export_hf_logits_match(tmp_path: Path, mirror: Path, bias: bool, tie: bool, d_mlp: int | None):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT(GPTConfig(context_length=48, n_layer=2, n_head=4, n_kv_head=4, d_model=32, bias=bias, tie_embeddings=tie,
                          d_mlp=d_mlp)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping would show
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    out = export_hf(model, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.n_positions == 48 and hf.config.tie_word_embeddings == tie and hf.config.n_inner == d_mlp
    idx = tokens(2, 48, vocab=50257)
    with torch.no_grad():
        ours, _ = model(idx, idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    prompt = tokens(1, 6, vocab=50257)
    ours_gen = model.generate(prompt, 10, temperature=0)
    hf_gen = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False, pad_token_id=50256)
    assert torch.equal(ours_gen, hf_gen)
    text = "Capitu olhou para mim, e disse: — Não."
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tokenizer.get_encoding().encode_ordinary(text)
    export_hf(model, out)  # replacing an existing export works
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".hf.*"))


def test_export_hf_refuses_gqa(tmp_path: Path):
    with pytest.raises(ValueError, match="needs an MHA model"):
        export_hf(tiny(2), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_kv_cache_reset_and_dtype():
    model = tiny(2)
    half = model.new_cache(1, 16, dtype=torch.bfloat16)
    assert isinstance(half, KVCache) and half.k.dtype == torch.bfloat16
    assert half.nbytes == model.kv_cache_bytes(1, 16, torch.bfloat16)
    cache = model.new_cache(1, 16)
    first, _ = model(tokens(1, 10), cache=cache)
    cache.reset()
    again, _ = model(tokens(1, 10), cache=cache)
    assert cache.length == 10
    torch.testing.assert_close(first, again)


# --- attention against an independent reference; K/V never expanded ------------------------------


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Textbook causal attention: K/V heads repeated for their query groups, explicit softmax."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    T, L = q.size(2), k.size(2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    visible = torch.arange(L)[None, :] <= start + torch.arange(T)[:, None]  # query i sits at start + i
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


def reference_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The model's logits at every position, recomputed from its weights with ``reference_attention``."""
    c, t = model.config, model.transformer
    B, T = idx.shape

    def heads(z: torch.Tensor, n: int) -> torch.Tensor:
        return z.view(B, T, n, c.head_dim).transpose(1, 2)

    x = t.wte(idx) + t.wpe(torch.arange(T))
    for block in t.h:
        a = block.attn
        h = F.layer_norm(x, (c.d_model,), block.ln_1.weight, block.ln_1.bias)
        q, k, v = F.linear(h, a.c_attn.weight, a.c_attn.bias).split([c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim], 2)
        y = reference_attention(heads(q, c.n_head), heads(k, c.n_kv_head), heads(v, c.n_kv_head), 0)
        x = x + F.linear(y.transpose(1, 2).reshape(B, T, c.d_model), a.c_proj.weight, a.c_proj.bias)
        h = F.layer_norm(x, (c.d_model,), block.ln_2.weight, block.ln_2.bias)
        x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(h), approximate="tanh"))
    return model.lm_head(F.layer_norm(x, (c.d_model,), t.ln_f.weight, t.ln_f.bias))


@pytest.mark.parametrize("n_kv_head", [8, 2, 1])
@pytest.mark.parametrize("start, T", [(0, 7), (0, 1), (9, 1), (9, 6)])
def test_attend_matches_reference(n_kv_head, start, T):
    """Training/prefill from scratch, a decode step, and a multi-token prefill after a filled cache."""
    g = torch.Generator().manual_seed(n_kv_head * 100 + start + T)
    q = torch.randn(2, 8, T, 16, generator=g)
    k, v = (torch.randn(2, n_kv_head, start + T, 16, generator=g) for _ in range(2))
    torch.testing.assert_close(attend(q, k, v, start), reference_attention(q, k, v, start), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_attention_matches_reference_on_both_cpu_paths(batch, threads):
    """CPU decode folds query groups when batch x K/V heads gives every thread a task and takes
    enable_gqa otherwise (MQA at batch 1); both paths are exact."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n_kv_head in (8, 2, 1):
            g = torch.Generator().manual_seed(batch * 10 + n_kv_head)
            q = torch.randn(batch, 8, 1, 16, generator=g)
            k, v = (torch.randn(batch, n_kv_head, 12, 16, generator=g) for _ in range(2))
            torch.testing.assert_close(attend(q, k, v, 11), reference_attention(q, k, v, 11), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


# --- the attention path per device: a pure decision, each path exact -------------------------------

GPUS = {"P100": (6, 0), "V100": (7, 0), "T4": (7, 5), "A100": (8, 0), "L4": (8, 9), "H100": (9, 0)}
STEPS = {"prefill": dict(T=16, start=0), "decode": dict(T=1, start=31), "chunk": dict(T=8, start=24)}
FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


def path_for(where: str, dtype: torch.dtype, step: str, group: int = 4, *, flash_built: bool = True,
             head_dim: int = 64, kv_tasks: int = 8, threads: int = 2) -> str:
    """``attention_path`` for a named GPU (or ``"cpu"``) and one of :data:`STEPS`."""
    return nblib.model.attention_path(
        device="cpu" if where == "cpu" else "cuda", capability=GPUS.get(where), flash_built=flash_built,
        dtype=dtype, head_dim=head_dim, group=group, kv_tasks=kv_tasks, threads=threads, **STEPS[step],
    )


@pytest.mark.parametrize(
    "where, dtype, step, expected",
    [
        # no flash below sm80: decode and chunks fold, training/prefill repeats K/V once
        ("T4", FP16, "prefill", "expand"), ("T4", FP16, "decode", "fold"), ("T4", FP16, "chunk", "fold"),
        ("T4", FP32, "prefill", "expand"), ("T4", FP32, "decode", "fold"),
        ("P100", FP16, "prefill", "expand"), ("P100", FP32, "decode", "fold"), ("P100", FP32, "chunk", "fold"),
        ("V100", FP16, "prefill", "expand"), ("V100", FP16, "decode", "fold"), ("V100", FP32, "prefill", "expand"),
        # sm80+: flash shares K/V in fp16/bf16, except for a masked chunk; fp32 never runs flash
        ("A100", BF16, "prefill", "gqa-flag"), ("A100", FP16, "decode", "gqa-flag"), ("A100", BF16, "chunk", "fold"),
        ("A100", FP32, "prefill", "expand"), ("A100", FP32, "decode", "fold"),
        ("L4", BF16, "prefill", "gqa-flag"), ("L4", FP16, "decode", "gqa-flag"), ("L4", FP32, "prefill", "expand"),
        ("H100", BF16, "prefill", "gqa-flag"), ("H100", BF16, "decode", "gqa-flag"), ("H100", FP16, "chunk", "fold"),
        ("H100", FP32, "decode", "fold"),
        # CPU as before: decode folds when batch x K/V heads (8) >= threads (2), the rest takes enable_gqa
        ("cpu", FP32, "prefill", "gqa-flag"), ("cpu", FP32, "decode", "fold"), ("cpu", FP32, "chunk", "gqa-flag"),
        ("cpu", BF16, "prefill", "gqa-flag"), ("cpu", BF16, "decode", "fold"),
    ],
)
def test_attention_path_per_device(where, dtype, step, expected):
    assert path_for(where, dtype, step) == expected
    assert path_for(where, dtype, step, group=1) == "sdpa", "MHA runs plain SDPA everywhere"


def test_attention_path_edges():
    assert path_for("cpu", FP32, "decode", kv_tasks=1, threads=2) == "gqa-flag"  # MQA at batch 1: too few tasks
    assert path_for("cpu", FP32, "decode", kv_tasks=4, threads=4) == "fold"
    assert path_for("H100", BF16, "prefill", flash_built=False) == "expand"  # a torch built without flash
    assert path_for("H100", BF16, "prefill", head_dim=512) == "expand"  # flash takes head_dim <= 256
    assert path_for("H100", BF16, "prefill", head_dim=256) == "gqa-flag"


@pytest.mark.parametrize("where", ["P100", "V100", "T4"])
def test_no_gqa_call_reaches_the_math_kernel_below_sm80(where):
    """Without flash an enable_gqa call runs the math kernel: no dtype or step below sm80 takes it."""
    for dtype in (FP16, BF16, FP32):
        for step in STEPS:
            for group in (2, 8):
                assert path_for(where, dtype, step, group) in ("fold", "expand")


@pytest.mark.parametrize(
    "path, n_kv_head",
    [("sdpa", 8)] + [(p, n) for p in ("gqa-flag", "fold", "expand") for n in (8, 2, 1)],
)
@pytest.mark.parametrize("start, T", [(0, 7), (0, 1), (11, 1), (9, 6)])
def test_every_path_matches_reference(path, n_kv_head, start, T):
    """Each path's maths is device-agnostic, so CPU proves it exact: prefill, one token as prefill,
    a decode step after a filled cache, a multi-token chunk after it."""
    g = torch.Generator().manual_seed(n_kv_head * 100 + start + T)
    q = torch.randn(2, T, 8, 16, generator=g).transpose(1, 2)  # the model's layout: a transposed view
    k, v = (torch.randn(2, n_kv_head, start + T, 16, generator=g) for _ in range(2))
    y = nblib.model.PATHS[path](q, k, v, start, 0.0)
    torch.testing.assert_close(y, reference_attention(q, k, v, start), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_t4_choice_trains_and_decodes_without_sharing_kv_in_sdpa(n_kv_head, monkeypatch):
    """With every choice forced to a T4's (sm75, fp16), training (dropout, backward), prefill, chunks
    and decode never call SDPA with fewer K/V heads than query heads (the case that would run the
    math kernel there), use both T4 paths, and give the reference logits."""
    chosen, calls = [], []
    choose, sdpa = nblib.model.attention_path, F.scaled_dot_product_attention

    def as_t4(**facts):
        chosen.append(choose(**{**facts, "device": "cuda", "capability": GPUS["T4"], "dtype": FP16}))
        return chosen[-1]

    def recording_sdpa(q, k, v, *args, **kwargs):
        calls.append((q.size(1), k.size(1), v.size(1), kwargs.get("enable_gqa", False)))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(nblib.model, "attention_path", as_t4)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    model = tiny(n_kv_head, dropout=0.1).train()
    idx = tokens(2, 30)
    _, loss = model(idx, targets=idx)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    ref = reference_logits(model, idx)
    with torch.no_grad():
        cache = model.new_cache(2, 30)
        parts = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 11), (11, 19), (19, 20), (20, 21), (21, 30))]
    torch.testing.assert_close(torch.cat(parts, dim=1), ref, atol=1e-5, rtol=1e-5)
    assert set(chosen) == {"expand", "fold"}
    assert calls and all(hq == hk == hv and not gqa for hq, hk, hv, gqa in calls), calls


def test_training_forward_compiles_in_one_graph():
    """attend reads no fact torch.compile cannot fold (get_num_threads is read for CPU decode only)."""
    model = tiny(2, dropout=0.1).train()
    idx = tokens(2, 16)
    _, loss = torch.compile(model, backend="eager", fullgraph=True)(idx, targets=idx)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_model_matches_reference_with_and_without_cache(n_kv_head):
    model = tiny(n_kv_head)
    idx = tokens(2, 30)
    ref = reference_logits(model, idx)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets=idx)[0], ref, atol=1e-5, rtol=1e-5)
        cache = model.new_cache(2, 30)
        # a prefill, a multi-token chunk after it (mask path), single decode steps, another chunk
        parts = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 11), (11, 19), (19, 20), (20, 21), (21, 30))]
        torch.testing.assert_close(torch.cat(parts, dim=1), ref, atol=1e-5, rtol=1e-5)
        cache.reset()
        last = [model(idx[:, a:b], cache=cache, last_only=True)[0] for a, b in ((0, 11), (11, 19), (19, 20))]
    assert [p.shape[1] for p in last] == [1, 1, 1]
    torch.testing.assert_close(torch.cat(last, dim=1), ref[:, [10, 18, 19]], atol=1e-5, rtol=1e-5)


class OpRecorder(TorchDispatchMode):
    """Every aten op run inside the block (also those a composite op such as SDPA's math kernel
    runs from C++) with the tensors it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, list[torch.Tensor]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]))
        return out

    def largest_new_tensor(self) -> int:
        """Elements of the largest tensor an op allocated (views of existing tensors excluded)."""
        return max((t.numel() for func, ts in self.calls if not func.is_view for t in ts), default=0)

    def names(self) -> set[str]:
        return {func.__name__ for func, _ in self.calls}


def recorded_decode_step(model: GPT, batch: int, cached: int) -> tuple[OpRecorder, torch.Tensor]:
    cache = model.new_cache(batch, cached + 1)
    # no_grad, not inference_mode: under inference_mode a composite op (SDPA) reaches the recorder
    # whole, and the ops its math kernel runs would stay hidden.
    with torch.no_grad():
        model(tokens(batch, cached), cache=cache)
        with OpRecorder() as rec:
            logits, _ = model(tokens(batch, 1, seed=5), cache=cache, last_only=True)
    return rec, logits


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_decode_never_expands_kv(n_kv_head, monkeypatch):
    """A decode step allocates nothing as large as K or V at n_head heads ([B, n_head, L, hd]) and builds no mask."""
    model = tiny(n_kv_head)
    c, B, L = model.config, 3, 24
    expanded = B * c.n_head * (L + 1) * c.head_dim
    assert expanded > B * c.vocab_size  # larger than the step's legitimate outputs (the logits)
    rec, logits = recorded_decode_step(model, B, L)
    assert logits.shape == (B, 1, c.vocab_size)
    assert rec.largest_new_tensor() < expanded, "a decode step copied K/V up to n_head heads"
    assert not {"tril", "triu", "ones"} & rec.names(), "a one-token decode step needs no mask"
    if n_kv_head == c.n_head:
        return
    # The check catches a copy made in Python and one made inside a C++ kernel: the old
    # repeat_interleave path, and SDPA's math kernel with enable_gqa, both fail it.
    def repeated(q, k, v, start, dropout_p=0.0):
        group = q.size(1) // k.size(1)
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))

    def math_gqa(q, k, v, start, dropout_p=0.0):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    for copying in (repeated, math_gqa):
        monkeypatch.setattr(nblib.model, "attend", copying)
        rec, _ = recorded_decode_step(model, B, L)
        assert rec.largest_new_tensor() >= expanded, copying.__name__


def test_generate_reallocates_nothing_per_token_and_computes_logits_only_where_it_samples():
    model = tiny(2)
    prompt = tokens(2, 10)
    with OpRecorder() as rec:
        out = model.generate(prompt, 12, temperature=0)
    assert out.shape == (2, 22) and torch.equal(out[:, :10], prompt)
    assert "cat" not in rec.names(), "the output is preallocated, not grown with torch.cat"
    vocab_rows = [t.shape[:-1].numel() for _, ts in rec.calls for t in ts if t.dim() and t.shape[-1] == VOCAB]
    assert max(vocab_rows) == 2, "logits at one position per sequence only (the prefill included)"
    assert not torch.is_inference_mode_enabled() and not model.training


@pytest.mark.parametrize("batch, T", [(1, 1), (8, 1), (3, 5), (70, 1)])
def test_inference_head_is_the_lm_head(batch, T):
    """``GPT.head`` (CPU inference computes a few rows as ``(W @ x.T).T``) gives the LM head's logits,
    contiguous, for one row, a batch of rows, and more rows than the CPU path takes."""
    model = tiny(2)
    x = torch.randn(batch, T, model.config.d_model, generator=torch.Generator().manual_seed(batch + T))
    with torch.no_grad():
        got = model.head(x)
    assert got.shape == (batch, T, VOCAB) and got.is_contiguous()
    torch.testing.assert_close(got, model.lm_head(x).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_training_loss_path_matches_the_plain_logits_loss(n_kv_head):
    """Training (nblib.loss, chunked, no logits) against eval mode's plain logits + F.cross_entropy, same
    seed, three optimizer steps with ignored targets: losses and gradients (by norm) within 1e-5 relative."""
    fused, plain = tiny(n_kv_head).train(), tiny(n_kv_head)
    # SGD: AdamW's first steps are about lr * sign(grad), which fp32 rounding flips on near-zero gradients
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (fused, plain)]
    for step in range(3):
        idx, targets = tokens(4, 32, seed=step), tokens(4, 32, seed=10 + step)
        targets[:, :5] = -1
        logits, loss = fused(idx, targets)
        ref_logits, ref = plain(idx, targets)
        assert logits is None and ref_logits.shape == (4, 32, VOCAB)
        assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
        loss.backward()
        ref.backward()
        for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
            assert (p.grad - q.grad).norm() <= 1e-5 * q.grad.norm(), name  # fp32 rounding only
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)


def test_lm_head_loss_in_chunks_scales_backward_and_follows_autocast():
    from nblib.loss import lm_head_loss

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 37, 16, generator=gen, requires_grad=True), torch.randn(VOCAB, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, VOCAB, (2, 37), generator=gen)
    ref = F.cross_entropy((x @ w.t()).flatten(0, 1), targets.flatten())
    gx, gw = torch.autograd.grad(3 * ref, (x, w))
    for chunk_rows in (1, 10, 74, 500):  # one row, a ragged last chunk, one exact chunk, fewer rows than a chunk
        loss = lm_head_loss(x, w, targets, chunk_rows)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.autograd.grad(3 * loss, (x, w)), (gx, gw), rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_head_loss(x, w, targets, 10)
        ref16 = F.cross_entropy((x @ w.t()).float().flatten(0, 1), targets.flatten())
    got, want = torch.autograd.grad(loss, (x, w)), torch.autograd.grad(ref16, (x, w))
    assert loss.dtype == torch.float32 and got[0].dtype == got[1].dtype == torch.float32
    torch.testing.assert_close(loss, ref16, rtol=1e-3, atol=0)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)

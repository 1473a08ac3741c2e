"""nblib.convert.convert_kv_heads: MHA -> GQA/MQA checkpoint conversion (Ainslie et al. 2023)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from nblib.convert import convert_kv_heads, kv_head_weights
from nblib.model import GPT, GPTConfig, load_checkpoint, save_checkpoint

VOCAB = 97


def tiny(n_head: int = 4, n_kv_head: int | None = None, d_model: int = 32, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, context_length=16, n_layer=2, n_head=n_head, n_kv_head=n_kv_head or n_head, d_model=d_model)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def heads(model: GPT, layer: int, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` heads of one layer's fused ``c_attn``: ``[heads, head_dim, d_model]`` (or ``[heads, head_dim]``)."""
    c = model.config
    w = getattr(model.transformer.h[layer].attn.c_attn, name).detach()
    return w.view(-1, c.head_dim, *w.shape[1:]).split([c.n_head, c.n_kv_head, c.n_kv_head])


def logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits at every position (``targets`` asks the model for all of them)."""
    with torch.no_grad():
        return model(idx, targets=idx)[0]


def cached_logits(model: GPT, idx: torch.Tensor, prefill: int = 5) -> torch.Tensor:
    """Logits of a prefill through the KV cache, then of one token per step, as ``generate`` feeds them."""
    cache = model.new_cache(idx.shape[0], idx.shape[1])
    with torch.no_grad():
        out = [model(idx[:, :prefill], cache=cache)[0]]
        out += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(prefill, idx.shape[1])]
    return torch.cat(out, dim=1)


def sharp(n_head: int) -> GPT:
    """A random MHA model whose attention is far from uniform, as a trained one's: at init (std 0.02) the
    scores are so small that every head attends almost uniformly and K hardly matters."""
    model = tiny(n_head, d_model=64)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(10)
            block.attn.c_attn.bias.normal_(std=0.1)
    return model


def grouped_model(n_head: int, n_kv_head: int) -> GPT:
    """A :func:`sharp` MHA model whose K and V heads (weights and biases) are equal within each group of ``n_head / n_kv_head``."""
    model = sharp(n_head)
    group = n_head // n_kv_head
    with torch.no_grad():
        for layer in range(model.config.n_layer):
            for name in ("weight", "bias"):
                _, k, v = heads(model, layer, name)  # views: writing them writes c_attn
                for kv in (k, v):
                    for g in range(n_kv_head):
                        kv[g * group : (g + 1) * group] = kv[g * group].clone()
    return model


def assert_all_but_kv_equal(src: GPT, new: GPT) -> None:
    """Every tensor bit-equal except the K/V rows of ``c_attn``, whose query rows must be bit-equal."""
    a, b = src.state_dict(), new.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if ".attn.c_attn." in key:
            n_q = src.config.n_head * src.config.head_dim
            assert torch.equal(a[key][:n_q], b[key][:n_q]), key
        else:
            assert torch.equal(a[key], b[key]), key
        assert b[key].dtype == a[key].dtype and b[key].device == a[key].device, key


@pytest.mark.parametrize("method", ["mean", "first"])
@pytest.mark.parametrize("kw", [dict(), dict(bias=False, tie_embeddings=False)])
def test_same_head_count_is_the_identity(method, kw):
    src = tiny(**kw)
    new = convert_kv_heads(src, src.config.n_kv_head, method)
    assert new.config == src.config and new is not src
    a, b = src.state_dict(), new.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    idx = tokens(2, 12)
    assert torch.equal(logits(new, idx), logits(src, idx))
    with torch.no_grad():  # a copy, not a view: changing it leaves the source as it was
        new.transformer.h[0].attn.c_attn.weight.zero_()
    assert torch.equal(src.state_dict()["transformer.h.0.attn.c_attn.weight"], a["transformer.h.0.attn.c_attn.weight"])
    assert src.transformer.h[0].attn.c_attn.weight.abs().sum() > 0


@pytest.mark.parametrize("method", ["mean", "first"])
@pytest.mark.parametrize("n_head, n_kv_head", [(4, 2), (8, 2), (8, 1)])
def test_heads_equal_within_groups_convert_to_the_same_function(method, n_head, n_kv_head):
    src = grouped_model(n_head, n_kv_head)
    new = convert_kv_heads(src, n_kv_head, method)
    assert new.config.n_kv_head == n_kv_head and new.config.variant in ("gqa", "mqa")
    idx = tokens(3, 16)
    ref = logits(src, idx)
    torch.testing.assert_close(logits(new, idx), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(cached_logits(new, idx), cached_logits(src, idx), rtol=0, atol=1e-5)
    torch.testing.assert_close(cached_logits(new, idx), ref, rtol=0, atol=1e-5)
    # The check can fail: converting a model whose heads differ within a group changes its logits.
    plain = sharp(n_head)
    assert not torch.allclose(logits(convert_kv_heads(plain, n_kv_head, method), idx), logits(plain, idx), atol=1e-2)


@pytest.mark.parametrize("method", ["mean", "first", "random"])
@pytest.mark.parametrize("kw", [dict(), dict(bias=False, tie_embeddings=False)])
def test_everything_but_kv_is_copied_bit_equal(method, kw):
    src = tiny(n_head=8, d_model=64, **kw)
    new = convert_kv_heads(src, 2, method, seed=3)
    assert_all_but_kv_equal(src, new)
    assert new.config == dataclasses.replace(src.config, n_kv_head=2)
    c_attn = new.transformer.h[0].attn.c_attn
    assert c_attn.weight.shape == ((8 + 2 * 2) * 8, 64) and new.transformer.h[0].attn.n_kv_head == 2
    assert (new.lm_head.weight is new.transformer.wte.weight) == src.config.tie_embeddings


def test_dtype_and_mode_are_kept():
    src = tiny().to(torch.bfloat16).train()
    new = convert_kv_heads(src, 2)
    assert new.training
    assert_all_but_kv_equal(src, new)
    assert {p.dtype for p in new.parameters()} == {torch.bfloat16}
    _, k, _ = heads(src, 1)
    torch.testing.assert_close(heads(new, 1)[1][0], k[:2].float().mean(0).to(torch.bfloat16), rtol=0, atol=0)


def test_mean_is_the_group_mean_and_first_the_first_head():
    src = tiny(n_head=8, d_model=64)
    with torch.no_grad():  # the biases start at zero: give them something to average
        src.transformer.h[1].attn.c_attn.bias.normal_()
    mean, first = convert_kv_heads(src, 2, "mean"), convert_kv_heads(src, 2, "first")
    for name in ("weight", "bias"):
        _, k, v = heads(src, 1, name)
        _, mk, mv = heads(mean, 1, name)
        _, fk, fv = heads(first, 1, name)
        # group 1 of 2 holds source heads 4..7
        torch.testing.assert_close(mk[1], (k[4] + k[5] + k[6] + k[7]) / 4, rtol=0, atol=1e-7)
        torch.testing.assert_close(mv[1], (v[4] + v[5] + v[6] + v[7]) / 4, rtol=0, atol=1e-7)
        assert torch.equal(fk[1], k[4]) and torch.equal(fv[1], v[4])
        assert torch.equal(fk[0], k[0]) and torch.equal(fv[0], v[0])
        assert not torch.allclose(mk[1], fk[1])


def test_random_is_fresh_init_and_deterministic_for_a_seed():
    src = tiny(n_head=8, d_model=64)
    mean, first = convert_kv_heads(src, 2, "mean"), convert_kv_heads(src, 2, "first")
    rng = torch.get_rng_state()
    r1 = convert_kv_heads(src, 2, "random", seed=7)
    assert torch.equal(torch.get_rng_state(), rng)  # a seeded draw leaves the global RNG alone
    r2, r3 = convert_kv_heads(src, 2, "random", seed=7), convert_kv_heads(src, 2, "random", seed=8)
    key = "transformer.h.1.attn.c_attn.weight"
    assert torch.equal(r1.state_dict()[key], r2.state_dict()[key])
    assert not torch.equal(r1.state_dict()[key], r3.state_dict()[key])
    for layer in range(2):
        _, k, v = heads(r1, layer)
        kv = torch.cat([k, v])
        assert not torch.allclose(kv, torch.cat(heads(mean, layer)[1:]), atol=1e-3)
        assert not torch.allclose(kv, torch.cat(heads(first, layer)[1:]), atol=1e-3)
        # GPT._init_weights draws c_attn from N(0, 0.02); 2048 values per layer: std within 10%, mean near 0
        assert math.isclose(kv.std().item(), 0.02, rel_tol=0.1) and abs(kv.mean().item()) < 0.002
        assert not heads(r1, layer, "bias")[1].any() and not heads(r1, layer, "bias")[2].any()
    assert not torch.equal(heads(r1, 0)[1], heads(r1, 1)[1])  # each layer gets its own draw


def test_mean_chain_equals_direct_conversion():
    src = tiny(n_head=8, d_model=64)
    with torch.no_grad():
        for block in src.transformer.h:
            block.attn.c_attn.bias.normal_()
    chain = convert_kv_heads(convert_kv_heads(src, 2), 1)
    direct = convert_kv_heads(src, 1)
    assert chain.config == direct.config and direct.config.variant == "mqa"
    a, b = chain.state_dict(), direct.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(chain, tokens(2, 16)), logits(direct, tokens(2, 16)), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "model, n_kv_head, method, message",
    [
        ("gpt", 0, "mean", r"positive integer, got 0; accepted: \[1, 2, 4\]"),
        ("gpt", 2.0, "mean", "positive integer, got 2.0"),
        ("gpt", True, "mean", "positive integer, got True"),
        ("gpt", 3, "mean", r"n_kv_head=3 must divide the source's n_kv_head=4 .*accepted: \[1, 2, 4\]"),
        ("gpt", 8, "mean", "n_kv_head=8 must divide the source's n_kv_head=4 .*never split"),
        ("gqa", 4, "mean", r"n_kv_head=4 must divide the source's n_kv_head=2 .*accepted: \[1, 2\]"),
        ("gpt", 2, "median", "unknown method 'median'; accepted: mean, first, random"),
        ("module", 2, "mean", "needs an nblib.model.GPT, got Linear"),
    ],
)
def test_bad_arguments_are_refused(model, n_kv_head, method, message):
    m = {"gpt": tiny(), "gqa": tiny(n_kv_head=2), "module": torch.nn.Linear(2, 2)}[model]
    with pytest.raises(ValueError, match=message):
        convert_kv_heads(m, n_kv_head, method)


@pytest.mark.parametrize("method", ["mean", "random"])
def test_converted_model_trains_and_round_trips_a_checkpoint(method, tmp_path: Path):
    new = convert_kv_heads(tiny(n_head=8, d_model=64), 2, method, seed=1).train()
    opt = torch.optim.AdamW(new.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in new.state_dict().items()}
    idx = tokens(4, 16, seed=2)
    _, loss = new(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and new.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    opt.step()
    after = new.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"])

    new.eval()
    save_checkpoint(tmp_path / "gqa.pt", new, step=1)
    loaded, ckpt = load_checkpoint(tmp_path / "gqa.pt")
    assert loaded.config == new.config and loaded.config.n_kv_head == 2 and ckpt["step"] == 1
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in new.state_dict().items())
    idx = tokens(2, 12, seed=3)
    assert torch.equal(logits(loaded.eval(), idx), logits(new, idx))


def test_a_widened_mlp_is_kept_and_kv_head_weights_are_the_pooled_heads():
    src = tiny(n_head=8, d_model=64, d_mlp=300)
    new = convert_kv_heads(src, 2)
    assert new.config.d_mlp == 300 and new.transformer.h[0].mlp.c_fc.out_features == 300
    for part, index in (("k", 1), ("v", 2)):
        before, after = kv_head_weights(src, part), kv_head_weights(new, part)
        assert len(before) == len(after) == 2 and before[0].shape == (8, 8 * 64) and after[1].shape == (2, 8 * 64)
        assert torch.equal(after[1], heads(new, 1)[index].flatten(1))  # the rows c_attn really uses
        torch.testing.assert_close(after[1], before[1].view(2, 4, -1).mean(1))  # each group's mean
    with pytest.raises(ValueError, match="part must be 'k' or 'v'"):
        kv_head_weights(src, "q")


def test_kv_head_similarity_draws_a_row_per_layer():
    from nblib import plots

    src = tiny(n_head=8, d_model=64)
    pooled = {"mean-pooled": kv_head_weights(convert_kv_heads(src, 2)), "first": kv_head_weights(convert_kv_heads(src, 2, "first"))}
    fig = plots.kv_head_similarity(kv_head_weights(src), pooled)
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert [im.shape for im in images] == [(8, 8), (8, 2), (8, 2)] * 2  # 2 layers x (source, 2 pooled models)
    assert all(abs(float(im[0, 0]) - 1) < 1e-6 for im in images[::3])  # a head is itself
    assert float(images[2][0, 0]) == pytest.approx(1.0)  # "first" keeps head 0 as pooled head 0

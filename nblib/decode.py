"""The one-token decode step over a static KV cache, eager or compiled (gpt-fast's first step).

Eager decoding runs ``GPT.forward`` per token: it slices the filled part of the cache, so every
step has new shapes, and each of its ~15 small ops per layer pays Python and dispatch overhead.
:func:`static_step` computes the same token with fixed shapes instead: it writes the new K/V at
``pos`` (a tensor, so its value is data, not a constant baked into a graph) and attends over the
whole preallocated cache with a mask hiding the positions not yet filled. ``torch.compile`` then
builds one graph per cache shape (batch, length) and never recompiles per token; on CUDA it
replays that graph with CUDA graphs ("reduce-overhead"), removing the launch overhead too.

:class:`DecodeStep` is what the generation loops use: the prefill stays eager (one call per
prompt), each further token goes through the compiled step where it pays, else the eager one.
"""
from __future__ import annotations

import shutil
import sys
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # nblib.model imports this module
    from nblib.model import GPT, KVCache

# The default per device, from `benchmarks/bench_inference.py --compile-cost --cost-batches 1,8 --repeats 5`
# (MHA 8x8x512, fp32, cache 512, 2-core EPYC, load average 1.4-1.5, torch 2.13): compiling takes 26 s cold
# (empty inductor cache) and 1.0 s warm at batch 1, 17.5 s / 1.8 s at batch 8. Per token, compiled vs eager:
# batch 1 27.5 vs 26.3 ms (no gain), batch 8 40.3 vs 45.2 ms, so it pays for itself after ~3,600 generated
# tokens cold (~360 warm): longer than the pipeline's generations. Section 4 of the same script
# measured 1.08-1.28x at 1x512 and 8x2048 (load ~1.7), MBU 0.26-0.29 -> 0.27-0.37: still far from the
# bandwidth limit. Under load (average 6-7) the compiled step measured 1.4-2.5x *slower*. So a CPU decodes
# eagerly unless asked (compile=True). CUDA graphs remove the per-op launch overhead that dominates a
# small model's decode step on a GPU (gpt-fast: Llama-2-7B, A100, ~25 -> ~107 tokens/s), but each cache
# shape compiles once (the compare stage alone has a shape per variant and batch) and nothing here has
# measured it on a GPU yet, so CUDA too decodes eagerly unless asked; benchmarks/gpu_evidence.py times both.


def static_step(model: GPT, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, vocab]`` after token ``token`` (``[B, 1]``) at position ``pos`` (``[1]``, long).

    ``k_cache``/``v_cache`` are a :class:`KVCache`'s layers, ``[B, n_kv_head, max_len, hd]`` each (separate
    inputs, so inductor writes each in place: one 5-D input mutated per layer got copied whole every step);
    this step writes position ``pos`` and reads all ``max_len`` positions, the unfilled ones masked.
    Query heads are folded into groups over their shared K/V head (``[B, n_kv_head, group, hd]``),
    so GQA/MQA read each K/V head once. The blocks are ``GPT.forward``'s, in eval mode.
    """
    t = model.transformer
    B = token.size(0)
    visible = (torch.arange(k_cache[0].size(2), device=pos.device) <= pos)[None]  # [1, max_len]: filled positions
    x = t.wte(token) + t.wpe(pos)  # [B, 1, C]
    for layer, block in enumerate(t.h):
        a = block.attn
        q, k, v = a.c_attn(block.ln_1(x)).split(
            [a.n_head * a.head_dim, a.n_kv_head * a.head_dim, a.n_kv_head * a.head_dim], dim=2
        )
        k_all, v_all = k_cache[layer], v_cache[layer]
        k_all[:, :, pos] = k.view(B, a.n_kv_head, 1, a.head_dim)
        v_all[:, :, pos] = v.view(B, a.n_kv_head, 1, a.head_dim)
        q = q.view(B, a.n_kv_head, a.n_head // a.n_kv_head, a.head_dim)  # query head h -> group h // group
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=visible)
        x = x + a.c_proj(y.reshape(B, 1, -1))
        x = x + block.mlp(block.ln_2(x))
    return model.head(t.ln_f(x))[:, -1]


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run here, or ``None`` when it can."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile is not supported on Python {sys.version_info.major}.{sys.version_info.minor} with torch {torch.__version__}"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++, c++ or clang++) on PATH for torch.compile's CPU code; install one (apt install g++)"
    return None


def use_compile(device: torch.device) -> tuple[bool, str]:
    """Whether to compile the decode step by default on ``device``, and why (see the figures above)."""
    why_not = compile_unavailable(device)
    if why_not is not None:
        return False, why_not
    if device.type == "cuda":
        return False, ("CUDA: eager until measured on a GPU (benchmarks/gpu_evidence.py times both); each cache shape "
                       "costs one compile, more than the pipeline's short generations can repay")
    return False, f"{device.type}: compiling the step pays for itself only after ~3,600 tokens on a CPU (nblib/decode.py)"


_compiled = None


def _compiled_step():
    """``static_step`` under ``torch.compile``, made once (dynamo caches one graph per model shape and cache shape)."""
    global _compiled
    if _compiled is None:
        # One graph per variant x batch x cache length: a benchmark sweep needs dozens, beyond dynamo's default of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled = {
            mode: torch.compile(static_step, mode=mode, dynamic=False, fullgraph=True)
            for mode in ("default", "reduce-overhead")
        }
    return _compiled


def log(message: str) -> None:
    print(f"nblib.decode: {message}", file=sys.stderr, flush=True)


class DecodeStep:
    """``step(token) -> logits [B, vocab]``: one token appended to ``cache`` at ``cache.length``.

    ``compile``: ``True``/``False``, or ``None`` for the device's default (:func:`use_compile`). When
    compiling fails (no compiler, an unsupported op), the step says why in one line on stderr and
    decodes eagerly from then on.
    """

    def __init__(self, model: GPT, cache: KVCache, compile: bool | None = None):
        self.model, self.cache = model, cache
        device = cache.k.device
        if compile is None:
            compile, _ = use_compile(device)
        elif compile and (why_not := compile_unavailable(device)) is not None:
            log(f"decoding eagerly: {why_not}")
            compile = False
        self.compiled = compile
        self.cuda_graphs = compile and device.type == "cuda"
        # The step's inputs live in buffers of fixed shape, strides and address: a token that is a view
        # (a prompt's last column) would otherwise make a second graph, and CUDA graphs replay addresses.
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.token = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        self.layers_k, self.layers_v = list(cache.k.unbind(0)), list(cache.v.unbind(0))
        if compile:
            for t in (*self.layers_k, *self.layers_v):  # the same addresses every call: CUDA graphs may write them in place
                torch._dynamo.mark_static_address(t)

    @classmethod
    def new(cls, model: GPT, batch: int, max_len: int, compile: bool | None = None) -> DecodeStep:
        """A step over a fresh cache for ``max_len`` positions. Compiled, the cache is rounded up to a power
        of two (at most the context): each cache shape compiles once, so prompts of other lengths reuse it."""
        device = model.lm_head.weight.device
        if compile is None:
            compile, _ = use_compile(device)
        if compile:
            max_len = min(model.config.context_length, 1 << (max_len - 1).bit_length())
        return cls(model, model.new_cache(batch, max_len), compile)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache is full ({cache.max_len} positions); make a larger cache with model.new_cache")
        if not self.compiled:
            logits, _ = self.model(token, cache=cache, last_only=True)
            return logits[:, -1]
        self.pos.fill_(cache.length)
        self.token.copy_(token)
        step = _compiled_step()["reduce-overhead" if self.cuda_graphs else "default"]
        try:
            logits = step(self.model, self.layers_k, self.layers_v, self.token, self.pos)
        except Exception as e:  # compile errors surface on the first call, before the cache is written
            log(f"torch.compile failed, decoding eagerly ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})")
            self.compiled = False
            return self(token)
        cache.length += 1
        # A CUDA graph overwrites its output on the next replay: hand out a copy.
        return logits.clone() if self.cuda_graphs else logits

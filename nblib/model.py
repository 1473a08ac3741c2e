"""GPT-2 from scratch with multi-head, grouped-query and multi-query attention (nanoGPT style).

One attention class covers all three: queries use ``n_head`` heads, keys and values
``n_kv_head`` heads, each K/V head shared by ``n_head // n_kv_head`` query heads
(MHA: ``n_kv_head == n_head``; GQA: ``1 < n_kv_head < n_head``; MQA: ``n_kv_head == 1``).
K/V are projected, cached and attended to at ``n_kv_head`` heads, copied up to ``n_head`` only for
CUDA training/prefill where SDPA has no flash kernel (see ``attention_path``), so a GQA cache
is ``n_kv_head / n_head`` of an MHA cache and a decode step reads that much less.

Module names follow Hugging Face's ``GPT2LMHeadModel`` so an MHA model exports to it by
transposing the four linear weights (HF's ``Conv1D`` stores them as ``[in, out]``).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from nblib import config
from nblib.decode import DecodeStep
from nblib.files import atomic_write_bytes, replace_dir
from nblib.loss import lm_head_loss
from nblib.weights import read_checkpoint
from nblib.sampling import sample_next

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class GPTConfig:
    """Model sizes. ``vocab_size`` defaults to GPT-2's 50257 (the ids in our token files)."""

    vocab_size: int = 50257
    context_length: int = 256
    n_layer: int = 8
    n_head: int = 8
    n_kv_head: int = 8
    d_model: int = 512
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    d_mlp: int | None = None  # MLP hidden width; None: GPT-2's 4 * d_model (see matched_d_mlp)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_kv_head", "d_model", "d_mlp"):
            value = getattr(self, name)
            if name == "d_mlp" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"GPTConfig: d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                f"each head gets d_model / n_head dimensions, so pick n_head among the divisors of {self.d_model}"
            )
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(
                f"GPTConfig: n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (each K/V head is "
                f"shared by n_head / n_kv_head query heads); use n_kv_head={self.n_head} for MHA, "
                "a proper divisor for GQA, or 1 for MQA"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def mlp_width(self) -> int:
        return 4 * self.d_model if self.d_mlp is None else self.d_mlp

    @property
    def variant(self) -> str:
        """``mha``, ``gqa`` or ``mqa``."""
        if self.n_kv_head == self.n_head:
            return "mha"
        return "mqa" if self.n_kv_head == 1 else "gqa"

    def kv_cache_bytes(self, batch: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of K and V for ``batch`` sequences of ``seq_len`` tokens over all layers."""
        return 2 * self.n_layer * batch * self.n_kv_head * seq_len * self.head_dim * dtype.itemsize


def matched_d_mlp(config: GPTConfig, n_kv_head: int) -> int:
    """The MLP width that gives ``config`` with ``n_kv_head`` K/V heads as many parameters as ``config``.

    The Llama 2 paper's GQA ablation widens the MLP to make up for the smaller K/V projections. Per
    layer ``c_attn`` loses ``2 (n_kv - n_kv_head) head_dim`` rows of ``d_model`` weights (+ a bias), and
    each MLP unit adds ``2 d_model`` weights (+ a bias): rounding leaves under one unit per layer unmatched.
    """
    GPTConfig(**{**asdict(config), "n_kv_head": n_kv_head})  # refuse heads that do not divide n_head
    b = int(config.bias)
    removed = 2 * (config.n_kv_head - n_kv_head) * config.head_dim * (config.d_model + b)
    return config.mlp_width + round(removed / (2 * config.d_model + b))


class KVCache:
    """Keys and values of every layer at ``n_kv_head`` heads: ``[n_layer, batch, n_kv_head, max_len, head_dim]``.

    ``length`` positions are filled; the model appends new positions and advances ``length``.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        if not 1 <= max_len <= config.context_length:
            raise ValueError(
                f"KV cache max_len={max_len} must be in [1, context_length={config.context_length}] "
                "(positions beyond the context have no position embedding)"
            )
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` (``[batch, n_kv_head, t, head_dim]``) after the filled positions; return all keys/values so far."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.length = 0


# Where SDPA shares K/V heads in place (enable_gqa) and where it does not. torch's docstring:
# "GQA ... currently works only for Flash_attention and math kernel on CUDA tensor", and the
# math kernel repeats K/V to n_head heads inside and materialises the [T, L] score matrix.
# torch's sdp_utils.cpp (can_use_flash_attention) runs flash only on sm80..sm121, for fp16/bf16,
# head_dim <= 256, without an attn_mask, and with is_causal only for square (T == L) attention.
# (pytorch PR #191085 adds GQA to the memory-efficient kernel; torch 2.13 still documents the limit.)
FLASH_CAPABILITY = ((8, 0), (12, 1))
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256


def attention_path(
    *,
    device: str,
    capability: tuple[int, int] | None,
    flash_built: bool,
    dtype: torch.dtype,
    head_dim: int,
    group: int,
    T: int,
    start: int,
    kv_tasks: int,
    threads: int,
) -> str:
    """Which of :data:`PATHS` runs one attention call; pure, every fact is an argument.

    ``device``: ``q.device.type``; ``capability``: the CUDA compute capability (``None`` off CUDA);
    ``flash_built``: torch was built with flash attention; ``group``: query heads per K/V head;
    ``T`` new queries after ``start`` cached positions; ``kv_tasks``: batch x K/V heads.
    Dropout changes nothing: flash and the memory-efficient kernel both support it, and on the CPU
    training with dropout runs the math kernel whichever path is taken.
    """
    if group == 1:
        return "sdpa"  # MHA: every kernel takes it as it is
    masked = start > 0 and T > 1  # a chunk after a filled cache needs an explicit mask
    if device == "cuda":
        lo, hi = FLASH_CAPABILITY
        flash = (
            flash_built and capability is not None and lo <= capability <= hi
            and dtype in FLASH_DTYPES and head_dim <= FLASH_MAX_HEAD_DIM and not masked
        )
        if flash:
            return "gqa-flag"
        # No flash (T4, V100, P100, fp32, or a masked chunk): an enable_gqa call would run the math
        # kernel. Folding needs no K/V copy and no mask at T == 1; a chunk's folded mask is group x T
        # rows of L, far smaller than K/V at n_head heads. Training/prefill would need an O(T^2)
        # folded mask instead of is_causal, so it repeats K/V once (O(T), the size of q) and the
        # memory-efficient kernel runs (it supports dropout).
        return "fold" if T == 1 or masked else "expand"
    if device == "cpu" and T == 1 and kv_tasks >= threads:
        # CPU decode: folding lets one kernel task read its K/V head once for the whole group;
        # enable_gqa runs one task per query head. Whole decode steps, 8x8x512, batch 8, 2k context,
        # 1 thread of a 2-core EPYC: 2.3x (GQA 2/8) and 5.0x (MQA) faster than repeat_interleave,
        # enable_gqa 2.1x and 3.9x. Folding leaves B * n_kv_head kernel tasks: fewer than the threads
        # (MQA at batch 1 on 2 threads) measured 4-6x slower than enable_gqa, so those take enable_gqa.
        return "fold"
    # SDPA's CPU flash kernel shares K/V heads in place with enable_gqa. It has no dropout: CPU
    # training with dropout runs the math kernel, which repeats K/V inside.
    return "gqa-flag"


def _causal_mask(T: int, start: int, device: torch.device) -> torch.Tensor | None:
    """``None`` where SDPA needs no mask (one query, or ``is_causal`` from scratch); else query ``i``
    (at position ``start + i``) sees keys ``0..start + i``."""
    if T == 1 or start == 0:
        return None
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, dropout_p: float, gqa: bool = False) -> torch.Tensor:
    T = q.size(2)
    mask = _causal_mask(T, start, q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=start == 0 and T > 1, enable_gqa=gqa
    )


def _gqa_flag(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, dropout_p: float) -> torch.Tensor:
    return _sdpa(q, k, v, start, dropout_p, gqa=True)


def _fold(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, dropout_p: float) -> torch.Tensor:
    """Each group's query heads folded into the query axis, ``[B, n_kv_head, group * T, hd]``: a plain
    attention call over the K/V heads as they are; row ``g * T + i`` is query ``i`` of the group's head ``g``."""
    B, n_head, T, hd = q.shape
    n_kv_head = k.size(1)
    mask = None  # one query sees every key
    if T > 1:  # each group's rows repeat the causal mask; folded rows are not square, so no is_causal
        mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start).repeat(n_head // n_kv_head, 1)
    y = F.scaled_dot_product_attention(q.reshape(B, n_kv_head, -1, hd), k, v, attn_mask=mask, dropout_p=dropout_p)
    return y.view(B, n_head, T, hd)


def _expand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, dropout_p: float) -> torch.Tensor:
    """K/V repeated once to ``n_head`` heads, then plain SDPA (the memory-efficient kernel on CUDA)."""
    group = q.size(1) // k.size(1)
    return _sdpa(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), start, dropout_p)


PATHS = {"sdpa": _sdpa, "gqa-flag": _gqa_flag, "fold": _fold, "expand": _expand}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of queries at positions ``start..start+T-1`` over keys ``0..start+T-1``.

    ``q`` is ``[B, n_head, T, hd]``; ``k``/``v`` are ``[B, n_kv_head, start+T, hd]``, and query head
    ``h`` reads K/V head ``h // (n_head // n_kv_head)``. :func:`attention_path` picks how, from the
    device's facts; only CUDA training/prefill without flash copies K/V up to ``n_head`` heads in Python.
    """
    B, n_head, T, hd = q.shape
    device = q.device.type
    capability, flash_built = None, False
    if device == "cuda":  # torch caches the properties per device; torch.compile folds both to constants
        props = torch.cuda.get_device_properties(q.device)
        capability, flash_built = (props.major, props.minor), torch.backends.cuda.is_flash_attention_available()
    # Threads decide only CPU decode; read only there, as torch.compile breaks the graph on get_num_threads.
    threads = torch.get_num_threads() if device == "cpu" and T == 1 else 1
    path = attention_path(
        device=device, capability=capability, flash_built=flash_built, dtype=q.dtype, head_dim=hd,
        group=n_head // k.size(1), T=T, start=start, kv_tasks=B * k.size(1), threads=threads,
    )
    return PATHS[path](q, k, v, start, dropout_p)


class CausalSelfAttention(nn.Module):
    """Self-attention with ``n_head`` query heads and ``n_kv_head`` key/value heads."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_attn = nn.Linear(config.d_model, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=2
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, n_head, T, hd]
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, n_kv_head, T, hd]
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)
        y = attend(q, k, v, start, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.mlp_width, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU ("gelu_new" in HF)
        self.c_proj = nn.Linear(config.mlp_width, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: token + learned position embeddings, ``n_layer`` blocks, final LayerNorm, LM head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                wpe=nn.Embedding(config.context_length, config.d_model),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.d_model, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) (two per block add to the stream).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None, last_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits, loss)`` for token ids ``idx`` (``[B, T]``).

        - ``targets`` given: logits at every position and the mean cross-entropy (``-1`` targets are ignored);
          training with gradients (eager) returns ``(None, loss)``: the loss comes from ``nblib.loss`` in chunks;
        - no targets, no cache: logits of the last position only, ``[B, 1, vocab]``;
        - ``cache``: the new positions are appended to it; logits cover all of them, ``[B, T, vocab]``,
          or with ``last_only`` just the last one (what sampling needs: the LM head is the largest matmul).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if cache is not None and (start + T > cache.max_len or B != cache.batch_size):
            raise ValueError(
                f"KV cache holds {cache.length}/{cache.max_len} positions for batch {cache.batch_size}; "
                f"cannot append {T} positions for batch {B} (make a larger cache with model.new_cache)"
            )
        if start + T > self.config.context_length:
            raise ValueError(
                f"sequence of {start + T} positions exceeds context_length={self.config.context_length}; "
                "crop the input to the last context_length tokens"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.length += T
        if targets is not None:
            if self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
                # training: no [B*T, vocab] logits at all, see nblib.loss (torch.compile fuses its own)
                return None, lm_head_loss(x, self.lm_head.weight, targets)
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        if cache is None or last_only:
            return self.head(x[:, [-1], :]), None
        return self.head(x), None

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head, ``x @ W.T``, for inference. On a CPU, a few rows (decoding a batch) are computed
        as ``(W @ x.T).T``: the same product, which CPU BLAS runs 2.3x faster for GPT-2's 50k-row W
        (8 x 512 rows: 18 ms -> 8 ms, 32 rows: 29 -> 18 ms; one row: equal; 2-core EPYC, fp32)."""
        rows = x.shape[:-1].numel()
        if x.device.type != "cpu" or torch.is_grad_enabled() or not 1 < rows <= 64:
            return self.lm_head(x)
        w = self.lm_head.weight
        return (w @ x.reshape(rows, -1).t()).t().contiguous().view(*x.shape[:-1], w.size(0))

    def new_cache(
        self, batch_size: int, max_len: int | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty KV cache (default: the full context, on the model's device and dtype)."""
        ref = self.lm_head.weight
        return KVCache(
            self.config,
            batch_size,
            max_len or self.config.context_length,
            torch.device(device) if device is not None else ref.device,
            dtype or ref.dtype,
        )

    def kv_cache_bytes(self, batch: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes a KV cache for ``batch`` x ``seq_len`` tokens takes (``2 * n_layer * n_kv_head * head_dim`` values per token)."""
        return self.config.kv_cache_bytes(batch, seq_len, dtype)

    def num_params(self, part: str = "total") -> int:
        """Parameter count: ``total`` (tied weights once), ``embedding`` (wte, wpe, untied lm_head) or ``blocks``.

        ``total`` = ``embedding`` + ``blocks`` + the final LayerNorm.
        """
        t = self.transformer
        if part == "total":
            return sum(p.numel() for p in self.parameters())
        if part == "embedding":
            untied = 0 if self.config.tie_embeddings else self.lm_head.weight.numel()
            return t.wte.weight.numel() + t.wpe.weight.numel() + untied
        if part == "blocks":
            return sum(p.numel() for p in t.h.parameters())
        raise ValueError(f"num_params part must be 'total', 'embedding' or 'blocks', got {part!r}")

    def flops_per_token(self) -> int:
        """Training FLOPs per token, PaLM appendix B as in nanoGPT: ``6 N + 12 L H Q T``.

        ``N`` counts the matmul weights (all but the position table and, when untied, the
        input lookup table); the second term is attention's scores and weighted sum.
        """
        c = self.config
        n = self.num_params() - self.transformer.wpe.weight.numel()
        if not c.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * c.context_length

    @torch.inference_mode()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        compile: bool | None = None,
    ) -> torch.Tensor:
        """``idx`` (``[B, T]``) followed by ``max_new_tokens`` new tokens; ``temperature=0`` is greedy.

        With ``use_cache`` each step feeds one token through a KV cache (``nblib.decode.DecodeStep``;
        ``compile``: compile that step, ``None``: the device's default, ``decode.use_compile``); without it every step
        recomputes the last ``context_length`` tokens. Both give the same tokens while the
        sequence fits the context. Past it, recomputation slides the window by one token per step,
        whereas the cache (positions are absolute) restarts from the last half window.
        """
        was_training = self.training
        self.eval()
        B, T = idx.shape
        L = self.config.context_length
        out = idx.new_empty(B, T + max_new_tokens)  # filled in place: no per-token reallocation
        out[:, :T] = idx
        step = DecodeStep.new(self, B, min(L, T + max_new_tokens), compile) if use_cache else None
        cache = step.cache if use_cache else None
        logits, _ = self(idx[:, -L:], cache=cache, last_only=True)
        for n in range(T, T + max_new_tokens):  # n: the position being sampled
            out[:, n : n + 1] = sample_next(logits[:, -1, :], temperature=temperature, top_k=top_k, generator=generator)
            if n == T + max_new_tokens - 1:
                break
            if cache is None:
                logits, _ = self(out[:, max(0, n + 1 - L) : n + 1])
            elif cache.length < cache.max_len:
                logits = step(out[:, n : n + 1])[:, None]
            else:
                cache.reset()
                logits, _ = self(out[:, n + 1 - L // 2 : n + 1], cache=cache, last_only=True)
        self.train(was_training)
        return out


def save_checkpoint(path: str | os.PathLike, model: GPT, **state: Any) -> Path:
    """Atomically save the model's config and weights plus any extra ``state`` (optimizer, step, ...).

    ``state`` values must be plain Python/tensor data (loading uses ``weights_only=True``).
    """
    ckpt = {"format": CHECKPOINT_FORMAT, "model_config": asdict(model.config), "model": model.state_dict(), **state}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[GPT, dict[str, Any]]:
    """Rebuild the model saved at ``path`` (MHA, GQA or MQA) on ``device``; returns ``(model, checkpoint)``.
    A damaged file or one of another format is :class:`config.Refused`, naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with nblib.train.run (notebooks 03/04)")
    ckpt = read_checkpoint(path, device)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model_config" not in ckpt:
        raise config.Refused(f"{config.relative(path)} is not an nblib GPT checkpoint (format {CHECKPOINT_FORMAT})")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


def export_hf(model: GPT, out_dir: str | os.PathLike) -> Path:
    """Write an MHA model as a Hugging Face ``GPT2LMHeadModel`` folder with the GPT-2 tokenizer.

    The folder is built next to ``out_dir`` and swapped in when complete (``files.replace_dir``). Models without bias
    get zero biases (HF's GPT-2 always has them). GQA/MQA have no ``GPT2LMHeadModel`` form.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from nblib.tokenizer import EOT_ID, hf_tokenizer

    c = model.config
    if c.variant != "mha":
        raise ValueError(
            f"export_hf needs an MHA model (n_kv_head == n_head); this one has n_head={c.n_head}, "
            f"n_kv_head={c.n_kv_head} ({c.variant}), which GPT2LMHeadModel cannot represent. "
            "Reload it in nblib with load_checkpoint instead."
        )
    hf_config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.context_length,
        n_embd=c.d_model,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.d_mlp,  # None: 4 * n_embd, as ours
        activation_function="gelu_new",
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=c.tie_embeddings,
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
    )
    hf = GPT2LMHeadModel(hf_config)
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    mapped = {}
    for key, ref in hf.state_dict().items():
        if key in ours:
            w = ours[key]
            # nn.Linear stores [out, in]; HF's Conv1D stores [in, out].
            mapped[key] = w.t().contiguous() if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else w
        elif key.endswith(".bias"):
            mapped[key] = torch.zeros_like(ref)  # bias=False model
        else:
            raise KeyError(f"export_hf: no nblib weight for HF parameter {key}")
        if mapped[key].shape != ref.shape:
            raise ValueError(f"export_hf: {key} has shape {tuple(mapped[key].shape)}, HF expects {tuple(ref.shape)}")
    hf.load_state_dict(mapped)
    def write(folder: Path) -> None:
        hf.save_pretrained(folder)
        hf_tokenizer().save_pretrained(folder)

    return replace_dir(out_dir, write)

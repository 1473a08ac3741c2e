"""The LM head and its cross-entropy in one pass over row chunks, gradients included (training only).

The plain path, ``F.cross_entropy(x @ W.T, targets)``, materialises the ``[rows, vocab]`` logits, then
their log-softmax and in backward their gradient: three ``rows x 50257`` fp32 tensors, which at these
widths dwarf every activation of the blocks. :func:`lm_head_loss` takes the head a chunk of rows at a
time and computes each chunk's gradient right away (softmax minus one-hot, Liger-Kernel's "fused linear
cross-entropy"), so the largest tensor alive is one chunk's logits and backward only scales two
stored gradients. Same loss and gradients as the plain path (tests/test_model.py checks both).
"""
from __future__ import annotations

import torch

# Rows per chunk: max(128, 2 * d_model), unless CHUNK_ROWS forces a size (bench_pretrain.py does).
# Each chunk adds its product to the fp32 [vocab, d] weight gradient (read + write: 8 vocab d bytes),
# while its logits (4 vocab rows bytes) are written and read back at least twice: rows >= 2 d keeps
# the first below the second. `bench_pretrain.py --only 7 --chunk-rows 0,16,32,64,128` (2-core EPYC,
# fp32, load 2.1): smoke shape, 512 rows of 64, chunks of 32-128 rows 1.32-1.34x nanoGPT's step,
# 16 rows 0.98x, the plain loss 0.99x; 8x8x512, 1024 rows of 512, one chunk 0.96x, plain 0.90x (load 4.7).
CHUNK_ROWS: int | None = None


class _LMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``x @ weight.T`` against ``targets`` (``-1`` ignored); the gradients are
    computed in forward, chunk by chunk, and stored for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                dtype: torch.dtype) -> torch.Tensor:
        keep = targets != -1
        scale = 1 / keep.sum()  # mean over the targets kept (inf when none: nan, as F.cross_entropy)
        safe = targets.clamp(min=0)[:, None]
        w = weight.to(dtype)  # the compute dtype: autocast's when it is on, else the weight's own
        grad_x, grad_w = torch.empty_like(x), torch.zeros_like(weight, dtype=torch.float32)
        total = x.new_zeros((), dtype=torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            for a in range(0, x.size(0), chunk_rows):
                xc, t, k = x[a : a + chunk_rows].to(dtype), safe[a : a + chunk_rows], keep[a : a + chunk_rows]
                logits = (xc @ w.t()).float()
                lse = logits.logsumexp(-1)
                total += ((lse - logits.gather(1, t).squeeze(1)) * k).sum()
                # d loss / d logits = (softmax - one_hot(target)) * scale on kept rows, built in place
                g = logits.sub_(lse[:, None]).exp_().scatter_add_(1, t, logits.new_full(t.shape, -1.0))
                g = g.mul_((k * scale)[:, None]).to(dtype)
                grad_x[a : a + chunk_rows] = g @ w
                if g.dtype == grad_w.dtype:
                    grad_w.addmm_(g.t(), xc)
                else:
                    grad_w += (g.t() @ xc).float()
        ctx.grads = grad_x, grad_w.to(weight.dtype)
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x, grad_w = ctx.grads
        del ctx.grads
        return grad_x.mul_(grad_loss), grad_w.mul_(grad_loss), None, None, None


def lm_head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(x @ weight.T, targets, ignore_index=-1)`` for ``x`` ``[..., d]`` and ``targets``
    ``[...]``, without materialising the logits; under autocast the matmuls run in autocast's dtype.
    ``chunk_rows``: rows per chunk, default :data:`CHUNK_ROWS` (read at each call), else ``max(128, 2 * d)``."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    rows = chunk_rows or CHUNK_ROWS or max(128, 2 * x.size(-1))
    return _LMHeadLoss.apply(x.reshape(-1, x.size(-1)), weight, targets.reshape(-1), rows, dtype)

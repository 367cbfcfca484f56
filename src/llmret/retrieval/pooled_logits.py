"""SPLADE pooling of an LM head's logits in bounded memory, for training.

``log(1 + ReLU(logit))`` max-pooled over the pooled positions equals ``log(1 + ReLU(.))`` of
the max-pooled raw logits, since the transform is monotone (and the float32 cast exact), so
the forward pass applies the head to one chunk of the vocabulary at a time, in the model's
dtype, max-pools that chunk over positions and keeps only the (batch, vocabulary) result. The
backward pass recomputes each chunk's logits and sends the gradient to the positions holding
the maximum, split evenly among ties exactly as ``amax`` does on the float32 activations, so
values and gradients are those of :func:`llmret.retrieval.sparse_encoder.splade_pool` over the
full logits. Peak memory: ``batch x vocabulary`` plus one block of ``tokens x chunk`` logits
(``block`` elements, float32 in the backward) instead of several float32
``batch x length x vocabulary`` copies.

Design notes: docs/csplade.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# logits per block (tokens x vocabulary chunk): 2**24 float32 are 64 MiB per transient copy
DEFAULT_BLOCK = 1 << 24


def vocab_chunk(tokens: int, vocab: int, block: int = DEFAULT_BLOCK) -> int:
    """Vocabulary entries per chunk so that ``tokens x chunk`` stays within ``block``."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return max(1, min(vocab, block // max(1, tokens)))


def slicable_head(head: nn.Module) -> bool:
    """Whether ``head`` is a plain ``nn.Linear`` whose weight rows can be used chunk by chunk
    (not a LoRA-wrapped, quantized or hooked module, whose own forward must run)."""
    hooked = head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook")
    return type(head) is nn.Linear and not hooked


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: int, b: int) -> torch.Tensor:
    return F.linear(h, weight[a:b], None if bias is None else bias[a:b])


def _chunk_grad(z: torch.Tensor, keep: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. one chunk's (B, L, c) logits ``z`` of ``amax_L(masked log1p(relu(z.float())))``
    given the pooled weights' gradient ``grad`` (B, c), in the order and dtype of autograd's
    backward of that expression: ``amax`` splits among ties, ``log1p`` divides by ``1 + relu``,
    ``relu`` passes positive inputs only, the cast returns to ``z``'s dtype. Works in place on
    two float32 blocks (``z`` itself is consumed when it is float32)."""
    zf = z.float()
    hit = torch.relu(zf).log1p_().masked_fill_(~keep[..., None], 0.0)
    top = hit.amax(1, keepdim=True)
    # 1.0 where a position holds its term's maximum; a zero maximum passes no gradient (relu),
    # so ties there need not be counted
    hit.eq_(top).mul_(top > 0)
    share = grad[:, None, :] / hit.sum(1, keepdim=True).clamp_(min=1.0)
    # (share * hit) / (1 + relu(z)): multiplying by 0 or 1 before or after the division is exact
    denominator = zf.clamp_(min=0.0).add_(1.0)
    return torch.div(share.expand_as(denominator), denominator, out=denominator).mul_(hit).to(z.dtype)


class _PooledSplade(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, keep, step):
        masked = ~keep[..., None]
        parts = [
            _logits(h, weight, bias, a, a + step).masked_fill_(masked, float("-inf")).amax(1)
            for a in range(0, weight.shape[0], step)
        ]
        ctx.save_for_backward(h, weight, bias, keep)
        ctx.step = step
        return torch.log1p(torch.relu(torch.cat(parts, 1).float()))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h, weight, bias, keep = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        flat = h.reshape(-1, h.shape[-1])
        grad_h = torch.zeros(flat.shape, dtype=torch.float32, device=h.device) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        for a in range(0, weight.shape[0], ctx.step):
            b = min(a + ctx.step, weight.shape[0])
            g = _chunk_grad(_logits(h, weight, bias, a, b), keep, grad[:, a:b]).reshape(-1, b - a)
            if need_h:
                grad_h.add_(g @ weight[a:b])
            if need_w:
                grad_w[a:b] = g.t() @ flat
            if need_b:
                grad_b[a:b] = g.sum(0)
        if need_h:
            grad_h = grad_h.to(h.dtype).reshape(h.shape)
        return grad_h, grad_w, grad_b, None, None


def pooled_splade(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pool_mask: torch.Tensor,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """(B, L, H) final hidden states -> (B, V) float32 SPLADE weights of the head
    ``F.linear(hidden, weight, bias)``: ``max`` over the positions where ``pool_mask`` is set of
    ``log(1 + ReLU(logit))``, with the logits computed ``block // (B * L)`` vocabulary entries
    at a time (forward and, recomputed, backward). A row with no pooled position is refused."""
    keep = pool_mask.to(hidden.device).bool()
    if keep.shape != hidden.shape[:2]:
        raise ValueError(f"pool_mask {tuple(keep.shape)} does not match hidden states {tuple(hidden.shape)}")
    if not keep.any(1).all():
        raise ValueError("a row has no pooled position")
    step = vocab_chunk(int(keep.numel()), weight.shape[0], block)
    return _PooledSplade.apply(hidden, weight, bias, keep, step)

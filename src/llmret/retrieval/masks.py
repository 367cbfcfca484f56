"""4-D float additive attention masks that transformers v5 honours under eager and SDPA
attention alike (LLaRA's joint pass, bidirectional attention), and the decoder body of a
causal LM, PEFT-wrapped or not.

Design notes: docs/llara.md.
"""

from __future__ import annotations

import torch
from torch import nn


def bidirectional_mask(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, L) padding mask -> (B, 1, L, L) float additive mask: every real position sees every
    real position (no causal triangle); a padding query sees only itself, so no softmax row is
    empty (pad outputs are never pooled)."""
    real = attention_mask.bool()
    L = real.shape[1]
    allowed = real[:, None, :] & real[:, :, None]
    eye = torch.eye(L, dtype=torch.bool, device=real.device)[None]
    allowed = torch.where(real[:, :, None], allowed, eye)
    return additive_mask(allowed, dtype)


# Attention implementations verified to honour a custom 4-D additive mask (see tests).
MASKED_ATTENTION = ("eager", "sdpa")


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bool "may attend" (B, L, L) -> float additive (B, 1, L, L) in ``dtype``.

    ``finfo(dtype).min`` rather than ``-inf`` (as transformers does): blocked keys get an
    exactly-zero weight after the softmax, with no inf arithmetic. Rows with no allowed key
    are refused, since their softmax would be meaningless (NaN with ``-inf``).
    """
    if allowed.dtype != torch.bool or allowed.ndim != 3:
        raise ValueError(f"expected a (B, L, L) bool tensor, got {tuple(allowed.shape)} {allowed.dtype}")
    if not allowed.any(-1).all():
        raise ValueError("a query row attends to nothing; its softmax would be NaN")
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    out.masked_fill_(~allowed, torch.finfo(dtype).min)
    return out[:, None]


def decoder_of(lm: nn.Module) -> nn.Module:
    """The transformer body (e.g. ``LlamaModel``) of a causal LM, PEFT-wrapped or not."""
    if hasattr(lm, "get_base_model"):  # peft.PeftModel: LoRA layers live inside it
        lm = lm.get_base_model()
    body = getattr(lm, "base_model", None)
    if body is None or body is lm:
        raise ValueError(f"cannot find the decoder body of {type(lm).__name__}")
    return body

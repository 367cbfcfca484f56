"""CSPLADE's loss terms and diagnostics: FLOPS regularisation and its quadratic warm-up, the
dead-dimension fraction, the keep-alive and logit-scale losses of the adaptation phase.

Design notes: docs/csplade.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def flops(weights: torch.Tensor) -> torch.Tensor:
    """FLOPS regulariser (Paria et al.): sum over the vocabulary of the squared mean weight
    over the batch; small when few terms are used by many vectors at once."""
    return weights.float().mean(0).pow(2).sum()


def quadratic_warmup(weight: float, step: int, warmup_steps: int) -> float:
    """``weight * min(1, step / warmup_steps) ** 2`` (SPLADE's schedule; no warm-up when
    ``warmup_steps`` is 0). ``step`` counts optimizer steps from 1."""
    if warmup_steps < 0 or step < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got {step}, {warmup_steps}")
    if warmup_steps == 0:
        return float(weight)
    return float(weight) * min(1.0, step / warmup_steps) ** 2


def dead_fraction(weights: torch.Tensor) -> float:
    """Share of vocabulary dimensions that are zero (never > 0) in every row of ``weights``."""
    if weights.ndim != 2 or weights.shape[0] == 0:
        raise ValueError(f"expected (n >= 1, vocab) weights, got {tuple(weights.shape)}")
    return float((~(weights > 0).any(0)).float().mean())


# --------------------------------------------------------------------------- losses


def bow_targets(rows: Sequence[Sequence[int]], vocab: int, exclude: Sequence[int] = ()) -> torch.Tensor:
    """(B, V) bool: the distinct token ids of each row, minus ``exclude`` (special tokens)."""
    out = torch.zeros((len(rows), vocab), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids = torch.tensor(sorted(set(r) - set(exclude)), dtype=torch.long)
        if ids.numel():
            out[i, ids] = True
    return out


def keep_alive_loss(pooled_logits: torch.Tensor, targets: torch.Tensor, neg_weight: float = 1.0) -> torch.Tensor:
    """Balanced logistic loss on pre-ReLU max-pooled logits: own terms above 0, others below.

    ``mean_b [mean_{t in T_b} softplus(-z_bt) + neg_weight * mean_{t not in T_b} softplus(z_bt)]``;
    rows without a target term count their negative half only."""
    z = pooled_logits.float()
    pos, neg = targets.float(), (~targets).float()
    pos_term = (F.softplus(-z) * pos).sum(1) / pos.sum(1).clamp(min=1.0)
    neg_term = (F.softplus(z) * neg).sum(1) / neg.sum(1).clamp(min=1.0)
    return (pos_term + neg_weight * neg_term).mean()


def pooled_logsumexp(logits: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """(n,) float32: ``logsumexp`` over the vocabulary at each pooled position."""
    return torch.logsumexp(logits.float(), -1)[pool_mask.bool()]


def logit_scale_loss(lse: torch.Tensor, target: float, below: float = 0.1) -> torch.Tensor:
    """Pulls each pooled position's ``logsumexp`` of logits (``lse``, :func:`pooled_logsumexp`)
    towards ``target``.

    ``mean_t relu(lse_t - target)^2 + below * mean_t relu(target - lse_t)^2`` over the pooled
    positions. With the next-token loss keeping the log-probabilities, ``lse_t = target`` makes
    ``logit = log p + target``: the ReLU then keeps exactly the terms predicted with
    ``p > exp(-target)``. Positions above the target widen the max-pooled union of live terms,
    so they cost ``1 / below`` times more than positions below it."""
    return (torch.relu(lse - target) ** 2).mean() + below * (torch.relu(target - lse) ** 2).mean()


def max_pool_logits(logits: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, V) -> (B, V): max of the raw logits over pooled positions (pre-ReLU)."""
    keep = pool_mask.bool()[..., None]
    return logits.masked_fill(~keep, torch.finfo(logits.dtype).min).amax(1)

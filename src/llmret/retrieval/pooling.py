"""Turn per-token hidden states into one vector per text.

``last`` is LLaRA's / RepLLaMA's choice for causal LMs: the end-of-sequence token is the
only position that has attended to the whole input. ``mean`` and ``cls`` serve BERT-style
encoders used as baselines. ``mean_last_K`` (e.g. ``mean_last_8``) averages the last K
attended tokens: the summary tokens that end the templates of a model pretrained with the
FlagEmbedding LLaRA variant (its released inference code pools them that way).
"""

from __future__ import annotations

import re

import torch

FIXED = ("last", "mean", "cls")
POOLINGS = (*FIXED, "mean_last_K")
_MEAN_LAST = re.compile(r"mean_last_([1-9][0-9]*)")


def check_pooling(name: str) -> None:
    """Refuse a pooling name :func:`pool` does not know, before any model is loaded."""
    if name not in FIXED and not _MEAN_LAST.fullmatch(name):
        raise ValueError(f"pooling must be one of {POOLINGS} (K a positive integer), got {name!r}")


def last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden state at the last attended position of each row (right or left padding)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.long() * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def cls(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


def mean_last(hidden: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the states of the last ``k`` attended positions of each row (right or left
    padding; a row with fewer attended positions averages all of them)."""
    m = mask.long()
    at_or_after = m.flip(1).cumsum(1).flip(1)  # attended positions from here to the end
    return mean(hidden, (m == 1) & (at_or_after <= k))


def pool(name: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    check_pooling(name)
    fn = {"last": last_token, "mean": mean, "cls": cls}.get(name)
    if fn is None:
        return mean_last(hidden, mask, int(name.removeprefix("mean_last_")))
    return fn(hidden, mask)

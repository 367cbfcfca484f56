"""Turn per-token hidden states into one vector per text.

``last`` is LLaRA's / RepLLaMA's choice for causal LMs: the end-of-sequence token is the
only position that has attended to the whole input. ``mean`` and ``cls`` serve BERT-style
encoders used as baselines.
"""

from __future__ import annotations

import torch

POOLINGS = ("last", "mean", "cls")


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


def pool(name: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    fn = {"last": last_token, "mean": mean, "cls": cls}.get(name)
    if fn is None:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {name!r}")
    return fn(hidden, mask)

"""The training loop's side of its model contract (docs/training.md, "Model contract"): how a
batch reaches the device and the model, and which scalars of the model's output are its loss
and its log fields. Kept apart from :mod:`llmret.training.loop` so the loop reads as the run's
outline, and the contract can be read (and tested) on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

# The loop's own fields of a log record: a model's optional "log" scalars may not reuse them.
RESERVED_LOG_KEYS = ("event", "step", "loss", "lr", "tokens_per_s", "elapsed_s")


def nonpad_token_counter(pad_id: int, key: str = "input_ids") -> Callable[[Any], int]:
    """A ``count_tokens`` for batches exposing ``input_ids`` (mapping key or attribute)."""

    def count(batch: Any) -> int:
        ids = batch[key] if isinstance(batch, Mapping) else getattr(batch, key)
        return int((ids != pad_id).sum())

    return count


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` on ``device``: recursively through tensors, mappings, (named) tuples, lists and
    any object with a ``.to`` method; anything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    if hasattr(batch, "to"):
        return batch.to(device)
    return batch


def call_model(model: Callable, batch: Any) -> Any:
    """A mapping as keyword arguments (HF collators), a tuple/list as positional arguments,
    anything else (e.g. ``JointBatch``) as the single argument."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def model_losses(out: Any) -> dict[str, torch.Tensor]:
    """``loss`` plus every scalar ``loss_*`` of a model output."""
    if isinstance(out, torch.Tensor):
        out = {"loss": out}
    if not isinstance(out, Mapping) or out.get("loss") is None:
        raise TypeError(f"the model must return a mapping with a 'loss', got {type(out).__name__}")
    found = {"loss": out["loss"]}
    for k, v in out.items():
        if k.startswith("loss_") and isinstance(v, torch.Tensor) and v.numel() == 1:
            found[k] = v
    return found


def log_scalars(out: Any) -> dict[str, torch.Tensor]:
    """Scalars of the output's optional ``"log"`` mapping (not part of the loss)."""
    extra = out.get("log") if isinstance(out, Mapping) else None
    if not extra:
        return {}
    found = {}
    for k, v in extra.items():
        if k in RESERVED_LOG_KEYS or k.startswith("loss_"):
            raise ValueError(f"log key {k!r} clashes with the loop's own log fields")
        found[k] = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
    return found


__all__ = ["RESERVED_LOG_KEYS", "call_model", "log_scalars", "model_losses", "nonpad_token_counter", "to_device"]

"""Resumable DeepSpeed checkpoints: atomic ``latest`` marker, pruning, loading with only
allow-listed classes, and the final model folder (safetensors only, with
``training_state.json``), swapped into place.

Design notes: docs/training.md.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmret.atomic_files import atomic_write_text

log = logging.getLogger(__name__)
LATEST = "latest"  # marker file in checkpoint_dir naming the newest complete checkpoint
TRAINER_STATE = "trainer_state.json"  # in each checkpoint tag folder
TRAINING_STATE = "training_state.json"  # in output_dir
# Checkpoints kept while a run trains (``TrainingArgs.keep_checkpoints`` None): a full-parameter
# checkpoint holds the weights, float32 master weights and Adam moments, ~14-16 bytes a
# parameter (~100-112 GB for 7B), so one; a LoRA checkpoint holds only the adapters and their
# optimizer state (MBs), so the newest two (the older one a fallback).
KEEP_FULL = 1
KEEP_FROZEN = 2
KEEP_CHECKPOINTS = KEEP_FROZEN  # prune_checkpoints' default
_TAG = re.compile(r"^step(\d+)$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# DeepSpeed classes stored in ZeRO-1/2 optimizer state files (read off 0.19.8 checkpoints with
# torch.serialization.get_unsafe_globals_in_checkpoint, fp32 and bf16 on CPU; ZeRO-0 files hold
# none). All are plain data holders; DynamicLossScaler (fp16 runs) was not observed but is of the
# same kind. Allow-listing them lets weights_only=True load what DeepSpeed writes.
DS_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


def safe_torch_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` allowing only :data:`DS_SAFE_GLOBALS`."""
    import importlib

    allowed = []
    for name in DS_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # pragma: no cover - other DeepSpeed versions
            pass
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


def use_safe_loading(engine) -> bool:
    """Make the engine's checkpoint loads go through :func:`safe_torch_load`, if it is the plain
    torch engine (every load of ZeRO-0/1/2 checkpoints goes through ``checkpoint_engine.load``)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ce = engine.checkpoint_engine
    if type(ce) is not TorchCheckpointEngine:
        log.warning("checkpoint engine %s loads with pickle (weights_only=False)", type(ce).__name__)
        return False

    def load(path, map_location=None):
        return safe_torch_load(path, map_location=map_location)

    ce.load = load
    return True


# --------------------------------------------------------------------------- checkpoints & files


def _tag_step(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> str | None:
    """Tag named by the ``latest`` marker, if it and its trainer state exist."""
    marker = Path(checkpoint_dir) / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    if not tag or not (Path(checkpoint_dir) / tag / TRAINER_STATE).is_file():
        raise RuntimeError(f"{marker} names {tag!r}, which is missing or incomplete")
    return tag


def prune_checkpoints(checkpoint_dir: Path, latest: str, keep_last: int = KEEP_CHECKPOINTS) -> None:
    """Keep ``latest`` and the newest ``keep_last - 1`` tags before it; remove every other
    ``step<N>`` folder, including partial ones left above ``latest`` by a killed save."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    newest = _tag_step(latest)
    steps = sorted(s for p in checkpoint_dir.iterdir() if p.is_dir() and (s := _tag_step(p.name)) is not None)
    keep = {s for s in steps if s <= newest}
    keep = set(sorted(keep)[-keep_last:])
    for s in steps:
        if s not in keep:
            shutil.rmtree(checkpoint_dir / f"step{s}", ignore_errors=True)


def _check_pickle_free(folder: Path) -> None:
    bad = [p.name for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if bad:
        raise RuntimeError(f"final model folder must be safetensors only, found {bad}")


def save_pretrained(obj: Any, out_dir: Path) -> None:
    """``save_pretrained`` in safetensors: transformers 5 writes nothing else (and dropped the
    ``safe_serialization`` flag); PEFT and older libraries still take it."""
    if "safe_serialization" in inspect.signature(obj.save_pretrained).parameters:
        obj.save_pretrained(out_dir, safe_serialization=True)
    else:
        obj.save_pretrained(out_dir)


def save_final(model, out_dir: Path, tokenizer, save_fn, state: dict) -> None:
    """Write into a temporary sibling folder, then swap it in (rename)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if save_fn is not None:
        save_fn(model, tmp)
    elif hasattr(model, "save_pretrained"):
        save_pretrained(model, tmp)
    else:
        raise TypeError(f"{type(model).__name__} has no save_pretrained; pass save_fn")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _check_pickle_free(tmp)
    (tmp / TRAINING_STATE).write_text(json.dumps(state, indent=2, default=str))
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def has_frozen(module: nn.Module) -> bool:
    return any(not p.requires_grad for p in module.parameters())


def checkpoints_to_keep(setting: int | None, module: nn.Module) -> int:
    """``TrainingArgs.keep_checkpoints``, or when None :data:`KEEP_FULL` if every parameter
    trains and :data:`KEEP_FROZEN` if some are frozen (LoRA)."""
    if setting is not None:
        return setting
    return KEEP_FROZEN if has_frozen(module) else KEEP_FULL


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (one checkpoint tag)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _warn_if_short_of_space(ckpt_dir: Path) -> None:
    """A save writes a whole new tag before the previous one goes, so the file system needs
    the newest tag's size free on top: warn (rank 0) before a long write runs out of space."""
    try:
        tag = latest_checkpoint(ckpt_dir) if (ckpt_dir / LATEST).is_file() else None
        if tag is None:
            return
        need, free = checkpoint_bytes(ckpt_dir / tag), shutil.disk_usage(ckpt_dir).free
    except (OSError, RuntimeError):
        return
    if free < need:
        log.warning(
            "%s: %.1f GB free, but the next checkpoint needs about %.1f GB beside %s until it is complete",
            ckpt_dir,
            free / 1e9,
            need / 1e9,
            tag,
        )


def save_checkpoint(
    engine, ckpt_dir: Path, tag: str, state: dict, rank: int, final: bool = False, keep: int = KEEP_CHECKPOINTS
) -> None:
    """Save tag ``tag``, then point ``latest`` at it and prune to the newest ``keep`` tags (only
    itself when ``final``: the final model is written next).

    The order is crash-safe: (1) every rank writes the new tag; (2) rank 0 writes its
    ``trainer_state.json``; (3) ``latest`` is replaced atomically to name it; (4) older tags
    and any partial ones go. A kill before (3) leaves the previous checkpoint in force (the
    partial tag is removed by the next save); after (3) the new one is. The disk therefore
    peaks at ``keep + 1`` tags during a save, and after a completed save holds exactly
    ``keep`` (one, for a full-parameter run: ~100 GB for 7B, so ~200 GB at the peak)."""
    import deepspeed.comm as dist

    if rank == 0:
        _warn_if_short_of_space(ckpt_dir)
    # LoRA stages freeze the base model: its weights come back from the model folder on a
    # resume, so a checkpoint holds only what trains (MBs instead of the whole model).
    engine.save_checkpoint(
        str(ckpt_dir), tag=tag, save_latest=False, exclude_frozen_parameters=has_frozen(engine.module)
    )  # collective; ends with a barrier
    if rank == 0:
        atomic_write_text(ckpt_dir / tag / TRAINER_STATE, json.dumps(state, indent=2))
        atomic_write_text(ckpt_dir / LATEST, tag)
        prune_checkpoints(ckpt_dir, tag, keep_last=1 if final else keep)
    dist.barrier()

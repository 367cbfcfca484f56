"""What decides a training run: :class:`TrainingArgs`, the learning-rate schedule, the
DeepSpeed config the loop fills in, and the recipe (settings and input digests) that a
checkpoint must match to be resumed.

Design notes: docs/training.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from torch import nn

from llmret.io import file_sha256

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_DEEPSPEED_CONFIG = REPO_ROOT / "config" / "deepspeed" / "cpu.json"
DEFAULT_TORCH_EXTENSIONS_DIR = REPO_ROOT / ".cache" / "torch_extensions"

LR_SCHEDULERS = ("linear", "constant", "cosine")
# Keys of the DeepSpeed config that TrainingArgs decides; the JSON may only say "auto".
ARGS_OWNED_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
)


@dataclass
class TrainingArgs:
    """Everything that decides a run. ``max_steps`` counts optimizer steps."""

    output_dir: str  # final HF-style checkpoint (safetensors), written atomically by rank 0
    checkpoint_dir: str  # resumable DeepSpeed checkpoints (undeclared working folder)
    max_steps: int = 100
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"  # "linear" | "constant" | "cosine", after a linear warmup
    save_every: int = 50  # steps; 0 = only at the end
    log_every: int = 5
    seed: int = 42
    deepspeed_config: str | None = None  # JSON path; None = config/deepspeed/cpu.json
    gradient_checkpointing: bool = False
    log_path: str | None = None  # JSONL; None = <checkpoint_dir>/train_log.jsonl
    max_grad_norm: float = 1.0  # 0 = no clipping
    num_workers: int = 0  # DataLoader workers
    deterministic: bool = False  # torch.use_deterministic_algorithms(True)

    def __post_init__(self) -> None:
        for name in ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "weight_decay", "max_grad_norm", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")

    @property
    def resolved_log_path(self) -> Path:
        return Path(self.log_path) if self.log_path else Path(self.checkpoint_dir) / "train_log.jsonl"

    @property
    def resolved_deepspeed_config(self) -> Path:
        return Path(self.deepspeed_config) if self.deepspeed_config else DEFAULT_DEEPSPEED_CONFIG


# --------------------------------------------------------------------------- schedule


def lr_factor(step: int, kind: str, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the peak learning rate for the update of optimizer step ``step`` (0-based).

    Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first update is not
    wasted at 0). Then with ``progress = (step - warmup) / (max_steps - warmup)`` in [0, 1):
    ``constant`` 1; ``linear`` ``1 - progress``; ``cosine`` ``0.5 * (1 + cos(pi * progress))``.
    The last update therefore still has a small positive rate.
    """
    if kind not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler {kind!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_deepspeed_config(args: TrainingArgs, world_size: int) -> dict:
    """The JSON's device settings plus the run's batch sizes, clipping, lr and weight decay."""
    path = args.resolved_deepspeed_config
    cfg = json.loads(path.read_text())
    for key in ARGS_OWNED_KEYS:
        if key in cfg and cfg[key] != "auto":
            raise ValueError(f"{path}: {key!r} comes from TrainingArgs; remove it from the JSON")
    if "scheduler" in cfg:
        raise ValueError(f"{path}: the training loop owns the LR schedule (TrainingArgs.lr_scheduler)")
    if int(cfg.get("zero_optimization", {}).get("stage", 0)) >= 3:
        raise NotImplementedError("ZeRO-3 partitions parameters; the final save here would need a gather")
    cfg["train_micro_batch_size_per_gpu"] = args.per_device_batch_size
    cfg["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    cfg["train_batch_size"] = args.per_device_batch_size * args.gradient_accumulation_steps * world_size
    cfg["gradient_clipping"] = args.max_grad_norm
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    for key in ("lr", "weight_decay"):
        if key in params and params[key] != "auto":
            raise ValueError(f"{path}: optimizer {key!r} comes from TrainingArgs; remove it from the JSON")
    params["lr"] = args.learning_rate
    params["weight_decay"] = args.weight_decay
    cfg.setdefault("steps_per_print", 10**9)  # our JSONL log is the record
    return cfg


# Optimisation settings a checkpoint must share with the run that resumes it (the batch order
# is checked apart, as ``order``); logging and saving cadence may change between attempts.
RECIPE_ARGS = ("max_steps", "learning_rate", "warmup_steps", "weight_decay", "lr_scheduler", "max_grad_norm")


def recipe(args: TrainingArgs, model: nn.Module, inputs: Sequence[str | os.PathLike] = ()) -> dict:
    """What makes a checkpoint this run's: :data:`RECIPE_ARGS`, the model's own settings (its
    ``spec``, ``lora`` and ``objective`` dataclasses) and the digests of ``inputs`` (see
    :func:`input_digest`), as JSON values. Under a constant learning rate ``max_steps``
    changes no step's update, so a run may be extended: it is left out there."""
    out: dict[str, Any] = {k: getattr(args, k) for k in RECIPE_ARGS}
    if args.lr_scheduler == "constant":
        del out["max_steps"]
    for name in ("spec", "lora", "objective"):
        value = getattr(model, name, None)
        if is_dataclass(value) and not isinstance(value, type):
            out[name] = asdict(value)
    if inputs:
        out["inputs"] = [input_digest(p) for p in inputs]
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def input_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents), so the same
    content in another place gives the same digest: a stage rerun from a new base model or
    new negatives does not resume the old run's checkpoint (the batch-order check only sees
    the dataset's length)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise FileNotFoundError(f"training input {path} does not exist")
    h = hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        h.update(f"{file.relative_to(path).as_posix()}\0{input_digest(file)}\n".encode())
    return h.hexdigest()


def recipe_changes(saved_recipe: dict | None, now: dict) -> dict:
    """{setting: (saved, now)} for every difference. What the saved recipe does not record
    matches: a checkpoint written before recipes (or one of their parts) were recorded
    resumes."""
    if saved_recipe is None:
        return {}
    return {k: (saved_recipe[k], v) for k, v in now.items() if k in saved_recipe and saved_recipe[k] != v}

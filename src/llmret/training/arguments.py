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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmret import schema
from llmret.atomic_files import file_sha256
from llmret.specs import check_at_least
from llmret.training.job_settings import AUTO, deepspeed_config_for

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_DEEPSPEED_CONFIG = REPO_ROOT / "config" / "deepspeed" / "cpu.json"
DEFAULT_TORCH_EXTENSIONS_DIR = REPO_ROOT / ".cache" / "torch_extensions"

LR_SCHEDULERS = ("linear", "constant", "cosine")
# The dtype the model is loaded and computes in ("auto": see resolve_dtype).
DTYPES = ("auto", "float32", "bfloat16", "float16")
# DeepSpeed config section -> the dtype it makes the model compute in (DeepSpeed reads
# "bfloat16" as another name of "bf16").
PRECISION_SECTIONS = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16"}
# Keys of the DeepSpeed config that TrainingArgs decides; the JSON may only say "auto".
ARGS_OWNED_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
)


@dataclass
@schema.defaults_from("training")
class TrainingArgs:
    """Everything that decides a run. ``max_steps`` counts optimizer steps."""

    output_dir: str  # final HF-style checkpoint (safetensors), written atomically by rank 0
    checkpoint_dir: str  # resumable DeepSpeed checkpoints (undeclared working folder)
    max_steps: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    lr_scheduler: str  # after a linear warmup
    save_every: int  # steps; 0 = only at the end
    log_every: int
    seed: int
    # JSON path; None = config/deepspeed/cpu.json (the schema's default); "auto": by the GPUs (job_settings)
    deepspeed_config: str | None = None
    gradient_checkpointing: bool
    log_path: str | None = None  # JSONL; None = <checkpoint_dir>/train_log.jsonl
    max_grad_norm: float  # 0 = no clipping
    num_workers: int = 0  # DataLoader workers
    deterministic: bool = False  # torch.use_deterministic_algorithms(True)
    dtype: str  # agreeing with the DeepSpeed config (resolve_dtype)
    # None: 1, or 2 when the model has frozen parameters (LoRA)
    keep_checkpoints: int | None
    # per_device_batch_size x ranks x gradient_accumulation_steps must equal it; None: no check
    global_batch_size: int | None

    def __post_init__(self) -> None:
        schema.check_bounds(self, "training")
        check_at_least(self, 0, "num_workers")  # set by the workflow, not a config setting

    @property
    def resolved_log_path(self) -> Path:
        return Path(self.log_path) if self.log_path else Path(self.checkpoint_dir) / "train_log.jsonl"

    @property
    def resolved_deepspeed_config(self) -> Path:
        return deepspeed_config_path(self.deepspeed_config)

    @property
    def resolved_dtype(self) -> str:
        """The dtype the model loads and computes in: :func:`resolve_dtype` against the DeepSpeed config."""
        path = self.resolved_deepspeed_config
        return resolve_dtype(self.dtype, _read_json(path), path)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.resolved_dtype)


# --------------------------------------------------------------------------- precision


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def deepspeed_config_path(setting: str | None) -> Path:
    """The DeepSpeed JSON of a ``deepspeed_config`` setting: None is the schema's default
    (``cpu.json``); ``auto`` is :func:`llmret.training.job_settings.deepspeed_config_for` with
    this process's GPUs (the workflow resolves ``auto`` from the run's ``gpus`` before the job
    starts, so a job sees a path); the shipped files are found from the checkout too."""
    if not setting:
        return DEFAULT_DEEPSPEED_CONFIG
    if setting == AUTO:
        setting = deepspeed_config_for(AUTO, 1 if torch.cuda.is_available() else 0)
    path = Path(setting)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path


def deepspeed_precision(cfg: Mapping, where: str | os.PathLike = "the DeepSpeed config") -> str | None:
    """The dtype a DeepSpeed config computes in: ``bfloat16`` (``bf16.enabled: true``),
    ``float16`` (``fp16.enabled: true``), ``float32`` (a section says ``enabled: false`` and
    none true), or None when it leaves the choice to ``training.dtype`` (no such section, or
    ``enabled: "auto"``)."""
    stated = {}
    for section, dtype in PRECISION_SECTIONS.items():
        block = cfg.get(section) or {}
        if not isinstance(block, Mapping):
            raise ValueError(f"{where}: {section} must be an object, got {block!r}")
        enabled = block.get("enabled", "auto")
        if enabled not in (True, False, "auto"):
            raise ValueError(f'{where}: {section}.enabled must be true, false or "auto", got {enabled!r}')
        if enabled != "auto":
            stated[section] = (enabled, dtype)
    on = {dtype for enabled, dtype in stated.values() if enabled}
    if len(on) > 1:
        raise ValueError(f"{where}: bf16 and fp16 are both enabled")
    if on:
        return on.pop()
    return "float32" if stated else None


def cuda_bf16() -> bool:
    """Whether this rank trains on a CUDA (or ROCm) device with native bf16 (compute capability
    8.0 or later: A100, H100...). Asks the device's properties only: no CUDA context is made on
    a device another rank may own."""
    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(int(os.environ.get("LOCAL_RANK", "0")))[0] >= 8


def resolve_dtype(dtype: str, cfg: Mapping, where: str | os.PathLike = "the DeepSpeed config") -> str:
    """The dtype a run loads its model in and computes in, as a name.

    The DeepSpeed config's ``bf16``/``fp16`` sections decide how DeepSpeed casts the model and
    whether it keeps float32 master weights; ``training.dtype`` must agree with them, so the
    model is created in that dtype (never as a float32 copy cast later). ``auto`` takes the
    config's precision; a config that leaves it open (no section, or ``enabled: "auto"``)
    gets ``bfloat16`` on a CUDA device with bf16 and ``float32`` elsewhere (CPU). An explicit
    dtype that contradicts the config is an error."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    stated = deepspeed_precision(cfg, where)
    if dtype == "auto":
        return stated or ("bfloat16" if cuda_bf16() else "float32")
    if stated is not None and stated != dtype:
        raise ValueError(
            f"training.dtype is {dtype} but {where} computes in {stated} (its bf16/fp16 sections): "
            f"set dtype to auto or {stated}, or use a DeepSpeed config for {dtype} "
            '(or one whose bf16/fp16 "enabled" is "auto")'
        )
    return dtype


def training_dtype(training: Mapping) -> torch.dtype:
    """:attr:`TrainingArgs.torch_dtype` of a config's ``training`` mapping (before the run's
    folders are known): the dtype a stage loads its model in."""
    dtype = training.get("dtype", TrainingArgs.dtype)
    path = deepspeed_config_path(training.get("deepspeed_config"))
    return getattr(torch, resolve_dtype(dtype, _read_json(path), path))


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
    cfg = _read_json(path)
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
    dtype = resolve_dtype(args.dtype, cfg, path)  # an explicit dtype must agree with the JSON
    if deepspeed_precision(cfg, path) is None:  # the JSON leaves the precision to training.dtype
        if "bfloat16" in cfg:
            cfg["bf16"] = {**(cfg.pop("bfloat16") or {}), **(cfg.get("bf16") or {})}
        for section, name in (("bf16", "bfloat16"), ("fp16", "float16")):
            cfg[section] = {**(cfg.get(section) or {}), "enabled": dtype == name}
    return cfg


# Optimisation settings a checkpoint must share with the run that resumes it (the batch order
# is checked apart, as ``order``); logging and saving cadence may change between attempts.
RECIPE_ARGS = ("max_steps", "learning_rate", "warmup_steps", "weight_decay", "lr_scheduler", "max_grad_norm")


def recipe(
    args: TrainingArgs,
    model: nn.Module,
    inputs: Sequence[str | os.PathLike] = (),
    digests: Sequence[str] | None = None,
) -> dict:
    """What makes a checkpoint this run's: :data:`RECIPE_ARGS`, the resolved ``dtype``, the
    model's own settings (its ``spec``, ``lora`` and ``objective`` dataclasses) and the
    digests of ``inputs`` (see :func:`input_digest`; ``digests``, when given, are those
    already computed, e.g. by rank 0 for every rank), as JSON values. Under a constant
    learning rate ``max_steps`` changes no step's update, so a run may be extended: it is
    left out there."""
    out: dict[str, Any] = {k: getattr(args, k) for k in RECIPE_ARGS}
    if args.lr_scheduler == "constant":
        del out["max_steps"]
    out["dtype"] = args.resolved_dtype  # a bf16 checkpoint does not resume a float32 run
    for name in ("spec", "lora", "objective"):
        value = getattr(model, name, None)
        if is_dataclass(value) and not isinstance(value, type):
            out[name] = asdict(value)
    if inputs:
        out["inputs"] = list(digests) if digests is not None else [input_digest(p) for p in inputs]
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def input_digest(path: str | os.PathLike, cache: dict | None = None) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents), so the same
    content in another place gives the same digest: a stage rerun from a new base model or
    new negatives does not resume the old run's checkpoint (the batch-order check only sees
    the dataset's length).

    ``cache`` (``{absolute path: [size, mtime_ns, sha256]}``, updated in place) skips
    hashing a file whose size and modification time are those recorded: a resumed attempt
    does not read a 7B model's 14 GB again (:func:`cached_input_digests`)."""
    path = Path(path)
    if path.is_file():
        if cache is None:
            return file_sha256(path)
        st = path.stat()
        key = str(path.resolve())
        hit = cache.get(key)
        if hit is not None and hit[:2] == [st.st_size, st.st_mtime_ns]:
            return hit[2]
        cache[key] = [st.st_size, st.st_mtime_ns, file_sha256(path)]
        return cache[key][2]
    if not path.is_dir():
        raise FileNotFoundError(f"training input {path} does not exist")
    h = hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        h.update(f"{file.relative_to(path).as_posix()}\0{input_digest(file, cache)}\n".encode())
    return h.hexdigest()


DIGEST_CACHE = "input_digests.json"  # in checkpoint_dir: file digests by size and mtime


def cached_input_digests(inputs: Sequence[str | os.PathLike], checkpoint_dir: str | os.PathLike) -> list[str]:
    """:func:`input_digest` of each input, reusing and updating the digests recorded in
    ``checkpoint_dir/input_digests.json`` (keyed by path, size and modification time; an
    unreadable file is ignored and rewritten). Called by one rank, which shares the result."""
    from llmret.atomic_files import atomic_write_text

    cache_path = Path(checkpoint_dir) / DIGEST_CACHE
    try:
        cache = json.loads(cache_path.read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    before = json.dumps(cache, sort_keys=True)
    digests = [input_digest(p, cache) for p in inputs]
    if json.dumps(cache, sort_keys=True) != before:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_path, json.dumps(cache, indent=1, sort_keys=True))
    return digests


def recipe_changes(saved_recipe: dict | None, now: dict) -> dict:
    """{setting: (saved, now)} for every difference. What the saved recipe does not record
    matches: a checkpoint written before recipes (or one of their parts) were recorded
    resumes."""
    if saved_recipe is None:
        return {}
    return {k: (saved_recipe[k], v) for k, v in now.items() if k in saved_recipe and saved_recipe[k] != v}

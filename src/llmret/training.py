"""A small, generic DeepSpeed training loop (LLaRA pretraining, LoRA fine-tuning, CSPLADE).

One function, :func:`train`, in the spirit of Tevatron's trainer: the model computes its own
loss, the loop only feeds batches, steps the optimizer, logs, checkpoints and saves.

Model contract
    ``model(batch)`` returns a mapping (a ``dict`` or an HF ``ModelOutput``) with a scalar
    ``"loss"``; every other scalar whose key starts with ``"loss_"`` is logged too (e.g.
    :class:`llmret.llara.LlaraModel` gives ``loss_ebae`` and ``loss_ebar``); scalars under an
    optional ``"log"`` mapping are logged under their own names, averaged the same way (e.g.
    :class:`llmret.csplade.SparseModel`'s ``dead_fraction`` and FLOPS weights). A model with a
    ``set_step(step)`` method is told, before each optimizer step's micro-batches, the 1-based
    number of that step (schedules inside the loss, e.g. a FLOPS warm-up, resume with it).
    How a batch is
    passed: a mapping (HF collators) as keyword arguments, a tuple/list as positional
    arguments, anything else (e.g. :class:`llmret.llara.JointBatch`) as the single argument.
    Batches are moved to the device with ``.to(device)`` (tensors, mappings, tuples and any
    object with a ``.to`` method, recursively).

DeepSpeed configuration
    The JSON file (``TrainingArgs.deepspeed_config``) holds only what depends on the machine:
    ZeRO stage, bf16, optimizer type and implementation (``"torch_adam": true``), betas/eps.
    The loop fills in what the run decides: ``train_micro_batch_size_per_gpu``,
    ``gradient_accumulation_steps``, ``train_batch_size``, ``gradient_clipping`` and the
    optimizer's ``lr``/``weight_decay``; the JSON must not set those (``"auto"`` is allowed),
    nor a ``scheduler`` (the loop owns the schedule, see :func:`lr_factor`). Presets:
    ``config/deepspeed/cpu.json`` (ZeRO-0, fp32, ``torch.optim.AdamW``; tested) and
    ``config/deepspeed/gpu_zero2_bf16.json`` (ZeRO-2, bf16; not exercised by the tests).
    ZeRO-3 is refused: its parameters are partitioned and the final save would need a gather.

CPU notes (DeepSpeed 0.19.8, torch 2.13 CPU)
    * Without a launcher the loop sets ``RANK=0 LOCAL_RANK=0 WORLD_SIZE=1
      MASTER_ADDR=127.0.0.1 MASTER_PORT=<free port>`` and initialises ``gloo``. Under
      ``torchrun``/``deepspeed`` those variables exist and are used as they are.
    * ``"torch_adam": true`` in the optimizer params makes DeepSpeed build
      ``torch.optim.AdamW`` instead of its compiled ``FusedAdam``/``DeepSpeedCPUAdam``.
    * DeepSpeed's communication backend JIT-compiles a C++ shared-memory all-reduce op
      (``deepspeed_shm_comm``) on CPU at ``init_distributed``: ~95 s on 2 cores, then cached
      in ``TORCH_EXTENSIONS_DIR`` (default here ``<repo>/.cache/torch_extensions``). gloo does
      the same reductions correctly, so the loop marks the op unavailable on CPU
      (``deepspeed.ops.__compatible_ops__``) and nothing is compiled at all.

Resumable checkpoints (``checkpoint_dir``)
    Every ``save_every`` steps and at the last step: ``engine.save_checkpoint(checkpoint_dir,
    tag="step<N>")`` (weights, optimizer and LR-scheduler state) plus
    ``step<N>/trainer_state.json`` (step, data position, log values, the arguments that fix
    the batch order). Then the ``latest`` marker is replaced atomically (written to a
    temporary file and ``os.replace``d; DeepSpeed's own marker is not atomic, so it is
    disabled) and all tags but the newest two are deleted; the last step's save keeps only
    itself (the final model is written next, and an earlier tag then serves nothing, while a
    full-parameter checkpoint holds 16 bytes a parameter). A checkpoint exists only once
    ``latest`` names it, so a kill during a save leaves the previous one in force. A fresh
    start (nothing resumed) begins a new train log.

    DeepSpeed checkpoints are torch pickles (DeepSpeed offers no other format). They are our
    own files in an undeclared working folder, never downloaded nor published. Still, the
    loop loads them with ``torch.load(weights_only=True)``, allow-listing only the few plain
    DeepSpeed data classes the ZeRO optimizer state holds (:data:`DS_SAFE_GLOBALS`); any other
    class fails the load (``pickle.UnpicklingError``) instead of being instantiated. Final artifacts
    (``output_dir``) are safetensors only; the loop refuses to finish with a pickle there.
    ``output_dir/training_state.json`` records the run: steps, final loss, training and wall
    time, the device and the peak memory (host RSS, and on CUDA PyTorch's allocated and
    reserved peaks; the largest rank's, over resumed attempts too), which ``llmret.footprint`` turns into the training
    table.

Deterministic data order and resumption
    Epoch ``e`` shuffles the dataset with ``torch.randperm`` seeded by ``seed + e``, drops the
    tail so every rank gets the same number of full micro-batches, and deals the indices to
    ranks DistributedSampler-style (``perm[rank::world_size]``). Optimizer step ``k``
    consumes micro-batches ``(k-1)*G .. k*G-1`` (``G`` = gradient accumulation) of that
    endless sequence, so a resumed run skips exactly the consumed indices (without loading
    them) and sees the batches an uninterrupted run would. Random ops inside the model
    (dropout) are made resumable by reseeding ``torch``/``random``/``numpy`` from
    ``(seed, step, rank)`` at the start of every step, so no RNG state needs saving.

Log (``log_path``, JSONL, rank 0)
    ``{"event": "start"|"resume", "step": ...}`` when a run starts, then every ``log_every``
    steps and at the last step ``{"event": "step", "step", "loss", "loss_*", "lr",
    "tokens_per_s", "elapsed_s"}``: losses are means over the micro-batches (all ranks) since
    the previous line; ``lr`` is the rate the step's update used; ``tokens_per_s`` counts
    ``count_tokens(batch)`` over all ranks (0 without it); ``elapsed_s`` is training time
    accumulated over resumed runs. After a resume, steps after the checkpoint appear again:
    the last line of a step is the one that counts.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .io import atomic_write_text, file_sha256

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEEPSPEED_CONFIG = REPO_ROOT / "config" / "deepspeed" / "cpu.json"
DEFAULT_TORCH_EXTENSIONS_DIR = REPO_ROOT / ".cache" / "torch_extensions"

LR_SCHEDULERS = ("linear", "constant", "cosine")
LATEST = "latest"  # marker file in checkpoint_dir naming the newest complete checkpoint
TRAINER_STATE = "trainer_state.json"  # in each checkpoint tag folder
TRAINING_STATE = "training_state.json"  # in output_dir
KEEP_CHECKPOINTS = 2
_TAG = re.compile(r"^step(\d+)$")
# Keys of the DeepSpeed config that TrainingArgs decides; the JSON may only say "auto".
ARGS_OWNED_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
)
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


@dataclass
class TrainingArgs:
    """Everything that decides a run. ``max_steps`` counts optimizer steps."""

    output_dir: str  # final HF-style checkpoint (safetensors), written atomically by rank 0
    checkpoint_dir: str  # resumable DeepSpeed checkpoints (undeclared working folder)
    max_steps: int
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"  # "linear" | "constant" | "cosine", after a linear warmup
    save_every: int = 500  # steps; 0 = only at the end
    log_every: int = 10
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


# --------------------------------------------------------------------------- data order


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """The micro-batches (dataset indices) of ``rank`` in ``epoch``: deterministic.

    ``randperm(n)`` seeded with ``seed + epoch``; the tail is dropped so that each rank gets
    ``(n // world_size) // batch_size`` full batches; rank r takes ``perm[r::world_size]``.
    """
    per_rank = n // world_size
    count = per_rank // batch_size
    if count == 0:
        raise ValueError(f"dataset of {n} examples gives no full batch of {batch_size} on each of {world_size} ranks")
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)[: per_rank * world_size]
    mine = perm[rank::world_size][: count * batch_size].tolist()
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


class ResumableBatchSampler(Sampler[list[int]]):
    """Endless sequence of :func:`epoch_batches` over epochs 0, 1, ..., from micro-batch ``start``.

    Skipping is arithmetic on indices: nothing before the start position is loaded.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_epoch = len(epoch_batches(n, batch_size, seed, 0, rank, world_size))
        self.start = start  # micro-batches already consumed on this rank

    def position(self, consumed: int) -> tuple[int, int]:
        """(epoch, batch within epoch) of the ``consumed``-th micro-batch (0-based)."""
        return divmod(consumed, self.per_epoch)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, first = self.position(self.start)
        while True:
            yield from epoch_batches(self.n, self.batch_size, self.seed, epoch, self.rank, self.world_size)[first:]
            epoch, first = epoch + 1, 0


def _seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed every RNG from (seed, step, rank): dropout etc. replay identically after a resume."""
    s = ((seed * 1_000_003 + step) * 1009 + rank) % (2**63)
    random.seed(s)
    torch.manual_seed(s)  # also every CUDA device
    try:
        import numpy as np

        np.random.seed(s % (2**32))
    except ImportError:  # pragma: no cover
        pass


# --------------------------------------------------------------------------- helpers


def nonpad_token_counter(pad_id: int, key: str = "input_ids") -> Callable[[Any], int]:
    """A ``count_tokens`` for batches exposing ``input_ids`` (mapping key or attribute)."""

    def count(batch: Any) -> int:
        ids = batch[key] if isinstance(batch, Mapping) else getattr(batch, key)
        return int((ids != pad_id).sum())

    return count


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    if hasattr(batch, "to"):
        return batch.to(device)
    return batch


def _call(model: Callable, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _losses(out: Any) -> dict[str, torch.Tensor]:
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


RESERVED_LOG_KEYS = ("event", "step", "loss", "lr", "tokens_per_s", "elapsed_s")


def _extras(out: Any) -> dict[str, torch.Tensor]:
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


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; no weight decay on vectors (biases, norm weights)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    """On the model or the first submodule that knows how (e.g. ``LlaraModel.lm``)."""
    for m in model.modules():
        for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
            fn = getattr(m, name, None)
            if callable(fn):
                if name == "activation_checkpointing_enable":
                    fn(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    fn(gradient_checkpointing_kwargs={"use_reentrant": False})
                return
    raise ValueError(f"gradient_checkpointing: no submodule of {type(model).__name__} supports it")


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); single-process defaults when no launcher set them.

    Sets ``TORCH_EXTENSIONS_DIR`` (if unset) before DeepSpeed can compile anything, and on CPU
    initialises ``gloo``. Idempotent.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_TORCH_EXTENSIONS_DIR))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu:
        # The shared-memory all-reduce op only speeds up collectives between CPU processes, which
        # gloo does correctly anyway; CPU training is for tests and small runs. Marking it
        # unavailable skips its ~95 s JIT build (DeepSpeed probes this dict lazily and keeps
        # edits to it). If the internals change, it is merely built.
        try:
            import deepspeed.ops as ds_ops

            ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False
        except Exception as e:  # pragma: no cover - depends on DeepSpeed internals
            log.info("could not skip the shm comm op build: %s", e)
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None, verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


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


def _use_safe_loading(engine) -> bool:
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


def _prune(checkpoint_dir: Path, latest: str, keep_last: int = KEEP_CHECKPOINTS) -> None:
    """Keep ``latest`` and the newest ``keep_last - 1`` tags before it; remove every other
    ``step<N>`` folder, including partial ones left above ``latest`` by a killed save."""
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


def _save_pretrained(obj: Any, out_dir: Path) -> None:
    """``save_pretrained`` in safetensors: transformers 5 writes nothing else (and dropped the
    ``safe_serialization`` flag); PEFT and older libraries still take it."""
    if "safe_serialization" in inspect.signature(obj.save_pretrained).parameters:
        obj.save_pretrained(out_dir, safe_serialization=True)
    else:
        obj.save_pretrained(out_dir)


def save_llara(model: nn.Module, out_dir: Path) -> None:
    """``save_fn`` for :class:`llmret.llara.LlaraModel`: the LM (or its PEFT adapter) with
    ``save_pretrained``, the separate projection head as ``projection.safetensors`` (only for
    ``head="copy"``; with ``"tie"`` it is the LM head already saved) and ``llara.json``, which
    also names the dense-system settings that encode as the objective trained."""
    from safetensors.torch import save_file

    from .llara import encoder_settings

    _save_pretrained(model.lm, out_dir)
    if model.head == "copy":
        save_file(
            {"weight": model.projection.weight.detach().cpu().contiguous()}, str(out_dir / "projection.safetensors")
        )
    (out_dir / "llara.json").write_text(
        json.dumps(
            {
                "head": model.head,
                "objective": asdict(model.objective),
                "encoder": encoder_settings(model.objective),
            },
            indent=2,
        )
    )


def _save_final(model, out_dir: Path, tokenizer, save_fn, state: dict) -> None:
    """Write into a temporary sibling folder, then swap it in (rename)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if save_fn is not None:
        save_fn(model, tmp)
    elif hasattr(model, "save_pretrained"):
        _save_pretrained(model, tmp)
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


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak memory in MB (1e6 bytes): ``host_rss_mb``, the resident set over the
    process's life (model loading included: what a machine's RAM must hold) and, on CUDA,
    ``device_allocated_mb`` / ``device_reserved_mb``, PyTorch's peaks on the device (what must
    fit in GPU memory)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"host_rss_mb": rss / 1e6 if sys.platform == "darwin" else rss * 1024 / 1e6}
    if device.type == "cuda":
        out["device_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 1e6
        out["device_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 1e6
    return out


def _all_reduce_floats(values: list[float], device, world_size: int, op: str = "SUM") -> list[float]:
    """``values`` reduced over all ranks (``op``: a ``deepspeed.comm.ReduceOp`` name)."""
    if world_size == 1:
        return values
    import deepspeed.comm as dist

    vec = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(vec, op=getattr(dist.ReduceOp, op))
    return vec.tolist()


def merge_peaks(now: Mapping[str, float], earlier: Mapping[str, float] | None) -> dict[str, float]:
    """Peak memory over a run's attempts: a resumed run's figures are the larger of this
    process's and those its checkpoint recorded (as training time is summed over them)."""
    earlier = earlier or {}
    return {k: max(float(v), float(earlier.get(k, 0.0))) for k, v in now.items()}


def _max_over_ranks(values: dict[str, float], device, world_size: int) -> dict[str, float]:
    """Per-rank figures reduced to the largest rank's (memory is a per-process limit)."""
    keys = sorted(values)
    reduced = _all_reduce_floats([values[k] for k in keys], device, world_size, op="MAX")
    return dict(zip(keys, reduced, strict=True))


class _Window:
    """Sums of the loss values, micro-batches and tokens since the last log line."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.micro = 0
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], tokens: int) -> None:
        for k, v in losses.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.micro += 1
        self.tokens += tokens

    def reduce(self, device, world_size: int) -> tuple[dict[str, float], float]:
        """(mean of each loss over the window's micro-batches on all ranks, tokens per second)."""
        keys = sorted(self.sums)
        vals = [float(self.sums[k]) for k in keys] + [float(self.micro), float(self.tokens)]
        vals = _all_reduce_floats(vals, device, world_size)
        micro, tokens = vals[-2], vals[-1]
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {k: vals[i] / micro for i, k in enumerate(keys)}, tokens / dt


class _JsonlLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def restart(self) -> None:
        """A fresh start (no checkpoint resumed) begins a new log: records of an earlier run
        with other settings or inputs would otherwise read as this run's first steps."""
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable[[list], Any],
    args: TrainingArgs,
    tokenizer: Any = None,
    save_fn: Callable[[nn.Module, Path], None] | None = None,
    count_tokens: Callable[[Any], int] | None = None,
    inputs: Sequence[str | os.PathLike] = (),
) -> dict:
    """Train ``model`` for ``args.max_steps`` optimizer steps, resuming from ``checkpoint_dir``.

    ``save_fn(model, folder)`` replaces the default ``model.save_pretrained(folder)`` for the
    final save (e.g. :func:`save_llara`); it must write safetensors/JSON only. ``inputs``
    are the files and folders the run starts from (base model, training data): their
    digests join the recipe, so a checkpoint trained on other data is not resumed. Returns
    the ``training_state.json`` content (on every rank).
    """
    wall0 = time.time()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    rank, world_size, _ = init_distributed()
    import deepspeed
    import deepspeed.comm as dist

    ckpt_dir = Path(args.checkpoint_dir)
    out_dir = Path(args.output_dir)
    jlog = _JsonlLog(args.resolved_log_path, enabled=rank == 0)
    ds_config = build_deepspeed_config(args, world_size)
    gas = args.gradient_accumulation_steps
    n = len(dataset)
    # What fixes the batch sequence; a checkpoint only resumes under the same values.
    order = {
        "seed": args.seed,
        "per_device_batch_size": args.per_device_batch_size,
        "gradient_accumulation_steps": gas,
        "world_size": world_size,
        "dataset_len": n,
    }

    _seed_step(args.seed, 0, rank)
    if args.gradient_checkpointing:
        _enable_gradient_checkpointing(model)

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, args.lr_scheduler, args.warmup_steps, args.max_steps)
        )

    # Checked before DeepSpeed starts. A checkpoint of other settings (a changed learning rate,
    # loss weight, LoRA rank...) is not this run's: training starts afresh, and the first save
    # prunes the stale tags. Same settings with another batch order cannot resume: refused.
    run_recipe = recipe(args, model, inputs)
    tag = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    saved = json.loads((ckpt_dir / tag / TRAINER_STATE).read_text()) if tag else None
    if saved is not None and (stale := recipe_changes(saved.get("recipe"), run_recipe)):
        log.warning("not resuming %s: trained with other settings (saved, now): %s", ckpt_dir / tag, stale)
        tag, saved = None, None
    if saved is not None:
        changed = {k: (saved["order"].get(k), v) for k, v in order.items() if saved["order"].get(k) != v}
        if changed:
            raise ValueError(f"cannot resume {ckpt_dir / tag}: batch order changed (saved, now): {changed}")
        if saved["step"] > args.max_steps:
            raise ValueError(f"checkpoint {tag} is past max_steps={args.max_steps}")

    t_init = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, args.weight_decay),
        config=ds_config,
        lr_scheduler=schedule,
    )
    init_s = time.perf_counter() - t_init
    safe = _use_safe_loading(engine)
    if saved is None:
        jlog.restart()
    try:
        # ---- resume
        start_step, elapsed0, last_log, peak0 = 0, 0.0, None, None
        if saved is not None:
            load_path, _ = engine.load_checkpoint(
                str(ckpt_dir), tag=tag, load_module_strict=not _has_frozen(engine.module)
            )
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {ckpt_dir / tag}")
            start_step, elapsed0, last_log = saved["step"], saved["elapsed_s"], saved.get("last_log")
            peak0 = saved.get("peak_memory_mb")
            if engine.global_steps != start_step:
                raise RuntimeError(f"checkpoint {tag}: engine at step {engine.global_steps}, state says {start_step}")
            log.info("resumed from %s (step %d)", ckpt_dir / tag, start_step)
        jlog.write(
            {
                "event": "resume" if tag else "start",
                "step": start_step,
                "checkpoint": tag,
                "world_size": world_size,
                "deepspeed_init_s": round(init_s, 3),
                "safe_loading": safe,
            }
        )

        # ---- data
        sampler = ResumableBatchSampler(n, args.per_device_batch_size, args.seed, rank, world_size, start_step * gas)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=args.num_workers)
        batches = iter(loader)
        consumed = start_step * gas

        # ---- loop
        engine.train()
        t0 = time.perf_counter()
        window = _Window()
        bar = _progress(args.max_steps, start_step, rank == 0)
        set_step = getattr(engine.module, "set_step", None)
        for step in range(start_step + 1, args.max_steps + 1):
            _seed_step(args.seed, step, rank)
            if callable(set_step):
                set_step(step)
            lr = engine.get_lr()[0]  # the rate this step's update uses
            for _ in range(gas):
                batch = next(batches)
                consumed += 1
                tokens = count_tokens(batch) if count_tokens is not None else 0
                out = _call(engine, _to_device(batch, engine.device))
                losses = _losses(out)
                engine.backward(losses["loss"])
                engine.step()
                window.add({**losses, **_extras(out)}, tokens)
            if engine.global_steps != step:
                raise RuntimeError(f"DeepSpeed skipped an update at step {step} (overflow?)")
            bar.update(1)
            if step % args.log_every == 0 or step == args.max_steps:
                losses_mean, tokens_per_s = window.reduce(engine.device, world_size)
                last_log = {
                    "event": "step",
                    "step": step,
                    **losses_mean,
                    "lr": lr,
                    "tokens_per_s": tokens_per_s,
                    "elapsed_s": elapsed0 + time.perf_counter() - t0,
                }
                jlog.write(last_log)
                bar.set_postfix(loss=f"{losses_mean['loss']:.4f}", lr=f"{lr:.2e}")
                window = _Window()
            if (args.save_every and step % args.save_every == 0) or step == args.max_steps:
                epoch, index = sampler.position(consumed)
                state = {
                    "step": step,
                    "order": order,
                    "recipe": run_recipe,
                    "data": {"micro_batches_consumed": consumed, "epoch": epoch, "batch_in_epoch": index},
                    "elapsed_s": elapsed0 + time.perf_counter() - t0,
                    "last_log": last_log,
                    "peak_memory_mb": merge_peaks(
                        _max_over_ranks(peak_memory_mb(engine.device), engine.device, world_size), peak0
                    ),
                    "args": asdict(args),
                }
                _save_checkpoint(engine, ckpt_dir, f"step{step}", state, rank, final=step == args.max_steps)
        bar.close()
        del batches  # stops DataLoader workers, if any
        train_s = elapsed0 + time.perf_counter() - t0
        peak = merge_peaks(_max_over_ranks(peak_memory_mb(engine.device), engine.device, world_size), peak0)

        # ---- final model
        result = {
            "steps": args.max_steps,
            "final_loss": last_log["loss"] if last_log else None,
            "final_log": last_log,
            "resumed_from_step": start_step if tag else None,
            "train_time_s": train_s,  # accumulated over resumed runs (up to their checkpoints)
            "wall_time_s": time.time() - wall0,  # this process
            "deepspeed_init_s": init_s,
            "world_size": world_size,
            "device": str(engine.device),
            "peak_memory_mb": peak,  # the largest rank, over resumed attempts too (merge_peaks)
            "args": asdict(args),
            "deepspeed_config": ds_config,
            "versions": _versions(),
        }
        if rank == 0:
            _save_final(engine.module, out_dir, tokenizer, save_fn, result)
        dist.barrier()
        return result
    finally:
        engine.destroy()


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


def _has_frozen(module: nn.Module) -> bool:
    return any(not p.requires_grad for p in module.parameters())


def _save_checkpoint(engine, ckpt_dir: Path, tag: str, state: dict, rank: int, final: bool = False) -> None:
    import deepspeed.comm as dist

    # LoRA stages freeze the base model: its weights come back from the model folder on a
    # resume, so a checkpoint holds only what trains (MBs instead of the whole model).
    engine.save_checkpoint(
        str(ckpt_dir), tag=tag, save_latest=False, exclude_frozen_parameters=_has_frozen(engine.module)
    )  # collective; ends with a barrier
    if rank == 0:
        atomic_write_text(ckpt_dir / tag / TRAINER_STATE, json.dumps(state, indent=2))
        atomic_write_text(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, tag, keep_last=1 if final else KEEP_CHECKPOINTS)
    dist.barrier()


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr, desc="train", dynamic_ncols=True)


def _versions() -> dict[str, str]:
    import deepspeed

    out = {"torch": torch.__version__, "deepspeed": deepspeed.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out

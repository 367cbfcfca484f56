"""The process group for training: single-process defaults and gloo on CPU (DeepSpeed's CPU
op left uncompiled), peak-memory figures, and all-reduce helpers for the log and the peaks.

Design notes: docs/training.md.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from llmret.training.arguments import DEFAULT_TORCH_EXTENSIONS_DIR

log = logging.getLogger(__name__)


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


def all_reduce_floats(values: list[float], device, world_size: int, op: str = "SUM") -> list[float]:
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


def max_over_ranks(values: dict[str, float], device, world_size: int) -> dict[str, float]:
    """Per-rank figures reduced to the largest rank's (memory is a per-process limit)."""
    keys = sorted(values)
    reduced = all_reduce_floats([values[k] for k in keys], device, world_size, op="MAX")
    return dict(zip(keys, reduced, strict=True))


def share_from_rank0(compute: Callable[[], Any], rank: int, world_size: int) -> Any:
    """``compute()`` run on rank 0 only and its (picklable) result given to every rank: work
    whose answer is the same everywhere (hashing the inputs, reading a file) is done once, not
    once per rank. An error on rank 0 fails every rank (none waits forever for a result)."""
    if world_size == 1:
        return compute()
    import torch.distributed as dist

    error = None
    value = None
    if rank == 0:
        try:
            value = compute()
        except Exception as e:  # every rank must join the broadcast before anyone raises
            error = e
    # NCCL moves the pickled object through this rank's GPU (named: no device is current yet)
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if nccl else torch.device("cpu")
    box = [(value, None if error is None else f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(box, src=0, device=device)
    value, failed = box[0]
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"rank 0 failed: {failed}")
    return value

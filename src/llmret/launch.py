"""Run a training stage in one process, or in N under ``torchrun`` (one per GPU); outside a
scheduler, first claim N free GPUs with lock files so two jobs never share one.

GPU claiming and the multi-node form: profiles/README.md; docs/training.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from llmret import registry

log = logging.getLogger(__name__)

LAUNCHER_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")
LOCK_DIR_ENV = "LLMRET_GPU_LOCK_DIR"
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def _target(task: str):
    """The entry point of a registered training stage (llmret.registry), by its section name:
    a fixed table, so an arguments file cannot name arbitrary code."""
    return registry.stage(task).entry_point()


def under_launcher() -> bool:
    """True inside a process that torchrun/deepspeed/srun already started as one rank."""
    return any(k in os.environ for k in LAUNCHER_ENV)


def torchrun_command(task: str, args_path: str | Path, nproc: int) -> list[str]:
    """The argument list that starts ``nproc`` ranks of ``task`` on this node."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "llmret.launch",
        task,
        str(args_path),
    ]


def machine_gpu_count() -> int:
    """NVIDIA GPUs of this machine, counted without starting CUDA (the driver's /proc
    entries), so ``CUDA_VISIBLE_DEVICES`` can still be set afterwards."""
    return len(list(NVIDIA_GPUS.iterdir())) if NVIDIA_GPUS.is_dir() else 0


def usable_gpu_count(env: Mapping[str, str] | None = None) -> int:
    """GPUs this process may use: inside a Slurm job the ones Slurm gave it (none when the job
    asked for none), elsewhere the machine's, less any hidden by ``CUDA_VISIBLE_DEVICES``."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if "SLURM_JOB_ID" in env:
        return len([d for d in (visible or "").split(",") if d.strip()])
    if visible is not None:
        return min(len([d for d in visible.split(",") if d.strip()]), machine_gpu_count())
    return machine_gpu_count()


@contextlib.contextmanager
def claimed_devices(
    n: int,
    *,
    total: int | None = None,
    lock_dir: str | Path | None = None,
    poll_s: float = 5.0,
    timeout_s: float | None = None,
) -> Iterator[list[int] | None]:
    """Hold ``n`` of the machine's ``total`` GPUs for the ``with`` block and yield their
    indices; ``None`` (nothing to claim) when ``CUDA_VISIBLE_DEVICES`` is already set (Slurm,
    the user), ``n`` < 1 or the machine has no GPU.

    Each GPU is an exclusive ``flock`` on ``gpu{i}.lock`` in ``lock_dir``: the kernel drops
    it when the holder exits, also when it is killed, so a crashed job never keeps a GPU.
    All ``n`` are taken at once or none (two jobs never hold half each and wait forever);
    while too few are free, it retries every ``poll_s`` seconds (``timeout_s``: give up)."""
    if n < 1 or os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        yield None
        return
    total = machine_gpu_count() if total is None else total
    if total == 0:
        yield None
        return
    if n > total:
        raise ValueError(f"the job asks for {n} GPUs; this machine has {total}")
    folder = Path(lock_dir or os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "llmret-gpu-locks")
    folder.mkdir(parents=True, exist_ok=True)
    held: list[tuple[int, Any]] = []
    started = time.monotonic()
    try:
        while True:
            for i in range(total):
                if len(held) == n:
                    break
                f = open(folder / f"gpu{i}.lock", "a")  # held until the block ends
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.close()
                    continue
                held.append((i, f))
            if len(held) == n:
                break
            for _, f in held:
                f.close()
            held = []
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise TimeoutError(f"{n} of {total} GPUs not free within {timeout_s} s (locks in {folder})")
            log.info("waiting for %d free GPUs of %d (locks in %s)", n, total, folder)
            time.sleep(poll_s)
        yield [i for i, _ in held]
    finally:
        for _, f in held:
            f.close()


@contextlib.contextmanager
def visible_devices(n: int) -> Iterator[list[int] | None]:
    """:func:`claimed_devices`, with ``CUDA_VISIBLE_DEVICES`` set to the claimed GPUs for the
    block (set it before CUDA starts: training ranks and encoding jobs alike)."""
    with claimed_devices(n) as devices:
        if devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
            log.info("claimed GPUs %s (CUDA_VISIBLE_DEVICES)", os.environ["CUDA_VISIBLE_DEVICES"])
        yield devices


def run(task: str, kwargs: Mapping[str, Any], nproc: int = 1) -> Any:
    """Run ``task(**kwargs)`` here (``nproc`` <= 1 or under a launcher) or in ``nproc``
    processes under torchrun; a failing rank fails the call with torchrun's exit code.
    Outside a scheduler the job first claims ``nproc`` free GPUs (:func:`claimed_devices`)."""
    fn = _target(task)
    if under_launcher():
        return fn(**kwargs)
    with visible_devices(nproc):
        if nproc <= 1:
            return fn(**kwargs)
        with tempfile.TemporaryDirectory(prefix="llmret-launch-") as tmp:
            args_path = Path(tmp) / "args.json"
            args_path.write_text(json.dumps(dict(kwargs)))
            cmd = torchrun_command(task, args_path, nproc)
            log.info("launching %d processes: %s", nproc, cmd)
            proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{task} under torchrun with {nproc} processes failed (exit code {proc.returncode})")
    return None


def prepare_environment(src_dir: str, cache_dir: str = ".cache") -> None:
    """Environment every job inherits: the library importable from ``src_dir`` (jobs are
    separate processes, maybe in a conda env, and the package need not be installed) and
    a persistent numba cache (ranx compiles its metrics; cached, that is ~15 s less per job).
    """
    paths = [src_dir] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != src_dir]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.abspath(os.path.join(cache_dir, "numba")))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: python -m llmret.launch TASK ARGS.json")
    task, args_path = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _target(task)(**json.loads(Path(args_path).read_text()))


if __name__ == "__main__":
    main()

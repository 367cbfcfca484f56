"""Run a training stage in one process, or in N under ``torchrun`` (one per GPU); outside a
scheduler, first claim N free GPUs with lock files so two jobs never share one. A run asked
to stop (SIGTERM/SIGUSR1, or its Slurm job's time limit near) saves a checkpoint and ends
with :data:`INTERRUPTED_EXIT_CODE`; inside a Slurm job it requeues the job, which resumes.

GPU claiming, stopping and the multi-node form: profiles/README.md; docs/training.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from llmret import registry

log = logging.getLogger(__name__)

LAUNCHER_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")
LOCK_DIR_ENV = "LLMRET_GPU_LOCK_DIR"
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
NVIDIA_CONTROL = Path("/dev/nvidiactl")
# Stopping a run early (llmret.training.interruption is the loop's side).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_FILE_ENV = "LLMRET_STOP_FILE"  # a file whose existence asks the ranks to stop
INTERRUPTED_FILE_ENV = "LLMRET_INTERRUPTED_FILE"  # rank 0 writes it once it saved and stops
STOP_AT_ENV = "LLMRET_STOP_AT"  # epoch seconds: no step may end after it
STOP_MARGIN_ENV = "LLMRET_STOP_MARGIN_S"  # seconds kept before a Slurm job's end for the save
DEFAULT_STOP_MARGIN_S = 600
REQUEUE_ENV = "LLMRET_SLURM_REQUEUE"  # "0": never `scontrol requeue` an interrupted job
INTERRUPTED_EXIT_CODE = 75  # EX_TEMPFAIL: saved, stopped early, rerun to resume


class TrainingInterrupted(SystemExit):
    """A run stopped early after saving a resumable checkpoint: ends the process with
    :data:`INTERRUPTED_EXIT_CODE` unless caught; the same command resumes it."""

    def __init__(self, step: int | None = None, reason: str = ""):
        super().__init__(INTERRUPTED_EXIT_CODE)
        self.step, self.reason = step, reason

    def __str__(self) -> str:
        return f"training stopped after step {self.step} ({self.reason}); rerun to resume"


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


# --------------------------------------------------------------------------- GPUs


def _entries(visible: str) -> list[str]:
    return [d.strip() for d in visible.split(",") if d.strip()]


@functools.lru_cache(maxsize=8)
def _cuda_count(visible: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    code = "import torch; print(torch.cuda.device_count())"
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        if out.returncode == 0:
            return int(out.stdout.strip().splitlines()[-1])
        log.warning("counting CUDA devices failed (%s); counting the driver's", out.stderr.strip()[-300:])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
        log.warning("counting CUDA devices failed (%s); counting the driver's", e)
    return len(list(NVIDIA_GPUS.iterdir())) if NVIDIA_GPUS.is_dir() else 0


def cuda_device_count(visible: str | None = None) -> int:
    """Devices CUDA reports with ``CUDA_VISIBLE_DEVICES`` = ``visible`` (None: unset), asked
    in a subprocess (``torch.cuda.device_count()``) so this process never initialises CUDA and
    can still set the variable for its children; MIG instances and a container's devices are
    counted as CUDA sees them, which the driver's /proc entries do not. 0 at once on a machine
    without an NVIDIA driver; cached per process."""
    if not (NVIDIA_GPUS.is_dir() or NVIDIA_CONTROL.exists()):
        return 0
    return _cuda_count(visible)


def machine_gpu_count() -> int:
    """Every device CUDA sees on this machine (``CUDA_VISIBLE_DEVICES`` unset)."""
    return cuda_device_count(None)


def usable_gpu_count(env: Mapping[str, str] | None = None) -> int:
    """GPUs this process may use: inside a Slurm job the ones Slurm gave it (none when the job
    asked for none), elsewhere the machine's, less any hidden by ``CUDA_VISIBLE_DEVICES``."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if "SLURM_JOB_ID" in env:
        return len(_entries(visible or ""))
    if visible is not None:
        return min(len(_entries(visible)), machine_gpu_count())
    return machine_gpu_count()


def slurm_submit_host(env: Mapping[str, str] | None = None) -> bool:
    """A host that submits to Slurm and sees no GPU itself (a login node): ``sbatch`` on the
    PATH, not inside a Slurm job, no usable GPU. ``gpus: auto`` cannot be counted there."""
    env = os.environ if env is None else env
    return shutil.which("sbatch") is not None and "SLURM_JOB_ID" not in env and usable_gpu_count(env) == 0


def claimable_devices(env: Mapping[str, str] | None = None) -> list[str]:
    """The devices a job may claim, as ``CUDA_VISIBLE_DEVICES`` entries: those listed there
    (indices or UUIDs, as many as CUDA counts), or every device CUDA sees when it is unset."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(machine_gpu_count())]
    return _entries(visible)[: machine_gpu_count()]


def lock_name(device: str) -> str:
    """The lock file of a device entry: ``gpu3.lock`` for an index, the sanitised identity for
    a UUID (``gpu-GPU-8f3e....lock``; MIG ``MIG-GPU-.../1/0`` too)."""
    if device.isdigit():
        return f"gpu{int(device)}.lock"
    return "gpu-" + re.sub(r"[^A-Za-z0-9._-]", "_", device) + ".lock"


def _try_locks(folder: Path, devices: Sequence[str], n: int) -> list[tuple[str, Any]]:
    """Exclusive non-blocking ``flock`` on the first ``n`` free devices, or none at all."""
    held: list[tuple[str, Any]] = []
    for device in devices:
        if len(held) == n:
            break
        f = open(folder / lock_name(device), "a")  # noqa: SIM115 - held until the claim ends
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        held.append((device, f))
    if len(held) < n:
        for _, f in held:
            f.close()
        return []
    return held


@contextlib.contextmanager
def claimed_devices(
    n: int,
    *,
    devices: Sequence[str] | None = None,
    lock_dir: str | Path | None = None,
    poll_s: float = 5.0,
    timeout_s: float | None = None,
) -> Iterator[list[str] | None]:
    """Hold ``n`` of the ``devices`` (default :func:`claimable_devices`: inside the visible
    list when ``CUDA_VISIBLE_DEVICES`` is set) for the ``with`` block and yield their
    ``CUDA_VISIBLE_DEVICES`` entries; ``None`` (nothing to claim) inside a Slurm job (Slurm
    gave the job its GPUs), for ``n`` < 1 or without a GPU.

    Each device is an exclusive ``flock`` on a file named by its identity (:func:`lock_name`)
    in ``lock_dir``: the kernel drops it when the holder exits, also when it is killed, so a
    crashed job never keeps a GPU. All ``n`` are taken at once or none (two jobs never hold
    half each and wait forever); while too few are free, it retries every ``poll_s`` seconds
    (``timeout_s``: give up)."""
    if n < 1 or "SLURM_JOB_ID" in os.environ:
        yield None
        return
    devices = claimable_devices() if devices is None else list(devices)
    if not devices:
        yield None
        return
    if n > len(devices):
        raise ValueError(f"the job asks for {n} GPUs; only {len(devices)} are visible here ({','.join(devices)})")
    folder = Path(lock_dir or os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "llmret-gpu-locks")
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    while not (held := _try_locks(folder, devices, n)):
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{n} of {len(devices)} GPUs not free within {timeout_s} s (locks in {folder})")
        log.info("waiting for %d free GPUs of %d (locks in %s)", n, len(devices), folder)
        time.sleep(poll_s)
    try:
        yield [d for d, _ in held]
    finally:
        for _, f in held:
            f.close()


@contextlib.contextmanager
def visible_devices(n: int) -> Iterator[list[str] | None]:
    """:func:`claimed_devices`, with ``CUDA_VISIBLE_DEVICES`` set to the claimed GPUs for the
    block (set it before CUDA starts: training ranks and encoding jobs alike)."""
    with claimed_devices(n) as devices:
        if devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
            log.info("claimed GPUs %s (CUDA_VISIBLE_DEVICES)", os.environ["CUDA_VISIBLE_DEVICES"])
        yield devices


# --------------------------------------------------------------------------- stopping early


def slurm_end_time(env: Mapping[str, str] | None = None, runner: Callable = subprocess.run) -> float | None:
    """When this process's Slurm job reaches its time limit (epoch seconds), from ``squeue``;
    None outside a job, without a limit, or when squeue cannot say."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = runner(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True, timeout=60)
        text = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
        log.info("no time limit of Slurm job %s known (%s): the run will not stop before it", job, e)
        return None


def set_stop_deadline(env: dict | None = None, runner: Callable = subprocess.run) -> float | None:
    """Inside a Slurm job, set ``LLMRET_STOP_AT`` (unless set) to the job's end less
    ``LLMRET_STOP_MARGIN_S`` (default 600 s), so the ranks stop, save and requeue before the
    limit: snakemake-executor-plugin-slurm does not pass an ``sbatch --signal`` on to the job's
    program (and a signal to the job's steps would end the Snakemake process inside it)."""
    env = os.environ if env is None else env
    if STOP_AT_ENV in env:
        return float(env[STOP_AT_ENV])
    end = slurm_end_time(env, runner)
    if end is None:
        return None
    deadline = end - float(env.get(STOP_MARGIN_ENV, DEFAULT_STOP_MARGIN_S))
    env[STOP_AT_ENV] = str(deadline)
    log.info("Slurm job ends at %s: training stops at %s", time.ctime(end), time.ctime(deadline))
    return deadline


@contextlib.contextmanager
def forwarded_stop_requests(stop_file: Path) -> Iterator[list[int]]:
    """While the ranks run: SIGTERM or SIGUSR1 to this process creates ``stop_file`` (the ranks
    check it after every step) instead of ending the process, which waits for their save.
    Yields the signals received."""
    received: list[int] = []

    def handler(signum, _frame):
        received.append(signum)
        stop_file.touch()
        log.warning("%s: asking the ranks to save and stop", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def requeue_slurm_job(env: Mapping[str, str] | None = None, runner: Callable = subprocess.run) -> bool:
    """``scontrol requeue`` this process's Slurm job (the plugin keeps waiting for the same job
    id, which reruns and resumes); False outside a job, when ``LLMRET_SLURM_REQUEUE=0``, or
    when Slurm refuses (then Snakemake's retries resubmit the failed job)."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job or env.get(REQUEUE_ENV, "1") == "0":
        return False
    try:
        out = runner(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("could not requeue Slurm job %s: %s", job, e)
        return False
    if out.returncode != 0:
        log.warning("Slurm refused to requeue job %s: %s", job, out.stderr.strip())
        return False
    log.warning("requeued Slurm job %s: it resumes from the checkpoint just saved", job)
    return True


def _ignore_stop_signals() -> None:  # torchrun waits for its ranks' save instead of ending them
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _run_ranks(task: str, kwargs: Mapping[str, Any], nproc: int) -> None:
    """``nproc`` ranks under torchrun; stop requests reach them through a stop file."""
    with tempfile.TemporaryDirectory(prefix="llmret-launch-") as tmp:
        args_path = Path(tmp) / "args.json"
        args_path.write_text(json.dumps(dict(kwargs)))
        stop_file, interrupted = Path(tmp) / "stop", Path(tmp) / "interrupted"
        env = {**os.environ, STOP_FILE_ENV: str(stop_file), INTERRUPTED_FILE_ENV: str(interrupted)}
        env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"  # not SIGTERM: ignored (below)
        cmd = torchrun_command(task, args_path, nproc)
        log.info("launching %d processes: %s", nproc, cmd)
        with forwarded_stop_requests(stop_file):
            proc = subprocess.Popen(cmd, env=env, preexec_fn=_ignore_stop_signals)  # noqa: PLW1509
            rc = proc.wait()
        if rc != 0 and interrupted.is_file():
            state = json.loads(interrupted.read_text())
            raise TrainingInterrupted(state.get("step"), state.get("reason", ""))
    if rc != 0:
        raise RuntimeError(f"{task} under torchrun with {nproc} processes failed (exit code {rc})")


def run(task: str, kwargs: Mapping[str, Any], nproc: int = 1) -> Any:
    """Run ``task(**kwargs)`` here (``nproc`` <= 1 or under a launcher) or in ``nproc``
    processes under torchrun; a failing rank fails the call with torchrun's exit code.
    Outside a scheduler the job first claims ``nproc`` free GPUs (:func:`claimed_devices`).
    A run that stopped early raises :class:`TrainingInterrupted` (exit code 75), after
    requeueing its Slurm job."""
    fn = _target(task)
    if under_launcher():
        return fn(**kwargs)
    set_stop_deadline()
    try:
        with visible_devices(nproc):
            if nproc <= 1:
                return fn(**kwargs)
            _run_ranks(task, kwargs, nproc)
    except TrainingInterrupted:
        requeue_slurm_job()
        raise
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
    """One rank (under torchrun, or under srun for the multi-node form): inside a Slurm job
    its stop deadline comes from the job's time limit; a rank that stopped early ends with
    exit code 75 (:class:`TrainingInterrupted`)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: python -m llmret.launch TASK ARGS.json")
    task, args_path = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_stop_deadline()
    _target(task)(**json.loads(Path(args_path).read_text()))


if __name__ == "__main__":
    main()

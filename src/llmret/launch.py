"""Run a training stage in one process, or in several under ``torchrun`` (one per GPU).

A Snakemake job that gets ``gpu=N`` (N > 1) must start N processes on its node; the rule
scripts call :func:`run`, which either calls the stage directly (N <= 1, or already under
a launcher) or starts ``python -m torch.distributed.run --standalone --nproc-per-node N
-m llmret.launch TASK ARGS.json`` as an argument list (no shell, nothing from the config
pasted into a command line). Every process reads the same JSON arguments; the training
loop (:func:`llmret.training.init_distributed`) picks up the ranks torchrun sets.

Multi-node runs use the same module under the user's launcher, e.g. on Slurm::

    srun torchrun --nnodes $SLURM_NNODES --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 -m llmret.launch pretrain args.json
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The stages a launch may run: a fixed table, so an arguments file cannot name arbitrary code.
TASKS = {
    "pretrain": "llmret.pretraining:pretrain",
    "finetune": "llmret.finetuning:finetune",
}
LAUNCHER_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")


def _target(task: str):
    if task not in TASKS:
        raise ValueError(f"unknown launch task {task!r}; known: {sorted(TASKS)}")
    module, name = TASKS[task].split(":")
    return getattr(importlib.import_module(module), name)


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


def run(task: str, kwargs: Mapping[str, Any], nproc: int = 1) -> Any:
    """Run ``task(**kwargs)`` here (``nproc`` <= 1 or under a launcher) or in ``nproc``
    processes under torchrun; a failing rank fails the call with torchrun's exit code."""
    fn = _target(task)
    if nproc <= 1 or under_launcher():
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: python -m llmret.launch TASK ARGS.json")
    task, args_path = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _target(task)(**json.loads(Path(args_path).read_text()))


if __name__ == "__main__":
    main()

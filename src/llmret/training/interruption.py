"""Stopping a run early, the loop's side: what asks a rank to stop (SIGTERM or SIGUSR1, the
launcher's stop file, the Slurm job's time limit near), the ranks' agreement on the step to
stop after, and the record the launcher reads. The loop then saves a checkpoint at that step
and raises :class:`llmret.launch.TrainingInterrupted` (exit code 75); the rerun resumes.

Design notes: docs/training.md (Stopping early); the launcher's side is :mod:`llmret.launch`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from llmret.atomic_files import atomic_write_text
from llmret.launch import INTERRUPTED_FILE_ENV, STOP_AT_ENV, STOP_FILE_ENV, STOP_SIGNALS, TrainingInterrupted
from llmret.training.distributed import all_reduce_floats

log = logging.getLogger(__name__)


class StopRequests:
    """Why this rank should stop after its current step, if anything asks it to.

    A ``with`` block installs handlers for SIGTERM and SIGUSR1 that only note the signal (the
    step in progress finishes; the previous handlers come back at the end). ``LLMRET_STOP_FILE``
    names a file whose existence asks to stop (the launcher creates it when it is signalled
    itself); ``LLMRET_STOP_AT`` (epoch seconds) is a deadline no step may end after (the
    Slurm job's end less a margin, :func:`llmret.launch.set_stop_deadline`)."""

    def __init__(self, env: Mapping[str, str] | None = None, clock=time.time):
        env = os.environ if env is None else env
        self.signal: str | None = None
        self.stop_file = Path(env[STOP_FILE_ENV]) if env.get(STOP_FILE_ENV) else None
        self.deadline = float(env[STOP_AT_ENV]) if env.get(STOP_AT_ENV) else None
        self.interrupted_file = Path(env[INTERRUPTED_FILE_ENV]) if env.get(INTERRUPTED_FILE_ENV) else None
        self.clock = clock
        self._previous: dict = {}

    def _note(self, signum, _frame) -> None:
        self.signal = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step, then stopping", self.signal)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def check_deadline(self, step: int) -> None:
        """Drop a deadline that has passed before training (re)starts at ``step``, with a
        warning: stopping after every first step would requeue the job forever without progress
        (``LLMRET_STOP_MARGIN_S`` is then longer than the job's time limit allows)."""
        if self.deadline is not None and self.clock() >= self.deadline:
            log.warning("the stop deadline passed before step %d: not stopping early for it", step + 1)
            self.deadline = None

    def reason(self, next_step_s: float = 0.0) -> str | None:
        """This rank's reason to stop now, or None: a signal, the stop file, or a deadline the
        next step (taking ``next_step_s``, the last step's time) would end after."""
        if self.signal:
            return f"signal {self.signal}"
        if self.stop_file is not None and self.stop_file.exists():
            return "the launcher was asked to stop"
        if self.deadline is not None and self.clock() + next_step_s >= self.deadline:
            return "the job's time limit is near"
        return None

    def agreed(self, next_step_s: float, device, world_size: int) -> str | None:
        """A reason to stop that every rank acts on at the same step (a collective call: the
        ranks may be signalled at different moments, and a checkpoint needs them all)."""
        mine = self.reason(next_step_s)
        if world_size == 1:
            return mine
        anyone = all_reduce_floats([1.0 if mine else 0.0], device, world_size, op="MAX")[0]
        return (mine or "another rank was asked to stop") if anyone else None

    def interrupt(self, step: int, reason: str, rank: int) -> TrainingInterrupted:
        """The exception that ends the run after its checkpoint at ``step``; rank 0 first
        records it for the launcher (torchrun reports any failing rank as exit code 1)."""
        if rank == 0 and self.interrupted_file is not None:
            atomic_write_text(self.interrupted_file, json.dumps({"step": step, "reason": reason}))
        log.warning("stopping after step %d (%s); the checkpoint step%d resumes the run", step, reason, step)
        return TrainingInterrupted(step, reason)

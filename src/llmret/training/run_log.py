"""What the training loop reports as it runs: the window of loss values each log line
averages over all ranks, the JSONL training log (rank 0 writes it) and the progress bar.
Kept apart from :mod:`llmret.training.loop` so the loop reads as the run's outline; the log's
fields are described in docs/training.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from llmret.training.distributed import all_reduce_floats


class LossWindow:
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
        vals = all_reduce_floats(vals, device, world_size)
        micro, tokens = vals[-2], vals[-1]
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {k: vals[i] / micro for i, k in enumerate(keys)}, tokens / dt


class JsonlLog:
    """The training log, one JSON record a line, appended to across resumed attempts; a rank
    other than 0 holds a disabled one, so every rank runs the same code."""

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


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar on stderr over the optimizer steps, starting at the resumed step."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr, desc="train", dynamic_ncols=True)


__all__ = ["JsonlLog", "LossWindow", "progress_bar"]

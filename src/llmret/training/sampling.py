"""The deterministic, resumable batch order: per-epoch seeded permutations dealt to ranks,
skipped arithmetically on resume, and per-step reseeding of the random generators.

Design notes: docs/training.md.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

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


def seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed every RNG from (seed, step, rank): dropout etc. replay identically after a resume."""
    s = ((seed * 1_000_003 + step) * 1009 + rank) % (2**63)
    random.seed(s)
    torch.manual_seed(s)  # also every CUDA device
    try:
        import numpy as np

        np.random.seed(s % (2**32))
    except ImportError:  # pragma: no cover
        pass

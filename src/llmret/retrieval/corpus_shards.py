"""Corpus shards: which passages each encode job holds, and the exact merge of per-shard top-k.

A corpus of ``n`` passages is cut into ``count`` contiguous row ranges, one encode job (and
one index) each, so a killed encode resumes at the first missing shard and no job holds
more than one shard's vectors. The count is planned from the config (a dataset's
``corpus_size`` over ``encoding.shard_size``) before the corpus exists, so a dry run shows
every shard job; the ranges come from the real corpus, so a wrong estimate only makes
shards larger or smaller, never wrong. Searching shard by shard and keeping a running
top-k gives exactly the ranking of one index over the whole corpus: see docs/retrieval.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from llmret import schema
from llmret.specs import settings

SHARD_PATTERN = r"[0-9]+-of-[0-9]+"
_SHARD_RE = re.compile(r"(\d+)-of-(\d+)")
NO_ROW = np.iinfo(np.int64).max  # the tie key of an empty slot: after every real row


@dataclass(frozen=True)
@schema.defaults_from("encoding")
class EncodingSpec:
    """How corpora are encoded (the ``encoding`` config section): shards of at most about
    ``shard_size`` passages."""

    shard_size: int

    def __post_init__(self) -> None:
        schema.check_bounds(self, "encoding")

    @classmethod
    def from_config(cls, config: Mapping) -> EncodingSpec:
        """The spec of a workflow config's ``encoding`` section (schema defaults when absent)."""
        return settings(cls, config.get("encoding") or {}, "encoding settings")


def shard_count(corpus_size: int | None, shard_size: int) -> int:
    """Shards for a corpus of ``corpus_size`` passages (None: unknown, one shard); the
    bounds of ``shard_size`` are :class:`EncodingSpec`'s."""
    if not corpus_size:
        return 1
    return max(1, math.ceil(corpus_size / shard_size))


def shard_names(count: int) -> list[str]:
    """File stems of the shards, ``000-of-018`` ...: the count is part of the name, so a
    changed count never mixes with shards of another plan."""
    width = max(3, len(str(count)))
    return [f"{i:0{width}d}-of-{count:0{width}d}" for i in range(count)]


def parse_shard(name: str) -> tuple[int, int]:
    """(index, count) of a shard name."""
    m = _SHARD_RE.fullmatch(name)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"not a shard name like '000-of-004': {name!r}")
    return int(m.group(1)), int(m.group(2))


def shard_rows(n: int, index: int, count: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of shard ``index`` of ``count`` over ``n`` passages (sizes differ by <= 1)."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count} does not exist")
    return n * index // count, n * (index + 1) // count


class TopK:
    """The running best ``k`` (score, document) of each query over shards searched in turn.

    Ties are broken by ``tie`` (a dense shard's global row), as one exact index over the
    whole corpus breaks them (FAISS keeps the lower row), so merging is exact. Memory is
    ``queries x k`` slots, whatever the corpus size.
    """

    def __init__(self, n_queries: int, k: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        self.tie = np.full((n_queries, k), NO_ROW, dtype=np.int64)
        self.docs = np.full((n_queries, k), None, dtype=object)

    def add(self, start: int, scores: np.ndarray, tie: np.ndarray, docs: np.ndarray) -> None:
        """Merge a shard's results for queries ``start .. start + len(scores)``; empty slots
        (FAISS's -1 rows) carry ``tie`` NO_ROW and score -inf."""
        end = start + len(scores)
        s = np.concatenate([self.scores[start:end], scores.astype(np.float32, copy=False)], axis=1)
        t = np.concatenate([self.tie[start:end], tie], axis=1)
        d = np.concatenate([self.docs[start:end], docs], axis=1)
        order = np.lexsort((t, -s), axis=1)[:, : self.k]  # best score first, then lower tie key
        self.scores[start:end] = np.take_along_axis(s, order, axis=1)
        self.tie[start:end] = np.take_along_axis(t, order, axis=1)
        self.docs[start:end] = np.take_along_axis(d, order, axis=1)

    def add_rows(self, start: int, scores: np.ndarray, rows: np.ndarray, offset: int, doc_ids: np.ndarray) -> None:
        """Merge a shard's search results as FAISS returns them: ``rows`` within the shard
        (-1 for none), ``offset`` the shard's first row in the corpus, ``doc_ids`` its ids (an
        object array)."""
        found = rows >= 0
        tie = np.where(found, rows + offset, NO_ROW)
        docs = np.where(found, doc_ids[np.maximum(rows, 0)], None)
        self.add(start, np.where(found, scores, -np.inf), tie, docs)

    @classmethod
    def from_arrays(cls, scores: np.ndarray, tie: np.ndarray, docs: np.ndarray) -> TopK:
        """A top-k already merged elsewhere (queries x k arrays, each row sorted best first,
        ties by ``tie``; empty slots score -inf with tie NO_ROW and doc None)."""
        if not scores.shape == tie.shape == docs.shape or scores.ndim != 2:
            shapes = f"{scores.shape}, {tie.shape}, {docs.shape}"
            raise ValueError(f"scores, tie and docs must be queries x k alike: {shapes}")
        top = cls.__new__(cls)
        top.k = scores.shape[1]
        top.scores = scores.astype(np.float32, copy=False)
        top.tie = tie.astype(np.int64, copy=False)
        top.docs = docs
        return top

    def run(self, query_ids: Sequence[str], drop_identical_ids: bool = False, top_k: int | None = None) -> ArrayRun:
        return ArrayRun(query_ids, self, drop_identical_ids, top_k)


class ArrayRun(Mapping):
    """A run (query id -> [(doc id, score)], best first) read from a :class:`TopK` on access,
    so writing a large run never builds all its Python lists at once. With
    ``drop_identical_ids`` a query's own id is left out (as :func:`llmret.data.trec.drop_identical_ids`)
    and each ranking cut to ``top_k``."""

    def __init__(self, query_ids: Sequence[str], top: TopK, drop_identical_ids: bool = False, top_k: int | None = None):
        if len(query_ids) != len(top.scores):
            raise ValueError(f"{len(query_ids)} query ids for {len(top.scores)} rows of results")
        self._row = {q: i for i, q in enumerate(query_ids)}
        self._top = top
        self._drop = drop_identical_ids
        self._top_k = top_k or top.k

    def __getitem__(self, qid: str) -> list[tuple[str, float]]:
        i = self._row[qid]
        top = self._top
        ranked = [
            (d, float(s))
            for d, s, t in zip(top.docs[i], top.scores[i], top.tie[i], strict=True)
            if t != NO_ROW and not (self._drop and d == qid)
        ]
        return ranked[: self._top_k]

    def __iter__(self):
        return iter(self._row)

    def __len__(self) -> int:
        return len(self._row)

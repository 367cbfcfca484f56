"""Contrastive training machinery shared by fine-tuning and CSPLADE: Tevatron groups and
their sampling, the query-major collator, InfoNCE with in-batch negatives, the gather that
keeps gradients across ranks, and collapse diagnostics.

Design notes: docs/finetuning.md.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import warnings
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmret.data.beir import join_title
from llmret.retrieval.tokenization import pad_id_of, special_frame, tokenize_kind
from llmret.training.mining import check_tevatron_record

BATCH_KEYS = ("query_input_ids", "query_attention_mask", "passage_input_ids", "passage_attention_mask")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TrainGroup:
    """One training query with its passage texts (title joined to text as BEIR baselines do)."""

    query_id: str
    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...]


def _passage_text(p: Mapping) -> str:
    return join_title(p.get("title") or "", p["text"])


def group_from_record(rec: Mapping) -> TrainGroup:
    """One Tevatron record (``query_id``, ``query``, ``positive_passages``, ``negative_passages``)
    as a :class:`TrainGroup`."""
    group = TrainGroup(
        query_id=str(rec["query_id"]),
        query=rec["query"],
        positives=tuple(_passage_text(p) for p in rec["positive_passages"]),
        negatives=tuple(_passage_text(p) for p in rec.get("negative_passages") or ()),
    )
    if not group.positives:
        raise ValueError(f"query {group.query_id!r} has no positive passage")
    return group


def groups_from_records(records: Iterable[Mapping]) -> list[TrainGroup]:
    """Tevatron records to :class:`TrainGroup`s, all in memory (:class:`LazyGroups` reads a
    file's on demand)."""
    out = [group_from_record(rec) for rec in records]
    if not out:
        raise ValueError("no training queries")
    return out


class _Positions:
    """A binary file's lines, remembering the byte range of the line last yielded."""

    def __init__(self, f):
        self.f, self.start, self.end = f, 0, 0

    def __iter__(self) -> Iterator[bytes]:
        for raw in self.f:
            self.start, self.end = self.end, self.end + len(raw)
            yield raw


def _json_object(text: str, where: str) -> dict:
    """A line's JSON object; errors as :func:`llmret.data.beir.jsonl_records` words them."""
    from llmret.data.beir import BeirFormatError

    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise BeirFormatError(f"{where}: invalid JSON at column {e.colno}: {e.msg.removesuffix(' at')}") from None
    if not isinstance(rec, dict):
        raise BeirFormatError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rec


GROUP_INDEX_VERSION = 1


def _scan_groups(path: Path) -> dict[str, np.ndarray]:
    """One streaming pass over a Tevatron JSONL file that validates every line as
    :func:`llmret.training.mining.read_tevatron` does (errors name ``file:line``; repeated
    query ids too) and keeps each group's byte range and line number, and the groups without
    negatives."""
    from llmret.data.beir import decoded_lines

    starts, ends, lines = array("q"), array("q"), array("q")
    no_negatives = array("q")
    first_line: dict[str, int] = {}  # for the repeat check; dropped after the pass
    with open(path, "rb") as f:
        pos = _Positions(f)
        for lineno, text in decoded_lines(path, pos):
            if not text.strip():
                continue
            where = f"{path}:{lineno}"
            ex = _json_object(text, where)
            check_tevatron_record(ex, where)
            qid = ex["query_id"]
            if qid in first_line:
                raise ValueError(f"{where}: duplicate query id {qid!r} (first on line {first_line[qid]})")
            first_line[qid] = lineno
            if not ex["negative_passages"]:
                no_negatives.append(len(starts))
            starts.append(pos.start)
            ends.append(pos.end)
            lines.append(lineno)
        size = pos.end
    if not starts:
        raise ValueError(f"{path}: no training queries")
    out = {k: np.frombuffer(a, dtype=np.int64) for k, a in (("starts", starts), ("ends", ends), ("lines", lines))}
    out["no_negatives"] = np.frombuffer(no_negatives, dtype=np.int64)
    out["size"] = np.array([size], dtype=np.int64)
    return out


def group_index_path(path: Path) -> Path:
    """Where :func:`group_index` keeps a file's index: a hidden file beside it."""
    return path.with_name(f".{path.name}.groups.npz")


def _read_group_index(cache: Path, key: list[int]) -> dict[str, np.ndarray] | None:
    try:
        with np.load(cache, allow_pickle=False) as z:
            if z["key"].tolist() != [GROUP_INDEX_VERSION, *key]:
                return None
            return {k: z[k] for k in ("starts", "ends", "lines", "no_negatives", "size")}
    except (OSError, KeyError, ValueError):
        return None


def group_index(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The validated index of a Tevatron file (:func:`_scan_groups`), built once and shared:
    the first process (of the ranks, of a resumed attempt) validates the file under an
    exclusive ``flock`` and writes the index beside it (:func:`group_index_path`, keyed by the
    file's size, modification time and inode); the others wait for the lock and read it (MBs, not
    another pass over GBs). A folder that cannot be written, or a file system without locks,
    only costs each process its own pass."""
    path = Path(path)
    st = path.stat()
    key = [st.st_size, st.st_mtime_ns, st.st_ino]  # a file replaced (renamed over) has a new inode
    cache = group_index_path(path)
    try:
        lock = open(cache.with_suffix(".lock"), "a")  # noqa: SIM115 - closed below
    except OSError:
        return _scan_groups(path)
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # no locks here: a concurrent process may validate the file too
            pass
        index = _read_group_index(cache, key)
        if index is None:
            index = _scan_groups(path)
            tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}.npz")
            try:
                np.savez(tmp, key=np.array([GROUP_INDEX_VERSION, *key], dtype=np.int64), **index)
                os.replace(tmp, cache)
            except OSError:
                tmp.unlink(missing_ok=True)
        return index


class LazyGroups(Sequence[TrainGroup]):
    """The :class:`TrainGroup`s of a plain Tevatron JSONL file, parsed only when indexed.

    :func:`group_index` validates every line once (errors name ``file:line``; repeated query
    ids too) and keeps, per group, only the byte range and line number of its line (int64
    arrays, 24 bytes a query): a rank holds no more than the groups of its current batch,
    however large the file, and the ranks of a run share one validation pass. ``self[i]``
    reads and re-checks line i, so the sequence equals ``groups_from_records(read_tevatron(path))``
    and training samples exactly the same groups. A file changed after the pass is an error.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = group_index(self.path)
        self._starts, self._ends, self._lines = index["starts"], index["ends"], index["lines"]
        self._no_negatives = index["no_negatives"]
        self._size = int(index["size"][0])

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"group {i} out of range ({n} groups in {self.path})")
        i = int(i) % n
        where = f"{self.path}:{int(self._lines[i])}"
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size != self._size:
                raise ValueError(f"{self.path} changed after it was indexed")
            f.seek(int(self._starts[i]))
            raw = f.read(int(self._ends[i] - self._starts[i]))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 ({e.reason}); the file changed after it was indexed?") from None
        ex = _json_object(text, where)
        check_tevatron_record(ex, where)
        return group_from_record(ex)

    def without_negatives(self) -> list[str]:
        """Query ids of the groups that have no negative passage."""
        return [self[int(i)].query_id for i in self._no_negatives]


def check_negatives(groups: Sequence[TrainGroup], group_size: int) -> None:
    """Fail before training, not at some later step, if a query cannot fill its group."""
    if group_size < 2:
        return
    if isinstance(groups, LazyGroups):
        empty = groups.without_negatives()
    else:
        empty = [g.query_id for g in groups if not g.negatives]
    if empty:
        raise ValueError(f"{len(empty)} queries have no negative passage for group_size={group_size}: {empty[:5]}")


def sample_group(group: TrainGroup, group_size: int, rng: Any = random) -> list[str]:
    """Positive first, then ``group_size - 1`` negatives: without replacement when the query has
    enough, with replacement only when it has fewer (as Tevatron does). ``rng`` is anything with
    ``choice``/``sample``/``choices`` (default: the ``random`` module)."""
    k = group_size - 1
    negatives = list(group.negatives)
    if k == 0:
        chosen: list[str] = []
    elif len(negatives) >= k:
        chosen = rng.sample(negatives, k)
    elif negatives:
        chosen = rng.choices(negatives, k=k)
    else:
        raise ValueError(f"query {group.query_id!r} has no negative passage for group_size={group_size}")
    return [rng.choice(group.positives), *chosen]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, attention_mask)``, both long."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


class GroupCollator:
    """Batch of :class:`TrainGroup`s -> the tensors of the contrastive models' ``forward``.

    Passages are laid out query-major: rows ``i*G .. i*G+G-1`` are query i's group, positive
    first. Sampling uses Python's ``random`` module unless an ``rng`` is given: :func:`train`
    reseeds it from (seed, step, rank) at every optimizer step and, with ``num_workers=0``,
    collates inside that step, so the sampled groups are deterministic and replay identically
    after a resume (worker processes would have their own ``random`` state).
    """

    def __init__(self, tokenizer, spec: Any, rng: random.Random | None = None):
        # ``spec``: a stage's spec (RepLLaMA's FinetuningSpec, CSPLADE's CspladeSpec) with the
        # templates, lengths and ``append_eos`` of tokenize_kind and a ``group_size``.
        self.tokenizer, self.spec, self.rng = tokenizer, spec, rng
        self.head, self.tail = special_frame(tokenizer)
        self.pad_id = pad_id_of(tokenizer)  # as TextEncoder pads

    def tokenize(self, texts: Sequence[str], kind: str) -> list[list[int]]:
        return tokenize_kind(self.tokenizer, self.spec, texts, kind, self.head, self.tail)

    def sample_texts(self, groups: Sequence[TrainGroup]) -> tuple[list[str], list[str]]:
        """(query texts, passage texts query-major with each group's positive first)."""
        rng = self.rng if self.rng is not None else random
        passages = [text for g in groups for text in sample_group(g, self.spec.group_size, rng)]
        return [g.query for g in groups], passages

    def __call__(self, groups: Sequence[TrainGroup]) -> dict[str, torch.Tensor]:
        queries, passages = self.sample_texts(groups)
        q_ids, q_mask = pad_rows(self.tokenize(queries, "query"), self.pad_id)
        p_ids, p_mask = pad_rows(self.tokenize(passages, "passage"), self.pad_id)
        return dict(zip(BATCH_KEYS, (q_ids, q_mask, p_ids, p_mask), strict=True))


def count_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Non-pad tokens of queries and passages (masks, since the pad id may be the EOS id)."""
    return int(batch["query_attention_mask"].sum() + batch["passage_attention_mask"].sum())


# --------------------------------------------------------------------------- loss


def info_nce(
    q: torch.Tensor,
    p: torch.Tensor,
    temperature: float,
    group_size: int,
    in_batch: bool = True,
    offset: int = 0,
) -> torch.Tensor:
    """Mean cross-entropy of each query's positive among its candidates.

    ``q`` (n, d) are queries ``offset .. offset+n-1`` of the global batch, ``p`` (N*G, d) its
    passages, query-major with the positive first, so query i's positive is row
    ``(offset + i) * group_size``. With ``in_batch`` every row of ``p`` is a candidate
    (``q @ p.T / temperature``); without, each query scores its own group only.
    """
    n = q.shape[0]
    if p.shape[0] % group_size or p.shape[0] < (offset + n) * group_size:
        raise ValueError(f"{p.shape[0]} passages do not hold groups of {group_size} for queries {offset}..{offset + n}")
    q, p = q.float(), p.float()
    if in_batch:
        scores = q @ p.T / temperature
        target = (offset + torch.arange(n, device=q.device)) * group_size
    else:
        own = p[offset * group_size : (offset + n) * group_size].view(n, group_size, -1)
        scores = torch.einsum("nd,ngd->ng", q, own) / temperature
        target = torch.zeros(n, dtype=torch.long, device=q.device)
    return F.cross_entropy(scores, target)


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine between distinct rows of ``x`` (n >= 2). Near 1 when the embeddings have
    collapsed onto one direction: at temperature 0.01 InfoNCE can fall from a confidently
    wrong start to ln(candidates) that way, a loss that alone looks like learning."""
    n = x.shape[0]
    if n < 2:
        raise ValueError("mean_pairwise_cosine needs at least two rows")
    x = F.normalize(x.detach().float(), dim=-1)
    total = (x.sum(0) ** 2).sum() - (x * x).sum()  # sum over i != j of x_i . x_j
    return float(total / (n * (n - 1)))


def top1_accuracy(q: torch.Tensor, p: torch.Tensor, group_size: int) -> float:
    """Fraction of the local queries whose positive (row ``i * group_size`` of the local
    passages) outscores every local passage: the in-batch retrieval the loss trains."""
    scores = q.detach().float() @ p.detach().float().T
    target = torch.arange(q.shape[0], device=q.device) * group_size
    return float((scores.argmax(1) == target).float().mean())


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of ``x`` from all ranks, concatenated in rank order; this rank's first row).

    The gather keeps the autograd graph (``torch.distributed.nn.functional.all_gather``): its
    backward sums, into each rank's own rows, the gradients every rank's loss sends them, so
    after DeepSpeed averages gradients over ranks they are those of the global mean loss.
    A single process (or no process group) gets ``x`` itself.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in torch 2.13 in favour of a private module
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(x)
    rank = dist.get_rank()
    return torch.cat(parts), sum(t.shape[0] for t in parts[:rank])


def training_seed(training: Mapping) -> int:
    """The ``seed`` of a training mapping (TrainingArgs' default when unset)."""
    from llmret.training.arguments import TrainingArgs

    return int(training.get("seed", TrainingArgs.seed))


# --------------------------------------------------------------------------- workflow stage


def load_groups(path: str | os.PathLike) -> Sequence[TrainGroup]:
    """The Tevatron JSONL file of mined negatives as :class:`TrainGroup`s: a :class:`LazyGroups`
    (validated, read on demand) for a plain file, the stages' own; a gzip file (no random
    access) is read whole into a list. Both validate with file:line errors."""
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    if not gzipped:
        return LazyGroups(path)
    from llmret.training.mining import read_tevatron

    return groups_from_records(read_tevatron(path))

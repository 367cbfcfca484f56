"""Top-k retrieval over learned sparse vectors behind one :class:`SparseIndexSpec`: an exact
scorer (sparse matrix product, ties by document id; the default) and Seismic's approximate
inverted index for large corpora (its API calls: :mod:`llmret.retrieval.seismic_engine`);
index folders written atomically.

Design notes (engine choice, knobs, measurements): docs/retrieval.md.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from llmret import schema
from llmret.retrieval.seismic_engine import build_seismic, load_seismic, seismic_search, seismic_version
from llmret.retrieval.sparse_vectors import check_sparse, load_sparse, save_sparse
from llmret.specs import settings

log = logging.getLogger(__name__)

Run = dict[str, list[tuple[str, float]]]
ENGINES = ("seismic", "exact")
INDEX_FORMAT = "llmret-sparse-index/1"
META_FILE = "llmret_sparse_index.json"
DOC_IDS_FILE = "doc_ids.txt"
VECTORS_FILE = "vectors.safetensors"  # exact engine: the documents themselves
SEISMIC_STEM = "seismic"  # Seismic appends ".index.seismic"
SEISMIC_FILE = SEISMIC_STEM + ".index.seismic"

BUILD_KEYS = ("n_postings", "max_fraction", "centroid_fraction", "min_cluster_size", "summary_energy", "doc_cut")
SEARCH_KEYS = ("query_cut", "heap_factor", "first_sorted")


@dataclass(frozen=True)
@schema.defaults_from("systems.sparse.sparse_index")
class SparseIndexSpec:
    """How a sparse index is built and searched (one system's ``sparse_index`` settings).

    Seismic defaults follow its authors' guidelines for high recall on MS MARCO SPLADE
    vectors (8.8M passages); smaller corpora want a smaller ``n_postings``. ``n_postings=0``
    keeps every posting, ``query_cut=0`` uses every query term and ``heap_factor=0`` never
    skips a block: together (:meth:`exhaustive`) they make Seismic exact.
    """

    # "exact" | "seismic" (docs/retrieval.md: when Seismic pays off)
    engine: str
    # The schema gives the knobs no default (a key left out of the config is not filled in): these are theirs.
    # seismic build: posting pruning, then k-means blocks with summaries per list
    n_postings: int = 3000  # mean postings kept per term (0: keep all)
    max_fraction: float = 6.0  # cap on one list: n_postings * max_fraction
    centroid_fraction: float = 0.2  # blocks per list, as a fraction of its postings
    min_cluster_size: int = 2
    summary_energy: float = 0.5  # share of a block summary's L1 mass kept
    doc_cut: int = 15  # document terms used to assign it to a block
    # seismic search
    query_cut: int = 10  # query terms (of those in the corpus) whose lists are scanned, heaviest first (0: all)
    heap_factor: float = 0.8  # skip a block when its summary score < heap_factor * k-th score
    first_sorted: bool = False  # visit the first list's blocks best first (faster, less exact)

    def __post_init__(self) -> None:
        # a fraction above 1 keeps this wording (tests/test_sparse_index.py); the schema's bounds check the rest
        for name in ("centroid_fraction", "summary_energy"):
            value = getattr(self, name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > 1.0:
                raise ValueError(f"sparse_index {name} must be a number in [0.0, 1.0], got {value!r}")
        schema.check_bounds(self, "systems.sparse.sparse_index", "sparse_index ")

    @classmethod
    def from_config(cls, cfg: Mapping) -> SparseIndexSpec:
        return settings(cls, cfg, "sparse_index settings")

    @classmethod
    def exhaustive(cls, **over: Any) -> SparseIndexSpec:
        """Seismic settings that return the exact top-k (up to float16 weights)."""
        return cls(**{"engine": "seismic", "n_postings": 0, "query_cut": 0, "heap_factor": 0.0, **over})

    def build_params(self) -> dict:
        return {k: getattr(self, k) for k in BUILD_KEYS} if self.engine == "seismic" else {}

    def search_params(self) -> dict:
        return {k: getattr(self, k) for k in SEARCH_KEYS} if self.engine == "seismic" else {}


@dataclass
class SparseIndex:
    """A built or loaded index: the engine's object plus what is needed to name its results."""

    spec: SparseIndexSpec
    doc_ids: list[str]
    vocab_size: int
    nnz: int
    engine_index: Any  # seismic.SeismicIndex(LV) | scipy CSR of the documents (exact)
    info: dict = field(default_factory=dict)  # engine version, effective build settings
    path: Path | None = None  # folder it was written to or read from
    _postings: sp.csr_matrix | None = field(default=None, repr=False)  # exact: documents transposed, made once

    def postings(self) -> sp.csr_matrix:
        """Exact engine: the term x document matrix that queries multiply (an inverted index)."""
        if self._postings is None:
            self._postings = self.engine_index.T.tocsr()
        return self._postings


# --------------------------------------------------------------------------------------
# Exact scoring (the reference)
# --------------------------------------------------------------------------------------


def _id_ranks(ids: Sequence[str]) -> np.ndarray:
    """Position of each id in string order: the tie-breaker between equal scores."""
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    ranks = np.empty(len(ids), dtype=np.int64)
    ranks[order] = np.arange(len(ids))
    return ranks


def _top_k_positions(cols: np.ndarray, vals: np.ndarray, k: int, id_rank: np.ndarray) -> np.ndarray:
    """Positions of the k best positive scores in ``vals``, score descending then id ascending."""
    keep = np.flatnonzero(vals > 0)
    if len(keep) > k:
        kth = np.partition(vals[keep], len(keep) - k)[len(keep) - k]
        keep = keep[vals[keep] >= kth]  # every tie at the k-th score competes on id
    order = np.lexsort((id_rank[cols[keep]], -vals[keep]))[:k]
    return keep[order]


def exact_search(
    docs: sp.spmatrix,
    doc_ids: Sequence[str],
    queries: sp.spmatrix,
    query_ids: Sequence[str],
    k: int = 1000,
    batch_size: int = 32,
    show_progress: bool = False,
) -> Run:
    """Exact top-k by inner product, in query order; docs/retrieval.md has the ties and zeros."""
    docs = check_sparse(docs, doc_ids, "documents")
    queries = check_sparse(queries, query_ids, "queries")
    if queries.shape[1] != docs.shape[1]:
        raise ValueError(f"queries have vocabulary size {queries.shape[1]}, documents {docs.shape[1]}")
    return _exact(docs.T.tocsr(), list(doc_ids), queries, list(query_ids), k, batch_size, show_progress)


def _exact(
    docs_t: sp.csr_matrix,
    doc_ids: list[str],
    queries: sp.csr_matrix,
    query_ids: list[str],
    k: int,
    batch_size: int,
    show_progress: bool,
) -> Run:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    id_rank = _id_ranks(doc_ids)
    out: Run = {}
    for start in tqdm(range(0, len(query_ids), batch_size), desc="exact search", disable=not show_progress):
        scores = (queries[start : start + batch_size] @ docs_t).tocsr()  # batch x docs, float32
        for row, qid in enumerate(query_ids[start : start + batch_size]):
            lo, hi = scores.indptr[row], scores.indptr[row + 1]
            cols, vals = scores.indices[lo:hi], scores.data[lo:hi]
            top = _top_k_positions(cols, vals, k, id_rank)
            out[qid] = [(doc_ids[c], v) for c, v in zip(cols[top].tolist(), vals[top].tolist(), strict=True)]
    return out


# --------------------------------------------------------------------------------------
# Build, write, read
# --------------------------------------------------------------------------------------


def build_sparse_index(docs: sp.spmatrix, doc_ids: Sequence[str], spec: SparseIndexSpec | None = None) -> SparseIndex:
    """Index the rows of ``docs`` (named by ``doc_ids``) with the engine ``spec`` names."""
    spec = spec or SparseIndexSpec()
    csr = check_sparse(docs, doc_ids, "documents")
    if csr.shape[0] == 0:
        raise ValueError("documents: need at least one vector to index")
    ids = list(doc_ids)
    vocab = int(csr.shape[1])
    info: dict = {"engine_version": seismic_version() if spec.engine == "seismic" else None}
    if spec.engine == "exact":
        engine_index: Any = csr
    else:
        engine_index = build_seismic(csr, spec.build_params(), info)
    index = SparseIndex(spec, ids, vocab, int(csr.nnz), engine_index, info)
    log.info("built sparse index %s", describe_sparse_index(index))
    return index


def write_sparse_index(index: SparseIndex, folder: str | Path) -> None:
    """Write ``index`` as the folder ``folder``, atomically (built aside, then renamed)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if index.spec.engine == "exact":
            save_sparse(tmp / VECTORS_FILE, index.engine_index, index.doc_ids)
        else:
            index.engine_index.save(str(tmp / SEISMIC_STEM))
            if not (tmp / SEISMIC_FILE).is_file():
                raise RuntimeError(f"Seismic did not write {tmp / SEISMIC_FILE}")
            (tmp / DOC_IDS_FILE).write_text("".join(f"{i}\n" for i in index.doc_ids), encoding="utf-8")
        meta = {
            "format": INDEX_FORMAT,
            "engine": index.spec.engine,
            "build": index.spec.build_params(),
            "search": index.spec.search_params(),
            "n_docs": len(index.doc_ids),
            "nnz": index.nnz,
            "vocab_size": index.vocab_size,
            **index.info,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    index.path = folder


def read_sparse_index(folder: str | Path, spec: SparseIndexSpec | None = None) -> SparseIndex:
    """Read an index folder; with ``spec``, check its build settings match and take its search settings."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: not a sparse index (no {META_FILE}; an interrupted write leaves none)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not {INDEX_FORMAT!r}")
    engine = meta["engine"]
    stored = SparseIndexSpec(engine=engine, **meta["build"], **meta["search"])
    info = {k: v for k, v in meta.items() if k not in ("format", "engine", "build", "search", "n_docs", "nnz")}
    info.pop("vocab_size")
    if engine == "exact":
        vectors = load_sparse(folder / VECTORS_FILE)
        doc_ids, engine_index = vectors.ids, vectors.matrix
    else:
        doc_ids = (folder / DOC_IDS_FILE).read_text(encoding="utf-8").splitlines()
        engine_index = load_seismic(folder / SEISMIC_FILE, meta)
    if len(doc_ids) != meta["n_docs"]:
        raise ValueError(f"{folder}: holds {len(doc_ids)} document ids, {META_FILE} says {meta['n_docs']}")
    index = SparseIndex(stored, doc_ids, int(meta["vocab_size"]), int(meta["nnz"]), engine_index, info, folder)
    if spec is not None:
        configure_search(index, spec)
    return index


def configure_search(index: SparseIndex, spec: SparseIndexSpec) -> SparseIndex:
    """Search ``index`` with ``spec``'s search settings; its engine and build settings must match."""
    if spec.engine != index.spec.engine:
        raise ValueError(f"sparse_index engine {spec.engine!r} asked of a {index.spec.engine!r} index {index.path}")
    for key, built in index.spec.build_params().items():
        if getattr(spec, key) != built:
            raise ValueError(
                f"sparse_index {key}={getattr(spec, key)!r} but the index {index.path or ''} was built with "
                f"{built!r}: rebuild it"
            )
    index.spec = replace(index.spec, **spec.search_params())
    return index


# --------------------------------------------------------------------------------------
# Search and description
# --------------------------------------------------------------------------------------


def search_sparse(
    index: SparseIndex,
    queries: sp.spmatrix,
    query_ids: Sequence[str],
    k: int = 1000,
    spec: SparseIndexSpec | None = None,
    batch_size: int = 1024,
    show_progress: bool = True,
) -> Run:
    """Top-k documents per query, best first, as a dict in ``query_ids`` order.

    Scores tied within the returned list are ordered by document id. With ``spec`` its
    search settings are applied first (see :func:`configure_search`).
    """
    if spec is not None:
        configure_search(index, spec)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = check_sparse(queries, query_ids, "queries")
    if q.shape[1] != index.vocab_size:
        raise ValueError(f"queries have vocabulary size {q.shape[1]}, the index {index.vocab_size}")
    qids = list(query_ids)
    if index.spec.engine == "exact":
        return _exact(index.postings(), index.doc_ids, q, qids, k, 32, show_progress)
    out: Run = {}
    for start in tqdm(range(0, len(qids), batch_size), desc="sparse search", disable=not show_progress):
        batch_q, batch_ids = q[start : start + batch_size], qids[start : start + batch_size]
        out.update(seismic_search(index.engine_index, index.doc_ids, batch_q, batch_ids, k, index.spec.search_params()))
    return out


def index_size_bytes(folder: str | Path) -> int:
    """Bytes of every file under ``folder`` (the index's size on disk)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def search_sparse_shards(
    index_paths: Sequence[str | Path],
    queries: sp.spmatrix,
    query_ids: Sequence[str],
    k: int,
    spec: SparseIndexSpec | None = None,
    show_progress: bool = True,
) -> tuple[Run, dict]:
    """Top-k over a sharded corpus, one shard's index in memory at a time, and a description
    of the index. Exact search breaks ties by document id in every shard, so keeping the
    best k by (score, id) over the shards is exactly one index's top-k."""
    if not index_paths:
        raise ValueError("no shard index to search")
    merged: Run = {}
    info: dict = {}
    n_docs = nnz = size = 0
    for path in index_paths:
        index = read_sparse_index(path, spec)
        run = search_sparse(index, queries, query_ids, k=k, show_progress=show_progress)
        for qid, ranked in run.items():
            merged[qid] = heapq.nsmallest(k, merged.get(qid, []) + ranked, key=lambda x: (-x[1], x[0]))
        info = describe_sparse_index(index)
        n_docs, nnz, size = n_docs + info["n_docs"], nnz + info["nnz"], size + info.get("size_bytes", 0)
        del index
    return merged, {**info, "n_docs": n_docs, "nnz": nnz, "size_bytes": size, "shards": len(index_paths)}


def describe_sparse_index(index: SparseIndex) -> dict:
    """Engine, settings and sizes of an index, small enough for a run file's header."""
    info = {
        "engine": index.spec.engine,
        **index.spec.build_params(),
        **index.spec.search_params(),
        "n_docs": len(index.doc_ids),
        "nnz": index.nnz,
        "vocab_size": index.vocab_size,
        **{k: v for k, v in index.info.items() if v is not None},
    }
    if index.path is not None:
        info["size_bytes"] = index_size_bytes(index.path)
    return info


__all__ = [
    "ENGINES",
    "SparseIndex",
    "SparseIndexSpec",
    "build_sparse_index",
    "configure_search",
    "describe_sparse_index",
    "exact_search",
    "index_size_bytes",
    "read_sparse_index",
    "search_sparse",
    "search_sparse_shards",
    "write_sparse_index",
]

"""Top-k dense search over a sharded corpus: exact search reads the stored shard vectors
(no index file), approximate search reads each shard's FAISS index.

Three ways, one result shape (a :class:`~llmret.retrieval.corpus_shards.TopK` and a
description for the run's header), one shard in memory at a time:

- exact on the CPU (:func:`exact_search_shards`): FAISS's flat inner-product kernel on the
  loaded float32 vectors, the very call a flat FAISS index makes, in the same query batches,
  so the ranking is the one a per-shard ``IndexFlatIP`` gave (ties: lower row first);
- exact on a GPU (:func:`torch_search_shards`), for the training queries of hard-negative
  mining: a matrix product and ``topk`` per shard and query batch on the device, float16 on
  CUDA (float32 on the CPU, where the same code is tested), merged with the running top-k
  kept on the device; scores are float16-rounded, so near-equal candidates may swap places;
- approximate (``ivf`` / ``hnsw``, :func:`llmret.retrieval.faiss_index.search_shards`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from llmret.retrieval import faiss_index
from llmret.retrieval.corpus_shards import NO_ROW, TopK
from llmret.retrieval.faiss_index import IndexSpec, read_ids

log = logging.getLogger(__name__)

# Query batches of the CPU search: the ones a FAISS flat index was searched with, so
# FAISS takes the same code path (its BLAS or its direct kernel) and the scores are the same bits.
CPU_BATCH = 256
# Query batches on the device: a batch's scores against a 500k-passage shard in float16 are 1 GB.
DEVICE_BATCH = 1024


def search_device(gpus: int, spec: IndexSpec) -> str:
    """Where an exact search runs: ``cuda`` when the job has GPUs and ``use_gpu``, else
    ``cpu``. A job given GPUs that sees none fails rather than crawl on the CPU."""
    if gpus <= 0 or not spec.exact or not spec.use_gpu:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            f"the search job asked for {gpus} GPU(s) (the system's gpus setting) but torch sees no CUDA device; "
            "set gpus: 0, or index use_gpu: false, to search on the CPU"
        )
    return "cuda"


def set_threads(threads: int | None) -> None:
    """Bound FAISS's and torch's CPU threads to the job's."""
    if not threads:
        return
    import faiss
    import torch

    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)


def search(
    shard_paths: Sequence[str | Path],
    ids_paths: Sequence[str | Path],
    query_vectors: np.ndarray,
    query_ids: Sequence[str],
    k: int,
    spec: IndexSpec,
    device: str = "cpu",
    show_progress: bool = True,
) -> tuple[TopK, dict]:
    """Top-k of every query over the shards, and a description of the search. ``shard_paths``
    are the stored vectors (``.npy``) for exact search, FAISS files for ``ivf``/``hnsw``."""
    if spec.exact:
        if device == "cpu":
            return exact_search_shards(shard_paths, ids_paths, query_vectors, query_ids, k, show_progress=show_progress)
        return torch_search_shards(
            shard_paths, ids_paths, query_vectors, query_ids, k, device=device, show_progress=show_progress
        )
    return faiss_index.search_shards(
        shard_paths, ids_paths, query_vectors, query_ids, k, spec=spec, show_progress=show_progress
    )


def load_shard(path: str | Path) -> np.ndarray:
    """A shard's stored vectors as they are on disk (float32 or float16), memory-mapped."""
    vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    if vectors.ndim != 2 or 0 in vectors.shape:
        raise ValueError(f"{path}: need a non-empty 2-D array of vectors, got shape {vectors.shape}")
    return vectors


def _shard_ids(vectors: np.ndarray, vectors_path, ids_path) -> np.ndarray:
    doc_ids = np.array(read_ids(ids_path), dtype=object)
    if len(doc_ids) != len(vectors):
        raise ValueError(f"{vectors_path} holds {len(vectors)} vectors but {ids_path} lists {len(doc_ids)} ids")
    return doc_ids


def _check(shard_paths, ids_paths, query_vectors) -> None:
    if len(shard_paths) != len(ids_paths) or not shard_paths:
        raise ValueError(f"{len(shard_paths)} vector shards for {len(ids_paths)} id files")
    if np.ndim(query_vectors) != 2:
        raise ValueError(f"query vectors must be a 2-D array, got shape {np.shape(query_vectors)}")


def _describe(ntotal: int, dim: int, shards: int, **extra) -> dict:
    """The run header's description: the keys a flat FAISS index's description had."""
    return {"type": "flat", "ntotal": ntotal, "dim": dim, "metric": "inner_product", **extra, "shards": shards}


def exact_search_shards(
    vector_paths: Sequence[str | Path],
    ids_paths: Sequence[str | Path],
    query_vectors: np.ndarray,
    query_ids: Sequence[str],
    k: int,
    batch_size: int = CPU_BATCH,
    show_progress: bool = True,
) -> tuple[TopK, dict]:
    """Exact top-k on the CPU: each shard's stored vectors loaded as float32 and searched with
    FAISS's flat inner-product kernel (``faiss.knn``, what ``IndexFlatIP.search`` runs), to
    depth k, merged into a running top-k (ties: lower row first). Memory: one shard's float32
    vectors and the top-k, as a flat index's was, with no index file on disk."""
    import faiss

    _check(vector_paths, ids_paths, query_vectors)
    q = np.ascontiguousarray(query_vectors, dtype=np.float32)
    top = TopK(len(query_ids), k)
    offset = 0
    for vectors_path, ids_path in zip(vector_paths, ids_paths, strict=True):
        stored = load_shard(vectors_path)
        doc_ids = _shard_ids(stored, vectors_path, ids_path)
        if stored.shape[1] != q.shape[1]:
            raise ValueError(f"{vectors_path} holds {stored.shape[1]}-dim vectors, the queries {q.shape[1]}-dim")
        docs = np.ascontiguousarray(stored, dtype=np.float32)
        depth = min(k, len(docs))
        desc = f"search {Path(vectors_path).stem}"
        for start in tqdm(range(0, len(q), batch_size), desc=desc, mininterval=5.0, disable=not show_progress):
            scores, rows = faiss.knn(q[start : start + batch_size], docs, depth, metric=faiss.METRIC_INNER_PRODUCT)
            top.add_rows(start, scores, rows, offset, doc_ids)
        offset += len(docs)
        del docs, stored
    return top, _describe(offset, q.shape[1], len(vector_paths), gpu=False)


def torch_search_shards(
    vector_paths: Sequence[str | Path],
    ids_paths: Sequence[str | Path],
    query_vectors: np.ndarray,
    query_ids: Sequence[str],
    k: int,
    device: str = "cuda",
    dtype: str | None = None,
    batch_size: int = DEVICE_BATCH,
    show_progress: bool = True,
) -> tuple[TopK, dict]:
    """Exact (brute-force) top-k with torch: each shard's vectors moved to ``device`` in
    ``dtype`` (default float16 on a GPU, float32 on the CPU), every query batch scored with one
    matrix product and cut with ``topk``, merged with the running top-k on the device (ties:
    lower row first). Document ids are attached at the end, one shard's ids at a time."""
    import torch

    _check(vector_paths, ids_paths, query_vectors)
    dtype = dtype or ("float32" if device == "cpu" else "float16")
    tdtype = getattr(torch, dtype)
    n = len(query_ids)
    best = torch.full((n, k), float("-inf"), dtype=torch.float32, device=device)
    rows = torch.full((n, k), NO_ROW, dtype=torch.int64, device=device)
    sizes = []
    with torch.inference_mode():
        for vectors_path, ids_path in zip(vector_paths, ids_paths, strict=True):
            stored = load_shard(vectors_path)
            _shard_ids(stored, vectors_path, ids_path)  # the counts agree
            if stored.shape[1] != query_vectors.shape[1]:
                raise ValueError(
                    f"{vectors_path} holds {stored.shape[1]}-dim vectors, the queries {query_vectors.shape[1]}-dim"
                )
            docs = torch.from_numpy(np.array(stored)).to(device=device, dtype=tdtype)
            depth = min(k, len(docs))
            desc = f"search {Path(vectors_path).stem} ({device})"
            for start in tqdm(range(0, n, batch_size), desc=desc, mininterval=5.0, disable=not show_progress):
                batch = np.ascontiguousarray(query_vectors[start : start + batch_size])
                q = torch.from_numpy(batch).to(device=device, dtype=tdtype)
                scores, found = torch.topk(q @ docs.T, depth, dim=1)
                _merge(best, rows, start, scores.float(), found + sum(sizes))
            sizes.append(len(docs))
            del docs, stored
        scores, tie = best.cpu().numpy(), rows.cpu().numpy()
    docs_out = np.full(tie.shape, None, dtype=object)
    offset = 0
    for ids_path, size in zip(ids_paths, sizes, strict=True):
        doc_ids = np.array(read_ids(ids_path), dtype=object)
        here = (tie >= offset) & (tie < offset + size)
        docs_out[here] = doc_ids[tie[here] - offset]
        offset += size
    info = _describe(offset, int(query_vectors.shape[1]), len(vector_paths), gpu=device != "cpu", precision=dtype)
    return TopK.from_arrays(scores, tie, docs_out), info


def _merge(best, rows, start: int, scores, found) -> None:
    """Merge a batch's candidates into the running top-k rows ``start ..`` on the device:
    best score first, equal scores by lower row (two stable sorts: by row, then by score)."""
    import torch

    end = start + len(scores)
    s = torch.cat([best[start:end], scores], dim=1)
    r = torch.cat([rows[start:end], found], dim=1)
    order = torch.argsort(r, dim=1, stable=True)
    s, r = s.gather(1, order), r.gather(1, order)
    order = torch.argsort(s, dim=1, descending=True, stable=True)[:, : best.shape[1]]
    best[start:end] = s.gather(1, order)
    rows[start:end] = r.gather(1, order)

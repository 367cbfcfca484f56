"""Dense vectors on disk and exact inner-product search with FAISS.

Embeddings are stored as ``.npy`` (float32) next to a text file of ids, one per line, so
any tool can read them; the FAISS index is a separate cached artifact built from them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


def save_embeddings(vectors: np.ndarray, ids: Sequence[str], npy_path: str | Path, ids_path: str | Path) -> None:
    if len(ids) != vectors.shape[0]:
        raise ValueError(f"{len(ids)} ids for {vectors.shape[0]} vectors")
    npy_path, ids_path = Path(npy_path), Path(ids_path)
    npy_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = npy_path.with_name(f".{npy_path.name}.tmp.npy")
    np.save(tmp, vectors.astype(np.float32, copy=False))
    os.replace(tmp, npy_path)
    tmp_ids = ids_path.with_name(f".{ids_path.name}.tmp")
    tmp_ids.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    os.replace(tmp_ids, ids_path)


def load_embeddings(npy_path: str | Path, ids_path: str | Path) -> tuple[np.ndarray, list[str]]:
    vectors = np.load(npy_path, allow_pickle=False)
    ids = Path(ids_path).read_text(encoding="utf-8").splitlines()
    if len(ids) != vectors.shape[0]:
        raise ValueError(f"{ids_path} has {len(ids)} ids but {npy_path} holds {vectors.shape[0]} vectors")
    return vectors, ids


def build_flat_ip(vectors: np.ndarray):
    """Exact inner-product index (cosine when the vectors are L2-normalised)."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def write_index(index, path: str | Path) -> None:
    import faiss

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def read_index(path: str | Path):
    import faiss

    return faiss.read_index(str(path))


def search(
    index,
    doc_ids: Sequence[str],
    query_vectors: np.ndarray,
    query_ids: Sequence[str],
    k: int = 1000,
    batch_size: int = 256,
    show_progress: bool = True,
) -> dict[str, list[tuple[str, float]]]:
    """Top-k documents per query, best first; k is capped at the corpus size."""
    if index.ntotal != len(doc_ids):
        raise ValueError(f"index holds {index.ntotal} vectors but {len(doc_ids)} document ids were given")
    k = min(k, index.ntotal)
    q = np.ascontiguousarray(query_vectors, dtype=np.float32)
    out: dict[str, list[tuple[str, float]]] = {}
    for start in tqdm(range(0, len(query_ids), batch_size), desc="search", mininterval=5.0, disable=not show_progress):
        scores, rows = index.search(q[start : start + batch_size], k)
        for qid, srow, irow in zip(query_ids[start : start + batch_size], scores, rows, strict=True):
            out[qid] = [(doc_ids[i], float(s)) for s, i in zip(srow, irow, strict=True) if i >= 0]
    return out

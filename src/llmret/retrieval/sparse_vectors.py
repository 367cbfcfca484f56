"""Learned sparse vectors (SPLADE / CSPLADE) on disk, with their ids, as one safetensors file.

A set of vectors is a SciPy CSR matrix (rows = texts, columns = vocabulary token ids,
non-negative float32 weights) plus one id per row. The file holds the CSR arrays
(``indptr`` int64, ``indices`` int32, ``data`` float32), the shape, and the ids as UTF-8
bytes joined by newlines in a ``uint8`` tensor: safetensors caps its JSON header at
100 MB, which the ids of a large corpus (MS MARCO: 8.8M) would pass, so they travel as
an array. No pickle anywhere; writes go to a temporary file renamed into place, so a
file that exists is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

FORMAT = "llmret-sparse-vectors/1"
# indices are stored as int32: a vocabulary is far below 2**31 entries.
MAX_VOCAB = 2**31 - 1


@dataclass
class SparseVectors:
    """Rows of ``matrix`` are the vectors of ``ids``, in that order."""

    matrix: sp.csr_matrix
    ids: list[str]

    @property
    def vocab_size(self) -> int:
        return int(self.matrix.shape[1])


def check_sparse(matrix: sp.spmatrix, ids: Sequence[str], where: str, copy: bool = True) -> sp.csr_matrix:
    """Validate vectors and ids; return a canonical float32 CSR matrix (sorted indices, no stored zeros).

    ``where`` names the file or argument in error messages, so a bad input is traced to its source.
    With ``copy=False`` a float32 CSR input is canonicalised in place (saves memory on large corpora).
    """
    if not sp.issparse(matrix) or matrix.ndim != 2:
        raise ValueError(f"{where}: expected a 2-D scipy sparse matrix, got {type(matrix).__name__}")
    n, vocab = matrix.shape
    if vocab == 0 or vocab > MAX_VOCAB:
        raise ValueError(f"{where}: vocabulary size must be in 1..{MAX_VOCAB}, got {vocab}")
    if len(ids) != n:
        raise ValueError(f"{where}: {len(ids)} ids for {n} vectors")
    if not all(isinstance(i, str) for i in ids) or len("\n".join(ids).split()) != n:  # fast path over millions
        bad = next(i for i in ids if not isinstance(i, str) or not i or i.split() != [i])
        raise ValueError(f"{where}: ids must be non-empty strings without whitespace, got {bad!r}")
    if len(set(ids)) != n:
        dup = next(i for i, c in _counts(ids).items() if c > 1)
        raise ValueError(f"{where}: duplicate id {dup!r}")
    csr = sp.csr_matrix(matrix, dtype=np.float32, copy=copy)
    csr.sum_duplicates()  # also sorts indices
    data = csr.data
    if not np.all(np.isfinite(data)):
        row = _row_of(csr, np.flatnonzero(~np.isfinite(data))[0])
        raise ValueError(f"{where}: vector {ids[row]!r} holds a NaN or infinite weight")
    if np.any(data < 0):
        row = _row_of(csr, np.flatnonzero(data < 0)[0])
        raise ValueError(f"{where}: vector {ids[row]!r} holds a negative weight (sparse weights must be >= 0)")
    csr.eliminate_zeros()
    return csr


def _counts(ids: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in ids:
        out[i] = out.get(i, 0) + 1
    return out


def _row_of(csr: sp.csr_matrix, position: int) -> int:
    return int(np.searchsorted(csr.indptr, position, side="right") - 1)


def save_sparse(path: str | Path, matrix: sp.spmatrix, ids: Sequence[str]) -> None:
    """Validate and write ``matrix`` with ``ids`` to ``path`` (safetensors), atomically."""
    from safetensors.numpy import save_file

    path = Path(path)
    csr = check_sparse(matrix, ids, f"vectors for {path}")
    tensors = {
        "indptr": csr.indptr.astype(np.int64),
        "indices": csr.indices.astype(np.int32),
        "data": csr.data.astype(np.float32),
        "ids": np.frombuffer("\n".join(ids).encode("utf-8"), dtype=np.uint8).copy(),
    }
    meta = {"format": FORMAT, "shape": json.dumps([int(s) for s in csr.shape])}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_sparse(path: str | Path) -> SparseVectors:
    """Read a file written by :func:`save_sparse`; every inconsistency is an error naming ``path``."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            arrays = {k: f.get_tensor(k) for k in names}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    missing = {"indptr", "indices", "data", "ids"} - names
    if missing:
        raise ValueError(f"{path}: missing arrays {sorted(missing)}")
    try:
        n, vocab = (int(s) for s in json.loads(meta["shape"]))
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{path}: metadata 'shape' must be [rows, vocab], got {meta.get('shape')!r}") from None
    indptr, indices, data = arrays["indptr"], arrays["indices"], arrays["data"]
    if indptr.ndim != 1 or len(indptr) != n + 1:
        raise ValueError(f"{path}: indptr has {len(indptr)} entries, shape {[n, vocab]} needs {n + 1}")
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != len(indices) or len(indices) != len(data):
        raise ValueError(
            f"{path}: inconsistent CSR arrays (indptr ends at {indptr[-1]}, "
            f"{len(indices)} indices, {len(data)} weights)"
        )
    if len(indices) and (indices.min() < 0 or indices.max() >= vocab):
        raise ValueError(f"{path}: token ids must lie in 0..{vocab - 1}, found {indices.min()}..{indices.max()}")
    raw = arrays["ids"].tobytes().decode("utf-8")
    ids = raw.split("\n") if raw else []
    if len(ids) != n:
        raise ValueError(f"{path}: holds {len(ids)} ids for {n} vectors")
    csr = sp.csr_matrix((data, indices, indptr), shape=(n, vocab))
    return SparseVectors(check_sparse(csr, ids, str(path), copy=False), ids)

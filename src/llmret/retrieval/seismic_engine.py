"""Seismic (pyseismic-lsr), the approximate engine behind :mod:`llmret.retrieval.sparse_index`:
building its index from a CSR matrix, loading one back, and its batch search. The only module
that calls Seismic's API, so a change of pyseismic-lsr touches this file alone; the index
folder, the settings and the exact engine stay in ``sparse_index``.

Design notes (when Seismic pays off, its knobs, measurements): docs/retrieval.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

# Seismic's SeismicIndex numbers components with u16; larger vocabularies need the *LV classes.
SEISMIC_U16_VOCAB = 65535
FLOAT16_MAX = 65504.0  # Seismic stores document weights as float16


def seismic_version() -> str | None:
    """The installed pyseismic-lsr version (None if absent): recorded in an index folder, since
    Seismic's files are not promised to load across versions."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyseismic-lsr")
    except PackageNotFoundError:
        return None


def _seismic_classes(vocab_size: int) -> tuple[type, type]:
    import seismic

    if vocab_size > SEISMIC_U16_VOCAB:
        return seismic.SeismicDatasetLV, seismic.SeismicIndexLV
    return seismic.SeismicDataset, seismic.SeismicIndex


def build_seismic(csr: sp.csr_matrix, params: Mapping[str, Any], info: dict) -> Any:
    """A Seismic index of the rows of ``csr`` with the build settings ``params``
    (``SparseIndexSpec.build_params()``); what it chose (class, effective pruning) goes into ``info``."""
    if csr.nnz and csr.data.max() > FLOAT16_MAX:
        raise ValueError(
            f"documents: weight {csr.data.max()} exceeds float16's range ({FLOAT16_MAX}), which Seismic stores; "
            "use sparse_index engine 'exact' or rescale the weights"
        )
    dataset_cls, index_cls = _seismic_classes(csr.shape[1])
    n_postings, max_fraction = params["n_postings"], params["max_fraction"]
    if n_postings == 0:  # keep all: no list is longer than the largest document frequency
        n_postings = max(1, int(np.bincount(csr.indices, minlength=csr.shape[1]).max()))
        max_fraction = 1.0
    dataset = dataset_cls(dim=int(csr.shape[1]))
    # Seismic document ids are row numbers; ours are kept beside the index (Seismic drops empty rows).
    dataset.add_documents_by_id(
        [str(i) for i in range(csr.shape[0])],
        csr.indices.astype(np.int64),
        csr.data.astype(np.float32),
        csr.indptr.astype(np.int64),
    )
    info.update(seismic_class=index_cls.__name__, effective_n_postings=n_postings, effective_max_fraction=max_fraction)
    return index_cls.build_from_dataset(
        dataset,
        n_postings=n_postings,
        centroid_fraction=float(params["centroid_fraction"]),
        min_cluster_size=params["min_cluster_size"],
        summary_energy=float(params["summary_energy"]),
        max_fraction=float(max_fraction),
        doc_cut=params["doc_cut"],
    )


def load_seismic(path: Path, meta: dict) -> Any:
    """The Seismic index at ``path``, of the class ``meta`` (the folder's metadata) names; a load
    that fails names the version that wrote it, since a version change is the likely cause."""
    import seismic

    cls = getattr(seismic, meta.get("seismic_class", "SeismicIndex"))
    have = seismic_version()
    try:
        index = cls.load(str(path))
    except Exception as e:
        raise ValueError(
            f"{path}: Seismic could not load it ({e}); it was written by pyseismic-lsr "
            f"{meta.get('engine_version')}, this is {have}: rebuild the index"
        ) from e
    if have != meta.get("engine_version"):
        log.warning("%s was written by pyseismic-lsr %s, reading with %s", path, meta.get("engine_version"), have)
    return index


def seismic_search(
    engine_index: Any,
    doc_ids: Sequence[str],
    q: sp.csr_matrix,
    qids: list[str],
    k: int,
    params: Mapping[str, Any],
) -> dict[str, list[tuple[str, float]]]:
    """One Seismic batch_search call with the search settings ``params``
    (``SparseIndexSpec.search_params()``); its results come back in any order, keyed by row number."""
    import seismic

    string_type = seismic.get_seismic_string()
    rows = [r for r in range(q.shape[0]) if q.indptr[r + 1] > q.indptr[r]]  # Seismic needs >= 1 term
    found: dict[int, list[tuple[str, float]]] = {}
    if rows:
        # components ascend numerically (CSR sorted indices), as Seismic requires
        comps = [np.array(q.indices[q.indptr[r] : q.indptr[r + 1]].astype(str), dtype=string_type) for r in rows]
        vals = [np.ascontiguousarray(q.data[q.indptr[r] : q.indptr[r + 1]], dtype=np.float32) for r in rows]
        max_terms = max(len(c) for c in comps)
        results = engine_index.batch_search(
            np.array([str(r) for r in rows], dtype=string_type),
            comps,
            vals,
            k=min(k, len(doc_ids)),
            query_cut=params["query_cut"] or max_terms,
            heap_factor=float(params["heap_factor"]),
            sorted=params["first_sorted"],
        )
        for hits in results:  # a query with no hit comes back as an empty, unnamed list
            if hits:
                ranked = sorted(((doc_ids[int(d)], float(s)) for _, s, d in hits), key=lambda x: (-x[1], x[0]))
                found[int(hits[0][0])] = ranked
    return {qid: found.get(r, []) for r, qid in enumerate(qids)}


__all__ = ["FLOAT16_MAX", "SEISMIC_U16_VOCAB", "build_seismic", "load_seismic", "seismic_search", "seismic_version"]

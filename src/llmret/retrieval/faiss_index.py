"""Dense vectors on disk and inner-product search with FAISS.

Embeddings are stored as ``.npy`` (float32, or float16 for a 16-bit encoder) next to a text
file of ids, one per line, so any tool can read them. The index type is a setting
(:class:`IndexSpec`): ``flat`` (the default) is exact search over those stored vectors, with
no index file (:mod:`llmret.retrieval.dense_search`); ``ivf`` and ``hnsw`` are approximate
FAISS indexes, a cached artifact per corpus shard, for millions of passages. The training
queries (hard-negative mining) may search another way than the evaluation queries
(``mining``). Every type uses the inner-product metric (cosine, since the encoders
L2-normalise), and an index on disk is always a CPU index so any machine can read it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from llmret import schema
from llmret.retrieval.corpus_shards import TopK
from llmret.specs import field_names, settings

log = logging.getLogger(__name__)

# FAISS k-means wants about this many training points per centroid; fewer and it warns
# that the clustering is unreliable (and it fails outright with fewer points than lists).
MIN_POINTS_PER_LIST = 39
# Largest k (and nprobe) that FAISS's GPU selection kernels support.
GPU_MAX_K = 2048
# The settings a FAISS file is built from, per type: two specs that agree on them share a
# file (search-time settings are applied when it is read).
BUILD_KEYS = {"flat": (), "ivf": ("nlist", "seed"), "hnsw": ("hnsw_m", "ef_construction")}
# Folders of a dense system's FAISS files under results/index/{system}/{corpus}/.
INDEX_FOLDER, MINING_INDEX_FOLDER = "faiss", "faiss-mining"


def storage_dtype(encoder_dtype: str) -> str:
    """How vectors are stored: float16 for an encoder computing in 16 bits (numpy has no
    bfloat16; pooled, normalised vectors fit float16's range), else float32, so a float32
    encoder's scores are exactly what it computed."""
    return "float16" if encoder_dtype in ("float16", "bfloat16") else "float32"


def save_embeddings(
    vectors: np.ndarray, ids: Sequence[str], npy_path: str | Path, ids_path: str | Path, dtype: str = "float32"
) -> None:
    if len(ids) != vectors.shape[0]:
        raise ValueError(f"{len(ids)} ids for {vectors.shape[0]} vectors")
    npy_path, ids_path = Path(npy_path), Path(ids_path)
    npy_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = npy_path.with_name(f".{npy_path.name}.tmp.npy")
    np.save(tmp, vectors.astype(dtype, copy=False))
    os.replace(tmp, npy_path)
    tmp_ids = ids_path.with_name(f".{ids_path.name}.tmp")
    tmp_ids.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    os.replace(tmp_ids, ids_path)


def load_embeddings(npy_path: str | Path, ids_path: str | Path) -> tuple[np.ndarray, list[str]]:
    vectors = np.load(npy_path, allow_pickle=False)
    ids = read_ids(ids_path)
    if len(ids) != vectors.shape[0]:
        raise ValueError(f"{ids_path} has {len(ids)} ids but {npy_path} holds {vectors.shape[0]} vectors")
    return vectors, ids


def read_ids(ids_path: str | Path) -> list[str]:
    return Path(ids_path).read_text(encoding="utf-8").splitlines()


@dataclass(frozen=True)
@schema.defaults_from("systems.dense.index")
class IndexSpec:
    """How the document index is built and searched (the ``index`` config section)."""

    type: str  # "flat" (exact, over the stored vectors) | "ivf" | "hnsw"
    # The schema gives the rest no default (a key left out of the config is not filled in): these are theirs.
    nlist: int = 1024  # ivf: number of lists, capped at vectors // 39
    nprobe: int = 32  # ivf: lists searched per query
    hnsw_m: int = 32  # hnsw: neighbours per node
    ef_construction: int = 200  # hnsw: candidate list size while building
    ef_search: int = 256  # hnsw: candidate list size while searching
    # flat: training queries on the system's GPUs (torch); ivf: on a GPU when FAISS sees one; hnsw: CPU
    use_gpu: bool = True
    seed: int = 13  # ivf k-means seed, so builds are reproducible
    mining: Mapping | None = None  # the training queries' settings, over these (None: the same)

    def __post_init__(self) -> None:
        schema.check_bounds(self, "systems.dense.index", "index ")
        if self.mining is not None:
            self.for_mining()  # a wrong key or bound there fails here, not in the mining job

    @classmethod
    def from_config(cls, cfg: Mapping) -> IndexSpec:
        return settings(cls, cfg, "index settings")

    @property
    def exact(self) -> bool:
        """Exact search over the stored vectors: no FAISS file."""
        return self.type == "flat"

    def for_mining(self) -> IndexSpec:
        """The spec the training queries search with: ``mining``'s keys over this one's."""
        over = self.mining or {}
        if not isinstance(over, Mapping):
            raise ValueError(f"index mining must be a mapping of index settings, got {over!r}")
        unknown = set(over) - (field_names(IndexSpec) - {"mining"})
        if unknown:
            raise ValueError(f"unknown index mining settings: {sorted(unknown)}")
        try:
            return replace(self, mining=None, **over)
        except ValueError as err:
            raise ValueError(f"index mining: {err}") from None

    def build_settings(self) -> dict:
        """What this type's FAISS file is built from (type and build-time settings, defaults
        resolved); {} for exact search, which has no file."""
        if self.exact:
            return {}
        return {"type": self.type, **{key: getattr(self, key) for key in BUILD_KEYS[self.type]}}


def index_folder(cfg: Mapping, mining: bool = False) -> str | None:
    """The folder of a dense system's FAISS files (``cfg``: its ``index`` config) for the
    evaluation or the training queries' search; None for exact search (the stored vectors).
    Mining shares the evaluation's files when both are built alike."""
    spec = IndexSpec.from_config(cfg)
    if not mining:
        return None if spec.exact else INDEX_FOLDER
    wanted = spec.for_mining()
    if wanted.exact:
        return None
    return INDEX_FOLDER if wanted.build_settings() == spec.build_settings() else MINING_INDEX_FOLDER


def folder_spec(cfg: Mapping, folder: str) -> IndexSpec:
    """The spec that the FAISS files of ``folder`` (:func:`index_folder`) are built from."""
    spec = IndexSpec.from_config(cfg)
    if folder not in (INDEX_FOLDER, MINING_INDEX_FOLDER):
        raise ValueError(f"not a FAISS index folder: {folder!r}")
    return spec.for_mining() if folder == MINING_INDEX_FOLDER else spec


def _gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _to_gpu(index):
    """Copy ``index`` to GPU 0 (one GPU: shards and replicas would complicate search settings)."""
    import faiss

    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
    gpu_index.referenced_objects = [res]  # the resources must outlive the index
    return gpu_index


def _is_gpu(index) -> bool:
    return type(index).__name__.startswith("Gpu")


def _ivf_lists(requested: int, n: int) -> int:
    """``requested`` capped so every list gets enough k-means training points."""
    cap = max(1, n // MIN_POINTS_PER_LIST)
    if requested > cap:
        log.warning(
            "ivf nlist %d is too many for %d vectors (FAISS needs ~%d per list); using %d",
            requested,
            n,
            MIN_POINTS_PER_LIST,
            cap,
        )
        return cap
    return requested


def build_index(vectors: np.ndarray, spec: IndexSpec | None = None):
    """Build and fill an inner-product index of the type ``spec`` names, ready to search."""
    import faiss

    spec = spec or IndexSpec()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"need a non-empty 2-D array of vectors, got shape {x.shape}")
    n, dim = x.shape
    gpu = spec.use_gpu and spec.type != "hnsw" and _gpu_available()
    if spec.type == "flat":
        index = _to_gpu(faiss.IndexFlatIP(dim)) if gpu else faiss.IndexFlatIP(dim)
    elif spec.type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
    else:
        nlist = _ivf_lists(spec.nlist, n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = spec.seed
        if gpu:
            # k-means assignments dominate training; run them on the GPU, keep the CPU
            # training loop (same seed and centroids as a CPU build).
            assigner = _to_gpu(faiss.IndexFlatIP(dim))
            index.clustering_index = assigner
            index.train(x)
            index.clustering_index = None
            index = _to_gpu(index)
        else:
            index.train(x)
    index.add(x)
    configure_search(index, spec)
    log.info("built index %s", describe_index(index))
    return index


def build_flat_ip(vectors: np.ndarray):
    """Exact inner-product index on CPU (cosine when the vectors are L2-normalised)."""
    return build_index(vectors, IndexSpec(type="flat", use_gpu=False))


def configure_search(index, spec: IndexSpec):
    """Apply the search-time settings of ``spec`` to whatever type ``index`` is.

    They are not part of the build, so an index read from disk needs them again; settings
    that do not concern the index's type are ignored. Returns ``index``.
    """
    import faiss

    if hasattr(index, "nprobe"):  # IndexIVF and GpuIndexIVF
        nprobe = min(spec.nprobe, _nlist(index))
        if _is_gpu(index):
            nprobe = min(nprobe, GPU_MAX_K)
        index.nprobe = nprobe
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = spec.ef_search
    return index


def _nlist(index) -> int:
    return int(index.nlist if hasattr(index, "nlist") else index.getNumLists())


def describe_index(index) -> dict:
    """Type, size and search settings of an index, small enough for a run file's header."""
    import faiss

    info: dict = {
        "type": type(index).__name__,
        "ntotal": int(index.ntotal),
        "dim": int(index.d),
        "metric": "inner_product" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2",
        "gpu": _is_gpu(index),
    }
    if hasattr(index, "nprobe"):
        info.update(type="ivf", nlist=_nlist(index), nprobe=int(index.nprobe))
    elif isinstance(index, faiss.IndexHNSW):
        info.update(
            type="hnsw",
            hnsw_m=int(index.hnsw.nb_neighbors(1)),
            ef_construction=int(index.hnsw.efConstruction),
            ef_search=int(index.hnsw.efSearch),
        )
    elif "Flat" in info["type"]:
        info["type"] = "flat"
    return info


def write_index(index, path: str | Path) -> None:
    """Write atomically; a GPU index is copied to CPU first so any machine can read it."""
    import faiss

    if _is_gpu(index):
        index = faiss.index_gpu_to_cpu(index)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def read_index(path: str | Path, spec: IndexSpec | None = None):
    """Read an index; with ``spec``, move it to a GPU as a build would and apply its search settings."""
    import faiss

    index = faiss.read_index(str(path))
    if spec is not None:
        if spec.use_gpu and not isinstance(index, faiss.IndexHNSW) and _gpu_available():
            index = _to_gpu(index)
        configure_search(index, spec)
    return index


def search(
    index,
    doc_ids: Sequence[str],
    query_vectors: np.ndarray,
    query_ids: Sequence[str],
    k: int = 1000,
    batch_size: int = 256,
    show_progress: bool = True,
    spec: IndexSpec | None = None,
) -> dict[str, list[tuple[str, float]]]:
    """Top-k documents per query, best first; k is capped at the corpus size.

    With ``spec`` its search settings (nprobe, ef_search) are applied first; without it the
    index searches with the settings it already has.
    """
    if index.ntotal != len(doc_ids):
        raise ValueError(f"index holds {index.ntotal} vectors but {len(doc_ids)} document ids were given")
    if spec is not None:
        configure_search(index, spec)
    k = min(k, index.ntotal)
    if _is_gpu(index) and k > GPU_MAX_K:
        raise ValueError(f"a GPU index returns at most {GPU_MAX_K} results per query, {k} were asked for")
    q = np.ascontiguousarray(query_vectors, dtype=np.float32)
    out: dict[str, list[tuple[str, float]]] = {}
    for start in tqdm(range(0, len(query_ids), batch_size), desc="search", mininterval=5.0, disable=not show_progress):
        scores, rows = index.search(q[start : start + batch_size], k)
        for qid, srow, irow in zip(query_ids[start : start + batch_size], scores, rows, strict=True):
            out[qid] = [(doc_ids[i], float(s)) for s, i in zip(srow, irow, strict=True) if i >= 0]
    return out


def search_shards(
    index_paths: Sequence[str | Path],
    ids_paths: Sequence[str | Path],
    query_vectors: np.ndarray,
    query_ids: Sequence[str],
    k: int,
    spec: IndexSpec | None = None,
    batch_size: int = 256,
    show_progress: bool = True,
) -> tuple[TopK, dict]:
    """Top-k over a sharded corpus, one shard's index in memory at a time, and a description
    of the index (:func:`describe_index` over all shards). Each shard is searched to depth
    k and merged into a running top-k with FAISS's tie order (lower row first), which is
    exactly one index's top-k over the concatenated shards."""
    if len(index_paths) != len(ids_paths) or not index_paths:
        raise ValueError(f"{len(index_paths)} shard indexes for {len(ids_paths)} id files")
    q = np.ascontiguousarray(query_vectors, dtype=np.float32)
    top = TopK(len(query_ids), k)
    offset = 0
    info: dict = {}
    for index_path, ids_path in zip(index_paths, ids_paths, strict=True):
        index = read_index(index_path, spec)
        doc_ids = np.array(read_ids(ids_path), dtype=object)
        if index.ntotal != len(doc_ids):
            raise ValueError(f"{index_path} holds {index.ntotal} vectors but {ids_path} lists {len(doc_ids)} ids")
        depth = min(k, index.ntotal)
        if _is_gpu(index) and depth > GPU_MAX_K:
            raise ValueError(f"a GPU index returns at most {GPU_MAX_K} results per query, {depth} were asked for")
        desc = f"search {Path(index_path).stem}"
        for start in tqdm(range(0, len(q), batch_size), desc=desc, mininterval=5.0, disable=not show_progress):
            scores, rows = index.search(q[start : start + batch_size], depth)
            top.add_rows(start, scores, rows, offset, doc_ids)
        offset += index.ntotal
        info = describe_index(index)
        del index
    return top, {**info, "ntotal": offset, "shards": len(index_paths)}

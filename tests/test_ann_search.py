"""Dense search without a duplicated flat index, and mining's own search (issue 28): exact
search over the stored vectors, torch's brute force, the ANN folders and the mining spec."""

import faiss
import numpy as np
import pytest

from llmret.retrieval import dense_search, faiss_index
from llmret.retrieval.corpus_shards import NO_ROW, TopK, shard_rows
from llmret.retrieval.faiss_index import IndexSpec


@pytest.fixture(autouse=True)
def one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _corpus(tmp_path, n=3000, dim=24, shards=3, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    docs = rng.standard_normal((n, dim)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    ids = [f"d{i:05d}" for i in range(n)]
    npys, id_files, indexes = [], [], []
    for i in range(shards):
        start, end = shard_rows(n, i, shards)
        npy, idf, idx = (tmp_path / f"{i:03d}{ext}" for ext in (".npy", ".ids", ".index"))
        faiss_index.save_embeddings(docs[start:end], ids[start:end], npy, idf, dtype=dtype)
        faiss_index.write_index(faiss_index.build_flat_ip(np.load(npy)), idx)  # the index files of before
        npys.append(npy)
        id_files.append(idf)
        indexes.append(idx)
    return docs, ids, npys, id_files, indexes


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("n_queries", [1, 7, 300])  # the direct kernel, BLAS, and a batch remainder
def test_exact_search_over_stored_vectors_is_the_flat_index_bit_for_bit(tmp_path, dtype, n_queries):
    docs, _, npys, id_files, indexes = _corpus(tmp_path, dtype=dtype)
    queries = np.random.default_rng(1).standard_normal((n_queries, docs.shape[1])).astype(np.float32)
    qids = [f"q{i}" for i in range(n_queries)]
    before, info = faiss_index.search_shards(indexes, id_files, queries, qids, k=50, show_progress=False)
    now, now_info = dense_search.search(npys, id_files, queries, qids, 50, IndexSpec(), show_progress=False)
    assert now_info == info
    assert np.array_equal(now.scores, before.scores) and np.array_equal(now.tie, before.tie)
    assert np.array_equal(now.docs, before.docs)


def test_torch_brute_force_ranks_as_exact_search_and_float16_nearly(tmp_path):
    docs, _, npys, id_files, _ = _corpus(tmp_path, n=2000, dim=32, shards=4)
    queries = np.random.default_rng(2).standard_normal((70, 32)).astype(np.float32)
    qids = [f"q{i}" for i in range(70)]
    exact, _ = dense_search.exact_search_shards(npys, id_files, queries, qids, 100, show_progress=False)
    brute, info = dense_search.torch_search_shards(
        npys, id_files, queries, qids, 100, device="cpu", batch_size=16, show_progress=False
    )
    assert np.array_equal(brute.docs, exact.docs) and np.allclose(brute.scores, exact.scores, atol=1e-5)
    assert info == {
        "type": "flat",
        "ntotal": 2000,
        "dim": 32,
        "metric": "inner_product",
        "gpu": False,
        "precision": "float32",
        "shards": 4,
    }
    # Float16 scores (the GPU's precision) round near-equal candidates together: the same set, nearly.
    half, half_info = dense_search.torch_search_shards(
        npys, id_files, queries, qids, 100, device="cpu", dtype="float16", show_progress=False
    )
    assert half_info["precision"] == "float16"
    overlap = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(half.docs, exact.docs, strict=True)])
    assert overlap > 0.97
    assert all(list(row) == sorted(row, reverse=True) for row in half.scores)


def test_torch_merge_keeps_the_lower_row_on_ties_and_fills_short_corpora(tmp_path):
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    for i, rows in enumerate(((0, 2), (2, 4))):
        faiss_index.save_embeddings(
            vectors[slice(*rows)], [f"d{j}" for j in range(*rows)], tmp_path / f"{i}.npy", tmp_path / f"{i}.ids"
        )
    npys, id_files = [tmp_path / "0.npy", tmp_path / "1.npy"], [tmp_path / "0.ids", tmp_path / "1.ids"]
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    for top, _ in (
        dense_search.torch_search_shards(npys, id_files, q, ["q"], 6, device="cpu", show_progress=False),
        dense_search.exact_search_shards(npys, id_files, q, ["q"], 6, show_progress=False),
    ):
        assert [d for d, _ in top.run(["q"])["q"]] == ["d0", "d2", "d3", "d1"]
        assert list(top.tie[0, 4:]) == [NO_ROW, NO_ROW]
    cut, _ = dense_search.torch_search_shards(npys, id_files, q, ["q"], 2, device="cpu", show_progress=False)
    assert [d for d, _ in cut.run(["q"])["q"]] == ["d0", "d2"]


def test_ann_search_goes_through_the_faiss_files(tmp_path):
    docs, ids, npys, id_files, _ = _corpus(tmp_path, n=4000, dim=16, shards=2)
    spec = IndexSpec(type="ivf", nlist=8, nprobe=8, use_gpu=False)
    files = []
    for i, npy in enumerate(npys):
        files.append(tmp_path / f"ivf{i}.index")
        faiss_index.write_index(faiss_index.build_index(np.load(npy), spec), files[-1])
    queries, qids = docs[:20], ids[:20]
    ivf, info = dense_search.search(files, id_files, queries, qids, 10, spec, show_progress=False)
    exact, _ = dense_search.search(npys, id_files, queries, qids, 10, IndexSpec(), show_progress=False)
    assert info["type"] == "ivf" and info["shards"] == 2 and info["ntotal"] == 4000
    assert np.array_equal(ivf.docs, exact.docs)  # every list probed: exact
    assert [r[0] for r in ivf.docs] == qids  # each query is a document: itself first


def test_mining_settings_override_the_evaluations():
    spec = IndexSpec.from_config({"type": "ivf", "nlist": 64, "nprobe": 8, "mining": {"nprobe": 64}})
    mining = spec.for_mining()
    assert (mining.type, mining.nlist, mining.nprobe, mining.mining) == ("ivf", 64, 64, None)
    assert mining.build_settings() == spec.build_settings() == {"type": "ivf", "nlist": 64, "seed": 13}
    assert IndexSpec().for_mining() == IndexSpec() and IndexSpec().exact and IndexSpec().build_settings() == {}
    hnsw = IndexSpec(type="hnsw", ef_search=64)
    assert hnsw.build_settings() == {"type": "hnsw", "hnsw_m": 32, "ef_construction": 200}
    with pytest.raises(ValueError, match=r"unknown index mining settings: \['n_probe'\]"):
        IndexSpec(mining={"n_probe": 3})
    with pytest.raises(ValueError, match=r"unknown index mining settings: \['mining'\]"):
        IndexSpec(mining={"mining": {}})
    with pytest.raises(ValueError, match="index mining: index nprobe must be an integer >= 1, got 0"):
        IndexSpec(mining={"nprobe": 0})
    with pytest.raises(ValueError, match="index mining: index type must be one of"):
        IndexSpec(mining={"type": "pq"})
    with pytest.raises(ValueError, match="index mining must be a mapping"):
        IndexSpec(mining=["hnsw"])


@pytest.mark.parametrize(
    ("cfg", "evaluation", "mining"),
    [
        ({}, None, None),  # exact for both: the stored vectors, no FAISS file
        ({"mining": {"type": "hnsw"}}, None, "faiss-mining"),
        ({"type": "ivf", "mining": {"nprobe": 128}}, "faiss", "faiss"),  # search settings only: one file
        ({"type": "ivf", "mining": {"nlist": 4096}}, "faiss", "faiss-mining"),
        ({"type": "hnsw", "mining": {"type": "flat"}}, "faiss", None),
    ],
)
def test_index_folders(cfg, evaluation, mining):
    assert faiss_index.index_folder(cfg) == evaluation
    assert faiss_index.index_folder(cfg, mining=True) == mining
    if mining:
        assert faiss_index.folder_spec(cfg, mining).build_settings() == IndexSpec(**cfg).for_mining().build_settings()
    with pytest.raises(ValueError, match="not a FAISS index folder"):
        faiss_index.folder_spec(cfg, "embeddings")


def test_search_device(monkeypatch):
    import torch

    assert dense_search.search_device(0, IndexSpec()) == "cpu"
    assert dense_search.search_device(1, IndexSpec(use_gpu=False)) == "cpu"
    assert dense_search.search_device(1, IndexSpec(type="hnsw")) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="asked for 1 GPU"):
        dense_search.search_device(1, IndexSpec())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dense_search.search_device(1, IndexSpec()) == "cuda"


def test_topk_from_arrays_and_errors(tmp_path):
    top = TopK.from_arrays(np.array([[2.0, -np.inf]]), np.array([[3, NO_ROW]]), np.array([["d3", None]], dtype=object))
    assert top.k == 2 and top.run(["q"])["q"] == [("d3", 2.0)]
    with pytest.raises(ValueError, match="queries x k alike"):
        TopK.from_arrays(np.zeros((1, 2)), np.zeros((1, 3), dtype=np.int64), np.full((1, 2), None))
    _, _, npys, id_files, _ = _corpus(tmp_path, n=30, dim=4, shards=2)
    with pytest.raises(ValueError, match="2 vector shards for 1 id files"):
        dense_search.exact_search_shards(npys, id_files[:1], np.zeros((1, 4)), ["q"], 3)
    with pytest.raises(ValueError, match="holds 4-dim vectors, the queries 5-dim"):
        dense_search.exact_search_shards(npys, id_files, np.zeros((1, 5)), ["q"], 3)

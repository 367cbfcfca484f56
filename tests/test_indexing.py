import logging

import faiss
import numpy as np
import pytest

from llmret.retrieval import faiss_index
from llmret.retrieval.faiss_index import IndexSpec


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """One OpenMP thread: the machine is small and shared, and results do not depend on it."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(docs: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ docs.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(scores, top, axis=1)


DOCS = unit_vectors(1000, 32, seed=1)
QUERIES = unit_vectors(40, 32, seed=2)
DOC_IDS = [f"d{i}" for i in range(len(DOCS))]
QUERY_IDS = [f"q{i}" for i in range(len(QUERIES))]
CPU = {"use_gpu": False}


def ranked_ids(run: dict) -> list[list[str]]:
    return [[d for d, _ in run[q]] for q in QUERY_IDS]


def test_flat_equals_brute_force():
    index = faiss_index.build_index(DOCS, IndexSpec(type="flat", **CPU))
    run = faiss_index.search(index, DOC_IDS, QUERIES, QUERY_IDS, k=20, show_progress=False)
    top, scores = brute_force(DOCS, QUERIES, 20)
    assert ranked_ids(run) == [[DOC_IDS[i] for i in row] for row in top]
    got = np.array([[s for _, s in run[q]] for q in QUERY_IDS])
    np.testing.assert_allclose(got, scores, rtol=0, atol=1e-5)
    assert faiss_index.describe_index(index) == {
        "type": "flat",
        "ntotal": 1000,
        "dim": 32,
        "metric": "inner_product",
        "gpu": False,
    }


def test_build_flat_ip_still_exact_on_cpu():
    index = faiss_index.build_flat_ip(DOCS)
    assert isinstance(index, faiss.IndexFlatIP)
    _, rows = index.search(QUERIES, 5)
    np.testing.assert_array_equal(rows, brute_force(DOCS, QUERIES, 5)[0])


def test_ivf_probing_every_list_equals_flat():
    flat = faiss_index.build_index(DOCS, IndexSpec(type="flat", **CPU))
    ivf = faiss_index.build_index(DOCS, IndexSpec(type="ivf", nlist=16, nprobe=16, **CPU))
    assert isinstance(ivf, faiss.IndexIVFFlat) and ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    exact = faiss_index.search(flat, DOC_IDS, QUERIES, QUERY_IDS, k=20, show_progress=False)
    approx = faiss_index.search(ivf, DOC_IDS, QUERIES, QUERY_IDS, k=20, show_progress=False)
    assert ranked_ids(approx) == ranked_ids(exact)
    for q in QUERY_IDS:
        assert [s for _, s in approx[q]] == pytest.approx([s for _, s in exact[q]], abs=1e-5)
    # One list of sixteen cannot hold every query's true top 20: the setting really acts.
    one = faiss_index.search(ivf, DOC_IDS, QUERIES, QUERY_IDS, k=20, show_progress=False, spec=IndexSpec(nprobe=1))
    assert ivf.nprobe == 1
    assert ranked_ids(one) != ranked_ids(exact)


def test_ivf_build_is_reproducible_with_its_seed():
    def centroids(seed: int) -> np.ndarray:
        index = faiss_index.build_index(DOCS, IndexSpec(type="ivf", nlist=8, seed=seed, **CPU))
        return index.quantizer.reconstruct_n(0, index.nlist)

    np.testing.assert_array_equal(centroids(5), centroids(5))
    assert not np.array_equal(centroids(5), centroids(6))


def test_hnsw_recall_against_flat():
    # 2,000 random 64-d unit vectors have no cluster structure and nearly equal distances,
    # the hard case for a graph search. M=32 with ef_search=256 (25x k) measured recall@10
    # 1.0 here; FAISS's default ef_search of 16 gives about 0.84, so 0.95 leaves room for
    # build-order differences yet fails if ef_search or the metric were not applied.
    docs, queries = unit_vectors(2000, 64, seed=3), unit_vectors(200, 64, seed=4)
    index = faiss_index.build_index(docs, IndexSpec(type="hnsw", hnsw_m=32, ef_construction=200, ef_search=256))
    assert isinstance(index, faiss.IndexHNSWFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert index.hnsw.efSearch == 256
    _, rows = index.search(queries, 10)
    truth, _ = brute_force(docs, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth, strict=True)])
    assert recall >= 0.95
    info = faiss_index.describe_index(index)
    assert info == {
        "type": "hnsw",
        "ntotal": 2000,
        "dim": 64,
        "metric": "inner_product",
        "gpu": False,
        "hnsw_m": 32,
        "ef_construction": 200,
        "ef_search": 256,
    }


def test_nlist_is_capped_by_the_training_points(caplog):
    with caplog.at_level(logging.WARNING, logger="llmret.retrieval.faiss_index"):
        index = faiss_index.build_index(DOCS, IndexSpec(type="ivf", nlist=1024, nprobe=64, **CPU))
    assert index.nlist == 1000 // 39 == 25
    assert index.nprobe == 25  # nprobe cannot exceed the lists there are
    assert "nlist 1024 is too many for 1000 vectors" in caplog.text
    tiny = faiss_index.build_index(DOCS[:10], IndexSpec(type="ivf", nlist=4, **CPU))
    assert tiny.nlist == 1


def test_write_read_keeps_search_settings_via_configure_search(tmp_path):
    index = faiss_index.build_index(DOCS, IndexSpec(type="ivf", nlist=16, nprobe=1, **CPU))
    path = tmp_path / "idx" / "docs.faiss"
    faiss_index.write_index(index, path)
    assert [p.name for p in path.parent.iterdir()] == ["docs.faiss"]

    wide = IndexSpec(type="ivf", nprobe=16, **CPU)
    read = faiss_index.read_index(path, wide)
    assert read.nprobe == 16
    assert faiss_index.describe_index(read) == {**faiss_index.describe_index(index), "nprobe": 16}
    # Same index as written: with every list probed it answers like the original does.
    index.nprobe = 16
    expected = faiss_index.search(index, DOC_IDS, QUERIES, QUERY_IDS, k=10, show_progress=False)
    assert faiss_index.search(read, DOC_IDS, QUERIES, QUERY_IDS, k=10, show_progress=False) == expected
    # configure_search on a plain read, as the search script does.
    plain = faiss_index.read_index(path)
    assert faiss_index.configure_search(plain, wide) is plain and plain.nprobe == 16

    hnsw = faiss_index.build_index(DOCS, IndexSpec(type="hnsw", hnsw_m=8, ef_search=20))
    faiss_index.write_index(hnsw, tmp_path / "h.faiss")
    back = faiss_index.configure_search(faiss_index.read_index(tmp_path / "h.faiss"), IndexSpec(ef_search=300))
    assert back.hnsw.efSearch == 300


def test_gpu_path_without_a_gpu(monkeypatch, tmp_path):
    """Flat and IVF go to the GPU, HNSW does not, and the file on disk is a CPU index
    (exercised with a stand-in GPU, since FAISS here is CPU-only)."""
    moved = []

    def fake_to_gpu(index):
        moved.append(type(index).__name__)
        return index

    monkeypatch.setattr(faiss_index, "_gpu_available", lambda: True)
    monkeypatch.setattr(faiss_index, "_to_gpu", fake_to_gpu)
    faiss_index.build_index(DOCS, IndexSpec(type="flat"))
    assert moved == ["IndexFlatIP"]
    moved.clear()
    ivf = faiss_index.build_index(DOCS, IndexSpec(type="ivf", nlist=8))
    # The k-means assigner, then the trained index; the centroids match a CPU build.
    assert moved == ["IndexFlatIP", "IndexIVFFlat"]
    cpu = faiss_index.build_index(DOCS, IndexSpec(type="ivf", nlist=8, use_gpu=False))
    np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, 8), cpu.quantizer.reconstruct_n(0, 8))
    moved.clear()
    faiss_index.build_index(DOCS, IndexSpec(type="hnsw", hnsw_m=8))
    faiss_index.build_index(DOCS, IndexSpec(type="flat", use_gpu=False))
    assert moved == []

    converted = []
    monkeypatch.setattr(faiss_index, "_is_gpu", lambda index: True)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: converted.append(index) or index, raising=False)
    faiss_index.write_index(ivf, tmp_path / "ivf.faiss")
    assert converted == [ivf]
    many = unit_vectors(3000, 8, seed=5)
    flat = faiss_index.build_index(many, IndexSpec(type="flat", use_gpu=False))
    with pytest.raises(ValueError, match="GPU index returns at most 2048 results per query, 2500 were asked for"):
        faiss_index.search(flat, [f"d{i}" for i in range(3000)], many[:2], ["a", "b"], k=2500, show_progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"type": "ivfpq"}, "index type must be one of"),
        ({"nlist": 0}, "nlist must be an integer >= 1"),
        ({"nprobe": 0}, "nprobe must be an integer >= 1"),
        ({"hnsw_m": 1}, "hnsw_m must be an integer >= 2"),
        ({"ef_construction": 0}, "ef_construction must be an integer >= 1"),
        ({"ef_search": 2.5}, "ef_search must be an integer"),
        ({"seed": "13"}, "seed must be an integer"),
        ({"nlist": True}, "nlist must be an integer"),
        ({"use_gpu": "yes"}, "use_gpu must be true or false"),
    ],
)
def test_index_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IndexSpec(**kwargs)


def test_index_spec_from_config_rejects_unknown_keys():
    assert IndexSpec.from_config({"type": "hnsw", "ef_search": 64}) == IndexSpec(type="hnsw", ef_search=64)
    with pytest.raises(ValueError, match=r"unknown index settings: \['n_list'\]"):
        IndexSpec.from_config({"n_list": 8})

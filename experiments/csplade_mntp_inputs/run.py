"""What an MNTP-adapted model's SPLADE vectors look like on the text it adapted on (a fifth of
the tokens masked) and on the whole text that contrastive training and encoding feed it.

For each model directory (a ``csplade_adapt`` output, or any causal LM) it prints one JSON line
per input: mean ``logsumexp`` of the logits over the pooled positions, live terms (logit > 0)
per position, and terms per passage after the max-pool, on the first ``--passages`` passages
of a BEIR corpus, under the bidirectional mask (``--causal`` for the causal one). The masked
input is the adaptation collator's own (``AdaptationCollator``, seed 0, no share left whole).

    python experiments/csplade_mntp_inputs/run.py --corpus <workdir>/results/data/scifact/corpus.jsonl \\
        <workdir>/results/models/adapt-bi-smollm2

experiments/csplade_mntp_inputs/README.md gives the figures measured with it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from llmret.csplade.adaptation import AdaptationCollator, AdaptationSpec, corpus_texts
from llmret.retrieval.sparse_encoder import load_sparse_model, sparse_logits, splade_pool


def figures(model, batch, bidirectional: bool) -> dict:
    with torch.inference_mode():
        logits = sparse_logits(model, batch.inputs, bidirectional)
    pool = batch.inputs.pool_mask.bool()
    return {
        "logsumexp": round(float(torch.logsumexp(logits, -1)[pool].mean()), 3),
        "terms_per_position": round(float((logits > 0)[pool].sum(-1).float().mean()), 1),
        "terms_per_passage": round(float((splade_pool(logits, pool) > 0).sum(1).float().mean()), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="causal LM directories (HF, safetensors)")
    ap.add_argument("--corpus", required=True, type=Path, help="a BEIR corpus.jsonl")
    ap.add_argument("--passages", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--mask-fraction", type=float, default=0.2)
    ap.add_argument("--causal", action="store_true", help="encode under the causal mask")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    texts = corpus_texts(args.corpus, args.passages)
    bi = not args.causal
    for model_dir in args.models:
        model, tok = load_sparse_model(str(model_dir)), AutoTokenizer.from_pretrained(model_dir)
        vocab = model.config.vocab_size
        masked = AdaptationSpec(max_length=args.max_length, bidirectional=True, mask_fraction=args.mask_fraction)
        inputs = {
            "masked": AdaptationCollator(tok, masked, vocab, rng=random.Random(0))(texts),
            "whole": AdaptationCollator(tok, AdaptationSpec(max_length=args.max_length), vocab)(texts),
        }
        for name, batch in inputs.items():
            print(json.dumps({"model": str(model_dir), "input": name, **figures(model, batch, bi)}), flush=True)


if __name__ == "__main__":
    main()

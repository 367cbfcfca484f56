"""Which adaptation objective makes a causal LM's SPLADE vectors retrieve: a fast CPU probe.

The probes' plain AdamW loop (:func:`llmret.training.plain_loop.plain_steps`: LoRA, a 10-step
warm-up, no clipping, no DeepSpeed; ``experiments/csplade_adaptation`` runs the real stages)
over :class:`llmret.csplade.adaptation.AdaptationModel`, so every objective is the library's.
It prints JSON lines:

* ``bow``: bag-of-words references on the same sample (the LM's token ids; binary queries,
  ``log(1 + tf)`` passages, with and without idf), i.e. what lexical matching reaches;
* ``probe``: the base LM zero-shot, raw logits (``--top-k`` terms kept) and, with
  ``--probe-shift C``, logits normalised per position (``log_softmax + C``): what the logit
  scale term teaches the model to output;
* ``step`` / ``cstep``: adaptation and contrastive logs (next-token loss, mean logsumexp,
  terms per passage, own terms alive; InfoNCE, FLOPS, terms per query / passage);
* ``eval``: nDCG@10 (the workflow's exact sparse search, top 100, and ranx evaluation:
  :func:`llmret.results.probe_eval.score_sparse`) after adaptation and after training.

    python experiments/csplade_objectives/run.py --model resources/models/smollm2-135m \\
        --beir resources/datasets/scifact --adapt-steps 120 --train-steps 60

Contrastive groups are the train split's positives with random negatives.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmret.csplade import adaptation, sparse_training
from llmret.data import beir
from llmret.results.probe_eval import score_sparse
from llmret.retrieval import sparse_encoder
from llmret.retrieval.sparse_encoder import SparseEncoderSpec, encode_sparse
from llmret.training.contrastive import load_groups
from llmret.training.lora import LoraSpec, apply_lora
from llmret.training.mining import write_random_groups
from llmret.training.plain_loop import plain_steps


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def bow_references(tok, test: beir.Dataset) -> dict:
    """nDCG@10 of bag-of-words vectors over the LM's token ids (binary queries)."""
    from scipy.sparse import csr_matrix

    special = set(tok.all_special_ids)

    def matrix(texts, weight):
        rows, cols, vals = [], [], []
        for i, text in enumerate(texts):
            counts: dict[int, int] = {}
            for t in tok(text, add_special_tokens=False)["input_ids"]:
                if t not in special:
                    counts[t] = counts.get(t, 0) + 1
            for t, n in counts.items():
                rows.append(i), cols.append(t), vals.append(weight(n))
        return csr_matrix((vals, (rows, cols)), shape=(len(texts), len(tok)), dtype=np.float32)

    d = matrix(test.corpus.contents(), math.log1p)
    q = matrix(list(test.queries.values()), lambda n: 1.0)
    df = np.asarray((d > 0).sum(0)).ravel()
    idf = np.log((d.shape[0] + 1) / (df + 1)).astype(np.float32)
    return {
        "tf": score_sparse(q, d, test)[1]["ndcg@10"],
        "tf_idf": score_sparse(q, d.multiply(idf[None]).tocsr(), test)[1]["ndcg@10"],
    }


def evaluate(model, tok, test: beir.Dataset, spec: SparseEncoderSpec) -> dict:
    model.eval()
    start = time.perf_counter()
    d = encode_sparse(model, tok, test.corpus.contents(), "passage", spec, show_progress=False)
    q = encode_sparse(model, tok, list(test.queries.values()), "query", spec, show_progress=False)
    model.train()
    return {
        "ndcg@10": round(score_sparse(q, d, test)[1]["ndcg@10"], 4),
        "nnz_per_passage": round(d.nnz / d.shape[0], 1),
        "nnz_per_query": round(q.nnz / q.shape[0], 1),
        "seconds": round(time.perf_counter() - start, 1),
    }


def probe_normalised(model, tok, test, spec: SparseEncoderSpec, shift: float) -> dict:
    """The base LM with its logits normalised per position (``log_softmax + shift``)."""
    plain = sparse_encoder.splade_activations
    sparse_encoder.splade_activations = lambda z: plain(torch.log_softmax(z.float(), -1) + shift)
    try:
        return evaluate(model, tok, test, spec)
    finally:
        sparse_encoder.splade_activations = plain


def optimise(model, lr: float, steps: int, loss_at, warmup: int = 10):
    """``steps`` AdamW updates of ``model``'s trainable parameters on ``loss_at(step)``'s
    ``"loss"`` (the plain loop: linear warm-up over ``warmup`` steps, no clipping); yields
    (step, output) at step 1 and every 10th step."""
    params = [p for p in model.parameters() if p.requires_grad]
    for step, out in plain_steps(params, steps, loss_at, lr, warmup, max_grad_norm=0.0):
        if step == 1 or step % 10 == 0:
            yield step, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="causal LM checkpoint (HF, safetensors)")
    ap.add_argument("--beir", required=True, type=Path, help="BEIR folder with test and train qrels")
    ap.add_argument("--test-queries", type=int, default=100)
    ap.add_argument("--test-docs", type=int, default=300, help="judged passages stay")
    ap.add_argument("--length", type=int, default=64, help="max tokens per passage, training and evaluation")
    ap.add_argument("--top-k", type=int, default=100, help="terms kept in the raw-logit probe")
    ap.add_argument("--probe-shift", type=float, default=6.0, help="0: skip the normalised probe")
    ap.add_argument("--adapt-steps", type=int, default=120)
    ap.add_argument("--adapt-lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8, help="passages per adaptation step")
    ap.add_argument("--scale-weight", type=float, default=0.3)
    ap.add_argument("--scale-target", type=float, default=6.0)
    ap.add_argument("--bow-weight", type=float, default=0.0)
    ap.add_argument("--neg-weight", type=float, default=1.0)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--train-lr", type=float, default=3e-4)
    ap.add_argument("--queries", type=int, default=4, help="queries per contrastive step")
    ap.add_argument("--group-size", type=int, default=2)
    ap.add_argument("--lambda-flops", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    test = beir.subsample(beir.load_dataset(args.beir, "test"), beir.Subsample(args.test_queries, args.test_docs))
    emit(bow=bow_references(tok, test), queries=len(test.queries), passages=len(test.corpus.ids))
    spec = SparseEncoderSpec(max_passage_length=args.length, batch_tokens=8192)
    lora = LoraSpec.from_config({"r": 16, "alpha": 32})
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model = apply_lora(base, lora, 0)
    raw = SparseEncoderSpec(**{**spec.to_dict(), "top_k": args.top_k})
    emit(probe="raw logits", top_k=args.top_k, **evaluate(model, tok, test, raw))
    if args.probe_shift:
        emit(probe=f"log_softmax + {args.probe_shift:g}", **probe_normalised(model, tok, test, spec, args.probe_shift))

    aspec = adaptation.AdaptationSpec(
        max_length=args.length,
        bow_weight=args.bow_weight,
        neg_weight=args.neg_weight,
        scale_weight=args.scale_weight,
        scale_target=args.scale_target,
    )
    adapter = adaptation.AdaptationModel(model, aspec, lora)
    collate = adaptation.AdaptationCollator(tok, aspec, len(tok), rng=random.Random(0))
    texts = adaptation.corpus_texts(args.beir / "corpus.jsonl")
    rng = random.Random(0)
    start = time.perf_counter()
    adapt_steps = optimise(
        model, args.adapt_lr, args.adapt_steps, lambda _: adapter(collate(rng.sample(texts, args.batch)))
    )
    for step, out in adapt_steps:
        emit(
            step=step,
            loss_ntp=round(float(out["loss_ntp"]), 3),
            loss_scale=round(float(out["loss_scale"]), 3),
            loss_bow=round(float(out["loss_bow"]), 4),
            **{k: round(v, 3) for k, v in out["log"].items()},
            seconds=round(time.perf_counter() - start),
        )
    emit(eval=f"adapted {args.adapt_steps} steps", **evaluate(model, tok, test, spec))

    if not args.train_steps:
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_random_groups(beir.load_dataset(args.beir, "train"), Path(tmp) / "groups.jsonl", negatives=7)
        groups = load_groups(Path(tmp) / "groups.jsonl")
    cspec = sparse_training.CspladeSpec(
        group_size=args.group_size,
        max_passage_length=args.length,
        lambda_q=args.lambda_flops,
        lambda_d=args.lambda_flops,
        flops_warmup_steps=args.train_steps // 3,
    )
    trainer = sparse_training.SparseModel(model, cspec, lora)
    collate_groups = sparse_training.SparseGroupCollator(tok, cspec, rng=random.Random(1))

    def contrastive(step: int) -> dict:
        trainer.set_step(step)
        batch = collate_groups(rng.sample(groups, args.queries))
        return trainer(batch["query"], batch["passage"])

    start = time.perf_counter()
    for step, out in optimise(model, args.train_lr, args.train_steps, contrastive):
        emit(
            cstep=step,
            loss_contrastive=round(float(out["loss_contrastive"]), 3),
            flops_q=round(float(out["loss_flops_q"]), 2),
            flops_d=round(float(out["loss_flops_d"]), 2),
            nnz_q=out["log"]["nnz_q"],
            nnz_d=out["log"]["nnz_d"],
            seconds=round(time.perf_counter() - start),
        )
    emit(eval=f"trained {args.train_steps} steps", **evaluate(model, tok, test, spec))


if __name__ == "__main__":
    main()

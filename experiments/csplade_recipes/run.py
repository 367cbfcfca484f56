"""CSPLADE recipes on a full BEIR dataset, each arm beside the bag-of-words reference at the
same lengths: which adaptation objective, variant (plain, echo, bidirectional) and contrastive
recipe make the sparse vectors retrieve. Meant for a GPU (it runs on CPU, slowly).

Every arm starts from the base LM with fresh LoRA adapters (r 16), adapts on corpus passages,
then trains InfoNCE + FLOPS on the train split with hard negatives mined by the ``bow``
reference itself (top 30 non-positive passages per training query; the workflow mines with a
dense retriever: this script's choice, so it needs no second model), and is evaluated on the
full test corpus (the workflow's exact sparse search and ranx evaluation,
:func:`llmret.results.probe_eval.score_sparse`; top_k terms kept per vector). The loops are
the library's models and collators trained by the probes' plain AdamW loop
(:func:`llmret.training.plain_loop.plain_steps`: gradient-norm clipping at 1.0 and a 5-step
linear warm-up, as the training stages); on CUDA under bfloat16 autocast.

    python experiments/csplade_recipes/run.py --model resources/models/smollm2-135m \\
        --beir resources/datasets/scifact --arms scale,ntp,bi,echo --budget-s 420

Prints JSON lines (``bow``, ``arm``) and writes them to ``--out`` as they come.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from llmret.csplade import adaptation
from llmret.csplade.sparse_training import CspladeSpec, SparseGroupCollator, SparseModel
from llmret.data import beir
from llmret.results.probe_eval import score_sparse
from llmret.retrieval import bow
from llmret.retrieval.sparse_encoder import SparseEncoderSpec, encode_sparse
from llmret.training.contrastive import TrainGroup
from llmret.training.lora import LoraSpec
from llmret.training.plain_loop import plain_steps

WARMUP_STEPS = 5  # of each phase's plain loop


@dataclass(frozen=True)
class Arm:
    name: str
    adapt_steps: int = 200
    adapt_batch: int = 32
    adapt_lr: float = 5e-4
    scale_weight: float = 0.3  # 0: next-token (MNTP when bidirectional) alone
    echo: bool = False
    bidirectional: bool = False
    epochs: float = 3.0  # contrastive passes over the training queries
    queries: int = 16  # per contrastive step
    group_size: int = 8  # 1 positive + 7 bow-mined negatives
    train_lr: float = 1e-4
    lambda_q: float = 5e-4
    lambda_d: float = 1e-3
    flops_warmup_steps: int = 50


ARMS = {
    "scale": Arm("scale"),
    "ntp": Arm("ntp", scale_weight=0.0),
    "none": Arm("none", adapt_steps=0),
    "bi": Arm("bi", bidirectional=True),
    "echo": Arm("echo", echo=True),
    "lr3e-4": Arm("lr3e-4", train_lr=3e-4),
    "flops1e-4": Arm("flops1e-4", lambda_q=1e-4, lambda_d=1e-4),
    "epochs1": Arm("epochs1", epochs=1.0),
}


def ndcg_at_10(q, d, test: beir.Dataset) -> float:
    """nDCG@10 of the exact sparse search of ``test``'s queries over its corpus."""
    return score_sparse(q, d, test, ["ndcg@10"], k=10)[1]["ndcg@10"]


def bow_vectors(tok, corpus: list[str], queries: list[str], spec: bow.BowSpec):
    """(query vectors weighted by the corpus's BM25 idf, passage vectors), as the bow system."""
    d = bow.encode_bow(tok, corpus, "passage", spec)
    df, n = bow.document_frequencies([d], d.shape[1])
    q = bow.weight_queries(bow.encode_bow(tok, queries, "query", spec), bow.bm25_idf(df, n))
    return q, d


def mined_groups(tok, train: beir.Dataset, spec: bow.BowSpec, depth: int = 30) -> list[TrainGroup]:
    """Training groups whose negatives are the bow reference's top ``depth`` non-positives."""
    dids, texts = list(train.corpus.ids), train.corpus.contents()
    qids = [q for q in train.queries if train.qrels.get(q)]
    q, d = bow_vectors(tok, texts, [train.queries[x] for x in qids], spec)
    scores = (q @ d.T).toarray()
    row = {x: j for j, x in enumerate(dids)}
    groups = []
    for i, qid in enumerate(qids):
        positives = {x for x, r in train.qrels[qid].items() if r > 0}
        ranked = [dids[j] for j in np.argsort(-scores[i], kind="stable")[: depth + len(positives)]]
        negatives = [x for x in ranked if x not in positives][:depth]
        groups.append(
            TrainGroup(
                qid,
                train.queries[qid],
                tuple(texts[row[x]] for x in positives if x in row),
                tuple(texts[row[x]] for x in negatives),
            )
        )
    return [g for g in groups if g.positives]


def run_arm(arm: Arm, args, tok, test: beir.Dataset, groups: list[TrainGroup], corpus_texts: list[str]) -> dict:
    device = args.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    torch.manual_seed(0)
    rng = random.Random(0)
    lora = LoraSpec.from_config({"r": 16, "alpha": 32})
    encoder = adaptation.load_causal_lora(args.model, lora, seed=0).to(device)
    params = [p for p in encoder.parameters() if p.requires_grad]
    out = {"arm": arm.name, "settings": asdict(arm)}

    start = time.perf_counter()
    if arm.adapt_steps:
        aspec = adaptation.AdaptationSpec(
            max_length=args.passage_length,
            echo=arm.echo,
            bidirectional=arm.bidirectional,
            scale_weight=arm.scale_weight,
        )
        adapter = adaptation.AdaptationModel(encoder, aspec, lora)
        collate = adaptation.AdaptationCollator(tok, aspec, len(tok), rng=random.Random(0))

        def adaptation_loss(_step: int) -> dict:
            with autocast:
                return adapter(collate(rng.sample(corpus_texts, arm.adapt_batch)).to(device))

        for _ in plain_steps(params, arm.adapt_steps, adaptation_loss, arm.adapt_lr, WARMUP_STEPS):
            pass
    out["adapt_s"] = round(time.perf_counter() - start, 1)

    spec = CspladeSpec(
        max_query_length=args.query_length,
        max_passage_length=args.passage_length,
        echo=arm.echo,
        bidirectional=arm.bidirectional,
        group_size=arm.group_size,
        lambda_q=arm.lambda_q,
        lambda_d=arm.lambda_d,
        flops_warmup_steps=arm.flops_warmup_steps,
    )
    model = SparseModel(encoder, spec, lora)
    collate_groups = SparseGroupCollator(tok, spec, rng=random.Random(1))
    steps = max(1, round(arm.epochs * len(groups) / arm.queries))

    def contrastive(step: int) -> dict:
        model.set_step(step)
        batch = collate_groups(rng.sample(groups, arm.queries))
        with autocast:
            return model(batch["query"].to(device), batch["passage"].to(device))

    start, losses = time.perf_counter(), []
    for _, result in plain_steps(params, steps, contrastive, arm.train_lr, WARMUP_STEPS):
        losses.append(float(result["loss_contrastive"]))
    out.update(train_steps=steps, train_s=round(time.perf_counter() - start, 1))
    out["loss_first_last"] = [round(float(np.mean(losses[:5])), 3), round(float(np.mean(losses[-5:])), 3)]

    espec = SparseEncoderSpec(**{**spec.encoder_settings(), "top_k": args.top_k, "batch_tokens": args.batch_tokens})
    encoder.eval()
    start = time.perf_counter()
    with autocast:
        d = encode_sparse(encoder, tok, test.corpus.contents(), "passage", espec, show_progress=False)
        q = encode_sparse(encoder, tok, list(test.queries.values()), "query", espec, show_progress=False)
    out["encode_s"] = round(time.perf_counter() - start, 1)
    out.update(
        ndcg10=round(ndcg_at_10(q, d, test), 4),
        terms_per_query=round(q.nnz / q.shape[0], 1),
        terms_per_passage=round(d.nnz / d.shape[0], 1),
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="causal LM checkpoint (HF, safetensors)")
    ap.add_argument("--beir", required=True, type=Path, help="BEIR folder with test and train qrels")
    ap.add_argument("--arms", default="scale,ntp,bi,echo,none", help=f"comma-separated, of {sorted(ARMS)}")
    ap.add_argument("--query-length", type=int, default=64)
    ap.add_argument("--passage-length", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=256, help="terms kept per vector at evaluation")
    ap.add_argument("--batch-tokens", type=int, default=65536)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget-s", type=float, default=0, help="start no arm after this many seconds (0: all)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every arm's steps (a quick CPU check)")
    ap.add_argument("--test-docs", type=int, default=0, help="subsample the test corpus (0: all; judged kept)")
    for flag in ("adapt-steps", "adapt-batch", "queries", "group-size"):
        ap.add_argument(f"--{flag}", type=int, default=0, help="override every arm's (0: the arm's)")
    ap.add_argument("--epochs", type=float, default=0, help="override every arm's (0: the arm's)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    began = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    test = beir.load_dataset(args.beir, "test")
    if args.test_docs:
        test = beir.subsample(test, beir.Subsample(max_docs=args.test_docs))
    train = beir.load_dataset(args.beir, "train")
    sink = open(args.out, "a") if args.out else None

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    ref = bow.BowSpec(max_query_length=args.query_length, max_passage_length=args.passage_length)
    q, d = bow_vectors(tok, test.corpus.contents(), list(test.queries.values()), ref)
    emit(
        {
            "bow": asdict(ref),
            "ndcg10": round(ndcg_at_10(q, d, test), 4),
            "queries": len(test.queries),
            "passages": len(test.corpus.ids),
            "device": args.device,
        }
    )
    groups = mined_groups(tok, train, ref)
    corpus_texts = train.corpus.contents()
    for name in filter(None, args.arms.split(",")):
        if args.budget_s and time.perf_counter() - began > args.budget_s:
            emit({"skipped": name, "reason": f"budget of {args.budget_s:g} s spent"})
            continue
        arm = ARMS[name]
        if args.scale != 1.0:
            arm = replace(arm, adapt_steps=math.ceil(arm.adapt_steps * args.scale), epochs=arm.epochs * args.scale)
        overrides = {k: getattr(args, k) for k in ("adapt_steps", "adapt_batch", "queries", "group_size", "epochs")}
        arm = replace(arm, **{k: v for k, v in overrides.items() if v})
        emit(run_arm(arm, args, tok, test, groups, corpus_texts))
    emit({"done": round(time.perf_counter() - began, 1)})


if __name__ == "__main__":
    main()

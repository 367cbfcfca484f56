"""CSPLADE with and without the adaptation phase: training curves, dead dimensions, and
retrieval quality on a BEIR test split.

For each learning rate, two arms train the same contrastive + FLOPS recipe on the same
training groups: from the base causal LM, and from the LM after ``--adapt-steps`` of the
adaptation phase. Each logged step prints InfoNCE, FLOPS, the fraction of dead vocabulary
dimensions and non-zero terms per passage; each trained model then encodes the test
corpus and queries, and the workflow's exact sparse search ranks the top 100 (TREC runs
written to ``--out``; nDCG@10 from the workflow's ranx evaluation,
:func:`llmret.results.probe_eval.score_sparse`).

    python experiments/csplade_adaptation/run.py --model resources/models/smollm2-135m \\
        --beir resources/datasets/scifact --out /tmp/csplade-ab --adapt-steps 100 --train-steps 200

Training groups are the train split's positives with random negatives (the phenomenon is
about the start of training, not the negatives' quality).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from llmret.csplade import adaptation, sparse_training
from llmret.data import beir
from llmret.data.trec import write_run
from llmret.results.probe_eval import score_sparse
from llmret.retrieval.sparse_encoder import SparseEncoderSpec, encode_sparse, load_sparse_model
from llmret.training.mining import write_random_groups

ROOT = Path(__file__).resolve().parents[2]


def training(ds_config: str, steps: int, batch: int, lr: float) -> dict:
    return {
        "max_steps": steps,
        "per_device_batch_size": batch,
        "learning_rate": lr,
        "warmup_steps": max(1, steps // 20),
        "save_every": 0,
        "log_every": max(1, steps // 20),
        "deepspeed_config": ds_config,
        "gradient_checkpointing": True,
    }


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()] if path.is_file() else []


def evaluate_model(model_dir: Path, test: beir.Dataset, device: str, out: Path, tag: str, length: int) -> dict:
    from transformers import AutoTokenizer

    spec = SparseEncoderSpec.from_config({"max_passage_length": length, "batch_tokens": 16384})
    model = load_sparse_model(str(model_dir), dtype="float32", device=device)
    tok = AutoTokenizer.from_pretrained(model_dir)
    start = time.perf_counter()
    d = encode_sparse(model, tok, test.corpus.contents(), "passage", spec, show_progress=False)
    secs = time.perf_counter() - start
    q = encode_sparse(model, tok, list(test.queries.values()), "query", spec, show_progress=False)
    run, metrics = score_sparse(q, d, test)
    write_run(out / f"{tag}.trec", run, tag, {"model": str(model_dir)})
    del model
    return {
        "nnz_per_passage": d.nnz / d.shape[0],
        "nnz_per_query": q.nnz / q.shape[0],
        "passages_per_s": d.shape[0] / secs,
        "ndcg@10": metrics["ndcg@10"],
    }


def summary(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    return [{"step": r["step"], **{k: round(r[k], 4) for k in keys if k in r}} for r in rows if "loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="causal LM checkpoint (HF, safetensors)")
    ap.add_argument("--beir", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--adapt-steps", type=int, default=100)
    ap.add_argument("--adapt-lr", type=float, default=1e-4)
    ap.add_argument("--adapt-length", type=int, default=128, help="adaptation max_length")
    ap.add_argument("--bow-weight", type=float, default=1.0, help="adaptation keep-alive weight")
    ap.add_argument("--scale-weight", type=float, default=0.0, help="adaptation logit-scale weight")
    ap.add_argument("--scale-target", type=float, default=6.0)
    ap.add_argument("--eval-length", type=int, default=256, help="max_passage_length when evaluating")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--lambda-flops", type=float, default=1e-3)
    ap.add_argument("--arms", nargs="+", default=["base", "adapted"], choices=["base", "adapted"])
    ap.add_argument("--skip-zero-shot", action="store_true", help="do not evaluate the untrained models")
    ap.add_argument("--test-queries", type=int, default=0, help="subsample the test split (0 = all)")
    ap.add_argument("--test-docs", type=int, default=0, help="subsample the test corpus; judged docs stay (0 = all)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    ds_config = str(ROOT / "config" / "deepspeed" / ("gpu_zero2_bf16.json" if device == "cuda" else "cpu.json"))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    train_ds = beir.load_dataset(args.beir, split="train")
    test = beir.load_dataset(args.beir, split="test")
    if args.test_queries or args.test_docs:
        test = beir.subsample(test, beir.Subsample(args.test_queries or None, args.test_docs or None))
    groups = out / "groups.jsonl"
    write_random_groups(train_ds, groups, negatives=args.group_size - 1)
    lora = {"r": 16, "alpha": 32}
    keys = ("loss", "loss_contrastive", "loss_flops_d", "dead_fraction", "nnz_d", "nnz_q", "loss_bow", "loss_ntp")
    keys += ("loss_scale", "own_alive")

    adapted = out / "adapted"
    t0 = time.perf_counter()
    adaptation.adapt(
        str(args.model),
        str(args.beir / "corpus.jsonl"),
        {
            "max_length": args.adapt_length,
            "bow_weight": args.bow_weight,
            "scale_weight": args.scale_weight,
            "scale_target": args.scale_target,
        },
        lora,
        training(ds_config, args.adapt_steps, args.batch, args.adapt_lr),
        str(adapted),
        str(out / "adapted-adapter"),
        str(out / "adapted-ckpt"),
    )
    report: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "adaptation": {
            "seconds": time.perf_counter() - t0,
            "log": summary(read_log(out / "adapted-ckpt" / "train_log.jsonl"), keys),
        },
        "arms": {},
    }
    if not args.skip_zero_shot:
        report["zero_shot_base"] = evaluate_model(args.model, test, device, out, "base-untrained", args.eval_length)
        report["zero_shot_adapted"] = evaluate_model(adapted, test, device, out, "adapted-untrained", args.eval_length)
    for lr in args.lrs:
        for arm, start in (("base", args.model), ("adapted", adapted)):
            if arm not in args.arms:
                continue
            tag = f"{arm}-lr{lr:g}"
            t0 = time.perf_counter()
            sparse_training.train(
                str(start),
                str(groups),
                {
                    "group_size": args.group_size,
                    "lambda_q": args.lambda_flops,
                    "lambda_d": args.lambda_flops,
                    "flops_warmup_steps": max(1, args.train_steps // 4),
                },
                lora,
                training(ds_config, args.train_steps, args.batch, lr),
                str(out / tag),
                str(out / f"{tag}-adapter"),
                str(out / f"{tag}-ckpt"),
            )
            secs = time.perf_counter() - t0
            log = summary(read_log(out / f"{tag}-ckpt" / "train_log.jsonl"), keys)
            report["arms"][tag] = {
                "seconds": secs,
                "log": log,
                **evaluate_model(out / tag, test, device, out, tag, args.eval_length),
            }
            print(json.dumps({tag: {k: v for k, v in report["arms"][tag].items() if k != "log"}}), flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

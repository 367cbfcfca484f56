"""Does contrastive fine-tuning learn or collapse? A fast CPU probe of the fine-tuning recipe.

A plain PyTorch loop (AdamW, the stage's warm-up + linear decay, LoRA; no DeepSpeed: the
``finetune`` rule runs the real stage) over :class:`llmret.finetuning.ContrastiveModel` on a
Tevatron negatives file, so the loss and the batches are the library's. Each step prints a
JSON line with the InfoNCE loss next to ``ln(candidates)`` (what identical embeddings
score), the passages' mean pairwise cosine (``p_cos``, -> 1 on collapse) and in-batch top-1.
Repeat ``--lr`` / ``--temperature`` to compare settings in one run:

    python benchmarks/finetune_stability.py --model resources/models/smollm2-135m \\
        --negatives results/mining/scifact-minilm/negatives.jsonl --steps 20 \\
        --lr 1e-4 --lr 2e-5 --temperature 0.01 --temperature 0.05
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmret.finetuning import (  # noqa: E402
    ContrastiveModel,
    ContrastiveSpec,
    GroupCollator,
    LoraSpec,
    load_groups,
    mean_pairwise_cosine,
    top1_accuracy,
)
from llmret.training import lr_factor  # noqa: E402


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def probe(args, lr: float, temperature: float) -> dict:
    from transformers import AutoTokenizer

    spec = ContrastiveSpec(
        group_size=args.group,
        temperature=temperature,
        max_query_length=args.q_len,
        max_passage_length=args.p_len,
    )
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = ContrastiveModel.from_pretrained(args.model, spec, LoraSpec(r=args.lora_r), seed=args.seed)
    groups = load_groups(args.negatives)
    random.Random(args.seed).shuffle(groups)
    collate = GroupCollator(tok, spec, rng=random.Random(args.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, "linear", args.warmup, args.steps))
    batches = itertools.cycle(range(0, len(groups) - args.batch + 1, args.batch))
    uniform = math.log(args.batch * args.group)
    model.train()
    t0, last = time.perf_counter(), {}
    for step in range(1, args.steps + 1):
        start = next(batches)
        batch = collate(groups[start : start + args.batch])
        out = model(**batch)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        last = {"loss": out["loss"].item(), **out["log"]}
        emit(event="step", lr=lr, temperature=temperature, step=step, ln_candidates=uniform, **last)
    model.eval()
    with torch.no_grad():  # a held-out batch: the spread of fresh passages, not the trained ones
        batch = collate(groups[-args.batch :])
        q = model.encode(batch["query_input_ids"], batch["query_attention_mask"])
        p = model.encode(batch["passage_input_ids"], batch["passage_attention_mask"])
    result = {
        "lr": lr,
        "temperature": temperature,
        "final_loss": last["loss"],
        "ln_candidates": uniform,
        "heldout_p_cos": mean_pairwise_cosine(p),
        "heldout_top1": top1_accuracy(q, p, args.group),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    emit(event="result", **result)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF checkpoint folder (base LLM or LLaRA)")
    ap.add_argument("--negatives", required=True, help="Tevatron JSONL (the mining stage's output)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="queries per step")
    ap.add_argument("--group", type=int, default=2, help="passages per query (positive + negatives)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--q-len", type=int, default=64)
    ap.add_argument("--p-len", type=int, default=128)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--lr", type=float, action="append", help="peak learning rate (repeatable)")
    ap.add_argument("--temperature", type=float, action="append", help="InfoNCE temperature (repeatable)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for lr, temperature in itertools.product(args.lr or [1e-4], args.temperature or [0.01]):
        probe(args, lr, temperature)


if __name__ == "__main__":
    main()

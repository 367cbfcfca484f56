"""A planted-passage probe of CSPLADE's two training stages: do the sparse vectors keep a
query's own rare (made-up) words and rank the one passage that shares them first?

Synthetic data, no download: 60 training and 30 held-out made-up words ("zorquenblax"), each
with a query ("what is the zorquenblax") and a passage ("The zorquenblax is an enzyme that cuts
DNA, first described in a study of mice."); a training group's negative is another word's
passage on the same topic, so only the made-up word separates them. A plain PyTorch loop
(AdamW, gradient norm clipped at 1.0 and a 5-step linear warm-up as the training stages do, no
DeepSpeed) over the library's ``AdaptationModel`` and
``SparseModel``; every ``eval`` line gives, on the 30 held-out queries against their 30
passages, the share ranked first (``top1``, chance 0.033), the share of each query's made-up
word's tokens with a non-zero weight in its own vector (``own_kept``), the share of queries
that keep at least one of them (``own_any``) and terms per vector.

    python benchmarks/csplade_planted.py --model .cache/test-models/smollm2-135m \\
        --adapt-steps 30 --scale-weight 0.3 --train-steps 40 --queries 4
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llmret.csplade import adaptation  # noqa: E402
from llmret.csplade.sparse_training import CspladeSpec, SparseGroupCollator, SparseModel  # noqa: E402
from llmret.retrieval.sparse_encoder import SparseEncoderSpec, encode_sparse  # noqa: E402
from llmret.training.contrastive import TrainGroup  # noqa: E402
from llmret.training.lora import LoraSpec  # noqa: E402

SYLLABLES = ["zor", "blax", "quen", "thil", "vask", "mur", "dren", "okal", "pril", "tesh", "gav", "lume", "snor", "fid"]
TOPICS = [
    "a protein expressed in the liver",
    "a mineral found in volcanic rock",
    "an enzyme that cuts DNA",
    "a bacterium living in soil",
    "a drug that lowers blood pressure",
    "a receptor in the brain",
]


def planted_data(seed: int = 0) -> tuple[list[TrainGroup], list[str], list[str], list[str]]:
    """(training groups, held-out words, their queries, their passages in the same order)."""
    rng = random.Random(seed)
    words: list[str] = []
    while len(words) < 90:
        w = "".join(rng.choice(SYLLABLES) for _ in range(3))
        if w not in words:
            words.append(w)

    def passage(w: str) -> str:
        return f"The {w} is {rng.choice(TOPICS)}, first described in a study of {rng.choice(['mice', 'cells'])}."

    train, held_out = words[:60], words[60:]
    groups = []
    for w in train:
        other = rng.choice([x for x in train if x != w])
        groups.append(TrainGroup(w, f"what is the {w}", (passage(w),), (passage(other),)))
    return groups, held_out, [f"what is the {w}" for w in held_out], [passage(w) for w in held_out]


def evaluate(encoder, tok, spec: SparseEncoderSpec, words, queries, passages) -> dict:
    encoder.eval()
    d = encode_sparse(encoder, tok, passages, "passage", spec, False).toarray()
    q = encode_sparse(encoder, tok, queries, "query", spec, False).toarray()
    encoder.train()
    top1 = float(np.mean((q @ d.T).argmax(1) == np.arange(len(queries))))
    pieces = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    own = [[q[i, t] > 0 for t in ids] for i, ids in enumerate(pieces)]
    return {
        "top1": round(top1, 3),
        "own_kept": round(float(np.mean([np.mean(o) for o in own])), 3),
        "own_any": round(float(np.mean([any(o) for o in own])), 3),
        "nnz_q": round(float((q > 0).sum(1).mean()), 1),
        "nnz_d": round(float((d > 0).sum(1).mean()), 1),
    }


def optimiser(params, lr: float, warmup: int = 5):
    """AdamW with a linear warm-up over ``warmup`` steps (the stages warm up too)."""
    opt = torch.optim.AdamW(params, lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))


def update(loss: torch.Tensor, opt, sched, params, max_grad_norm: float) -> None:
    """One optimizer step, the gradient norm clipped as the stages clip it (0: not clipped)."""
    opt.zero_grad()
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    sched.step()


@dataclass(frozen=True)
class ProbeArgs:
    """The probe's recipe (defaults: the measured one, see docs/benchmarks.md)."""

    echo: bool = False
    adapt_steps: int = 30
    adapt_lr: float = 1e-3
    scale_weight: float = 0.3  # 0: next-token loss alone
    train_steps: int = 40
    train_lr: float = 3e-4
    queries: int = 4  # per contrastive step
    max_grad_norm: float = 1.0  # the training stages' default
    seed: int = 0


def probe(model_dir: str | Path, args: ProbeArgs, emit=lambda record: None) -> dict[str, dict]:
    """Zero-shot, adapted and trained figures (``evaluate``) of one run; ``emit`` gets each
    evaluation and every 10th contrastive step as it happens."""
    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    groups, words, queries, passages = planted_data(args.seed)
    spec = CspladeSpec(
        max_query_length=16, max_passage_length=32, echo=args.echo, group_size=2, flops_warmup_steps=args.train_steps
    )
    lora = LoraSpec.from_config({"r": 16, "alpha": 32})
    encoder = adaptation.load_causal_lora(model_dir, lora, seed=args.seed)
    espec = SparseEncoderSpec(**spec.encoder_settings())
    results: dict[str, dict] = {}

    def report(stage: str, started: float | None = None) -> None:
        results[stage] = evaluate(encoder, tok, espec, words, queries, passages)
        extra = {} if started is None else {"seconds": round(time.perf_counter() - started, 1)}
        emit({"eval": stage, **results[stage], **extra})

    report("zero-shot")
    aspec = adaptation.AdaptationSpec(max_length=32, echo=args.echo, scale_weight=args.scale_weight)
    adapter = adaptation.AdaptationModel(encoder, aspec, lora)
    collate = adaptation.AdaptationCollator(tok, aspec, len(tok), rng=random.Random(args.seed))
    texts = [g.positives[0] for g in groups]
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt, sched = optimiser(params, args.adapt_lr)
    start = time.perf_counter()
    for _ in range(args.adapt_steps):
        update(adapter(collate(rng.sample(texts, 8)))["loss"], opt, sched, params, args.max_grad_norm)
    report("adapted", start)

    model = SparseModel(encoder, spec, lora)
    collate_groups = SparseGroupCollator(tok, spec, rng=random.Random(args.seed + 1))
    opt, sched = optimiser(params, args.train_lr)
    start = time.perf_counter()
    for step in range(1, args.train_steps + 1):
        model.set_step(step)
        batch = collate_groups(rng.sample(groups, args.queries))
        out = model(batch["query"], batch["passage"])
        update(out["loss"], opt, sched, params, args.max_grad_norm)
        if step % 10 == 0:
            emit({"cstep": step, "loss_contrastive": round(float(out["loss_contrastive"]), 3)})
    report("trained", start)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="causal LM checkpoint (HF, safetensors)")
    for f in fields(ProbeArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            ap.add_argument(flag, action="store_true")
        else:
            ap.add_argument(flag, type=float if f.type == "float" else int, default=f.default)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = ProbeArgs(**{f.name: getattr(args, f.name) for f in fields(ProbeArgs)})
    probe(args.model, recipe, lambda record: print(json.dumps(record), flush=True))


if __name__ == "__main__":
    main()

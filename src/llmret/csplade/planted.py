"""A planted-word check of CSPLADE's two training stages: do the sparse vectors keep a query's
own rare (made-up) words and rank the one passage that shares them first?

Synthetic data, no download: 60 training and 30 held-out made-up words ("zorquenblax"), each
with a query ("what is the zorquenblax") and a passage ("The zorquenblax is an enzyme that cuts
DNA, first described in a study of mice."); a training group's negative is another word's
passage on the same topics, so only the made-up word separates them. Both stages are the
library's models (:class:`~llmret.csplade.adaptation.AdaptationModel`,
:class:`~llmret.csplade.sparse_training.SparseModel`) trained by the probes' plain AdamW loop
(:func:`llmret.training.plain_loop.plain_steps`: clipping and a 5-step warm-up as the stages,
no DeepSpeed). ``experiments/csplade_planted`` runs it from the command line and records what it
measured; ``tests/test_csplade_retrieval.py`` runs the default recipe as a test.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmret.csplade import adaptation
from llmret.csplade.sparse_training import CspladeSpec, SparseGroupCollator, SparseModel
from llmret.retrieval.sparse_encoder import SparseEncoderSpec, encode_sparse
from llmret.training.contrastive import TrainGroup
from llmret.training.lora import LoraSpec
from llmret.training.plain_loop import plain_steps

SYLLABLES = ["zor", "blax", "quen", "thil", "vask", "mur", "dren", "okal", "pril", "tesh", "gav", "lume", "snor", "fid"]
TOPICS = [
    "a protein expressed in the liver",
    "a mineral found in volcanic rock",
    "an enzyme that cuts DNA",
    "a bacterium living in soil",
    "a drug that lowers blood pressure",
    "a receptor in the brain",
]
WARMUP_STEPS = 5  # of each stage's plain loop


@dataclass(frozen=True)
class PlantedRecipe:
    """One run's settings (the defaults: the recipe measured in experiments/csplade_planted)."""

    echo: bool = False
    adapt_steps: int = 30
    adapt_lr: float = 1e-3
    scale_weight: float = 0.3  # 0: next-token loss alone
    train_steps: int = 40
    train_lr: float = 3e-4
    queries: int = 4  # per contrastive step
    max_grad_norm: float = 1.0  # the training stages' default
    seed: int = 0


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


def planted_figures(encoder, tok, spec: SparseEncoderSpec, words, queries, passages) -> dict:
    """On the held-out queries against their passages: the share ranked first (``top1``), the
    share of a query's made-up-word tokens with a weight in its own vector (``own_kept``), the
    share of queries keeping at least one (``own_any``) and terms per query / passage."""
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


def run_planted(
    model_dir: str | Path, recipe: PlantedRecipe, emit: Callable[[dict], None] | None = None
) -> dict[str, dict]:
    """Figures (:func:`planted_figures`) of the model zero-shot, after adaptation and after
    contrastive training, keyed ``zero-shot``, ``adapted``, ``trained``; ``emit`` gets each
    evaluation and every 10th contrastive step as it happens."""
    from transformers import AutoTokenizer

    emit = emit or (lambda record: None)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    groups, words, queries, passages = planted_data(recipe.seed)
    spec = CspladeSpec(
        max_query_length=16,
        max_passage_length=32,
        echo=recipe.echo,
        group_size=2,
        flops_warmup_steps=recipe.train_steps,
    )
    lora = LoraSpec.from_config({"r": 16, "alpha": 32})
    encoder = adaptation.load_causal_lora(model_dir, lora, seed=recipe.seed)
    espec = SparseEncoderSpec(**spec.encoder_settings())
    results: dict[str, dict] = {}

    def report(stage: str, started: float | None = None) -> None:
        results[stage] = planted_figures(encoder, tok, espec, words, queries, passages)
        extra = {} if started is None else {"seconds": round(time.perf_counter() - started, 1)}
        emit({"eval": stage, **results[stage], **extra})

    report("zero-shot")
    aspec = adaptation.AdaptationSpec(max_length=32, echo=recipe.echo, scale_weight=recipe.scale_weight)
    adapter = adaptation.AdaptationModel(encoder, aspec, lora)
    collate = adaptation.AdaptationCollator(tok, aspec, len(tok), rng=random.Random(recipe.seed))
    texts = [g.positives[0] for g in groups]
    params = [p for p in encoder.parameters() if p.requires_grad]
    loop = {"warmup_steps": WARMUP_STEPS, "max_grad_norm": recipe.max_grad_norm}

    def adaptation_loss(_step: int) -> dict:
        return adapter(collate(rng.sample(texts, 8)))

    start = time.perf_counter()
    for _ in plain_steps(params, recipe.adapt_steps, adaptation_loss, recipe.adapt_lr, **loop):
        pass
    report("adapted", start)

    model = SparseModel(encoder, spec, lora)
    collate_groups = SparseGroupCollator(tok, spec, rng=random.Random(recipe.seed + 1))

    def contrastive(step: int) -> dict:
        model.set_step(step)
        batch = collate_groups(rng.sample(groups, recipe.queries))
        return model(batch["query"], batch["passage"])

    start = time.perf_counter()
    for step, out in plain_steps(params, recipe.train_steps, contrastive, recipe.train_lr, **loop):
        if step % 10 == 0:
            emit({"cstep": step, "loss_contrastive": round(float(out["loss_contrastive"]), 3)})
    report("trained", start)
    return results

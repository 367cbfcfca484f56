"""Does contrastive fine-tuning learn or collapse? A fast CPU probe of the fine-tuning recipe.

The probes' plain AdamW loop (:func:`llmret.training.plain_loop.plain_steps`: the stage's
warm-up + linear decay, clipping at 1.0, no weight decay, LoRA; no DeepSpeed: the
``finetune`` rule runs the real stage) over :class:`llmret.finetuning.repllama.ContrastiveModel` on a
Tevatron negatives file, so the loss and the batches are the library's. Each step prints a
JSON line with the InfoNCE loss next to ``ln(candidates)`` (what identical embeddings
score), the passages' mean pairwise cosine (``p_cos``, -> 1 on collapse) and in-batch top-1.
Repeat ``--lr`` / ``--temperature`` / ``--warmup`` / ``--group`` to compare settings in one
run. With ``--eval-beir`` each trained model also ranks that BEIR folder's corpus for its
judged queries (exact dot-product search) and writes a TREC run per setting under
``--runs-dir``; where ranx is installed the run's nDCG@10 and R@100 are printed too (elsewhere,
e.g. on a GPU box, evaluate the runs later). ``--device cuda`` runs it on a GPU:

    python experiments/finetune_stability/run.py --model resources/models/smollm2-135m \\
        --negatives results/mining/scifact-minilm/negatives.jsonl --steps 20 \\
        --lr 1e-4 --lr 2e-5 --temperature 0.01 --temperature 0.05 \\
        --eval-beir resources/datasets/scifact --runs-dir results/probe
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmret.data.beir import Dataset, load_dataset
from llmret.data.trec import write_run
from llmret.finetuning.repllama import ContrastiveModel, FinetuningSpec
from llmret.retrieval.tokenization import token_batches
from llmret.training.contrastive import GroupCollator, load_groups, mean_pairwise_cosine, pad_rows, top1_accuracy
from llmret.training.lora import LoraSpec
from llmret.training.plain_loop import plain_steps


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


@dataclass(frozen=True)
class Setting:
    lr: float
    temperature: float
    warmup: int
    group: int
    steps: int
    batch: int

    @property
    def tag(self) -> str:
        """Names the setting's TREC run: unique per setting, so runs never overwrite."""
        return f"lr{self.lr:g}-t{self.temperature:g}-w{self.warmup}-g{self.group}-s{self.steps}-b{self.batch}"


@torch.no_grad()
def embed(model: ContrastiveModel, collate: GroupCollator, texts: list[str], kind: str, device) -> torch.Tensor:
    """Unit vectors of ``texts`` (input order), framed and pooled as in training."""
    ids = collate.tokenize(texts, kind)
    out = torch.empty(len(ids), model.encoder.config.hidden_size)
    for rows in token_batches([len(x) for x in ids], 16384):
        input_ids, mask = pad_rows([ids[i] for i in rows], collate.pad_id)
        out[rows] = model.encode(input_ids.to(device), mask.to(device)).float().cpu()
    return out


def retrieve(model, collate, data: Dataset, depth: int, device) -> dict[str, list[tuple[str, float]]]:
    """Exact top-``depth`` passages per judged query by dot product."""
    p = embed(model, collate, data.corpus.contents(), "passage", device)
    qids = sorted(data.queries)
    q = embed(model, collate, [data.queries[i] for i in qids], "query", device)
    scores, rows = (q @ p.T).topk(min(depth, p.shape[0]), dim=1)
    ids = data.corpus.ids
    return {
        qid: [(ids[r], float(s)) for r, s in zip(rows[k].tolist(), scores[k].tolist(), strict=True)]
        for k, qid in enumerate(qids)
    }


def score_run(data: Dataset, run) -> dict:
    from llmret.results.evaluation import evaluate

    try:
        metrics = evaluate(data.qrels, run, ["ndcg@10", "recall@100"])["metrics"]
    except ImportError:  # ranx missing (e.g. a GPU box): the TREC run is scored elsewhere
        return {}
    return {k: round(v, 4) for k, v in metrics.items()}


def on(device, batch: dict) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def probe(args, setting: Setting, groups: list, device, data: Dataset | None) -> dict:
    from transformers import AutoTokenizer

    lr, temperature = setting.lr, setting.temperature
    spec = FinetuningSpec(
        group_size=setting.group,
        temperature=temperature,
        max_query_length=args.q_len,
        max_passage_length=args.p_len,
    )
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = ContrastiveModel.from_pretrained(args.model, spec, LoraSpec(r=args.lora_r), seed=args.seed).to(device)
    groups = list(groups)  # each setting shuffles the same way, from the file's order
    random.Random(args.seed).shuffle(groups)
    collate = GroupCollator(tok, spec, rng=random.Random(args.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    batches = itertools.cycle(range(0, len(groups) - setting.batch + 1, setting.batch))
    uniform = math.log(setting.batch * setting.group)

    def loss_at(_step: int) -> dict:
        start = next(batches)
        return model(**on(device, collate(groups[start : start + setting.batch])))

    model.train()
    t0, last = time.perf_counter(), {}
    loop = plain_steps(
        params, setting.steps, loss_at, lr, setting.warmup, "linear", weight_decay=0.0, max_grad_norm=1.0
    )
    for step, out in loop:
        last = {"loss": out["loss"].item(), **out["log"]}
        if step % args.log_every == 0 or step == setting.steps:
            emit(event="step", setting=setting.tag, step=step, ln_candidates=uniform, **last)
    model.eval()
    with torch.no_grad():  # a held-out batch: the spread of fresh passages, not the trained ones
        batch = on(device, collate(groups[-setting.batch :]))
        q = model.encode(batch["query_input_ids"], batch["query_attention_mask"])
        p = model.encode(batch["passage_input_ids"], batch["passage_attention_mask"])
    result = {
        **asdict(setting),
        "tag": setting.tag,
        "final_loss": last["loss"],
        "ln_candidates": uniform,
        "heldout_p_cos": mean_pairwise_cosine(p),
        "heldout_top1": top1_accuracy(q, p, setting.group),
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    if data is not None:
        run = retrieve(model, collate, data, args.depth, device)
        write_run(Path(args.runs_dir) / f"{setting.tag}.trec", run, "probe", {"setting": result})
        result.update(score_run(data, run))
    emit(event="result", **result)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF checkpoint folder (base LLM or LLaRA)")
    ap.add_argument("--negatives", required=True, help="Tevatron JSONL (the mining stage's output)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="queries per step")
    ap.add_argument("--group", type=int, action="append", help="passages per query, positive + negatives (repeatable)")
    ap.add_argument("--warmup", type=int, action="append", help="warm-up steps (repeatable)")
    ap.add_argument("--q-len", type=int, default=64)
    ap.add_argument("--p-len", type=int, default=128)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--lr", type=float, action="append", help="peak learning rate (repeatable)")
    ap.add_argument("--temperature", type=float, action="append", help="InfoNCE temperature (repeatable)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    ap.add_argument("--log-every", type=int, default=1, help="print every n-th step")
    ap.add_argument("--eval-beir", help="BEIR folder to rank after training (exact search)")
    ap.add_argument("--eval-split", default="test")
    ap.add_argument("--runs-dir", default="probe_runs", help="where the TREC runs go (with --eval-beir)")
    ap.add_argument("--depth", type=int, default=100, help="passages retrieved per query")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    groups = load_groups(args.negatives)  # parsed once for all settings
    data = load_dataset(args.eval_beir, args.eval_split) if args.eval_beir else None
    grid = itertools.product(args.lr or [1e-4], args.temperature or [0.01], args.warmup or [10], args.group or [2])
    for lr, temperature, warmup, group in grid:
        probe(args, Setting(lr, temperature, warmup, group, args.steps, args.batch), groups, device, data)


if __name__ == "__main__":
    main()

"""Step time of LLaRA's joint EBAE/EBAR pass against two separate passes.

The paper claims the joint prompt (one pass over ``text SELF </s> NEXT </s>`` with the two
prompts mutually masked) saves about half the cost of running ``text SELF </s>`` and
``text NEXT </s>`` separately, since the text is encoded once. This prints the measured
forward+backward time per step of both, on the same batch and model, and their ratio.

    python benchmarks/bench_llara_joint.py --model resources/models/smollm2-135m \\
        --corpus results/data/scifact/corpus.jsonl --batch 8 --max-text-length 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llmret.llara.modeling import LlaraModel, bow_loss  # noqa: E402
from llmret.llara.objective import LlaraObjective, build_training_batch  # noqa: E402
from llmret.llara.pairs import pairs_from_beir  # noqa: E402


def separate_batch(tokenizer, texts: list[list[int]], prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``text + prompt + </s>`` per row, right padded, plain causal attention."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = [t + p for t in texts]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-text-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    lm = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn)
    objective = LlaraObjective(max_text_length=args.max_text_length)
    model = LlaraModel(lm, objective).train()
    pairs = []
    for p in pairs_from_beir([args.corpus]):
        pairs.append(p)
        if len(pairs) == args.batch:
            break
    batch = build_training_batch(
        tok, [p.text for p in pairs], [p.next_text for p in pairs], lm.config.vocab_size, objective
    )
    texts = batch.text_ids

    def joint_step() -> None:
        model.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()

    def separate_step() -> None:
        model.zero_grad(set_to_none=True)
        total = 0.0
        tasks = ((objective.ebae_prompt, batch.ebae_targets), (objective.ebar_prompt, batch.ebar_targets))
        for prompt, targets in tasks:
            ids, mask = separate_batch(tok, texts, prompt)
            hidden = model.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            emb = hidden[torch.arange(len(texts)), mask.sum(1) - 1]
            total = total + bow_loss(model.projection(emb), targets)
        total.backward()

    times: dict[str, list[float]] = {"joint": [], "separate": []}
    joint_step(), separate_step()  # warm-up
    for _ in range(args.steps):  # interleaved, so drift in machine load hits both alike
        for name, fn in (("joint", joint_step), ("separate", separate_step)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    width = batch.input_ids.shape[1]
    threads = torch.get_num_threads()
    print(f"model={args.model} batch={args.batch} joint width={width} attn={args.attn} threads={threads}")
    for name, ts in times.items():
        print(f"{name:>9}: median {statistics.median(ts):.3f} s/step (min {min(ts):.3f})")
    ratio = statistics.median(times["joint"]) / statistics.median(times["separate"])
    print(f"joint/separate step time: {ratio:.2f} (saving {100 * (1 - ratio):.0f}%)")


if __name__ == "__main__":
    main()

"""Per-Linear input ranges of an encoder on a BEIR corpus's first passages: how much of a
typical activation survives a per-tensor int8 scale (max|x| / 127), the scale torch's dynamic
int8 quantization (``quantize: int8-dynamic``) computes for each input.

    python experiments/activation_outliers/run.py --model results/models/csplade-smollm2 \\
        --beir resources/datasets/scifact --passages 16

Prints the six Linears with the smallest median-to-step ratio and how many have their median
input under one int8 step (rounded to 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llmret.data import beir
from llmret.retrieval.sparse_encoder import (
    SparseEncoderSpec,
    build_batch,
    hidden_states,
    load_sparse_model,
    tokenize_sparse,
)
from llmret.retrieval.tokenization import pad_id_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="causal LM checkpoint (HF, safetensors)")
    ap.add_argument("--beir", required=True, type=Path, help="BEIR folder")
    ap.add_argument("--passages", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    texts = beir.load_dataset(args.beir, split="test").corpus.contents()[: args.passages]
    spec = SparseEncoderSpec.from_config({"max_passage_length": args.max_length})
    model = load_sparse_model(str(args.model), dtype="float32", device="cpu")
    tok = AutoTokenizer.from_pretrained(args.model)
    rows, _ = tokenize_sparse(tok, spec, texts, "passage")
    batch = build_batch(rows, pad_id_of(tok))
    mask = batch.attention_mask.bool()
    ranges: dict[str, tuple[float, float]] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            x = inputs[0].detach()[mask].abs().flatten()  # real tokens only, not padding
            ranges[name] = (float(x.max()), float(x.median()))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(record(name))
    with torch.no_grad():
        model.lm_head(hidden_states(model, batch, bidirectional=False))
    steps = {name: 127 * med / peak if peak else float("inf") for name, (peak, med) in ranges.items()}
    for name in sorted(steps, key=steps.get)[:6]:
        peak, med = ranges[name]
        print(f"{name}: max|x| {peak:.1f}, median|x| {med:.4f}, median = {steps[name]:.3f} int8 steps")
    under = sum(1 for v in steps.values() if v < 1)
    print(f"Linears whose median input is under one int8 step: {under} of {len(steps)}")


if __name__ == "__main__":
    main()

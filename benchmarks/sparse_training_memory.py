"""Peak memory and time of one CSPLADE training step: full logits against chunked pooling.

One forward + backward of SPLADE vectors (``log(1 + ReLU(logit))`` max-pooled over positions)
through a randomly initialised causal LM of SmolLM2's width (hidden 576, vocabulary 49,152; 2
layers unless ``--layers``) with LoRA adapters, at a fixed shape (``--batch`` rows of
``--length`` tokens, some rows padded), loss ``sum(v * probe) + FLOPS(v)``. Variants:

- ``full``: the former training path, kept here only: ``splade_pool`` over all (batch, length,
  vocab) float32 logits (``sparse_logits``), whose ReLU / log1p / masked copies autograd keeps;
- ``chunked``: the library's training path (``sparse_vectors`` without ``chunk``:
  ``llmret.retrieval.pooled_logits``), the LM head applied to ``--block`` logits at a time and
  recomputed in the backward; one row per ``--block`` value.

Each variant runs in a fresh subprocess. Peak memory is the rise of one step (after a warm-up
step) over the memory held before it: on CPU the process's peak resident set (``VmHWM``, reset
through ``/proc/self/clear_refs`` after ``malloc_trim``; glibc's mmap threshold fixed at 1 MiB
so freed tensors leave the resident set), on CUDA ``torch.cuda.max_memory_allocated``. Time is
the mean of ``--steps`` further steps. The vectors of both paths are
compared (largest difference) and the ratios are printed against ``full``.

    python benchmarks/sparse_training_memory.py --batch 8 --length 128 --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llmret.csplade.losses import flops  # noqa: E402
from llmret.retrieval.pooled_logits import DEFAULT_BLOCK  # noqa: E402
from llmret.retrieval.sparse_encoder import build_batch, sparse_logits, sparse_vectors, splade_pool  # noqa: E402


def full_logits_vectors(lm, batch, bidirectional: bool) -> torch.Tensor:
    """The former training path: SPLADE pooling over all (B, L, V) float32 logits."""
    return splade_pool(sparse_logits(lm, batch, bidirectional), batch.pool_mask.to(next(lm.parameters()).device))


def _rss_peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_now_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmret.training.lora import LoraSpec, apply_lora

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config).to(getattr(torch, args.dtype)).to(args.device)
    return apply_lora(lm, LoraSpec(r=16, dropout=0.0)).train()


def _batch(args):
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(args.batch):  # every fourth row a quarter shorter: padding in the batch
        n = args.length - (args.length // 4 if i % 4 == 3 else 0)
        rows.append(torch.randint(3, args.vocab, (n,), generator=g).tolist())
    return build_batch(rows, 0, echo=args.echo).to(args.device)


def run_variant(args) -> dict:
    """One variant in this process: peak memory rise and seconds per step."""
    torch.set_num_threads(args.threads)
    lm, batch = _model(args), _batch(args)
    probe = torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(2)).to(args.device)
    cuda = args.device.startswith("cuda")

    def step():
        lm.zero_grad(set_to_none=True)
        if args.variant == "full":
            v = full_logits_vectors(lm, batch, args.bidirectional)
        else:
            v = sparse_vectors(lm, batch, args.bidirectional, block=args.block)
        ((v * probe).sum() + flops(v)).backward()
        if cuda:
            torch.cuda.synchronize()
        return v.detach()

    vectors = step()  # warm-up: lazy initialisation and the first touch of kernels' code pages
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed blocks back to the system
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _rss_now_kib() * 1024
    step()
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_peak_kib() * 1024
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if args.save_vectors:
        torch.save(vectors.cpu(), args.save_vectors)
    return {"peak_rise_mb": (peak - before) / 2**20, "seconds_per_step": sum(times) / len(times)}


def _child(args, variant: str, block: int, vectors: str) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--block", str(block), "--save-vectors", vectors]
    for key in ("batch", "length", "vocab", "hidden", "intermediate", "layers", "dtype", "device", "steps", "threads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    cmd += ["--echo"] * args.echo + ["--bidirectional"] * args.bidirectional
    # a fixed mmap threshold: large tensors are mapped and unmapped, so the RSS follows live memory
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--echo", action="store_true")
    ap.add_argument("--bidirectional", action="store_true")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up and the measured one")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", type=int, nargs="+", default=[DEFAULT_BLOCK, DEFAULT_BLOCK // 4])
    ap.add_argument("--variant", choices=["full", "chunked"], help=argparse.SUPPRESS)  # a child's run
    ap.add_argument("--block", type=int, default=DEFAULT_BLOCK, help=argparse.SUPPRESS)
    ap.add_argument("--save-vectors", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    import tempfile

    shape = f"batch {args.batch} x {args.length} tokens x vocab {args.vocab:,}, hidden {args.hidden}"
    print(f"{shape}, {args.layers} layers, {args.dtype} on {args.device}, echo={args.echo}, bi={args.bidirectional}")
    with tempfile.TemporaryDirectory() as tmp:
        ref = _child(args, "full", DEFAULT_BLOCK, f"{tmp}/full.pt")
        ref_v = torch.load(f"{tmp}/full.pt")
        print(f"{'variant':<28} {'peak rise MB':>13} {'s/step':>8} {'memory':>8} {'time':>7} {'max |dv|':>9}")
        print(f"{'full logits':<28} {ref['peak_rise_mb']:>13.1f} {ref['seconds_per_step']:>8.3f}")
        for block in args.blocks:
            row = _child(args, "chunked", block, f"{tmp}/chunked.pt")
            diff = float((torch.load(f"{tmp}/chunked.pt") - ref_v).abs().max())
            chunk = min(args.vocab, block // (args.batch * (args.length * (2 if args.echo else 1))))
            mem = ref["peak_rise_mb"] / max(row["peak_rise_mb"], 1e-9)
            t = row["seconds_per_step"] / ref["seconds_per_step"]
            name = f"chunked, {chunk:,} terms/chunk"
            cells = f"{row['peak_rise_mb']:>13.1f} {row['seconds_per_step']:>8.3f} {mem:>7.2f}x {t:>6.2f}x {diff:>9.1e}"
            print(f"{name:<28} {cells}")


if __name__ == "__main__":
    main()

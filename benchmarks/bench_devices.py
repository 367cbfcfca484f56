"""Where the GPU path stands: encoding and training throughput per device and dtype.

Runs the library's own code (TextEncoder, LLaRA pretraining, LoRA contrastive
fine-tuning with DeepSpeed) on a real BEIR dataset and prints, per configuration,
passages/s (encoding) or tokens/s and seconds/step (training), peak accelerator memory,
and ratios against the first configuration measured in the same run. Encoding also
prints the largest difference of each configuration's vectors from fp32's.

    python benchmarks/bench_devices.py --model resources/models/smollm2-135m \\
        --beir resources/datasets/scifact --out /tmp/bench --steps 20

With ``--random-init`` the model folder needs only config.json and the tokenizer: the
weights are drawn at random (throughput does not depend on them; losses then mean
nothing). Training uses ``config/deepspeed/gpu_zero2_bf16.json`` on CUDA and
``config/deepspeed/cpu.json`` otherwise, unless ``--deepspeed`` names another.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmret.data import beir  # noqa: E402
from llmret.retrieval.encoder import EncoderSpec, TextEncoder  # noqa: E402
from llmret.training.mining import write_random_groups  # noqa: E402


def materialise(model_dir: Path, out: Path, random_init: bool) -> Path:
    """The model folder to use: as given, or a random-weight copy of its architecture."""
    if not random_init:
        return model_dir
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    model.save_pretrained(out / "model")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out / "model")
    return out / "model"


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def bench_encode(
    model: Path, texts: list[str], device: str, dtypes: list[str], max_length: int, batch_tokens: list[int]
) -> list[dict]:
    rows, ref = [], None
    for dtype, budget in [(d, b) for d in dtypes for b in batch_tokens]:
        spec = EncoderSpec.from_config(
            {
                "pooling": "last",
                "passage_template": "passage: {text}",
                "max_passage_length": max_length,
                "dtype": dtype,
                "batch_tokens": budget,
            }
        )
        enc = TextEncoder(str(model), spec, device=device)
        enc.encode(texts[:64], "passage")  # warm-up: kernels, allocator
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        vecs = enc.encode(texts, "passage")
        if device == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - start
        ref = vecs if ref is None else ref
        rows.append(
            {
                "stage": "encode",
                "config": f"{device} {dtype} batch_tokens={budget}",
                "passages_per_s": len(texts) / secs,
                "peak_gib": peak_gib(device),
                "max_abs_diff_vs_first": float(np.abs(vecs - ref).max()),
            }
        )
        del enc
    return rows


def training_args(ds_config: str, steps: int, batch: int) -> dict:
    return {
        "max_steps": steps,
        "per_device_batch_size": batch,
        "learning_rate": 1e-5,
        "warmup_steps": 1,
        "save_every": 0,
        "log_every": max(1, steps // 4),
        "deepspeed_config": ds_config,
        "gradient_checkpointing": True,
    }


def train_row(stage: str, device: str, steps: int, result: dict, secs: float, log_path: Path) -> dict:
    logged = [json.loads(line) for line in log_path.open()] if log_path.is_file() else []
    tps = [r["tokens_per_s"] for r in logged if "tokens_per_s" in r]
    return {
        "stage": stage,
        "config": device,
        "steps": steps,
        "s_per_step": secs / steps,
        "tokens_per_s_last_window": tps[-1] if tps else float("nan"),
        "peak_gib": peak_gib(device),
        "first_loss": next((r["loss"] for r in logged if "loss" in r), float("nan")),
        "last_loss": next((r["loss"] for r in reversed(logged) if "loss" in r), float("nan")),
        "result_keys": sorted(result)[:6],
    }


def bench_pretrain(model: Path, corpus: Path, out: Path, device: str, ds_config: str, steps: int, batch: int) -> dict:
    from llmret.llara import shard_dataset
    from llmret.llara.pretraining import PretrainSpec, make_shard, pretrain

    spec = PretrainSpec.from_config({"shards": 1, "max_text_length": 128})
    shard = out / "shards" / "shard-0.safetensors"
    shard.parent.mkdir(parents=True, exist_ok=True)
    make_shard([str(corpus)], str(model), 0, spec, str(shard))
    shard_dataset.write_manifest([shard], out / "shards" / "manifest.json")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = pretrain(
        str(model),
        str(out / "shards" / "manifest.json"),
        spec,
        training_args(ds_config, steps, batch),
        str(out / "llara"),
        str(out / "llara-ckpt"),
    )
    secs = time.perf_counter() - start
    return train_row("llara pretrain", device, steps, result, secs, out / "llara-ckpt" / "train_log.jsonl")


def bench_finetune(model: Path, groups: Path, out: Path, device: str, ds_config: str, steps: int, batch: int) -> dict:
    from llmret.finetuning.repllama import finetune

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = finetune(
        str(model),
        str(groups),
        {"group_size": 8, "max_query_length": 32, "max_passage_length": 156},
        {"r": 32, "alpha": 64},
        {**training_args(ds_config, steps, batch), "learning_rate": 1e-4},
        str(out / "ft"),
        str(out / "ft-adapter"),
        str(out / "ft-ckpt"),
    )
    secs = time.perf_counter() - start
    return train_row("lora finetune", device, steps, result, secs, out / "ft-ckpt" / "train_log.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--beir", required=True, type=Path, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--passages", type=int, default=2048)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, nargs="+", default=[8192], help="encoding batch budgets to compare")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--deepspeed", default=None)
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    args.out.mkdir(parents=True, exist_ok=True)
    model = materialise(args.model, args.out, args.random_init)
    ds = beir.load_dataset(args.beir, split=args.split)
    texts = ds.corpus.contents()[: args.passages]
    dtypes = ["float32", "bfloat16"] if device == "cuda" else ["float32"]
    rows = bench_encode(model, texts, device, dtypes, args.max_length, args.batch_tokens)
    if not args.skip_training:
        ds_config = args.deepspeed or str(
            ROOT / "config" / "deepspeed" / ("gpu_zero2_bf16.json" if device == "cuda" else "cpu.json")
        )
        corpus = args.beir / "corpus.jsonl"
        rows.append(bench_pretrain(model, corpus, args.out, device, ds_config, args.steps, args.batch))
        groups = args.out / "groups.jsonl"
        write_random_groups(ds, groups, negatives=15)
        rows.append(bench_finetune(model, groups, args.out, device, ds_config, args.steps, args.batch))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}")
    first = rows[0]["passages_per_s"]
    for r in rows:
        if r["stage"] == "encode":
            r["ratio_vs_first"] = r["passages_per_s"] / first
        print(json.dumps(r))
    (args.out / "bench_devices.json").write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

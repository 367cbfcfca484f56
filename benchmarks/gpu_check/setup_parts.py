"""Parts ``env`` (what this machine and its torch offer, the devices ``llmret.launch`` would
claim, the measured matmul rate MFU is computed against) and ``prepare`` (the inputs the
training and encoding parts share: tokenizer, random 2-layer Llama, LLaRA shards, negatives)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata

from .common import Context, ensure_model, row, synchronize, synthetic_texts, write_json

# --------------------------------------------------------------------------- env


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    for pkg in ("transformers", "deepspeed", "peft", "faiss-cpu", "faiss-gpu", "numpy"):
        out[pkg] = _version(pkg)
    try:
        import faiss

        out["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else "n/a (no get_num_gpus)"
    except ImportError as e:
        out["faiss_gpus"] = f"faiss not importable: {e}"
    return out


def cuda_devices() -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(
            {
                "index": i,
                "name": p.name,
                "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}",
                "sms": p.multi_processor_count,
                "bf16": bool(torch.cuda.is_bf16_supported()) if i == 0 else None,
            }
        )
    return out


def launch_view() -> dict:
    """The devices llmret.launch sees and would claim for a 1-GPU job, with its own functions."""
    from llmret import launch

    out = {
        "under_launcher": launch.under_launcher(),
        "machine_gpus": launch.machine_gpu_count(),
        "usable_gpus": launch.usable_gpu_count(),
        "claimable": launch.claimable_devices(),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
    }
    try:
        with launch.claimed_devices(1, timeout_s=5, poll_s=1) as claimed:
            out["claims_for_1_gpu"] = claimed
    except (TimeoutError, ValueError) as e:
        out["claims_for_1_gpu"] = f"{type(e).__name__}: {e}"
    return out


def machine() -> dict:
    import psutil

    out = {"cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1)}
    for name, path in (("shm_free_gib", "/dev/shm"), ("tmp_free_gib", "/tmp")):
        if os.path.isdir(path):
            out[name] = round(shutil.disk_usage(path).free / 2**30, 1)
    if shutil.which("nvidia-smi"):
        try:
            q = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
            out["nvidia_smi"] = subprocess.run(q, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            out["nvidia_smi"] = str(e)
    return out


def matmul_rate(ctx: Context) -> dict:
    """TFLOP/s of square ``torch.mm`` in the training dtype (bf16 on a GPU, float32 on the
    CPU): the denominator of the MFU figures."""
    import torch

    n, reps = (512, 5) if ctx.tiny else (8192, 50)
    dtype = getattr(torch, ctx.dtype_name)
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    c = torch.empty(n, n, device=ctx.device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=c)
    synchronize(ctx.device)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=c)
    synchronize(ctx.device)
    seconds = time.perf_counter() - t0
    return {"n": n, "dtype": ctx.dtype_name, "reps": reps, "tflops": 2 * n**3 * reps / seconds / 1e12}


def env(ctx: Context) -> list[dict]:
    import torch

    v, devs, claim, host = versions(), cuda_devices(), launch_view(), machine()
    cuda = f"CUDA {v['torch_cuda']}" if v["torch_cuda"] else "no CUDA build"
    gpus = "; ".join(
        f"{d['name']} ({d['memory_gib']} GiB, cc {d['capability']}, bf16 {'yes' if d['bf16'] else 'no'})" for d in devs
    )
    ok = bool(devs) if ctx.gpu else True
    figures = (
        f"torch {v['torch']} ({cuda}), transformers {v['transformers']}, deepspeed {v['deepspeed']}; "
        f"{len(devs)} CUDA device(s){': ' + gpus if gpus else ''}; faiss GPUs {v['faiss_gpus']}; "
        f"llmret.launch: machine {claim['machine_gpus']}, usable {claim['usable_gpus']}, "
        f"claimable {claim['claimable']}, claims {claim['claims_for_1_gpu']} for 1 GPU; "
        f"{host['cpus']} CPUs, {host['ram_gib']} GiB RAM"
    )
    if ctx.gpu and not torch.cuda.is_available():
        figures = "torch sees no CUDA device; " + figures
    rate = matmul_rate(ctx)
    rate_row = row(
        "matmul rate",
        rate["tflops"] > 0,
        f"{rate['dtype']} {rate['n']}^3 torch.mm: {rate['tflops']:.3g} TFLOP/s (MFU denominator)",
        **rate,
    )
    return [row("environment", ok, figures, versions=v, cuda_devices=devs, launch=claim, machine=host), rate_row]


# --------------------------------------------------------------------------- prepare


def _llara_shards(ctx: Context, tok) -> dict:
    """One shard of (text, next text) pairs whose joint rows are ``llara_row`` tokens long,
    and its manifest, as the workflow's shard jobs write them (llmret.llara)."""
    from llmret.llara.pairs import Pair
    from llmret.llara.pretrain_shards import tokenize_shard
    from llmret.llara.pretraining import PretrainSpec
    from llmret.llara.shard_dataset import write_manifest

    s = ctx.sizes
    probe = PretrainSpec(shards=1, max_text_length=16, min_words=1).objective()
    # each prompt segment: the prompt's tokens, then </s> (the frame tail is empty here)
    overhead = sum(
        len(tok(p, add_special_tokens=False)["input_ids"]) + 1 for p in (probe.ebae_prompt, probe.ebar_prompt)
    )
    text_len = s.llara_row - overhead
    spec = {"shards": 1, "max_text_length": text_len, "min_words": 1}
    n = max(12 * s.llara_batch, 64)
    texts = synthetic_texts(2 * n, (text_len, text_len), seed=1, vocab_size=s.vocab)
    pairs = [Pair(f"pair{i}", texts[2 * i], texts[2 * i + 1]) for i in range(n)]
    folder = ctx.work / "shards"
    shard = folder / "shard-0.safetensors"
    tokenize_shard(pairs, shard=0, num_shards=1, seed=13, tokenizer=tok, max_text_length=text_len, out_path=shard)
    write_manifest([shard], folder / "manifest.json")
    return {"manifest": str(folder / "manifest.json"), "llara_spec": spec, "llara_row": text_len + overhead}


def _negatives(ctx: Context) -> str:
    """A Tevatron file: queries with one positive and ``lora_group`` negatives each."""
    s = ctx.sizes
    n = 4 * s.lora_batch
    queries = synthetic_texts(n, (s.lora_query - 8, s.lora_query - 4), seed=2, vocab_size=s.vocab)
    passages = synthetic_texts(n * (s.lora_group + 1), (s.lora_passage - 8, s.lora_passage), seed=3, vocab_size=s.vocab)
    path = ctx.work / "negatives.jsonl"
    with open(path, "w") as f:
        for i, q in enumerate(queries):
            group = passages[i * (s.lora_group + 1) : (i + 1) * (s.lora_group + 1)]
            docs = [{"docid": f"d{i}-{j}", "title": "", "text": t} for j, t in enumerate(group)]
            rec = {"query_id": f"q{i}", "query": q, "positive_passages": docs[:1], "negative_passages": docs[1:]}
            f.write(json.dumps(rec) + "\n")
    return str(path)


def prepare(ctx: Context) -> list[dict]:
    from transformers import AutoTokenizer

    from .common import build_tokenizer

    t0 = time.perf_counter()
    build_tokenizer(ctx.sizes.vocab, ctx.work / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(ctx.work / "tokenizer"))
    model = ensure_model(ctx, 2)
    shards = _llara_shards(ctx, tok)
    inputs = {
        "tokenizer": str(ctx.work / "tokenizer"),
        "vocab": len(tok),
        "model_2L": str(model),
        "negatives": _negatives(ctx),
        **shards,
    }
    write_json(ctx.work / "inputs.json", inputs)
    size = sum(f.stat().st_size for f in model.iterdir()) / 1e9
    figures = (
        f"word-level tokenizer ({len(tok)} tokens), random 2-layer Llama ({size:.2f} GB, {ctx.dtype_name}), "
        f"LLaRA shard (rows of {shards['llara_row']} tokens), Tevatron negatives, "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return [row("prepare inputs", len(tok) == ctx.sizes.vocab, figures, **inputs)]

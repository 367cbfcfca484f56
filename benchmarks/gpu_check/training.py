"""Parts ``llara``, ``resume`` and ``lora``: the registered training stages started the way
``llmret.launch`` starts them on a node (``launch.torchrun_command``: torchrun, one rank here,
NCCL on a GPU / gloo on the CPU, under ``launch.visible_devices``' GPU claim), DeepSpeed
ZeRO-2 bf16 (``config/deepspeed/gpu_zero2_bf16.json``) on a GPU and ``cpu.json`` on the CPU.
Figures come from the runs' own files: the JSONL train log and ``training_state.json``."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .common import SEED, Context, ensure_model, error_line, kill_tree, median, read_json, row, write_json

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_VARS += ("TORCHELASTIC_RUN_ID",)
RESUME_STEPS, KILL_AFTER = 10, 5


@dataclass
class Launched:
    rc: int
    wall_s: float
    killed: bool
    log: Path


def torchrun(
    ctx: Context, task: str, kwargs: dict, run_dir: Path, kill_when: Callable[[], bool] | None = None
) -> Launched:
    """``task`` in one rank under torchrun, as ``llmret.launch`` launches it (the argument
    list of ``launch.torchrun_command``, inside ``launch.visible_devices``); with
    ``kill_when``, the torchrun process and its rank are SIGKILLed once it returns True."""
    from llmret import launch

    run_dir.mkdir(parents=True, exist_ok=True)
    args_path = run_dir / "args.json"
    write_json(args_path, kwargs)
    log_path = run_dir / "torchrun.log"
    t0, killed = time.perf_counter(), False
    with launch.visible_devices(1 if ctx.gpu else 0), open(log_path, "w") as log:
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
        if ctx.gpu:  # NCCL says in the log that it started (DeepSpeed's own line is below its log level)
            env.setdefault("NCCL_DEBUG", "INFO")
            env.setdefault("NCCL_DEBUG_SUBSYS", "INIT")
        if kwargs.get("training", {}).get("deterministic"):
            env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any cuBLAS handle (the loop sets it too)
        cmd = launch.torchrun_command(task, args_path, 1)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                kill_tree(proc.pid)
                killed = True
                break
            time.sleep(0.02)
        rc = proc.wait()
    if rc != 0 and not killed:
        raise RuntimeError(f"{task} under torchrun failed (exit {rc}): {error_line(log_path)}")
    return Launched(rc, time.perf_counter() - t0, killed, log_path)


def step_records(log_path: Path) -> dict[int, dict]:
    """The train log's last record of every step (a resumed run repeats steps)."""
    out: dict[int, dict] = {}
    if Path(log_path).is_file():
        for line in Path(log_path).read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "step":
                out[rec["step"]] = rec
    return out


def seconds_per_step(records: dict[int, dict]) -> float | None:
    """Median training time of steps 3.. (the first two warm up kernels and the allocator)."""
    diffs = [records[s]["elapsed_s"] - records[s - 1]["elapsed_s"] for s in records if s >= 3 and s - 1 in records]
    return median(diffs)


def comm_backend(log_path: Path, gpu: bool) -> str:
    """The process-group backend DeepSpeed logged, else what it picks for the device."""
    text = Path(log_path).read_text(errors="replace")
    found = re.findall(r"with backend (\w+)", text)
    if found:
        return found[-1]
    nccl = re.findall(r"NCCL version [\w.+-]+", text)
    if nccl:
        return f"nccl ({nccl[0]} started)"
    return f"{'nccl' if gpu else 'gloo'} (inferred: DeepSpeed's default for the device, not seen in the log)"


def training_block(ctx: Context, run_dir: Path, steps: int, save_every: int, **over) -> dict:
    return {
        "max_steps": steps,
        "learning_rate": 1e-5,
        "warmup_steps": 0,
        "lr_scheduler": "linear",
        "save_every": save_every,
        "log_every": 1,
        "seed": SEED,
        "deepspeed_config": str(ctx.deepspeed_config),
        "gradient_checkpointing": True,  # as the presets train
        "log_path": str(run_dir / "log.jsonl"),
        **over,
    }


def llara_kwargs(ctx: Context, model_dir: Path, run_dir: Path, steps: int, save_every: int, deterministic: bool):
    inp = ctx.inputs()
    training = training_block(
        ctx, run_dir, steps, save_every, per_device_batch_size=ctx.sizes.llara_batch, deterministic=deterministic
    )
    return {
        "model_dir": str(model_dir),
        "manifest": inp["manifest"],
        "spec": inp["llara_spec"],
        "training": training,
        "out_dir": str(run_dir / "model"),
        "checkpoint_dir": str(ctx.work / "ckpt" / run_dir.name),
    }


# --------------------------------------------------------------------------- llara


def llara_flops(cfg, batch: int, row_len: int) -> float:
    """Model FLOPs of one LLaRA step: 3x the forward (backward = 2 forwards; the recomputation
    of gradient checkpointing is not counted, as MFU does not count it), the forward being the
    layers' matmuls, attention over whole rows (the 4-D mask makes SDPA compute the square)
    and the bag-of-words projection at the two embedding positions of a row."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    matmul_params = layers * (2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size)
    tokens = batch * row_len
    forward = 2 * matmul_params * tokens + 4 * layers * h * row_len * tokens + 2 * 2 * batch * h * cfg.vocab_size
    return 3 * forward


def matmul_tflops(ctx: Context) -> float | None:
    env = ctx.result("env") or {}
    for r in env.get("rows", []):
        if r["check"] == "matmul rate" and r["status"] == "ok":
            return r["data"]["tflops"]
    return None


def attention_kernel(ctx: Context, cfg, batch: int, row_len: int) -> str:
    """The attention implementation transformers gives the model, and the SDPA kernel torch
    picks for LLaRA's shapes with its 4-D additive mask (``torch._fused_sdp_choice``)."""
    import torch
    from torch.nn.attention import SDPBackend
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        impl = AutoModelForCausalLM.from_config(cfg).config._attn_implementation
    heads = cfg.num_attention_heads
    dtype = getattr(torch, ctx.dtype_name)
    q = torch.zeros(batch, heads, row_len, cfg.hidden_size // heads, device=ctx.device, dtype=dtype, requires_grad=True)
    mask = torch.zeros(batch, 1, row_len, row_len, device=ctx.device, dtype=dtype)
    try:
        choice = int(torch._fused_sdp_choice(q, q, q, mask, 0.0, False))
    except (AttributeError, RuntimeError) as e:
        return f"{impl} (SDPA kernel unknown: {e})"
    names = {int(v): k.lower() for k, v in SDPBackend.__members__.items()}
    return f"{impl} -> {names.get(choice, choice)}"


def llara_depth(ctx: Context, layers: int, model_dir: Path, rate: float | None) -> dict:
    """One timing run of ``llara_steps`` steps; its figures."""
    from transformers import AutoConfig

    s, inp = ctx.sizes, ctx.inputs()
    run_dir = ctx.work / "runs" / f"llara-{layers}L"
    kwargs = llara_kwargs(ctx, model_dir, run_dir, s.llara_steps, 0, deterministic=False)
    launched = torchrun(ctx, "pretraining", kwargs, run_dir)
    shutil.rmtree(kwargs["checkpoint_dir"], ignore_errors=True)
    state = read_json(run_dir / "model" / "training_state.json")
    shutil.rmtree(run_dir / "model", ignore_errors=True)  # GBs at full size; the figures are read
    records = step_records(run_dir / "log.jsonl")
    cfg = AutoConfig.from_pretrained(str(model_dir))
    t = seconds_per_step(records)
    peak = state["peak_memory_mb"]
    mem_gb, what = (
        (peak["device_allocated_mb"] / 1e3, "GB device") if ctx.gpu else (peak["host_rss_mb"] / 1e3, "GB RSS")
    )
    tokens = s.llara_batch * inp["llara_row"]
    flops = llara_flops(cfg, s.llara_batch, inp["llara_row"])
    mfu = flops / t / (rate * 1e12) if rate and t else None
    losses = [records[k]["loss"] for k in sorted(records)]
    return {
        "layers": layers,
        "ok": bool(t) and len(losses) == s.llara_steps and all(math.isfinite(x) for x in losses),
        "s_per_step": t,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / t if t else None,
        "peak_gb": mem_gb,
        "peak_what": what,
        "flops_per_step": flops,
        "mfu": mfu,
        "losses": losses,
        "wall_s": launched.wall_s,
        "deepspeed_init_s": state.get("deepspeed_init_s"),
        "dtype": state.get("dtype"),
        "device": state.get("device"),
        "backend": comm_backend(launched.log, ctx.gpu),
        "zero_stage": state["deepspeed_config"].get("zero_optimization", {}).get("stage"),
    }


def _depth_text(m: dict) -> str:
    mfu = f"{m['mfu']:.0%}" if m["mfu"] is not None else "n/a (no matmul rate)"
    return (
        f"{m['s_per_step']:.3f} s/step ({m['tokens_per_step']} tokens), {m['tokens_per_s']:,.0f} tokens/s, "
        f"peak {m['peak_gb']:.1f} {m['peak_what']}, MFU {mfu}; loss {m['losses'][0]:.3f} -> {m['losses'][-1]:.3f}; "
        f"run {m['wall_s']:.0f} s (DeepSpeed init {m['deepspeed_init_s']:.2f} s)"
    )


def _extrapolated(measured: dict[int, dict]) -> dict:
    """32 layers on one rank, on the straight line through the two depths measured."""
    (a, ma), (b, mb) = sorted(measured.items())[:2]
    per_t = (mb["s_per_step"] - ma["s_per_step"]) / (b - a)
    per_m = (mb["peak_gb"] - ma["peak_gb"]) / (b - a)
    t32, m32 = ma["s_per_step"] + (32 - a) * per_t, ma["peak_gb"] + (32 - a) * per_m
    text = (
        f"32 layers on one rank, linear in depth from {a}L/{b}L: ~{t32:.2f} s/step, ~{m32:.0f} {ma['peak_what']} "
        f"({per_t * 1e3:.0f} ms and {per_m:.2f} GB a layer)"
    )
    return row(
        "LLaRA 32-layer estimate", True, text, s_per_step=t32, peak_gb=m32, per_layer_s=per_t, per_layer_gb=per_m
    )


def llara(ctx: Context) -> list[dict]:
    inp, s, rate = ctx.inputs(), ctx.sizes, matmul_tflops(ctx)
    rows, measured = [], {}
    for layers in s.llara_layers:
        try:
            model_dir = Path(inp["model_2L"]) if layers == 2 else ensure_model(ctx, layers)
            m = llara_depth(ctx, layers, model_dir, rate)
            if layers != 2:
                shutil.rmtree(model_dir, ignore_errors=True)
        except Exception as e:  # the other depth still runs
            rows.append(row(f"LLaRA {layers} layers", False, f"{type(e).__name__}: {e}"))
            continue
        if m["ok"]:
            measured[layers] = m
        text = (
            _depth_text(m)
            if m["ok"]
            else f"incomplete: {len(m['losses'])} of {s.llara_steps} steps, losses {m['losses']}"
        )
        rows.append(row(f"LLaRA {layers} layers", m["ok"], text, **m))
    if len(measured) >= 2:
        rows.append(_extrapolated(measured))
    if measured:
        from transformers import AutoConfig

        m = next(iter(measured.values()))
        kernel = attention_kernel(ctx, AutoConfig.from_pretrained(inp["model_2L"]), s.llara_batch, inp["llara_row"])
        text = f"attention {kernel}; process group {m['backend']}; DeepSpeed ZeRO-{m['zero_stage']}, {m['dtype']}"
        rows.append(row("LLaRA kernels", True, text, attention=kernel, backend=m["backend"], dtype=m["dtype"]))
    return rows


# --------------------------------------------------------------------------- resume


def _latest(ckpt: Path) -> str | None:
    from llmret.training.checkpointing import latest_checkpoint

    try:
        return latest_checkpoint(ckpt) if ckpt.is_dir() else None
    except RuntimeError:  # the marker is being replaced
        return None


def _uninterrupted(ctx: Context, model_dir: Path, base: Path) -> tuple[dict[int, dict], bool]:
    """The reference run (10 steps, saves at 5 and 10) with deterministic algorithms, or
    without them when this torch has no deterministic kernel for an op it needs."""
    for deterministic in (True, False):
        kwargs = llara_kwargs(ctx, model_dir, base / "U", RESUME_STEPS, KILL_AFTER, deterministic)
        try:
            torchrun(ctx, "pretraining", kwargs, base / "U")
        except RuntimeError as e:
            if deterministic and "determinis" in str(e) + error_line(base / "U" / "torchrun.log"):
                continue
            raise
        finally:
            shutil.rmtree(kwargs["checkpoint_dir"], ignore_errors=True)
        return step_records(base / "U" / "log.jsonl"), deterministic
    raise AssertionError("unreachable")


def resume(ctx: Context) -> list[dict]:
    """Kill a 10-step run (SIGKILL to torchrun and its rank) once its step-5 checkpoint is in
    place, rerun the same command, and compare every step's loss with an uninterrupted run."""
    model_dir, base = Path(ctx.inputs()["model_2L"]), ctx.work / "runs" / "resume"
    ref, deterministic = _uninterrupted(ctx, model_dir, base)
    kwargs = llara_kwargs(ctx, model_dir, base / "K", RESUME_STEPS, KILL_AFTER, deterministic)
    ckpt = Path(kwargs["checkpoint_dir"])
    killed = torchrun(ctx, "pretraining", kwargs, base / "K", kill_when=lambda: _latest(ckpt) == f"step{KILL_AFTER}")
    before = step_records(base / "K" / "log.jsonl")
    if not killed.killed:
        return [row("LLaRA kill at 5, resume to 10", False, "the run ended before its step-5 checkpoint was seen")]
    tag = _latest(ckpt)
    kwargs["training"]["log_path"] = str(base / "R" / "log.jsonl")
    kwargs["out_dir"] = str(base / "R" / "model")
    torchrun(ctx, "pretraining", kwargs, base / "R")
    shutil.rmtree(ckpt, ignore_errors=True)
    after = step_records(base / "R" / "log.jsonl")
    start = (read_json(base / "R" / "model" / "training_state.json") or {}).get("resumed_from_step")
    for folder in (base / "U" / "model", base / "R" / "model"):
        shutil.rmtree(folder, ignore_errors=True)
    pre = {k: before[k]["loss"] for k in before if start is not None and k <= start}
    post = {k: after[k]["loss"] for k in after}
    diff_pre = max((abs(v - ref[k]["loss"]) for k, v in pre.items()), default=math.inf)
    diff_post = max((abs(v - ref[k]["loss"]) for k, v in post.items()), default=math.inf)
    complete = start == KILL_AFTER and sorted(post) == list(range(KILL_AFTER + 1, RESUME_STEPS + 1))
    identical = complete and diff_pre == 0 and diff_post == 0 and len(pre) == KILL_AFTER
    text = (
        f"killed after step {max(before, default=0)} (latest checkpoint {tag}), resumed from step {start}; "
        f"losses vs uninterrupted: steps 1-{KILL_AFTER} max abs diff {diff_pre:.2g}, "
        f"steps {KILL_AFTER + 1}-{RESUME_STEPS} max abs diff {diff_post:.2g} "
        f"-> {'identical' if identical else 'DIFFER'}; "
        f"deterministic algorithms {'on' if deterministic else 'off (unsupported here)'}"
    )
    data = {"reference": {k: r["loss"] for k, r in ref.items()}, "before_kill": pre, "after_resume": post}
    return [row("LLaRA kill at 5, resume to 10", identical, text, resumed_from=start, identical=identical, **data)]


# --------------------------------------------------------------------------- lora


def merged_vs_unmerged(ctx: Context, base_dir: Path, merged_dir: Path, adapter_dir: Path) -> dict:
    """Max |difference| of L2-normalised float32 embeddings from the merged model and from the
    base model with the adapter applied (``llmret.training.lora.load_adapter_model``), and of
    the base model alone (the adapter's effect, for scale)."""
    import numpy as np
    import torch

    from llmret.retrieval.encoder import EncoderSpec, TextEncoder
    from llmret.training.lora import load_adapter_model

    from .common import synthetic_texts

    settings = read_json(merged_dir / "finetune.json")["encoder"]
    spec = EncoderSpec.from_config({**settings, "dtype": "float32"})
    texts = synthetic_texts(16, (8, ctx.sizes.lora_passage), seed=4, vocab_size=ctx.sizes.vocab)
    merged = TextEncoder(str(merged_dir), spec, device=ctx.device).encode(texts, "passage", show_progress=False)
    enc = TextEncoder(str(base_dir), spec, device=ctx.device)
    plain = enc.encode(texts, "passage", show_progress=False)
    enc.model = load_adapter_model(base_dir, adapter_dir, dtype=torch.float32).to(ctx.device)
    adapted = enc.encode(texts, "passage", show_progress=False)
    diff, effect = float(np.abs(merged - adapted).max()), float(np.abs(plain - adapted).max())
    # merged weights are stored in the training dtype: bf16 rounds each by up to 2^-9 of itself
    tol = 1e-4 if ctx.dtype_name == "float32" else 5e-3
    return {"max_abs_diff": diff, "adapter_effect": effect, "tolerance": tol, "ok": diff <= tol and diff < effect}


def lora(ctx: Context) -> list[dict]:
    inp, s = ctx.inputs(), ctx.sizes
    model_dir, run_dir = Path(inp["model_2L"]), ctx.work / "runs" / "lora"
    training = training_block(ctx, run_dir, 3, 0, per_device_batch_size=s.lora_batch, learning_rate=1e-3)
    kwargs = {
        "model_dir": str(model_dir),
        "negatives_path": inp["negatives"],
        "spec": {"group_size": s.lora_group, "max_query_length": s.lora_query, "max_passage_length": s.lora_passage},
        "lora": {"r": s.lora_r, "alpha": 2 * s.lora_r, "dropout": 0.1},
        "training": training,
        "out_dir": str(run_dir / "model"),
        "adapter_dir": str(run_dir / "adapter"),
        "checkpoint_dir": str(ctx.work / "ckpt" / "lora"),
    }
    launched = torchrun(ctx, "finetuning", kwargs, run_dir)
    state = read_json(run_dir / "model" / "training_state.json")
    records = step_records(run_dir / "log.jsonl")
    peak = state["peak_memory_mb"]
    mem = f"{peak['device_allocated_mb'] / 1e3:.1f} GB device" if ctx.gpu else f"{peak['host_rss_mb'] / 1e3:.1f} GB RSS"
    t = median([records[k]["elapsed_s"] - records[k - 1]["elapsed_s"] for k in records if k - 1 in records])
    losses = [records[k]["loss"] for k in sorted(records)]
    ok = len(losses) == 3 and all(math.isfinite(x) for x in losses)
    text = (
        f"{s.lora_batch} queries x {s.lora_group} passages of {s.lora_passage} tokens, r={s.lora_r}: peak {mem}, "
        f"{t:.2f} s/step, loss {losses[0]:.3f} -> {losses[-1]:.3f}; run {launched.wall_s:.0f} s"
    )
    rows = [row("LoRA fine-tuning 2 layers", ok, text, peak_memory_mb=peak, s_per_step=t, losses=losses)]
    eq = merged_vs_unmerged(ctx, model_dir, run_dir / "model", run_dir / "adapter")
    shutil.rmtree(run_dir / "model", ignore_errors=True)
    text = (
        f"max abs diff merged vs base+adapter {eq['max_abs_diff']:.2g} (tolerance {eq['tolerance']:g}; "
        f"the adapter itself moves embeddings by {eq['adapter_effect']:.2g}), float32 encoding of 16 texts"
    )
    rows.append(row("LoRA merged vs unmerged", eq["ok"], text, **eq))
    return rows

"""A small, generic DeepSpeed training loop for every training stage (LLaRA pretraining,
LoRA fine-tuning, CSPLADE adaptation and training): :func:`train` feeds batches, steps the
optimizer, logs, checkpoints and saves; the model computes its own loss.

Design notes (model contract, DeepSpeed config, CPU notes, checkpoints, log): docs/training.md.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from llmret.training.arguments import TrainingArgs, build_deepspeed_config, lr_factor, recipe, recipe_changes
from llmret.training.checkpointing import (
    TRAINER_STATE,
    checkpoints_to_keep,
    has_frozen,
    latest_checkpoint,
    save_checkpoint,
    save_final,
    use_safe_loading,
)
from llmret.training.distributed import (
    all_reduce_floats,
    init_distributed,
    max_over_ranks,
    merge_peaks,
    peak_memory_mb,
)
from llmret.training.sampling import ResumableBatchSampler, seed_step

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers


def nonpad_token_counter(pad_id: int, key: str = "input_ids") -> Callable[[Any], int]:
    """A ``count_tokens`` for batches exposing ``input_ids`` (mapping key or attribute)."""

    def count(batch: Any) -> int:
        ids = batch[key] if isinstance(batch, Mapping) else getattr(batch, key)
        return int((ids != pad_id).sum())

    return count


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    if hasattr(batch, "to"):
        return batch.to(device)
    return batch


def _call(model: Callable, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _losses(out: Any) -> dict[str, torch.Tensor]:
    """``loss`` plus every scalar ``loss_*`` of a model output."""
    if isinstance(out, torch.Tensor):
        out = {"loss": out}
    if not isinstance(out, Mapping) or out.get("loss") is None:
        raise TypeError(f"the model must return a mapping with a 'loss', got {type(out).__name__}")
    found = {"loss": out["loss"]}
    for k, v in out.items():
        if k.startswith("loss_") and isinstance(v, torch.Tensor) and v.numel() == 1:
            found[k] = v
    return found


RESERVED_LOG_KEYS = ("event", "step", "loss", "lr", "tokens_per_s", "elapsed_s")


def _extras(out: Any) -> dict[str, torch.Tensor]:
    """Scalars of the output's optional ``"log"`` mapping (not part of the loss)."""
    extra = out.get("log") if isinstance(out, Mapping) else None
    if not extra:
        return {}
    found = {}
    for k, v in extra.items():
        if k in RESERVED_LOG_KEYS or k.startswith("loss_"):
            raise ValueError(f"log key {k!r} clashes with the loop's own log fields")
        found[k] = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
    return found


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; no weight decay on vectors (biases, norm weights)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _check_dtype(model: nn.Module, dtype: str) -> None:
    """The model must already be in the run's dtype (``TrainingArgs.torch_dtype``): DeepSpeed
    would otherwise cast a float32 model to 16 bits after it was loaded whole, or refuse a
    16-bit one under a float32 config. Trainable parameters of a model with frozen ones (LoRA
    adapters, which PEFT keeps in float32) may differ: DeepSpeed casts those few itself."""
    want = getattr(torch, dtype)
    lora = has_frozen(model)
    wrong = {
        name: p.dtype
        for name, p in model.named_parameters()
        if p.is_floating_point() and p.dtype != want and not (lora and p.requires_grad)
    }
    if wrong:
        name, got = next(iter(wrong.items()))
        raise ValueError(
            f"the run computes in {dtype} (training.dtype and the DeepSpeed config) but {len(wrong)} parameters "
            f"are not, e.g. {name} in {got}: load the model with dtype=TrainingArgs.torch_dtype"
        )


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    """On the model or the first submodule that knows how (e.g. ``LlaraModel.lm``)."""
    for m in model.modules():
        for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
            fn = getattr(m, name, None)
            if callable(fn):
                if name == "activation_checkpointing_enable":
                    fn(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    fn(gradient_checkpointing_kwargs={"use_reentrant": False})
                return
    raise ValueError(f"gradient_checkpointing: no submodule of {type(model).__name__} supports it")


class _Window:
    """Sums of the loss values, micro-batches and tokens since the last log line."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.micro = 0
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], tokens: int) -> None:
        for k, v in losses.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.micro += 1
        self.tokens += tokens

    def reduce(self, device, world_size: int) -> tuple[dict[str, float], float]:
        """(mean of each loss over the window's micro-batches on all ranks, tokens per second)."""
        keys = sorted(self.sums)
        vals = [float(self.sums[k]) for k in keys] + [float(self.micro), float(self.tokens)]
        vals = all_reduce_floats(vals, device, world_size)
        micro, tokens = vals[-2], vals[-1]
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {k: vals[i] / micro for i, k in enumerate(keys)}, tokens / dt


class _JsonlLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def restart(self) -> None:
        """A fresh start (no checkpoint resumed) begins a new log: records of an earlier run
        with other settings or inputs would otherwise read as this run's first steps."""
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable[[list], Any],
    args: TrainingArgs,
    tokenizer: Any = None,
    save_fn: Callable[[nn.Module, Path], None] | None = None,
    count_tokens: Callable[[Any], int] | None = None,
    inputs: Sequence[str | os.PathLike] = (),
) -> dict:
    """Train ``model`` for ``args.max_steps`` optimizer steps, resuming from ``checkpoint_dir``.

    ``save_fn(model, folder)`` replaces the default ``model.save_pretrained(folder)`` for the
    final save (e.g. :func:`save_llara`); it must write safetensors/JSON only. ``inputs``
    are the files and folders the run starts from (base model, training data): their
    digests join the recipe, so a checkpoint trained on other data is not resumed. Returns
    the ``training_state.json`` content (on every rank).
    """
    wall0 = time.time()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    rank, world_size, _ = init_distributed()
    import deepspeed
    import deepspeed.comm as dist

    ckpt_dir = Path(args.checkpoint_dir)
    out_dir = Path(args.output_dir)
    jlog = _JsonlLog(args.resolved_log_path, enabled=rank == 0)
    ds_config = build_deepspeed_config(args, world_size)
    gas = args.gradient_accumulation_steps
    n = len(dataset)
    # What fixes the batch sequence; a checkpoint only resumes under the same values.
    order = {
        "seed": args.seed,
        "per_device_batch_size": args.per_device_batch_size,
        "gradient_accumulation_steps": gas,
        "world_size": world_size,
        "dataset_len": n,
    }

    dtype = args.resolved_dtype
    _check_dtype(model, dtype)
    keep = checkpoints_to_keep(args.keep_checkpoints, model)

    seed_step(args.seed, 0, rank)
    if args.gradient_checkpointing:
        _enable_gradient_checkpointing(model)

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, args.lr_scheduler, args.warmup_steps, args.max_steps)
        )

    # Checked before DeepSpeed starts. A checkpoint of other settings (a changed learning rate,
    # loss weight, LoRA rank...) is not this run's: training starts afresh, and the first save
    # prunes the stale tags. Same settings with another batch order cannot resume: refused.
    run_recipe = recipe(args, model, inputs)
    tag = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    saved = json.loads((ckpt_dir / tag / TRAINER_STATE).read_text()) if tag else None
    if saved is not None and (stale := recipe_changes(saved.get("recipe"), run_recipe)):
        log.warning("not resuming %s: trained with other settings (saved, now): %s", ckpt_dir / tag, stale)
        tag, saved = None, None
    if saved is not None:
        changed = {k: (saved["order"].get(k), v) for k, v in order.items() if saved["order"].get(k) != v}
        if changed:
            raise ValueError(f"cannot resume {ckpt_dir / tag}: batch order changed (saved, now): {changed}")
        if saved["step"] > args.max_steps:
            raise ValueError(f"checkpoint {tag} is past max_steps={args.max_steps}")

    t_init = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, args.weight_decay),
        config=ds_config,
        lr_scheduler=schedule,
    )
    init_s = time.perf_counter() - t_init
    safe = use_safe_loading(engine)
    if saved is None:
        jlog.restart()
    try:
        # ---- resume
        start_step, elapsed0, last_log, peak0 = 0, 0.0, None, None
        if saved is not None:
            load_path, _ = engine.load_checkpoint(
                str(ckpt_dir), tag=tag, load_module_strict=not has_frozen(engine.module)
            )
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {ckpt_dir / tag}")
            start_step, elapsed0, last_log = saved["step"], saved["elapsed_s"], saved.get("last_log")
            peak0 = saved.get("peak_memory_mb")
            if engine.global_steps != start_step:
                raise RuntimeError(f"checkpoint {tag}: engine at step {engine.global_steps}, state says {start_step}")
            log.info("resumed from %s (step %d)", ckpt_dir / tag, start_step)
        jlog.write(
            {
                "event": "resume" if tag else "start",
                "step": start_step,
                "checkpoint": tag,
                "world_size": world_size,
                "deepspeed_init_s": round(init_s, 3),
                "safe_loading": safe,
            }
        )

        # ---- data
        sampler = ResumableBatchSampler(n, args.per_device_batch_size, args.seed, rank, world_size, start_step * gas)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=args.num_workers)
        batches = iter(loader)
        consumed = start_step * gas

        # ---- loop
        engine.train()
        t0 = time.perf_counter()
        window = _Window()
        bar = _progress(args.max_steps, start_step, rank == 0)
        set_step = getattr(engine.module, "set_step", None)
        for step in range(start_step + 1, args.max_steps + 1):
            seed_step(args.seed, step, rank)
            if callable(set_step):
                set_step(step)
            lr = engine.get_lr()[0]  # the rate this step's update uses
            for _ in range(gas):
                batch = next(batches)
                consumed += 1
                tokens = count_tokens(batch) if count_tokens is not None else 0
                out = _call(engine, _to_device(batch, engine.device))
                losses = _losses(out)
                engine.backward(losses["loss"])
                engine.step()
                window.add({**losses, **_extras(out)}, tokens)
            if engine.global_steps != step:
                raise RuntimeError(f"DeepSpeed skipped an update at step {step} (overflow?)")
            bar.update(1)
            if step % args.log_every == 0 or step == args.max_steps:
                losses_mean, tokens_per_s = window.reduce(engine.device, world_size)
                last_log = {
                    "event": "step",
                    "step": step,
                    **losses_mean,
                    "lr": lr,
                    "tokens_per_s": tokens_per_s,
                    "elapsed_s": elapsed0 + time.perf_counter() - t0,
                }
                jlog.write(last_log)
                bar.set_postfix(loss=f"{losses_mean['loss']:.4f}", lr=f"{lr:.2e}")
                window = _Window()
            if (args.save_every and step % args.save_every == 0) or step == args.max_steps:
                epoch, index = sampler.position(consumed)
                state = {
                    "step": step,
                    "order": order,
                    "recipe": run_recipe,
                    "data": {"micro_batches_consumed": consumed, "epoch": epoch, "batch_in_epoch": index},
                    "elapsed_s": elapsed0 + time.perf_counter() - t0,
                    "last_log": last_log,
                    "peak_memory_mb": merge_peaks(
                        max_over_ranks(peak_memory_mb(engine.device), engine.device, world_size), peak0
                    ),
                    "args": asdict(args),
                }
                save_checkpoint(engine, ckpt_dir, f"step{step}", state, rank, final=step == args.max_steps, keep=keep)
        bar.close()
        del batches  # stops DataLoader workers, if any
        train_s = elapsed0 + time.perf_counter() - t0
        peak = merge_peaks(max_over_ranks(peak_memory_mb(engine.device), engine.device, world_size), peak0)

        # ---- final model
        result = {
            "steps": args.max_steps,
            "final_loss": last_log["loss"] if last_log else None,
            "final_log": last_log,
            "resumed_from_step": start_step if tag else None,
            "train_time_s": train_s,  # accumulated over resumed runs (up to their checkpoints)
            "wall_time_s": time.time() - wall0,  # this process
            "deepspeed_init_s": init_s,
            "world_size": world_size,
            "device": str(engine.device),
            "dtype": dtype,
            "peak_memory_mb": peak,  # the largest rank, over resumed attempts too (merge_peaks)
            "args": asdict(args),
            "deepspeed_config": ds_config,
            "versions": _versions(),
        }
        if rank == 0:
            save_final(engine.module, out_dir, tokenizer, save_fn, result)
        dist.barrier()
        return result
    finally:
        engine.destroy()


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr, desc="train", dynamic_ncols=True)


def _versions() -> dict[str, str]:
    import deepspeed

    out = {"torch": torch.__version__, "deepspeed": deepspeed.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out

"""A small, generic DeepSpeed training loop for every training stage (LLaRA pretraining,
LoRA fine-tuning, CSPLADE adaptation and training): :func:`train` feeds batches, steps the
optimizer, logs, checkpoints and saves; the model computes its own loss.

Design notes (model contract, DeepSpeed config, CPU notes, checkpoints, log): docs/training.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from llmret.training.arguments import (
    TrainingArgs,
    build_deepspeed_config,
    cached_input_digests,
    lr_factor,
    recipe,
    recipe_changes,
)
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
    init_distributed,
    max_over_ranks,
    merge_peaks,
    peak_memory_mb,
    share_from_rank0,
)
from llmret.training.interruption import StopRequests
from llmret.training.job_settings import check_global_batch
from llmret.training.model_contract import call_model, log_scalars, model_losses, nonpad_token_counter, to_device
from llmret.training.run_log import JsonlLog, LossWindow, progress_bar
from llmret.training.sampling import ResumableBatchSampler, seed_step

log = logging.getLogger(__name__)

__all__ = ["nonpad_token_counter", "train"]  # the counter, from model_contract, for train()'s callers


# --------------------------------------------------------------------------- preparing the model


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
    import deepspeed.comm as dist

    plan = _plan(model, args, len(dataset), rank, world_size, inputs)
    with StopRequests() as stops:  # SIGTERM/SIGUSR1 from here on: save after the step, then stop
        engine, init_s = _start_engine(model, args, plan.ds_config)
        safe = use_safe_loading(engine)  # before any checkpoint load
        if plan.saved is None:
            plan.jlog.restart()
        try:
            run = _Run(engine, plan, init_s, safe, stops)
            run.resume()
            run.train_steps(dataset, collate_fn, count_tokens)
            result = run.result(wall0)
            if rank == 0:
                save_final(engine.module, Path(args.output_dir), tokenizer, save_fn, result)
            dist.barrier()
            return result
        finally:
            engine.destroy()


@dataclass
class _Plan:
    """What :func:`train` settles before DeepSpeed starts, fixed for the whole call: the
    settings every step, log line and checkpoint refer to, and the checkpoint to resume."""

    args: TrainingArgs
    rank: int
    world_size: int
    jlog: JsonlLog
    ds_config: dict
    order: dict  # what fixes the batch sequence; a checkpoint only resumes under the same values
    dtype: str
    keep: int  # resumable checkpoints kept while training (checkpoints_to_keep)
    recipe: dict
    tag: str | None  # the checkpoint to resume; None: a fresh start
    saved: dict | None  # its training state (TRAINER_STATE)

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.args.checkpoint_dir)


def _plan(
    model: nn.Module, args: TrainingArgs, n: int, rank: int, world_size: int, inputs: Sequence[str | os.PathLike]
) -> _Plan:
    """Check the model and settings and choose the checkpoint to resume, all before DeepSpeed
    starts (an error costs no engine start); the model leaves ready for ``deepspeed.initialize``.
    Rank 0 alone hashes the inputs (cached by size and mtime in the checkpoint folder) and
    shares the digests."""
    check_global_batch(args.global_batch_size, args.per_device_batch_size, args.gradient_accumulation_steps, world_size)
    jlog = JsonlLog(args.resolved_log_path, enabled=rank == 0)
    ds_config = build_deepspeed_config(args, world_size)
    order = {
        "seed": args.seed,
        "per_device_batch_size": args.per_device_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": world_size,
        "dataset_len": n,
    }
    dtype = args.resolved_dtype
    _check_dtype(model, dtype)
    keep = checkpoints_to_keep(args.keep_checkpoints, model)

    seed_step(args.seed, 0, rank)
    if args.gradient_checkpointing:
        _enable_gradient_checkpointing(model)

    digests = share_from_rank0(lambda: cached_input_digests(inputs, args.checkpoint_dir), rank, world_size)
    run_recipe = recipe(args, model, inputs, digests)
    tag, saved = _checkpoint_to_resume(Path(args.checkpoint_dir), run_recipe, order, args.max_steps)
    return _Plan(args, rank, world_size, jlog, ds_config, order, dtype, keep, run_recipe, tag, saved)


def _checkpoint_to_resume(
    ckpt_dir: Path, run_recipe: dict, order: dict, max_steps: int
) -> tuple[str | None, dict | None]:
    """The latest checkpoint's tag and training state, or ``(None, None)`` for a fresh start.

    A checkpoint of other settings (a changed learning rate, loss weight, LoRA rank...) is not
    this run's: training starts afresh, and the first save prunes the stale tags. Same
    settings with another batch order cannot resume: refused, as is a checkpoint past the end.
    """
    tag = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    saved = json.loads((ckpt_dir / tag / TRAINER_STATE).read_text()) if tag else None
    if saved is not None and (stale := recipe_changes(saved.get("recipe"), run_recipe)):
        log.warning("not resuming %s: trained with other settings (saved, now): %s", ckpt_dir / tag, stale)
        tag, saved = None, None
    if saved is not None:
        changed = {k: (saved["order"].get(k), v) for k, v in order.items() if saved["order"].get(k) != v}
        if changed:
            raise ValueError(f"cannot resume {ckpt_dir / tag}: batch order changed (saved, now): {changed}")
        if saved["step"] > max_steps:
            raise ValueError(f"checkpoint {tag} is past max_steps={max_steps}")
    return tag, saved


def _start_engine(model: nn.Module, args: TrainingArgs, ds_config: dict) -> tuple[Any, float]:
    """The DeepSpeed engine (optimizer and the loop's LR schedule inside) and the seconds its
    start took, which the log reports: on several ranks it is a noticeable share of a short run."""
    import deepspeed

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, args.lr_scheduler, args.warmup_steps, args.max_steps)
        )

    t_init = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, args.weight_decay),
        config=ds_config,
        lr_scheduler=schedule,
    )
    return engine, time.perf_counter() - t_init


class _Run:
    """The engine and what moves as it trains (the step it resumed at, time and peak memory
    of earlier attempts, the data position, the last log record), one method per concern so
    that :func:`train` reads as the run's outline."""

    def __init__(self, engine: Any, plan: _Plan, init_s: float, safe_loading: bool, stops: StopRequests):
        self.engine, self.plan, self.args, self.stops = engine, plan, plan.args, stops
        self.init_s, self.safe_loading = init_s, safe_loading
        self.start_step = 0
        self.elapsed0 = 0.0  # training seconds of the earlier attempts, up to their checkpoint
        self.last_log: dict | None = None
        self.peak0: dict | None = None  # peak memory of the earlier attempts
        self.consumed = 0  # micro-batches of this rank since step 0
        self.t0 = time.perf_counter()
        self.sampler: ResumableBatchSampler | None = None
        self.train_s = 0.0

    @property
    def elapsed(self) -> float:
        """Training seconds over resumed attempts: the saved ones plus this process's."""
        return self.elapsed0 + time.perf_counter() - self.t0

    def peak(self) -> dict:
        """The largest rank's peak memory, over resumed attempts too (a collective call)."""
        device = self.engine.device
        return merge_peaks(max_over_ranks(peak_memory_mb(device), device, self.plan.world_size), self.peak0)

    def resume(self) -> None:
        """Load the planned checkpoint, if any, and log where the run starts: the engine must
        agree with the saved state on the step, or the batch order would no longer match."""
        plan, engine = self.plan, self.engine
        if plan.saved is not None:
            ckpt_dir, tag, saved = plan.ckpt_dir, plan.tag, plan.saved
            load_path, _ = engine.load_checkpoint(
                str(ckpt_dir), tag=tag, load_module_strict=not has_frozen(engine.module)
            )
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {ckpt_dir / tag}")
            self.start_step, self.elapsed0, self.last_log = saved["step"], saved["elapsed_s"], saved.get("last_log")
            self.peak0 = saved.get("peak_memory_mb")
            if engine.global_steps != self.start_step:
                raise RuntimeError(
                    f"checkpoint {tag}: engine at step {engine.global_steps}, state says {self.start_step}"
                )
            log.info("resumed from %s (step %d)", ckpt_dir / tag, self.start_step)
        plan.jlog.write(
            {
                "event": "resume" if plan.tag else "start",
                "step": self.start_step,
                "checkpoint": plan.tag,
                "world_size": plan.world_size,
                "deepspeed_init_s": round(self.init_s, 3),
                "safe_loading": self.safe_loading,
            }
        )

    def train_steps(self, dataset: Dataset, collate_fn: Callable, count_tokens: Callable[[Any], int] | None) -> None:
        """Steps ``start_step + 1 .. max_steps``, on the batches a run from step 0 would see there;
        a log line every ``log_every`` steps and a checkpoint every ``save_every`` (and at the end)."""
        args, gas = self.args, self.args.gradient_accumulation_steps
        rank, world_size = self.plan.rank, self.plan.world_size
        self.sampler = ResumableBatchSampler(
            len(dataset), args.per_device_batch_size, args.seed, rank, world_size, self.start_step * gas
        )
        loader = DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate_fn, num_workers=args.num_workers)
        batches = iter(loader)
        self.consumed = self.start_step * gas

        self.engine.train()
        self.t0 = time.perf_counter()
        window = LossWindow()
        bar = progress_bar(args.max_steps, self.start_step, rank == 0)
        set_step = getattr(self.engine.module, "set_step", None)
        self.stops.check_deadline(self.start_step)
        for step in range(self.start_step + 1, args.max_steps + 1):
            t_step = time.perf_counter()
            lr = self._step(step, batches, window, count_tokens, set_step)
            bar.update(1)
            if step % args.log_every == 0 or step == args.max_steps:
                self._log(step, lr, window, bar)
                window = LossWindow()
            saved = bool(args.save_every and step % args.save_every == 0) or step == args.max_steps
            if saved:
                self._checkpoint(step)
            if step < args.max_steps:
                self._stop_if_asked(step, saved, time.perf_counter() - t_step, bar)
        bar.close()
        del batches  # stops DataLoader workers, if any
        self.train_s = self.elapsed

    def _stop_if_asked(self, step: int, saved: bool, step_s: float, bar) -> None:
        """If any rank was asked to stop (:class:`StopRequests`), save ``step`` (unless it was
        just saved) and raise ``TrainingInterrupted``: the rerun resumes from this checkpoint."""
        reason = self.stops.agreed(step_s, self.engine.device, self.plan.world_size)
        if reason:
            if not saved:
                self._checkpoint(step)
            bar.close()
            raise self.stops.interrupt(step, reason, self.plan.rank)

    def _step(
        self, step: int, batches, window: LossWindow, count_tokens: Callable[[Any], int] | None, set_step
    ) -> float:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the
        learning rate its update used. Seeded by step, so a resumed run draws what an
        uninterrupted one would (dropout, the model's own sampling)."""
        args, engine = self.args, self.engine
        seed_step(args.seed, step, self.plan.rank)
        if callable(set_step):
            set_step(step)
        lr = engine.get_lr()[0]  # the rate this step's update uses
        for _ in range(args.gradient_accumulation_steps):
            batch = next(batches)
            self.consumed += 1
            tokens = count_tokens(batch) if count_tokens is not None else 0
            out = call_model(engine, to_device(batch, engine.device))
            losses = model_losses(out)
            engine.backward(losses["loss"])
            engine.step()
            window.add({**losses, **log_scalars(out)}, tokens)
        if engine.global_steps != step:
            raise RuntimeError(f"DeepSpeed skipped an update at step {step} (overflow?)")
        return lr

    def _log(self, step: int, lr: float, window: LossWindow, bar) -> None:
        """A ``step`` record of the window's means over all ranks (a collective call)."""
        losses_mean, tokens_per_s = window.reduce(self.engine.device, self.plan.world_size)
        self.last_log = {
            "event": "step",
            "step": step,
            **losses_mean,
            "lr": lr,
            "tokens_per_s": tokens_per_s,
            "elapsed_s": self.elapsed,
        }
        self.plan.jlog.write(self.last_log)
        bar.set_postfix(loss=f"{losses_mean['loss']:.4f}", lr=f"{lr:.2e}")

    def _checkpoint(self, step: int) -> None:
        """A resumable checkpoint ``step{step}`` with the state a resume checks and continues."""
        plan, args = self.plan, self.args
        epoch, index = self.sampler.position(self.consumed)
        state = {
            "step": step,
            "order": plan.order,
            "recipe": plan.recipe,
            "data": {"micro_batches_consumed": self.consumed, "epoch": epoch, "batch_in_epoch": index},
            "elapsed_s": self.elapsed,
            "last_log": self.last_log,
            "peak_memory_mb": self.peak(),
            "args": asdict(args),
        }
        final = step == args.max_steps
        save_checkpoint(self.engine, plan.ckpt_dir, f"step{step}", state, plan.rank, final=final, keep=plan.keep)

    def result(self, wall0: float) -> dict:
        """``training_state.json`` of the final model (and :func:`train`'s return value)."""
        plan, last_log = self.plan, self.last_log
        peak = self.peak()
        return {
            "steps": self.args.max_steps,
            "final_loss": last_log["loss"] if last_log else None,
            "final_log": last_log,
            "resumed_from_step": self.start_step if plan.tag else None,
            "train_time_s": self.train_s,  # accumulated over resumed runs (up to their checkpoints)
            "wall_time_s": time.time() - wall0,  # this process
            "deepspeed_init_s": self.init_s,
            "world_size": plan.world_size,
            "device": str(self.engine.device),
            "dtype": plan.dtype,
            "peak_memory_mb": peak,  # the largest rank, over resumed attempts too (merge_peaks)
            "args": asdict(self.args),
            "deepspeed_config": plan.ds_config,
            "versions": _versions(),
        }


def _versions() -> dict[str, str]:
    import deepspeed

    out = {"torch": torch.__version__, "deepspeed": deepspeed.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out

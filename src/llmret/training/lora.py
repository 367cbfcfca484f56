"""LoRA for every LoRA stage: :class:`LoraSpec`, applying adapters with a seeded init,
merging and saving, reloading an adapter on its base, and publishing it in its own folder.

Design notes: docs/finetuning.md; docs/training.md.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmret import schema
from llmret.specs import settings

LORA_TARGETS = tuple(schema.default("lora", "target_modules"))
ADAPTER = "adapter"  # subfolder of the final model folder holding the adapter until finetune() moves it


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
@schema.defaults_from("lora")
class LoraSpec:
    """Which linear layers get adapters and how large they are (the ``lora`` config section)."""

    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))  # YAML gives lists
        schema.check_bounds(self, "lora", "lora ")
        if not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"lora target_modules must be non-empty module names, got {self.target_modules!r}")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"lora target_modules has duplicates: {self.target_modules!r}")

    @classmethod
    def from_config(cls, cfg: Mapping) -> LoraSpec:
        return settings(cls, cfg, "LoRA settings")

    def peft_config(self):
        """The peft ``LoraConfig`` (feature extraction: the wrapped model has no LM head)."""
        from peft import LoraConfig, TaskType

        return LoraConfig(
            task_type=TaskType.FEATURE_EXTRACTION,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
        )


# --------------------------------------------------------------------------- model


def apply_lora(model: nn.Module, lora: LoraSpec, seed: int = 0):
    """``get_peft_model`` after checking that every named target exists (peft only fails when
    none does; a typo in one name would otherwise train fewer layers than asked).

    The random LoRA ``A`` matrices are drawn from a generator seeded with ``seed`` (the
    training seed), not from whatever state the process's global RNG is in: ``B`` starts at
    zero, so an unseeded ``A`` leaves the first step's loss identical and makes every later
    step differ from run to run."""
    from peft import get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora.target_modules if t not in present]
    if missing:
        raise ValueError(f"LoRA target modules not in {type(model).__name__}: {missing}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, lora.peft_config())


def save_merged_lora(model: nn.Module, out_dir: Path, record_name: str, record: Mapping) -> None:
    """Save ``model.encoder`` (a PEFT model): its adapter to ``out_dir/adapter``, the merged
    model to ``out_dir`` (safetensors) and ``record`` as ``out_dir/record_name``. Merges in
    place: afterwards ``model.encoder`` is the plain merged model. Shared by every LoRA stage."""
    from peft import PeftModel

    from llmret.training.checkpointing import save_pretrained

    if not isinstance(model.encoder, PeftModel):
        raise TypeError(f"expected a PEFT model, got {type(model.encoder).__name__} (already merged?)")
    out_dir = Path(out_dir)
    save_pretrained(model.encoder, out_dir / ADAPTER)
    merged = model.encoder.merge_and_unload()
    model.encoder = merged
    save_pretrained(merged, out_dir)
    (out_dir / record_name).write_text(json.dumps(record, indent=2))


def load_adapter_model(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """``AutoModel`` from ``base_dir`` with the adapter of ``adapter_dir`` applied (not merged), in eval mode."""
    from peft import PeftModel
    from transformers import AutoModel

    base = AutoModel.from_pretrained(base_dir, dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def train_lora_stage(
    model: nn.Module,
    dataset: Sequence,
    collator: Any,
    training: Mapping,
    out_dir: str,
    adapter_dir: str,
    checkpoint_dir: str,
    tokenizer: Any,
    save_fn: Any,
    count_tokens: Any,
    inputs: Sequence = (),
) -> dict:
    """:func:`llmret.training.loop.train` for a LoRA stage whose ``save_fn`` leaves the adapter in
    ``out_dir/adapter``; rank 0 then moves it to ``adapter_dir``. ``training`` is the config
    mapping of :class:`llmret.training.arguments.TrainingArgs` without the two folders; ``inputs``
    (base model, data) join the checkpoint recipe."""
    import torch.distributed as dist

    from llmret.training.arguments import TrainingArgs
    from llmret.training.loop import train

    args = settings(TrainingArgs, {**training, "output_dir": out_dir, "checkpoint_dir": checkpoint_dir}, "training")
    result = train(
        model, dataset, collator, args, tokenizer=tokenizer, save_fn=save_fn, count_tokens=count_tokens, inputs=inputs
    )
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        publish_adapter(Path(out_dir) / ADAPTER, Path(adapter_dir))
    return result


def publish_adapter(src: Path, dest: Path) -> None:
    """Move the adapter out of the model folder (``os.replace``; a previous ``dest`` is removed)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(src, dest)

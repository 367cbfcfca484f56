"""RepLLaMA-style contrastive fine-tuning (Ma et al., as in Tevatron): LoRA on a causal LM,
InfoNCE over a positive, mined hard negatives and in-batch negatives, last-token pooling;
writes the merged model, ``finetune.json`` and the PEFT adapter.

Design notes: docs/finetuning.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmret import schema
from llmret.retrieval.pooling import check_pooling, pool
from llmret.retrieval.text_framing import TextFraming
from llmret.specs import settings
from llmret.training.arguments import training_dtype
from llmret.training.contrastive import (
    GroupCollator,
    check_negatives,
    count_tokens,
    gather_with_grad,
    info_nce,
    load_groups,
    mean_pairwise_cosine,
    top1_accuracy,
    training_seed,
)
from llmret.training.lora import LoraSpec, apply_lora, save_merged_lora, train_lora_stage

log = logging.getLogger(__name__)
FINETUNE_JSON = "finetune.json"


@dataclass(frozen=True)
@schema.defaults_from("finetuning")
class FinetuningSpec(TextFraming):
    """How texts are framed and pooled, and what the contrastive loss compares."""

    pooling: str
    normalize: bool
    # passages per query: 1 positive + group_size-1 hard negatives
    group_size: int
    temperature: float
    # every passage of the (global) batch is a candidate for every query
    in_batch_negatives: bool

    def __post_init__(self) -> None:
        check_pooling(self.pooling)  # as the encoder checks it
        super().__post_init__()
        schema.check_bounds(self, "finetuning")
        if self.group_size < 2 and not self.in_batch_negatives:
            raise ValueError("group_size 1 without in-batch negatives leaves no negative: the loss would be 0")

    @classmethod
    def from_config(cls, cfg: Mapping) -> FinetuningSpec:
        return settings(cls, cfg, "fine-tuning settings")

    def encoder_settings(self) -> dict:
        """The :class:`llmret.retrieval.encoder.EncoderSpec` fields a dense system must use to encode with
        the fine-tuned model (the rest, batch size and dtype, are the system's choice)."""
        return {
            "pooling": self.pooling,
            "query_template": self.query_template,
            "passage_template": self.passage_template,
            "append_eos": self.append_eos,
            "normalize": self.normalize,
            "max_query_length": self.max_query_length,
            "max_passage_length": self.max_passage_length,
        }


class ContrastiveModel(nn.Module):
    """A PEFT-wrapped ``AutoModel`` that embeds queries and passages and returns the InfoNCE loss.

    :func:`llmret.training.loop.train` enables gradient checkpointing on the first submodule that
    offers it: the PEFT wrapper forwards the call to the HF model (non-reentrant checkpointing;
    HF also makes the frozen embeddings' output require grad, so LoRA layers get gradients).
    """

    def __init__(self, encoder: nn.Module, spec: FinetuningSpec, lora: LoraSpec):
        super().__init__()
        self.encoder = encoder
        self.spec = spec
        self.lora = lora  # recorded in finetune.json by save_finetuned

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        spec: FinetuningSpec,
        lora: LoraSpec,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> ContrastiveModel:
        """The base model created directly in ``dtype`` (the run's, :func:`training_dtype`), LoRA applied."""
        from transformers import AutoModel

        base = AutoModel.from_pretrained(model_dir, dtype=dtype)
        return cls(apply_lora(base, lora, seed), spec, lora)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """fp32 embeddings as :meth:`llmret.retrieval.encoder.TextEncoder.embed_ids` computes them."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        vec = pool(self.spec.pooling, out.last_hidden_state, attention_mask).float()
        return F.normalize(vec, dim=-1) if self.spec.normalize else vec

    def forward(
        self,
        query_input_ids: torch.Tensor,
        query_attention_mask: torch.Tensor,
        passage_input_ids: torch.Tensor,
        passage_attention_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        q = self.encode(query_input_ids, query_attention_mask)
        p = self.encode(passage_input_ids, passage_attention_mask)
        need = q.shape[0] * self.spec.group_size
        if p.shape[0] != need:
            raise ValueError(f"{q.shape[0]} queries need {need} passages, got {p.shape[0]}")
        # Logged per step: the passages' mean pairwise cosine (-> 1 on collapse) and in-batch top-1.
        log = {"top1": top1_accuracy(q, p, self.spec.group_size)}
        if p.shape[0] > 1:
            log["p_cos"] = mean_pairwise_cosine(p)
        offset = 0
        if self.spec.in_batch_negatives:  # without them a query's candidates are all local
            p, first_row = gather_with_grad(p)
            offset = first_row // self.spec.group_size
        loss = info_nce(q, p, self.spec.temperature, self.spec.group_size, self.spec.in_batch_negatives, offset)
        return {"loss": loss, "log": log}


# --------------------------------------------------------------------------- save / load


def save_finetuned(model: ContrastiveModel, out_dir: Path) -> None:
    """``save_fn`` for :func:`llmret.training.loop.train`: the adapter to ``out_dir/adapter``, then the
    LoRA-merged model to ``out_dir`` and ``finetune.json``. Merging rewrites the base weights in
    place and ``model.encoder`` becomes the plain merged model: call it only once training is over."""
    record = {"contrastive": asdict(model.spec), "lora": asdict(model.lora), "encoder": model.spec.encoder_settings()}
    save_merged_lora(model, Path(out_dir), FINETUNE_JSON, record)


def finetune(
    model_dir: str,
    negatives_path: str,
    spec: FinetuningSpec | Mapping,
    lora: LoraSpec | Mapping,
    training: Mapping,
    out_dir: str,
    adapter_dir: str,
    checkpoint_dir: str,
) -> dict:
    """LoRA contrastive fine-tuning of ``model_dir``; resumes from ``checkpoint_dir``.

    Writes the merged model to ``out_dir`` and moves the adapter to ``adapter_dir`` (two
    declared outputs). Returns :func:`llmret.training.loop.train`'s result. ``spec`` and ``lora``
    may be config mappings (as :mod:`llmret.launch` passes them).
    """
    from transformers import AutoTokenizer

    if not isinstance(spec, FinetuningSpec):
        spec = FinetuningSpec.from_config(spec)
    if not isinstance(lora, LoraSpec):
        lora = LoraSpec.from_config(lora)
    groups = load_groups(negatives_path)  # validated, then read a batch at a time
    check_negatives(groups, spec.group_size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = ContrastiveModel.from_pretrained(
        model_dir, spec, lora, dtype=training_dtype(training), seed=training_seed(training)
    )
    log.info("fine-tuning %s on %d queries from %s", model_dir, len(groups), negatives_path)
    return train_lora_stage(
        model,
        groups,
        GroupCollator(tokenizer, spec),
        training,
        out_dir,
        adapter_dir,
        checkpoint_dir,
        tokenizer=tokenizer,
        save_fn=save_finetuned,
        count_tokens=count_tokens,
        inputs=(model_dir, negatives_path),
    )

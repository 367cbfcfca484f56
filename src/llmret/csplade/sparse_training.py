"""CSPLADE's contrastive phase (Xu et al. 2025): InfoNCE over sparse dot products with hard
and in-batch negatives plus warmed-up FLOPS regularisation, as a LoRA stage; saves the merged
causal LM (with its LM head), ``csplade.json`` and the adapter.

Design notes: docs/csplade.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmret import schema
from llmret.csplade.adaptation import load_causal_lora
from llmret.csplade.losses import dead_fraction, flops, quadratic_warmup
from llmret.retrieval.sparse_encoder import (
    MODEL_KEYS,
    SparseBatch,
    build_batch,
    sparse_vectors,
)
from llmret.retrieval.text_framing import TextFraming
from llmret.specs import settings
from llmret.training.arguments import training_dtype
from llmret.training.contrastive import (
    GroupCollator,
    check_negatives,
    gather_with_grad,
    info_nce,
    load_groups,
    training_seed,
)
from llmret.training.lora import LoraSpec, save_merged_lora, train_lora_stage

log = logging.getLogger(__name__)

CSPLADE_JSON = "csplade.json"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
@schema.defaults_from("csplade")
class CspladeSpec(TextFraming):
    """How texts are framed and pooled, and what the contrastive + FLOPS loss compares."""

    echo: bool
    bidirectional: bool
    group_size: int  # 1 positive + group_size-1 hard negatives
    temperature: float  # SPLADE scores are raw dot products
    in_batch_negatives: bool
    lambda_q: float
    lambda_d: float
    flops_warmup_steps: int

    def __post_init__(self) -> None:
        super().__post_init__()
        schema.check_bounds(self, "csplade")
        if self.group_size < 2 and not self.in_batch_negatives:
            raise ValueError("group_size 1 without in-batch negatives leaves no negative: the loss would be 0")

    @classmethod
    def from_config(cls, cfg: Mapping) -> CspladeSpec:
        return settings(cls, cfg, "CSPLADE settings")

    def encoder_settings(self) -> dict:
        """The ``SparseEncoderSpec`` fields a sparse system must use with the model."""
        return {k: getattr(self, k) for k in MODEL_KEYS}


# --------------------------------------------------------------------------- contrastive + FLOPS


class SparseGroupCollator(GroupCollator):
    """:class:`llmret.training.contrastive.GroupCollator`'s sampling and framing, as :class:`SparseBatch`es
    (echo applied when the spec asks): ``{"query": ..., "passage": ...}``."""

    def __call__(self, groups) -> dict[str, SparseBatch]:
        queries, passages = self.sample_texts(groups)
        head = len(self.head)
        return {
            "query": build_batch(self.tokenize(queries, "query"), self.pad_id, self.spec.echo, head),
            "passage": build_batch(self.tokenize(passages, "passage"), self.pad_id, self.spec.echo, head),
        }


def count_sparse_tokens(batch: Mapping[str, SparseBatch]) -> int:
    return batch["query"].tokens() + batch["passage"].tokens()


class SparseModel(nn.Module):
    """A PEFT-wrapped causal LM whose SPLADE vectors are trained with InfoNCE + FLOPS."""

    def __init__(self, encoder: nn.Module, spec: CspladeSpec, lora: LoraSpec):
        super().__init__()
        self.encoder, self.spec, self.lora = encoder, spec, lora
        self.step = 0  # set by the training loop (set_step) before each optimizer step

    def set_step(self, step: int) -> None:
        self.step = step

    def lambdas(self) -> tuple[float, float]:
        s = self.spec
        return (
            quadratic_warmup(s.lambda_q, self.step, s.flops_warmup_steps),
            quadratic_warmup(s.lambda_d, self.step, s.flops_warmup_steps),
        )

    def encode(self, batch: SparseBatch) -> torch.Tensor:
        # bounded memory: the LM head in vocabulary chunks, recomputed in the backward (pooled_logits)
        return sparse_vectors(self.encoder, batch, self.spec.bidirectional)

    def forward(self, query: SparseBatch, passage: SparseBatch) -> dict[str, Any]:
        q, p = self.encode(query), self.encode(passage)
        need = q.shape[0] * self.spec.group_size
        if p.shape[0] != need:
            raise ValueError(f"{q.shape[0]} queries need {need} passages, got {p.shape[0]}")
        p_all, offset = p, 0
        if self.spec.in_batch_negatives:
            p_all, first_row = gather_with_grad(p)
            offset = first_row // self.spec.group_size
        contrastive = info_nce(
            q, p_all, self.spec.temperature, self.spec.group_size, self.spec.in_batch_negatives, offset
        )
        fq, fd = flops(q), flops(p)
        lq, ld = self.lambdas()
        loss = contrastive + lq * fq + ld * fd
        with torch.no_grad():
            log_values = {
                "lambda_q": lq,
                "lambda_d": ld,
                "dead_fraction": dead_fraction(p),
                "nnz_q": float((q > 0).sum(1).float().mean()),
                "nnz_d": float((p > 0).sum(1).float().mean()),
            }
        return {
            "loss": loss,
            "loss_contrastive": contrastive.detach(),
            "loss_flops_q": fq.detach(),
            "loss_flops_d": fd.detach(),
            "log": log_values,
        }


def save_csplade(model: SparseModel, out_dir: Path) -> None:
    """``save_fn`` of :func:`train`: adapter, merged causal LM and ``csplade.json`` (the spec,
    LoRA and the encoder settings a sparse system must use)."""
    record = {"csplade": asdict(model.spec), "lora": asdict(model.lora), "encoder": model.spec.encoder_settings()}
    save_merged_lora(model, Path(out_dir), CSPLADE_JSON, record)


def train(
    model_dir: str,
    negatives_path: str,
    spec: CspladeSpec | Mapping,
    lora: LoraSpec | Mapping,
    training: Mapping,
    out_dir: str,
    adapter_dir: str,
    checkpoint_dir: str,
) -> dict:
    """Contrastive + FLOPS LoRA training of ``model_dir`` (the base LM or an :func:`adapt`
    output) on a Tevatron JSONL file; resumes from ``checkpoint_dir``."""
    from transformers import AutoTokenizer

    if not isinstance(spec, CspladeSpec):
        spec = CspladeSpec.from_config(spec)
    if not isinstance(lora, LoraSpec):
        lora = LoraSpec.from_config(lora)
    groups = load_groups(negatives_path)  # validated, then read a batch at a time
    check_negatives(groups, spec.group_size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = load_causal_lora(model_dir, lora, dtype=training_dtype(training), seed=training_seed(training))
    model = SparseModel(encoder, spec, lora)
    log.info("CSPLADE training of %s on %d queries from %s", model_dir, len(groups), negatives_path)
    return train_lora_stage(
        model,
        groups,
        SparseGroupCollator(tokenizer, spec),
        training,
        out_dir,
        adapter_dir,
        checkpoint_dir,
        tokenizer=tokenizer,
        save_fn=save_csplade,
        count_tokens=count_sparse_tokens,
        inputs=(model_dir, negatives_path),
    )

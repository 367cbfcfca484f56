"""CSPLADE training (Xu et al. 2025): a lightweight adaptation phase, then contrastive + FLOPS.

Both phases are LoRA stages run by :func:`llmret.training.loop.train` (DeepSpeed, resumable
checkpoints, JSONL log) and saved like :func:`llmret.repllama.finetuning.finetune` saves: the
LoRA-merged causal LM (safetensors, *with* its LM head, which the representation needs) plus a
JSON record of the settings in ``out_dir``, and the PEFT adapter alone in ``adapter_dir``.

Why an adaptation phase
    A pretrained causal LM's logits are mostly positive (SmolLM2-135M: mean about +9 over its
    49,152-term vocabulary), so at step 0 every SPLADE vector is dense and the FLOPS term is
    enormous (about 5e5 per batch). Its gradient drives all logits down together; once a
    logit is below zero the ReLU passes no gradient, so dimensions die and stay dead, and the
    contrastive loss loses the very terms it needs: the early-training collapse the paper
    reports. :func:`dead_fraction` (logged every logging step of both phases) shows it.

The adaptation objective (our reading; the paper's method section was not retrievable here,
only its abstract: "a lightweight adaptation training phase to eliminate training
instability", unsupervised, on the corpus)
    ``loss = ntp_weight * L_ntp + scale_weight * L_scale + bow_weight * L_bow`` on corpus
    passages framed with the passage template (defaults 1, 0.3, 0):

    * ``L_ntp``: next-token cross-entropy over the passage (causal), or, with
      ``bidirectional``, masked next-token prediction (LLM2Vec's MNTP: a ``mask_fraction`` of
      the text tokens is replaced by ``mask_token`` and each is predicted from the position
      before it). It keeps the LM a language model while its logits move; under a
      bidirectional mask it is also what teaches the LM to use the future context it now sees.
    * ``L_scale`` (:func:`logit_scale_loss`): each pooled position's ``logsumexp`` of logits
      is pulled to ``scale_target`` (6). Together with ``L_ntp``, which keeps the
      log-probabilities, this makes ``logit = log p + 6``, so the ReLU keeps at each position
      the terms the LM predicts with ``p > e^-6``, and the max-pool collects, for every
      passage token, the prediction made just before it: a lexical vector with expansion
      terms. Why: the raw logits' ranking carries little (SmolLM2's max-pooled raw logits,
      top 100 terms: nDCG@10 0.095 on a SciFact sample), while the same logits normalised
      per position (``log_softmax + 6``) retrieve at 0.40 zero-shot. The scale term teaches
      the model that normalisation, so the SPLADE formula needs no change.
    * ``L_bow``, the keep-alive term (the first objective we built; weight 0 by default): a
      balanced logistic loss on the **pre-ReLU** max-pooled logits ``z``: the passage's own
      tokens (specials left out) should have ``z > 0``, all other terms ``z < 0``:
      ``mean_{t in doc} softplus(-z_t) + neg_weight * mean_{t not in doc} softplus(z_t)``.
      It makes vectors sparser but not lexical: averaged over ~49k foreign terms its push
      down is weak (30 steps: ~6,700 terms per passage, nDCG@10 0.05), and summed it
      collapses every passage onto one fixed set of ~160 terms (nDCG@10 0.01).

    Measured on a SciFact sample (100 test queries, 300 passages, 64 tokens; SmolLM2-135M,
    LoRA r 16, 8 passages per step, lr 1e-3, CPU; ``benchmarks/csplade_objectives.py``):
    bag-of-words over the LM's tokens scores nDCG@10 0.54 (tf) / 0.82 (tf-idf). With the
    default objective the logsumexp falls from 24 to ~5 and the next-token loss, after a
    jump in the first steps, ends below where it started (4.36 -> 3.53); 120 steps give
    0.31 zero-shot with ~390 terms per passage and ~150 per query, and 60 contrastive steps
    after them (4 queries, 1 random negative + in-batch, lr 3e-4, FLOPS 1e-3) 0.43 with
    ~110 and ~26 terms.

Contrastive phase (:class:`SparseModel`)
    InfoNCE over dot products of sparse vectors with hard negatives and in-batch negatives
    (all ranks), exactly :func:`llmret.training.contrastive.info_nce` with :func:`gather_with_grad`, plus
    ``lambda_q * FLOPS(queries) + lambda_d * FLOPS(passages)`` (per rank, local vectors), each
    lambda warmed up quadratically over ``flops_warmup_steps`` optimizer steps. The log gains
    ``loss_contrastive``, ``loss_flops_q``, ``loss_flops_d`` (the unweighted FLOPS values),
    ``lambda_q``, ``lambda_d``, ``dead_fraction`` (of the micro-batch's passage vectors) and
    ``nnz_q``/``nnz_d`` (mean non-zero terms per vector), averaged over the logging window.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmret.csplade.adaptation import load_causal_lora
from llmret.csplade.losses import dead_fraction, flops, quadratic_warmup
from llmret.retrieval.sparse_encoder import (
    MODEL_KEYS,
    SparseBatch,
    SparseEncoderSpec,
    build_batch,
    sparse_vectors,
)
from llmret.specs import settings
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
class CspladeSpec:
    """How texts are framed and pooled, and what the contrastive + FLOPS loss compares."""

    query_template: str = "query: {text}"
    passage_template: str = "passage: {text}"
    append_eos: bool = True
    max_query_length: int = 32
    max_passage_length: int = 128
    echo: bool = False
    bidirectional: bool = False
    group_size: int = 8  # 1 positive + group_size-1 hard negatives
    temperature: float = 1.0  # SPLADE scores are raw dot products
    in_batch_negatives: bool = True
    lambda_q: float = 1e-3
    lambda_d: float = 1e-3
    flops_warmup_steps: int = 100

    def __post_init__(self) -> None:
        SparseEncoderSpec(**self.encoder_settings())  # templates and lengths checked as the encoder will
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.group_size < 2 and not self.in_batch_negatives:
            raise ValueError("group_size 1 without in-batch negatives leaves no negative: the loss would be 0")
        for name in ("lambda_q", "lambda_d", "flops_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

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
    groups = load_groups(negatives_path)
    check_negatives(groups, spec.group_size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = SparseModel(load_causal_lora(model_dir, lora, seed=training_seed(training)), spec, lora)
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

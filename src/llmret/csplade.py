"""CSPLADE training (Xu et al. 2025): a lightweight adaptation phase, then contrastive + FLOPS.

Both phases are LoRA stages run by :func:`llmret.training.train` (DeepSpeed, resumable
checkpoints, JSONL log) and saved like :func:`llmret.finetuning.finetune` saves: the
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
    ``loss = ntp_weight * L_ntp + bow_weight * L_bow`` on corpus passages framed with the
    passage template:

    * ``L_ntp``: next-token cross-entropy over the passage (causal), or, with
      ``bidirectional``, masked next-token prediction (LLM2Vec's MNTP: a ``mask_fraction`` of
      the text tokens is replaced by ``mask_token`` and each is predicted from the position
      before it). It keeps the LM a language model while its logits move; under a
      bidirectional mask it is also what teaches the LM to use the future context it now sees.
    * ``L_bow``, the keep-alive term: a balanced logistic loss on the **pre-ReLU** max-pooled
      logits ``z`` (the quantity SPLADE puts through ``log(1 + ReLU(.))``): the passage's own
      tokens (specials left out) should have ``z > 0``, all other terms ``z < 0``:
      ``mean_{t in doc} softplus(-z_t) + neg_weight * mean_{t not in doc} softplus(z_t)``.
      Being computed before the ReLU, its gradient reaches dead dimensions too, so the
      passage's terms are kept (or brought back) alive, while the other terms are moved
      just below zero instead of being crushed by FLOPS: the contrastive phase then starts
      from sparse, lexical vectors that FLOPS does not blow up.

    Measured on SmolLM2-135M (LoRA r=8, lr 2e-3, CPU): six adaptation steps take the loss
    from 25.5 to 4.3 and the vectors from 49,152 to ~8,500 terms (own terms 93% alive,
    FLOPS 4.6e5 -> 7.8e3). Eight contrastive steps after eight adaptation steps (lambda 1e-3,
    group 2, 4 queries, one fixed batch): InfoNCE 84 -> 6.3 -> 10.6 -> 1.7, then 1.6-1.8
    (below chance, ln 8 = 2.08) with FLOPS 4.5e3 -> 1.2e3. From the base model at the same
    rate it jumps 206 -> 562 -> 5 -> 37 -> 3.5 -> 6.3 -> 72 while FLOPS (~4.7e5) dominates the
    loss; at lr 5e-3 it goes 206 -> 1566 -> 53 and then sits at chance, 2.08 (query vectors
    collapsing: 49,152 -> 17,700 terms in 8 steps).

Contrastive phase (:class:`SparseModel`)
    InfoNCE over dot products of sparse vectors with hard negatives and in-batch negatives
    (all ranks), exactly :func:`llmret.finetuning.info_nce` with :func:`gather_with_grad`, plus
    ``lambda_q * FLOPS(queries) + lambda_d * FLOPS(passages)`` (per rank, local vectors), each
    lambda warmed up quadratically over ``flops_warmup_steps`` optimizer steps. The log gains
    ``loss_contrastive``, ``loss_flops_q``, ``loss_flops_d`` (the unweighted FLOPS values),
    ``lambda_q``, ``lambda_d``, ``dead_fraction`` (of the micro-batch's passage vectors) and
    ``nnz_q``/``nnz_d`` (mean non-zero terms per vector), averaged over the logging window.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import settings
from .encoding import pad_id_of, special_frame, tokenize_kind
from .finetuning import (
    GroupCollator,
    LoraSpec,
    apply_lora,
    check_negatives,
    gather_with_grad,
    info_nce,
    load_groups,
    save_merged_lora,
    train_lora_stage,
    training_seed,
)
from .sparse import (
    MODEL_KEYS,
    SparseBatch,
    SparseEncoderSpec,
    build_batch,
    dead_fraction,
    flops,
    quadratic_warmup,
    sparse_logits,
    sparse_vectors,
)

log = logging.getLogger(__name__)

CSPLADE_JSON = "csplade.json"
ADAPTATION_JSON = "adaptation.json"


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
        """The :class:`llmret.sparse.SparseEncoderSpec` fields a sparse system must use with the model."""
        return {k: getattr(self, k) for k in MODEL_KEYS}


@dataclass(frozen=True)
class AdaptationSpec:
    """The unsupervised adaptation phase on corpus passages (see the module docstring)."""

    template: str = "passage: {text}"
    append_eos: bool = True
    max_length: int = 128
    echo: bool = False
    bidirectional: bool = False
    ntp_weight: float = 1.0
    bow_weight: float = 1.0
    neg_weight: float = 1.0
    mask_fraction: float = 0.2  # MNTP, only with bidirectional
    max_docs: int = 0  # 0 = the whole corpus

    def __post_init__(self) -> None:
        if self.template.count("{text}") != 1:
            raise ValueError(f"template must contain '{{text}}' exactly once: {self.template!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        for name in ("ntp_weight", "bow_weight", "neg_weight", "max_docs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ntp_weight == 0 and self.bow_weight == 0:
            raise ValueError("ntp_weight and bow_weight are both 0: nothing to train")
        if not 0.0 < self.mask_fraction < 1.0:
            raise ValueError(f"mask_fraction must be in (0, 1), got {self.mask_fraction}")

    @classmethod
    def from_config(cls, cfg: Mapping) -> AdaptationSpec:
        return settings(cls, cfg, "adaptation settings")

    # what tokenize_kind reads (the adaptation frames passages only)
    @property
    def passage_template(self) -> str:
        return self.template

    @property
    def max_passage_length(self) -> int:
        return self.max_length


# --------------------------------------------------------------------------- losses


def bow_targets(rows: Sequence[Sequence[int]], vocab: int, exclude: Sequence[int] = ()) -> torch.Tensor:
    """(B, V) bool: the distinct token ids of each row, minus ``exclude`` (special tokens)."""
    out = torch.zeros((len(rows), vocab), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids = torch.tensor(sorted(set(r) - set(exclude)), dtype=torch.long)
        if ids.numel():
            out[i, ids] = True
    return out


def keep_alive_loss(pooled_logits: torch.Tensor, targets: torch.Tensor, neg_weight: float = 1.0) -> torch.Tensor:
    """Balanced logistic loss on pre-ReLU max-pooled logits: own terms above 0, others below.

    ``mean_b [mean_{t in T_b} softplus(-z_bt) + neg_weight * mean_{t not in T_b} softplus(z_bt)]``;
    rows without a target term count their negative half only."""
    z = pooled_logits.float()
    pos, neg = targets.float(), (~targets).float()
    pos_term = (F.softplus(-z) * pos).sum(1) / pos.sum(1).clamp(min=1.0)
    neg_term = (F.softplus(z) * neg).sum(1) / neg.sum(1).clamp(min=1.0)
    return (pos_term + neg_weight * neg_term).mean()


def max_pool_logits(logits: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, V) -> (B, V): max of the raw logits over pooled positions (pre-ReLU)."""
    keep = pool_mask.bool()[..., None]
    return logits.masked_fill(~keep, torch.finfo(logits.dtype).min).amax(1)


# --------------------------------------------------------------------------- adaptation


@dataclass
class AdaptationBatch:
    """Model inputs, next-token labels (-100: none) and each row's bag of terms."""

    inputs: SparseBatch
    labels: torch.Tensor  # (B, L): the token position i must predict, from its logits
    targets: torch.Tensor  # (B, V) bool

    def to(self, device) -> AdaptationBatch:
        return AdaptationBatch(self.inputs.to(device), self.labels.to(device), self.targets.to(device))


class AdaptationCollator:
    """Passage texts -> :class:`AdaptationBatch`. MNTP masking draws from Python's ``random``
    (reseeded by :func:`llmret.training.train` at every step: resumable) unless ``rng`` is given."""

    def __init__(self, tokenizer, spec: AdaptationSpec, vocab: int, rng: random.Random | None = None):
        self.tokenizer, self.spec, self.vocab, self.rng = tokenizer, spec, vocab, rng
        self.head, self.tail = special_frame(tokenizer)
        self.pad_id = pad_id_of(tokenizer)
        self.special = sorted(set(tokenizer.all_special_ids))
        mask_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else self.pad_id
        self.mask_id = mask_id

    def __call__(self, texts: Sequence[str]) -> AdaptationBatch:
        rng = self.rng if self.rng is not None else random
        rows = tokenize_kind(self.tokenizer, self.spec, texts, "passage", self.head, self.tail)
        head = len(self.head)
        targets = bow_targets([r[head:] for r in rows], self.vocab, self.special)
        batch = build_batch(rows, self.pad_id, echo=self.spec.echo, head=head)
        labels = torch.full_like(batch.input_ids, -100)
        for i, r in enumerate(rows):
            n = len(r)
            if self.spec.bidirectional:
                # MNTP: masked text positions j (never the first token, it has no predecessor)
                cand = list(range(max(head, 1), n))
                k = max(1, round(self.spec.mask_fraction * len(cand)))
                for j in rng.sample(cand, min(k, len(cand))):
                    labels[i, j - 1] = r[j]
                    batch.input_ids[i, j] = self.mask_id
                    if self.spec.echo:  # the copy must not reveal the masked token
                        batch.input_ids[i, n + j - head] = self.mask_id
            else:
                # causal next-token over the (first) copy: the second is a copy, trivially predicted
                labels[i, : n - 1] = torch.tensor(r[1:], dtype=torch.long)
        return AdaptationBatch(batch, labels, targets)


class AdaptationModel(nn.Module):
    """A PEFT-wrapped causal LM trained with ``ntp_weight * L_ntp + bow_weight * L_bow``."""

    def __init__(self, encoder: nn.Module, spec: AdaptationSpec, lora: LoraSpec):
        super().__init__()
        self.encoder, self.spec, self.lora = encoder, spec, lora

    def forward(self, batch: AdaptationBatch) -> dict[str, Any]:
        logits = sparse_logits(self.encoder, batch.inputs, self.spec.bidirectional)
        ntp = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100)
        z = max_pool_logits(logits, batch.inputs.pool_mask)
        bow = keep_alive_loss(z, batch.targets, self.spec.neg_weight)
        loss = self.spec.ntp_weight * ntp + self.spec.bow_weight * bow
        with torch.no_grad():
            w = torch.log1p(torch.relu(z))
            log_values = {"dead_fraction": dead_fraction(w), "nnz_d": float((w > 0).sum(1).float().mean())}
        return {"loss": loss, "loss_ntp": ntp.detach(), "loss_bow": bow.detach(), "log": log_values}


def save_adapted(model: AdaptationModel, out_dir: Path) -> None:
    """``save_fn`` of :func:`adapt`: adapter, merged causal LM and ``adaptation.json``."""
    record = {"adaptation": asdict(model.spec), "lora": asdict(model.lora)}
    save_merged_lora(model, Path(out_dir), ADAPTATION_JSON, record)


def load_causal_lora(
    model_dir: str | os.PathLike, lora: LoraSpec, dtype: torch.dtype = torch.float32, seed: int = 0
) -> nn.Module:
    """``AutoModelForCausalLM`` (SDPA: honours the 4-D mask) with LoRA adapters on ``lora``'s targets."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    return apply_lora(base, lora, seed)


def corpus_texts(corpus_path: str | os.PathLike, max_docs: int = 0) -> list[str]:
    """Passage texts (title joined to text) of a BEIR ``corpus.jsonl``, the first ``max_docs``."""
    from .beir import iter_corpus, join_title

    out = []
    for _, title, text in iter_corpus(corpus_path):
        out.append(join_title(title, text))
        if max_docs and len(out) >= max_docs:
            break
    if not out:
        raise ValueError(f"{corpus_path}: no passages")
    return out


def adapt(
    model_dir: str,
    corpus_path: str,
    spec: AdaptationSpec | Mapping,
    lora: LoraSpec | Mapping,
    training: Mapping,
    out_dir: str,
    adapter_dir: str,
    checkpoint_dir: str,
) -> dict:
    """The adaptation phase on ``corpus_path`` (BEIR corpus.jsonl); resumes from ``checkpoint_dir``.

    Writes the merged causal LM to ``out_dir`` (the base of :func:`train`) and the adapter to
    ``adapter_dir``. Returns :func:`llmret.training.train`'s result."""
    from transformers import AutoConfig, AutoTokenizer

    if not isinstance(spec, AdaptationSpec):
        spec = AdaptationSpec.from_config(spec)
    if not isinstance(lora, LoraSpec):
        lora = LoraSpec.from_config(lora)
    texts = corpus_texts(corpus_path, spec.max_docs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    model = AdaptationModel(load_causal_lora(model_dir, lora, seed=training_seed(training)), spec, lora)
    log.info("CSPLADE adaptation of %s on %d passages from %s", model_dir, len(texts), corpus_path)
    return train_lora_stage(
        model,
        texts,
        AdaptationCollator(tokenizer, spec, vocab),
        training,
        out_dir,
        adapter_dir,
        checkpoint_dir,
        tokenizer=tokenizer,
        save_fn=save_adapted,
        count_tokens=lambda b: b.inputs.tokens(),
    )


# --------------------------------------------------------------------------- contrastive + FLOPS


class SparseGroupCollator(GroupCollator):
    """:class:`llmret.finetuning.GroupCollator`'s sampling and framing, as :class:`SparseBatch`es
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
    )

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
    bow_weight: float = 0.0
    neg_weight: float = 1.0
    scale_weight: float = 0.3
    scale_target: float = 6.0  # logsumexp of a position's logits the scale term aims at
    mask_fraction: float = 0.2  # MNTP, only with bidirectional
    max_docs: int = 0  # 0 = the whole corpus

    def __post_init__(self) -> None:
        if self.template.count("{text}") != 1:
            raise ValueError(f"template must contain '{{text}}' exactly once: {self.template!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        for name in ("ntp_weight", "bow_weight", "neg_weight", "scale_weight", "max_docs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ntp_weight == 0 and self.bow_weight == 0 and self.scale_weight == 0:
            raise ValueError("ntp_weight, bow_weight and scale_weight are all 0: nothing to train")
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


def pooled_logsumexp(logits: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """(n,) float32: ``logsumexp`` over the vocabulary at each pooled position."""
    return torch.logsumexp(logits.float(), -1)[pool_mask.bool()]


def logit_scale_loss(lse: torch.Tensor, target: float, below: float = 0.1) -> torch.Tensor:
    """Pulls each pooled position's ``logsumexp`` of logits (``lse``, :func:`pooled_logsumexp`)
    towards ``target``.

    ``mean_t relu(lse_t - target)^2 + below * mean_t relu(target - lse_t)^2`` over the pooled
    positions. With the next-token loss keeping the log-probabilities, ``lse_t = target`` makes
    ``logit = log p + target``: the ReLU then keeps exactly the terms predicted with
    ``p > exp(-target)``. Positions above the target widen the max-pooled union of live terms,
    so they cost ``1 / below`` times more than positions below it."""
    return (torch.relu(lse - target) ** 2).mean() + below * (torch.relu(target - lse) ** 2).mean()


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
        lse = pooled_logsumexp(logits, batch.inputs.pool_mask)
        scale = logit_scale_loss(lse, self.spec.scale_target)
        loss = self.spec.ntp_weight * ntp + self.spec.bow_weight * bow + self.spec.scale_weight * scale
        with torch.no_grad():
            w = torch.log1p(torch.relu(z))
            log_values = {
                "dead_fraction": dead_fraction(w),
                "nnz_d": float((w > 0).sum(1).float().mean()),
                "own_alive": float(((z > 0) & batch.targets).sum() / batch.targets.sum().clamp(min=1)),
                "logsumexp": float(lse.mean()),
            }
        return {
            "loss": loss,
            "loss_ntp": ntp.detach(),
            "loss_bow": bow.detach(),
            "loss_scale": scale.detach(),
            "log": log_values,
        }


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
        inputs=(model_dir, corpus_path),
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
        inputs=(model_dir, negatives_path),
    )

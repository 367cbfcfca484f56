"""CSPLADE's adaptation phase: a short unsupervised LoRA stage on corpus passages before
contrastive sparse training. By default the public recipe's objective: next-token prediction
for a causal model, masked next-token prediction (LLM2Vec's MNTP) for a bidirectional one.
The logit-scale and keep-alive terms are this project's own additions, off unless weighted
(``scale_weight``, ``bow_weight``), and so is ``unmasked_fraction``: MNTP batches with a share
of whole passages under next-token labels, so the whole text that encoding sees is trained too.
Design notes and provenance: docs/csplade.md.
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

from llmret import schema
from llmret.csplade.losses import (
    bow_targets,
    dead_fraction,
    keep_alive_loss,
    logit_scale_loss,
    max_pool_logits,
    pooled_logsumexp,
)
from llmret.retrieval.sparse_encoder import (
    SparseBatch,
    build_batch,
    sparse_logits,
)
from llmret.retrieval.text_framing import check_template
from llmret.retrieval.tokenization import pad_id_of, special_frame, tokenize_kind
from llmret.specs import settings
from llmret.training.arguments import training_dtype
from llmret.training.contrastive import training_seed
from llmret.training.lora import LoraSpec, apply_lora, save_merged_lora, train_lora_stage

log = logging.getLogger(__name__)
ADAPTATION_JSON = "adaptation.json"


@dataclass(frozen=True)
@schema.defaults_from("adaptation")
class AdaptationSpec:
    """The unsupervised adaptation phase on corpus passages (docs/csplade.md)."""

    template: str
    append_eos: bool
    max_length: int
    echo: bool
    bidirectional: bool
    ntp_weight: float
    bow_weight: float
    neg_weight: float
    # this project's logit-scale term (off: the public recipe)
    scale_weight: float
    # logsumexp of a position's logits the scale term aims at
    scale_target: float
    mask_fraction: float  # MNTP, only with bidirectional
    # this project's addition (MNTP only): this share of each batch's passages (the last rows) stays
    # unmasked, with next-token labels, so the whole text that encoding sees is trained too
    unmasked_fraction: float
    max_docs: int  # 0 = the whole corpus

    def __post_init__(self) -> None:
        check_template(self, "template")
        schema.check_bounds(self, "adaptation")
        if self.ntp_weight == 0 and self.bow_weight == 0 and self.scale_weight == 0:
            raise ValueError("ntp_weight, bow_weight and scale_weight are all 0: nothing to train")
        if self.unmasked_fraction and not self.bidirectional:
            raise ValueError("unmasked_fraction applies to MNTP only: set bidirectional, or leave it 0")

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
    (reseeded by :func:`llmret.training.loop.train` at every step: resumable) unless ``rng`` is given."""

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
        whole = int(self.spec.unmasked_fraction * len(rows))  # < len(rows): one row at least is masked
        for i, r in enumerate(rows):
            n = len(r)
            if self.spec.bidirectional and i < len(rows) - whole:
                # MNTP: masked text positions j (never the first token, it has no predecessor)
                cand = list(range(max(head, 1), n))
                k = max(1, round(self.spec.mask_fraction * len(cand)))
                for j in rng.sample(cand, min(k, len(cand))):
                    labels[i, j - 1] = r[j]
                    batch.input_ids[i, j] = self.mask_id
                    if self.spec.echo:  # the copy must not reveal the masked token
                        batch.input_ids[i, n + j - head] = self.mask_id
            else:
                # next-token over the (first) copy: the second is a copy, trivially predicted. An
                # MNTP batch's whole rows too: there each position sees the token it predicts, so
                # this (with the scale term) teaches whole text a lexical vector, as encoding sees it
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
    """``AutoModelForCausalLM`` (SDPA: honours the 4-D mask) created directly in ``dtype`` (the
    run's, :func:`llmret.training.arguments.training_dtype`), with LoRA adapters on ``lora``'s targets."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    return apply_lora(base, lora, seed)


def corpus_texts(corpus_path: str | os.PathLike, max_docs: int = 0) -> list[str]:
    """Passage texts (title joined to text) of a BEIR ``corpus.jsonl``, the first ``max_docs``."""
    from llmret.data.beir import iter_corpus, join_title

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
    ``adapter_dir``. Returns :func:`llmret.training.loop.train`'s result."""
    from transformers import AutoConfig, AutoTokenizer

    if not isinstance(spec, AdaptationSpec):
        spec = AdaptationSpec.from_config(spec)
    if not isinstance(lora, LoraSpec):
        lora = LoraSpec.from_config(lora)
    texts = corpus_texts(corpus_path, spec.max_docs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    encoder = load_causal_lora(model_dir, lora, dtype=training_dtype(training), seed=training_seed(training))
    model = AdaptationModel(encoder, spec, lora)
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

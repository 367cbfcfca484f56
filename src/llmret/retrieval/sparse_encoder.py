"""SPLADE-style sparse vectors from a causal LM (CSPLADE): ``log(1 + ReLU(logit))``
max-pooled over positions, with echo and bidirectional-attention variants, pruning and
token-budgeted encoding into CSR matrices. The LM head is applied in chunks: of positions with
a running max when encoding, of the vocabulary with recomputation in training
(:mod:`llmret.retrieval.pooled_logits`); pruning runs on the model's device.

Design notes: docs/csplade.md.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from llmret import schema
from llmret.retrieval.encoder import check_quantize
from llmret.retrieval.masks import bidirectional_mask
from llmret.retrieval.model_import import DTYPES
from llmret.retrieval.pooled_logits import DEFAULT_BLOCK, pooled_splade, slicable_head
from llmret.retrieval.text_framing import TextFraming
from llmret.retrieval.tokenization import KINDS, pad_id_of, special_frame, token_batches, tokenize_kind
from llmret.specs import settings

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
@schema.defaults_from("systems.sparse")
class SparseEncoderSpec(TextFraming):
    """How a sparse system turns text into a vocabulary-sized vector; every field is part of
    the cache key. ``top_k`` 0 keeps every non-zero weight; ``min_weight`` drops weights below it."""

    echo: bool
    bidirectional: bool
    top_k: int
    min_weight: float
    batch_tokens: int
    dtype: str
    quantize: str  # llmret.retrieval.quantization
    quantize_group_size: int
    # the LM head stays float32 unless set (it computes every weight)
    quantize_head: bool

    def __post_init__(self) -> None:
        super().__post_init__()
        schema.check_bounds(self, "systems.sparse")
        check_quantize(self)

    @classmethod
    def from_config(cls, cfg: dict) -> SparseEncoderSpec:
        return settings(cls, cfg, "sparse encoder settings")

    def to_dict(self) -> dict:
        return asdict(self)


MODEL_KEYS = ("query_template", "passage_template", "append_eos", "max_query_length", "max_passage_length")
MODEL_KEYS += ("echo", "bidirectional")  # what a trained model fixes (the rest is the system's choice)
assert set(MODEL_KEYS) <= {f.name for f in fields(SparseEncoderSpec)}


# --------------------------------------------------------------------------- pure pieces


def splade_activations(logits: torch.Tensor) -> torch.Tensor:
    """``log(1 + ReLU(logits))``: non-negative, log-saturated term weights."""
    return torch.log1p(torch.relu(logits))


def splade_pool(logits: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits -> (B, V) weights: max over the positions where ``pool_mask`` is set.

    Masked positions count as 0, which is the floor of the activations anyway; a row with no
    pooled position is refused (its vector would be silently empty)."""
    if pool_mask.shape != logits.shape[:2]:
        raise ValueError(f"pool_mask {tuple(pool_mask.shape)} does not match logits {tuple(logits.shape)}")
    keep = pool_mask.bool()
    if not keep.any(1).all():
        raise ValueError("a row has no pooled position")
    act = splade_activations(logits)
    return act.masked_fill(~keep[..., None], 0.0).amax(1)


@dataclass
class SparseBatch:
    """Right-padded model inputs plus the positions to pool (all long, (B, L))."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    pool_mask: torch.Tensor

    def to(self, device) -> SparseBatch:
        return SparseBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def build_batch(rows: Sequence[Sequence[int]], pad_id: int, echo: bool = False, head: int = 0) -> SparseBatch:
    """Token-id rows -> a :class:`SparseBatch`.

    Without echo every real token is pooled. With echo each row ``r = r[:head] + body``
    becomes ``r[:head] + body + body`` and only the second ``body`` is pooled (``head`` is the
    length of the tokenizer's frame head, e.g. a BOS, which is not repeated)."""
    if not rows:
        raise ValueError("no rows")
    seqs, pooled = [], []
    for r in rows:
        r = list(r)
        if len(r) <= head:
            raise ValueError(f"row of {len(r)} tokens has nothing after its {head}-token head")
        if echo:
            body = r[head:]
            seqs.append(r + body)
            pooled.append((len(r), len(r) + len(body)))
        else:
            seqs.append(r)
            pooled.append((0, len(r)))
    width = max(len(s) for s in seqs)
    n = len(seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    pool = torch.zeros((n, width), dtype=torch.long)
    for i, (s, (a, b)) in enumerate(zip(seqs, pooled, strict=True)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
        pool[i, a:b] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0) * mask  # 0..len-1, pads 0
    return SparseBatch(ids, mask, positions, pool)


def echo_batch(rows: Sequence[Sequence[int]], pad_id: int, head: int = 0) -> SparseBatch:
    """:func:`build_batch` with echo: the pool mask covers exactly the second copy."""
    return build_batch(rows, pad_id, echo=True, head=head)


# --------------------------------------------------------------------------- model side


def _parts(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder body, LM head) of a causal LM, PEFT-wrapped or not."""
    from llmret.retrieval.masks import decoder_of

    body = decoder_of(lm)
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no LM head: load the model with AutoModelForCausalLM")
    return body, head


def hidden_states(lm: nn.Module, batch: SparseBatch, bidirectional: bool) -> torch.Tensor:
    """(B, L, H) final hidden states, under the causal mask or the bidirectional one."""
    from llmret.retrieval.masks import MASKED_ATTENTION

    body, _ = _parts(lm)
    param = next(body.parameters())
    if bidirectional:
        impl = getattr(body.config, "_attn_implementation", None)
        if impl not in MASKED_ATTENTION:
            raise ValueError(f"bidirectional needs attn_implementation in {MASKED_ATTENTION}, got {impl!r}")
        mask = bidirectional_mask(batch.attention_mask.to(param.device), param.dtype)
    else:
        mask = batch.attention_mask.to(param.device)
    out = body(
        input_ids=batch.input_ids.to(param.device),
        attention_mask=mask,
        position_ids=batch.position_ids.to(param.device),
        use_cache=False,
    )
    return out.last_hidden_state


def sparse_logits(lm: nn.Module, batch: SparseBatch, bidirectional: bool) -> torch.Tensor:
    """(B, L, V) vocabulary logits (float32) of every position."""
    _, head = _parts(lm)
    return head(hidden_states(lm, batch, bidirectional)).float()


@functools.cache
def _warn_full_logits(head_type: str) -> None:
    log.warning("LM head %s is not a plain nn.Linear: SPLADE pooling over all (batch, length, vocab) logits", head_type)


def sparse_vectors(
    lm: nn.Module, batch: SparseBatch, bidirectional: bool, chunk: int | None = None, block: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """(B, V) float32 SPLADE vectors, without materialising all (B, L, V) logits.

    Without ``chunk`` (training): :func:`llmret.retrieval.pooled_logits.pooled_splade`, the LM
    head applied to chunks of the vocabulary (``block`` logits at a time) and recomputed in the
    backward; a head that is not a plain ``nn.Linear`` (e.g. LoRA-wrapped) falls back to
    :func:`splade_pool` of the full logits. ``chunk`` (inference) applies the head to that many
    positions at a time with a running max."""
    _, head = _parts(lm)
    h = hidden_states(lm, batch, bidirectional)
    if chunk is None:
        if slicable_head(head):
            return pooled_splade(h, head.weight, head.bias, batch.pool_mask, block)
        if torch.is_grad_enabled():
            _warn_full_logits(type(head).__name__)
        return splade_pool(head(h).float(), batch.pool_mask.to(h.device))
    pool = batch.pool_mask.to(h.device).bool()
    if not pool.any(1).all():
        raise ValueError("a row has no pooled position")
    out = None  # the head's width comes from its output (a quantized head has no .weight)
    for s in range(0, h.shape[1], chunk):
        part = splade_activations(head(h[:, s : s + chunk]).float())
        part = part.masked_fill(~pool[:, s : s + chunk, None], 0.0).amax(1)
        out = part if out is None else torch.maximum(out, part)
    return out


def prune(weights: torch.Tensor, top_k: int = 0, min_weight: float = 0.0) -> torch.Tensor:
    """Zero every weight below ``min_weight`` and, with ``top_k`` > 0, all but each row's
    ``top_k`` largest (ties broken by ``torch.topk``)."""
    w = weights
    if min_weight > 0:
        w = w.masked_fill(w < min_weight, 0.0)
    if top_k and top_k < w.shape[1]:
        vals, idx = torch.topk(w, top_k, dim=1)
        w = torch.zeros_like(w).scatter_(1, idx, vals)
    return w


def vector_stats(vectors) -> dict:
    """Sparsity figures of a CSR matrix of vectors: mean and max terms per vector, and how
    many vocabulary terms any vector uses (the complement of the dead dimensions)."""
    per_row = np.diff(vectors.indptr)
    return {
        "vectors": int(vectors.shape[0]),
        "vocab_size": int(vectors.shape[1]),
        "nnz": int(vectors.nnz),
        "nnz_mean": float(per_row.mean()) if len(per_row) else 0.0,
        "nnz_max": int(per_row.max()) if len(per_row) else 0,
        "terms_used": int(len(np.unique(vectors.indices))),
    }


def to_csr(weights: torch.Tensor):
    """(n, V) dense tensor -> ``scipy.sparse.csr_matrix`` float32 (explicit zeros dropped)."""
    from scipy.sparse import csr_matrix

    w = weights.detach().float().cpu()
    nz = w.nonzero(as_tuple=False)
    rows, cols = nz[:, 0].numpy(), nz[:, 1].numpy()
    data = w[nz[:, 0], nz[:, 1]].numpy().astype(np.float32)
    return csr_matrix((data, (rows, cols)), shape=tuple(w.shape), dtype=np.float32)


def pruned_csr(weights: torch.Tensor, top_k: int = 0, min_weight: float = 0.0):
    """``to_csr(prune(weights, top_k, min_weight))`` computed where ``weights`` lie: the
    pruning (``torch.topk``, or ``nonzero`` without ``top_k``) runs on their device and only the
    kept (index, weight) pairs, zeros dropped, are copied to the host."""
    from scipy.sparse import csr_matrix

    w = weights.detach().float()
    if min_weight > 0:
        w = w.masked_fill(w < min_weight, 0.0)
    n, vocab = w.shape
    if top_k and top_k < vocab:
        vals, idx = torch.topk(w, top_k, dim=1)
        idx, order = idx.sort(1)
        vals = vals.gather(1, order)
        keep = vals != 0
        cols, data, counts = idx[keep], vals[keep], keep.sum(1)
    else:
        rows, cols = w.nonzero(as_tuple=True)
        data, counts = w[rows, cols], torch.bincount(rows, minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts.cpu().numpy(), out=indptr[1:])
    data, cols = data.cpu().numpy(), cols.cpu().numpy().astype(np.int32)
    return csr_matrix((data, cols, indptr), shape=(n, vocab), dtype=np.float32)


# --------------------------------------------------------------------------- encoding


def load_sparse_model(model_dir: str, dtype: str = "float32", device: str = "cpu") -> nn.Module:
    """The causal LM (with its LM head) in eval mode; SDPA attention (honours the 4-D mask)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return (
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
        .to(device)
        .eval()
    )


def load_sparse_encoder(model_dir: str, spec: SparseEncoderSpec, device: str = "cpu") -> nn.Module:
    """:func:`load_sparse_model` at ``spec.dtype`` with ``spec.quantize`` applied (the LM head too)."""
    from llmret.retrieval.encoder import apply_quantization

    return apply_quantization(load_sparse_model(model_dir, spec.dtype, device), spec, device)


def tokenize_sparse(tokenizer, spec: SparseEncoderSpec, texts: Sequence[str], kind: str) -> tuple[list[list[int]], int]:
    """(token-id rows framed as the dense encoder frames them, frame-head length)."""
    head, tail = special_frame(tokenizer)
    return tokenize_kind(tokenizer, spec, texts, kind, head, tail), len(head)


def encode_sparse(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    kind: str,
    spec: SparseEncoderSpec,
    show_progress: bool = True,
    chunk: int = 64,
):
    """Sparse vectors of ``texts`` in input order: ``csr_matrix`` (len(texts), vocab), float32.

    Runs in the model's own dtype (load it with ``spec.dtype``); weights are pooled in float32.
    Batches hold at most ``spec.batch_tokens`` tokens (rows x longest row, echo included)."""
    from scipy.sparse import vstack

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not texts:
        raise ValueError("nothing to encode")
    rows, head = tokenize_sparse(tokenizer, spec, texts, kind)
    pad_id = pad_id_of(tokenizer)
    lengths = [len(r) * 2 - head if spec.echo else len(r) for r in rows]
    plan = token_batches(lengths, spec.batch_tokens)
    device = next(model.parameters()).device
    parts, order = [], []
    with (
        torch.inference_mode(),
        tqdm(
            total=len(rows), desc=f"encode {kind} (sparse)", unit="text", mininterval=5.0, disable=not show_progress
        ) as bar,
    ):
        for idx in plan:
            batch = build_batch([rows[i] for i in idx], pad_id, echo=spec.echo, head=head).to(device)
            w = sparse_vectors(model, batch, spec.bidirectional, chunk=chunk)
            parts.append(pruned_csr(w, spec.top_k, spec.min_weight))
            order.extend(idx)
            bar.update(len(idx))
    stacked = vstack(parts, format="csr", dtype=np.float32)
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[np.asarray(order)] = np.arange(len(order))
    out = stacked[inverse]
    out.sort_indices()
    return out

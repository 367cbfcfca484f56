"""LLaRA's pretraining objective (Li et al.): EBAE and EBAR prompts in one joint forward pass
over ``text SELF </s> NEXT </s>``, their inputs, mask segments and bag-of-words targets, for
the paper's eq. 6 and for the released FlagEmbedding variant (what differs between the two:
:mod:`llmret.llara.variants`).

Design notes (mask semantics, the release read file by file, deviations): docs/llara.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from llmret.llara.variants import IGNORE as IGNORE  # re-exported: the label the LM term skips
from llmret.llara.variants import LlaraVariant, variant_class
from llmret.retrieval.masks import additive_mask
from llmret.retrieval.tokenization import special_frame

# Segment labels of a joint row; used to build the mask and exposed for inspection.
PAD, TEXT, SELF, NEXT = -1, 0, 1, 2

HEAD_MODES = ("copy", "tie")


@dataclass(frozen=True)
class LlaraObjective:
    """Prompts and lengths of the LLaRA objective; every field changes what is learnt.

    ``max_text_length`` caps the tokens of the text *and* of the next text (the EBAR
    target): prompts, frame tokens and EOS are always kept, as in the encoder.

    ``variant`` is ``"paper"`` (eq. 6, one ``</s>`` per prompt) or ``"flagembedding"`` (the
    released code: ``summary_tokens`` special tokens per prompt, max-pooled logits, an LM
    term; see docs/llara.md). Fields left at None take the variant's value
    (:attr:`llmret.llara.variants.LlaraVariant.defaults`; the FlagEmbedding values are the
    released code's: each BoW loss / 10, the two averaged (0.05 each), LM term weight 1), so
    one switch gives either recipe; ``summary_tokens`` only matters for ``"flagembedding"``.
    :attr:`kind` is the variant (an instance of its class in ``variants.VARIANTS``), resolved once here.
    """

    ebae_prompt: str | None = None
    ebar_prompt: str | None = None
    max_text_length: int = 128
    ebae_weight: float | None = None
    ebar_weight: float | None = None
    variant: str = "paper"
    text_prefix: str | None = None
    lm_weight: float | None = None
    summary_tokens: int = 8

    def __post_init__(self) -> None:
        kind = variant_class(self.variant)()
        object.__setattr__(self, "_kind", kind)  # not a field: asdict() and == see the settings only
        for name, value in kind.defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: resolve defaults once, here
        if self.max_text_length < 1:
            raise ValueError(f"max_text_length must be >= 1, got {self.max_text_length}")
        if not self.ebae_prompt or not self.ebar_prompt:
            raise ValueError("ebae_prompt and ebar_prompt must be non-empty")
        if self.ebae_weight < 0 or self.ebar_weight < 0 or self.lm_weight < 0:
            raise ValueError("loss weights must be >= 0")
        if self.summary_tokens < 1:
            raise ValueError(f"summary_tokens must be >= 1, got {self.summary_tokens}")
        kind.check(self)

    @property
    def kind(self) -> LlaraVariant:
        """What the variant does differently (:mod:`llmret.llara.variants`)."""
        return self._kind

    def summary_names(self) -> tuple[list[str], list[str]]:
        """Summary tokens of the EBAE and EBAR prompts: ``<s1>..<sK>`` and ``<sK+1>..<s2K>``
        (the released names for K = 8); empty for the paper variant."""
        return self.kind.summary_names(self)


def add_summary_tokens(tokenizer, objective: LlaraObjective) -> int:
    """Add the objective's summary tokens to ``tokenizer`` as special tokens; returns how
    many were new (0 for the paper variant, or when a checkpoint already has them).

    Called before shards are tokenised and before training, so both see one vocabulary
    (the shards' tokenizer fingerprint includes added tokens). Special, so they are never
    split, never BoW targets, and saved with the tokenizer; the existing extra special
    tokens are kept (``replace_extra_special_tokens=False``).
    """
    ebae, ebar = objective.summary_names()
    vocab = tokenizer.get_vocab()
    new = [t for t in ebae + ebar if t not in vocab]
    if not new:
        return 0
    return tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)


def fit_embeddings(lm: nn.Module, tokenizer) -> bool:
    """Grow the LM's input/output embeddings to hold every token id of ``tokenizer``.

    Only grows: a vocabulary padded beyond ``len(tokenizer)`` already has rows for the new
    ids and is not cut (the release resizes to ``len(tokenizer)`` unconditionally). Returns
    whether it resized. Call before :class:`LlaraModel` copies the LM head.
    """
    if len(tokenizer) <= lm.get_input_embeddings().num_embeddings:
        return False
    lm.resize_token_embeddings(len(tokenizer))
    return True


def encoder_settings(objective: LlaraObjective) -> dict[str, str | bool]:
    """The dense-system settings that feed and pool text as this objective trained:
    EBAR prompt for queries, EBAE prompt for passages (as in the paper and the release).

    paper: ``{text}`` + prompt, ``</s>`` appended, the last token's state. flagembedding:
    prefix + ``{text}`` + prompt + summary tokens, no ``</s>``, the mean of the states of
    the last K tokens (the summary tokens; the release's inference pooling).
    """
    return objective.kind.encoder_settings(objective)


@dataclass
class JointBatch:
    """Tensors for one forward pass over ``[head] text SELF </s> NEXT </s>`` rows.

    ``attention_mask`` is additive (0 = attend, ``finfo(dtype).min`` = blocked), shape
    (B, 1, L, L). ``segments`` holds PAD/TEXT/SELF/NEXT per position. The ``*_targets`` are
    optional (B, V) multi-hot bags of words; :class:`LlaraModel` needs them for the loss.
    """

    input_ids: torch.Tensor  # (B, L) long, right-padded
    attention_mask: torch.Tensor  # (B, 1, L, L) float additive
    position_ids: torch.Tensor  # (B, L) long
    ebae_index: torch.Tensor  # (B,) long: position of SELF's </s>
    ebar_index: torch.Tensor  # (B,) long: position of NEXT's </s>
    segments: torch.Tensor  # (B, L) long, PAD/TEXT/SELF/NEXT
    text_ids: list[list[int]] = field(default_factory=list)  # truncated text tokens per row
    ebae_targets: torch.Tensor | None = None  # (B, V) float
    ebar_targets: torch.Tensor | None = None  # (B, V) float
    # Set by the variant (LlaraVariant.batch_fields), flagembedding only: positions of the summary
    # tokens of SELF / NEXT, and LM labels (the text ids at the text positions, IGNORE elsewhere,
    # unshifted as HF's ``labels``).
    ebae_summary: torch.Tensor | None = None  # (B, K) long
    ebar_summary: torch.Tensor | None = None  # (B, K) long
    lm_labels: torch.Tensor | None = None  # (B, L) long

    def to(self, device: torch.device | str) -> JointBatch:
        moved = {
            k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items() if k != "text_ids"
        }
        return replace(self, **moved)


def joint_allowed(segments: torch.Tensor) -> torch.Tensor:
    """Which key each query may see, (B, L, L) bool, from per-position segment labels.

    Rules: causal; padding keys are never seen; NEXT never sees SELF (SELF cannot see NEXT
    anyway, it comes first). A padding query sees only itself, so no row is fully masked
    and the softmax of pad rows stays finite (their outputs are never used).
    """
    L = segments.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal[None] & (k != PAD) & ~((q == NEXT) & (k == SELF))
    pad_q = (segments == PAD)[:, :, None]
    eye = torch.eye(L, dtype=torch.bool, device=segments.device)[None]
    return torch.where(pad_q, eye, allowed)


def _ids(tokenizer, texts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Token ids without special tokens; id lists pass through unchanged."""
    if len(texts) == 0:
        raise ValueError("no texts")
    if all(isinstance(t, str) for t in texts):
        return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    if any(isinstance(t, str) for t in texts):
        raise TypeError("texts must be all strings or all token-id lists")
    return [[int(i) for i in t] for t in texts]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id


def build_joint_inputs(
    tokenizer,
    texts: Sequence[str] | Sequence[Sequence[int]],
    objective: LlaraObjective = LlaraObjective(),
    dtype: torch.dtype = torch.float32,
) -> JointBatch:
    """One joint row per text: ``head + prefix + text[:max_text_length] + SELF seg + NEXT seg``.

    Positions: head/prefix/text/SELF count 0, 1, ...; NEXT restarts at the first SELF
    position, so both prompts sit exactly where they would in a separate pass. Padding
    gets position 0 (it is masked everywhere, any valid position would do). The prefix is
    labelled TEXT (it is shared by both prompts). The variant makes each prompt segment
    (paper: prompt + frame tail + ``</s>``; flagembedding: prompt + summary tokens) and adds
    its own fields (flagembedding: the summary positions and the LM labels).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos token; LLaRA pools at </s>")
    head, tail = special_frame(tokenizer)
    if objective.text_prefix:
        head = head + tokenizer(objective.text_prefix, add_special_tokens=False)["input_ids"]
    kind = objective.kind
    ebae_names, ebar_names = objective.summary_names()
    ebae, ebae_at = kind.segment(tokenizer, objective.ebae_prompt, ebae_names, tail, eos)
    ebar, ebar_at = kind.segment(tokenizer, objective.ebar_prompt, ebar_names, tail, eos)
    text_ids = [t[: objective.max_text_length] for t in _ids(tokenizer, texts)]

    rows = [head + t + ebae + ebar for t in text_ids]
    B, L = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((B, L), _pad_id(tokenizer), dtype=torch.long)
    segments = torch.full((B, L), PAD, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    ebae_index = torch.empty(B, dtype=torch.long)
    ebar_index = torch.empty(B, dtype=torch.long)
    spans = []
    for b, (row, t) in enumerate(zip(rows, text_ids, strict=True)):
        n, s, m = len(head) + len(t), len(ebae), len(ebar)
        input_ids[b, : len(row)] = torch.tensor(row)
        segments[b, :n] = TEXT
        segments[b, n : n + s] = SELF
        segments[b, n + s : n + s + m] = NEXT
        position_ids[b, : n + s] = torch.arange(n + s)
        position_ids[b, n + s : n + s + m] = torch.arange(n, n + m)
        ebae_index[b] = n + s - 1
        ebar_index[b] = n + s + m - 1
        spans.append((len(head), n, s))
    return JointBatch(
        input_ids=input_ids,
        attention_mask=additive_mask(joint_allowed(segments), dtype),
        position_ids=position_ids,
        ebae_index=ebae_index,
        ebar_index=ebar_index,
        segments=segments,
        text_ids=text_ids,
        **kind.batch_fields(L, spans, text_ids, ebae_at, ebar_at),
    )


def bow_targets(target_ids: Sequence[Sequence[int]], vocab_size: int, exclude_ids: Sequence[int] = ()) -> torch.Tensor:
    """Multi-hot (B, V) float: 1 for every distinct token of a target text.

    A repeated token counts once (the paper's target is the token *set*). Padding and
    special ids are dropped: they carry no content and would dominate every bag.
    """
    out = torch.zeros(len(target_ids), vocab_size, dtype=torch.float32)
    drop = set(int(i) for i in exclude_ids)
    for b, ids in enumerate(target_ids):
        keep = sorted({int(i) for i in ids} - drop)
        if keep and (keep[0] < 0 or keep[-1] >= vocab_size):
            raise ValueError(f"row {b}: token id outside [0, {vocab_size})")
        if keep:
            out[b, keep] = 1.0
    return out


def excluded_ids(tokenizer) -> list[int]:
    """Ids never used as bag-of-words targets: all special tokens plus padding."""
    ids = set(tokenizer.all_special_ids)
    ids.add(_pad_id(tokenizer))
    return sorted(i for i in ids if i is not None)


def build_training_batch(
    tokenizer,
    texts: Sequence[str] | Sequence[Sequence[int]],
    next_texts: Sequence[str] | Sequence[Sequence[int]],
    vocab_size: int,
    objective: LlaraObjective = LlaraObjective(),
    dtype: torch.dtype = torch.float32,
) -> JointBatch:
    """Joint inputs plus targets: EBAE = tokens of the (truncated) text, EBAR = tokens of
    the next text truncated to the same ``max_text_length``.

    ``vocab_size`` is the model's (``config.vocab_size``), which may exceed ``len(tokenizer)``.
    """
    if len(texts) != len(next_texts):
        raise ValueError(f"{len(texts)} texts but {len(next_texts)} next texts")
    batch = build_joint_inputs(tokenizer, texts, objective, dtype)
    nxt = [t[: objective.max_text_length] for t in _ids(tokenizer, next_texts)]
    drop = excluded_ids(tokenizer)
    batch.ebae_targets = bow_targets(batch.text_ids, vocab_size, drop)
    batch.ebar_targets = bow_targets(nxt, vocab_size, drop)
    return batch

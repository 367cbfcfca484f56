"""LLaRA pretraining objective (Li et al., "Making Large Language Models A Better Foundation
For Dense Retrieval"): EBAE + EBAR in one forward pass.

A causal LM reads ``text`` and then two prompts, each closed by an end-of-sequence token:

    [frame-head] text  SELF [frame-tail] </s>  NEXT [frame-tail] </s>

``SELF`` is the EBAE prompt (" The original sentence:"), ``NEXT`` the EBAR prompt (" The next
sentence:"). The final hidden state at each ``</s>`` is a text embedding. EBAE asks the first
embedding to predict the tokens of ``text`` itself, EBAR asks the second to predict the tokens
of the text that follows it. Both are bag-of-words objectives over the vocabulary (paper
eq. 6), so each embedding is projected to vocabulary logits once, never the whole sequence.

Sharing the ``text`` prefix between the tasks halves the cost, but only if the two prompts
cannot see each other: a 4-D attention mask hides the SELF segment from the NEXT segment,
and NEXT restarts its position ids where SELF started. The joint pass is then equivalent to
two separate passes ``text + SELF + </s>`` and ``text + NEXT + </s>`` (checked in the tests).

Each segment is ``prompt ids + frame tail + eos``, exactly what
:class:`llmret.retrieval.encoder.TextEncoder` produces for a template ``"{text}" + prompt`` with
``append_eos``, so an embedding learnt here is the one the encoder later pools.

Mask semantics in transformers v5 (read off 5.23 ``masking_utils`` / ``modeling_llama`` /
``integrations/sdpa_attention``): a 4-D ``attention_mask`` is returned by
``create_causal_mask`` as-is, for every attention implementation. Eager attention *adds* it
to the scores, so a bool mask would silently add 0/1 instead of masking; SDPA hands it to
``torch.nn.functional.scaled_dot_product_attention``, which reads a bool mask as "may attend"
and a float mask as additive, documented as having the query's dtype (the CPU kernel in
torch 2.13 tolerates fp32 with a bf16 model; eager then promotes the scores to fp32). A float
additive mask in the model's dtype is the one form both honour as intended, hence
:func:`additive_mask` and the cast in :meth:`LlaraModel.hidden`.

The FlagEmbedding variant (``LlaraObjective(variant="flagembedding")``)
------------------------------------------------------------------------

The code released with the paper (FlagOpen/FlagEmbedding, ``research/LLARA``, read at
commit 7ed43d67ec03) trains something other than eq. 6. What it does, file by file:

* ``pretrain/run.py``: adds ``<s1>`` ... ``<s16>`` to the tokenizer as additional special
  tokens (only those not yet in the vocabulary), ``model.resize_token_embeddings(len(tokenizer))``,
  saves the tokenizer with the checkpoint; left padding, pad = unk.
* ``pretrain/data.py``: one row is ``tok('"')`` (BOS + quote) + text ids (no special tokens,
  cut so the row fits ``cutoff_len``) + ``tok('", summarize the above passage within eight
  words: <s1>...<s8>')`` + ``tok('", predict the following passage within eight words:
  <s9>...<s16>')`` (suffixes without special tokens); no ``</s>``. ``labels`` are the text
  ids at the text positions, -100 elsewhere. The BoW targets are two more strings of the
  data file, ``output_summarize`` (the input text again, in the released toy data) and
  ``output_predict`` (the next passage), each re-tokenised with truncation at
  ``cutoff_len``; ``remove_stop_words`` optionally strips NLTK stop words and punctuation
  from them first.
* ``pretrain/modeling.py`` (``NewLlamaModel.forward``): the predict suffix gets the position
  ids of the first tokens of the summarize suffix (restart), and its rows of the causal
  mask are blocked from the summarize suffix: the same joint pass as here. Suffix lengths
  (19 and 18) are hard-coded from Llama-2 token ids. (``PreLlamaModel.forward``): logits =
  ``lm_head`` over *every* position; ``ar_loss`` = the shifted next-token cross-entropy over
  the labels (mean over the batch's text tokens); the logits at the 8 positions of
  ``<s1..s8>`` (resp. ``<s9..s16>``) are **max-pooled over the positions**, log-softmaxed,
  and each example scores ``-mean log p`` over the distinct target ids > 2 (Llama's
  unk/bos/eos dropped), averaged over examples with a non-empty target, then **divided by
  10**; the two BoW losses are averaged (or one alone if the other is 0);
  ``loss = ar_loss + bow``, i.e. ``LM + 0.05 * (BoW_ebae + BoW_ebar)``. The vocabulary
  projection is the LM head itself.
* ``README.md`` and ``finetune/modeling.py``/``finetune/data.py`` (inference): passages are
  ``<s>"`` + text + the summarize suffix, queries the same with the predict suffix, left
  padded, no ``</s>``; the embedding is the **mean of the last hidden states of the last 8
  positions** (the summary tokens), L2-normalised.

Where that differs from the paper: 8 learnt summary tokens per prompt instead of one
``</s>``, other prompt wording and a quoted text; max-pooled logits of 8 states instead of
the logits of one; an extra LM term with the BoW terms scaled by 1/20; and an embedding at
inference that is a mean of hidden states, not the state the BoW head was trained on.

This module implements it in the same joint pass: ``[head] PREFIX text SELF NEXT`` where
PREFIX = ``text_prefix`` ('"'), SELF = ``ebae_prompt + "<s1>...<sK>"`` and NEXT =
``ebar_prompt + "<sK+1>...<s2K>"`` (each prompt plus its tokens tokenised as one string, as
the release does; K = ``summary_tokens``), NEXT positions restarting at SELF. Loss =
``ebae_weight * BoW(max_k logits) + ebar_weight * BoW(...) + lm_weight * LM(text)`` with the
release's defaults 0.05, 0.05, 1 and the LM head as projection (``head="tie"`` in
:class:`llmret.llara.pretraining.PretrainSpec`). Deliberate deviations: BoW targets are the
stored (truncated) text and next-text ids, as for the paper variant, with no stop-word
removal (shards hold ids, not words); a task whose targets are all empty adds 0 instead of
taking the whole BoW weight; right padding with positions from 0 (the release counts left
padding in its positions; RoPE only sees differences); special and pad ids, not ids <= 2,
are kept out of the bags; embeddings are only ever grown (a padded vocabulary is not cut
to ``len(tokenizer)``) and new rows start as transformers v5 initialises them (drawn from
the old rows' mean and covariance), not as 4.41 did. Inference: :func:`encoder_settings` gives the dense-system
settings (templates with the summary tokens, ``append_eos: false``, pooling
``mean_last_K``), and :func:`llmret.llara.modeling.save_llara` writes them into ``llara.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from llmret.retrieval.masks import additive_mask
from llmret.retrieval.tokenization import special_frame

EBAE_PROMPT = " The original sentence:"
EBAR_PROMPT = " The next sentence:"
# The released code's suffixes (research/LLARA/pretrain/data.py), less their summary tokens.
FLAG_EBAE_PROMPT = '", summarize the above passage within eight words: '
FLAG_EBAR_PROMPT = '", predict the following passage within eight words: '
FLAG_TEXT_PREFIX = '"'

# Segment labels of a joint row; used to build the mask and exposed for inspection.
PAD, TEXT, SELF, NEXT = -1, 0, 1, 2
IGNORE = -100  # label of positions outside the LM term (the value HF losses skip)

HEAD_MODES = ("copy", "tie")

# What a field left at None becomes, per variant. The FlagEmbedding values are those of the
# released code: each BoW loss / 10, the two averaged (0.05 each), LM term weight 1.
VARIANTS: dict[str, dict[str, str | float]] = {
    "paper": {
        "ebae_prompt": EBAE_PROMPT,
        "ebar_prompt": EBAR_PROMPT,
        "text_prefix": "",
        "ebae_weight": 1.0,
        "ebar_weight": 1.0,
        "lm_weight": 0.0,
    },
    "flagembedding": {
        "ebae_prompt": FLAG_EBAE_PROMPT,
        "ebar_prompt": FLAG_EBAR_PROMPT,
        "text_prefix": FLAG_TEXT_PREFIX,
        "ebae_weight": 0.05,
        "ebar_weight": 0.05,
        "lm_weight": 1.0,
    },
}


@dataclass(frozen=True)
class LlaraObjective:
    """Prompts and lengths of the LLaRA objective; every field changes what is learnt.

    ``max_text_length`` caps the tokens of the text *and* of the next text (the EBAR
    target): prompts, frame tokens and EOS are always kept, as in the encoder.

    ``variant`` is ``"paper"`` (eq. 6, one ``</s>`` per prompt) or ``"flagembedding"`` (the
    released code: ``summary_tokens`` special tokens per prompt, max-pooled logits, an LM
    term; see the module docstring). Fields left at None take the variant's value from
    :data:`VARIANTS`, so one switch gives either recipe; ``summary_tokens`` only matters
    for ``"flagembedding"``.
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
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {self.variant!r}")
        for name, value in VARIANTS[self.variant].items():
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
        if self.variant == "paper" and self.lm_weight > 0:
            raise ValueError("the paper's objective has no LM term: lm_weight needs variant='flagembedding'")

    @property
    def flag(self) -> bool:
        return self.variant == "flagembedding"

    def summary_names(self) -> tuple[list[str], list[str]]:
        """Summary tokens of the EBAE and EBAR prompts: ``<s1>..<sK>`` and ``<sK+1>..<s2K>``
        (the released names for K = 8); empty for the paper variant."""
        if not self.flag:
            return [], []
        k = self.summary_tokens
        return [f"<s{i}>" for i in range(1, k + 1)], [f"<s{i}>" for i in range(k + 1, 2 * k + 1)]


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
    ebae, ebar = objective.summary_names()
    return {
        "query_template": objective.text_prefix + "{text}" + objective.ebar_prompt + "".join(ebar),
        "passage_template": objective.text_prefix + "{text}" + objective.ebae_prompt + "".join(ebae),
        "append_eos": not objective.flag,
        "pooling": f"mean_last_{objective.summary_tokens}" if objective.flag else "last",
    }


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
    # flagembedding only: positions of the summary tokens of SELF / NEXT, and LM labels
    # (the text ids at the text positions, IGNORE elsewhere, unshifted as HF's ``labels``).
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


def _segment(tokenizer, prompt: str, names: list[str], tail: list[int], eos: int) -> tuple[list[int], list[int]]:
    """(ids of one prompt segment, offsets of its summary tokens in it).

    paper: prompt + frame tail + ``</s>``. flagembedding: ``prompt + "<s1>..<sK>"`` tokenised
    as one string (as the release and the encoder's template do), no ``</s>``; each summary
    token must come out as its own id, in order.
    """
    if not names:
        return tokenizer(prompt, add_special_tokens=False)["input_ids"] + tail + [eos], []
    if tail:  # the encoder would put the tail after the summary tokens; mean_last_K would read it
        raise ValueError(f"{type(tokenizer).__name__} appends {tail} after a text; flagembedding needs none")
    ids = tokenizer(prompt + "".join(names), add_special_tokens=False)["input_ids"]
    want = tokenizer.convert_tokens_to_ids(names)
    summary = set(want)
    where = [i for i, t in enumerate(ids) if t in summary]
    if [ids[i] for i in where] != want or where != list(range(len(ids) - len(want), len(ids))):
        raise ValueError(f"summary tokens {names[0]}..{names[-1]} are not single trailing ids; call add_summary_tokens")
    return ids, where


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
    labelled TEXT (it is shared by both prompts). flagembedding rows also get the summary
    positions and the LM labels.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos token; LLaRA pools at </s>")
    head, tail = special_frame(tokenizer)
    if objective.text_prefix:
        head = head + tokenizer(objective.text_prefix, add_special_tokens=False)["input_ids"]
    ebae_names, ebar_names = objective.summary_names()
    ebae, ebae_at = _segment(tokenizer, objective.ebae_prompt, ebae_names, tail, eos)
    ebar, ebar_at = _segment(tokenizer, objective.ebar_prompt, ebar_names, tail, eos)
    text_ids = [t[: objective.max_text_length] for t in _ids(tokenizer, texts)]

    rows = [head + t + ebae + ebar for t in text_ids]
    B, L = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((B, L), _pad_id(tokenizer), dtype=torch.long)
    segments = torch.full((B, L), PAD, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    ebae_index = torch.empty(B, dtype=torch.long)
    ebar_index = torch.empty(B, dtype=torch.long)
    flag = objective.flag
    ebae_summary = torch.empty((B, len(ebae_at)), dtype=torch.long) if flag else None
    ebar_summary = torch.empty((B, len(ebar_at)), dtype=torch.long) if flag else None
    lm_labels = torch.full((B, L), IGNORE, dtype=torch.long) if flag else None
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
        if flag:
            ebae_summary[b] = n + torch.tensor(ebae_at)
            ebar_summary[b] = n + s + torch.tensor(ebar_at)
            lm_labels[b, len(head) : n] = torch.tensor(t, dtype=torch.long)
    return JointBatch(
        input_ids=input_ids,
        attention_mask=additive_mask(joint_allowed(segments), dtype),
        position_ids=position_ids,
        ebae_index=ebae_index,
        ebar_index=ebar_index,
        segments=segments,
        text_ids=text_ids,
        ebae_summary=ebae_summary,
        ebar_summary=ebar_summary,
        lm_labels=lm_labels,
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

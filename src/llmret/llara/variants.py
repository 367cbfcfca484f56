"""The variants of LLaRA's objective as classes: the paper's eq. 6 (:class:`Paper`) and the
code released with it (:class:`FlagEmbedding`, ``variant: flagembedding``). Each owns all
that differs between them: the defaults of the objective's unset fields, the projection head,
the prompt segments and the extra batch fields, the pooling and the losses of the model, the
dense-system settings a model it trained needs, and which settings are rerun keys. The rest
of ``llmret.llara`` asks the variant (``LlaraObjective.kind``) and never tests its name.

:data:`VARIANTS` maps the ``variant`` setting to its class; :func:`variant_class` resolves it.
This module imports no other ``llmret.llara`` module (objective, modeling and pretraining
import it), so the variants take the objective and the batch as they come.

Design notes (the release read file by file, deviations): docs/llara.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

EBAE_PROMPT = " The original sentence:"
EBAR_PROMPT = " The next sentence:"
# The released code's suffixes (research/LLARA/pretrain/data.py), less their summary tokens.
FLAG_EBAE_PROMPT = '", summarize the above passage within eight words: '
FLAG_EBAR_PROMPT = '", predict the following passage within eight words: '
FLAG_TEXT_PREFIX = '"'

IGNORE = -100  # label of positions outside the LM term (the value HF losses skip)

# The objective's settings beyond the paper's first ones: a variant may leave them out of
# its rerun keys (see Paper.rerun_settings).
OBJECTIVE_SETTINGS = ("variant", "text_prefix", "summary_tokens", "lm_weight", "ebae_weight", "ebar_weight")
# Those the paper's objective had no setting for before variants existed (summary_tokens has
# no effect on it, and variant is "paper").
PAPER_LATER_SETTINGS = ("text_prefix", "lm_weight", "ebae_weight", "ebar_weight")


# --------------------------------------------------------------------------- shared pieces


def embeddings_from_hidden(hidden: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(EBAE, EBAR) embeddings, each (B, H): final hidden states at the two </s> tokens
    (``batch.ebae_index`` / ``batch.ebar_index`` of a :class:`llmret.llara.objective.JointBatch`)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, batch.ebae_index.to(hidden.device)], hidden[rows, batch.ebar_index.to(hidden.device)]


def summary_states(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, K, H): the hidden states at each row's K summary positions ``index`` (B, K)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    return hidden[rows, index.to(hidden.device)]


def summary_logits(hidden: torch.Tensor, index: torch.Tensor, projection: nn.Module) -> torch.Tensor:
    """(B, V): vocabulary logits of the summary positions, max-pooled over the positions
    (released ``modeling.py``: ``torch.max(logits[:, -8:, :], dim=1)``); only K states per
    row are projected, never the whole sequence."""
    return projection(summary_states(hidden, index)).amax(dim=1)


def lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """Next-token cross-entropy, as HF computes it from ``labels=``: position p predicts
    ``labels[p + 1]``, IGNORE labels are skipped, the mean is over the batch's tokens.

    Only the positions that predict a label are projected to the vocabulary.
    """
    target = labels[:, 1:].to(hidden.device)
    keep = target != IGNORE
    if not keep.any():
        return hidden.sum() * 0.0  # keeps the graph alive for backward
    logits = lm_head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, target[keep])


# --------------------------------------------------------------------------- the variants


class LlaraVariant:
    """What a variant of the objective decides. Stateless: the objective is an argument."""

    name: ClassVar[str]
    # What a field of LlaraObjective left at None becomes.
    defaults: ClassVar[dict[str, str | float]]
    # The vocabulary projection when ``head`` is unset (PretrainSpec).
    default_head: ClassVar[str]
    # Whether a dense system appends ``</s>`` to a text (encoder_settings).
    append_eos: ClassVar[bool]

    def check(self, objective) -> None:
        """Refuse settings this variant cannot train (after the shared checks)."""

    def summary_names(self, objective) -> tuple[list[str], list[str]]:
        """Special tokens closing the EBAE and EBAR prompts (none by default)."""
        return [], []

    def segment(
        self, tokenizer, prompt: str, names: list[str], tail: list[int], eos: int
    ) -> tuple[list[int], list[int]]:
        """(ids of one prompt segment, offsets of its summary tokens in it)."""
        raise NotImplementedError

    def batch_fields(
        self, length: int, spans: Sequence[tuple[int, int, int]], text_ids: Sequence[Sequence[int]], ebae_at, ebar_at
    ) -> dict[str, torch.Tensor]:
        """JointBatch fields beyond the shared ones; ``spans`` holds per row (text start, text
        end = SELF start, SELF length), ``length`` the padded row length."""
        return {}

    def check_batch(self, batch) -> None:
        """Refuse a batch built for another variant."""

    def embeddings(self, hidden: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(EBAE, EBAR) embeddings, each (B, H), from the final hidden states."""
        raise NotImplementedError

    def bow_logits(
        self, hidden: torch.Tensor, batch, embeddings: tuple[torch.Tensor, torch.Tensor], projection: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V) vocabulary logits of the EBAE and EBAR bag-of-words terms."""
        raise NotImplementedError

    def extra_losses(
        self, objective, hidden: torch.Tensor, batch, lm: nn.Module
    ) -> dict[str, tuple[float, torch.Tensor]]:
        """Loss terms beyond the two BoW ones: name -> (weight, value)."""
        return {}

    def encoder_settings(self, objective) -> dict[str, str | bool]:
        """The dense-system settings that feed and pool text as this objective trained: EBAR
        prompt for queries, EBAE prompt for passages (as in the paper and the release)."""
        ebae, ebar = self.summary_names(objective)
        return {
            "query_template": objective.text_prefix + "{text}" + objective.ebar_prompt + "".join(ebar),
            "passage_template": objective.text_prefix + "{text}" + objective.ebae_prompt + "".join(ebae),
            "append_eos": self.append_eos,
            "pooling": self.pooling(objective),
        }

    def pooling(self, objective) -> str:
        """The dense system's pooling (encoder_settings)."""
        raise NotImplementedError

    def required_encoder_settings(self, objective) -> dict[str, str | bool]:
        """The encoder settings a dense system on a model this objective trained must use
        (the config check refuses others); none by default."""
        return {}

    def rerun_settings(self, objective) -> dict:
        """The objective's settings a pretraining run's params carry beyond the first ones
        (shards, seed, lengths, prompts, head): every one of :data:`OBJECTIVE_SETTINGS`."""
        return {k: getattr(objective, k) for k in OBJECTIVE_SETTINGS}


class Paper(LlaraVariant):
    """Eq. 6: each prompt closed by ``</s>``, the embedding the state there, both BoW terms
    on its logits with weight 1, a separate projection (``head: copy``), no LM term. A dense
    system reads ``{text}`` + prompt, ``</s>`` appended, the last token's state."""

    name = "paper"
    defaults = {
        "ebae_prompt": EBAE_PROMPT,
        "ebar_prompt": EBAR_PROMPT,
        "text_prefix": "",
        "ebae_weight": 1.0,
        "ebar_weight": 1.0,
        "lm_weight": 0.0,
    }
    default_head = "copy"
    append_eos = True

    def check(self, objective) -> None:
        if objective.lm_weight > 0:
            raise ValueError("the paper's objective has no LM term: lm_weight needs variant='flagembedding'")

    def segment(
        self, tokenizer, prompt: str, names: list[str], tail: list[int], eos: int
    ) -> tuple[list[int], list[int]]:
        """prompt + frame tail + ``</s>``."""
        return tokenizer(prompt, add_special_tokens=False)["input_ids"] + tail + [eos], []

    def check_batch(self, batch) -> None:
        if batch.ebae_summary is not None:
            raise ValueError(f"the batch was not built for the {self.name!r} variant")

    def embeddings(self, hidden: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return embeddings_from_hidden(hidden, batch)

    def bow_logits(self, hidden, batch, embeddings, projection):
        return projection(embeddings[0]), projection(embeddings[1])

    def pooling(self, objective) -> str:
        return "last"

    def rerun_settings(self, objective) -> dict:
        """None while the objective is the paper's as it was before variants existed (the
        params of a paper run then had no such key), so its cached shards and checkpoints
        stay valid; all of them once one differs."""
        if all(getattr(objective, k) == self.defaults[k] for k in PAPER_LATER_SETTINGS):
            return {}
        return super().rerun_settings(objective)


class FlagEmbedding(LlaraVariant):
    """The released code (FlagOpen/FlagEmbedding ``research/LLARA``): ``summary_tokens``
    special tokens per prompt instead of ``</s>``, a quoted text, BoW terms on the logits of
    the summary states max-pooled (each weighted 0.05), an LM term over the text (weight 1),
    the LM head as projection (``head: tie``). A dense system must read prefix + ``{text}`` +
    prompt + summary tokens, no ``</s>``, and pool the mean of the last K states."""

    name = "flagembedding"
    defaults = {
        "ebae_prompt": FLAG_EBAE_PROMPT,
        "ebar_prompt": FLAG_EBAR_PROMPT,
        "text_prefix": FLAG_TEXT_PREFIX,
        "ebae_weight": 0.05,
        "ebar_weight": 0.05,
        "lm_weight": 1.0,
    }
    default_head = "tie"
    append_eos = False

    def summary_names(self, objective) -> tuple[list[str], list[str]]:
        """``<s1>..<sK>`` and ``<sK+1>..<s2K>`` (the released names for K = 8)."""
        k = objective.summary_tokens
        return [f"<s{i}>" for i in range(1, k + 1)], [f"<s{i}>" for i in range(k + 1, 2 * k + 1)]

    def segment(
        self, tokenizer, prompt: str, names: list[str], tail: list[int], eos: int
    ) -> tuple[list[int], list[int]]:
        """``prompt + "<s1>..<sK>"`` tokenised as one string (as the release and the encoder's
        template do), no ``</s>``; each summary token must come out as its own id, in order."""
        if tail:  # the encoder would put the tail after the summary tokens; mean_last_K would read it
            raise ValueError(f"{type(tokenizer).__name__} appends {tail} after a text; {self.name} needs none")
        ids = tokenizer(prompt + "".join(names), add_special_tokens=False)["input_ids"]
        want = tokenizer.convert_tokens_to_ids(names)
        summary = set(want)
        where = [i for i, t in enumerate(ids) if t in summary]
        if [ids[i] for i in where] != want or where != list(range(len(ids) - len(want), len(ids))):
            raise ValueError(
                f"summary tokens {names[0]}..{names[-1]} are not single trailing ids; call add_summary_tokens"
            )
        return ids, where

    def batch_fields(self, length, spans, text_ids, ebae_at, ebar_at) -> dict[str, torch.Tensor]:
        """The positions of the summary tokens of SELF / NEXT, and LM labels (the text ids at
        the text positions, IGNORE elsewhere, unshifted as HF's ``labels``)."""
        B = len(spans)
        ebae_summary = torch.empty((B, len(ebae_at)), dtype=torch.long)
        ebar_summary = torch.empty((B, len(ebar_at)), dtype=torch.long)
        lm_labels = torch.full((B, length), IGNORE, dtype=torch.long)
        for b, ((start, n, s), t) in enumerate(zip(spans, text_ids, strict=True)):
            ebae_summary[b] = n + torch.tensor(ebae_at)
            ebar_summary[b] = n + s + torch.tensor(ebar_at)
            lm_labels[b, start:n] = torch.tensor(t, dtype=torch.long)
        return {"ebae_summary": ebae_summary, "ebar_summary": ebar_summary, "lm_labels": lm_labels}

    def check_batch(self, batch) -> None:
        if batch.ebae_summary is None or batch.ebar_summary is None:
            raise ValueError(f"the batch was not built for the {self.name!r} variant")

    def embeddings(self, hidden: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean of the summary states, what the encoder pools at inference."""
        return summary_states(hidden, batch.ebae_summary).mean(1), summary_states(hidden, batch.ebar_summary).mean(1)

    def bow_logits(self, hidden, batch, embeddings, projection):
        return summary_logits(hidden, batch.ebae_summary, projection), summary_logits(
            hidden, batch.ebar_summary, projection
        )

    def extra_losses(self, objective, hidden, batch, lm):
        """The LM term over the text, always with the LM head itself."""
        return {"loss_lm": (objective.lm_weight, lm_loss(hidden, batch.lm_labels, lm.get_output_embeddings()))}

    def pooling(self, objective) -> str:
        """The mean of the states of the last K tokens (the summary tokens; the release's
        inference pooling)."""
        return f"mean_last_{objective.summary_tokens}"

    def required_encoder_settings(self, objective) -> dict[str, str | bool]:
        """All of :meth:`encoder_settings`: the schema's defaults (last token, ``{text}``)
        would silently not pool the summary tokens."""
        return self.encoder_settings(objective)


VARIANTS: dict[str, type[LlaraVariant]] = {cls.name: cls for cls in (Paper, FlagEmbedding)}


def variant_class(name: str) -> type[LlaraVariant]:
    """The class of the ``variant`` setting ``name``."""
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {name!r}")
    return VARIANTS[name]

"""Framing texts for a model: the tokenizer's special-token frame, prompt template, text cut
to the max length (never the template or EOS) and EOS, shared by inference and training so a
model is fed exactly the ids it was trained on; token-budgeted, length-sorted batches.

Design notes: docs/retrieval.md.
"""

from __future__ import annotations

from collections.abc import Sequence

KINDS = ("query", "passage")


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """Ids the tokenizer puts before and after a text when it adds special tokens.

    transformers v5 tokenizers no longer expose ``build_inputs_with_special_tokens``, so
    the frame is read off a probe text instead.
    """
    probe = "hello"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    raise ValueError(f"cannot locate the text inside {type(tokenizer).__name__}'s special-token frame")


def frame_texts(
    tokenizer,
    texts: Sequence[str],
    template: str,
    max_length: int,
    append_eos: bool,
    head: Sequence[int] | None = None,
    tail: Sequence[int] | None = None,
    length_name: str = "max_length",
) -> list[list[int]]:
    """Token ids per text: frame head + prompt prefix + truncated text + prompt suffix + frame tail + EOS.

    One function for inference (:meth:`TextEncoder.tokenize`) and fine-tuning
    (:mod:`llmret.repllama.finetuning`), so a model is trained on exactly the ids it is later fed.
    ``head``/``tail`` default to :func:`special_frame` (pass them to avoid re-probing);
    ``length_name`` names the setting in the error raised when nothing is left for the text.
    """
    if template.count("{text}") != 1:
        raise ValueError(f"template must contain '{{text}}' exactly once: {template!r}")
    if head is None or tail is None:
        head, tail = special_frame(tokenizer)
    eos: list[int] = []
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"append_eos is set but {type(tokenizer).__name__} has no eos token")
        eos = [tokenizer.eos_token_id]
    before, after = template.split("{text}")
    pre = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
    post = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    fixed_head = list(head) + pre
    fixed_tail = post + list(tail) + eos
    budget = max_length - len(fixed_head) - len(fixed_tail)
    if budget < 1:
        raise ValueError(
            f"{length_name}={max_length} leaves no room for text after the template and special tokens "
            f"({len(fixed_head) + len(fixed_tail)} tokens)"
        )
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [fixed_head + t[:budget] + fixed_tail for t in ids]


def tokenize_kind(tokenizer, spec, texts: Sequence[str], kind: str, head=None, tail=None) -> list[list[int]]:
    """:func:`frame_texts` with the template and max length of ``kind`` (query or passage) from
    ``spec``: any settings object with ``query_template``, ``passage_template``,
    ``max_query_length``, ``max_passage_length`` and ``append_eos`` (an :class:`EncoderSpec`,
    or fine-tuning's ``ContrastiveSpec``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    query = kind == "query"
    return frame_texts(
        tokenizer,
        texts,
        template=spec.query_template if query else spec.passage_template,
        max_length=spec.max_query_length if query else spec.max_passage_length,
        append_eos=spec.append_eos,
        head=head,
        tail=tail,
        length_name=f"max_{kind}_length",
    )


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (SmolLM2/Llama have no pad token), else 0."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    return pad if pad is not None else (eos if eos is not None else 0)


def token_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest-first so each batch is padded to similar lengths.

    A batch grows until (rows x longest row) would pass ``batch_tokens``; this keeps memory
    flat while short queries travel in large batches. Shared by the dense and sparse encoders.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) + 1) * width > batch_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out

"""Framing texts for a model: the tokenizer's special-token frame, the prompt template filled
with the text (tokenised as one string when its prompt ends in whitespace), the text cut to
the max length (never the template or EOS) and EOS, shared by inference and training so a
model is fed exactly the ids it was trained on; token-budgeted, length-sorted batches.

Design notes: docs/retrieval.md.
"""

from __future__ import annotations

from collections.abc import Sequence

KINDS = ("query", "passage")
TEMPLATE_FIELDS = ("query_template", "passage_template", "template")


def tokenization_of(spec) -> str:
    """``"joint"`` when one of ``spec``'s templates puts a whitespace-ended prompt before the text: the ids that
    tokenising prompt and text as one string changed (``query: what`` was ``'Ġ' + 'what'``
    when they were tokenised apart); "" otherwise (a text first, as in ``{text} The next
    sentence:``, gave the same ids both ways). A job parameter, so that encodings and models
    made before the change are made again (a workdir from before it reruns every text-framing
    job once, as the parameter is new to all of them)."""
    templates = (getattr(spec, name) for name in TEMPLATE_FIELDS if isinstance(getattr(spec, name, None), str))
    return "joint" if any(joins_text(t.split("{text}")[0]) for t in templates) else ""


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
    """Token ids per text: frame head + the template filled with the text + frame tail + EOS,
    at most ``max_length`` ids, a long text cut so that the template and EOS stay whole.

    A template whose prompt ends in whitespace (:func:`joins_text`) is tokenised as one string,
    so the text's first word is the token it would be anywhere else (``query: what`` gives
    ``['query', ':', 'Ġwhat']``, not ``['query', ':', 'Ġ', 'what']``); other templates are
    tokenised in parts, as LLaRA's pretraining does. One function for inference
    (:meth:`TextEncoder.tokenize`) and training (fine-tuning, CSPLADE), so a model is trained
    on exactly the ids it is later fed.
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
    joint = joins_text(before)
    if joint:  # before is not empty
        prompt = tokenizer(before + after, add_special_tokens=False)["input_ids"]
    else:  # prompt and suffix tokenised apart from the text, as LLaRA's pretraining does
        pre = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
        post = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        prompt = pre + post
    frame = len(head) + len(tail) + len(eos)
    if max_length - frame - len(prompt) < 1:
        raise ValueError(
            f"{length_name}={max_length} leaves no room for text after the template and special tokens "
            f"({frame + len(prompt)} tokens)"
        )
    room = max_length - frame  # ids for the filled template
    if not joint:
        keep = room - len(prompt)
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        return [list(head) + pre + t[:keep] + post + list(tail) + eos for t in ids]
    filled = [before + t + after for t in texts]
    enc = tokenizer(filled, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True):
        if len(ids) > room:
            ids = _cut_text(tokenizer, before, text, after, ids, offsets, room)
        out.append(list(head) + ids + list(tail) + eos)
    return out


def joins_text(prefix: str) -> bool:
    """Whether a template's prompt before ``{text}`` is tokenised with the text: when it ends in
    whitespace, whose space belongs to the next word's token in these BPE vocabularies (``query:
    what`` -> ``Ġwhat``). A prompt ending in another character (FlagEmbedding LLaRA's ``"``) is
    tokenised apart from the text, as LLaRA's pretraining tokenises its texts alone."""
    return bool(prefix) and prefix[-1].isspace()


def _cut_text(tokenizer, before: str, text: str, after: str, ids, offsets, room: int) -> list[int]:
    """The ids of ``before + text[:cut] + after`` for the longest cut at a token boundary of
    the text that fits in ``room`` ids (the template is never cut)."""
    start = len(before)
    ends = [e - start for s, e in offsets if e > start and s < start + len(text)]  # text tokens' ends
    keep = len(ends) - (len(ids) - room)  # text tokens to keep, if the cut changes no other token
    while keep > 0:
        cut = min(ends[keep - 1], len(text))
        trial = tokenizer(before + text[:cut] + after, add_special_tokens=False)["input_ids"]
        if len(trial) <= room:
            return trial
        keep -= len(trial) - room  # merges at the new end took more ids: cut further
    return tokenizer(before + after, add_special_tokens=False)["input_ids"]


def tokenize_kind(tokenizer, spec, texts: Sequence[str], kind: str, head=None, tail=None) -> list[list[int]]:
    """:func:`frame_texts` with the template and max length of ``kind`` (query or passage) from
    ``spec``: any settings object with ``query_template``, ``passage_template``,
    ``max_query_length``, ``max_passage_length`` and ``append_eos`` (an :class:`EncoderSpec`,
    or fine-tuning's ``FinetuningSpec``)."""
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

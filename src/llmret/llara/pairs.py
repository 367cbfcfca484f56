"""(text, next text) pairs for LLaRA pretraining: BEIR documents cut in two at a sentence
boundary near the middle (corpus only, never queries or labels), and consecutive passages of
one article in DPR's Wikipedia.

Design notes: docs/llara.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import IO

from llmret.data import beir
from llmret.data.dpr import iter_dpr_passages

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)")


def split_pairs(text: str, min_words: int = 8, word_fallback: bool = True) -> tuple[str, str] | None:
    """Cut one document into (text, next text) for EBAR, deterministically.

    Rule: candidate cuts are sentence ends (``.``, ``!`` or ``?``, optional closing quotes or
    brackets, followed by whitespace). Among cuts leaving at least ``min_words`` whitespace
    words on each side, take the one whose word offset is closest to half the words (ties:
    the earlier cut). With no such cut and ``word_fallback``, cut after word ``n // 2``.
    Documents under ``2 * min_words`` words are too short: None. Abbreviations ("e.g. x")
    count as sentence ends; the cut only needs to be roughly in the middle.
    """
    if min_words < 1:
        raise ValueError(f"min_words must be >= 1, got {min_words}")
    text = text.strip()
    words = text.split()
    total = len(words)
    if total < 2 * min_words:
        return None
    best: tuple[float, int] | None = None  # (distance to the middle in words, char offset of the cut)
    for m in _SENTENCE_END.finditer(text):
        left = len(text[: m.end()].split())
        if min(left, total - left) < min_words:
            continue
        key = (abs(left - total / 2), m.end())
        if best is None or key < best:
            best = key
    if best is not None:
        cut = best[1]
        return text[:cut].strip(), text[cut:].strip()
    if not word_fallback:
        return None
    half = total // 2
    return " ".join(words[:half]), " ".join(words[half:])


@dataclass(frozen=True, slots=True)
class Pair:
    """One EBAR example: ``next_text`` follows ``text``. ``id`` is globally unique and decides the shard."""

    id: str
    text: str
    next_text: str


# --------------------------------------------------------------------------- pair sources


def _corpus_file(path: PathLike) -> Path:
    path = Path(path)
    return path / "corpus.jsonl" if path.is_dir() else path


def pairs_from_beir(corpus_paths: Sequence[PathLike], min_words: int = 8) -> Iterator[Pair]:
    """Every document of each BEIR corpus, cut in two by :func:`llara.split_pairs`.

    Only ``corpus.jsonl`` is read (streamed, validated as :func:`beir.load_corpus` does), never
    queries or qrels, so pretraining cannot see evaluation labels. The document is the
    title + text that retrieval indexes (:meth:`beir.Corpus.contents`). The corpus name is the
    folder holding ``corpus.jsonl`` (``results/data/{dataset}/corpus.jsonl``); pair ids are
    ``{corpus}:{doc_id}``. Documents too short to split are skipped.
    """
    files: dict[str, Path] = {}
    for p in corpus_paths:
        path = _corpus_file(p)
        name = path.parent.name
        if not name or ":" in name:
            raise ValueError(f"{path}: cannot name the corpus after its folder {name!r}")
        if name in files:
            raise ValueError(f"two corpora named {name!r} ({files[name]} and {path}): pair ids would collide")
        files[name] = path
    for name, path in files.items():
        for doc_id, title, text in beir.iter_corpus(path):
            content = beir.join_title(title, text)
            halves = split_pairs(content, min_words=min_words)
            if halves is not None:
                yield Pair(f"{name}:{doc_id}", halves[0], halves[1])


def pairs_from_dpr_wiki(source: PathLike | IO[bytes], max_passages: int | None = None) -> Iterator[Pair]:
    """Pairs (passage i, passage i+1) of each article in DPR's ``psgs_w100.tsv(.gz)``.

    Passages of one article are consecutive and share a title; a pair never crosses
    articles. Pair ids are ``dpr-wiki:{id of passage i}``. Reading as in
    :func:`iter_dpr_passages`.
    """
    prev: tuple[str, str, str] | None = None  # (id, text, title) of the last passage
    for _, pid, text, title in iter_dpr_passages(source, max_passages):
        if prev is not None and prev[2] == title and prev[1] and text:
            yield Pair(f"dpr-wiki:{prev[0]}", prev[1], text)
        prev = (pid, text, title)

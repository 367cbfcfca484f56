"""Bag-of-words sparse vectors over a model's tokenizer: the lexical reference a CSPLADE row
is read against (same tokenizer, prompts and lengths; no model).

A passage is its token counts, weighted ``1 + log(tf)``; a query is the set of its tokens
(or their counts). The inverse document frequency, ``log(1 + (N - df + 0.5) / (df + 0.5))``
as BM25's, needs the whole corpus, while a corpus is encoded in shards: so it is applied to
the query at search time (:func:`weight_queries`), which gives exactly the scores of tf-idf
passages against binary queries. These choices are this project's (measured on full SciFact
with SmolLM2's tokenizer: docs/csplade.md), not a paper's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

from llmret.retrieval.encoder import EncodeStats, check_templates_and_lengths
from llmret.retrieval.tokenization import KINDS, frame_texts
from llmret.specs import check_choice, settings

DOC_TF = ("log", "raw")
QUERY_TF = ("binary", "raw")
IDF = ("bm25", "none")


@dataclass(frozen=True)
class BowSpec:
    """How a ``bow`` system turns text into a vocabulary-sized vector; every field is part of
    the cache key. Templates and lengths frame and cut text exactly as a sparse system's."""

    query_template: str = "query: {text}"
    passage_template: str = "passage: {text}"
    max_query_length: int = 32
    max_passage_length: int = 256
    doc_tf: str = "log"  # log: 1 + log(count); raw: count
    query_tf: str = "binary"  # binary: 1 per distinct token; raw: count
    idf: str = "bm25"  # bm25: applied to the query at search time; none

    def __post_init__(self) -> None:
        check_templates_and_lengths(self)
        check_choice(self, DOC_TF, "doc_tf")
        check_choice(self, QUERY_TF, "query_tf")
        check_choice(self, IDF, "idf")

    @classmethod
    def from_config(cls, cfg: dict) -> BowSpec:
        return settings(cls, cfg, "bag-of-words settings")

    def to_dict(self) -> dict:
        return asdict(self)


def encode_bow(tokenizer, texts: Sequence[str], kind: str, spec: BowSpec) -> sp.csr_matrix:
    """(len(texts), vocabulary) float32 CSR of token weights: the prompt and the text cut to
    the kind's length as a sparse system cuts them, without special tokens or EOS (they
    would match every document)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    query = kind == "query"
    ids = frame_texts(
        tokenizer,
        texts,
        template=spec.query_template if query else spec.passage_template,
        max_length=spec.max_query_length if query else spec.max_passage_length,
        append_eos=False,
        head=[],
        tail=[],
        length_name=f"max_{kind}_length",
    )
    rows = np.repeat(np.arange(len(ids)), [len(x) for x in ids])
    cols = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=len(rows))
    counts = sp.csr_matrix(
        (np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(ids), len(tokenizer)), dtype=np.float32
    )
    counts.sum_duplicates()
    tf = spec.doc_tf if kind == "passage" else spec.query_tf
    if tf == "log":
        counts.data = 1 + np.log(counts.data)
    elif tf == "binary":
        counts.data[:] = 1
    return counts


def timed_encode_bow(tokenizer, texts: Sequence[str], kind: str, spec: BowSpec) -> tuple[sp.csr_matrix, dict]:
    """:func:`encode_bow` and the figures an encode job records (no weights, the CPU)."""
    start = time.perf_counter()
    vectors = encode_bow(tokenizer, texts, kind, spec)
    return vectors, EncodeStats.measured(len(texts), time.perf_counter() - start, "bow", 0, "cpu").to_dict()


def document_frequencies(shards: Sequence[sp.csr_matrix], vocab_size: int) -> tuple[np.ndarray, int]:
    """(df per term, number of documents) over a corpus's shards."""
    df = np.zeros(vocab_size, dtype=np.int64)
    n = 0
    for m in shards:
        df += np.bincount(m.indices, minlength=vocab_size)[:vocab_size]
        n += m.shape[0]
    return df, n


def bm25_idf(df: np.ndarray, n: int) -> np.ndarray:
    return np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)


def weight_queries(queries: sp.csr_matrix, idf: np.ndarray) -> sp.csr_matrix:
    """Query weights times the corpus's idf."""
    out = queries.tocsr(copy=True)
    out.data = out.data * idf[out.indices]
    out.eliminate_zeros()
    return out

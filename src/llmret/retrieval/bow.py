"""Bag-of-words sparse vectors over a model's tokenizer: the lexical reference a CSPLADE row
is read against (same tokenizer, prompts and lengths; no model).

A passage is its token counts, weighted ``1 + log(tf)``; a query is the set of its tokens
(or their counts). The inverse document frequency, ``log(1 + (N - df + 0.5) / (df + 0.5))``
as BM25's, needs the whole corpus, while a corpus is encoded in shards: so it is applied to
the query at search time (:func:`weight_queries`), which gives exactly the scores of tf-idf
passages against binary queries. These choices are this project's (measured on full SciFact
with SmolLM2's tokenizer: docs/csplade.md), not a paper's.

What a ``bow`` system does differently from the other sparse type (``sparse``: CSPLADE's
learned vectors) in encode and search jobs is :class:`BowSystem`'s, against
:class:`SparseSystem`; :func:`sparse_system` picks the class from the system type, so the
jobs never test the type.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import scipy.sparse as sp

from llmret import launch, schema
from llmret.retrieval.encoder import EncodeStats, device_for, timed_encode
from llmret.retrieval.sparse_encoder import SparseEncoderSpec, encode_sparse, load_sparse_encoder
from llmret.retrieval.text_framing import check_templates
from llmret.retrieval.tokenization import KINDS, frame_texts
from llmret.specs import settings


@dataclass(frozen=True)
@schema.defaults_from("systems.bow")
class BowSpec:
    """How a ``bow`` system turns text into a vocabulary-sized vector; every field is part of
    the cache key. Templates and lengths frame and cut text exactly as a sparse system's."""

    query_template: str
    passage_template: str
    max_query_length: int
    max_passage_length: int
    doc_tf: str  # log: 1 + log(count); raw: count
    query_tf: str  # binary: 1 per distinct token; raw: count
    idf: str  # bm25: applied to the query at search time; none

    def __post_init__(self) -> None:
        check_templates(self)  # no append_eos (bags hold no EOS), so not a TextFraming
        schema.check_bounds(self, "systems.bow")

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


# --------------------------------------------------------------------------- sparse system types


class SparseSystem:
    """A ``sparse`` system (CSPLADE): a causal LM's SPLADE vectors on ``device_for(gpus)``,
    queries searched as they were encoded. The base of the sparse system types; a type that
    differs overrides what it does differently (:class:`BowSystem`)."""

    type: ClassVar[str] = "sparse"
    spec_class: ClassVar[type] = SparseEncoderSpec
    # Whether a search job reads the corpus's vectors (:meth:`weigh_queries`' ``corpus``).
    search_reads_corpus: ClassVar[bool] = False

    def __init__(self, settings: Mapping):
        """``settings``: the system's settings as a job's params carry them (its ``model``
        arrives as the job's input and is dropped here)."""
        self.spec = self.spec_class.from_config({k: v for k, v in settings.items() if k != "model"})

    def encode(
        self, model_dir: str, tokenizer, texts: Sequence[str], kind: str, gpus: int
    ) -> tuple[sp.csr_matrix, dict]:
        """(vectors, the figures an encode job records) of ``texts`` as ``kind`` ("query" or
        "passage"); claims free GPUs first outside Slurm (:func:`llmret.launch.visible_devices`)."""
        with launch.visible_devices(gpus):
            device = device_for(gpus)
            model = load_sparse_encoder(model_dir, self.spec, device)
            vectors, stats = timed_encode(
                lambda: encode_sparse(model, tokenizer, texts, kind, self.spec), len(texts), self.spec, model, device
            )
        return vectors, stats.to_dict()

    def weigh_queries(self, queries: sp.csr_matrix, corpus: Iterable[sp.csr_matrix]) -> sp.csr_matrix:
        """The query vectors a search scores the index with; ``corpus`` (the corpus shards'
        vectors, read lazily: pass a generator) is only read by a type that needs it."""
        return queries


class BowSystem(SparseSystem):
    """A ``bow`` system: token weights over the model's tokenizer, no network (the CPU);
    with ``idf: bm25`` a search weighs each query by the corpus's idf (:func:`weight_queries`)."""

    type = "bow"
    spec_class = BowSpec
    search_reads_corpus = True

    def encode(
        self, model_dir: str, tokenizer, texts: Sequence[str], kind: str, gpus: int
    ) -> tuple[sp.csr_matrix, dict]:
        return timed_encode_bow(tokenizer, texts, kind, self.spec)

    def weigh_queries(self, queries: sp.csr_matrix, corpus: Iterable[sp.csr_matrix]) -> sp.csr_matrix:
        if self.spec.idf == "none":
            return queries
        df, n = document_frequencies(corpus, queries.shape[1])
        return weight_queries(queries, bm25_idf(df, n))


SPARSE_SYSTEM_TYPES: dict[str, type[SparseSystem]] = {cls.type: cls for cls in (SparseSystem, BowSystem)}


def sparse_system(system_type: str, settings: Mapping) -> SparseSystem:
    """The sparse system of type ``system_type`` (``systems.<name>.type``) with ``settings``."""
    if system_type not in SPARSE_SYSTEM_TYPES:
        raise ValueError(f"{system_type!r} is not a sparse system type ({sorted(SPARSE_SYSTEM_TYPES)})")
    return SPARSE_SYSTEM_TYPES[system_type](settings)

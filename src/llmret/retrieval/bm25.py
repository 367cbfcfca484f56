"""BM25 that reproduces Pyserini's "BM25 flat" BEIR baselines on top of bm25s: Lucene's
BM25 scoring with one-byte norms, query-term counting and tie-breaking by document id
(the analysis lives in :mod:`llmret.retrieval.analysis`).

Design notes: docs/retrieval.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llmret import schema
from llmret.retrieval.analysis import LuceneAnalyzer, make_stemmer
from llmret.specs import settings

__all__ = [
    "PARAMS_FORMAT_VERSION",
    "BM25Index",
    "BM25Params",
    "byte4_to_int",
    "int_to_byte4",
]

#: Bumped whenever analysis or scoring changes in a way that invalidates saved indexes.
PARAMS_FORMAT_VERSION = 1
_PARAMS_FILE = "llmret_bm25.json"
_DOC_IDS_FILE = "llmret_doc_ids.json"


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
@schema.defaults_from("systems.bm25")
class BM25Params:
    """Everything that determines BM25 scores, recorded with every index and run.

    ``norms="lucene"`` stores document lengths as Lucene's one-byte norms (only
    defined for ``method="lucene"``); ``norms="exact"`` lets bm25s build the index
    with exact lengths (any bm25s ``method``; bm25s counts every document, even
    one with no terms, in N and avgdl).
    """

    k1: float
    b: float
    # "porter" (Lucene's), "snowball-porter", any other PyStemmer algorithm, or "none"
    stemmer: str
    stopwords: str  # "lucene" or "none"
    method: str  # bm25s scoring variant
    norms: str  # "lucene" (1-byte SmallFloat norms) or "exact"

    def __post_init__(self) -> None:
        schema.check_bounds(self, "systems.bm25")
        if self.norms == "lucene" and self.method != "lucene":
            raise ValueError("norms='lucene' is only defined for method='lucene'; use norms='exact'")
        make_stemmer(self.stemmer)  # fail early on unknown stemmer names

    def to_dict(self) -> dict:
        """Plain dict (JSON-ready) for TREC run headers and index metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> BM25Params:
        """Inverse of :meth:`to_dict`; unknown keys are an error so stale files are noticed."""
        return settings(cls, d, "BM25Params keys")


# --------------------------------------------------------------------------------------
# Lucene norms (SmallFloat)
# --------------------------------------------------------------------------------------


def _long_to_int4(i: int) -> int:
    if i < 0:
        raise ValueError(f"only non-negative values, got {i}")
    num_bits = i.bit_length()
    if num_bits < 4:
        return i  # subnormal
    shift = num_bits - 4
    encoded = (i >> shift) & 0x07  # keep 4 significant bits, the top one implicit
    return encoded | ((shift + 1) << 3)


def _int4_to_long(i: int) -> int:
    bits = i & 0x07
    shift = (i >> 3) - 1
    return bits if shift == -1 else (bits | 0x08) << shift


_NUM_FREE_VALUES = 255 - _long_to_int4(2**31 - 1)  # = 24


def int_to_byte4(i: int) -> int:
    """Lucene ``SmallFloat.intToByte4`` as an unsigned byte 0..255 (lossy above 39)."""
    if i < 0:
        raise ValueError(f"only non-negative values, got {i}")
    if i < _NUM_FREE_VALUES:
        return i
    return _NUM_FREE_VALUES + _long_to_int4(i - _NUM_FREE_VALUES)


def byte4_to_int(b: int) -> int:
    """Lucene ``SmallFloat.byte4ToInt`` for an unsigned byte 0..255."""
    if not 0 <= b <= 255:
        raise ValueError(f"byte out of range: {b}")
    if b < _NUM_FREE_VALUES:
        return b
    return _NUM_FREE_VALUES + _int4_to_long(b - _NUM_FREE_VALUES)


#: BM25Similarity's LENGTH_TABLE: decoded length for each norm byte.
_LENGTH_TABLE = np.array([byte4_to_int(i) for i in range(256)], dtype=np.float32)


def _encode_lengths(lengths: np.ndarray) -> np.ndarray:
    """Vectorised ``intToByte4`` over an array of non-negative document lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    x = lengths - _NUM_FREE_VALUES
    out = lengths.copy()  # identity below NUM_FREE_VALUES + 8 (exact / subnormal)
    big = x >= 8  # longToInt4's "normal" range
    xb = x[big]
    # bit_length via frexp (exact for values < 2**53)
    num_bits = np.frexp(xb.astype(np.float64))[1].astype(np.int64)
    shift = num_bits - 4
    out[big] = _NUM_FREE_VALUES + (((xb >> shift) & 0x07) | ((shift + 1) << 3))
    return out.astype(np.uint8)


# --------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------


def _lucene_score_matrix(doc_tokens: list[list[int]], n_vocab: int, k1: float, b: float) -> tuple[dict, np.ndarray]:
    """Per (term, doc) BM25 score exactly as Lucene's BM25Similarity (float32, 1-byte norms).

    Returns bm25s's score dict (CSC over terms: ``indptr`` per term, doc ``indices``,
    ``data``) and the float32 idf per term.
    """
    n_docs = len(doc_tokens)
    lengths = np.fromiter((len(t) for t in doc_tokens), dtype=np.int64, count=n_docs)
    doc_count = int((lengths > 0).sum())  # Lucene's docCount: docs with >= 1 term
    flat = np.fromiter(
        (t for toks in doc_tokens for t in toks),
        dtype=np.int64,
        count=int(lengths.sum()),
    )
    doc_of = np.repeat(np.arange(n_docs, dtype=np.int64), lengths)
    # one entry per distinct (term, doc), sorted by term then doc: CSC order
    pair, tf = np.unique(flat * n_docs + doc_of, return_counts=True)
    term_of = pair // n_docs
    doc_idx = (pair % n_docs).astype(np.int32)
    df = np.bincount(term_of, minlength=n_vocab)
    indptr = np.zeros(n_vocab + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])

    # idf = (float) log(1 + (docCount - docFreq + 0.5D) / (docFreq + 0.5D))
    with np.errstate(divide="ignore", invalid="ignore"):
        idf = np.log1p((doc_count - df + 0.5) / (df + 0.5)).astype(np.float32)
    idf[df == 0] = 0.0
    # avgdl = (float) (sumTotalTermFreq / (double) docCount)
    avgdl = np.float32(lengths.sum() / doc_count) if doc_count else np.float32(1.0)
    k1f, bf = np.float32(k1), np.float32(b)
    # cache[i] = 1f / (k1 * ((1 - b) + b * LENGTH_TABLE[i] / avgdl))
    norm_inverse = np.float32(1.0) / (k1f * ((np.float32(1.0) - bf) + bf * _LENGTH_TABLE / avgdl))
    norms = _encode_lengths(lengths)
    ni = norm_inverse[norms[doc_idx]]
    w = idf[term_of]
    # score = weight - weight / (1f + freq * normInverse), weight = boost * idf (boost 1)
    data = (w - w / (np.float32(1.0) + tf.astype(np.float32) * ni)).astype(np.float32)
    scores = {"data": data, "indices": doc_idx, "indptr": indptr, "num_docs": n_docs}
    return scores, idf


class BM25Index:
    """A searchable BM25 index: a ``bm25s.BM25`` score matrix plus doc ids and params.

    Build with :meth:`build`, persist with :meth:`save` / :meth:`load`, query with
    :meth:`search`.
    """

    def __init__(self, retriever, doc_ids: Sequence[str], params: BM25Params) -> None:
        self.retriever = retriever
        self.doc_ids = list(doc_ids)
        self.params = params
        self.analyzer = LuceneAnalyzer(params.stemmer, params.stopwords)
        # rank of each doc id in string order: Anserini breaks score ties by doc id
        order = np.argsort(np.asarray(self.doc_ids, dtype=str), kind="stable")
        self._id_rank = np.empty(len(self.doc_ids), dtype=np.int64)
        self._id_rank[order] = np.arange(len(self.doc_ids))

    def __len__(self) -> int:
        return len(self.doc_ids)

    @classmethod
    def build(
        cls,
        doc_ids: Sequence[str],
        texts: Sequence[str],
        params: BM25Params = BM25Params(),
        show_progress: bool = True,
    ) -> BM25Index:
        """Analyse ``texts`` (already ``document_text``-joined) and build the score matrix."""
        import bm25s

        if len(doc_ids) != len(texts):
            raise ValueError(f"{len(doc_ids)} doc ids but {len(texts)} texts")
        if len(set(doc_ids)) != len(doc_ids):
            raise ValueError("doc ids are not unique")
        if not doc_ids:
            raise ValueError("cannot index an empty corpus")
        analyzer = LuceneAnalyzer(params.stemmer, params.stopwords)
        vocab: dict[str, int] = {}
        doc_tokens: list[list[int]] = []
        it = texts
        if show_progress:
            from tqdm.auto import tqdm

            it = tqdm(texts, desc="BM25 analyse", total=len(texts))
        for text in it:
            doc_tokens.append([vocab.setdefault(t, len(vocab)) for t in analyzer(text)])
        if not vocab:
            vocab[""] = 0  # keep bm25s happy with an all-empty corpus
        retriever = bm25s.BM25(k1=params.k1, b=params.b, method=params.method)
        if params.norms == "lucene":
            scores, _ = _lucene_score_matrix(doc_tokens, len(vocab), params.k1, params.b)
            retriever.scores = scores
            retriever.vocab_dict = vocab
            retriever.nonoccurrence_array = None
            retriever.unique_token_ids_set = set(vocab.values())
        else:
            retriever.index(
                (doc_tokens, vocab),
                create_empty_token=False,
                show_progress=show_progress,
            )
        return cls(retriever, doc_ids, params)

    def save(self, folder: str | Path) -> None:
        """Write bm25s's files plus doc ids and params into ``folder`` (a fresh one)."""
        import bm25s

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.retriever.save(str(folder), show_progress=False)
        (folder / _DOC_IDS_FILE).write_text(json.dumps(self.doc_ids), encoding="utf-8")
        meta = {
            "format_version": PARAMS_FORMAT_VERSION,
            "params": self.params.to_dict(),
            "num_docs": len(self),
            "bm25s_version": bm25s.__version__,
        }
        # params file last: its presence marks a complete index
        tmp = folder / (_PARAMS_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        tmp.replace(folder / _PARAMS_FILE)

    @classmethod
    def load(cls, folder: str | Path, mmap: bool = False) -> BM25Index:
        """Load an index written by :meth:`save`; refuses incomplete or outdated folders."""
        import bm25s

        folder = Path(folder)
        pfile = folder / _PARAMS_FILE
        if not pfile.is_file():
            raise ValueError(f"{folder}: no {_PARAMS_FILE}; not a (complete) llmret BM25 index")
        try:
            meta = json.loads(pfile.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{folder}: unreadable {_PARAMS_FILE}: {e}") from e
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if version != PARAMS_FORMAT_VERSION:
            raise ValueError(
                f"{folder}: BM25 index format version {version!r}, this code reads "
                f"{PARAMS_FORMAT_VERSION}; rebuild the index"
            )
        try:
            params = BM25Params.from_dict(meta["params"])
            doc_ids = json.loads((folder / _DOC_IDS_FILE).read_text(encoding="utf-8"))
            retriever = bm25s.BM25.load(str(folder), mmap=mmap, show_progress=False)
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise ValueError(f"{folder}: broken BM25 index ({type(e).__name__}: {e})") from e
        if len(doc_ids) != meta.get("num_docs") or retriever.scores["num_docs"] != len(doc_ids):
            raise ValueError(f"{folder}: doc id count does not match the index")
        return cls(retriever, doc_ids, params)

    # ---- search ------------------------------------------------------------------

    def _query_term_ids(self, text: str) -> list[int]:
        vocab = self.retriever.vocab_dict
        return [vocab[t] for t in self.analyzer(text) if t in vocab]

    def _search_one(self, term_ids: list[int], k: int) -> list[tuple[str, float]]:
        if not term_ids or k <= 0:
            return []
        sc = self.retriever.scores
        data, indices, indptr = sc["data"], sc["indices"], sc["indptr"]
        acc = np.zeros(len(self.doc_ids), dtype=np.float64)  # Lucene sums clauses in double
        matched = np.zeros(len(self.doc_ids), dtype=bool)
        for t in term_ids:  # a repeated term is added once per occurrence
            s, e = int(indptr[t]), int(indptr[t + 1])
            docs = indices[s:e]
            acc[docs] += data[s:e]  # doc ids within one term's postings are distinct
            matched[docs] = True
        nonocc = getattr(self.retriever, "nonoccurrence_array", None)
        if nonocc is not None:
            acc += float(nonocc[term_ids].sum())
        cand = np.flatnonzero(matched)
        scores = acc[cand].astype(np.float32)
        if len(cand) > k:  # keep the top k, plus anything tied with the k-th score
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]
            keep = scores >= kth
            cand, scores = cand[keep], scores[keep]
        order = np.lexsort((self._id_rank[cand], -scores))[:k]
        return [(self.doc_ids[i], float(s)) for i, s in zip(cand[order], scores[order], strict=True)]

    def search(
        self,
        queries: Mapping[str, str],
        k: int = 1000,
        n_threads: int = 1,
        show_progress: bool = True,
    ) -> dict[str, list[tuple[str, float]]]:
        """Top-``k`` (doc id, score) per query id, best first.

        Only documents matching a query term are returned (so possibly fewer than
        ``k``; ``k`` is capped at the corpus size); a query whose analysed text is
        empty (or has no indexed term) gets an empty list.
        """
        k = min(int(k), len(self.doc_ids))
        qids = list(queries)
        term_ids = [self._query_term_ids(queries[q]) for q in qids]

        def run(i: int) -> list[tuple[str, float]]:
            return self._search_one(term_ids[i], k)

        idx = range(len(qids))
        if n_threads > 1:
            with ThreadPoolExecutor(max_workers=n_threads) as ex:
                results = ex.map(run, idx)
                if show_progress:
                    from tqdm.auto import tqdm

                    results = tqdm(results, total=len(qids), desc="BM25 search")
                out = list(results)
        else:
            if show_progress:
                from tqdm.auto import tqdm

                idx = tqdm(idx, desc="BM25 search")
            out = [run(i) for i in idx]
        return dict(zip(qids, out, strict=True))

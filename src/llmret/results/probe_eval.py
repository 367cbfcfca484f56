"""Scores of in-memory sparse vectors for the research probes (``experiments/``): the workflow's
exact sparse search (:func:`llmret.retrieval.sparse_index.exact_search`) scored by its
evaluation (:func:`llmret.results.evaluation.evaluate`), so a probe's nDCG@10 means what a
table cell's does, without writing vectors, an index or a run file first.
"""

from __future__ import annotations

from collections.abc import Sequence

import scipy.sparse as sp

from llmret.data.beir import Dataset
from llmret.data.trec import Run
from llmret.results.evaluation import evaluate
from llmret.retrieval.sparse_index import exact_search


def score_sparse(
    queries: sp.spmatrix,
    docs: sp.spmatrix,
    dataset: Dataset,
    metrics: Sequence[str] = ("ndcg@10",),
    k: int = 100,
) -> tuple[Run, dict[str, float]]:
    """The exact top-``k`` run of ``dataset``'s queries (rows of ``queries``, in
    ``dataset.queries`` order) over its corpus (rows of ``docs``, in ``dataset.corpus.ids``
    order), and the mean of each of ``metrics`` over ``dataset.qrels``.

    As in the workflow, documents scoring 0 are not retrieved, ties go by document id, and a
    judged query without a retrieved document scores 0.
    """
    run = exact_search(docs, dataset.corpus.ids, queries, list(dataset.queries), k=k)
    return run, evaluate(dataset.qrels, run, list(metrics))["metrics"]

"""The bag-of-words reference: token weights, corpus idf applied on the query side, ranking."""

import numpy as np
import pytest
import scipy.sparse as sp

from llmret.retrieval import bow

DOCS = [
    "Cats purr when they are content and warm.",
    "Mitochondria produce adenosine triphosphate in eukaryotic cells.",
    "Dogs bark at night and cats sleep.",
    "The weather is warm and sunny today.",
]


@pytest.mark.slow
def test_passages_weigh_log_counts_and_queries_are_sets(tok):
    spec = bow.BowSpec(passage_template="{text}", query_template="{text}", max_passage_length=64)
    docs = bow.encode_bow(tok, ["cats cats cats dogs"], "passage", spec)
    ids = tok("cats cats cats dogs", add_special_tokens=False)["input_ids"]
    cat, dog = ids[0], ids[-1]
    assert docs[0, cat] == pytest.approx(1 + np.log(ids.count(cat))) and docs[0, dog] == pytest.approx(1.0)
    query = bow.encode_bow(tok, ["cats cats cats dogs"], "query", spec)
    assert set(query.data) == {1.0} and query.nnz == len(set(ids))
    raw = bow.encode_bow(tok, ["cats cats cats dogs"], "query", bow.BowSpec(query_template="{text}", query_tf="raw"))
    assert raw[0, cat] == ids.count(cat)
    # The prompt is part of the bag (as a sparse system frames text), no EOS or special token.
    framed = bow.encode_bow(tok, ["cats and dogs"], "query", bow.BowSpec(max_query_length=4))
    # prompt and text tokenised as one string, cut after a text token: 'query', ':', 'Ġcats', 'Ġand'
    joint = tok("query: cats and", add_special_tokens=False)["input_ids"]
    assert set(framed.indices) == set(joint) and len(joint) == 4
    assert tok.eos_token_id not in bow.encode_bow(tok, DOCS, "passage", bow.BowSpec()).indices
    with pytest.raises(ValueError, match="doc_tf must be one of"):
        bow.BowSpec(doc_tf="sqrt")


@pytest.mark.slow
def test_idf_on_the_query_scores_as_tf_idf_passages_and_ranks_the_rare_match_first(tok):
    spec = bow.BowSpec()
    docs = bow.encode_bow(tok, DOCS, "passage", spec)
    queries = bow.encode_bow(tok, ["what produces adenosine triphosphate", "which cats are warm"], "query", spec)
    halves = [docs[:2], docs[2:]]  # two shards: the same frequencies as the whole
    df, n = bow.document_frequencies(halves, docs.shape[1])
    assert n == 4 and (df == np.bincount(docs.indices, minlength=docs.shape[1])).all()
    idf = bow.bm25_idf(df, n)
    scores = (bow.weight_queries(queries, idf) @ docs.T).toarray()
    tfidf_docs = docs @ sp.diags(idf)
    np.testing.assert_allclose(scores, (queries @ tfidf_docs.T).toarray(), rtol=1e-6)
    assert scores[0].argmax() == 1  # the only passage with the query's rare words
    assert scores[1].argmax() == 0  # "are" and "warm"; passage 2 has "cats", passage 3 "warm"
    assert idf[tok("passage", add_special_tokens=False)["input_ids"][0]] < idf.max() / 5  # the prompt: in every passage


def _never_read():
    raise AssertionError("the corpus was read")
    yield  # a generator: reading it is the failure


@pytest.mark.slow
def test_the_system_type_picks_encoding_and_query_weighting(tok):
    """sparse_system: bow encodes bags on the CPU and weighs queries by the corpus's idf
    (as the search job did by hand); idf none and CSPLADE's type search the queries as encoded,
    never reading the corpus."""
    settings = {"model": "smollm2-135m", **bow.BowSpec().to_dict()}  # a job's params carry the model
    system = bow.sparse_system("bow", settings)
    assert isinstance(system, bow.BowSystem) and system.spec == bow.BowSpec() and system.search_reads_corpus
    docs, stats = system.encode("unused", tok, DOCS, "passage", gpus=0)
    assert (docs != bow.encode_bow(tok, DOCS, "passage", system.spec)).nnz == 0 and stats["device"] == "cpu"
    queries = bow.encode_bow(tok, ["which cats are warm"], "query", system.spec)
    df, n = bow.document_frequencies([docs], docs.shape[1])
    want = bow.weight_queries(queries, bow.bm25_idf(df, n))
    got = system.weigh_queries(queries, (m for m in (docs[:2], docs[2:])))
    assert (got != want).nnz == 0
    flat = bow.sparse_system("bow", {**settings, "idf": "none"})
    assert flat.weigh_queries(queries, _never_read()) is queries
    csplade = bow.sparse_system("sparse", {"model": "csplade", "max_passage_length": 64})
    assert type(csplade) is bow.SparseSystem and not csplade.search_reads_corpus
    assert csplade.spec.max_passage_length == 64
    assert csplade.weigh_queries(queries, _never_read()) is queries
    assert set(bow.SPARSE_SYSTEM_TYPES) == {"sparse", "bow"}
    with pytest.raises(ValueError, match="not a sparse system type"):
        bow.sparse_system("dense", {})
    with pytest.raises(ValueError, match="unknown"):
        bow.sparse_system("bow", {"idff": "none"})

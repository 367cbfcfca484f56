"""Tests for llmret.retrieval.bm25: Lucene-compatible analysis and BM25 scoring on tiny corpora."""

from __future__ import annotations

import json
import math

import pytest

from llmret.retrieval.analysis import LUCENE_ENGLISH_STOPWORDS, LuceneAnalyzer, document_text, lucene_porter_stem
from llmret.retrieval.bm25 import BM25Index, BM25Params, byte4_to_int, int_to_byte4

# ----------------------------------------------------------------------------- analysis


def test_analyzer_pipeline_on_sentence():
    a = LuceneAnalyzer()
    # stop words gone, possessive stripped, lowercase, Porter stems, hyphen splits
    assert a("The Runner's studies of running into well-known Dogs") == [
        "runner",
        "studi",
        "run",
        "well",
        "known",
        "dog",
    ]


def test_analyzer_possessive_variants_and_stopword_after_strip():
    a = LuceneAnalyzer(stemmer="none")
    assert a("John's JOHN’S john＇s dogs'") == ["john", "john", "john", "dogs"]
    # "it's" -> "it" (stop word) disappears; "isn't" is not a stop word
    assert a("it's isn't") == ["isn't"]


def test_tokenizer_joins_like_uax29():
    a = LuceneAnalyzer(stemmer="none", stopwords="none")
    assert a("don't e.g. U.S.A. 3.5 1,000 p<0.05 v2.0") == [
        "don't",
        "e.g",
        "u.s.a",
        "3.5",
        "1,000",
        "p",
        "0.05",
        "v2.0",
    ]
    # hyphens, slashes, digit-letter punctuation split; letter+digit runs stay joined
    assert a("COVID-19 IL-6/IL6 a.1 x:y 5°C") == [
        "covid",
        "19",
        "il",
        "6",
        "il6",
        "a",
        "1",
        "x:y",
        "5",
        "c",
    ]
    # superscripts are not word characters for UAX#29; underscores join
    assert a("m² foo_bar ___") == ["m", "foo_bar"]


def test_stopwords_are_lucene_english_set():
    listed = (
        "a an and are as at be but by for if in into is it no not of on or such that the "
        "their then there these they this to was will with"
    )
    assert listed.split(" ") == sorted(LUCENE_ENGLISH_STOPWORDS)
    assert len(LUCENE_ENGLISH_STOPWORDS) == 33
    assert LuceneAnalyzer(stopwords="none", stemmer="none")("the cat") == ["the", "cat"]
    assert LuceneAnalyzer()("the cat") == ["cat"]


@pytest.mark.parametrize(
    "word,stem",
    [
        ("running", "run"),
        ("studies", "studi"),
        ("caresses", "caress"),
        ("ponies", "poni"),
        ("agreed", "agre"),
        ("hopping", "hop"),
        ("relational", "relat"),
        ("generalizations", "gener"),
        ("happy", "happi"),
        ("biological", "biolog"),
        # Lucene's departures from the published algorithm / Snowball:
        ("pathology", "patholog"),  # -logi -> -log
        ("possibly", "possibl"),  # -bli -> -ble (then -e dropped)
        ("us", "us"),  # words of <= 2 chars untouched
        ("vs", "vs"),
    ],
)
def test_lucene_porter(word, stem):
    assert lucene_porter_stem(word) == stem


def test_stemmer_choices():
    assert LuceneAnalyzer(stemmer="snowball-porter")("pathology") == ["pathologi"]
    assert LuceneAnalyzer(stemmer="english")("running") == ["run"]
    assert LuceneAnalyzer(stemmer="none")("running") == ["running"]
    with pytest.raises(ValueError):
        LuceneAnalyzer(stemmer="klingon")
    with pytest.raises(ValueError):
        BM25Params(stopwords="nltk")


def test_document_text():
    assert document_text("A title", "Body text.") == "A title Body text."
    assert document_text("", "Body text.") == "Body text."
    assert document_text(None, "Body text.") == "Body text."


# ----------------------------------------------------------------------------- norms


def test_smallfloat_byte4_table():
    # values derived by hand from SmallFloat.intToByte4 / byte4ToInt
    cases = {
        0: (0, 0),
        23: (23, 23),
        24: (24, 24),
        39: (39, 39),
        40: (40, 40),
        41: (40, 40),
        55: (47, 54),
        56: (48, 56),
        100: (57, 96),
        200: (67, 200),
        231: (68, 216),
    }
    for n, (byte, decoded) in cases.items():
        assert int_to_byte4(n) == byte, n
        assert byte4_to_int(byte) == decoded, n
    assert int_to_byte4(2**31 - 1) == 255
    prev = -1
    for b in range(256):  # decode table is increasing; encode(decode(b)) == b
        assert byte4_to_int(b) > prev
        prev = byte4_to_int(b)
        assert int_to_byte4(byte4_to_int(b)) == b
    for n in range(0, 5000, 7):  # lossy but never up, at most 1/8 down
        d = byte4_to_int(int_to_byte4(n))
        assert d <= n and (n - d) <= n / 8


# ----------------------------------------------------------------------------- scoring

DOCS = {
    "d1": "cat cat dog",
    "d2": "cat bird bird fish",
    "d3": "dog fish",
    "d4": "lion tiger bear wolf",
}


def lucene_bm25(tf: int, dl: float, avgdl: float, n: int, N: int, k1=0.9, b=0.4) -> float:
    idf = math.log(1 + (N - n + 0.5) / (n + 0.5))
    return idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))


@pytest.fixture(scope="module")
def index() -> BM25Index:
    return BM25Index.build(list(DOCS), list(DOCS.values()), show_progress=False)


def scores_of(idx: BM25Index, q: str) -> dict[str, float]:
    return dict(idx.search({"q": q}, k=10, show_progress=False)["q"])


def test_scores_equal_lucene_formula(index):
    # dl = number of analysed tokens: 3, 4, 2, 4 -> avgdl 13/4; N = 4
    s = scores_of(index, "cat")
    assert set(s) == {"d1", "d2"}  # only matching documents come back
    assert s["d1"] == pytest.approx(lucene_bm25(2, 3, 13 / 4, 2, 4), rel=1e-6)
    assert s["d2"] == pytest.approx(lucene_bm25(1, 4, 13 / 4, 2, 4), rel=1e-6)
    s = scores_of(index, "fish dog")
    exp_d3 = lucene_bm25(1, 2, 13 / 4, 2, 4) * 2  # both terms: df 2, tf 1, dl 2
    assert s["d3"] == pytest.approx(exp_d3, rel=1e-6)
    assert s["d1"] == pytest.approx(lucene_bm25(1, 3, 13 / 4, 2, 4), rel=1e-6)


def test_stop_words_do_not_count_in_length():
    idx = BM25Index.build(["a", "b"], ["the cat of the year", "cat dog"], show_progress=False)
    s = scores_of(idx, "cat")  # dl: "cat year" = 2, "cat dog" = 2 -> identical scores
    assert s["a"] == s["b"]


def test_empty_documents_do_not_count_in_n_or_avgdl():
    # Lucene's docCount (N) and avgdl only see documents with at least one term
    idx = BM25Index.build(["a", "b", "e"], ["cat dog", "dog", "the of"], show_progress=False)
    s = scores_of(idx, "cat")
    assert s == {"a": pytest.approx(lucene_bm25(1, 2, 3 / 2, 1, 2), rel=1e-6)}


def test_long_documents_use_quantized_lengths():
    # dl 100 is stored as 96 (one-byte norm), dl 10 exactly; avgdl uses exact lengths
    docs = ["apple " + "filler " * 99, "apple " + "pear " * 9, "kiwi"]
    idx = BM25Index.build(["long", "short", "other"], docs, show_progress=False)
    s = scores_of(idx, "apple")
    avgdl = (100 + 10 + 1) / 3
    assert s["long"] == pytest.approx(lucene_bm25(1, 96, avgdl, 2, 3), rel=1e-6)
    assert s["long"] != pytest.approx(lucene_bm25(1, 100, avgdl, 2, 3), rel=1e-6)
    assert s["short"] == pytest.approx(lucene_bm25(1, 10, avgdl, 2, 3), rel=1e-6)
    exact = BM25Index.build(["long", "short", "other"], docs, BM25Params(norms="exact"), show_progress=False)
    assert scores_of(exact, "apple")["long"] == pytest.approx(lucene_bm25(1, 100, avgdl, 2, 3), rel=1e-6)


def test_ranking_order_and_ties(index):
    res = index.search({"q": "cat", "t": "lion tiger"}, show_progress=False)
    assert [d for d, _ in res["q"]] == ["d1", "d2"]  # tf 2 beats tf 1
    scores = [s for _, s in res["q"]]
    assert scores == sorted(scores, reverse=True)
    # equal scores are ordered by doc id string, as Anserini does
    idx = BM25Index.build(["b", "c", "a"], ["x y", "x y", "x y"], show_progress=False)
    assert [d for d, _ in idx.search({"q": "x"}, show_progress=False)["q"]] == [
        "a",
        "b",
        "c",
    ]


def test_duplicate_query_terms_add_up(index):
    one = scores_of(index, "cat")
    two = scores_of(index, "cat cat")
    stemmed = scores_of(index, "cats cat")  # both analyse to "cat"
    for d in one:
        assert two[d] == pytest.approx(2 * one[d], rel=1e-6)
        assert stemmed[d] == pytest.approx(two[d], rel=1e-6)
    mixed = scores_of(index, "cat cat dog")
    d1 = 2 * lucene_bm25(2, 3, 13 / 4, 2, 4) + lucene_bm25(1, 3, 13 / 4, 2, 4)
    assert mixed["d1"] == pytest.approx(d1, rel=1e-6)


def test_k_capped_and_empty_queries(index):
    res = index.search(
        {
            "all": "cat dog fish bird lion",
            "k2": "cat dog fish bird lion",
            "stop": "the of and",
            "unknown": "zebra",
            "blank": "",
        },
        k=10_000,
        show_progress=False,
    )
    assert len(res["all"]) == 4
    assert res["stop"] == [] and res["unknown"] == [] and res["blank"] == []
    assert len(index.search({"q": "cat dog fish bird lion"}, k=2, show_progress=False)["q"]) == 2
    assert list(res) == ["all", "k2", "stop", "unknown", "blank"]


def test_threads_give_same_results(index):
    qs = {str(i): q for i, q in enumerate(["cat", "dog fish", "bird", "lion cat"] * 5)}
    assert index.search(qs, n_threads=3, show_progress=False) == index.search(qs, show_progress=False)


def test_build_rejects_bad_input():
    with pytest.raises(ValueError):
        BM25Index.build(["a", "a"], ["x", "y"], show_progress=False)
    with pytest.raises(ValueError):
        BM25Index.build(["a"], ["x", "y"], show_progress=False)
    with pytest.raises(ValueError):
        BM25Params(method="atire")  # one-byte norms are Lucene's only


# ----------------------------------------------------------------------------- persistence


def test_params_to_dict():
    d = BM25Params().to_dict()
    assert d == {
        "k1": 0.9,
        "b": 0.4,
        "stemmer": "porter",
        "stopwords": "lucene",
        "method": "lucene",
        "norms": "lucene",
    }
    assert BM25Params.from_dict(d) == BM25Params()
    json.dumps(d)


@pytest.mark.parametrize(
    "params",
    [BM25Params(), BM25Params(k1=1.2, b=0.75, norms="exact", stemmer="english")],
)
def test_save_load_roundtrip(tmp_path, params):
    idx = BM25Index.build(list(DOCS), list(DOCS.values()), params, show_progress=False)
    folder = tmp_path / "idx"
    idx.save(folder)
    meta = json.loads((folder / "llmret_bm25.json").read_text())
    assert meta["params"] == params.to_dict()
    loaded = BM25Index.load(folder)
    assert loaded.params == params
    assert loaded.doc_ids == idx.doc_ids
    qs = {"a": "cat", "b": "fish dog cat", "c": "the"}
    assert loaded.search(qs, show_progress=False) == idx.search(qs, show_progress=False)


def test_load_refuses_missing_or_stale_params(tmp_path, index):
    folder = tmp_path / "idx"
    index.save(folder)
    meta_file = folder / "llmret_bm25.json"
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 0
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=str(folder)):
        BM25Index.load(folder)
    meta_file.unlink()
    with pytest.raises(ValueError, match=str(folder)):
        BM25Index.load(folder)
    with pytest.raises(ValueError, match="nothing"):
        BM25Index.load(tmp_path / "nothing")

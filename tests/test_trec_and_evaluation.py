import math

import pytest

from llmret.data import trec
from llmret.results import evaluation


def test_run_roundtrip_with_header_and_tie_order(tmp_path):
    run = {"q2": [("b", 1.0), ("a", 1.0), ("c", 3.0)], "q1": [("x", 0.5)]}
    path = tmp_path / "r.trec"
    trec.write_run(path, run, tag="sys", header={"k1": 0.9})
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# llmret-run ")
    assert lines[1:] == [
        "q1 Q0 x 1 0.500000 sys",
        "q2 Q0 c 1 3.000000 sys",
        "q2 Q0 a 2 1.000000 sys",
        "q2 Q0 b 3 1.000000 sys",
    ]
    assert trec.read_header(path) == {"k1": 0.9}
    assert trec.read_run(path) == {"q1": [("x", 0.5)], "q2": [("c", 3.0), ("a", 1.0), ("b", 1.0)]}


def test_bad_run_line_is_named(tmp_path):
    path = tmp_path / "r.trec"
    path.write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2 tag\n")
    with pytest.raises(ValueError, match=r"r\.trec:2: expected 6 columns"):
        trec.read_run(path)


def test_iter_run_streams_what_read_run_reads(tmp_path):
    path = tmp_path / "r.trec"
    # Hand-written: queries not in id order, ranks and scores out of order within a query,
    # a repeated document, a comment and a blank line: both readers keep the file's order.
    path.write_text(
        "# llmret-run {}\n"
        "q2 Q0 b 2 1.0 t\n"
        "q2 Q0 a 1 3.0 t\n"
        "q2 Q0 b 3 0.5 t\n"
        "\n"
        "q10 Q0 x 1 0.25 t\n"
        "# a comment\n"
        "q1 Q0 c 1 2.0 t\n"
    )
    streamed = list(trec.iter_run(path))
    assert [q for q, _ in streamed] == ["q2", "q10", "q1"]
    assert dict(streamed) == trec.read_run(path)
    assert streamed[0] == ("q2", [("b", 1.0), ("a", 3.0), ("b", 0.5)])
    # A file write_run made (ties broken by id) reads back identically both ways.
    run = {"q2": [("b", 1.0), ("a", 1.0), ("c", 3.0)], "q1": [("x", 0.5)]}
    trec.write_run(path, run, tag="sys")
    assert list(trec.iter_run(path)) == list(trec.read_run(path).items())
    path.write_text("# only a header\n")
    assert list(trec.iter_run(path)) == []


def test_iter_run_names_bad_lines(tmp_path):
    path = tmp_path / "r.trec"
    path.write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2 tag\n")
    with pytest.raises(ValueError, match=r"r\.trec:2: expected 6 columns"):
        list(trec.iter_run(path))
    path.write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2 high tag\n")
    with pytest.raises(ValueError, match=r"r\.trec:2: score 'high' is not a number"):
        list(trec.iter_run(path))


def test_iter_run_refuses_a_query_whose_lines_are_not_contiguous(tmp_path):
    path = tmp_path / "r.trec"
    path.write_text("# llmret-run {}\nq1 Q0 a 1 2.0 t\nq1 Q0 b 2 1.0 t\nq2 Q0 a 1 1.0 t\nq1 Q0 c 3 0.5 t\n")
    stream = trec.iter_run(path)
    assert next(stream) == ("q1", [("a", 2.0), ("b", 1.0)])
    with pytest.raises(ValueError, match=rf"{path}:5: query 'q1' appears again .*started on line 2"):
        list(stream)
    # read_run still merges such a file (evaluation accepts it).
    assert trec.read_run(path)["q1"] == [("a", 2.0), ("b", 1.0), ("c", 0.5)]


QRELS = {"q1": {"d1": 1, "d3": 1}, "q2": {"d2": 2, "d4": 1}, "q3": {"d9": 1}}
RUN = {
    "q1": [("d2", 3.0), ("d1", 2.0), ("d3", 1.0)],
    "q2": [("d4", 2.0), ("d2", 1.0)],
    # q3 unanswered: it must count as zero, not vanish from the mean.
}


def test_a_run_that_retrieves_nothing_scores_zero():
    """A collapsed model's run (no query answered) evaluates to zeros instead of failing in ranx."""
    for empty in ({}, {q: [] for q in QRELS}):
        res = evaluation.evaluate(QRELS, empty, ["ndcg@10", "recall@100"])
        assert res["metrics"] == {"ndcg@10": 0.0, "recall@100": 0.0}
        assert set(res["per_query"]["ndcg@10"]) == set(QRELS)
        assert res["unanswered_queries"] == len(QRELS)
    p = evaluation.significance(QRELS, {"base": RUN, "collapsed": {}}, "base", ["ndcg@10"])
    assert 0.0 < p["collapsed"]["ndcg@10"] <= 1.0


def test_metrics_match_hand_computation():
    res = evaluation.evaluate(QRELS, RUN, ["ndcg@10", "mrr@10", "recall@100"], relevance_level=1)
    log2 = math.log2
    # q1: relevant at ranks 2 and 3, two relevant in total
    ndcg_q1 = (1 / log2(3) + 1 / log2(4)) / (1 + 1 / log2(3))
    # q2: gains are the grades: d4 (1) at rank 1, d2 (2) at rank 2; ideal puts d2 first
    ndcg_q2 = (1 + 2 / log2(3)) / (2 + 1 / log2(3))
    assert res["per_query"]["ndcg@10"]["q1"] == pytest.approx(ndcg_q1)
    assert res["per_query"]["ndcg@10"]["q2"] == pytest.approx(ndcg_q2)
    assert res["per_query"]["ndcg@10"]["q3"] == 0.0
    assert res["metrics"]["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 3)
    assert res["metrics"]["mrr@10"] == pytest.approx((1 / 2 + 1) / 3)
    assert res["metrics"]["recall@100"] == pytest.approx((1 + 1 + 0) / 3)
    assert res["unanswered_queries"] == 1


def test_relevance_level_applies_to_binary_measures_only():
    res = evaluation.evaluate(QRELS, RUN, ["ndcg@10", "mrr@10", "recall@100"], relevance_level=2)
    # Only d2 (grade 2) counts for q2; q1 and q3 have no document at level 2.
    assert res["per_query"]["mrr@10"] == {"q1": 0.0, "q2": 0.5, "q3": 0.0}
    assert res["per_query"]["recall@100"]["q2"] == 1.0
    # nDCG still uses every grade.
    assert res["per_query"]["ndcg@10"]["q1"] > 0
    assert res["ranx_metrics"]["mrr@10"] == "mrr@10-l2"


def test_ties_are_ranked_as_in_the_run_file():
    qrels = {"q": {"b": 1}}
    res = evaluation.evaluate(qrels, {"q": [("b", 1.0), ("a", 1.0)]}, ["mrr@10"])
    # Tie broken by document id: a before b, so b is at rank 2.
    assert res["metrics"]["mrr@10"] == pytest.approx(0.5)


def test_significance_against_baseline():
    qrels = {f"q{i}": {"good": 1} for i in range(30)}
    base = {q: [("bad", 2.0), ("good", 1.0)] for q in qrels}
    better = {q: [("good", 2.0), ("bad", 1.0)] for q in qrels}
    better["q0"] = base["q0"]  # not constant, so the t statistic is defined
    same = {q: list(v) for q, v in base.items()}
    p = evaluation.significance(qrels, {"bm25": base, "better": better, "same": same}, "bm25", ["mrr@10"])
    assert p["better"]["mrr@10"] < 0.001
    assert p["same"]["mrr@10"] > 0.5 or math.isnan(p["same"]["mrr@10"])
    with pytest.raises(ValueError, match="baseline 'nope'"):
        evaluation.significance(qrels, {"bm25": base}, "nope")


def test_identical_ids_are_dropped_before_the_cut():
    from llmret.data.trec import drop_identical_ids, search_depth

    run = {"q1": [("q1", 9.0), ("d2", 5.0), ("d3", 4.0)], "q2": [("d2", 3.0), ("d3", 2.0), ("d4", 1.0)]}
    assert search_depth(2, True) == 3 and search_depth(2, False) == 2
    assert drop_identical_ids(run, 2) == {"q1": [("d2", 5.0), ("d3", 4.0)], "q2": [("d2", 3.0), ("d3", 2.0)]}

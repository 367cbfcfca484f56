import hashlib
import json
import logging
import math

import pytest

from llmret.data import trec
from llmret.results import evaluation


def test_run_roundtrip_with_record_and_tie_order(tmp_path):
    """Six plain columns a line, nothing else; settings, counts and sha256 in the record."""
    run = {"q2": [("b", 1.0), ("a", 1.0), ("c", 3.0)], "q1": [("x", 0.5)], "q3": []}
    path = tmp_path / "r.trec"
    returned = trec.write_run(path, run, tag="sys", header={"k1": 0.9})
    assert path.read_text().splitlines() == [
        "q1 Q0 x 1 0.500000 sys",
        "q2 Q0 c 1 3.000000 sys",
        "q2 Q0 a 2 1.000000 sys",
        "q2 Q0 b 3 1.000000 sys",
    ]
    record = json.loads((tmp_path / "r.trec.json").read_text())
    assert record == returned == trec.read_record(path)
    assert record["settings"] == trec.read_header(path) == {"k1": 0.9}
    assert (record["queries"], record["empty_queries"], record["lines"]) == (2, 1, 4)
    assert record["bytes"] == path.stat().st_size
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert trec.read_run(path) == {"q1": [("x", 0.5)], "q2": [("c", 3.0), ("a", 1.0), ("b", 1.0)]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.trec", "r.trec.json"]  # no temporary


def test_bad_run_line_is_named(tmp_path):
    path = tmp_path / "r.trec"
    path.write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2 tag\n")
    with pytest.raises(ValueError, match=r"r\.trec:2: expected 6 columns"):
        trec.read_run(path, verify=False)


def _written(tmp_path, queries=4, depth=3):
    run = {f"q{i}": [(f"d{j}", float(10 - j)) for j in range(depth)] for i in range(queries)}
    path = tmp_path / "r.trec"
    trec.write_run(path, run, tag="sys", header={"top_k": depth})
    return path, run


@pytest.mark.parametrize("reader", [trec.read_run, lambda p: list(trec.iter_run(p))])
def test_a_run_cut_short_or_altered_is_an_error_naming_it(tmp_path, reader):
    path, run = _written(tmp_path)
    assert reader(path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: len(lines) // 2]))  # cut at a line boundary: half the queries
    with pytest.raises(trec.RunIntegrityError, match=rf"{path} is not the run its record r\.trec\.json describes "):
        reader(path)
    # Same size, other content (an edited score): the sha256 tells.
    path.write_text("".join(lines).replace("q1 Q0 d0 1 10.000000", "q1 Q0 d0 1 99.000000"))
    with pytest.raises(trec.RunIntegrityError, match=r"sha256 [0-9a-f]{64} where the record says"):
        reader(path)
    path.write_text("".join(lines))  # restored, it reads again
    assert reader(path)


def test_a_run_without_a_record_is_refused_unless_old_or_unchecked(tmp_path, caplog):
    path, _ = _written(tmp_path)
    trec.record_path(path).unlink()
    with pytest.raises(trec.RunIntegrityError, match=r"r\.trec: no record r\.trec\.json beside it"):
        trec.read_run(path)
    with pytest.raises(trec.RunIntegrityError, match="no record"):
        list(trec.iter_run(path))
    assert len(trec.read_run(path, verify=False)) == 4
    # A run from before the records (settings in a header line) is read unchecked, with a warning.
    path.write_text('# llmret-run {"top_k": 3}\n' + path.read_text())
    with caplog.at_level(logging.WARNING, logger="llmret.data.trec"):
        assert len(trec.read_run(path)) == 4
    assert "from before run records" in caplog.text
    assert trec.read_header(path) == {"top_k": 3}
    trec.record_path(path).write_text("{not json")
    with pytest.raises(trec.RunIntegrityError, match=r"r\.trec\.json: not a readable run record"):
        trec.read_run(path)


def test_a_run_made_with_other_settings_than_the_configs_is_stale(tmp_path):
    path, _ = _written(tmp_path)
    assert trec.check_run_settings(path, {"top_k": 3}) == {"top_k": 3}
    with pytest.raises(trec.RunIntegrityError, match=r"r\.trec was made with other settings .*top_k: 3 -> 100.*stale"):
        trec.check_run_settings(path, {"top_k": 100})
    with pytest.raises(trec.RunIntegrityError, match=r"settings: '\(absent\)' -> \{'k1': 0.9\}"):
        trec.check_run_settings(path, {"top_k": 3, "settings": {"k1": 0.9}})
    assert trec.setting_differences({"a": [1, 2], "b": {"c": 1}}, {"a": (1, 2), "b": {"c": 2}}) == ["b.c: 1 -> 2"]
    # An old run (a header line, no record) is checked by its header; one with neither has no record.
    trec.record_path(path).unlink()
    with pytest.raises(trec.RunIntegrityError, match="no record"):
        trec.check_run_settings(path, {"top_k": 3})
    path.write_text('# llmret-run {"top_k": 3}\n' + path.read_text())
    assert trec.check_run_settings(path, {"top_k": 3}) == {"top_k": 3}


def test_qrels_round_trip_in_trec_format(tmp_path):
    qrels = {"q2": {"d9": 0, "d1": 2}, "q1": {"d3": 1}}
    path = tmp_path / "qrels.trec"
    trec.write_qrels(path, qrels)
    assert path.read_text() == "q1 0 d3 1\nq2 0 d1 2\nq2 0 d9 0\n"
    assert trec.read_qrels(path) == qrels
    path.write_text("q1 0 d3 1\nq1 0 d3 2\n")
    with pytest.raises(ValueError, match=r"qrels\.trec:2: pair \(q1, d3\) judged twice"):
        trec.read_qrels(path)
    path.write_text("q1 0 d3\n")
    with pytest.raises(ValueError, match=r"qrels\.trec:1: expected 4 columns"):
        trec.read_qrels(path)
    path.write_text("q1 0 d3 high\n")
    with pytest.raises(ValueError, match=r"qrels\.trec:1: grade 'high' is not an integer"):
        trec.read_qrels(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match=r"qrels\.trec: no judgements"):
        trec.read_qrels(path)
    with pytest.raises(ValueError, match=r"id 'a b' cannot be written"):
        trec.write_qrels(path, {"q1": {"a b": 1}})


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
    trec.write_run(path, {}, tag="sys")
    assert path.read_text() == "" and list(trec.iter_run(path)) == []


def test_iter_run_names_bad_lines(tmp_path):
    path = tmp_path / "r.trec"
    path.write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2 tag\n")
    with pytest.raises(ValueError, match=r"r\.trec:2: expected 6 columns"):
        list(trec.iter_run(path, verify=False))
    path.write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2 high tag\n")
    with pytest.raises(ValueError, match=r"r\.trec:2: score 'high' is not a number"):
        list(trec.iter_run(path, verify=False))


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


def test_judgements_where_nothing_is_relevant_are_an_error_naming_the_file(tmp_path):
    path = tmp_path / "qrels.trec"
    with pytest.raises(ValueError, match=r"qrels\.trec: none of its 3 judgements has a grade above 0"):
        evaluation.check_judgements({"q1": {"a": 0, "b": 0}, "q2": {"c": 0}}, path)
    assert evaluation.check_judgements(QRELS, path) == []
    warnings = evaluation.check_judgements({"q1": {"a": 1}, "q2": {"b": 0}}, path, relevance_level=2)
    assert "no judgement reaches relevance_level 2" in warnings[0]
    assert "1 of 2 queries have nothing relevant" in warnings[1]


def _files(tmp_path, run=RUN, qrels=QRELS, settings=None):
    run_path, qrels_path = tmp_path / "run.trec", tmp_path / "qrels.trec"
    trec.write_run(run_path, run, tag="sys", header=settings or {"top_k": 10})
    trec.write_qrels(qrels_path, qrels)
    return run_path, qrels_path


def test_evaluate_files_records_the_count_settings_and_sources(tmp_path):
    run_path, qrels_path = _files(tmp_path)
    res = evaluation.evaluate_files(run_path, qrels_path, ["ndcg@10", "mrr@10"], 1, {"top_k": 10})
    assert res["metrics"] == evaluation.evaluate(QRELS, RUN, ["ndcg@10", "mrr@10"])["metrics"]
    assert res["queries"] == 3 and all(len(v) == 3 for v in res["per_query"].values())
    assert res["run_sha256"] == trec.read_record(run_path)["sha256"]
    assert res["qrels_sha256"] == hashlib.sha256(qrels_path.read_bytes()).hexdigest()
    assert res["settings"] == {"run": {"top_k": 10}, "metrics": ["ndcg@10", "mrr@10"], "relevance_level": 1}
    with pytest.raises(trec.RunIntegrityError, match="top_k: 10 -> 100"):
        evaluation.evaluate_files(run_path, qrels_path, ["ndcg@10"], 1, {"top_k": 100})
    trec.write_qrels(qrels_path, {q: dict.fromkeys(d, 0) for q, d in QRELS.items()})
    with pytest.raises(ValueError, match=rf"{qrels_path}: none of its 5 judgements has a grade above 0"):
        evaluation.evaluate_files(run_path, qrels_path, ["ndcg@10"], 1, {"top_k": 10})


def test_trec_tools_read_our_files_as_they_are_and_agree(tmp_path):
    """pytrec_eval (trec_eval's measures) and ranx's file loader read a run and qrels as
    written, with no preprocessing, and score them as the evaluation does."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    from ranx import Qrels, Run
    from ranx import evaluate as rx_evaluate

    # No tied scores: trec_eval breaks ties by document id descending, the run file ascending.
    run = {f"q{i}": [(f"d{(7 * j + i) % 30}", 30.0 - j) for j in range(30)] for i in range(12)}
    qrels = {f"q{i}": {f"d{(i * 5 + k) % 30}": 1 + k % 2 for k in range(3)} for i in range(12)}
    run_path, qrels_path = _files(tmp_path, run, qrels)
    ours = evaluation.evaluate_files(run_path, qrels_path, ["ndcg@10", "recall@20"], 1, {"top_k": 10})
    with open(qrels_path) as fq, open(run_path) as fr:
        evaluator = pytrec_eval.RelevanceEvaluator(pytrec_eval.parse_qrel(fq), {"ndcg_cut.10", "recall.20"})
        theirs = evaluator.evaluate(pytrec_eval.parse_run(fr))
    for q in qrels:
        assert theirs[q]["ndcg_cut_10"] == pytest.approx(ours["per_query"]["ndcg@10"][q], abs=1e-9)
        assert theirs[q]["recall_20"] == pytest.approx(ours["per_query"]["recall@20"][q], abs=1e-9)
    rx_qrels, rx_run = Qrels.from_file(str(qrels_path), kind="trec"), Run.from_file(str(run_path), kind="trec")
    rx = rx_evaluate(rx_qrels, rx_run, "ndcg@10")
    assert rx == pytest.approx(ours["metrics"]["ndcg@10"], abs=1e-9)

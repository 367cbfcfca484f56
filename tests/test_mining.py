import json
import os

import faiss
import numpy as np
import pytest

from llmret.data import beir, trec
from llmret.retrieval import faiss_index
from llmret.training import mining
from llmret.training.mining import MiningSpec


def by_rank(n: int) -> list[tuple[str, float]]:
    """A ranking whose ids say their rank: ``r1`` first, scores falling."""
    return [(f"r{i}", 100.0 - i) for i in range(1, n + 1)]


def spec(**kw) -> MiningSpec:
    base = {"depth": 50, "rank_from": 1, "rank_to": 50, "max_negatives": 50, "min_negatives": 0}
    return MiningSpec(**{**base, **kw})


# -- select_negatives ---------------------------------------------------------------------


def test_window_bounds_are_inclusive():
    got = mining.select_negatives(by_rank(30), set(), spec(rank_from=5, rank_to=9))
    assert got == ["r5", "r6", "r7", "r8", "r9"]


def test_window_end_beyond_the_ranking_takes_what_is_there():
    assert mining.select_negatives(by_rank(6), set(), spec(rank_from=4, rank_to=50)) == ["r4", "r5", "r6"]


def test_positives_never_returned_at_rank_one_or_inside_the_window():
    positives = {"r1", "r5", "r7"}
    got = mining.select_negatives(by_rank(10), positives, spec(rank_from=1, rank_to=8))
    assert got == ["r2", "r3", "r4", "r6", "r8"]
    # A positive skipped inside the window does not shift the window: ranks are positions.
    got = mining.select_negatives(by_rank(10), {"r5"}, spec(rank_from=4, rank_to=6))
    assert got == ["r4", "r6"]


def test_max_negatives_keeps_the_best_ranked_with_best():
    got = mining.select_negatives(
        by_rank(40), {"r12"}, spec(rank_from=10, rank_to=40, max_negatives=4, selection="best")
    )
    assert got == ["r10", "r11", "r13", "r14"]


# -- selection: spread / best ---------------------------------------------------------------


def test_spread_rule_on_a_hand_checked_case():
    # n = 10, k = 4: positions (j * 10) // 4 = 0, 2, 5, 7.
    assert mining.spread(list("abcdefghij"), 4) == ["a", "c", "f", "h"]
    assert mining.spread(list("abc"), 3) == ["a", "b", "c"]  # not more than k: all of them
    assert mining.spread(list("ab"), 5) == ["a", "b"]
    assert mining.spread(list("abcdefghij"), 1) == ["a"]  # the best-ranked one


def test_spread_covers_the_whole_window():
    positives = {"r1", "r10", "r55"}  # one before, two inside the window
    s = spec(depth=100, rank_from=10, rank_to=100, max_negatives=30)
    assert s.selection == "spread"  # the default
    got = mining.select_negatives(by_rank(120), positives, s)
    ranks = [int(d[1:]) for d in got]
    assert len(got) == 30 and len(set(got)) == 30
    assert ranks[0] == 11  # the best-ranked eligible one (r10 is a positive)
    assert ranks == sorted(ranks) and 10 <= ranks[0] and ranks[-1] <= 100
    # 89 eligible (r11..r100 but r55), one every 89/30 = 2.97: the last taken is r98.
    assert ranks[-1] == 98
    assert all(2 <= b - a <= 4 for a, b in zip(ranks, ranks[1:], strict=False))
    assert not set(got) & positives


def test_best_reproduces_the_first_max_negatives():
    s = spec(depth=100, rank_from=10, rank_to=100, max_negatives=30, selection="best")
    got = mining.select_negatives(by_rank(120), {"r1", "r10", "r25"}, s)
    assert got == [f"r{i}" for i in [*range(11, 25), *range(26, 42)]]


@pytest.mark.parametrize("selection", ["spread", "best"])
def test_positives_never_taken_and_selection_is_deterministic(selection):
    rng = np.random.default_rng(3)
    ids = [f"d{i}" for i in rng.permutation(150)]
    ranked = [(d, float(200 - n)) for n, d in enumerate(ids)]
    ranked.insert(40, ranked[20])  # a repeat inside the window
    positives = set(ids[::7])
    s = spec(depth=150, rank_from=5, rank_to=150, max_negatives=25, selection=selection)
    first = mining.select_negatives(ranked, positives, s)
    assert len(first) == 25 and len(set(first)) == 25
    assert not set(first) & positives
    assert mining.select_negatives(list(ranked), set(positives), s) == first


def test_spread_thins_what_the_filters_leave_and_counts_the_whole_window():
    # Positive r50 scores 50.0; margin 0 drops every score above it: r10..r49 (40 candidates).
    s = spec(depth=100, rank_from=10, rank_to=100, max_negatives=10, margin=0.0)
    _, stats = mining.mine({"q": by_rank(100)}, {"q": {"r50": 1}}, s)
    negatives = mining.select_negatives(by_rank(100), {"r50"}, s)
    # 50 eligible (r51..r100), one every 5: r51, r56, ..., r96.
    assert negatives == [f"r{i}" for i in range(51, 101, 5)]
    assert stats["filtered_by_margin"] == 40 and stats["negatives_total"] == 10


@pytest.mark.parametrize("value", ["random", "", None, "BEST"])
def test_selection_must_be_spread_or_best(value):
    with pytest.raises(ValueError, match=r"selection must be one of \['spread', 'best'\]"):
        MiningSpec(selection=value)


def test_a_document_listed_twice_is_taken_once():
    ranked = [("a", 3.0), ("b", 2.0), ("a", 1.0), ("c", 0.5)]
    assert mining.select_negatives(ranked, set(), spec()) == ["a", "b", "c"]


# Scores are exact in binary floating point, so the boundaries below are exact too.
RANKED = [("n1", 0.875), ("p", 1.0), ("n2", 0.75), ("n3", 0.625), ("n4", 0.5), ("n5", 0.25)]


def test_margin_drops_candidates_too_close_to_the_best_positive():
    # best positive 1.0, margin 0.25: drop score > 0.75; 0.75 itself stays.
    assert mining.select_negatives(RANKED, {"p"}, spec(margin=0.25)) == ["n2", "n3", "n4", "n5"]
    # margin 0 drops only what outscores the positive.
    assert mining.select_negatives(RANKED, {"p"}, spec(margin=0.0)) == ["n1", "n2", "n3", "n4", "n5"]


def test_ratio_drops_candidates_above_a_share_of_the_best_positive():
    # 0.5 * 1.0 = 0.5: drop score > 0.5.
    assert mining.select_negatives(RANKED, {"p"}, spec(max_score_ratio=0.5)) == ["n4", "n5"]


def test_filters_use_the_best_positive_anywhere_in_the_ranking():
    # Positives at ranks 3 (0.5) and 6 (0.75), both outside the window 1..2.
    ranked = [("n1", 0.875), ("n2", 0.5625), ("p1", 0.5), ("n3", 0.4), ("n4", 0.3), ("p2", 0.75)]
    # best = 0.75, margin 0.125: drop > 0.625 -> n1 goes, n2 stays.
    assert mining.select_negatives(ranked, {"p1", "p2"}, spec(rank_from=1, rank_to=2, margin=0.125)) == ["n2"]
    # ratio 0.75 of 0.75 = 0.5625: n2 (equal) stays.
    assert mining.select_negatives(ranked, {"p1", "p2"}, spec(rank_from=1, rank_to=2, max_score_ratio=0.75)) == ["n2"]


def test_margin_then_ratio_both_apply():
    # margin 0.375 -> drop > 0.625 (n1, n2); ratio 0.5 -> drop > 0.5 (n3); n4 and n5 stay.
    got = mining.select_negatives(RANKED, {"p"}, spec(margin=0.375, max_score_ratio=0.5))
    assert got == ["n4", "n5"]


def test_no_positive_retrieved_means_no_score_filter():
    # The positive "p" is not in the ranking: nothing to compare with, nothing dropped.
    strict = spec(margin=1.0, max_score_ratio=0.01)
    assert mining.select_negatives(by_rank(5), {"p"}, strict) == ["r1", "r2", "r3", "r4", "r5"]


# -- mine -----------------------------------------------------------------------------------


def test_mine_stats_and_min_negatives():
    qrels = {
        "q1": {"r1": 1, "r2": 0},  # r2 judged not relevant: a valid negative
        "q2": {"r3": 2},  # no run
        "q3": {"r2": 1, "r3": 1, "r4": 1},  # window ranks 2..4 hold only positives
        "q4": {"r1": 0},  # no positive: not counted at all
        "q5": {"x": 1},  # positive not retrieved: filters do not apply
    }
    run = {"q1": by_rank(6), "q3": by_rank(6), "q4": by_rank(6), "q5": by_rank(6), "q9": by_rank(6)}
    s = spec(rank_from=2, rank_to=4, max_negatives=3, min_negatives=1, margin=1.5)
    # q1: best positive r1 = 99.0, drop > 97.5 -> r2 (98.0) filtered, r3 and r4 kept.
    negatives, stats = mining.mine(run, qrels, s)
    assert negatives == {"q1": ["r3", "r4"], "q5": ["r2", "r3", "r4"]}
    assert stats == {
        "queries_in": 4,
        "queries_kept": 2,
        "dropped_no_run": 1,
        "dropped_too_few_negatives": 1,
        "negatives_total": 5,
        "mean_negatives": 2.5,
        "positives_retrieved_fraction": 2 / 3,  # q1 and q3 of the three with a ranking
        "filtered_by_margin": 1,
        "filtered_by_ratio": 0,
    }
    # Ratio 0.98 of 99.0 = 97.02: q1's r2 (98.0) goes, and q3 keeps nothing either way.
    _, stats = mining.mine(run, qrels, spec(rank_from=2, rank_to=4, max_score_ratio=0.98))
    assert (stats["filtered_by_margin"], stats["filtered_by_ratio"]) == (0, 1)


def test_mine_through_a_faiss_index_matches_brute_force():
    rng = np.random.default_rng(7)
    docs = rng.standard_normal((50, 16)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = rng.standard_normal((6, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    doc_ids = [f"d{i}" for i in range(50)]
    qids = [f"q{i}" for i in range(6)]

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index = faiss_index.build_index(docs, faiss_index.IndexSpec(type="flat", use_gpu=False))
        run = faiss_index.search(index, doc_ids, queries, qids, k=30, show_progress=False)
    finally:
        faiss.omp_set_num_threads(before)

    order = np.argsort(-(queries @ docs.T), axis=1)
    brute = {q: [doc_ids[i] for i in order[n]] for n, q in enumerate(qids)}
    # Positives at brute-force ranks 1 (before the window), 6 (inside) and 40 (not retrieved).
    qrels = {q: {brute[q][0]: 1, brute[q][5]: 1, brute[q][39]: 2} for q in qids}
    best = MiningSpec(depth=30, rank_from=4, rank_to=20, max_negatives=10, min_negatives=1, selection="best")
    spread = MiningSpec(depth=30, rank_from=4, rank_to=20, max_negatives=10, min_negatives=1)
    negatives, stats = mining.mine(run, qrels, best)
    spread_negatives, _ = mining.mine(run, qrels, spread)

    assert stats["queries_kept"] == 6 and stats["positives_retrieved_fraction"] == 1.0
    for q in qids:
        window = brute[q][3:20]  # ranks 4..20
        eligible = [d for d in window if d not in qrels[q]]  # 16: rank 6 is a positive
        assert negatives[q] == eligible[:10]
        assert spread_negatives[q] == [eligible[(j * 16) // 10] for j in range(10)]
        for got in (negatives[q], spread_negatives[q]):
            assert not set(got) & set(qrels[q])
            assert all(4 <= brute[q].index(d) + 1 <= 20 for d in got)


# -- MiningSpec -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": 0}, "depth must be an integer >= 1"),
        ({"rank_from": 0}, "rank_from must be an integer >= 1"),
        ({"rank_from": 20, "rank_to": 10}, "rank_to must be an integer >= 20"),
        ({"rank_to": 300}, r"rank_to \(300\) must be <= depth \(200\)"),
        ({"max_negatives": 0}, "max_negatives must be an integer >= 1"),
        ({"min_negatives": -1}, "min_negatives must be an integer >= 0"),
        ({"min_negatives": 40}, r"min_negatives \(40\) must be <= max_negatives \(30\)"),
        ({"margin": -0.1}, "margin must be a number >= 0"),
        ({"margin": float("nan")}, "margin must be a number >= 0"),
        ({"max_score_ratio": 0}, r"max_score_ratio must be a number in \(0, 1\]"),
        ({"max_score_ratio": 1.5}, r"max_score_ratio must be a number in \(0, 1\]"),
        ({"depth": "200"}, "depth must be an integer"),
        ({"max_negatives": True}, "max_negatives must be an integer"),
        ({"selection": "first"}, "selection must be one of"),
    ],
)
def test_spec_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MiningSpec(**kwargs)


def test_spec_from_config():
    assert MiningSpec.from_config({"max_score_ratio": 0.95}) == MiningSpec(max_score_ratio=0.95)
    with pytest.raises(ValueError, match=r"unknown mining settings: \['max_negs'\]"):
        MiningSpec.from_config({"max_negs": 3})


# -- Tevatron files -------------------------------------------------------------------------

QUERIES = {"q1": "cat", "q2": "dog", "q3": "fish"}


def test_write_read_round_trip(beir_folder, tmp_path):
    qrels = {"q2": {"d2": 2, "d3": 0}, "q1": {"d1": 1}}
    negatives = {"q2": ["d3", "d1"], "q1": ["d2"]}
    out = tmp_path / "train" / "negatives.jsonl"
    mining.write_tevatron(out, QUERIES, qrels, negatives, beir_folder / "corpus.jsonl")
    assert [json.loads(line)["query_id"] for line in out.read_text().splitlines()] == ["q1", "q2"]
    cats = {"docid": "d1", "title": "Cats", "text": "Cats purr."}
    dogs = {"docid": "d2", "title": "", "text": "Dogs bark."}
    birds = {"docid": "d3", "title": "", "text": "Birds sing."}
    assert mining.read_tevatron(out) == [
        {"query_id": "q1", "query": "cat", "positive_passages": [cats], "negative_passages": [dogs]},
        {"query_id": "q2", "query": "dog", "positive_passages": [dogs], "negative_passages": [birds, cats]},
    ]
    assert sorted(p.name for p in out.parent.iterdir()) == ["negatives.jsonl"]


def test_missing_document_names_the_corpus(beir_folder, tmp_path):
    out = tmp_path / "neg.jsonl"
    corpus = beir_folder / "corpus.jsonl"
    with pytest.raises(ValueError, match=rf"{corpus}: 1 document ids needed for training .*\['d9'\]"):
        mining.write_tevatron(out, QUERIES, {"q1": {"d1": 1}}, {"q1": ["d9"]}, corpus)
    assert not out.exists()


def test_failed_write_leaves_nothing_and_keeps_the_old_file(beir_folder, tmp_path, monkeypatch):
    args = (QUERIES, {"q1": {"d1": 1}}, {"q1": ["d2"]}, beir_folder / "corpus.jsonl")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(OSError, match="disk full"):
        mining.write_tevatron(out_dir / "new.jsonl", *args)
    assert list(out_dir.iterdir()) == []

    old = out_dir / "old.jsonl"
    old.write_text("previous\n")
    with pytest.raises(OSError, match="disk full"):
        mining.write_tevatron(old, *args)
    assert old.read_text() == "previous\n"
    assert list(out_dir.iterdir()) == [old]


GOOD = {
    "query_id": "q1",
    "query": "cat",
    "positive_passages": [{"docid": "d1", "title": "", "text": "x"}],
    "negative_passages": [],
}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"query_id": "q2",', "invalid JSON"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "query"}), "missing key 'query'"),
        (json.dumps({**GOOD, "query_id": "q2", "positive_passages": []}), "'positive_passages' is empty"),
        (
            json.dumps({**GOOD, "query_id": "q2", "negative_passages": [{"title": "", "text": "y"}]}),
            "a passage has no 'docid'",
        ),
        (json.dumps({**GOOD, "query_id": "q2", "positive_passages": [{"docid": "d1"}]}), "passage 'd1' has no 'text'"),
        (json.dumps(GOOD), r"duplicate query id 'q1' \(first on line 1\)"),
    ],
)
def test_read_tevatron_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: {message}"):
        mining.read_tevatron(path)


def test_mine_to_file(beir_folder, tmp_path):
    run = {"q1": [("d1", 0.9), ("d2", 0.5), ("d3", 0.4)], "q2": [("d3", 0.8), ("d2", 0.7), ("d1", 0.1)]}
    run_path = tmp_path / "train.trec"
    trec.write_run(run_path, run, tag="dense", header={"system": "toy"})
    s = MiningSpec(depth=3, rank_from=1, rank_to=3, max_negatives=1, margin=0.25)
    out, stats_path = tmp_path / "negatives.jsonl", tmp_path / "mining.json"
    record = mining.mine_to_file(
        run_path,
        beir_folder / "queries.jsonl",
        beir_folder / "qrels" / "test.tsv",
        beir_folder / "corpus.jsonl",
        s,
        out,
        stats_path,
    )
    # q1: positive d1 at 0.9, drop > 0.65 -> d2 (0.5) is the negative. q2: positive d2 at
    # 0.7, drop > 0.45 -> d3 (0.8) goes, d1 (0.1) stays.
    assert [(ex["query_id"], [p["docid"] for p in ex["negative_passages"]]) for ex in mining.read_tevatron(out)] == [
        ("q1", ["d2"]),
        ("q2", ["d1"]),
    ]
    assert json.loads(stats_path.read_text()) == record
    assert record["queries_kept"] == 2 and record["filtered_by_margin"] == 1
    assert record["settings"]["margin"] == 0.25 and record["run_header"] == {"system": "toy"}


def _streaming_case(tmp_path):
    """A corpus, queries, qrels and a run file over them, for the streamed-vs-dict tests."""
    d = tmp_path / "data"
    (d / "qrels").mkdir(parents=True)
    docs = [f"d{i:02d}" for i in range(40)]
    (d / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": x, "title": "", "text": f"text {x}"}) + "\n" for x in docs)
    )
    qids = ["q1", "q2", "q3", "q4", "q5", "q6"]
    (d / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": f"query {q}"}) + "\n" for q in qids))
    qrels = {
        "q1": {"d05": 1},  # positive at rank 6, inside the window 3..30
        "q2": {"d00": 2, "d31": 1},  # positives at rank 1 (before the window) and 32 (after)
        "q3": {"d07": 1},  # absent from the run
        "q4": {"d03": 0},  # no positive: not counted
        "q5": {"d39": 1, "d12": 1},  # positive at rank 40 (beyond the window) and at rank 13
    }
    (d / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{x}\t{g}\n" for q, j in qrels.items() for x, g in j.items())
    )
    rng = np.random.default_rng(11)
    run = {q: [(x, float(s)) for x, s in zip(docs, -np.sort(-rng.random(40)), strict=True)] for q in qids if q != "q3"}
    # Every ranking lists d00, d01, ... in that order (falling scores); "q6" is not judged.
    path = tmp_path / "train.trec"
    trec.write_run(path, run, tag="dense", header={"system": "toy"})
    return d, qrels, path


@pytest.mark.parametrize("selection", ["spread", "best"])
def test_streamed_mining_writes_the_same_file_as_the_dict_path(tmp_path, selection):
    d, qrels, run_path = _streaming_case(tmp_path)
    s = MiningSpec(depth=40, rank_from=3, rank_to=30, max_negatives=8, min_negatives=1, selection=selection)
    # The dict path: the whole run in memory.
    by_dict, stats_dict = mining.mine(trec.read_run(run_path), qrels, s)
    dict_out = tmp_path / "dict.jsonl"
    mining.write_tevatron(dict_out, beir.load_queries(d / "queries.jsonl"), qrels, by_dict, d / "corpus.jsonl")
    # The streamed path, as the workflow runs it.
    out, stats_path = tmp_path / "stream.jsonl", tmp_path / "stats.json"
    record = mining.mine_to_file(
        run_path, d / "queries.jsonl", d / "qrels" / "train.tsv", d / "corpus.jsonl", s, out, stats_path
    )
    assert out.read_bytes() == dict_out.read_bytes()
    assert mining.mine(trec.iter_run(run_path), qrels, s) == (by_dict, stats_dict)
    assert {k: record[k] for k in stats_dict} == stats_dict
    assert record["settings"]["selection"] == selection
    assert stats_dict["queries_in"] == 4 and stats_dict["dropped_no_run"] == 1 and stats_dict["queries_kept"] == 3
    examples = mining.read_tevatron(out)
    assert [ex["query_id"] for ex in examples] == ["q1", "q2", "q5"]
    negatives = {ex["query_id"]: [p["docid"] for p in ex["negative_passages"]] for ex in examples}
    ranks_q2 = [int(x[1:]) + 1 for x in negatives["q2"]]  # q2's ranking is d00, d01, ... by construction
    assert "d05" not in negatives["q1"] and "d12" not in negatives["q5"]
    if selection == "best":
        assert ranks_q2 == list(range(3, 11))
    else:  # 28 eligible at ranks 3..30, one every 3.5: ranks 3, 6, 10, 13, 17, 20, 24, 27
        assert ranks_q2 == [3, 6, 10, 13, 17, 20, 24, 27]


def test_streamed_mining_refuses_a_run_whose_query_lines_are_not_grouped(tmp_path):
    d, _, run_path = _streaming_case(tmp_path)
    lines = run_path.read_text().splitlines(keepends=True)
    # Move q1's last line after q2's first: q1 reappears after another query's line.
    q1_last = max(n for n, line in enumerate(lines) if line.startswith("q1 "))
    moved = lines[:q1_last] + [lines[q1_last + 1], lines[q1_last]] + lines[q1_last + 2 :]
    run_path.write_text("".join(moved))
    out = tmp_path / "negatives.jsonl"
    with pytest.raises(ValueError, match=rf"{run_path}:{q1_last + 2}: query 'q1' appears again"):
        mining.mine_to_file(
            run_path,
            d / "queries.jsonl",
            d / "qrels" / "train.tsv",
            d / "corpus.jsonl",
            MiningSpec(depth=40, rank_from=3, rank_to=30),
            out,
            tmp_path / "stats.json",
        )
    assert not out.exists()


def test_mine_to_file_refuses_an_empty_result(beir_folder, tmp_path):
    run_path = tmp_path / "train.trec"
    trec.write_run(run_path, {"q1": [("d1", 0.9)]}, tag="dense")
    out = tmp_path / "negatives.jsonl"
    with pytest.raises(ValueError, match="no query kept for training"):
        mining.mine_to_file(
            run_path,
            beir_folder / "queries.jsonl",
            beir_folder / "qrels" / "test.tsv",
            beir_folder / "corpus.jsonl",
            MiningSpec(depth=3, rank_to=3, rank_from=1),
            out,
            tmp_path / "mining.json",
        )
    assert not out.exists()


def test_released_tevatron_file_is_validated_and_published(tmp_path):
    import gzip

    rows = [
        {
            "query_id": "q2",
            "query": "b",
            "positive_passages": [{"docid": "d2", "title": "", "text": "x"}],
            "negative_passages": [],
        },
        {
            "query_id": "q1",
            "query": "a",
            "positive_passages": [{"docid": "d1", "title": "T", "text": "y"}],
            "negative_passages": [{"docid": "d3", "title": "", "text": "z"}, {"docid": "d4", "title": "", "text": "w"}],
        },
    ]
    src = tmp_path / "train.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    stats = mining.import_tevatron(src, tmp_path / "out" / "negatives.jsonl", tmp_path / "out" / "stats.json")
    assert stats["queries_kept"] == 2 and stats["negatives_total"] == 2 and stats["queries_without_negatives"] == 1
    published = mining.read_tevatron(tmp_path / "out" / "negatives.jsonl")
    assert [r["query_id"] for r in published] == ["q1", "q2"] and published[0] == rows[1]
    with gzip.open(src, "at", encoding="utf-8") as f:
        f.write(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl\.gz:3: duplicate query id 'q2' \(first on line 1\)"):
        mining.import_tevatron(src, tmp_path / "again.jsonl", tmp_path / "again.json")
    assert not (tmp_path / "again.jsonl").exists()

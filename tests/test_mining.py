import json
import os

import faiss
import numpy as np
import pytest

from llmret.data import trec
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


def test_max_negatives_keeps_the_best_ranked():
    got = mining.select_negatives(by_rank(40), {"r12"}, spec(rank_from=10, rank_to=40, max_negatives=4))
    assert got == ["r10", "r11", "r13", "r14"]


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
    s = MiningSpec(depth=30, rank_from=4, rank_to=20, max_negatives=10, min_negatives=1)
    negatives, stats = mining.mine(run, qrels, s)

    assert stats["queries_kept"] == 6 and stats["positives_retrieved_fraction"] == 1.0
    for q in qids:
        window = brute[q][3:20]  # ranks 4..20
        expected = [d for d in window if d not in qrels[q]][:10]
        assert negatives[q] == expected
        assert not set(negatives[q]) & set(qrels[q])
        assert all(4 <= brute[q].index(d) + 1 <= 20 for d in negatives[q])


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

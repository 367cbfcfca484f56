import pandas as pd

from llmret.results import tables


def metrics(**values):
    return {"metrics": values}


M = {
    ("bm25", "a"): metrics(**{"ndcg@10": 0.5, "mrr@10": 0.4}),
    ("bm25", "b"): metrics(**{"ndcg@10": 0.3, "mrr@10": 0.2}),
    ("dense", "a"): metrics(**{"ndcg@10": 0.7, "mrr@10": 0.6}),
    ("dense", "b"): metrics(**{"ndcg@10": 0.2, "mrr@10": 0.1}),
}


def test_wide_table_rows_columns_and_average():
    t = tables.wide_table(M, ["bm25", "dense"], ["a", "b"], "ndcg@10")
    assert list(t.columns) == ["system", "a", "b", "avg"]
    assert t.to_dict("records") == [
        {"system": "bm25", "a": 0.5, "b": 0.3, "avg": 0.4},
        {"system": "dense", "a": 0.7, "b": 0.2, "avg": 0.45},
    ]


def test_marks_follow_direction_and_alpha():
    assert tables.mark(0.7, 0.5, 0.01) == "+"
    assert tables.mark(0.2, 0.3, 0.01) == "-"
    assert tables.mark(0.7, 0.5, 0.2) == ""
    assert tables.mark(0.7, 0.5, float("nan")) == ""
    assert tables.mark(0.5, 0.5, None) == ""


def test_long_table_carries_pvalues_marks_and_sources():
    p = {"a": {"dense": {"ndcg@10": 0.001, "mrr@10": 0.3}}, "b": {"dense": {"ndcg@10": 0.04, "mrr@10": 0.04}}}
    src = {k: (f"runs/{k[0]}/{k[1]}.trec", f"metrics/{k[0]}/{k[1]}.json") for k in M}
    t = tables.long_table(M, p, ["bm25", "dense"], ["a", "b"], "bm25", src)
    row = t[(t.system == "dense") & (t.dataset == "a") & (t.metric == "ndcg@10")].iloc[0]
    assert (row["mark"], row["p_vs_bm25"], row["run"]) == ("+", 0.001, "runs/dense/a.trec")
    row = t[(t.system == "dense") & (t.dataset == "b") & (t.metric == "mrr@10")].iloc[0]
    assert row["mark"] == "-"
    assert t[t.system == "bm25"]["p_vs_bm25"].isna().all()
    assert len(t) == 8


def test_bar_plot_writes_png(tmp_path):
    t = pd.DataFrame({"system": ["bm25", "dense"], "a": [0.5, 0.7], "b": [0.3, 0.2]})
    tables.bar_plot(t, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_column_table_takes_each_columns_own_metric():
    cols = [{"dataset": "a", "metric": "mrr@10"}, {"dataset": "b", "metric": "ndcg@10", "label": "B nDCG"}]
    t = tables.column_table(M, ["dense", "bm25"], cols)
    assert list(t.columns) == ["system", "a mrr@10", "B nDCG"]
    assert t.to_dict("records") == [
        {"system": "dense", "a mrr@10": 0.6, "B nDCG": 0.2},
        {"system": "bm25", "a mrr@10": 0.4, "B nDCG": 0.3},
    ]


def test_column_table_names_a_missing_metric():
    import pytest

    with pytest.raises(KeyError, match="recall@1000"):
        tables.column_table(M, ["bm25"], [{"dataset": "a", "metric": "recall@1000"}])

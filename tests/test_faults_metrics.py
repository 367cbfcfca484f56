"""Faults in metrics files and tables: a corrupt, truncated, edited or stale metrics JSON is an
error naming the file, and a table job that fails leaves the tables it had written untouched
and no temporary behind (issue 30's items 9 and the metrics count)."""

import json

import pytest

from llmret.data import trec
from llmret.results import evaluation, tables

SYSTEMS, DATASET = ["bm25", "dense"], "toy"
QRELS = {f"q{i}": {f"d{i}": 1, f"d{i + 1}": 2} for i in range(30)}
RUN_SETTINGS = {"top_k": 20}
METRICS = ["ndcg@10", "mrr@10"]


def _cell_settings():
    return {"run": RUN_SETTINGS, "metrics": METRICS, "relevance_level": 1}


def _workdir(tmp_path):
    """What the evaluate stage leaves for two systems on one dataset, as the tables read it."""
    qrels_path = tmp_path / "qrels.trec"
    trec.write_qrels(qrels_path, QRELS)
    info = tmp_path / "dataset.json"
    info.write_text(json.dumps({"dataset": DATASET, "split": "test", "queries": len(QRELS)}))
    files = {"qrels": {DATASET: str(qrels_path)}, "info": {DATASET: str(info)}, "runs": {}, "metrics": {}}
    for n, system in enumerate(SYSTEMS):
        # bm25 ranks each query's two relevant documents first; dense too for every third query, and
        # shifted by one document for the others
        run = {
            q: [(f"d{(int(q[1:]) + k + n * (int(q[1:]) % 3 > 0)) % 40}", 20.0 - k) for k in range(20)] for q in QRELS
        }
        run_path, metrics_path = tmp_path / f"{system}.trec", tmp_path / f"{system}.json"
        trec.write_run(run_path, run, tag=system, header={"system": system, **RUN_SETTINGS})
        tables.write_json(evaluation.evaluate_files(run_path, qrels_path, METRICS, 1, RUN_SETTINGS), metrics_path)
        files["runs"][(system, DATASET)] = str(run_path)
        files["metrics"][(system, DATASET)] = str(metrics_path)
    return files


def _build(tmp_path, files, settings=None):
    out = tmp_path / "out"
    tables.build_beir_tables(
        metrics_files=files["metrics"],
        run_files=files["runs"],
        qrels_files=files["qrels"],
        info_files=files["info"],
        systems=SYSTEMS,
        datasets=[DATASET],
        metric="ndcg@10",
        metrics=METRICS,
        baseline="bm25",
        test="student",
        relevance_levels={DATASET: 1},
        out_table=str(out / "beir_table.csv"),
        out_full=str(out / "beir_table_full.csv"),
        out_meta=str(out / "beir_table.meta.json"),
        cell_settings=settings or {cell: _cell_settings() for cell in files["metrics"]},
        dataset_settings={DATASET: {"split": "test"}},
    )
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_tables_are_built_from_checked_metrics(tmp_path):
    files = _workdir(tmp_path)
    built = _build(tmp_path, files)
    assert set(built) == {"beir_table.csv", "beir_table_full.csv", "beir_table.meta.json"}  # no temporary
    meta = json.loads(built["beir_table.meta.json"])
    assert meta["queries_evaluated"] == {"bm25/toy": 30, "dense/toy": 30}
    assert meta["runs"]["dense/toy"]["sha256"] == trec.read_record(files["runs"][("dense", DATASET)])["sha256"]
    assert meta["run_headers"]["bm25/toy"]["top_k"] == 20 and meta["warnings"] == {}


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (lambda p, d: p.write_text(p.read_text()[:200]), r"dense\.json: not a readable JSON file \(.*char"),
        (lambda p, d: p.write_text("[1, 2]"), r"dense\.json: not a metrics file \(no metrics, per_query, queries\)"),
        (
            lambda p, d: p.write_text(
                json.dumps({**d, "per_query": {m: dict(list(v.items())[:15]) for m, v in d["per_query"].items()}})
            ),
            r"dense\.json: 15 per-query values of \S+, but it says 30 queries were evaluated",
        ),
        (
            lambda p, d: p.write_text(json.dumps({**d, "metrics": {**d["metrics"], "ndcg@10": 0.99}})),
            r"dense\.json: mean ndcg@10 0\.99 is not its per-query values' mean",
        ),
        (
            lambda p, d: p.write_text(json.dumps({**d, "settings": {**d["settings"], "run": {"top_k": 1000}}})),
            r"dense\.json was computed with other settings than the config's .*run\.top_k: 1000 -> 20.*stale",
        ),
        (
            lambda p, d: p.write_text(json.dumps({**d, "run_sha256": "0" * 64})),
            r"dense\.json: computed from a run with sha256 0{64}, but .*dense\.trec now has [0-9a-f]{64}: .*stale",
        ),
    ],
    ids=["cut-json", "not-metrics", "truncated-per-query", "edited-mean", "stale-settings", "stale-run"],
)
def test_a_bad_metrics_file_fails_the_table_naming_it_and_leaves_the_old_table(tmp_path, fault, message):
    files = _workdir(tmp_path)
    before = _build(tmp_path, files)
    path = tmp_path / "dense.json"
    fault(path, json.loads(path.read_text()))
    with pytest.raises(ValueError, match=message):
        _build(tmp_path, files)
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "out").iterdir())} == before


def test_metrics_of_other_judgements_fail_the_table(tmp_path):
    files = _workdir(tmp_path)
    trec.write_qrels(files["qrels"][DATASET], {**QRELS, "q99": {"d1": 1}})
    with pytest.raises(ValueError, match=r"bm25\.json: 30 queries evaluated, but .*qrels\.trec judges 31"):
        _build(tmp_path, files)


def test_a_failing_table_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import pandas as pd

    path = tmp_path / "t.csv"
    tables.write_csv(pd.DataFrame({"a": [1]}), path)
    before = path.read_bytes()

    def disk_full(self, f, **kwargs):
        f.write("a\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full)
    with pytest.raises(OSError, match="No space left"):
        tables.write_csv(pd.DataFrame({"a": [2]}), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_metrics_readers_check_the_count(tmp_path):
    """Every reader of a metrics file (the tables, the expected-scores check) goes through
    read_metrics, which checks the count of queries against the per-query values."""
    files = _workdir(tmp_path)
    path = files["metrics"][("bm25", DATASET)]
    data = tables.read_metrics(path, _cell_settings())
    assert data["queries"] == 30
    json_path = tmp_path / "bm25.json"
    json_path.write_text(json.dumps({**data, "queries": 31}))
    with pytest.raises(ValueError, match=r"30 per-query values of \S+, but it says 31 queries"):
        tables.read_metrics(json_path)

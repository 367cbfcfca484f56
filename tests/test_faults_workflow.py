"""Faults across Snakemake runs (issue 30, items 1, 2, 3 and 9): a job that fails after a
settings change must not leave a table that disagrees with the config, and the next plain run
finishes with the new setting; a corrupt metrics file fails the table naming it; a produced
run and qrels score in pytrec_eval (trec_eval's measures) as in the table.

A job is made to fail deterministically by garbling one file it reads (keeping its mtime, so
that nothing reruns because of it), and restoring it afterwards. Snakemake 9 records a failed
job's params as if it had succeeded and, by design, leaves a missing intermediate file missing
while the files after it look up to date: the evaluate rule's and the tables' params (each
run's settings) are what make the next run rebuild. BM25 only, on a subsampled SciFact served
on 127.0.0.1: seconds a run.
"""

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from conftest import snakemake

from llmret.data import trec

pytestmark = pytest.mark.slow

CONFIG = (
    "datasets:\n"
    "  scifact:\n"
    "    md5: [5f7d1de60b170fc8027bb7898e2efca1, 4214dfead1313c962c943f4a7e18d2bc]\n"
    "    subsample: {max_queries: 40, max_docs: 250, seed: 13}\n"
    "systems:\n  bm25: {type: bm25}\n"
    "evaluation: {top_k: 50}\n"
)
RUN = Path("results/runs/bm25/scifact.trec")
METRICS = Path("results/metrics/bm25/scifact.json")
QRELS = Path("results/data/scifact/qrels.trec")
META = Path("results/beir_table.meta.json")


def _snake(workdir: Path, mirror: str, *configs: Path, check: bool = True, extra: tuple = ()):
    args = [*extra, "--configfile", *map(str, configs), "--replace-workflow-config", "--config", f"mirror={mirror}"]
    return snakemake(workdir, *args, check=check, timeout=900)


@pytest.fixture(scope="module")
def base(tmp_path_factory, mirror_url):
    """A finished BM25 run at top_k 50, copied by each test."""
    folder = tmp_path_factory.mktemp("faults")
    config = folder / "bm25.yaml"
    config.write_text(CONFIG)
    _snake(folder / "w", mirror_url, config)
    return folder / "w", config, mirror_url


@pytest.fixture
def work(base, tmp_path):
    workdir, config, mirror = base
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy, symlinks=True)  # mtimes kept: nothing is out of date
    top_k_20 = tmp_path / "top_k_20.yaml"
    top_k_20.write_text("evaluation: {top_k: 20}\n")
    return copy, mirror, (config, top_k_20)


@contextmanager
def garbled(path: Path):
    """``path`` unreadable while the block runs, with its mtime unchanged; restored after."""
    data, st = path.read_bytes(), path.stat()
    path.write_bytes(b"\x00 garbled \x00\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    try:
        yield
    finally:
        path.write_bytes(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _assert_finished_with_top_k(workdir: Path, mirror: str, configs, top_k: int) -> None:
    """Tables, metrics and run all say ``top_k``; every file the full table names exists; no
    temporary anywhere; and one more plain run has nothing to do."""
    meta = json.loads((workdir / META).read_text())
    assert meta["run_headers"]["bm25/scifact"]["top_k"] == top_k
    assert trec.read_record(workdir / RUN)["settings"]["top_k"] == top_k
    assert max(len(r) for r in trec.read_run(workdir / RUN).values()) <= top_k
    assert json.loads((workdir / METRICS).read_text())["settings"]["run"]["top_k"] == top_k
    full = pd.read_csv(workdir / "results" / "beir_table_full.csv")
    assert all((workdir / p).is_file() for p in [*full["run"], *full["metrics"]])
    assert not [p for p in (workdir / "results").rglob("*") if ".tmp" in p.name]
    out = _snake(workdir, mirror, *configs, extra=("-n",))
    assert "Nothing to be done" in out.stdout + out.stderr


def test_a_search_failing_after_a_setting_change_is_rerun_by_the_next_plain_run(work):
    workdir, mirror, (config, top_k_20) = work
    killed = workdir / RUN.parent / f".{RUN.name}.tmp-4194303"  # what a killed writer leaves
    killed.write_text("1 Q0 d 1 1.0 bm25\n")
    with garbled(workdir / "results/index/bm25/scifact/bm25/llmret_bm25.json"):
        failed = _snake(workdir, mirror, config, top_k_20, check=False)
    assert failed.returncode != 0 and not (workdir / RUN).exists()
    assert json.loads((workdir / META).read_text())["run_headers"]["bm25/scifact"]["top_k"] == 50  # stale for now
    _snake(workdir, mirror, config, top_k_20)
    _assert_finished_with_top_k(workdir, mirror, (config, top_k_20), 20)


def test_an_evaluation_failing_after_a_setting_change_is_rerun_by_the_next_plain_run(work):
    workdir, mirror, (config, top_k_20) = work
    with garbled(workdir / QRELS):
        failed = _snake(workdir, mirror, config, top_k_20, check=False)
    assert failed.returncode != 0 and not (workdir / METRICS).exists()
    assert f"{QRELS}:1: expected 4 columns" in (workdir / "logs/evaluate/bm25/scifact.log").read_text()
    _snake(workdir, mirror, config, top_k_20)
    _assert_finished_with_top_k(workdir, mirror, (config, top_k_20), 20)


def test_a_corrupt_metrics_file_fails_the_table_naming_it(work):
    workdir, mirror, (config, _) = work
    table = (workdir / "results" / "beir_table.csv").read_text()
    metrics = workdir / METRICS
    metrics.write_text(metrics.read_text()[:100])  # newer than the table: it is read again
    failed = _snake(workdir, mirror, config, check=False)
    assert failed.returncode != 0
    log = (workdir / "logs" / "beir_table.log").read_text()
    assert f"{METRICS}: not a readable JSON file" in log, log[-2000:]
    # Snakemake removes a job's outputs before it runs, so the next plain run rebuilds the
    # table; with the broken file gone, it rebuilds the metrics first.
    metrics.unlink()
    _snake(workdir, mirror, config)
    assert (workdir / "results" / "beir_table.csv").read_text() == table
    _assert_finished_with_top_k(workdir, mirror, (config,), 50)


def test_a_truncated_run_fails_its_evaluation_naming_it(work):
    workdir, mirror, (config, _) = work
    run = workdir / RUN
    st = run.stat()
    lines = run.read_bytes().splitlines(keepends=True)
    run.write_bytes(b"".join(lines[: len(lines) // 2]))
    os.utime(run, ns=(st.st_atime_ns, st.st_mtime_ns))
    failed = _snake(workdir, mirror, config, check=False, extra=("-R", "evaluate"))
    assert failed.returncode != 0
    log = (workdir / "logs/evaluate/bm25/scifact.log").read_text()
    assert f"{RUN} is not the run its record scifact.trec.json describes" in log, log[-2000:]


def test_pytrec_eval_scores_a_produced_run_as_the_table(base):
    """The run and qrels as written, read by trec_eval's measures with no preprocessing."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    workdir, _, _ = base
    with open(workdir / QRELS) as fq, open(workdir / RUN) as fr:
        qrels = pytrec_eval.parse_qrel(fq)
        scores = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(pytrec_eval.parse_run(fr))
    theirs = sum(scores.get(q, {}).get("ndcg_cut_10", 0.0) for q in qrels) / len(qrels)
    ours = json.loads((workdir / METRICS).read_text())
    assert ours["queries"] == len(qrels) == 40
    assert theirs == pytest.approx(ours["metrics"]["ndcg@10"], abs=1e-9)
    full = pd.read_csv(workdir / "results" / "beir_table_full.csv")
    assert theirs == pytest.approx(full.loc[full["metric"] == "ndcg@10", "value"].item(), abs=1e-4)
    assert theirs == pytest.approx(pd.read_csv(workdir / "results" / "beir_table.csv")["scifact"].item(), abs=1e-3)

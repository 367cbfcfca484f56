"""Score runs against judgments with ranx, and test systems against a baseline.

Graded judgments (TREC DL) use the grades as gains for nDCG; binary measures (MRR, recall)
count a document as relevant from ``relevance_level`` up, as TREC DL does with level 2.
Queries that a run does not answer count as zero, never as missing.

:func:`evaluate_files` is the evaluate stage: the judgements checked (a file where nothing is
relevant is an error naming it), the run checked against its record and the config's settings,
and the result's count of queries that the tables check it by.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from llmret import atomic_files
from llmret.data import trec

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("ndcg@10", "mrr@10", "recall@100", "recall@1000")
GRADED = ("ndcg", "ndcg_burges", "dcg", "dcg_burges")
# ranx measures a config may name: with a cutoff (``name@k``) or without (the whole run).
CUTOFF_METRICS = (
    "ndcg",
    "ndcg_burges",
    "dcg",
    "dcg_burges",
    "mrr",
    "map",
    "recall",
    "precision",
    "f1",
    "hits",
    "hit_rate",
)
WHOLE_RUN_METRICS = ("r-precision", "bpref")


def check_metric(metric: str) -> None:
    """``ValueError`` unless ranx can compute ``metric`` as this project names it
    (``ndcg@10``, ``recall@1000``, ``map``, ``r-precision``; relevance levels come from the
    dataset's ``relevance_level``, never from a ``-l`` suffix)."""
    base, at, cutoff = str(metric).partition("@")
    ok = (base in CUTOFF_METRICS and (not at or (cutoff.isdigit() and int(cutoff) >= 1))) or (
        base in WHOLE_RUN_METRICS and not at
    )
    if not ok:
        raise ValueError(
            f"{metric!r} is not a metric the evaluation computes: use one of {', '.join(CUTOFF_METRICS)} "
            f"(optionally @k, k >= 1) or {', '.join(WHOLE_RUN_METRICS)}"
        )


def ranx_metric(metric: str, relevance_level: int) -> str:
    """The ranx name of ``metric`` with the binary relevance threshold applied."""
    base = metric.split("@")[0]
    if relevance_level <= 1 or base in GRADED:
        return metric
    return f"{metric}-l{relevance_level}"


def _ranx_qrels(qrels: Mapping[str, Mapping[str, int]]):
    from ranx import Qrels

    # Built from a dict rather than a DataFrame: ranx's from_df breaks on pandas 3 string ids.
    return Qrels({q: dict(d) for q, d in qrels.items()})


def _ranx_run(run: Mapping[str, Sequence[tuple[str, float]]], name: str, qrels):
    from ranx import Run

    # ranx sorts by score alone; nudging ties by rank keeps the file's (score, doc id) order.
    data = {}
    for q, ranked in run.items():
        n = len(ranked)
        data[q] = {d: float(s) + (n - i) * 1e-9 for i, (d, s) in enumerate(sorted(ranked, key=lambda x: (-x[1], x[0])))}
    if not any(data.values()) and len(qrels):
        # ranx cannot hold a run without a single (query, document) pair (a collapsed sparse
        # model retrieves nothing). One document judged for no query, at the first query,
        # stands in: nothing relevant is retrieved, so every metric stays 0 for every query.
        q = next(iter(qrels.keys()))
        data[q] = {_unjudged_id(qrels): 0.0}
    return Run(data, name=name).make_comparable(qrels)


def _unjudged_id(qrels) -> str:
    """A document id that no query of ``qrels`` judges."""
    judged = {d for q in qrels.keys() for d in qrels[q]}
    doc = "llmret:no-document"
    while doc in judged:
        doc += "_"
    return doc


def evaluate(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Sequence[tuple[str, float]]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    relevance_level: int = 1,
) -> dict:
    """Mean and per-query scores, keyed by our metric names (not ranx's), and ``queries``: how
    many queries were evaluated (every query of ``qrels``; each per-query mapping has that many
    values, which :func:`llmret.results.tables.read_metrics` checks)."""
    from ranx import evaluate as rx_evaluate

    rq = _ranx_qrels(qrels)
    rr = _ranx_run(run, "run", rq)
    names = {m: ranx_metric(m, relevance_level) for m in metrics}
    per_query = rx_evaluate(rq, rr, list(names.values()), return_mean=False, make_comparable=False)
    if len(names) == 1:
        per_query = {next(iter(names.values())): per_query}
    qids = list(rr.keys())
    out_pq = {m: dict(zip(qids, map(float, per_query[r]), strict=True)) for m, r in names.items()}
    means = {m: (sum(v.values()) / len(v) if v else 0.0) for m, v in out_pq.items()}
    unanswered = sum(1 for q in qrels if not run.get(q))
    return {
        "metrics": means,
        "per_query": out_pq,
        "queries": len(qrels),
        "unanswered_queries": unanswered,
        "relevance_level": relevance_level,
        "ranx_metrics": names,
    }


def check_judgements(qrels: Mapping[str, Mapping[str, int]], source: str | Path, relevance_level: int = 1) -> list[str]:
    """Refuse judgements where nothing is relevant (every metric would be 0: an error naming
    ``source``); return warnings for what makes some metrics meaningless (no grade reaches
    ``relevance_level``, so the binary metrics are 0; queries with nothing relevant)."""
    grades = [g for docs in qrels.values() for g in docs.values()]
    if not any(g > 0 for g in grades):
        raise ValueError(
            f"{source}: none of its {len(grades)} judgements has a grade above 0 (grades {sorted(set(grades))}): "
            "nothing is relevant, so every metric would be 0; check the dataset's qrels and its split"
        )
    warnings = []
    if relevance_level > 1 and max(grades) < relevance_level:
        warnings.append(
            f"{source}: no judgement reaches relevance_level {relevance_level} (highest grade {max(grades)}): "
            "the binary metrics (MRR, recall, precision, MAP) are 0 for every query"
        )
    empty = sum(1 for docs in qrels.values() if not any(g > 0 for g in docs.values()))
    if empty:
        warnings.append(
            f"{source}: {empty} of {len(qrels)} queries have nothing relevant; they score 0 on every metric"
        )
    return warnings


def evaluate_files(
    run_path: str | Path,
    qrels_path: str | Path,
    metrics: Sequence[str],
    relevance_level: int,
    run_settings: Mapping,
) -> dict:
    """What ``results/metrics/{system}/{dataset}.json`` holds for one run: :func:`evaluate`'s
    result, the run's and the qrels' sha256, the settings it was computed with (the run's, as
    the config gives them, and the evaluation's) and warnings. The run must match its record
    (complete) and its record the config's ``run_settings`` (not stale)."""
    qrels = trec.read_qrels(qrels_path)
    warnings = check_judgements(qrels, qrels_path, relevance_level)
    for w in warnings:
        log.warning(w)
    trec.check_run_settings(run_path, run_settings)
    result = evaluate(qrels, trec.read_run(run_path), metrics, relevance_level)
    record = trec.read_record(run_path) if trec.record_path(run_path).exists() else {}
    settings = {"run": dict(run_settings), "metrics": list(metrics), "relevance_level": relevance_level}
    result.update(
        run=str(run_path),
        run_sha256=record.get("sha256"),
        qrels=str(qrels_path),
        qrels_sha256=atomic_files.file_sha256(qrels_path),
        settings=json.loads(json.dumps(settings)),
        warnings=warnings,
    )
    return result


def significance(
    qrels: Mapping[str, Mapping[str, int]],
    runs: Mapping[str, Mapping[str, Sequence[tuple[str, float]]]],
    baseline: str,
    metrics: Sequence[str] = DEFAULT_METRICS,
    relevance_level: int = 1,
    test: str = "student",
) -> dict[str, dict[str, float]]:
    """p-value of each system against ``baseline`` per metric (paired test from ranx)."""
    from ranx import compare

    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not among the runs {sorted(runs)}")
    others = [s for s in runs if s != baseline]
    if not others:
        return {}
    rq = _ranx_qrels(qrels)
    rx_runs = [_ranx_run(runs[baseline], baseline, rq)] + [_ranx_run(runs[s], s, rq) for s in others]
    names = {m: ranx_metric(m, relevance_level) for m in metrics}
    report = compare(rq, rx_runs, list(names.values()), stat_test=test, max_p=0.05).to_dict()
    comp = report[baseline]["comparisons"]
    return {s: {m: float(comp[s][r]) for m, r in names.items()} for s in others}

"""Assemble per-run metrics into the papers' tables.

``beir_table.csv`` is the wide table (systems x datasets, one metric, plus the average);
the full table is long: one row per (system, dataset, metric) with the p-value against the
baseline and a mark, and the path of the run and metrics files it came from.

A table never disagrees with the config: each metrics file is read checked (its count of
queries against its per-query values, its settings against the config's, its run's sha256
against the run's record), every input is read before anything is written, and each output
is written beside its place and renamed in.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from llmret import atomic_files

log = logging.getLogger(__name__)

ALPHA = 0.05
METRICS_KEYS = ("metrics", "per_query", "queries")


def mark(value: float, base: float, p: float | None, alpha: float = ALPHA) -> str:
    """'+' or '-' when a system differs from the baseline significantly, '' otherwise."""
    if p is None or math.isnan(p) or p >= alpha:
        return ""
    return "+" if value > base else "-"


def wide_table(
    metrics: Mapping[tuple[str, str], dict],
    systems: Sequence[str],
    datasets: Sequence[str],
    metric: str = "ndcg@10",
    digits: int = 3,
) -> pd.DataFrame:
    """Rows in config order, one column per dataset plus ``avg`` (mean over datasets)."""
    rows = []
    for s in systems:
        vals = [metrics[(s, d)]["metrics"][metric] for d in datasets]
        rows.append([s, *[round(v, digits) for v in vals], round(sum(vals) / len(vals), digits)])
    return pd.DataFrame(rows, columns=["system", *datasets, "avg"])


def long_table(
    metrics: Mapping[tuple[str, str], dict],
    pvalues: Mapping[str, Mapping[str, Mapping[str, float]]],
    systems: Sequence[str],
    datasets: Sequence[str],
    baseline: str,
    sources: Mapping[tuple[str, str], tuple[str, str]],
    digits: int = 4,
) -> pd.DataFrame:
    """One row per (system, dataset, metric); ``pvalues[dataset][system][metric]``."""
    rows = []
    for d in datasets:
        for s in systems:
            for m, v in metrics[(s, d)]["metrics"].items():
                base = metrics[(baseline, d)]["metrics"][m]
                p = None if s == baseline else pvalues[d][s][m]
                run_path, metrics_path = sources[(s, d)]
                rows.append(
                    {
                        "system": s,
                        "dataset": d,
                        "metric": m,
                        "value": round(v, digits),
                        "p_vs_" + baseline: None if p is None else round(p, 6),
                        "mark": mark(v, base, p),
                        "run": run_path,
                        "metrics": metrics_path,
                    }
                )
    return pd.DataFrame(rows)


def read_json(path: str | Path) -> dict:
    """A JSON file; an error naming it when it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e}); rebuild it (snakemake -R {path})") from None


def read_metrics(path: str | Path, settings: Mapping | None = None) -> dict:
    """A metrics JSON written by the evaluate stage, checked: ``queries`` (how many were
    evaluated) is the number of per-query values of every metric and each mean is theirs, and,
    given ``settings`` (the config's for this run), the file was computed with them. Errors
    name the file."""
    from llmret.data import trec

    data = read_json(path)
    missing = [k for k in METRICS_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path}: not a metrics file (no {', '.join(missing)}); rebuild it (snakemake -R {path})")
    n, means = data["queries"], data["metrics"]
    if set(means) != set(data["per_query"]):
        raise ValueError(f"{path}: means for {sorted(means)} but per-query values for {sorted(data['per_query'])}")
    for metric, values in data["per_query"].items():
        if len(values) != n:
            raise ValueError(
                f"{path}: {len(values)} per-query values of {metric}, but it says {n} queries were evaluated: "
                f"it is truncated or was edited; rebuild it (snakemake -R {path})"
            )
        mean = sum(values.values()) / n if n else 0.0
        if not math.isclose(means[metric], mean, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(f"{path}: mean {metric} {means[metric]} is not its per-query values' mean {mean}")
    if settings is not None:
        diffs = trec.setting_differences(data.get("settings", {}), settings)
        if diffs:
            raise ValueError(
                f"{path} was computed with other settings than the config's (recorded -> config: "
                f"{'; '.join(diffs)}): it is stale; rebuild it (snakemake -R {path})"
            )
    return data


def column_table(
    metrics: Mapping[tuple[str, str], dict],
    systems: Sequence[str],
    columns: Sequence[Mapping[str, str]],
    digits: int = 4,
) -> pd.DataFrame:
    """Rows = systems, one column per chosen (dataset, metric) pair: the MS MARCO-style
    table (dev MRR@10, dev Recall@1000, DL19 nDCG@10), where each column has its own metric."""
    labels = [c.get("label") or f"{c['dataset']} {c['metric']}" for c in columns]
    if len(set(labels)) != len(labels):
        raise ValueError(f"column labels repeat: {labels}")
    rows = []
    for s in systems:
        row = [s]
        for c in columns:
            values = metrics[(s, c["dataset"])]["metrics"]
            if c["metric"] not in values:
                raise KeyError(f"{s} on {c['dataset']}: metric {c['metric']!r} not computed (have {sorted(values)})")
            row.append(round(values[c["metric"]], digits))
        rows.append(row)
    return pd.DataFrame(rows, columns=["system", *labels])


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    """Write beside ``path`` and rename in (the temporary goes on any failure)."""
    atomic_files.atomic_write(path, lambda f: df.to_csv(f, index=False, lineterminator="\n"))


def write_json(obj, path: str | Path) -> None:
    """Write beside ``path`` and rename in (the temporary goes on any failure)."""
    atomic_files.atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def bar_plot(table: pd.DataFrame, path: str | Path, metric: str = "nDCG@10") -> None:
    """Grouped bars: one group per dataset, one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [c for c in table.columns if c not in ("system",)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(datasets), 3.6))
    width = 0.8 / max(1, len(table))
    for i, (_, row) in enumerate(table.iterrows()):
        xs = [j + i * width for j in range(len(datasets))]
        ax.bar(xs, [row[d] for d in datasets], width=width, label=row["system"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(datasets))])
    ax.set_xticklabels(datasets)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small", ncols=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_cells(
    metrics_files: Mapping[tuple[str, str], str],
    run_files: Mapping[tuple[str, str], str],
    cell_settings: Mapping[tuple[str, str], Mapping] | None = None,
) -> tuple[dict, dict]:
    """Each (system, dataset) cell's metrics (:func:`read_metrics`, against the cell's settings
    when given) and its run's record, checked to be the run the metrics were computed from
    (the same sha256): a run rebuilt after its metrics makes them stale, an error naming both."""
    from llmret.data import trec

    loaded, records = {}, {}
    for cell, path in metrics_files.items():
        loaded[cell] = read_metrics(path, (cell_settings or {}).get(cell))
        run = run_files[cell]
        has_record = trec.record_path(run).exists()
        records[cell] = trec.read_record(run) if has_record else {"settings": trec.read_header(run)}
        if loaded[cell].get("run_sha256") != records[cell].get("sha256"):
            raise ValueError(
                f"{path}: computed from a run with sha256 {loaded[cell].get('run_sha256')}, but {run} now has "
                f"{records[cell].get('sha256')}: the metrics are stale; rebuild them (snakemake -R {path})"
            )
        for warning in loaded[cell].get("warnings") or []:
            log.warning("%s: %s", path, warning)
    return loaded, records


def _check_queries(path: str, data: Mapping, qrels: Mapping, qrels_path: str) -> None:
    """The metrics file evaluated exactly the queries that ``qrels`` judges."""
    evaluated = set(next(iter(data["per_query"].values()), {}))
    if data["queries"] != len(qrels) or (evaluated and evaluated != set(qrels)):
        raise ValueError(
            f"{path}: {data['queries']} queries evaluated, but {qrels_path} judges {len(qrels)} "
            f"({len(evaluated ^ set(qrels))} differ): computed from other judgements; rebuild it (snakemake -R {path})"
        )


def _dataset_records(info_files: Mapping[str, str], datasets: Sequence[str], settings: Mapping) -> dict:
    """Each dataset's record (counts, split, subsampling), checked against its settings' split."""
    out = {}
    for d in datasets:
        out[d] = read_json(info_files[d])
        want = (settings.get(d) or {}).get("split")
        if want is not None and out[d].get("split") != want:
            raise ValueError(f"{info_files[d]}: split {out[d].get('split')!r}, but the config asks for {want!r}")
    return out


def build_beir_tables(
    *,
    metrics_files: Mapping[tuple[str, str], str],
    run_files: Mapping[tuple[str, str], str],
    qrels_files: Mapping[str, str],
    info_files: Mapping[str, str],
    systems: Sequence[str],
    datasets: Sequence[str],
    metric: str,
    metrics: Sequence[str],
    baseline: str,
    test: str,
    relevance_levels: Mapping[str, int],
    out_table: str,
    out_full: str,
    out_meta: str,
    cell_settings: Mapping[tuple[str, str], Mapping] | None = None,
    dataset_settings: Mapping[str, Mapping] | None = None,
) -> pd.DataFrame:
    """Write the wide table, the long table with significance, and the metadata JSON. Every
    input is read and checked first (:func:`load_cells`, the qrels' queries, each run against
    its record, each dataset's record against its ``split`` in ``dataset_settings``), so a bad
    input fails the job before any output is written."""
    from llmret.data import trec
    from llmret.results import evaluation

    loaded, records = load_cells(metrics_files, run_files, cell_settings)
    pvalues = {}
    for d in datasets:
        qrels = trec.read_qrels(qrels_files[d])
        for s in systems:
            _check_queries(metrics_files[(s, d)], loaded[(s, d)], qrels, qrels_files[d])
        runs = {s: trec.read_run(run_files[(s, d)]) for s in systems}
        pvalues[d] = evaluation.significance(qrels, runs, baseline, metrics, relevance_levels[d], test)
    wide = wide_table(loaded, systems, datasets, metric)
    sources = {cell: (run_files[cell], metrics_files[cell]) for cell in metrics_files}
    full = long_table(loaded, pvalues, systems, datasets, baseline, sources)
    meta = {
        "metric": metric,
        "baseline": baseline,
        "significance": {"test": test, "alpha": ALPHA, "library": "ranx"},
        "datasets": _dataset_records(info_files, datasets, dataset_settings or {}),
        "dataset_settings": dict(dataset_settings or {}),
        "systems": list(systems),
        "run_headers": {f"{s}/{d}": records[(s, d)]["settings"] for s, d in run_files},
        "runs": {f"{s}/{d}": {k: records[(s, d)].get(k) for k in ("queries", "lines", "sha256")} for s, d in run_files},
        "queries_evaluated": {f"{s}/{d}": loaded[(s, d)]["queries"] for s, d in metrics_files},
        "warnings": {f"{s}/{d}": m["warnings"] for (s, d), m in loaded.items() if m.get("warnings")},
    }
    write_csv(wide, out_table)
    write_csv(full, out_full)
    write_json(meta, out_meta)
    return wide

"""Assemble per-run metrics into the papers' tables.

``beir_table.csv`` is the wide table (systems x datasets, one metric, plus the average);
the full table is long: one row per (system, dataset, metric) with the p-value against the
baseline and a mark, and the path of the run and metrics files it came from.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

ALPHA = 0.05


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


def read_metrics(path: str | Path) -> dict:
    """A metrics JSON written by the evaluate stage."""
    return json.loads(Path(path).read_text())


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def write_json(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
) -> pd.DataFrame:
    """Write the wide table, the long table with significance, and the metadata JSON."""
    from llmret.data import beir, trec
    from llmret.results import evaluation

    loaded = {cell: read_metrics(f) for cell, f in metrics_files.items()}
    pvalues = {}
    for d in datasets:
        qrels = beir.load_qrels(qrels_files[d])
        runs = {s: trec.read_run(run_files[(s, d)]) for s in systems}
        pvalues[d] = evaluation.significance(qrels, runs, baseline, metrics, relevance_levels[d], test)
    wide = wide_table(loaded, systems, datasets, metric)
    sources = {cell: (run_files[cell], metrics_files[cell]) for cell in metrics_files}
    full = long_table(loaded, pvalues, systems, datasets, baseline, sources)
    meta = {
        "metric": metric,
        "baseline": baseline,
        "significance": {"test": test, "alpha": ALPHA, "library": "ranx"},
        "datasets": {d: json.loads(Path(info_files[d]).read_text()) for d in datasets},
        "systems": list(systems),
        "run_headers": {f"{s}/{d}": trec.read_header(run_files[(s, d)]) for s, d in run_files},
    }
    write_csv(wide, out_table)
    write_csv(full, out_full)
    write_json(meta, out_meta)
    return wide

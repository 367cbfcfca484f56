"""Snakemake entry point: the BEIR-style table, its full-metrics sibling and metadata; each
metrics file is checked against the config's settings for its cell (``cells``), each dataset's
record against its split (``data``)."""

from itertools import product

from llmret import atomic_files, logs
from llmret.results import tables

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
p = sm.params
cells = list(product(p.systems, p.datasets))  # the order of expand() in the rule
tables.build_beir_tables(
    cell_settings={(s, d): p.cells[f"{s}/{d}"] for s, d in cells},
    dataset_settings=p.data,
    metrics_files=dict(zip(cells, sm.input.metrics, strict=True)),
    run_files=dict(zip(cells, sm.input.runs, strict=True)),
    qrels_files=dict(zip(p.datasets, sm.input.qrels, strict=True)),
    info_files=dict(zip(p.datasets, sm.input.info, strict=True)),
    systems=p.systems,
    datasets=p.datasets,
    metric=p.metric,
    metrics=p.metrics,
    baseline=p.baseline,
    test=p.test,
    relevance_levels=p.relevance_levels,
    out_table=sm.output.table,
    out_full=sm.output.full,
    out_meta=sm.output.meta,
)
